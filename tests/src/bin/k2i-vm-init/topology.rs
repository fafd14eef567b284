//! The VM is the node: its own network namespace is the host namespace, where the agent runs and
//! where the metadata address lives (on lo, served by the IMDS stand-in). One pod hangs off it
//! in a network namespace behind a veth. The VM has no network device to the outside, so
//! nothing here can leave it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use kube2iam_tests::{
    HttpStub, METADATA_IP4, METADATA_IP6, METADATA_PORT, ProbeResult, probe,
    process::{ip, place},
};

use crate::vmagent::{HOST_IP4, HOST_IP6};

pub const PROBE: &str = "/bin/k2i-probe";
const POD_NETNS: &str = "k2i-pod-a";
pub const AGENT_PORT: u16 = 8181;

pub const POD_IP4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

/// The stand-ins: the node's "real" metadata service and the agent's server.
pub struct Node {
    pub imds: HttpStub,
    pub agent_stub: HttpStub,
    /// The cgroup pod processes join first (a cgroup-v1 directory), if any.
    pub pod_cgroup: Option<PathBuf>,
}

/// Addresses on lo, the pod namespace and its veth, and the two stand-ins.
pub fn build() -> Node {
    ip(&["link", "set", "lo", "up"]);
    for addr in [format!("{METADATA_IP4}/32"), format!("{HOST_IP4}/32")] {
        ip(&["addr", "add", &addr, "dev", "lo"]);
    }
    for addr in [format!("{METADATA_IP6}/128"), format!("{HOST_IP6}/128")] {
        ip(&["-6", "addr", "add", &addr, "dev", "lo", "nodad"]);
    }
    ip(&["netns", "add", POD_NETNS]);
    ip(&[
        "link", "add", "k2i-h-a", "type", "veth", "peer", "name", "eth0", "netns", POD_NETNS,
    ]);
    ip(&["addr", "add", "198.51.100.1/30", "dev", "k2i-h-a"]);
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:77::1/64",
        "dev",
        "k2i-h-a",
        "nodad",
    ]);
    ip(&["link", "set", "k2i-h-a", "up"]);
    // Two interfaces no pod pattern names, as a node's uplink and overlay devices: the node
    // guard's, on every kernel of the matrix (the VM has no network device of its own).
    ip(&[
        "link", "add", "k2i-n0", "type", "veth", "peer", "name", "k2i-n1",
    ]);
    ip(&["link", "set", "k2i-n0", "up"]);
    ip(&["link", "set", "k2i-n1", "up"]);
    let n = POD_NETNS;
    ip(&["-n", n, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        n,
        "addr",
        "add",
        &format!("{POD_IP4}/30"),
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        n,
        "-6",
        "addr",
        "add",
        &format!("{POD_IP6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", n, "link", "set", "eth0", "up"]);
    ip(&["-n", n, "route", "add", "default", "via", "198.51.100.1"]);
    ip(&[
        "-n",
        n,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:77::1",
        "dev",
        "eth0",
    ]);

    let own = Path::new("/proc/self/ns/net");
    let imds = HttpStub::start(
        "imds-stub",
        own,
        &[
            SocketAddr::new(IpAddr::V4(METADATA_IP4), METADATA_PORT),
            SocketAddr::new(IpAddr::V6(METADATA_IP6), METADATA_PORT),
        ],
    );
    let host4: Ipv4Addr = HOST_IP4.parse().expect("valid constant");
    let host6: Ipv6Addr = HOST_IP6.parse().expect("valid constant");
    let agent_stub = HttpStub::start(
        "agent-stub",
        own,
        &[
            SocketAddr::new(IpAddr::V4(host4), AGENT_PORT),
            SocketAddr::new(IpAddr::V6(host6), AGENT_PORT),
        ],
    );
    Node {
        imds,
        agent_stub,
        pod_cgroup: None,
    }
}

pub fn pod_netns() -> PathBuf {
    Path::new("/run/netns").join(POD_NETNS)
}

impl Node {
    /// A command run as a pod process: into the pod cgroup (if any), then the pod's namespace.
    pub fn pod_command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        place(&mut command, self.pod_cgroup.as_deref(), Some(&pod_netns()));
        command
    }

    /// k2i-probe from the pod.
    pub fn pod_probe(&self, addr: SocketAddr, extra: &[&str]) -> ProbeResult {
        let addr = addr.to_string();
        let mut args = vec!["--addr", addr.as_str()];
        args.extend_from_slice(extra);
        probe::run(self.pod_command(PROBE), &args)
    }

    /// k2i-probe from the node's own (host) namespace.
    pub fn host_probe(&self, addr: SocketAddr) -> ProbeResult {
        let addr = addr.to_string();
        probe::run(Command::new(PROBE), &["--addr", addr.as_str()])
    }

    /// Panics if the pod ever reached the metadata service directly.
    pub fn assert_no_leak(&self) {
        let leaked: Vec<IpAddr> = self
            .imds
            .peer_ips()
            .into_iter()
            .filter(|ip| *ip == IpAddr::V4(POD_IP4) || *ip == IpAddr::V6(POD_IP6))
            .collect();
        assert!(
            leaked.is_empty(),
            "LEAK: the pod reached the node's metadata service directly ({leaked:?})"
        );
    }
}

/// Asserts the probe reached the agent stand-in, which saw `source`.
pub fn assert_redirected(result: &ProbeResult, source: IpAddr, what: &str) {
    assert!(
        result.ok && result.reached_agent_stub(),
        "{what}: expected the agent stand-in to answer, got {result:?}"
    );
    assert_eq!(
        result.seen_as(),
        Some(source),
        "{what}: the agent stand-in should see the pod's address; got {result:?}"
    );
}
