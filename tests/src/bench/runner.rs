//! The benchmarks, in the order they run, against one test node and one set of emulators.

use std::{
    io::BufReader,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{
    attest, client_binary, connect, cost, get,
    report::Report,
    restart, scale, sts,
    topology::{add_addresses, register, wait_known},
    world::BenchWorld,
};
use crate::{Pod, TestNode};

pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent runs as deployed, with its packet guard on the pods' interfaces, except those of
/// the pods that stand for "no program of ours": p5 (kube2iam's DNAT rule, whose packets to
/// 169.254.169.254 the guard would drop before netfilter sees them), p6 (the floor's client) and
/// p7 (connects with our connect4 alone, and the unguarded side of the throughput comparison).
pub(super) const AGENT_GUARD_FLAG: &str = "--host-interface";
pub const GUARDED: &str = "k2i-h-+,!k2i-h-p5,!k2i-h-p6,!k2i-h-p7";
/// The agent's flags for the run: the packet guard as above, and no prefetch (the parts
/// measure first requests).
pub(super) const AGENT_FLAGS: [&str; 4] =
    [AGENT_GUARD_FLAG, GUARDED, "--prefetch-concurrency", "0"];

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds of the connect comparison (each round runs every variant once) and connects per
    /// variant per round.
    pub connect_rounds: usize,
    pub connects_per_batch: usize,
    /// Rounds of the credential GET comparison.
    pub get_rounds: usize,
    /// Rounds of the attestation per-request comparison (each restarts the agent once per
    /// mode).
    pub attest_rounds: usize,
    /// Milliseconds of a one-client latency run, of a closed-loop throughput run and of an
    /// open-loop run.
    pub latency_ms: u64,
    pub throughput_ms: u64,
    pub open_ms: u64,
    /// wrk connections of the keep-alive throughput run.
    pub keepalive_connections: usize,
    /// Open-loop rates: keep-alive requests/s, and SDK credential fetches/s (3 connections
    /// each); threads of the open-loop client.
    pub open_keepalive_rate: u32,
    pub open_sdk_rate: u32,
    pub open_threads: usize,
    /// STS herds (each with its own cold role) and requests per herd.
    pub herds: usize,
    pub herd_requests: usize,
    /// Prefetch: pods, ms between them, ms from a pod's appearance to its first request.
    pub prefetch_pods: u8,
    pub prefetch_gap_ms: u64,
    pub prefetch_delay_ms: u64,
    /// Node drain: pods arriving (each with a role of its own) within this many ms.
    pub drain_pods: u8,
    pub drain_window_ms: u64,
    /// Pods on the node for the scaling rows, how often the 110-pod row repeats, and pods in
    /// the cluster for the one row with off-node pods.
    pub scale_pods: Vec<usize>,
    pub memory_repeats: usize,
    pub cluster_pods: usize,
    /// Rounds of the packet-guard throughput comparison and ms per iperf3 run.
    pub cost_rounds: usize,
    pub iperf_ms: u64,
    /// Restart runs: source addresses, ms between one source's requests, length, kill time.
    pub restart_sources: usize,
    pub restart_interval_ms: u64,
    pub restart_total_ms: u64,
    pub restart_kill_at_ms: u64,
    /// Run only these parts (connect, get, attest, sts, memory, cost, restart); empty: all.
    pub only: Vec<String>,
}

/// The parts, in the order they run.
pub const PARTS: &[&str] = &[
    "connect", "get", "attest", "sts", "memory", "cost", "restart",
];

impl Options {
    pub fn full() -> Self {
        Self {
            connect_rounds: 20,
            connects_per_batch: 400,
            get_rounds: 9,
            attest_rounds: 10,
            latency_ms: 800,
            throughput_ms: 1500,
            open_ms: 1500,
            keepalive_connections: 32,
            open_keepalive_rate: 5000,
            open_sdk_rate: 200,
            open_threads: 16,
            herds: 3,
            herd_requests: 1000,
            prefetch_pods: 40,
            prefetch_gap_ms: 25,
            prefetch_delay_ms: 500,
            drain_pods: 110,
            drain_window_ms: 1000,
            scale_pods: vec![0, 110, 250, 737],
            memory_repeats: 3,
            cluster_pods: 5000,
            cost_rounds: 3,
            iperf_ms: 1500,
            restart_sources: 16,
            restart_interval_ms: 4,
            restart_total_ms: 3000,
            restart_kill_at_ms: 1000,
            only: Vec::new(),
        }
    }

    /// A short run for trying the harness; not for numbers.
    pub fn quick() -> Self {
        Self {
            connect_rounds: 3,
            connects_per_batch: 200,
            get_rounds: 2,
            attest_rounds: 2,
            latency_ms: 400,
            throughput_ms: 500,
            open_ms: 500,
            herds: 1,
            herd_requests: 200,
            prefetch_pods: 10,
            drain_pods: 30,
            scale_pods: vec![0, 110],
            memory_repeats: 1,
            cluster_pods: 500,
            cost_rounds: 1,
            iperf_ms: 500,
            restart_total_ms: 1500,
            restart_kill_at_ms: 500,
            ..Self::full()
        }
    }

    pub(super) fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Where a client runs: a pod process (test cgroup: our programs apply) or the pod's namespace
/// outside the test cgroup (no program applies, as with the programs detached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    Cgroup,
    Outside,
}

pub(super) fn pod_command(
    pod: &Pod<'_>,
    placement: Placement,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    match placement {
        Placement::Cgroup => pod.command(program),
        Placement::Outside => pod.command_outside_cgroup(program),
    }
}

/// Removes a directory tree on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("k2i-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pod addresses the node's real metadata service saw: must stay empty.
pub(super) fn pod_ips_seen(world: &BenchWorld) -> Vec<IpAddr> {
    world
        .imds
        .caller_ips()
        .into_iter()
        .filter(|ip| match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                (o[0], o[1], o[2]) == (198, 51, 100) || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
            }
            IpAddr::V6(_) => true,
        })
        .collect()
}

pub(super) fn progress(what: &str) {
    eprintln!("[k2i-bench {:>6.1}s] {what}", uptime_s());
}

fn uptime_s() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The pods of the run. p0: the guarded pod of (b); p1: herd addresses; p2: prefetch and drain
/// addresses; p3, p4: the scaling pods; p5: kube2iam's DNAT pod; p6: the floor's client; p7:
/// unguarded, for connect4 alone and the unguarded throughput side; p8: guarded, in a kubelet
/// pod cgroup, for attestation.
pub(super) struct Pods<'n> {
    pub p0: Pod<'n>,
    pub p1: Pod<'n>,
    pub p2: Pod<'n>,
    pub p3: Pod<'n>,
    pub p4: Pod<'n>,
    pub p5: Pod<'n>,
    pub p6: Pod<'n>,
    pub p7: Pod<'n>,
    pub p8: Pod<'n>,
}

/// Runs every benchmark and returns the results.
pub fn run(options: &Options) -> Report {
    crate::require_root();
    uptime_s();
    let started = Instant::now();
    let mut report = Report::new(options.clone());
    let client = client_binary();
    let tmp = TempDir::new();

    progress(
        "starting the test node, the IMDS emulator, moto, the API emulator, TLS fronts and the \
         agent",
    );
    let node = TestNode::new();
    let mut world = BenchWorld::start(&node, tmp.path(), &AGENT_FLAGS);
    report.memory_cgroup = world.memory.as_ref().map(|m| {
        if m.is_v1() {
            "cgroup v1 memory controller".to_owned()
        } else {
            "cgroup v2 memory controller".to_owned()
        }
    });
    let pods = Pods {
        p0: node.add_pod("p0"),
        p1: node.add_pod("p1"),
        p2: node.add_pod("p2"),
        p3: node.add_pod("p3"),
        p4: node.add_pod("p4"),
        p5: node.add_pod("p5"),
        p6: node.add_pod("p6"),
        p7: node.add_pod("p7"),
        p8: node.add_pod("p8"),
    };
    register(
        &world.api,
        pods.p0.ip4(),
        "bench",
        "bench",
        Some("bench-role"),
    );
    register(
        &world.api,
        pods.p5.ip4(),
        "bench",
        "bench-dnat",
        Some("bench-role"),
    );
    wait_known(
        &world,
        &node,
        &[pods.p0.ip4(), pods.p5.ip4()],
        Duration::from_secs(20),
    );
    // The bench pod's credentials are fetched once (through TLS and STS's latency) before any
    // part measures them from the cache.
    let (status, _) = crate::e2e::pod_get(
        &pods.p0,
        "/latest/meta-data/iam/security-credentials/bench-role",
        &[],
    );
    assert_eq!(
        status,
        200,
        "the bench pod's credentials:\n{}",
        world.agent.log()
    );

    if options.wants("connect") {
        progress("1. connect() cost");
        report.connect = Some(connect::run(&node, &world, &pods, &client, options));
    }
    if options.wants("get") {
        progress("2. credential requests end to end");
        report.get = Some(get::run(
            &node,
            &mut world,
            &pods,
            &client,
            tmp.path(),
            options,
        ));
    }
    if options.wants("attest") {
        progress("2b. what attested identity costs per connect and per request");
        report.attest = Some(attest::run(
            &node, &mut world, &pods.p8, &pods.p5, &client, options,
        ));
    }
    if options.wants("cost") {
        progress("3. what the packet guard costs other traffic (iperf3)");
        report.cost = Some(cost::run(&node, &pods, options));
    }
    if options.wants("sts") {
        progress("4. STS over TLS: herd, prefetch, node drain");
        report.sts = Some(sts::run(&node, &mut world, &pods, &client, options));
    }
    if options.wants("memory") || options.wants("restart") {
        progress("5. memory and scaling with pods on the node");
        let (memory, scale_ips) = scale::run(&node, &mut world, &pods, &client, options);
        report.memory = Some(memory);
        if options.wants("restart") {
            progress("6. kill -9 and restart under load");
            report.restart = restart::run(&node, &mut world, &pods, &scale_ips, &client, options);
        }
    }

    report.pod_ips_seen_by_imds = pod_ips_seen(&world);
    report.elapsed = started.elapsed();
    progress("done; cleaning up");
    report
}

/// Addresses `count` pods on `pod`, in blocks of up to 250 (198.18.`first_block`.x upwards).
pub(super) fn addresses(
    node: &TestNode,
    pod: &Pod<'_>,
    first_block: u8,
    count: usize,
) -> Vec<Ipv4Addr> {
    let mut ips = Vec::with_capacity(count);
    let mut block = first_block;
    while ips.len() < count {
        let n = (count - ips.len()).min(250) as u8;
        ips.extend(add_addresses(node, pod, block, n));
        block += 1;
    }
    ips
}

/// The order of `n` variants in round `round`: a rotation, so that over `n` rounds every
/// variant runs once in every position (first after a pause, right after another, last).
/// Variants that need the same kernel state (the nat table) stay next to each other, cyclically,
/// so the state changes at most twice per round.
pub(super) fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

/// Reads a client started with [`super::topology::spawn_client`] to its end; panics with its
/// stderr unless it succeeded.
pub(super) fn finish_client(child: &mut crate::ChildGuard, what: &str) -> String {
    let stdout = child.child_mut().stdout.take().expect("piped stdout");
    let stderr = child.child_mut().stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let mut out = String::new();
    std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut out)
        .unwrap_or_else(|e| panic!("{what}: reading its output: {e}"));
    let status = child.wait_timeout(CLIENT_TIMEOUT);
    let err = err_reader.join().unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "{what} failed ({status:?}): {err}"
    );
    out
}

/// Where the agent and the connect client run during the connect part.
pub(super) const AGENT_CPU: usize = 0;
pub(super) const CLIENT_CPU: usize = 1;

/// Pins every thread of a process to one CPU; on drop, lets them run anywhere again.
pub(super) struct AgentPin {
    pid: u32,
}

impl AgentPin {
    pub(super) fn new(pid: u32, cpu: usize) -> Self {
        Self::apply(pid, Some(cpu));
        Self { pid }
    }

    fn apply(pid: u32, cpu: Option<usize>) {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap_or_else(|e| panic!("cannot list the agent's threads: {e}"));
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let result = match cpu {
                Some(cpu) => super::client::pin_to_cpu(tid, cpu),
                None => unpin(tid),
            };
            if let Err(e) = result {
                eprintln!("k2i-bench: agent thread {tid}: {e}");
            }
        }
    }
}

impl Drop for AgentPin {
    fn drop(&mut self) {
        Self::apply(self.pid, None);
    }
}

/// Lets a thread run on every CPU.
fn unpin(tid: libc::pid_t) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: as in pin_to_cpu: plain data written by CPU_SET, read by sched_setaffinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
