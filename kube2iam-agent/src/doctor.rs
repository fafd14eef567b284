//! `kube2iam-agent doctor`: can the agent run on this host, and if not, what to change.
//!
//! Probes, not guesses: every kernel feature is checked by asking the kernel. It loads a tiny
//! program per hook type, one that calls `bpf_get_netns_cookie`, and the embedded programs
//! themselves (so this kernel's verifier judges them); it creates a bpf_link on an empty,
//! temporary child of the target cgroup and removes it again; it mounts cgroup2 or bpffs only in
//! a private mount namespace of a short-lived child process. Nothing is attached where a process
//! runs, and nothing stays behind.
//!
//! The report is a table (check, status, result, what to do). The agent cannot run when any
//! check failed; warnings name what is missing but optional.
//!
//! By concern: `report` (the rows, summary and table), `rules` (pure checks of gathered facts),
//! `probes` (kernel and cgroup probes), `pins` (bpffs, the embedded programs, the pinned state),
//! `guard` (the packet, node and egress guard rows), `insns` (the hand-assembled probe programs)
//! and `ns` (fork and mount-namespace plumbing). `run` puts them in order.

pub mod guard;
pub mod insns;
mod ns;
mod pins;
mod probes;
pub mod report;
pub mod rules;

use std::{fs, path::PathBuf};

pub use self::report::{Check, Report, Status};
use self::{
    insns::Hook,
    ns::in_private_mount_ns,
    pins::{LoadDir, bpffs_check, embedded_programs_check_in, pinned_prog_ids, pinned_state_check},
    probes::{
        btf_check, cgroup_checks, hook_check, memlock_limit, netns_helper_check,
        netns_sockopt_check, unmounted_cgroup2_checks,
    },
};
use self::{
    probes::attestation_check,
    rules::{kernel_check, memlock_check, privileges_check},
};
use crate::bpf::{KernelVersion, host};

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cgroup the agent would attach to; `None` = the cgroup2 root.
    pub cgroup_path: Option<PathBuf>,
    /// The agent's pin directory.
    pub pin_dir: PathBuf,
    /// The interfaces the agent guards; `None` with `--packet-guard false`.
    pub packet_guard: Option<crate::bpf::guard::InterfacePatterns>,
    /// Whether the agent puts the node guard on the other interfaces (`--node-guard`).
    pub node_guard: bool,
    /// Whether the agent attaches the egress backstop.
    pub egress_guard: bool,
}

/// Runs every check.
pub fn run(options: &Options) -> Report {
    let mut checks = Vec::new();

    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    checks.push(kernel_check(&release));
    let kernel = KernelVersion::parse(&release).unwrap_or(KernelVersion(0, 0, 0));
    let caps = host::effective_caps().unwrap_or(0);
    checks.push(privileges_check(kernel, caps));
    // As the agent does: lift RLIMIT_MEMLOCK where allowed, so the probes see what it sees.
    host::raise_memlock();
    checks.push(memlock_check(kernel, memlock_limit()));
    checks.push(btf_check());

    for hook in [Hook::CONNECT4, Hook::CONNECT6] {
        checks.push(hook_check(hook, true));
    }
    for hook in [Hook::GETPEERNAME4, Hook::GETPEERNAME6] {
        checks.push(hook_check(hook, false));
    }
    checks.push(netns_helper_check());
    let (sockopt, has_sockopt) = netns_sockopt_check();
    // Without SO_NETNS_COOKIE the agent probes the host cookie from a child cgroup.
    let needs_child = !has_sockopt;
    checks.push(sockopt);

    // Where the agent would attach.
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = host::cgroup2_mount_in(&mounts);
    let target = options.cgroup_path.clone().or(mounted.clone());
    match (&mounted, &options.cgroup_path) {
        (Some(at), _) => checks.push(Check::ok("cgroup2", format!("mounted at {}", at.display()))),
        (None, Some(_)) => checks.push(Check::fail(
            "cgroup2",
            "no cgroup2 hierarchy is mounted, but --cgroup-path was given",
            "mount cgroup2 or drop --cgroup-path (the agent then mounts its own)",
        )),
        (None, None) => {}
    }
    let ours = pinned_prog_ids(&options.pin_dir);
    match &target {
        Some(target) => checks.extend(cgroup_checks(target, target, &ours, needs_child)),
        None => checks.extend(unmounted_cgroup2_checks(&ours, needs_child)),
    }
    checks.push(attestation_check(target.as_deref()));

    let (bpffs_check, load_dir) = bpffs_check(&options.pin_dir);
    checks.push(bpffs_check);
    let tags = match load_dir {
        Some(LoadDir::Transient(parent)) => {
            let (check, tags) = embedded_programs_check_in(&parent, kernel);
            checks.push(check);
            tags
        }
        Some(LoadDir::PrivateMount) => {
            let result = in_private_mount_ns(|| {
                let dir = PathBuf::from(host::DEFAULT_BPFFS);
                host::mount("bpf", &dir)
                    .map_err(|e| format!("mount a private bpffs: {e}"))
                    .map(|()| vec![embedded_programs_check_in(&dir, kernel).0])
            });
            checks.push(match result {
                Ok(mut c) if !c.is_empty() => c.remove(0),
                Ok(_) => Check::fail("programs", "the probe process reported nothing", ""),
                Err(e) => Check::fail(
                    "programs",
                    format!("could not load them: {e}"),
                    "mount a bpffs at /sys/fs/bpf",
                ),
            });
            Vec::new()
        }
        None => Vec::new(),
    };
    checks.push(pinned_state_check(
        &options.pin_dir,
        target.as_deref(),
        &tags,
    ));
    checks.extend(guard::packet_guard_checks(
        &options.pin_dir,
        options.packet_guard.as_ref(),
        options.node_guard,
    ));
    checks.push(guard::egress_check(&options.pin_dir, options.egress_guard));
    Report { checks }
}
