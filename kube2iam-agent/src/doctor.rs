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

pub mod guard;
pub mod insns;

use std::{
    ffi::CString,
    fs,
    io::{self, Read as _},
    os::{
        fd::{AsFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{CgroupSkb, CgroupSockAddr},
};
use kube2iam_common::{DEFAULT_IDENTITY_CAPACITY, FLAG_ENABLED, maps, port_from_repr, programs};

use self::insns::Hook;
use crate::bpf::{
    self, EBPF_OBJECT, KernelVersion,
    host::{self, OWN_CGROUP2_MOUNT},
    sys,
};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// Works, but something optional is missing or worth knowing.
    Warn,
    /// The agent cannot run until this is fixed.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }

    fn parse(label: &str) -> Option<Status> {
        match label {
            "ok" => Some(Status::Ok),
            "WARN" => Some(Status::Warn),
            "FAIL" => Some(Status::Fail),
            _ => None,
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub result: String,
    /// What to do about it; empty when nothing is to be done.
    pub fix: String,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, result: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status,
            result: result.into(),
            fix: String::new(),
        }
    }

    fn ok(name: impl Into<String>, result: impl Into<String>) -> Self {
        Check::new(name, Status::Ok, result)
    }

    fn warn(name: impl Into<String>, result: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(name, Status::Warn, result).fix(fix)
    }

    fn fail(name: impl Into<String>, result: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(name, Status::Fail, result).fix(fix)
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }

    /// One line for passing a check through a pipe: tab-separated, tabs and newlines replaced.
    fn encode(&self) -> String {
        let clean = |s: &str| s.replace(['\t', '\n'], " ");
        format!(
            "{}\t{}\t{}\t{}",
            self.status.label(),
            clean(&self.name),
            clean(&self.result),
            clean(&self.fix)
        )
    }

    fn decode(line: &str) -> Option<Check> {
        let mut parts = line.splitn(4, '\t');
        let status = Status::parse(parts.next()?)?;
        Some(Check {
            status,
            name: parts.next()?.to_owned(),
            result: parts.next()?.to_owned(),
            fix: parts.next().unwrap_or("").to_owned(),
        })
    }
}

/// All checks, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// Column widths of the table's wrapped columns.
const RESULT_WIDTH: usize = 58;
const FIX_WIDTH: usize = 52;

impl Report {
    /// Whether the agent can run: no check failed.
    pub fn can_run(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// `doctor: 15 ok, 1 warn (getpeername4), 0 fail: the agent can run`.
    pub fn summary(&self) -> String {
        let names = |status: Status| {
            let names: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.name.as_str())
                .collect();
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            }
        };
        format!(
            "doctor: {} ok, {} warn{}, {} fail{}: {}",
            self.count(Status::Ok),
            self.count(Status::Warn),
            names(Status::Warn),
            self.count(Status::Fail),
            names(Status::Fail),
            if self.can_run() {
                "the agent can run"
            } else {
                "the agent cannot run"
            }
        )
    }

    /// The table: check, status, result and what to do, the last two wrapped.
    pub fn table(&self) -> String {
        let name_width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let mut row = |name: &str, status: &str, result: &[String], fix: &[String]| {
            let lines = result.len().max(fix.len()).max(1);
            for i in 0..lines {
                let (name, status) = if i == 0 { (name, status) } else { ("", "") };
                let result = result.get(i).map(String::as_str).unwrap_or("");
                let fix = fix.get(i).map(String::as_str).unwrap_or("");
                let line =
                    format!("{name:<name_width$}  {status:<6}  {result:<RESULT_WIDTH$}  {fix}");
                out.push_str(line.trim_end());
                out.push('\n');
            }
        };
        row(
            "CHECK",
            "STATUS",
            &["RESULT".to_owned()],
            &["WHAT TO DO".to_owned()],
        );
        for check in &self.checks {
            row(
                &check.name,
                check.status.label(),
                &wrap(&check.result, RESULT_WIDTH),
                &wrap(&check.fix, FIX_WIDTH),
            );
        }
        out
    }
}

/// Word-wraps `text` to lines of at most `width` characters (longer words get a line of their
/// own).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

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

/// The capability numbers the checks name, and their names.
pub mod cap {
    pub use crate::bpf::host::cap::*;

    /// `CAP_*` names by number (Linux 5.9 has 41).
    pub const NAMES: [&str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];

    /// The name of capability `n`.
    pub fn name(n: u32) -> String {
        NAMES
            .get(n as usize)
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| format!("CAP_{n}"))
    }

    /// The names of the capabilities in a `CapEff`-style mask.
    pub fn names(mask: u64) -> Vec<String> {
        (0..64)
            .filter(|n| mask & (1u64 << n) != 0)
            .map(name)
            .collect()
    }

    pub fn has(mask: u64, n: u32) -> bool {
        mask & (1u64 << n) != 0
    }
}

/// The privilege row, from the kernel and the effective capabilities. The sets are the ones the
/// kernel-matrix VM tests measure (see the README's requirements).
pub fn privileges_check(kernel: KernelVersion, caps: u64) -> Check {
    const NAME: &str = "capabilities";
    let has = |n| cap::has(caps, n);
    let relevant = [
        cap::BPF,
        cap::NET_ADMIN,
        cap::SYS_ADMIN,
        cap::PERFMON,
        cap::SYS_RESOURCE,
        cap::DAC_OVERRIDE,
    ];
    let held: Vec<String> = relevant
        .iter()
        .filter(|n| has(**n))
        .map(|n| cap::name(*n))
        .collect();
    let all = caps.count_ones() >= 40;
    let shown = if all {
        "all (full root)".to_owned()
    } else if held.is_empty() {
        format!("none of the BPF-related ones (CapEff {caps:#x})")
    } else {
        held.join(", ")
    };
    // The rule is the agent's own (host::privileges, measured in the kernel-matrix VMs);
    // doctor shows its verdict for loading the programs.
    match host::privileges(kernel, caps, host::Task::Load) {
        Ok(()) => Check::ok(NAME, shown),
        Err(need) => Check::fail(
            NAME,
            shown,
            if kernel >= KernelVersion::CAP_BPF {
                format!("grant {need} in the pod's securityContext")
            } else {
                format!("grant {need}: kernels before 5.8 have no CAP_BPF")
            },
        ),
    }
}

/// The kernel row.
pub fn kernel_check(release: &str) -> Check {
    const NAME: &str = "kernel";
    match KernelVersion::parse(release) {
        Some(v) if v >= KernelVersion::MINIMUM => Check::ok(NAME, format!("{release} ({v})")),
        Some(v) => Check::fail(
            NAME,
            format!("{release} ({v}) is older than {}", KernelVersion::MINIMUM),
            "upgrade the node to Linux 5.8 or newer (bpf_link for cgroups, netns cookie helper, \
             ring buffer, getpeername hooks)",
        ),
        None => Check::fail(
            NAME,
            format!("cannot parse the release {release:?}"),
            "report this release string",
        ),
    }
}

/// The RLIMIT_MEMLOCK row: kernels before 5.11 charge BPF maps and programs to it.
pub fn memlock_check(kernel: KernelVersion, limit: Option<u64>) -> Check {
    const NAME: &str = "memlock";
    if kernel >= KernelVersion::MEMCG_ACCOUNTING {
        return Check::ok(
            NAME,
            "not used for BPF memory (memory cgroup accounting, 5.11+)",
        );
    }
    match limit {
        None => Check::ok(NAME, "RLIMIT_MEMLOCK unlimited"),
        Some(bytes) if bytes >= 64 << 20 => Check::ok(
            NAME,
            format!("RLIMIT_MEMLOCK {} KiB (enough for the maps)", bytes >> 10),
        ),
        Some(bytes) => Check::warn(
            NAME,
            format!(
                "RLIMIT_MEMLOCK is {} KiB and could not be lifted; this kernel charges BPF maps \
                 to it",
                bytes >> 10
            ),
            "grant CAP_SYS_RESOURCE (the agent lifts the limit itself) or start it with an \
             unlimited memlock limit; the program load check below shows whether it suffices",
        ),
    }
}

/// Who else is attached at one hook of the target cgroup, and whether they leave room for us.
pub fn others_check(
    hook: Hook,
    own: &sys::Query,
    effective: &sys::Query,
    ours: &[u32],
    names: &dyn Fn(u32) -> Option<String>,
) -> Check {
    let name = format!("others at {}", hook.name());
    let describe = |id: u32| match names(id) {
        Some(n) if !n.is_empty() => format!("{n} (id {id})"),
        _ => format!("id {id}"),
    };
    let foreign_own: Vec<u32> = own
        .prog_ids
        .iter()
        .copied()
        .filter(|id| !ours.contains(id))
        .collect();
    let foreign_effective: Vec<u32> = effective
        .prog_ids
        .iter()
        .copied()
        .filter(|id| !ours.contains(id))
        .collect();
    if !foreign_own.is_empty() && own.attach_flags & sys::BPF_F_ALLOW_MULTI == 0 {
        let how = if own.attach_flags & sys::BPF_F_ALLOW_OVERRIDE != 0 {
            "BPF_F_ALLOW_OVERRIDE"
        } else {
            "no flags (exclusive)"
        };
        return Check::fail(
            name,
            format!(
                "{} attached with {how}: the kernel refuses a multi-program link beside it",
                foreign_own
                    .iter()
                    .map(|id| describe(*id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "have that program attached with BPF_F_ALLOW_MULTI (or as a bpf_link), or attach \
             kube2iam to another cgroup with --cgroup-path",
        );
    }
    if foreign_effective.is_empty() {
        return Check::ok(name, "no other program");
    }
    Check::warn(
        name,
        format!(
            "also running: {}",
            foreign_effective
                .iter()
                .map(|id| describe(*id))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "fine beside kube2iam (multi-attach) unless it rewrites connects to the metadata \
         address itself",
    )
}

/// The name of the program with id `id`. Opening a program by id needs CAP_SYS_ADMIN.
fn prog_name(id: u32) -> Option<String> {
    sys::prog_fd_by_id(id)
        .and_then(|fd| sys::prog_name(fd.as_fd()))
        .ok()
}

/// The first line of an error text and its last non-empty line (a verifier log's verdict),
/// shortened.
pub fn summarize_error(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("");
    let last = lines.next_back();
    let first = first.split(". Verifier output:").next().unwrap_or(first);
    let mut out = match last {
        Some(last) if last != first => format!("{first}; verifier: {last}"),
        _ => first.to_owned(),
    };
    if out.chars().count() > 300 {
        out = out.chars().take(297).collect::<String>() + "...";
    }
    out
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

fn memlock_limit() -> Option<u64> {
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

fn btf_check() -> Check {
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

fn hook_check(hook: Hook, required: bool) -> Check {
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

/// What a failed BPF_PROG_LOAD means.
fn load_failure(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "missing privileges (see the capabilities row), or the kernel's \
             unprivileged/lockdown policy refuses BPF"
        }
        Some(libc::EINVAL) => "this kernel does not know this program or attach type",
        Some(libc::ENOSYS) => "the kernel was built without CONFIG_BPF_SYSCALL",
        _ => "see the error",
    }
}

fn netns_helper_check() -> Check {
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
fn netns_sockopt_check() -> (Check, bool) {
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

/// The program ids behind our pinned links (to tell them from other programs).
fn pinned_prog_ids(pin_dir: &Path) -> Vec<u32> {
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

/// The target cgroup, a bpf_link on a temporary child of it, and who else is attached there.
/// `shown` is the path named in the report (the private mount's path is meaningless).
fn cgroup_checks(target: &Path, shown: &Path, ours: &[u32], needs_child: bool) -> Vec<Check> {
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
                        others_check(hook, &own, &effective, ours, &prog_name)
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
fn unmounted_cgroup2_checks(ours: &[u32], needs_child: bool) -> Vec<Check> {
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
                "without SO_NETNS_COOKIE (Linux < 5.14) the agent creates a child cgroup for its                  netns probe: grant CAP_DAC_OVERRIDE (the cgroup2 root is mode 0555)",
            )];
        }
        return vec![link_support_check(NAME, &why)];
    }
    let guard = TempCgroup(dir);
    let prog = match sys::load_sock_addr(
        &insns::allow_all(),
        Hook::CONNECT4.attach_type(),
        "k2i_doctor",
    ) {
        Ok(prog) => prog,
        Err(e) => {
            return vec![Check::fail(
                NAME,
                format!("no program to link: {e}"),
                load_failure(&e.error),
            )];
        }
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

/// Without a child cgroup to probe on: is BPF_LINK_CREATE at least known to the kernel? A bad
/// target descriptor gets EBADF where it is, EINVAL where it is not.
fn link_support_check(name: &str, why: &str) -> Check {
    let prog = match sys::load_sock_addr(
        &insns::allow_all(),
        Hook::CONNECT4.attach_type(),
        "k2i_doctor",
    ) {
        Ok(prog) => prog,
        Err(e) => {
            return Check::fail(
                name,
                format!("no program to link: {e}"),
                load_failure(&e.error),
            );
        }
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

/// Forks a child that joins `cgroup` and connects a UDP socket to 127.0.0.1:9; `Ok(true)` when
/// the connect was refused with EPERM (the program ran).
fn connect_from(cgroup: &Path) -> Result<bool, String> {
    if !single_threaded() {
        return Err("the doctor forks only single-threaded".into());
    }
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(|e| format!("open cgroup.procs: {e}"))?;
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    // SAFETY: the process is single-threaded (checked above); the child makes plain syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: plain syscalls on valid arguments, then _exit.
        unsafe {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(3);
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                libc::_exit(3);
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 9u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let rc = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let errno = *libc::__errno_location();
            libc::_exit(match (rc, errno) {
                (0, _) => 1,
                (_, libc::EPERM) => 0,
                _ => 2,
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(procs);
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        Some(3) => Err("the child could not join the cgroup or open a socket".into()),
        _ => Err(format!(
            "the child's connect failed otherwise (status {status:#x})"
        )),
    }
}

/// Where the embedded programs can be loaded (their maps must be pinned somewhere).
enum LoadDir {
    /// A transient directory on the bpffs that holds the pin directory.
    Transient(PathBuf),
    /// A private bpffs in a private mount namespace (no bpffs is mounted yet).
    PrivateMount,
}

fn bpffs_check(pin_dir: &Path) -> (Check, Option<LoadDir>) {
    const NAME: &str = "bpffs";
    let Some(parent) = pin_dir.parent() else {
        return (
            Check::fail(NAME, format!("{} has no parent", pin_dir.display()), ""),
            None,
        );
    };
    if is_bpffs(parent) {
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

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
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
fn embedded_programs_check_in(
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

/// What is pinned under the pin directory, and whether a starting agent can adopt it.
fn pinned_state_check(pin_dir: &Path, target: Option<&Path>, tags: &[(String, String)]) -> Check {
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
        if let Err(e) = sys::link_prog_tag(link.as_fd()) {
            return Check::fail(
                NAME,
                format!(
                    "{name} is pinned, and a starting agent adopts it by reading its program \
                     tag from the link, which fails here: {e}"
                ),
                "run `kube2iam-agent uninstall` with CAP_BPF and CAP_NET_ADMIN first",
            );
        }
        if target_id.is_some_and(|id| id != info.cgroup_id) {
            elsewhere.push(format!("{name} on cgroup id {}", info.cgroup_id));
        }
        let pinned_tag = sys::fdinfo_field(link.as_fd(), "prog_tag").ok().flatten();
        let embedded = tags.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        if let (Some(pinned), Some(embedded)) = (pinned_tag, embedded)
            && &pinned != embedded
        {
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

/// Whether this process has a single thread (forking is then safe for any code).
fn single_threaded() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map(|n| n.trim() == "1")
        })
        .unwrap_or(false)
}

/// Runs `probe` in a forked child inside a private mount namespace (needs CAP_SYS_ADMIN), so
/// what it mounts is gone when it exits; its checks come back through a pipe.
fn in_private_mount_ns(
    probe: impl FnOnce() -> Result<Vec<Check>, String>,
) -> Result<Vec<Check>, String> {
    if !single_threaded() {
        return Err("the doctor runs its mount probes only single-threaded".into());
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let result = enter_private_mount_ns().and_then(|()| probe());
        let text = match result {
            Ok(checks) => {
                let mut text = String::from("ok\n");
                for c in checks {
                    text.push_str(&c.encode());
                    text.push('\n');
                }
                text
            }
            Err(e) => format!("err\n{}\n", e.replace('\n', " ")),
        };
        let mut file = fs::File::from(write_end);
        let _ = io::Write::write_all(&mut file, text.as_bytes());
        drop(file);
        // SAFETY: leave the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(write_end);
    let mut text = String::new();
    let _ = fs::File::from(read_end).read_to_string(&mut text);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut lines = text.lines();
    match lines.next() {
        Some("ok") => Ok(lines.filter_map(Check::decode).collect()),
        Some("err") => Err(lines.next().unwrap_or("failed").to_owned()),
        _ => Err(format!("the probe process died (wait status {status:#x})")),
    }
}

fn enter_private_mount_ns() -> Result<(), String> {
    // SAFETY: plain syscalls on no pointers but static strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS): {} (needs CAP_SYS_ADMIN)",
                io::Error::last_os_error()
            ));
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!("make / private: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[u32]) -> u64 {
        list.iter().fold(0, |m, n| m | (1u64 << n))
    }

    #[test]
    fn kernel_row() {
        assert_eq!(kernel_check("6.1.0-27-cloud-amd64").status, Status::Ok);
        assert_eq!(kernel_check("5.10.0-32-cloud-amd64").status, Status::Ok);
        let old = kernel_check("5.4.0-1");
        assert_eq!(old.status, Status::Fail);
        assert!(old.fix.contains("5.8"), "{old:?}");
        assert_eq!(kernel_check("").status, Status::Fail);
    }

    #[test]
    fn privileges_row() {
        let k = KernelVersion(6, 1, 0);
        assert_eq!(
            privileges_check(k, caps(&[cap::BPF, cap::NET_ADMIN, cap::PERFMON])).status,
            Status::Ok
        );
        let no_perfmon = privileges_check(k, caps(&[cap::BPF, cap::NET_ADMIN]));
        assert_eq!(no_perfmon.status, Status::Fail);
        assert!(no_perfmon.fix.contains("CAP_PERFMON"), "{no_perfmon:?}");
        assert_eq!(
            privileges_check(k, caps(&[cap::SYS_ADMIN])).status,
            Status::Ok
        );
        let only_bpf = privileges_check(k, caps(&[cap::BPF]));
        assert_eq!(only_bpf.status, Status::Fail);
        assert!(only_bpf.fix.contains("CAP_NET_ADMIN"), "{only_bpf:?}");
        assert_eq!(only_bpf.result, "CAP_BPF");
        let old = privileges_check(KernelVersion(5, 7, 0), caps(&[cap::BPF, cap::NET_ADMIN]));
        assert_eq!(old.status, Status::Fail);
        assert!(old.fix.contains("CAP_SYS_ADMIN"), "{old:?}");
        let root = privileges_check(k, u64::MAX >> 23);
        assert_eq!(root.result, "all (full root)");
        assert!(privileges_check(k, 0).result.contains("none"));
    }

    #[test]
    fn capability_names() {
        assert_eq!(cap::name(cap::BPF), "CAP_BPF");
        assert_eq!(cap::name(cap::SYS_ADMIN), "CAP_SYS_ADMIN");
        assert_eq!(cap::name(cap::NET_ADMIN), "CAP_NET_ADMIN");
        assert_eq!(cap::name(cap::SYS_RESOURCE), "CAP_SYS_RESOURCE");
        assert_eq!(cap::name(cap::PERFMON), "CAP_PERFMON");
        assert_eq!(cap::name(45), "CAP_45");
        assert_eq!(
            cap::names(caps(&[cap::NET_ADMIN, cap::BPF])),
            vec!["CAP_NET_ADMIN", "CAP_BPF"]
        );
    }

    #[test]
    fn memlock_row() {
        let old = KernelVersion(5, 10, 0);
        assert_eq!(
            memlock_check(KernelVersion(6, 1, 0), Some(65536)).status,
            Status::Ok
        );
        assert_eq!(memlock_check(old, None).status, Status::Ok);
        let low = memlock_check(old, Some(64 << 10));
        assert_eq!(low.status, Status::Warn);
        assert!(low.result.contains("64 KiB"), "{low:?}");
        assert!(low.fix.contains("CAP_SYS_RESOURCE"), "{low:?}");
    }

    fn query(ids: &[u32], flags: u32) -> sys::Query {
        sys::Query {
            prog_ids: ids.to_vec(),
            attach_flags: flags,
        }
    }

    #[test]
    fn others_row() {
        let none = |_| None;
        let multi = sys::BPF_F_ALLOW_MULTI;
        let alone = others_check(
            Hook::CONNECT4,
            &query(&[7], multi),
            &query(&[7], 0),
            &[7],
            &none,
        );
        assert_eq!(
            (alone.status, alone.result.as_str()),
            (Status::Ok, "no other program")
        );

        let named = |id| (id == 9).then(|| "cil_sock4_connect".to_owned());
        let beside = others_check(
            Hook::CONNECT4,
            &query(&[7, 9], multi),
            &query(&[7, 9], 0),
            &[7],
            &named,
        );
        assert_eq!(beside.status, Status::Warn);
        assert!(
            beside.result.contains("cil_sock4_connect (id 9)"),
            "{beside:?}"
        );

        let inherited = others_check(Hook::CONNECT6, &query(&[], 0), &query(&[3], 0), &[], &none);
        assert_eq!(inherited.status, Status::Warn);
        assert!(inherited.result.contains("id 3"));
        assert_eq!(inherited.name, "others at connect6");

        let exclusive = others_check(Hook::CONNECT4, &query(&[9], 0), &query(&[9], 0), &[], &none);
        assert_eq!(exclusive.status, Status::Fail);
        assert!(exclusive.result.contains("exclusive"), "{exclusive:?}");
        let overriding = others_check(
            Hook::CONNECT4,
            &query(&[9], sys::BPF_F_ALLOW_OVERRIDE),
            &query(&[9], 0),
            &[],
            &none,
        );
        assert_eq!(overriding.status, Status::Fail);
        assert!(overriding.result.contains("BPF_F_ALLOW_OVERRIDE"));
    }

    #[test]
    fn wraps_words() {
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("", 10), Vec::<String>::new());
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            vec!["averyveryverylongword", "x"]
        );
    }

    #[test]
    fn summary_and_table() {
        let report = Report {
            checks: vec![
                Check::ok("kernel", "6.1.0 (6.1.0)"),
                Check::warn("hook getpeername4", "cannot load", "optional"),
                Check::ok("bpffs", "/sys/fs/bpf is a bpffs"),
            ],
        };
        assert!(report.can_run());
        assert_eq!(
            report.summary(),
            "doctor: 2 ok, 1 warn (hook getpeername4), 0 fail: the agent can run"
        );
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CHECK"), "{table}");
        assert!(lines[0].contains("STATUS") && lines[0].contains("WHAT TO DO"));
        assert!(lines[2].starts_with("hook getpeername4  WARN"), "{table}");
        assert!(lines.iter().all(|l| l == &l.trim_end()));

        let mut failing = report.clone();
        failing.checks.push(Check::fail(
            "capabilities",
            "CAP_BPF",
            "grant CAP_NET_ADMIN",
        ));
        assert!(!failing.can_run());
        assert!(
            failing
                .summary()
                .ends_with("1 fail (capabilities): the agent cannot run")
        );
    }

    #[test]
    fn checks_cross_the_pipe_intact() {
        let check = Check::warn("cgroup2", "not\tmounted\nyet", "mount it");
        let decoded = Check::decode(&check.encode()).expect("decodes");
        assert_eq!(decoded.name, "cgroup2");
        assert_eq!(decoded.status, Status::Warn);
        assert_eq!(decoded.result, "not mounted yet");
        assert_eq!(decoded.fix, "mount it");
        assert_eq!(Check::decode("garbage"), None);
    }

    #[test]
    fn error_summaries_keep_the_verdict() {
        let text = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier \
                    output: 0: (b7) r0 = 1\n1: (95) exit\nR0 leaks addr as return value\n";
        let s = summarize_error(text);
        assert!(
            s.starts_with("the BPF_PROG_LOAD syscall returned Permission denied"),
            "{s}"
        );
        assert!(
            s.ends_with("verifier: R0 leaks addr as return value"),
            "{s}"
        );
        assert_eq!(summarize_error("one line"), "one line");
        assert!(summarize_error(&"x".repeat(1000)).len() <= 300);
    }
}
