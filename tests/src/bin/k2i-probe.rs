//! k2i-probe: one HTTP/1.0 metadata request over a raw socket, reported as one JSON line.
//!
//! Run inside a pod. `--addr <ip:port>` (IPv6 as `[..]:port`), `--socket inet|inet6` (default by
//! the address family; `inet6` with an IPv4-mapped address clears IPV6_V6ONLY), `--fastopen`
//! (send the request with `sendto(MSG_FASTOPEN)` instead of `connect()`), `--hold` (once
//! connected, print `connected <local ip:port>` on stderr and wait for stdin to close before
//! sending the request: the connection stays open while a test looks at the kernel's state).
//! Prints `{"ok":..,"errno":..,"error":..,"peer":..,"body":..}` and exits 0 also when the
//! connection fails: the JSON tells.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::ExitCode,
};

use kube2iam_tests::ProbeResult;

const REQUEST: &[u8] =
    b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\nHost: x\r\n\r\n";
const TIMEOUT_SECS: libc::time_t = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Inet,
    Inet6,
}

struct Args {
    addr: SocketAddr,
    family: Family,
    fastopen: bool,
    hold: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut addr = None;
    let mut family = None;
    let mut fastopen = false;
    let mut hold = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                let value = args.next().ok_or("--addr needs a value")?;
                addr = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--addr {value}: {e}"))?,
                );
            }
            "--socket" => {
                family = Some(match args.next().as_deref() {
                    Some("inet") => Family::Inet,
                    Some("inet6") => Family::Inet6,
                    other => return Err(format!("--socket inet|inet6, not {other:?}")),
                });
            }
            "--fastopen" => fastopen = true,
            "--hold" => hold = true,
            "-h" | "--help" => {
                return Err(
                    "usage: k2i-probe --addr <ip:port> [--socket inet|inet6] [--fastopen] [--hold]"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let addr = addr.ok_or("--addr is required")?;
    let family = family.unwrap_or(match addr {
        SocketAddr::V4(_) => Family::Inet,
        SocketAddr::V6(_) => Family::Inet6,
    });
    Ok(Args {
        addr,
        family,
        fastopen,
        hold,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("k2i-probe: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{}", probe(&args).to_json());
    ExitCode::SUCCESS
}

/// A failed call: its errno and a description naming the call.
struct Failure {
    errno: Option<i32>,
    error: String,
}

impl Failure {
    fn os(call: &str) -> Self {
        let e = io::Error::last_os_error();
        Self {
            errno: e.raw_os_error(),
            error: format!("{call}: {e}"),
        }
    }
}

fn probe(args: &Args) -> ProbeResult {
    let mut result = ProbeResult::default();
    match run(args, &mut result) {
        Ok(()) => result.ok = true,
        Err(failure) => {
            result.errno = failure.errno;
            result.error = Some(failure.error);
        }
    }
    result
}

fn run(args: &Args, result: &mut ProbeResult) -> Result<(), Failure> {
    let (storage, len) = sockaddr(args.addr, args.family)?;
    let domain = match args.family {
        Family::Inet => libc::AF_INET,
        Family::Inet6 => libc::AF_INET6,
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Failure::os("socket"));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = sock.as_raw_fd();
    if args.family == Family::Inet6 {
        let mapped = matches!(args.addr.ip(), IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some());
        if mapped {
            setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                &0 as &libc::c_int,
            )?;
        }
    }
    let timeout = libc::timeval {
        tv_sec: TIMEOUT_SECS,
        tv_usec: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;

    let sa = (&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
    let mut sent = 0;
    if args.fastopen {
        // SAFETY: `sa`/`len` describe a valid sockaddr; REQUEST is a valid buffer.
        let n = unsafe {
            libc::sendto(
                fd,
                REQUEST.as_ptr().cast(),
                REQUEST.len(),
                libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
                sa,
                len,
            )
        };
        if n < 0 {
            return Err(Failure::os("sendto(MSG_FASTOPEN)"));
        }
        sent = n as usize;
    } else {
        // SAFETY: as above.
        if unsafe { libc::connect(fd, sa, len) } != 0 {
            return Err(Failure::os("connect"));
        }
    }
    result.peer = peer_name(fd);
    if args.hold {
        hold(fd)?;
    }
    while sent < REQUEST.len() {
        let rest = &REQUEST[sent..];
        // SAFETY: `rest` is a valid buffer.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(Failure::os("send"));
        }
        sent += n as usize;
    }
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    let read = loop {
        // SAFETY: `buf` is a valid buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        match n {
            0 => break Ok(()),
            n if n > 0 => body.extend_from_slice(&buf[..n as usize]),
            _ => break Err(Failure::os("recv")),
        }
    };
    if result.peer.is_none() {
        // A Fast Open socket may still have been connecting right after sendto.
        result.peer = peer_name(fd);
    }
    if !body.is_empty() || read.is_ok() {
        result.body = Some(String::from_utf8_lossy(&body).into_owned());
    }
    read
}

/// Reports the connected socket's local address on stderr, then waits until stdin closes.
fn hold(fd: libc::c_int) -> Result<(), Failure> {
    use std::io::{Read as _, Write as _};
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for `len` bytes.
    if unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &mut len) } != 0 {
        return Err(Failure::os("getsockname"));
    }
    let local = socket_addr(&storage).ok_or_else(|| Failure {
        errno: None,
        error: "getsockname: not an IP address".into(),
    })?;
    let mut stderr = io::stderr();
    let _ = writeln!(stderr, "connected {local}");
    let _ = stderr.flush();
    let mut rest = Vec::new();
    let _ = io::stdin().read_to_end(&mut rest);
    Ok(())
}

fn setsockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> Result<(), Failure> {
    // SAFETY: `value` points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Failure::os("setsockopt"));
    }
    Ok(())
}

fn sockaddr(
    addr: SocketAddr,
    family: Family,
) -> Result<(libc::sockaddr_storage, libc::socklen_t), Failure> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    match (addr, family) {
        (SocketAddr::V4(v4), Family::Inet) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            Ok((storage, size_of::<libc::sockaddr_in>() as libc::socklen_t))
        }
        (SocketAddr::V6(v6), Family::Inet6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            Ok((storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t))
        }
        (SocketAddr::V4(v4), Family::Inet6) => Err(Failure {
            errno: None,
            error: format!(
                "an inet6 socket needs an IPv6 address; use [{}]:{} for the mapped form",
                v4.ip().to_ipv6_mapped(),
                v4.port()
            ),
        }),
        (SocketAddr::V6(v6), Family::Inet) => Err(Failure {
            errno: None,
            error: format!("an inet socket cannot reach {v6}"),
        }),
    }
}

fn peer_name(fd: libc::c_int) -> Option<String> {
    // SAFETY: plain data; zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for `len` bytes.
    let rc = unsafe { libc::getpeername(fd, (&raw mut storage).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    socket_addr(&storage).map(|addr| addr.to_string())
}

/// The IP address and port in a socket address the kernel wrote.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}
