//! The tc filters on an interface's ingress hook, in the order the kernel runs them, and the
//! removal of one: what aya 0.14 does not expose (rtnetlink RTM_GETTFILTER / RTM_DELTFILTER).

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the clsact qdisc's ingress hook.
const PARENT_INGRESS: u32 = 0xffff_fff2;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_TAG: u16 = 10;
const TCA_BPF_ID: u16 = 11;
const NLMSG_HDRLEN: usize = 16;
const TCMSG_LEN: usize = 20;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One filter on the ingress hook, as the dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// The protocol it matches, host order (`ETH_P_ALL` = 3).
    pub protocol: u16,
    pub handle: u32,
    pub chain: u32,
    /// The classifier kind (`bpf`, `u32`, `flower`, ...).
    pub kind: String,
    /// For `bpf`: the name given at attach (usually the program's).
    pub name: Option<String>,
    pub prog_id: Option<u32>,
    pub tag: Option<[u8; 8]>,
}

impl Filter {
    /// What an operator sees in `tc filter show`.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "{} filter pref {} handle {:#x}",
            self.kind, self.priority, self.handle
        );
        if let Some(name) = &self.name {
            out.push_str(&format!(" {name}"));
        }
        if let Some(id) = self.prog_id {
            out.push_str(&format!(" (program id {id})"));
        }
        out
    }
}

fn socket() -> io::Result<OwnedFd> {
    let fd = kube2iam_common::sys::route_socket(0)?;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: valid fd and option of the stated size; a read that never returns would hang a
    // sync.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn request(kind: u16, flags: u16, ifindex: u32, handle: u32, info: u32, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + TCMSG_LEN + attrs.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct tcmsg { u8 family, u8 pad, u16 pad, i32 ifindex, u32 handle, u32 parent, u32 info }
    buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    buf.extend_from_slice(&ifindex.to_ne_bytes());
    buf.extend_from_slice(&handle.to_ne_bytes());
    buf.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
    buf.extend_from_slice(&info.to_ne_bytes());
    buf.extend_from_slice(attrs);
    buf
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: sending a local buffer on a valid fd; the kernel is the default destination.
    let sent = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a local buffer from a valid fd.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Walks a run of netlink attributes: (type, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let kind = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses one RTM_NEWTFILTER message body (after the netlink header); `None` for the per-
/// priority header entries the dump also lists (handle 0).
fn parse_filter(body: &[u8]) -> Option<Filter> {
    let handle = u32_at(body, 8)?;
    let info = u32_at(body, 16)?;
    if handle == 0 {
        return None;
    }
    let mut filter = Filter {
        priority: (info >> 16) as u16,
        protocol: u16::from_be(info as u16),
        handle,
        chain: 0,
        kind: String::new(),
        name: None,
        prog_id: None,
        tag: None,
    };
    for (kind, payload) in attrs(body.get(TCMSG_LEN..)?) {
        match kind {
            TCA_KIND => filter.kind = c_string(payload),
            TCA_CHAIN => filter.chain = u32_at(payload, 0).unwrap_or(0),
            TCA_OPTIONS => {
                for (kind, payload) in attrs(payload) {
                    match kind {
                        TCA_BPF_NAME => filter.name = Some(c_string(payload)),
                        TCA_BPF_ID => filter.prog_id = u32_at(payload, 0),
                        TCA_BPF_TAG => filter.tag = payload.get(..8)?.try_into().ok(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(filter)
}

/// Reads replies until the dump ends (or the ACK arrives); collects filters.
fn read_replies(fd: &OwnedFd, filters: &mut Vec<Filter>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        let mut rest = &buf[..n];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32_at(rest, 0).unwrap_or(0) as usize;
            let kind = u16_at(rest, 4).unwrap_or(0);
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a truncated netlink message",
                ));
            }
            let body = &rest[NLMSG_HDRLEN..len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = u32_at(body, 0).unwrap_or(0) as i32;
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => filters.extend(parse_filter(body)),
            }
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        }
    }
}

/// The filters on the ingress hook of `ifindex`, chain 0, in the order they run (empty when the
/// interface has no clsact qdisc).
pub fn ingress_filters(ifindex: u32) -> io::Result<Vec<Filter>> {
    let fd = socket()?;
    send(
        &fd,
        &request(
            RTM_GETTFILTER,
            NLM_F_REQUEST | NLM_F_DUMP,
            ifindex,
            0,
            0,
            &[],
        ),
    )?;
    let mut filters = Vec::new();
    match read_replies(&fd, &mut filters) {
        Ok(()) => {}
        // No clsact qdisc: nothing attached.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    filters.retain(|f| f.chain == 0);
    Ok(filters)
}

/// Removes one `bpf` filter from the ingress hook of `ifindex`.
pub fn delete_ingress_filter(ifindex: u32, filter: &Filter) -> io::Result<()> {
    let fd = socket()?;
    let info = (u32::from(filter.priority) << 16) | u32::from(filter.protocol.to_be());
    let mut kind = filter.kind.clone().into_bytes();
    kind.push(0);
    send(
        &fd,
        &request(
            RTM_DELTFILTER,
            NLM_F_REQUEST | NLM_F_ACK,
            ifindex,
            filter.handle,
            info,
            &attr(TCA_KIND, &kind),
        ),
    )?;
    read_replies(&fd, &mut Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_bpf_filter_message() {
        // tcmsg: family, pads, ifindex 7, handle 0x4b32, parent, info = pref 1 | ETH_P_ALL.
        let mut body = vec![0u8, 0, 0, 0];
        body.extend_from_slice(&7u32.to_ne_bytes());
        body.extend_from_slice(&0x4b32u32.to_ne_bytes());
        body.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
        body.extend_from_slice(&((1u32 << 16) | u32::from(3u16.to_be())).to_ne_bytes());
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut options = attr(TCA_BPF_NAME, b"k2i_guard\0");
        options.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        options.extend(attr(TCA_BPF_TAG, &[1, 2, 3, 4, 5, 6, 7, 8]));
        body.extend(attr(TCA_OPTIONS | 0x8000, &options));
        let filter = parse_filter(&body).expect("a filter");
        assert_eq!(
            filter,
            Filter {
                priority: 1,
                protocol: 3,
                handle: 0x4b32,
                chain: 0,
                kind: "bpf".into(),
                name: Some("k2i_guard".into()),
                prog_id: Some(42),
                tag: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            }
        );
        // The per-priority header entry carries no handle.
        let mut header = body.clone();
        header[8..12].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_filter(&header), None);
    }
}
