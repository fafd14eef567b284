//! The OCI runtime spec (runc's config.json) of a pod's container, built from the image config
//! and the container's part of the pod spec the way containerd's CRI plugin builds it (v1.7:
//! oci.populateDefaultUnixSpec, pkg/cri/opts WithMounts, the CRI server's container spec).
//!
//! What is reproduced: containerd's default mounts (with `/run` removed and the read-only
//! cgroupfs at /sys/fs/cgroup, both dropped when a volume covers the path), masked and read-only
//! paths, CRI mounts sorted by depth with `rbind` and the propagation mapping (HostToContainer →
//! `rslave`, None → `rprivate`, Bidirectional → `rshared`), capabilities (default set; `ALL` in
//! add or drop first, then each `add`, then each `drop`, bounding = effective = permitted for uid 0, no inheritable or ambient), the user,
//! no_new_privs from `allowPrivilegeEscalation`, the read-only root, the seccomp profile, the OOM
//! score of a node-critical pod, memory limit and CPU shares, and the namespaces: the pod's
//! network namespace joined, private pid/ipc/mount, the host UTS namespace for a hostNetwork pod,
//! and either a private cgroup namespace (containerd on cgroup v2) or the node's.
//!
//! Not reproduced: AppArmor/SELinux labels (the test machine has neither), rlimits (inherited),
//! hugepages, and privileged containers.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{image::Image, seccomp::CONTAINERD_DEFAULT_CAPS};

/// A mount the kubelet asks for (a volume, /etc/hosts, …).
#[derive(Clone, Debug)]
pub struct CriMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub readonly: bool,
    /// `None`, `HostToContainer` or `Bidirectional` (the pod spec's `mountPropagation`).
    pub propagation: String,
}

/// The container's cgroup namespace.
#[derive(Clone, Debug)]
pub enum CgroupNamespace {
    /// A new one rooted at the container's cgroup (containerd on cgroup v2 hosts).
    Private,
    /// Join this one (the node's: containerd on cgroup v1 hosts shares the host's).
    Join(PathBuf),
}

/// Everything the spec is made of.
pub struct ContainerSpec<'a> {
    pub image: &'a Image,
    /// The container object of the pod spec.
    pub container: &'a Value,
    /// The environment the kubelet resolved (service links, downward API, `value`s), in order.
    pub env: Vec<(String, String)>,
    /// `args` after the kubelet's `$(VAR)` expansion.
    pub args: Vec<String>,
    pub mounts: Vec<CriMount>,
    pub netns: PathBuf,
    pub cgroupns: CgroupNamespace,
    /// `linux.cgroupsPath`, e.g. `/k2i-test-1-0/kubepods/burstable/pod<uid>/<id>`.
    pub cgroups_path: String,
    /// `linux.seccomp`, or `None` for Unconfined.
    pub seccomp: Option<Value>,
    pub oom_score_adj: i64,
    /// The capabilities the runtime can hand out (its own bounding set): others are left out.
    pub available_caps: u64,
}

/// The container's capabilities after `drop` and `add`, `CAP_*` names.
pub fn capabilities(container: &Value) -> Vec<String> {
    let security = &container["securityContext"];
    assert!(
        security["privileged"] != true,
        "privileged containers are not run by this test runtime"
    );
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|c| {
                        let c = c.to_ascii_uppercase();
                        if c == "ALL" || c.starts_with("CAP_") {
                            c
                        } else {
                            format!("CAP_{c}")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let drop = names(&security["capabilities"]["drop"]);
    let add = names(&security["capabilities"]["add"]);
    let mut caps: Vec<String> = if drop.iter().any(|c| c == "ALL") {
        Vec::new()
    } else {
        CONTAINERD_DEFAULT_CAPS
            .iter()
            .map(|c| (*c).to_owned())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for cap in add {
        if !caps.contains(&cap) {
            caps.push(cap);
        }
    }
    caps
}

/// Linux capability numbers by name (linux/capability.h).
pub const CAPABILITY_NUMBERS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

/// The number of capability `name` (`CAP_*`).
pub fn capability_number(name: &str) -> u32 {
    CAPABILITY_NUMBERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .unwrap_or_else(|| panic!("unknown capability {name}"))
}

/// The capabilities in this process's bounding set: a container cannot get more.
pub fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `spec.seccompProfile` of the container (or the pod), as `(type, localhostProfile)`.
pub fn seccomp_profile<'v>(
    pod_spec: &'v Value,
    container: &'v Value,
) -> (&'v str, Option<&'v str>) {
    let profile = if container["securityContext"]["seccompProfile"].is_object() {
        &container["securityContext"]["seccompProfile"]
    } else {
        &pod_spec["securityContext"]["seccompProfile"]
    };
    (
        profile["type"].as_str().unwrap_or("Unconfined"),
        profile["localhostProfile"].as_str(),
    )
}

impl ContainerSpec<'_> {
    /// The config.json.
    pub fn build(&self) -> Value {
        let security = &self.container["securityContext"];
        let caps: Vec<String> = capabilities(self.container)
            .into_iter()
            .filter(|c| self.available_caps & (1 << capability_number(c)) != 0)
            .collect();
        let uid = security["runAsUser"].as_u64().unwrap_or_else(|| {
            self.image
                .user
                .split(':')
                .next()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0)
        });
        let gid = security["runAsGroup"].as_u64().unwrap_or(0);
        // For another uid the kernel would clear effective and permitted; only root keeps them.
        let (effective, permitted) = if uid == 0 {
            (caps.clone(), caps.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        let no_new_privs = security["allowPrivilegeEscalation"] == false;

        let mut args = self.image.entrypoint.clone();
        let command: Vec<String> = strings(&self.container["command"]);
        if !command.is_empty() {
            args = command;
        }
        if self.container["args"].is_array() || !self.container["command"].is_null() {
            args.extend(self.args.iter().cloned());
        } else {
            args.extend(self.image.cmd.iter().cloned());
        }

        let mut env: Vec<String> = self.image.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(
                0,
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            );
        }
        for (name, value) in &self.env {
            env.retain(|e| !e.starts_with(&format!("{name}=")));
            env.push(format!("{name}={value}"));
        }
        let cwd = if self.image.working_dir.is_empty() {
            "/".to_owned()
        } else {
            self.image.working_dir.clone()
        };

        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "mount"}),
            json!({"type": "network", "path": self.netns}),
        ];
        namespaces.push(match &self.cgroupns {
            CgroupNamespace::Private => json!({"type": "cgroup"}),
            CgroupNamespace::Join(path) => json!({"type": "cgroup", "path": path}),
        });

        let (mounts, rootfs_propagation) = self.mounts();
        let resources = resources(&self.container["resources"]);
        let mut linux = json!({
            "namespaces": namespaces,
            "cgroupsPath": self.cgroups_path,
            "resources": resources,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/sys/devices/virtual/powercap",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        });
        if let Some(propagation) = rootfs_propagation {
            linux["rootfsPropagation"] = json!(propagation);
        }
        if let Some(seccomp) = &self.seccomp {
            linux["seccomp"] = seccomp.clone();
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},
                "args": args,
                "env": env,
                "cwd": cwd,
                "capabilities": {
                    "bounding": caps,
                    "effective": effective,
                    "permitted": permitted,
                },
                "noNewPrivileges": no_new_privs,
                "oomScoreAdj": self.oom_score_adj,
            },
            "root": {
                "path": self.image.rootfs,
                "readonly": security["readOnlyRootFilesystem"] == true,
            },
            "mounts": mounts,
            "linux": linux,
        })
    }

    /// containerd's default mounts, minus those a CRI mount replaces, then the CRI mounts by
    /// depth; and the root propagation the CRI mounts call for.
    fn mounts(&self) -> (Vec<Value>, Option<&'static str>) {
        let defaults = [
            json!({"destination": "/proc", "type": "proc", "source": "proc",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                               "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                   "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        ];
        let mut cri = self.mounts.clone();
        cri.sort_by_key(|m| Path::new(&m.container_path).components().count());
        let covered = |dst: &str| {
            cri.iter()
                .any(|m| Path::new(&m.container_path) == Path::new(dst))
        };
        let mut mounts: Vec<Value> = defaults
            .into_iter()
            .filter(|m| !covered(m["destination"].as_str().unwrap_or("")))
            .collect();
        let mut rootfs_propagation = None;
        for mount in &cri {
            let mut options = vec!["rbind".to_owned()];
            match mount.propagation.as_str() {
                "HostToContainer" => {
                    options.push("rslave".into());
                    if rootfs_propagation != Some("rshared") {
                        rootfs_propagation = Some("rslave");
                    }
                }
                "Bidirectional" => {
                    options.push("rshared".into());
                    rootfs_propagation = Some("rshared");
                }
                _ => options.push("rprivate".into()),
            }
            options.push(if mount.readonly { "ro" } else { "rw" }.into());
            mounts.push(json!({
                "destination": mount.container_path,
                "type": "bind",
                "source": mount.host_path,
                "options": options,
            }));
        }
        (mounts, rootfs_propagation)
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Memory limit and CPU shares, as the kubelet computes them from `resources`.
fn resources(resources: &Value) -> Value {
    let mut out = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(limit) = resources["limits"]["memory"].as_str() {
        out["memory"] = json!({"limit": quantity(limit) as u64});
    }
    // Kubelet: shares = milliCPU * 1024 / 1000, at least 2.
    let millicpu = resources["requests"]["cpu"]
        .as_str()
        .map(|cpu| (quantity(cpu) * 1000.0).round() as u64)
        .or_else(|| {
            resources["requests"]["cpu"]
                .as_f64()
                .map(|cpu| (cpu * 1000.0).round() as u64)
        });
    let shares = millicpu.map_or(2, |m| (m * 1024 / 1000).max(2));
    out["cpu"] = json!({"shares": shares});
    out
}

/// A Kubernetes quantity (`256Mi`, `50m`, `1`) in base units.
fn quantity(text: &str) -> f64 {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("not a Kubernetes quantity: {text:?}"));
    let factor: f64 = match unit {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unsupported quantity unit {other:?} in {text:?}"),
    };
    number * factor
}
