//! `cargo xtask bench`: build the agent and the benchmark binaries in release, run `k2i-bench`
//! (the test crate's `bench` module: a test node with the real agent, the emulators, pods and
//! load generators), which prints the report and writes BENCHMARKS.md; then check that nothing
//! was left behind.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, install, leftovers::Leftovers};

#[derive(clap::Args)]
pub struct Args {
    /// Do not check or install packages (wrk, iptables, nftables, iperf3 and what the tests
    /// need).
    #[arg(long)]
    skip_install: bool,
    /// Measure less, to try the harness; the numbers are not worth keeping.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (comma-separated): connect, get, attest, cost, sts, memory, restart.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the report goes. Default: BENCHMARKS.md for a full run, target/BENCHMARKS.partial.md
    /// with --quick or --only.
    #[arg(long)]
    out: Option<PathBuf>,
}

const PARTS: &[&str] = &[
    "connect", "get", "attest", "cost", "sts", "memory", "restart",
];

pub fn run(args: &Args) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask bench needs root: it creates network namespaces, a cgroup, a bpffs mount, \
             BPF programs and iptables rules inside a test node (try `sudo -E env \"PATH=$PATH\" \
             cargo xtask bench`)"
        );
    }
    if let Some(part) = args.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        bail!("--only {part}: the parts are {}", PARTS.join(", "));
    }
    if !args.skip_install {
        install::run()?;
    }
    let before = Leftovers::find()?;
    if !before.is_empty() {
        eprintln!(
            "note: test namespaces or cgroups of another run exist (another test run may be in \
             progress, which also skews the numbers):\n  {}",
            before.lines().join("\n  ")
        );
    }
    let build = Instant::now();
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "kube2iam-agent",
        "--package",
        "kube2iam-tests",
        "--bin",
        "kube2iam-agent",
        "--bin",
        "k2i-bench",
        "--bin",
        "k2i-bench-client",
    ]))?;
    let build_secs = build.elapsed().as_secs();
    eprintln!("release build: {build_secs} s");

    let root = cmd::workspace_root();
    let partial = args.quick || !args.only.is_empty();
    let out = match &args.out {
        Some(out) => std::env::current_dir()
            .context("the current directory")?
            .join(out),
        None if partial => root.join("target/BENCHMARKS.partial.md"),
        None => root.join("BENCHMARKS.md"),
    };
    let command_line = std::iter::once("cargo xtask".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let revision = cmd::output(cmd::command("git").args(["describe", "--always", "--dirty"]))
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let release = target.join("release");
    let mut bench = cmd::command(release.join("k2i-bench"));
    bench
        .env("K2I_AGENT_BIN", release.join("kube2iam-agent"))
        .env("K2I_BENCH_CLIENT_BIN", release.join("k2i-bench-client"))
        .arg("--out")
        .arg(&out)
        .args(["--command", &command_line, "--revision", &revision])
        .args(["--build-secs", &build_secs.to_string()]);
    if args.quick {
        bench.arg("--quick");
    }
    if !args.only.is_empty() {
        bench.args(["--only", &args.only.join(",")]);
    }
    // Ctrl-C reaches k2i-bench too (same process group); it unwinds and cleans up, and we wait
    // for it instead of dying first.
    // SAFETY: setting a signal disposition to SIG_IGN is always sound.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    // SAFETY: restoring the default disposition in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut bench, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    eprintln!("$ {}", cmd::display(&bench));
    let mut child = bench.spawn().context("could not start k2i-bench")?;
    // Everything the run creates carries its pid: `k2i-node-<pid>-<n>`, `k2i-test-<pid>-<n>`.
    let tag = format!("{}-", child.id());
    let status = child.wait().context("waiting for k2i-bench")?;
    let left = Leftovers::find_settled(std::time::Duration::from_secs(2))?;
    let ours: Vec<String> = left
        .lines()
        .into_iter()
        .filter(|line| line.contains(&tag))
        .collect();
    if !ours.is_empty() {
        bail!(
            "the benchmarks left these behind (remove them with cargo xtask clean-test-env):\n  {}",
            ours.join("\n  ")
        );
    }
    if !status.success() {
        bail!("k2i-bench failed ({status})");
    }
    eprintln!("report: {}", out.display());
    Ok(())
}
