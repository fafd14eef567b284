//! The packet guard: `k2i_guard` on tc ingress of the host side of every pod interface, dropping
//! whatever still addresses the metadata service after the connect rewrite (raw IP, AF_PACKET,
//! unconnected UDP). On kernels with TCX (6.6) its links are pinned under `<pin dir>/tc/` like
//! the cgroup links, adopted on restart and swapped atomically when the program changes; older
//! kernels get netlink (cls_bpf) filters, which the kernel keeps after the agent exits.
//!
//! The guard must be the first program on the hook: a CNI's program before it (Cilium's on
//! `lxc*`) returns OK or REDIRECT, and the guard never sees the packet. So it is attached at the
//! head (TCX: before every other link; netlink: priority 1, the first a filter can have, and at
//! the head of that priority's list), and every sync checks that it is still present and first
//! on every matching interface and puts it back in front when it is not. [`status`] reports the
//! same for metrics and the doctor.
//!
//! Every other interface of the node but loopback (the uplink, and the tunnel and overlay devices
//! where a packet a pod wrapped and sent to the node's own address comes out again after
//! decapsulation) gets the node guard, `k2i_node_guard`, in the same way: no packet entering the
//! node by any device is addressed to the metadata service legitimately. Which interface gets
//! which is [`Coverage`]; one pinned link or filter per interface either way.

use std::{
    collections::BTreeMap,
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

use super::{Error, KernelVersion, Result, sys, tcfilter};

/// TCX (bpf_link for tc) arrived in 6.6.
pub const TCX: KernelVersion = KernelVersion(6, 6, 0);
/// Before TCX: our cls_bpf filter's priority, the first there is (0 asks the kernel to choose).
const NL_PRIORITY: u16 = 1;
/// The handles our filter alternates between: moving it to the head of its priority means adding
/// a new filter (cls_bpf puts it at the head of the list) before deleting the old one, so the
/// hook is never without the guard.
const NL_HANDLES: [u32; 2] = [0x4b32, 0x4b33];

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
        self.include.iter().any(|p| hit(p, name)) && !self.excludes(name)
    }

    /// Whether a `!pattern` names the interface: it then gets neither guard.
    pub fn excludes(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| hit(p, name))
    }
}

fn hit((pattern, prefix): &(String, bool), name: &str) -> bool {
    if *prefix {
        name.starts_with(pattern.as_str())
    } else {
        name == pattern
    }
}

/// Which guard an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `k2i_guard`: a pod interface (`--host-interface`); also drops VLAN-tagged frames.
    Pod,
    /// `k2i_node_guard`: any other interface but loopback (`--node-guard`).
    Node,
}

impl Kind {
    pub fn program(self) -> &'static str {
        match self {
            Kind::Pod => programs::GUARD,
            Kind::Node => programs::NODE_GUARD,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Node => "node",
        }
    }
}

/// Which interfaces get which guard: those matching the pod patterns the pod guard, and with
/// `node` every other interface but loopback the node guard. An interface a `!pattern` names
/// gets neither: the operator's way to keep a guard off one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub pods: Option<InterfacePatterns>,
    pub node: bool,
}

impl Coverage {
    /// `None` when neither guard is on.
    pub fn new(pods: Option<InterfacePatterns>, node: bool) -> Option<Coverage> {
        (pods.is_some() || node).then_some(Coverage { pods, node })
    }

    pub fn kind(&self, name: &str) -> Option<Kind> {
        if self.pods.as_ref().is_some_and(|p| p.excludes(name)) {
            None
        } else if self.pods.as_ref().is_some_and(|p| p.matches(name)) {
            Some(Kind::Pod)
        } else if self.node && name != "lo" {
            Some(Kind::Node)
        } else {
            None
        }
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
    /// Interfaces where the guard was missing or not first and was put back in front.
    pub repaired: Vec<String>,
    /// Interfaces the guard could not be put on (or in front on), with the reason.
    pub failed: Vec<(String, String)>,
}

impl GuardChanges {
    /// Nothing changed (adopting what was in place is no change).
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
            && self.replaced.is_empty()
            && self.released.is_empty()
            && self.repaired.is_empty()
            && self.failed.is_empty()
    }
}

/// The guard's attachments.
pub struct Guard {
    dir: PathBuf,
    tcx: bool,
}

/// One guard program and, for putting it back in front on TCX, a second copy of it.
pub struct Copies<'a> {
    pub program: &'a mut SchedClassifier,
    pub spare: Option<&'a mut SchedClassifier>,
}

/// The programs of both guards for one sync; an interface whose guard's program is missing is
/// reported as failed.
pub struct GuardPrograms<'a> {
    pub pod: Option<Copies<'a>>,
    pub node: Option<Copies<'a>>,
}

/// The pin name prefix of a replacement link before it is moved into place.
const STAGED: &str = "new-";

fn pin_name(name: &str, ifindex: u32) -> String {
    format!("{ifindex}-{name}")
}

fn parse_pin_name(file: &str) -> Option<(String, u32)> {
    let (index, name) = file.split_once('-')?;
    Some((name.to_owned(), index.parse().ok()?))
}

/// Where the guard stands on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Attached, and the first program the interface's ingress packets meet.
    First,
    /// Attached, but `before` runs first and may pass or redirect packets past the guard.
    NotFirst { before: String },
    /// Not attached.
    Missing,
}

/// The guard on one covered interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub kind: Kind,
    pub placement: Placement,
}

/// The covered interfaces of this network namespace: name → (ifindex, guard).
fn wanted(coverage: &Coverage) -> io::Result<BTreeMap<String, (u32, Kind)>> {
    Ok(interfaces()?
        .into_iter()
        .filter_map(|(name, ifindex)| Some((ifindex, coverage.kind(&name)?)).map(|v| (name, v)))
        .collect())
}

/// The TCX programs on the interface's ingress hook, in order; none before 6.6.
fn tcx_programs(ifindex: u32) -> Vec<(u32, u32)> {
    sys::tcx_query(ifindex, sys::BPF_TCX_INGRESS).unwrap_or_default()
}

fn describe_tcx(prog_id: u32) -> String {
    // Without CAP_SYS_ADMIN the id is all we can name.
    let name = sys::prog_name_by_id(prog_id).filter(|n| !n.is_empty());
    match name {
        Some(name) => format!("TCX program {name} (id {prog_id})"),
        None => format!("TCX program id {prog_id}"),
    }
}

fn is_ours(filter: &tcfilter::Filter) -> bool {
    filter.kind == "bpf"
        && matches!(
            filter.name.as_deref(),
            Some(programs::GUARD | programs::NODE_GUARD)
        )
}

/// Where the guard stands on one interface, whichever way it was attached.
pub fn placement(pin_dir: &Path, name: &str, ifindex: u32) -> io::Result<Placement> {
    let tcx = tcx_programs(ifindex);
    let pin = pin_dir.join("tc").join(pin_name(name, ifindex));
    if let Ok(link) = sys::obj_get(&pin) {
        let id = sys::link_info(link.as_fd())?.id;
        match tcx.iter().position(|(_, link)| *link == id) {
            Some(0) => return Ok(Placement::First),
            Some(_) => {
                return Ok(Placement::NotFirst {
                    before: describe_tcx(tcx[0].0),
                });
            }
            // A defunct link: look for a netlink filter below.
            None => {}
        }
    }
    let filters = tcfilter::ingress_filters(ifindex)?;
    if !filters.iter().any(is_ours) {
        return Ok(Placement::Missing);
    }
    if let Some((prog, _)) = tcx.first() {
        return Ok(Placement::NotFirst {
            before: format!(
                "{} (TCX programs run before tc filters)",
                describe_tcx(*prog)
            ),
        });
    }
    Ok(match filters.first() {
        Some(first) if is_ours(first) => Placement::First,
        Some(first) => Placement::NotFirst {
            before: first.describe(),
        },
        None => Placement::Missing,
    })
}

/// The guard on every interface `coverage` names.
pub fn status(pin_dir: &Path, coverage: &Coverage) -> io::Result<Vec<InterfaceStatus>> {
    wanted(coverage)?
        .into_iter()
        .map(|(name, (ifindex, kind))| {
            let placement = placement(pin_dir, &name, ifindex)?;
            Ok(InterfaceStatus {
                name,
                ifindex,
                kind,
                placement,
            })
        })
        .collect()
}

impl Guard {
    /// `netlink` forces cls_bpf filters even where TCX exists (to test that path).
    pub fn new(pin_dir: &Path, kernel: KernelVersion, netlink: bool) -> Result<Guard> {
        let dir = pin_dir.join("tc");
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(Guard {
            dir,
            tcx: kernel >= TCX && !netlink,
        })
    }

    fn program<'e>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut SchedClassifier> {
        let program: &mut SchedClassifier = super::program_mut(ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(program)
    }

    /// Brings the attachments in line with the interfaces that exist now and match: the guard
    /// present and first on each. One interface's failure does not stop the others.
    pub fn sync(&mut self, ebpf: &mut Ebpf, coverage: &Coverage) -> Result<GuardChanges> {
        // Load both programs first, then borrow them together.
        for kind in [Kind::Pod, Kind::Node] {
            Self::program(ebpf, kind.program())?;
        }
        let (mut pod, mut node) = (None, None);
        for (name, program) in ebpf.programs_mut() {
            let (slot, name) = match name {
                programs::GUARD => (&mut pod, programs::GUARD),
                programs::NODE_GUARD => (&mut node, programs::NODE_GUARD),
                _ => continue,
            };
            let program: &mut SchedClassifier = program
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            *slot = Some(Copies {
                program,
                spare: None,
            });
        }
        self.sync_program(GuardPrograms { pod, node }, coverage)
    }

    /// [`Guard::sync`] with the programs at hand (the agent opens them from their pins).
    /// Putting a guard back in front on TCX needs a second copy of its program: the spare when
    /// given (a program opened from a pin cannot be loaded again), else the program is loaded
    /// afresh.
    pub fn sync_program(
        &mut self,
        mut programs: GuardPrograms<'_>,
        coverage: &Coverage,
    ) -> Result<GuardChanges> {
        let wanted = wanted(coverage).map_err(|e| Error::io("list network interfaces", e))?;
        let mut changes = GuardChanges::default();
        if self.tcx {
            self.release_stale_pins(&wanted, &mut changes)?;
        }
        for (ifname, (ifindex, kind)) in &wanted {
            let copies = match kind {
                Kind::Pod => programs.pod.as_mut(),
                Kind::Node => programs.node.as_mut(),
            };
            let Some(copies) = copies else {
                changes.failed.push((
                    ifname.clone(),
                    format!("the {} program is not loaded", kind.program()),
                ));
                continue;
            };
            let result = if self.tcx {
                self.sync_tcx(
                    copies.program,
                    copies.spare.as_deref_mut(),
                    *kind,
                    ifname,
                    *ifindex,
                    &mut changes,
                )
            } else {
                sync_netlink(copies.program, *kind, ifname, *ifindex, &mut changes)
            };
            if let Err(e) = result {
                // The interface went away between listing and attaching: nothing to guard.
                if interfaces().is_ok_and(|i| i.get(ifname) == Some(ifindex)) {
                    changes.failed.push((ifname.clone(), error_chain(&e)));
                } else {
                    tracing::debug!(interface = ifname, error = %e, "interface vanished during the guard sync");
                }
            }
        }
        Ok(changes)
    }

    /// Detaches and unpins links of interfaces that are gone, renamed or no longer match.
    fn release_stale_pins(
        &self,
        wanted: &BTreeMap<String, (u32, Kind)>,
        changes: &mut GuardChanges,
    ) -> Result<()> {
        for entry in fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?
        {
            let entry = entry.map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            // A replacement staged by an agent that stopped before moving it into place: it is
            // the link in front, so it takes the place of the old one.
            if let Some(target) = file.strip_prefix(STAGED)
                && parse_pin_name(target)
                    .is_some_and(|(n, i)| wanted.get(&n).map(|w| w.0) == Some(i))
            {
                let final_path = self.dir.join(target);
                if let Ok(old) = sys::obj_get(&final_path) {
                    let _ = sys::link_detach(old.as_fd());
                }
                fs::rename(&path, &final_path).map_err(|e| {
                    Error::io(
                        format!("move {} to {}", path.display(), final_path.display()),
                        e,
                    )
                })?;
                continue;
            }
            let parsed = parse_pin_name(&file);
            if let Some((ifname, ifindex)) = &parsed
                && wanted.get(ifname).map(|w| w.0) == Some(*ifindex)
            {
                continue;
            }
            if let Ok(link) = sys::obj_get(&path) {
                let _ = sys::link_detach(link.as_fd());
            }
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
            changes.released.push(parsed.map_or(file, |(n, _)| n));
        }
        Ok(())
    }

    /// TCX: our pinned link must be the first on the hook; else a new link goes to the head and
    /// replaces the old one (new first, then the old detached: never a moment without).
    fn sync_tcx(
        &self,
        program: &mut SchedClassifier,
        spare: Option<&mut SchedClassifier>,
        kind: Kind,
        ifname: &str,
        ifindex: u32,
        changes: &mut GuardChanges,
    ) -> Result<()> {
        let name = kind.program();
        let path = self.dir.join(pin_name(ifname, ifindex));
        let existing = match sys::obj_get(&path) {
            Ok(link) => Some(link),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let Some(link) = existing else {
            let link = attach_tcx_first(program, name, ifname)?;
            link.pin(&path).map_err(|source| Error::Pin {
                name,
                path: path.clone(),
                source,
            })?;
            changes.attached.push(ifname.to_owned());
            return Ok(());
        };
        let info = sys::link_info(link.as_fd())
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let tcx = sys::tcx_query(ifindex, sys::BPF_TCX_INGRESS)
            .map_err(|e| Error::io(format!("query the TCX programs of {ifname}"), e))?;
        match tcx.iter().position(|(_, id)| *id == info.id) {
            Some(0) => {
                // In front: adopt, or swap the program in place if it changed.
                let new = program
                    .fd()
                    .map_err(|source| Error::Program { name, source })?;
                if sys::link_prog_tag(link.as_fd()).ok() == sys::prog_tag(new.as_fd()).ok() {
                    changes.adopted.push(ifname.to_owned());
                } else {
                    sys::swap_link_prog(link.as_fd(), new.as_fd(), info.prog_id)
                        .map_err(|e| Error::io(format!("replace the guard on {ifname}"), e))?;
                    changes.replaced.push(ifname.to_owned());
                }
            }
            position => {
                let before = tcx.first().map(|(prog, _)| describe_tcx(*prog));
                // A hook takes a program only once, and ours is still there behind the other:
                // attach another copy of it (the pinned links keep the old one alive).
                let copy = match spare {
                    Some(spare) => {
                        let spare_id = spare.info().map(|i| i.id()).ok();
                        if spare_id == Some(info.prog_id) {
                            program
                        } else {
                            spare
                        }
                    }
                    None => {
                        program
                            .unload()
                            .and_then(|()| program.load())
                            .map_err(|source| Error::Program { name, source })?;
                        program
                    }
                };
                let fresh = attach_tcx_first(copy, name, ifname)?;
                let staged = self
                    .dir
                    .join(format!("{STAGED}{}", pin_name(ifname, ifindex)));
                let _ = fs::remove_file(&staged);
                fresh.pin(&staged).map_err(|source| Error::Pin {
                    name,
                    path: staged.clone(),
                    source,
                })?;
                let _ = sys::link_detach(link.as_fd());
                fs::rename(&staged, &path).map_err(|e| {
                    Error::io(
                        format!("move {} to {}", staged.display(), path.display()),
                        e,
                    )
                })?;
                tracing::warn!(
                    interface = ifname,
                    was = if position.is_some() {
                        "not first"
                    } else {
                        "detached"
                    },
                    first_was = before.as_deref().unwrap_or("nothing"),
                    "packet guard put back in front"
                );
                changes.repaired.push(ifname.to_owned());
            }
        }
        Ok(())
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn attach_tcx_first(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
) -> Result<FdLink> {
    let link_id = program
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|source| Error::Program { name, source })?;
    let link = program
        .take_link(link_id)
        .map_err(|source| Error::Program { name, source })?;
    FdLink::try_from(link).map_err(|source| Error::NoLink { name, source })
}

/// Attaches a cls_bpf filter at `priority`/`handle`; the kernel keeps it after we exit (the
/// fail-closed state), so the link object, which would detach it when dropped, is forgotten.
fn attach_netlink(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    priority: u16,
    handle: u32,
) -> Result<()> {
    let options = TcAttachOptions::Netlink(NlOptions {
        priority,
        handle: TcHandle::from(handle),
        ..NlOptions::default()
    });
    let link_id = program
        .attach_with_options(ifname, TcAttachType::Ingress, options)
        .map_err(|source| Error::Program { name, source })?;
    let link = program
        .take_link(link_id)
        .map_err(|source| Error::Program { name, source })?;
    std::mem::forget(link);
    Ok(())
}

/// Netlink: our filter must be the first on the hook, at [`NL_PRIORITY`]. If it is, its program
/// is swapped in place when it changed (cls_bpf keeps the position); if not, a new filter goes
/// to the head of [`NL_PRIORITY`] and then every other filter of ours is deleted (including one
/// an older agent left at another priority).
fn sync_netlink(
    program: &mut SchedClassifier,
    kind: Kind,
    ifname: &str,
    ifindex: u32,
    changes: &mut GuardChanges,
) -> Result<()> {
    let name = kind.program();
    // A clsact qdisc may already be there (ours from before, or a CNI's).
    let _ = tc::qdisc_add_clsact(ifname);
    let filters = tcfilter::ingress_filters(ifindex)
        .map_err(|e| Error::io(format!("list the tc filters of {ifname}"), e))?;
    let ours: Vec<&tcfilter::Filter> = filters.iter().filter(|f| is_ours(f)).collect();
    let new_tag = program
        .fd()
        .ok()
        .and_then(|fd| sys::prog_tag(fd.as_fd()).ok());
    let keep = match filters.first() {
        Some(first) if is_ours(first) && first.priority == NL_PRIORITY => {
            if first.tag.is_some() && first.tag == new_tag {
                changes.adopted.push(ifname.to_owned());
            } else {
                let existing = SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Ingress,
                    first.priority,
                    TcHandle::from(first.handle),
                    None,
                )
                .map_err(|e| Error::io(format!("find the guard filter on {ifname}"), e))?;
                let link_id = program
                    .attach_to_link(existing)
                    .map_err(|source| Error::Program { name, source })?;
                let link = program
                    .take_link(link_id)
                    .map_err(|source| Error::Program { name, source })?;
                std::mem::forget(link);
                changes.replaced.push(ifname.to_owned());
            }
            (first.priority, first.handle)
        }
        _ => {
            let Some(handle) = NL_HANDLES.into_iter().find(|h| {
                !ours
                    .iter()
                    .any(|f| f.priority == NL_PRIORITY && f.handle == *h)
            }) else {
                return Err(Error::io(
                    format!("no free handle for the guard filter on {ifname}"),
                    io::ErrorKind::AlreadyExists.into(),
                ));
            };
            attach_netlink(program, name, ifname, NL_PRIORITY, handle)?;
            if ours.is_empty() {
                changes.attached.push(ifname.to_owned());
            } else {
                tracing::warn!(
                    interface = ifname,
                    first_was = filters.first().map(|f| f.describe()).unwrap_or_default(),
                    "packet guard put back in front"
                );
                changes.repaired.push(ifname.to_owned());
            }
            (NL_PRIORITY, handle)
        }
    };
    for stale in ours.iter().filter(|f| (f.priority, f.handle) != keep) {
        tcfilter::delete_ingress_filter(ifindex, stale).map_err(|e| {
            Error::io(
                format!(
                    "remove the old guard filter {} on {ifname}",
                    stale.describe()
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// A netlink socket (non-blocking) that becomes readable whenever a network interface appears,
/// changes or goes, or a tc filter changes: the guard's cue to sync.
pub fn link_events() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let owned = kube2iam_common::sys::route_socket(libc::SOCK_NONBLOCK)?;
    let fd = owned.as_raw_fd();
    // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // Interfaces, and tc qdiscs and filters (someone else's filter in front of ours).
    addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_TC) as u32;
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

/// Removes the guards: pinned TCX links, and netlink filters named `k2i_guard` or
/// `k2i_node_guard` on every interface. Returns one line per removed attachment.
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
            for program in [programs::GUARD, programs::NODE_GUARD] {
                if tc::qdisc_detach_program(ifname, TcAttachType::Ingress, program).is_ok() {
                    removed.push(format!("{program} filter on {ifname}: removed"));
                }
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
    fn excluded_interfaces_get_neither_guard() {
        let coverage = Coverage::new(Some(patterns(&["veth+", "!veth-dnat"])), true).unwrap();
        assert_eq!(coverage.kind("veth1"), Some(Kind::Pod));
        assert_eq!(coverage.kind("eth0"), Some(Kind::Node));
        assert_eq!(coverage.kind("flannel.1"), Some(Kind::Node));
        assert_eq!(coverage.kind("veth-dnat"), None);
        assert_eq!(coverage.kind("lo"), None);
        // kube2iam's "every interface but eth0": eth0 is left alone by both guards.
        let all_but = Coverage::new(Some(patterns(&["!eth0"])), true).unwrap();
        assert_eq!(all_but.kind("cali1"), Some(Kind::Pod));
        assert_eq!(all_but.kind("eth0"), None);
        // Without the pod guard there is no exclusion list: the node guard takes all but lo.
        let node_only = Coverage::new(None, true).unwrap();
        assert_eq!(node_only.kind("veth1"), Some(Kind::Node));
        assert_eq!(node_only.kind("lo"), None);
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
