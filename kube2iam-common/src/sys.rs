//! The bpf(2) and netlink calls under the [`uapi`](crate::uapi) layouts that the agent (through
//! its `bpf::sys`) and the test kit both make, for userspace (the `user` feature): the syscall
//! itself, opening pinned objects and programs by id, object info, link creation and program
//! queries; and map info, which only the test kit reads.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use crate::uapi;

/// bpf(2) with `attr` as the member of `union bpf_attr` for `cmd`; the kernel reads at most
/// `size_of::<A>()` bytes of it.
///
/// # Safety
///
/// `attr` must be the member of `union bpf_attr` that `cmd` takes (one of
/// [`uapi`](crate::uapi)'s attrs), and every pointer in it must address memory valid for what
/// the kernel reads or writes there: a log buffer of `log_size` bytes, an id array of `count`
/// entries, an info struct of `info_len` bytes, a NUL-terminated path.
pub unsafe fn bpf<A>(cmd: u32, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr` and the pointers in it; the size passed is its own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            libc::c_long::from(cmd),
            attr as *mut A as *mut libc::c_void,
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`bpf`] for the commands that return a new descriptor (loads, opens, link creation).
///
/// # Safety
///
/// As for [`bpf`], and `cmd` must be a command that returns a file descriptor.
pub unsafe fn bpf_fd<A>(cmd: u32, attr: &mut A) -> io::Result<OwnedFd> {
    // SAFETY: passed on to the caller.
    let fd = unsafe { bpf(cmd, attr) }?;
    // SAFETY: the command returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A `NETLINK_ROUTE` socket, close-on-exec; `flags` are added to the type (`SOCK_NONBLOCK`).
pub fn route_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_OBJ_GET: opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = uapi::ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: BPF_OBJ_GET's member; `pathname` is a C string that outlives the call.
    unsafe { bpf_fd(uapi::BPF_OBJ_GET, &mut attr) }
}

/// BPF_PROG_GET_FD_BY_ID: opens a program by id (needs CAP_SYS_ADMIN).
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = uapi::GetIdAttr {
        id,
        ..Default::default()
    };
    // SAFETY: BPF_PROG_GET_FD_BY_ID's member; no pointers.
    unsafe { bpf_fd(uapi::BPF_PROG_GET_FD_BY_ID, &mut attr) }
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`.
///
/// # Safety
///
/// `info` is one of [`uapi`]'s info structs, and the arrays its pointers name (if any) have
/// room for the counts it gives.
pub unsafe fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = uapi::InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD's member; `info` is writable for `info_len` bytes, and the
    // caller vouches for the pointers in it.
    unsafe { bpf(uapi::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// What the kernel says about a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<uapi::LinkInfo> {
    let mut info = uapi::LinkInfo::default();
    // SAFETY: a link info struct, which holds no pointers.
    unsafe { obj_info(link, &mut info) }?;
    Ok(info)
}

/// What the kernel says about a program (no instructions, no map ids).
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<uapi::ProgInfo> {
    let mut info = uapi::ProgInfo::default();
    // SAFETY: a program info struct with every pointer null and every count zero.
    unsafe { obj_info(prog, &mut info) }?;
    Ok(info)
}

/// What the kernel says about a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<uapi::MapInfo> {
    let mut info = uapi::MapInfo::default();
    // SAFETY: a map info struct, which holds no pointers here.
    unsafe { obj_info(map, &mut info) }?;
    Ok(info)
}

/// BPF_LINK_CREATE of `prog` on `target` (a cgroup fd, or an ifindex for TCX) at `attach_type`.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: u32,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = uapi::LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target,
        attach_type,
        flags,
        ..Default::default()
    };
    // SAFETY: BPF_LINK_CREATE's member; no pointers.
    unsafe { bpf_fd(uapi::BPF_LINK_CREATE, &mut attr) }
}

/// BPF_PROG_QUERY of `target` (a cgroup fd, or an ifindex for TCX) at `attach_type`: the ids
/// of the programs there in the order they run fill `prog_ids`, and with `link_ids` (TCX) the
/// ids of their links. Returns the attr as the kernel left it: `count` (which may exceed the
/// room given), `attach_flags`, `revision`.
pub fn prog_query(
    target: u32,
    attach_type: u32,
    query_flags: u32,
    prog_ids: &mut [u32],
    link_ids: Option<&mut [u32]>,
) -> io::Result<uapi::QueryAttr> {
    let mut attr = uapi::QueryAttr {
        target,
        attach_type,
        query_flags,
        prog_ids: prog_ids.as_mut_ptr() as u64,
        count: prog_ids.len() as u32,
        ..Default::default()
    };
    if let Some(links) = link_ids {
        attr.link_ids = links.as_mut_ptr() as u64;
        attr.count = attr.count.min(links.len() as u32);
    }
    // SAFETY: BPF_PROG_QUERY's whole member; `prog_ids` (and `link_ids`) have room for `count`
    // ids.
    unsafe { bpf(uapi::BPF_PROG_QUERY, &mut attr) }?;
    Ok(attr)
}
