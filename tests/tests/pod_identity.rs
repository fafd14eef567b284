//! What users of EKS Pod Identity and IRSA have, end to end: session tags on the AssumeRole
//! call (`--session-tags`, `--source-identity`) as the STS fault proxy records them over the
//! wire, and roles from ServiceAccounts (`--service-account-roles`) watched metadata-only from
//! the Kubernetes API emulator. Real clients run in the pods (curl, botocore's
//! instance-metadata provider, aws-config's IMDS provider); every test ends with the no-leak
//! checks.

use std::time::{Duration, Instant};

use kube2iam_tests::{
    FaultMode, Pod, TestNode,
    clients::{self, ClientCredentials, RunIn},
    e2e::{
        ALLOWED_KEY, CREDS, IRSA_KEY, KeptConnection, ROLE_KEY, World, pod_credentials, pod_get,
        role_arn,
    },
    faults::StsRequest,
    kube_api::{Resource, namespace, service_account},
};

const CLUSTER_ARN: &str = "arn:aws:eks:us-west-2:123456789012:cluster/k2i-test";
/// The agent's flags for EKS Pod Identity's session tags and source identity.
const POD_IDENTITY_FLAGS: [&str; 4] = [
    "--session-tags",
    "--cluster-arn",
    CLUSTER_ARN,
    "--source-identity",
];
/// The keys of the EKS User Guide's list of session tags EKS Pod Identity adds, in the order
/// the agent sends them.
const EKS_TAG_KEYS: [&str; 6] = [
    "eks-cluster-arn",
    "eks-cluster-name",
    "kubernetes-namespace",
    "kubernetes-service-account",
    "kubernetes-pod-name",
    "kubernetes-pod-uid",
];

/// The access key moto issued for the session named `session`.
fn moto_key_for_session(world: &World, session: &str) -> String {
    world
        .moto
        .assume_role_calls()
        .into_iter()
        .rev()
        .find(|c| c.session_name == session)
        .and_then(|c| c.access_key_id)
        .unwrap_or_else(|| panic!("moto issued nothing for session {session}"))
}

fn tag<'a>(request: &'a StsRequest, key: &str) -> Option<&'a str> {
    request
        .params
        .iter()
        .position(|(k, v)| k.ends_with(".Key") && v == key)
        .and_then(|i| {
            let value_param = request.params[i].0.replace(".Key", ".Value");
            request.param(&value_param)
        })
}

fn keys(request: &StsRequest) -> Vec<String> {
    request.tags().into_iter().map(|(k, _)| k).collect()
}

/// Polls the role listing from inside `pod` until it answers `expected` (status, body
/// containing), or panics at `within`. Returns how long it took.
fn listing_becomes(
    world: &World,
    pod: &Pod<'_>,
    expected: (u16, &str),
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = pod_get(pod, CREDS, &[]);
        if status == expected.0 && body.contains(expected.1) {
            return started.elapsed();
        }
        if started.elapsed() > within {
            panic!(
                "the listing did not become {expected:?} within {within:?}: {status} {body}\n\
                 agent log:\n{}",
                world.agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn session_tags_reach_sts_spelled_as_eks_pod_identity_with_one_session_per_pod() {
    let node = TestNode::new();
    let world = World::start(&node, &POD_IDENTITY_FLAGS);
    world
        .api
        .add_service_account(service_account("shop", "billing"));
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let uid_a = world.add_pod_of_account(
        &a,
        "shop",
        "web-1",
        "billing",
        &[(ROLE_KEY, "web-role")],
        &[],
    );
    let uid_b = world.add_pod_of_account(
        &b,
        "shop",
        "web-2",
        "billing",
        &[(ROLE_KEY, "web-role")],
        &[],
    );
    world.wait_known(&node, &a);
    world.wait_known(&node, &b);

    let botocore = clients::botocore_imds_credentials(RunIn::Pod(&a), false)
        .into_result()
        .unwrap_or_else(|e| panic!("botocore: {e:?}\nagent log:\n{}", world.agent.log()));
    let sdk = clients::sdk_imds_credentials(RunIn::Pod(&b), false)
        .into_result()
        .unwrap_or_else(|e| panic!("aws-config: {e:?}\nagent log:\n{}", world.agent.log()));
    let curl_a = world.creds(&a);
    assert_eq!(botocore.access_key_id, curl_a.access_key_id);
    assert_eq!(
        botocore.access_key_id,
        moto_key_for_session(&world, "shop.web-1")
    );
    assert_eq!(
        sdk.access_key_id,
        moto_key_for_session(&world, "shop.web-2")
    );
    assert_ne!(
        botocore.access_key_id, sdk.access_key_id,
        "pod-level tags make every session a pod's own"
    );

    let mut requests = world.sts.assume_role_requests();
    assert_eq!(
        requests.len(),
        2,
        "one AssumeRole per pod serves every client: {requests:?}"
    );
    requests.sort_by_key(|r| r.param("RoleSessionName").map(str::to_owned));
    for (request, (name, uid)) in requests.iter().zip([("web-1", &uid_a), ("web-2", &uid_b)]) {
        assert_eq!(
            request.param("RoleArn"),
            Some(role_arn("web-role").as_str())
        );
        assert_eq!(
            request.param("RoleSessionName"),
            Some(format!("shop.{name}").as_str())
        );
        assert_eq!(
            keys(request),
            EKS_TAG_KEYS,
            "the six keys, spelled as EKS spells them"
        );
        assert_eq!(
            request.transitive_tag_keys(),
            EKS_TAG_KEYS,
            "all transitive, as EKS Pod Identity sets them"
        );
        assert_eq!(tag(request, "eks-cluster-arn"), Some(CLUSTER_ARN));
        assert_eq!(tag(request, "eks-cluster-name"), Some("k2i-test"));
        assert_eq!(tag(request, "kubernetes-namespace"), Some("shop"));
        assert_eq!(tag(request, "kubernetes-service-account"), Some("billing"));
        assert_eq!(tag(request, "kubernetes-pod-name"), Some(name));
        assert_eq!(tag(request, "kubernetes-pod-uid"), Some(uid.as_str()));
        assert_eq!(
            request.source_identity(),
            Some(format!("shop.{name}").as_str())
        );
    }
    world.assert_no_leak(
        &[&a, &b],
        &[&botocore, &sdk, &ClientCredentials::from(&curl_a)],
    );
}

#[test]
fn service_account_tags_share_one_session_per_account_and_role() {
    let node = TestNode::new();
    let world = World::start(
        &node,
        &[
            "--session-tags",
            "service-account",
            "--cluster-arn",
            CLUSTER_ARN,
        ],
    );
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let c = node.add_pod("c");
    world.add_pod_of_account(
        &a,
        "shop",
        "web-1",
        "billing",
        &[(ROLE_KEY, "web-role")],
        &[],
    );
    world.add_pod_of_account(
        &b,
        "shop",
        "web-2",
        "billing",
        &[(ROLE_KEY, "web-role")],
        &[],
    );
    world.add_pod_of_account(
        &c,
        "shop",
        "report",
        "reports",
        &[(ROLE_KEY, "web-role")],
        &[],
    );
    for pod in [&a, &b, &c] {
        world.wait_known(&node, pod);
    }
    let got_a = clients::botocore_imds_credentials(RunIn::Pod(&a), false)
        .into_result()
        .unwrap_or_else(|e| panic!("botocore: {e:?}\nagent log:\n{}", world.agent.log()));
    let got_b = clients::sdk_imds_credentials(RunIn::Pod(&b), false)
        .into_result()
        .unwrap_or_else(|e| panic!("aws-config: {e:?}\nagent log:\n{}", world.agent.log()));
    let got_c = world.creds(&c);
    assert_eq!(
        got_a.access_key_id, got_b.access_key_id,
        "pods of one service account with one role share a session"
    );
    assert_ne!(
        got_a.access_key_id, got_c.access_key_id,
        "another service account is another session"
    );
    let requests = world.sts.assume_role_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let mut accounts: Vec<String> = requests
        .iter()
        .map(|r| {
            assert_eq!(keys(r), EKS_TAG_KEYS[..4], "no pod-level tags");
            assert_eq!(r.transitive_tag_keys(), EKS_TAG_KEYS[..4]);
            assert_eq!(r.param("RoleSessionName"), Some("kube2iam-node-a"));
            assert_eq!(r.source_identity(), None);
            tag(r, "kubernetes-service-account").unwrap().to_owned()
        })
        .collect();
    accounts.sort();
    assert_eq!(accounts, ["billing", "reports"]);
    world.assert_no_leak(
        &[&a, &b, &c],
        &[&got_a, &got_b, &ClientCredentials::from(&got_c)],
    );
}

#[test]
fn a_trust_policy_without_tag_session_or_set_source_identity_is_a_refusal_naming_it() {
    let node = TestNode::new();
    let world = World::start(&node, &POD_IDENTITY_FLAGS);
    world
        .sts
        .set_mode(FaultMode::TrustPolicyLacks("sts:TagSession"));
    let pod = world.add_known_pod(&node, "a", "shop", "web", &[(ROLE_KEY, "web-role")]);

    let (status, body) = pod_get(&pod, &format!("{CREDS}web-role"), &[]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("is not authorized to perform: sts:TagSession")
            && body.contains("--session-tags")
            && body.contains(&role_arn("web-role")),
        "the refusal names the action, the flag and the role: {body}"
    );
    let boto = clients::botocore_imds_credentials(RunIn::Pod(&pod), false);
    assert!(
        boto.clone().into_result().is_err(),
        "botocore got credentials from a refused AssumeRole: {boto:?}"
    );
    let events = world.api.events();
    assert!(
        events
            .iter()
            .any(|e| e.to_string().contains("sts:TagSession")),
        "a Warning Event on the pod names the action: {events:?}"
    );

    // Tags allowed, the source identity not: that action is named.
    world
        .sts
        .set_mode(FaultMode::TrustPolicyLacks("sts:SetSourceIdentity"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = pod_get(&pod, &format!("{CREDS}web-role"), &[]);
        if status == 403 && body.contains("sts:SetSourceIdentity") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal naming sts:SetSourceIdentity: {status} {body}\nagent log:\n{}",
            world.agent.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(body.contains("--source-identity"), "{body}");

    // The trust policy fixed: served, with no restart.
    world.sts.set_mode(FaultMode::PassThrough);
    let deadline = Instant::now() + Duration::from_secs(90);
    let doc = loop {
        match pod_credentials(&pod) {
            Ok(doc) => break doc,
            Err((status, body)) => assert!(
                Instant::now() < deadline,
                "not served after the fix: {status} {body}\nagent log:\n{}",
                world.agent.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(doc.access_key_id, moto_key_for_session(&world, "shop.web"));
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&doc)]);
}

fn accounts_world(node: &TestNode, extra: &[&str]) -> World {
    let mut args = vec!["--service-account-roles"];
    args.extend_from_slice(extra);
    World::start(node, &args)
}

#[test]
fn service_account_roles_serve_unannotated_pods_and_the_pod_annotation_wins() {
    let node = TestNode::new();
    let world = accounts_world(&node, &[]);
    world.api.add_service_account(
        service_account("shop", "billing").annotate(IRSA_KEY, &role_arn("billing-role")),
    );
    world
        .api
        .add_service_account(service_account("shop", "plain"));
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let c = node.add_pod("c");
    world.add_pod_of_account(&a, "shop", "api", "billing", &[], &[]);
    world.add_pod_of_account(&b, "shop", "own", "billing", &[(ROLE_KEY, "web-role")], &[]);
    world.add_pod_of_account(&c, "shop", "none", "plain", &[], &[]);
    for pod in [&a, &b, &c] {
        world.wait_known(&node, pod);
    }

    let (listed, curl) = clients::curl_imdsv2_credentials(RunIn::Pod(&a), clients::IMDS_ENDPOINT4)
        .unwrap_or_else(|e| panic!("curl: {e}\nagent log:\n{}", world.agent.log()));
    assert_eq!(listed, "billing-role");
    let botocore = clients::botocore_imds_credentials(RunIn::Pod(&a), false)
        .into_result()
        .unwrap_or_else(|e| panic!("botocore: {e:?}\nagent log:\n{}", world.agent.log()));
    let sdk = clients::sdk_imds_credentials(RunIn::Pod(&a), false)
        .into_result()
        .unwrap_or_else(|e| panic!("aws-config: {e:?}\nagent log:\n{}", world.agent.log()));
    let issued = world
        .moto_key_for(&role_arn("billing-role"))
        .expect("moto issued credentials for billing-role");
    assert_eq!(curl.access_key_id, issued);
    assert_eq!(botocore.access_key_id, issued);
    assert_eq!(sdk.access_key_id, issued);

    let own = world.creds(&b);
    assert_eq!(
        Some(own.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-role")),
        "the pod annotation wins over its service account's"
    );
    let (status, body) = pod_get(&c, CREDS, &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("service account plain has no eks.amazonaws.com/role-arn annotation"),
        "{body}"
    );

    // The agent watched ServiceAccounts metadata-only.
    let requests: Vec<_> = world
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == Some(Resource::ServiceAccounts))
        .collect();
    assert!(
        !requests.is_empty(),
        "the agent never asked for ServiceAccounts"
    );
    for request in &requests {
        assert!(
            request
                .accept
                .as_deref()
                .is_some_and(|a| a.contains("as=PartialObjectMetadata")),
            "{request:?}"
        );
    }
    world.assert_no_leak(
        &[&a, &b, &c],
        &[&botocore, &sdk, &ClientCredentials::from(&own)],
    );
}

#[test]
fn a_changed_service_account_annotation_reaches_its_pods_within_the_watch_latency() {
    let node = TestNode::new();
    let world = accounts_world(&node, &[]);
    world.api.add_service_account(
        service_account("shop", "billing").annotate(IRSA_KEY, &role_arn("billing-role")),
    );
    let pod = node.add_pod("a");
    world.add_pod_of_account(&pod, "shop", "api", "billing", &[], &[]);
    world.wait_known(&node, &pod);
    assert_eq!(pod_get(&pod, CREDS, &[]), (200, "billing-role".to_owned()));
    // A connection kept open across the changes sees each of them as new connections do.
    let mut kept = KeptConnection::open(&pod);
    assert_eq!(kept.get(CREDS), (200, "billing-role".to_owned()));

    world.api.annotate_service_account(
        "shop",
        "billing",
        IRSA_KEY,
        Some(&role_arn("billing-role-2")),
    );
    let took = listing_becomes(
        &world,
        &pod,
        (200, "billing-role-2"),
        Duration::from_secs(10),
    );
    eprintln!("the new service account role reached the pod after {took:?}");
    assert_eq!(kept.get(CREDS), (200, "billing-role-2".to_owned()));
    let doc = world.creds(&pod);
    assert_eq!(
        Some(doc.access_key_id.clone()),
        world.moto_key_for(&role_arn("billing-role-2"))
    );

    world
        .api
        .annotate_service_account("shop", "billing", IRSA_KEY, None);
    listing_becomes(
        &world,
        &pod,
        (404, "no eks.amazonaws.com/role-arn"),
        Duration::from_secs(10),
    );
    let (status, body) = kept.get(CREDS);
    assert_eq!(status, 404, "{body}");
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&doc)]);
}

#[test]
fn namespace_restrictions_apply_to_service_account_roles() {
    let node = TestNode::new();
    let world = accounts_world(&node, &["--namespace-restrictions"]);
    world
        .api
        .add_namespace(namespace("team").annotate(ALLOWED_KEY, r#"["web-*"]"#));
    world.api.add_service_account(
        service_account("team", "admin").annotate(IRSA_KEY, &role_arn("admin-role")),
    );
    world.api.add_service_account(
        service_account("team", "web").annotate(IRSA_KEY, &role_arn("web-api")),
    );
    let denied = node.add_pod("a");
    let allowed = node.add_pod("b");
    world.add_pod_of_account(&denied, "team", "admin", "admin", &[], &[]);
    world.add_pod_of_account(&allowed, "team", "web", "web", &[], &[]);
    world.wait_known(&node, &denied);
    world.wait_known(&node, &allowed);

    let (status, body) = pod_get(&denied, CREDS, &[]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("from service account admin's eks.amazonaws.com/role-arn annotation")
            && body.contains("allows only [\"web-*\"]"),
        "{body}"
    );
    assert!(
        world.moto_key_for(&role_arn("admin-role")).is_none(),
        "a denied role is never assumed"
    );
    let doc = world.creds(&allowed);
    assert_eq!(
        Some(doc.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-api"))
    );
    world.assert_no_leak(&[&denied, &allowed], &[&ClientCredentials::from(&doc)]);
}

#[test]
fn pods_with_the_webhooks_credentials_environment_are_left_to_it() {
    let node = TestNode::new();
    let world = accounts_world(&node, &[]);
    world.api.add_service_account(
        service_account("shop", "billing").annotate(IRSA_KEY, &role_arn("billing-role")),
    );
    let irsa = node.add_pod("a");
    let plain = node.add_pod("b");
    let pod_identity = node.add_pod("c");
    // What the EKS pod identity webhook injects into each container for IRSA.
    world.add_pod_of_account(
        &irsa,
        "shop",
        "irsa",
        "billing",
        &[],
        &[
            ("AWS_STS_REGIONAL_ENDPOINTS", "regional"),
            ("AWS_ROLE_ARN", &role_arn("billing-role")),
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
            ),
        ],
    );
    // What it injects instead when the ServiceAccount also has an EKS Pod Identity association
    // (its defaults for the URI and the token path).
    world.add_pod_of_account(
        &pod_identity,
        "shop",
        "pod-identity",
        "billing",
        &[],
        &[
            ("AWS_STS_REGIONAL_ENDPOINTS", "regional"),
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token",
            ),
        ],
    );
    world.add_pod_of_account(&plain, "shop", "plain", "billing", &[], &[]);
    world.wait_known(&node, &irsa);
    world.wait_known(&node, &pod_identity);
    world.wait_known(&node, &plain);

    let (status, body) = pod_get(&irsa, CREDS, &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("left to IRSA") && body.contains("AWS_WEB_IDENTITY_TOKEN_FILE"),
        "{body}"
    );
    let (status, body) = pod_get(&pod_identity, CREDS, &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("left to EKS Pod Identity")
            && body.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        "{body}"
    );
    // The pod beside them, on the same account without the environment, gets the role; the
    // pods left to the webhook's credentials caused no AssumeRole (no prefetch either).
    let doc = world.creds(&plain);
    let requests = world.sts.assume_role_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        Some(doc.access_key_id.clone()),
        world.moto_key_for(&role_arn("billing-role"))
    );
    for left in [&irsa, &pod_identity] {
        let (status, _) = pod_get(left, &format!("{CREDS}billing-role"), &[]);
        assert_eq!(status, 404);
    }
    world.assert_no_leak(
        &[&irsa, &pod_identity, &plain],
        &[&ClientCredentials::from(&doc)],
    );
}
