//! Linux capabilities by number and name (linux/capability.h): the one table the agent's
//! privilege rule, `doctor` and the kernel matrix's capability search read.

/// `CAP_DAC_OVERRIDE`.
pub const DAC_OVERRIDE: u32 = 1;
/// `CAP_NET_ADMIN`.
pub const NET_ADMIN: u32 = 12;
/// `CAP_SYS_ADMIN`.
pub const SYS_ADMIN: u32 = 21;
/// `CAP_SYS_RESOURCE`.
pub const SYS_RESOURCE: u32 = 24;
/// `CAP_PERFMON`.
pub const PERFMON: u32 = 38;
/// `CAP_BPF`.
pub const BPF: u32 = 39;

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

/// The name of capability `n`, if this table knows it.
pub fn name(n: u32) -> Option<&'static str> {
    NAMES.get(n as usize).copied()
}

/// The number of a capability named with or without `CAP_`, in any case (`bpf`, `CAP_BPF`).
pub fn number(name: &str) -> Option<u32> {
    let name = name.trim();
    let bare = match name.get(..4) {
        Some(prefix) if prefix.eq_ignore_ascii_case("cap_") => &name[4..],
        _ => name,
    };
    NAMES
        .iter()
        .position(|known| known[4..].eq_ignore_ascii_case(bare))
        .map(|n| n as u32)
}

/// Whether a `CapEff`-style mask holds capability `n`.
pub fn has(mask: u64, n: u32) -> bool {
    n < 64 && mask & (1u64 << n) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_the_named_constants() {
        for (n, constant) in [
            (DAC_OVERRIDE, "CAP_DAC_OVERRIDE"),
            (NET_ADMIN, "CAP_NET_ADMIN"),
            (SYS_ADMIN, "CAP_SYS_ADMIN"),
            (SYS_RESOURCE, "CAP_SYS_RESOURCE"),
            (PERFMON, "CAP_PERFMON"),
            (BPF, "CAP_BPF"),
        ] {
            assert_eq!(name(n), Some(constant));
            assert_eq!(number(constant), Some(n));
        }
        assert_eq!(number("net_admin"), Some(NET_ADMIN));
        assert_eq!(number(" Cap_Bpf "), Some(BPF));
        assert_eq!(number("chown"), Some(0));
        assert_eq!(number("checkpoint_restore"), Some(40));
        assert_eq!(number("cap_"), None);
        assert_eq!(number("bogus"), None);
        assert_eq!(name(41), None);
        assert!(has(1 << BPF, BPF) && !has(1 << BPF, NET_ADMIN) && !has(u64::MAX, 64));
    }
}
