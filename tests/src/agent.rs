//! Running the real agent binary in a test node.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{AGENT_PORT, HOST_IP4, HOST_IP6, TestNode, process::ChildGuard};

/// The line the agent logs once the programs are attached and configured.
pub const READY_LINE: &str = "interception active";
/// How long the agent may take to get there.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent binary: `$K2I_AGENT_BIN`, else `kube2iam-agent` in the cargo profile directory the
/// tests were built into, else `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("K2I_AGENT_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "K2I_AGENT_BIN={} does not exist; build it with cargo build -p kube2iam-agent \
             (cargo xtask test does)",
            path.display()
        );
        return path;
    }
    let mut candidates = Vec::new();
    // Integration tests run from <target>/<profile>/deps/<test>-<hash>.
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("kube2iam-agent"));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/kube2iam-agent"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kube2iam-agent"));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the agent binary is missing (looked at {candidates:?}); build it with cargo \
                 build -p kube2iam-agent (cargo xtask test does), or set K2I_AGENT_BIN"
            )
        })
}

/// How to start the agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Pass `--host-ipv6 fd00:192::10` (IPv6 metadata connects are redirected, not refused).
    pub host_ipv6: bool,
    /// `--app-port`.
    pub app_port: u16,
    /// Appended to the command line.
    pub extra_args: Vec<OsString>,
    /// Pass `--interception-only`: the kernel side alone, no metadata server (the interception
    /// tests answer with a stand-in on the agent's port instead).
    pub interception_only: bool,
    /// Added to the agent's environment.
    pub env: Vec<(OsString, OsString)>,
    /// A further cgroup directory (e.g. a memory cgroup) the agent joins before it runs.
    pub cgroup: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            host_ipv6: false,
            app_port: AGENT_PORT,
            extra_args: Vec::new(),
            interception_only: true,
            env: Vec::new(),
            cgroup: None,
        }
    }
}

impl AgentOptions {
    pub fn with_ipv6() -> Self {
        Self {
            host_ipv6: true,
            ..Self::default()
        }
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

impl Log {
    fn text(&self) -> String {
        self.state.lock().expect("log lock").lines.join("\n")
    }
}

/// The agent running in the node namespace (not in the test cgroup), with its output captured.
/// Dropping it kills it (SIGKILL); the pins stay, as after a crash.
pub struct Agent {
    child: ChildGuard,
    log: Arc<Log>,
    pin_path: PathBuf,
}

impl Agent {
    /// Starts the agent with default options and waits for [`READY_LINE`].
    pub fn start(node: &TestNode) -> Self {
        Self::start_with(node, &AgentOptions::default())
    }

    /// Starts the agent and waits for [`READY_LINE`]; panics with the agent's output if it does
    /// not get there within [`READY_TIMEOUT`].
    pub fn start_with(node: &TestNode, options: &AgentOptions) -> Self {
        let agent = Self::spawn(node, options);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting.
    pub fn spawn(node: &TestNode, options: &AgentOptions) -> Self {
        let pin_path = node.pin_path();
        let mut command = node.command(agent_binary());
        if let Some(cgroup) = &options.cgroup {
            crate::process::place(&mut command, Some(cgroup), None);
        }
        command
            .arg("--host-ip")
            .arg(HOST_IP4.to_string())
            .arg("--app-port")
            .arg(options.app_port.to_string())
            .arg("--cgroup-path")
            .arg(node.cgroup_path())
            .arg("--bpf-pin-path")
            .arg(&pin_path);
        if options.host_ipv6 {
            command.arg("--host-ipv6").arg(HOST_IP6.to_string());
        }
        if options.interception_only {
            command.arg("--interception-only");
        }
        // The agent's own AWS credentials must come from the node's metadata service, as on
        // EC2: nothing from this machine's environment or files.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        command
            .env("AWS_CONFIG_FILE", "/nonexistent/kube2iam-test/config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/kube2iam-test/credentials",
            );
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        command
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "kube2iam-agent");
        let log = Arc::new(Log::default());
        let stdout = child.child_mut().stdout.take();
        let stderr = child.child_mut().stderr.take();
        capture(&log, stdout);
        capture(&log, stderr);
        Self {
            child,
            log,
            pin_path,
        }
    }

    /// Waits until the agent logs [`READY_LINE`].
    pub fn wait_ready(&self) {
        self.wait_for_line(READY_LINE, READY_TIMEOUT);
    }

    /// Waits until a log line contains `needle`; panics with the log on timeout or exit.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().expect("log lock");
        loop {
            if state.lines.iter().any(|line| line.contains(needle)) {
                return;
            }
            if state.open_streams == 0 {
                drop(state);
                panic!(
                    "kube2iam-agent exited before logging {needle:?}.\n--- agent output ---\n{}",
                    self.log.text()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                panic!(
                    "kube2iam-agent did not log {needle:?} within {timeout:?}.\n--- agent output \
                     ---\n{}",
                    self.log.text()
                );
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill9()
    }

    /// SIGTERM and wait (10 s) for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.child.terminate(Duration::from_secs(10))
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- kube2iam-agent output ---\n{}\n---", self.log.text());
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
            log.state.lock().expect("log lock").lines.push(line);
            log.changed.notify_all();
        }
        log.state.lock().expect("log lock").open_streams -= 1;
        log.changed.notify_all();
    });
}

/// Runs `kube2iam-agent uninstall --bpf-pin-path <pin_path>` in the node namespace.
pub fn run_uninstall(node: &TestNode, pin_path: &Path) -> Output {
    let mut command = node.command(agent_binary());
    command.arg("uninstall").arg("--bpf-pin-path").arg(pin_path);
    crate::process::output_within(
        &mut command,
        Duration::from_secs(20),
        "kube2iam-agent uninstall",
    )
}
