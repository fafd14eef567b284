//! Developer and CI tasks for the kube2iam-ebpf workspace: `cargo xtask <command>`.
//!
//! One module per command; `cmd` holds the process helpers they share and `leftovers` the
//! inventory of what integration tests may leave on the machine.

mod bench;
mod build_ebpf;
mod clean_test_env;
mod cmd;
mod demo;
mod deploy;
mod fuzz;
mod image;
mod install;
mod leftovers;
mod test;
mod vm;
mod vm_initramfs;
mod vm_kernels;
mod vm_qemu;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, lint and test tasks for kube2iam-ebpf")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object through the agent's build script and check it carries BTF.
    BuildEbpf,
    /// Install what the build and the tests need (apt packages, toolchain components,
    /// bpf-linker); does nothing when everything is present.
    Install,
    /// Install, lint, build and run every test, then check the tests left nothing behind (root).
    Test(test::Args),
    /// Lint, render and validate the Helm chart, the plain manifests and the Dockerfile
    /// (`--write` regenerates deploy/manifests/ from the chart).
    Deploy(deploy::Args),
    /// Build the agent image from deploy/Dockerfile and write it as an OCI archive
    /// (target/image/kube2iam-ebpf.oci.tar), without a registry.
    Image(image::Args),
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu and run the agent's kernel tests,
    /// the doctor and the capability checks in each (root not needed; KVM if it works).
    VmTest(vm::Args),
    /// Remove network namespaces, cgroups, links and mounts left behind by integration tests.
    CleanTestEnv,
    /// Run the agent on this machine with emulated EC2 metadata, STS (moto) and Kubernetes API,
    /// and print what unmodified AWS clients in pods get (root).
    Demo,
    /// Like demo, but keep the node, pods and agent up and take commands until stopped (root).
    Sandbox,
    /// Run the cargo-fuzz targets (nightly; installs cargo-fuzz), minimize and keep the corpora
    /// and crash reproducers that CI replays.
    Fuzz(fuzz::Args),
    /// Run the benchmarks (eBPF redirect vs iptables DNAT, credential latency and throughput, STS
    /// herd, memory, restart) in a test node and write BENCHMARKS.md (root).
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run(),
        Command::Install => install::run(),
        Command::Test(args) => test::run(&args),
        Command::Image(args) => image::run(&args),
        Command::VmTest(args) => vm::run(&args),
        Command::CleanTestEnv => clean_test_env::run(),
        Command::Deploy(args) => deploy::run(&args),
        Command::Demo => demo::run("demo"),
        Command::Sandbox => demo::run("sandbox"),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Bench(args) => bench::run(&args),
    }
}
