//! End-to-end interception: the real agent attaches the programs to a test node's cgroup and pods
//! connect to the metadata address. The agent stand-in answers at the node's host IP; the IMDS
//! stand-in plays the node's real metadata service, and every test asserts that no pod reached
//! it, except where a miss is the point of the test.
//!
//! Needs root and the agent binary (`cargo build -p kube2iam-agent`; `cargo xtask test` builds
//! it).

use std::{
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use kube2iam_common::{Counter, programs};
use kube2iam_tests::{
    AGENT_PORT, Agent, AgentOptions, AgentStub, CgroupDriver, HOST_IP4, ImdsStub, Pod, ProbeResult,
    TestNode,
    bpf::{self, AttachType, CgroupLink},
    kube_api, maps, metadata_addr_mapped, metadata_addr4, metadata_addr6,
    probe::{self, HeldProbe},
    process::{netns_cookie, output_within},
    run_uninstall,
};

const PROBE: &str = env!("CARGO_BIN_EXE_k2i-probe");
const METADATA_URL: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
const LINKS: [&str; 5] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCK_OPS,
];

/// Runs k2i-probe (already placed in a pod, the node or elsewhere) against `addr`.
fn probe(command: Command, addr: SocketAddr, extra: &[&str]) -> ProbeResult {
    let addr = addr.to_string();
    let mut args = vec!["--addr", addr.as_str()];
    args.extend_from_slice(extra);
    probe::run(command, &args)
}

/// A pod's probe to `addr`, as a pod process (in the test cgroup).
fn pod_probe(pod: &Pod<'_>, addr: SocketAddr, extra: &[&str]) -> ProbeResult {
    probe(pod.command(PROBE), addr, extra)
}

/// Asserts the probe was answered by the agent stand-in, which saw `source`.
fn assert_redirected(result: &ProbeResult, source: IpAddr, what: &str) {
    assert!(
        result.ok && result.reached_agent_stub(),
        "{what}: expected the agent stand-in to answer, got {result:?}"
    );
    assert_eq!(
        result.seen_as(),
        Some(source),
        "{what}: the agent stand-in should see the pod's own address; got {result:?}"
    );
}

/// Asserts the connect failed with `errno`.
fn assert_failed_with(result: &ProbeResult, errno: i32, what: &str) {
    assert!(
        !result.ok && result.errno == Some(errno),
        "{what}: expected errno {errno} ({}), got {result:?}",
        std::io::Error::from_raw_os_error(errno)
    );
}

fn link_path(node: &TestNode, program: &str) -> PathBuf {
    node.pin_path().join("links").join(program)
}

fn link_ids(node: &TestNode) -> Vec<(String, u32)> {
    LINKS
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                bpf::pinned_link_info(&link_path(node, name)).id,
            )
        })
        .collect()
}

#[test]
fn pod_metadata_request_reaches_the_agent_which_sees_the_pod_ip() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start(&node);

    let output = output_within(
        pod.command("curl").args(["-s", "-m", "5", METADATA_URL]),
        Duration::from_secs(20),
        "curl",
    );
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl {METADATA_URL} from the pod failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        body,
        format!("agent-stub peer={}", pod.ip4()),
        "the pod's metadata request should reach the agent, which sees the pod's IP"
    );
    assert_eq!(stub.peer_ips(), vec![IpAddr::V4(pod.ip4())]);
    assert!(
        imds.callers().is_empty(),
        "the IMDS stand-in must see nothing; it saw {:?}",
        imds.callers()
    );
    assert_eq!(maps::counter(&node.pin_path(), Counter::Redirected4), 1);
}

#[test]
fn host_netns_process_in_the_cgroup_is_not_rewritten() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start(&node);

    let host = probe(node.command_in_cgroup(PROBE), metadata_addr4(), &[]);
    assert!(
        host.ok && host.reached_imds_stub(),
        "a host-netns process must reach the metadata service directly: {host:?}"
    );
    assert_eq!(
        maps::counter(&node.pin_path(), Counter::SkippedHostNetns),
        1,
        "the program saw the host connect and skipped it on purpose"
    );
    // The same request from a pod in the same cgroup is redirected.
    let from_pod = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(
        &from_pod,
        IpAddr::V4(pod.ip4()),
        "pod beside the host process",
    );
    assert_eq!(
        imds.callers().len(),
        1,
        "only the host process reached IMDS"
    );
    imds.assert_no_pod_seen(&[&pod]);
    assert_eq!(stub.connections(), 1);
}

#[test]
fn pod_process_outside_the_cgroup_is_not_rewritten() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start(&node);

    let outside = probe(pod.command_outside_cgroup(PROBE), metadata_addr4(), &[]);
    assert!(
        outside.ok && outside.reached_imds_stub(),
        "a pod process outside the test cgroup is not intercepted and reaches IMDS: {outside:?}"
    );
    assert!(
        imds.saw(IpAddr::V4(pod.ip4())),
        "the IMDS stand-in must record the miss (it saw {:?}); otherwise the leak checks of \
         the other tests prove nothing",
        imds.callers()
    );
    assert_eq!(stub.connections(), 0);
}

#[test]
fn dual_stack_socket_to_the_ipv4_mapped_metadata_address_is_rewritten() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start(&node);

    let result = pod_probe(&pod, metadata_addr_mapped(), &["--socket", "inet6"]);
    assert_redirected(
        &result,
        IpAddr::V4(pod.ip4()),
        "AF_INET6 to ::ffff:169.254.169.254",
    );
    assert_eq!(stub.connections(), 1);
    assert_eq!(
        maps::counter(&node.pin_path(), Counter::RedirectedMapped),
        1
    );
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn ipv6_metadata_connect_is_rewritten_when_the_agent_has_an_ipv6_address() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start_with(&node, &AgentOptions::with_ipv6());

    let result = pod_probe(&pod, metadata_addr6(), &[]);
    assert_redirected(&result, IpAddr::V6(pod.ip6()), "[fd00:ec2::254]:80");
    assert_eq!(stub.connections(), 1);
    assert_eq!(maps::counter(&node.pin_path(), Counter::Redirected6), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn ipv6_metadata_connect_is_refused_when_the_agent_has_no_ipv6_address() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start(&node);

    let result = pod_probe(&pod, metadata_addr6(), &[]);
    assert_failed_with(
        &result,
        libc::EPERM,
        "[fd00:ec2::254]:80 without --host-ipv6",
    );
    assert_eq!(stub.connections(), 0);
    assert_eq!(maps::counter(&node.pin_path(), Counter::RefusedNoIpv6), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn tcp_fast_open_metadata_connects_are_rewritten_or_refused() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start_with(&node, &AgentOptions::with_ipv6());

    let cases: [(&str, SocketAddr, &[&str], IpAddr); 3] = [
        (
            "IPv4 socket, MSG_FASTOPEN to 169.254.169.254:80",
            metadata_addr4(),
            &["--fastopen"],
            IpAddr::V4(pod.ip4()),
        ),
        (
            "IPv6 socket, MSG_FASTOPEN to [fd00:ec2::254]:80",
            metadata_addr6(),
            &["--fastopen"],
            IpAddr::V6(pod.ip6()),
        ),
        (
            "IPv6 socket, MSG_FASTOPEN to [::ffff:169.254.169.254]:80",
            metadata_addr_mapped(),
            &["--fastopen", "--socket", "inet6"],
            IpAddr::V4(pod.ip4()),
        ),
    ];
    let mut redirected = 0;
    for (what, addr, extra, source) in cases {
        let result = pod_probe(&pod, addr, extra);
        if result.ok {
            assert_redirected(&result, source, what);
            redirected += 1;
        } else {
            assert_failed_with(&result, libc::EPERM, what);
        }
        imds.assert_no_pod_seen(&[&pod]);
    }
    assert_eq!(stub.connections(), redirected);
}

#[test]
fn getpeername_on_a_redirected_socket_reports_the_metadata_address() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start_with(&node, &AgentOptions::with_ipv6());

    let cases: [(SocketAddr, &[&str], IpAddr, &str); 3] = [
        (
            metadata_addr4(),
            &[],
            IpAddr::V4(pod.ip4()),
            "169.254.169.254:80",
        ),
        (
            metadata_addr6(),
            &[],
            IpAddr::V6(pod.ip6()),
            "[fd00:ec2::254]:80",
        ),
        (
            metadata_addr_mapped(),
            &["--socket", "inet6"],
            IpAddr::V4(pod.ip4()),
            "[::ffff:169.254.169.254]:80",
        ),
    ];
    for (addr, extra, source, peer) in cases {
        let result = pod_probe(&pod, addr, extra);
        assert_redirected(&result, source, &format!("connect to {addr}"));
        assert_eq!(
            result.peer.as_deref(),
            Some(peer),
            "getpeername on the redirected socket should report the address the pod asked for"
        );
    }
    assert_eq!(stub.connections(), 3);
    assert!(maps::counter(&node.pin_path(), Counter::PeerRestored) >= 3);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn missing_config_refuses_pod_metadata_connects() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = Agent::start_with(&node, &AgentOptions::with_ipv6());

    assert!(
        maps::read_config(&node.pin_path()).is_some(),
        "the agent should have written its config"
    );
    maps::delete_config(&node.pin_path());
    for (addr, extra) in [
        (metadata_addr4(), &[][..]),
        (metadata_addr6(), &[][..]),
        (metadata_addr_mapped(), &["--socket", "inet6"][..]),
    ] {
        let result = pod_probe(&pod, addr, extra);
        assert_failed_with(&result, libc::EPERM, &format!("{addr} with no config"));
    }
    assert_eq!(maps::counter(&node.pin_path(), Counter::RefusedNoConfig), 3);
    assert_eq!(stub.connections(), 0);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn agent_exits_on_sigterm_and_leaves_interception_in_place() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let mut agent = Agent::start(&node);
    let before = link_ids(&node);

    // SIGTERM right after the ready line: the agent must already be handling it.
    let status = agent.terminate();
    assert!(
        status.success(),
        "the agent should exit cleanly on SIGTERM sent right after it logged `interception \
         active`, got {status}{}:\n{}",
        if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGTERM) {
            " (the default action killed it: its SIGTERM handler was not installed yet when it \
             logged the ready line)"
        } else {
            ""
        },
        agent.log()
    );
    assert_eq!(link_ids(&node), before, "the pinned links stay");
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "after the agent exited");
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn killed_agent_fails_closed_and_a_restarted_agent_adopts_the_pinned_links() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let mut stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let options = AgentOptions::with_ipv6();
    let mut agent = Agent::start_with(&node, &options);
    let before = link_ids(&node);

    agent.kill9();
    stub.stop();
    for (addr, extra) in [
        (metadata_addr4(), &[][..]),
        (metadata_addr6(), &[][..]),
        (metadata_addr_mapped(), &["--socket", "inet6"][..]),
    ] {
        let result = pod_probe(&pod, addr, extra);
        assert_failed_with(
            &result,
            libc::ECONNREFUSED,
            &format!("{addr} while the agent is dead: connection refused at the agent address"),
        );
        imds.assert_no_pod_seen(&[&pod]);
    }

    stub.restart();
    let _agent = Agent::start_with(&node, &options);
    assert_eq!(
        link_ids(&node),
        before,
        "the restarted agent should adopt the pinned links, not replace them"
    );
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "after the restart");
    let result = pod_probe(&pod, metadata_addr6(), &[]);
    assert_redirected(&result, IpAddr::V6(pod.ip6()), "IPv6 after the restart");
    assert_eq!(stub.connections(), 2);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn uninstall_removes_every_pin_and_detaches_every_program() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let mut agent = Agent::start(&node);
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "before uninstall");
    imds.assert_no_pod_seen(&[&pod]);
    agent.kill9();

    let cgroup = node.open_cgroup();
    for attach in AttachType::ALL {
        let ids = bpf::prog_query(cgroup.as_fd(), attach).expect("BPF_PROG_QUERY");
        assert_eq!(ids.len(), 1, "{attach:?} should have our program: {ids:?}");
    }
    let output = run_uninstall(&node, &node.pin_path());
    assert!(
        output.status.success(),
        "kube2iam-agent uninstall failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let pin_path = node.pin_path();
    let left: Vec<_> = std::fs::read_dir(&pin_path)
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "uninstall should leave no pin under {}; left {left:?}",
        pin_path.display()
    );
    for attach in AttachType::ALL {
        let ids = bpf::prog_query(cgroup.as_fd(), attach).expect("BPF_PROG_QUERY");
        assert!(
            ids.is_empty(),
            "after uninstall no {attach:?} program may stay attached; found {ids:?}"
        );
    }
    // Nothing intercepts any more: the pod now reaches the metadata service itself.
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert!(
        result.reached_imds_stub(),
        "with nothing attached the pod reaches IMDS: {result:?}"
    );
    assert_eq!(stub.connections(), 1);
}

#[test]
fn restarted_agent_replaces_a_changed_program_through_the_same_link() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let mut agent = Agent::start(&node);
    let connect4 = link_path(&node, programs::CONNECT4);
    let original = bpf::pinned_link_info(&connect4);
    let original_tag = bpf::prog_info_by_id(original.prog_id).tag;
    agent.kill9();

    // An older agent's program under the same link.
    let old = bpf::load_allow_all(AttachType::Inet4Connect);
    bpf::swap_pinned_link_prog(&connect4, old.as_fd());
    let swapped = bpf::pinned_link_info(&connect4);
    assert_eq!(swapped.id, original.id);
    assert_ne!(
        bpf::prog_info_by_id(swapped.prog_id).tag,
        original_tag,
        "the swap should have changed the program"
    );

    let _agent = Agent::start(&node);
    let restored = bpf::pinned_link_info(&connect4);
    assert_eq!(
        restored.id, original.id,
        "the program must be replaced through the existing link (no detach window)"
    );
    assert_eq!(
        bpf::prog_info_by_id(restored.prog_id).tag,
        original_tag,
        "the link should run the agent's program again"
    );
    let cgroup = node.open_cgroup();
    let attached = bpf::prog_query(cgroup.as_fd(), AttachType::Inet4Connect).unwrap();
    assert_eq!(
        attached,
        vec![restored.prog_id],
        "exactly one connect4 program"
    );
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "after the replacement");
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn unrelated_connect4_program_keeps_working_beside_the_agent() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let other_service = AgentStub::start_on(&node, 7778);
    let pod = node.add_pod("a");
    // Installed first, as a CNI's socket load balancer would be.
    let other = CgroupLink::attach(
        bpf::load_port_rewrite_connect4(7777, 7778),
        node.cgroup_path(),
        AttachType::Inet4Connect,
    );
    let _agent = Agent::start(&node);

    let cgroup = node.open_cgroup();
    let attached = bpf::prog_query(cgroup.as_fd(), AttachType::Inet4Connect).unwrap();
    assert_eq!(
        attached.len(),
        2,
        "both connect4 programs should be attached: {attached:?}"
    );
    assert!(attached.contains(&other.info().prog_id));

    let result = pod_probe(&pod, SocketAddr::new(IpAddr::V4(HOST_IP4), 7777), &[]);
    assert!(
        result.ok && result.reached_agent_stub(),
        "a connect to :7777 should land on the :7778 listener: {result:?}"
    );
    assert_eq!(other_service.connections(), 1);
    assert_eq!(result.peer.as_deref(), Some("192.0.2.10:7778"));

    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(
        &result,
        IpAddr::V4(pod.ip4()),
        "metadata beside the other program",
    );
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn kernel_debug_events_are_removed_by_the_verifier_unless_the_log_level_is_debug() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let connect4 = link_path(&node, programs::CONNECT4);

    let mut agent = Agent::start(&node);
    let quiet = bpf::pinned_link_info(&connect4);
    let quiet_prog = bpf::prog_info_by_id(quiet.prog_id);
    agent.terminate();

    let debug = AgentOptions {
        extra_args: vec!["--log-level".into(), "debug".into()],
        ..AgentOptions::default()
    };
    let agent = Agent::start_with(&node, &debug);
    let loud = bpf::pinned_link_info(&connect4);
    let loud_prog = bpf::prog_info_by_id(loud.prog_id);
    assert_eq!(
        loud.id, quiet.id,
        "the level change must go through the same link"
    );
    assert_ne!(
        loud.prog_id, quiet.prog_id,
        "a new log level must replace the program"
    );
    assert_eq!(
        loud_prog.tag, quiet_prog.tag,
        "same code; only the read-only log level differs"
    );
    assert!(
        quiet_prog.xlated_len < loud_prog.xlated_len,
        "with the level off the verifier must drop the debug events: {} bytes at info, {} at \
         debug",
        quiet_prog.xlated_len,
        loud_prog.xlated_len
    );

    eprintln!(
        "connect4 after verification: {} bytes at info, {} bytes at debug",
        quiet_prog.xlated_len, loud_prog.xlated_len
    );

    // At debug the events arrive in the agent's log.
    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(
        &result,
        IpAddr::V4(pod.ip4()),
        "with kernel debug events on",
    );
    agent.wait_for_line(
        "redirected metadata connect to the agent",
        Duration::from_secs(10),
    );
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

/// The netns cookie of the node namespace, read the way the agent reads its own.
fn node_netns_cookie(node: &TestNode) -> u64 {
    let netns = node.netns_path();
    std::thread::spawn(move || {
        kube2iam_tests::process::enter_netns_on_this_thread(&netns).expect("setns into the node");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket in the node");
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid socket, output buffer of `len` bytes; 71 = SO_NETNS_COOKIE.
        let ret = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                71,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(
            ret,
            0,
            "SO_NETNS_COOKIE: {}",
            std::io::Error::last_os_error()
        );
        cookie
    })
    .join()
    .expect("cookie thread")
}

#[test]
fn probe_program_learns_the_host_netns_cookie_without_so_netns_cookie() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let options = AgentOptions {
        extra_args: vec!["--host-netns-cookie-source".into(), "probe".into()],
        ..AgentOptions::default()
    };
    let agent = Agent::start_with(&node, &options);
    assert!(
        agent
            .log()
            .contains("learned the host netns cookie with the probe program"),
        "the agent should have used the probe:\n{}",
        agent.log()
    );
    let config = maps::read_config(&node.pin_path()).expect("config written");
    assert_eq!(
        config.host_netns_cookie,
        node_netns_cookie(&node),
        "the probe must find the node's own namespace"
    );
    // The probe's private cgroup is gone again.
    let children: Vec<_> = std::fs::read_dir(node.cgroup_path())
        .expect("list the test cgroup")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(
        children.is_empty(),
        "probe cgroup left behind: {children:?}"
    );

    let result = pod_probe(&pod, metadata_addr4(), &[]);
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "with the probed cookie");
    let host = probe(node.command_in_cgroup(PROBE), metadata_addr4(), &[]);
    assert!(
        host.reached_imds_stub(),
        "the node itself keeps direct access: {host:?}"
    );
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

/// Waits until the agent stand-in has accepted a connection from `client`.
fn wait_accepted(stub: &AgentStub, client: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stub.peers().contains(&client) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent stand-in never accepted {client}; it saw {:?}",
            stub.peers()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_kernel_records_the_connecting_cgroup_for_exactly_that_connection_until_it_closes() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let laid = pod.use_kubelet_cgroup(CgroupDriver::Systemd, &kube_api::new_uid());
    let _agent = Agent::start(&node);
    let pin = node.pin_path();
    let agent_addr = SocketAddr::new(IpAddr::V4(HOST_IP4), AGENT_PORT);
    let container_id = std::fs::metadata(&laid.container)
        .unwrap_or_else(|e| panic!("stat {}: {e}", laid.container.display()))
        .ino();
    let pod_cookie = netns_cookie(&pod.netns_path()).expect("the pod's netns cookie");
    let node_cookie = netns_cookie(&node.netns_path()).expect("the node's netns cookie");
    assert_ne!(pod_cookie, node_cookie);

    // A redirected connect, held open while the map is read.
    let held = HeldProbe::start(
        pod.command(PROBE),
        &["--addr", &metadata_addr4().to_string()],
    );
    let client = held.local;
    assert_eq!(
        client.ip(),
        IpAddr::V4(pod.ip4()),
        "the probe's own address"
    );
    wait_accepted(&stub, client);
    let record = maps::attestation(&pin, client, agent_addr).unwrap_or_else(|| {
        panic!(
            "no record for {client} → {agent_addr}; the map holds {:?}",
            maps::attestations(&pin)
        )
    });
    assert_eq!(
        record.cgroup_id,
        container_id,
        "the record names the container cgroup {}",
        laid.container.display()
    );
    assert_eq!(
        record.netns_cookie, pod_cookie,
        "and the pod's network namespace"
    );
    let from_pod: Vec<_> = maps::attestations(&pin)
        .into_iter()
        .filter(|((c, _), _)| c.ip() == IpAddr::V4(pod.ip4()))
        .collect();
    assert_eq!(
        from_pod,
        vec![((client, agent_addr), record)],
        "exactly one record from the pod, for exactly this connection"
    );
    assert_eq!(maps::counter(&pin, Counter::Attested), 1);
    let result = held.finish();
    assert_redirected(&result, IpAddr::V4(pod.ip4()), "the held connect");

    // Closed: the record goes with the connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while maps::attestation(&pin, client, agent_addr).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the record for {client} outlived its connection: {:?}",
            maps::attestations(&pin)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Straight to the agent's address, not through the redirect: no record.
    let direct = HeldProbe::start(pod.command(PROBE), &["--addr", &agent_addr.to_string()]);
    wait_accepted(&stub, direct.local);
    assert_eq!(
        maps::attestation(&pin, direct.local, agent_addr),
        None,
        "a connect that was not redirected has no record"
    );
    assert!(
        maps::attestations(&pin).is_empty(),
        "nothing else is recorded either: {:?}",
        maps::attestations(&pin)
    );
    let result = direct.finish();
    assert!(result.reached_agent_stub(), "{result:?}");
    assert_eq!(maps::counter(&pin, Counter::Attested), 1);
    imds.assert_no_pod_seen(&[&pod]);
}
