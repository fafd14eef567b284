//! Looking at a running (or stopped) agent from the outside: its Prometheus metrics, checked
//! with promtool and read sample by sample, and `kube2iam-agent inspect` in the node.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{TestNode, agent_binary, e2e::World};

/// One sample of a scrape: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape in the Prometheus text format.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches([',', ' ']).trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

impl Scrape {
    /// Parses the text format: `name{labels} value` lines, comments skipped.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                };
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                    None => (series, BTreeMap::new()),
                };
                Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                }
            })
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the one sample named `name` whose labels include `labels`; `None` when
    /// there is none; panics when several match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<_> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name}{labels:?} matches several samples: {matching:?}"
        );
        matching.first().map(|s| s.value)
    }

    /// As [`Scrape::get`], absent counting as 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every label value in the scrape.
    pub fn label_values(&self) -> Vec<&str> {
        self.samples
            .iter()
            .flat_map(|s| s.labels.values().map(String::as_str))
            .collect()
    }
}

/// Scrapes the agent's `/metrics` from inside the node; panics unless it answers 200.
pub fn scrape(world: &World, node: &TestNode) -> Scrape {
    let (status, body) = world.admin_get(node, "/metrics");
    assert_eq!(
        status,
        200,
        "/metrics: {body}\nagent log:\n{}",
        world.agent.log()
    );
    Scrape::parse(&body)
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on `text`; panics with its
/// findings unless it accepts the text without a complaint.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); install Debian's prometheus package (cargo xtask install does)")
        });
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to promtool");
    let output = child.wait_with_output().expect("promtool finished");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {}\n{findings}\n--- scrape ---\n{text}",
        output.status
    );
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` with `what`
/// and the last value it saw.
pub fn wait_for<T, L: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, L>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {last:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Runs `kube2iam-agent inspect --bpf-pin-path <pin_path> [extra]` in the node namespace.
pub fn run_inspect(node: &TestNode, pin_path: &Path, extra: &[&str]) -> Output {
    let mut command = node.command(agent_binary());
    command
        .arg("inspect")
        .arg("--bpf-pin-path")
        .arg(pin_path)
        .args(extra);
    crate::process::output_within(
        &mut command,
        Duration::from_secs(20),
        "kube2iam-agent inspect",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_escapes() {
        let scrape = Scrape::parse(
            "# HELP x_total X.\n# TYPE x_total counter\n\
             x_total{route=\"credentials\",status=\"200\"} 3\n\
             y{a=\"q\\\"uote\",b=\"\"} +Inf\nz 1.5\n",
        );
        assert_eq!(
            scrape.get("x_total", &[("route", "credentials"), ("status", "200")]),
            Some(3.0)
        );
        assert_eq!(scrape.get("y", &[("a", "q\"uote")]), Some(f64::INFINITY));
        assert_eq!(scrape.get("z", &[]), Some(1.5));
        assert_eq!(scrape.value("x_total", &[("status", "500")]), 0.0);
    }
}
