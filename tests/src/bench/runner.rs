//! The benchmarks, in the order they run, against one test node and one set of emulators.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{
    client_binary, mono_ns,
    report::{
        ConnectResult, GetMode, GetResult, GetRow, HerdResult, HerdRun, MemoryResult, MemoryRow,
        PrefetchResult, Report, RestartResult,
    },
    stats::Dist,
    topology::{
        Dnat, add_addresses, agent_addr, fields, memory_kib, metadata, metric, metric_with,
        register, run_client, samples, spawn_client, wait_forgotten, wait_known,
    },
};
use crate::{HOST_IP4, Pod, TestNode, e2e::World, e2e::role_arn, kube_api};

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
/// The floor server's port on the node's host IP.
const FLOOR_PORT: u16 = 8282;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent runs as deployed, with its packet guard on the pods' interfaces, except those of
/// the pods that stand for "no program of ours": p5 (kube2iam's DNAT rule, whose packets to
/// 169.254.169.254 the guard would drop before netfilter sees them) and p6 (direct connects and
/// the floor), and of p7, whose connects measure our connect4 alone.
const AGENT_GUARD_FLAG: &str = "--host-interface";
pub const GUARDED: &str = "k2i-h-+,!k2i-h-p5,!k2i-h-p6,!k2i-h-p7";

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds of the connect comparison (each round runs every variant once).
    pub connect_rounds: usize,
    /// Connects per variant per round.
    pub connects_per_batch: usize,
    /// Rounds of the credential GET comparison.
    pub get_rounds: usize,
    /// Seconds of a latency run (one connection) and of a throughput run.
    pub latency_secs: u64,
    pub load_secs: u64,
    /// Client threads of the new-connection throughput run, wrk connections of the keep-alive
    /// one.
    pub newconn_threads: usize,
    pub keepalive_connections: usize,
    /// STS herds (each with its own cold role) and requests per herd.
    pub herds: usize,
    pub herd_requests: usize,
    /// Pods in the prefetch run, appearing this many ms apart.
    pub prefetch_pods: u8,
    pub prefetch_gap_ms: u64,
    /// How long after it appears a pod asks.
    pub prefetch_delay_ms: u64,
    /// Pods on the node and in the cluster for the memory runs.
    pub node_pods: usize,
    pub cluster_pods: usize,
    /// Restart run: source addresses, ms between one address's iterations, total length, and
    /// when the agent is killed.
    pub restart_sources: usize,
    pub restart_interval_ms: u64,
    pub restart_total_ms: u64,
    pub restart_kill_at_ms: u64,
    /// Run only these parts (connect, get, herd, prefetch, memory, restart); empty: all.
    /// restart needs memory's pods, so it brings memory along.
    pub only: Vec<String>,
}

impl Options {
    pub fn full() -> Self {
        Self {
            connect_rounds: 30,
            connects_per_batch: 400,
            get_rounds: 6,
            latency_secs: 1,
            load_secs: 2,
            newconn_threads: 4,
            keepalive_connections: 32,
            herds: 3,
            herd_requests: 1000,
            prefetch_pods: 40,
            prefetch_gap_ms: 25,
            prefetch_delay_ms: 100,
            node_pods: 110,
            cluster_pods: 5000,
            restart_sources: 8,
            restart_interval_ms: 10,
            restart_total_ms: 5000,
            restart_kill_at_ms: 1500,
            only: Vec::new(),
        }
    }

    /// A short run for trying the harness; not for numbers.
    pub fn quick() -> Self {
        Self {
            connect_rounds: 3,
            connects_per_batch: 300,
            get_rounds: 1,
            herds: 1,
            ..Self::full()
        }
    }
}

fn creds_path(role: &str) -> String {
    format!("{CREDENTIALS}{role}")
}

/// Where a client runs: a pod process (test cgroup: our programs apply) or the pod's namespace
/// outside the test cgroup (no program applies, as with the programs detached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    Cgroup,
    Outside,
}

fn pod_command(
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
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("k2i-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pod addresses the node's real metadata service saw: must stay empty.
fn pod_ips_seen(world: &World) -> Vec<IpAddr> {
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

fn progress(what: &str) {
    eprintln!("[k2i-bench {:>6.1}s] {what}", uptime_s());
}

fn uptime_s() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Runs every benchmark and returns the results.
pub fn run(options: &Options) -> Report {
    crate::require_root();
    uptime_s();
    let started = Instant::now();
    let mut report = Report::new(options.clone());
    let client = client_binary();
    let tmp = TempDir::new();

    progress("starting the test node, the IMDS emulator, moto, the API emulator and the agent");
    let node = TestNode::new();
    let mut world = World::start(
        &node,
        &[AGENT_GUARD_FLAG, GUARDED, "--prefetch-concurrency", "0"],
    );
    let p0 = node.add_pod("p0");
    let p1 = node.add_pod("p1");
    let p2 = node.add_pod("p2");
    let p3 = node.add_pod("p3");
    let p4 = node.add_pod("p4");
    let p5 = node.add_pod("p5");
    let p6 = node.add_pod("p6");
    let p7 = node.add_pod("p7");
    register(&world, p0.ip4(), "bench", "bench", Some("bench-role"));
    register(&world, p5.ip4(), "bench", "bench-dnat", Some("bench-role"));
    let herd_ips = add_addresses(&node, &p1, 1, (options.herds * 10) as u8);
    for (i, ip) in herd_ips.iter().enumerate() {
        let role = format!("herd-role-{}", i / 10);
        register(&world, *ip, "herd", &format!("herd-{i}"), Some(&role));
    }
    let mut known = herd_ips.clone();
    known.extend([p0.ip4(), p5.ip4()]);
    wait_known(&world, &node, &known, Duration::from_secs(20));

    let want = |part: &str| options.only.is_empty() || options.only.iter().any(|p| p == part);
    if want("connect") {
        progress("1. connect() cost");
        report.connect = Some(connect_bench(
            &node,
            world.agent.pid(),
            [&p7, &p0, &p5],
            &client,
            options,
        ));
    }
    if want("get") {
        progress("2. credential GET end to end");
        report.get = Some(get_bench(
            &node,
            &world,
            [&p6, &p0, &p5],
            &client,
            tmp.path(),
            options,
        ));
        report.memory_after_load = Some(memory_kib(world.agent.pid()));
    }
    if want("herd") {
        progress("3a. STS herd");
        report.herd = Some(herd_bench(&world, &p1, &herd_ips, &client, options));
    }
    let mut old: Vec<(String, String, Ipv4Addr)> = vec![("bench".into(), "bench".into(), p0.ip4())];
    old.extend(
        herd_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| ("herd".into(), format!("herd-{i}"), *ip)),
    );
    if want("prefetch") {
        progress("3b. prefetch (restarting the agent with prefetch on)");
        world.kill_agent();
        world.start_agent(&node, &[AGENT_GUARD_FLAG, GUARDED], false, true);
        let prefetch = prefetch_bench(&node, &world, &p2, &client, options);
        old.extend(
            prefetch
                .ips
                .iter()
                .enumerate()
                .map(|(i, ip)| ("prefetch".into(), format!("pf-{i}"), *ip)),
        );
        report.prefetch = Some(prefetch);
    }
    if want("memory") || want("restart") {
        progress("4. memory");
        let (memory, mem_p3_ips) =
            memory_bench(&node, &mut world, (&p3, &p4), &old, &client, options);
        report.memory = Some(memory);
        if want("restart") {
            progress("5. kill -9 and restart under load");
            report.restart = Some(restart_bench(
                &node,
                &mut world,
                &p3,
                &mem_p3_ips,
                &client,
                options,
            ));
        }
    }

    report.pod_ips_seen_by_imds = pod_ips_seen(&world);
    report.elapsed = started.elapsed();
    progress("done; cleaning up");
    report
}

/// The order of `n` variants in round `round`: a rotation, so that over `n` rounds every
/// variant runs once in every position (first after a pause, right after another, last).
/// Variants that need the same kernel state (the nat table) stay next to each other, cyclically,
/// so the state changes at most twice per round.
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

/// Reads a client started with [`spawn_client`] to its end; panics with its stderr unless it
/// succeeded.
fn finish_client(child: &mut crate::ChildGuard, what: &str) -> String {
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
const AGENT_CPU: usize = 0;
const CLIENT_CPU: usize = 1;

/// Pins every thread of a process to one CPU; on drop, lets them run anywhere again.
struct AgentPin {
    pid: u32,
}

impl AgentPin {
    fn new(pid: u32, cpu: usize) -> Self {
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

// --- 1. connect() ------------------------------------------------------------------------

struct ConnectVariant<'p, 'n> {
    pod: &'p Pod<'n>,
    key: &'static str,
    label: &'static str,
    placement: Placement,
    addr: String,
    nat: bool,
}

/// (a) and (b) connect from the same pod, outside and inside the test cgroup, so they differ
/// only by our program and the address; neither pod has a tc program of ours on its interface.
/// (b+g) runs from a pod with the packet guard, as every pod of a node running the agent has it,
/// and (c) from the pod that has kube2iam's rule. Connects end with a reset, so no TIME_WAIT is
/// shared between variants.
fn connect_bench(
    node: &TestNode,
    agent_pid: u32,
    pods: [&Pod<'_>; 3],
    client: &Path,
    o: &Options,
) -> ConnectResult {
    let [ebpf, guarded, dnat_pod] = pods;
    let variants = [
        ConnectVariant {
            pod: ebpf,
            key: "a",
            label: "(a) direct to the agent's address, no program, no nat table (baseline)",
            placement: Placement::Outside,
            addr: agent_addr(),
            nat: false,
        },
        ConnectVariant {
            pod: ebpf,
            key: "b",
            label: "(b) 169.254.169.254 rewritten by our connect4, no nat table",
            placement: Placement::Cgroup,
            addr: metadata(),
            nat: false,
        },
        ConnectVariant {
            pod: guarded,
            key: "b+g",
            label: "(b+g) as (b), from a pod with the agent's packet guard (as deployed)",
            placement: Placement::Cgroup,
            addr: metadata(),
            nat: false,
        },
        ConnectVariant {
            pod: dnat_pod,
            key: "c",
            label: "(c) 169.254.169.254 DNATed by kube2iam's iptables rule, our programs not applied",
            placement: Placement::Outside,
            addr: metadata(),
            nat: true,
        },
        ConnectVariant {
            pod: ebpf,
            key: "b'",
            label: "(b') as (b), with kube2iam's nat table present (conntrack on in the node)",
            placement: Placement::Cgroup,
            addr: metadata(),
            nat: true,
        },
        ConnectVariant {
            pod: ebpf,
            key: "a'",
            label: "(a') as (a), with kube2iam's nat table present (conntrack on in the node)",
            placement: Placement::Outside,
            addr: agent_addr(),
            nat: true,
        },
    ];
    // The agent accepts every connection; when its worker wakes on the client's CPU it can
    // preempt the client inside connect() and add its accept to the measured time, in some
    // batches and not others. The agent's threads go to one CPU and the client to the other
    // for this part, the same for every variant.
    let pinned = AgentPin::new(agent_pid, AGENT_CPU);
    let mut dnat = Dnat::new(node, dnat_pod);
    let mut dists: Vec<Dist> = vec![Dist::default(); variants.len()];
    for round in 0..o.connect_rounds {
        for i in rotation(variants.len(), round) {
            let v = &variants[i];
            if v.nat {
                dnat.install();
            } else {
                dnat.remove();
            }
            let mut command = pod_command(v.pod, v.placement, client);
            command.args([
                "connect",
                "--addr",
                &v.addr,
                "--count",
                &o.connects_per_batch.to_string(),
                "--cpu",
                &CLIENT_CPU.to_string(),
            ]);
            let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client connect");
            let s = samples(&out);
            assert_eq!(s.len(), o.connects_per_batch, "connect samples: {out}");
            dists[i].add_samples(&s);
        }
    }
    dnat.remove();
    drop(pinned);
    ConnectResult {
        rows: variants
            .iter()
            .zip(dists)
            .map(|(v, d)| (v.key, v.label.to_owned(), d))
            .collect(),
        rounds: o.connect_rounds,
        per_batch: o.connects_per_batch,
        dnat_rule: dnat.rule().join(" "),
        dnat_matched: dnat.matched,
    }
}

// --- 2. credential GET ----------------------------------------------------------------------

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("k2i-wrk requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  io.write("k2i-hist")
  for i = 1, #latency do
    local v, c = latency(i)
    io.write(string.format(" %d:%d", v, c))
  end
  io.write("\n")
end
"#;

struct GetVariant<'p, 'n> {
    /// Each variant runs from a pod of its own: they would otherwise share the agent's
    /// TIME_WAIT 4-tuples while their TCP timestamps differ (the offset hashes the destination
    /// address the client connects to, which DNAT hides), and PAWS would drop reused-port SYNs.
    pod: &'p Pod<'n>,
    key: &'static str,
    label: &'static str,
    placement: Placement,
    host: String,
    nat: bool,
}

/// One run's outcome: the latency distribution, requests/s, failed requests and the first
/// failure's description.
struct RunOutcome {
    dist: Dist,
    rps: f64,
    errors: u64,
    first_error: Option<String>,
}

fn run_wrk(
    v: &GetVariant<'_, '_>,
    script: &Path,
    path: &str,
    connections: usize,
    secs: u64,
) -> RunOutcome {
    let mut command = pod_command(v.pod, v.placement, "wrk");
    command.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--timeout",
        "2s",
        "-s",
    ]);
    command.arg(script);
    command.arg(format!("http://{}{path}", v.host));
    let out = run_client(&mut command, CLIENT_TIMEOUT, "wrk");
    let summary = fields(&out, "k2i-wrk");
    let num = |k: &str| {
        summary
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut dist = Dist::default();
    if let Some(hist) = out.lines().find_map(|l| l.strip_prefix("k2i-hist")) {
        for pair in hist.split_whitespace() {
            if let Some((v, c)) = pair.split_once(':')
                && let (Ok(v), Ok(c)) = (v.parse::<u64>(), c.parse::<u64>())
            {
                dist.add_weighted(v * 1000, c);
            }
        }
    }
    let duration = num("duration_us").max(1) as f64 / 1e6;
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| num(k))
        .sum();
    RunOutcome {
        dist,
        rps: num("requests") as f64 / duration,
        errors,
        first_error: (errors > 0).then(|| out.lines().next().unwrap_or("").to_owned()),
    }
}

fn run_newconn(
    v: &GetVariant<'_, '_>,
    client: &Path,
    path: &str,
    threads: usize,
    secs: u64,
) -> RunOutcome {
    let mut command = pod_command(v.pod, v.placement, client);
    command.args([
        "get",
        "--addr",
        &v.host,
        "--path",
        path,
        "--threads",
        &threads.to_string(),
        "--millis",
        &(secs * 1000).to_string(),
    ]);
    let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client get");
    let summary = fields(&out, "summary");
    let num = |k: &str| {
        summary
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    RunOutcome {
        dist: Dist::from_samples(&samples(&out)),
        rps: num("requests") as f64 / (num("elapsed_ns").max(1) as f64 / 1e9),
        errors: num("errors"),
        first_error: out
            .lines()
            .find_map(|l| l.strip_prefix("error "))
            .map(str::to_owned),
    }
}

fn get_bench(
    node: &TestNode,
    world: &World,
    pods: [&Pod<'_>; 3],
    client: &Path,
    tmp: &Path,
    o: &Options,
) -> GetResult {
    let [floor_pod, pod, dnat_pod] = pods;
    let path = creds_path("bench-role");
    // The floor serves exactly the bytes the agent answers this pod with.
    let (status, body) = crate::e2e::pod_get(pod, &path, &[]);
    assert_eq!(
        status,
        200,
        "the bench pod's credentials: {body}\n{}",
        world.agent.log()
    );
    let body_file = tmp.join("credentials.json");
    std::fs::write(&body_file, &body).expect("write the floor's body");
    let script = tmp.join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let floor_addr = format!("{HOST_IP4}:{FLOOR_PORT}");
    let mut floor = spawn_client(
        node.command(client).args([
            "floor",
            "--listen",
            &floor_addr,
            "--body-file",
            &body_file.to_string_lossy(),
            "--seconds",
            "900",
        ]),
        "floor server",
    );
    let stdout = floor.child_mut().stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the floor server's first line");
    assert!(line.starts_with("listening"), "floor server: {line:?}");

    let variants = [
        GetVariant {
            pod: floor_pod,
            key: "floor",
            label: "floor: bare hyper server, same bytes, reached directly",
            placement: Placement::Outside,
            host: floor_addr.clone(),
            nat: false,
        },
        GetVariant {
            pod,
            key: "b",
            label: "(b) agent via our connect4 (pod with the packet guard)",
            placement: Placement::Cgroup,
            host: metadata(),
            nat: false,
        },
        GetVariant {
            pod: dnat_pod,
            key: "c",
            label: "(c) agent via kube2iam's DNAT rule",
            placement: Placement::Outside,
            host: metadata(),
            nat: true,
        },
    ];
    let modes = [
        GetMode::NewConnection { load: false },
        GetMode::NewConnection { load: true },
        GetMode::KeepAlive { load: false },
        GetMode::KeepAlive { load: true },
    ];
    let handled = |suffix: &str| {
        metric_with(
            world,
            node,
            &format!("kube2iam_request_duration_seconds_{suffix}"),
            &["route=\"credentials\""],
        )
    };
    let handled0 = (handled("count"), handled("sum"));
    let mut dnat = Dnat::new(node, dnat_pod);
    let mut rows: Vec<GetRow> = Vec::new();
    for mode in modes {
        for v in &variants {
            rows.push(GetRow {
                mode,
                variant: v.key,
                label: v.label.to_owned(),
                dist: Dist::default(),
                rps: Vec::new(),
                errors: 0,
                first_error: None,
            });
        }
    }
    for round in 0..o.get_rounds {
        for (m, mode) in modes.iter().enumerate() {
            for i in rotation(variants.len(), round + m) {
                let v = &variants[i];
                if v.nat {
                    dnat.install();
                } else {
                    dnat.remove();
                }
                let outcome = match *mode {
                    GetMode::NewConnection { load } => {
                        let (threads, secs) = if load {
                            (o.newconn_threads, o.load_secs)
                        } else {
                            (1, o.latency_secs)
                        };
                        run_newconn(v, client, &path, threads, secs)
                    }
                    GetMode::KeepAlive { load } => {
                        let (conns, secs) = if load {
                            (o.keepalive_connections, o.load_secs)
                        } else {
                            (1, o.latency_secs)
                        };
                        run_wrk(v, &script, &path, conns, secs)
                    }
                };
                let row = &mut rows[m * variants.len() + i];
                row.dist.merge(&outcome.dist);
                row.rps.push(outcome.rps);
                row.errors += outcome.errors;
                if row.first_error.is_none() {
                    row.first_error = outcome.first_error;
                }
            }
        }
    }
    dnat.remove();
    drop(floor);
    let handled_count = handled("count") - handled0.0;
    let handled_secs = handled("sum") - handled0.1;
    GetResult {
        agent_time_ns: (handled_count > 0.0).then(|| (handled_secs / handled_count * 1e9) as u64),
        agent_requests: handled_count as u64,
        rows,
        rounds: o.get_rounds,
        body_bytes: body.len(),
        latency_secs: o.latency_secs,
        load_secs: o.load_secs,
        newconn_threads: o.newconn_threads,
        keepalive_connections: o.keepalive_connections,
        dnat_matched: dnat.matched,
    }
}

// --- 3. STS herd and prefetch -------------------------------------------------------------------

fn herd_bench(
    world: &World,
    pod: &Pod<'_>,
    ips: &[Ipv4Addr],
    client: &Path,
    o: &Options,
) -> HerdResult {
    let mut runs = Vec::new();
    for h in 0..o.herds {
        let role = format!("herd-role-{h}");
        let arn = role_arn(&role);
        let sources: Vec<String> = ips[h * 10..h * 10 + 10]
            .iter()
            .map(ToString::to_string)
            .collect();
        let proxy_before = count_role(&world.sts.assume_role_calls(), &arn);
        let mut command = pod.command(client);
        command.args([
            "herd",
            "--addr",
            &metadata(),
            "--path",
            &creds_path(&role),
            "--conns",
            &o.herd_requests.to_string(),
            "--bind",
            &sources.join(","),
        ]);
        let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client herd");
        let f = fields(&out, "herd");
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let completion = Dist::from_samples(&samples(&out));
        runs.push(HerdRun {
            role: role.clone(),
            requests: o.herd_requests,
            answered: num("answered") as usize,
            failures: num("failures") as usize,
            statuses: f.get("statuses").cloned().unwrap_or_default(),
            distinct_keys: num("distinct_keys") as usize,
            node_key: num("node_key") as usize,
            all_answered_ns: num("all_answered_ns"),
            completion,
            proxy_assume_role: count_role(&world.sts.assume_role_calls(), &arn) - proxy_before,
            moto_assume_role: count_role(&world.moto.assume_role_calls(), &arn),
        });
    }
    HerdResult { runs }
}

fn count_role(calls: &[crate::AssumeRoleCall], arn: &str) -> usize {
    calls.iter().filter(|c| c.role_arn == arn).count()
}

fn prefetch_bench(
    node: &TestNode,
    world: &World,
    pod: &Pod<'_>,
    client: &Path,
    o: &Options,
) -> PrefetchResult {
    let ips = add_addresses(node, pod, 2, o.prefetch_pods);
    // Let the restarted agent's start-up prefetches (the pods it listed) finish first.
    std::thread::sleep(Duration::from_millis(500));
    let hits0 = metric(world, node, "kube2iam_credential_cache_hits_total");
    let misses0 = metric(world, node, "kube2iam_credential_cache_misses_total");
    let sts = |suffix: &str, labels: &[&str]| {
        metric_with(
            world,
            node,
            &format!("kube2iam_sts_call_duration_seconds_{suffix}"),
            labels,
        )
    };
    let sts0 = (
        sts("count", &[]),
        sts("sum", &[]),
        sts("bucket", &["le=\"0.1\""]),
    );
    let gap = o.prefetch_gap_ms * 1_000_000;
    let delay = o.prefetch_delay_ms * 1_000_000;
    let base = mono_ns() + 500_000_000;
    let mut command = pod.command(client);
    command.args(["plan", "--addr", &metadata()]);
    for (i, ip) in ips.iter().enumerate() {
        command
            .arg("--item")
            .arg(format!("{ip}@{}", base + i as u64 * gap + delay));
    }
    let mut plan = spawn_client(&mut command, "k2i-bench-client plan");
    let mut add_lateness = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let at = base + i as u64 * gap;
        let now = mono_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        add_lateness.push(mono_ns().saturating_sub(at));
        register(
            world,
            *ip,
            "prefetch",
            &format!("pf-{i}"),
            Some(&format!("pf-role-{i}")),
        );
    }
    let out = finish_client(&mut plan, "the plan client");
    let hits = metric(world, node, "kube2iam_credential_cache_hits_total") - hits0;
    let misses = metric(world, node, "kube2iam_credential_cache_misses_total") - misses0;
    let sts_calls = sts("count", &[]) - sts0.0;
    let sts_seconds = sts("sum", &[]) - sts0.1;
    let sts_fast = sts("bucket", &["le=\"0.1\""]) - sts0.2;
    let mut latencies = Dist::default();
    let mut ok = 0;
    let mut ask_lateness = Vec::new();
    for line in out.lines().filter(|l| l.starts_with("first ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 7 {
            continue;
        }
        ask_lateness.push(w[2].parse::<u64>().unwrap_or(0));
        if w[3] == "200" && w[4] == "200" {
            ok += 1;
        }
        latencies.add_samples(&[w[6].parse().unwrap_or(0)]);
    }
    let moto_calls = world
        .moto
        .assume_role_calls()
        .iter()
        .filter(|c| c.role_arn.contains("/pf-role-"))
        .count();
    PrefetchResult {
        pods: ips.len(),
        ips: ips.clone(),
        gap_ms: o.prefetch_gap_ms,
        delay_ms: o.prefetch_delay_ms,
        ok,
        hits: hits as u64,
        misses: misses as u64,
        credential_latency: latencies,
        max_add_lateness_ns: add_lateness.into_iter().max().unwrap_or(0),
        max_ask_lateness_ns: ask_lateness.into_iter().max().unwrap_or(0),
        moto_calls,
        sts_calls: sts_calls as u64,
        sts_mean_ns: (sts_calls > 0.0).then(|| (sts_seconds / sts_calls * 1e9) as u64),
        sts_over_100ms: (sts_calls - sts_fast).max(0.0) as u64,
    }
}

// --- 4. memory ----------------------------------------------------------------------------------

/// One credential round: every address lists its role and fetches its credentials, as an SDK's
/// first call does. Panics unless every pod got its credentials.
fn credential_round(pod: &Pod<'_>, ips: &[Ipv4Addr], client: &Path) {
    let mut command = pod.command(client);
    command.args(["plan", "--addr", &metadata()]);
    for ip in ips {
        command.arg("--item").arg(format!("{ip}@0"));
    }
    let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client plan");
    let ok = out
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 5 && w[0] == "first" && w[3] == "200" && w[4] == "200"
        })
        .count();
    assert_eq!(ok, ips.len(), "credential round: {out}");
}

fn memory_bench(
    node: &TestNode,
    world: &mut World,
    pods: (&Pod<'_>, &Pod<'_>),
    old: &[(String, String, Ipv4Addr)],
    client: &Path,
    o: &Options,
) -> (MemoryResult, Vec<Ipv4Addr>) {
    let half = (o.node_pods / 2) as u8;
    let ips3 = add_addresses(node, pods.0, 3, half);
    let ips4 = add_addresses(node, pods.1, 4, (o.node_pods - half as usize) as u8);
    // Only the memory pods stay on the node.
    for (namespace, name, _) in old {
        world.api.delete_pod(namespace, name);
    }
    let old_ips: Vec<Ipv4Addr> = old.iter().map(|(_, _, ip)| *ip).collect();
    wait_forgotten(world, node, &old_ips, Duration::from_secs(20));
    for (i, ip) in ips3.iter().chain(&ips4).enumerate() {
        register(
            world,
            *ip,
            &format!("team-{}", i % 10),
            &format!("app-{i}"),
            Some(&format!("mem-role-{i}")),
        );
    }
    let all: Vec<Ipv4Addr> = ips3.iter().chain(&ips4).copied().collect();
    let mut rows = Vec::new();
    for cluster in [false, true] {
        if cluster {
            let off_node = o.cluster_pods - o.node_pods;
            for i in 0..off_node {
                let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
                let object = kube_api::pod(
                    &format!("team-{}", i % 50),
                    &format!("off-{i}"),
                    &format!("node-{}", 1 + i % 45),
                    ip,
                    None,
                )
                .annotate(super::topology::ROLE_KEY, &format!("off-role-{}", i % 100));
                world.api.add_pod(object);
            }
        }
        world.kill_agent();
        world.start_agent(node, &[AGENT_GUARD_FLAG, GUARDED], false, true);
        wait_known(world, node, &all, Duration::from_secs(30));
        let synced = memory_kib(world.agent.pid());
        let started = Instant::now();
        credential_round(pods.0, &ips3, client);
        credential_round(pods.1, &ips4, client);
        let round = started.elapsed();
        rows.push(MemoryRow {
            node_pods: o.node_pods,
            cluster_pods: if cluster { o.cluster_pods } else { o.node_pods },
            synced,
            after: memory_kib(world.agent.pid()),
            round,
        });
    }
    let btf = run_client(
        Command::new(client).arg("btf"),
        CLIENT_TIMEOUT,
        "k2i-bench-client btf",
    );
    let f = fields(&btf, "btf");
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let agent = crate::agent_binary();
    (
        MemoryResult {
            rows,
            btf_bytes: num("bytes"),
            btf_parse_ns: num("parse_ns"),
            btf_peak_kib: num("hwm_after_kib").saturating_sub(num("hwm_before_kib")),
            agent_binary: agent.display().to_string(),
            agent_binary_bytes: std::fs::metadata(&agent).map_or(0, |m| m.len()),
        },
        ips3,
    )
}

// --- 5. restart ---------------------------------------------------------------------------------

fn restart_bench(
    node: &TestNode,
    world: &mut World,
    pod: &Pod<'_>,
    ips: &[Ipv4Addr],
    client: &Path,
    o: &Options,
) -> RestartResult {
    let sources: Vec<String> = ips[..o.restart_sources.min(ips.len())]
        .iter()
        .map(ToString::to_string)
        .collect();
    let seen_before = pod_ips_seen(world).len();
    let mut command = pod.command(client);
    command.args([
        "steady",
        "--addr",
        &metadata(),
        "--bind",
        &sources.join(","),
        "--interval-ms",
        &o.restart_interval_ms.to_string(),
        "--millis",
        &o.restart_total_ms.to_string(),
    ]);
    let start = mono_ns();
    let mut steady = spawn_client(&mut command, "k2i-bench-client steady");
    let kill_at = start + o.restart_kill_at_ms * 1_000_000;
    let now = mono_ns();
    if kill_at > now {
        std::thread::sleep(Duration::from_nanos(kill_at - now));
    }
    let killed = mono_ns();
    world.kill_agent();
    let spawned = mono_ns();
    world.start_agent(node, &[AGENT_GUARD_FLAG, GUARDED], false, true);
    let ready = mono_ns();
    let out = finish_client(&mut steady, "the steady client");
    let mut events: Vec<(u64, u64, i64, bool)> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 6 && w[0] == "ev").then(|| {
                (
                    w[2].parse().unwrap_or(0),
                    w[3].parse().unwrap_or(0),
                    w[4].parse().unwrap_or(0),
                    w[5] == "1",
                )
            })
        })
        .collect();
    events.sort_unstable();
    let ok = |e: &&(u64, u64, i64, bool)| e.2 == 200;
    let last_ok_before = events
        .iter()
        .filter(ok)
        .filter(|e| e.1 <= killed)
        .map(|e| e.1)
        .max();
    let first_ok_after = events
        .iter()
        .filter(ok)
        .filter(|e| e.1 > spawned)
        .map(|e| e.1)
        .min();
    let node_key_events: Vec<_> = events.iter().filter(|e| e.3).collect();
    let leak_gap_ns = match (node_key_events.first(), node_key_events.last()) {
        (Some(first), Some(last)) => last.1 - first.0,
        _ => 0,
    };
    let imds_saw = pod_ips_seen(world).len() - seen_before;
    let mut failures: std::collections::BTreeMap<i64, usize> = Default::default();
    for e in events.iter().filter(|e| e.2 != 200) {
        *failures.entry(e.2).or_default() += 1;
    }
    RestartResult {
        requests: events.len(),
        ok: events.iter().filter(ok).count(),
        failures: failures.into_iter().collect(),
        node_key_responses: node_key_events.len(),
        imds_saw_pods: imds_saw,
        leak_gap_ns,
        start_to_first_served_ns: first_ok_after.map(|t| t - spawned),
        outage_ns: match (last_ok_before, first_ok_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        start_to_synced_ns: ready - spawned,
        sources: sources.len(),
        interval_ms: o.restart_interval_ms,
        kill_to_spawn_ns: spawned - killed,
    }
}
