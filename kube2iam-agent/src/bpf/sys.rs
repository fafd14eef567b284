//! The few bpf(2) and socket calls aya 0.14 does not expose: link info with its cgroup, program
//! tags by id, atomic link update, link detach, program queries, and the netns cookie sockopt.

use std::{
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_F_REPLACE`: the link update only succeeds if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;
/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `BPF_LINK_TYPE_CGROUP`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`; the kernel reads at
    // most `size_of::<T>()` bytes and zero-extends the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The part of `struct bpf_link_info` we read (the cgroup arm of its union).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What the kernel says about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For cgroup links: the cgroup's id (its inode number on cgroup2).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo::default();
    info_by_fd(link, &mut raw)?;
    Ok(LinkInfo {
        link_type: raw.type_,
        id: raw.id,
        prog_id: raw.prog_id,
        cgroup_id: raw.cgroup_id,
        attach_type: raw.attach_type,
    })
}

/// The head of `struct bpf_prog_info`: type, id and the 8-byte tag (a hash of the instructions).
#[repr(C)]
#[derive(Default)]
struct RawProgInfo {
    type_: u32,
    id: u32,
    tag: [u8; 8],
}

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
    let mut raw = RawProgInfo::default();
    info_by_fd(prog, &mut raw)?;
    Ok(raw.tag)
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Opens a program by id.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically swaps the program behind `link` to `new`: the hook never runs without a program.
/// With `old`, the swap fails if someone else changed the link meanwhile; opening the old
/// program by id needs CAP_SYS_ADMIN, so without it the swap is unconditional.
pub fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: if old.is_some() { BPF_F_REPLACE } else { 0 },
        old_prog_fd: old.map_or(0, |o| o.as_raw_fd() as u32),
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link even while other holders keep it open (Linux 5.9).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The ids of the programs attached to a cgroup at one hook (effective or not).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
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

/// `BPF_TCX_INGRESS` (Linux 6.6).
pub const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr` for BPF_PROG_QUERY with the multi-program fields (Linux 6.6).
#[repr(C)]
#[derive(Default)]
struct MprogQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The programs attached with TCX to a hook of interface `ifindex`, in the order they run:
/// (program id, link id, which is 0 for a program attached without a link). Fails with EINVAL
/// on kernels without TCX.
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    let mut progs = vec![0u32; 64];
    let mut links = vec![0u32; 64];
    let mut attr = MprogQueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: progs.as_mut_ptr() as u64,
        count: progs.len() as u32,
        link_ids: links.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr.count as usize).min(progs.len());
    Ok(progs.into_iter().zip(links).take(count).collect::<Vec<_>>())
}

/// The interface a TCX link is attached to (0 once it is defunct: detached, or its interface
/// gone). In `struct bpf_link_info` the tcx arm of the union holds the ifindex where the cgroup
/// arm holds the cgroup id.
pub fn tcx_link_ifindex(info: &LinkInfo) -> u32 {
    let bytes = info.cgroup_id.to_ne_bytes();
    u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// `struct bpf_prog_info` up to its name.
#[repr(C)]
#[derive(Default)]
struct RawProgInfoName {
    head: [u32; 16],
    name: [u8; 16],
}

/// The name a program was loaded with (at most 15 bytes).
pub fn prog_name(prog: BorrowedFd<'_>) -> io::Result<String> {
    let mut raw = RawProgInfoName::default();
    info_by_fd(prog, &mut raw)?;
    let end = raw
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(raw.name.len());
    Ok(String::from_utf8_lossy(&raw.name[..end]).into_owned())
}
