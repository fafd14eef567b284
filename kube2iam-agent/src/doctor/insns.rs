//! The doctor's hand-assembled probe programs and the hooks it probes. They are loaded and
//! linked through `bpf::sys`, without aya, so a probe tests the kernel and not the loader.

use kube2iam_common::uapi::{self, CALL, EXIT, Insn, MOV64_IMM, MOV64_REG};

/// A cgroup sock_addr hook the agent uses: its name in the report and its attach type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    name: &'static str,
    attach_type: u32,
}

impl Hook {
    pub const CONNECT4: Hook = Hook::new("connect4", uapi::BPF_CGROUP_INET4_CONNECT);
    pub const CONNECT6: Hook = Hook::new("connect6", uapi::BPF_CGROUP_INET6_CONNECT);
    pub const GETPEERNAME4: Hook = Hook::new("getpeername4", uapi::BPF_CGROUP_INET4_GETPEERNAME);
    pub const GETPEERNAME6: Hook = Hook::new("getpeername6", uapi::BPF_CGROUP_INET6_GETPEERNAME);

    const fn new(name: &'static str, attach_type: u32) -> Hook {
        Hook { name, attach_type }
    }

    pub fn name(self) -> &'static str {
        self.name
    }

    /// The `enum bpf_attach_type` value.
    pub fn attach_type(self) -> u32 {
        self.attach_type
    }
}

const fn insn(code: u8, dst: u8, src: u8, imm: i32) -> Insn {
    Insn::new(code, dst, src, 0, imm)
}

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
        insn(CALL, 0, 0, uapi::BPF_FUNC_GET_NETNS_COOKIE),
        insn(MOV64_IMM, 0, 0, 1),
        insn(EXIT, 0, 0, 0),
    ]
}

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
}
