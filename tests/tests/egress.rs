//! The egress backstop (`k2i_egress`, cgroup_skb/egress on the cgroup the connect hooks are
//! attached to): it does not depend on interface names, so every test here turns the tc packet
//! guard off. The node models EC2: the metadata service behind the node's uplink, so what a pod
//! sends to it is forwarded, and the emulator records every caller.
//!
//! A pod with CAP_NET_ADMIN that DNATs another address to the metadata service, or that sends
//! raw IP or UDP to it, reaches nothing; the node's own sockets still reach it, and pods'
//! ordinary metadata connects still go to the agent. With `--egress-guard false` the same
//! packets arrive, which proves the tests see the bypass.

use std::{net::IpAddr, os::fd::AsFd as _, process::Output, time::Duration};

use kube2iam_common::{Counter, programs};
use kube2iam_tests::{
    Agent, AgentOptions, AgentStub, ChildGuard, ImdsEmulator, NODE_ACCESS_KEY_ID, Pod, TestNode,
    bpf::{self, AttachType},
    maps,
    node::UPLINK_NODE4,
    packets::{PacketWatch, WATCH_PORT},
    process::output_within,
    run_uninstall,
};

const RAW: &str = env!("CARGO_BIN_EXE_k2i-raw");
const NODE_ROLE_PATH: &str = "/latest/meta-data/iam/security-credentials/node-role";
/// The addresses a pod DNATs to the metadata service (documentation ranges, routed via the
/// pod's default gateway).
const DNAT_FROM4: &str = "192.0.2.1";
const DNAT_FROM6: &str = "fd00:ee::1";

fn agent(node: &TestNode, egress_guard: bool) -> Agent {
    Agent::start_with(node, &options(egress_guard))
}

fn options(egress_guard: bool) -> AgentOptions {
    AgentOptions {
        host_ipv6: true,
        extra_args: vec![
            "--packet-guard".into(),
            "false".into(),
            "--node-guard".into(),
            "false".into(),
            "--egress-guard".into(),
            egress_guard.to_string().into(),
        ],
        ..AgentOptions::default()
    }
}

fn run(command: &mut std::process::Command, what: &str) -> Output {
    output_within(command, Duration::from_secs(20), what)
}

/// What the issue describes: inside its own network namespace the pod (root, so with
/// CAP_NET_ADMIN there) rewrites connects to an innocent address into the metadata address.
fn dnat_to_metadata(pod: &Pod<'_>) {
    for (tool, from, to) in [
        ("iptables", DNAT_FROM4, "169.254.169.254:80"),
        ("ip6tables", DNAT_FROM6, "[fd00:ec2::254]:80"),
    ] {
        let output = run(
            pod.command(tool).args([
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                from,
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                to,
            ]),
            tool,
        );
        assert!(
            output.status.success(),
            "{tool} in the pod failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// curl from the pod to `host` (an address or a bracketed IPv6 address): its stdout.
fn pod_curl(pod: &Pod<'_>, host: &str, path: &str) -> String {
    let output = run(
        pod.command("curl")
            .args(["-s", "-g", "-m", "3", &format!("http://{host}{path}")]),
        "curl",
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn dropped(node: &TestNode) -> (u64, u64) {
    (
        maps::counter(&node.pin_path(), Counter::EgressDropped4),
        maps::counter(&node.pin_path(), Counter::EgressDropped6),
    )
}

#[test]
fn a_pod_dnat_to_the_metadata_address_reaches_nothing_with_the_packet_guard_off() {
    let node = TestNode::with_uplink();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);
    dnat_to_metadata(&pod);

    let v4 = pod_curl(&pod, DNAT_FROM4, NODE_ROLE_PATH);
    let v6 = pod_curl(&pod, &format!("[{DNAT_FROM6}]"), NODE_ROLE_PATH);
    for body in [&v4, &v6] {
        assert!(
            !body.contains(NODE_ACCESS_KEY_ID),
            "LEAK: the pod got the node's credentials through its DNAT rule: {body}"
        );
    }
    imds.assert_no_pod_seen(&[&pod]);
    let (dropped4, dropped6) = dropped(&node);
    assert!(dropped4 >= 1, "the IPv4 SYN is counted: {dropped4}");
    assert!(dropped6 >= 1, "the IPv6 SYN is counted: {dropped6}");
}

#[test]
fn without_the_egress_guard_the_same_dnat_gets_the_node_credentials() {
    // The bypass the backstop closes: connect4 sees 192.0.2.1 and lets it pass, the nat table
    // then sends the packet to the metadata service, which answers with the node's role.
    let node = TestNode::with_uplink();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, false);
    dnat_to_metadata(&pod);

    let v4 = pod_curl(&pod, DNAT_FROM4, NODE_ROLE_PATH);
    assert!(
        v4.contains(NODE_ACCESS_KEY_ID),
        "without the backstop the DNAT must reach the metadata service, or these tests prove \
         nothing: {v4:?}"
    );
    let v6 = pod_curl(&pod, &format!("[{DNAT_FROM6}]"), NODE_ROLE_PATH);
    assert!(v6.contains(NODE_ACCESS_KEY_ID), "IPv6: {v6:?}");
    assert!(imds.saw(IpAddr::V4(pod.ip4())) && imds.saw(IpAddr::V6(pod.ip6())));
    assert_eq!(dropped(&node), (0, 0));
}

/// Sends a raw-socket TCP SYN and UDP datagrams (IPv4 and IPv6) from the pod to the metadata
/// addresses; every send must succeed locally (the drop happens on the way out).
fn send_raw(pod: &Pod<'_>) {
    let src = pod.ip4().to_string();
    let port = WATCH_PORT.to_string();
    let runs: [Vec<&str>; 3] = [
        vec!["syn", &src, "169.254.169.254", &port],
        vec!["udp", "169.254.169.254", &port],
        vec!["udp", "fd00:ec2::254", &port],
    ];
    for args in runs {
        let output = run(pod.command(RAW).args(&args), "k2i-raw");
        let stdout = String::from_utf8_lossy(&output.stdout);
        // A dropped UDP send may report EPERM; a raw SYN's send always completes.
        assert!(
            stdout.contains("\"ok\":true") || stdout.contains("Operation not permitted"),
            "k2i-raw {args:?}: {stdout}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn raw_ip_and_udp_from_a_pod_reach_nothing_with_the_packet_guard_off() {
    let node = TestNode::with_uplink();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);
    send_raw(&pod);
    assert_eq!(
        watch.kinds_from(&pod),
        Vec::<&str>::new(),
        "nothing the pod's sockets send may reach the metadata addresses"
    );
    let (dropped4, dropped6) = dropped(&node);
    assert!(dropped4 >= 2, "the raw SYN and the datagram: {dropped4}");
    assert!(dropped6 >= 1, "the IPv6 datagram: {dropped6}");
}

#[test]
fn without_the_egress_guard_raw_ip_and_udp_reach_the_metadata_service() {
    let node = TestNode::with_uplink();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, false);
    send_raw(&pod);
    assert_eq!(
        watch.kinds_from(&pod),
        vec!["tcp", "udp", "udp6"],
        "with both guards off every packet must arrive, or these tests prove nothing"
    );
}

#[test]
fn host_sockets_still_reach_the_metadata_service_and_pods_still_reach_the_agent() {
    let node = TestNode::with_uplink();
    let imds = ImdsEmulator::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);

    // A host-network process inside the intercepted cgroup (kubelet, aws-node, the agent
    // itself on a real node): its connects are left alone and its packets pass the backstop.
    for url in [
        "http://169.254.169.254/latest/meta-data/instance-id",
        "http://[fd00:ec2::254]/latest/meta-data/instance-id",
    ] {
        let output = run(
            node.command_in_cgroup("curl")
                .args(["-s", "-g", "-m", "5", url]),
            "curl on the node",
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            kube2iam_tests::imds::INSTANCE_ID,
            "the node must reach its metadata service at {url}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(imds.saw(IpAddr::V4(UPLINK_NODE4)));

    // The pod's ordinary metadata connect is rewritten to the agent, whose address the backstop
    // does not care about.
    let body = pod_curl(&pod, "169.254.169.254", "/latest/meta-data/");
    assert_eq!(body, format!("agent-stub peer={}", pod.ip4()));
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
    assert_eq!(dropped(&node), (0, 0), "nothing legitimate was dropped");
}

#[test]
fn a_metadata_service_inside_the_cgroup_on_the_node_itself_still_answers_the_node() {
    // As in the kernel matrix: the metadata stand-in listens on the node's own metadata address
    // and runs inside the intercepted cgroup. Its answers go from the metadata address to the
    // metadata address (the client's source) through lo, from sockets that never connected.
    let node = TestNode::new();
    let _agent = agent(&node, true);
    let mut server = node.command_in_cgroup("python3");
    server
        .args(["-m", "http.server", "80", "--bind", "169.254.169.254"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = ChildGuard::spawn(&mut server, "python3 -m http.server");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let output = run(
            node.command_in_cgroup("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "3",
                "http://169.254.169.254/",
            ]),
            "curl on the node",
        );
        let status = String::from_utf8_lossy(&output.stdout).into_owned();
        if status == "200" || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, "200", "the node's own client must get an answer");
    assert_eq!(dropped(&node), (0, 0), "nothing was dropped");
}

#[test]
fn the_egress_link_is_pinned_adopted_replaced_and_removed_by_uninstall() {
    let node = TestNode::with_uplink();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let link = node.pin_path().join("links").join(programs::EGRESS);
    let cgroup = node.open_cgroup();

    let mut first = agent(&node, true);
    let original = bpf::pinned_link_info(&link);
    let original_tag = bpf::prog_info_by_id(original.prog_id).tag;
    assert_eq!(
        bpf::prog_query(cgroup.as_fd(), AttachType::InetEgress).expect("BPF_PROG_QUERY"),
        vec![original.prog_id],
        "the backstop is attached to the node's cgroup"
    );

    // Fail-closed: with the agent dead, the pinned link keeps dropping.
    first.kill9();
    send_raw(&pod);
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());

    // A restart adopts the link.
    let second = agent(&node, true);
    assert_eq!(bpf::pinned_link_info(&link).id, original.id);
    assert!(
        second
            .log()
            .lines()
            .any(|l| l.contains(programs::EGRESS) && l.contains("Adopted")),
        "{}",
        second.log()
    );
    drop(second);

    // An older program under the link is swapped through it, never detached.
    let old = bpf::load_cgroup_skb_pass_all();
    bpf::swap_pinned_link_prog(&link, old.as_fd());
    assert_ne!(
        bpf::prog_info_by_id(bpf::pinned_link_info(&link).prog_id).tag,
        original_tag
    );
    let third = agent(&node, true);
    let restored = bpf::pinned_link_info(&link);
    assert_eq!(restored.id, original.id, "replaced through the same link");
    assert_eq!(bpf::prog_info_by_id(restored.prog_id).tag, original_tag);
    drop(third);

    let output = run_uninstall(&node, &node.pin_path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!link.exists());
    assert_eq!(
        bpf::prog_query(cgroup.as_fd(), AttachType::InetEgress).expect("BPF_PROG_QUERY"),
        Vec::<u32>::new(),
        "uninstall detaches the backstop"
    );
}

#[test]
fn turning_the_egress_guard_off_detaches_it() {
    let node = TestNode::with_uplink();
    let link = node.pin_path().join("links").join(programs::EGRESS);
    let cgroup = node.open_cgroup();
    let on = agent(&node, true);
    assert!(link.exists());
    drop(on);
    let off = agent(&node, false);
    assert!(!link.exists(), "{}", off.log());
    assert_eq!(
        bpf::prog_query(cgroup.as_fd(), AttachType::InetEgress).expect("BPF_PROG_QUERY"),
        Vec::<u32>::new()
    );
    assert!(off.log().contains("egress guard off"), "{}", off.log());
}
