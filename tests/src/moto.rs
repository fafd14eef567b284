//! moto serving STS inside a test node, on the node's loopback.
//!
//! moto keeps every AssumeRole it answered as an `sts.AssumedRole` model and lists them at
//! `/moto-api/data.json` with `role_arn`, `session_name`, `external_id`, `policy`,
//! `access_key_id` (of the issued credentials), `account_id` (taken from the role ARN) and
//! `region_name`. It does not list the requested duration: `expiration` is a datetime, which
//! data.json leaves out. [`FaultProxy`](crate::faults::FaultProxy) records the duration from the
//! request itself.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{
    ChildGuard, TestNode,
    ns_runtime::{HttpRequest, NetnsRuntime},
    venv::{ensure_venv, venv_bin},
};

/// moto's default port on the node's loopback.
pub const MOTO_PORT: u16 = 5000;
/// How long moto may take to answer after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of moto's output is kept for error messages.
const LOG_KEEP: usize = 64 * 1024;

/// One AssumeRole call, as moto or the fault proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRoleCall {
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
    /// `DurationSeconds` as requested; `None` when the request had none, and always `None` from
    /// moto, which does not expose it.
    pub duration: Option<Duration>,
    /// The access key id moto issued (from moto only).
    pub access_key_id: Option<String>,
}

/// A `moto_server` process in the node namespace, killed on drop.
pub struct Moto {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<u8>>>,
    runtime: NetnsRuntime,
    child: ChildGuard,
}

impl Moto {
    /// Starts moto at 127.0.0.1:[`MOTO_PORT`] in `node` and waits until it answers.
    pub fn start(node: &TestNode) -> Self {
        Self::start_on(node, MOTO_PORT)
    }

    pub fn start_on(node: &TestNode, port: u16) -> Self {
        ensure_venv();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let mut command = node.command(venv_bin("moto_server"));
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "moto_server");
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .child_mut()
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .child_mut()
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            thread::spawn(move || keep_tail(stream, &log));
        }
        let mut moto = Self {
            addr,
            log,
            runtime: NetnsRuntime::start("moto-client", &node.netns_path()),
            child,
        };
        moto.wait_ready();
        moto
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) before answering on {}; its output:\n{}",
                    self.addr,
                    self.log()
                );
            }
            let last = match self.runtime.request(
                self.addr,
                HttpRequest::get("/moto-api/data.json"),
                Duration::from_secs(5),
            ) {
                Ok(response) if response.status == 200 => return,
                Ok(response) => format!("status {}", response.status),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "moto_server did not answer on {} within {READY_TIMEOUT:?} (last: {last}); \
                     its output:\n{}",
                    self.addr,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>` in the node namespace.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// moto's output so far (the last 64 KiB).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().expect("log")).into_owned()
    }

    /// moto's whole state, `/moto-api/data.json`.
    pub fn data_json(&self) -> serde_json::Value {
        let response = self
            .runtime
            .request(
                self.addr,
                HttpRequest::get("/moto-api/data.json"),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("moto data.json: {e}"));
        assert_eq!(
            response.status,
            200,
            "moto data.json answered {}: {}",
            response.status,
            response.text()
        );
        serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("moto data.json is not JSON ({e}): {}", response.text()))
    }

    /// Every AssumeRole moto answered, in order.
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        #[derive(Deserialize)]
        struct AssumedRole {
            role_arn: String,
            session_name: String,
            external_id: Option<String>,
            access_key_id: Option<String>,
        }
        let data = self.data_json();
        let Some(roles) = data.pointer("/sts/AssumedRole") else {
            return Vec::new();
        };
        let roles: Vec<AssumedRole> = serde_json::from_value(roles.clone())
            .unwrap_or_else(|e| panic!("unexpected sts.AssumedRole shape in data.json: {e}"));
        roles
            .into_iter()
            .map(|r| AssumeRoleCall {
                role_arn: r.role_arn,
                session_name: r.session_name,
                external_id: r.external_id,
                duration: None,
                access_key_id: r.access_key_id,
            })
            .collect()
    }

    /// Forgets all state (`POST /moto-api/reset`).
    pub fn reset(&self) {
        let response = self
            .runtime
            .request(
                self.addr,
                HttpRequest::post("/moto-api/reset"),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("moto reset: {e}"));
        assert_eq!(response.status, 200, "moto reset: {}", response.text());
    }
}

fn keep_tail(mut stream: Box<dyn Read + Send>, log: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut log = log.lock().expect("log");
                log.extend_from_slice(&buf[..n]);
                if log.len() > LOG_KEEP {
                    let cut = log.len() - LOG_KEEP;
                    log.drain(..cut);
                }
            }
        }
    }
}
