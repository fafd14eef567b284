//! The Python virtualenv at `<workspace>/.cache/venv` that holds the Python test tools: moto
//! (STS), botocore (a real AWS client) and the kubernetes client. `cargo xtask install` creates
//! it; [`ensure_venv`] does the same on demand, so a test run without the install step works.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use crate::process::output_within;

/// What the tests pip-install into the venv (keep in step with xtask's install list).
pub const PYTHON_PACKAGES: &[&str] = &["moto[server]", "botocore", "kubernetes"];

/// The modules whose import proves the packages are there.
const PROBE_IMPORTS: &str = "import moto.server, botocore.credentials, flask, kubernetes";

/// The workspace root (the parent of the tests crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `<workspace>/.cache/venv`.
pub fn venv_dir() -> PathBuf {
    workspace_root().join(".cache/venv")
}

/// A program in the venv's `bin/`.
pub fn venv_bin(name: &str) -> PathBuf {
    venv_dir().join("bin").join(name)
}

/// The venv's python interpreter.
pub fn venv_python() -> PathBuf {
    venv_bin("python")
}

/// Makes sure the venv exists and has [`PYTHON_PACKAGES`], creating it and running pip only if
/// an import check fails. Safe to call from parallel tests and test processes (a file lock
/// serializes the work); panics with pip's output if the install fails.
pub fn ensure_venv() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = venv_dir();
        let cache = dir
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.clone());
        fs::create_dir_all(&cache)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
        let lock_path = cache.join("venv.lock");
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
        if packages_present() {
            return;
        }
        if !venv_python().exists() {
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&dir),
                "python3 -m venv",
            );
        }
        run(
            Command::new(venv_bin("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(PYTHON_PACKAGES),
            "pip install",
        );
        assert!(
            packages_present(),
            "pip installed {PYTHON_PACKAGES:?} into {}, but `{PROBE_IMPORTS}` still fails",
            dir.display()
        );
        drop(lock);
    });
}

fn packages_present() -> bool {
    if !venv_python().exists() {
        return false;
    }
    let output = output_within(
        Command::new(venv_python())
            .args(["-c", PROBE_IMPORTS])
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        Duration::from_secs(120),
        "venv import check",
    );
    output.status.success()
}

fn run(command: &mut Command, what: &str) {
    let output = output_within(command, Duration::from_secs(900), what);
    assert!(
        output.status.success(),
        "{what} failed ({}) while setting up {}: {}\n{}",
        output.status,
        venv_dir().display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
