//! The whole agent in a test node: the IMDS emulator as the node's metadata service, moto behind
//! the fault proxy as STS, the Kubernetes API emulator, and the real agent attached to the
//! node's test cgroup. Pods are added to the API and get a namespace behind a veth.

use std::{ffi::OsString, time::Duration};

use crate::{
    Agent, AgentOptions, FaultProxy, HOST_IP4, ImdsEmulator, KubeApi, Moto, NODE_ACCESS_KEY_ID,
    Pod, TestNode,
    clients::{ClientCredentials, ImdsCredentialsDoc},
    kube_api as objects,
};

/// The node name pods are scheduled on.
pub const NODE_NAME: &str = "node-a";
/// The account the base role ARN points at (the emulator's node account).
pub const ACCOUNT: &str = "123456789012";
/// `--base-role-arn`.
pub const BASE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/";
/// The agent's admin port in tests.
pub const METRICS_PORT: u16 = 9181;

/// kube2iam's pod annotation naming the role.
pub const ROLE_KEY: &str = "iam.amazonaws.com/role";
/// kube2iam's pod annotation giving the external ID for AssumeRole.
pub const EXTERNAL_ID_KEY: &str = "iam.amazonaws.com/external-id";
/// kube2iam's namespace annotation listing the roles its pods may have.
pub const ALLOWED_KEY: &str = "iam.amazonaws.com/allowed-roles";
/// IRSA's ServiceAccount annotation naming the role ARN.
pub const IRSA_KEY: &str = "eks.amazonaws.com/role-arn";
/// The credentials listing on the metadata service; a role's document is below it.
pub const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// `arn:aws:iam::123456789012:role/<name>`.
pub fn role_arn(name: &str) -> String {
    format!("{BASE_ROLE_ARN}{name}")
}

/// Everything around one agent.
pub struct World {
    pub imds: ImdsEmulator,
    pub moto: Moto,
    pub sts: FaultProxy,
    pub api: KubeApi,
    pub agent: Agent,
    /// The pod object last added for each test pod (by its netns): namespace, name, UID.
    objects: std::sync::Mutex<std::collections::HashMap<String, (String, String, String)>>,
}

impl World {
    /// Starts the emulators and the agent (with `extra` flags) and waits for the pod list.
    pub fn start(node: &TestNode, extra: &[&str]) -> World {
        Self::start_with(node, extra, false)
    }

    /// As [`World::start`]; `ipv6` gives the agent an IPv6 address too.
    pub fn start_with(node: &TestNode, extra: &[&str], ipv6: bool) -> World {
        let imds = ImdsEmulator::start(node);
        let moto = Moto::start(node);
        let sts = FaultProxy::start(node, moto.addr());
        let api = KubeApi::start_in_node(node);
        let agent = start_agent(node, &api, &sts, extra, ipv6, true);
        World {
            imds,
            moto,
            sts,
            api,
            agent,
            objects: Default::default(),
        }
    }

    /// Kills the agent (SIGKILL).
    pub fn kill_agent(&mut self) {
        self.agent.kill9();
    }

    /// Starts a new agent with `extra` flags; waits for the pod list only with `wait_sync`
    /// (a test with the API server down cannot).
    pub fn start_agent(&mut self, node: &TestNode, extra: &[&str], ipv6: bool, wait_sync: bool) {
        self.agent = start_agent(node, &self.api, &self.sts, extra, ipv6, wait_sync);
    }

    /// Adds a Running pod for `pod` (its addresses) to the API, with annotations, its
    /// processes in cgroups laid out as kubelet's cgroupfs driver does. Adding the same
    /// namespace/name on `pod` again updates that pod object (same UID); another name is a new
    /// pod on the same addresses (new UID, new cgroups). Returns the pod's UID.
    pub fn add_pod(
        &self,
        pod: &Pod<'_>,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> String {
        let same = self
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pod.netns_name())
            .filter(|(ns, n, _)| ns == namespace && n == name)
            .map(|(_, _, uid)| uid.clone());
        match same {
            Some(uid) => {
                self.add_pod_object(pod, namespace, name, annotations, &uid);
                uid
            }
            None => self.add_new_pod(
                pod,
                namespace,
                name,
                annotations,
                crate::CgroupDriver::Cgroupfs,
            ),
        }
    }

    /// Adds a new pod (new UID, new cgroups laid out by `driver`) on `pod`'s addresses: what
    /// kubelet does when a pod gets an address another pod had.
    pub fn add_new_pod(
        &self,
        pod: &Pod<'_>,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        driver: crate::CgroupDriver,
    ) -> String {
        let uid = objects::new_uid();
        pod.use_kubelet_cgroup(driver, &uid);
        self.add_pod_object(pod, namespace, name, annotations, &uid);
        uid
    }

    fn add_pod_object(
        &self,
        pod: &Pod<'_>,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        uid: &str,
    ) {
        self.add_pod_object_with(pod, namespace, name, annotations, uid, |o| o);
    }

    fn add_pod_object_with(
        &self,
        pod: &Pod<'_>,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        uid: &str,
        change: impl FnOnce(objects::KubeObject) -> objects::KubeObject,
    ) {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                pod.netns_name().to_owned(),
                (namespace.to_owned(), name.to_owned(), uid.to_owned()),
            );
        let mut object =
            objects::pod(namespace, name, NODE_NAME, pod.ip4(), Some(pod.ip6())).uid(uid);
        for (k, v) in annotations {
            object = object.annotate(k, v);
        }
        self.api.add_pod(change(object));
    }

    /// As [`World::add_pod`], with the pod spec's `serviceAccountName` set to `account` and the
    /// container's environment to `env`.
    pub fn add_pod_of_account(
        &self,
        pod: &Pod<'_>,
        namespace: &str,
        name: &str,
        account: &str,
        annotations: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> String {
        let uid = objects::new_uid();
        pod.use_kubelet_cgroup(crate::CgroupDriver::Cgroupfs, &uid);
        let env: Vec<serde_json::Value> = env
            .iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect();
        self.add_pod_object_with(pod, namespace, name, annotations, &uid, |object| {
            object.with(|value| {
                value["spec"]["serviceAccountName"] = serde_json::json!(account);
                value["spec"]["serviceAccount"] = serde_json::json!(account);
                if !env.is_empty() {
                    value["spec"]["containers"][0]["env"] = serde_json::Value::Array(env);
                }
            })
        });
        uid
    }

    /// The credentials document `pod` gets (listing first), or a panic with the agent's log.
    pub fn creds(&self, pod: &Pod<'_>) -> ImdsCredentialsDoc {
        pod_credentials(pod).unwrap_or_else(|(status, body)| {
            panic!(
                "credentials for {}: {status} {body}\nagent log:\n{}",
                pod.ip4(),
                self.agent.log()
            )
        })
    }

    /// A pod on `node` ([`TestNode::add_pod`] with `netns`), added to the API as
    /// `namespace/name` with `annotations` ([`World::add_pod`]), once the agent knows it.
    pub fn add_known_pod<'n>(
        &self,
        node: &'n TestNode,
        netns: &str,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> Pod<'n> {
        let pod = node.add_pod(netns);
        self.add_pod(&pod, namespace, name, annotations);
        self.wait_known(node, &pod);
        pod
    }

    /// Waits until the agent knows `pod` (via its debug store) or panics.
    pub fn wait_known(&self, node: &TestNode, pod: &Pod<'_>) {
        let ip = pod.ip4().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.debug_store(node).contains(&format!("\"{ip}\"")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the agent never learned pod {ip}; store: {}\nagent log:\n{}",
            self.debug_store(node),
            self.agent.log()
        );
    }

    /// The agent's `/debug/store`.
    pub fn debug_store(&self, node: &TestNode) -> String {
        self.admin_get(node, "/debug/store").1
    }

    /// GET on the agent's admin port, from the node.
    pub fn admin_get(&self, node: &TestNode, path: &str) -> (u16, String) {
        let url = format!("http://{HOST_IP4}:{METRICS_PORT}{path}");
        let output = crate::process::output_within(
            node.command("curl")
                .args(["-s", "-m", "5", "-w", "\n%{http_code}", &url]),
            Duration::from_secs(10),
            "curl admin",
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The access key moto issued for `role` (the latest call).
    pub fn moto_key_for(&self, role: &str) -> Option<String> {
        self.moto
            .assume_role_calls()
            .into_iter()
            .rev()
            .find(|c| c.role_arn == role)
            .and_then(|c| c.access_key_id)
    }

    /// The checks every end-to-end test ends with: no pod reached the node's metadata service,
    /// and no credentials a client got are the node's.
    pub fn assert_no_leak(&self, pods: &[&Pod<'_>], got: &[&ClientCredentials]) {
        self.imds.assert_no_pod_seen(pods);
        for creds in got {
            assert_ne!(
                creds.access_key_id, NODE_ACCESS_KEY_ID,
                "LEAK: a pod received the node's credentials"
            );
        }
    }
}

/// One HTTP request from inside `pod` to the metadata address, as written (`--path-as-is`: no
/// client-side dot-segment removal). Returns the status (0 when no HTTP answer) and body.
pub fn pod_get(pod: &Pod<'_>, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    pod_request(pod, "GET", path, headers)
}

/// As [`pod_get`] with any method.
pub fn pod_request(
    pod: &Pod<'_>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    curl(
        pod.command("curl"),
        method,
        &format!("http://169.254.169.254{path}"),
        headers,
    )
}

/// One HTTP request to `url` by `command` (a `curl` command placed in a pod, a cgroup or the
/// node). Returns the status (0 when no HTTP answer) and body.
pub fn curl(
    mut command: std::process::Command,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    command.args([
        "-s",
        "--path-as-is",
        "-m",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    for (k, v) in headers {
        command.arg("-H").arg(format!("{k}: {v}"));
    }
    command.arg(url);
    let output = crate::process::output_within(&mut command, Duration::from_secs(20), "curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The credentials document a client started by `curl_command` gets from the metadata address
/// (listing first), or the failing status and body.
pub fn credentials_with(
    curl_command: impl Fn() -> std::process::Command,
) -> Result<ImdsCredentialsDoc, (u16, String)> {
    let base = format!("http://169.254.169.254{CREDS}");
    let (status, listed) = curl(curl_command(), "GET", &base, &[]);
    if status != 200 {
        return Err((status, listed));
    }
    let (status, body) = curl(
        curl_command(),
        "GET",
        &format!("{base}{}", listed.trim()),
        &[],
    );
    if status != 200 {
        return Err((status, body));
    }
    serde_json::from_str(&body).map_err(|e| (status, format!("{e}: {body}")))
}

/// The credentials document for the pod's role (listing first), or the failing status and body.
pub fn pod_credentials(pod: &Pod<'_>) -> Result<ImdsCredentialsDoc, (u16, String)> {
    credentials_with(|| pod.command("curl"))
}

fn start_agent(
    node: &TestNode,
    api: &KubeApi,
    sts: &FaultProxy,
    extra: &[&str],
    ipv6: bool,
    wait_sync: bool,
) -> Agent {
    let mut extra_args: Vec<OsString> = [
        "--node",
        NODE_NAME,
        "--api-server",
        &api.url(),
        "--sts-endpoint",
        &sts.endpoint(),
        "--metrics-port",
        &METRICS_PORT.to_string(),
        "--debug",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    // The base ARN, unless the test has the agent discover it (the two flags conflict).
    if !extra.contains(&"--auto-discover-base-arn") {
        extra_args.extend(["--base-role-arn", BASE_ROLE_ARN].map(OsString::from));
    }
    extra_args.extend(extra.iter().map(OsString::from));
    let options = AgentOptions {
        host_ipv6: ipv6,
        interception_only: false,
        extra_args,
        ..AgentOptions::default()
    };
    let agent = Agent::start_with(node, &options);
    if wait_sync {
        agent.wait_for_line("pod list synced", Duration::from_secs(20));
    }
    agent
}

/// One kept-alive connection from a pod to the metadata address: a Python client that sends a
/// GET for each path it is given on stdin, on the same connection, and reports the answer with
/// the connection's local port.
pub struct KeptConnection {
    child: crate::process::ChildGuard,
    answers: std::io::BufReader<std::process::ChildStdout>,
    port: Option<u64>,
}

impl KeptConnection {
    const CLIENT: &str = r#"
import sys, json, http.client
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
for line in sys.stdin:
    c.request("GET", line.strip())
    r = c.getresponse()
    body = r.read().decode()
    print(json.dumps({"status": r.status, "body": body, "port": c.sock.getsockname()[1]}), flush=True)
"#;

    pub fn open(pod: &Pod<'_>) -> KeptConnection {
        let mut command = pod.command("python3");
        command
            .args(["-c", Self::CLIENT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = crate::process::ChildGuard::spawn(&mut command, "kept connection");
        let answers = std::io::BufReader::new(child.child_mut().stdout.take().expect("piped"));
        KeptConnection {
            child,
            answers,
            port: None,
        }
    }

    /// The answer to `GET path`, asserted to come over the same connection as the others.
    pub fn get(&mut self, path: &str) -> (u16, String) {
        use std::io::{BufRead as _, Write as _};
        let stdin = self.child.child_mut().stdin.as_mut().expect("piped");
        writeln!(stdin, "{path}").expect("write to the client");
        stdin.flush().expect("flush to the client");
        let mut line = String::new();
        self.answers.read_line(&mut line).expect("read the client");
        let answer: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
        let port = answer["port"].as_u64().expect("a port");
        assert_eq!(
            *self.port.get_or_insert(port),
            port,
            "the connection was not kept: the client reconnected"
        );
        (
            answer["status"].as_u64().expect("a status") as u16,
            answer["body"].as_str().expect("a body").to_owned(),
        )
    }
}

/// Waits until a request on a new connection from `pod` gets `status` (the agent saw the change).
pub fn until_new_connections_get(world: &World, pod: &Pod<'_>, path: &str, status: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = pod_get(pod, path, &[]);
        if got == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new connections still get {got} ({body}), not {status}\n{}",
            world.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
