//! `cargo xtask build-ebpf`: builds the agent, whose build script (aya-build) compiles the eBPF
//! crate in release with nightly and bpf-linker, then checks and describes the object it wrote.
//!
//! The object is built in exactly one place, the agent's build script, so this command and a
//! plain `cargo build` produce the same file and `cargo test` reuses it.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};
use object::{Architecture, Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind};
use serde_json::Value;

use crate::cmd;

const AGENT_PACKAGE: &str = "kube2iam-agent";
/// File name aya-build gives the object in the agent's OUT_DIR (the eBPF crate's binary name).
const OBJECT_NAME: &str = "kube2iam";

pub fn run() -> Result<()> {
    let agent_id = package_id(AGENT_PACKAGE)?;
    let out_dir = build_agent(&agent_id)?;
    let path = out_dir.join(OBJECT_NAME);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "the agent's build script ran but {} is missing",
            path.display()
        )
    })?;
    let report = inspect(&path, &bytes)?;
    println!("eBPF object: {}", path.display());
    println!("size: {} bytes", bytes.len());
    println!(
        "BTF: .BTF ({} bytes), .BTF.ext {}",
        report.btf_size,
        if report.btf_ext { "present" } else { "absent" }
    );
    println!("programs:");
    for program in &report.programs {
        println!("  {program}");
    }
    Ok(())
}

/// The id cargo uses for `name` in its JSON messages, from `cargo metadata`.
fn package_id(name: &str) -> Result<String> {
    let metadata =
        cmd::output(cmd::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: Value =
        serde_json::from_str(&metadata).context("cargo metadata printed invalid JSON")?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == name)
        .and_then(|package| package["id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("package {name} is not in the workspace"))
}

/// Builds the agent (debug profile, as `cargo test` does) and returns its build script's OUT_DIR.
fn build_agent(agent_id: &str) -> Result<PathBuf> {
    let mut command = cmd::cargo();
    command
        .args([
            "build",
            "--package",
            AGENT_PACKAGE,
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped());
    let line = cmd::display(&command);
    eprintln!("$ {line}");
    let mut child = command
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let stdout = child
        .stdout
        .take()
        .context("cargo's stdout was not captured")?;

    let mut out_dir = None;
    for message in BufReader::new(stdout).lines() {
        let message = message.context("reading cargo's JSON messages")?;
        let Ok(message) = serde_json::from_str::<Value>(&message) else {
            continue;
        };
        if message["reason"] == "build-script-executed" && message["package_id"] == agent_id {
            out_dir = message["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    out_dir.with_context(|| format!("cargo reported no build script run for {AGENT_PACKAGE}"))
}

struct Report {
    btf_size: u64,
    btf_ext: bool,
    /// Program sections with the functions in them, e.g. `cgroup/connect4 (connect4)`.
    programs: Vec<String>,
}

fn inspect(path: &Path, bytes: &[u8]) -> Result<Report> {
    let file = object::File::parse(bytes)
        .with_context(|| format!("{} is not an ELF object", path.display()))?;
    if file.architecture() != Architecture::Bpf {
        bail!(
            "{} is built for {:?}, not BPF",
            path.display(),
            file.architecture()
        );
    }
    let Some(btf) = file.section_by_name(".BTF") else {
        bail!(
            "{} has no .BTF section: bpf-linker must run with --btf \
             (aya-build passes -Clink-arg=--btf) and the eBPF crate needs debuginfo",
            path.display()
        );
    };

    let mut programs = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or_default();
        if section.kind() != SectionKind::Text || name.starts_with('.') {
            continue;
        }
        let functions: Vec<&str> = file
            .symbols()
            .filter(|symbol| symbol.section_index() == Some(section.index()))
            .filter(|symbol| symbol.is_global())
            .filter_map(|symbol| symbol.name().ok())
            .collect();
        programs.push(format!("{name} ({})", functions.join(", ")));
    }
    if programs.is_empty() {
        bail!("{} contains no program sections", path.display());
    }
    Ok(Report {
        btf_size: btf.size(),
        btf_ext: file.section_by_name(".BTF.ext").is_some(),
        programs,
    })
}
