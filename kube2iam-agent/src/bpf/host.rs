//! Facts about the host the programs need (kernel version, capabilities, cgroup2 and bpffs) and
//! the privilege rule that decides from them whether the agent can load and attach, or uninstall.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::{Error, Result};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the agent mounts cgroup2 itself when the host has none mounted (cgroup-v1 hosts).
pub const OWN_CGROUP2_MOUNT: &str = "/run/kube2iam/cgroup2";
/// The bpffs mount point the agent creates when none is mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// A kernel release as (major, minor, patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl KernelVersion {
    /// The oldest kernel the agent runs on: bpf_link for cgroups and bpf_get_netns_cookie in
    /// sock_addr programs arrived in 5.7; the ring buffer behind the programs' debug log (aya-log)
    /// and the getpeername hooks in 5.8.
    pub const MINIMUM: KernelVersion = KernelVersion(5, 8, 0);
    /// getpeername4/6 hooks.
    pub const GETPEERNAME: KernelVersion = KernelVersion(5, 8, 0);
    /// CAP_BPF and CAP_PERFMON; before them BPF wanted CAP_SYS_ADMIN.
    pub const CAP_BPF: KernelVersion = KernelVersion(5, 8, 0);
    /// BPF memory charged to the memory cgroup instead of RLIMIT_MEMLOCK.
    pub const MEMCG_ACCOUNTING: KernelVersion = KernelVersion(5, 11, 0);

    /// Parses a `uname -r` release such as `6.1.0-27-cloud-amd64` or `5.10.228-219.884.amzn2`.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }

    pub fn current() -> Result<KernelVersion> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_err(|e| Error::io("read /proc/sys/kernel/osrelease", e))?;
        KernelVersion::parse(release.trim()).ok_or_else(|| Error::KernelVersion {
            release: release.trim().to_owned(),
        })
    }
}

/// Refuses kernels older than [`KernelVersion::MINIMUM`].
pub fn check_kernel() -> Result<KernelVersion> {
    let version = KernelVersion::current()?;
    if version < KernelVersion::MINIMUM {
        return Err(Error::KernelTooOld {
            found: version,
            minimum: KernelVersion::MINIMUM,
        });
    }
    Ok(version)
}

/// The capability numbers the privilege rule and `doctor` name.
pub use kube2iam_common::caps as cap;

/// The effective capability set of this process.
pub fn effective_caps() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("read /proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| {
            Error::io(
                "parse CapEff in /proc/self/status",
                io::ErrorKind::InvalidData.into(),
            )
        })
}

/// What the capabilities are needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Loading and attaching the programs.
    Load,
    /// Detaching and unpinning (no program is loaded).
    Uninstall,
}

/// The privilege rule (measured in the kernel matrix): whether the effective capabilities
/// `caps` let `task` run on `kernel`; if not, the capabilities it needs there.
pub fn privileges(kernel: KernelVersion, caps: u64, task: Task) -> Result<(), &'static str> {
    let has = |c: u32| cap::has(caps, c);
    // Loading needs CAP_PERFMON for what the programs do with pointers: without it the
    // verifier fails with a bare "Permission denied". Uninstall loads nothing.
    let perfmon = task == Task::Uninstall || has(cap::PERFMON);
    let fine_grained = kernel >= KernelVersion::CAP_BPF;
    let ok =
        has(cap::SYS_ADMIN) || (fine_grained && has(cap::BPF) && perfmon && has(cap::NET_ADMIN));
    if ok {
        Ok(())
    } else {
        Err(match (fine_grained, task) {
            (false, _) => "CAP_SYS_ADMIN",
            (true, Task::Load) => "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
            (true, Task::Uninstall) => "CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)",
        })
    }
}

/// Refuses to go on without the capabilities `task` needs ([`privileges`]).
pub fn check_privileges(kernel: KernelVersion, task: Task) -> Result<()> {
    let caps = effective_caps()?;
    privileges(kernel, caps, task).map_err(|need| Error::Privileges { need, caps })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it where we may.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %io::Error::last_os_error(),
            "could not lift RLIMIT_MEMLOCK; fine on kernels >= 5.11 (memcg accounting)"
        );
    }
}

/// Lifts the soft open-files limit to the hard one: every pod connection is a descriptor, and
/// runtimes often start containers at 1024, below `--max-connections`. Returns the soft limit
/// in force afterwards.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Whether `path` is on a bpffs (false when it cannot be read).
pub fn is_bpffs(path: &Path) -> bool {
    matches!(statfs_type(path), Ok(BPF_FS_MAGIC))
}

/// mount(2) of a pseudo filesystem (`bpf`, `cgroup2`) at `target`, its type as its source.
pub fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let source = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The first cgroup2 mount point in a /proc/mounts text.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// The cgroup2 root: the mounted one, or one we mount under /run/kube2iam (cgroup-v1 hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(|e| Error::io("read /proc/mounts", e))?;
    if let Some(path) = cgroup2_mount_in(&mounts) {
        return Ok(path);
    }
    let own = PathBuf::from(OWN_CGROUP2_MOUNT);
    fs::create_dir_all(&own).map_err(|e| Error::io(format!("create {}", own.display()), e))?;
    mount("cgroup2", &own).map_err(|e| Error::Mount {
        fstype: "cgroup2",
        path: own.clone(),
        source: e,
    })?;
    tracing::info!(path = %own.display(), "no cgroup2 mounted; mounted one");
    Ok(own)
}

/// Checks that `path` is a cgroup2 directory.
pub fn check_cgroup2_dir(path: &Path) -> Result<()> {
    match statfs_type(path) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(_) => Err(Error::NotCgroup2 {
            path: path.to_owned(),
        }),
        Err(e) => Err(Error::io(format!("stat cgroup {}", path.display()), e)),
    }
}

/// The cgroup id the kernel reports in link info: the cgroup2 directory's inode number.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| Error::io(format!("stat cgroup {}", path.display()), e))
}

/// Makes sure the pin directory sits on a bpffs, mounting one at /sys/fs/bpf if that is where it
/// belongs and nothing is mounted there, and creates it (and its `links/` subdirectory).
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().ok_or_else(|| Error::NotBpffs {
        path: pin_dir.to_owned(),
    })?;
    if !is_bpffs(parent) {
        if parent == Path::new(DEFAULT_BPFFS) && parent.is_dir() {
            mount("bpf", parent).map_err(|e| Error::Mount {
                fstype: "bpf",
                path: parent.to_owned(),
                source: e,
            })?;
            tracing::info!(path = DEFAULT_BPFFS, "no bpffs mounted; mounted one");
        } else {
            return Err(Error::NotBpffs {
                path: parent.to_owned(),
            });
        }
    }
    for sub in ["links", "tc"] {
        let dir = pin_dir.join(sub);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privilege_rule() {
        let caps = |list: &[u32]| list.iter().fold(0u64, |m, n| m | (1u64 << n));
        let new = KernelVersion(6, 1, 0);
        let old = KernelVersion(5, 7, 0);
        let fine = caps(&[cap::BPF, cap::NET_ADMIN]);
        // Loading wants CAP_PERFMON beside CAP_BPF; uninstalling loads nothing.
        assert!(privileges(new, fine, Task::Load).is_err());
        assert_eq!(privileges(new, fine, Task::Uninstall), Ok(()));
        assert_eq!(
            privileges(new, fine | caps(&[cap::PERFMON]), Task::Load),
            Ok(())
        );
        assert_eq!(
            privileges(old, fine | caps(&[cap::PERFMON]), Task::Load),
            Err("CAP_SYS_ADMIN")
        );
        assert_eq!(privileges(old, caps(&[cap::SYS_ADMIN]), Task::Load), Ok(()));
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v657"),
            Some(KernelVersion(6, 18, 44))
        );
        assert_eq!(
            KernelVersion::parse("5.10.228-219.884.amzn2.x86_64"),
            Some(KernelVersion(5, 10, 228))
        );
        assert_eq!(
            KernelVersion::parse("6.1.0-27-cloud-amd64"),
            Some(KernelVersion(6, 1, 0))
        );
        assert_eq!(KernelVersion::parse("6.8"), Some(KernelVersion(6, 8, 0)));
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion(5, 7, 19) < KernelVersion::MINIMUM);
        assert!(KernelVersion(5, 10, 0) >= KernelVersion::MINIMUM);
    }

    #[test]
    fn finds_cgroup2_mount() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            cgroup2_mount_in("none /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }
}
