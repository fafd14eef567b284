//! What the benchmarks add to the kit's test node: pods with extra addresses, kube2iam's
//! iptables DNAT rule, running the bench client, and reading the agent's counters and memory.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::world::BenchWorld;
use crate::{
    AGENT_PORT, HOST_IP4, KubeApi, METADATA_IP4, METADATA_PORT, Pod, TestNode,
    e2e::{NODE_NAME, ROLE_KEY},
    kube_api,
    process::{ChildGuard, output_within},
};

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
pub fn register(api: &KubeApi, ip: Ipv4Addr, namespace: &str, name: &str, role: Option<&str>) {
    let mut object = kube_api::pod(namespace, name, NODE_NAME, ip, None);
    if let Some(role) = role {
        object = object.annotate(ROLE_KEY, role);
    }
    api.add_pod(object);
}

/// Waits until the agent's store lists every address in `ips`.
pub fn wait_known(world: &BenchWorld, node: &TestNode, ips: &[Ipv4Addr], timeout: Duration) {
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
pub fn wait_forgotten(world: &BenchWorld, node: &TestNode, ips: &[Ipv4Addr], timeout: Duration) {
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
pub fn metric(world: &BenchWorld, node: &TestNode, name: &str) -> f64 {
    metric_with(world, node, name, &[])
}

/// The sum of the agent's /metrics samples named `name` whose labels contain every string in
/// `labels` (e.g. `le="0.1"`).
pub fn metric_with(world: &BenchWorld, node: &TestNode, name: &str, labels: &[&str]) -> f64 {
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

/// Resident memory of a process by where it comes from, from /proc/<pid>/smaps (KiB).
#[derive(Clone, Debug, Default)]
pub struct Smaps {
    /// (category, resident, of which anonymous, referenced since [`clear_refs`]).
    pub parts: Vec<(String, u64, u64, u64)>,
}

impl Smaps {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.1).sum()
    }

    pub fn referenced(&self) -> u64 {
        self.parts.iter().map(|p| p.3).sum()
    }
}

/// Clears the referenced bits of every page of a process (`/proc/<pid>/clear_refs`), so that
/// smaps' `Referenced` then counts the pages it touched since.
pub fn clear_refs(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "1");
}

/// The process's mappings grouped: its own binary (code, read-only data, writable data),
/// shared libraries, the heap, anonymous mappings (malloc arenas, thread stacks), the main
/// stack, and the rest.
pub fn smaps(pid: u32) -> Smaps {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
        .unwrap_or_default();
    let order = [
        "agent binary: code (r-x)",
        "agent binary: read-only data (r--: .rodata, .eh_frame, …)",
        "agent binary: writable data (rw-: .data, .bss, relocations)",
        "shared libraries (libc, libgcc, ld.so)",
        "[heap]",
        "anonymous mappings: malloc arenas, thread stacks",
        "[stack]",
        "other (vdso, …)",
    ];
    let mut sums = vec![(0u64, 0u64, 0u64); order.len()];
    let mut current = order.len() - 1;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let mut words = line.split_whitespace();
            let perms = words.nth(1).unwrap_or("");
            let path = words.nth(3).unwrap_or("");
            current = match path {
                "" => 5,
                "[heap]" => 4,
                "[stack]" => 6,
                p if p == exe && perms.contains('x') => 0,
                p if p == exe && perms.contains('w') => 2,
                p if p == exe => 1,
                p if p.starts_with('/') => 3,
                _ => 7,
            };
            continue;
        }
        let value = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Rss:") {
            sums[current].0 += value(line);
        } else if line.starts_with("Anonymous:") {
            sums[current].1 += value(line);
        } else if line.starts_with("Referenced:") {
            sums[current].2 += value(line);
        }
    }
    Smaps {
        parts: order
            .iter()
            .zip(sums)
            .map(|(name, (rss, anon, referenced))| ((*name).to_owned(), rss, anon, referenced))
            .collect(),
    }
}

/// CPU time (user + system) a process has used so far, in nanoseconds (from /proc/<pid>/stat,
/// in clock ticks).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// `memlock` (the kernel's account of a map's memory) and capacity of each map pinned in
/// `pin_dir`, by name.
pub fn pinned_map_memory(pin_dir: &std::path::Path) -> Vec<(String, u32, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let Ok(fd) = crate::bpf::obj_get(&path) else {
            continue;
        };
        let fdinfo = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap_or_default();
        let field = |name: &str| {
            fdinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        };
        let (Some(memlock), Some(entries)) = (field("memlock"), field("max_entries")) else {
            continue;
        };
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entries.parse().unwrap_or(0),
            memlock.parse().unwrap_or(0),
        ));
    }
    out.sort();
    out
}

/// How long the threads of a process have waited on a run queue (runnable but not running) so
/// far, in ns: the sum of the second field of /proc/<pid>/task/*/schedstat.
pub fn run_delay_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The sockets a process holds, counted by what they are: listening, or connected to which
/// remote port (TCP, IPv4 and IPv6, from /proc/<pid>/net/tcp{,6} matched by inode), or other.
pub fn sockets_by_peer(pid: u32) -> Vec<(String, usize)> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| {
                    let target = std::fs::read_link(fd.path()).ok()?;
                    let target = target.to_string_lossy();
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .trim_end_matches(']')
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut table: std::collections::HashMap<String, String> = Default::default();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let kind = if f[3] == "0A" {
                "listening".to_owned()
            } else {
                let port = f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0);
                format!("to port {port}")
            };
            table.insert(f[9].to_owned(), kind);
        }
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for inode in inodes {
        let kind = table.get(&inode).cloned().unwrap_or_else(|| "other".into());
        *counts.entry(kind).or_default() += 1;
    }
    counts.into_iter().collect()
}
