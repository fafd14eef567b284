//! The agent's one typed layer over bpf(2), on the UAPI layouts of `kube2iam_common::uapi` and
//! the calls `kube2iam_common::sys` shares with the test kit: what aya 0.14 does not expose (link
//! info with its cgroup, program tags and names, atomic link update, link detach, program
//! queries with their attach flags, the netns cookie sockopt) and the doctor's probes
//! (hand-assembled sock_addr programs loaded and linked without aya, so a probe tests the
//! kernel and not the loader).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use kube2iam_common::{
    sys::{self, bpf, bpf_fd},
    uapi::{self, Insn},
};
pub use kube2iam_common::{
    sys::{link_info, obj_get, prog_fd_by_id},
    uapi::{
        BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE, BPF_LINK_TYPE_CGROUP, BPF_TCX_INGRESS, LinkInfo,
    },
};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The tag of the program behind a link, from the link's fdinfo: unlike opening the program
/// by id, this needs no CAP_SYS_ADMIN.
pub fn link_prog_tag(link: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let hex = fdinfo_field(link, "prog_tag")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "no prog_tag in the link's fdinfo",
        )
    })?;
    let mut tag = [0u8; 8];
    if hex.len() != 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("prog_tag {hex:?}"),
        ));
    }
    for (i, byte) in tag.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("prog_tag {hex:?}")))?;
    }
    Ok(tag)
}

/// The tag of a program given by fd.
pub fn prog_tag(prog: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    sys::prog_info(prog).map(|info| info.tag)
}

/// Atomically swaps the program behind `link` to `new`: the hook never runs without a program.
/// With `old`, the swap fails if someone else changed the link meanwhile; opening the old
/// program by id needs CAP_SYS_ADMIN, so without it the swap is unconditional.
pub fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = uapi::LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: if old.is_some() {
            uapi::BPF_F_REPLACE
        } else {
            0
        },
        old_prog_fd: old.map_or(0, |o| o.as_raw_fd() as u32),
    };
    // SAFETY: BPF_LINK_UPDATE's member; no pointers.
    unsafe { bpf(uapi::BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Swaps `new` in behind `link`, guarded against a concurrent change when the program it holds
/// now (`old_prog_id`) can be opened, which needs CAP_SYS_ADMIN; without it, unconditionally.
pub fn swap_link_prog(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old_prog_id: u32,
) -> io::Result<()> {
    let old = sys::prog_fd_by_id(old_prog_id).ok();
    link_update(link, new, old.as_ref().map(|o| o.as_fd()))
}

/// Detaches a link even while other holders keep it open (Linux 5.9).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = uapi::LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: BPF_LINK_DETACH's member; no pointers.
    unsafe { bpf(uapi::BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// What BPF_PROG_QUERY reports for one hook of a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub prog_ids: Vec<u32>,
    /// The flags the programs were attached with on this cgroup (0 = exclusive).
    pub attach_flags: u32,
}

/// The programs attached to a cgroup at one hook; `effective` includes the programs inherited
/// from ancestors.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32, effective: bool) -> io::Result<Query> {
    let mut ids = vec![0u32; 64];
    let flags = if effective {
        uapi::BPF_F_QUERY_EFFECTIVE
    } else {
        0
    };
    let attr = sys::prog_query(
        cgroup.as_raw_fd() as u32,
        attach_type,
        flags,
        &mut ids,
        None,
    )?;
    ids.truncate((attr.count as usize).min(64));
    Ok(Query {
        prog_ids: ids,
        attach_flags: attr.attach_flags,
    })
}

/// The cookie of the network namespace a socket lives in (Linux 5.14).
pub fn netns_cookie(socket: impl AsFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, output buffer of `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// A field of a descriptor's `/proc/self/fdinfo` entry, such as `prog_tag` of a link (shown
/// without privileges, unlike the program itself).
pub fn fdinfo_field(fd: BorrowedFd<'_>, field: &str) -> io::Result<Option<String>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(fdinfo_value(&text, field))
}

/// `field:\tvalue` in an fdinfo text.
pub fn fdinfo_value(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == field).then(|| value.trim().to_owned())
    })
}

/// The programs attached with TCX to a hook of interface `ifindex`, in the order they run:
/// (program id, link id, which is 0 for a program attached without a link). Fails with EINVAL
/// on kernels without TCX.
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    let mut progs = vec![0u32; 64];
    let mut links = vec![0u32; 64];
    let attr = sys::prog_query(ifindex, attach_type, 0, &mut progs, Some(&mut links))?;
    let count = (attr.count as usize).min(progs.len());
    Ok(progs.into_iter().zip(links).take(count).collect::<Vec<_>>())
}

/// The name the program with id `id` was loaded with (at most 15 bytes), if it can be opened:
/// opening a program by id needs CAP_SYS_ADMIN.
pub fn prog_name_by_id(id: u32) -> Option<String> {
    let prog = sys::prog_fd_by_id(id).ok()?;
    let info = sys::prog_info(prog.as_fd()).ok()?;
    Some(String::from_utf8_lossy(info.name()).into_owned())
}

/// A failed program load: the errno and the verifier's last lines.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        let last = self.log.lines().rev().find(|l| !l.trim().is_empty());
        if let Some(line) = last {
            write!(f, " (verifier: {})", line.trim())?;
        }
        Ok(())
    }
}

/// BPF_PROG_LOAD of hand-assembled `insns` as a `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` program for
/// `attach_type` (license GPL), with the verifier's log on failure.
pub fn load_sock_addr(insns: &[Insn], attach_type: u32, name: &str) -> Result<OwnedFd, LoadError> {
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = uapi::ProgLoadAttr {
        prog_type: uapi::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    attr.set_name(name);
    // SAFETY: BPF_PROG_LOAD's member; `insns` holds `insn_cnt` instructions, `license` is a C
    // string and `log_buf` has room for `log_size` bytes, all alive for the call.
    unsafe { bpf_fd(uapi::BPF_PROG_LOAD, &mut attr) }.map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        LoadError {
            error,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

/// BPF_LINK_CREATE of `prog` on the cgroup `cgroup` at `attach_type`.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    sys::link_create(prog, cgroup.as_raw_fd() as u32, attach_type, 0)
}

/// BPF_LINK_CREATE with target fd -1: EBADF where the kernel knows the command, EINVAL where it
/// does not. Attaches nothing.
pub fn link_create_probe(prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    sys::link_create(prog, u32::MAX, attach_type, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fdinfo_fields() {
        let text = "pos:\t0\nflags:\t02000000\nlink_type:\tcgroup\nlink_id:\t7\n\
                    prog_tag:\t1a2b3c4d5e6f7a8b\nprog_id:\t42\n";
        assert_eq!(
            fdinfo_value(text, "prog_tag").as_deref(),
            Some("1a2b3c4d5e6f7a8b")
        );
        assert_eq!(fdinfo_value(text, "prog_id").as_deref(), Some("42"));
        assert_eq!(fdinfo_value(text, "missing"), None);
    }

    #[test]
    fn load_errors_show_the_last_verifier_line() {
        let e = LoadError {
            error: io::Error::from_raw_os_error(libc::EINVAL),
            log: "0: R1=ctx\ninvalid func unknown#122\n\n".into(),
        };
        let text = e.to_string();
        assert!(text.contains("invalid func unknown#122"), "{text}");
    }
}
