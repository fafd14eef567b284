//! The test kit checks itself: without any kube2iam program attached, pods reach the IMDS
//! stand-in (so a missed rewrite is visible), the raw BPF helpers work, and a dropped node leaves
//! nothing behind.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use kube2iam_tests::{
    AgentStub, HOST_IP4, ImdsStub, ProbeResult, TestNode,
    bpf::{self, AttachType, CgroupLink},
    metadata_addr_mapped, metadata_addr4, metadata_addr6, probe,
    process::output_within,
};

const PROBE: &str = env!("CARGO_BIN_EXE_k2i-probe");

fn run_probe(command: Command, args: &[&str]) -> ProbeResult {
    probe::run(command, args)
}

#[test]
fn without_programs_pods_reach_the_imds_stub_over_ipv4_ipv6_and_mapped() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let pod = node.add_pod("a");

    let output = output_within(
        pod.command("curl").args([
            "-s",
            "-m",
            "5",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ]),
        Duration::from_secs(20),
        "curl",
    );
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl from the pod failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(body, format!("imds-stub peer={}", pod.ip4()));

    let v6 = run_probe(
        pod.command(PROBE),
        &["--addr", &metadata_addr6().to_string()],
    );
    assert!(v6.ok, "IPv6 probe failed: {v6:?}");
    assert_eq!(v6.seen_as(), Some(IpAddr::V6(pod.ip6())), "{v6:?}");
    assert_eq!(v6.peer.as_deref(), Some("[fd00:ec2::254]:80"));

    let mapped = run_probe(
        pod.command(PROBE),
        &[
            "--addr",
            &metadata_addr_mapped().to_string(),
            "--socket",
            "inet6",
        ],
    );
    assert!(mapped.ok, "mapped probe failed: {mapped:?}");
    assert_eq!(mapped.seen_as(), Some(IpAddr::V4(pod.ip4())), "{mapped:?}");

    assert!(imds.saw(IpAddr::V4(pod.ip4())) && imds.saw(IpAddr::V6(pod.ip6())));
}

#[test]
fn agent_stub_records_peers_and_refuses_while_stopped() {
    let node = TestNode::new();
    let mut stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let addr = SocketAddr::new(IpAddr::V4(HOST_IP4), stub.port()).to_string();

    let first = run_probe(pod.command(PROBE), &["--addr", &addr]);
    assert!(first.reached_agent_stub(), "{first:?}");
    assert_eq!(first.seen_as(), Some(IpAddr::V4(pod.ip4())));

    stub.stop();
    let stopped = run_probe(pod.command(PROBE), &["--addr", &addr]);
    assert_eq!(stopped.errno, Some(libc::ECONNREFUSED), "{stopped:?}");

    stub.restart();
    let again = run_probe(pod.command(PROBE), &["--addr", &addr]);
    assert!(again.reached_agent_stub(), "{again:?}");
    assert_eq!(stub.connections(), 2);
}

#[test]
fn port_rewrite_program_moves_7777_to_7778_and_link_update_swaps_it() {
    let node = TestNode::new();
    let stub = AgentStub::start_on(&node, 7778);
    let pod = node.add_pod("a");
    let link = CgroupLink::attach(
        bpf::load_port_rewrite_connect4(7777, 7778),
        node.cgroup_path(),
        AttachType::Inet4Connect,
    );
    let cgroup = node.open_cgroup();
    let attached = bpf::prog_query(cgroup.as_fd(), AttachType::Inet4Connect).unwrap();
    assert_eq!(attached, vec![link.info().prog_id]);

    let addr = format!("{HOST_IP4}:7777");
    let rewritten = run_probe(pod.command(PROBE), &["--addr", &addr]);
    assert!(
        rewritten.reached_agent_stub(),
        "7777 should land on :7778: {rewritten:?}"
    );
    assert_eq!(rewritten.peer.as_deref(), Some("192.0.2.10:7778"));
    assert_eq!(stub.connections(), 1);

    // Outside the cgroup nothing applies.
    let outside = run_probe(pod.command_outside_cgroup(PROBE), &["--addr", &addr]);
    assert_eq!(outside.errno, Some(libc::ECONNREFUSED), "{outside:?}");

    let before = link.info();
    let old_tag = bpf::prog_info_by_id(before.prog_id).tag;
    let allow = bpf::load_allow_all(AttachType::Inet4Connect);
    bpf::link_update(link.as_fd(), allow.as_fd()).expect("BPF_LINK_UPDATE");
    let after = link.info();
    assert_eq!(after.id, before.id, "a link update keeps the link");
    assert_ne!(bpf::prog_info_by_id(after.prog_id).tag, old_tag);
    let swapped = run_probe(pod.command(PROBE), &["--addr", &addr]);
    assert_eq!(swapped.errno, Some(libc::ECONNREFUSED), "{swapped:?}");

    drop(link);
    // The kernel releases a closed link asynchronously (deferred free): give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut attached = bpf::prog_query(cgroup.as_fd(), AttachType::Inet4Connect).unwrap();
    while !attached.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        attached = bpf::prog_query(cgroup.as_fd(), AttachType::Inet4Connect).unwrap();
    }
    assert!(
        attached.is_empty(),
        "closing the link detaches: {attached:?}"
    );
}

#[test]
fn host_netns_commands_run_in_the_node_and_the_cgroup() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let result = run_probe(
        node.command_in_cgroup(PROBE),
        &["--addr", &metadata_addr4().to_string()],
    );
    assert!(result.reached_imds_stub(), "{result:?}");

    let mut command = node.command_in_cgroup("cat");
    command.arg("/proc/self/cgroup");
    let output = output_within(&mut command, Duration::from_secs(10), "cat");
    let cgroup_name = node.cgroup_path().file_name().unwrap().to_str().unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(&format!("0::/{cgroup_name}")),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(imds.callers().len(), 1);
}

#[test]
fn a_dropped_node_leaves_nothing_behind() {
    let node = TestNode::new();
    let pod = node.add_pod("a");
    let netns = [node.netns_name().to_owned(), pod.netns_name().to_owned()];
    let cgroup = node.cgroup_path().to_owned();
    let bpffs = node.bpffs().to_owned();
    // A process left running in the test cgroup, as a failing test might leave one.
    let mut sleeper = pod.command("sleep");
    sleeper.arg("600").stdout(Stdio::null());
    let child = sleeper.spawn().expect("spawn sleep");
    assert_eq!(node.cgroup_procs(), vec![child.id()]);
    // A pinned program in the node's bpffs.
    let _link = CgroupLink::attach(
        bpf::load_allow_all(AttachType::Inet4Connect),
        node.cgroup_path(),
        AttachType::Inet4Connect,
    );
    fs::create_dir(node.pin_path()).unwrap();
    drop(pod);
    drop(node);

    let netns_list = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for name in &netns {
        assert!(!netns_list.contains(name), "netns {name} left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    assert!(!bpffs.exists(), "bpffs dir {} left behind", bpffs.display());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(bpffs.to_str().unwrap()),
        "bpffs still mounted at {}",
        bpffs.display()
    );
    assert!(!Path::new(&bpffs).parent().unwrap().exists());
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(!status.success(), "the sleeper was killed");
}

#[test]
fn bridged_pods_share_one_subnet_on_the_bridge_and_reach_the_node_over_ipv4_and_ipv6() {
    let node = TestNode::new_bridged();
    let imds = ImdsStub::start(&node);
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert_eq!(
        (a.ip4().to_string(), b.ip4().to_string()),
        ("198.51.100.2".into(), "198.51.100.3".into())
    );
    assert_eq!(a.gateway4(), b.gateway4());
    for pod in [&a, &b] {
        let output = output_within(
            Command::new("ip").args([
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
        let links: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("ip -j output");
        assert_eq!(
            links[0]["master"].as_str(),
            Some(kube2iam_tests::node::BRIDGE),
            "{} is a port of the bridge",
            pod.host_interface()
        );
        for addr in [metadata_addr4(), metadata_addr6()] {
            let result = run_probe(pod.command(PROBE), &["--addr", &addr.to_string()]);
            assert!(
                result.ok && result.reached_imds_stub(),
                "{addr}: {result:?}"
            );
        }
        assert!(imds.saw(IpAddr::V4(pod.ip4())) && imds.saw(IpAddr::V6(pod.ip6())));
    }
    // One L2 segment: pod b is on-link for pod a, no gateway between them.
    let output = output_within(
        Command::new("ip").args([
            "-n",
            a.netns_name(),
            "-j",
            "route",
            "get",
            &b.ip4().to_string(),
        ]),
        Duration::from_secs(10),
        "ip route get",
    );
    let route: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip -j output");
    assert_eq!(route[0]["dev"].as_str(), Some("eth0"), "{route}");
    assert!(
        route[0].get("gateway").is_none(),
        "b is on-link for a: {route}"
    );
}

/// Curl from `command` (a pod or the node) to the metadata service: (exit success, body).
fn curl_metadata(command: &mut Command, path: &str) -> (bool, String) {
    let url = format!("http://169.254.169.254{path}");
    let output = output_within(
        command.args(["-s", "-m", "5", &url]),
        Duration::from_secs(20),
        "curl",
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn an_uplink_node_forwards_pod_packets_to_the_metadata_service_behind_it() {
    let node = TestNode::with_uplink();
    let imds = kube2iam_tests::ImdsEmulator::start(&node);
    let pod = node.add_pod("a");
    let watch = kube2iam_tests::packets::PacketWatch::start(&node);

    // The metadata address is not the node's own any more: it lives behind the uplink.
    let output = output_within(
        Command::new("ip").args([
            "-n",
            node.netns_name(),
            "-j",
            "route",
            "get",
            "169.254.169.254",
        ]),
        Duration::from_secs(10),
        "ip route get",
    );
    let route = String::from_utf8_lossy(&output.stdout);
    assert!(
        route.contains(kube2iam_tests::node::UPLINK) && !route.contains("\"type\":\"local\""),
        "the node must route the metadata address out of its uplink: {route}"
    );

    // The node reaches it from its uplink address, as an EC2 host from its ENI.
    let (ok, body) = curl_metadata(&mut node.command("curl"), "/latest/meta-data/instance-id");
    assert!(ok, "the node cannot reach the metadata service: {body}");
    assert_eq!(body, kube2iam_tests::imds::INSTANCE_ID);
    assert!(imds.saw(IpAddr::V4(kube2iam_tests::node::UPLINK_NODE4)));

    // With no program attached, a pod's packets are forwarded through the node and arrive with
    // the pod's own address: what the guards on the way out must stop.
    let (ok, body) = curl_metadata(&mut pod.command("curl"), "/latest/meta-data/instance-id");
    assert!(ok, "the pod's request was not forwarded: {body}");
    assert!(imds.saw(IpAddr::V4(pod.ip4())), "{:?}", imds.caller_ips());
    let output = output_within(
        pod.command(env!("CARGO_BIN_EXE_k2i-raw")).args([
            "udp",
            "fd00:ec2::254",
            &kube2iam_tests::packets::WATCH_PORT.to_string(),
        ]),
        Duration::from_secs(10),
        "k2i-raw",
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"ok\":true"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        watch
            .seen_from(IpAddr::V6(pod.ip6()))
            .iter()
            .map(|s| s.kind)
            .collect::<Vec<_>>(),
        vec!["udp6"],
        "IPv6 is forwarded too"
    );
}
