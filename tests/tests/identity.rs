//! Kernel-attested pod identity, end to end: the agent serves a connection only when the cgroup
//! the kernel recorded for it belongs to the pod that owns its source address. Pods are laid out
//! in cgroups as kubelet lays them out (both drivers). Every test checks that no pod reached the
//! node's metadata service and that no pod got another pod's (or the node's) credentials.

use std::{process::Command, time::Duration};

use kube2iam_common::Counter;
use kube2iam_tests::{
    AGENT_PORT, CgroupDriver, HOST_IP4, NODE_ACCESS_KEY_ID, Pod, ProbeResult, TestNode,
    e2e::{CREDS, NODE_NAME, ROLE_KEY, World, credentials_with, curl, pod_credentials, role_arn},
    kube_api as objects,
    node::BRIDGE,
    process::{output_within, place},
};

fn served(
    world: &World,
    what: &str,
    result: Result<kube2iam_tests::clients::ImdsCredentialsDoc, (u16, String)>,
) -> String {
    match result {
        Ok(doc) => doc.access_key_id,
        Err((status, body)) => panic!("{what}: {status} {body}\nagent log:\n{}", world.agent.log()),
    }
}

fn refused(
    world: &World,
    what: &str,
    result: Result<kube2iam_tests::clients::ImdsCredentialsDoc, (u16, String)>,
) -> (u16, String) {
    match result {
        Ok(doc) => panic!(
            "{what} was served credentials {} \nagent log:\n{}",
            doc.access_key_id,
            world.agent.log()
        ),
        Err(refusal) => refusal,
    }
}

/// A metric's value from the agent's /metrics (0 when absent).
fn metric(world: &World, node: &TestNode, series: &str) -> f64 {
    let (_, body) = world.admin_get(node, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// `curl` in `cgroup` and `netns`.
fn curl_in(cgroup: &std::path::Path, netns: &std::path::Path) -> Command {
    let mut command = Command::new("curl");
    place(&mut command, Some(cgroup), Some(netns));
    command
}

#[test]
fn pods_are_served_by_their_cgroup_under_both_kubelet_cgroup_drivers() {
    let node = TestNode::new();
    let world = World::start(&node, &["--identity-attestation", "require"]);
    let web = node.add_pod("web");
    let orders = node.add_pod("orders");
    world.add_new_pod(
        &web,
        "shop",
        "web",
        &[(ROLE_KEY, "web-role")],
        CgroupDriver::Systemd,
    );
    world.add_new_pod(
        &orders,
        "shop",
        "orders",
        &[(ROLE_KEY, "orders-role")],
        CgroupDriver::Cgroupfs,
    );
    world.wait_known(&node, &web);
    world.wait_known(&node, &orders);

    let web_key = served(&world, "web (systemd layout)", pod_credentials(&web));
    let orders_key = served(&world, "orders (cgroupfs layout)", pod_credentials(&orders));
    assert_eq!(Some(web_key), world.moto_key_for(&role_arn("web-role")));
    assert_eq!(
        Some(orders_key),
        world.moto_key_for(&role_arn("orders-role"))
    );
    assert!(
        metric(&world, &node, "kube2iam_connections_total{kind=\"pod\"}") >= 4.0,
        "every connection was attested to a pod"
    );
    world.imds.assert_no_pod_seen(&[&web, &orders]);
}

/// Pod shop/victim (victim-role), then pod tools/attacker (attacker-role), both known to the
/// agent.
fn victim_and_attacker<'n>(world: &World, node: &'n TestNode) -> (Pod<'n>, Pod<'n>) {
    let [victim, attacker] = [
        ("victim", "shop", "victim-role"),
        ("attacker", "tools", "attacker-role"),
    ]
    .map(|(name, namespace, role)| {
        world.add_known_pod(node, name, namespace, name, &[(ROLE_KEY, role)])
    });
    (victim, attacker)
}

#[test]
fn a_pod_that_takes_another_pods_address_gets_nothing() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let (victim, attacker) = victim_and_attacker(&world, &node);
    let victim_key = served(&world, "victim", pod_credentials(&victim));

    // The attacker's process stays in its own cgroup and sends from the victim's address: the
    // agent sees the victim's IP, the kernel names the attacker.
    let (status, body) = refused(
        &world,
        "a process of pod attacker using victim's address",
        credentials_with(|| attacker.command_in_netns("curl", &victim.netns_path())),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("tools/attacker") && body.contains("shop/victim"),
        "the refusal names both pods: {body}"
    );
    assert!(
        !body.contains(&victim_key),
        "the victim's key leaked: {body}"
    );
    assert!(
        metric(&world, &node, "kube2iam_refusals_total{kind=\"mismatch\"}") >= 1.0,
        "the mismatch is counted"
    );
    // The attacker's own address still gets the attacker's own role.
    let own = served(
        &world,
        "attacker from its own address",
        pod_credentials(&attacker),
    );
    assert_eq!(Some(own), world.moto_key_for(&role_arn("attacker-role")));
    world.imds.assert_no_pod_seen(&[&victim, &attacker]);
}

#[test]
fn a_new_pod_on_a_finished_pods_address_never_gets_its_role_across_a_restart_with_the_api_down() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "shop", "old", &[(ROLE_KEY, "secret-role")]);
    let secret = served(&world, "old pod", pod_credentials(&pod));

    // While the agent is down the old pod finishes and a new pod (no role) gets its address;
    // the agent then restarts with the API server unreachable, from the pinned map alone.
    world.kill_agent();
    world.api.delete_pod("shop", "old");
    world.add_new_pod(&pod, "shop", "new", &[], CgroupDriver::Systemd);
    world.api.set_down(true);
    world.start_agent(&node, &[], false, false);
    world
        .agent
        .wait_for_line("serving", Duration::from_secs(20));

    let (status, body) = refused(&world, "the new pod before the sync", pod_credentials(&pod));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("shop/old") && !body.contains(&secret),
        "refused, naming the address's pinned owner: {body}"
    );
    // Once the API server is back, the new pod is what it is: a pod without a role.
    world.api.set_down(false);
    world
        .agent
        .wait_for_line("pod list synced", Duration::from_secs(30));
    let (status, body) = refused(&world, "the new pod after the sync", pod_credentials(&pod));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("shop/new has no"), "{body}");
    world.imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn pods_tied_on_creation_time_each_get_their_own_role() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = node.add_pod("a");
    let created = "2026-11-29T10:00:00Z";
    let mut cgroups = Vec::new();
    for (name, role) in [("one", "role-one"), ("two", "role-two")] {
        let uid = objects::new_uid();
        cgroups.push((pod.use_kubelet_cgroup(CgroupDriver::Cgroupfs, &uid), role));
        world.api.add_pod(
            objects::pod("shop", name, NODE_NAME, pod.ip4(), Some(pod.ip6()))
                .uid(&uid)
                .created_at(created)
                .annotate(ROLE_KEY, role),
        );
    }
    world.wait_known(&node, &pod);
    for (cgroup, role) in &cgroups {
        let key = served(
            &world,
            role,
            credentials_with(|| curl_in(&cgroup.container, &pod.netns_path())),
        );
        assert_eq!(
            Some(key),
            world.moto_key_for(&role_arn(role)),
            "the pod in {} got {role}",
            cgroup.container.display()
        );
    }
    world.imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn connections_that_bypass_the_redirect_are_refused_on_every_route() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "shop", "web", &[(ROLE_KEY, "web-role")]);
    let agent = format!("http://{HOST_IP4}:{AGENT_PORT}");
    let token_headers = [("x-aws-ec2-metadata-token-ttl-seconds", "60")];
    let from_pod = || pod.command("curl");
    let from_host = || node.command("curl");
    let callers: [(&str, &dyn Fn() -> Command); 2] = [
        ("the pod, straight to the agent's port", &from_pod),
        ("a host process (another machine's view)", &from_host),
    ];
    for (who, command) in callers {
        for (method, path, headers) in [
            ("GET", CREDS, &[][..]),
            ("PUT", "/latest/api/token", &token_headers[..]),
            ("GET", "/latest/meta-data/instance-id", &[][..]),
        ] {
            let (status, body) = curl(command(), method, &format!("{agent}{path}"), headers);
            assert_eq!(status, 403, "{who}: {method} {path}: {body}");
            assert!(
                body.contains("did not come through the metadata redirect"),
                "{who}: {method} {path}: {body}"
            );
        }
    }
    // Through the redirect the same pod is served.
    served(&world, "through the redirect", pod_credentials(&pod));
    world.imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn require_refuses_processes_outside_pod_cgroups_and_prefer_serves_them_by_address() {
    let node = TestNode::new();
    let mut world = World::start(&node, &["--identity-attestation", "require"]);
    let pod = node.add_pod("a");
    // The pod object exists, but its process runs in no pod cgroup (as on a cgroup-v1 node).
    world.api.add_pod(
        objects::pod("shop", "web", NODE_NAME, pod.ip4(), Some(pod.ip6()))
            .annotate(ROLE_KEY, "web-role"),
    );
    world.wait_known(&node, &pod);
    let (status, body) = refused(&world, "require", pod_credentials(&pod));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no pod's cgroup"), "{body}");

    world.kill_agent();
    world.start_agent(&node, &["--identity-attestation", "prefer"], false, true);
    let key = served(&world, "prefer", pod_credentials(&pod));
    assert_eq!(Some(key), world.moto_key_for(&role_arn("web-role")));
    world.imds.assert_no_pod_seen(&[&pod]);
}

/// Credentials a hostNetwork pod's process (its cgroup, the node's netns) gets.
fn host_pod_credentials(
    node: &TestNode,
    cgroup: &std::path::Path,
) -> Result<kube2iam_tests::clients::ImdsCredentialsDoc, (u16, String)> {
    credentials_with(|| node.command_in("curl", cgroup))
}

#[test]
fn a_host_network_pod_with_a_role_gets_it_only_with_the_flag_and_nothing_else_changes() {
    let node = TestNode::new();
    let mut world = World::start(&node, &["--host-network-pods"]);
    let exporter_uid = objects::new_uid();
    let exporter = node.kubelet_cgroup(CgroupDriver::Systemd, &exporter_uid, "exporter");
    let plain_uid = objects::new_uid();
    let plain = node.kubelet_cgroup(CgroupDriver::Cgroupfs, &plain_uid, "plain");
    for (name, uid, role) in [
        ("exporter", &exporter_uid, Some("exporter-role")),
        ("plain", &plain_uid, None),
    ] {
        let mut object = objects::pod("kube-system", name, NODE_NAME, HOST_IP4, None)
            .host_network(true)
            .uid(uid);
        if let Some(role) = role {
            object = object.annotate(ROLE_KEY, role);
        }
        world.api.add_pod(object);
    }
    world.agent.wait_for_line(
        "hostNetwork pods served their own role",
        Duration::from_secs(20),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let key = loop {
        match host_pod_credentials(&node, &exporter.container) {
            Ok(doc) if doc.access_key_id != NODE_ACCESS_KEY_ID => break doc.access_key_id,
            other if std::time::Instant::now() > deadline => panic!(
                "the annotated hostNetwork pod never got its role: {other:?}\nagent log:\n{}",
                world.agent.log()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(Some(key), world.moto_key_for(&role_arn("exporter-role")));

    // The unannotated hostNetwork pod and a plain host process keep the node's metadata service.
    let plain_key = served(
        &world,
        "unannotated hostNetwork pod",
        host_pod_credentials(&node, &plain.container),
    );
    assert_eq!(plain_key, NODE_ACCESS_KEY_ID);
    let host_key = served(
        &world,
        "host process",
        credentials_with(|| node.command_in_cgroup("curl")),
    );
    assert_eq!(host_key, NODE_ACCESS_KEY_ID);

    // Without the flag the annotated pod is a host process like any other.
    world.kill_agent();
    world.start_agent(&node, &[], false, true);
    let key = served(
        &world,
        "annotated hostNetwork pod without the flag",
        host_pod_credentials(&node, &exporter.container),
    );
    assert_eq!(key, NODE_ACCESS_KEY_ID);
}

const RAW: &str = env!("CARGO_BIN_EXE_k2i-raw");
/// The packet guard on the bridge ports: it must leave packets to the agent alone.
const GUARD: [&str; 4] = ["--host-interface", "k2i-h-+", "--packet-guard", "true"];

/// The attacker answers ARP for the victim's address and runs TCP by hand over AF_PACKET from it
/// to the agent's address, asking for `path`.
fn spoofed_request(
    node: &TestNode,
    attacker: &kube2iam_tests::Pod<'_>,
    victim: &kube2iam_tests::Pod<'_>,
    path: &str,
) -> ProbeResult {
    let gateway_mac = node.link_mac(BRIDGE);
    let args = [
        "http".to_owned(),
        "eth0".to_owned(),
        gateway_mac,
        attacker.gateway4().to_string(),
        victim.ip4().to_string(),
        HOST_IP4.to_string(),
        AGENT_PORT.to_string(),
        path.to_owned(),
    ];
    let output = output_within(
        attacker.command(RAW).args(&args),
        Duration::from_secs(30),
        "k2i-raw http",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    ProbeResult::from_json(line).unwrap_or_else(|e| {
        panic!(
            "k2i-raw {args:?} printed unparsable JSON ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The node's neighbour entry for `ip` on the bridge: its MAC, if any.
fn bridge_neighbour(node: &TestNode, ip: std::net::Ipv4Addr) -> Option<String> {
    let output = output_within(
        Command::new("ip").args([
            "-n",
            node.netns_name(),
            "-j",
            "neigh",
            "show",
            &ip.to_string(),
            "dev",
            BRIDGE,
        ]),
        Duration::from_secs(10),
        "ip neigh show",
    );
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    entries[0]["lladdr"].as_str().map(str::to_owned)
}

#[test]
fn on_a_bridge_a_pod_that_takes_its_neighbours_address_over_af_packet_gets_nothing() {
    let node = TestNode::new_bridged();
    let off: Vec<&str> = GUARD
        .iter()
        .copied()
        .chain(["--identity-attestation", "off"])
        .collect();
    let mut world = World::start(&node, &off);
    let (victim, attacker) = victim_and_attacker(&world, &node);
    assert_eq!(
        victim.gateway4(),
        attacker.gateway4(),
        "one subnet, one gateway on the bridge"
    );
    let victim_key = served(&world, "victim over the bridge", pod_credentials(&victim));
    assert_eq!(
        Some(victim_key.clone()),
        world.moto_key_for(&role_arn("victim-role"))
    );
    // The attacker's own kernel must not answer for the victim's address (it would reset the
    // handshake); AF_PACKET sees the frames before this rule.
    let rule = format!(
        "add table ip k2i_spoof; add chain ip k2i_spoof pre {{ type filter hook prerouting \
         priority -300; policy accept; }}; add rule ip k2i_spoof pre ip daddr {} drop",
        victim.ip4()
    );
    let output = output_within(
        Command::new("ip").args(["netns", "exec", attacker.netns_name(), "nft", &rule]),
        Duration::from_secs(10),
        "nft",
    );
    assert!(
        output.status.success(),
        "nft in the attacker's namespace: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = format!("{CREDS}victim-role");

    // Without attestation the address is all the agent has: the attack works, so this test
    // would see a bypass.
    let result = spoofed_request(&node, &attacker, &victim, &path);
    assert_eq!(
        bridge_neighbour(&node, victim.ip4()),
        Some(attacker.mac()),
        "the node's neighbour entry for the victim points at the attacker"
    );
    assert!(
        result.ok && result.status() == Some(200),
        "with --identity-attestation off the spoofed handshake is served: {result:?}\nagent \
         log:\n{}",
        world.agent.log()
    );
    assert!(
        result.http_body().is_some_and(|b| b.contains(&victim_key)),
        "and it gets the victim's credentials: {result:?}"
    );

    for mode in ["prefer", "require"] {
        world.kill_agent();
        let args: Vec<&str> = GUARD
            .iter()
            .copied()
            .chain(["--identity-attestation", mode])
            .collect();
        world.start_agent(&node, &args, false, true);
        world.wait_known(&node, &victim);
        assert!(
            world.agent.log().lines().any(|l| {
                l.contains("packet guards on the node's interfaces") && l.contains("k2i-h-attacker")
            }),
            "{mode}: the packet guard sits on the attacker's bridge port:\n{}",
            world.agent.log()
        );
        let result = spoofed_request(&node, &attacker, &victim, &path);
        assert_eq!(
            result.status(),
            Some(403),
            "{mode}: the spoofed handshake reaches the agent and is refused: {result:?}\nagent \
             log:\n{}",
            world.agent.log()
        );
        let body = result.http_body().unwrap_or_default();
        assert!(
            body.contains("did not come through the metadata redirect"),
            "{mode}: {body}"
        );
        assert!(
            !body.contains(&victim_key) && !body.contains("AccessKeyId"),
            "{mode}: no credentials reach the attacker: {body}"
        );
        assert!(
            metric(
                &world,
                &node,
                "kube2iam_connections_total{kind=\"unattested\"}"
            ) >= 1.0,
            "{mode}: the agent counted an unattested connection"
        );
    }
    world.imds.assert_no_pod_seen(&[&victim, &attacker]);
}

#[test]
fn with_attestation_off_the_kernel_records_nothing_and_with_it_on_again_every_connect() {
    let node = TestNode::new();
    let mut world = World::start(&node, &["--identity-attestation", "off"]);
    let pod = node.add_pod("a");
    world.api.add_pod(
        objects::pod("shop", "web", NODE_NAME, pod.ip4(), Some(pod.ip6()))
            .annotate(ROLE_KEY, "web-role"),
    );
    world.wait_known(&node, &pod);
    let attested = || kube2iam_tests::maps::counter(&node.pin_path(), Counter::Attested);
    let key = served(&world, "off", pod_credentials(&pod));
    assert_eq!(Some(key), world.moto_key_for(&role_arn("web-role")));
    assert_eq!(
        attested(),
        0,
        "nothing reads the records with attestation off, so connects make none"
    );

    world.kill_agent();
    world.start_agent(&node, &["--identity-attestation", "prefer"], false, true);
    served(&world, "prefer", pod_credentials(&pod));
    assert!(
        attested() > 0,
        "with attestation on again the redirected connects are recorded"
    );
    world.imds.assert_no_pod_seen(&[&pod]);
}
