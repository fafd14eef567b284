//! The doctor's bpffs rows: whether the pin directory's parent is (or can be) a bpffs, whether
//! this kernel's verifier accepts the embedded programs (loaded with their maps pinned in a
//! transient directory), and what an earlier installation left pinned there.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{CgroupSkb, CgroupSockAddr},
};
use kube2iam_common::{DEFAULT_IDENTITY_CAPACITY, FLAG_ENABLED, maps, port_from_repr, programs};

use super::{ns::in_private_mount_ns, report::Check, rules::summarize_error};
use crate::bpf::{self, EBPF_OBJECT, KernelVersion, host, sys};

/// The program ids behind our pinned links (to tell them from other programs).
pub(super) fn pinned_prog_ids(pin_dir: &Path) -> Vec<u32> {
    link_names()
        .filter_map(|name| {
            let link = sys::obj_get(&bpf::link_path(pin_dir, name)).ok()?;
            sys::link_info(link.as_fd()).ok().map(|i| i.prog_id)
        })
        .collect()
}

/// The links an installation pins: the cgroup address hooks and the egress backstop.
fn link_names() -> impl Iterator<Item = &'static str> {
    bpf::HOOKS
        .into_iter()
        .map(|(name, _)| name)
        .chain([programs::EGRESS])
}

/// Where the embedded programs can be loaded (their maps must be pinned somewhere).
pub(super) enum LoadDir {
    /// A transient directory on the bpffs that holds the pin directory.
    Transient(PathBuf),
    /// A private bpffs in a private mount namespace (no bpffs is mounted yet).
    PrivateMount,
}

pub(super) fn bpffs_check(pin_dir: &Path) -> (Check, Option<LoadDir>) {
    const NAME: &str = "bpffs";
    let Some(parent) = pin_dir.parent() else {
        return (
            Check::fail(NAME, format!("{} has no parent", pin_dir.display()), ""),
            None,
        );
    };
    if host::is_bpffs(parent) {
        return (
            Check::ok(NAME, format!("{} is a bpffs", parent.display())),
            Some(LoadDir::Transient(parent.to_owned())),
        );
    }
    if parent != Path::new(host::DEFAULT_BPFFS) {
        return (
            Check::fail(
                NAME,
                format!("{} is not a bpffs", parent.display()),
                format!(
                    "mount one (mount -t bpf bpf {}) or use a --bpf-pin-path under /sys/fs/bpf",
                    parent.display()
                ),
            ),
            None,
        );
    }
    let mountable = in_private_mount_ns(|| {
        host::mount("bpf", parent)
            .map(|()| Vec::new())
            .map_err(|e| e.to_string())
    });
    match mountable {
        Ok(_) => (
            Check::warn(
                NAME,
                format!(
                    "nothing mounted at {}; mountable, and the agent mounts it",
                    parent.display()
                ),
                "mount it on the host (systemd does by default) so the pins outlive the agent's \
                 mount namespace; in a pod, mount the host's /sys/fs/bpf",
            ),
            Some(LoadDir::PrivateMount),
        ),
        Err(e) => (
            Check::fail(
                NAME,
                format!(
                    "nothing mounted at {}, and it cannot be mounted: {e}",
                    parent.display()
                ),
                "mount the host's bpffs at /sys/fs/bpf (hostPath), or grant CAP_SYS_ADMIN",
            ),
            None,
        ),
    }
}

/// Removes the transient pin directory (and the maps pinned in it) on every path out.
struct TempPins(PathBuf);

impl Drop for TempPins {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Loads the embedded programs (this kernel's verifier judges them) with their maps pinned in a
/// transient directory under `bpffs`; returns the check and each loaded program's tag.
pub(super) fn embedded_programs_check_in(
    bpffs: &Path,
    kernel: KernelVersion,
) -> (Check, Vec<(String, String)>) {
    const NAME: &str = "programs";
    if EBPF_OBJECT.is_empty() {
        return (
            Check::fail(
                NAME,
                "this binary embeds no eBPF programs (built with AYA_BUILD_SKIP)",
                "rebuild without AYA_BUILD_SKIP",
            ),
            Vec::new(),
        );
    }
    // bpffs refuses names with a dot.
    let dir = bpffs.join(format!("kube2iam-doctor-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        return (
            Check::fail(NAME, format!("cannot create {}: {e}", dir.display()), ""),
            Vec::new(),
        );
    }
    let guard = TempPins(dir);
    let log_level = 0u8;
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&guard.0)
        .map_max_entries(maps::IDENTITY, DEFAULT_IDENTITY_CAPACITY)
        .override_global("AYA_LOG_LEVEL", &log_level, true)
        .load(EBPF_OBJECT);
    let mut ebpf = match loaded {
        Ok(ebpf) => ebpf,
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    format!(
                        "the object does not load: {}",
                        summarize_error(&format!("{e:#}"))
                    ),
                    "on kernels before 5.11 this is often RLIMIT_MEMLOCK: grant CAP_SYS_RESOURCE",
                ),
                Vec::new(),
            );
        }
    };
    let mut tags = Vec::new();
    let mut failed = Vec::new();
    let mut optional_failed = Vec::new();
    let hooks = bpf::HOOKS.into_iter().map(|(name, _)| name);
    for name in hooks.chain([programs::NETNS_PROBE, programs::SOCK_OPS]) {
        // The hooks a newer kernel brought (getpeername) may fail to load on this one.
        let optional = bpf::HOOKS
            .iter()
            .any(|(hook, needs)| *hook == name && needs.is_some());
        let result = ebpf
            .program_mut(name)
            .ok_or_else(|| "missing from the object".to_owned())
            .and_then(|p| {
                let info = if name == programs::SOCK_OPS {
                    let p = <&mut aya::programs::SockOps>::try_from(p)
                        .map_err(|e| summarize_error(&e.to_string()))?;
                    p.load().map_err(|e| summarize_error(&e.to_string()))?;
                    p.info()
                } else {
                    let p = <&mut CgroupSockAddr>::try_from(p)
                        .map_err(|e| summarize_error(&e.to_string()))?;
                    p.load().map_err(|e| summarize_error(&e.to_string()))?;
                    p.info()
                };
                info.map(|i| format!("{:016x}", i.tag()))
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(tag) => tags.push((name.to_owned(), tag)),
            Err(e) if optional && kernel < KernelVersion::GETPEERNAME => {
                optional_failed.push(format!("{name}: {e}"));
            }
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    let egress = ebpf
        .program_mut(programs::EGRESS)
        .ok_or_else(|| "missing from the object".to_owned())
        .and_then(|p| <&mut CgroupSkb>::try_from(p).map_err(|e| summarize_error(&e.to_string())))
        .and_then(|p| {
            p.load().map_err(|e| summarize_error(&e.to_string()))?;
            p.info()
                .map(|i| format!("{:016x}", i.tag()))
                .map_err(|e| e.to_string())
        });
    match egress {
        Ok(tag) => tags.push((programs::EGRESS.to_owned(), tag)),
        Err(e) => failed.push(format!("{}: {e}", programs::EGRESS)),
    }
    drop(ebpf);
    drop(guard);
    let loaded: Vec<&str> = tags.iter().map(|(n, _)| n.as_str()).collect();
    let check = if !failed.is_empty() {
        Check::fail(
            NAME,
            format!("this kernel's verifier rejects {}", failed.join("; ")),
            "report it with the kernel release: the programs must be changed for this kernel",
        )
    } else if !optional_failed.is_empty() {
        Check::warn(
            NAME,
            format!(
                "loaded {}; not {}",
                loaded.join(", "),
                optional_failed.join("; ")
            ),
            "optional hooks; the agent skips them on this kernel",
        )
    } else {
        Check::ok(
            NAME,
            format!(
                "the verifier accepts {} (loaded, not attached)",
                loaded.join(", ")
            ),
        )
    };
    (check, tags)
}

/// What is pinned under the pin directory, and whether a starting agent can adopt it.
pub(super) fn pinned_state_check(
    pin_dir: &Path,
    target: Option<&Path>,
    tags: &[(String, String)],
) -> Check {
    const NAME: &str = "pinned state";
    if !pin_dir.exists() {
        return Check::ok(
            NAME,
            format!(
                "nothing at {}: the agent attaches afresh",
                pin_dir.display()
            ),
        );
    }
    let target_id = target.and_then(|t| host::cgroup_id(t).ok());
    let mut links = Vec::new();
    let mut elsewhere = Vec::new();
    let mut differ = Vec::new();
    for name in link_names() {
        let path = bpf::link_path(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let link = match sys::obj_get(&path) {
            Ok(link) => link,
            Err(e) => {
                return Check::fail(
                    NAME,
                    format!("cannot open {}: {e}", path.display()),
                    "needs CAP_BPF (or CAP_SYS_ADMIN) and read access to the pin",
                );
            }
        };
        let info = match sys::link_info(link.as_fd()) {
            Ok(info) => info,
            Err(e) => {
                return Check::fail(NAME, format!("link info of {}: {e}", path.display()), "");
            }
        };
        links.push(format!("{name} (link {})", info.id));
        // A starting agent compares the program tag from the link's fdinfo with its own and
        // swaps through the link when they differ; opening the program by id is optional.
        let pinned_tag = match sys::link_prog_tag(link.as_fd()) {
            Ok(tag) => bpf::hex(&tag),
            Err(e) => {
                return Check::fail(
                    NAME,
                    format!(
                        "{name} is pinned, and a starting agent adopts it by reading its program \
                         tag from the link, which fails here: {e}"
                    ),
                    "run `kube2iam-agent uninstall` with CAP_BPF and CAP_NET_ADMIN first",
                );
            }
        };
        if target_id.is_some_and(|id| id != info.cgroup_id) {
            elsewhere.push(format!("{name} on cgroup id {}", info.cgroup_id));
        }
        let embedded = tags.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        if embedded.is_some_and(|embedded| *embedded != pinned_tag) {
            differ.push(name);
        }
    }
    let config = bpf::pinned_config(pin_dir).ok().flatten();
    let config_text = match &config {
        Some(c) if c.flags & FLAG_ENABLED != 0 => format!(
            "config enabled (agent {}:{})",
            std::net::Ipv4Addr::from(c.agent_ip4.to_ne_bytes()),
            port_from_repr(c.agent_port)
        ),
        Some(_) => "config disabled (pods' metadata connects are refused)".to_owned(),
        None => "no config (pods' metadata connects are refused)".to_owned(),
    };
    if !elsewhere.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "{} is attached to another cgroup than the target: {}",
                pin_dir.display(),
                elsewhere.join(", ")
            ),
            "run `kube2iam-agent uninstall` first, or pass the --cgroup-path it was installed \
             with",
        );
    }
    if links.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "{} exists but holds no links; {config_text}",
                pin_dir.display()
            ),
            "a starting agent attaches afresh and reuses the pinned maps",
        );
    }
    let programs = if differ.is_empty() {
        "programs match this binary".to_owned()
    } else {
        format!(
            "{} differ from this binary (a starting agent swaps them through the same links)",
            differ.join(", ")
        )
    };
    Check::ok(
        NAME,
        format!(
            "{}: {}; {config_text}; {programs}; a starting agent adopts them",
            pin_dir.display(),
            links.join(", ")
        ),
    )
}
