//! Command line and environment. Flag names and defaults follow kube2iam where the meaning is
//! the same, so migrating is a values-file change; every flag can also come from the
//! environment.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bpf::{CookieSource, Settings};

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
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The pin directory to remove.
    #[arg(long, env = "BPF_PIN_PATH", default_value = "/sys/fs/bpf/kube2iam")]
    pub bpf_pin_path: PathBuf,
}

/// A bad flag value, named with the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--host-ip (or HOST_IP) is required: the node IP the agent listens on")]
    MissingHostIp,
    #[error(
        "--metadata-addr {0:?}: expected an IPv4 address with an optional port, like 169.254.169.254 or 169.254.169.254:80"
    )]
    MetadataAddr(String),
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
            agent_ip6: self.host_ipv6,
            agent_port: self.app_port,
            metadata_ip4,
            metadata_ip6: self.metadata_addr_ipv6,
            metadata_port,
            kernel_debug_log,
            cookie_source: self.host_netns_cookie_source,
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
