//! The packet guard: `k2i_guard` on tc ingress of the host side of every pod interface, dropping
//! whatever still addresses the metadata service after the connect rewrite (raw IP, AF_PACKET,
//! unconnected UDP). On kernels with TCX (6.6) its links are pinned under `<pin dir>/tc/` like
//! the cgroup links, adopted on restart and swapped atomically when the program changes; older
//! kernels get netlink (cls_bpf) filters, which the kernel keeps after the agent exits.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use kube2iam_common::programs;

use super::{Error, KernelVersion, Result, sys};

/// TCX (bpf_link for tc) arrived in 6.6.
pub const TCX: KernelVersion = KernelVersion(6, 6, 0);
/// Before TCX: our cls_bpf filter's fixed priority and handle, so a restarted agent finds it.
const NL_PRIORITY: u16 = 49_000;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x4b32);

/// kube2iam's `--host-interface` syntax: `name` exact, `prefix+` any name starting with
/// `prefix`, and `!pattern` excludes; only exclusions means every interface but those (and lo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePatterns {
    include: Vec<(String, bool)>,
    exclude: Vec<(String, bool)>,
}

impl InterfacePatterns {
    pub fn parse(patterns: &[String]) -> std::result::Result<Self, String> {
        let mut out = InterfacePatterns {
            include: Vec::new(),
            exclude: Vec::new(),
        };
        for raw in patterns {
            let (negated, pattern) = match raw.trim().strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, raw.trim()),
            };
            let (name, prefix) = match pattern.strip_suffix('+') {
                Some(p) => (p, true),
                None => (pattern, false),
            };
            if name.is_empty() && !prefix || name.len() > 15 || name.contains(['/', ' ', ':']) {
                return Err(format!(
                    "--host-interface {raw:?} is not an interface name or prefix+ pattern"
                ));
            }
            let list = if negated {
                &mut out.exclude
            } else {
                &mut out.include
            };
            list.push((name.to_owned(), prefix));
        }
        if out.include.is_empty() {
            if out.exclude.is_empty() {
                return Err("--host-interface needs at least one pattern to guard".into());
            }
            // Only exclusions, as in kube2iam's `!eth0`: every interface but those, and never
            // loopback, where the node's own metadata traffic may pass.
            out.include.push((String::new(), true));
            out.exclude.push(("lo".to_owned(), false));
        }
        Ok(out)
    }

    pub fn matches(&self, name: &str) -> bool {
        let hit = |(p, prefix): &(String, bool)| {
            if *prefix {
                name.starts_with(p.as_str())
            } else {
                name == p
            }
        };
        self.include.iter().any(hit) && !self.exclude.iter().any(hit)
    }
}

/// The interfaces of this network namespace: name → ifindex.
pub fn interfaces() -> io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeMap::new();
    let mut entry = list;
    // SAFETY: walking the list up to its terminator; names are NUL-terminated C strings.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuardChanges {
    pub attached: Vec<String>,
    pub adopted: Vec<String>,
    pub replaced: Vec<String>,
    pub released: Vec<String>,
}

impl GuardChanges {
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
            && self.adopted.is_empty()
            && self.replaced.is_empty()
            && self.released.is_empty()
    }
}

/// The guard's attachments.
pub struct Guard {
    dir: PathBuf,
    tcx: bool,
    /// Netlink mode: interfaces already given a filter, by ifindex.
    netlink_done: BTreeSet<(String, u32)>,
}

fn pin_name(name: &str, ifindex: u32) -> String {
    format!("{ifindex}-{name}")
}

fn parse_pin_name(file: &str) -> Option<(String, u32)> {
    let (index, name) = file.split_once('-')?;
    Some((name.to_owned(), index.parse().ok()?))
}

impl Guard {
    /// `netlink` forces cls_bpf filters even where TCX exists (to test that path).
    pub fn new(pin_dir: &Path, kernel: KernelVersion, netlink: bool) -> Result<Guard> {
        let dir = pin_dir.join("tc");
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(Guard {
            dir,
            tcx: kernel >= TCX && !netlink,
            netlink_done: BTreeSet::new(),
        })
    }

    fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
        let name = programs::GUARD;
        let program: &mut SchedClassifier = super::program_mut(ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(program)
    }

    /// Brings the attachments in line with the interfaces that exist now and match.
    pub fn sync(&mut self, ebpf: &mut Ebpf, patterns: &InterfacePatterns) -> Result<GuardChanges> {
        let program = Self::program(ebpf)?;
        self.sync_program(program, patterns)
    }

    /// [`Guard::sync`] with the program at hand (the agent opens it from its pin).
    pub fn sync_program(
        &mut self,
        program: &mut SchedClassifier,
        patterns: &InterfacePatterns,
    ) -> Result<GuardChanges> {
        let wanted: BTreeMap<String, u32> = interfaces()
            .map_err(|e| Error::io("list network interfaces", e))?
            .into_iter()
            .filter(|(name, _)| patterns.matches(name))
            .collect();
        if self.tcx {
            self.sync_tcx(program, &wanted)
        } else {
            self.sync_netlink(program, &wanted)
        }
    }

    fn sync_tcx(
        &mut self,
        program: &mut SchedClassifier,
        wanted: &BTreeMap<String, u32>,
    ) -> Result<GuardChanges> {
        let name = programs::GUARD;
        let mut changes = GuardChanges::default();
        let mut pinned = BTreeSet::new();
        for entry in fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?
        {
            let entry = entry.map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            match parse_pin_name(&file) {
                Some((ifname, ifindex)) if wanted.get(&ifname) == Some(&ifindex) => {
                    // Still wanted: adopt, or swap the program if it changed.
                    let link = sys::obj_get(&path)
                        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                    let info = sys::link_info(link.as_fd())
                        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                    let new = program
                        .fd()
                        .map_err(|source| Error::Program { name, source })?;
                    let same =
                        sys::link_prog_tag(link.as_fd()).ok() == sys::prog_tag(new.as_fd()).ok();
                    if same {
                        changes.adopted.push(ifname.clone());
                    } else {
                        let old = sys::prog_fd_by_id(info.prog_id).ok();
                        sys::link_update(
                            link.as_fd(),
                            new.as_fd(),
                            old.as_ref().map(|o| o.as_fd()),
                        )
                        .map_err(|e| Error::io(format!("replace the guard on {ifname}"), e))?;
                        changes.replaced.push(ifname.clone());
                    }
                    pinned.insert(ifname);
                }
                other => {
                    // Gone, renamed or no longer matching: detach and unpin.
                    if let Ok(link) = sys::obj_get(&path) {
                        let _ = sys::link_detach(link.as_fd());
                    }
                    fs::remove_file(&path)
                        .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
                    changes.released.push(other.map_or(file, |(n, _)| n));
                }
            }
        }
        for (ifname, ifindex) in wanted {
            if pinned.contains(ifname) {
                continue;
            }
            let link_id = match program.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => id,
                // The interface went away between listing and attaching.
                Err(e) if !interfaces().is_ok_and(|i| i.contains_key(ifname)) => {
                    tracing::debug!(interface = ifname, error = %e, "interface vanished before the guard attached");
                    continue;
                }
                Err(source) => return Err(Error::Program { name, source }),
            };
            let link = program
                .take_link(link_id)
                .map_err(|source| Error::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|e| {
                Error::io(
                    format!("guard link on {ifname}: {e}"),
                    io::ErrorKind::Unsupported.into(),
                )
            })?;
            let path = self.dir.join(pin_name(ifname, *ifindex));
            link.pin(&path).map_err(|e| {
                Error::io(
                    format!("pin {}: {e}", path.display()),
                    io::ErrorKind::Other.into(),
                )
            })?;
            changes.attached.push(ifname.clone());
        }
        Ok(changes)
    }

    fn sync_netlink(
        &mut self,
        program: &mut SchedClassifier,
        wanted: &BTreeMap<String, u32>,
    ) -> Result<GuardChanges> {
        let name = programs::GUARD;
        let mut changes = GuardChanges::default();
        self.netlink_done.retain(|(n, i)| wanted.get(n) == Some(i));
        for (ifname, ifindex) in wanted {
            if self.netlink_done.contains(&(ifname.clone(), *ifindex)) {
                continue;
            }
            // A clsact qdisc may already be there (ours from before, or a CNI's).
            let _ = tc::qdisc_add_clsact(ifname);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: NL_PRIORITY,
                handle: NL_HANDLE,
                ..NlOptions::default()
            });
            let link_id = match program.attach_with_options(ifname, TcAttachType::Ingress, options)
            {
                Ok(id) => {
                    changes.attached.push(ifname.clone());
                    id
                }
                // Our filter from an earlier agent (same priority and handle): swap its program
                // in place, which cls_bpf does atomically.
                Err(e) if format!("{e:?}").contains("File exists") => {
                    let existing = SchedClassifierLink::attached(
                        ifname,
                        TcAttachType::Ingress,
                        NL_PRIORITY,
                        NL_HANDLE,
                        None,
                    )
                    .map_err(|e| Error::io(format!("find the guard filter on {ifname}"), e))?;
                    let id = program
                        .attach_to_link(existing)
                        .map_err(|source| Error::Program { name, source })?;
                    changes.replaced.push(ifname.clone());
                    id
                }
                Err(e) if !interfaces().is_ok_and(|i| i.contains_key(ifname)) => {
                    tracing::debug!(interface = ifname, error = %e, "interface vanished before the guard attached");
                    continue;
                }
                Err(source) => return Err(Error::Program { name, source }),
            };
            // The kernel keeps the filter after we exit: that is the fail-closed state. The link
            // object would detach it when dropped, so it is never dropped.
            let link = program
                .take_link(link_id)
                .map_err(|source| Error::Program { name, source })?;
            std::mem::forget(link);
            self.netlink_done.insert((ifname.clone(), *ifindex));
        }
        Ok(changes)
    }
}

/// A netlink socket (non-blocking) that becomes readable whenever a network interface appears,
/// changes or goes: the guard's cue to sync.
pub fn link_events() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: valid fd and address of the stated length.
    let ret = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Reads and discards what is queued on a [`link_events`] socket.
pub fn drain(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd as _;
    let mut buf = [0u8; 8192];
    // SAFETY: reading into a local buffer from a valid non-blocking fd.
    while unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {}
}

/// Removes the guard: pinned TCX links, and netlink filters named `k2i_guard` on every
/// interface. Returns one line per removed attachment.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let dir = pin_dir.join("tc");
    if dir.is_dir() {
        for entry in
            fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?
        {
            let path = entry
                .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
                .path();
            if let Ok(link) = sys::obj_get(&path) {
                let _ = sys::link_detach(link.as_fd());
            }
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let iface = parse_pin_name(&file).map_or(file, |(n, _)| n);
            removed.push(format!("guard on {iface}: detached and unpinned"));
        }
        fs::remove_dir(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
    }
    if let Ok(list) = interfaces() {
        for ifname in list.keys() {
            if tc::qdisc_detach_program(ifname, TcAttachType::Ingress, programs::GUARD).is_ok() {
                removed.push(format!("guard filter on {ifname}: removed"));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(p: &[&str]) -> InterfacePatterns {
        InterfacePatterns::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn kube2iam_interface_patterns() {
        let p = patterns(&["eni+", "cali+", "!cali-host", "docker0"]);
        assert!(p.matches("eni1234abcd"));
        assert!(p.matches("cali0ab"));
        assert!(!p.matches("cali-host"));
        assert!(p.matches("docker0"));
        assert!(!p.matches("docker01"));
        assert!(!p.matches("eth0"));
        assert!(patterns(&["+"]).matches("anything"));
        let all_but = patterns(&["!eth0"]);
        assert!(all_but.matches("eni1") && all_but.matches("veth9"));
        assert!(!all_but.matches("eth0") && !all_but.matches("lo"));
        for bad in [&[""][..], &["a/b"], &["averyveryverylongname"]] {
            let err =
                InterfacePatterns::parse(&bad.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert!(err.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pin_names_round_trip() {
        assert_eq!(
            parse_pin_name(&pin_name("k2i-h-a", 7)),
            Some(("k2i-h-a".into(), 7))
        );
        assert_eq!(parse_pin_name("garbage"), None);
    }
}
