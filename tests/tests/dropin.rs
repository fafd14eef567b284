//! kube2iam-ebpf as a drop-in for kube2iam: kube2iam values files rendered by the chart (helm,
//! as `cargo xtask install` puts it under `.cache/`) start the real agent in a test node with
//! exactly the rendered arguments, and pods get their roles' credentials with kube2iam's session
//! length; kube2iam's `/healthz` answers on the metadata port; kube2iam's session names.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kube2iam_tests::{
    AGENT_PORT, Agent, AgentOptions, FaultProxy, HOST_IP4, ImdsEmulator, KubeApi, Moto, Pod,
    TestNode,
    e2e::{ALLOWED_KEY, BASE_ROLE_ARN, NODE_NAME, ROLE_KEY, World, pod_credentials, role_arn},
    imds::INSTANCE_ID,
    kube_api,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `helm template` of the chart with a values file; panics naming the fix without helm.
fn render(values: &Path) -> String {
    let helm = workspace().join(".cache/helm-kubectl/helm/helm");
    assert!(
        helm.is_file(),
        "{} is missing: run `cargo xtask install`",
        helm.display()
    );
    let home = std::env::temp_dir().join(format!("k2i-helm-{}", std::process::id()));
    let output = Command::new(&helm)
        .args(["template", "kube2iam-ebpf", "deploy/helm/kube2iam-ebpf"])
        .args(["--namespace", "kube-system", "--values"])
        .arg(values)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(workspace())
        .output()
        .expect("run helm");
    let _ = std::fs::remove_dir_all(&home);
    assert!(
        output.status.success(),
        "helm template --values {}: {}",
        values.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("helm prints UTF-8")
}

/// One YAML list item as helm renders it: plain, or double-quoted by `quote` (Go's %q).
fn scalar(item: &str) -> String {
    let item = item.trim();
    match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => item.to_owned(),
    }
}

/// The agent container's `args` and env names (`name: value` for literal values), read from the
/// rendered DaemonSet.
fn container(rendered: &str) -> (Vec<String>, BTreeMap<String, Option<String>>) {
    let daemonset = rendered
        .split("\n---")
        .find(|doc| doc.contains("\nkind: DaemonSet"))
        .expect("a DaemonSet");
    let agent = daemonset
        .split_once("- name: agent")
        .expect("the agent container")
        .1;
    let mut lines = agent.lines().skip_while(|l| l.trim() != "args:").skip(1);
    let mut args = Vec::new();
    for line in lines.by_ref() {
        let Some(item) = line.trim().strip_prefix("- ") else {
            break;
        };
        args.push(scalar(item));
    }
    let mut env = BTreeMap::new();
    let mut lines = agent
        .lines()
        .skip_while(|l| l.trim() != "env:")
        .skip(1)
        .peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("- name: ") else {
            if line.trim().starts_with("ports:") {
                break;
            }
            continue;
        };
        let value = lines
            .peek()
            .and_then(|l| l.trim().strip_prefix("value: "))
            .map(scalar);
        env.insert(name.to_owned(), value);
    }
    (args, env)
}

/// The rendered arguments as the kubelet hands them to the agent: `$(HOST_IP)` and
/// `$(NODE_NAME)` expanded to this test node's. `--host-ip` and `--app-port` are left to the
/// test kit, which passes the same address (the node's) and the port returned here.
fn as_started(args: &[String]) -> (Vec<OsString>, u16) {
    let mut port = None;
    let mut out = Vec::new();
    for arg in args {
        let arg = arg
            .replace("$(HOST_IP)", &HOST_IP4.to_string())
            .replace("$(NODE_NAME)", NODE_NAME);
        if let Some(p) = arg.strip_prefix("--app-port=") {
            port = Some(p.parse().expect("a port"));
            continue;
        }
        if let Some(ip) = arg.strip_prefix("--host-ip=") {
            assert_eq!(ip, HOST_IP4.to_string(), "host.ip is the node's address");
            continue;
        }
        out.push(OsString::from(arg));
    }
    (out, port.expect("the chart renders --app-port"))
}

/// The node's services and an agent started with `args` (plus where the emulated API server and
/// STS are, which a cluster would not need).
struct Rendered {
    imds: ImdsEmulator,
    _moto: Moto,
    sts: FaultProxy,
    api: KubeApi,
    agent: Agent,
}

fn start_rendered(node: &TestNode, args: Vec<OsString>, app_port: u16) -> Rendered {
    let imds = ImdsEmulator::start(node);
    let moto = Moto::start(node);
    let sts = FaultProxy::start(node, moto.addr());
    let api = KubeApi::start_in_node(node);
    let mut extra_args = args;
    extra_args.extend(
        [
            "--api-server",
            &api.url(),
            "--sts-endpoint",
            &sts.endpoint(),
        ]
        .map(OsString::from),
    );
    let agent = Agent::start_with(
        node,
        &AgentOptions {
            app_port,
            extra_args,
            interception_only: false,
            host_ipv6: false,
            ..AgentOptions::default()
        },
    );
    agent.wait_for_line("pod list synced", Duration::from_secs(20));
    Rendered {
        imds,
        _moto: moto,
        sts,
        api,
        agent,
    }
}

/// Credentials for `pod`, retried while the watch has not delivered it yet.
fn credentials_of(
    rendered: &Rendered,
    pod: &Pod<'_>,
) -> kube2iam_tests::clients::ImdsCredentialsDoc {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match pod_credentials(pod) {
            Ok(doc) => return doc,
            Err((status, body)) if std::time::Instant::now() > deadline => panic!(
                "credentials for {}: {status} {body}\nagent log:\n{}",
                pod.ip4(),
                rendered.agent.log()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn values_file(name: &str) -> PathBuf {
    workspace().join("deploy/helm/kube2iam-ebpf/ci").join(name)
}

/// GET on the agent's metadata port from the node, as kubelet's probes of kube2iam did.
fn node_get(node: &TestNode, port: u16, path: &str) -> (u16, String) {
    let output = node
        .command("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{HOST_IP4}:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn kube2iams_own_default_values_run_the_agent_and_serve_a_pod() {
    let (mut args, env) = container(&render(&values_file("kube2iam-defaults-values.yaml")));
    // The chart passes host.interface as HOST_INTERFACE (so `doctor` in the container reads the
    // same list); the agent reads it as --host-interface.
    assert_eq!(
        env.get("HOST_INTERFACE"),
        Some(&Some("docker0".to_owned())),
        "kube2iam's docker0 reaches the agent: {env:?}"
    );
    args.push("--host-interface=docker0".to_owned());
    let (args, port) = as_started(&args);
    let node = TestNode::new();
    let world = start_rendered(&node, args, port);
    // docker0 is read as kube2iam's default: the guard stays on the CNI interfaces.
    world
        .agent
        .wait_for_line("kube2iam's default", Duration::from_secs(5));
    let pod = node.add_pod("a");
    // No base ARN in kube2iam's defaults: the annotation names the full ARN.
    world.api.add_pod(
        kube_api::pod("default", "web", NODE_NAME, pod.ip4(), None)
            .annotate(ROLE_KEY, &role_arn("web-role")),
    );
    let got = credentials_of(&world, &pod);
    let calls = world.sts.assume_role_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].role_arn, role_arn("web-role"));
    assert_eq!(
        calls[0].duration,
        Some(Duration::from_secs(3600)),
        "the default TTL (30m) asks STS for 1-hour sessions"
    );
    assert_ne!(got.access_key_id, kube2iam_tests::NODE_ACCESS_KEY_ID);
    world.imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn kube2iam_flags_booleans_and_go_durations_run_with_kube2iams_meaning() {
    let (args, env) = container(&render(&values_file("kube2iam-flags-values.yaml")));
    assert_eq!(
        env.get("AWS_DEFAULT_REGION"),
        Some(&Some("eu-west-1".to_owned())),
        "aws.region sets what kube2iam's chart set"
    );
    let (args, port) = as_started(&args);
    let node = TestNode::new();
    let world = start_rendered(&node, args, port);
    let log = world.agent.log();
    for ignored in [
        "--backoff-max-interval=1s",
        "--cache-resync-period=30m0s",
        "--resolve-duplicate-cache-ips",
        "--use-regional-sts-endpoint",
    ] {
        assert!(
            log.contains(&format!("{ignored} (a kube2iam flag) is ignored")),
            "{ignored} is named in a warning:\n{log}"
        );
    }
    // --verbose wins over --log-level=warning, as in kube2iam: debug lines are logged.
    assert!(log.contains("\"level\":\"DEBUG\""), "debug in JSON:\n{log}");

    world
        .api
        .add_namespace(kube_api::namespace("team").annotate(ALLOWED_KEY, r#"["web-*"]"#));
    let pod = node.add_pod("a");
    world.api.add_pod(
        kube_api::pod("team", "web", NODE_NAME, pod.ip4(), None).annotate(ROLE_KEY, "web-role"),
    );
    let got = credentials_of(&world, &pod);
    let calls = world.sts.assume_role_calls();
    assert_eq!(calls[0].role_arn, format!("{BASE_ROLE_ARN}web-role"));
    assert_eq!(
        calls[0].duration,
        Some(Duration::from_secs(1800)),
        "--iam-role-session-ttl=15m0s asks STS for twice the TTL, as kube2iam did"
    );
    let expires_in = kube2iam_tests::encode::parse_rfc3339(&got.expiration)
        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
        .expect("an expiration in the future");
    assert!(
        expires_in > Duration::from_secs(25 * 60),
        "fresh 30-minute credentials: {expires_in:?}"
    );
    world.imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn healthz_answers_on_the_metadata_port_as_kube2iams_did() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let port = AGENT_PORT;
    let (status, body) = node_get(&node, port, "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["hostIP"], HOST_IP4.to_string());
    assert_eq!(health["instanceId"], INSTANCE_ID);
    // A pod on the node reaches it through the redirect too.
    let pod = world.add_known_pod(&node, "a", "default", "web", &[(ROLE_KEY, "web-role")]);
    let (status, body) = kube2iam_tests::e2e::pod_get(&pod, "/healthz", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(INSTANCE_ID), "{body}");
    // kube2iam's /healthz failed when the instance ID could not be read.
    world.imds.set_down(true);
    let (status, body) = node_get(&node, port, "/healthz");
    world.imds.set_down(false);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("instance ID"), "{body}");
}

#[test]
fn kube2iam_session_names_carry_the_pod_address_hash_and_the_role_name() {
    let node = TestNode::new();
    let world = World::start(&node, &["--kube2iam-session-names"]);
    let a = world.add_known_pod(&node, "a", "default", "a", &[(ROLE_KEY, "team/app-role")]);
    let b = world.add_known_pod(&node, "b", "default", "b", &[(ROLE_KEY, "team/app-role")]);
    for pod in [&a, &b] {
        pod_credentials(pod).unwrap_or_else(|(s, body)| panic!("{s} {body}"));
    }
    let mut names: Vec<String> = world
        .sts
        .assume_role_calls()
        .into_iter()
        .map(|c| c.session_name)
        .collect();
    names.sort();
    // FNV-1a 32 of the address text, in hex, then the role name without its path, computed
    // here independently of the agent.
    let fnv = |text: String| {
        text.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(16_777_619)
        })
    };
    let mut expected: Vec<String> = [&a, &b]
        .iter()
        .map(|p| format!("{:x}-app-role", fnv(p.ip4().to_string())))
        .collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "one session per pod, named as kube2iam named it"
    );
}
