//! Sends one packet to a metadata address without ever calling connect(): what a pod with
//! CAP_NET_RAW could do to get past a connect-time rewrite. Prints one JSON line
//! `{"ok":bool,"error":str|null}`.
//!
//! ```text
//! k2i-raw syn   <src-ip> <dst-ip> <port>              raw IPv4 socket, a TCP SYN
//! k2i-raw udp   <dst-ip> <port>                        unconnected UDP datagram (v4 or v6)
//! k2i-raw frame <ifname> <dst-mac> <src-ip> <dst-ip> <port>   AF_PACKET Ethernet+IPv4+UDP frame
//! ```

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
};

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
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&12345u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let addr = sockaddr_in(dst, 0);
    send_and_close(fd, &tcp, &addr)
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
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut packet = Vec::with_capacity(14 + ip_len);
    packet.extend_from_slice(&dst_mac);
    packet.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // locally administered source
    packet.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = libc::IPPROTO_UDP as u8;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&ip);
    packet.extend_from_slice(&40001u16.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    packet.extend_from_slice(payload);
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
            frame(ifname, mac, ip(src)?, ip(dst)?, port(p)?).map_err(|e| e.to_string())
        }
        _ => Err(format!("usage: see the source; got {args:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => println!("{{\"ok\":true,\"error\":null}}"),
        Err(e) => println!("{{\"ok\":false,\"error\":{:?}}}", e),
    }
}
