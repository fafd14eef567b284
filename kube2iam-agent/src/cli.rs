//! Command line and environment. Flag names and defaults follow kube2iam where the meaning is
//! the same, so migrating is a values-file change; every flag can also come from the
//! environment.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    attest::Mode as AttestationMode,
    bpf::{CookieSource, Settings, guard::InterfacePatterns},
    decision,
    imds::{ServerConfig, TokenMode, path::PathRules},
    policy::{BaseArn, PatternFormat},
    session_tags::SessionTagging,
};

/// kube2iam's default `--host-interface`, the interface its iptables rule matched.
pub const KUBE2IAM_HOST_INTERFACE: &str = "docker0";

/// STS's shortest session.
pub const STS_MIN_SESSION: Duration = Duration::from_secs(15 * 60);
/// The longest session of a role assumed with role credentials (role chaining), which the node's
/// instance-profile credentials are.
pub const ROLE_CHAINING_MAX_SESSION: Duration = Duration::from_secs(3600);
/// The least time cached credentials stay fresh between refreshes, and the least a pod gets.
pub const MIN_FRESH: Duration = Duration::from_secs(5 * 60);
/// The shortest error cache (the first step of the per-role backoff).
pub const MIN_ERROR_TTL: Duration = Duration::from_secs(1);
/// SIGTERM: in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head the metadata server reads.
const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "kube2iam-agent",
    version,
    about = "Per-pod AWS IAM credentials on Kubernetes nodes, intercepted in the kernel",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detach the programs and remove every pinned object.
    Uninstall(UninstallArgs),
    /// Print the pinned state: hooks, config, the pod identity map and the counters (works
    /// while the agent runs and after it has stopped).
    Inspect(InspectArgs),
    /// Check whether the agent can run here: kernel features, privileges, cgroup2, bpffs,
    /// pinned state and other programs on the target cgroup. Exits 1 when it cannot.
    Doctor(DoctorArgs),
    /// Internal: the child the netns-cookie probe runs in.
    #[command(name = "internal-netns-probe", hide = true)]
    InternalNetnsProbe,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace; logrus's warning, fatal and panic as in
    /// kube2iam) or a tracing filter directive. At debug the kernel programs' debug events are
    /// compiled in too; otherwise the verifier removes them.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log at debug whatever --log-level says (kube2iam's --verbose).
    #[arg(long, env = "VERBOSE", global = true)]
    pub verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogArgs {
    /// The tracing filter: `debug` with --verbose, else --log-level with logrus's level names
    /// mapped.
    pub fn filter(&self) -> String {
        if self.verbose {
            return "debug".to_owned();
        }
        crate::kube2iam::log_filter(&self.log_level)
    }

    /// Whether the log level reaches debug, which turns the kernel programs' events on.
    pub fn debug_enabled(&self) -> bool {
        let level = self.filter().to_ascii_lowercase();
        level.split(',').any(|d| {
            let l = d.rsplit('=').next().unwrap_or("");
            l == "debug" || l == "trace"
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node's IP address, where the agent listens and where pods' metadata connects are sent
    /// (the DaemonSet passes status.hostIP).
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<Ipv4Addr>,
    /// The node's IPv6 address for pods' IPv6 metadata connects ([fd00:ec2::254]); without it
    /// those connects are refused.
    #[arg(long, env = "HOST_IPV6")]
    pub host_ipv6: Option<Ipv6Addr>,
    /// The node's addresses as the downward API gives them (status.hostIPs: comma-separated,
    /// the primary first; the DaemonSet passes them). Without --host-ipv6, the IPv6 one is used
    /// for pods' IPv6 metadata connects.
    #[arg(long, env = "HOST_IPS", value_parser = parse_host_ips)]
    pub host_ips: Option<HostIps>,
    /// The agent's port.
    #[arg(long, env = "APP_PORT", default_value_t = 8181)]
    pub app_port: u16,
    /// The cgroup whose processes are intercepted. Default: the cgroup2 root (every pod).
    #[arg(long, env = "CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// Where links and maps are pinned (on a bpffs); they outlive the agent.
    #[arg(long, env = "BPF_PIN_PATH", default_value = "/sys/fs/bpf/kube2iam")]
    pub bpf_pin_path: PathBuf,
    /// The metadata service address, `IP` or `IP:PORT`.
    #[arg(long, env = "METADATA_ADDR", default_value = "169.254.169.254")]
    pub metadata_addr: String,
    /// The IPv6 metadata service address (same port as --metadata-addr).
    #[arg(long, env = "METADATA_ADDR_IPV6", default_value = "fd00:ec2::254")]
    pub metadata_addr_ipv6: Ipv6Addr,
    /// How to learn the host network namespace cookie (testing aid).
    #[arg(long, env = "HOST_NETNS_COOKIE_SOURCE", value_enum, default_value_t = CookieSource::Auto, hide = true)]
    pub host_netns_cookie_source: CookieSource,
    /// Capacity of the pinned pod-address → identity map (EKS allows up to 737 pods per node).
    #[arg(long, env = "IDENTITY_CAPACITY", default_value_t = kube2iam_common::DEFAULT_IDENTITY_CAPACITY)]
    pub identity_capacity: u32,
    /// Attach and configure the programs, serve nothing (for checking the kernel side alone).
    #[arg(long, env = "INTERCEPTION_ONLY")]
    pub interception_only: bool,
    #[command(flatten)]
    pub guards: GuardArgs,
    /// Attach the guard as cls_bpf filters even where TCX exists (testing aid).
    #[arg(long, env = "PACKET_GUARD_NETLINK", hide = true)]
    pub packet_guard_netlink: bool,
    /// How often the packet guard is checked on every matching interface (present, and first
    /// in line) and repaired; interface and tc changes trigger a check at once as well.
    #[arg(long, env = "GUARD_RESYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub guard_resync_interval: Duration,

    /// This node's name; only its pods are watched (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// The API server URL (default: in-cluster config or ~/.kube/config).
    #[arg(long, env = "API_SERVER")]
    pub api_server: Option<String>,
    /// A kubeconfig file to use instead of the in-cluster config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The pod annotation naming the role.
    #[arg(long, env = "IAM_ROLE_KEY", default_value = "iam.amazonaws.com/role")]
    pub iam_role_key: String,
    /// The pod annotation carrying the STS external ID.
    #[arg(
        long,
        env = "IAM_EXTERNAL_ID_KEY",
        alias = "iam-external-id",
        default_value = "iam.amazonaws.com/external-id"
    )]
    pub iam_external_id_key: String,
    /// Base role ARN that role names are completed with, e.g. arn:aws:iam::123456789012:role/.
    #[arg(long, env = "BASE_ROLE_ARN")]
    pub base_role_arn: Option<String>,
    /// Read the base role ARN from the node's instance profile (upstream IMDS iam/info). Not
    /// with --base-role-arn (kube2iam refused the two together too).
    #[arg(long, env = "AUTO_DISCOVER_BASE_ARN", conflicts_with = "base_role_arn")]
    pub auto_discover_base_arn: bool,
    /// Role for pods without the role annotation (none: such pods get a 404).
    #[arg(long, env = "DEFAULT_ROLE")]
    pub default_role: Option<String>,
    /// Only allow roles a namespace lists in its allowed-roles annotation.
    #[arg(long, env = "NAMESPACE_RESTRICTIONS")]
    pub namespace_restrictions: bool,
    /// The namespace annotation listing allowed roles (a JSON array of patterns).
    #[arg(
        long,
        env = "NAMESPACE_KEY",
        default_value = "iam.amazonaws.com/allowed-roles"
    )]
    pub namespace_key: String,
    /// How allowed-role patterns are written. Regexps are anchored (kube2iam's were not).
    #[arg(long, env = "NAMESPACE_RESTRICTION_FORMAT", value_enum, ignore_case = true, default_value_t = PatternFormat::Glob)]
    pub namespace_restriction_format: PatternFormat,
    /// The AWS region for STS (default: AWS_REGION, else the node's placement/region).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// STS endpoint URL override (default: the regional endpoint).
    #[arg(long, env = "STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// kube2iam's meaning: credentials are served from the cache for this long, then refreshed,
    /// and STS is asked for sessions of twice this, so a pod always gets credentials with about
    /// this much left. 7m30s to 30m: STS's shortest session is 15 minutes, and role chaining (the
    /// node's role assuming the pod's) caps sessions at 1 hour. The default gives 1-hour sessions.
    #[arg(long, env = "IAM_ROLE_SESSION_TTL", default_value = "30m", value_parser = parse_duration)]
    pub iam_role_session_ttl: Duration,
    /// Refresh cached credentials when less than this is left (default: --iam-role-session-ttl,
    /// as kube2iam). At least 5m (SDKs refetch credentials closer to expiry at once), and at
    /// most the session (twice the TTL) less 5m, or credentials would never count as fresh.
    #[arg(long, env = "REFRESH_BEFORE", value_parser = parse_duration)]
    pub refresh_before: Option<Duration>,
    /// Testing aid: accept a --refresh-before that leaves no fresh window, so every request
    /// also refreshes in the background (an STS storm anywhere else).
    #[arg(long, env = "UNCHECKED_REFRESH_BEFORE", hide = true)]
    pub unchecked_refresh_before: bool,
    /// The longest an AssumeRole error is cached for a role before STS is asked again (kube2iam's
    /// --iam-role-error-ttl): the per-role backoff doubles from 1s up to this. Below 1s
    /// (kube2iam's default 0, no error cache) keeps the default: every request would otherwise
    /// call STS while it refuses.
    #[arg(long, env = "IAM_ROLE_ERROR_TTL", default_value = "60s", value_parser = parse_duration)]
    pub iam_role_error_ttl: Duration,
    /// Concurrent credential prefetches when pods with a role appear (0 turns prefetch off).
    #[arg(long, env = "PREFETCH_CONCURRENCY", default_value_t = 8)]
    pub prefetch_concurrency: usize,
    /// One STS session per pod, named namespace.pod, for CloudTrail attribution.
    #[arg(long, env = "SESSION_PER_POD")]
    pub session_per_pod: bool,
    /// Name STS sessions as kube2iam did, `<fnv32a hash of the pod IP, hex>-<role name>` (at
    /// most 64 characters), one session per pod, for trust policies and CloudTrail rules written
    /// for those names. Credentials are then not prefetched (the first request fetches them).
    #[arg(
        long,
        env = "KUBE2IAM_SESSION_NAMES",
        conflicts_with = "session_per_pod"
    )]
    pub kube2iam_session_names: bool,
    /// Whether token-less (IMDSv1) requests are served.
    #[arg(long, env = "IMDS_TOKENS", value_enum, default_value_t = TokenMode::Optional)]
    pub imds_tokens: TokenMode,
    /// Regex of a path to forward beyond the default allow list of metadata safe for any pod
    /// (repeatable), e.g. '^/latest/meta-data/tags/instance/' or '^/latest/user-data$'. The
    /// node's credentials are never forwarded.
    #[arg(long = "allow-path", env = "ALLOW_PATHS", value_delimiter = ',')]
    pub allow_paths: Vec<String>,
    /// Regex of a path to refuse even when it would be forwarded (repeatable).
    #[arg(long = "block-path", env = "BLOCK_PATHS", value_delimiter = ',')]
    pub block_paths: Vec<String>,
    /// How long a request from an unknown address waits for the pod watch (kube2iam's
    /// --backoff-max-elapsed-time).
    #[arg(long, env = "POD_WAIT", alias = "backoff-max-elapsed-time", default_value = "1s", value_parser = parse_duration)]
    pub pod_wait: Duration,
    /// Port of /healthz, /readyz, /metrics (and /debug/store with --debug).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9181)]
    pub metrics_port: u16,
    /// Serve /debug/store on the metrics port.
    #[arg(long, env = "DEBUG")]
    pub debug: bool,
    /// Kubernetes Events on refused pods: at most one write per pod and reason in this
    /// interval, repeats counted into the Event's count (0 turns Events off).
    #[arg(long, env = "EVENT_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub event_interval: Duration,
    /// Open connections the metadata server accepts; more are answered 503 and closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Open connections one source address (a pod, or anything else that reaches the port)
    /// may hold; more are answered 503 and closed, so one caller cannot take every slot.
    #[arg(long, env = "MAX_CONNECTIONS_PER_CALLER", default_value_t = 1024)]
    pub max_connections_per_caller: usize,
    /// Time a client has to send a request's headers, counted from when the agent starts to
    /// serve its connection (once it knows who made it) or its previous answer was ready (so a
    /// client that does not read its answers is cut too, once they no longer fit in the socket
    /// buffers); then the connection is closed unanswered. More than 0. Connections that did not
    /// come through the redirect get 1s.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub header_read_timeout: Duration,
    /// Whether the kernel's record of which pod's cgroup made a connection must agree with the
    /// pod its source address belongs to. `prefer`: wherever the kernel can name the pod (pods
    /// in cgroup v2); where it cannot, the address alone decides. `require`: never the address
    /// alone. `off`: the address alone, as kube2iam.
    #[arg(long, env = "IDENTITY_ATTESTATION", value_enum, default_value_t = AttestationMode::Prefer)]
    pub identity_attestation: AttestationMode,
    /// Serve hostNetwork pods that carry a role annotation their own role, identified by their
    /// cgroup. Other host processes (kubelet, the CNI daemon, unannotated hostNetwork pods) keep
    /// the node's metadata service.
    #[arg(long, env = "HOST_NETWORK_PODS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub host_network_pods: bool,
    /// The agent's own pod UID (the DaemonSet passes metadata.uid): its own pod is never
    /// redirected, whatever its annotations.
    #[arg(long, env = "POD_UID", hide = true)]
    pub pod_uid: Option<String>,
    #[command(flatten)]
    pub session_tags: crate::session_tags::SessionTagArgs,
    #[command(flatten)]
    pub service_accounts: crate::service_accounts::ServiceAccountArgs,
}

/// Parses a duration in Go's syntax as kube2iam took them (`1500ms`, `30s`, `15m0s`, `1h30m`);
/// a bare number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    crate::kube2iam::parse_duration(value)
}

/// [`parse_duration`], refusing 0.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        Duration::ZERO => Err(format!("{value:?}: must be more than 0")),
        duration => Ok(duration),
    }
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The pin directory to remove.
    #[arg(long, env = "BPF_PIN_PATH", default_value = "/sys/fs/bpf/kube2iam")]
    pub bpf_pin_path: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The pin directory to read.
    #[arg(long, env = "BPF_PIN_PATH", default_value = "/sys/fs/bpf/kube2iam")]
    pub bpf_pin_path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InspectFormat::Table)]
    pub output: InspectFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InspectFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The cgroup the agent would attach to. Default: the cgroup2 root.
    #[arg(long, env = "CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// The agent's pin directory.
    #[arg(long, env = "BPF_PIN_PATH", default_value = "/sys/fs/bpf/kube2iam")]
    pub bpf_pin_path: PathBuf,
    /// The guards as the agent runs them (the same flags): the doctor checks that each
    /// interface the agent guards has the guard, first in line.
    #[command(flatten)]
    pub guards: GuardArgs,
}

/// The guard flags, the agent's and the doctor's alike.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Drop packets from pod interfaces addressed to the metadata service (raw IP, AF_PACKET,
    /// UDP): what the connect rewrite cannot see. `--packet-guard false` turns it off.
    #[arg(long, env = "PACKET_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub packet_guard: bool,
    /// Host-side pod interfaces the packet guard covers, kube2iam's syntax: `name`, `prefix+`,
    /// `!excluded` (comma-separated or repeated). Defaults cover the VPC CNI (eni, and vlan for
    /// pods with branch ENIs), Calico (cali), Cilium (lxc) and bridge CNIs (veth).
    #[arg(
        long = "host-interface",
        env = "HOST_INTERFACE",
        value_delimiter = ',',
        default_value = DEFAULT_HOST_INTERFACES
    )]
    pub host_interfaces: Vec<String>,
    /// Drop packets addressed to the metadata service that enter the node by any other
    /// interface but loopback: the uplink, and tunnel and overlay devices (VXLAN, Geneve, IPIP,
    /// GRE, WireGuard), where a packet a pod wrapped and sent to the node's own address comes out
    /// after decapsulation and would be forwarded to the metadata service. An interface that a
    /// `--host-interface` `!pattern` names gets neither guard. `--node-guard false` turns it off.
    #[arg(long, env = "NODE_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_guard: bool,
    /// Drop packets that sockets in the intercepted cgroup send to the metadata service unless
    /// the socket connected there itself, which only host-namespace sockets may (a cgroup_skb
    /// egress program beside the connect hooks). Catches what the packet guard cannot see by
    /// interface: a DNAT rule inside a pod, raw sockets on any interface. `--egress-guard false`
    /// turns it off.
    #[arg(long, env = "EGRESS_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub egress_guard: bool,
}

/// `--host-interface` unless told otherwise: the VPC CNI's pod interfaces (`eni`, and `vlan`
/// for pods with branch ENIs in the strict security-group mode), Calico's (`cali`), Cilium's
/// (`lxc`) and bridge CNIs' (`veth`).
pub const DEFAULT_HOST_INTERFACES: &str = "eni+,vlan+,cali+,lxc+,veth+";

/// A bad flag value, named with the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--host-ip (or HOST_IP) is required: the node IP the agent listens on")]
    MissingHostIp,
    #[error("{0}")]
    HostInterface(String),
    #[error(
        "--metadata-addr {0:?}: expected an IPv4 address with an optional port, like 169.254.169.254 or 169.254.169.254:80"
    )]
    MetadataAddr(String),
    #[error("--iam-role-session-ttl {ttl}: {why}")]
    SessionTtl { ttl: String, why: String },
    #[error("--refresh-before {value} with --iam-role-session-ttl {ttl}: {why}")]
    RefreshBefore {
        value: String,
        ttl: String,
        why: String,
    },
    #[error(
        "--metrics-port {0} is also the --app-port: /metrics, /healthz and /readyz need a port of \
         their own (the metadata port is for pods, and every pod could read metrics there); set \
         --metrics-port to another port, e.g. 9181 (chart: prometheus.metricsPort)"
    )]
    SharedPort(u16),
}

/// A duration as Go prints it (`15m0s`, `1h0m0s`, `7m30s`, `500ms`), as kube2iam's users write
/// them.
pub fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 {
        return format!("{millis}ms");
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let s = if millis == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{millis:03}s")
    };
    match (h, m) {
        (0, 0) => s,
        (0, m) => format!("{m}m{s}"),
        (h, m) => format!("{h}h{m}m{s}"),
    }
}

/// How the credential cache talks to STS, from the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StsTiming {
    /// Requested session length: twice `--iam-role-session-ttl`, as kube2iam asked.
    pub session: Duration,
    /// Refresh when less than this is left.
    pub refresh_before: Duration,
    /// The longest an AssumeRole error is cached (the backoff's ceiling).
    pub error_ttl: Duration,
}

/// The node's addresses, as the downward API's status.hostIPs gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIps(pub Vec<IpAddr>);

impl HostIps {
    /// The node's IPv6 address, if it has one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.0.iter().find_map(|ip| match ip {
            IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => Some(*ip),
            _ => None,
        })
    }
}

/// Parses a comma-separated address list. Empty is an empty list: the kubelet fills
/// status.hostIPs with "" when its PodHostIPs feature gate is off.
pub fn parse_host_ips(value: &str) -> Result<HostIps, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .map(|ip| {
            ip.parse().map_err(|_| {
                format!("{ip:?} is not an IP address (expected a list like 10.0.0.1,2600:1f14::1)")
            })
        })
        .collect::<Result<_, _>>()
        .map(HostIps)
}

/// Parses `IP` or `IP:PORT` (IPv4 only; the IPv6 address has its own flag).
pub fn parse_metadata_addr(value: &str) -> Result<(Ipv4Addr, u16), Error> {
    let bad = || Error::MetadataAddr(value.to_owned());
    let (ip, port) = match value.rsplit_once(':') {
        Some((ip, port)) => (ip, port.parse::<u16>().map_err(|_| bad())?),
        None => (value, 80),
    };
    match ip.parse::<IpAddr>().map_err(|_| bad())? {
        IpAddr::V4(ip) if port != 0 => Ok((ip, port)),
        _ => Err(bad()),
    }
}

impl GuardArgs {
    /// Whether `--host-interface` is exactly kube2iam's default, `docker0`.
    fn host_interface_is_kube2iam_default(&self) -> bool {
        matches!(self.host_interfaces.as_slice(), [only] if only.trim() == KUBE2IAM_HOST_INTERFACE)
    }

    /// The packet guard's interface patterns. kube2iam's default `docker0` (its chart renders
    /// it into every kube2iam flag set) named the interface of kube2iam's iptables rule, which
    /// on most nodes is not where pods' packets enter (on EKS: `eni+`); it is read as "the
    /// default", and docker0 is guarded besides.
    pub fn guard_patterns(&self) -> Vec<String> {
        if self.host_interface_is_kube2iam_default() {
            return DEFAULT_HOST_INTERFACES
                .split(',')
                .chain([KUBE2IAM_HOST_INTERFACE])
                .map(str::to_owned)
                .collect();
        }
        self.host_interfaces.clone()
    }

    /// What to say at start about `--host-interface`.
    pub fn host_interface_warning(&self) -> Option<String> {
        self.host_interface_is_kube2iam_default().then(|| {
            format!(
                "--host-interface={KUBE2IAM_HOST_INTERFACE} is kube2iam's default (the interface \
                 of its iptables rule), which is not where pods' packets enter on most nodes (on \
                 EKS they enter by eni+); the packet guard covers {DEFAULT_HOST_INTERFACES} and \
                 {KUBE2IAM_HOST_INTERFACE}. Set --host-interface (chart: host.interface) to your \
                 CNI's pod interfaces to choose, or leave it out"
            )
        })
    }

    /// The packet guard's interfaces, or `None` with `--packet-guard false`.
    pub fn packet_guard_patterns(&self) -> Result<Option<InterfacePatterns>, String> {
        if !self.packet_guard {
            return Ok(None);
        }
        InterfacePatterns::parse(&self.guard_patterns()).map(Some)
    }
}

impl RunArgs {
    /// The STS timing, or why the flags would make STS fail or storm; warnings to log.
    pub fn sts_timing(&self) -> Result<(StsTiming, Vec<String>), Error> {
        let ttl = self.iam_role_session_ttl;
        let ttl_error = |why: String| Error::SessionTtl {
            ttl: go_duration(ttl),
            why,
        };
        let session = ttl.saturating_mul(2);
        if session < STS_MIN_SESSION {
            return Err(ttl_error(format!(
                "STS is asked for sessions of twice the TTL (as kube2iam did), and its shortest \
                 session is {}; use {} or more",
                go_duration(STS_MIN_SESSION),
                go_duration(STS_MIN_SESSION / 2)
            )));
        }
        if session > ROLE_CHAINING_MAX_SESSION {
            return Err(ttl_error(format!(
                "STS is asked for sessions of twice the TTL (as kube2iam did), and a role assumed \
                 with the node's role credentials (role chaining) gets at most {}, so every \
                 AssumeRole would fail; use {} or less",
                go_duration(ROLE_CHAINING_MAX_SESSION),
                go_duration(ROLE_CHAINING_MAX_SESSION / 2)
            )));
        }
        let refresh_before = self.refresh_before.unwrap_or(ttl);
        let refresh_error = |why: String| Error::RefreshBefore {
            value: go_duration(refresh_before),
            ttl: go_duration(ttl),
            why,
        };
        if refresh_before < MIN_FRESH {
            return Err(refresh_error(format!(
                "pods would get credentials with less than {} left, which SDKs fetch again at \
                 once; use {} or more",
                go_duration(MIN_FRESH),
                go_duration(MIN_FRESH)
            )));
        }
        let fresh_for = session.saturating_sub(refresh_before);
        if fresh_for < MIN_FRESH && !self.unchecked_refresh_before {
            return Err(refresh_error(format!(
                "sessions last {} (twice the TTL), so credentials would stay fresh for only {} \
                 and requests would keep starting AssumeRole calls (an STS storm); use at most \
                 {}, or leave --refresh-before out (it defaults to the TTL)",
                go_duration(session),
                go_duration(fresh_for),
                go_duration(session.saturating_sub(MIN_FRESH))
            )));
        }
        let mut warnings = Vec::new();
        let mut error_ttl = self.iam_role_error_ttl;
        if error_ttl < MIN_ERROR_TTL {
            warnings.push(format!(
                "--iam-role-error-ttl {}: without an error cache every request would call STS \
                 again while it refuses; AssumeRole errors are cached for up to 1m0s instead",
                go_duration(error_ttl)
            ));
            error_ttl = Duration::from_secs(60);
        }
        Ok((
            StsTiming {
                session,
                refresh_before,
                error_ttl,
            },
            warnings,
        ))
    }

    /// The metadata port and the admin port must differ.
    pub fn check_ports(&self) -> Result<(), Error> {
        if self.metrics_port == self.app_port {
            return Err(Error::SharedPort(self.app_port));
        }
        Ok(())
    }

    pub fn settings(&self, kernel_debug_log: bool) -> Result<Settings, Error> {
        let agent_ip4 = self.host_ip.ok_or(Error::MissingHostIp)?;
        let (metadata_ip4, metadata_port) = parse_metadata_addr(&self.metadata_addr)?;
        Ok(Settings {
            cgroup_path: self.cgroup_path.clone(),
            pin_dir: self.bpf_pin_path.clone(),
            agent_ip4,
            agent_ip6: self
                .host_ipv6
                .or_else(|| self.host_ips.as_ref().and_then(HostIps::ipv6)),
            agent_port: self.app_port,
            metadata_ip4,
            metadata_ip6: self.metadata_addr_ipv6,
            metadata_port,
            kernel_debug_log,
            cookie_source: self.host_netns_cookie_source,
            identity_capacity: self.identity_capacity,
            packet_guard: self
                .guards
                .packet_guard_patterns()
                .map_err(Error::HostInterface)?,
            node_guard: self.guards.node_guard,
            guard_netlink: self.packet_guard_netlink,
            host_network_pods: self.host_network_pods,
            egress_guard: self.guards.egress_guard,
            attestation_records: self.identity_attestation != AttestationMode::Off,
        })
    }

    /// What the metadata server runs by: the flags, with what `run` derived from them and
    /// from the node (the base ARN may come from IMDS, the path rules and session tagging are
    /// compiled and checked first so their errors come before any network call).
    pub fn server_config(
        &self,
        settings: &Settings,
        node: String,
        base_arn: Option<BaseArn>,
        sessions: SessionTagging,
        rules: PathRules,
    ) -> ServerConfig {
        ServerConfig {
            decision: decision::Rules {
                node,
                attestation: self.identity_attestation,
                role_key: self.iam_role_key.clone(),
                namespace_key: self.namespace_key.clone(),
                base_arn,
                default_role: self.default_role.clone(),
                service_account_key: self.service_accounts.service_account_role_key.clone(),
                needs_service_account: sessions.needs_service_account(),
                roles: Default::default(),
            },
            pod_wait: self.pod_wait,
            tokens: self.imds_tokens,
            namespace_restrictions: self.namespace_restrictions,
            session_per_pod: self.session_per_pod,
            kube2iam_session_names: self.kube2iam_session_names,
            host_ip: IpAddr::V4(settings.agent_ip4),
            sessions,
            service_account_roles: self.service_accounts.service_account_roles,
            rules,
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            max_connections_per_caller: self.max_connections_per_caller,
            max_header_bytes: MAX_HEADER_BYTES,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_positive_duration("5s"), Ok(Duration::from_secs(5)));
        for zero in ["0", "0s", "0ms"] {
            let err = parse_positive_duration(zero).unwrap_err();
            assert!(err.contains("more than 0"), "{zero}: {err}");
        }
    }

    #[test]
    fn metadata_addr_forms() {
        assert_eq!(
            parse_metadata_addr("169.254.169.254").unwrap(),
            (Ipv4Addr::new(169, 254, 169, 254), 80)
        );
        assert_eq!(
            parse_metadata_addr("127.0.0.1:8080").unwrap(),
            (Ipv4Addr::LOCALHOST, 8080)
        );
        for bad in [
            "",
            "metadata",
            "1.2.3.4:",
            "1.2.3.4:0",
            "1.2.3.4:99999",
            "::1",
        ] {
            let err = parse_metadata_addr(bad).unwrap_err().to_string();
            assert!(err.contains("--metadata-addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_ips_give_the_ipv6_address_unless_host_ipv6_is_set() {
        let settings = |args: &[&str]| {
            let mut argv = vec!["kube2iam-agent", "--host-ip", "10.0.0.1"];
            argv.extend(args);
            Cli::try_parse_from(argv)
                .unwrap()
                .run
                .settings(false)
                .unwrap()
                .agent_ip6
        };
        let v6: Ipv6Addr = "2600:1f14::1".parse().unwrap();
        assert_eq!(settings(&["--host-ips", "10.0.0.1,2600:1f14::1"]), Some(v6));
        assert_eq!(settings(&["--host-ips", "2600:1f14::1,10.0.0.1"]), Some(v6));
        assert_eq!(settings(&["--host-ips", "10.0.0.1"]), None);
        assert_eq!(settings(&["--host-ips", "::ffff:10.0.0.1"]), None);
        assert_eq!(settings(&["--host-ips", ""]), None);
        assert_eq!(
            settings(&[
                "--host-ips",
                "10.0.0.1,2600:1f14::1",
                "--host-ipv6",
                "fd00::1"
            ]),
            Some("fd00::1".parse().unwrap())
        );
        assert!(
            Cli::try_parse_from(["kube2iam-agent", "--host-ips", "10.0.0.1,nonsense"]).is_err()
        );
    }

    #[test]
    fn debug_level_turns_kernel_events_on() {
        let args = |l: &str| LogArgs {
            log_level: l.into(),
            log_format: LogFormat::Text,
            verbose: false,
        };
        assert!(args("debug").debug_enabled());
        assert!(args("DEBUG").debug_enabled());
        assert!(args("info,kube2iam_agent=trace").debug_enabled());
        assert!(!args("info").debug_enabled());
        assert!(!args("warn").debug_enabled());
        assert!(!args("warning").debug_enabled());
        let verbose = LogArgs {
            verbose: true,
            ..args("warning")
        };
        assert!(verbose.debug_enabled());
        assert_eq!(verbose.filter(), "debug");
    }

    #[test]
    fn default_host_interfaces_cover_the_vpc_cnis_branch_eni_pods() {
        let cli = Cli::try_parse_from(["kube2iam-agent", "--host-ip", "10.0.0.1"]).unwrap();
        let patterns = cli.run.settings(false).unwrap().packet_guard.unwrap();
        // VPC CNI: eni<hash> for pods on the node's ENIs; vlan<hash> for pods with branch ENIs
        // (security groups for pods, strict mode), and their vlan.eth.<id> devices.
        for name in [
            "eni1a2b3c4d5e6",
            "vlan1c357e15edb",
            "vlan.eth.2",
            "cali1234abcd",
            "lxc9f8e7d6c",
            "veth12ab",
        ] {
            assert!(patterns.matches(name), "{name} must be guarded by default");
        }
        for name in ["eth0", "ens5", "lo", "cilium_host"] {
            assert!(!patterns.matches(name), "{name} is the node's own");
        }
        let doctor = Cli::try_parse_from(["kube2iam-agent", "doctor"]).unwrap();
        let Some(Command::Doctor(args)) = doctor.command else {
            panic!("doctor subcommand")
        };
        assert_eq!(
            args.guards.guard_patterns(),
            cli.run.guards.guard_patterns()
        );
    }

    #[test]
    fn run_flags_and_subcommands() {
        let cli = Cli::try_parse_from(["kube2iam-agent", "--host-ip", "10.0.0.1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.host_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(cli.run.app_port, 8181);
        let cli =
            Cli::try_parse_from(["kube2iam-agent", "uninstall", "--bpf-pin-path", "/x"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Uninstall(ref u)) if u.bpf_pin_path == std::path::Path::new("/x"))
        );
        let settings = Cli::try_parse_from(["kube2iam-agent"])
            .unwrap()
            .run
            .settings(false);
        assert!(matches!(settings, Err(Error::MissingHostIp)));
    }

    fn run_args(flags: &[&str]) -> RunArgs {
        let mut argv = vec!["kube2iam-agent", "--host-ip", "10.0.0.1"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().run
    }

    fn timing(flags: &[&str]) -> Result<StsTiming, String> {
        run_args(flags)
            .sts_timing()
            .map(|(t, _)| t)
            .map_err(|e| e.to_string())
    }

    const MIN: u64 = 60;

    #[test]
    fn session_ttl_has_kube2iams_meaning() {
        // kube2iam's default: cached for 15m, 30-minute sessions.
        assert_eq!(
            timing(&["--iam-role-session-ttl", "15m0s"]),
            Ok(StsTiming {
                session: Duration::from_secs(30 * MIN),
                refresh_before: Duration::from_secs(15 * MIN),
                error_ttl: Duration::from_secs(60),
            })
        );
        // The default: 1-hour sessions, refreshed with 30 minutes left.
        let default = timing(&[]).unwrap();
        assert_eq!(default.session, Duration::from_secs(60 * MIN));
        assert_eq!(default.refresh_before, Duration::from_secs(30 * MIN));
        // The range ends.
        assert_eq!(
            timing(&["--iam-role-session-ttl", "7m30s"])
                .unwrap()
                .session,
            STS_MIN_SESSION
        );
        assert_eq!(
            timing(&["--iam-role-session-ttl", "30m"]).unwrap().session,
            ROLE_CHAINING_MAX_SESSION
        );
        // An explicit refresh margin inside the window.
        let t = timing(&["--iam-role-session-ttl", "30m", "--refresh-before", "15m"]).unwrap();
        assert_eq!(
            (t.session, t.refresh_before),
            (Duration::from_secs(60 * MIN), Duration::from_secs(15 * MIN))
        );
    }

    #[test]
    fn session_ttl_below_sts_minimum_is_refused_naming_the_fix() {
        let err = timing(&["--iam-role-session-ttl", "5m"]).unwrap_err();
        assert!(
            err.starts_with("--iam-role-session-ttl 5m0s:") && err.contains("use 7m30s or more"),
            "{err}"
        );
    }

    #[test]
    fn session_ttl_beyond_role_chaining_is_refused_naming_the_fix() {
        for ttl in ["31m", "1h", "12h"] {
            let err = timing(&["--iam-role-session-ttl", ttl]).unwrap_err();
            assert!(
                err.contains("role chaining") && err.contains("use 30m0s or less"),
                "{ttl}: {err}"
            );
        }
    }

    #[test]
    fn refresh_margin_that_leaves_no_fresh_window_is_refused_as_an_sts_storm() {
        // Too little fresh time between refreshes: requests would keep calling STS.
        for (ttl, refresh) in [("15m", "30m"), ("15m", "26m"), ("30m", "1h")] {
            let err =
                timing(&["--iam-role-session-ttl", ttl, "--refresh-before", refresh]).unwrap_err();
            assert!(
                err.contains("STS storm") && err.contains("use at most"),
                "{ttl}/{refresh}: {err}"
            );
        }
        assert!(
            timing(&["--iam-role-session-ttl", "15m", "--refresh-before", "25m"]).is_ok(),
            "exactly 5 minutes fresh is enough"
        );
        // The testing aid lifts only this check.
        assert!(timing(&["--refresh-before", "1h", "--unchecked-refresh-before"]).is_ok());
        let err = timing(&["--refresh-before", "1m"]).unwrap_err();
        assert!(err.contains("use 5m0s or more"), "{err}");
    }

    #[test]
    fn no_valid_session_ttl_storms_or_chains_past_an_hour() {
        // Every TTL the check accepts, with the default margin, keeps credentials fresh for at
        // least MIN_FRESH and asks for a session STS grants.
        for seconds in (0..=7200).step_by(15) {
            let ttl = format!("{seconds}s");
            if let Ok(t) = timing(&["--iam-role-session-ttl", &ttl]) {
                assert!(t.session >= STS_MIN_SESSION && t.session <= ROLE_CHAINING_MAX_SESSION);
                assert!(t.session - t.refresh_before >= MIN_FRESH, "{ttl}");
                assert!(t.refresh_before >= MIN_FRESH, "{ttl}");
            }
        }
    }

    #[test]
    fn error_ttl_is_the_backoff_ceiling_and_zero_keeps_the_default() {
        assert_eq!(
            timing(&["--iam-role-error-ttl", "5m"]).unwrap().error_ttl,
            Duration::from_secs(5 * MIN)
        );
        let (t, warnings) = run_args(&["--iam-role-error-ttl", "0s"])
            .sts_timing()
            .unwrap();
        assert_eq!(t.error_ttl, Duration::from_secs(60));
        assert!(
            warnings[0].contains("every request would call STS"),
            "{warnings:?}"
        );
    }

    #[test]
    fn metrics_port_equal_to_app_port_is_refused_naming_the_fix() {
        let err = run_args(&["--app-port", "8181", "--metrics-port", "8181"])
            .check_ports()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prometheus.metricsPort") && err.contains("9181"),
            "{err}"
        );
        assert!(run_args(&[]).check_ports().is_ok());
    }

    #[test]
    fn kube2iams_docker0_default_keeps_the_guard_on_the_cni_interfaces() {
        let args = run_args(&["--host-interface=docker0"]);
        let patterns = InterfacePatterns::parse(&args.guards.guard_patterns()).unwrap();
        for name in ["eni1234", "cali1234", "lxc1234", "veth1234", "docker0"] {
            assert!(patterns.matches(name), "{name}");
        }
        assert!(!patterns.matches("eth0"));
        assert!(
            args.guards
                .host_interface_warning()
                .unwrap()
                .contains("eni+")
        );
        // Anything else is taken as written.
        let args = run_args(&["--host-interface=cni0"]);
        assert_eq!(args.guards.guard_patterns(), ["cni0"]);
        assert!(args.guards.host_interface_warning().is_none());
        assert!(run_args(&[]).guards.host_interface_warning().is_none());
        // The doctor checks what the agent guards.
        let doctor =
            Cli::try_parse_from(["kube2iam-agent", "doctor", "--host-interface=docker0"]).unwrap();
        let Some(Command::Doctor(doctor)) = doctor.command else {
            panic!("doctor subcommand")
        };
        assert_eq!(
            doctor.guards.guard_patterns(),
            run_args(&["--host-interface=docker0"])
                .guards
                .guard_patterns()
        );
    }

    #[test]
    fn go_durations_print_as_go_does() {
        assert_eq!(go_duration(Duration::from_secs(900)), "15m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(450)), "7m30s");
        assert_eq!(go_duration(Duration::from_secs(2)), "2s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn flags_parse_with_the_pod_scope_as_the_bare_flags_meaning() {
        use clap::Parser as _;

        use crate::session_tags::TagScope;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["kube2iam-agent"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().run
        };
        let off = parse(&[]);
        assert_eq!(off.session_tags.session_tags, TagScope::Off);
        assert!(!off.session_tags.source_identity);
        assert!(!off.service_accounts.service_account_roles);
        assert_eq!(
            off.service_accounts.service_account_role_key,
            "eks.amazonaws.com/role-arn"
        );
        let bare = parse(&[
            "--session-tags",
            "--cluster-arn",
            "arn:aws:eks:eu-west-1:123456789012:cluster/prod-1",
            "--source-identity",
        ]);
        assert_eq!(bare.session_tags.session_tags, TagScope::Pod);
        assert!(bare.session_tags.source_identity);
        let scoped = parse(&[
            "--session-tags",
            "service-account",
            "--service-account-roles",
        ]);
        assert_eq!(scoped.session_tags.session_tags, TagScope::ServiceAccount);
        assert!(scoped.service_accounts.service_account_roles);
    }
}
