//! The shipped image and the chart's DaemonSet pod under a real container runtime (runc), set
//! up as the kubelet and containerd set them up (tests/src/cri): the pod template from
//! `helm template`, the image `cargo xtask image` writes, the securityContext as rendered
//! (capabilities, read-only root, uid, seccomp), hostNetwork in the test node, the hostPath
//! mounts with their propagation (the node's bpffs and cgroup tree are the test node's), a
//! private cgroup namespace, the in-cluster API access through the service account volume, and
//! probes. Pods are laid out as the kubelet lays them out (kubepods/…/pod<uid>/<container>) and
//! run real clients; every test checks that no pod reached the node's metadata service and that
//! no pod got the node's credentials.
//!
//! They need the image: `cargo xtask image` (a step of `cargo xtask test`, which then runs
//! them with `--ignored`).

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use kube2iam_tests::{
    ImdsEmulator, KubeApi, Moto, NODE_ACCESS_KEY_ID, Pod, TestNode, bpf,
    clients::{self, RunIn},
    cri::{
        ApiFront, AppContainer, CgroupLayout, Kubelet, PodSandbox,
        chart::{self, ci_values},
        image_archive, spec,
    },
    e2e::{self, ROLE_KEY, role_arn},
    kube_api,
};
use serde_json::Value;

/// The image reference the chart renders by default (repository kube2iam-ebpf, the appVersion).
const DEFAULT_IMAGE: &str = "kube2iam-ebpf:0.1.0";
/// What ci/kube2iam-values.yaml names.
const KUBE2IAM_VALUES_IMAGE: &str =
    "123456789012.dkr.ecr.eu-west-1.amazonaws.com/kube2iam-ebpf:0.1.0";
const READY: Duration = Duration::from_secs(60);

/// The emulated cluster around one node.
struct Cluster {
    imds: ImdsEmulator,
    moto: Moto,
    api: KubeApi,
    front: ApiFront,
}

impl Cluster {
    fn start(node: &TestNode) -> Cluster {
        let imds = ImdsEmulator::start(node);
        let moto = Moto::start(node);
        let api = KubeApi::start_in_node(node);
        let dir = Path::new(kube2iam_tests::node::RUN_ROOT).join(format!("{}-api", node.id()));
        let front = ApiFront::start(node, &api, &dir);
        Cluster {
            imds,
            moto,
            api,
            front,
        }
    }

    /// The chart rendered with `values` and what this environment needs on top: STS is moto.
    fn render(&self, node: &TestNode, values: &[PathBuf], set: &[(&str, &str)]) -> Vec<Value> {
        let endpoint = self.moto.endpoint();
        let mut all = vec![("extraArgs.sts-endpoint", endpoint.as_str())];
        all.extend_from_slice(set);
        let work = Path::new(kube2iam_tests::node::RUN_ROOT).join(format!("{}-helm", node.id()));
        let objects = chart::render(values, &all, &work);
        let _ = std::fs::remove_dir_all(&work);
        objects
    }

    /// A running pod of `namespace` on the node with the role annotation `role` (if any), and a
    /// container of it laid out as the kubelet does.
    fn app_pod<'n>(
        &self,
        kubelet: &Kubelet<'_>,
        pod: &Pod<'n>,
        namespace: &str,
        role: Option<&str>,
    ) -> AppContainer {
        let uid = kube_api::new_uid();
        let mut object = kube_api::pod(
            namespace,
            pod.name(),
            e2e::NODE_NAME,
            pod.ip4(),
            Some(pod.ip6()),
        )
        .uid(&uid);
        if let Some(role) = role {
            object = object.annotate(ROLE_KEY, role);
        }
        self.api.add_pod(object);
        kubelet.app_container(pod, &uid)
    }

    /// No pod reached the node's metadata service.
    fn assert_no_pod_seen(&self, pods: &[&Pod<'_>]) {
        self.imds.assert_no_pod_seen(pods);
    }

    /// Every request the agent sent to the API server carried the mounted token.
    fn assert_authenticated(&self, kubelet: &Kubelet<'_>) {
        let seen = self.front.authorizations();
        assert!(
            !seen.is_empty(),
            "the agent never reached the API server through its in-cluster address"
        );
        let expected = format!("Bearer {}", kubelet.token);
        assert!(
            seen.iter().all(|a| *a == expected),
            "the agent must authenticate with the service account token the kubelet mounted; \
             saw {seen:?}"
        );
    }
}

fn daemonset(objects: &[Value]) -> &Value {
    chart::object(objects, "DaemonSet")
}

/// Waits until `pod` is in the agent's identity map (inspect, run in the container).
fn wait_known(sandbox: &PodSandbox<'_>, pod: &Pod<'_>) {
    let ip = pod.ip4().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let report = inspect(sandbox);
        if report["identities"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["ip"] == ip.as_str())
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never learned pod {ip}: {report}\nagent log:\n{}",
            sandbox.container("agent").log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl exec … -- kube2iam-agent inspect --output json`.
fn inspect(sandbox: &PodSandbox<'_>) -> Value {
    let output = sandbox.exec(
        "agent",
        &[
            "/usr/local/bin/kube2iam-agent",
            "inspect",
            "--output",
            "json",
        ],
    );
    assert!(
        output.status.success(),
        "inspect in the container failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The links inspect lists, as (hook, link id, cgroup id).
fn links(report: &Value) -> Vec<(String, u64, u64)> {
    let mut links: Vec<(String, u64, u64)> = report["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["hook"].as_str().unwrap_or("").to_owned(),
                l["link_id"].as_u64().unwrap_or(0),
                l["cgroup_id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    links.sort();
    links
}

fn cgroup_id(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .ino()
}

/// The credentials a container's curl gets with the IMDSv2 token dance.
fn curl_credentials(
    app: &AppContainer,
    base: &str,
    sandbox: &PodSandbox<'_>,
) -> (String, clients::ImdsCredentialsDoc) {
    clients::curl_imdsv2_credentials(RunIn::Container(app), base).unwrap_or_else(|e| {
        panic!(
            "curl in {}: {e}\nagent log:\n{}",
            app.cgroup().display(),
            sandbox.container("agent").log()
        )
    })
}

/// Starts the chart's pod and checks it the way the kubelet would: ready, and running exactly
/// as the spec says.
fn start_agent_pod<'k>(
    kubelet: &'k Kubelet<'k>,
    objects: &[Value],
    images: &[(&str, &Path)],
) -> PodSandbox<'k> {
    let sandbox = kubelet.start_pod(daemonset(objects), images);
    sandbox.wait_probe("agent", "readinessProbe", READY);
    assert_eq!(sandbox.probe("agent", "livenessProbe"), 200, "liveness");
    sandbox
}

/// The securityContext as rendered is what runc applied, and the container sits where the
/// kubelet puts it.
fn assert_runs_as_specified(kubelet: &Kubelet<'_>, sandbox: &PodSandbox<'_>, caps: &[&str]) {
    let agent = sandbox.container("agent");
    let pid = agent.pid().expect("the agent container runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let unavailable = kubelet.unavailable(caps);
    if !unavailable.is_empty() {
        eprintln!(
            "note: this machine's bounding set lacks {unavailable:?}; the container runs without \
             them"
        );
    }
    let mut expected = 0u64;
    for cap in caps.iter().filter(|c| !unavailable.iter().any(|u| u == *c)) {
        expected |= 1 << spec::capability_number(cap);
    }
    assert_eq!(
        field("CapBnd:"),
        expected,
        "bounding set = the chart's capabilities"
    );
    assert_eq!(
        field("CapEff:"),
        expected,
        "effective set = the chart's capabilities"
    );
    assert_eq!(field("CapInh:"), 0, "no inheritable capabilities");
    let security = &sandbox.spec()["containers"][0]["securityContext"];
    let no_new_privs = if security["allowPrivilegeEscalation"] == false {
        1
    } else {
        0
    };
    assert!(
        status
            .lines()
            .any(|l| l == format!("NoNewPrivs:\t{no_new_privs}")),
        "allowPrivilegeEscalation {} gives no_new_privs {no_new_privs}",
        security["allowPrivilegeEscalation"]
    );
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "0"),
        "{uid_line}"
    );
    // The root filesystem is read-only.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "readOnlyRootFilesystem: {root}"
    );
    // In the kubelet's cgroup for the pod, under the node's (test) cgroup.
    let cgroup = std::fs::read_to_string(agent.cgroup().join("cgroup.procs")).expect("procs");
    assert!(
        cgroup.lines().any(|l| l.trim() == pid.to_string()),
        "the agent runs in {}",
        agent.cgroup().display()
    );
    assert!(agent.cgroup().starts_with(kubelet.node().cgroup_path()));
    // The cgroup namespace: private on cgroup v2, the node's otherwise.
    let own_ns = std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).expect("cgroupns");
    let ours = std::fs::read_link("/proc/self/ns/cgroup").expect("own cgroupns");
    assert_ne!(own_ns, ours, "the container has its own cgroup namespace");
    // /proc/<pid>/cgroup shows paths relative to the reader's cgroup namespace: read it from
    // inside the container's.
    let view = kube2iam_tests::process::output_within(
        std::process::Command::new("nsenter")
            .arg(format!("--cgroup=/proc/{pid}/ns/cgroup"))
            .args(["cat", &format!("/proc/{pid}/cgroup")]),
        Duration::from_secs(10),
        "nsenter cat",
    );
    let view = String::from_utf8_lossy(&view.stdout).into_owned();
    let unified = view
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup2 line in {view}"));
    if kubelet.layout() == CgroupLayout::Unified {
        assert_eq!(
            unified, "/",
            "a private cgroup namespace is rooted at the container's own cgroup"
        );
    } else {
        assert!(
            unified.starts_with("/kubepods/"),
            "the node's cgroup namespace is rooted at the node's root (the test cgroup): {unified}"
        );
    }
}

const CHART_CAPS: &[&str] = &[
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_SYS_RESOURCE",
    "CAP_DAC_OVERRIDE",
];

/// The chart's defaults on a cgroup v2 node, from install to credentials: the pod starts with the
/// rendered securityContext, attaches at the node's cgroup root (here the test cgroup) through
/// the hostPath, reads pods from the API with its service account, and serves each pod its own
/// role over IPv4 and IPv6 (HOST_IPS from status.hostIPs); `inspect` and `doctor` work through
/// `kubectl exec`.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn default_chart_pod_serves_pods_their_roles_under_runc() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let archive = image_archive();
    let objects = cluster.render(&node, &[], &[]);
    let sandbox = start_agent_pod(&kubelet, &objects, &[(DEFAULT_IMAGE, &archive)]);
    assert_runs_as_specified(&kubelet, &sandbox, CHART_CAPS);
    // The chart's RuntimeDefault, as containerd generates it for the chart's capabilities.
    assert_seccomp(&sandbox, true);

    let pod_a = node.add_pod("a");
    let pod_b = node.add_pod("b");
    let role = role_arn("web-role");
    let app_a = cluster.app_pod(&kubelet, &pod_a, "default", Some(&role));
    let app_b = cluster.app_pod(&kubelet, &pod_b, "default", None);
    wait_known(&sandbox, &pod_a);
    wait_known(&sandbox, &pod_b);

    let (listed, v4) = curl_credentials(&app_a, clients::IMDS_ENDPOINT4, &sandbox);
    assert_eq!(listed, role, "a full ARN annotation is listed in full");
    let issued = cluster
        .moto
        .assume_role_calls()
        .into_iter()
        .rev()
        .find(|c| c.role_arn == role)
        .and_then(|c| c.access_key_id)
        .expect("moto issued credentials for web-role");
    assert_eq!(
        v4.access_key_id, issued,
        "pod a gets its role's credentials"
    );
    // IPv6: the agent's IPv6 address came from status.hostIPs alone.
    let (_, v6) = curl_credentials(&app_a, clients::IMDS_ENDPOINT6, &sandbox);
    assert_eq!(v6.access_key_id, issued, "the same over fd00:ec2::254");
    // Pod b has no role and there is no default role.
    let b = clients::curl_imdsv2(
        RunIn::Container(&app_b),
        clients::IMDS_ENDPOINT4,
        "/latest/meta-data/iam/security-credentials/",
    );
    assert_eq!(
        b.status,
        Some(404),
        "a pod without a role gets a 404: {b:?}"
    );
    for creds in [&v4, &v6] {
        assert_ne!(
            creds.access_key_id, NODE_ACCESS_KEY_ID,
            "LEAK: the node's credentials"
        );
    }
    cluster.assert_no_pod_seen(&[&pod_a, &pod_b]);
    cluster.assert_authenticated(&kubelet);

    // kubectl exec … inspect: the hooks are attached at the node's cgroup root (the test
    // cgroup), which the chart's hostPath put at the container's /sys/fs/cgroup.
    let report = inspect(&sandbox);
    let test_cgroup = cgroup_id(node.cgroup_path());
    let attached = links(&report);
    assert!(!attached.is_empty(), "inspect lists the links: {report}");
    for (hook, _, cgroup) in &attached {
        assert_eq!(
            *cgroup, test_cgroup,
            "{hook} must be attached to the node's cgroup root, not the container's own"
        );
    }
    assert_eq!(
        report["config"]["agent_ipv6"], "[fd00:192::10]:8181",
        "{report}"
    );
    // kubectl exec … doctor.
    let doctor = sandbox.exec("agent", &["/usr/local/bin/kube2iam-agent", "doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(doctor.status.success(), "doctor in the container: {text}");
}

/// A values file written for kube2iam's chart, unchanged (ci/kube2iam-values.yaml): base ARN,
/// default role, namespace restrictions, its metrics port and JSON logs all work in the pod.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn kube2iam_values_pod_serves_pods_under_runc() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let archive = image_archive();
    let objects = cluster.render(&node, &[ci_values("kube2iam-values.yaml")], &[]);
    let sandbox = start_agent_pod(&kubelet, &objects, &[(KUBE2IAM_VALUES_IMAGE, &archive)]);
    assert_runs_as_specified(&kubelet, &sandbox, CHART_CAPS);
    assert!(
        sandbox
            .container("agent")
            .log()
            .lines()
            .any(|l| l.starts_with('{')),
        "log-format json"
    );

    cluster
        .api
        .add_namespace(kube_api::namespace("apps").annotate(
            "iam.amazonaws.com/allowed-roles",
            r#"["app-role","kube2iam-default"]"#,
        ));
    let pod_a = node.add_pod("a");
    let pod_b = node.add_pod("b");
    let pod_c = node.add_pod("c");
    let app_a = cluster.app_pod(&kubelet, &pod_a, "apps", Some("app-role"));
    let app_b = cluster.app_pod(&kubelet, &pod_b, "apps", None);
    let app_c = cluster.app_pod(&kubelet, &pod_c, "apps", Some("other-role"));
    for pod in [&pod_a, &pod_b, &pod_c] {
        wait_known(&sandbox, pod);
    }
    let (listed, a) = curl_credentials(&app_a, clients::IMDS_ENDPOINT4, &sandbox);
    assert_eq!(listed, "app-role", "completed with the base ARN");
    let (listed, b) = curl_credentials(&app_b, clients::IMDS_ENDPOINT4, &sandbox);
    assert_eq!(listed, "kube2iam-default", "the default role");
    let c = clients::curl_imdsv2(
        RunIn::Container(&app_c),
        clients::IMDS_ENDPOINT4,
        "/latest/meta-data/iam/security-credentials/",
    );
    assert_eq!(
        c.status,
        Some(403),
        "a role the namespace does not allow: {c:?}"
    );
    let arns: Vec<String> = cluster
        .moto
        .assume_role_calls()
        .into_iter()
        .map(|c| c.role_arn)
        .collect();
    assert!(arns.contains(&role_arn("app-role")), "{arns:?}");
    assert!(!arns.contains(&role_arn("other-role")), "{arns:?}");
    for creds in [&a, &b] {
        assert_ne!(
            creds.access_key_id, NODE_ACCESS_KEY_ID,
            "LEAK: the node's credentials"
        );
    }
    // Metrics on kube2iam's port 9543, as the values say.
    assert_eq!(
        sandbox.probe("agent", "livenessProbe"),
        200,
        "the probe follows prometheus.metricsPort"
    );
    cluster.assert_no_pod_seen(&[&pod_a, &pod_b, &pod_c]);
    cluster.assert_authenticated(&kubelet);
}

/// A pod that asks in a loop while the agent container is killed and restarted, or the pod is
/// replaced: every answer is the pod's own credentials, a refused connection or one the dying
/// agent cut (fail-closed), never the node's metadata service.
struct Asker {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<AskOutcome>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AskOutcome {
    /// 200 with the pod's role listed.
    Served,
    /// curl exit 7: connection refused at the agent address.
    Refused,
    /// curl exit 52 or 56: the agent went away during the request (empty reply, reset).
    Cut,
    /// Anything else: HTTP status and body, or curl's exit code.
    Other(String),
}

impl Asker {
    fn start(app: &AppContainer, role: &str) -> Asker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let cgroup = app.cgroup().to_owned();
        let netns = app.netns().to_owned();
        let role = role.to_owned();
        let thread = thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let mut command = std::process::Command::new("curl");
                kube2iam_tests::process::place(&mut command, Some(&cgroup), Some(&netns));
                command.args([
                    "-s",
                    "-m",
                    "3",
                    "-w",
                    "\n%{http_code}",
                    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                ]);
                let output = kube2iam_tests::process::output_within(
                    &mut command,
                    Duration::from_secs(10),
                    "curl",
                );
                let text = String::from_utf8_lossy(&output.stdout).into_owned();
                let outcome = match output.status.code() {
                    Some(7) => AskOutcome::Refused,
                    Some(52 | 56) => AskOutcome::Cut,
                    Some(0)
                        if text.trim_end().ends_with("200")
                            && text.lines().next() == Some(role.as_str()) =>
                    {
                        AskOutcome::Served
                    }
                    code => AskOutcome::Other(format!("exit {code:?}: {text}")),
                };
                outcomes.push(outcome);
                thread::sleep(Duration::from_millis(20));
            }
            outcomes
        });
        Asker {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<AskOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the asking thread")
    }
}

impl Drop for Asker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every answer was fail-closed, and the pod asked at least once while no agent served.
fn assert_fail_closed(outcomes: &[AskOutcome], what: &str) {
    let others: Vec<&AskOutcome> = outcomes
        .iter()
        .filter(|o| matches!(o, AskOutcome::Other(_)))
        .collect();
    assert!(
        others.is_empty(),
        "{what}: every answer is the pod's credentials, a refused or a cut connection, got \
         {others:?}"
    );
    assert!(
        outcomes.contains(&AskOutcome::Served),
        "{what}: the pod was served ({} asks)",
        outcomes.len()
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, AskOutcome::Refused | AskOutcome::Cut)),
        "{what}: the pod asked while no agent ran ({} asks, all served): the window was missed",
        outcomes.len()
    );
}

/// The container killed (SIGKILL) and restarted by the kubelet: the new agent adopts the pinned
/// links (same link ids) with the chart's capabilities, and interception never lapses.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn killed_agent_container_is_restarted_and_adopts_the_pins_without_a_gap() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let archive = image_archive();
    let objects = cluster.render(&node, &[], &[]);
    let mut sandbox = start_agent_pod(&kubelet, &objects, &[(DEFAULT_IMAGE, &archive)]);
    let pod = node.add_pod("a");
    let role = role_arn("web-role");
    let app = cluster.app_pod(&kubelet, &pod, "default", Some(&role));
    wait_known(&sandbox, &pod);
    let before = links(&inspect(&sandbox));

    let asker = Asker::start(&app, &role);
    thread::sleep(Duration::from_millis(500));
    sandbox.kill_and_restart("agent");
    sandbox.wait_probe("agent", "readinessProbe", READY);
    thread::sleep(Duration::from_millis(500));
    let outcomes = asker.finish();

    let log = sandbox.container("agent").log();
    assert!(
        log.contains("adopted") || log.contains("Adopted"),
        "the new agent adopts:\n{log}"
    );
    assert_eq!(
        links(&inspect(&sandbox)),
        before,
        "the same links, on the same cgroup, survive the restart"
    );
    assert_fail_closed(&outcomes, "kill and restart");
    cluster.assert_no_pod_seen(&[&pod]);
}

/// `uninstall.enabled=true`: the init container detaches the programs and removes the pins
/// with the chart's capabilities; the pause container is the only other one.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn uninstall_mode_removes_the_pins_under_runc() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let archive = image_archive();
    let installed = cluster.render(&node, &[], &[]);
    let sandbox = start_agent_pod(&kubelet, &installed, &[(DEFAULT_IMAGE, &archive)]);
    assert!(!links(&inspect(&sandbox)).is_empty());
    let results = sandbox.terminate();
    assert!(
        results.iter().all(|(_, status, _)| status.success()),
        "SIGTERM ends the agent cleanly: {:?}",
        results.iter().map(|(n, s, _)| (n, s)).collect::<Vec<_>>()
    );
    let pins = node.pin_path();
    assert!(
        pins.join("links").exists(),
        "a stopped agent leaves the pins (fail-closed)"
    );

    let uninstall = cluster.render(&node, &[ci_values("uninstall-values.yaml")], &[]);
    let sandbox = kubelet.start_pod(daemonset(&uninstall), &[(DEFAULT_IMAGE, &archive)]);
    let init = sandbox.init_results();
    assert_eq!(init.len(), 1, "one init container");
    assert!(
        init[0].status.success(),
        "kube2iam-agent uninstall in the init container failed ({}):\n{}",
        init[0].status,
        init[0].log
    );
    assert_eq!(
        sandbox.skipped(),
        ["pause"],
        "then only the pause container"
    );
    assert!(
        !pins.exists() || std::fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0) == 0,
        "the pins are gone: {:?}",
        std::fs::read_dir(&pins).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>())
    );
    let cgroup = bpf::open_cgroup(node.cgroup_path());
    for hook in bpf::AttachType::ALL {
        let attached = bpf::prog_query(cgroup.as_fd(), hook).expect("query the test cgroup");
        assert!(
            attached.is_empty(),
            "{hook:?}: programs stay attached: {attached:?}"
        );
    }
}

/// The upgrade fixture `cargo xtask image --upgrade-fixture` writes: the same recipe around an
/// agent whose eBPF programs differ from the shipped ones.
fn upgrade_archive() -> PathBuf {
    let archive = image_archive();
    let path = archive.with_file_name("kube2iam-ebpf-upgrade.oci.tar");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask image --upgrade-fixture` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The program id behind each hook, from inspect.
fn programs(report: &Value) -> Vec<(String, u64)> {
    let mut programs: Vec<(String, u64)> = report["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["hook"].as_str().unwrap_or("").to_owned(),
                l["program_id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    programs.sort();
    programs
}

/// A rolling update to an image whose eBPF programs differ, with the chart's default
/// capabilities (no CAP_SYS_ADMIN): the old pod stops on SIGTERM leaving the pins, the new one
/// swaps each pinned link's program in place (same links, new programs), and a pod asking all
/// along gets its credentials or a refused connection, never the node's metadata service.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn rolling_update_to_other_ebpf_programs_swaps_them_in_place_with_the_charts_capabilities() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let (archive, upgrade) = (image_archive(), upgrade_archive());
    let old = start_agent_pod(
        &kubelet,
        &cluster.render(&node, &[], &[]),
        &[(DEFAULT_IMAGE, &archive)],
    );
    let pod = node.add_pod("a");
    let role = role_arn("web-role");
    let app = cluster.app_pod(&kubelet, &pod, "default", Some(&role));
    wait_known(&old, &pod);
    let before = inspect(&old);

    let asker = Asker::start(&app, &role);
    thread::sleep(Duration::from_millis(500));
    let stopped = old.terminate();
    assert!(
        stopped.iter().all(|(_, status, _)| status.success()),
        "the old agent stops cleanly on SIGTERM: {:?}",
        stopped
            .iter()
            .map(|(n, s, l)| (n, s, l))
            .collect::<Vec<_>>()
    );
    let new_objects = cluster.render(&node, &[], &[("image.tag", "upgrade")]);
    let new = start_agent_pod(
        &kubelet,
        &new_objects,
        &[("kube2iam-ebpf:upgrade", &upgrade)],
    );
    thread::sleep(Duration::from_millis(500));
    let outcomes = asker.finish();

    let log = new.container("agent").log();
    assert!(
        log.contains("replaced the pinned program atomically"),
        "the new agent swaps the programs behind the pinned links:\n{log}"
    );
    let after = inspect(&new);
    assert_eq!(
        links(&after),
        links(&before),
        "the same links on the same cgroup"
    );
    let (old_programs, new_programs) = (programs(&before), programs(&after));
    for ((hook, old_id), (_, new_id)) in old_programs.iter().zip(&new_programs) {
        assert_ne!(old_id, new_id, "{hook} runs the new image's program");
    }
    assert_fail_closed(&outcomes, "rolling update");
    let (_, creds) = curl_credentials(&app, clients::IMDS_ENDPOINT4, &new);
    assert_ne!(
        creds.access_key_id, NODE_ACCESS_KEY_ID,
        "LEAK: the node's credentials"
    );
    cluster.assert_no_pod_seen(&[&pod]);
}

/// The default chart on the hybrid layout (cgroup2 at /sys/fs/cgroup/unified, the host's
/// cgroup namespace): the agent finds cgroup2 below the hostPath and attaches there.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn default_chart_attaches_to_the_node_root_on_the_hybrid_cgroup_layout() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Hybrid, &cluster.front);
    let archive = image_archive();
    let sandbox = start_agent_pod(
        &kubelet,
        &cluster.render(&node, &[], &[]),
        &[(DEFAULT_IMAGE, &archive)],
    );
    assert_runs_as_specified(&kubelet, &sandbox, CHART_CAPS);
    assert_attached_to_the_test_cgroup(&node, &sandbox);
    assert_serves(&node, &cluster, &kubelet, &sandbox);
}

/// Amazon Linux 2's layout (cgroup v1 only, host cgroup namespace) with the README's advice:
/// the chart's capabilities plus SYS_ADMIN. The agent mounts cgroup2 itself and attaches at
/// its root, which is the node's.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn chart_with_sys_admin_mounts_cgroup2_itself_on_the_v1_cgroup_layout() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::V1, &cluster.front);
    let archive = image_archive();
    let objects = cluster.render(
        &node,
        &[],
        &[(
            "securityContext.capabilities",
            "{BPF,PERFMON,NET_ADMIN,SYS_RESOURCE,DAC_OVERRIDE,SYS_ADMIN}",
        )],
    );
    let sandbox = start_agent_pod(&kubelet, &objects, &[(DEFAULT_IMAGE, &archive)]);
    let mut caps = CHART_CAPS.to_vec();
    caps.push("CAP_SYS_ADMIN");
    assert_runs_as_specified(&kubelet, &sandbox, &caps);
    assert_seccomp(&sandbox, true);
    let log = sandbox.container("agent").log();
    assert!(log.contains("no cgroup2 mounted; mounted one"), "{log}");
    assert_attached_to_the_test_cgroup(&node, &sandbox);
    assert_serves(&node, &cluster, &kubelet, &sandbox);
}

fn assert_attached_to_the_test_cgroup(node: &TestNode, sandbox: &PodSandbox<'_>) {
    let report = inspect(sandbox);
    let attached = links(&report);
    assert!(!attached.is_empty(), "inspect lists the links: {report}");
    let test_cgroup = cgroup_id(node.cgroup_path());
    for (hook, _, cgroup) in &attached {
        assert_eq!(
            *cgroup, test_cgroup,
            "{hook} is attached to the node's root (the test cgroup)"
        );
    }
}

/// One pod with a role gets it; nothing reaches the node's metadata service.
fn assert_serves(
    node: &TestNode,
    cluster: &Cluster,
    kubelet: &Kubelet<'_>,
    sandbox: &PodSandbox<'_>,
) {
    let pod = node.add_pod("a");
    let role = role_arn("web-role");
    let app = cluster.app_pod(kubelet, &pod, "default", Some(&role));
    wait_known(sandbox, &pod);
    let (listed, creds) = curl_credentials(&app, clients::IMDS_ENDPOINT4, sandbox);
    assert_eq!(listed, role);
    assert_ne!(
        creds.access_key_id, NODE_ACCESS_KEY_ID,
        "LEAK: the node's credentials"
    );
    cluster.assert_no_pod_seen(&[&pod]);
    cluster.assert_authenticated(kubelet);
}

/// The documented fallback for runtimes whose default profile blocks bpf() without
/// CAP_SYS_ADMIN: `securityContext.seccompProfile: Unconfined`.
#[test]
#[ignore = "needs the agent image (cargo xtask image); cargo xtask test runs it"]
fn unconfined_seccomp_fallback_runs_the_agent() {
    let node = TestNode::new();
    let cluster = Cluster::start(&node);
    let kubelet = Kubelet::new(&node, CgroupLayout::Unified, &cluster.front);
    let archive = image_archive();
    let objects = cluster.render(
        &node,
        &[],
        &[("securityContext.seccompProfile", "Unconfined")],
    );
    let sandbox = start_agent_pod(&kubelet, &objects, &[(DEFAULT_IMAGE, &archive)]);
    assert_seccomp(&sandbox, false);
    assert_attached_to_the_test_cgroup(&node, &sandbox);
    assert_serves(&node, &cluster, &kubelet, &sandbox);
}

/// Whether the agent runs under a seccomp filter, and if so that it is containerd's
/// RuntimeDefault for its capabilities: errno by default, bpf() and perf_event_open() allowed
/// (for CAP_BPF and CAP_PERFMON), mount() not (no CAP_SYS_ADMIN).
fn assert_seccomp(sandbox: &PodSandbox<'_>, filtered: bool) {
    let agent = sandbox.container("agent");
    let pid = agent.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let mode = if filtered { "2" } else { "0" };
    assert!(
        status.lines().any(|l| l == format!("Seccomp:\t{mode}")),
        "seccomp mode {mode} expected: {}",
        status
            .lines()
            .find(|l| l.starts_with("Seccomp:"))
            .unwrap_or("")
    );
    if !filtered {
        return;
    }
    let seccomp = &agent.config()["linux"]["seccomp"];
    assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ERRNO", "{seccomp}");
    let allowed = |name: &str| {
        seccomp["syscalls"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                rule["action"] == "SCMP_ACT_ALLOW"
                    && rule["names"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n == name))
            })
    };
    let has_sys_admin = agent.config()["process"]["capabilities"]["bounding"]
        .as_array()
        .is_some_and(|caps| caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    assert!(allowed("bpf") && allowed("perf_event_open"), "{seccomp}");
    assert_eq!(
        allowed("mount"),
        has_sys_admin,
        "mount() only with CAP_SYS_ADMIN"
    );
}
