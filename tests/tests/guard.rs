//! The packet guard: a pod with CAP_NET_RAW sending to the metadata address without connect()
//! (a raw IP SYN, an AF_PACKET frame, unconnected UDP over IPv4 and IPv6) is dropped on the host
//! side of its interface and counted; the node never receives it. With the guard off the same
//! packets arrive, which proves these tests can see a bypass.
//!
//! The guard must be first on the hook: another classifier in front of it that returns OK (as
//! Cilium's does on `lxc*`) would pass every packet on before the guard saw it. The agent
//! attaches in front, puts itself back in front when another program goes there, and reports
//! where it stands in its metrics and the doctor.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kube2iam_common::Counter;
use kube2iam_tests::{
    Agent, AgentOptions, AgentStub, Pod, TestNode, agent_binary, bpf, e2e, maps, metadata_addr4,
    packets::{PacketWatch, WATCH_PORT},
    probe,
    process::{enter_netns_on_this_thread, output_within},
};

const RAW: &str = env!("CARGO_BIN_EXE_k2i-raw");
const PROBE: &str = env!("CARGO_BIN_EXE_k2i-probe");

fn agent(node: &TestNode, guard: bool) -> Agent {
    agent_with(node, guard, &[])
}

fn agent_with(node: &TestNode, guard: bool, extra: &[&str]) -> Agent {
    // The egress backstop would drop the socket-sent bypasses before they reach tc; these tests
    // are about the tc guard alone (tests/egress.rs has the backstop's).
    let mut extra_args: Vec<std::ffi::OsString> = vec![
        "--host-interface".into(),
        "k2i-h-+".into(),
        "--packet-guard".into(),
        guard.to_string().into(),
        "--node-guard".into(),
        guard.to_string().into(),
        "--egress-guard".into(),
        "false".into(),
    ];
    extra_args.extend(extra.iter().map(Into::into));
    let options = AgentOptions {
        host_ipv6: true,
        extra_args,
        ..AgentOptions::default()
    };
    Agent::start_with(node, &options)
}

/// `tc filter show` of the ingress filters on the pod's host interface.
fn tc_filters(node: &TestNode, pod: &Pod<'_>) -> String {
    let output = output_within(
        Command::new("tc").args([
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
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The cls_bpf filters named k2i_guard on the pod's host interface (netlink mode).
fn netlink_filters(node: &TestNode, pod: &Pod<'_>) -> usize {
    // One line per filter: "filter protocol all pref 49000 bpf chain 0 handle 0x4b32 k2i_guard …".
    tc_filters(node, pod)
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
        watch.kinds_from(&pod),
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
        watch.kinds_from(&pod),
        vec!["tcp", "udp", "udp", "udp6"],
        "with the guard off every bypass must be visible, or the guard tests prove nothing"
    );
    assert_eq!(dropped(&node.pin_path()), (0, 0));
}

/// AF_PACKET frames from the pod with 1, 2 and 3 stacked VLAN-0 tags around UDP to the metadata
/// address.
fn send_tagged(node: &TestNode, pod: &Pod<'_>) {
    let src = pod.ip4().to_string();
    let port = WATCH_PORT.to_string();
    let mac = gateway_mac(node, pod);
    for tags in ["1", "2", "3"] {
        let args = ["frame", "eth0", &mac, &src, "169.254.169.254", &port, tags];
        let output = output_within(
            pod.command(RAW).args(args),
            Duration::from_secs(10),
            "k2i-raw",
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("\"ok\":true"), "k2i-raw {args:?}: {stdout}");
    }
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn stacked_vlan_tags_do_not_carry_a_packet_past_the_guard() {
    // Control first: without either guard the kernel strips the priority tags and delivers at
    // least one of the frames, or this test would prove nothing.
    {
        let node = TestNode::new();
        let watch = PacketWatch::start(&node);
        let pod = node.add_pod("a");
        let _agent = agent(&node, false);
        send_tagged(&node, &pod);
        assert!(
            !watch.kinds_from(&pod).is_empty(),
            "without the guard no tagged frame arrived: the test cannot tell a bypass"
        );
    }
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _agent = agent(&node, true);
    send_tagged(&node, &pod);
    assert_eq!(
        watch.kinds_from(&pod),
        Vec::<&str>::new(),
        "a tagged frame reached the metadata address"
    );
    assert!(maps::counter(&node.pin_path(), Counter::GuardDroppedTagged) >= 3);
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
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());
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
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());
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
        !watch.kinds_from(&pod).is_empty(),
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
        watch.kinds_from(&pod),
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

/// Runs `f` on a thread inside the node's network namespace (ifindexes and TCX queries are
/// per namespace).
fn in_node<T: Send + 'static>(node: &TestNode, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = node.netns_path();
    std::thread::spawn(move || {
        enter_netns_on_this_thread(&netns).expect("enter the node namespace");
        f()
    })
    .join()
    .expect("the thread in the node namespace panicked")
}

fn ifindex(node: &TestNode, pod: &Pod<'_>) -> u32 {
    let name = std::ffi::CString::new(pod.host_interface()).expect("no NUL");
    // SAFETY: a valid NUL-terminated interface name.
    let index = in_node(node, move || unsafe { libc::if_nametoindex(name.as_ptr()) });
    assert_ne!(index, 0, "no interface {}", pod.host_interface());
    index
}

/// The names of the TCX programs on the pod's host interface, in the order they run.
fn tcx_order(node: &TestNode, pod: &Pod<'_>) -> Vec<String> {
    let index = ifindex(node, pod);
    in_node(node, move || bpf::tcx_programs(index))
        .into_iter()
        .map(|id| bpf::prog_info_by_id(id).name)
        .collect()
}

/// The tc filters on the pod's host interface, in the order they run: "<pref> <name>".
fn filter_order(node: &TestNode, pod: &Pod<'_>) -> Vec<String> {
    // "filter protocol all pref 1 bpf chain 0 handle 0x4b33 k2i_guard direct-action …"
    tc_filters(node, pod)
        .lines()
        .filter(|l| l.contains("handle"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
                    .unwrap_or("?")
            };
            // The filter's name follows its handle, if it has one.
            let name = match at("handle") {
                "?" => "?",
                handle => words
                    .iter()
                    .position(|w| *w == handle)
                    .and_then(|i| words.get(i + 1))
                    .copied()
                    .filter(|w| !w.starts_with("direct-action") && !w.starts_with("not_in_hw"))
                    .unwrap_or("?"),
            };
            format!("{} {name}", at("pref"))
        })
        .collect()
}

/// A classifier of someone else's that returns TC_ACT_OK, in front of everything on the pod's
/// host interface, as Cilium's program on lxc* is: with TCX a link at the head, before TCX a
/// cls_bpf filter at priority 1 (Cilium's default there). Detached on drop.
enum Foreign {
    Tcx { _link: OwnedFd },
    Netlink { netns: String, interface: String },
}

const FOREIGN: &str = "k2i_test_ok";

fn attach_foreign_first(node: &TestNode, pod: &Pod<'_>, netlink: bool) -> Foreign {
    let prog = bpf::load_tc_ok(FOREIGN);
    if !netlink {
        let index = ifindex(node, pod);
        let link = in_node(node, move || bpf::tcx_attach_first(prog.as_fd(), index))
            .unwrap_or_else(|e| panic!("cannot attach the foreign classifier with TCX: {e}"));
        return Foreign::Tcx { _link: link };
    }
    let index = ifindex(node, pod);
    in_node(node, move || {
        bpf::tc_filter_add(index, 1, 1, prog.as_fd(), FOREIGN)
    })
    .unwrap_or_else(|e| panic!("cannot add the foreign filter: {e}"));
    let interface = pod.host_interface();
    Foreign::Netlink {
        netns: node.netns_name().to_owned(),
        interface,
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        if let Foreign::Netlink { netns, interface } = self {
            let _ = Command::new("tc")
                .args(["-n", netns, "filter", "del", "dev", interface, "ingress"])
                .args(["pref", "1", "handle", "1", "bpf"])
                .output();
        }
    }
}

/// Waits (at most 10 s) until `check` holds; panics with `what` and the agent's log.
fn wait_until(agent: &Agent, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 10 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn guard_first_tcx(node: &TestNode, pod: &Pod<'_>) -> bool {
    tcx_order(node, pod).first().map(String::as_str) == Some("k2i_guard")
}

fn guard_first_netlink(node: &TestNode, pod: &Pod<'_>) -> bool {
    filter_order(node, pod).first().map(String::as_str) == Some("1 k2i_guard")
}

#[test]
fn the_guard_goes_in_front_of_a_classifier_that_passes_everything_tcx() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _foreign = attach_foreign_first(&node, &pod, false);
    let _agent = agent(&node, true);
    assert_eq!(
        tcx_order(&node, &pod),
        vec!["k2i_guard".to_owned(), FOREIGN.to_owned()],
        "the guard must run before the classifier that was there first"
    );
    send_bypasses(&node, &pod);
    assert_eq!(
        watch.kinds_from(&pod),
        Vec::<&str>::new(),
        "behind a classifier that returns OK the guard would never see these"
    );
}

#[test]
fn the_guard_goes_in_front_of_a_classifier_that_passes_everything_netlink() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let _foreign = attach_foreign_first(&node, &pod, true);
    let _agent = agent_with(&node, true, &["--packet-guard-netlink"]);
    let order = filter_order(&node, &pod);
    assert_eq!(
        order.first().map(String::as_str),
        Some("1 k2i_guard"),
        "the guard's filter must run first: {order:?}"
    );
    send_bypasses(&node, &pod);
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());
}

#[test]
fn a_classifier_put_in_front_later_is_overtaken_at_the_next_resync_tcx() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    let agent = agent_with(&node, true, &["--guard-resync-interval", "1s"]);
    assert!(guard_first_tcx(&node, &pod));
    // Another agent (re)attaches its program at the head after ours.
    let _foreign = attach_foreign_first(&node, &pod, false);
    wait_until(&agent, "the guard back in front", || {
        agent.log().contains("packet guard put back in front") && guard_first_tcx(&node, &pod)
    });
    assert_eq!(
        tcx_order(&node, &pod),
        vec!["k2i_guard".to_owned(), FOREIGN.to_owned()],
        "one guard, in front; the old link is gone"
    );
    // Again: the hook now holds the copy of the guard the repair attached, so the next repair
    // must attach the other one (the agent holds two, opened from their pins).
    let _second = attach_foreign_first(&node, &pod, false);
    wait_until(&agent, "the guard back in front a second time", || {
        agent
            .log()
            .matches("packet guard put back in front")
            .count()
            >= 2
            && guard_first_tcx(&node, &pod)
    });
    assert_eq!(
        tcx_order(&node, &pod),
        vec![
            "k2i_guard".to_owned(),
            FOREIGN.to_owned(),
            FOREIGN.to_owned()
        ],
        "one guard, in front of both others"
    );
    send_bypasses(&node, &pod);
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());
}

#[test]
fn a_filter_put_in_front_later_is_overtaken_at_once_netlink() {
    let node = TestNode::new();
    let watch = PacketWatch::start(&node);
    let pod = node.add_pod("a");
    // No timed resync during the test: the tc change itself must trigger the repair.
    let agent = agent_with(
        &node,
        true,
        &["--packet-guard-netlink", "--guard-resync-interval", "1h"],
    );
    assert!(guard_first_netlink(&node, &pod));
    let _foreign = attach_foreign_first(&node, &pod, true);
    wait_until(&agent, "the guard's filter back in front", || {
        guard_first_netlink(&node, &pod)
    });
    let order = filter_order(&node, &pod);
    assert_eq!(
        order,
        vec!["1 k2i_guard".to_owned(), format!("1 {FOREIGN}")],
        "one guard filter, in front of the other one"
    );
    send_bypasses(&node, &pod);
    assert_eq!(watch.kinds_from(&pod), Vec::<&str>::new());
}

#[test]
fn a_restarted_agent_moves_an_old_filter_from_the_back_to_the_front_netlink() {
    // Agents before this change attached their filter last, at priority 49000.
    let node = TestNode::new();
    let pod = node.add_pod("a");
    let mut agent = agent_with(&node, true, &["--packet-guard-netlink"]);
    agent.kill9();
    let interface = pod.host_interface();
    let output = output_within(
        Command::new("tc")
            .args(["-n", node.netns_name(), "filter", "del", "dev", &interface])
            .args(["ingress", "pref", "1"]),
        Duration::from_secs(10),
        "tc filter del",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // What an older agent left: k2i_guard at 49000, nothing at 1.
    let old = bpf::load_tc_ok("k2i_guard");
    let index = ifindex(&node, &pod);
    in_node(&node, move || {
        bpf::tc_filter_add(index, 49_000, 0x4b32, old.as_fd(), "k2i_guard")
    })
    .expect("add the old filter");
    assert_eq!(
        filter_order(&node, &pod),
        vec!["49000 k2i_guard".to_owned()]
    );
    let _agent = agent_with(&node, true, &["--packet-guard-netlink"]);
    assert_eq!(
        filter_order(&node, &pod),
        vec!["1 k2i_guard".to_owned()],
        "the restarted agent's filter is in front and the old one is gone"
    );
}

/// `state` → value of `kube2iam_packet_guard_interfaces` for the pod guard.
fn guard_gauges(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("kube2iam_packet_guard_interfaces{guard=\"pod\",state=\""))
        .filter_map(|rest| {
            let (state, value) = rest.split_once("\"} ")?;
            Some((state.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_report_an_interface_where_another_program_runs_before_the_guard() {
    let node = TestNode::new();
    let pod = node.add_pod("a");
    let world = e2e::World::start(
        &node,
        &[
            "--host-interface",
            "k2i-h-+",
            "--guard-resync-interval",
            "1h",
        ],
    );
    let (status, metrics) = world.admin_get(&node, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        guard_gauges(&metrics),
        vec![
            ("first".to_owned(), 1),
            ("not_first".to_owned(), 0),
            ("unguarded".to_owned(), 0)
        ],
        "{metrics}"
    );
    // TCX changes raise no event: until the next resync, the metrics say what is wrong.
    let _foreign = attach_foreign_first(&node, &pod, false);
    let (_, metrics) = world.admin_get(&node, "/metrics");
    assert_eq!(
        guard_gauges(&metrics),
        vec![
            ("first".to_owned(), 0),
            ("not_first".to_owned(), 1),
            ("unguarded".to_owned(), 0)
        ],
        "{metrics}"
    );
}

#[test]
fn the_doctor_names_unguarded_interfaces_and_ones_where_the_guard_is_not_first() {
    let node = TestNode::new();
    let a = node.add_pod("a");
    let mut agent = agent_with(&node, true, &["--guard-resync-interval", "1h"]);
    let _foreign = attach_foreign_first(&node, &a, false);
    agent.kill9();
    // A pod that came while no agent ran has no guard.
    let _b = node.add_pod("b");
    let mut command = node.command(agent_binary());
    command
        .args(["doctor", "--host-interface", "k2i-h-+", "--cgroup-path"])
        .arg(node.cgroup_path())
        .arg("--bpf-pin-path")
        .arg(node.pin_path());
    let output = output_within(&mut command, Duration::from_secs(60), "doctor");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The row wraps; join it.
    let mut row = String::new();
    let mut lines = stdout
        .lines()
        .skip_while(|l| !l.starts_with("packet guard"));
    if let Some(first) = lines.next() {
        row.push_str(first);
        for more in lines.take_while(|l| l.starts_with(' ')) {
            row.push(' ');
            row.push_str(more.trim());
        }
    }
    // The result and fix columns wrap side by side; the words are what matters.
    let row = row.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(row.contains("WARN"), "{stdout}");
    for words in [
        "unguarded: k2i-h-b",
        "not first: k2i-h-a (behind TCX program",
        FOREIGN,
        "first on 0 of 2",
    ] {
        assert!(row.contains(words), "{words:?} missing from the row: {row}");
    }
}

#[test]
fn a_replacement_link_an_agent_staged_before_it_stopped_takes_the_old_links_place_tcx() {
    // An agent that stopped between pinning the new link at the head and moving it over the old
    // pin: the next agent finishes the move instead of throwing the new link away.
    let node = TestNode::new();
    let pod = node.add_pod("a");
    let mut first = agent(&node, true);
    first.kill9();
    let tc_dir = node.pin_path().join("tc");
    let pin = format!("{}-{}", ifindex(&node, &pod), pod.host_interface());
    let index = ifindex(&node, &pod);
    // An older program under the staged link: the agent swaps its own in through the link.
    let staged_prog = bpf::load_tc_ok("k2i_test_staged");
    let staged = in_node(&node, move || {
        bpf::tcx_attach_first(staged_prog.as_fd(), index)
    })
    .expect("attach the staged link");
    bpf::obj_pin(staged.as_fd(), &tc_dir.join(format!("new-{pin}"))).expect("pin it");
    drop(staged);
    assert_eq!(
        tcx_order(&node, &pod),
        vec!["k2i_test_staged".to_owned(), "k2i_guard".to_owned()]
    );
    let _second = agent(&node, true);
    let pins: Vec<String> = std::fs::read_dir(&tc_dir)
        .expect("tc pins")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(pins, vec![pin], "the staged pin moved into place");
    assert_eq!(
        tcx_order(&node, &pod),
        vec!["k2i_guard".to_owned()],
        "one guard link, the staged one, now running the agent's program"
    );
}
