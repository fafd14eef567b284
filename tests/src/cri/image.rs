//! The agent image as `cargo xtask image` writes it (an OCI archive), unpacked the way a runtime
//! unpacks an image: the layers applied in order into a root filesystem, and the image config
//! (entrypoint, environment, user, working directory) read from the config blob.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{process::output_within, venv::workspace_root};

/// The archive `cargo xtask image` writes: `$K2I_IMAGE_ARCHIVE`, else
/// `<workspace>/target/image/kube2iam-ebpf.oci.tar`.
pub fn image_archive() -> PathBuf {
    let path = std::env::var_os("K2I_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/image/kube2iam-ebpf.oci.tar"));
    assert!(
        path.is_file(),
        "the agent image {} is missing: build it with `cargo xtask image` (cargo xtask test does)",
        path.display()
    );
    path
}

/// An unpacked image.
#[derive(Clone, Debug)]
pub struct Image {
    /// The root filesystem.
    pub rootfs: PathBuf,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env`, `NAME=value`.
    pub env: Vec<String>,
    /// `config.User`.
    pub user: String,
    /// `config.WorkingDir`.
    pub working_dir: String,
    /// The manifest digest, e.g. `sha256:…`.
    pub digest: String,
}

impl Image {
    /// Unpacks `archive` under `dir` (`dir/layout`, `dir/rootfs`).
    pub fn unpack(archive: &Path, dir: &Path) -> Image {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        for d in [&layout, &rootfs] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        tar(&[
            "-xf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            layout.as_os_str(),
        ]);
        let index = json(&layout.join("index.json"));
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: index.json lists no manifest", archive.display()))
            .to_owned();
        let manifest = json(&blob(&layout, &digest));
        let config = json(&blob(
            &layout,
            manifest["config"]["digest"]
                .as_str()
                .expect("the manifest names its config"),
        ));
        for layer in manifest["layers"]
            .as_array()
            .expect("the manifest lists layers")
        {
            let digest = layer["digest"].as_str().expect("a layer digest");
            let path = blob(&layout, digest);
            let listing = tar(&["-tf".as_ref(), path.as_os_str()]);
            assert!(
                !listing
                    .lines()
                    .any(|l| l.rsplit('/').next().is_some_and(|n| n.starts_with(".wh."))),
                "layer {digest} has whiteouts, which this unpacker does not apply"
            );
            tar(&[
                "-xf".as_ref(),
                path.as_os_str(),
                "-C".as_ref(),
                rootfs.as_os_str(),
                "--same-owner".as_ref(),
                "--preserve-permissions".as_ref(),
            ]);
        }
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let c = &config["config"];
        Image {
            rootfs,
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            user: c["User"].as_str().unwrap_or("").to_owned(),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_owned(),
            digest,
        }
    }
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("malformed digest {digest}"));
    layout.join("blobs").join(algorithm).join(hex)
}

fn json(path: &Path) -> Value {
    let text = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn tar(args: &[&std::ffi::OsStr]) -> String {
    let output = output_within(
        Command::new("tar").args(args),
        Duration::from_secs(120),
        "tar",
    );
    assert!(
        output.status.success(),
        "tar {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
