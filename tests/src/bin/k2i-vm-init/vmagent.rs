//! The real agent binary in the VM: started with the production defaults (no --cgroup-path, no
//! --bpf-pin-path), optionally with a reduced capability bounding set, its log captured and
//! echoed to the console.

use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    process::{Command, ExitStatus, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use kube2iam_tests::{ChildGuard, process::output_within};

pub const AGENT: &str = "/bin/kube2iam-agent";
/// The line the agent logs once interception is in place.
pub const READY_LINE: &str = "interception active";
/// How long an agent may take to get there under TCG.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The VM node's host IPs (on its lo), as in the host test kit.
pub const HOST_IP4: &str = "192.0.2.10";
pub const HOST_IP6: &str = "fd00:192::10";

/// A capability bounding set, as a mask; `None` leaves root's full set.
pub type Caps = Option<u64>;

/// The highest capability this kernel knows.
pub fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Restricts the command's bounding set to `caps` before it execs: root then gets exactly those
/// capabilities (effective = permitted = bounding for uid 0), as a pod that drops ALL and adds
/// a few does.
pub fn restrict(command: &mut Command, caps: Caps) {
    let Some(mask) = caps else { return };
    let last = cap_last_cap();
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for cap in 0..=last {
                if mask & (1u64 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    open_streams: usize,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

pub struct VmAgent {
    child: ChildGuard,
    log: Arc<Log>,
}

impl VmAgent {
    /// Starts `kube2iam-agent --host-ip 192.0.2.10 --host-ipv6 fd00:192::10
    /// --interception-only` plus `extra`, without waiting.
    pub fn spawn(extra: &[&str], caps: Caps) -> Self {
        let mut command = Command::new(AGENT);
        command
            .args([
                "--host-ip",
                HOST_IP4,
                "--host-ipv6",
                HOST_IP6,
                "--interception-only",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        restrict(&mut command, caps);
        let mut child = ChildGuard::spawn(&mut command, "kube2iam-agent");
        let log = Arc::new(Log::default());
        let stdout = child.child_mut().stdout.take();
        let stderr = child.child_mut().stderr.take();
        capture(&log, stdout);
        capture(&log, stderr);
        Self { child, log }
    }

    /// Starts the agent and waits until it is ready; the error holds its log.
    pub fn start(extra: &[&str], caps: Caps) -> Result<Self, String> {
        let agent = Self::spawn(extra, caps);
        agent.wait_for(READY_LINE, READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.wait_for_more(needle, 0, timeout)
    }

    /// The log lines that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        let state = self.log.state.lock().expect("log lock");
        state.lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until more than `seen` log lines contain `needle`.
    pub fn wait_for_more(
        &self,
        needle: &str,
        seen: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().expect("log lock");
        loop {
            if state.lines.iter().filter(|l| l.contains(needle)).count() > seen {
                return Ok(());
            }
            if state.open_streams == 0 {
                drop(state);
                return Err(format!(
                    "the agent exited before logging {needle:?}:\n{}",
                    self.log()
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(format!(
                    "the agent did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                ));
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    pub fn log(&self) -> String {
        self.lines().join("\n")
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.state.lock().expect("log lock").lines.clone()
    }

    /// The agent's effective capabilities (after exec).
    pub fn cap_eff(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    }

    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill9()
    }

    /// SIGTERM and wait for the exit (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> Result<ExitStatus, String> {
        self.child.signal(libc::SIGTERM);
        match self.child.wait_timeout(Duration::from_secs(20)) {
            Some(status) => Ok(status),
            None => {
                self.child.kill9();
                Err(format!(
                    "the agent did not exit within 20 s of SIGTERM:\n{}",
                    self.log()
                ))
            }
        }
    }
}

fn capture<R: Read + Send + 'static>(log: &Arc<Log>, stream: Option<R>) {
    let Some(stream) = stream else { return };
    log.state.lock().expect("log lock").open_streams += 1;
    let log = Arc::clone(log);
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            println!("agent| {line}");
            log.state.lock().expect("log lock").lines.push(line);
            log.changed.notify_all();
        }
        log.state.lock().expect("log lock").open_streams -= 1;
        log.changed.notify_all();
    });
}

/// Runs an agent subcommand (`doctor`, `uninstall`) to completion with `caps`.
pub fn agent_command(args: &[&str], caps: Caps, timeout: Duration) -> Output {
    let mut command = Command::new(AGENT);
    command.args(args);
    restrict(&mut command, caps);
    output_within(
        &mut command,
        timeout,
        &format!("kube2iam-agent {}", args.join(" ")),
    )
}

/// `kube2iam-agent doctor`: its output echoed to the console, the exit code and summary line.
pub fn doctor(caps: Caps) -> (Option<i32>, String, String) {
    doctor_with(&[], caps)
}

/// `kube2iam-agent doctor` with more flags, as [`doctor`].
pub fn doctor_with(extra: &[&str], caps: Caps) -> (Option<i32>, String, String) {
    let mut args = vec!["doctor"];
    args.extend_from_slice(extra);
    let output = agent_command(&args, caps, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    for line in stdout.lines() {
        println!("doctor| {line}");
    }
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("doctor! {line}");
    }
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("doctor: "))
        .unwrap_or("no summary line")
        .to_owned();
    (output.status.code(), summary, stdout)
}
