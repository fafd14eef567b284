//! The packet guard: a pod with CAP_NET_RAW sending to the metadata address without connect()
//! (a raw IP SYN, an AF_PACKET frame, unconnected UDP over IPv4 and IPv6) is dropped on the host
//! side of its interface and counted; the node never receives it. With the guard off the same
//! packets arrive, which proves these tests can see a bypass.

use std::{net::IpAddr, path::Path, time::Duration};

use kube2iam_common::Counter;
use kube2iam_tests::{
    Agent, AgentOptions, AgentStub, Pod, TestNode, maps, metadata_addr4,
    packets::{PacketWatch, WATCH_PORT},
    probe,
    process::output_within,
};

const RAW: &str = env!("CARGO_BIN_EXE_k2i-raw");
const PROBE: &str = env!("CARGO_BIN_EXE_k2i-probe");

fn agent(node: &TestNode, guard: bool) -> Agent {
    agent_with(node, guard, &[])
}

fn agent_with(node: &TestNode, guard: bool, extra: &[&str]) -> Agent {
    let mut extra_args: Vec<std::ffi::OsString> = vec![
        "--host-interface".into(),
        "k2i-h-+".into(),
        "--packet-guard".into(),
        guard.to_string().into(),
    ];
    extra_args.extend(extra.iter().map(Into::into));
    let options = AgentOptions {
        host_ipv6: true,
        extra_args,
        ..AgentOptions::default()
    };
    Agent::start_with(node, &options)
}

/// The cls_bpf filters named k2i_guard on the pod's host interface (netlink mode).
fn netlink_filters(node: &TestNode, pod: &Pod<'_>) -> usize {
    let output = output_within(
        std::process::Command::new("tc").args([
            "-n",
            node.netns_name(),
            "filter",
            "show",
            "dev",
            &pod.host_interface(),
            "ingress",
        ]),
        Duration::from_secs(10),
        "tc filter show",
    );
    // One line per filter: "filter protocol all pref 49000 bpf chain 0 handle 0x4b32 k2i_guard …".
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("handle") && l.contains("k2i_guard"))
        .count()
}

/// The MAC of the node side of the pod's veth, where a crafted frame is addressed.
fn gateway_mac(node: &TestNode, pod: &Pod<'_>) -> String {
    let output = output_within(
        std::process::Command::new("ip").args([
            "-n",
            node.netns_name(),
            "-j",
            "link",
            "show",
            &pod.host_interface(),
        ]),
        Duration::from_secs(10),
        "ip link show",
    );
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip -j output");
    links[0]["address"]
        .as_str()
        .expect("a MAC address")
        .to_owned()
}

/// Sends every kind of bypass from the pod; panics if sending itself fails.
fn send_bypasses(node: &TestNode, pod: &Pod<'_>) {
    let src = pod.ip4().to_string();
    let port = WATCH_PORT.to_string();
    let mac = gateway_mac(node, pod);
    let runs: [Vec<&str>; 4] = [
        vec!["syn", &src, "169.254.169.254", &port],
        vec!["udp", "169.254.169.254", &port],
        vec!["frame", "eth0", &mac, &src, "169.254.169.254", &port],
        vec!["udp", "fd00:ec2::254", &port],
    ];
    for args in runs {
        let output = output_within(
            pod.command(RAW).args(&args),
            Duration::from_secs(10),
            "k2i-raw",
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("\"ok\":true"), "k2i-raw {args:?}: {stdout}");
    }
    // Let anything that got through arrive.
    std::thread::sleep(Duration::from_millis(300));
}

fn kinds(watch: &PacketWatch, pod: &Pod<'_>) -> Vec<&'static str> {
    let mut kinds: Vec<_> = watch
        .seen_from(IpAddr::V4(pod.ip4()))
        .into_iter()
        .chain(watch.seen_from(IpAddr::V6(pod.ip6())))
        .map(|s| s.kind)
        .collect();
    kinds.sort();
    kinds
}

fn dropped(pin: &Path) -> (u64, u64) {
    (
        maps::counter(pin, Counter::GuardDropped4),
        maps::counter(pin, Counter::GuardDropped6),
    )
}

#[test]
fn raw_ip_af_packet_and_udp_bypasses_are_dropped_and_counted() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);
    send_bypasses(&node, &pod);
    assert_eq!(
        kinds(&watch, &pod),
        Vec::<&str>::new(),
        "nothing from the pod may reach the metadata address"
    );
    let (v4, v6) = dropped(&node.pin_path());
    assert!(
        v4 >= 3,
        "raw SYN, UDP and the AF_PACKET frame are counted: {v4}"
    );
    assert!(v6 >= 1, "the IPv6 datagram is counted: {v6}");
}

#[test]
fn without_the_guard_the_same_bypasses_reach_the_node() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, false);
    send_bypasses(&node, &pod);
    // udp arrives twice: the plain datagram and the one inside the crafted frame.
    assert_eq!(
        kinds(&watch, &pod),
        vec!["tcp", "udp", "udp", "udp6"],
        "with the guard off every bypass must be visible, or the guard tests prove nothing"
    );
    assert_eq!(dropped(&node.pin_path()), (0, 0));
}

#[test]
fn the_guard_follows_pod_interfaces_that_appear_after_start() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let agent = agent(&node, true);
    let pod = node.add_pod("late");
    // The agent attaches on the netlink event; give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !agent.log().contains(&pod.host_interface()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard never reached {}:\n{}",
            pod.host_interface(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send_bypasses(&node, &pod);
    assert_eq!(kinds(&watch, &pod), Vec::<&str>::new());
}

#[test]
fn host_traffic_and_redirected_connects_are_untouched_by_the_guard() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);
    // The pod's ordinary metadata connect is rewritten and reaches the agent.
    let result = probe::run(
        pod.command(PROBE),
        &["--addr", &metadata_addr4().to_string()],
    );
    assert!(result.ok && result.reached_agent_stub(), "{result:?}");
    assert_eq!(stub.connections(), 1);
    // The node's own datagram to the metadata address is not on a pod interface.
    let output = output_within(
        node.command(RAW)
            .args(["udp", "169.254.169.254", &WATCH_PORT.to_string()]),
        Duration::from_secs(10),
        "k2i-raw on the node",
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"ok\":true"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !watch
            .seen_from("169.254.169.254".parse().unwrap())
            .is_empty()
            || !watch.seen_from("192.0.2.10".parse().unwrap()).is_empty(),
        "the node's own traffic reaches its metadata service"
    );
}

#[test]
fn guard_links_are_pinned_survive_the_agent_and_go_with_uninstall() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let mut first = agent(&node, true);
    let tc_dir = node.pin_path().join("tc");
    let pins: Vec<_> = std::fs::read_dir(&tc_dir)
        .expect("tc pins")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        pins.len(),
        1,
        "one pinned guard link for the pod interface: {pins:?}"
    );
    let link = kube2iam_tests::bpf::pinned_link_info(&tc_dir.join(&pins[0]));
    first.kill9();
    // Fail-closed: the guard keeps dropping with no agent running.
    send_bypasses(&node, &pod);
    assert_eq!(kinds(&watch, &pod), Vec::<&str>::new());
    let second = agent(&node, true);
    assert!(second.log().contains("adopted"), "{}", second.log());
    let again = kube2iam_tests::bpf::pinned_link_info(&tc_dir.join(&pins[0]));
    assert_eq!(
        again.id, link.id,
        "the restarted agent adopts the pinned link"
    );
    drop(second);
    let output = kube2iam_tests::run_uninstall(&node, &node.pin_path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("guard on"),
        "{stdout}"
    );
    assert!(!tc_dir.exists(), "uninstall removes the guard pins");
    send_bypasses(&node, &pod);
    assert!(
        !kinds(&watch, &pod).is_empty(),
        "with the guard uninstalled, packets arrive again"
    );
}

#[test]
fn before_tcx_the_guard_is_a_cls_bpf_filter_that_outlives_and_is_reused_by_the_agent() {
    // The path kernels before 6.6 take, forced on this kernel.
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let mut first = agent_with(&node, true, &["--packet-guard-netlink"]);
    assert_eq!(
        netlink_filters(&node, &pod),
        1,
        "one filter on the pod interface"
    );
    first.kill9();
    send_bypasses(&node, &pod);
    assert_eq!(
        kinds(&watch, &pod),
        Vec::<&str>::new(),
        "the filter keeps dropping with no agent"
    );
    let second = agent_with(&node, true, &["--packet-guard-netlink"]);
    assert!(
        second.log().contains("replaced"),
        "the restarted agent swaps its filter's program:\n{}",
        second.log()
    );
    assert_eq!(
        netlink_filters(&node, &pod),
        1,
        "a restart does not stack filters"
    );
    drop(second);
    let output = kube2iam_tests::run_uninstall(&node, &node.pin_path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        netlink_filters(&node, &pod),
        0,
        "uninstall removes the filter"
    );
}
