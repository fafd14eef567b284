//! bpf(2) for tests: tiny hand-assembled cgroup programs, cgroup links, link updates, and
//! the object info a test asserts on (link ids, program tags, attached program counts).
//!
//! Only what the tests need, written against the kernel UAPI directly (the layouts of
//! `kube2iam_common::uapi`, which the agent's own calls use too) so the tests do not depend on
//! the loader they are testing.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use kube2iam_common::sys::{link_info, prog_fd_by_id};
use kube2iam_common::{
    port_repr,
    sys::{self, bpf, bpf_fd},
    uapi::{self, EXIT, Insn, JNE_IMM, LDX_MEM_W, MOV64_IMM, STX_MEM_W},
};
pub use kube2iam_common::{
    sys::{map_info, obj_get},
    uapi::{LinkInfo, MapInfo},
};

/// enum bpf_attach_type values of the cgroup sock_addr hooks kube2iam uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    CgroupSockOps = uapi::BPF_CGROUP_SOCK_OPS,
    Inet4Connect = uapi::BPF_CGROUP_INET4_CONNECT,
    Inet6Connect = uapi::BPF_CGROUP_INET6_CONNECT,
    Inet4GetPeerName = uapi::BPF_CGROUP_INET4_GETPEERNAME,
    Inet6GetPeerName = uapi::BPF_CGROUP_INET6_GETPEERNAME,
    /// BPF_CGROUP_INET_EGRESS: cgroup_skb on the way out (the egress backstop).
    InetEgress = uapi::BPF_CGROUP_INET_EGRESS,
}

impl AttachType {
    /// Every hook the agent attaches to its cgroup.
    pub const ALL: [AttachType; 6] = [
        AttachType::Inet4Connect,
        AttachType::Inet6Connect,
        AttachType::Inet4GetPeerName,
        AttachType::Inet6GetPeerName,
        AttachType::CgroupSockOps,
        AttachType::InetEgress,
    ];
}

/// offsetof(struct bpf_sock_addr, user_port).
const USER_PORT_OFFSET: i16 = 24;

/// `r0 = 1; exit`: lets every connect through unchanged.
pub fn allow_all_insns() -> Vec<Insn> {
    vec![
        Insn::new(MOV64_IMM, 0, 0, 0, 1),
        Insn::new(EXIT, 0, 0, 0, 0),
    ]
}

/// Rewrites destination port `from` to `to` and allows everything. `user_port` holds the
/// big-endian port in the low 16 bits, so the comparison uses that representation.
pub fn port_rewrite_insns(from: u16, to: u16) -> Vec<Insn> {
    vec![
        // r2 = ctx->user_port
        Insn::new(LDX_MEM_W, 2, 1, USER_PORT_OFFSET, 0),
        // if r2 != from goto allow
        Insn::new(JNE_IMM, 2, 0, 2, port_repr(from) as i32),
        // ctx->user_port = to
        Insn::new(MOV64_IMM, 2, 0, 0, port_repr(to) as i32),
        Insn::new(STX_MEM_W, 1, 2, USER_PORT_OFFSET, 0),
        // allow: return 1
        Insn::new(MOV64_IMM, 0, 0, 0, 1),
        Insn::new(EXIT, 0, 0, 0, 0),
    ]
}

/// BPF_PROG_LOAD of `insns` (license "GPL"), with the verifier's log on failure when `log` is
/// given.
fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
    name: &str,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = uapi::ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    if let Some(log) = log {
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    attr.set_name(name);
    // SAFETY: BPF_PROG_LOAD's member; `insns` holds `insn_cnt` instructions, `license` is a C
    // string and `log_buf` (if set) has room for `log_size` bytes, all alive for the call.
    unsafe { bpf_fd(uapi::BPF_PROG_LOAD, &mut attr) }
}

/// Loads a BPF_PROG_TYPE_CGROUP_SOCK_ADDR program for `attach` (license "GPL"). On a verifier
/// rejection the error carries the verifier log.
pub fn load_sock_addr_prog(insns: &[Insn], attach: AttachType, name: &str) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    prog_load(
        uapi::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach as u32,
        insns,
        name,
        Some(&mut log),
    )
    .map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "BPF_PROG_LOAD: {e}; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            ),
        )
    })
}

/// A connect4 program that rewrites destination port `from` to `to` (e.g. 7777 → 7778): an
/// unrelated program beside kube2iam's, as Cilium's socket LB would be.
pub fn load_port_rewrite_connect4(from: u16, to: u16) -> OwnedFd {
    load_sock_addr_prog(
        &port_rewrite_insns(from, to),
        AttachType::Inet4Connect,
        "k2i_test_port",
    )
    .unwrap_or_else(|e| panic!("cannot load the port-rewrite connect4 program: {e}"))
}

/// A program for `attach` that allows everything and changes nothing (r0 = 1; exit).
pub fn load_allow_all(attach: AttachType) -> OwnedFd {
    load_sock_addr_prog(&allow_all_insns(), attach, "k2i_test_allow")
        .unwrap_or_else(|e| panic!("cannot load the allow-all program: {e}"))
}

/// Opens a cgroup directory, the target of cgroup attachments.
pub fn open_cgroup(path: &Path) -> OwnedFd {
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("cannot open cgroup {}: {e}", path.display()))
        .into()
}

/// BPF_LINK_CREATE of `prog` on the cgroup `cgroup` at `attach`. Cgroup links always allow
/// multiple programs per hook. The program stays attached while the returned link fd (or a pin
/// of it) lives.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: AttachType,
) -> io::Result<OwnedFd> {
    sys::link_create(prog, cgroup.as_raw_fd() as u32, attach as u32, 0)
}

/// BPF_LINK_UPDATE: atomically replace the program behind `link` with `new_prog`.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = uapi::LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: BPF_LINK_UPDATE's member; no pointers.
    unsafe { bpf(uapi::BPF_LINK_UPDATE, &mut attr) }.map(|_| ())
}

/// Link info of a pinned link.
pub fn pinned_link_info(path: &Path) -> LinkInfo {
    let fd =
        obj_get(path).unwrap_or_else(|e| panic!("cannot open pinned link {}: {e}", path.display()));
    link_info(fd.as_fd())
        .unwrap_or_else(|e| panic!("cannot read link info of {}: {e}", path.display()))
}

/// What a test asserts about a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub prog_type: u32,
    pub id: u32,
    /// The kernel's hash of the instructions: equal tags, same program code.
    pub tag: [u8; 8],
    pub name: String,
    /// Bytes of the program after verification: what the JIT compiles. Code the verifier
    /// proved dead (e.g. behind a constant read-only global) is gone from it.
    pub xlated_len: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on a program.
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let info = sys::prog_info(prog)?;
    Ok(ProgInfo {
        prog_type: info.prog_type,
        id: info.id,
        tag: info.tag,
        name: String::from_utf8_lossy(info.name()).into_owned(),
        xlated_len: info.xlated_prog_len,
    })
}

/// The info of the program with id `id`.
pub fn prog_info_by_id(id: u32) -> ProgInfo {
    let fd = prog_fd_by_id(id).unwrap_or_else(|e| panic!("cannot open program id {id}: {e}"));
    prog_info(fd.as_fd()).unwrap_or_else(|e| panic!("cannot read info of program id {id}: {e}"))
}

/// BPF_PROG_QUERY of `target` (a cgroup fd or an ifindex) at `attach_type`: the program ids,
/// in the order they run.
fn query(target: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let attr = sys::prog_query(target, attach_type, 0, &mut ids, None)?;
    ids.truncate(attr.count as usize);
    Ok(ids)
}

/// BPF_PROG_QUERY: the ids of the programs attached to the cgroup at `attach` (effective ones
/// excluded: only this cgroup's own attachments).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach: AttachType) -> io::Result<Vec<u32>> {
    query(cgroup.as_raw_fd() as u32, attach as u32)
}
/// A program attached to a test cgroup through a link the test owns: dropping it detaches.
pub struct CgroupLink {
    link: OwnedFd,
    _prog: OwnedFd,
}

impl CgroupLink {
    /// Attaches `prog` to the cgroup at `cgroup_path` for `attach`.
    pub fn attach(prog: OwnedFd, cgroup_path: &Path, attach: AttachType) -> Self {
        let cgroup = open_cgroup(cgroup_path);
        let link = link_create(prog.as_fd(), cgroup.as_fd(), attach).unwrap_or_else(|e| {
            panic!(
                "cannot attach a {attach:?} program to {}: {e}",
                cgroup_path.display()
            )
        });
        Self { link, _prog: prog }
    }

    pub fn info(&self) -> LinkInfo {
        link_info(self.link.as_fd()).expect("link info of our own link")
    }
}

impl AsFd for CgroupLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

/// Replaces the program behind the pinned link at `link_path` with `new_prog` (e.g. an
/// allow-all program, to simulate an older agent's program under the agent's link).
pub fn swap_pinned_link_prog(link_path: &Path, new_prog: BorrowedFd<'_>) {
    let link = obj_get(link_path)
        .unwrap_or_else(|e| panic!("cannot open pinned link {}: {e}", link_path.display()));
    link_update(link.as_fd(), new_prog)
        .unwrap_or_else(|e| panic!("BPF_LINK_UPDATE on {} failed: {e}", link_path.display()));
}

/// enum bpf_map_type: BPF_MAP_TYPE_LRU_HASH.
pub const MAP_TYPE_LRU_HASH: u32 = uapi::BPF_MAP_TYPE_LRU_HASH;

/// BPF_MAP_CREATE: a map of the given type and sizes (no name, no BTF).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = uapi::MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: flags,
    };
    // SAFETY: BPF_MAP_CREATE's member; no pointers.
    unsafe { bpf_fd(uapi::BPF_MAP_CREATE, &mut attr) }
}

/// BPF_MAP_UPDATE_ELEM with raw key and value bytes (flags BPF_ANY).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = uapi::MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: BPF_MAP_UPDATE_ELEM's member; the kernel reads the map's key and value sizes from
    // `key` and `value`, which the caller sized for the map.
    unsafe { bpf(uapi::BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
}

/// The info of a pinned map.
pub fn pinned_map_info(path: &Path) -> MapInfo {
    let fd =
        obj_get(path).unwrap_or_else(|e| panic!("cannot open pinned map {}: {e}", path.display()));
    map_info(fd.as_fd())
        .unwrap_or_else(|e| panic!("cannot read map info of {}: {e}", path.display()))
}

/// The ids of the maps a program uses (struct bpf_prog_info's map_ids).
pub fn prog_map_ids(prog_id: u32) -> Vec<u32> {
    let fd =
        prog_fd_by_id(prog_id).unwrap_or_else(|e| panic!("cannot open program {prog_id}: {e}"));
    let mut ids = vec![0u32; 64];
    // nr_map_ids: in, the capacity; out, the count.
    let mut info = uapi::ProgInfo {
        nr_map_ids: ids.len() as u32,
        map_ids: ids.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: a program info struct whose `map_ids` has room for `nr_map_ids` ids; its other
    // pointers are null.
    unsafe { sys::obj_info(fd.as_fd(), &mut info) }
        .unwrap_or_else(|e| panic!("cannot read the maps of program {prog_id}: {e}"));
    ids.truncate(info.nr_map_ids.min(64) as usize);
    ids
}

// tc programs: a classifier of someone else's, attached in front of the guard.

/// `r0 = 0 (TC_ACT_OK); exit`: a classifier that passes every packet on and ends the chain, as
/// Cilium's programs on pod interfaces do (OK or REDIRECT).
pub fn tc_ok_insns() -> Vec<Insn> {
    vec![
        Insn::new(MOV64_IMM, 0, 0, 0, 0),
        Insn::new(EXIT, 0, 0, 0, 0),
    ]
}

/// Loads [`tc_ok_insns`] as a BPF_PROG_TYPE_SCHED_CLS program named `name`.
pub fn load_tc_ok(name: &str) -> OwnedFd {
    prog_load(uapi::BPF_PROG_TYPE_SCHED_CLS, 0, &tc_ok_insns(), name, None)
        .unwrap_or_else(|e| panic!("cannot load the TC_ACT_OK classifier: {e}"))
}

/// BPF_OBJ_PIN: pins `fd` (a program, map or link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = uapi::ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: BPF_OBJ_PIN's member; `pathname` is a C string that outlives the call.
    unsafe { bpf(uapi::BPF_OBJ_PIN, &mut attr) }.map(|_| ())
}

/// BPF_LINK_CREATE of a classifier on TCX ingress of `ifindex`, at the head (before every
/// program there). Detached when the returned link fd closes.
pub fn tcx_attach_first(prog: BorrowedFd<'_>, ifindex: u32) -> io::Result<OwnedFd> {
    sys::link_create(prog, ifindex, uapi::BPF_TCX_INGRESS, uapi::BPF_F_BEFORE)
}

/// BPF_PROG_QUERY on TCX ingress of `ifindex`: the program ids in the order they run (empty on
/// kernels without TCX).
pub fn tcx_programs(ifindex: u32) -> Vec<u32> {
    query(ifindex, uapi::BPF_TCX_INGRESS).unwrap_or_default()
}

/// A cgroup_skb egress program that passes every packet (`r0 = 1; exit`): an older agent's
/// backstop stand-in, to swap under the pinned link.
pub fn load_cgroup_skb_pass_all() -> OwnedFd {
    prog_load(
        uapi::BPF_PROG_TYPE_CGROUP_SKB,
        AttachType::InetEgress as u32,
        &allow_all_insns(),
        "k2i_test_skb",
        None,
    )
    .unwrap_or_else(|e| panic!("cannot load the pass-all cgroup_skb program: {e}"))
}

/// Adds a direct-action cls_bpf filter named `name` running `prog` on the ingress hook of
/// interface `ifindex` (of the calling thread's network namespace) at `priority`/`handle`,
/// protocol all, adding the clsact qdisc first if it is missing. What `tc filter add … bpf da`
/// does, but with the name a test chooses (tc names pinned programs after their file).
pub fn tc_filter_add(
    ifindex: u32,
    priority: u16,
    handle: u32,
    prog: BorrowedFd<'_>,
    name: &str,
) -> io::Result<()> {
    const RTM_NEWQDISC: u16 = 36;
    const RTM_NEWTFILTER: u16 = 44;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_FD: u16 = 6;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_FLAGS: u16 = 8;
    const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
    const ETH_P_ALL: u16 = 3;
    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut out = (len as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(len.next_multiple_of(4), 0);
        out
    }
    fn message(kind: u16, flags: u16, tcmsg: [u32; 4], attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 20 + attrs.len();
        let mut out = (len as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        out.extend_from_slice(&[0u8; 8]);
        out.extend_from_slice(&[0u8; 4]); // family AF_UNSPEC and padding
        for word in tcmsg {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out.extend_from_slice(attrs);
        out
    }
    fn talk(request: &[u8]) -> io::Result<()> {
        let fd = sys::route_socket(0)?;
        // SAFETY: sending and receiving local buffers on a valid fd.
        unsafe {
            if libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut reply = [0u8; 4096];
            let n = libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < 20 {
                return Err(io::Error::last_os_error());
            }
            // NLMSG_ERROR: the errno follows the header (0 is the ACK).
            let errno = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
        }
        Ok(())
    }
    // clsact: handle ffff:0, parent TC_H_CLSACT.
    let qdisc = message(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_EXCL,
        [ifindex, 0xffff_0000, 0xffff_fff1, 0],
        &nla(TCA_KIND, b"clsact\0"),
    );
    match talk(&qdisc) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    let mut options = nla(TCA_BPF_FD, &(prog.as_raw_fd() as u32).to_ne_bytes());
    let mut name = name.as_bytes().to_vec();
    name.push(0);
    options.extend(nla(TCA_BPF_NAME, &name));
    options.extend(nla(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
    let mut attrs = nla(TCA_KIND, b"bpf\0");
    attrs.extend(nla(TCA_OPTIONS, &options));
    let info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be());
    talk(&message(
        RTM_NEWTFILTER,
        NLM_F_CREATE | NLM_F_EXCL,
        // parent: the clsact qdisc's ingress hook.
        [ifindex, handle, 0xffff_fff2, info],
        &attrs,
    ))
}
