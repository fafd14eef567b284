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
    bpf::{CookieSource, Settings, guard::InterfacePatterns},
    imds::TokenMode,
    policy::PatternFormat,
};

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
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    /// At debug the kernel programs' debug events are compiled in too; otherwise the verifier
    /// removes them.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogArgs {
    /// Whether the log level reaches debug, which turns the kernel programs' events on.
    pub fn debug_enabled(&self) -> bool {
        let level = self.log_level.to_ascii_lowercase();
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
    /// Drop packets from pod interfaces addressed to the metadata service (raw IP, AF_PACKET,
    /// UDP): what the connect rewrite cannot see. `--packet-guard false` turns it off.
    #[arg(long, env = "PACKET_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub packet_guard: bool,
    /// Host-side pod interfaces the packet guard covers, kube2iam's syntax: `name`, `prefix+`,
    /// `!excluded` (comma-separated or repeated). Defaults cover the VPC CNI (eni), Calico
    /// (cali), Cilium (lxc) and bridge CNIs (veth).
    #[arg(
        long = "host-interface",
        env = "HOST_INTERFACE",
        value_delimiter = ',',
        default_value = "eni+,cali+,lxc+,veth+"
    )]
    pub host_interfaces: Vec<String>,
    /// Attach the guard as cls_bpf filters even where TCX exists (testing aid).
    #[arg(long, env = "PACKET_GUARD_NETLINK", hide = true)]
    pub packet_guard_netlink: bool,

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
    /// Read the base role ARN from the node's instance profile (upstream IMDS iam/info).
    #[arg(long, env = "AUTO_DISCOVER_BASE_ARN")]
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
    #[arg(long, env = "NAMESPACE_RESTRICTION_FORMAT", value_enum, default_value_t = PatternFormat::Glob)]
    pub namespace_restriction_format: PatternFormat,
    /// The AWS region for STS (default: AWS_REGION, else the node's placement/region).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// STS endpoint URL override (default: the regional endpoint).
    #[arg(long, env = "STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Requested session duration (15m to 1h; role chaining caps sessions at 1 h). Longer than
    /// kube2iam's 15m default: fewer STS calls, and clients never see credentials close enough
    /// to expiry to trigger their own stale-credential handling.
    #[arg(long, env = "IAM_ROLE_SESSION_TTL", default_value = "1h", value_parser = parse_duration)]
    pub iam_role_session_ttl: Duration,
    /// Refresh cached credentials this long before they expire. SDKs refresh what IMDS gave them
    /// 5 to 15 minutes ahead, so pods always get credentials with more than 15 minutes left.
    #[arg(long, env = "REFRESH_BEFORE", default_value = "15m", value_parser = parse_duration)]
    pub refresh_before: Duration,
    /// Concurrent credential prefetches when pods with a role appear (0 turns prefetch off).
    #[arg(long, env = "PREFETCH_CONCURRENCY", default_value_t = 8)]
    pub prefetch_concurrency: usize,
    /// One STS session per pod, named namespace.pod, for CloudTrail attribution.
    #[arg(long, env = "SESSION_PER_POD")]
    pub session_per_pod: bool,
    /// Whether token-less (IMDSv1) requests are served.
    #[arg(long, env = "IMDS_TOKENS", value_enum, default_value_t = TokenMode::Optional)]
    pub imds_tokens: TokenMode,
    /// Regex of a normally blocked path to forward anyway (repeatable), e.g. '^/latest/user-data$'.
    #[arg(long = "allow-path", env = "ALLOW_PATHS", value_delimiter = ',')]
    pub allow_paths: Vec<String>,
    /// Regex of a path to block in addition (repeatable).
    #[arg(long = "block-path", env = "BLOCK_PATHS", value_delimiter = ',')]
    pub block_paths: Vec<String>,
    /// How long a request from an unknown address waits for the pod watch.
    #[arg(long, env = "POD_WAIT", default_value = "1s", value_parser = parse_duration)]
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
    /// Time a client has to send its request headers.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
}

/// Parses `1500ms`, `30s`, `15m`, `1h` (a bare number is seconds).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 500ms, 30s, 15m or 1h"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{value:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{value:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
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
}

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

impl RunArgs {
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
            packet_guard: if self.packet_guard {
                Some(
                    InterfacePatterns::parse(&self.host_interfaces)
                        .map_err(Error::HostInterface)?,
                )
            } else {
                None
            },
            guard_netlink: self.packet_guard_netlink,
        })
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
        };
        assert!(args("debug").debug_enabled());
        assert!(args("info,kube2iam_agent=trace").debug_enabled());
        assert!(!args("info").debug_enabled());
        assert!(!args("warn").debug_enabled());
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
}
