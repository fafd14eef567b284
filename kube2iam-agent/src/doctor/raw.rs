//! The raw bpf(2) calls the doctor's probes make: loading hand-assembled sock_addr programs,
//! creating a cgroup link, and querying a cgroup's attached programs with their attach flags.
//! Written against the kernel UAPI directly, so a probe tests the kernel and not the loader.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for the cgroup, inherited ones included.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// `BPF_F_ALLOW_OVERRIDE` and `BPF_F_ALLOW_MULTI` in `attach_flags`.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// The `enum bpf_attach_type` values of the hooks the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Hook {
    Connect4 = 10,
    Connect6 = 11,
    GetPeerName4 = 29,
    GetPeerName6 = 30,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::GetPeerName4 => "getpeername4",
            Hook::GetPeerName6 => "getpeername6",
        }
    }
}

/// One instruction (`struct bpf_insn`); `regs` holds dst in the low and src in the high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off: 0,
        imm,
    }
}

const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08; // BPF_ALU64 | BPF_MOV | BPF_X
const CALL: u8 = 0x05 | 0x80; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT

/// `BPF_FUNC_get_netns_cookie`.
const HELPER_GET_NETNS_COOKIE: i32 = 122;

/// `r0 = 1; exit`: allows the syscall and changes nothing.
pub fn allow_all() -> Vec<Insn> {
    vec![insn(MOV64_IMM, 0, 0, 1), insn(EXIT, 0, 0, 0)]
}

/// `r0 = 0; exit`: refuses the syscall (EPERM); shows whether a program runs for a process.
pub fn deny_all() -> Vec<Insn> {
    vec![insn(MOV64_IMM, 0, 0, 0), insn(EXIT, 0, 0, 0)]
}

/// Calls `bpf_get_netns_cookie(ctx)` and allows: the verifier accepts it only where the helper
/// exists for sock_addr programs (Linux 5.7).
pub fn netns_cookie_call() -> Vec<Insn> {
    vec![
        insn(MOV64_REG, 6, 1, 0),
        insn(MOV64_REG, 1, 6, 0),
        insn(CALL, 0, 0, HELPER_GET_NETNS_COOKIE),
        insn(MOV64_IMM, 0, 0, 1),
        insn(EXIT, 0, 0, 0),
    ]
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed buffer laid out as the command's member of `union bpf_attr`;
    // the kernel reads and writes at most `attr.len()` bytes of it.
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
    // SAFETY: these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&buf[off..off + 4]);
    u32::from_ne_bytes(word)
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

/// BPF_PROG_LOAD of a `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` program for `hook`.
pub fn load_sock_addr(insns: &[Insn], hook: Hook, name: &str) -> Result<OwnedFd, LoadError> {
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = [0u8; 128];
    // { prog_type @0, insn_cnt @4, insns @8, license @16, log_level @24, log_size @28,
    //   log_buf @32, kern_version @40, prog_flags @44, prog_name[16] @48, prog_ifindex @64,
    //   expected_attach_type @68 }
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
    put_u32(&mut attr, 68, hook as u32);
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        LoadError {
            error,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

/// BPF_LINK_CREATE of `prog` on the cgroup `cgroup` at `hook`.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    hook: Hook,
) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 64];
    // { prog_fd @0, target_fd @4, attach_type @8, flags @12 }
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 8, hook as u32);
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// BPF_LINK_CREATE with target fd -1: EBADF where the kernel knows the command, EINVAL where it
/// does not. Attaches nothing.
pub fn link_create_probe(prog: BorrowedFd<'_>, hook: Hook) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, u32::MAX);
    put_u32(&mut attr, 8, hook as u32);
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// What BPF_PROG_QUERY reports for one hook of a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub prog_ids: Vec<u32>,
    /// The flags the programs were attached with on this cgroup (0 = exclusive).
    pub attach_flags: u32,
}

/// BPF_PROG_QUERY; `effective` includes the programs inherited from ancestors.
pub fn prog_query(cgroup: BorrowedFd<'_>, hook: Hook, effective: bool) -> io::Result<Query> {
    let mut ids = vec![0u32; 64];
    let mut attr = [0u8; 64];
    // { target_fd @0, attach_type @4, query_flags @8, attach_flags @12, prog_ids @16,
    //   prog_cnt @24 }
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, hook as u32);
    put_u32(
        &mut attr,
        8,
        if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
    );
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate((get_u32(&attr, 24) as usize).min(64));
    Ok(Query {
        prog_ids: ids,
        attach_flags: get_u32(&attr, 12),
    })
}

/// The name of the program with id `id`. Opening a program by id needs CAP_SYS_ADMIN.
pub fn prog_name(id: u32) -> io::Result<String> {
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, id);
    let fd = sys_bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    let mut info = [0u8; 128];
    let mut attr = [0u8; 16];
    // { bpf_fd @0, info_len @4, info @8 }
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // struct bpf_prog_info: name[16] @64.
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

pub use crate::bpf::sys::{fdinfo_field, fdinfo_value};

const _: () = assert!(size_of::<Insn>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_in_nibbles() {
        let prog = netns_cookie_call();
        assert_eq!(prog[0].regs, 0x16, "r6 = r1: dst 6 low, src 1 high");
        assert_eq!(prog[1].regs, 0x61, "r1 = r6");
        assert_eq!((prog[2].code, prog[2].imm), (0x85, 122));
        assert_eq!(allow_all()[0].code, 0xb7);
        assert_eq!(allow_all()[1].code, 0x95);
    }

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
