//! Builds the eBPF object (the `kube2iam` binary of `kube2iam-ebpf`) into OUT_DIR with the nightly
//! toolchain; `src/bpf.rs` embeds it. This is the only place the object is built:
//! `cargo xtask build-ebpf` runs this build script and reports its output.
fn main() -> anyhow::Result<()> {
    // aya-build watches the eBPF crate; the shared types live next door.
    println!("cargo:rerun-if-changed=../kube2iam-common");
    let package = aya_build::Package {
        name: "kube2iam-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../kube2iam-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
