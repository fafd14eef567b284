//! `cargo xtask demo` and `cargo xtask sandbox`: build everything and run the `k2i-demo` binary
//! of the test crate, which sets up a test node with the real agent, the emulators, moto and
//! pods (see tests/src/bin/k2i-demo.rs). It cleans up on exit and on Ctrl-C; this command then
//! checks nothing was left behind.

use anyhow::{Result, bail};

use crate::{cmd, install, leftovers::Leftovers};

/// `demo` prints a table of what each pod's clients got; `sandbox` keeps the setup running.
pub fn run(mode: &str) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask {mode} needs root: it creates network namespaces, a cgroup, a bpffs \
             mount and BPF programs (run it with sudo -E env \"PATH=$PATH\" cargo xtask {mode})"
        );
    }
    install::run()?;
    cmd::run(cmd::cargo().args([
        "build",
        "--package",
        "kube2iam-agent",
        "--package",
        "kube2iam-tests",
        "--bins",
    ]))?;
    let binary = cmd::workspace_root().join("target/debug/k2i-demo");
    // Ctrl-C reaches the demo too (same process group); it unwinds and cleans up, and we wait
    // for it instead of dying first.
    // SAFETY: setting a signal disposition to SIG_IGN is always sound.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let mut child = cmd::command(&binary);
    child.arg(mode);
    // SAFETY: restoring the default disposition in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let status = child.status()?;
    let left = Leftovers::find_settled(std::time::Duration::from_secs(2))?;
    if !left.is_empty() {
        bail!(
            "the {mode} left these behind (remove them with cargo xtask clean-test-env):\n  {}",
            left.lines().join("\n  ")
        );
    }
    if !status.success() {
        bail!("the {mode} failed ({status})");
    }
    Ok(())
}
