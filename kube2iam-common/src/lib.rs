//! Types shared between the kernel programs (`kube2iam-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a size assertion, because the kernel
//! and userspace must agree on the layout byte for byte. Byte order is noted on every field:
//! addresses and ports are kept in the exact representation `struct bpf_sock_addr` uses, so the
//! programs compare them without conversions.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod caps;
#[cfg(feature = "user")]
pub mod sys;
pub mod timeouts;
pub mod uapi;

/// Pinned map names. The kernel limits object names to 15 bytes.
pub mod maps {
    /// Hash map, one entry under [`super::CONFIG_KEY`]: the [`super::Config`].
    pub const CONFIG: &str = "K2I_CONFIG";
    /// Per-CPU array indexed by [`super::Counter`].
    pub const COUNTERS: &str = "K2I_COUNTERS";
    /// LRU hash: socket cookie → [`super::RevNat`], so `getpeername` can undo a rewrite.
    pub const REVNAT: &str = "K2I_REVNAT";
    /// Array, one u64, not pinned: where the netns probe program writes the caller's cookie.
    pub const NETNS_PROBE: &str = "K2I_NETNS_PROBE";
    /// Hash map, pinned, written by the agent: pod address (16 bytes, IPv4 mapped) → [`super::Identity`].
    pub const IDENTITY: &str = "K2I_IDENTITY";
    /// LRU hash: socket cookie → [`super::Attestation`], from a redirected connect to the
    /// `sock_ops` callback that knows the connection's source port.
    pub const CONNECTING: &str = "K2I_CONNECTING";
    /// LRU hash: [`super::ConnKey`] → [`super::Attestation`], read by the agent for every
    /// connection it accepts; removed when the client's socket closes.
    pub const ATTEST: &str = "K2I_ATTEST";
    /// Hash: pod cgroup id (native order) → 1, the hostNetwork pods whose metadata connects are
    /// redirected (`--host-network-pods`).
    pub const HOST_PODS: &str = "K2I_HOST_PODS";
}

/// Program names (the function names in `kube2iam-ebpf`), also the names of their pinned links.
pub mod programs {
    pub const CONNECT4: &str = "k2i_connect4";
    pub const CONNECT6: &str = "k2i_connect6";
    pub const GETPEERNAME4: &str = "k2i_getpeername4";
    pub const GETPEERNAME6: &str = "k2i_getpeername6";
    /// Not attached to pods: learns the host netns cookie on kernels without SO_NETNS_COOKIE.
    pub const NETNS_PROBE: &str = "k2i_netns_probe";
    /// tc ingress on the host side of pod interfaces: drops packets to the metadata service.
    pub const GUARD: &str = "k2i_guard";
    /// tc ingress on every other interface of the node but loopback (the uplink, tunnel and
    /// overlay devices): drops packets entering the node addressed to the metadata service.
    pub const NODE_GUARD: &str = "k2i_node_guard";
    /// sock_ops on the attach cgroup: moves a redirected socket's attestation from its socket
    /// cookie to its connection's addresses and ports, and drops it when the socket closes.
    pub const SOCK_OPS: &str = "k2i_sock_ops";
    /// cgroup_skb/egress beside connect4: drops socket packets to the metadata service that did
    /// not come from a connect the connect hooks let through unchanged.
    pub const EGRESS: &str = "k2i_egress";
}

/// The only key of the config map.
pub const CONFIG_KEY: u32 = 0;

/// Capacity of the reverse-NAT map. Entries are only needed while a redirected socket lives;
/// the LRU evicts the oldest, and a stale entry is never applied (see [`RevNat`]). The agent
/// holds at most `--max-connections` (default 4,096) pod connections open at once; twice that
/// leaves room for connections still in its backlog or closing, for about 0.9 MiB of
/// preallocated kernel memory (65,536 entries took 7 MiB). A pinned map of another size is
/// recreated on start, its entries copied over (see the agent's `bpf::loader`).
pub const REVNAT_CAPACITY: u32 = 8_192;

/// The config is present and the agent is serving: redirect instead of refusing.
pub const FLAG_ENABLED: u32 = 1 << 0;
/// `agent_ip6` holds an address: IPv6 metadata connects are redirected there (else refused).
pub const FLAG_AGENT_IP6: u32 = 1 << 1;
/// Metadata connects from the host network namespace are redirected when the connecting task is
/// in the cgroup of a pod listed in the host-pods map (`--host-network-pods`).
pub const FLAG_HOST_PODS: u32 = 1 << 2;
/// The agent reads no attestation records (`--identity-attestation off`): redirected connects
/// record none, and sock_ops finds none to carry. Unset (as in configs written before the flag
/// existed), every redirected connect is recorded.
pub const FLAG_ATTEST_OFF: u32 = 1 << 3;

/// Default metadata address, 169.254.169.254, as `bpf_sock_addr.user_ip4` holds it.
pub const DEFAULT_METADATA_IP4: u32 = u32::from_ne_bytes([169, 254, 169, 254]);
/// Default IPv6 metadata address, fd00:ec2::254, as `bpf_sock_addr.user_ip6` holds it.
pub const DEFAULT_METADATA_IP6: [u32; 4] = ip6_words([
    0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
]);
/// Default metadata port 80, as `bpf_sock_addr.user_port` holds it.
pub const DEFAULT_METADATA_PORT: u32 = port_repr(80);

/// An IPv6 address (16 bytes in network order) as the four `u32` words of `user_ip6`: each word
/// holds four address bytes in network order, i.e. the native-endian reading of those bytes.
pub const fn ip6_words(octets: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([octets[0], octets[1], octets[2], octets[3]]),
        u32::from_ne_bytes([octets[4], octets[5], octets[6], octets[7]]),
        u32::from_ne_bytes([octets[8], octets[9], octets[10], octets[11]]),
        u32::from_ne_bytes([octets[12], octets[13], octets[14], octets[15]]),
    ]
}

/// The inverse of [`ip6_words`].
pub const fn ip6_octets(words: [u32; 4]) -> [u8; 16] {
    let a = words[0].to_ne_bytes();
    let b = words[1].to_ne_bytes();
    let c = words[2].to_ne_bytes();
    let d = words[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The IPv4-mapped IPv6 form `::ffff:a.b.c.d` of an IPv4 address held as `user_ip4`.
pub const fn ip4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// A TCP port as `bpf_sock_addr.user_port` holds it: the big-endian u16 in the low 16 bits.
pub const fn port_repr(port: u16) -> u32 {
    u16::from_ne_bytes(port.to_be_bytes()) as u32
}

/// The inverse of [`port_repr`].
pub const fn port_from_repr(repr: u32) -> u16 {
    u16::from_be_bytes((repr as u16).to_ne_bytes())
}

/// What the agent tells the programs. Written by the agent as one map element, so the programs
/// always see a whole config (the map is `BPF_F_NO_PREALLOC`, updates replace the element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The netns cookie of the host network namespace (native order). Sockets there are never
    /// rewritten: the kubelet, hostNetwork pods and the agent's own upstream connections.
    pub host_netns_cookie: u64,
    /// The agent's IPv4 address, network order (as `user_ip4`).
    pub agent_ip4: u32,
    /// The agent's port, big-endian u16 in the low 16 bits (as `user_port`).
    pub agent_port: u32,
    /// The agent's IPv6 address, network order words (as `user_ip6`); valid with [`FLAG_AGENT_IP6`].
    pub agent_ip6: [u32; 4],
    /// The metadata service's IPv4 address, network order (as `user_ip4`).
    pub metadata_ip4: u32,
    /// The metadata service's port, big-endian u16 in the low 16 bits (as `user_port`).
    pub metadata_port: u32,
    /// The metadata service's IPv6 address, network order words (as `user_ip6`).
    pub metadata_ip6: [u32; 4],
    /// `FLAG_*` bits (native order).
    pub flags: u32,
    /// The aya-log level the running programs were loaded with (native order); lets a restarted
    /// agent notice that the programs must be replaced because the level changed.
    pub log_level: u32,
}

const _: () = assert!(core::mem::size_of::<Config>() == 64);

/// Outcome counters, the indices of the per-CPU counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect that was not to the metadata service.
    Passed = 0,
    /// An IPv4 metadata connect redirected to the agent.
    Redirected4 = 1,
    /// An IPv6 (fd00:ec2::254) metadata connect redirected to the agent.
    Redirected6 = 2,
    /// An IPv4-mapped IPv6 metadata connect redirected to the agent's mapped address.
    RedirectedMapped = 3,
    /// A metadata connect from the host network namespace, left alone.
    SkippedHostNetns = 4,
    /// A metadata connect refused because the config is missing or disabled.
    RefusedNoConfig = 5,
    /// An IPv6 metadata connect refused because the agent has no IPv6 address.
    RefusedNoIpv6 = 6,
    /// `getpeername` reported the original metadata address of a redirected socket.
    PeerRestored = 7,
    /// The packet guard dropped an IPv4 packet from a pod addressed to the metadata service.
    GuardDropped4 = 8,
    /// The packet guard dropped an IPv6 packet from a pod addressed to the metadata service.
    GuardDropped6 = 9,
    /// A redirected connection's attestation was recorded under its addresses and ports.
    Attested = 10,
    /// A metadata connect from a hostNetwork pod with its own role, redirected to the agent.
    RedirectedHostPod = 11,
    /// A non-TCP (UDP) connect to the metadata address from a pod, refused: the metadata
    /// service is TCP only.
    RefusedNotTcp = 12,
    /// The egress backstop dropped an IPv4 packet a socket in the cgroup addressed to the
    /// metadata service (DNAT after connect, raw socket, unconnected UDP).
    EgressDropped4 = 13,
    /// The egress backstop dropped such an IPv6 packet.
    EgressDropped6 = 14,
    /// The packet guard dropped a VLAN-tagged frame from a pod (pods send none; stacked tags
    /// would otherwise hide the metadata address), or the node guard a frame with more stacked
    /// tags than it reads.
    GuardDroppedTagged = 15,
    /// The node guard dropped an IPv4 packet that entered the node by an interface other than
    /// a pod's (a tunnel or overlay device after decapsulation, the uplink) addressed to the
    /// metadata service.
    NodeGuardDropped4 = 16,
    /// The node guard dropped such an IPv6 packet.
    NodeGuardDropped6 = 17,
}

impl Counter {
    pub const ALL: [Counter; 18] = [
        Counter::Passed,
        Counter::Redirected4,
        Counter::Redirected6,
        Counter::RedirectedMapped,
        Counter::SkippedHostNetns,
        Counter::RefusedNoConfig,
        Counter::RefusedNoIpv6,
        Counter::PeerRestored,
        Counter::GuardDropped4,
        Counter::GuardDropped6,
        Counter::Attested,
        Counter::RedirectedHostPod,
        Counter::RefusedNotTcp,
        Counter::EgressDropped4,
        Counter::EgressDropped6,
        Counter::GuardDroppedTagged,
        Counter::NodeGuardDropped4,
        Counter::NodeGuardDropped6,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::Redirected4 => "redirected_ipv4",
            Counter::Redirected6 => "redirected_ipv6",
            Counter::RedirectedMapped => "redirected_ipv4_mapped",
            Counter::SkippedHostNetns => "skipped_host_netns",
            Counter::RefusedNoConfig => "refused_no_config",
            Counter::RefusedNoIpv6 => "refused_no_ipv6",
            Counter::PeerRestored => "peer_restored",
            Counter::GuardDropped4 => "guard_dropped_ipv4",
            Counter::GuardDropped6 => "guard_dropped_ipv6",
            Counter::Attested => "attested",
            Counter::RedirectedHostPod => "redirected_host_pod",
            Counter::RefusedNotTcp => "refused_not_tcp",
            Counter::EgressDropped4 => "egress_dropped_ipv4",
            Counter::EgressDropped6 => "egress_dropped_ipv6",
            Counter::GuardDroppedTagged => "guard_dropped_tagged",
            Counter::NodeGuardDropped4 => "node_guard_dropped_ipv4",
            Counter::NodeGuardDropped6 => "node_guard_dropped_ipv6",
        }
    }
}

/// Slots in the counters map; room to add counters without resizing a pinned map.
pub const COUNTER_SLOTS: u32 = 32;

/// What `getpeername` needs to undo a rewrite, keyed by socket cookie. Addresses are stored in
/// the 16-byte `user_ip6` form; for IPv4 sockets the IPv4-mapped form (`ip4_mapped`).
/// `getpeername` restores the original only while the socket's peer is still the rewritten
/// address, so a stale entry (a socket that later connected elsewhere) is never applied.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    /// The address the client asked for, network order words.
    pub orig_addr: [u32; 4],
    /// The address the connect was rewritten to, network order words.
    pub new_addr: [u32; 4],
    /// The port the client asked for, as `user_port`.
    pub orig_port: u32,
    /// The port the connect was rewritten to, as `user_port`.
    pub new_port: u32,
}

const _: () = assert!(core::mem::size_of::<RevNat>() == 40);

/// Capacity of the identity map unless the agent is told otherwise (EKS allows up to 737 pods
/// per node).
pub const DEFAULT_IDENTITY_CAPACITY: u32 = 1024;

/// Field sizes of [`Identity`]: each holds the longest valid value.
pub const NAMESPACE_CAP: usize = 64; // DNS label: 63
pub const POD_NAME_CAP: usize = 256; // DNS subdomain: 253
pub const UID_CAP: usize = 40; // UUID: 36
/// The longest valid role annotation: `arn:aws-us-gov:iam::123456789012:role/` (38) + path
/// (510 without its slashes' leading one, plus the trailing slash) + name (64) = 613.
pub const ROLE_CAP: usize = 640;
pub const EXTERNAL_ID_CAP: usize = 1232; // STS: 1224

/// The pod's role annotation did not fit [`ROLE_CAP`]: no valid role is that long.
pub const IDENTITY_ROLE_OVERSIZE: u16 = 1 << 0;
/// The pod's external-ID annotation did not fit [`EXTERNAL_ID_CAP`].
pub const IDENTITY_EXTERNAL_ID_OVERSIZE: u16 = 1 << 1;

/// Who a pod address belongs to. Written by the agent's pod watch, read by its metadata server
/// on every request; pinned, so a restarted agent knows its pods at once. Strings are UTF-8,
/// `*_len` bytes long, the rest zero. Integers are native order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Identity {
    /// The pod's creationTimestamp in milliseconds since the epoch: of two pods claiming one
    /// address, the newer owns it.
    pub created_ms: u64,
    pub namespace_len: u16,
    pub name_len: u16,
    pub uid_len: u16,
    pub role_len: u16,
    pub external_id_len: u16,
    /// `IDENTITY_*` bits.
    pub flags: u16,
    pub _pad: u32,
    pub namespace: [u8; NAMESPACE_CAP],
    pub name: [u8; POD_NAME_CAP],
    pub uid: [u8; UID_CAP],
    pub role: [u8; ROLE_CAP],
    pub external_id: [u8; EXTERNAL_ID_CAP],
}

const _: () = assert!(
    core::mem::size_of::<Identity>()
        == 24 + NAMESPACE_CAP + POD_NAME_CAP + UID_CAP + ROLE_CAP + EXTERNAL_ID_CAP
);
const _: () = assert!(core::mem::size_of::<Identity>().is_multiple_of(8));

/// Who made a redirected connect, as the kernel saw it. Written by connect4/connect6 under the
/// socket cookie, moved by `sock_ops` under the connection's [`ConnKey`]; a pod cannot choose
/// either value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// The cgroup v2 id of the task that called connect (native order; the inode number of its
    /// cgroup directory).
    pub cgroup_id: u64,
    /// The netns cookie of the connecting socket (native order).
    pub netns_cookie: u64,
    /// The connecting socket's cookie (native order): only that socket's close removes the
    /// entry, whoever else later writes the same addresses and ports.
    pub socket_cookie: u64,
    /// The ids of the task's cgroup ancestors at levels 1..=[`ATTEST_ANCESTORS`] (0 past the
    /// task's own level): a pod's cgroup is found here however deep below it the task sits,
    /// and even after the task's own cgroup is gone.
    pub ancestors: [u64; ATTEST_ANCESTORS],
}

/// Cgroup levels below the root recorded in an [`Attestation`] (kubelet's pod cgroups sit at
/// level 2 or 3 below the cgroup2 root).
pub const ATTEST_ANCESTORS: usize = 8;

const _: () = assert!(core::mem::size_of::<Attestation>() == 24 + 8 * ATTEST_ANCESTORS);

/// A redirected connection as the agent sees it when it accepts: the client's address and port
/// and the agent's. Addresses in the `user_ip6` form (IPv4 mapped, network order words); ports
/// in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub client_addr: [u32; 4],
    pub agent_addr: [u32; 4],
    pub client_port: u32,
    pub agent_port: u32,
}

const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);

/// Capacity of the attestation maps: connections to the agent that are open at once (entries
/// go when the client's socket closes; the LRU evicts the oldest beyond that).
pub const ATTEST_CAPACITY: u32 = 4096;

/// Capacity of the host-pods map: hostNetwork pods with their own role on one node.
pub const HOST_PODS_CAPACITY: u32 = 256;

/// How many cgroup levels below the root the programs look through for a host pod's cgroup
/// (kubelet's deepest: `/kubepods.slice/kubepods-burstable.slice/<pod>.slice/<container>`).
pub const HOST_POD_MAX_DEPTH: i32 = 12;

#[cfg(feature = "user")]
mod user {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::Attestation {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as below; the size assertion above proves there is no implicit padding.
    unsafe impl aya::Pod for super::Identity {}
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding (size assertions above), every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn port_repr_is_big_endian_in_low_half() {
        let repr = port_repr(8181);
        assert_eq!((repr as u16).to_ne_bytes(), 8181u16.to_be_bytes());
        assert_eq!(repr >> 16, 0);
        assert_eq!(port_from_repr(repr), 8181);
    }

    #[test]
    fn ip6_words_round_trip() {
        let octets = [
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
        ];
        assert_eq!(ip6_octets(ip6_words(octets)), octets);
        assert_eq!(ip6_octets(DEFAULT_METADATA_IP6), octets);
    }

    #[test]
    fn mapped_form_matches_std() {
        let v4 = std::net::Ipv4Addr::new(169, 254, 169, 254);
        let mapped = ip4_mapped(u32::from_ne_bytes(v4.octets()));
        assert_eq!(ip6_octets(mapped), v4.to_ipv6_mapped().octets());
    }
}
