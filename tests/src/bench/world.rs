//! The benchmarks' world: the kit's emulators, with TLS in front of the Kubernetes API emulator
//! and of STS (moto behind the fault proxy, which adds STS's latency), and the agent in a memory
//! cgroup of its own so the kernel memory it causes (BPF maps, sockets) is counted with it.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    Agent, AgentOptions, FaultMode, FaultProxy, HOST_IP4, ImdsEmulator, KubeApi, Moto, TestNode,
    e2e::{BASE_ROLE_ARN, METRICS_PORT, NODE_NAME},
    tls::{TestCa, TlsFront},
};

/// The TLS fronts' ports on the node's loopback.
const STS_TLS_PORT: u16 = 5443;
const API_TLS_PORT: u16 = 6443;

/// STS's latency as the bench models it: uniform in this range, per request.
pub const STS_LATENCY_MS: (u64, u64) = (50, 300);

/// A memory cgroup (cgroup v1's memory hierarchy where the machine has it, else a cgroup2
/// directory with the memory controller) for the agent, named `k2i-test-<node id>-agent` so the
/// leftover checks find it. Processes still in it are killed by PID on drop, then it is removed.
pub struct MemoryCgroup {
    path: PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    /// `None` when no memory controller is available for a child cgroup here.
    pub fn create(node: &TestNode) -> Option<Self> {
        let name = format!("k2i-test-{}-agent", node.id());
        let mounts = fs::read_to_string("/proc/mounts").ok()?;
        let v1_root = mounts.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
                .then(|| PathBuf::from(f[1]))
        });
        let (root, v1) = match v1_root {
            Some(root) => (root, true),
            None => {
                let root = crate::node::cgroup2_root();
                let controllers =
                    fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    return None;
                }
                (root, false)
            }
        };
        let path = root.join(name);
        fs::create_dir(&path).ok()?;
        Some(Self { path, v1 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, v1: &str, v2: &str) -> Option<u64> {
        let file = if self.v1 { v1 } else { v2 };
        fs::read_to_string(self.path.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Bytes charged now: the v1 `memory.usage_in_bytes` or the v2 `memory.current` (anonymous
    /// and page-cache pages the cgroup brought in, and kernel memory: BPF maps, sockets, page
    /// tables).
    pub fn current(&self) -> Option<u64> {
        self.read("memory.usage_in_bytes", "memory.current")
    }

    /// The most ever charged since the last [`MemoryCgroup::reset_peak`].
    pub fn peak(&self) -> Option<u64> {
        self.read("memory.max_usage_in_bytes", "memory.peak")
    }

    /// Kernel memory alone (v1 only: `memory.kmem.usage_in_bytes`).
    pub fn kernel(&self) -> Option<u64> {
        if self.v1 {
            self.read("memory.kmem.usage_in_bytes", "")
        } else {
            let stat = fs::read_to_string(self.path.join("memory.stat")).ok()?;
            stat.lines()
                .find_map(|l| l.strip_prefix("kernel "))
                .and_then(|v| v.trim().parse().ok())
        }
    }

    /// Anonymous memory and page cache charged to the cgroup, bytes (`memory.stat`: v1's `rss`
    /// and `cache`, v2's `anon` and `file`).
    pub fn anon_and_cache(&self) -> Option<(u64, u64)> {
        let stat = fs::read_to_string(self.path.join("memory.stat")).ok()?;
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if self.v1 {
            Some((field("rss")?, field("cache")?))
        } else {
            Some((field("anon")?, field("file")?))
        }
    }

    /// Starts a new peak (v1: writing 0 to `memory.max_usage_in_bytes`; v2 keeps its peak).
    pub fn reset_peak(&self) {
        if self.v1 {
            let _ = fs::write(self.path.join("memory.max_usage_in_bytes"), "0");
        }
    }

    pub fn is_v1(&self) -> bool {
        self.v1
    }

    fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..200 {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for pid in procs {
                // SAFETY: kill(2) by PID on a process in the agent's cgroup, which only the
                // agents this bench started (and their loader children) ever join.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..200 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("cleanup: cannot remove {}", self.path.display());
    }
}

/// Everything around the agent, as [`crate::e2e::World`] has it, with TLS and the memory cgroup.
pub struct BenchWorld {
    pub imds: ImdsEmulator,
    pub moto: Moto,
    pub sts: FaultProxy,
    pub api: KubeApi,
    pub agent: Agent,
    pub memory: Option<MemoryCgroup>,
    _sts_tls: TlsFront,
    _api_tls: TlsFront,
    sts_url: String,
    kubeconfig: PathBuf,
    ca_bundle: PathBuf,
}

impl BenchWorld {
    /// Starts the emulators, the TLS fronts and the agent (with `extra` flags), and waits for the
    /// pod list. STS answers with [`STS_LATENCY_MS`].
    pub fn start(node: &TestNode, tmp: &Path, extra: &[&str]) -> Self {
        let imds = ImdsEmulator::start(node);
        let moto = Moto::start(node);
        let sts = FaultProxy::start(node, moto.addr());
        sts.set_mode(FaultMode::Latency {
            min: Duration::from_millis(STS_LATENCY_MS.0),
            max: Duration::from_millis(STS_LATENCY_MS.1),
        });
        let api = KubeApi::start_in_node(node);
        let ca = TestCa::create(tmp);
        let sts_tls = TlsFront::start(node, STS_TLS_PORT, sts.addr(), &ca);
        let api_tls = TlsFront::start(node, API_TLS_PORT, api.addr(), &ca);
        let kubeconfig = ca.kubeconfig(&api_tls.url());
        let ca_bundle = ca.bundle_with_system_roots();
        let memory = MemoryCgroup::create(node);
        let sts_url = sts_tls.url();
        let agent = spawn_agent(
            node,
            extra,
            &sts_url,
            &kubeconfig,
            &ca_bundle,
            memory.as_ref(),
        );
        agent.wait_for_line("pod list synced", Duration::from_secs(30));
        Self {
            imds,
            moto,
            sts,
            api,
            agent,
            memory,
            _sts_tls: sts_tls,
            _api_tls: api_tls,
            sts_url,
            kubeconfig,
            ca_bundle,
        }
    }

    pub fn kill_agent(&mut self) {
        self.agent.kill9();
    }

    /// Starts a new agent with `extra` flags and waits for its pod list.
    pub fn start_agent(&mut self, node: &TestNode, extra: &[&str]) {
        self.agent = spawn_agent(
            node,
            extra,
            &self.sts_url,
            &self.kubeconfig,
            &self.ca_bundle,
            self.memory.as_ref(),
        );
        self.agent
            .wait_for_line("pod list synced", Duration::from_secs(30));
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
}

fn spawn_agent(
    node: &TestNode,
    extra: &[&str],
    sts_url: &str,
    kubeconfig: &Path,
    ca_bundle: &Path,
    memory: Option<&MemoryCgroup>,
) -> Agent {
    let mut extra_args: Vec<OsString> = [
        "--node",
        NODE_NAME,
        "--kubeconfig",
        &kubeconfig.to_string_lossy(),
        "--sts-endpoint",
        sts_url,
        "--base-role-arn",
        BASE_ROLE_ARN,
        "--metrics-port",
        &METRICS_PORT.to_string(),
        "--debug",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    extra_args.extend(extra.iter().map(OsString::from));
    let options = AgentOptions {
        interception_only: false,
        extra_args,
        env: vec![("SSL_CERT_FILE".into(), ca_bundle.into())],
        cgroup: memory.map(|m| m.path().to_owned()),
        ..AgentOptions::default()
    };
    Agent::start_with(node, &options)
}
