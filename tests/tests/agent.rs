//! End-to-end: the real agent serving pods in a test node, against the IMDS emulator (the
//! node's metadata service), moto (STS) behind the fault proxy, and the Kubernetes API emulator.
//! Real clients run in the pods: curl with the IMDSv2 token dance, botocore's instance-metadata
//! provider, and aws-config's IMDS provider. Every test checks that no pod reached the node's
//! metadata service and that no pod got the node's credentials.

use kube2iam_tests::{
    TestNode,
    clients::{self, RunIn},
    e2e::{ROLE_KEY, World, role_arn},
};

#[test]
fn annotated_pod_gets_its_roles_credentials_from_every_client() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "web", &[(ROLE_KEY, "web-role")]);

    let (listed, curl) =
        clients::curl_imdsv2_credentials(RunIn::Pod(&pod), clients::IMDS_ENDPOINT4)
            .unwrap_or_else(|e| panic!("curl: {e}\nagent log:\n{}", world.agent.log()));
    assert_eq!(
        listed, "web-role",
        "the listing names the role as kube2iam does"
    );
    assert_eq!(curl.code, "Success");
    assert_eq!(curl.kind, "AWS-HMAC");
    let botocore = clients::botocore_imds_credentials(RunIn::Pod(&pod), false)
        .into_result()
        .unwrap_or_else(|e| panic!("botocore: {e:?}\nagent log:\n{}", world.agent.log()));
    let sdk = clients::sdk_imds_credentials(RunIn::Pod(&pod), false)
        .into_result()
        .unwrap_or_else(|e| panic!("aws-config: {e:?}\nagent log:\n{}", world.agent.log()));

    let issued = world
        .moto_key_for(&role_arn("web-role"))
        .expect("moto issued credentials for web-role");
    assert_eq!(
        curl.access_key_id, issued,
        "curl got the role's credentials"
    );
    assert_eq!(botocore.access_key_id, issued);
    assert_eq!(sdk.access_key_id, issued);
    let calls = world.sts.assume_role_calls();
    assert_eq!(
        calls.len(),
        1,
        "one AssumeRole serves every client: {calls:?}"
    );
    assert_eq!(calls[0].session_name, "kube2iam-node-a");
    world.assert_no_leak(&[&pod], &[&botocore, &sdk]);
}

use std::time::{Duration, Instant};

use kube2iam_tests::{
    FaultMode,
    clients::ClientCredentials,
    e2e::{
        ALLOWED_KEY, CREDS, EXTERNAL_ID_KEY, KeptConnection, pod_credentials, pod_get, pod_request,
        until_new_connections_get,
    },
    imds, kube_api,
};

#[test]
fn two_pods_with_two_roles_never_see_each_others_credentials() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let a = world.add_known_pod(&node, "a", "default", "alpha", &[(ROLE_KEY, "alpha-role")]);
    let b = world.add_known_pod(&node, "b", "default", "beta", &[(ROLE_KEY, "beta-role")]);
    let got_a = world.creds(&a);
    let got_b = world.creds(&b);
    assert_eq!(
        Some(got_a.access_key_id.clone()),
        world.moto_key_for(&role_arn("alpha-role"))
    );
    assert_eq!(
        Some(got_b.access_key_id.clone()),
        world.moto_key_for(&role_arn("beta-role"))
    );
    assert_ne!(got_a.access_key_id, got_b.access_key_id);
    // Each pod asking for the other's role is refused.
    let (status, body) = pod_get(&a, &format!("{CREDS}beta-role"), &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("default/alpha has role alpha-role, not beta-role"),
        "{body}"
    );
    world.assert_no_leak(
        &[&a, &b],
        &[
            &ClientCredentials::from(&got_a),
            &ClientCredentials::from(&got_b),
        ],
    );
}

#[test]
fn unannotated_pod_gets_the_default_role_or_a_clear_404() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "plain", &[]);
    let (status, body) = pod_get(&pod, CREDS, &[]);
    assert_eq!(status, 404);
    assert!(
        body.contains("default/plain has no iam.amazonaws.com/role annotation")
            && body.contains("--default-role"),
        "{body}"
    );
    drop(world);

    let node = TestNode::new();
    let world = World::start(&node, &["--default-role", "fallback-role"]);
    let pod = world.add_known_pod(&node, "a", "default", "plain", &[]);
    let got = world.creds(&pod);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("fallback-role"))
    );
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

fn restricted_world(node: &TestNode, format: &str, patterns: &str) -> World {
    let world = World::start(
        node,
        &[
            "--namespace-restrictions",
            "--namespace-restriction-format",
            format,
        ],
    );
    world
        .api
        .add_namespace(kube_api::namespace("team").annotate(ALLOWED_KEY, patterns));
    world
}

#[test]
fn namespace_restrictions_allow_and_deny_with_globs() {
    let node = TestNode::new();
    let world = restricted_world(&node, "glob", r#"["web-*"]"#);
    let ok = world.add_known_pod(&node, "a", "team", "web", &[(ROLE_KEY, "web-frontend")]);
    let denied = world.add_known_pod(&node, "b", "team", "admin", &[(ROLE_KEY, "admin-role")]);
    let got = world.creds(&ok);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-frontend"))
    );
    let (status, body) = pod_get(&denied, CREDS, &[]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("team/admin has role arn:aws:iam::123456789012:role/admin-role, but namespace team allows only [\"web-*\"]")
            && body.contains(ALLOWED_KEY),
        "{body}"
    );
    assert!(
        world.moto_key_for(&role_arn("admin-role")).is_none(),
        "a denied role is never assumed"
    );
    world.assert_no_leak(&[&ok, &denied], &[&ClientCredentials::from(&got)]);
}

#[test]
fn namespace_restrictions_with_regexps_are_anchored() {
    let node = TestNode::new();
    let world = restricted_world(&node, "regexp", r#"["web-[0-9]+"]"#);
    let ok = node.add_pod("a");
    let sneaky = node.add_pod("b");
    world.add_pod(&ok, "team", "web", &[(ROLE_KEY, "web-42")]);
    // kube2iam's unanchored match would let this through.
    world.add_pod(&sneaky, "team", "sneaky", &[(ROLE_KEY, "web-42-admin")]);
    world.wait_known(&node, &ok);
    world.wait_known(&node, &sneaky);
    let got = world.creds(&ok);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-42"))
    );
    let (status, body) = pod_get(&sneaky, CREDS, &[]);
    assert_eq!(status, 403, "{body}");
    // A namespace without the annotation allows nothing.
    world.api.add_namespace(kube_api::namespace("bare"));
    let bare = world.add_known_pod(&node, "c", "bare", "x", &[(ROLE_KEY, "web-1")]);
    let (status, body) = pod_get(&bare, CREDS, &[]);
    assert_eq!(status, 403);
    assert!(
        body.contains("namespace bare has no iam.amazonaws.com/allowed-roles annotation"),
        "{body}"
    );
    world.assert_no_leak(&[&ok, &sneaky, &bare], &[&ClientCredentials::from(&got)]);
}

#[test]
fn cross_account_full_arn_is_assumed_and_listed_in_full() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = node.add_pod("a");
    let other = "arn:aws:iam::210987654321:role/team/shared";
    world.add_pod(&pod, "default", "x", &[(ROLE_KEY, other)]);
    world.wait_known(&node, &pod);
    let (status, listed) = pod_get(&pod, CREDS, &[]);
    assert_eq!(
        (status, listed.as_str()),
        (200, other),
        "another account's role is listed as its ARN"
    );
    let got = world.creds(&pod);
    assert_eq!(Some(got.access_key_id.clone()), world.moto_key_for(other));
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn external_id_reaches_sts() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(
        &node,
        "a",
        "default",
        "x",
        &[(ROLE_KEY, "vendor"), (EXTERNAL_ID_KEY, "ext-1234")],
    );
    let got = world.creds(&pod);
    let calls = world.moto.assume_role_calls();
    let call = calls
        .iter()
        .find(|c| c.role_arn == role_arn("vendor"))
        .expect("an AssumeRole for vendor");
    assert_eq!(call.external_id.as_deref(), Some("ext-1234"));
    assert_eq!(
        call.access_key_id.as_deref(),
        Some(got.access_key_id.as_str())
    );
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn a_pod_created_while_its_first_request_waits_gets_credentials() {
    let node = TestNode::new();
    let world = World::start(&node, &["--pod-wait", "5s"]);
    let pod = node.add_pod("a");
    std::thread::scope(|scope| {
        let request = scope.spawn(|| pod_credentials(&pod));
        std::thread::sleep(Duration::from_millis(500));
        world.add_pod(&pod, "default", "late", &[(ROLE_KEY, "late-role")]);
        let got = request
            .join()
            .expect("request thread")
            .unwrap_or_else(|e| panic!("the waiting request failed: {e:?}\n{}", world.agent.log()));
        assert_eq!(
            Some(got.access_key_id.clone()),
            world.moto_key_for(&role_arn("late-role"))
        );
        world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
    });
}

#[test]
fn a_deleted_pods_address_gets_a_404() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "gone", &[(ROLE_KEY, "gone-role")]);
    world.creds(&pod);
    world.api.delete_pod("default", "gone");
    let ip = pod.ip4().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while world.debug_store(&node).contains(&ip) {
        assert!(Instant::now() < deadline, "the agent kept the deleted pod");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = pod_get(&pod, CREDS, &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(&format!("no pod with IP {ip} on node node-a")),
        "{body}"
    );
    world.assert_no_leak(&[&pod], &[]);
}

#[test]
fn a_reused_address_gets_the_new_pods_role_never_the_old_ones() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "old", &[(ROLE_KEY, "old-role")]);
    let old = world.creds(&pod);
    // The new pod appears before the old one's deletion is seen: the newer pod owns the address.
    std::thread::sleep(Duration::from_millis(1100));
    world.add_pod(&pod, "default", "new", &[(ROLE_KEY, "new-role")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !world.debug_store(&node).contains("\"new\"") {
        assert!(Instant::now() < deadline, "the agent never saw the new pod");
        std::thread::sleep(Duration::from_millis(20));
    }
    let new = world.creds(&pod);
    assert_eq!(
        Some(new.access_key_id.clone()),
        world.moto_key_for(&role_arn("new-role"))
    );
    world.api.delete_pod("default", "old");
    std::thread::sleep(Duration::from_millis(300));
    let after = world.creds(&pod);
    assert_eq!(
        after.access_key_id, new.access_key_id,
        "deleting the old pod keeps the new owner"
    );
    assert_ne!(after.access_key_id, old.access_key_id);
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&new)]);
}

/// Fires `count` concurrent credential GETs from the pod (new connection each) with python.
fn concurrent_gets(pod: &kube2iam_tests::Pod<'_>, path: &str, count: usize) -> Vec<u16> {
    let script = r#"
import sys, http.client, concurrent.futures
path, count = sys.argv[1], int(sys.argv[2])
def get(_):
    try:
        c = http.client.HTTPConnection("169.254.169.254", 80, timeout=30)
        c.request("GET", path)
        r = c.getresponse(); r.read(); c.close()
        return r.status
    except Exception:
        return 0
with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
    print(" ".join(str(s) for s in pool.map(get, range(count))))
"#;
    let output = kube2iam_tests::process::output_within(
        pod.command("python3")
            .args(["-c", script, path, &count.to_string()]),
        Duration::from_secs(120),
        "concurrent gets",
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

#[test]
fn a_thousand_concurrent_cold_requests_make_exactly_one_assume_role() {
    let node = TestNode::new();
    // No prefetch: the herd itself is the first to ask.
    let world = World::start(&node, &["--prefetch-concurrency", "0"]);
    let pod = world.add_known_pod(&node, "a", "default", "herd", &[(ROLE_KEY, "herd-role")]);
    assert_eq!(
        world.sts.assume_role_count(),
        0,
        "nothing cached before the herd"
    );
    // Keep the one STS call in flight while the herd arrives.
    world
        .sts
        .set_mode(FaultMode::Slow(Duration::from_millis(1500)));
    let started = Instant::now();
    let statuses = concurrent_gets(&pod, &format!("{CREDS}herd-role"), 1000);
    eprintln!(
        "1000 concurrent cold requests answered in {:?}",
        started.elapsed()
    );
    assert_eq!(statuses.len(), 1000);
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert_eq!(
        world.sts.assume_role_count(),
        1,
        "the herd must share one AssumeRole: {:?}",
        world.sts.assume_role_calls()
    );
    world.assert_no_leak(&[&pod], &[]);
}

#[test]
fn sts_throttled_or_down_serves_cached_credentials_and_a_clear_5xx_without_them() {
    let node = TestNode::new();
    // Always inside the refresh window, so every request tries STS again in the background.
    let world = World::start(
        &node,
        &["--refresh-before", "1h", "--unchecked-refresh-before"],
    );
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "cached-role")]);
    let good = world.creds(&pod);
    for mode in [FaultMode::Throttle, FaultMode::Refuse] {
        world.sts.set_mode(mode.clone());
        let before = world.sts.call_count();
        for _ in 0..3 {
            let got = world.creds(&pod);
            assert_eq!(
                got.access_key_id, good.access_key_id,
                "cached credentials while STS is {mode:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if mode == FaultMode::Throttle {
            assert!(
                world.sts.call_count() > before,
                "the agent did try STS while throttled"
            );
        }
    }
    // A role with nothing cached: a clear error naming STS.
    world.sts.set_mode(FaultMode::Throttle);
    let other = world.add_known_pod(&node, "b", "default", "y", &[(ROLE_KEY, "uncached-role")]);
    let (status, body) = pod_get(&other, &format!("{CREDS}uncached-role"), &[]);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("STS throttled") && body.contains("default/y"),
        "{body}"
    );
    world.sts.set_mode(FaultMode::Refuse);
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = pod_get(&other, &format!("{CREDS}uncached-role"), &[]);
    assert!(status == 502 || status == 503, "{status} {body}");
    assert!(body.contains("STS"), "{body}");
    world.assert_no_leak(&[&pod, &other], &[&ClientCredentials::from(&good)]);
}

#[test]
fn upstream_imds_down_gives_502_on_proxied_paths_while_credentials_are_served() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    let good = world.creds(&pod);
    let (status, body) = pod_get(&pod, "/latest/meta-data/instance-id", &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, kube2iam_tests::imds::INSTANCE_ID)
    );
    world.imds.set_down(true);
    let (status, body) = pod_get(&pod, "/latest/meta-data/instance-id", &[]);
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("169.254.169.254:80"),
        "the 502 names the upstream: {body}"
    );
    let got = world.creds(&pod);
    assert_eq!(got.access_key_id, good.access_key_id);
    world.imds.set_down(false);
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn every_blocked_path_and_its_spellings_stay_blocked() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    for path in [
        "/latest/user-data",
        "/latest/user-data/",
        "/2009-04-04/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/iam/security-credentials/../../user-data",
        "/latest/meta-data/iam/security-credentials/../../../latest/user-data",
        "/latest/meta-data/iam/security-credentials/%2e%2e/%2e%2e/%2e%2e/latest/user-data",
        "/latest/meta-data/iam/security-credentials/%252e%252e/%252e%252e/%252e%252e/latest/user-data",
        "/latest/meta-data/iam/security-credentials/..%2f..%2f..%2flatest%2fuser-data",
        "//latest//user-data",
        "/latest/./user-data",
        "/LATEST/USER-DATA",
        "/latest/%75ser-data",
        "/latest/meta-data/iam/unknown",
    ] {
        let (status, body) = pod_get(&pod, path, &[]);
        assert_eq!(status, 403, "{path}: {status} {body}");
        assert!(
            body.contains("--allow-path"),
            "{path}: the answer names the flag: {body}"
        );
    }
    let upstream_saw: Vec<_> = world
        .imds
        .callers()
        .into_iter()
        .filter(|c| {
            c.path.to_ascii_lowercase().contains("user-data")
                || c.path.contains("identity-credentials")
        })
        .collect();
    assert!(
        upstream_saw.is_empty(),
        "blocked paths reached upstream: {upstream_saw:?}"
    );
    world.assert_no_leak(&[&pod], &[]);
}

/// Whether a path, as a lenient server reads it ([`imds::lenient_path`]), is the node's: its IAM
/// role, its identity credentials, its user-data or its signed instance identity.
fn names_node_data(path: &str) -> bool {
    let read = imds::lenient_path(path);
    let rest = read.splitn(3, '/').nth(2).unwrap_or("");
    rest.starts_with("meta-data/iam")
        || rest.starts_with("meta-data/identity-credentials")
        || rest.starts_with("user-data")
        || ["pkcs7", "signature", "rsa2048"]
            .iter()
            .any(|s| rest.starts_with(&format!("dynamic/instance-identity/{s}")))
}

/// Issue 11: spellings of the node's credentials and signed identity that the agent used to
/// forward with its own token. The node's metadata service here reads paths leniently (no
/// version, `;params`, a decoded `?`, trailing dots, any case), so each of them would have come
/// back with the node's credentials or identity; instead none reaches it, and the metadata any
/// pod may read still does.
#[test]
fn node_credentials_and_signed_identity_never_leave_the_node_under_any_spelling() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    world.imds.set_lenient(true);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    let before = world.imds.callers().len();
    let sentinels = [
        imds::NODE_ACCESS_KEY_ID,
        imds::NODE_IDENTITY_ACCESS_KEY_ID,
        imds::NODE_SIGNATURE_SENTINEL,
        "node secrets live here",
    ];
    for path in [
        "/meta-data/iam/security-credentials/",
        "/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/iam;x/security-credentials/",
        "/latest/meta-data/iam;x/security-credentials/node-role",
        "/latest/meta-data/iam%3F/security-credentials/",
        "/latest/meta-data/iam./security-credentials/",
        "/latest/meta-data/iam./security-credentials/node-role",
        "/latest/meta-data/iam/security-credentials;x/node-role",
        "/latest/meta-data/iam/info.",
        "/x/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/identity-credentials;x/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/signature",
        "/latest/dynamic/instance-identity/rsa2048",
        "/latest/dynamic/instance-identity/RSA2048;x",
        "/1.0/dynamic/instance-identity/pkcs7",
        "/latest/user-data;x",
        "/latest/user-data.",
        "/latest/meta-data/public-keys/0/openssh-key",
    ] {
        let (status, body) = pod_get(&pod, path, &[]);
        assert_eq!(status, 403, "{path}: {status} {body}");
        assert!(body.contains("--allow-path"), "{path}: {body}");
        for sentinel in sentinels {
            assert!(!body.contains(sentinel), "LEAK: {path} answered {body}");
        }
    }
    // `1.0` is a real version: the agent answers its IAM paths itself, with the pod's role.
    let (status, listed) = pod_get(&pod, "/1.0/meta-data/iam/security-credentials/", &[]);
    assert_eq!((status, listed.as_str()), (200, "web-role"));
    let (status, body) = pod_get(
        &pod,
        "/1.0/meta-data/iam/security-credentials/node-role",
        &[],
    );
    assert_eq!(status, 404, "not the pod's role: {body}");
    assert!(!body.contains(imds::NODE_ACCESS_KEY_ID), "LEAK: {body}");
    // What any pod may read still comes from the node's metadata service.
    for (path, expected) in [
        ("/latest/meta-data/instance-id", imds::INSTANCE_ID),
        ("/latest/meta-data/placement/region", imds::REGION),
        (
            "/latest/meta-data/placement/availability-zone",
            imds::AVAILABILITY_ZONE,
        ),
    ] {
        assert_eq!(
            pod_get(&pod, path, &[]),
            (200, expected.to_owned()),
            "{path}"
        );
    }
    let (status, document) = pod_get(&pod, "/latest/dynamic/instance-identity/document", &[]);
    assert_eq!(status, 200, "{document}");
    assert!(document.contains(imds::INSTANCE_ID), "{document}");

    let seen: Vec<String> = world.imds.callers()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        seen.iter()
            .any(|p| p == "/latest/meta-data/placement/availability-zone"),
        "the emulator recorded the forwarded reads: {seen:?}"
    );
    // The agent's own STS credentials come from the node's role at the canonical paths; the
    // pod never asked for those, and nothing else of the node's may have been asked for.
    let own = [
        "/latest/meta-data/iam/security-credentials/",
        &format!(
            "/latest/meta-data/iam/security-credentials/{}",
            imds::NODE_ROLE
        ),
        "/latest/meta-data/iam/info",
    ];
    let forwarded: Vec<&String> = seen
        .iter()
        .filter(|p| names_node_data(p) && !own.contains(&p.as_str()))
        .collect();
    assert!(
        forwarded.is_empty(),
        "LEAK: the node's metadata service was asked for {forwarded:?}\nagent log:\n{}",
        world.agent.log()
    );
    world.assert_no_leak(&[&pod], &[]);
}

#[test]
fn imds_tokens_required_rejects_tokenless_gets_and_binds_tokens_to_the_pod() {
    let node = TestNode::new();
    let world = World::start(&node, &["--imds-tokens", "required"]);
    let a = world.add_known_pod(&node, "a", "default", "a", &[(ROLE_KEY, "web-role")]);
    let b = world.add_known_pod(&node, "b", "default", "b", &[(ROLE_KEY, "web-role")]);
    let (status, _) = pod_get(&a, CREDS, &[]);
    assert_eq!(status, 401, "token-less GETs are refused");
    let ttl = ("X-aws-ec2-metadata-token-ttl-seconds", "60");
    let (status, token) = pod_request(&a, "PUT", "/latest/api/token", &[ttl]);
    assert_eq!(status, 200);
    let (status, listed) = pod_get(&a, CREDS, &[("X-aws-ec2-metadata-token", &token)]);
    assert_eq!((status, listed.as_str()), (200, "web-role"));
    // Another pod presenting a's token is refused.
    let (status, _) = pod_get(&b, CREDS, &[("X-aws-ec2-metadata-token", &token)]);
    assert_eq!(status, 401, "a token is bound to the pod it was issued to");
    // IMDS rules for the token PUT.
    let (status, _) = pod_request(
        &a,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21601")],
    );
    assert_eq!(status, 400);
    let (status, _) = pod_request(
        &a,
        "PUT",
        "/latest/api/token",
        &[ttl, ("X-Forwarded-For", "1.2.3.4")],
    );
    assert_eq!(status, 403);
    // Real clients do the dance and succeed.
    let sdk = clients::sdk_imds_credentials(RunIn::Pod(&a), false)
        .into_result()
        .expect("aws-config with tokens");
    let boto = clients::botocore_imds_credentials(RunIn::Pod(&b), false)
        .into_result()
        .expect("botocore with tokens");
    world.assert_no_leak(&[&a, &b], &[&sdk, &boto]);
}

#[test]
fn a_pod_that_appears_is_prefetched_before_it_asks() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = node.add_pod("a");
    world.add_pod(&pod, "default", "early", &[(ROLE_KEY, "early-role")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while world.sts.assume_role_count() == 0 {
        assert!(Instant::now() < deadline, "no prefetch happened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = world.creds(&pod);
    assert_eq!(
        world.sts.assume_role_count(),
        1,
        "the request was answered from the prefetch"
    );
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("early-role"))
    );
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn a_restarted_agent_serves_known_pods_from_the_pinned_map() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    world.creds(&pod);
    world.kill_agent();
    // With the agent gone, pods fail closed: refused at the agent's address.
    let (status, _) = pod_get(&pod, CREDS, &[]);
    assert_eq!(status, 0, "no answer while the agent is down");
    // The API server is down too: only the pinned map can tell the new agent who the pod is.
    world.api.set_down(true);
    let started = Instant::now();
    world.start_agent(&node, &[], false, false);
    let got = world.creds(&pod);
    eprintln!("restart to first served request: {:?}", started.elapsed());
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-role"))
    );
    world.api.set_down(false);
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn watch_disconnects_and_410_gone_relist_without_dropping_pods() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "steady", &[(ROLE_KEY, "web-role")]);
    let good = world.creds(&pod);
    // A plain disconnect: the watch resumes and sees what comes next.
    world.api.drop_watches();
    let resumed = world.add_known_pod(&node, "c", "default", "resumed", &[(ROLE_KEY, "web-role")]);
    let lists_before = world.api.list_count(kube_api::Resource::Pods);
    // The watch drops (API down), things change meanwhile, and history is compacted: the
    // resumed watch gets 410 Gone and the agent must relist.
    world.api.set_down(true);
    let later = node.add_pod("b");
    world.add_pod(&later, "default", "later", &[(ROLE_KEY, "later-role")]);
    world.api.compact();
    // Served from what the agent already knows while the API is down.
    let during = world.creds(&pod);
    assert_eq!(during.access_key_id, good.access_key_id);
    world.api.set_down(false);
    world.wait_known(&node, &later);
    assert!(
        world.api.list_count(kube_api::Resource::Pods) > lists_before,
        "the agent should have relisted after 410 Gone"
    );
    let still = world.creds(&pod);
    assert_eq!(
        still.access_key_id, good.access_key_id,
        "the steady pod was never dropped"
    );
    let got_later = world.creds(&later);
    assert_eq!(
        Some(got_later.access_key_id.clone()),
        world.moto_key_for(&role_arn("later-role"))
    );
    world.assert_no_leak(
        &[&pod, &later, &resumed],
        &[
            &ClientCredentials::from(&still),
            &ClientCredentials::from(&got_later),
        ],
    );
}

#[test]
fn ipv6_pods_get_credentials_through_fd00_ec2_254() {
    let node = TestNode::new();
    let world = World::start_with(&node, &[], true);
    let pod = world.add_known_pod(&node, "a", "default", "v6", &[(ROLE_KEY, "v6-role")]);
    let sdk = clients::sdk_imds_credentials(RunIn::Pod(&pod), true)
        .into_result()
        .unwrap_or_else(|e| panic!("aws-config over IPv6: {e:?}\n{}", world.agent.log()));
    let boto = clients::botocore_imds_credentials(RunIn::Pod(&pod), true)
        .into_result()
        .unwrap_or_else(|e| panic!("botocore over IPv6: {e:?}\n{}", world.agent.log()));
    let issued = world.moto_key_for(&role_arn("v6-role"));
    assert_eq!(Some(sdk.access_key_id.clone()), issued);
    assert_eq!(Some(boto.access_key_id.clone()), issued);
    world.assert_no_leak(&[&pod], &[&sdk, &boto]);
}

#[test]
fn session_per_pod_names_sessions_after_the_pod_and_caches_per_pod() {
    let node = TestNode::new();
    let world = World::start(&node, &["--session-per-pod"]);
    let a = world.add_known_pod(&node, "a", "default", "web-1", &[(ROLE_KEY, "web-role")]);
    let b = world.add_known_pod(&node, "b", "default", "web-2", &[(ROLE_KEY, "web-role")]);
    let got_a = world.creds(&a);
    let got_b = world.creds(&b);
    assert_ne!(
        got_a.access_key_id, got_b.access_key_id,
        "one session per pod"
    );
    let mut sessions: Vec<_> = world
        .moto
        .assume_role_calls()
        .into_iter()
        .map(|c| c.session_name)
        .collect();
    sessions.sort();
    sessions.dedup();
    assert_eq!(
        sessions,
        vec!["default.web-1".to_owned(), "default.web-2".to_owned()]
    );
    world.assert_no_leak(
        &[&a, &b],
        &[
            &ClientCredentials::from(&got_a),
            &ClientCredentials::from(&got_b),
        ],
    );
}

#[test]
fn malformed_and_oversized_annotations_get_clear_errors() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let cases = [
        (
            "bad-arn",
            "arn:aws:iam::12345:role/x".to_owned(),
            "12 digits",
        ),
        ("bad-name", "web role".to_owned(), "not a valid role name"),
        ("huge", "r".repeat(700), "no valid role ARN is that long"),
    ];
    let pods: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, _)| node.add_pod(&format!("p{i}")))
        .collect();
    for ((name, value, _), pod) in cases.iter().zip(&pods) {
        world.add_pod(pod, "default", name, &[(ROLE_KEY, value)]);
        world.wait_known(&node, pod);
    }
    for ((name, _, reason), pod) in cases.iter().zip(&pods) {
        let (status, body) = pod_get(pod, CREDS, &[]);
        assert_eq!(status, 403, "{name}: {body}");
        assert!(
            body.contains(&format!("default/{name}")) && body.contains(reason),
            "{name}: {body}"
        );
    }
    assert_eq!(
        world.sts.assume_role_count(),
        0,
        "nothing is assumed for a malformed role"
    );
    let refs: Vec<_> = pods.iter().collect();
    world.assert_no_leak(&refs, &[]);
}

#[test]
fn auto_discovered_base_arn_comes_from_the_instance_profile() {
    let node = TestNode::new();
    // No --base-role-arn (the World leaves it out with this flag): a pod names a role relative
    // to the base discovered from the emulator's instance profile.
    let world = World::start(&node, &["--auto-discover-base-arn"]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "discovered")]);
    let got = world.creds(&pod);
    assert!(
        world.agent.log().contains("discovered the base role ARN"),
        "{}",
        world.agent.log()
    );
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("discovered"))
    );
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn sigterm_finishes_cleanly_and_keeps_interception() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    world.creds(&pod);
    let status = world.agent.terminate();
    assert!(
        status.success(),
        "SIGTERM is a clean exit: {status}\n{}",
        world.agent.log()
    );
    let (status, _) = pod_get(&pod, CREDS, &[]);
    assert_eq!(
        status, 0,
        "after the agent stops, pods are refused at its address (fail closed)"
    );
    assert!(
        node.pin_path().join("links").join("k2i_connect4").exists(),
        "pins stay"
    );
    world.assert_no_leak(&[&pod], &[]);
}

#[test]
fn a_kept_alive_connection_sees_each_change_to_its_pod_namespace_and_role_at_once() {
    let node = TestNode::new();
    let world = restricted_world(&node, "glob", r#"["web-*"]"#);
    let pod = world.add_known_pod(&node, "a", "team", "web", &[(ROLE_KEY, "web-frontend")]);
    let mut conn = KeptConnection::open(&pod);
    let creds_of = |role: &str| format!("{CREDS}{role}");
    let key_in = |body: &str| -> String {
        let doc: serde_json::Value = serde_json::from_str(body).expect("a credential document");
        doc["AccessKeyId"].as_str().expect("a key").to_owned()
    };
    assert_eq!(conn.get(CREDS), (200, "web-frontend".to_owned()));
    let (status, body) = conn.get(&creds_of("web-frontend"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        Some(key_in(&body)),
        world.moto_key_for(&role_arn("web-frontend"))
    );

    // The pod's role changes: the next request on the same connection has the new role only.
    world
        .api
        .annotate_pod("team", "web", ROLE_KEY, Some("web-backend"));
    until_new_connections_get(&world, &pod, &creds_of("web-backend"), 200);
    assert_eq!(conn.get(CREDS), (200, "web-backend".to_owned()));
    let (status, body) = conn.get(&creds_of("web-frontend"));
    assert_eq!(status, 404, "the old role, on the kept connection: {body}");
    let (status, body) = conn.get(&creds_of("web-backend"));
    assert_eq!(status, 200, "{body}");
    let backend = key_in(&body);
    assert_eq!(
        Some(backend.clone()),
        world.moto_key_for(&role_arn("web-backend"))
    );

    // The namespace stops allowing it, then allows it again.
    world
        .api
        .annotate_namespace("team", ALLOWED_KEY, Some(r#"["db-*"]"#));
    until_new_connections_get(&world, &pod, &creds_of("web-backend"), 403);
    let (status, body) = conn.get(&creds_of("web-backend"));
    assert_eq!(status, 403, "a role the namespace no longer allows: {body}");
    assert_eq!(conn.get(CREDS).0, 403);
    world
        .api
        .annotate_namespace("team", ALLOWED_KEY, Some(r#"["web-*"]"#));
    until_new_connections_get(&world, &pod, &creds_of("web-backend"), 200);
    let (status, body) = conn.get(&creds_of("web-backend"));
    assert_eq!((status, key_in(&body)), (200, backend.clone()));

    // The pod is deleted: its address is no one's, on the kept connection too.
    world.api.delete_pod("team", "web");
    until_new_connections_get(&world, &pod, CREDS, 404);
    let (status, body) = conn.get(&creds_of("web-backend"));
    assert_eq!(status, 404, "a deleted pod's kept connection: {body}");
    world.assert_no_leak(&[&pod], &[]);
}
