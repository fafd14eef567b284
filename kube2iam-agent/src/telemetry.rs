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

/// Lets at most one log line per key through per interval, and says how many were held back, so
/// a caller repeating a refused request cannot flood the log.
pub struct LogLimiter {
    interval: std::time::Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

/// Keys kept at most; beyond that the oldest go (a flood of distinct keys stays bounded).
const LOG_LIMITER_KEYS: usize = 4096;

impl LogLimiter {
    pub fn new(interval: std::time::Duration) -> LogLimiter {
        LogLimiter {
            interval,
            seen: std::sync::Mutex::default(),
        }
    }

    /// `Some(suppressed since the last line)` when a line for `key` may be written now.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, suppressed)) = seen.get_mut(key) {
            if now.duration_since(*last) < self.interval {
                *suppressed += 1;
                return None;
            }
            let held = *suppressed;
            *last = now;
            *suppressed = 0;
            return Some(held);
        }
        if seen.len() >= LOG_LIMITER_KEYS {
            let interval = self.interval;
            seen.retain(|_, (last, _)| now.duration_since(*last) < interval);
            if seen.len() >= LOG_LIMITER_KEYS {
                return None;
            }
        }
        seen.insert(key.to_owned(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_one_line_per_key_and_interval_through() {
        let limiter = LogLimiter::new(std::time::Duration::from_millis(200));
        assert_eq!(limiter.allow("a"), Some(0));
        assert_eq!(limiter.allow("a"), None);
        assert_eq!(limiter.allow("a"), None);
        assert_eq!(limiter.allow("b"), Some(0));
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(
            limiter.allow("a"),
            Some(2),
            "the held-back count is reported"
        );
    }
}
