//! The results of a run and the Markdown written to BENCHMARKS.md (and printed).
//!
//! Every ratio comes with its dispersion: the median of the per-round ratios (variants are
//! interleaved round by round, so a round's ratio compares like with like), a bootstrap 95 %
//! interval of that median, and the range of the per-round values. A target counts as met only
//! when its whole interval meets it.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use super::{
    runner::Options,
    stats::{Dist, Interval, Table, fmt_ns},
    topology::{Memory, Smaps},
};

/// The machine the numbers come from.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub kernel: String,
    pub cores: usize,
    pub cpu: String,
    pub memory: String,
    pub tools: Vec<String>,
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
            tools: vec![
                version("wrk", "-v"),
                version("iptables", "--version"),
                version("iperf3", "--version"),
                version("openssl", "version"),
            ],
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

/// CPU time so far: the whole machine's busy time, and this process's with its reaped
/// descendants' (every process the run starts is waited for before the run ends).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// user + nice + system + irq + softirq over all CPUs (/proc/stat).
    machine_busy: Duration,
    /// steal over all CPUs (/proc/stat): time the machine's virtual CPUs had work but the
    /// host ran something else.
    steal: Duration,
    /// getrusage(SELF) + getrusage(CHILDREN), user + system.
    own: Duration,
    at: Option<std::time::Instant>,
}

impl CpuSample {
    pub fn now() -> CpuSample {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_sec = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        // cpu  user nice system idle iowait irq softirq steal guest guest_nice
        let fields: Vec<u64> = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .next()
            .map(|cpu| {
                cpu.split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let busy_ticks: u64 = [0, 1, 2, 5, 6].iter().filter_map(|i| fields.get(*i)).sum();
        let steal_ticks = fields.get(7).copied().unwrap_or(0);
        let usage = |who| {
            // SAFETY: getrusage fills the struct it is given.
            let mut r: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut r) };
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            tv(r.ru_utime) + tv(r.ru_stime)
        };
        CpuSample {
            machine_busy: Duration::from_nanos(busy_ticks * 1_000_000_000 / ticks_per_sec),
            steal: Duration::from_nanos(steal_ticks * 1_000_000_000 / ticks_per_sec),
            own: usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN),
            at: Some(std::time::Instant::now()),
        }
    }

    /// Cores' worth of CPU time the host took from this machine between `self` and `later`
    /// (steal).
    pub fn steal_until(&self, later: &CpuSample) -> Option<f64> {
        let wall = later.at?.duration_since(self.at?).as_secs_f64();
        (wall > 0.0).then(|| later.steal.saturating_sub(self.steal).as_secs_f64() / wall)
    }

    /// Cores' worth of CPU that others used between `self` and `later`: the machine's busy
    /// time minus this run's. Kernel threads that carried part of the run's own network work
    /// (ksoftirqd) count as others'.
    pub fn others_until(&self, later: &CpuSample) -> Option<f64> {
        let wall = later.at?.duration_since(self.at?).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let busy = later.machine_busy.saturating_sub(self.machine_busy);
        let own = later.own.saturating_sub(self.own);
        Some(busy.saturating_sub(own).as_secs_f64() / wall)
    }
}

// --- results -------------------------------------------------------------------------------------

pub struct ConnectRow {
    pub key: &'static str,
    pub label: String,
    /// Run with kube2iam's nat table present (conntrack on in the node).
    pub conntrack: bool,
    pub dist: Dist,
    /// The median connect of each round's batch.
    pub round_medians: Vec<Option<f64>>,
}

pub struct ConnectResult {
    pub rows: Vec<ConnectRow>,
    pub rounds: usize,
    pub per_batch: usize,
    pub dnat_rule: String,
    pub dnat_matched: u64,
}

impl ConnectResult {
    fn row(&self, key: &str) -> Option<&ConnectRow> {
        self.rows.iter().find(|r| r.key == key)
    }

    /// `num`'s round medians over `den`'s.
    pub fn ratio(&self, num: &str, den: &str) -> Option<Interval> {
        Interval::of_ratios(&self.row(num)?.round_medians, &self.row(den)?.round_medians)
    }
}

/// Attestation per request: one mode (`require` or `off`) and kind of GET (new connection or
/// keep-alive), over the rounds.
pub struct AttestRequestRow {
    pub mode: &'static str,
    pub kind: GetMode,
    pub dist: Dist,
    pub round_p50: Vec<Option<f64>>,
    pub round_p99: Vec<Option<f64>>,
    /// The agent's CPU time per request, ns, per round.
    pub round_cpu_ns: Vec<Option<f64>>,
    pub errors: u64,
}

/// What attestation costs (issue 10): per connect, the same running agent with the kernel's
/// record on and off; per request, the agent under `--identity-attestation require` and `off`.
pub struct AttestResult {
    pub connect_rows: Vec<ConnectRow>,
    pub connect_rounds: usize,
    pub per_batch: usize,
    pub request_rows: Vec<AttestRequestRow>,
    pub request_rounds: usize,
    pub latency_ms: u64,
}

impl AttestResult {
    /// `num`'s per-round connect medians over `den`'s.
    pub fn connect_ratio(&self, num: &str, den: &str) -> Option<Interval> {
        let row = |key: &str| self.connect_rows.iter().find(|r| r.key == key);
        Interval::of_ratios(&row(num)?.round_medians, &row(den)?.round_medians)
    }

    fn request_row(&self, mode: &str, kind: GetMode) -> Option<&AttestRequestRow> {
        self.request_rows
            .iter()
            .find(|r| r.mode == mode && r.kind == kind)
    }

    /// `require` over `off`, per round: p50, p99 and CPU per request.
    pub fn request_ratios(
        &self,
        kind: GetMode,
    ) -> (Option<Interval>, Option<Interval>, Option<Interval>) {
        let (Some(on), Some(off)) = (
            self.request_row("require", kind),
            self.request_row("off", kind),
        ) else {
            return (None, None, None);
        };
        (
            Interval::of_ratios(&on.round_p50, &off.round_p50),
            Interval::of_ratios(&on.round_p99, &off.round_p99),
            Interval::of_ratios(&on.round_cpu_ns, &off.round_cpu_ns),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetMode {
    /// The SDK's IMDSv2 fetch (token, listing, credentials; a connection each), one client.
    Sdk1,
    /// One GET per new connection, one client.
    New1,
    /// GETs over one kept-alive connection, one client.
    Ka1,
    /// Closed-loop keep-alive throughput (wrk).
    KaMax,
    /// Open-loop keep-alive GETs at a fixed rate.
    OpenKa,
    /// Open-loop SDK fetches at a fixed rate.
    OpenSdk,
}

pub struct GetRow {
    pub mode: GetMode,
    pub variant: &'static str,
    pub label: String,
    pub conntrack: bool,
    pub dist: Dist,
    pub round_p50: Vec<Option<f64>>,
    pub round_p99: Vec<Option<f64>>,
    /// Samples (requests, or SDK fetches) per second, per round.
    pub round_rps: Vec<Option<f64>>,
    /// The serving process's CPU time (user + system) per HTTP request, per round.
    pub round_cpu_ns: Vec<Option<f64>>,
    pub errors: u64,
    /// Open loop: requests that left more than 1 ms after they were due.
    pub late: u64,
    pub offered: u64,
    pub first_error: Option<String>,
}

/// One scheduling of the floor's keep-alive tail probe.
pub struct TailRow {
    pub key: &'static str,
    pub label: String,
    pub dist: Dist,
    pub round_p99: Vec<Option<f64>>,
    /// Time the client's and the floor's threads waited on a run queue over the runs.
    pub run_delay_ns: u64,
}

pub struct GetResult {
    pub rows: Vec<GetRow>,
    pub tail: Vec<TailRow>,
    pub rounds: usize,
    pub body_bytes: usize,
    pub latency_ms: u64,
    pub throughput_secs: u64,
    pub open_ms: u64,
    pub keepalive_connections: usize,
    pub open_keepalive_rate: u32,
    pub open_sdk_rate: u32,
    pub open_threads: usize,
    pub dnat_matched: u64,
}

impl GetResult {
    fn row(&self, mode: GetMode, variant: &str) -> Option<&GetRow> {
        self.rows
            .iter()
            .find(|r| r.mode == mode && r.variant == variant)
    }

    fn ratio(
        &self,
        mode: GetMode,
        num: &str,
        den: &str,
        pick: fn(&GetRow) -> &Vec<Option<f64>>,
    ) -> Option<Interval> {
        Interval::of_ratios(pick(self.row(mode, num)?), pick(self.row(mode, den)?))
    }
}

pub struct CostRow {
    pub key: &'static str,
    pub udp: bool,
    pub guarded: bool,
    pub round_bits: Vec<Option<f64>>,
    pub round_pps: Vec<Option<f64>>,
}

pub struct CostResult {
    pub rows: Vec<CostRow>,
    pub rounds: usize,
    pub secs: f64,
    pub missing: Option<String>,
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

/// Pods appearing one after another, each asking some time after it appeared.
pub struct Arrivals {
    pub pods: usize,
    /// First requests (listing and credentials) answered 200.
    pub ok: usize,
    pub hits: u64,
    pub misses: u64,
    /// Listing + credentials of each pod's first fetch; the credentials alone.
    pub first: Dist,
    pub credentials: Dist,
    pub max_add_lateness_ns: u64,
    pub max_ask_lateness_ns: u64,
    pub moto_calls: usize,
    pub sts_calls: u64,
    pub sts_mean_ns: Option<u64>,
    /// From the first pod's appearance to the last pod's credentials.
    pub first_appear_to_last_answer_ns: u64,
}

impl Arrivals {
    fn share(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

pub struct PrefetchResult {
    pub arrivals: Arrivals,
    pub gap_ms: u64,
}

pub struct DrainResult {
    pub arrivals: Arrivals,
    pub window_ms: u64,
}

pub struct StsResult {
    pub latency_ms: (u64, u64),
    pub herd: HerdResult,
    pub prefetch: PrefetchResult,
    pub drain: DrainResult,
    pub prefetch_concurrency: usize,
    pub delay_ms: u64,
}

/// Memory of the agent at one moment.
#[derive(Clone, Debug, Default)]
pub struct MemorySnapshot {
    pub process: Memory,
    /// The agent's memory cgroup, bytes: charged now, the most since the agent started, and
    /// kernel memory alone.
    pub cgroup_current: Option<u64>,
    pub cgroup_peak: Option<u64>,
    pub cgroup_kernel: Option<u64>,
    /// Of the cgroup's charge: anonymous memory and page cache, bytes.
    pub cgroup_anon_cache: Option<(u64, u64)>,
    /// Sockets the agent holds open, and what they are.
    pub sockets: usize,
    pub sockets_by_peer: Vec<(String, usize)>,
}

pub struct MemoryRow {
    pub node_pods: usize,
    pub cluster_pods: usize,
    pub rep: usize,
    /// Once the pod list is synced, before any request.
    pub synced: MemorySnapshot,
    /// After one credential round for every pod.
    pub after: MemorySnapshot,
    /// After the loaded-latency run and a second idle.
    pub steady: MemorySnapshot,
    pub smaps: Smaps,
    pub loader_peak_kib: Option<u64>,
    pub round: Duration,
    /// Open-loop SDK fetches from every pod (100/s for 1 s).
    pub latency: Dist,
    pub latency_errors: u64,
    pub cpu_per_request_ns: Option<f64>,
}

pub struct MemoryResult {
    pub rows: Vec<MemoryRow>,
    /// Pinned maps: (name, capacity, memlock bytes).
    pub maps: Vec<(String, u32, u64)>,
    /// Parsing the kernel's BTF alone, in a separate process: the size of
    /// /sys/kernel/btf/vmlinux, the time, and the rise of the peak RSS.
    pub btf_bytes: u64,
    pub btf_parse_ns: u64,
    pub btf_peak_kib: u64,
    pub agent_binary: String,
    pub agent_binary_bytes: u64,
}

impl MemoryResult {
    fn at_110(&self) -> impl Iterator<Item = &MemoryRow> {
        self.rows
            .iter()
            .filter(|r| r.node_pods == 110 && r.cluster_pods == 110)
    }
}

pub struct RestartResult {
    pub upgrade: bool,
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
    pub median_sample_gap_ns: u64,
    pub programs_replaced: usize,
    pub maps_recreated: usize,
    pub links_repointed: usize,
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
    /// CPU time at the start and the end of the run.
    pub cpu_before: CpuSample,
    pub cpu_after: CpuSample,
    pub memory_cgroup: Option<String>,
    pub connect: Option<ConnectResult>,
    pub get: Option<GetResult>,
    pub attest: Option<AttestResult>,
    pub cost: Option<CostResult>,
    pub sts: Option<StsResult>,
    pub memory: Option<MemoryResult>,
    pub restart: Vec<RestartResult>,
    pub pod_ips_seen_by_imds: Vec<IpAddr>,
    pub elapsed: Duration,
}

/// One target of the issues and whether this run met it.
pub struct Target {
    pub bench: &'static str,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

// --- formatting helpers ----------------------------------------------------------------------------

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

fn mib_bytes(bytes: Option<u64>) -> String {
    bytes.map_or("–".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
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

fn ratio_text(i: Option<Interval>) -> String {
    i.map_or("–".into(), |i| i.ratio_text())
}

/// `12.3 µs [11.9–12.8]`: the median of per-round values in ns with its interval.
fn ns_interval(values: &[Option<f64>]) -> (String, Option<Interval>) {
    let values: Vec<f64> = values.iter().flatten().copied().collect();
    let i = Interval::of(&values);
    let text = i.map_or("–".into(), |i| {
        format!(
            "{} [{}–{}]",
            fmt_ns(Some(i.mid as u64)),
            fmt_ns(Some(i.lo as u64)),
            fmt_ns(Some(i.hi as u64))
        )
    });
    (text, i)
}

/// A rate's median over rounds with its interval.
fn rate_interval(values: &[Option<f64>]) -> (String, Option<Interval>) {
    let values: Vec<f64> = values.iter().flatten().copied().collect();
    let i = Interval::of(&values);
    let text = i.map_or("–".into(), |i| {
        format!("{:.0} [{:.0}–{:.0}]", i.mid, i.lo, i.hi)
    });
    (text, i)
}

fn cpu_text(values: &[Option<f64>]) -> String {
    let values: Vec<f64> = values.iter().flatten().copied().collect();
    Interval::of(&values).map_or("–".into(), |i| {
        format!(
            "{:.1} µs [{:.1}–{:.1}]",
            i.mid / 1e3,
            i.lo / 1e3,
            i.hi / 1e3
        )
    })
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
            cpu_before: CpuSample::now(),
            cpu_after: CpuSample::default(),
            memory_cgroup: None,
            connect: None,
            get: None,
            attest: None,
            cost: None,
            sts: None,
            memory: None,
            restart: Vec::new(),
            pod_ips_seen_by_imds: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Cores' worth of CPU that other processes used during the run.
    fn others(&self) -> Option<f64> {
        self.cpu_before.others_until(&self.cpu_after)
    }

    /// Cores' worth of CPU time the host took from this machine during the run.
    fn steal(&self) -> Option<f64> {
        self.cpu_before.steal_until(&self.cpu_after)
    }

    /// Whether other work took more than half a core on average during the run (others'
    /// builds and tests sharing the CPUs, or the host's, as steal).
    fn loaded(&self) -> bool {
        self.others().is_some_and(|others| others > 0.5)
            || self.steal().is_some_and(|steal| steal > 0.5)
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let at_most = |i: Option<Interval>, limit: f64| i.map(|i| i.all_at_most(limit));
        let at_least = |i: Option<Interval>, limit: f64| i.map(|i| i.all_at_least(limit));
        if let Some(c) = &self.connect {
            for (num, den, limit, goal) in [
                ("b", "a", 1.05, "connect (b) ≤ 1.05× (a), conntrack on"),
                (
                    "b+g",
                    "a",
                    1.05,
                    "connect (b+g), with the packet guard as deployed, ≤ 1.05× (a), conntrack on",
                ),
                ("b", "c", 0.8, "connect (b) ≤ 0.8× (c), conntrack on"),
            ] {
                let i = c.ratio(num, den);
                t.push(Target {
                    bench: "1",
                    goal: goal.into(),
                    measured: ratio_text(i),
                    met: at_most(i, limit),
                });
            }
        }
        if let Some(g) = &self.get {
            fn p50(r: &GetRow) -> &Vec<Option<f64>> {
                &r.round_p50
            }
            fn rps(r: &GetRow) -> &Vec<Option<f64>> {
                &r.round_rps
            }
            for (mode, name, limit) in [
                (GetMode::New1, "new connection", 1.1),
                (GetMode::New1, "new connection", 1.5),
                (GetMode::Ka1, "keep-alive", 1.5),
                (GetMode::Sdk1, "SDK fetch (IMDSv2: 3 connections)", 1.5),
            ] {
                let i = g.ratio(mode, "b", "floor", p50);
                t.push(Target {
                    bench: "2",
                    goal: format!("{name}: (b) p50 ≤ {limit}× floor, 1 client"),
                    measured: ratio_text(i),
                    met: at_most(i, limit),
                });
            }
            for (mode, name) in [
                (GetMode::New1, "new connection"),
                (GetMode::Ka1, "keep-alive"),
            ] {
                let (text, i) = g
                    .row(mode, "b")
                    .map_or(("–".into(), None), |r| ns_interval(&r.round_p99));
                t.push(Target {
                    bench: "2",
                    goal: format!("{name}: (b) p99 ≤ 500 µs, 1 client (median of per-round p99)"),
                    measured: text,
                    met: i.map(|i| i.hi <= 500_000.0),
                });
            }
            let (text, i) = g
                .row(GetMode::KaMax, "b")
                .map_or(("–".into(), None), |r| rate_interval(&r.round_rps));
            t.push(Target {
                bench: "2",
                goal: format!("keep-alive (b) ≥ 40k req/s on {} cores", self.machine.cores),
                measured: format!("{text} req/s"),
                met: at_least(i, 40_000.0),
            });
            let i = g.ratio(GetMode::KaMax, "b", "floor", rps);
            t.push(Target {
                bench: "2",
                goal: "keep-alive throughput (b) ≥ 0.85× floor".into(),
                measured: ratio_text(i),
                met: at_least(i, 0.85),
            });
            let i = g.ratio(GetMode::KaMax, "b", "c", rps);
            t.push(Target {
                bench: "2",
                goal: "keep-alive throughput (b) ≥ 1.2× (c)".into(),
                measured: ratio_text(i),
                met: at_least(i, 1.2),
            });
        }
        if let Some(s) = &self.sts {
            let counts: Vec<String> = s
                .herd
                .runs
                .iter()
                .map(|r| format!("{}/{}", r.proxy_assume_role, r.moto_assume_role))
                .collect();
            t.push(Target {
                bench: "4",
                goal: "herd: exactly one AssumeRole per herd (proxy/moto), every request answered"
                    .into(),
                measured: counts.join(", "),
                met: Some(
                    !s.herd.runs.is_empty()
                        && s.herd.runs.iter().all(|r| {
                            r.proxy_assume_role == 1
                                && r.moto_assume_role == 1
                                && r.answered == r.requests
                                && r.failures == 0
                        }),
                ),
            });
            let p = &s.prefetch.arrivals;
            let share = p.share();
            t.push(Target {
                bench: "4",
                goal: format!(
                    "prefetch: ≥ 99 % of first requests from cache (asking {} ms after the pod \
                     appears)",
                    s.delay_ms
                ),
                measured: share.map_or("–".into(), |sh| {
                    format!("{:.1} % ({} of {})", sh * 100.0, p.hits, p.hits + p.misses)
                }),
                met: share.map(|sh| sh >= 0.99 && p.ok == p.pods),
            });
        }
        if let Some(m) = &self.memory {
            let rows: Vec<&MemoryRow> = m.at_110().collect();
            if !rows.is_empty() {
                let peaks: Vec<u64> = rows
                    .iter()
                    .map(|r| r.steady.process.hwm.max(r.after.process.hwm))
                    .collect();
                let steady: Vec<u64> = rows.iter().map(|r| r.steady.process.rss).collect();
                let range = |v: &[u64]| {
                    let (lo, hi) = (
                        v.iter().copied().min().unwrap_or(0),
                        v.iter().copied().max().unwrap_or(0),
                    );
                    format!("{} [{}–{}], {} starts", mib(hi), mib(lo), mib(hi), v.len())
                };
                t.push(Target {
                    bench: "5",
                    goal: "peak RSS (VmHWM) ≤ 16 MiB, 110 pods on the node, TLS to API and STS"
                        .into(),
                    measured: range(&peaks),
                    met: Some(peaks.iter().all(|&p| p <= 16 * 1024)),
                });
                t.push(Target {
                    bench: "5",
                    goal: "steady RSS ≤ 12 MiB, 110 pods on the node, TLS to API and STS".into(),
                    measured: range(&steady),
                    met: Some(steady.iter().all(|&p| p <= 12 * 1024)),
                });
            }
            if let Some(r) = m.rows.iter().find(|r| r.cluster_pods > r.node_pods) {
                let peak = r.steady.process.hwm;
                t.push(Target {
                    bench: "5",
                    goal: format!(
                        "peak RSS ≤ 24 MiB, {} pods on the node, {} in the cluster",
                        r.node_pods, r.cluster_pods
                    ),
                    measured: mib(peak),
                    met: Some(peak <= 24 * 1024),
                });
            }
        }
        for r in &self.restart {
            let kind = if r.upgrade { "upgrade" } else { "same binary" };
            t.push(Target {
                bench: "6",
                goal: format!("restart ({kind}): 0 ms interception gap"),
                measured: format!(
                    "{} ({} node-key answers, {} pod connections at the real IMDS)",
                    ms(r.leak_gap_ns),
                    r.node_key_responses,
                    r.imds_saw_pods
                ),
                met: Some(r.leak_gap_ns == 0 && r.node_key_responses == 0 && r.imds_saw_pods == 0),
            });
            t.push(Target {
                bench: "6",
                goal: format!(
                    "restart ({kind}): ≤ 500 ms from process start to first served request"
                ),
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
            "- Load average (1/5/15 min) before the run: {}; after: {} (the run's own load \
             included). {}{}{}",
            self.load_before,
            self.load_after,
            match self.others() {
                Some(others) => format!(
                    "Other processes used {others:.2} cores on average during the run (the \
                     machine's busy time in /proc/stat minus this run's processes; kernel \
                     threads that carry part of its network work, such as ksoftirqd, count as \
                     other)."
                ),
                None => "Other processes' CPU use was not measured.".to_owned(),
            },
            match self.steal() {
                Some(steal) => format!(
                    " The host took {steal:.2} cores' worth of time from this virtual machine \
                     on average (steal in /proc/stat: its CPUs had work, the host ran \
                     something else), which no process here shows."
                ),
                None => String::new(),
            },
            if self.loaded() {
                " **Other work took more than half a core during this run: absolute numbers \
                 are inflated and noisier than on a quiet machine; the ratios compare variants \
                 interleaved within each round, and their intervals show how much the noise \
                 moved them.**"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "- Tools: {}; the agent built with `--release`",
            m.tools.join("; ")
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
             moto as STS and the Kubernetes API emulator. The agent reaches both over TLS, as in \
             a cluster: a TLS front (rustls, an RSA 2048 certificate from a test CA) on the \
             node's loopback terminates each and forwards to the emulator; the agent trusts the \
             CA through its kubeconfig and `SSL_CERT_FILE` (the machine's CA bundle plus the \
             test CA, so it loads as many roots as on a real node). Between that front and moto, \
             the kit's STS proxy holds every call 50–300 ms (uniform, a fixed sequence), as \
             real STS answers, except in part 5, where hundreds of distinct roles would take \
             minutes. The agent runs in a memory cgroup of its own ({}), so the kernel memory it \
             causes (BPF maps, sockets) is counted with it. Pods are network namespaces behind \
             veths; clients that should be intercepted by our programs run in the test cgroup, \
             the others outside it. The agent runs with its defaults and `--host-interface {}`: \
             its packet guard covers every pod interface but those of kube2iam's DNAT pod (p5), \
             the floor's client (p6) and the unguarded pod (p7).\n",
            self.memory_cgroup
                .as_deref()
                .unwrap_or("not available here"),
            super::runner::GUARDED
        );
        let _ = writeln!(
            out,
            "How to read the numbers: comparisons interleave their variants, every round running \
             each once in an order rotated from round to round. A ratio is the median of the \
             per-round ratios, followed by its bootstrap 95 % interval in brackets (the rounds \
             resampled 2,000 times); a target counts as met only when its whole interval meets \
             it. Latency percentiles in the tables are nearest-rank over all samples of all \
             rounds; CPU per request is the serving process's user + system time over the \
             requests it answered in the run (from /proc/<pid>/stat, 10 ms ticks).\n"
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
        let mut targets = Table::new(&["#", "target", "measured [95 % interval]", "result"]);
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
        if let Some(a) = &self.attest {
            self.attest_section(&mut out, a);
        }
        if let Some(c) = &self.cost {
            self.cost_section(&mut out, c);
        }
        if let Some(s) = &self.sts {
            self.sts_section(&mut out, s);
        }
        if let Some(mem) = &self.memory {
            self.memory_section(&mut out, mem);
        }
        if !self.restart.is_empty() {
            self.restart_section(&mut out);
        }
        out
    }

    fn connect_section(&self, out: &mut String, c: &ConnectResult) {
        let _ = writeln!(out, "## 1. connect() from a pod\n");
        let _ = writeln!(
            out,
            "Time of one blocking `connect()` call (the TCP handshake with the agent's listener, \
             at 192.0.2.10:8181 on the node) from a pod, {} rounds × {} connects per variant, \
             after 50 warm-up connects per batch; each socket is then reset (SO_LINGER 0). The \
             client runs on CPU 1 and the agent's threads on CPU 0 (unpinned, the agent's accept \
             landing on the client's CPU inside its connect() made batches bimodal). (a), (o), \
             (b) connect from one pod without the packet guard, outside or inside the test \
             cgroup; (o+g) and (b+g) from a pod with the guard (tc ingress on its interface), as \
             every pod of a node running the agent has it; (c) from the pod the DNAT rule names. \
             The headline rows run with kube2iam's nat table present, which turns conntrack on \
             for every packet of the node's namespace, as on any node running kube-proxy; the \
             last three rows repeat (a), (b), (b+g) with the table deleted (`nft delete table ip \
             nat`).\n",
            c.rounds, c.per_batch
        );
        let mut table = Table::new(&[
            "variant",
            "median",
            "p99",
            "mean",
            "per-round medians (range)",
            "vs (a) [95 % interval]",
        ]);
        for r in &c.rows {
            let base = if r.conntrack { "a" } else { "a0" };
            let values: Vec<f64> = r.round_medians.iter().flatten().copied().collect();
            let range = Interval::of(&values).map_or("–".into(), |i| {
                format!(
                    "{}–{}",
                    fmt_ns(Some(i.min as u64)),
                    fmt_ns(Some(i.max as u64))
                )
            });
            table.row(vec![
                r.label.clone(),
                fmt_ns(r.dist.median()),
                fmt_ns(r.dist.p99()),
                fmt_ns(r.dist.mean()),
                range,
                ratio_text(c.ratio(r.key, base)),
            ]);
        }
        out.push_str(&table.markdown());
        let _ = writeln!(
            out,
            "\n(c) is kube2iam's rule, in the node's namespace: `iptables {}`; it matched {} \
             packets over the run. \"No program of ours\": the client runs outside the test \
             cgroup the programs are attached to, which for its sockets is the same as \
             detached.\n",
            c.dnat_rule, c.dnat_matched
        );
        let _ = writeln!(
            out,
            "With conntrack on: (b)/(c) {}; (b)/(a) {}; (b+g)/(a) {}. What our programs cost a \
             pod's other connects: (o)/(a) {}, (o+g)/(a) {}. Without conntrack: (b)/(a) {}. Most \
             of a connect is the TCP handshake over the veth and the wake-up of the agent, which \
             every variant pays.\n",
            ratio_text(c.ratio("b", "c")),
            ratio_text(c.ratio("b", "a")),
            ratio_text(c.ratio("b+g", "a")),
            ratio_text(c.ratio("o", "a")),
            ratio_text(c.ratio("o+g", "a")),
            ratio_text(c.ratio("b0", "a0")),
        );
    }

    fn attest_section(&self, out: &mut String, a: &AttestResult) {
        let _ = writeln!(out, "## 2b. What attested identity costs\n");
        let _ = writeln!(
            out,
            "Per connect: one agent, a pod laid out in a kubelet pod cgroup (systemd driver); {} \
             rounds × {} connects per variant, interleaved, conntrack on, client and agent \
             pinned as in part 1. The record on and off are the same build and programs one \
             config flag apart (`FLAG_ATTEST_OFF`, which the agent writes for \
             `--identity-attestation off`): with it on, connect4 reads the task's cgroup and its \
             ancestors and writes `K2I_CONNECTING`, and sock_ops moves the record to \
             `K2I_ATTEST` and asks for the close callback; with it off sock_ops still runs and \
             finds nothing to move.\n",
            a.connect_rounds, a.per_batch
        );
        let mut table = Table::new(&[
            "variant",
            "median",
            "p99",
            "per-round medians (range)",
            "vs (a) [95 % interval]",
        ]);
        for r in &a.connect_rows {
            let values: Vec<f64> = r.round_medians.iter().flatten().copied().collect();
            let range = Interval::of(&values).map_or("–".into(), |i| {
                format!(
                    "{}–{}",
                    fmt_ns(Some(i.min as u64)),
                    fmt_ns(Some(i.max as u64))
                )
            });
            table.row(vec![
                r.label.clone(),
                fmt_ns(r.dist.median()),
                fmt_ns(r.dist.p99()),
                range,
                ratio_text(a.connect_ratio(r.key, "a")),
            ]);
        }
        out.push_str(&table.markdown());
        let _ = writeln!(
            out,
            "\nThe record's cost per connect: record on / record off {}.\n",
            ratio_text(a.connect_ratio("b-att", "b-off"))
        );
        let _ = writeln!(
            out,
            "Per request: the agent restarted for each mode in each of {} rounds (modes \
             alternating), the pod's credentials fetched once through STS, then {} ms of GETs \
             from the pod: one per new connection, then over one kept-alive connection. \
             `require` adds the kernel's record and the agent's lookup of the connection's \
             record and of its cgroup's pod to `off`. Ratios are `require` over `off`, per \
             round.\n",
            a.request_rounds, a.latency_ms
        );
        let mut table = Table::new(&[
            "GET",
            "mode",
            "p50",
            "p99",
            "agent CPU per request",
            "errors",
        ]);
        for r in &a.request_rows {
            let kind = match r.kind {
                GetMode::Ka1 => "keep-alive",
                _ => "new connection",
            };
            table.row(vec![
                kind.into(),
                format!("`{}`", r.mode),
                fmt_ns(r.dist.median()),
                fmt_ns(r.dist.p99()),
                cpu_text(&r.round_cpu_ns),
                r.errors.to_string(),
            ]);
        }
        out.push_str(&table.markdown());
        let mut ratios = Table::new(&[
            "GET",
            "p50 require/off",
            "p99 require/off",
            "CPU per request require/off",
        ]);
        for (kind, name) in [
            (GetMode::New1, "new connection"),
            (GetMode::Ka1, "keep-alive"),
        ] {
            let (p50, p99, cpu) = a.request_ratios(kind);
            ratios.row(vec![
                name.into(),
                ratio_text(p50),
                ratio_text(p99),
                ratio_text(cpu),
            ]);
        }
        out.push('\n');
        out.push_str(&ratios.markdown());
        out.push('\n');
    }

    fn get_table(&self, g: &GetResult, mode: GetMode, conntrack: bool, out: &mut String) {
        let mut table = Table::new(&[
            "variant",
            "p50",
            "p99",
            "p50 vs floor",
            "p99 vs floor",
            "server CPU per request",
            "errors",
        ]);
        let floor = if conntrack { "floor" } else { "floor0" };
        for r in g
            .rows
            .iter()
            .filter(|r| r.mode == mode && r.conntrack == conntrack)
        {
            table.row(vec![
                r.label.clone(),
                fmt_ns(r.dist.median()),
                fmt_ns(r.dist.p99()),
                ratio_text(g.ratio(mode, r.variant, floor, |r| &r.round_p50)),
                ratio_text(g.ratio(mode, r.variant, floor, |r| &r.round_p99)),
                cpu_text(&r.round_cpu_ns),
                r.errors.to_string(),
            ]);
        }
        out.push_str(&table.markdown());
        for r in g
            .rows
            .iter()
            .filter(|r| r.mode == mode && r.conntrack == conntrack && r.first_error.is_some())
        {
            let _ = writeln!(
                out,
                "\n{} first error: `{}`",
                r.label,
                r.first_error.as_deref().unwrap_or("")
            );
        }
        out.push('\n');
    }

    fn get_section(&self, out: &mut String, g: &GetResult) {
        let _ = writeln!(out, "## 2. Credential requests end to end\n");
        let _ = writeln!(
            out,
            "The credentials of a pod's role, answered from the agent's cache ({} bytes of JSON), \
             from a pod: through our connect4 (b, from a pod with the packet guard), through \
             kube2iam's DNAT rule (c), and from a bare hyper server on the node that answers the \
             same bytes (the floor: what any server costs on this path). All with conntrack on \
             (the nat table present), as on a real node; {} rounds, variants interleaved. Each \
             variant runs from a pod of its own (clients of different variants sharing the \
             agent's TIME_WAIT 4-tuples would trip PAWS: their TCP timestamp offsets hash the \
             destination they connect to, which DNAT hides). Client and servers share the {} \
             cores. The agent runs with `--identity-attestation off` in this part, for every \
             variant: a DNATed connection never went through the connect hooks, so it carries \
             no attestation, and an attesting agent refuses it; (c) stands for kube2iam, which \
             serves by address. Part 2b gives what attestation adds per request.\n",
            g.body_bytes, g.rounds, self.machine.cores
        );
        let _ = writeln!(
            out,
            "### The SDK's fetch (headline)\n\nWhat an AWS SDK does for credentials with IMDSv2, \
             each on a new connection: `PUT /latest/api/token`, the credential listing with the \
             token, then the credentials of the role it names (the floor answers the agent's \
             token, listing and credentials byte for byte). One client, back to back, {} ms per \
             round; the time is the whole fetch (3 connections).\n",
            g.latency_ms
        );
        self.get_table(g, GetMode::Sdk1, true, out);
        let _ = writeln!(
            out,
            "### One GET per new connection, and keep-alive\n\nOne client, {} ms per round: \
             socket + connect + request + the whole response (`Connection: close`); then GETs \
             back to back over one kept-alive connection.\n",
            g.latency_ms
        );
        self.get_table(g, GetMode::New1, true, out);
        self.get_table(g, GetMode::Ka1, true, out);

        let _ = writeln!(
            out,
            "### Keep-alive throughput\n\nwrk (`-t1 -c{}`), {} s per round: closed-loop, as many \
             requests as the server answers. The latencies of a closed loop hide queueing (a \
             stalled request holds back the ones behind it); the open-loop runs below do not.\n",
            g.keepalive_connections, g.throughput_secs
        );
        let mut table = Table::new(&[
            "variant",
            "req/s [95 % interval]",
            "vs floor",
            "vs (c)",
            "server CPU per request",
            "p50 / p99 (closed loop)",
            "errors",
        ]);
        for r in g.rows.iter().filter(|r| r.mode == GetMode::KaMax) {
            table.row(vec![
                r.label.clone(),
                rate_interval(&r.round_rps).0,
                ratio_text(g.ratio(GetMode::KaMax, r.variant, "floor", |r| &r.round_rps)),
                ratio_text(g.ratio(GetMode::KaMax, r.variant, "c", |r| &r.round_rps)),
                cpu_text(&r.round_cpu_ns),
                format!("{} / {}", fmt_ns(r.dist.median()), fmt_ns(r.dist.p99())),
                r.errors.to_string(),
            ]);
        }
        out.push_str(&table.markdown());
        out.push('\n');

        let _ = writeln!(
            out,
            "### Open loop at fixed rates\n\nRequests due at fixed times ({} keep-alive GET/s \
             over {} connections; {} SDK fetches/s, 3 connections each), {} ms per round, spread \
             over {} client threads. A request's latency runs from when it was due, so a stall \
             counts against every request it delays (no coordinated omission); \"late\" counts \
             requests that could only leave more than 1 ms after they were due.\n",
            g.open_keepalive_rate, g.open_threads, g.open_sdk_rate, g.open_ms, g.open_threads
        );
        let mut table = Table::new(&[
            "load",
            "variant",
            "p50",
            "p99",
            "p99.9",
            "max",
            "p50 vs floor",
            "server CPU per request",
            "late / offered",
            "errors",
        ]);
        for (mode, name) in [
            (
                GetMode::OpenKa,
                format!("{} GET/s keep-alive", g.open_keepalive_rate),
            ),
            (
                GetMode::OpenSdk,
                format!("{} SDK fetches/s", g.open_sdk_rate),
            ),
        ] {
            for r in g.rows.iter().filter(|r| r.mode == mode) {
                table.row(vec![
                    name.clone(),
                    r.label.clone(),
                    fmt_ns(r.dist.median()),
                    fmt_ns(r.dist.p99()),
                    fmt_ns(r.dist.percentile(99.9)),
                    fmt_ns(r.dist.percentile(100.0)),
                    ratio_text(g.ratio(mode, r.variant, "floor", |r| &r.round_p50)),
                    cpu_text(&r.round_cpu_ns),
                    format!("{} / {}", r.late, r.offered),
                    r.errors.to_string(),
                ]);
            }
        }
        out.push_str(&table.markdown());
        out.push('\n');

        let _ = writeln!(
            out,
            "### Without conntrack (second view)\n\nThe floor and (b) again with the nat table \
             deleted (no conntrack in the node), in the same rounds.\n"
        );
        for mode in [GetMode::Sdk1, GetMode::New1, GetMode::Ka1] {
            self.get_table(g, mode, false, out);
        }
        let _ = writeln!(
            out,
            "The DNAT rule matched {} packets in this part.\n",
            g.dnat_matched
        );
        let _ = writeln!(
            out,
            "### The keep-alive tail\n\nIssue 14 found the bare floor's keep-alive p99 at 3.4 ms \
             with a 16 µs median (wrk, one connection): a stall that has nothing to do with the \
             agent. The same one-client keep-alive run against the floor, {} ms per round, \
             interleaved, under three schedulings:\n",
            g.latency_ms
        );
        let mut table = Table::new(&[
            "floor, keep-alive, 1 client",
            "p50",
            "p99",
            "p99.9",
            "max",
            "requests over 1 ms",
            "their time beyond 1 ms",
            "client + floor waiting for a CPU",
            "per-round p99 [95 % interval]",
        ]);
        for r in &g.tail {
            let total = r.dist.count().max(1);
            let over = r.dist.count_above(1_000_000);
            table.row(vec![
                format!("({}) {}", r.key, r.label),
                fmt_ns(r.dist.median()),
                fmt_ns(r.dist.p99()),
                fmt_ns(r.dist.percentile(99.9)),
                fmt_ns(r.dist.percentile(100.0)),
                format!(
                    "{over} of {total} ({:.2} %)",
                    over as f64 * 100.0 / total as f64
                ),
                ms(r.dist.excess_over(1_000_000)),
                ms(r.run_delay_ns),
                ns_interval(&r.round_p99).0,
            ]);
        }
        out.push_str(&table.markdown());
        let _ = writeln!(
            out,
            "\n{}\n",
            tail_note(&g.tail, self.loaded(), self.steal())
        );
    }

    fn cost_section(&self, out: &mut String, c: &CostResult) {
        let _ = writeln!(out, "## 3. What the packet guard costs other traffic\n");
        if let Some(why) = &c.missing {
            let _ = writeln!(out, "Not measured: {why}.\n");
            return;
        }
        let _ = writeln!(
            out,
            "iperf3 from a pod to an iperf3 server on the node (192.0.2.10), from the pod with \
             the packet guard on its interface (tc ingress, node side) and from one without, \
             {} rounds of {:.0} s each, interleaved; both clients outside the test cgroup (the \
             connect4 cost is part 1's). TCP: one stream, bulk. UDP: 64-byte datagrams as fast \
             as the client can send (`-u -b 0 -l 64`), where a per-packet program costs most; \
             the rate is what the server received.\n",
            c.rounds, c.secs
        );
        let mut table = Table::new(&[
            "traffic",
            "without the guard",
            "with the guard",
            "with / without [95 % interval]",
        ]);
        let row = |key: &str| c.rows.iter().find(|r| r.key == key);
        for (name, plain, guarded, udp) in [
            ("TCP, Gbit/s", "tcp", "tcp+g", false),
            ("UDP 64 B, kpackets/s", "udp", "udp+g", true),
        ] {
            let (Some(p), Some(g)) = (row(plain), row(guarded)) else {
                continue;
            };
            let pick = |r: &CostRow| -> Vec<Option<f64>> {
                if udp {
                    r.round_pps.iter().map(|v| v.map(|x| x / 1e3)).collect()
                } else {
                    r.round_bits.iter().map(|v| v.map(|x| x / 1e9)).collect()
                }
            };
            let (pv, gv) = (pick(p), pick(g));
            let med = |v: &[Option<f64>]| {
                let v: Vec<f64> = v.iter().flatten().copied().collect();
                Interval::of(&v).map_or("–".into(), |i| {
                    format!("{:.2} [{:.2}–{:.2}]", i.mid, i.lo, i.hi)
                })
            };
            let _ = (p.udp, p.guarded);
            table.row(vec![
                name.into(),
                med(&pv),
                med(&gv),
                ratio_text(Interval::of_ratios(&gv, &pv)),
            ]);
        }
        out.push_str(&table.markdown());
        out.push('\n');
    }

    fn arrivals_row(table: &mut Table, what: String, a: &Arrivals) {
        table.row(vec![
            what,
            format!("{} of {}", a.ok, a.pods),
            a.share().map_or("–".into(), |s| {
                format!("{:.1} % ({} hits, {} misses)", s * 100.0, a.hits, a.misses)
            }),
            format!(
                "{} / {} / {}",
                fmt_ns(a.first.median()),
                fmt_ns(a.first.p99()),
                fmt_ns(a.first.percentile(100.0))
            ),
            ms(a.first_appear_to_last_answer_ns),
            format!(
                "{} ({} by the agent, {} on average)",
                a.moto_calls,
                a.sts_calls,
                fmt_ns(a.sts_mean_ns)
            ),
            format!(
                "add {} / ask {}",
                ms(a.max_add_lateness_ns),
                ms(a.max_ask_lateness_ns)
            ),
        ]);
    }

    fn sts_section(&self, out: &mut String, s: &StsResult) {
        let _ = writeln!(out, "## 4. STS over TLS: herd, prefetch, node drain\n");
        let _ = writeln!(
            out,
            "STS answers through the TLS front after {}–{} ms (uniform per call). Each herd: {} \
             concurrent requests from 10 pod addresses for one role nobody has asked for yet \
             (the agent runs with `--prefetch-concurrency 0` for this, so the cache is cold); \
             the client opens every connection first, then sends all requests at once; \"all \
             answered\" runs from the first send to the last response.\n",
            s.latency_ms.0,
            s.latency_ms.1,
            s.herd.runs.first().map_or(0, |r| r.requests)
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
        for r in &s.herd.runs {
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
        let _ = writeln!(
            out,
            "\nThen the agent restarts with prefetch on (the default, at most {} AssumeRole calls \
             at a time). Prefetch: {} pods, each with a role of its own, appear in the API {} ms \
             apart. Node drain: {} pods, each with a role of its own, appear within {} ms, as \
             when another node is drained onto this one. In both, each pod asks (the listing, \
             then its credentials, as an SDK does) {} ms after it appeared: a pod's address, \
             which the agent keys on, is in the API before its containers start. Cache hits and \
             misses are the agent's counters for the credentials requests (a request that waits \
             for an in-flight prefetch counts as a miss).\n",
            s.prefetch_concurrency,
            s.prefetch.arrivals.pods,
            s.prefetch.gap_ms,
            s.drain.arrivals.pods,
            s.drain.window_ms,
            s.delay_ms
        );
        let mut table = Table::new(&[
            "run",
            "answered 200",
            "first credentials from cache",
            "first fetch p50 / p99 / max",
            "first appearance → last pod served",
            "AssumeRole (moto)",
            "scheduling lateness (max)",
        ]);
        Self::arrivals_row(&mut table, "prefetch".into(), &s.prefetch.arrivals);
        Self::arrivals_row(&mut table, "node drain".into(), &s.drain.arrivals);
        out.push_str(&table.markdown());
        out.push('\n');
    }

    fn memory_section(&self, out: &mut String, m: &MemoryResult) {
        let _ = writeln!(out, "## 5. Memory, and scaling with the pods on the node\n");
        let _ = writeln!(
            out,
            "Each row starts a fresh agent with N pods on its node, each with a role of its own \
             (the most cache entries), over TLS to the API and STS. \"Synced\": once the agent \
             listed its pods. Then every pod fetches its credentials once (listing + \
             credentials, all at once), then SDK fetches arrive open-loop at 100/s for 1 s from \
             all pods in turn (the latency columns), then one idle second (\"steady\"). The pods \
             are addresses on 2 pod namespaces (198.18.x.y, one address per pod, each a Running \
             pod in the API emulator); the 5,000-pod row adds pods on 45 other nodes to the API. \
             RSS is the agent process's: VmHWM is its peak since it started, VmRSS split into \
             anonymous and file pages. The cgroup columns are the agent's memory cgroup \
             (usage_in_bytes on cgroup v1, memory.current on v2): its anonymous memory, page \
             cache it brought in, and kernel memory (BPF maps, sockets, page tables); the \
             peak includes the short-lived loader child.\n"
        );
        let mut table = Table::new(&[
            "pods on node / in cluster",
            "VmHWM (peak)",
            "steady VmRSS (anon + file)",
            "VmRSS synced → after round",
            "cgroup steady: anon + page cache + kernel / peak",
            "sockets open (steady)",
            "loader child peak",
            "credential round",
            "SDK fetch p50 / p99 (100/s)",
            "agent CPU per request",
        ]);
        for r in &m.rows {
            let p = &r.steady.process;
            table.row(vec![
                format!(
                    "{} / {}{}",
                    r.node_pods,
                    r.cluster_pods,
                    if r.rep > 1 {
                        format!(" (start {})", r.rep)
                    } else {
                        String::new()
                    }
                ),
                mib(p.hwm),
                format!("{} ({} + {})", mib(p.rss), mib(p.anon), mib(p.file)),
                format!(
                    "{} → {}",
                    mib(r.synced.process.rss),
                    mib(r.after.process.rss)
                ),
                format!(
                    "{}: {} + {} + {} / {}",
                    mib_bytes(r.steady.cgroup_current),
                    mib_bytes(r.steady.cgroup_anon_cache.map(|a| a.0)),
                    mib_bytes(r.steady.cgroup_anon_cache.map(|a| a.1)),
                    mib_bytes(r.steady.cgroup_kernel),
                    mib_bytes(r.steady.cgroup_peak)
                ),
                format!(
                    "{} ({})",
                    r.steady.sockets,
                    r.steady
                        .sockets_by_peer
                        .iter()
                        .map(|(k, n)| format!("{k}: {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                r.loader_peak_kib.map_or("–".into(), mib),
                ms(r.round.as_nanos() as u64),
                if r.latency.count() == 0 {
                    "–".into()
                } else {
                    format!(
                        "{} / {}{}",
                        fmt_ns(r.latency.median()),
                        fmt_ns(r.latency.p99()),
                        if r.latency_errors > 0 {
                            format!(" ({} errors)", r.latency_errors)
                        } else {
                            String::new()
                        }
                    )
                },
                r.cpu_per_request_ns
                    .map_or("–".into(), |c| format!("{:.1} µs", c / 1e3)),
            ]);
        }
        out.push_str(&table.markdown());
        if let Some(r) = m.at_110().next() {
            let _ = writeln!(
                out,
                "\nWhere the steady RSS of the first 110-pod start sits (/proc/<pid>/smaps, {} \
                 in all). \"Touched\": the pages the agent used during the 1 s of SDK load and \
                 the idle second after it (smaps' Referenced, counted from a `clear_refs` just \
                 before the load):\n",
                mib(r.smaps.total())
            );
            let mut table = Table::new(&[
                "mapping",
                "resident",
                "of which anonymous",
                "touched while serving and idle",
            ]);
            for (name, rss, anon, referenced) in &r.smaps.parts {
                table.row(vec![name.clone(), mib(*rss), mib(*anon), mib(*referenced)]);
            }
            table.row(vec![
                "all".into(),
                mib(r.smaps.total()),
                String::new(),
                mib(r.smaps.referenced()),
            ]);
            out.push_str(&table.markdown());
        }
        if !m.maps.is_empty() {
            let _ = writeln!(
                out,
                "\nThe pinned BPF maps (kernel memory, charged to the cgroup of the process that \
                 created them: the loader child, in the agent's cgroup), as the kernel accounts \
                 them (`memlock` in fdinfo):\n"
            );
            let mut table = Table::new(&["map", "capacity", "memory"]);
            let mut total = 0;
            for (name, entries, memlock) in &m.maps {
                total += memlock;
                table.row(vec![
                    name.clone(),
                    entries.to_string(),
                    mib_bytes(Some(*memlock)),
                ]);
            }
            table.row(vec!["all".into(), String::new(), mib_bytes(Some(total))]);
            out.push_str(&table.markdown());
        }
        let _ = writeln!(
            out,
            "\nThe agent binary: {} (`{}`). Loading the programs happens in a short-lived child \
             process (the same binary); the agent only opens the pinned maps and the guard's \
             program. aya's loader parses the kernel's BTF (/sys/kernel/btf/vmlinux, {}) on \
             every load whether the programs need it or not; parsed alone in a separate process \
             that raises the peak RSS by {} and takes {} — now in the child's peak (the \"loader \
             child peak\" column), not the agent's.\n",
            mib(m.agent_binary_bytes / 1024),
            m.agent_binary,
            mib(m.btf_bytes / 1024),
            mib(m.btf_peak_kib),
            ms(m.btf_parse_ns)
        );
        let _ = writeln!(out, "{}\n", memory_note(m));
    }

    fn restart_section(&self, out: &mut String) {
        let _ = writeln!(out, "## 6. kill -9 and restart under load\n");
        let first = &self.restart[0];
        let _ = writeln!(
            out,
            "{} pod addresses each fetch their credentials every {} ms (a new connection each; \
             the listing once first), so a request starts every {} across them. The agent is \
             killed with SIGKILL mid-run and started again at once. \"Same binary\" adopts the \
             pinned links and maps. \"Upgrade\" meets what a new release meets: the attached \
             programs differ from the ones it loads (here the same object loaded with the kernel \
             debug log compiled in, so their instructions differ), so each link's program is \
             swapped through the link (BPF_LINK_UPDATE); and the reverse-NAT map is pinned at \
             the previous release's 65,536 entries, so it is recreated at this release's size, \
             its entries copied, and every link pointed at programs using the new map. An \
             interception gap is any time a pod request reaches something other than the agent: \
             the node's metadata service (the IMDS emulator records every caller) or an answer \
             carrying the node's credentials.\n",
            first.sources,
            first.interval_ms,
            fmt_ns(Some(first.median_sample_gap_ns))
        );
        let mut table = Table::new(&["measure", "same binary", "upgrade"]);
        let get = |upgrade: bool| self.restart.iter().find(|r| r.upgrade == upgrade);
        let (same, up) = (get(false), get(true));
        let mut row = |name: &str, f: &dyn Fn(&RestartResult) -> String| {
            table.row(vec![
                name.into(),
                same.map_or("–".into(), f),
                up.map_or("–".into(), f),
            ]);
        };
        row("requests", &|r| r.requests.to_string());
        row("answered 200", &|r| r.ok.to_string());
        row("failed requests, by outcome", &|r| {
            if r.failures.is_empty() {
                "none".into()
            } else {
                r.failures
                    .iter()
                    .map(|(code, n)| format!("{} × {n}", outcome_name(*code)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        });
        row("longest interception gap", &|r| {
            format!(
                "{} ({} node-key answers, {} pod addresses at the real IMDS)",
                ms(r.leak_gap_ns),
                r.node_key_responses,
                r.imds_saw_pods
            )
        });
        row("median gap between request starts", &|r| {
            fmt_ns(Some(r.median_sample_gap_ns))
        });
        row("kill → new process", &|r| ms(r.kill_to_spawn_ns));
        row("process start → first served request", &|r| {
            r.start_to_first_served_ns.map_or("never".into(), ms)
        });
        row("last answer before the kill → first after", &|r| {
            r.outage_ns.map_or("–".into(), ms)
        });
        row("process start → pod list synced (log)", &|r| {
            ms(r.start_to_synced_ns)
        });
        row("programs swapped through their links", &|r| {
            r.programs_replaced.to_string()
        });
        row("maps recreated / links pointed at the new maps", &|r| {
            format!("{} / {}", r.maps_recreated, r.links_repointed)
        });
        out.push_str(&table.markdown());
        out.push('\n');
    }
}

/// What the keep-alive tail probe shows, in words, from this run's numbers.
fn tail_note(rows: &[TailRow], loaded: bool, steal: Option<f64>) -> String {
    let row = |key: &str| rows.iter().find(|r| r.key == key);
    let (Some(n), Some(f)) = (row("n"), row("f")) else {
        return String::new();
    };
    let share = |r: &TailRow| r.dist.count_above(1_000_000) as f64 / r.dist.count().max(1) as f64;
    let mut text = String::from(
        "A request over a kept-alive connection on this path costs the floor 10–25 µs; a \
         request that takes milliseconds instead is one that waited: the client thread, the \
         server's worker or the softirq that carries the packet was runnable but another task \
         held the CPU, and on a 2-core machine shared with compilers that wait lasts up to a \
         scheduler time slice (a few ms). That is what the \"waiting for a CPU\" column adds \
         up (schedstat's run_delay of the client's and the floor's threads). At SCHED_FIFO the \
         client and the floor run as soon as they are runnable, ahead of every normal task; the \
         busy loops keep the CPUs from idling, so no wake-up from idle (on this virtual \
         machine, a host-side wake-up of the vCPU) is measured. ",
    );
    if share(n) > 0.001 && share(f) < share(n) / 4.0 {
        let _ = write!(
            text,
            "In this run {:.2} % of the requests in (n) took over 1 ms and {:.3} % at \
             SCHED_FIFO: the tail is the wait for a CPU{}, not the network path or the \
             server's code, and it hits the agent's rows in the same way.",
            share(n) * 100.0,
            share(f) * 100.0,
            if loaded {
                " behind the other work on the machine"
            } else {
                ""
            }
        );
    } else if share(n) <= 0.001 {
        let _ = write!(
            text,
            "In this run the floor shows no such stall ({} of {} requests over 1 ms, p99.9 {}): \
             it appears when other work competes for the two CPUs, as it did in the run issue \
             14 quotes (load average about 4).",
            n.dist.count_above(1_000_000),
            n.dist.count(),
            fmt_ns(n.dist.percentile(99.9))
        );
    } else {
        let _ = write!(
            text,
            "In this run SCHED_FIFO did not remove the tail ({:.2} % over 1 ms against {:.2} % \
             as usual), so part of it is not a wait behind other tasks.",
            share(f) * 100.0,
            share(n) * 100.0
        );
    }
    if let Some(steal) = steal.filter(|s| *s >= 0.05) {
        let _ = write!(
            text,
            " The host took {steal:.2} cores' worth of time from this machine during the run \
             (steal): while the host does not run a virtual CPU, every task on it waits, at any \
             priority, and SCHED_FIFO cannot remove that part of the tail."
        );
    }
    text
}

/// What stays resident and why, from the first 110-pod row.
fn memory_note(m: &MemoryResult) -> String {
    let Some(r) = m.at_110().next() else {
        return String::new();
    };
    let part = |prefix: &str| -> (u64, u64, u64) {
        r.smaps
            .parts
            .iter()
            .filter(|p| p.0.starts_with(prefix))
            .fold((0, 0, 0), |a, p| (a.0 + p.1, a.1 + p.2, a.2 + p.3))
    };
    let binary = part("agent binary");
    let libs = part("shared libraries");
    let anon: u64 = r
        .smaps
        .parts
        .iter()
        .filter(|p| !p.0.starts_with("agent binary") && !p.0.starts_with("shared"))
        .map(|p| p.1)
        .sum();
    let zero = m.rows.iter().find(|r| r.node_pods == 0);
    let mut text = format!(
        "**What remains, and why.** Of the {} resident with 110 pods, {} are pages of the agent's \
         own binary ({} of it is file-backed: code, read-only data and relocations) and {} of \
         the C libraries: clean, shared, file-backed pages that the kernel can drop and read \
         again at any time, and that are charged to the cgroup that first read the file (the \
         agent's cgroup holds {} of page cache). Only {} of the binary's pages were \
         touched while serving and idling; the rest were mapped when start-up code ran \
         (argument parsing, the AWS and Kubernetes clients' set-up, TLS roots) and by the \
         kernel's fault-around, which maps the 64 KiB around every page faulted in. A smaller \
         binary maps fewer: fat LTO in one codegen unit and no symbol tables took it from \
         30.7 MB (the release profile before) to its size above. \
         The agent's own memory is the anonymous part, {} (heap, malloc arenas, thread \
         stacks), and the kernel memory it causes ({} in its cgroup: the BPF maps, sockets, \
         page tables); its memory cgroup held {} in all once steady",
        mib(r.smaps.total()),
        mib(binary.0),
        mib(binary.0 - binary.1),
        mib(libs.0),
        mib_bytes(r.steady.cgroup_anon_cache.map(|a| a.1)),
        mib(binary.2),
        mib(anon),
        mib_bytes(r.steady.cgroup_kernel),
        mib_bytes(r.steady.cgroup_current),
    );
    if let Some(z) = zero {
        let _ = write!(
            text,
            " ({} with no pod on the node: the pods' identities, their credentials and the \
             connections they brought account for the difference)",
            mib(z.steady.process.anon),
        );
    }
    let _ = write!(
        text,
        ". The agent's peak RSS is now its steady RSS: the kernel's BTF, which aya parses on \
         every load, lands in the loader child ({} peak RSS there, gone when it exits), never \
         in the agent. The cgroup's peak ({}) is that child's moment: a container memory limit \
         must allow for it. The RSS targets count file pages, the binary's and the C \
         libraries'; they stay missed while those are {} of it.",
        r.loader_peak_kib.map_or("–".into(), mib),
        mib_bytes(r.steady.cgroup_peak),
        mib(binary.0 - binary.1 + libs.0 - libs.1),
    );
    text
}
