//! Raw bpf(2) for tests: tiny hand-assembled cgroup programs, cgroup links, link updates, and
//! the object info a test asserts on (link ids, program tags, attached program counts).
//!
//! Only what the tests need, written against the kernel UAPI directly so the tests do not depend
//! on the loader they are testing.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use kube2iam_common::port_repr;

// enum bpf_cmd
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// enum bpf_prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR.
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// enum bpf_attach_type values of the cgroup sock_addr hooks kube2iam uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    CgroupSockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Inet4GetPeerName = 29,
    Inet6GetPeerName = 30,
    /// BPF_CGROUP_INET_EGRESS: cgroup_skb on the way out (the egress backstop).
    InetEgress = 1,
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

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble (little-endian bitfields).
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes (class | size/op | mode/source).
const LDX_MEM_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
const STX_MEM_W: u8 = 0x03 | 0x60; // BPF_STX | BPF_MEM | BPF_W
const JNE_IMM: u8 = 0x05 | 0x50; // BPF_JMP | BPF_JNE | BPF_K
const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT

/// offsetof(struct bpf_sock_addr, user_port).
const USER_PORT_OFFSET: i16 = 24;

/// `r0 = 1; exit`: lets every connect through unchanged.
pub fn allow_all_insns() -> Vec<Insn> {
    vec![insn(MOV64_IMM, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)]
}

/// Rewrites destination port `from` to `to` and allows everything. `user_port` holds the
/// big-endian port in the low 16 bits, so the comparison uses that representation.
pub fn port_rewrite_insns(from: u16, to: u16) -> Vec<Insn> {
    vec![
        // r2 = ctx->user_port
        insn(LDX_MEM_W, 2, 1, USER_PORT_OFFSET, 0),
        // if r2 != from goto allow
        insn(JNE_IMM, 2, 0, 2, port_repr(from) as i32),
        // ctx->user_port = to
        insn(MOV64_IMM, 2, 0, 0, port_repr(to) as i32),
        insn(STX_MEM_W, 1, 2, USER_PORT_OFFSET, 0),
        // allow: return 1
        insn(MOV64_IMM, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer laid out as the command's union bpf_attr
    // member; the kernel reads and writes at most `attr.len()` bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sys_bpf_fd(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: these commands return a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A zeroed union bpf_attr (large enough for every command used here).
fn attr() -> [u8; 128] {
    [0; 128]
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}

/// Loads a BPF_PROG_TYPE_CGROUP_SOCK_ADDR program for `attach` (license "GPL"). On a verifier
/// rejection the error carries the verifier log.
pub fn load_sock_addr_prog(insns: &[Insn], attach: AttachType, name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = attr();
    // struct { prog_type @0, insn_cnt @4, insns @8, license @16, log_level @24, log_size @28,
    //          log_buf @32, kern_version @40, prog_flags @44, prog_name[16] @48,
    //          prog_ifindex @64, expected_attach_type @68, ... }
    put_u32(&mut attr, 0, PROG_TYPE_CGROUP_SOCK_ADDR);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1);
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    let name = name.as_bytes();
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name[..n]);
    put_u32(&mut attr, 68, attach as u32);
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
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
    let mut attr = attr();
    // struct { prog_fd @0, target_fd @4, attach_type @8, flags @12, ... }
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach as u32);
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// BPF_LINK_UPDATE: atomically replace the program behind `link` with `new_prog`.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = attr();
    // struct { link_fd @0, new_prog_fd @4, flags @8, old_prog_fd @12 }
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, new_prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// BPF_OBJ_GET: open a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = attr();
    // struct { pathname @0, bpf_fd @8, file_flags @12, path_fd @16 }
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    sys_bpf_fd(BPF_OBJ_GET, &mut attr)
}

fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = attr();
    // struct { bpf_fd @0, info_len @4, info @8 }
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// What a test asserts about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// enum bpf_link_type (BPF_LINK_TYPE_CGROUP = 3).
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = [0u8; 256];
    obj_info(link, &mut info)?;
    // struct bpf_link_info { type @0, id @4, prog_id @8, union @16 { cgroup { cgroup_id @16,
    //                        attach_type @24 } } }
    Ok(LinkInfo {
        link_type: get_u32(&info, 0),
        id: get_u32(&info, 4),
        prog_id: get_u32(&info, 8),
        cgroup_id: get_u64(&info, 16),
        attach_type: get_u32(&info, 24),
    })
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
    let mut info = [0u8; 512];
    obj_info(prog, &mut info)?;
    // struct bpf_prog_info { type @0, id @4, tag[8] @8, jited_prog_len @16,
    //   xlated_prog_len @20, jited_prog_insns @24, xlated_prog_insns @32, load_time @40,
    //   created_by_uid @48, nr_map_ids @52, map_ids @56, name[16] @64, ... }
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(ProgInfo {
        prog_type: get_u32(&info, 0),
        id: get_u32(&info, 4),
        tag: info[8..16].try_into().expect("8 bytes"),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
        xlated_len: get_u32(&info, 20),
    })
}

/// BPF_PROG_GET_FD_BY_ID.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = attr();
    // struct { prog_id @0, next_id @4, open_flags @8 }
    put_u32(&mut attr, 0, id);
    sys_bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut attr)
}

/// The info of the program with id `id`.
pub fn prog_info_by_id(id: u32) -> ProgInfo {
    let fd = prog_fd_by_id(id).unwrap_or_else(|e| panic!("cannot open program id {id}: {e}"));
    prog_info(fd.as_fd()).unwrap_or_else(|e| panic!("cannot read info of program id {id}: {e}"))
}

/// BPF_PROG_QUERY: the ids of the programs attached to the cgroup at `attach` (effective ones
/// excluded: only this cgroup's own attachments).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach: AttachType) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = attr();
    // struct { target_fd @0, attach_type @4, query_flags @8, attach_flags @12, prog_ids @16,
    //          prog_cnt @24, ... }
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, attach as u32);
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = get_u32(&attr, 24) as usize;
    ids.truncate(count);
    Ok(ids)
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
pub const MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// BPF_MAP_CREATE: a map of the given type and sizes (no name, no BTF).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = attr();
    // struct { map_type @0, key_size @4, value_size @8, max_entries @12, map_flags @16 }
    put_u32(&mut attr, 0, map_type);
    put_u32(&mut attr, 4, key_size);
    put_u32(&mut attr, 8, value_size);
    put_u32(&mut attr, 12, max_entries);
    put_u32(&mut attr, 16, flags);
    sys_bpf_fd(BPF_MAP_CREATE, &mut attr)
}

/// BPF_MAP_UPDATE_ELEM with raw key and value bytes (flags BPF_ANY).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = attr();
    // struct { map_fd @0, key @8, value @16, flags @24 }
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_ptr() as u64);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// What a test asserts about a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 128];
    obj_info(map, &mut info)?;
    // struct bpf_map_info { type @0, id @4, key_size @8, value_size @12, max_entries @16, … }
    Ok(MapInfo {
        map_type: get_u32(&info, 0),
        id: get_u32(&info, 4),
        key_size: get_u32(&info, 8),
        value_size: get_u32(&info, 12),
        max_entries: get_u32(&info, 16),
    })
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
    let mut info = [0u8; 512];
    // nr_map_ids @52 (in: capacity, out: count), map_ids @56 (a user pointer).
    put_u32(&mut info, 52, ids.len() as u32);
    put_u64(&mut info, 56, ids.as_mut_ptr() as u64);
    obj_info(fd.as_fd(), &mut info)
        .unwrap_or_else(|e| panic!("cannot read the maps of program {prog_id}: {e}"));
    ids.truncate(get_u32(&info, 52).min(64) as usize);
    ids
}

const _: () = assert!(size_of::<Insn>() == 8);

// tc programs: a classifier of someone else's, attached in front of the guard.

const BPF_OBJ_PIN: libc::c_long = 6;
/// enum bpf_prog_type: BPF_PROG_TYPE_SCHED_CLS.
pub const PROG_TYPE_SCHED_CLS: u32 = 3;
/// enum bpf_attach_type: BPF_TCX_INGRESS (Linux 6.6).
pub const TCX_INGRESS: u32 = 46;
/// BPF_F_BEFORE: attach before the relative program, or at the head without one.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `r0 = 0 (TC_ACT_OK); exit`: a classifier that passes every packet on and ends the chain, as
/// Cilium's programs on pod interfaces do (OK or REDIRECT).
pub fn tc_ok_insns() -> Vec<Insn> {
    vec![insn(MOV64_IMM, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)]
}

/// Loads [`tc_ok_insns`] as a BPF_PROG_TYPE_SCHED_CLS program named `name`.
pub fn load_tc_ok(name: &str) -> OwnedFd {
    let insns = tc_ok_insns();
    let license = c"GPL";
    let mut attr = attr();
    put_u32(&mut attr, 0, PROG_TYPE_SCHED_CLS);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let name = name.as_bytes();
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name[..n]);
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr)
        .unwrap_or_else(|e| panic!("cannot load the TC_ACT_OK classifier: {e}"))
}

/// BPF_OBJ_PIN: pins `fd` (a program, map or link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = attr();
    // struct { pathname @0, bpf_fd @8, file_flags @12 }
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// BPF_LINK_CREATE of a classifier on TCX ingress of `ifindex`, at the head (before every
/// program there). Detached when the returned link fd closes.
pub fn tcx_attach_first(prog: BorrowedFd<'_>, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = attr();
    // struct { prog_fd @0, target_ifindex @4, attach_type @8, flags @12,
    //          tcx { relative_fd @16, expected_revision @24 } }
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, TCX_INGRESS);
    put_u32(&mut attr, 12, BPF_F_BEFORE);
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// BPF_PROG_QUERY on TCX ingress of `ifindex`: the program ids in the order they run (empty on
/// kernels without TCX).
pub fn tcx_programs(ifindex: u32) -> Vec<u32> {
    let mut ids = vec![0u32; 64];
    let mut attr = attr();
    // struct { target_ifindex @0, attach_type @4, query_flags @8, attach_flags @12,
    //          prog_ids @16, count @24, ... }
    put_u32(&mut attr, 0, ifindex);
    put_u32(&mut attr, 4, TCX_INGRESS);
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    if sys_bpf(BPF_PROG_QUERY, &mut attr).is_err() {
        return Vec::new();
    }
    ids.truncate(get_u32(&attr, 24) as usize);
    ids
}

/// enum bpf_prog_type: BPF_PROG_TYPE_CGROUP_SKB.
pub const PROG_TYPE_CGROUP_SKB: u32 = 8;

/// A cgroup_skb egress program that passes every packet (`r0 = 1; exit`): an older agent's
/// backstop stand-in, to swap under the pinned link.
pub fn load_cgroup_skb_pass_all() -> OwnedFd {
    let insns = allow_all_insns();
    let license = c"GPL";
    let mut attr = attr();
    put_u32(&mut attr, 0, PROG_TYPE_CGROUP_SKB);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    attr[48..48 + 12].copy_from_slice(b"k2i_test_skb");
    put_u32(&mut attr, 68, AttachType::InetEgress as u32);
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr)
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
        // SAFETY: plain socket(2); owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
