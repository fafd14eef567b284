//! The doctor's report: one row per check (status, result, what to do), the summary line, the
//! table the command prints, and the line form in which a check crosses the pipe from a probe
//! process.

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// Works, but something optional is missing or worth knowing.
    Warn,
    /// The agent cannot run until this is fixed.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }

    fn parse(label: &str) -> Option<Status> {
        match label {
            "ok" => Some(Status::Ok),
            "WARN" => Some(Status::Warn),
            "FAIL" => Some(Status::Fail),
            _ => None,
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub result: String,
    /// What to do about it; empty when nothing is to be done.
    pub fix: String,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, result: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status,
            result: result.into(),
            fix: String::new(),
        }
    }

    pub fn ok(name: impl Into<String>, result: impl Into<String>) -> Self {
        Check::new(name, Status::Ok, result)
    }

    pub fn warn(name: impl Into<String>, text: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(name, Status::Warn, text).fix(fix)
    }

    pub fn fail(name: impl Into<String>, text: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(name, Status::Fail, text).fix(fix)
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }

    /// One line for passing a check through a pipe: tab-separated, tabs and newlines replaced.
    pub(super) fn encode(&self) -> String {
        let clean = |s: &str| s.replace(['\t', '\n'], " ");
        format!(
            "{}\t{}\t{}\t{}",
            self.status.label(),
            clean(&self.name),
            clean(&self.result),
            clean(&self.fix)
        )
    }

    pub(super) fn decode(line: &str) -> Option<Check> {
        let mut parts = line.splitn(4, '\t');
        let status = Status::parse(parts.next()?)?;
        Some(Check {
            status,
            name: parts.next()?.to_owned(),
            result: parts.next()?.to_owned(),
            fix: parts.next().unwrap_or("").to_owned(),
        })
    }
}

/// All checks, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// Column widths of the table's wrapped columns.
const RESULT_WIDTH: usize = 58;
const FIX_WIDTH: usize = 52;

impl Report {
    /// Whether the agent can run: no check failed.
    pub fn can_run(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// `doctor: 15 ok, 1 warn (getpeername4), 0 fail: the agent can run`.
    pub fn summary(&self) -> String {
        let names = |status: Status| {
            let names: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.name.as_str())
                .collect();
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            }
        };
        format!(
            "doctor: {} ok, {} warn{}, {} fail{}: {}",
            self.count(Status::Ok),
            self.count(Status::Warn),
            names(Status::Warn),
            self.count(Status::Fail),
            names(Status::Fail),
            if self.can_run() {
                "the agent can run"
            } else {
                "the agent cannot run"
            }
        )
    }

    /// The table: check, status, result and what to do, the last two wrapped.
    pub fn table(&self) -> String {
        let name_width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let mut row = |name: &str, status: &str, result: &[String], fix: &[String]| {
            let lines = result.len().max(fix.len()).max(1);
            for i in 0..lines {
                let (name, status) = if i == 0 { (name, status) } else { ("", "") };
                let result = result.get(i).map(String::as_str).unwrap_or("");
                let fix = fix.get(i).map(String::as_str).unwrap_or("");
                let line =
                    format!("{name:<name_width$}  {status:<6}  {result:<RESULT_WIDTH$}  {fix}");
                out.push_str(line.trim_end());
                out.push('\n');
            }
        };
        row(
            "CHECK",
            "STATUS",
            &["RESULT".to_owned()],
            &["WHAT TO DO".to_owned()],
        );
        for check in &self.checks {
            row(
                &check.name,
                check.status.label(),
                &wrap(&check.result, RESULT_WIDTH),
                &wrap(&check.fix, FIX_WIDTH),
            );
        }
        out
    }
}

/// Word-wraps `text` to lines of at most `width` characters (longer words get a line of their
/// own).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_words() {
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("", 10), Vec::<String>::new());
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            vec!["averyveryverylongword", "x"]
        );
    }

    #[test]
    fn summary_and_table() {
        let report = Report {
            checks: vec![
                Check::ok("kernel", "6.1.0 (6.1.0)"),
                Check::warn("hook getpeername4", "cannot load", "optional"),
                Check::ok("bpffs", "/sys/fs/bpf is a bpffs"),
            ],
        };
        assert!(report.can_run());
        assert_eq!(
            report.summary(),
            "doctor: 2 ok, 1 warn (hook getpeername4), 0 fail: the agent can run"
        );
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CHECK"), "{table}");
        assert!(lines[0].contains("STATUS") && lines[0].contains("WHAT TO DO"));
        assert!(lines[2].starts_with("hook getpeername4  WARN"), "{table}");
        assert!(lines.iter().all(|l| l == &l.trim_end()));

        let mut failing = report.clone();
        failing.checks.push(Check::fail(
            "capabilities",
            "CAP_BPF",
            "grant CAP_NET_ADMIN",
        ));
        assert!(!failing.can_run());
        assert!(
            failing
                .summary()
                .ends_with("1 fail (capabilities): the agent cannot run")
        );
    }

    #[test]
    fn checks_cross_the_pipe_intact() {
        let check = Check::warn("cgroup2", "not\tmounted\nyet", "mount it");
        let decoded = Check::decode(&check.encode()).expect("decodes");
        assert_eq!(decoded.name, "cgroup2");
        assert_eq!(decoded.status, Status::Warn);
        assert_eq!(decoded.result, "not mounted yet");
        assert_eq!(decoded.fix, "mount it");
        assert_eq!(Check::decode("garbage"), None);
    }
}
