//! k2i-vm-init: the init (PID 1) of the kernel-matrix VMs that `cargo xtask vm-test` boots.
//!
//! It mounts what a node has (proc, sys, dev, run; cgroup2 at /sys/fs/cgroup and bpffs at
//! /sys/fs/bpf in the default layout, cgroup-v1 hierarchies and neither of those in the `v1`
//! layout), loads the modules the initramfs carries (veth), runs the suite for its layout, and
//! reports each result as a `K2I {json}` line on the console. Then it powers the VM off.
//!
//! Kernel command line: `k2i.layout=v2|v1`, `k2i.caps=off|find|verify`, and for `verify`
//! `k2i.caps.install=bpf+net_admin`, `k2i.caps.restart=...`, `k2i.caps.uninstall=...`.

mod attest;
mod caps;
mod guard;
mod report;
mod suite;
mod topology;
mod vmagent;

use std::{
    ffi::CString,
    fs,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::symlink},
    path::{Path, PathBuf},
};

use serde_json::json;

use crate::{
    caps::Scenario,
    report::{Tally, emit, uptime},
    suite::Kernel,
};

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "k2i-vm-init is the init of the kernel-matrix VMs (cargo xtask vm-test); it only runs \
             as PID 1"
        );
        std::process::exit(2);
    }
    base_mounts();
    // SAFETY: single-threaded at this point; nothing else reads the environment yet.
    unsafe {
        std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
        std::env::set_var("RUST_BACKTRACE", "1");
    }
    // Keep the console for our lines; the kernel log is printed at the end.
    let _ = fs::write("/proc/sys/kernel/printk", "1 4 1 7");
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let param = |key: &str| {
        cmdline.split_whitespace().find_map(|w| {
            w.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    let layout = param("k2i.layout").unwrap_or_else(|| "v2".into());
    let caps_mode = param("k2i.caps").unwrap_or_else(|| "off".into());
    let (kernel, release) = Kernel::current();

    let modules = load_modules();
    let pod_cgroup = match layout.as_str() {
        "v1" => v1_layout(),
        _ => {
            v2_layout();
            None
        }
    };
    emit(json!({
        "event": "boot",
        "uptime": uptime(),
        "kernel": release,
        "layout": layout,
        "modules": modules,
    }));

    let mut tally = Tally::default();
    match layout.as_str() {
        "v1" => suite::legacy(&mut tally, kernel, pod_cgroup),
        _ => {
            let node = suite::production(&mut tally, kernel);
            if let Some(node) = node {
                match caps_mode.as_str() {
                    "find" => caps::find(&mut tally, &node),
                    "verify" => {
                        let expected: Vec<(Scenario, u64)> = Scenario::ALL
                            .into_iter()
                            .filter_map(|s| {
                                let spec = param(&format!("k2i.caps.{}", s.name()))?;
                                Some((s, caps::parse_set(&spec)?))
                            })
                            .collect();
                        caps::verify(&mut tally, &node, &expected);
                    }
                    _ => {}
                }
            }
        }
    }

    print_dmesg();
    emit(json!({
        "event": "done",
        "passed": tally.passed,
        "failed": tally.failed,
        "skipped": tally.skipped,
        "known": tally.known,
        "uptime": uptime(),
    }));
    let _ = std::io::stdout().flush();
    // SAFETY: plain syscalls; nothing runs after them.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Power-off failed: qemu's timeout on the host ends the VM.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source, target_c, fstype) = (c(source), c(target), c(fstype));
    let data = data.map(c);
    // SAFETY: valid C strings; `data` is a C string or NULL.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        println!(
            "k2i-vm-init: mount {target}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn base_mounts() {
    mount("proc", "/proc", "proc", None);
    mount("sysfs", "/sys", "sysfs", None);
    mount("devtmpfs", "/dev", "devtmpfs", None);
    mount("tmpfs", "/run", "tmpfs", Some("mode=755"));
    mount("tmpfs", "/tmp", "tmpfs", None);
    let _ = fs::create_dir_all("/var");
    let _ = symlink("/run", "/var/run");
}

/// A node with systemd's unified layout: cgroup2 at /sys/fs/cgroup, bpffs at /sys/fs/bpf.
fn v2_layout() {
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", None);
    mount("bpf", "/sys/fs/bpf", "bpf", None);
}

/// A legacy cgroup-v1 node: no cgroup2 anywhere, no bpffs. Returns the net_cls,net_prio cgroup
/// prepared for pods (the suite activates it later, as a container runtime would).
fn v1_layout() -> Option<PathBuf> {
    mount("tmpfs", "/sys/fs/cgroup", "tmpfs", Some("mode=755"));
    let mut mounted = Vec::new();
    for (dir, options) in [
        ("cpu,cpuacct", "cpu,cpuacct"),
        ("memory", "memory"),
        ("pids", "pids"),
        ("net_cls,net_prio", "net_cls,net_prio"),
        ("systemd", "none,name=systemd"),
    ] {
        let target = format!("/sys/fs/cgroup/{dir}");
        mount("cgroup", &target, "cgroup", Some(options));
        if fs::metadata(Path::new(&target).join("cgroup.procs")).is_ok() {
            mounted.push(dir);
        }
    }
    println!("k2i-vm-init: cgroup v1 hierarchies: {}", mounted.join(" "));
    let pods = Path::new("/sys/fs/cgroup/net_cls,net_prio/kubepods");
    if !mounted.contains(&"net_cls,net_prio") || fs::create_dir_all(pods).is_err() {
        return None;
    }
    Some(pods.to_owned())
}

/// Loads the modules listed in /k2i/modules (dependency order) with finit_module.
fn load_modules() -> Vec<String> {
    let list = fs::read_to_string("/k2i/modules").unwrap_or_default();
    let mut loaded = Vec::new();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                println!("k2i-vm-init: module {path}: {e}");
                continue;
            }
        };
        // SAFETY: finit_module on an open file with empty parameters.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            loaded.push(name);
        } else {
            println!(
                "k2i-vm-init: insmod {path}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    loaded
}

/// The kernel log, for the console log kept on the host.
pub fn dmesg() -> String {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: SYSLOG_ACTION_READ_ALL (3) fills at most `len` bytes of `buf`.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as libc::c_int) };
    if n <= 0 {
        return String::new();
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

fn print_dmesg() {
    for line in dmesg().lines() {
        println!("dmesg| {line}");
    }
}
