//! Tiny HTTP servers inside the node namespace that record who called them: the IMDS stand-in
//! (the node's real metadata service) and the agent stand-in (at the node's host IP).

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use crate::{
    AGENT_PORT, HOST_IP4, HOST_IP6, METADATA_IP4, METADATA_IP6, METADATA_PORT, Pod, TestNode,
    process::enter_netns_on_this_thread,
};

/// How often the accept loop looks at its stop flag.
const POLL_MS: libc::c_int = 50;

struct Running {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

/// An HTTP server in a network namespace, listening on a fixed set of addresses. It answers any
/// request with `200 OK`, body `<label> peer=<peer ip>` and `Connection: close`, and records the
/// peer of every accepted connection (at accept time, before reading anything).
pub struct HttpStub {
    label: &'static str,
    netns: PathBuf,
    addrs: Vec<SocketAddr>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    running: Option<Running>,
}

impl HttpStub {
    /// Starts listening on `addrs` inside the namespace at `netns`; panics if a bind fails.
    pub fn start(label: &'static str, netns: &Path, addrs: &[SocketAddr]) -> Self {
        let mut stub = Self {
            label,
            netns: netns.to_owned(),
            addrs: addrs.to_vec(),
            peers: Arc::default(),
            running: None,
        };
        stub.restart();
        stub
    }

    /// The addresses it listens on (while running).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Closes the listeners: connects to its addresses are then refused.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::SeqCst);
            if running.thread.join().is_err() {
                panic!("{} accept loop panicked", self.label);
            }
        }
    }

    /// Listens again on the same addresses (no-op if running). Recorded peers are kept.
    pub fn restart(&mut self) {
        if self.running.is_some() {
            return;
        }
        let (bound_tx, bound_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let netns = self.netns.clone();
        let addrs = self.addrs.clone();
        let peers = Arc::clone(&self.peers);
        let label = self.label;
        let stop_flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("{label}-accept"))
            .spawn(move || {
                let listeners = match bind_in(&netns, &addrs) {
                    Ok(listeners) => {
                        let _ = bound_tx.send(Ok(()));
                        listeners
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                accept_loop(label, &listeners, &peers, &stop_flag);
            })
            .expect("cannot spawn a stub thread");
        match bound_rx.recv() {
            Ok(Ok(())) => self.running = Some(Running { stop, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("{label}: {e}");
            }
            Err(_) => {
                let _ = thread.join();
                panic!("{label}: the accept thread ended before binding");
            }
        }
    }

    /// Every peer it accepted a connection from, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }

    /// The peers' IP addresses (IPv4-mapped forms shown as IPv4).
    pub fn peer_ips(&self) -> Vec<IpAddr> {
        self.peers().iter().map(|p| p.ip().to_canonical()).collect()
    }

    /// Whether it ever accepted a connection from `ip`.
    pub fn saw(&self, ip: IpAddr) -> bool {
        self.peer_ips().contains(&ip.to_canonical())
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.peers.lock().expect("peers lock").len()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::SeqCst);
            let _ = running.thread.join();
        }
    }
}

fn bind_in(netns: &Path, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    enter_netns_on_this_thread(netns)
        .map_err(|e| format!("cannot enter network namespace {}: {e}", netns.display()))?;
    addrs
        .iter()
        .map(|addr| {
            let listener =
                TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make the listener on {addr} non-blocking: {e}"))?;
            Ok(listener)
        })
        .collect()
}

fn accept_loop(
    label: &'static str,
    listeners: &[TcpListener],
    peers: &Arc<Mutex<Vec<SocketAddr>>>,
    stop: &AtomicBool,
) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if n <= 0 {
            continue;
        }
        for (listener, fd) in listeners.iter().zip(&mut fds) {
            if fd.revents == 0 {
                continue;
            }
            fd.revents = 0;
            while let Ok((stream, peer)) = listener.accept() {
                peers.lock().expect("peers lock").push(peer);
                let _ = thread::Builder::new()
                    .name(format!("{label}-conn"))
                    .spawn(move || serve(label, stream, peer));
            }
        }
    }
}

fn serve(label: &str, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65_536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{label} peer={}", peer.ip().to_canonical());
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
    // Let the client see the FIN before the socket closes.
    let _ = stream.read(&mut buf);
}

/// The agent stand-in: listens in the node namespace at 192.0.2.10:<port> and
/// [fd00:192::10]:<port> (the node's host IPs), answering `agent-stub peer=<peer ip>`.
pub struct AgentStub {
    http: HttpStub,
}

impl AgentStub {
    /// On the default agent port 8181.
    pub fn start(node: &TestNode) -> Self {
        Self::start_on(node, AGENT_PORT)
    }

    pub fn start_on(node: &TestNode, port: u16) -> Self {
        let addrs = [
            SocketAddr::new(IpAddr::V4(HOST_IP4), port),
            SocketAddr::new(IpAddr::V6(HOST_IP6), port),
        ];
        Self {
            http: HttpStub::start("agent-stub", &node.netns_path(), &addrs),
        }
    }

    pub fn port(&self) -> u16 {
        self.http.addrs()[0].port()
    }

    /// Closes its listeners; the port is then refused.
    pub fn stop(&mut self) {
        self.http.stop();
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        self.http.restart();
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.http.peers()
    }

    pub fn peer_ips(&self) -> Vec<IpAddr> {
        self.http.peer_ips()
    }

    pub fn saw(&self, ip: IpAddr) -> bool {
        self.http.saw(ip)
    }

    pub fn connections(&self) -> usize {
        self.http.connections()
    }
}

/// The IMDS stand-in: the node's "real" metadata service at 169.254.169.254:80 and
/// [fd00:ec2::254]:80 in the node namespace, answering `imds-stub peer=<peer ip>`. A pod that
/// reaches it was not intercepted.
pub struct ImdsStub {
    http: HttpStub,
}

impl ImdsStub {
    pub fn start(node: &TestNode) -> Self {
        let addrs = [
            SocketAddr::new(IpAddr::V4(METADATA_IP4), METADATA_PORT),
            SocketAddr::new(IpAddr::V6(METADATA_IP6), METADATA_PORT),
        ];
        Self {
            http: HttpStub::start("imds-stub", &node.metadata_netns_path(), &addrs),
        }
    }

    /// Every caller's address, in order.
    pub fn callers(&self) -> Vec<SocketAddr> {
        self.http.peers()
    }

    pub fn caller_ips(&self) -> Vec<IpAddr> {
        self.http.peer_ips()
    }

    pub fn saw(&self, ip: IpAddr) -> bool {
        self.http.saw(ip)
    }

    /// Panics if any of `pods` ever reached the metadata service: an interception leak.
    pub fn assert_no_pod_seen(&self, pods: &[&Pod<'_>]) {
        let callers = self.caller_ips();
        for pod in pods {
            let leaked: Vec<_> = callers.iter().filter(|ip| pod.owns(**ip)).collect();
            assert!(
                leaked.is_empty(),
                "LEAK: pod {} ({} / {}) reached the node's metadata service directly; IMDS \
                 callers: {callers:?}",
                pod.name(),
                pod.ip4(),
                pod.ip6()
            );
        }
    }
}
