//! The results of a run and the Markdown written to BENCHMARKS.md (and printed).

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use super::{
    runner::Options,
    stats::{Dist, Table, fmt_ns, fmt_ratio, median_f64, ratio},
    topology::Memory,
};

/// The machine the numbers come from.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub kernel: String,
    pub cores: usize,
    pub cpu: String,
    pub memory: String,
    pub wrk: String,
    pub iptables: String,
}

impl Machine {
    pub fn probe() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let mem_kib: u64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let version = |program: &str, arg: &str| {
            std::process::Command::new(program)
                .arg(arg)
                .output()
                .ok()
                .map(|o| {
                    let text = [o.stdout, o.stderr].concat();
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_else(|| format!("{program}: not found"))
        };
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory: format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
            wrk: version("wrk", "-v"),
            iptables: version("iptables", "--version"),
        }
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub struct ConnectResult {
    /// (key, label, per-connect times).
    pub rows: Vec<(&'static str, String, Dist)>,
    pub rounds: usize,
    pub per_batch: usize,
    pub dnat_rule: String,
    pub dnat_matched: u64,
}

impl ConnectResult {
    fn dist(&self, key: &str) -> Option<&Dist> {
        self.rows.iter().find(|r| r.0 == key).map(|r| &r.2)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetMode {
    NewConnection { load: bool },
    KeepAlive { load: bool },
}

pub struct GetRow {
    pub mode: GetMode,
    pub variant: &'static str,
    pub label: String,
    pub dist: Dist,
    /// Requests per second, one per round.
    pub rps: Vec<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

pub struct GetResult {
    pub rows: Vec<GetRow>,
    /// The agent's own time per credentials request over this part (its
    /// `kube2iam_request_duration_seconds`), and how many it answered.
    pub agent_time_ns: Option<u64>,
    pub agent_requests: u64,
    pub rounds: usize,
    pub body_bytes: usize,
    pub latency_secs: u64,
    pub load_secs: u64,
    pub newconn_threads: usize,
    pub keepalive_connections: usize,
    pub dnat_matched: u64,
}

impl GetResult {
    fn row(&self, mode: GetMode, variant: &str) -> Option<&GetRow> {
        self.rows
            .iter()
            .find(|r| r.mode == mode && r.variant == variant)
    }
}

pub struct HerdRun {
    pub role: String,
    pub requests: usize,
    pub answered: usize,
    pub failures: usize,
    pub statuses: String,
    pub distinct_keys: usize,
    pub node_key: usize,
    pub all_answered_ns: u64,
    pub completion: Dist,
    pub proxy_assume_role: usize,
    pub moto_assume_role: usize,
}

pub struct HerdResult {
    pub runs: Vec<HerdRun>,
}

pub struct PrefetchResult {
    pub pods: usize,
    pub ips: Vec<std::net::Ipv4Addr>,
    pub gap_ms: u64,
    pub delay_ms: u64,
    /// First requests (listing and credentials) answered 200.
    pub ok: usize,
    pub hits: u64,
    pub misses: u64,
    pub credential_latency: Dist,
    pub max_add_lateness_ns: u64,
    pub max_ask_lateness_ns: u64,
    pub moto_calls: usize,
    /// The agent's AssumeRole calls during the run (its own counters): how many, their mean
    /// duration, and how many took longer than 100 ms.
    pub sts_calls: u64,
    pub sts_mean_ns: Option<u64>,
    pub sts_over_100ms: u64,
}

impl PrefetchResult {
    fn share(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

pub struct MemoryRow {
    pub node_pods: usize,
    pub cluster_pods: usize,
    /// Once the pod list is synced, before any request.
    pub synced: Memory,
    /// After the credential round.
    pub after: Memory,
    pub round: Duration,
}

pub struct MemoryResult {
    pub rows: Vec<MemoryRow>,
    /// Parsing the kernel's BTF alone, in a separate process: the size of
    /// /sys/kernel/btf/vmlinux, the time, and the rise of the peak RSS.
    pub btf_bytes: u64,
    pub btf_parse_ns: u64,
    pub btf_peak_kib: u64,
    pub agent_binary: String,
    pub agent_binary_bytes: u64,
}

pub struct RestartResult {
    pub requests: usize,
    pub ok: usize,
    /// Failed requests by outcome: an HTTP status, or minus an errno.
    pub failures: Vec<(i64, usize)>,
    pub node_key_responses: usize,
    pub imds_saw_pods: usize,
    pub leak_gap_ns: u64,
    pub start_to_first_served_ns: Option<u64>,
    pub outage_ns: Option<u64>,
    pub start_to_synced_ns: u64,
    pub sources: usize,
    pub interval_ms: u64,
    pub kill_to_spawn_ns: u64,
}

/// Everything one run measured.
pub struct Report {
    pub options: Options,
    pub machine: Machine,
    pub command: String,
    pub revision: String,
    /// How long the release build before the run took, if the caller built.
    pub build_secs: Option<u64>,
    pub started_at: String,
    pub load_before: String,
    pub load_after: String,
    pub connect: Option<ConnectResult>,
    pub get: Option<GetResult>,
    pub memory_after_load: Option<Memory>,
    pub herd: Option<HerdResult>,
    pub prefetch: Option<PrefetchResult>,
    pub memory: Option<MemoryResult>,
    pub restart: Option<RestartResult>,
    pub pod_ips_seen_by_imds: Vec<IpAddr>,
    pub elapsed: Duration,
}

/// One target of the issue and whether this run met it.
pub struct Target {
    pub bench: &'static str,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// `HTTP 503`, or the errno's name for minus an errno.
fn outcome_name(code: i64) -> String {
    if code >= 0 {
        return format!("HTTP {code}");
    }
    let errno = (-code) as i32;
    let name = match errno {
        libc::ECONNREFUSED => "connection refused",
        libc::ECONNRESET => "connection reset",
        libc::EPIPE => "broken pipe",
        libc::EAGAIN => "timed out",
        libc::ETIMEDOUT => "connect timed out",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

impl Report {
    pub fn new(options: Options) -> Self {
        Self {
            options,
            machine: Machine::probe(),
            command: String::new(),
            revision: String::new(),
            build_secs: None,
            started_at: crate::encode::rfc3339(std::time::SystemTime::now()),
            load_before: load_average(),
            load_after: String::new(),
            connect: None,
            get: None,
            memory_after_load: None,
            herd: None,
            prefetch: None,
            memory: None,
            restart: None,
            pod_ips_seen_by_imds: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        if let Some(c) = &self.connect {
            let med = |k| c.dist(k).and_then(Dist::median);
            let r_ba = ratio(med("b"), med("a"));
            let r_bc = ratio(med("b"), med("c"));
            t.push(Target {
                bench: "1",
                goal: "connect (b) ≤ 1.05× (a), medians".into(),
                measured: fmt_ratio(med("b"), med("a")),
                met: r_ba.map(|r| r <= 1.05),
            });
            if c.dist("b+g").is_some() {
                t.push(Target {
                    bench: "1",
                    goal: "connect (b+g), with the packet guard as deployed, ≤ 1.05× (a)".into(),
                    measured: fmt_ratio(med("b+g"), med("a")),
                    met: ratio(med("b+g"), med("a")).map(|r| r <= 1.05),
                });
            }
            t.push(Target {
                bench: "1",
                goal: "connect (b) ≤ 0.8× (c), medians".into(),
                measured: fmt_ratio(med("b"), med("c")),
                met: r_bc.map(|r| r <= 0.8),
            });
        }
        if let Some(g) = &self.get {
            for (mode, name) in [
                (GetMode::NewConnection { load: false }, "new connection"),
                (GetMode::KeepAlive { load: false }, "keep-alive"),
            ] {
                let b = g.row(mode, "b").and_then(|r| r.dist.median());
                let floor = g.row(mode, "floor").and_then(|r| r.dist.median());
                t.push(Target {
                    bench: "2",
                    goal: format!("GET (b) p50 ≤ 1.5× floor ({name}, 1 connection)"),
                    measured: format!(
                        "{} vs {} = {}",
                        fmt_ns(b),
                        fmt_ns(floor),
                        fmt_ratio(b, floor)
                    ),
                    met: ratio(b, floor).map(|r| r <= 1.5),
                });
                let p99 = g.row(mode, "b").and_then(|r| r.dist.p99());
                t.push(Target {
                    bench: "2",
                    goal: format!("GET (b) p99 ≤ 500 µs ({name}, 1 connection)"),
                    measured: fmt_ns(p99),
                    met: p99.map(|p| p <= 500_000),
                });
            }
            let load = GetMode::KeepAlive { load: true };
            let b = g.row(load, "b").map(|r| median_f64(&r.rps));
            let c = g.row(load, "c").map(|r| median_f64(&r.rps));
            t.push(Target {
                bench: "2",
                goal: format!("keep-alive (b) ≥ 40k req/s on {} cores", self.machine.cores),
                measured: b.map_or("–".into(), |b| format!("{b:.0} req/s")),
                met: b.map(|b| b >= 40_000.0),
            });
            t.push(Target {
                bench: "2",
                goal: "keep-alive (b) ≥ 1.2× (c) req/s".into(),
                measured: match (b, c) {
                    (Some(b), Some(c)) if c > 0.0 => format!("{:.2}×", b / c),
                    _ => "–".into(),
                },
                met: match (b, c) {
                    (Some(b), Some(c)) if c > 0.0 => Some(b / c >= 1.2),
                    _ => None,
                },
            });
        }
        if let Some(h) = &self.herd {
            let counts: Vec<String> = h
                .runs
                .iter()
                .map(|r| format!("{}/{}", r.proxy_assume_role, r.moto_assume_role))
                .collect();
            t.push(Target {
                bench: "3",
                goal: "herd: exactly one AssumeRole (proxy/moto, per herd)".into(),
                measured: counts.join(", "),
                met: Some(
                    !h.runs.is_empty()
                        && h.runs.iter().all(|r| {
                            r.proxy_assume_role == 1
                                && r.moto_assume_role == 1
                                && r.answered == r.requests
                                && r.failures == 0
                        }),
                ),
            });
        }
        if let Some(p) = &self.prefetch {
            let share = p.share();
            t.push(Target {
                bench: "3",
                goal: "prefetch: ≥ 99 % of first requests from cache".into(),
                measured: share.map_or("–".into(), |s| {
                    format!("{:.1} % ({} of {})", s * 100.0, p.hits, p.hits + p.misses)
                }),
                met: share.map(|s| s >= 0.99 && p.ok == p.pods),
            });
        }
        if let Some(m) = &self.memory {
            for row in &m.rows {
                let limit = if row.cluster_pods > row.node_pods {
                    24
                } else {
                    16
                };
                t.push(Target {
                    bench: "4",
                    goal: format!(
                        "peak RSS ≤ {limit} MiB, {} pods on the node, {} in the cluster",
                        row.node_pods, row.cluster_pods
                    ),
                    measured: mib(row.after.hwm),
                    met: Some(row.after.hwm <= limit * 1024),
                });
            }
        }
        if let Some(r) = &self.restart {
            t.push(Target {
                bench: "5",
                goal: "restart: 0 ms interception gap".into(),
                measured: format!(
                    "{} ({} node-key answers, {} pod connections at the real IMDS)",
                    ms(r.leak_gap_ns),
                    r.node_key_responses,
                    r.imds_saw_pods
                ),
                met: Some(r.leak_gap_ns == 0 && r.node_key_responses == 0 && r.imds_saw_pods == 0),
            });
            t.push(Target {
                bench: "5",
                goal: "restart: ≤ 500 ms from process start to first served request".into(),
                measured: r.start_to_first_served_ns.map_or("never".into(), ms),
                met: Some(r.start_to_first_served_ns.is_some_and(|n| n <= 500_000_000)),
            });
        }
        t
    }

    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "Written by `{}` at {} (revision {}). Every number below comes from that one run; run \
             the command again to regenerate this file.\n",
            self.command, self.started_at, self.revision
        );
        let _ = writeln!(
            out,
            "- Machine: Linux {}, {} cores ({}), {} of memory",
            m.kernel, m.cores, m.cpu, m.memory
        );
        let _ = writeln!(
            out,
            "- Load average (1/5/15 min) before the run: {}; after: {}. The machine is shared with \
             other builds and tests, so absolute numbers move; the variants of each comparison \
             are interleaved in the same run, every round running each once, in an order rotated \
             from round to round (A B C, B C A, C A B, …), so their ratios see the same \
             conditions.",
            self.load_before, self.load_after
        );
        let _ = writeln!(
            out,
            "- Tools: {}; {}; the agent built with `--release`",
            m.wrk, m.iptables
        );
        let build = self
            .build_secs
            .map_or_else(String::new, |b| format!(", after a {b} s release build"));
        let _ = writeln!(
            out,
            "- Run time: {:.0} s{build}\n",
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "Everything runs inside one test node (a network namespace with no route out; see \
             DESIGN.md's test topology): the agent in the node's namespace attached to the test \
             cgroup, the IMDS emulator at 169.254.169.254 as the node's real metadata service, \
             moto (behind the kit's STS fault proxy) as STS, and the Kubernetes API emulator. \
             Pods are network namespaces behind veths; clients that should be intercepted by our \
             programs run in the test cgroup, the others outside it. The agent runs with its \
             defaults and `--host-interface {}`: its packet \
             guard covers every pod interface but those of kube2iam's DNAT pod (p5), the floor's \
             client (p6) and the pod of the connect4-alone variants (p7). Medians and p99 are \
             nearest-rank over all samples of all rounds.\n",
            super::runner::GUARDED
        );
        if !self.pod_ips_seen_by_imds.is_empty() {
            let _ = writeln!(
                out,
                "**LEAK: the node's metadata service saw pod addresses {:?} during this run.**\n",
                self.pod_ips_seen_by_imds
            );
        } else {
            let _ = writeln!(
                out,
                "The node's metadata service saw no pod address during the whole run.\n"
            );
        }

        let _ = writeln!(out, "## Targets\n");
        let mut targets = Table::new(&["#", "target", "measured", "result"]);
        for t in self.targets() {
            targets.row(vec![
                t.bench.into(),
                t.goal,
                t.measured,
                yes_no(t.met).into(),
            ]);
        }
        out.push_str(&targets.markdown());
        out.push('\n');

        if let Some(c) = &self.connect {
            self.connect_section(&mut out, c);
        }
        if let Some(g) = &self.get {
            self.get_section(&mut out, g);
        }
        if self.herd.is_some() || self.prefetch.is_some() {
            self.sts_section(&mut out);
        }
        if let Some(mem) = &self.memory {
            self.memory_section(&mut out, mem);
        }
        if let Some(r) = &self.restart {
            self.restart_section(&mut out, r);
        }
        out
    }

    fn connect_section(&self, out: &mut String, c: &ConnectResult) {
        let _ = writeln!(out, "## 1. connect() from a pod\n");
        let _ = writeln!(
            out,
            "Time of one blocking `connect()` call (the TCP handshake with the agent's listener, \
             at 192.0.2.10:8181 on the node) from a pod, {} rounds × {} connects per variant, \
             after 50 warm-up connects per batch; each socket is then reset (SO_LINGER 0). Each \
             (a), (b) and their primed forms connect from one pod, from outside and from inside the \
             test cgroup; (b+g) from a pod with the agent's packet guard (tc ingress) on its \
             interface, as every pod of a node running the agent has it; (c) from the pod the \
             DNAT rule names. Only (b+g)'s pod has the guard: (b) and (b') measure the connect4 \
             rewrite alone. During this part the client runs on CPU 1 and the agent's threads on \
             CPU 0: unpinned, each batch came out in one of two modes about 7 µs apart, depending \
             on whether the agent's accept ran on the client's CPU inside its connect(), which \
             swamped the differences between variants. Pinned, the batches of one run agree, but \
             whole runs on this machine land either near 14 µs or near 21 µs for a direct \
             connect (the cause was not found); compare variants within one run, where they are \
             interleaved. The mean is given beside the median.\n",
            c.rounds, c.per_batch
        );
        let base = c.dist("a");
        let mut table = Table::new(&[
            "variant",
            "median",
            "p99",
            "mean",
            "median vs (a)",
            "p99 vs (a)",
            "mean vs (a)",
            "connects",
        ]);
        for (_, label, d) in &c.rows {
            table.row(vec![
                label.clone(),
                fmt_ns(d.median()),
                fmt_ns(d.p99()),
                fmt_ns(d.mean()),
                fmt_ratio(d.median(), base.and_then(Dist::median)),
                fmt_ratio(d.p99(), base.and_then(Dist::p99)),
                fmt_ratio(d.mean(), base.and_then(Dist::mean)),
                d.count().to_string(),
            ]);
        }
        out.push_str(&table.markdown());
        let _ = writeln!(
            out,
            "\n(c) is kube2iam's rule, in the node's namespace: `iptables {}`; it matched {} \
             packets over the run. (c), (a') and (b') run with the `ip nat` table present, which \
             turns conntrack on for every packet of the node's namespace; before (a) and (b) the \
             table is deleted (`nft delete table ip nat`), as on a node without nat rules. \
             \"Our programs not applied\": the client runs outside the test cgroup the programs \
             are attached to, which for its sockets is the same as detached.\n",
            c.dnat_rule, c.dnat_matched
        );
        let med = |k| c.dist(k).and_then(Dist::median);
        if let (Some(a), Some(b), Some(cc)) = (med("a"), med("b"), med("c")) {
            let guard = med("b+g").map_or(String::new(), |g| {
                format!(
                    ", with the packet guard {:+.1} µs",
                    (g as f64 - a as f64) / 1e3
                )
            });
            let _ = writeln!(
                out,
                "Per connect, against the direct connect (medians): our connect4 {:+.1} µs{guard}, \
                 the DNAT rule {:+.1} µs. Most of a connect is the TCP handshake over the veth and \
                 the wake-up of the agent, which every variant pays; the ratios shrink as that \
                 common part grows.\n",
                (b as f64 - a as f64) / 1e3,
                (cc as f64 - a as f64) / 1e3
            );
            if b < a {
                let _ = writeln!(
                    out,
                    "(b) came out faster than (a) in this run, which the program cannot do: it \
                     only adds work to the same connect. The difference is this run's noise.\n"
                );
            }
        }
    }

    fn get_section(&self, out: &mut String, g: &GetResult) {
        let _ = writeln!(out, "## 2. Credential GET end to end\n");
        let _ = writeln!(
            out,
            "`GET /latest/meta-data/iam/security-credentials/<role>` from a pod, answered from the \
             agent's credential cache ({} bytes of JSON). New connection per request (as the SDKs \
             do): `k2i-bench-client get`, which times socket + connect + request + the whole \
             response (`Connection: close`). Keep-alive: wrk (`-t1`). Latency columns come from \
             runs with one connection ({} s each); req/s and the loaded latencies from runs with \
             {} client threads (new connection) or {} connections (keep-alive), {} s each; {} \
             rounds, variants interleaved. Load generator and agent share the {} cores. Each \
             variant runs from a pod of its own: clients of different variants sharing the \
             agent's TIME_WAIT 4-tuples would trip PAWS (their TCP timestamp offsets hash the \
             destination they connect to, which DNAT hides) and stall on SYN retransmits.\n",
            g.body_bytes,
            g.latency_secs,
            g.newconn_threads,
            g.keepalive_connections,
            g.load_secs,
            g.rounds,
            self.machine.cores
        );
        for (keep, title) in [(false, "New connection per request"), (true, "Keep-alive")] {
            let (one, load) = if keep {
                (
                    GetMode::KeepAlive { load: false },
                    GetMode::KeepAlive { load: true },
                )
            } else {
                (
                    GetMode::NewConnection { load: false },
                    GetMode::NewConnection { load: true },
                )
            };
            let _ = writeln!(out, "### {title}\n");
            let mut table = Table::new(&[
                "variant",
                "p50 (1 conn)",
                "p99 (1 conn)",
                "p50 vs floor",
                "req/s (loaded)",
                "req/s vs (c)",
                "p50 / p99 (loaded)",
                "errors",
            ]);
            let floor = g.row(one, "floor").and_then(|r| r.dist.median());
            let c_rps = g.row(load, "c").map(|r| median_f64(&r.rps));
            for variant in ["floor", "b", "c"] {
                let (Some(r1), Some(rl)) = (g.row(one, variant), g.row(load, variant)) else {
                    continue;
                };
                let rps = median_f64(&rl.rps);
                table.row(vec![
                    r1.label.clone(),
                    fmt_ns(r1.dist.median()),
                    fmt_ns(r1.dist.p99()),
                    fmt_ratio(r1.dist.median(), floor),
                    format!("{rps:.0}"),
                    c_rps
                        .filter(|c| *c > 0.0)
                        .map_or("–".into(), |c| format!("{:.2}×", rps / c)),
                    format!("{} / {}", fmt_ns(rl.dist.median()), fmt_ns(rl.dist.p99())),
                    (r1.errors + rl.errors).to_string(),
                ]);
            }
            out.push_str(&table.markdown());
            for r in g.rows.iter().filter(|r| r.first_error.is_some()) {
                let _ = writeln!(
                    out,
                    "\n{} ({:?}) first error: `{}`",
                    r.label,
                    r.mode,
                    r.first_error.as_deref().unwrap_or("")
                );
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "req/s is the median over rounds. The DNAT rule matched {} packets in this part.\n",
            g.dnat_matched
        );
        let _ = writeln!(
            out,
            "The agent's own time per credentials request, from request parsed to response \
             built (its `kube2iam_request_duration_seconds`), averaged over the {} it answered in \
             this part: {}. The rest of (b)'s latency is the network path and the wake-ups of \
             client and server.\n",
            g.agent_requests,
            fmt_ns(g.agent_time_ns)
        );
        let load = GetMode::KeepAlive { load: true };
        let rps = |v| {
            g.row(load, v)
                .map(|r| median_f64(&r.rps))
                .filter(|r| *r > 0.0)
        };
        if let (Some(b), Some(c)) = (rps("b"), rps("c"))
            && b / c < 1.2
        {
            let _ = writeln!(
                out,
                "Keep-alive, (b) against (c): {:.2}×. Over an open connection the DNAT rule \
                 costs only conntrack and NAT on each packet: at full load a request took \
                 {:+.1} µs more with it (1 / req/s: {:.1} µs against {:.1} µs), and the agent's \
                 own work per request is the same in both. A new connection per request, as the \
                 SDKs make, is where the rule's cost shows (table above).\n",
                b / c,
                (1e6 / c - 1e6 / b),
                1e6 / c,
                1e6 / b
            );
        }
        for (mode, name) in [
            (GetMode::NewConnection { load: false }, "new connection"),
            (GetMode::KeepAlive { load: false }, "keep-alive"),
        ] {
            let b = g.row(mode, "b").and_then(|r| r.dist.p99());
            let floor = g.row(mode, "floor").and_then(|r| r.dist.p99());
            if b.is_some_and(|p| p > 500_000) {
                let why = if floor.is_some_and(|p| p > 500_000) {
                    "at the 99th percentile these runs measure the machine's scheduling (2 cores \
                     shared by client, server and other work) more than the server"
                } else {
                    "the tail is the agent's own"
                };
                let _ = writeln!(
                    out,
                    "The p99 of (b) ({name}, 1 connection) is {}; the bare hyper server's p99 in \
                     the same rounds is {}: {why}.\n",
                    fmt_ns(b),
                    fmt_ns(floor)
                );
            }
        }
    }

    fn sts_section(&self, out: &mut String) {
        let _ = writeln!(out, "## 3. STS herd and prefetch\n");
        if let Some(h) = &self.herd {
            let _ = writeln!(
                out,
                "Each herd: {} concurrent requests from 10 pod addresses for one role nobody has \
                 asked for yet (agent run with `--prefetch-concurrency 0`, so the cache is cold). \
                 The client opens every connection first, then sends all requests at once; \
                 \"all answered\" runs from the first send to the last response. AssumeRole \
                 calls are counted by the STS fault proxy and by moto.\n",
                h.runs.first().map_or(0, |r| r.requests)
            );
            let mut table = Table::new(&[
                "role",
                "answered",
                "statuses",
                "distinct access keys",
                "AssumeRole (proxy / moto)",
                "all answered",
                "p50 / p99 answer",
            ]);
            for r in &h.runs {
                table.row(vec![
                    r.role.clone(),
                    format!("{} of {}", r.answered - r.failures, r.requests),
                    r.statuses.clone(),
                    r.distinct_keys.to_string(),
                    format!("{} / {}", r.proxy_assume_role, r.moto_assume_role),
                    ms(r.all_answered_ns),
                    format!(
                        "{} / {}",
                        fmt_ns(r.completion.median()),
                        fmt_ns(r.completion.p99())
                    ),
                ]);
            }
            out.push_str(&table.markdown());
            out.push('\n');
        }
        if let Some(p) = &self.prefetch {
            let _ = writeln!(
                out,
                "Prefetch (default `--prefetch-concurrency 8`): {} pods, each with a role of its \
                 own, appear in the API one every {} ms; each asks {} ms after it appeared (the \
                 credential listing, then its credentials, as an SDK does). Whether a first \
                 credentials request was answered from the cache is read from the agent's \
                 counters (`kube2iam_credential_cache_hits_total` / `_misses_total`; a request \
                 that waits for an in-flight prefetch counts as a miss).\n",
                p.pods, p.gap_ms, p.delay_ms
            );
            let mut table = Table::new(&[
                "pods",
                "answered 200",
                "from cache",
                "AssumeRole (moto)",
                "credentials GET p50 / p99",
                "scheduling lateness (max)",
            ]);
            table.row(vec![
                p.pods.to_string(),
                p.ok.to_string(),
                p.share().map_or("–".into(), |s| {
                    format!("{:.1} % ({} hits, {} misses)", s * 100.0, p.hits, p.misses)
                }),
                p.moto_calls.to_string(),
                format!(
                    "{} / {}",
                    fmt_ns(p.credential_latency.median()),
                    fmt_ns(p.credential_latency.p99())
                ),
                format!(
                    "add {} / ask {}",
                    ms(p.max_add_lateness_ns),
                    ms(p.max_ask_lateness_ns)
                ),
            ]);
            out.push_str(&table.markdown());
            let _ = writeln!(
                out,
                "\nThe agent's AssumeRole calls during this run (its \
                 `kube2iam_sts_call_duration_seconds`): {} calls, {} on average, {} of them longer \
                 than 100 ms.",
                p.sts_calls,
                fmt_ns(p.sts_mean_ns),
                p.sts_over_100ms
            );
            if p.share().is_some_and(|s| s < 0.99) {
                let _ = writeln!(
                    out,
                    "\nA first request misses the cache when its pod's prefetch has not finished \
                     {} ms after the pod appeared, that is when the agent learning of the pod \
                     plus the AssumeRole call take longer than that. Here STS is moto, a Python \
                     server sharing the {} cores with everything else; its slow calls above are \
                     the misses. Real STS answers AssumeRole in tens of milliseconds, and on a \
                     real node a pod's IP (what the agent keys on) appears well before its \
                     containers start.",
                    p.delay_ms, self.machine.cores
                );
            }
            out.push('\n');
        }
    }

    fn memory_section(&self, out: &mut String, m: &MemoryResult) {
        let _ = writeln!(out, "## 4. Memory\n");
        let _ = writeln!(
            out,
            "Peak RSS (`VmHWM` in /proc/<pid>/status) of a freshly started agent after it listed \
             its pods and served one full credential round (listing + credentials) for every pod \
             on its node, each pod with a role of its own (the most cache entries). The pods on \
             the node are addresses on 2 pod namespaces (198.18.3.x and 198.18.4.x, one address \
             per pod, each a Running pod in the API emulator); the other pods of the cluster \
             exist only in the API emulator, on 45 other nodes.\n"
        );
        let mut table = Table::new(&[
            "pods on the node",
            "pods in the cluster",
            "VmHWM (peak)",
            "VmRSS (anon + file)",
            "VmHWM once synced, before any request",
            "credential round",
        ]);
        for r in &m.rows {
            table.row(vec![
                r.node_pods.to_string(),
                r.cluster_pods.to_string(),
                mib(r.after.hwm),
                format!(
                    "{} ({} + {})",
                    mib(r.after.rss),
                    mib(r.after.anon),
                    mib(r.after.file)
                ),
                mib(r.synced.hwm),
                ms(r.round.as_nanos() as u64),
            ]);
        }
        out.push_str(&table.markdown());
        let _ = writeln!(
            out,
            "\nWhere the peak comes from: aya's `EbpfLoader::new()` parses the kernel's BTF \
             (/sys/kernel/btf/vmlinux, {}) on every start, whether the programs need it or not \
             (ours have no CO-RE relocations). Parsed alone in a separate process it raises the \
             peak RSS by {} and takes {}. What stays resident is mostly file pages of the agent \
             binary ({}, `{}`: aws-sdk-sts, kube-rs, rustls with aws-lc, tokio, hyper) plus a \
             few MiB of heap; neither grows with the pods of the cluster, since the agent watches \
             only its node's pods.",
            mib(m.btf_bytes / 1024),
            mib(m.btf_peak_kib),
            ms(m.btf_parse_ns),
            mib(m.agent_binary_bytes / 1024),
            m.agent_binary
        );
        if m.rows.iter().any(|r| r.after.hwm > 16 * 1024) {
            let _ = writeln!(
                out,
                "\nNot met, and not fixed in this run: the peak is that BTF parse on top of the \
                 resident binary. Ways down: load and attach the programs in a short-lived child \
                 process (the agent already starts one for the netns-cookie probe) and open the \
                 pinned maps in the agent, or a loader that does not parse the kernel's BTF when \
                 the object has no CO-RE relocations; and a smaller binary (LTO, fewer \
                 dependencies) for the file pages."
            );
        }
        if let Some(load) = self.memory_after_load {
            let _ = writeln!(
                out,
                "\nFor comparison, the agent of parts 1–2 after all their load: VmHWM {}, VmRSS {}.",
                mib(load.hwm),
                mib(load.rss)
            );
        }
        out.push('\n');
    }

    fn restart_section(&self, out: &mut String, r: &RestartResult) {
        let _ = writeln!(out, "## 5. kill -9 and restart under load\n");
        let _ = writeln!(
            out,
            "{} pod addresses each run an SDK-like loop (listing, then credentials; a new \
             connection per request) every {} ms. The agent is killed with SIGKILL mid-run and \
             started again at once ({} between the kill and the new process). An interception gap \
             is any time a pod request reaches something other than the agent: the node's \
             metadata service (the IMDS emulator records every caller) or an answer carrying the \
             node's credentials.\n",
            r.sources,
            r.interval_ms,
            ms(r.kill_to_spawn_ns)
        );
        let mut table = Table::new(&["measure", "value"]);
        table.row(vec!["requests".into(), r.requests.to_string()]);
        table.row(vec!["answered 200".into(), r.ok.to_string()]);
        let outcomes: Vec<String> = r
            .failures
            .iter()
            .map(|(code, n)| format!("{} × {n}", outcome_name(*code)))
            .collect();
        table.row(vec![
            "failed requests, by outcome".into(),
            if outcomes.is_empty() {
                "none".into()
            } else {
                outcomes.join(", ")
            },
        ]);
        table.row(vec![
            "longest interception gap".into(),
            format!(
                "{} ({} node-key answers, {} pod addresses at the real IMDS)",
                ms(r.leak_gap_ns),
                r.node_key_responses,
                r.imds_saw_pods
            ),
        ]);
        table.row(vec![
            "process start → first served request".into(),
            r.start_to_first_served_ns.map_or("never".into(), ms),
        ]);
        table.row(vec![
            "last answer before the kill → first after".into(),
            r.outage_ns.map_or("–".into(), ms),
        ]);
        table.row(vec![
            "process start → pod list synced (log)".into(),
            ms(r.start_to_synced_ns),
        ]);
        out.push_str(&table.markdown());
        out.push('\n');
    }
}
