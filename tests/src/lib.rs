//! The test kit for kube2iam-ebpf's integration tests.
//!
//! A test builds a [`TestNode`]: a network namespace that models an EC2 host (no route out, no
//! link to the machine), a child cgroup of the cgroup2 root where the programs are attached, and a
//! private bpffs for the agent's pins. [`Pod`]s hang off the node behind veths; their processes
//! join the test cgroup and then enter the pod's namespace. [`ImdsStub`] plays the node's real
//! metadata service at 169.254.169.254 / fd00:ec2::254 and records every caller, so a failed
//! rewrite is caught instead of leaked; [`AgentStub`] stands in for the agent's server at the
//! node's host IP. [`Agent`] runs the real agent binary in the node namespace.
//!
//! Everything a test creates is owned by a guard and removed in `Drop`, also when the test
//! panics. Names carry `<pid>-<counter>`, so tests run in parallel.
//!
//! The tests need root: they create namespaces, cgroups, bpffs mounts and BPF programs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU32, Ordering},
};

pub mod agent;
pub mod bench;
pub mod bpf;
pub mod clients;
pub mod cri;
pub mod e2e;
pub mod encode;
pub mod faults;
pub mod imds;
pub mod kube_api;
pub mod maps;
pub mod moto;
pub mod node;
pub mod ns_runtime;
pub mod observe;
pub mod packets;
pub mod probe;
pub mod process;
pub mod stub;
pub mod tls;
pub mod venv;

pub use agent::{Agent, AgentOptions, agent_binary, run_uninstall};
pub use clients::RunIn;
pub use faults::{FaultMode, FaultProxy};
pub use imds::{ImdsEmulator, NODE_ACCESS_KEY_ID};
pub use kube_api::{KubeApi, KubeObject};
pub use moto::{AssumeRoleCall, Moto};
pub use node::{CgroupDriver, KubeletCgroup, Pod, TestNode, Topology};
pub use probe::ProbeResult;
pub use process::ChildGuard;
pub use stub::{AgentStub, HttpStub, ImdsStub};

/// The metadata service's IPv4 address, owned by [`ImdsStub`] inside a test node.
pub const METADATA_IP4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata service's IPv6 address, owned by [`ImdsStub`] inside a test node.
pub const METADATA_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The metadata service's port.
pub const METADATA_PORT: u16 = 80;
/// The node's host IP (HOST_IP on EKS), on the node's lo; the agent listens there.
pub const HOST_IP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The node's IPv6 host IP, on the node's lo.
pub const HOST_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0, 0, 0, 0, 0, 0x10);
/// The agent's default port.
pub const AGENT_PORT: u16 = 8181;

/// `169.254.169.254:80`.
pub fn metadata_addr4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(METADATA_IP4), METADATA_PORT)
}

/// `[fd00:ec2::254]:80`.
pub fn metadata_addr6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(METADATA_IP6), METADATA_PORT)
}

/// `[::ffff:169.254.169.254]:80`, how a dual-stack socket reaches the IPv4 metadata address.
pub fn metadata_addr_mapped() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(METADATA_IP4.to_ipv6_mapped()), METADATA_PORT)
}

/// A name part unique within this machine for the life of this process: `<pid>-<counter>`.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics unless the tests run as root, with the reason.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the kube2iam integration tests need root (network namespaces, cgroups, bpffs, BPF \
         programs); run them with sudo or via `cargo xtask test`"
    );
}
