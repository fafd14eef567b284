//! What the benchmarks add to the kit's test node: pods with extra addresses, kube2iam's
//! iptables DNAT rule, running the bench client, and reading the agent's counters and memory.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    AGENT_PORT, HOST_IP4, METADATA_IP4, METADATA_PORT, Pod, TestNode,
    e2e::{NODE_NAME, World},
    kube_api,
    process::{ChildGuard, output_within},
};

pub const ROLE_KEY: &str = "iam.amazonaws.com/role";

/// Gives `pod` `count` more IPv4 addresses, 198.18.`block`.1 upwards (RFC 2544's benchmarking
/// range, inside the test namespaces only), each reachable from the node through the pod's veth.
/// To the agent each address is a pod of its own; a client picks one by binding to it.
pub fn add_addresses(node: &TestNode, pod: &Pod<'_>, block: u8, count: u8) -> Vec<Ipv4Addr> {
    assert!(count <= 250, "at most 250 extra addresses per block");
    let ips: Vec<Ipv4Addr> = (1..=count)
        .map(|i| Ipv4Addr::new(198, 18, block, i))
        .collect();
    let batch: String = ips
        .iter()
        .map(|ip| format!("addr add {ip}/32 dev eth0\n"))
        .collect();
    ip_batch(pod.netns_name(), &batch);
    ip_batch(
        node.netns_name(),
        &format!(
            "route add 198.18.{block}.0/24 dev {}\n",
            pod.host_interface()
        ),
    );
    ips
}

fn ip_batch(netns: &str, batch: &str) {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run ip -batch: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(batch.as_bytes())
        .unwrap_or_else(|e| panic!("ip -batch stdin: {e}"));
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("ip -batch: {e}"));
    assert!(
        output.status.success(),
        "ip -n {netns} -batch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Adds a Running pod at `ip` on the agent's node, with `role` if given.
pub fn register(world: &World, ip: Ipv4Addr, namespace: &str, name: &str, role: Option<&str>) {
    let mut object = kube_api::pod(namespace, name, NODE_NAME, ip, None);
    if let Some(role) = role {
        object = object.annotate(ROLE_KEY, role);
    }
    world.api.add_pod(object);
}

/// Waits until the agent's store lists every address in `ips`.
pub fn wait_known(world: &World, node: &TestNode, ips: &[Ipv4Addr], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let store = world.debug_store(node);
        let missing: Vec<&Ipv4Addr> = ips
            .iter()
            .filter(|ip| !store.contains(&format!("\"{ip}\"")))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not learn {} pods within {timeout:?} (first: {})\nagent log:\n{}",
            missing.len(),
            missing[0],
            world.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the agent's store lists none of `ips`.
pub fn wait_forgotten(world: &World, node: &TestNode, ips: &[Ipv4Addr], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while ips
        .iter()
        .any(|ip| world.debug_store(node).contains(&format!("\"{ip}\"")))
    {
        assert!(
            Instant::now() < deadline,
            "the agent still lists deleted pods after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `169.254.169.254:80`.
pub fn metadata() -> String {
    format!("{METADATA_IP4}:{METADATA_PORT}")
}

/// The agent's address, `192.0.2.10:8181`.
pub fn agent_addr() -> String {
    format!("{HOST_IP4}:{AGENT_PORT}")
}

/// kube2iam's interception for one pod interface: `iptables -t nat -A PREROUTING -p tcp -d
/// 169.254.169.254 --dport 80 -i <veth> -j DNAT --to-destination <agent>`, in the node's
/// namespace. [`Dnat::remove`] deletes the whole `ip nat` table again (`nft delete table`), so
/// that the other variants run without conntrack, as on a node that has no nat rules.
pub struct Dnat<'n> {
    node: &'n TestNode,
    interface: String,
    installed: bool,
    /// Packets the rule matched, summed over installs.
    pub matched: u64,
}

impl<'n> Dnat<'n> {
    pub fn new(node: &'n TestNode, pod: &Pod<'_>) -> Self {
        Self {
            node,
            interface: pod.host_interface(),
            installed: false,
            matched: 0,
        }
    }

    /// The rule as kube2iam writes it.
    pub fn rule(&self) -> Vec<String> {
        [
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-d",
            &METADATA_IP4.to_string(),
            "--dport",
            &METADATA_PORT.to_string(),
            "-i",
            &self.interface,
            "-j",
            "DNAT",
            "--to-destination",
            &agent_addr(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    pub fn install(&mut self) {
        if !self.installed {
            node_tool(self.node, "iptables", &self.rule());
            self.installed = true;
        }
    }

    pub fn remove(&mut self) {
        if self.installed {
            let listing = node_tool(
                self.node,
                "iptables",
                &["-t", "nat", "-L", "PREROUTING", "-n", "-v", "-x"].map(String::from),
            );
            self.matched += listing
                .lines()
                .filter(|l| l.contains("DNAT"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>();
            node_tool(
                self.node,
                "nft",
                &["delete", "table", "ip", "nat"].map(String::from),
            );
            self.installed = false;
        }
    }
}

impl Drop for Dnat<'_> {
    fn drop(&mut self) {
        // The table goes with the node's namespace anyway; removing it here keeps a failed run
        // from measuring later variants with conntrack on.
        if self.installed && !std::thread::panicking() {
            self.remove();
        }
    }
}

/// Runs a tool in the node's namespace; panics with its stderr on failure.
fn node_tool(node: &TestNode, tool: &str, args: &[String]) -> String {
    let output = output_within(node.command(tool).args(args), Duration::from_secs(20), tool);
    assert!(
        output.status.success(),
        "`{tool} {}` in the node failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a prepared client command to completion; returns its stdout or panics with stderr.
pub fn run_client(command: &mut Command, timeout: Duration, what: &str) -> String {
    let output = output_within(command, timeout, what);
    assert!(
        output.status.success(),
        "{what} failed ({}): {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout)
            .chars()
            .take(2000)
            .collect::<String>()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts a process (piped stdout) that the caller reads after it ends.
pub fn spawn_client(command: &mut Command, what: &str) -> ChildGuard {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ChildGuard::spawn(command, what)
}

/// The `samples …` line of a client's output, in nanoseconds.
pub fn samples(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("samples"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `key=value` words of the line that starts with `prefix`.
pub fn fields(stdout: &str, prefix: &str) -> std::collections::HashMap<String, String> {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(prefix))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A counter from the agent's /metrics, summed over its labels (0 if absent).
pub fn metric(world: &World, node: &TestNode, name: &str) -> f64 {
    metric_with(world, node, name, &[])
}

/// The sum of the agent's /metrics samples named `name` whose labels contain every string in
/// `labels` (e.g. `le="0.1"`).
pub fn metric_with(world: &World, node: &TestNode, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = world.admin_get(node, "/metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
            (metric == name && labels.iter().all(|label| rest.contains(label))).then_some(value)
        })
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

/// Memory figures of a process from /proc/<pid>/status, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Peak resident set (`VmHWM`).
    pub hwm: u64,
    pub rss: u64,
    /// The resident set split: anonymous memory (heap, stacks) and file pages (the binary).
    pub anon: u64,
    pub file: u64,
}

pub fn memory_kib(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        hwm: field("VmHWM:"),
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}
