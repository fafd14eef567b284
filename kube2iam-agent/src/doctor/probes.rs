//! The doctor's kernel probes: BTF, the memlock limit, a hand-assembled program per hook, the
//! netns cookie helper and sockopt, the target cgroup (a bpf_link on an empty temporary child of
//! it, whether a program there runs for its processes, who else is attached), and kubelet's pod
//! cgroups for attestation. Nothing is attached where a process runs, and nothing stays behind.

use std::{
    fs,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use super::{
    insns::{self, Hook},
    ns::{connect_from, in_private_mount_ns},
    report::{Check, Status},
    rules::{load_failure, others_check},
};
use crate::bpf::{
    host::{self, OWN_CGROUP2_MOUNT},
    sys,
};

pub(super) fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Some(0);
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

pub(super) fn btf_check() -> Check {
    const NAME: &str = "BTF";
    let path = Path::new("/sys/kernel/btf/vmlinux");
    match fs::metadata(path) {
        Ok(m) => Check::ok(NAME, format!("{} ({} KiB)", path.display(), m.len() >> 10)),
        Err(e) => Check::warn(
            NAME,
            format!("{}: {e}", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF (all supported EKS AMIs are); the \
             program load check below shows whether this kernel accepts the programs without it",
        ),
    }
}

pub(super) fn hook_check(hook: Hook, required: bool) -> Check {
    let name = format!("hook {}", hook.name());
    match sys::load_sock_addr(&insns::allow_all(), hook.attach_type(), "k2i_doctor") {
        Ok(_prog) => Check::ok(name, "a cgroup/sock_addr program loads"),
        Err(e) => {
            let why = load_failure(&e.error);
            if required {
                Check::fail(name, format!("cannot load: {e}"), why)
            } else {
                Check::warn(
                    name,
                    format!("cannot load: {e}"),
                    format!(
                        "optional: without it getpeername() on a redirected socket reports \
                         the agent's address. {why}"
                    ),
                )
            }
        }
    }
}

pub(super) fn netns_helper_check() -> Check {
    const NAME: &str = "netns cookie helper";
    match sys::load_sock_addr(
        &insns::netns_cookie_call(),
        Hook::CONNECT4.attach_type(),
        "k2i_doctor",
    ) {
        Ok(_prog) => Check::ok(
            NAME,
            "bpf_get_netns_cookie is available to sock_addr programs",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("the verifier refuses bpf_get_netns_cookie: {e}"),
            format!("needs Linux 5.7 or newer; {}", load_failure(&e.error)),
        ),
    }
}

/// The SO_NETNS_COOKIE row, and whether the sockopt works.
pub(super) fn netns_sockopt_check() -> (Check, bool) {
    const NAME: &str = "SO_NETNS_COOKIE";
    let socket = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => {
            return (
                Check::warn(NAME, format!("cannot open a socket to try it: {e}"), ""),
                false,
            );
        }
    };
    match sys::netns_cookie(&socket) {
        Ok(cookie) => (Check::ok(NAME, format!("host netns cookie {cookie}")), true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => (
            Check::ok(
                NAME,
                "not in this kernel (5.14); the agent learns the host cookie with its probe \
                 program on a child cgroup",
            ),
            false,
        ),
        Err(e) => (
            Check::warn(
                NAME,
                format!("getsockopt failed: {e}"),
                "the agent falls back to its probe program (--host-netns-cookie-source auto)",
            ),
            false,
        ),
    }
}

/// The target cgroup, a bpf_link on a temporary child of it, and who else is attached there.
/// `shown` is the path named in the report (the private mount's path is meaningless).
pub(super) fn cgroup_checks(
    target: &Path,
    shown: &Path,
    ours: &[u32],
    needs_child: bool,
) -> Vec<Check> {
    let mut checks = Vec::new();
    const NAME: &str = "target cgroup";
    if let Err(e) = host::check_cgroup2_dir(target) {
        checks.push(Check::fail(
            NAME,
            format!("{e}"),
            "pass --cgroup-path with a directory of the cgroup2 hierarchy",
        ));
        return checks;
    }
    let id = host::cgroup_id(target).unwrap_or(0);
    checks.push(Check::ok(
        NAME,
        format!("{} (cgroup id {id})", shown.display()),
    ));
    checks.extend(link_checks(target, needs_child));
    match fs::File::open(target) {
        Ok(cgroup) => {
            for hook in [Hook::CONNECT4, Hook::CONNECT6] {
                let own = sys::prog_query(cgroup.as_fd(), hook.attach_type(), false);
                let effective = sys::prog_query(cgroup.as_fd(), hook.attach_type(), true);
                checks.push(match (own, effective) {
                    (Ok(own), Ok(effective)) => {
                        others_check(hook, &own, &effective, ours, &sys::prog_name_by_id)
                    }
                    (Err(e), _) | (_, Err(e)) => Check::warn(
                        format!("others at {}", hook.name()),
                        format!("BPF_PROG_QUERY failed: {e}"),
                        "needs CAP_NET_ADMIN",
                    ),
                });
            }
        }
        Err(e) => checks.push(Check::fail(
            NAME,
            format!("cannot open {}: {e}", target.display()),
            "",
        )),
    }
    checks
}

/// With no cgroup2 mounted: whether one can be mounted (as the agent will, at
/// /run/kube2iam/cgroup2), probed on a private mount in a child process.
pub(super) fn unmounted_cgroup2_checks(ours: &[u32], needs_child: bool) -> Vec<Check> {
    let shown = PathBuf::from(OWN_CGROUP2_MOUNT);
    let result = in_private_mount_ns(|| {
        let at = std::env::temp_dir();
        host::mount("cgroup2", &at).map_err(|e| format!("mount cgroup2: {e}"))?;
        let mut checks = vec![Check::ok(
            "cgroup2",
            format!(
                "not mounted; mountable (the agent mounts it at {OWN_CGROUP2_MOUNT}; probed on a \
                 private mount)"
            ),
        )];
        checks.extend(cgroup_checks(&at, &shown, ours, needs_child));
        Ok(checks)
    });
    match result {
        Ok(checks) => checks,
        Err(e) => vec![Check::fail(
            "cgroup2",
            format!("not mounted, and cannot be mounted here: {e}"),
            "mount cgroup2 on the host (mount -t cgroup2 none /sys/fs/cgroup/unified) or grant \
             CAP_SYS_ADMIN so the agent mounts its own",
        )],
    }
}

/// Removes the temporary probe cgroup on every path out.
struct TempCgroup(PathBuf);

impl Drop for TempCgroup {
    fn drop(&mut self) {
        // A process that just left may keep the cgroup busy for a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.0) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }
}

/// A bpf_link on an empty, temporary child of the target, and whether a program there runs for
/// a process in that child. The agent needs such a child itself (its netns probe) only where
/// the kernel lacks SO_NETNS_COOKIE: `needs_child`.
fn link_checks(target: &Path, needs_child: bool) -> Vec<Check> {
    const NAME: &str = "cgroup bpf_link";
    const MATCHING: &str = "socket matching";
    let dir = target.join(format!("kube2iam-doctor-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        let why = format!("cannot create a child cgroup {}: {e}", dir.display());
        if needs_child {
            return vec![Check::fail(
                NAME,
                why,
                "without SO_NETNS_COOKIE (Linux < 5.14) the agent creates a child cgroup for its \
                 netns probe: grant CAP_DAC_OVERRIDE (the cgroup2 root is mode 0555)",
            )];
        }
        return vec![link_support_check(NAME, &why)];
    }
    let guard = TempCgroup(dir);
    let prog = match link_probe_program(NAME) {
        Ok(prog) => prog,
        Err(check) => return vec![check],
    };
    let result = fs::File::open(&guard.0).and_then(|cgroup| {
        let link = sys::link_create(prog.as_fd(), cgroup.as_fd(), Hook::CONNECT4.attach_type())?;
        sys::link_info(link.as_fd())
    });
    let link = match result {
        Ok(info) if info.link_type == sys::BPF_LINK_TYPE_CGROUP => Check::ok(
            NAME,
            format!(
                "BPF_LINK_CREATE works (probed on an empty child cgroup, link id {})",
                info.id
            ),
        ),
        Ok(info) => Check::fail(
            NAME,
            format!("unexpected link type {}", info.link_type),
            "report this kernel",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("BPF_LINK_CREATE on a child cgroup failed: {e}"),
            match e.raw_os_error() {
                Some(libc::EINVAL) => "needs Linux 5.7 or newer (bpf_link for cgroups)",
                Some(libc::EPERM) => {
                    "missing privileges, or an exclusive program on this cgroup or an ancestor \
                     forbids attaching below it"
                }
                _ => "see the error",
            },
        ),
    };
    if link.status == Status::Fail {
        return vec![link];
    }
    vec![link, matching_check(MATCHING, &guard.0, needs_child)]
}

/// The allow-all connect4 program the link probes attach, or the `name` row saying why it does
/// not load.
fn link_probe_program(name: &str) -> Result<OwnedFd, Check> {
    sys::load_sock_addr(
        &insns::allow_all(),
        Hook::CONNECT4.attach_type(),
        "k2i_doctor",
    )
    .map_err(|e| {
        Check::fail(
            name,
            format!("no program to link: {e}"),
            load_failure(&e.error),
        )
    })
}

/// Without a child cgroup to probe on: is BPF_LINK_CREATE at least known to the kernel? A bad
/// target descriptor gets EBADF where it is, EINVAL where it is not.
fn link_support_check(name: &str, why: &str) -> Check {
    let prog = match link_probe_program(name) {
        Ok(prog) => prog,
        Err(check) => return check,
    };
    match sys::link_create_probe(prog.as_fd(), Hook::CONNECT4.attach_type()) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Check::ok(
            name,
            format!("BPF_LINK_CREATE is known to the kernel ({why}; not needed on this kernel)"),
        ),
        Err(e) => Check::fail(
            name,
            format!("BPF_LINK_CREATE probe: {e} ({why})"),
            "needs Linux 5.7 or newer (bpf_link for cgroups)",
        ),
        Ok(_) => Check::fail(
            name,
            "BPF_LINK_CREATE accepted a bad descriptor",
            "report this kernel",
        ),
    }
}

/// Attaches a deny-all connect4 program to the empty child cgroup and makes a forked child
/// there connect a UDP socket: refused means programs on cgroup2 descendants run. Kernels before
/// 5.14 stop matching sockets to cgroup2 descendants once net_cls or net_prio (cgroup v1) is
/// used; programs at the root still run then, but the agent's netns probe does not.
fn matching_check(name: &str, cgroup: &Path, needs_child: bool) -> Check {
    let prog = match sys::load_sock_addr(
        &insns::deny_all(),
        Hook::CONNECT4.attach_type(),
        "k2i_doctor",
    ) {
        Ok(prog) => prog,
        Err(e) => return Check::fail(name, format!("cannot load: {e}"), load_failure(&e.error)),
    };
    let link = fs::File::open(cgroup)
        .and_then(|dir| sys::link_create(prog.as_fd(), dir.as_fd(), Hook::CONNECT4.attach_type()));
    let _link = match link {
        Ok(link) => link,
        Err(e) => return Check::warn(name, format!("cannot attach the probe: {e}"), ""),
    };
    match connect_from(cgroup) {
        Ok(true) => Check::ok(name, "programs on a cgroup2 child run for its processes"),
        Ok(false) if needs_child => Check::fail(
            name,
            "a program on a cgroup2 child does not run for its processes: the kernel stopped \
             matching sockets to cgroup2 (net_cls or net_prio of cgroup v1 in use)",
            "without SO_NETNS_COOKIE (Linux < 5.14) the agent learns the host netns cookie with a \
             program on a child cgroup, which cannot work here; use a 5.14+ kernel or stop using \
             net_cls/net_prio",
        ),
        Ok(false) => Check::warn(
            name,
            "a program on a cgroup2 child does not run for its processes (net_cls/net_prio in \
             use); the root attachment still applies",
            "attach at the cgroup2 root (the default)",
        ),
        Err(e) => Check::warn(name, format!("could not probe: {e}"), ""),
    }
}

/// Whether the kernel can name the pods here: kubelet's pod cgroups below the attach cgroup.
pub fn attestation_check(target: Option<&Path>) -> Check {
    const NAME: &str = "attestation";
    let Some(target) = target else {
        return Check::warn(
            NAME,
            "cgroup2 is not mounted here, so kubelet's pod cgroups cannot be read",
            "pods are served by address alone with --identity-attestation prefer and refused \
             with require; mount cgroup2 (the agent mounts its own for attaching)",
        );
    };
    let pods = crate::attest::CgroupPods::new(target.to_owned());
    match pods.rescan() {
        Err(e) => Check::warn(
            NAME,
            format!(
                "cannot read the cgroup tree below {}: {e}",
                target.display()
            ),
            "grant read access to the cgroup2 mount",
        ),
        Ok(()) if pods.pod_count() > 0 => Check::ok(
            NAME,
            format!(
                "{} pod cgroups of kubelet below {}: the kernel names the pod of every metadata \
                 connection",
                pods.pod_count(),
                target.display()
            ),
        ),
        Ok(()) => Check::warn(
            NAME,
            format!(
                "no kubelet pod cgroups (kubepods…/pod<uid>) below {}: pods are not in cgroup v2 \
                 here (a cgroup-v1 node), or none runs yet",
                target.display()
            ),
            "with --identity-attestation prefer such pods are served by address alone; require \
             refuses them; cgroup v2 nodes (AL2023, Bottlerocket) attest every pod",
        ),
    }
}
