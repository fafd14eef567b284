//! Prometheus metrics, served on the admin port's `/metrics` (prometheus-client).
//!
//! Every label has a fixed, small set of values: routes are the metadata server's route names,
//! statuses are HTTP codes, STS results and Event outcomes are enums, BPF events are the
//! program's counter names. Nothing carries a pod name, an address or a role ARN; which pod
//! was refused is in the log and in the pod's Events.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `kube2iam_requests_total` | counter | `route`, `status` |
//! | `kube2iam_request_duration_seconds` | histogram | `route` |
//! | `kube2iam_rejected_connections_total` | counter | |
//! | `kube2iam_sts_calls_total` | counter | `result` |
//! | `kube2iam_sts_call_duration_seconds` | histogram | `result` |
//! | `kube2iam_credential_cache_hits_total` | counter | |
//! | `kube2iam_credential_cache_misses_total` | counter | |
//! | `kube2iam_credential_cache_refreshes_total` | counter | |
//! | `kube2iam_credential_cache_prefetches_total` | counter | |
//! | `kube2iam_credential_stale_served_total` | counter | |
//! | `kube2iam_credential_cache_entries` | gauge | |
//! | `kube2iam_identity_map_entries` | gauge | |
//! | `kube2iam_identity_map_capacity` | gauge | |
//! | `kube2iam_bpf_events_total` | counter | `event` |
//! | `kube2iam_packet_guard_interfaces` | gauge | `guard`, `state` |
//! | `kube2iam_watch_restarts_total` | counter | `resource` |
//! | `kube2iam_watch_synced` | gauge | `resource` |
//! | `kube2iam_upstream_reachable` | gauge | |
//! | `kube2iam_ready` | gauge | |
//! | `kube2iam_pod_events_total` | counter | `reason`, `outcome` |
//! | `kube2iam_build_info` | gauge (info) | `version`, `git_commit` |

use std::{
    fmt,
    sync::{Arc, OnceLock, atomic::Ordering},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
        info::Info,
    },
    registry::Registry,
};

use crate::{
    bpf::guard::{Kind, Placement},
    status::Sources,
};

/// The `route` label of the metadata server's requests: which handler answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteLabel {
    Healthz,
    Token,
    Unauthorized,
    Method,
    BadPath,
    Refused,
    IamListing,
    CredentialsList,
    Credentials,
    IamInfo,
    Blocked,
    Proxy,
}

impl RouteLabel {
    pub const ALL: [RouteLabel; 12] = [
        RouteLabel::Healthz,
        RouteLabel::Token,
        RouteLabel::Unauthorized,
        RouteLabel::Method,
        RouteLabel::BadPath,
        RouteLabel::Refused,
        RouteLabel::IamListing,
        RouteLabel::CredentialsList,
        RouteLabel::Credentials,
        RouteLabel::IamInfo,
        RouteLabel::Blocked,
        RouteLabel::Proxy,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Healthz => "healthz",
            RouteLabel::Token => "token",
            RouteLabel::Unauthorized => "unauthorized",
            RouteLabel::Method => "method",
            RouteLabel::BadPath => "bad_path",
            RouteLabel::Refused => "refused",
            RouteLabel::IamListing => "iam_listing",
            RouteLabel::CredentialsList => "credentials_list",
            RouteLabel::Credentials => "credentials",
            RouteLabel::IamInfo => "iam_info",
            RouteLabel::Blocked => "blocked",
            RouteLabel::Proxy => "proxy",
        }
    }
}

/// The `result` label of STS calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StsResult {
    Success,
    Throttled,
    Denied,
    Unavailable,
}

impl StsResult {
    pub const ALL: [StsResult; 4] = [
        StsResult::Success,
        StsResult::Throttled,
        StsResult::Denied,
        StsResult::Unavailable,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            StsResult::Success => "success",
            StsResult::Throttled => "throttled",
            StsResult::Denied => "denied",
            StsResult::Unavailable => "unavailable",
        }
    }
}

/// The version this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (`unknown` when the build had none).
pub const GIT_COMMIT: &str = match option_env!("KUBE2IAM_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Latency buckets in seconds: 0.5 ms (a cached answer) to 10 s (STS timing out).
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub reason: &'static str,
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// What the metadata server counts.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    rejected_connections: Counter,
    refusals: Family<KindLabels, Counter>,
    callers: Family<KindLabels, Counter>,
    /// Each route's `200` counter and its latency histogram, taken from the families once (by
    /// the first answer): answers do not look their labels up again.
    answered: [OnceLock<(Counter, Histogram)>; RouteLabel::ALL.len()],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            rejected_connections: Counter::default(),
            refusals: Family::default(),
            callers: Family::default(),
            answered: Default::default(),
        }
    }
}

impl RequestMetrics {
    /// One answered request.
    pub fn observe(&self, route: RouteLabel, status: u16, elapsed: Duration) {
        if status == 200
            && let Some(answered) = self.answered.get(route as usize)
        {
            let (count, duration) = answered.get_or_init(|| {
                let route = route.as_str();
                (
                    self.requests
                        .get_or_create(&RequestLabels { route, status })
                        .clone(),
                    self.duration.get_or_create(&RouteLabels { route }).clone(),
                )
            });
            count.inc();
            duration.observe(elapsed.as_secs_f64());
            return;
        }
        let route = route.as_str();
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// A connection answered 503 and closed because `--max-connections` were open.
    pub fn rejected_connection(&self) {
        self.rejected_connections.inc();
    }

    /// A request refused for `kind` (a [`crate::decision::Refusal`] kind).
    pub fn refused(&self, kind: &'static str) {
        self.refusals.get_or_create(&KindLabels { kind }).inc();
    }

    /// Refusals of `kind` so far.
    pub fn refusals(&self, kind: &'static str) -> u64 {
        self.refusals
            .get(&KindLabels { kind })
            .map_or(0, |c| c.get())
    }

    /// An accepted connection, by what the kernel attested of it.
    pub fn caller(&self, kind: &'static str) {
        self.callers.get_or_create(&KindLabels { kind }).inc();
    }

    /// How many requests got `status` on `route` so far.
    pub fn count(&self, route: RouteLabel, status: u16) -> u64 {
        self.requests
            .get(&RequestLabels {
                route: route.as_str(),
                status,
            })
            .map_or(0, |c| c.get())
    }

    /// Connections rejected so far.
    pub fn rejected_connections(&self) -> u64 {
        self.rejected_connections.get()
    }
}

/// STS call latency by result (the counts by result are `CacheStats`' counters).
#[derive(Debug, Clone)]
pub struct StsDurations(HistogramFamily<ResultLabels>);

impl Default for StsDurations {
    fn default() -> Self {
        StsDurations(Family::new_with_constructor(latency_histogram))
    }
}

impl StsDurations {
    pub fn observe(&self, result: StsResult, elapsed: Duration) {
        self.0
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// What became of the Kubernetes Events the agent meant to record.
#[derive(Debug, Clone, Default)]
pub struct EventCounters(Family<EventLabels, Counter>);

impl EventCounters {
    pub fn inc(&self, reason: &'static str, outcome: &'static str) {
        self.0.get_or_create(&EventLabels { reason, outcome }).inc();
    }

    pub fn get(&self, reason: &'static str, outcome: &'static str) -> u64 {
        self.0
            .get(&EventLabels { reason, outcome })
            .map_or(0, |c| c.get())
    }
}

/// The agent's metrics registry: the live families plus a collector that reads the cache, the
/// registry, the watches and the pinned BPF counters on each scrape.
pub fn registry(sources: Arc<Sources>) -> Registry {
    let mut registry = Registry::with_prefix("kube2iam");
    let state = &sources.state;
    registry.register(
        "requests",
        "Metadata requests answered, by route and HTTP status",
        state.stats.requests.clone(),
    );
    registry.register(
        "request_duration_seconds",
        "Time to answer a metadata request, by route",
        state.stats.duration.clone(),
    );
    registry.register(
        "rejected_connections",
        "Connections answered 503 and closed because --max-connections were open",
        state.stats.rejected_connections.clone(),
    );
    registry.register(
        "refusals",
        "Requests refused, by reason (mismatch: the kernel attributes the connection to another \
         pod than the one that owns its address; unattested: the connection did not come \
         through the metadata redirect on this node; …)",
        state.stats.refusals.clone(),
    );
    registry.register(
        "connections",
        "Accepted metadata connections, by what the kernel attested (pod, no_pod_cgroup, \
         unattested, off)",
        state.stats.callers.clone(),
    );
    registry.register(
        "sts_call_duration_seconds",
        "Time of AssumeRole calls, by result",
        state.cache.stats.sts_duration.0.clone(),
    );
    registry.register(
        "pod_events",
        "Kubernetes Events about pods, by reason and outcome (written, suppressed by the rate \
         limit, dropped when the queue was full, failed at the API server)",
        sources.events.counters().0.clone(),
    );
    registry.register(
        "build",
        "The agent's version and the git commit it was built from",
        Info::new([("version", VERSION), ("git_commit", GIT_COMMIT)]),
    );
    registry.register_collector(Box::new(Live(sources)));
    registry
}

/// Encodes `registry` in the Prometheus text format (0.0.4) or, when the scraper asks for it,
/// OpenMetrics. Returns the content type and the body.
pub fn encode(registry: &Registry, openmetrics: bool) -> (&'static str, String) {
    let mut body = String::new();
    if openmetrics {
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    } else {
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        (
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body,
        )
    }
}

/// Values read on each scrape.
struct Live(Arc<Sources>);

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Live")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn labeled<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: &[(L, u64)],
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(labels)?;
        match metric_type {
            MetricType::Counter => ConstCounter::new(*value).encode(sample)?,
            _ => ConstGauge::new(*value as i64).encode(sample)?,
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BpfLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabels {
    guard: &'static str,
    state: &'static str,
}

/// The `state` label of `kube2iam_packet_guard_interfaces` for one interface.
pub fn guard_state(placement: &Placement) -> &'static str {
    match placement {
        Placement::First => "first",
        Placement::NotFirst { .. } => "not_first",
        Placement::Missing => "unguarded",
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let sources = &self.0;
        let cache = &sources.state.cache;
        let stats = &cache.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let sts: Vec<_> = StsResult::ALL
            .iter()
            .zip([
                &stats.sts_success,
                &stats.sts_throttled,
                &stats.sts_denied,
                &stats.sts_unavailable,
            ])
            .map(|(result, value)| {
                let result = result.as_str();
                (ResultLabels { result }, load(value))
            })
            .collect();
        labeled(
            &mut encoder,
            "sts_calls",
            "AssumeRole calls, by result",
            MetricType::Counter,
            &sts,
        )?;
        for (name, help, value) in [
            (
                "credential_cache_hits",
                "Credential requests answered from the cache",
                &stats.hits,
            ),
            (
                "credential_cache_misses",
                "Credential requests that had to wait for STS",
                &stats.misses,
            ),
            (
                "credential_cache_refreshes",
                "Background refreshes of cached credentials before they expire",
                &stats.refreshes,
            ),
            (
                "credential_cache_prefetches",
                "Credentials fetched when a pod appeared, before it asked",
                &stats.prefetches,
            ),
            (
                "credential_stale_served",
                "Cached, still valid credentials served because STS failed",
                &stats.stale_served,
            ),
        ] {
            counter(&mut encoder, name, help, load(value))?;
        }
        gauge(
            &mut encoder,
            "credential_cache_entries",
            "Role sessions in the credential cache",
            cache.len() as i64,
        )?;

        let registry = &sources.state.registry;
        match registry.entries() {
            Ok(entries) => gauge(
                &mut encoder,
                "identity_map_entries",
                "Pod addresses in the pinned identity map",
                entries.len() as i64,
            )?,
            Err(e) => tracing::debug!("metrics: identity map: {e}"),
        }
        gauge(
            &mut encoder,
            "identity_map_capacity",
            "Capacity of the pinned identity map (--identity-capacity when it was created)",
            i64::from(registry.capacity()),
        )?;

        match (sources.bpf_counters)() {
            Ok(counters) => {
                let samples: Vec<_> = counters
                    .into_iter()
                    .map(|(c, v)| (BpfLabels { event: c.name() }, v))
                    .collect();
                labeled(
                    &mut encoder,
                    "bpf_events",
                    "What the kernel programs did with connects and getpeername calls in the \
                     intercepted cgroup (the pinned per-CPU counters, summed)",
                    MetricType::Counter,
                    &samples,
                )?;
            }
            Err(e) => tracing::debug!("metrics: BPF counters: {e}"),
        }

        match (sources.guard_status)() {
            Some(Ok(interfaces)) => {
                let samples: Vec<_> = [Kind::Pod, Kind::Node]
                    .into_iter()
                    .flat_map(|kind| ["first", "not_first", "unguarded"].map(|state| (kind, state)))
                    .map(|(kind, state)| {
                        let n = interfaces
                            .iter()
                            .filter(|i| i.kind == kind && guard_state(&i.placement) == state)
                            .count();
                        let guard = kind.as_str();
                        (GuardLabels { guard, state }, n as u64)
                    })
                    .collect();
                labeled(
                    &mut encoder,
                    "packet_guard_interfaces",
                    "Interfaces the packet guards cover, by guard (pod: matching \
                     --host-interface; node: every other interface but lo, --node-guard) and \
                     where it stands: first (it sees every packet), not_first (another program \
                     runs before it and may pass packets past it), unguarded (not attached)",
                    MetricType::Gauge,
                    &samples,
                )?;
            }
            Some(Err(e)) => tracing::debug!("metrics: packet guard: {e}"),
            None => {}
        }

        let watch = &sources.watch_stats;
        let mut restarts = vec![(
            ResourceLabels { resource: "pods" },
            load(&watch.pod_restarts),
        )];
        let mut synced = vec![(
            ResourceLabels { resource: "pods" },
            u64::from(registry.synced()),
        )];
        if sources.state.config.namespace_restrictions {
            restarts.push((
                ResourceLabels {
                    resource: "namespaces",
                },
                load(&watch.namespace_restarts),
            ));
            synced.push((
                ResourceLabels {
                    resource: "namespaces",
                },
                u64::from(sources.state.namespaces.synced()),
            ));
        }
        if sources.state.config.service_account_roles {
            let accounts = &sources.state.service_accounts;
            restarts.push((
                ResourceLabels {
                    resource: "serviceaccounts",
                },
                load(&accounts.restarts),
            ));
            synced.push((
                ResourceLabels {
                    resource: "serviceaccounts",
                },
                u64::from(accounts.synced()),
            ));
        }
        labeled(
            &mut encoder,
            "watch_restarts",
            "Kubernetes watch failures that made the agent relist, by resource",
            MetricType::Counter,
            &restarts,
        )?;
        labeled(
            &mut encoder,
            "watch_synced",
            "1 once the first full list of the resource is applied",
            MetricType::Gauge,
            &synced,
        )?;
        gauge(
            &mut encoder,
            "upstream_reachable",
            "1 when the last probe of the node's metadata service succeeded",
            i64::from(sources.readiness.upstream.load(Ordering::Acquire)),
        )?;
        gauge(
            &mut encoder,
            "ready",
            "1 when /readyz answers 200",
            i64::from(sources.not_ready().is_none()),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_list_each_value_once() {
        let routes: std::collections::HashSet<_> =
            RouteLabel::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(routes.len(), RouteLabel::ALL.len());
        let results: std::collections::HashSet<_> =
            StsResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(results.len(), StsResult::ALL.len());
    }

    #[test]
    fn answers_count_under_their_own_route_and_status() {
        let metrics = RequestMetrics::default();
        for (i, route) in RouteLabel::ALL.iter().enumerate() {
            assert_eq!(*route as usize, i, "ALL is in declaration order");
            for _ in 0..=i {
                metrics.observe(*route, 200, Duration::from_micros(30));
            }
        }
        metrics.observe(RouteLabel::Credentials, 404, Duration::from_micros(30));
        for (i, route) in RouteLabel::ALL.iter().enumerate() {
            assert_eq!(metrics.count(*route, 200), i as u64 + 1, "{route:?}");
        }
        assert_eq!(metrics.count(RouteLabel::Credentials, 404), 1);
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("requests", "", metrics.requests.clone());
        registry.register("duration", "", metrics.duration.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "duration_count{route=\"proxy\"} 12",
            "requests_total{route=\"proxy\",status=\"200\"} 12",
            "requests_total{route=\"credentials\",status=\"404\"} 1",
            "duration_count{route=\"credentials\"} 10",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
