//! Watches what reaches the node's metadata addresses without a connect(): a raw TCP socket and
//! UDP listeners on 169.254.169.254 / fd00:ec2::254 port [`WATCH_PORT`], inside the node. They
//! see packets after tc ingress, so a packet the guard dropped never shows up here, and one it
//! missed always does.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{METADATA_IP4, METADATA_IP6, TestNode, process::enter_netns_on_this_thread};

/// The port raw test packets go to (nothing serves it; the watchers see the packets).
pub const WATCH_PORT: u16 = 9999;

/// One packet that reached the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `tcp` (raw socket), `udp` or `udp6`.
    pub kind: &'static str,
    pub src: IpAddr,
}

pub struct PacketWatch {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn raw_tcp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(owned)
}

impl PacketWatch {
    /// Watches where `node`'s metadata service lives.
    pub fn start(node: &TestNode) -> PacketWatch {
        Self::start_in(&node.metadata_netns_path())
    }

    /// Watches in the network namespace at `netns` (which must hold the metadata addresses).
    pub fn start_in(netns: &std::path::Path) -> PacketWatch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for kind in ["tcp", "udp", "udp6"] {
            let netns = netns.to_owned();
            let (seen, stop, ready) = (seen.clone(), stop.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                enter_netns_on_this_thread(&netns).expect("enter the node netns");
                let record = |src: IpAddr| seen.lock().expect("seen").push(Seen { kind, src });
                if kind == "tcp" {
                    let socket = raw_tcp_socket().expect("raw TCP socket in the node");
                    ready.send(()).expect("ready");
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::SeqCst) {
                        // SAFETY: reading into a local buffer from a valid fd.
                        let n = unsafe {
                            libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                        };
                        if n < 20 {
                            continue;
                        }
                        let ihl = usize::from(buf[0] & 0x0f) * 4;
                        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                        let port = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
                        if dst == METADATA_IP4 && port == WATCH_PORT {
                            record(IpAddr::V4(Ipv4Addr::new(
                                buf[12], buf[13], buf[14], buf[15],
                            )));
                        }
                    }
                } else {
                    let ip: IpAddr = if kind == "udp" {
                        METADATA_IP4.into()
                    } else {
                        METADATA_IP6.into()
                    };
                    let socket = UdpSocket::bind(SocketAddr::new(ip, WATCH_PORT))
                        .expect("UDP watcher in the node");
                    socket
                        .set_read_timeout(Some(Duration::from_millis(100)))
                        .expect("timeout");
                    ready.send(()).expect("ready");
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((_, from)) = socket.recv_from(&mut buf) {
                            record(from.ip().to_canonical());
                        }
                    }
                }
            }));
        }
        for _ in 0..3 {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("packet watchers ready");
        }
        PacketWatch {
            seen,
            stop,
            threads,
        }
    }

    /// Packets from `src` seen so far.
    /// The kinds of what arrived from the pod's IPv4 and IPv6 addresses, sorted.
    pub fn kinds_from(&self, pod: &crate::Pod<'_>) -> Vec<&'static str> {
        let mut kinds: Vec<_> = self
            .seen_from(IpAddr::V4(pod.ip4()))
            .into_iter()
            .chain(self.seen_from(IpAddr::V6(pod.ip6())))
            .map(|s| s.kind)
            .collect();
        kinds.sort();
        kinds
    }

    pub fn seen_from(&self, src: IpAddr) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.src == src)
            .cloned()
            .collect()
    }
}

impl Drop for PacketWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
