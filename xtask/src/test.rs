//! `cargo xtask test`: what CI runs (`.ci/run`) and what a developer runs before pushing.
//! Install, lint, build the eBPF object and the agent image, run unit and integration tests and
//! the image under runc, then fail if the tests left anything on the machine. Last, the kernel
//! matrix (`vm-test`) boots Debian's 5.10, 6.1 and 6.12 kernels under qemu and runs the kernel
//! tests there. Needs root: the integration tests
//! load BPF programs and create network namespaces and cgroups.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{build_ebpf, cmd, deploy, image, install, leftovers::Leftovers};

#[derive(clap::Args)]
pub struct Args {
    /// Do not check or install packages, toolchain components and bpf-linker.
    #[arg(long)]
    skip_install: bool,
    /// Skip `cargo fmt --check` and both clippy runs.
    #[arg(long)]
    no_lint: bool,
    /// Skip the kernel matrix (`cargo xtask vm-test`) that runs after the host tests.
    #[arg(long)]
    no_vm: bool,
    /// Passed to the test binaries after `--`, e.g. a test name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// The flags aya-build passes when it builds the eBPF crate; linting with the same cfgs checks
/// the code that is built.
const EBPF_RUSTFLAGS: &str =
    "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

pub fn run(args: &Args) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask test must run as root: the integration tests need CAP_BPF, \
             CAP_NET_ADMIN and CAP_SYS_ADMIN (try `sudo -E env PATH=$PATH cargo xtask test`)"
        );
    }
    let mut steps = Steps::default();
    let result = run_steps(args, &mut steps);
    steps.print_summary();
    result
}

fn run_steps(args: &Args, steps: &mut Steps) -> Result<()> {
    if !args.skip_install {
        steps.run("install", install::run)?;
    }
    if !args.no_lint {
        steps.run("fmt", || {
            cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        steps.run("clippy", || {
            // Lints never run the agent: skip compiling the eBPF object for the check profile
            // (the agent's build script embeds a placeholder); build-ebpf builds the real one.
            cmd::run(cmd::cargo().env("AYA_BUILD_SKIP", "1").args([
                "clippy",
                "--workspace",
                "--exclude",
                "kube2iam-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        steps.run("clippy eBPF", clippy_ebpf)?;
    }
    steps.run("deploy", deploy::check)?;
    steps.run("build-ebpf", build_ebpf::run)?;
    steps.run("image", || {
        image::run(&image::Args {
            upgrade_fixture: true,
            binary: None,
        })
    })?;
    let tests = steps.run("tests", || {
        let before = Leftovers::find()?;
        if !before.is_empty() {
            bail!(
                "test namespaces, cgroups or mounts exist before the tests start (left by an earlier \
                 run, or another run is in progress); remove leftovers with \
                 `cargo xtask clean-test-env`:\n  {}",
                before.lines().join("\n  ")
            );
        }
        // The eBPF crate only builds for bpfel-unknown-none; its code is tested through the
        // integration tests.
        cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--exclude", "kube2iam-ebpf", "--"])
                .args(&args.test_args),
        )
    });
    // The image under runc: the chart's pod in a test node (tests/tests/runtime.rs). These
    // tests are #[ignore]d in plain `cargo test`, since they need the image built above.
    let image_tests = steps.run("image tests", || {
        cmd::run(
            cmd::cargo()
                .args([
                    "test",
                    "--package",
                    "kube2iam-tests",
                    "--test",
                    "runtime",
                    "--",
                ])
                .args(["--ignored", "--test-threads=1"])
                .args(&args.test_args),
        )
    });
    let leftovers = steps.run("leftover check", || {
        let found = Leftovers::find_settled(Duration::from_secs(2))?;
        if !found.is_empty() {
            bail!(
                "the tests left these behind (remove them with `cargo xtask clean-test-env`):\n  {}",
                found.lines().join("\n  ")
            );
        }
        Ok(())
    });
    // The kernel matrix runs even when a host test failed: its result is independent.
    let vm = if args.no_vm {
        Ok(())
    } else {
        steps.run("vm-test", || crate::vm::run(&crate::vm::Args::default()))
    };
    tests?;
    image_tests?;
    leftovers?;
    vm
}

/// The eBPF crate is linted with nightly for its own target. It gets its own target directory:
/// nightly and stable must not share incremental state, and the agent's build uses another.
fn clippy_ebpf() -> Result<()> {
    let target_dir = cmd::workspace_root().join("target/ebpf-clippy");
    cmd::run(
        cmd::cargo()
            .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS)
            .args([
                "+nightly",
                "clippy",
                "--package",
                "kube2iam-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
            ])
            .arg(target_dir)
            .args(["--", "-D", "warnings"]),
    )
}

#[derive(Default)]
struct Steps {
    done: Vec<(&'static str, Duration, bool)>,
}

impl Steps {
    fn run<T>(&mut self, name: &'static str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("==> {name}");
        let start = Instant::now();
        let result = step();
        let elapsed = start.elapsed();
        let ok = result.is_ok();
        eprintln!(
            "<== {name}: {} in {:.1}s",
            outcome(ok),
            elapsed.as_secs_f64()
        );
        self.done.push((name, elapsed, ok));
        result
    }

    fn print_summary(&self) {
        eprintln!("\nsummary:");
        for (name, elapsed, ok) in &self.done {
            eprintln!(
                "  {name:<16} {:<6} {:>7.1}s",
                outcome(*ok),
                elapsed.as_secs_f64()
            );
        }
        let total: Duration = self.done.iter().map(|(_, elapsed, _)| *elapsed).sum();
        eprintln!("  {:<16} {:<6} {:>7.1}s", "total", "", total.as_secs_f64());
    }
}

fn outcome(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}
