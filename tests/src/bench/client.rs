//! `k2i-bench-client`: what runs inside a pod (or on the node) during `cargo xtask bench`.
//!
//! Every mode is bounded by a count or a deadline and ends by itself. Results go to stdout as
//! lines of space-separated words that [`super::parse`] reads back; times are CLOCK_MONOTONIC
//! nanoseconds, which every process on the machine shares, so the runner can line them up with
//! what it did (adding a pod, killing the agent).
//!
//! - `connect --addr IP:PORT --count N [--bind IP] [--cpu N]`: N connects (after a short
//!   warm-up), the time each `connect()` call takes; the socket is then reset (SO_LINGER 0) so no
//!   TIME_WAIT piles up. `--cpu` pins the client to one CPU. Prints `samples <ns> …`.
//! - `get --addr IP:PORT --path P --threads T --millis D [--bind IP,…]`: T threads each doing
//!   GET requests on a new TCP connection per request (`Connection: close`, as SDKs do) until
//!   the deadline; latency = socket + connect + request + whole response. Prints `summary …`
//!   and `samples <ns> …`.
//! - `herd --addr IP:PORT --path P --conns N --bind IP,…`: opens N connections first, then sends
//!   the N requests at once and waits for every answer. Prints `herd …` and `samples <ns> …`
//!   (completion times from the first send).
//! - `plan --addr IP:PORT --item IP@AT_NS …`: for each item, at monotonic time AT_NS (0: now),
//!   GET the credential listing and then the credentials it names, as an SDK does. Prints one
//!   `first IP <lateness ns> <listing status> <credentials status> <listing ns> <credentials
//!   ns>` line per item.
//! - `steady --addr IP:PORT --bind IP,… --interval-ms I --millis D [--credentials-only 1]`: one
//!   thread per source address; every I ms, the credential listing and then the credentials it
//!   names (a new connection each; with `--credentials-only 1` the listing only until it
//!   answered), until the deadline. Prints one `ev IP <start ns> <end ns> <code>
//!   <node-key>` line per request; code is the HTTP status or minus the errno of the failed
//!   call, node-key 1 if the answer carried the node's access key.
//! - `get … --pattern sdk`: each iteration is what an AWS SDK does to fetch credentials with
//!   IMDSv2, each request on a new connection: `PUT /latest/api/token`, the credential listing
//!   with the token, then the credentials of the role it names. The sample is the whole sequence.
//! - `open --addr IP:PORT --pattern keepalive|sdk --path P --rate R --millis D --conns C [--bind
//!   IP,…]`: open-loop load at R requests (or SDK sequences) per second: request i is due at
//!   start + i/R whatever happened to the ones before, spread over C threads (each with one
//!   keep-alive connection for `keepalive`). Latency runs from when a request was due, not from
//!   when it could be sent, so a stall counts against every request it delays (no coordinated
//!   omission). Prints `summary …` and `samples <ns> …`.
//! - `spin --cpu N --millis D`: keeps CPU N busy until the deadline (run it at SCHED_IDLE: it
//!   then only fills time nobody else wants, so the CPU never goes idle).
//! - `btf`: what parsing the kernel's BTF costs, as aya's `EbpfLoader::new()` does on every
//!   program load: prints `btf bytes=<size of /sys/kernel/btf/vmlinux> parse_ns=… hwm_before_kib=…
//!   hwm_after_kib=…`.
//! - `floor --listen IP:PORT --body-file F --seconds S`: the floor of the latency comparison, a
//!   bare hyper server answering every request with the bytes of F (`text/plain`), on a
//!   multi-threaded tokio runtime like the agent's; `--route PATH=FILE` (repeatable) answers
//!   PATH with another file's bytes. Prints `listening` and stops after S s.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::{self, Read, Write},
    mem::size_of,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::mono_ns;
use crate::{NODE_ACCESS_KEY_ID, e2e::CREDS};

/// Connects before the measured ones, so caches and the agent's accept path are warm.
const CONNECT_WARMUP: usize = 50;
/// Per-call socket timeout of the blocking clients.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the mode named by the first argument. Errors are printed by the caller.
pub fn main_with_args(args: &[String]) -> Result<(), String> {
    let (mode, rest) = args.split_first().ok_or(
        "usage: k2i-bench-client connect|get|open|herd|plan|steady|floor|btf [--flag value]…",
    )?;
    let flags = Flags::parse(rest)?;
    match mode.as_str() {
        "connect" => connect_mode(&flags),
        "get" => get_mode(&flags),
        "open" => open_mode(&flags),
        "herd" => herd_mode(&flags),
        "plan" => plan_mode(&flags),
        "steady" => steady_mode(&flags),
        "floor" => floor_mode(&flags),
        "btf" => btf_mode(),
        "spin" => spin_mode(&flags),
        other => Err(format!("unknown mode {other:?}")),
    }
}

/// `--name value` pairs; a name may repeat.
struct Flags(HashMap<String, Vec<String>>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let name = name
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --flag, got {name:?}"))?;
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            map.entry(name.to_owned()).or_default().push(value.clone());
        }
        Ok(Self(map))
    }

    fn opt(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.last()).map(String::as_str)
    }

    fn get(&self, name: &str) -> Result<&str, String> {
        self.opt(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }

    fn parse_as<T: std::str::FromStr>(&self, name: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.get(name)?;
        value
            .parse()
            .map_err(|e| format!("--{name} {value:?}: {e}"))
    }

    fn addr(&self) -> Result<SocketAddrV4, String> {
        self.parse_as("addr")
    }

    /// `--bind a,b,c`: source addresses (none: the kernel picks).
    fn binds(&self) -> Result<Vec<Option<Ipv4Addr>>, String> {
        match self.opt("bind") {
            None => Ok(vec![None]),
            Some(list) => list
                .split(',')
                .map(|ip| {
                    ip.parse()
                        .map(Some)
                        .map_err(|e| format!("--bind {ip:?}: {e}"))
                })
                .collect(),
        }
    }
}

fn os_error(call: &str) -> String {
    format!("{call}: {}", io::Error::last_os_error())
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A fresh TCP socket, bound to `bind` (port 0) if given.
fn tcp_socket(bind: Option<Ipv4Addr>) -> Result<OwnedFd, (i32, String)> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err((errno(), os_error("socket")));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(ip) = bind {
        let sa = sockaddr_in(SocketAddrV4::new(ip, 0));
        // SAFETY: `sa` is a valid sockaddr_in of the given length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const sa).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err((errno(), os_error(&format!("bind {ip}"))));
        }
    }
    Ok(sock)
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn raw_connect(fd: libc::c_int, addr: SocketAddrV4) -> libc::c_int {
    let sa = sockaddr_in(addr);
    // SAFETY: `sa` is a valid sockaddr_in of the given length.
    unsafe {
        libc::connect(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    }
}

fn set_linger_zero(fd: libc::c_int) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct linger of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn print_samples(samples: &[u64]) {
    let mut line = String::with_capacity(samples.len() * 8 + 8);
    line.push_str("samples");
    for s in samples {
        line.push(' ');
        line.push_str(&s.to_string());
    }
    println!("{line}");
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(tid: libc::pid_t, cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write into it; sched_setaffinity reads
    // it for the given size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(os_error(&format!("sched_setaffinity to CPU {cpu}")));
        }
    }
    Ok(())
}

fn connect_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let count: usize = flags.parse_as("count")?;
    let bind = flags.binds()?[0];
    if let Some(cpu) = flags.opt("cpu") {
        let cpu = cpu.parse().map_err(|e| format!("--cpu {cpu}: {e}"))?;
        pin_to_cpu(0, cpu)?;
    }
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + CONNECT_WARMUP {
        let sock = tcp_socket(bind).map_err(|(_, e)| e)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let t0 = mono_ns();
        let rc = raw_connect(fd, addr);
        let t1 = mono_ns();
        if rc != 0 {
            return Err(os_error(&format!("connect {addr}")));
        }
        set_linger_zero(fd);
        drop(sock);
        if i >= CONNECT_WARMUP {
            samples.push(t1 - t0);
        }
    }
    print_samples(&samples);
    Ok(())
}

/// The request every mode sends: HTTP/1.1 with `Connection: close` (one request per
/// connection), Host as the SDKs send it.
fn request_bytes(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// The status code of a whole HTTP/1.x response.
fn status_of(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The body of a whole HTTP/1.x response (after the blank line).
fn body_of(response: &[u8]) -> &[u8] {
    response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |i| &response[i + 4..])
}

/// One GET on a new connection; the whole response, or (-errno, description).
fn blocking_get(
    bind: Option<Ipv4Addr>,
    addr: SocketAddrV4,
    request: &[u8],
) -> Result<Vec<u8>, (i32, String)> {
    let sock = tcp_socket(bind)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    if raw_connect(fd, addr) != 0 {
        return Err((errno(), os_error(&format!("connect {addr}"))));
    }
    let mut stream = TcpStream::from(sock);
    let io_err = |call: &str, e: io::Error| (e.raw_os_error().unwrap_or(0), format!("{call}: {e}"));
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| io_err("SO_RCVTIMEO", e))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| io_err("SO_SNDTIMEO", e))?;
    stream.write_all(request).map_err(|e| io_err("send", e))?;
    let mut response = Vec::with_capacity(2048);
    stream
        .read_to_end(&mut response)
        .map_err(|e| io_err("recv", e))?;
    Ok(response)
}

/// What one iteration of a load does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    /// One GET of `--path` on a new connection (`Connection: close`).
    Get,
    /// One GET of `--path` over the thread's kept-alive connection.
    KeepAlive,
    /// The SDK's IMDSv2 credential fetch: token PUT, listing, credentials; a connection each.
    Sdk,
}

impl Flags {
    fn pattern(&self) -> Result<Pattern, String> {
        match self.opt("pattern") {
            None | Some("get") => Ok(Pattern::Get),
            Some("keepalive") => Ok(Pattern::KeepAlive),
            Some("sdk") => Ok(Pattern::Sdk),
            Some(other) => Err(format!(
                "--pattern {other:?}: expected get, keepalive or sdk"
            )),
        }
    }
}

const TOKEN_PATH: &str = "/latest/api/token";

fn token_request() -> Vec<u8> {
    format!(
        "PUT {TOKEN_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n\
         X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes()
}

fn get_with_token(path: &str, token: &[u8]) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n").into_bytes();
    request.extend_from_slice(b"X-aws-ec2-metadata-token: ");
    request.extend_from_slice(token);
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    request
}

fn keepalive_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n").into_bytes()
}

/// One SDK credential fetch (IMDSv2): token, listing, credentials, a new connection each.
/// `Ok(())` when all three answered 200; else the first failure.
fn sdk_sequence(bind: Option<Ipv4Addr>, addr: SocketAddrV4) -> Result<(), String> {
    let exchange = |what: &str, request: &[u8]| -> Result<Vec<u8>, String> {
        let response =
            blocking_get(bind, addr, request).map_err(|(_, e)| format!("{what}: {e}"))?;
        if status_of(&response) == Some(200) {
            Ok(response)
        } else {
            Err(format!(
                "{what}: {}",
                String::from_utf8_lossy(&response[..response.len().min(200)])
            ))
        }
    };
    let token = exchange("token PUT", &token_request())?;
    let token = body_of(&token).to_vec();
    let listing = exchange("listing", &get_with_token(CREDS, &token))?;
    let role = String::from_utf8_lossy(body_of(&listing)).trim().to_owned();
    exchange(
        "credentials",
        &get_with_token(&format!("{CREDS}{role}"), &token),
    )
    .map(drop)
}

/// A thread's state across iterations: its kept-alive connection and read buffer.
struct Worker {
    pattern: Pattern,
    addr: SocketAddrV4,
    close: Arc<[u8]>,
    keepalive: Arc<[u8]>,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Worker {
    fn new(pattern: Pattern, addr: SocketAddrV4, path: &str) -> Self {
        Self {
            pattern,
            addr,
            close: request_bytes(path).into(),
            keepalive: keepalive_request(path).into(),
            conn: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// One iteration from `bind`.
    fn iteration(&mut self, bind: Option<Ipv4Addr>) -> Result<(), String> {
        match self.pattern {
            Pattern::Sdk => sdk_sequence(bind, self.addr),
            Pattern::Get => match blocking_get(bind, self.addr, &self.close) {
                Ok(response) if status_of(&response) == Some(200) => Ok(()),
                Ok(response) => {
                    Err(String::from_utf8_lossy(&response[..response.len().min(200)]).into_owned())
                }
                Err((_, e)) => Err(e),
            },
            Pattern::KeepAlive => {
                if self.conn.is_none() {
                    self.conn = Some(keepalive_connect(bind, self.addr)?);
                }
                let stream = self.conn.as_mut().ok_or("no connection")?;
                let status = stream
                    .write_all(&self.keepalive)
                    .and_then(|()| read_keepalive_response(stream, &mut self.buf))
                    .map_err(|e| format!("keep-alive request: {e}"));
                match status {
                    Ok(200) => Ok(()),
                    Ok(other) => Err(format!("status {other}")),
                    Err(e) => {
                        self.conn = None;
                        Err(e)
                    }
                }
            }
        }
    }
}

fn get_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let pattern = flags.pattern()?;
    let path = match pattern {
        Pattern::Get | Pattern::KeepAlive => flags.get("path")?.to_owned(),
        Pattern::Sdk => String::new(),
    };
    let threads: usize = flags.parse_as("threads")?;
    let millis: u64 = flags.parse_as("millis")?;
    let binds = flags.binds()?;
    let start = mono_ns();
    let deadline = start + millis * 1_000_000;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let bind = binds[t % binds.len()];
            let mut worker = Worker::new(pattern, addr, &path);
            std::thread::spawn(move || {
                let mut samples = Vec::with_capacity(16 * 1024);
                let mut errors = 0u64;
                let mut first_error = None;
                let run_delay0 = own_run_delay_ns();
                while mono_ns() < deadline {
                    let t0 = mono_ns();
                    let outcome = worker.iteration(bind);
                    let t1 = mono_ns();
                    match outcome {
                        Ok(()) => samples.push(t1 - t0),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                let run_delay = own_run_delay_ns().saturating_sub(run_delay0);
                (samples, errors, first_error, run_delay)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut run_delay = 0;
    for worker in workers {
        let (s, e, f, d) = worker
            .join()
            .map_err(|_| "a client thread panicked".to_owned())?;
        samples.extend(s);
        errors += e;
        run_delay += d;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = mono_ns() - start;
    println!(
        "summary requests={} errors={errors} elapsed_ns={elapsed} run_delay_ns={run_delay}",
        samples.len()
    );
    if let Some(e) = first_error {
        println!("error {}", e.replace('\n', " "));
    }
    print_samples(&samples);
    Ok(())
}

/// How long the calling thread has waited on a run queue (runnable, not running) so far:
/// the second field of /proc/thread-self/schedstat, in ns.
fn own_run_delay_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Sleeps until CLOCK_MONOTONIC reaches `at_ns` (at once if it has).
fn sleep_until(at_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: an absolute sleep on CLOCK_MONOTONIC with a valid timespec; EINTR just returns
    // early and the loop sleeps again.
    while mono_ns() < at_ns
        && unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        } == libc::EINTR
    {}
}

/// Timer slack of the calling thread: 1 ns instead of the default 50 µs, so an open-loop
/// request leaves when it is due.
fn tight_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) with a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// The status of one HTTP/1.1 response read from a kept-alive connection: the headers, then
/// Content-Length bytes of body.
fn read_keepalive_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    status_of(buf).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))
}

fn keepalive_connect(bind: Option<Ipv4Addr>, addr: SocketAddrV4) -> Result<TcpStream, String> {
    let sock = tcp_socket(bind).map_err(|(_, e)| e)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    if raw_connect(fd, addr) != 0 {
        return Err(os_error(&format!("connect {addr}")));
    }
    let stream = TcpStream::from(sock);
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(stream)
}

fn open_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let pattern = flags.pattern()?;
    let rate: f64 = flags.parse_as("rate")?;
    let millis: u64 = flags.parse_as("millis")?;
    let conns: usize = flags.parse_as("conns")?;
    let binds = flags.binds()?;
    if rate <= 0.0 || conns == 0 {
        return Err("--rate and --conns must be positive".into());
    }
    let path = match pattern {
        Pattern::Get | Pattern::KeepAlive => flags.get("path")?.to_owned(),
        Pattern::Sdk => String::new(),
    };
    let period = 1e9 / rate;
    let total = (millis as f64 * 1e6 / period) as u64;
    // The threads start first; the schedule begins once they are all waiting.
    let start = mono_ns() + 50_000_000;
    let workers: Vec<_> = (0..conns)
        .map(|k| {
            let binds = binds.clone();
            let mut worker = Worker::new(pattern, addr, &path);
            std::thread::spawn(move || {
                tight_timer_slack();
                let mut samples = Vec::with_capacity((total as usize / conns) + 1);
                let (mut errors, mut late) = (0u64, 0u64);
                let mut first_error: Option<String> = None;
                for i in (k as u64..total).step_by(conns) {
                    let due = start + (i as f64 * period) as u64;
                    sleep_until(due);
                    late += u64::from(mono_ns() > due + 1_000_000);
                    let outcome = worker.iteration(binds[i as usize % binds.len()]);
                    let done = mono_ns();
                    match outcome {
                        Ok(()) => samples.push(done - due),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (samples, errors, late, first_error)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let (mut errors, mut late) = (0, 0);
    let mut first_error = None;
    for worker in workers {
        let (s, e, l, f) = worker
            .join()
            .map_err(|_| "a client thread panicked".to_owned())?;
        samples.extend(s);
        errors += e;
        late += l;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = mono_ns().saturating_sub(start);
    println!(
        "summary requests={} errors={errors} late={late} elapsed_ns={elapsed} offered={total}",
        samples.len()
    );
    if let Some(e) = first_error {
        println!("error {}", e.replace('\n', " "));
    }
    print_samples(&samples);
    Ok(())
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))
}

async fn async_connect(
    bind: Option<Ipv4Addr>,
    addr: SocketAddrV4,
) -> Result<tokio::net::TcpStream, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = bind {
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    socket
        .connect(SocketAddr::V4(addr))
        .await
        .map_err(|e| format!("connect {addr} from {bind:?}: {e}"))
}

async fn async_exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
) -> Result<Vec<u8>, String> {
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::with_capacity(2048);
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("recv: {e}"))?;
    Ok(response)
}

/// The `AccessKeyId` of a credentials document, if the body is one.
fn access_key(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["AccessKeyId"].as_str().map(str::to_owned)
}

fn herd_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let path = flags.get("path")?.to_owned();
    let conns: usize = flags.parse_as("conns")?;
    let binds = flags.binds()?;
    let runtime = current_thread_runtime()?;
    runtime.block_on(async move {
        let mut streams = Vec::with_capacity(conns);
        for i in 0..conns {
            streams.push(async_connect(binds[i % binds.len()], addr).await?);
        }
        let request: Arc<[u8]> = request_bytes(&path).into();
        let start = mono_ns();
        let mut tasks = tokio::task::JoinSet::new();
        for mut stream in streams {
            let request = Arc::clone(&request);
            tasks.spawn(async move {
                let response = async_exchange(&mut stream, &request).await;
                (mono_ns(), response)
            });
        }
        let mut samples = Vec::with_capacity(conns);
        let mut statuses: HashMap<u16, usize> = HashMap::new();
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut failures = 0usize;
        let mut node_key = 0usize;
        while let Some(joined) = tasks.join_next().await {
            let (done, response) = joined.map_err(|e| format!("a herd task failed: {e}"))?;
            samples.push(done - start);
            match response {
                Ok(response) => {
                    *statuses
                        .entry(status_of(&response).unwrap_or(0))
                        .or_default() += 1;
                    if let Some(key) = access_key(body_of(&response)) {
                        node_key += usize::from(key == NODE_ACCESS_KEY_ID);
                        *keys.entry(key).or_default() += 1;
                    }
                }
                Err(_) => failures += 1,
            }
        }
        let last = samples.iter().copied().max().unwrap_or(0);
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
        println!(
            "herd answered={} failures={failures} all_answered_ns={last} distinct_keys={} \
             node_key={node_key} statuses={}",
            samples.len(),
            keys.len(),
            statuses.join(",")
        );
        print_samples(&samples);
        Ok(())
    })
}

/// GET `path` on a new connection from `bind`: (status, body) or the error.
async fn async_get(
    bind: Option<Ipv4Addr>,
    addr: SocketAddrV4,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let mut stream = async_connect(bind, addr).await?;
    let response = async_exchange(&mut stream, &request_bytes(path)).await?;
    let status = status_of(&response).ok_or("no HTTP status line")?;
    Ok((status, body_of(&response).to_vec()))
}

fn plan_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let mut items = Vec::new();
    for item in flags.all("item") {
        let (ip, at) = item
            .split_once('@')
            .ok_or_else(|| format!("--item {item:?}: expected IP@AT_NS"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("--item {item:?}: {e}"))?;
        let at: u64 = at.parse().map_err(|e| format!("--item {item:?}: {e}"))?;
        items.push((ip, at));
    }
    let runtime = current_thread_runtime()?;
    runtime.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (ip, at) in items {
            tasks.spawn(async move {
                let now = mono_ns();
                if at > now {
                    tokio::time::sleep(Duration::from_nanos(at - now)).await;
                }
                let t0 = mono_ns();
                let lateness = if at == 0 { 0 } else { t0.saturating_sub(at) };
                let listing = async_get(Some(ip), addr, CREDS).await;
                let t1 = mono_ns();
                let (list_status, credentials_status, t2) = match listing {
                    Ok((200, body)) => {
                        let role = String::from_utf8_lossy(&body).trim().to_owned();
                        let path = format!("{CREDS}{role}");
                        let status = match async_get(Some(ip), addr, &path).await {
                            Ok((status, _)) => i64::from(status),
                            Err(_) => -1,
                        };
                        (200, status, mono_ns())
                    }
                    Ok((status, _)) => (i64::from(status), 0, t1),
                    Err(_) => (-1, 0, t1),
                };
                format!(
                    "first {ip} {lateness} {list_status} {credentials_status} {} {}",
                    t1 - t0,
                    t2 - t1
                )
            });
        }
        while let Some(line) = tasks.join_next().await {
            println!("{}", line.map_err(|e| format!("a plan task failed: {e}"))?);
        }
        Ok(())
    })
}

fn steady_mode(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr()?;
    let interval = Duration::from_millis(flags.parse_as("interval-ms")?);
    let millis: u64 = flags.parse_as("millis")?;
    // After the first listing, only the credentials (the role does not change): one request per
    // interval, so more sources can sample more densely for the same load.
    let credentials_only = flags.opt("credentials-only") == Some("1");
    let binds = flags.binds()?;
    let listing = Arc::new(request_bytes(CREDS));
    let deadline = mono_ns() + millis * 1_000_000;
    let workers: Vec<_> = binds
        .into_iter()
        .map(|bind| {
            let listing = Arc::clone(&listing);
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                let ip = bind.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
                let mut record = |t0: u64, outcome: &Result<Vec<u8>, (i32, String)>| {
                    let (code, node_key) = match outcome {
                        Ok(response) => (
                            i64::from(status_of(response).unwrap_or(0)),
                            access_key(body_of(response)).as_deref() == Some(NODE_ACCESS_KEY_ID),
                        ),
                        Err((errno, _)) => (-i64::from((*errno).max(1)), false),
                    };
                    lines.push(format!(
                        "ev {ip} {t0} {} {code} {}",
                        mono_ns(),
                        u8::from(node_key)
                    ));
                };
                let mut next = mono_ns();
                let mut known: Option<Vec<u8>> = None;
                while next < deadline {
                    // As an SDK: the listing names the role, then its credentials.
                    let request = match &known {
                        Some(request) if credentials_only => Some(request.clone()),
                        _ => {
                            let t0 = mono_ns();
                            let outcome = blocking_get(bind, addr, &listing);
                            record(t0, &outcome);
                            match &outcome {
                                Ok(response) if status_of(response) == Some(200) => {
                                    let role = String::from_utf8_lossy(body_of(response))
                                        .trim()
                                        .to_owned();
                                    Some(request_bytes(&format!("{CREDS}{role}")))
                                }
                                _ => None,
                            }
                        }
                    };
                    if let Some(request) = request {
                        let t1 = mono_ns();
                        record(t1, &blocking_get(bind, addr, &request));
                        known = Some(request);
                    }
                    next += interval.as_nanos() as u64;
                    let now = mono_ns();
                    if next > now {
                        std::thread::sleep(Duration::from_nanos(next - now));
                    }
                }
                lines
            })
        })
        .collect();
    let mut out = io::stdout().lock();
    for worker in workers {
        let lines = worker
            .join()
            .map_err(|_| "a client thread panicked".to_owned())?;
        for line in lines {
            writeln!(out, "{line}").map_err(|e| format!("stdout: {e}"))?;
        }
    }
    Ok(())
}

fn floor_mode(flags: &Flags) -> Result<(), String> {
    let listen: SocketAddr = flags.parse_as("listen")?;
    let body_file = flags.get("body-file")?;
    let seconds: u64 = flags.parse_as("seconds")?;
    let body =
        Bytes::from(std::fs::read(body_file).map_err(|e| format!("cannot read {body_file}: {e}"))?);
    let mut routes: HashMap<String, Bytes> = HashMap::new();
    for route in flags.all("route") {
        let (path, file) = route
            .split_once('=')
            .ok_or_else(|| format!("--route {route:?}: expected PATH=FILE"))?;
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        routes.insert(path.to_owned(), Bytes::from(bytes));
    }
    let routes = Arc::new(routes);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("listen on {listen}: {e}"))?;
        println!("listening {listen}");
        let serve = async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                let routes = Arc::clone(&routes);
                let service = service_fn(move |request: Request<Incoming>| {
                    let bytes = routes.get(request.uri().path()).unwrap_or(&body).clone();
                    let mut response = Response::new(Full::new(bytes));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain"),
                    );
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        // On a worker thread, as the agent's accept loop is (block_on's own thread would hand
        // every connection over to a worker). Bounded: the server stops by itself even if
        // nobody stops it.
        let _ = tokio::time::timeout(Duration::from_secs(seconds), tokio::spawn(serve)).await;
        Ok(())
    })
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn btf_mode() -> Result<(), String> {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let bytes = std::fs::metadata(VMLINUX)
        .map_err(|e| format!("{VMLINUX}: {e}"))?
        .len();
    let before = vm_hwm_kib();
    let t0 = mono_ns();
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("parse {VMLINUX}: {e}"))?;
    let parse = mono_ns() - t0;
    let after = vm_hwm_kib();
    drop(btf);
    println!("btf bytes={bytes} parse_ns={parse} hwm_before_kib={before} hwm_after_kib={after}");
    Ok(())
}

fn spin_mode(flags: &Flags) -> Result<(), String> {
    let cpu: usize = flags.parse_as("cpu")?;
    let millis: u64 = flags.parse_as("millis")?;
    pin_to_cpu(0, cpu)?;
    let deadline = mono_ns() + millis * 1_000_000;
    let mut spins = 0u64;
    while mono_ns() < deadline {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
    println!("spin cpu={cpu} loops={spins}");
    Ok(())
}
