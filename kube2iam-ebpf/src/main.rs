//! cgroup sock_addr programs: metadata connects from pods go to the node-local agent.
//!
//! * `connect4` / `connect6`: a connect to the metadata address from a socket outside the host
//!   network namespace is rewritten to the agent's address, or refused when the agent has not
//!   configured (or has disabled) interception. Never let through.
//! * `getpeername4` / `getpeername6`: a redirected socket reports the address it asked for.
//! * `sock_ops`: a redirected socket's attestation (the cgroup and netns that connected) moves
//!   from its socket cookie to its connection's addresses and ports, where the agent reads it
//!   for the connection it accepts; it goes when the socket closes.
//!
//! Byte order: `user_ip4`, the words of `user_ip6` and the low 16 bits of `user_port` hold network
//! order bytes; the config stores them in the same representation, so they are compared as-is.
//! Cookies are native-order u64 values.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock,
        bpf_sock_addr,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_load_bytes_relative,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::debug;
use kube2iam_common::{
    ATTEST_ANCESTORS, ATTEST_CAPACITY, Attestation, CONFIG_KEY, COUNTER_SLOTS, Config, ConnKey,
    Counter, DEFAULT_IDENTITY_CAPACITY, DEFAULT_METADATA_IP4, DEFAULT_METADATA_IP6,
    DEFAULT_METADATA_PORT, FLAG_AGENT_IP6, FLAG_ATTEST_OFF, FLAG_ENABLED, FLAG_HOST_PODS,
    HOST_POD_MAX_DEPTH, HOST_PODS_CAPACITY, Identity, REVNAT_CAPACITY, RevNat, ip4_mapped,
};

/// Return value that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails connect() with EPERM.
const DENY: i32 = 0;

#[map]
static K2I_CONFIG: HashMap<u32, Config> = HashMap::pinned(1, BPF_F_NO_PREALLOC);

#[map]
static K2I_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
static K2I_REVNAT: LruHashMap<u64, RevNat> = LruHashMap::pinned(REVNAT_CAPACITY, 0);

/// Pod address → identity. The programs never read it: it lives here so the agent creates and
/// pins it with the other maps, sized by `--identity-capacity`.
#[map]
static K2I_IDENTITY: HashMap<[u8; 16], Identity> =
    HashMap::pinned(DEFAULT_IDENTITY_CAPACITY, BPF_F_NO_PREALLOC);

/// Socket cookie → who connected; written at a redirected connect, taken by [`k2i_sock_ops`].
#[map]
static K2I_CONNECTING: LruHashMap<u64, Attestation> = LruHashMap::pinned(ATTEST_CAPACITY, 0);

/// Connection → who connected; written by [`k2i_sock_ops`], read by the agent, removed when the
/// client's socket closes.
#[map]
static K2I_ATTEST: LruHashMap<ConnKey, Attestation> = LruHashMap::pinned(ATTEST_CAPACITY, 0);

/// Pod cgroup ids of the hostNetwork pods served their own role; written by the agent.
#[map]
static K2I_HOST_PODS: HashMap<u64, u8> = HashMap::pinned(HOST_PODS_CAPACITY, BPF_F_NO_PREALLOC);

/// Not pinned: written by [`k2i_netns_probe`] for the agent on kernels without SO_NETNS_COOKIE.
#[map]
static K2I_NETNS_PROBE: Array<u64> = Array::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn k2i_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn k2i_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn k2i_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername4(&ctx);
    // getpeername hooks must return 1; they can only rewrite the reported address.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn k2i_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername6(&ctx);
    ALLOW
}

/// Records the caller's netns cookie. The agent attaches it, for one connect, to a private
/// cgroup that holds only its own child process in the host namespace: on 5.7–5.13 kernels,
/// which lack getsockopt(SO_NETNS_COOKIE), that is how it learns the host cookie without
/// trusting anything a pod can touch.
#[cgroup_sock_addr(connect4)]
pub fn k2i_netns_probe(ctx: SockAddrContext) -> i32 {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(slot) = K2I_NETNS_PROBE.get_ptr_mut(0) {
        // SAFETY: a valid map slot; only the probe writes it.
        unsafe { *slot = cookie };
    }
    ALLOW
}

/// What to do with a connect to the metadata address.
enum Verdict<'a> {
    /// The socket lives in the host network namespace: leave it alone.
    Host,
    /// Rewrite to the agent (the config is present and enabled); the socket's netns cookie.
    Redirect(&'a Config, u64),
    /// No usable config: refuse.
    Refuse,
}

/// The config, borrowed from the map for this invocation. Values are read in place rather than
/// copied: a copied `Option<Config>` leaves LLVM free to move uninitialized bytes, which the
/// verifier rejects.
fn config() -> Option<&'static Config> {
    // SAFETY: the map is BPF_F_NO_PREALLOC, so a replaced element is freed only after an RCU
    // grace period, which cannot end while this program runs.
    unsafe { K2I_CONFIG.get(CONFIG_KEY) }
}

fn verdict<'a>(ctx: &SockAddrContext, config: Option<&'a Config>) -> Verdict<'a> {
    // SAFETY: the helper takes the program context; it is valid for the whole invocation.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = match config {
        Some(config) => config.host_netns_cookie,
        // Without a config the host namespace is unknown; only the initial namespace (the
        // host's on a real node, which a NULL context names) keeps its access.
        // SAFETY: the helper accepts a NULL context and then reports init_net's cookie.
        None => unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) },
    };
    if netns == host {
        // A hostNetwork pod with its own role is redirected like any pod; every other host
        // process (kubelet, the CNI daemon, the agent itself) keeps the node's metadata service.
        return match config {
            Some(config)
                if config.flags & (FLAG_ENABLED | FLAG_HOST_PODS)
                    == FLAG_ENABLED | FLAG_HOST_PODS
                    && in_host_pod() =>
            {
                count(Counter::RedirectedHostPod);
                Verdict::Redirect(config, netns)
            }
            _ => Verdict::Host,
        };
    }
    match config {
        Some(config) if config.flags & FLAG_ENABLED != 0 => Verdict::Redirect(config, netns),
        _ => Verdict::Refuse,
    }
}

/// Whether the connecting task is in the cgroup of a hostNetwork pod listed by the agent (the
/// pod's cgroup or any cgroup below it, so containers that come and go are covered).
fn in_host_pod() -> bool {
    for level in 1..=HOST_POD_MAX_DEPTH {
        // SAFETY: the helper takes a level; it returns 0 past the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: only presence is read.
        if unsafe { K2I_HOST_PODS.get(id) }.is_some() {
            return true;
        }
    }
    false
}

/// Records who is connecting under the socket cookie, for [`k2i_sock_ops`].
fn attest(ctx: &SockAddrContext, netns_cookie: u64) {
    // SAFETY: the helpers take the program context, or nothing.
    let (cookie, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    let mut ancestors = [0u64; ATTEST_ANCESTORS];
    let mut level = 0;
    while level < ATTEST_ANCESTORS {
        // SAFETY: the helper takes a level; it returns 0 past the task's own cgroup.
        ancestors[level] = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32 + 1) };
        level += 1;
    }
    let entry = Attestation {
        cgroup_id,
        netns_cookie,
        socket_cookie: cookie,
        ancestors,
    };
    // A failed insert leaves the connection without attestation, which the agent refuses.
    let _ = K2I_CONNECTING.insert(cookie, entry, 0);
}

fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer. Volatile reads keep each access at the
    // 4-byte width the verifier accepts for these fields.
    let (dst_ip, dst_port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let config = config();
    let (metadata_ip, metadata_port) = match config {
        Some(config) => (config.metadata_ip4, config.metadata_port),
        None => (DEFAULT_METADATA_IP4, DEFAULT_METADATA_PORT),
    };
    if dst_ip != metadata_ip || dst_port != metadata_port {
        count(Counter::Passed);
        return ALLOW;
    }
    match verdict(ctx, config) {
        Verdict::Host => {
            count(Counter::SkippedHostNetns);
            ALLOW
        }
        Verdict::Refuse => {
            count(Counter::RefusedNoConfig);
            debug!(
                ctx,
                "kube2iam connect4: refused metadata connect, no config"
            );
            DENY
        }
        Verdict::Redirect(_, _) if !is_tcp(ctx) => {
            count(Counter::RefusedNotTcp);
            DENY
        }
        Verdict::Redirect(config, netns) => {
            if config.flags & FLAG_ATTEST_OFF == 0 {
                attest(ctx, netns);
            }
            remember(
                ctx,
                ip4_mapped(dst_ip),
                dst_port,
                ip4_mapped(config.agent_ip4),
                config.agent_port,
            );
            // SAFETY: connect4 may write these context fields, 4 bytes each.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), config.agent_ip4);
                write_volatile(addr_of_mut!((*sa).user_port), config.agent_port);
            }
            count(Counter::Redirected4);
            debug!(
                ctx,
                "kube2iam connect4: redirected metadata connect to the agent"
            );
            ALLOW
        }
    }
}

fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4; each word of user_ip6 is read at 4 bytes.
    let (dst, dst_port) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let config = config();
    let (metadata_ip6, metadata_ip4, metadata_port) = match config {
        Some(config) => (
            config.metadata_ip6,
            config.metadata_ip4,
            config.metadata_port,
        ),
        None => (
            DEFAULT_METADATA_IP6,
            DEFAULT_METADATA_IP4,
            DEFAULT_METADATA_PORT,
        ),
    };
    if dst_port != metadata_port {
        count(Counter::Passed);
        return ALLOW;
    }
    // A dual-stack socket reaches IPv4 through the mapped form, which connect4 never sees.
    let mapped = dst == ip4_mapped(metadata_ip4);
    if !mapped && dst != metadata_ip6 {
        count(Counter::Passed);
        return ALLOW;
    }
    let config = match verdict(ctx, config) {
        Verdict::Host => {
            count(Counter::SkippedHostNetns);
            return ALLOW;
        }
        Verdict::Refuse => {
            count(Counter::RefusedNoConfig);
            debug!(
                ctx,
                "kube2iam connect6: refused metadata connect, no config"
            );
            return DENY;
        }
        Verdict::Redirect(_, _) if !is_tcp(ctx) => {
            count(Counter::RefusedNotTcp);
            return DENY;
        }
        Verdict::Redirect(config, netns) => {
            if config.flags & FLAG_ATTEST_OFF == 0 {
                attest(ctx, netns);
            }
            config
        }
    };
    let (agent, counter) = if mapped {
        (ip4_mapped(config.agent_ip4), Counter::RedirectedMapped)
    } else if config.flags & FLAG_AGENT_IP6 != 0 {
        (config.agent_ip6, Counter::Redirected6)
    } else {
        count(Counter::RefusedNoIpv6);
        debug!(
            ctx,
            "kube2iam connect6: refused, the agent has no IPv6 address"
        );
        return DENY;
    };
    remember(ctx, dst, dst_port, agent, config.agent_port);
    // SAFETY: connect6 may write these context fields, 4 bytes each.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), agent[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), agent[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), agent[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), agent[3]);
        write_volatile(addr_of_mut!((*sa).user_port), config.agent_port);
    }
    count(counter);
    debug!(
        ctx,
        "kube2iam connect6: redirected metadata connect to the agent"
    );
    ALLOW
}

const SOCK_STREAM: u32 = 1;

/// The metadata service speaks TCP only; a pod's UDP "connect" to it is refused, not redirected.
fn is_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: `type` is read at its 4-byte width.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).type_)) == SOCK_STREAM }
}

/// Records the rewrite under the socket cookie for getpeername.
fn remember(
    ctx: &SockAddrContext,
    orig_addr: [u32; 4],
    orig_port: u32,
    new_addr: [u32; 4],
    new_port: u32,
) {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let entry = RevNat {
        orig_addr,
        new_addr,
        orig_port,
        new_port,
    };
    // An LRU insert only fails under memory pressure; the connect still goes to the agent and
    // getpeername then reports the agent's address, which is honest if less transparent.
    let _ = K2I_REVNAT.insert(cookie, entry, 0);
}

/// The rewrite recorded for this socket, if the socket still talks to the rewritten peer.
fn recorded(ctx: &SockAddrContext, peer: [u32; 4], port: u32) -> Option<RevNat> {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied at once; an LRU element recycled under us could at worst fail the
    // comparison below, which then leaves the address as the kernel reported it.
    let entry = unsafe { K2I_REVNAT.get(cookie) }.copied()?;
    (entry.new_addr == peer && entry.new_port == port).then_some(entry)
}

fn try_getpeername4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: getpeername4 may read and write these fields, 4 bytes each.
    unsafe {
        let peer = read_volatile(addr_of!((*sa).user_ip4));
        let port = read_volatile(addr_of!((*sa).user_port));
        if let Some(entry) = recorded(ctx, ip4_mapped(peer), port) {
            write_volatile(addr_of_mut!((*sa).user_ip4), entry.orig_addr[3]);
            write_volatile(addr_of_mut!((*sa).user_port), entry.orig_port);
            count(Counter::PeerRestored);
        }
    }
}

fn try_getpeername6(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: getpeername6 may read and write these fields, 4 bytes each.
    unsafe {
        let peer = [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ];
        let port = read_volatile(addr_of!((*sa).user_port));
        if let Some(entry) = recorded(ctx, peer, port) {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), entry.orig_addr[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), entry.orig_addr[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), entry.orig_addr[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), entry.orig_addr[3]);
            write_volatile(addr_of_mut!((*sa).user_port), entry.orig_port);
            count(Counter::PeerRestored);
        }
    }
}

#[sock_ops]
pub fn k2i_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    // The reply is ignored for these callbacks.
    1
}

/// This connection's key, as the agent will build it from its accepted socket.
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let ops = ctx.ops;
    // SAFETY: the context fields are read at their 4-byte width. local_port is in host order;
    // remote_port holds the network-order port in its upper 16 bits on little-endian machines
    // (the kernel shifts it there), so it is taken from there and byte-swapped.
    // Every field is read unconditionally, at its own fixed offset: a load whose offset
    // depends on the family is a modified context pointer, which the verifier refuses.
    unsafe {
        let family = read_volatile(addr_of!((*ops).family));
        let local4 = read_volatile(addr_of!((*ops).local_ip4));
        let remote4 = read_volatile(addr_of!((*ops).remote_ip4));
        let local6 = [
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
        ];
        let remote6 = [
            read_volatile(addr_of!((*ops).remote_ip6[0])),
            read_volatile(addr_of!((*ops).remote_ip6[1])),
            read_volatile(addr_of!((*ops).remote_ip6[2])),
            read_volatile(addr_of!((*ops).remote_ip6[3])),
        ];
        let (client_addr, agent_addr) = if family == AF_INET6 {
            (local6, remote6)
        } else {
            (ip4_mapped(local4), ip4_mapped(remote4))
        };
        let remote = read_volatile(addr_of!((*ops).remote_port));
        ConnKey {
            client_addr,
            agent_addr,
            client_port: read_volatile(addr_of!((*ops).local_port)),
            agent_port: u32::from(u16::from_be(remote_port_be(remote))),
        }
    }
}

/// The network-order port in the raw `remote_port` field.
#[inline(always)]
fn remote_port_be(raw: u32) -> u16 {
    if cfg!(target_endian = "little") {
        (raw >> 16) as u16
    } else {
        raw as u16
    }
}

const AF_INET6: u32 = 10;

fn try_sock_ops(ctx: &SockOpsContext) {
    // SAFETY: `op` is read at its 4-byte width.
    let op = unsafe { read_volatile(addr_of!((*ctx.ops).op)) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The source port is chosen now and the SYN not yet sent: the entry exists before the
        // agent can accept the connection.
        // SAFETY: the helper takes the program context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: copied at once.
        let Some(entry) = (unsafe { K2I_CONNECTING.get(cookie) }).copied() else {
            return;
        };
        let _ = K2I_CONNECTING.remove(cookie);
        if K2I_ATTEST.insert(conn_key(ctx), entry, 0).is_ok() {
            count(Counter::Attested);
            // Called back when the socket changes state, to drop the entry when it closes.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // A closed connection's entry never outlives it: a later connection on the same
        // addresses and ports gets its own entry from its own connect, or none. Only the socket
        // that wrote the entry removes it.
        let key = conn_key(ctx);
        // SAFETY: the helper takes the program context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: one field read at once.
        let owner = unsafe { K2I_ATTEST.get(key) }.map(|e| e.socket_cookie);
        if owner == Some(cookie) {
            let _ = K2I_ATTEST.remove(key);
        }
    }
}

/// TC verdicts: TCX_NEXT / TC_ACT_UNSPEC lets the next program (a CNI's) decide; SHOT drops.
const TC_NEXT: i32 = -1;
const TC_DROP: i32 = 2;

/// The packet guard, on the host side of pod interfaces (tc ingress = traffic leaving the pod).
/// A pod's legitimate metadata traffic was already rewritten to the agent at connect(); any
/// packet still addressed to the metadata service got there another way (raw IP, AF_PACKET,
/// unconnected UDP) and is dropped, whatever its protocol or port.
#[classifier]
pub fn k2i_guard(ctx: TcContext) -> i32 {
    match try_guard(&ctx) {
        Some(counter) => {
            count(counter);
            debug!(
                &ctx,
                "kube2iam guard: dropped a packet addressed to the metadata service"
            );
            TC_DROP
        }
        None => TC_NEXT,
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// How many VLAN tags the node guard reads past after the one the kernel took off.
const NODE_GUARD_MAX_TAGS: usize = 8;

/// The node guard, on tc ingress of every other interface of the node but loopback: the uplink,
/// and the tunnel and overlay devices (VXLAN, Geneve, IPIP, GRE, WireGuard) where a packet a pod
/// wrapped and sent to the node's own address comes out again after decapsulation, then to be
/// forwarded to the metadata service. No packet entering the node is addressed to that service
/// legitimately: the node's own traffic to it never enters by a device (its replies come from
/// the service's address, not to it). Unlike the pod guard it lets VLAN-tagged frames through,
/// which uplinks carry: the kernel removes the outer tag before tc ingress runs and runs it
/// again on a VLAN device; the tags after it are read past here (see `try_node_guard`).
#[classifier]
pub fn k2i_node_guard(ctx: TcContext) -> i32 {
    match try_node_guard(&ctx) {
        Some(counter) => {
            count(counter);
            debug!(
                &ctx,
                "kube2iam node guard: dropped a packet entering the node addressed to the metadata service"
            );
            TC_DROP
        }
        None => TC_NEXT,
    }
}

fn try_node_guard(ctx: &TcContext) -> Option<Counter> {
    // The skb's protocol, not the bytes at offset 12: tunnel devices such as IPIP, GRE and
    // WireGuard have no link-layer header, and the packet starts at its IP header there. Loads
    // are relative to the network header for the same reason.
    // SAFETY: the context pointer; protocol is readable at 4 bytes (network order in the low 16).
    let mut proto =
        u16::from_be(unsafe { read_volatile(addr_of!((*ctx.skb.skb).protocol)) } as u16);
    let load = |offset: usize| -> Option<u32> {
        let mut word = 0u32;
        // SAFETY: the context's skb, a 4-byte local buffer of the stated length.
        let ret = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.skb.skb.cast(),
                offset as u32,
                addr_of_mut!(word).cast(),
                4,
                BPF_HDR_START_NET,
            )
        };
        (ret == 0).then_some(word)
    };
    // The kernel takes the outermost VLAN tag off before tc ingress runs; a VLAN ethertype here
    // means more tags follow, and tc does not run again for them: with no VLAN device for the
    // outer tag, a priority tag (VLAN ID 0) is stripped in place and the next one with it, until
    // the IP packet inside goes up the stack on this device. So read past every remaining tag
    // (TCI, then the ethertype inside) whatever its VLAN ID, and drop a frame with more tags
    // than are read here, which no uplink carries.
    let mut offset = 0usize;
    for _ in 0..NODE_GUARD_MAX_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = u32::from_be(load(offset)?) as u16;
        offset += 4;
    }
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Some(Counter::GuardDroppedTagged);
    }
    match metadata_dst(proto, |o| load(offset + o))? {
        Counter::GuardDropped4 => Some(Counter::NodeGuardDropped4),
        _ => Some(Counter::NodeGuardDropped6),
    }
}

/// The drop counter when the frame is addressed to the metadata service.
fn try_guard(ctx: &TcContext) -> Option<Counter> {
    // Ethertype, network order on the wire. Pods never send VLAN-tagged frames on their own
    // interface, and the kernel strips stacked tags (VLAN 0) one after another on the way in:
    // any tagged frame, whether the tag is still in the data or already moved into the skb, is
    // dropped, whatever it carries.
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    // SAFETY: the context pointer; vlan_present is readable at 4 bytes.
    let tag_taken = unsafe { read_volatile(addr_of!((*ctx.skb.skb).vlan_present)) } != 0;
    if tag_taken || proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Some(Counter::GuardDroppedTagged);
    }
    to_metadata(ctx, proto)
}

/// `GuardDropped4`/`GuardDropped6` when the Ethernet frame's IPv4 or IPv6 packet (`proto`, the
/// ethertype) is addressed to the metadata service.
fn to_metadata(ctx: &TcContext, proto: u16) -> Option<Counter> {
    metadata_dst(proto, |offset| ctx.load::<u32>(ETH_HLEN + offset).ok())
}

/// `GuardDropped4`/`GuardDropped6` when the IPv4 or IPv6 packet (`proto`, its ethertype) is
/// addressed to the metadata service (IPv4, IPv6, or IPv4-mapped); `load` reads a network-order
/// word at an offset from the start of the IP header.
#[inline(always)]
fn metadata_dst(proto: u16, load: impl Fn(usize) -> Option<u32>) -> Option<Counter> {
    let config = config();
    match proto {
        ETH_P_IP => {
            // IPv4 destination at offset 16 of the header, network order (compared as read).
            let dst = load(16)?;
            let metadata = config.map_or(DEFAULT_METADATA_IP4, |c| c.metadata_ip4);
            (dst == metadata).then_some(Counter::GuardDropped4)
        }
        ETH_P_IPV6 => {
            // IPv6 destination at offset 24, four network-order words.
            let dst = [load(24)?, load(28)?, load(32)?, load(36)?];
            let metadata = config.map_or(DEFAULT_METADATA_IP6, |c| c.metadata_ip6);
            let mapped = ip4_mapped(config.map_or(DEFAULT_METADATA_IP4, |c| c.metadata_ip4));
            (dst == metadata || dst == mapped).then_some(Counter::GuardDropped6)
        }
        _ => None,
    }
}

fn count(counter: Counter) {
    if let Some(slot) = K2I_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the programs contain no panicking paths the verifier would accept; this handler
    // only satisfies no_std linking.
    unsafe { core::hint::unreachable_unchecked() }
}

// The egress backstop: cgroup_skb/egress on the intercepted cgroup.

/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;
const IPPROTO_TCP: u32 = 6;

/// The backstop that does not depend on interface names. It sees every packet a socket in the
/// cgroup sends, after the nat table (a DNAT in the OUTPUT chain has already changed the
/// destination) and whatever interface it leaves by. A packet addressed to the metadata service
/// passes only if it belongs to a TCP socket that connected to exactly the metadata address and
/// port: the connect hooks let such a connect through unchanged only for sockets in the host
/// network namespace, and rewrite or refuse it everywhere else. Everything else to the metadata
/// address is dropped: a connect to another address that a DNAT rule then sent there, raw
/// sockets, unconnected UDP, ICMP. Only a service on the namespace's own metadata address
/// answering a local client ([`local_reply`]) is let through as well.
#[cgroup_skb(egress)]
pub fn k2i_egress(ctx: SkBuffContext) -> i32 {
    match try_egress(&ctx) {
        Some(counter) => {
            count(counter);
            debug!(
                &ctx,
                "kube2iam egress: dropped a socket packet addressed to the metadata service"
            );
            SKB_DROP
        }
        None => SKB_PASS,
    }
}

/// The drop counter when the packet is addressed to the metadata service and its socket did not
/// connect there.
fn try_egress(ctx: &SkBuffContext) -> Option<Counter> {
    // The data starts at the network header; the version is the high nibble of its first byte.
    let version = ctx.load::<u8>(0).ok()? >> 4;
    let config = config();
    let port = config.map_or(DEFAULT_METADATA_PORT, |c| c.metadata_port);
    match version {
        4 => {
            // Destination at offset 16, network order (compared as read).
            let dst: u32 = ctx.load(16).ok()?;
            let metadata = config.map_or(DEFAULT_METADATA_IP4, |c| c.metadata_ip4);
            if dst != metadata {
                return None;
            }
            // Source at offset 12, network order.
            if local_reply(ctx, ctx.load::<u32>(12).ok()? == metadata) {
                return None;
            }
            match connected_sock(ctx) {
                // SAFETY: a full socket from bpf_sk_fullsock; dst_ip4 is readable at 4 bytes.
                Some(sk)
                    if unsafe { read_volatile(addr_of!((*sk).dst_ip4)) } == metadata
                        && sock_port(sk) == port =>
                {
                    None
                }
                _ => Some(Counter::EgressDropped4),
            }
        }
        6 => {
            // Destination at offset 24, four network-order words.
            let dst = [
                ctx.load::<u32>(24).ok()?,
                ctx.load::<u32>(28).ok()?,
                ctx.load::<u32>(32).ok()?,
                ctx.load::<u32>(36).ok()?,
            ];
            let metadata = config.map_or(DEFAULT_METADATA_IP6, |c| c.metadata_ip6);
            if dst != metadata {
                return None;
            }
            // Source at offset 8, four network-order words.
            let src = [
                ctx.load::<u32>(8).ok()?,
                ctx.load::<u32>(12).ok()?,
                ctx.load::<u32>(16).ok()?,
                ctx.load::<u32>(20).ok()?,
            ];
            if local_reply(ctx, src == metadata) {
                return None;
            }
            match connected_sock(ctx) {
                Some(sk) if sock_dst6(sk) == metadata && sock_port(sk) == port => None,
                _ => Some(Counter::EgressDropped6),
            }
        }
        _ => None,
    }
}

/// `ifindex` of the loopback device, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// A packet from the metadata address to the metadata address that leaves through the loopback
/// device: a service on this namespace's own metadata address (an emulator, a local proxy)
/// answering a local client. It never leaves the namespace, so it cannot reach the node's
/// metadata service; anything a pod sends towards that service leaves by another device, or
/// carries another source address.
fn local_reply(ctx: &SkBuffContext, from_metadata: bool) -> bool {
    // SAFETY: the context pointer; ifindex (the output device's) is readable at 4 bytes.
    from_metadata && unsafe { read_volatile(addr_of!((*ctx.skb.skb).ifindex)) } == LOOPBACK_IFINDEX
}

/// The packet's socket when it is a full TCP socket (the only kind whose destination went
/// through the connect hooks).
fn connected_sock(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: `sk` of the context is a socket pointer or NULL (the verifier's
    // PTR_TO_SOCK_COMMON_OR_NULL), read at its full 8 bytes.
    let sk = unsafe { read_volatile(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper takes a socket pointer and returns a full socket or NULL.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: a full socket; protocol is readable at 4 bytes.
    (unsafe { read_volatile(addr_of!((*full).protocol)) } == IPPROTO_TCP).then_some(full)
}

/// The socket's destination port as `user_port` holds it (big-endian u16 in the low 16 bits). A
/// 4-byte load of `dst_port` is valid on every kernel (5.18 narrowed the field to 16 bits and
/// kept the wide load, with zero upper bits).
fn sock_port(sk: *mut bpf_sock) -> u32 {
    // SAFETY: a full socket; dst_port read at 4 bytes, as above.
    unsafe { read_volatile(addr_of!((*sk).dst_port).cast::<u32>()) & 0xffff }
}

/// The socket's IPv6 destination, four network-order words.
fn sock_dst6(sk: *mut bpf_sock) -> [u32; 4] {
    // SAFETY: a full socket; each word of dst_ip6 is readable at 4 bytes.
    unsafe {
        [
            read_volatile(addr_of!((*sk).dst_ip6[0])),
            read_volatile(addr_of!((*sk).dst_ip6[1])),
            read_volatile(addr_of!((*sk).dst_ip6[2])),
            read_volatile(addr_of!((*sk).dst_ip6[3])),
        ]
    }
}
