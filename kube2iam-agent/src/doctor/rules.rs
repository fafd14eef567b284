//! The doctor's pure rules: from the facts the probes gather (kernel release, capabilities,
//! memlock limit, the programs on a hook, error texts) to a report row. No syscalls; unit-tested.
//! The privilege rule itself is the agent's (`bpf::host`); the row here displays its verdict.

use std::io;

use super::{insns::Hook, report::Check};
use crate::bpf::{KernelVersion, host, sys};

/// The capability numbers the checks name, and their names.
pub mod cap {
    pub use kube2iam_common::caps::*;

    /// The name of capability `n` (`CAP_<n>` for one the table does not know).
    pub fn name(n: u32) -> String {
        kube2iam_common::caps::name(n)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("CAP_{n}"))
    }

    /// The names of the capabilities in a `CapEff`-style mask.
    pub fn names(mask: u64) -> Vec<String> {
        (0..64).filter(|n| has(mask, *n)).map(name).collect()
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
    let foreign = |query: &sys::Query| -> Vec<u32> {
        let ids = query.prog_ids.iter().copied();
        ids.filter(|id| !ours.contains(id)).collect()
    };
    let named = |ids: &[u32]| {
        let names: Vec<String> = ids.iter().map(|id| describe(*id)).collect();
        names.join(", ")
    };
    let foreign_own = foreign(own);
    let foreign_effective = foreign(effective);
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
                named(&foreign_own)
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
        format!("also running: {}", named(&foreign_effective)),
        "fine beside kube2iam (multi-attach) unless it rewrites connects to the metadata \
         address itself",
    )
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

/// What a failed BPF_PROG_LOAD means.
pub(super) fn load_failure(error: &io::Error) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

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
