//! The IMDS emulator, moto and the STS fault proxy, checked against real clients and without
//! the agent: a pod with no program attached reaches the emulator directly (the node's "real
//! IMDS" path), so curl, botocore and aws-config parsing its answers cross-checks that it speaks
//! EC2's protocol. STS calls are made from the node namespace with botocore.

use std::{
    net::{IpAddr, SocketAddr},
    panic::{AssertUnwindSafe, catch_unwind},
    thread,
    time::{Duration, Instant, SystemTime},
};

use kube2iam_tests::{
    AssumeRoleCall, FaultMode, FaultProxy, ImdsEmulator, Moto, NODE_ACCESS_KEY_ID, RunIn, TestNode,
    clients::{
        self, AssumeRoleRequest, ClientCredentials, ClientOutcome, CurlImds, IMDS_ENDPOINT4,
        IMDS_ENDPOINT6, SdkGet, StsOutcome,
    },
    encode::parse_rfc3339,
    imds::{
        AVAILABILITY_ZONE, INSTANCE_ID, INSTANCE_PROFILE_ARN, NODE_IDENTITY_ACCESS_KEY_ID,
        NODE_ROLE, NODE_SIGNATURE_SENTINEL, REGION, TokenUse, USER_DATA,
    },
    metadata_addr4, metadata_addr6,
    ns_runtime::{HttpRequest, HttpResponse, NetnsRuntime},
    process::output_within,
};

const TIMEOUT: Duration = Duration::from_secs(10);
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

fn node_creds_path() -> String {
    format!("{CREDS_PATH}{NODE_ROLE}")
}

/// The client loaded exactly the emulator's node credentials.
fn assert_node_credentials(outcome: ClientOutcome, imds: &ImdsEmulator, client: &str) {
    let creds: ClientCredentials = outcome
        .into_result()
        .unwrap_or_else(|e| panic!("{client} failed against the emulator: {e:?}"));
    let expected = imds.node_credentials();
    assert_eq!(creds.access_key_id, NODE_ACCESS_KEY_ID, "{client}");
    assert_eq!(
        creds.secret_access_key, expected.secret_access_key,
        "{client}"
    );
    assert_eq!(
        creds.token.as_deref(),
        Some(expected.token.as_str()),
        "{client}"
    );
    assert_eq!(
        creds.expiration.as_deref(),
        Some(expected.expiration.as_str()),
        "{client} parsed the expiration differently"
    );
}

/// Every request from `pod` reached `local`, the credential GETs carried a valid token, and the
/// first one was the token PUT.
fn assert_imdsv2_requests_from(imds: &ImdsEmulator, pod_ip: IpAddr, local: SocketAddr) {
    let requests: Vec<_> = imds
        .callers()
        .into_iter()
        .filter(|r| r.peer.ip().to_canonical() == pod_ip)
        .collect();
    assert!(!requests.is_empty(), "no request from {pod_ip}");
    assert!(
        requests.iter().all(|r| r.local == local),
        "requests should arrive at {local}: {requests:?}"
    );
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("PUT", "/latest/api/token"),
        "{requests:?}"
    );
    let creds = node_creds_path();
    let gets: Vec<_> = requests
        .iter()
        .filter(|r| r.path == CREDS_PATH || r.path == creds)
        .collect();
    assert!(
        gets.iter().any(|r| r.path == creds),
        "no credentials GET: {requests:?}"
    );
    assert!(
        gets.iter()
            .all(|r| r.method == "GET" && r.token == TokenUse::Valid && r.status == Some(200)),
        "credential GETs must carry a valid token and succeed: {gets:?}"
    );
}

fn request(rt: &NetnsRuntime, addr: SocketAddr, request: HttpRequest) -> HttpResponse {
    let what = format!("{} {}", request.method, request.path);
    rt.request(addr, request, TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn token(rt: &NetnsRuntime, ttl: &str) -> String {
    let response = request(
        rt,
        metadata_addr4(),
        HttpRequest::put("/latest/api/token").header("X-aws-ec2-metadata-token-ttl-seconds", ttl),
    );
    assert_eq!(response.status, 200, "token PUT: {}", response.text());
    response.text()
}

fn get(rt: &NetnsRuntime, path: &str, token: Option<&str>) -> HttpResponse {
    let mut req = HttpRequest::get(path);
    if let Some(token) = token {
        req = req.header("X-aws-ec2-metadata-token", token);
    }
    request(rt, metadata_addr4(), req)
}

fn assert_error_page(response: &HttpResponse, status: u16, title: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("text/html"));
    assert!(
        response
            .text()
            .contains(&format!("<title>{status} - {title}</title>")),
        "{}",
        response.text()
    );
}

#[test]
fn curl_imdsv2_token_dance_from_a_pod_gets_the_node_credentials_over_ipv4_and_ipv6() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");

    for (base, local, ip) in [
        (IMDS_ENDPOINT4, metadata_addr4(), IpAddr::V4(pod.ip4())),
        (IMDS_ENDPOINT6, metadata_addr6(), IpAddr::V6(pod.ip6())),
    ] {
        let (role, doc) = clients::curl_imdsv2_credentials(RunIn::Pod(&pod), base)
            .unwrap_or_else(|e| panic!("curl via {base}: {e}"));
        let expected = imds.node_credentials();
        assert_eq!(role, NODE_ROLE);
        assert_eq!(doc.code, "Success");
        assert_eq!(doc.kind, "AWS-HMAC");
        assert_eq!(doc.access_key_id, NODE_ACCESS_KEY_ID);
        assert_eq!(doc.secret_access_key, expected.secret_access_key);
        assert_eq!(doc.token, expected.token);
        assert_eq!(doc.last_updated, expected.last_updated);
        assert_eq!(doc.expiration, expected.expiration);
        assert_imdsv2_requests_from(&imds, ip, local);
    }
    let expiry = parse_rfc3339(&imds.node_credentials().expiration).expect("RFC 3339");
    let ahead = expiry
        .duration_since(SystemTime::now())
        .expect("expiration in the future");
    assert!(
        ahead > Duration::from_secs(5 * 3600) && ahead <= Duration::from_secs(6 * 3600),
        "node credentials should expire about 6 h ahead, not in {ahead:?}"
    );
}

#[test]
fn botocore_instance_metadata_provider_from_a_pod_parses_the_node_credentials() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");

    let v4 = clients::botocore_imds_credentials(RunIn::Pod(&pod), false);
    assert_node_credentials(v4, &imds, "botocore (IPv4)");
    assert_imdsv2_requests_from(&imds, IpAddr::V4(pod.ip4()), metadata_addr4());

    let v6 = clients::botocore_imds_credentials(RunIn::Pod(&pod), true);
    assert_node_credentials(v6, &imds, "botocore (IPv6)");
    assert_imdsv2_requests_from(&imds, IpAddr::V6(pod.ip6()), metadata_addr6());
}

#[test]
fn aws_config_imds_provider_from_a_pod_parses_the_node_credentials() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");

    // Unmodified default client: it must go to 169.254.169.254.
    let v4 = clients::sdk_imds_credentials(RunIn::Pod(&pod), false);
    assert_node_credentials(v4, &imds, "aws-config (default endpoint)");
    assert_imdsv2_requests_from(&imds, IpAddr::V4(pod.ip4()), metadata_addr4());

    let v6 = clients::sdk_imds_credentials(RunIn::Pod(&pod), true);
    assert_node_credentials(v6, &imds, "aws-config (IPv6 endpoint mode)");
    assert_imdsv2_requests_from(&imds, IpAddr::V6(pod.ip6()), metadata_addr6());

    assert_eq!(
        clients::sdk_imds_get(
            RunIn::Pod(&pod),
            "/latest/meta-data/placement/region",
            false
        ),
        SdkGet::Body {
            body: REGION.to_owned()
        }
    );
}

#[test]
fn imdsv2_token_rules_match_ec2() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");
    let rt = NetnsRuntime::start("imds-client", &pod.netns_path());
    let put = |ttl: Option<&str>| {
        let mut req = HttpRequest::put("/latest/api/token");
        if let Some(ttl) = ttl {
            req = req.header("X-aws-ec2-metadata-token-ttl-seconds", ttl);
        }
        request(&rt, metadata_addr4(), req)
    };

    for ttl in [
        None,
        Some("0"),
        Some("21601"),
        Some("-1"),
        Some("abc"),
        Some(""),
    ] {
        assert_error_page(&put(ttl), 400, "Bad Request");
    }
    for ttl in ["1", "21600"] {
        let response = put(Some(ttl));
        assert_eq!(response.status, 200, "TTL {ttl}: {}", response.text());
        assert_eq!(
            response.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some(ttl)
        );
        assert!(!response.text().is_empty());
    }
    let forwarded = request(
        &rt,
        metadata_addr4(),
        HttpRequest::put("/latest/api/token")
            .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
            .header("X-Forwarded-For", "203.0.113.7"),
    );
    assert_error_page(&forwarded, 403, "Forbidden");
    assert_error_page(
        &get(&rt, "/latest/api/token", None),
        405,
        "Method Not Allowed",
    );

    // Optional mode: IMDSv1 works, a bad token does not.
    let instance_id = "/latest/meta-data/instance-id";
    assert_eq!(get(&rt, instance_id, None).text(), INSTANCE_ID);
    assert_error_page(
        &get(&rt, instance_id, Some("not-a-token")),
        401,
        "Unauthorized",
    );
    let good = token(&rt, "21600");
    assert_eq!(get(&rt, instance_id, Some(&good)).text(), INSTANCE_ID);

    // Expiry.
    let short = token(&rt, "1");
    assert_eq!(get(&rt, instance_id, Some(&short)).status, 200);
    thread::sleep(Duration::from_millis(1300));
    assert_error_page(&get(&rt, instance_id, Some(&short)), 401, "Unauthorized");

    // Required mode: IMDSv1 is refused.
    imds.set_tokens_required(true);
    assert_error_page(&get(&rt, instance_id, None), 401, "Unauthorized");
    assert_eq!(get(&rt, instance_id, Some(&good)).text(), INSTANCE_ID);
    imds.set_tokens_required(false);
    assert_eq!(get(&rt, instance_id, None).status, 200);

    let tokenless: Vec<_> = imds
        .requests_for(instance_id)
        .into_iter()
        .map(|r| (r.token, r.status))
        .collect();
    assert_eq!(
        tokenless,
        vec![
            (TokenUse::Absent, Some(200)),
            (TokenUse::Invalid, Some(401)),
            (TokenUse::Valid, Some(200)),
            (TokenUse::Valid, Some(200)),
            (TokenUse::Invalid, Some(401)),
            (TokenUse::Absent, Some(401)),
            (TokenUse::Valid, Some(200)),
            (TokenUse::Absent, Some(200)),
        ]
    );
}

#[test]
fn tokens_required_mode_rejects_imdsv1_and_the_real_clients_still_work() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    imds.set_tokens_required(true);
    let pod = node.add_pod("a");

    let v1 = output_within(
        pod.command("curl").args([
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ]),
        TIMEOUT,
        "curl IMDSv1",
    );
    assert_eq!(String::from_utf8_lossy(&v1.stdout), "401");

    clients::curl_imdsv2_credentials(RunIn::Pod(&pod), IMDS_ENDPOINT4)
        .unwrap_or_else(|e| panic!("curl IMDSv2 in required mode: {e}"));
    assert_node_credentials(
        clients::botocore_imds_credentials(RunIn::Pod(&pod), false),
        &imds,
        "botocore (tokens required)",
    );
    assert_node_credentials(
        clients::sdk_imds_credentials(RunIn::Pod(&pod), false),
        &imds,
        "aws-config (tokens required)",
    );
}

#[test]
fn metadata_tree_serves_listings_documents_and_ec2_error_pages() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let rt = NetnsRuntime::start("imds-client", &node.netns_path());
    let text = |path: &str| {
        let response = get(&rt, path, None);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        response.text()
    };

    assert!(text("/").lines().any(|l| l == "latest"));
    assert!(text("/").lines().any(|l| l == "2009-04-04"));
    assert_eq!(text("/latest"), "dynamic/\nmeta-data/\nuser-data");
    assert_eq!(text("/latest/"), "dynamic/\nmeta-data/\nuser-data");
    let root = text("/latest/meta-data/");
    for entry in [
        "instance-id",
        "local-ipv4",
        "iam/",
        "placement/",
        "identity-credentials/",
    ] {
        assert!(root.lines().any(|l| l == entry), "{entry} in {root:?}");
    }
    assert_eq!(
        text("/latest/meta-data/iam/"),
        "info\nsecurity-credentials/"
    );
    assert_eq!(
        text("/latest/meta-data/iam/security-credentials"),
        NODE_ROLE
    );
    assert_eq!(
        text("/latest/meta-data/iam/security-credentials/"),
        NODE_ROLE
    );
    assert_eq!(text("/latest/meta-data/instance-id"), INSTANCE_ID);
    assert_eq!(text("/2009-04-04/meta-data/instance-id"), INSTANCE_ID);
    assert_eq!(text("/latest/meta-data/placement/region"), REGION);
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone"),
        AVAILABILITY_ZONE
    );
    assert_eq!(text("/latest/meta-data/local-ipv4"), "192.0.2.10");
    assert_eq!(text("/latest/user-data"), USER_DATA);

    let info: serde_json::Value =
        serde_json::from_str(&text("/latest/meta-data/iam/info")).expect("iam/info is JSON");
    assert_eq!(info["Code"], "Success");
    assert_eq!(info["InstanceProfileArn"], INSTANCE_PROFILE_ARN);
    assert!(info["InstanceProfileId"].is_string() && info["LastUpdated"].is_string());

    let creds: serde_json::Value = serde_json::from_str(&text(&node_creds_path())).expect("JSON");
    assert_eq!(creds["AccessKeyId"], NODE_ACCESS_KEY_ID);
    assert_eq!(creds["Type"], "AWS-HMAC");
    let identity: serde_json::Value = serde_json::from_str(&text(
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    ))
    .expect("JSON");
    assert_eq!(identity["AccessKeyId"], NODE_IDENTITY_ACCESS_KEY_ID);
    assert_eq!(
        identity["SecretAccessKey"],
        imds.identity_credentials().secret_access_key.as_str()
    );
    let document: serde_json::Value =
        serde_json::from_str(&text("/latest/dynamic/instance-identity/document")).expect("JSON");
    assert_eq!(document["region"], REGION);

    for missing in [
        "/latest/meta-data/no-such-thing",
        "/latest/meta-data/instance-id/",
        "/latest/meta-data/iam/security-credentials/other-role",
        "/1999-01-01/meta-data/instance-id",
        "/latest/meta-data//instance-id",
    ] {
        assert_error_page(&get(&rt, missing, None), 404, "Not Found");
    }
    let post = request(
        &rt,
        metadata_addr4(),
        HttpRequest::post("/latest/meta-data/"),
    );
    assert_error_page(&post, 405, "Method Not Allowed");
}

/// Lenient mode stands for a metadata service more forgiving than IMDS: spellings the agent must
/// never forward come back with the node's credentials and signed identity, so a test that
/// sends them through the agent would see the leak.
#[test]
fn lenient_mode_answers_odd_spellings_with_the_node_credentials() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let rt = NetnsRuntime::start("imds-client", &node.netns_path());
    let odd = [
        "/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/iam;x/security-credentials/node-role",
        "/latest/meta-data/iam./security-credentials/node-role",
        "/2.0/meta-data/IAM/security-credentials/node-role",
    ];
    for path in odd {
        assert_eq!(get(&rt, path, None).status, 404, "strict: {path}");
    }
    imds.set_lenient(true);
    for path in odd {
        let response = get(&rt, path, None);
        assert_eq!(response.status, 200, "lenient: {path}");
        assert!(
            response.text().contains(NODE_ACCESS_KEY_ID),
            "{path}: {}",
            response.text()
        );
    }
    let signed = get(&rt, "/latest/dynamic/instance-identity/rsa2048;x", None);
    assert_eq!(signed.status, 200);
    assert!(signed.text().starts_with(NODE_SIGNATURE_SENTINEL));
    imds.set_lenient(false);
    assert_eq!(get(&rt, odd[0], None).status, 404);
}

#[test]
fn emulator_records_callers_and_catches_a_pod_that_reached_it() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    // A connection that sends nothing is still recorded.
    let silent = output_within(
        b.command("bash").args([
            "-c",
            "exec 3<>/dev/tcp/169.254.169.254/80 && sleep 0.2 && exec 3<&-",
        ]),
        TIMEOUT,
        "bash /dev/tcp",
    );
    assert!(silent.status.success(), "{silent:?}");
    assert!(imds.saw(IpAddr::V4(b.ip4())), "{:?}", imds.connections());
    assert!(
        imds.callers().iter().all(|r| !b.owns(r.peer.ip())),
        "b sent no request"
    );

    let curl = clients::curl_imdsv2(
        RunIn::Pod(&a),
        IMDS_ENDPOINT4,
        "/latest/meta-data/instance-id",
    );
    assert_eq!(
        curl,
        CurlImds {
            token_status: 200,
            status: Some(200),
            body: INSTANCE_ID.to_owned()
        }
    );
    let from_a: Vec<_> = imds
        .callers()
        .into_iter()
        .filter(|r| a.owns(r.peer.ip()))
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        from_a,
        vec![
            ("PUT".to_owned(), "/latest/api/token".to_owned()),
            ("GET".to_owned(), "/latest/meta-data/instance-id".to_owned()),
        ]
    );

    let other = node.add_pod("c");
    imds.assert_no_pod_seen(&[&other]);
    for pod in [&a, &b] {
        let caught = catch_unwind(AssertUnwindSafe(|| imds.assert_no_pod_seen(&[pod])));
        let message =
            caught.expect_err("assert_no_pod_seen must panic for a pod that reached the emulator");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(message.contains("LEAK"), "{message}");
    }
}

#[test]
fn set_down_refuses_and_closes_connections_and_set_delay_slows_answers() {
    let node = TestNode::new();
    let imds = ImdsEmulator::start(&node);
    let pod = node.add_pod("a");
    let rt = NetnsRuntime::start("imds-client", &pod.netns_path());

    // An idle keep-alive connection is closed when the emulator goes down.
    let open = rt.block_on(async {
        tokio::net::TcpStream::connect(metadata_addr4())
            .await
            .expect("connect")
    });
    imds.set_down(true);
    assert!(imds.is_down());
    let read = rt.block_on(async move {
        use tokio::io::AsyncReadExt as _;
        let mut open = open;
        let mut buf = [0u8; 16];
        tokio::time::timeout(TIMEOUT, open.read(&mut buf)).await
    });
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the open connection should be closed: {read:?}"
    );
    let refused = rt.request(
        metadata_addr4(),
        HttpRequest::get("/latest/meta-data/instance-id"),
        TIMEOUT,
    );
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Connection refused")),
        "{refused:?}"
    );
    let curl = clients::try_curl_imdsv2(RunIn::Pod(&pod), IMDS_ENDPOINT6, "/latest/meta-data/");
    assert!(
        curl.as_ref().is_err_and(|e| e.contains("exit status: 10")),
        "{curl:?}"
    );
    match clients::sdk_imds_credentials(RunIn::Pod(&pod), false) {
        ClientOutcome::Error(e) => assert!(e.error.contains("refused"), "{e:?}"),
        other => panic!("aws-config should fail while IMDS is down: {other:?}"),
    }

    imds.set_down(false);
    assert_eq!(
        get(&rt, "/latest/meta-data/instance-id", None).text(),
        INSTANCE_ID
    );

    imds.set_delay(Duration::from_millis(1500));
    let started = Instant::now();
    assert_eq!(
        get(&rt, "/latest/meta-data/instance-id", None).text(),
        INSTANCE_ID
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let timed_out = rt.request(
        metadata_addr4(),
        HttpRequest::get("/latest/meta-data/instance-id"),
        Duration::from_millis(500),
    );
    assert!(timed_out.is_err(), "{timed_out:?}");
    imds.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(get(&rt, "/latest/meta-data/instance-id", None).status, 200);
    assert!(started.elapsed() < Duration::from_millis(1000));
}

fn moto_with_proxy(node: &TestNode) -> (Moto, FaultProxy) {
    let moto = Moto::start(node);
    let proxy = FaultProxy::start(node, moto.addr());
    (moto, proxy)
}

#[test]
fn assume_role_through_the_fault_proxy_reaches_moto_and_is_recorded() {
    let node = TestNode::new();
    let (moto, proxy) = moto_with_proxy(&node);
    let role = "arn:aws:iam::123456789012:role/app";
    let mut req = AssumeRoleRequest::new(&proxy.endpoint(), role, "kube2iam-node-a");
    req.external_id = Some("ext-123".to_owned());
    req.duration_seconds = Some(1800);

    let before = SystemTime::now();
    let outcome = clients::botocore_assume_role(RunIn::Node(&node), &req);
    let StsOutcome::Credentials {
        access_key_id,
        expiration,
        assumed_role_arn,
    } = outcome
    else {
        panic!(
            "AssumeRole through the proxy failed: {outcome:?}\nmoto:\n{}",
            moto.log()
        );
    };
    assert!(access_key_id.starts_with("ASIA"), "{access_key_id}");
    assert_ne!(access_key_id, NODE_ACCESS_KEY_ID);
    assert_eq!(
        assumed_role_arn,
        "arn:aws:sts::123456789012:assumed-role/app/kube2iam-node-a"
    );
    let expiry = parse_rfc3339(&expiration).expect("RFC 3339 expiration");
    let lifetime = expiry
        .duration_since(before)
        .expect("expiration in the future");
    assert!(
        lifetime > Duration::from_secs(1700) && lifetime < Duration::from_secs(1900),
        "DurationSeconds=1800 should give ~30 min credentials, got {lifetime:?}"
    );

    // A cross-account role without an external ID.
    let other = "arn:aws:iam::210987654321:role/path/reader";
    let outcome = clients::botocore_assume_role(
        RunIn::Node(&node),
        &AssumeRoleRequest::new(&proxy.endpoint(), other, "kube2iam-node-a"),
    );
    assert!(
        matches!(&outcome, StsOutcome::Credentials { assumed_role_arn, .. }
            if assumed_role_arn == "arn:aws:sts::210987654321:assumed-role/reader/kube2iam-node-a"),
        "{outcome:?}"
    );

    assert_eq!(
        moto.assume_role_calls(),
        vec![
            AssumeRoleCall {
                role_arn: role.to_owned(),
                session_name: "kube2iam-node-a".to_owned(),
                external_id: Some("ext-123".to_owned()),
                duration: None,
                access_key_id: Some(access_key_id),
            },
            AssumeRoleCall {
                role_arn: other.to_owned(),
                session_name: "kube2iam-node-a".to_owned(),
                external_id: None,
                duration: None,
                access_key_id: moto.assume_role_calls()[1].access_key_id.clone(),
            },
        ]
    );
    assert_eq!(
        proxy.assume_role_calls(),
        vec![
            AssumeRoleCall {
                role_arn: role.to_owned(),
                session_name: "kube2iam-node-a".to_owned(),
                external_id: Some("ext-123".to_owned()),
                duration: Some(Duration::from_secs(1800)),
                access_key_id: None,
            },
            AssumeRoleCall {
                role_arn: other.to_owned(),
                session_name: "kube2iam-node-a".to_owned(),
                external_id: None,
                duration: None,
                access_key_id: None,
            },
        ]
    );
    assert_eq!(proxy.call_count(), 2);
    assert!(
        proxy
            .requests()
            .iter()
            .all(|r| r.method == "POST" && r.param("Version") == Some("2011-06-15")),
        "{:?}",
        proxy.requests()
    );

    moto.reset();
    assert!(moto.assume_role_calls().is_empty());
}

#[test]
fn fault_modes_produce_the_expected_sts_errors_in_botocore() {
    let node = TestNode::new();
    let (moto, proxy) = moto_with_proxy(&node);
    let role = "arn:aws:iam::123456789012:role/app";
    let call = |session: &str, configure: &dyn Fn(&mut AssumeRoleRequest)| {
        let mut req = AssumeRoleRequest::new(&proxy.endpoint(), role, session);
        configure(&mut req);
        clients::botocore_assume_role(RunIn::Node(&node), &req)
    };
    let ok = |outcome: &StsOutcome| matches!(outcome, StsOutcome::Credentials { .. });

    proxy.set_mode(FaultMode::Throttle);
    let throttled = call("throttled", &|_| {});
    assert_eq!(
        throttled,
        StsOutcome::ServiceError {
            code: "Throttling".to_owned(),
            message: Some("Rate exceeded".to_owned()),
            http_status: Some(400),
            attempts: Some(1),
        }
    );
    // botocore retries throttling: every attempt reaches the proxy.
    let before = proxy.call_count();
    let retried = call("throttled-retried", &|r| r.max_attempts = 3);
    assert!(
        matches!(&retried, StsOutcome::ServiceError { code, attempts: Some(3), .. } if code == "Throttling"),
        "{retried:?}"
    );
    assert_eq!(proxy.call_count() - before, 3);

    proxy.set_mode(FaultMode::ServerError);
    let failed = call("server-error", &|_| {});
    assert!(
        matches!(&failed, StsOutcome::ServiceError { code, http_status: Some(500), .. } if code == "InternalFailure"),
        "{failed:?}"
    );

    proxy.set_mode(FaultMode::Slow(Duration::from_secs(3)));
    let slow = call("slow-timeout", &|r| r.read_timeout = 1.0);
    assert!(
        matches!(&slow, StsOutcome::Error(e) if e.error_type == "ReadTimeoutError"),
        "{slow:?}"
    );
    proxy.set_mode(FaultMode::Slow(Duration::from_millis(700)));
    let started = Instant::now();
    let slow_ok = call("slow-ok", &|_| {});
    assert!(ok(&slow_ok), "{slow_ok:?}");
    assert!(started.elapsed() >= Duration::from_millis(700));

    proxy.set_mode(FaultMode::Refuse);
    let count = proxy.call_count();
    let refused = call("refused", &|_| {});
    assert!(
        matches!(&refused, StsOutcome::Error(e) if e.error_type == "EndpointConnectionError"),
        "{refused:?}"
    );
    assert_eq!(
        proxy.call_count(),
        count,
        "a refused connect records nothing"
    );

    proxy.set_mode(FaultMode::PassThrough);
    let passed = call("passed", &|_| {});
    assert!(ok(&passed), "{passed:?}");

    let recorded: Vec<(String, FaultMode, Option<u16>)> = proxy
        .requests()
        .into_iter()
        .filter_map(|r| {
            let session = r.param("RoleSessionName")?.to_owned();
            Some((session, r.mode, r.status))
        })
        .filter(|(session, _, _)| session != "slow-timeout")
        .collect();
    assert_eq!(
        recorded,
        vec![
            ("throttled".to_owned(), FaultMode::Throttle, Some(400)),
            (
                "throttled-retried".to_owned(),
                FaultMode::Throttle,
                Some(400)
            ),
            (
                "throttled-retried".to_owned(),
                FaultMode::Throttle,
                Some(400)
            ),
            (
                "throttled-retried".to_owned(),
                FaultMode::Throttle,
                Some(400)
            ),
            ("server-error".to_owned(), FaultMode::ServerError, Some(500)),
            (
                "slow-ok".to_owned(),
                FaultMode::Slow(Duration::from_millis(700)),
                Some(200)
            ),
            ("passed".to_owned(), FaultMode::PassThrough, Some(200)),
        ]
    );
    // Faults are answered by the proxy: only forwarded calls reach moto.
    let reached: Vec<String> = moto
        .assume_role_calls()
        .into_iter()
        .map(|c| c.session_name)
        .filter(|s| s != "slow-timeout")
        .collect();
    assert_eq!(reached, vec!["slow-ok".to_owned(), "passed".to_owned()]);
}
