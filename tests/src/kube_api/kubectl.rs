//! Debian's kubectl (package `kubernetes-client`, 1.20 in bookworm) for the emulator's
//! faithfulness tests. It is unpacked into `<workspace>/.cache/kubernetes-client` rather than
//! installed, because the package conflicts with other packages that ship `/usr/bin/kubectl`
//! (Google Cloud SDK's `kubectl`), and the tests want Debian's build whatever else is there.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::process::output_within;

/// `<workspace>/.cache/kubernetes-client`.
pub fn debian_kubectl_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join(".cache/kubernetes-client")
}

/// The unpacked Debian kubectl, unpacking it first if needed (`apt-get download` and
/// `dpkg-deb -x`; `apt-get update` once if apt does not know the package). Safe to call from
/// parallel tests; panics with the tools' output if it cannot.
pub fn debian_kubectl() -> PathBuf {
    let dir = debian_kubectl_dir();
    let binary = dir.join("usr/bin/kubectl");
    if binary.is_file() {
        return binary;
    }
    let parent = dir.parent().expect("has a parent");
    fs::create_dir_all(parent)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    let lock_path = parent.join("kubernetes-client.lock");
    let lock = File::create(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    if binary.is_file() {
        return binary;
    }
    let download = dir.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", download.display()));
    let fetch = || {
        output_within(
            Command::new("apt-get")
                .args([
                    "-q",
                    "-o",
                    "APT::Sandbox::User=root",
                    "download",
                    "kubernetes-client",
                ])
                .current_dir(&download),
            Duration::from_secs(300),
            "apt-get download kubernetes-client",
        )
    };
    let mut output = fetch();
    if !output.status.success() {
        let update = output_within(
            Command::new("apt-get").args(["-q", "update"]),
            Duration::from_secs(300),
            "apt-get update",
        );
        assert!(
            update.status.success(),
            "apt-get update failed: {}",
            String::from_utf8_lossy(&update.stderr)
        );
        output = fetch();
    }
    assert!(
        output.status.success(),
        "apt-get download kubernetes-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = fs::read_dir(&download)
        .expect("download dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .expect("apt-get download left a .deb");
    let unpack = output_within(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir),
        Duration::from_secs(120),
        "dpkg-deb -x",
    );
    assert!(
        unpack.status.success(),
        "dpkg-deb -x {} failed: {}",
        deb.display(),
        String::from_utf8_lossy(&unpack.stderr)
    );
    let _ = fs::remove_dir_all(&download);
    assert!(binary.is_file(), "{} has no usr/bin/kubectl", deb.display());
    drop(lock);
    binary
}
