//! kube2iam compatibility at the command line: a kube2iam 0.15.0 flag set, as kube2iam's chart
//! renders it, either runs with kube2iam's meaning or stops at start with one message per flag.
//!
//! * Every kube2iam flag is listed, with what becomes of it, in the chart's
//!   `kube2iam-flags.json`, which this module compiles in and the chart's values check reads: the
//!   agent and `helm install` refuse the same flags with the same words.
//! * Booleans take `=true`/`=false` as Go's flag package does (kube2iam's chart renders
//!   `--debug=true`); durations take Go's syntax (`15m0s`, `1h30m`); log levels take logrus's
//!   names (`warning`, `fatal`, `panic`).

use std::{collections::BTreeMap, ffi::OsString, sync::OnceLock, time::Duration};

use serde::Deserialize;

/// The table, shared with the chart.
pub const FLAGS_JSON: &str = include_str!("../../deploy/helm/kube2iam-ebpf/kube2iam-flags.json");

/// `kube2iam-flags.json`.
#[derive(Debug, Deserialize)]
pub struct Table {
    /// The kube2iam release the table describes.
    pub release: String,
    pub flags: BTreeMap<String, Entry>,
}

/// One kube2iam flag.
#[derive(Debug, Deserialize)]
pub struct Entry {
    pub kube2iam_default: String,
    /// A boolean flag: takes no separate value, only `--flag` or `--flag=true|false`.
    pub boolean: bool,
    pub action: Action,
    /// For [`Action::Alias`]: the agent flag it is another name of.
    #[serde(default)]
    pub to: Option<String>,
    /// Why, and what to use instead (not for [`Action::Same`]).
    #[serde(default)]
    pub message: Option<String>,
}

/// What becomes of a kube2iam flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// An agent flag of the same name and meaning.
    Same,
    /// Another name of the agent flag `to`.
    Alias,
    /// Accepted with a warning: it means nothing here.
    Ignore,
    /// A boolean accepted (with a warning) when false, refused when true.
    FalseOnly,
    /// Refused.
    Refuse,
}

/// The compiled-in table.
pub fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The file is compiled in, and the `table_parses` test parses exactly these bytes: this
        // cannot fail in a binary whose tests passed.
        serde_json::from_str(FLAGS_JSON).expect("kube2iam-flags.json is valid (tested)")
    })
}

/// A kube2iam flag the agent does not take, or a malformed boolean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "{flag}: kube2iam's flag is not supported by kube2iam-ebpf: {message} (see \
         docs/migrating-from-kube2iam.md)"
    )]
    Refused { flag: String, message: String },
    #[error("--{flag}={value}: a boolean flag takes true or false (or no value, meaning true)")]
    BadBool { flag: String, value: String },
}

/// The command line to hand to clap, and what to warn about once logging is up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translated {
    pub args: Vec<OsString>,
    pub warnings: Vec<String>,
}

/// Go's `strconv.ParseBool`, which kube2iam's flags use.
pub fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The long names (and aliases) of the agent's flags that take no value.
fn agent_booleans(command: &clap::Command) -> Vec<String> {
    // Built, so that clap's own --version is listed too.
    let mut command = command.clone();
    command.build();
    let mut names = Vec::new();
    for arg in command.get_arguments() {
        let no_value = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Version
        );
        if !no_value {
            continue;
        }
        if let Some(long) = arg.get_long() {
            names.push(long.to_owned());
        }
        if let Some(aliases) = arg.get_all_aliases() {
            names.extend(aliases.into_iter().map(str::to_owned));
        }
    }
    names
}

/// Rewrites kube2iam's forms into the agent's before clap parses them: `--flag=true|false` of a
/// boolean becomes `--flag` or nothing, kube2iam flags that mean nothing here are dropped with a
/// warning, and refused ones stop the start with the replacement named. Everything else, and
/// everything after `--`, passes unchanged. `args` starts with the program name.
pub fn translate(
    args: impl IntoIterator<Item = OsString>,
    command: &clap::Command,
) -> Result<Translated, Error> {
    let booleans = agent_booleans(command);
    let table = table();
    let mut out = Translated::default();
    let mut args = args.into_iter();
    if let Some(program) = args.next() {
        out.args.push(program);
    }
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str().and_then(|a| a.strip_prefix("--")) else {
            out.args.push(arg);
            continue;
        };
        if text.is_empty() {
            // `--`: the rest is not flags.
            out.args.push(arg);
            out.args.extend(args.by_ref());
            break;
        }
        let (name, value) = match text.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (text, None),
        };
        let entry = table.flags.get(name);
        match entry.map(|e| e.action) {
            Some(Action::Refuse) => {
                return Err(refused(name, entry));
            }
            Some(Action::FalseOnly) => {
                if bool_value(name, value)? {
                    return Err(refused(name, entry));
                }
                out.warnings.push(format!(
                    "--{name}=false (a kube2iam flag) changes nothing here: {}",
                    message(entry)
                ));
            }
            Some(Action::Ignore) => {
                let shown = match (value, entry.is_some_and(|e| e.boolean)) {
                    (Some(value), true) => {
                        bool_value(name, Some(value))?;
                        format!("--{name}={value}")
                    }
                    (None, true) => format!("--{name}"),
                    (Some(value), false) => format!("--{name}={value}"),
                    // `--flag value`: the value is the next argument.
                    (None, false) => match args.next() {
                        Some(value) => format!("--{name} {}", value.to_string_lossy()),
                        None => format!("--{name}"),
                    },
                };
                out.warnings.push(format!(
                    "{shown} (a kube2iam flag) is ignored: {}",
                    message(entry)
                ));
            }
            Some(Action::Same | Action::Alias) | None => match value {
                Some(value) if booleans.iter().any(|b| b == name) => {
                    if bool_value(name, Some(value))? {
                        out.args.push(OsString::from(format!("--{name}")));
                    }
                }
                _ => out.args.push(arg),
            },
        }
    }
    Ok(out)
}

/// Why a command line was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Kube2iam(#[from] Error),
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

/// Parses the agent's command line (`args` starts with the program name), kube2iam's forms
/// included; returns the warnings to log once logging is up.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
) -> Result<(crate::cli::Cli, Vec<String>), ParseError> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let mut command = crate::cli::Cli::command();
    let translated = translate(args, &command)?;
    let matches = command.try_get_matches_from_mut(translated.args)?;
    let cli = crate::cli::Cli::from_arg_matches(&matches)?;
    Ok((cli, translated.warnings))
}

fn bool_value(name: &str, value: Option<&str>) -> Result<bool, Error> {
    match value {
        None => Ok(true),
        Some(value) => parse_go_bool(value).ok_or_else(|| Error::BadBool {
            flag: name.to_owned(),
            value: value.to_owned(),
        }),
    }
}

fn message(entry: Option<&Entry>) -> &str {
    entry.and_then(|e| e.message.as_deref()).unwrap_or("")
}

fn refused(name: &str, entry: Option<&Entry>) -> Error {
    Error::Refused {
        flag: format!("--{name}"),
        message: message(entry).to_owned(),
    }
}

/// Parses a duration in Go's syntax, as kube2iam's flags took them (`15m0s`, `1h30m`, `500ms`,
/// `1.5h`, `0`), and also a bare number of seconds (`30`).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("{value:?} is not a duration like 500ms, 30s, 15m, 1h30m or 15m0s");
    let text = value.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.starts_with('-') {
        return Err(format!("{value:?}: a duration cannot be negative"));
    }
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds).ok_or_else(bad);
    }
    const UNITS: [(&str, f64); 8] = [
        ("ns", 1e-9),
        ("us", 1e-6),
        ("\u{b5}s", 1e-6),
        ("\u{3bc}s", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
        ("m", 60.0),
        ("h", 3600.0),
    ];
    let mut rest = text;
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        if !number.bytes().any(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let number: f64 = number.parse().map_err(|_| bad())?;
        // The longest unit that matches: `ms` before `m`.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(unit, _)| tail.starts_with(unit))
            .max_by_key(|(unit, _)| unit.len())
            .ok_or_else(|| {
                let unit: String = tail.chars().take_while(|c| !c.is_ascii_digit()).collect();
                format!("{value:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)")
            })?;
        total += number * scale;
        rest = &tail[unit.len()..];
    }
    seconds_to_duration(total).ok_or_else(bad)
}

fn seconds_to_duration(seconds: f64) -> Option<Duration> {
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
}

/// The tracing filter for a `--log-level`: a single level is read case-insensitively, with
/// logrus's names mapped (`warning` → warn; `fatal`, `panic` → error, the closest level that
/// still logs); anything with `=` or `,` is a tracing directive, taken as written.
pub fn log_filter(level: &str) -> String {
    let trimmed = level.trim();
    if trimmed.contains(['=', ',']) {
        return trimmed.to_owned();
    }
    match trimmed.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_owned(),
        "fatal" | "panic" => "error".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_and_every_entry_is_complete() {
        let table: Table = serde_json::from_str(FLAGS_JSON).unwrap();
        assert_eq!(table.release, "0.15.0");
        for (flag, entry) in &table.flags {
            match entry.action {
                Action::Same => assert!(entry.message.is_none() && entry.to.is_none(), "{flag}"),
                Action::Alias => assert!(entry.to.is_some(), "{flag} needs `to`"),
                Action::Ignore | Action::Refuse => {
                    assert!(entry.message.is_some(), "{flag} needs a message")
                }
                Action::FalseOnly => assert!(
                    entry.boolean && entry.message.is_some(),
                    "{flag}: false-only is for booleans, with a message"
                ),
            }
        }
    }

    #[test]
    fn go_durations() {
        let d = |s: &str| parse_duration(s);
        assert_eq!(d("15m0s"), Ok(Duration::from_secs(900)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("7m30s"), Ok(Duration::from_secs(450)));
        assert_eq!(d("1m30.5s"), Ok(Duration::from_millis(90_500)));
        assert_eq!(d("300us"), Ok(Duration::from_micros(300)));
        assert_eq!(d("300\u{b5}s"), Ok(Duration::from_micros(300)));
        assert_eq!(d("10ns"), Ok(Duration::from_nanos(10)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        assert_eq!(d("+5s"), Ok(Duration::from_secs(5)));
        // A bare number is seconds (the agent's own form before Go's).
        assert_eq!(d("30"), Ok(Duration::from_secs(30)));
        for bad in ["", "m", "5 minutes", "1x", "1h30", "-5s", ".s", "1d", "h1"] {
            assert!(d(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(d("1d").unwrap_err().contains("unknown unit \"d\""));
    }

    #[test]
    fn go_booleans() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Some(false), "{f}");
        }
        for bad in ["yes", "on", "", "tRUE"] {
            assert_eq!(parse_go_bool(bad), None, "{bad}");
        }
    }

    #[test]
    fn logrus_levels() {
        for (given, filter) in [
            ("debug", "debug"),
            ("info", "info"),
            ("warning", "warn"),
            ("warn", "warn"),
            ("error", "error"),
            ("fatal", "error"),
            ("panic", "error"),
            ("trace", "trace"),
            ("WARNING", "warn"),
            ("Info", "info"),
            (" debug ", "debug"),
            ("info,kube2iam_agent=debug", "info,kube2iam_agent=debug"),
        ] {
            assert_eq!(log_filter(given), filter, "{given}");
            assert!(
                tracing_subscriber::EnvFilter::try_new(log_filter(given)).is_ok(),
                "{given}"
            );
        }
        // Unmapped, a logrus name is a tracing target: the agent's warnings would not be logged.
        let warns = |filter: &str| {
            use tracing_subscriber::layer::SubscriberExt as _;
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::try_new(filter).unwrap());
            tracing::subscriber::with_default(
                subscriber,
                || tracing::enabled!(target: "kube2iam_agent::agent", tracing::Level::WARN),
            )
        };
        assert!(!warns("warning"));
        assert!(warns(&log_filter("warning")));
        assert!(!warns(&log_filter("fatal")) && warns(&log_filter("info")));
    }

    /// The flags of kube2iam 0.15.0, as cmd/main.go (`addFlags`) declares them.
    const KUBE2IAM_0_15_0_FLAGS: [&str; 32] = [
        "kubeconfig",
        "api-server",
        "api-token",
        "app-port",
        "metrics-port",
        "base-role-arn",
        "debug",
        "default-role",
        "iam-role-key",
        "iam-external-id",
        "iam-role-session-ttl",
        "iam-role-error-ttl",
        "insecure",
        "metadata-addr",
        "iptables",
        "auto-discover-base-arn",
        "auto-discover-default-role",
        "host-interface",
        "namespace-restrictions",
        "namespace-restriction-format",
        "namespace-key",
        "cache-resync-period",
        "resolve-duplicate-cache-ips",
        "host-ip",
        "node",
        "backoff-max-interval",
        "backoff-max-elapsed-time",
        "log-format",
        "log-level",
        "use-regional-sts-endpoint",
        "verbose",
        "version",
    ];

    #[test]
    fn the_table_lists_exactly_kube2iams_flags_and_names_real_agent_flags() {
        use clap::CommandFactory as _;
        let table = table();
        let listed: Vec<&str> = table.flags.keys().map(String::as_str).collect();
        let mut expected = KUBE2IAM_0_15_0_FLAGS.to_vec();
        expected.sort_unstable();
        assert_eq!(listed, expected);
        let command = crate::cli::Cli::command();
        let long = |name: &str| command.get_arguments().find(|a| a.get_long() == Some(name));
        for (flag, entry) in &table.flags {
            match entry.action {
                Action::Same if flag == "version" => {
                    assert!(command.get_version().is_some(), "--version")
                }
                Action::Same => assert!(long(flag).is_some(), "--{flag} is an agent flag"),
                Action::Alias => {
                    let to = entry.to.as_deref().unwrap_or_default();
                    let arg = long(to).unwrap_or_else(|| panic!("--{to} is an agent flag"));
                    assert!(
                        arg.get_all_aliases()
                            .unwrap_or_default()
                            .contains(&flag.as_str()),
                        "--{flag} is an alias of --{to}"
                    );
                }
                _ => assert!(long(flag).is_none(), "--{flag} is not also an agent flag"),
            }
        }
    }

    /// What the agent makes of one kube2iam command line.
    enum Outcome {
        /// Parsed and valid; the check proves the meaning.
        Same(fn(&crate::cli::Cli)),
        /// Parsed with a warning containing this.
        Warned(&'static str),
        /// Stopped at parse time, naming the replacement.
        Refused(&'static str),
        /// Parsed, then refused by the start-up checks with this.
        RefusedAtStart(&'static str),
    }

    fn start_checks(cli: &crate::cli::Cli) -> Result<(), String> {
        cli.run.check_ports().map_err(|e| e.to_string())?;
        cli.run.sts_timing().map_err(|e| e.to_string())?;
        cli.run.settings(false).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Every flag of kube2iam 0.15.0, each written as kube2iam's chart renders it: `extraArgs`
    /// with a value as `--flag=value`, one without (or false) as a bare `--flag`, and the
    /// flags the chart always renders (`--host-interface=docker0`, `--iptables=false`,
    /// `--app-port`, `--metrics-port`).
    #[test]
    fn every_kube2iam_flag_as_its_chart_renders_it_has_a_defined_outcome() {
        use crate::{cli::LogFormat, policy::PatternFormat};
        use Outcome::*;
        let rows: Vec<(&[&str], Outcome)> = vec![
            (
                &["--kubeconfig=/etc/kubernetes/kubeconfig"],
                Same(|c| {
                    assert_eq!(
                        c.run.kubeconfig.as_deref(),
                        Some(std::path::Path::new("/etc/kubernetes/kubeconfig"))
                    )
                }),
            ),
            (
                &["--api-server=https://10.0.0.1:6443"],
                Same(|c| assert_eq!(c.run.api_server.as_deref(), Some("https://10.0.0.1:6443"))),
            ),
            (&["--api-token=s3cr3t"], Refused("--kubeconfig")),
            (
                &["--app-port=8182"],
                Same(|c| assert_eq!(c.run.app_port, 8182)),
            ),
            (
                &["--metrics-port=9543"],
                Same(|c| assert_eq!(c.run.metrics_port, 9543)),
            ),
            // kube2iam's chart without prometheus.metricsPort: metrics on the app port.
            (
                &["--app-port=8181", "--metrics-port=8181"],
                RefusedAtStart("prometheus.metricsPort"),
            ),
            (
                &["--base-role-arn=arn:aws:iam::123456789012:role/"],
                Same(|c| {
                    assert_eq!(
                        c.run.base_role_arn.as_deref(),
                        Some("arn:aws:iam::123456789012:role/")
                    )
                }),
            ),
            (&["--debug=true"], Same(|c| assert!(c.run.debug))),
            // `debug: ""` or `debug: false` in kube2iam's extraArgs renders a bare flag: on.
            (&["--debug"], Same(|c| assert!(c.run.debug))),
            (&["--debug=false"], Same(|c| assert!(!c.run.debug))),
            (
                &["--default-role=kube2iam-default"],
                Same(|c| assert_eq!(c.run.default_role.as_deref(), Some("kube2iam-default"))),
            ),
            (
                &["--iam-role-key=example.com/role"],
                Same(|c| assert_eq!(c.run.iam_role_key, "example.com/role")),
            ),
            (
                &["--iam-external-id=example.com/external-id"],
                Same(|c| assert_eq!(c.run.iam_external_id_key, "example.com/external-id")),
            ),
            (
                &["--iam-role-session-ttl=15m0s"],
                Same(|c| {
                    let (t, _) = c.run.sts_timing().unwrap();
                    assert_eq!((t.session, t.refresh_before), (secs(1800), secs(900)));
                }),
            ),
            (
                &["--iam-role-session-ttl=1h0m0s"],
                RefusedAtStart("use 30m0s or less"),
            ),
            (
                &["--iam-role-error-ttl=30s"],
                Same(|c| assert_eq!(c.run.sts_timing().unwrap().0.error_ttl, secs(30))),
            ),
            (&["--insecure=true"], Refused("--kubeconfig")),
            (&["--insecure"], Refused("--kubeconfig")),
            (&["--insecure=false"], Warned("certificate")),
            (
                &["--metadata-addr=169.254.169.254"],
                Same(|c| assert_eq!(c.run.metadata_addr, "169.254.169.254")),
            ),
            (&["--iptables=false"], Warned("no iptables rule")),
            (
                &["--iptables=true", "--host-ip=10.0.0.1"],
                Warned("no iptables rule"),
            ),
            (
                &["--auto-discover-base-arn=true"],
                Same(|c| assert!(c.run.auto_discover_base_arn)),
            ),
            (
                &["--auto-discover-default-role=true"],
                Refused("--default-role"),
            ),
            (
                &["--auto-discover-default-role=false"],
                Warned("--default-role"),
            ),
            (
                &["--host-interface=docker0"],
                Same(|c| {
                    assert!(c.run.guards.guard_patterns().iter().any(|p| p == "eni+"));
                    assert!(c.run.guards.host_interface_warning().is_some());
                }),
            ),
            (
                &["--host-interface=eni+"],
                Same(|c| assert_eq!(c.run.guards.guard_patterns(), ["eni+"])),
            ),
            (
                &["--namespace-restrictions=true"],
                Same(|c| assert!(c.run.namespace_restrictions)),
            ),
            (
                &["--namespace-restriction-format=regexp"],
                Same(|c| assert_eq!(c.run.namespace_restriction_format, PatternFormat::Regexp)),
            ),
            (
                &["--namespace-key=example.com/allowed"],
                Same(|c| assert_eq!(c.run.namespace_key, "example.com/allowed")),
            ),
            (
                &["--cache-resync-period=30m0s"],
                Warned("no periodic resync"),
            ),
            (
                &["--cache-resync-period", "30m", "--debug=true"],
                Warned("no periodic resync"),
            ),
            (
                &["--resolve-duplicate-cache-ips=true"],
                Warned("one pod per address"),
            ),
            (
                &["--resolve-duplicate-cache-ips"],
                Warned("one pod per address"),
            ),
            (
                &["--host-ip=10.0.0.2"],
                Same(|c| assert_eq!(c.run.host_ip, Some(std::net::Ipv4Addr::new(10, 0, 0, 2)))),
            ),
            (
                &["--node=ip-10-0-0-1.ec2.internal"],
                Same(|c| assert_eq!(c.run.node.as_deref(), Some("ip-10-0-0-1.ec2.internal"))),
            ),
            (&["--backoff-max-interval=1s"], Warned("--pod-wait")),
            (
                &["--backoff-max-elapsed-time=2s"],
                Same(|c| assert_eq!(c.run.pod_wait, secs(2))),
            ),
            (
                &["--log-format=json"],
                Same(|c| assert_eq!(c.log.log_format, LogFormat::Json)),
            ),
            (
                &["--log-format=JSON"],
                Same(|c| assert_eq!(c.log.log_format, LogFormat::Json)),
            ),
            (
                &["--log-level=warning"],
                Same(|c| assert_eq!(c.log.filter(), "warn")),
            ),
            (
                &["--log-level=fatal"],
                Same(|c| assert_eq!(c.log.filter(), "error")),
            ),
            (
                &["--log-level=panic"],
                Same(|c| assert_eq!(c.log.filter(), "error")),
            ),
            (
                &["--use-regional-sts-endpoint=true"],
                Warned("regional STS endpoint"),
            ),
            (
                &["--use-regional-sts-endpoint"],
                Warned("regional STS endpoint"),
            ),
            (
                &["--verbose"],
                Same(|c| assert_eq!(c.log.filter(), "debug")),
            ),
            (
                &["--verbose=true", "--log-level=info"],
                Same(|c| assert_eq!(c.log.filter(), "debug")),
            ),
        ];
        let mut covered = std::collections::BTreeSet::new();
        for (flags, outcome) in rows {
            let mut argv = vec!["kube2iam-agent", "--host-ip=10.0.0.1"];
            // `--host-ip` once: rows that set it replace the default one.
            if flags.iter().any(|f| f.starts_with("--host-ip")) {
                argv.pop();
            }
            argv.extend_from_slice(flags);
            for flag in flags {
                if let Some(name) = flag.strip_prefix("--") {
                    covered.insert(name.split('=').next().unwrap_or(name).to_owned());
                }
            }
            let parsed = parse(argv.iter().map(OsString::from));
            match outcome {
                Same(check) => {
                    let (cli, warnings) = parsed.unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                    assert!(warnings.is_empty(), "{flags:?}: {warnings:?}");
                    start_checks(&cli).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                    check(&cli);
                }
                Warned(needle) => {
                    let (cli, warnings) = parsed.unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                    assert!(
                        warnings.len() == 1 && warnings[0].contains(needle),
                        "{flags:?}: {warnings:?}"
                    );
                    start_checks(&cli).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                }
                Refused(needle) => {
                    let err = parsed.map(|_| ()).unwrap_err().to_string();
                    assert!(
                        matches!(parsed_error_kind(&argv), Some(true)) && err.contains(needle),
                        "{flags:?}: {err}"
                    );
                }
                RefusedAtStart(needle) => {
                    let (cli, _) = parsed.unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                    let err = start_checks(&cli).unwrap_err();
                    assert!(err.contains(needle), "{flags:?}: {err}");
                }
            }
        }
        // --version prints and exits, as kube2iam's did, with or without `=true`.
        for argv in [
            ["kube2iam-agent", "--version"],
            ["kube2iam-agent", "--version=true"],
        ] {
            match parse(argv.iter().map(OsString::from)) {
                Err(ParseError::Clap(e)) => {
                    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion, "{argv:?}")
                }
                other => panic!("{argv:?}: {:?}", other.map(|_| ())),
            }
        }
        covered.insert("version".to_owned());
        let all: std::collections::BTreeSet<String> = KUBE2IAM_0_15_0_FLAGS
            .iter()
            .map(|f| (*f).to_owned())
            .collect();
        assert_eq!(covered, all, "a row for every kube2iam flag");
    }

    /// `Some(true)` when the command line was stopped by this module (not by clap).
    fn parsed_error_kind(argv: &[&str]) -> Option<bool> {
        match parse(argv.iter().map(OsString::from)) {
            Err(ParseError::Kube2iam(Error::Refused { .. })) => Some(true),
            Err(_) => Some(false),
            Ok(_) => None,
        }
    }

    /// kube2iam's chart with its default values and typical extraArgs, rendered (helm template
    /// of charts/kube2iam at 0.15.0), starts the agent with kube2iam's meaning.
    #[test]
    fn a_kube2iam_chart_rendering_parses() {
        let argv = [
            "kube2iam",
            "--host-interface=eni+",
            "--node=ip-10-0-0-1.ec2.internal",
            "--host-ip=10.0.0.1",
            "--iptables=true",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--default-role=kube2iam-default",
            "--iam-role-session-ttl=15m0s",
            "--namespace-restrictions=true",
            "--verbose",
            "--app-port=8181",
            "--metrics-port=9543",
        ];
        let (cli, warnings) = parse(argv.iter().map(OsString::from)).unwrap();
        assert_eq!(warnings.len(), 1, "--iptables: {warnings:?}");
        start_checks(&cli).unwrap();
        assert!(cli.run.namespace_restrictions);
        assert!(cli.log.debug_enabled());
        assert_eq!(cli.run.sts_timing().unwrap().0.session, secs(1800));
    }

    #[test]
    fn auto_discovered_and_given_base_arn_conflict_as_in_kube2iam() {
        let argv = [
            "kube2iam-agent",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--auto-discover-base-arn=true",
        ];
        match parse(argv.map(OsString::from)) {
            Err(ParseError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict)
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        let argv = [
            "kube2iam-agent",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--auto-discover-base-arn=false",
        ];
        assert!(parse(argv.map(OsString::from)).is_ok());
    }

    #[test]
    fn nothing_kube2iam_takes_is_an_unexpected_argument() {
        for flag in KUBE2IAM_0_15_0_FLAGS {
            if flag == "version" {
                continue;
            }
            let argv = [
                "kube2iam-agent",
                "--host-ip=10.0.0.1",
                &format!("--{flag}=1s"),
            ];
            if let Err(ParseError::Clap(e)) = parse(argv.iter().map(OsString::from)) {
                assert_ne!(
                    e.kind(),
                    clap::error::ErrorKind::UnknownArgument,
                    "--{flag}: {e}"
                );
            }
        }
    }

    #[test]
    fn booleans_take_go_values_and_bad_ones_are_named() {
        let parse_debug = |v: &str| {
            parse(["kube2iam-agent".into(), format!("--debug={v}").into()])
                .map(|(c, _)| c.run.debug)
        };
        assert!(parse_debug("1").unwrap());
        assert!(parse_debug("True").unwrap());
        assert!(!parse_debug("F").unwrap());
        let err = parse_debug("yes").unwrap_err().to_string();
        assert!(
            err.contains("--debug=yes") && err.contains("true or false"),
            "{err}"
        );
        // A flag that already takes a value keeps it.
        let (cli, _) =
            parse(["kube2iam-agent", "--packet-guard=false"].map(OsString::from)).unwrap();
        assert!(!cli.run.guards.packet_guard);
        // After `--` nothing is rewritten.
        let t = translate(
            ["kube2iam-agent", "--", "--debug=true"].map(OsString::from),
            &<crate::cli::Cli as clap::CommandFactory>::command(),
        )
        .unwrap();
        assert_eq!(
            t.args,
            ["kube2iam-agent", "--", "--debug=true"].map(OsString::from)
        );
    }
}
