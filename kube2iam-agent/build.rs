//! Builds the eBPF object (the `kube2iam` binary of `kube2iam-ebpf`) into OUT_DIR with the nightly
//! toolchain; `src/bpf/mod.rs` embeds it. This is the only place the object is built:
//! `cargo xtask build-ebpf` runs this build script and reports its output.
//!
//! With `AYA_BUILD_SKIP=1` (lints, which never run the binary) an empty placeholder is embedded
//! instead, and the agent refuses to start with it.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    // aya-build watches the eBPF crate; the shared types live next door.
    println!("cargo:rerun-if-changed=../kube2iam-common");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = PathBuf::from(
            env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?,
        );
        fs::write(out_dir.join("kube2iam"), [])?;
        return Ok(());
    }
    let package = aya_build::Package {
        name: "kube2iam-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../kube2iam-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
