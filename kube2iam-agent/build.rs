//! Builds the eBPF object (the `kube2iam` binary of `kube2iam-ebpf`) into OUT_DIR with the nightly
//! toolchain; `src/bpf/mod.rs` embeds it. This is the only place the object is built:
//! `cargo xtask build-ebpf` runs this build script and reports its output.
//!
//! With `AYA_BUILD_SKIP=1` (lints, which never run the binary) an empty placeholder is embedded
//! instead, and the agent refuses to start with it.
use std::{env, fs, path::PathBuf};

/// The commit the binary is built from, for the `kube2iam_build_info` metric:
/// `KUBE2IAM_GIT_COMMIT` when set (an image build without `.git`), else `git rev-parse`; nothing
/// when neither is available (the metric then says `unknown`).
fn git_commit() {
    println!("cargo:rerun-if-env-changed=KUBE2IAM_GIT_COMMIT");
    if let Ok(commit) = env::var("KUBE2IAM_GIT_COMMIT") {
        println!("cargo:rustc-env=KUBE2IAM_GIT_COMMIT={commit}");
        return;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=KUBE2IAM_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points at (a commit).
    // A path that does not exist would make cargo rerun this script on every build.
    let mut paths = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    paths.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in paths {
        if let Some(p) = git(&["rev-parse", "--git-path", &path])
            && std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(&p)
                .exists()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    git_commit();
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
