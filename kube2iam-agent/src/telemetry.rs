//! Logging setup: tracing with an EnvFilter, text or JSON.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt};

use crate::cli::{LogArgs, LogFormat};

/// Installs the global subscriber. A plain level (`info`, or logrus's `warning`, `fatal`,
/// `panic` as kube2iam took them) applies to every target; a full directive
/// (`info,kube2iam_agent=debug`) is taken as written. `--verbose` means debug.
pub fn init(args: &LogArgs) -> Result<(), String> {
    let filter = EnvFilter::try_new(args.filter())
        .map_err(|e| format!("--log-level {:?}: {e}", args.log_level))?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}
