//! The bpf(2) UAPI that the agent and the test kit call without aya: command numbers, program,
//! attach, link and map types, flags, the members of `union bpf_attr` they pass, the heads of
//! the `bpf_*_info` structs they read, and `struct bpf_insn`.
//!
//! Each attr is a `#[repr(C)]` prefix of the kernel's member, with explicit padding and a size
//! assertion; the kernel reads at most the size passed and treats the rest as zero. An attr
//! must still cover every field the kernel writes back for its command (`BPF_PROG_QUERY` writes
//! `revision` whatever size it was given), so [`QueryAttr`] is the whole query member. Pointers
//! travel as `u64`, as the UAPI declares them. Names follow `include/uapi/linux/bpf.h`.

// enum bpf_cmd
pub const BPF_MAP_CREATE: u32 = 0;
pub const BPF_MAP_UPDATE_ELEM: u32 = 2;
pub const BPF_PROG_LOAD: u32 = 5;
pub const BPF_OBJ_PIN: u32 = 6;
pub const BPF_OBJ_GET: u32 = 7;
pub const BPF_PROG_GET_FD_BY_ID: u32 = 13;
pub const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
pub const BPF_PROG_QUERY: u32 = 16;
pub const BPF_LINK_CREATE: u32 = 28;
pub const BPF_LINK_UPDATE: u32 = 29;
/// Linux 5.9.
pub const BPF_LINK_DETACH: u32 = 34;

// enum bpf_prog_type
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

// enum bpf_attach_type
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
/// Linux 6.6.
pub const BPF_TCX_INGRESS: u32 = 46;

// enum bpf_link_type
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

// enum bpf_map_type
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// `attach_flags`: a program below may override this one.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
/// `attach_flags`: several programs at one hook (what bpf_links always are).
pub const BPF_F_ALLOW_MULTI: u32 = 2;
/// `BPF_LINK_UPDATE`: only if the link still runs `old_prog_fd`.
pub const BPF_F_REPLACE: u32 = 4;
/// mprog attach (TCX): before the relative program, or at the head without one.
pub const BPF_F_BEFORE: u32 = 8;
/// `BPF_PROG_QUERY`: the programs that run for the cgroup, inherited ones included.
pub const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// `BPF_FUNC_get_netns_cookie`.
pub const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;

// Opcodes: class | size/op | mode/source.
/// `BPF_LDX | BPF_MEM | BPF_W`.
pub const LDX_MEM_W: u8 = 0x01 | 0x60;
/// `BPF_STX | BPF_MEM | BPF_W`.
pub const STX_MEM_W: u8 = 0x03 | 0x60;
/// `BPF_JMP | BPF_JNE | BPF_K`.
pub const JNE_IMM: u8 = 0x05 | 0x50;
/// `BPF_JMP | BPF_CALL`.
pub const CALL: u8 = 0x05 | 0x80;
/// `BPF_JMP | BPF_EXIT`.
pub const EXIT: u8 = 0x05 | 0x90;
/// `BPF_ALU64 | BPF_MOV | BPF_K`.
pub const MOV64_IMM: u8 = 0x07 | 0xb0;
/// `BPF_ALU64 | BPF_MOV | BPF_X`.
pub const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08;

/// One instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble (little-endian bitfields).
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }
}

/// `BPF_MAP_CREATE` (no name, no BTF).
#[repr(C)]
#[derive(Debug, Default)]
pub struct MapCreateAttr {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct MapElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

/// `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ProgLoadAttr {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    /// At most 15 bytes and a NUL.
    pub prog_name: [u8; 16],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
}

impl ProgLoadAttr {
    /// Sets `prog_name`, cut to the 15 bytes the kernel keeps.
    pub fn set_name(&mut self, name: &str) {
        let name = name.as_bytes();
        let n = name.len().min(self.prog_name.len() - 1);
        self.prog_name = [0; 16];
        self.prog_name[..n].copy_from_slice(&name[..n]);
    }
}

/// `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ObjAttr {
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
}

/// `BPF_*_GET_FD_BY_ID`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GetIdAttr {
    pub id: u32,
    pub next_id: u32,
    pub open_flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD`; the kernel writes back `info_len`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct InfoAttr {
    pub bpf_fd: u32,
    pub info_len: u32,
    pub info: u64,
}

/// `BPF_PROG_QUERY`, whole: cgroups (`target` a cgroup fd) and, with the multi-program fields
/// (Linux 6.6), TCX (`target` an ifindex). The kernel writes back `attach_flags`, `count` and
/// `revision`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct QueryAttr {
    pub target: u32,
    pub attach_type: u32,
    pub query_flags: u32,
    pub attach_flags: u32,
    pub prog_ids: u64,
    /// In: the capacity of `prog_ids` (and `link_ids`); out: how many there are.
    pub count: u32,
    pub _pad: u32,
    pub prog_attach_flags: u64,
    pub link_ids: u64,
    pub link_attach_flags: u64,
    pub revision: u64,
}

/// `BPF_LINK_CREATE`, with the TCX arm of its union (`target` a cgroup fd or an ifindex).
#[repr(C)]
#[derive(Debug, Default)]
pub struct LinkCreateAttr {
    pub prog_fd: u32,
    pub target: u32,
    pub attach_type: u32,
    pub flags: u32,
    pub relative_fd: u32,
    pub _pad: u32,
    pub expected_revision: u64,
}

/// `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct LinkUpdateAttr {
    pub link_fd: u32,
    pub new_prog_fd: u32,
    pub flags: u32,
    pub old_prog_fd: u32,
}

/// `BPF_LINK_DETACH`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct LinkDetachAttr {
    pub link_fd: u32,
}

/// The head of `struct bpf_link_info` with the cgroup arm of its union; the TCX arm holds the
/// ifindex where this one holds the first four bytes of `cgroup_id`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// `enum bpf_link_type`.
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    pub _pad: u32,
    /// For cgroup links: the cgroup's id (its inode number on cgroup2).
    pub cgroup_id: u64,
    pub attach_type: u32,
    pub _pad2: u32,
}

/// `struct bpf_prog_info` up to its name. `map_ids` is read only with `nr_map_ids` set to its
/// capacity; the instruction arrays only with their lengths set (left zero here).
#[repr(C)]
#[derive(Debug, Default)]
pub struct ProgInfo {
    pub prog_type: u32,
    pub id: u32,
    /// The kernel's hash of the instructions: equal tags, same program code.
    pub tag: [u8; 8],
    pub jited_prog_len: u32,
    pub xlated_prog_len: u32,
    pub jited_prog_insns: u64,
    pub xlated_prog_insns: u64,
    pub load_time: u64,
    pub created_by_uid: u32,
    pub nr_map_ids: u32,
    pub map_ids: u64,
    pub name: [u8; 16],
}

impl ProgInfo {
    /// The name the program was loaded with, up to its NUL.
    pub fn name(&self) -> &[u8] {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        &self.name[..end]
    }
}

/// The head of `struct bpf_map_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

const _: () = assert!(core::mem::size_of::<Insn>() == 8);
const _: () = assert!(core::mem::size_of::<MapCreateAttr>() == 20);
const _: () = assert!(core::mem::size_of::<MapElemAttr>() == 32);
const _: () = assert!(core::mem::size_of::<ProgLoadAttr>() == 72);
const _: () = assert!(core::mem::size_of::<ObjAttr>() == 16);
const _: () = assert!(core::mem::size_of::<GetIdAttr>() == 12);
const _: () = assert!(core::mem::size_of::<InfoAttr>() == 16);
const _: () = assert!(core::mem::size_of::<QueryAttr>() == 64);
const _: () = assert!(core::mem::size_of::<LinkCreateAttr>() == 32);
const _: () = assert!(core::mem::size_of::<LinkUpdateAttr>() == 16);
const _: () = assert!(core::mem::size_of::<LinkDetachAttr>() == 4);
const _: () = assert!(core::mem::size_of::<LinkInfo>() == 32);
const _: () = assert!(core::mem::size_of::<ProgInfo>() == 80);
const _: () = assert!(core::mem::size_of::<MapInfo>() == 24);
