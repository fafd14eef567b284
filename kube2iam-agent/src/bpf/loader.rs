//! Loading in a short-lived child process, so the long-lived agent never holds the loader's
//! memory.
//!
//! aya 0.14's `EbpfLoader::new()` parses the kernel's BTF (/sys/kernel/btf/vmlinux, about
//! 5 MiB) on every load, whether the programs need it or not, and that parse alone raises a
//! process's peak RSS by about 18 MiB; the parsed object and its copies of the programs stay
//! resident for as long as the `Ebpf` lives. The agent therefore runs [`super::install`] in a
//! child: the same binary, executed again from /proc/self/exe (the image the agent runs, even
//! if the file was replaced on disk) with the agent's own arguments and environment plus
//! [`CHILD_ENV`]. The child loads, attaches or adopts, pins, reports what it did as JSON on its
//! stdout and exits; its log goes to the agent's stderr. The agent then works with what is
//! pinned only: the identity, attestation and host-pods maps and the packet guard's program
//! (two copies of it, see [`SPARE_SUFFIX`]), opened from their pins.
//!
//! The child also checks every pinned map against the definition in the embedded object before
//! loading: aya adopts a pinned map by name whatever its definition, so a map pinned by an older
//! release with another layout or size would otherwise be used as is. See
//! [`recreate_changed_maps`].

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Write as _},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData},
    programs::SchedClassifier,
};
use kube2iam_common::{RevNat, maps, programs};
use serde::{Deserialize, Serialize};

use super::{
    Action, EBPF_OBJECT, Error, Interception, KernelVersion, Result, Settings, guard, sys,
};

/// Set in the loader child's environment: run [`child_main`] instead of the agent.
pub const CHILD_ENV: &str = "KUBE2IAM_INTERNAL_LOADER";
/// Where programs the agent needs after the child exits are pinned: `<pin dir>/progs/<name>`.
pub const PROGS_DIR: &str = "progs";
/// A second copy of the guard program, pinned as `<pin dir>/progs/k2i_guard<suffix>`. A TCX hook
/// takes a program only once, so putting the guard back in front of an interface whose link
/// still holds one copy (behind another program) needs the other copy; a program opened from a
/// pin cannot be loaded afresh.
pub const SPARE_SUFFIX: &str = "_spare";

/// Whether this process is the loader child.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// What happened to one program, as the child reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadAction {
    Attached,
    Adopted,
    Replaced,
    Skipped(String),
}

impl From<&Action> for LoadAction {
    fn from(action: &Action) -> Self {
        match action {
            Action::Attached => LoadAction::Attached,
            Action::Adopted => LoadAction::Adopted,
            Action::Replaced => LoadAction::Replaced,
            Action::Skipped(why) => LoadAction::Skipped(why.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadedProgram {
    pub name: String,
    pub action: LoadAction,
    pub link_id: Option<u32>,
}

/// The child's report on its stdout.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    kernel: (u32, u32, u32),
    cgroup: PathBuf,
    host_netns_cookie: u64,
    programs: Vec<LoadedProgram>,
    recreated_maps: Vec<String>,
}

/// The interception as the long-lived agent holds it: no loaded object, only pins.
pub struct Pinned {
    pub kernel: KernelVersion,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub host_netns_cookie: u64,
    pub programs: Vec<LoadedProgram>,
    /// Pinned maps the child found with another definition than the object's and recreated.
    pub recreated_maps: Vec<String>,
    /// The loader child's peak RSS (KiB, from its rusage) and how long it ran.
    pub child_peak_kib: u64,
    pub child_elapsed: Duration,
    guard: Option<PinnedGuard>,
}

struct PinnedGuard {
    guard: guard::Guard,
    coverage: guard::Coverage,
    /// Each guard's program and its spare copy, for the kinds `coverage` uses.
    pod: Option<(SchedClassifier, SchedClassifier)>,
    node: Option<(SchedClassifier, SchedClassifier)>,
}

/// Runs the loader child and opens what it pinned.
pub fn install(settings: &Settings) -> Result<Pinned> {
    if EBPF_OBJECT.is_empty() {
        return Err(Error::NoPrograms);
    }
    let started = Instant::now();
    let mut child = Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("start the loader child (/proc/self/exe)", e))?;
    let mut stdout = String::new();
    let read = child
        .stdout
        .take()
        .map(|mut out| out.read_to_string(&mut stdout));
    let (status, peak_kib) =
        wait_with_rusage(child.id()).map_err(|e| Error::io("wait for the loader child", e))?;
    let child_elapsed = started.elapsed();
    if let Some(Err(e)) = read {
        return Err(Error::io("read the loader child's report", e));
    }
    if !status_success(status) {
        return Err(Error::io(
            "load and attach the programs in the loader child",
            io::Error::other(format!(
                "the child failed ({}); its log above says why",
                describe_status(status)
            )),
        ));
    }
    let report: ChildReport = serde_json::from_str(stdout.trim()).map_err(|e| {
        Error::io(
            "read the loader child's report",
            io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {stdout:?}")),
        )
    })?;
    let kernel = KernelVersion(report.kernel.0, report.kernel.1, report.kernel.2);
    let guard = match guard_coverage(settings) {
        Some(coverage) => {
            let open = |name: &'static str| -> Result<(SchedClassifier, SchedClassifier)> {
                let open = |path: PathBuf| {
                    SchedClassifier::from_pin(&path)
                        .map_err(|source| Error::Program { name, source })
                };
                Ok((
                    open(guard_program_pin(&settings.pin_dir, name))?,
                    open(spare_guard_program_pin(&settings.pin_dir, name))?,
                ))
            };
            let pod = match coverage.pods {
                Some(_) => Some(open(programs::GUARD)?),
                None => None,
            };
            let node = match coverage.node {
                true => Some(open(programs::NODE_GUARD)?),
                false => None,
            };
            Some(PinnedGuard {
                guard: guard::Guard::new(&settings.pin_dir, kernel, settings.guard_netlink)?,
                coverage,
                pod,
                node,
            })
        }
        None => None,
    };
    Ok(Pinned {
        kernel,
        cgroup: report.cgroup,
        pin_dir: settings.pin_dir.clone(),
        host_netns_cookie: report.host_netns_cookie,
        programs: report.programs,
        recreated_maps: report.recreated_maps,
        child_peak_kib: peak_kib,
        child_elapsed,
        guard,
    })
}

fn status_success(status: libc::c_int) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Waits for a child and returns its wait status and peak RSS in KiB (`ru_maxrss`).
fn wait_with_rusage(pid: u32) -> io::Result<(libc::c_int, u64)> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child by pid; both out-pointers are valid.
        let ret = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if ret >= 0 {
            return Ok((status, usage.ru_maxrss.max(0) as u64));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Pinned {
    /// Opens the pinned identity map for the pod registry. Its capacity is the pinned map's,
    /// which a restart does not change (that would drop what pods are known).
    pub fn take_identity_map(&mut self) -> Result<crate::identity::BpfIdentityMap> {
        let data = self.pinned_map(maps::IDENTITY)?;
        let capacity = data.info().map(|i| i.max_entries()).unwrap_or(0);
        let map = self.hash_map(maps::IDENTITY, data)?;
        Ok(crate::identity::BpfIdentityMap::new(map, capacity))
    }

    /// Opens the pinned attestation map (connection → who connected).
    pub fn take_attest_map(&mut self) -> Result<crate::attest::AttestMap> {
        let data = self.pinned_map(maps::ATTEST)?;
        Ok(crate::attest::AttestMap::new(
            self.hash_map(maps::ATTEST, data)?,
        ))
    }

    /// Opens the pinned map of hostNetwork pods' cgroups.
    pub fn take_host_pods_map(&mut self) -> Result<crate::attest::HostPodsMap> {
        let data = self.pinned_map(maps::HOST_PODS)?;
        Ok(crate::attest::HostPodsMap::new(
            self.hash_map(maps::HOST_PODS, data)?,
        ))
    }

    fn pinned_map(&self, name: &'static str) -> Result<MapData> {
        MapData::from_pin(self.pin_dir.join(name)).map_err(|source| Error::Map { name, source })
    }

    /// A hash map (plain or LRU, as the kernel reports its type) of the given key and value.
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        data: MapData,
    ) -> Result<HashMap<MapData, K, V>> {
        let map =
            aya::maps::Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
        HashMap::try_from(map).map_err(|source| Error::Map { name, source })
    }

    /// Attaches the guard to interfaces that appeared, releases vanished ones, and puts it back
    /// in front where something else went before it.
    pub fn sync_guard(&mut self) -> Result<Option<guard::GuardChanges>> {
        match &mut self.guard {
            Some(g) => {
                fn copies(
                    pair: &mut Option<(SchedClassifier, SchedClassifier)>,
                ) -> Option<guard::Copies<'_>> {
                    pair.as_mut().map(|(program, spare)| guard::Copies {
                        program,
                        spare: Some(spare),
                    })
                }
                let programs = guard::GuardPrograms {
                    pod: copies(&mut g.pod),
                    node: copies(&mut g.node),
                };
                g.guard.sync_program(programs, &g.coverage).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The id of the attached connect4 program, whose maps include the programs' debug log.
    pub fn attached_program_id(&self) -> Option<u32> {
        let link = sys::obj_get(&super::link_path(&self.pin_dir, programs::CONNECT4)).ok()?;
        sys::link_info(link.as_fd()).ok().map(|i| i.prog_id)
    }
}

/// Which interfaces get which guard, from the settings; `None` with both guards off.
fn guard_coverage(settings: &Settings) -> Option<guard::Coverage> {
    guard::Coverage::new(settings.packet_guard.clone(), settings.node_guard)
}

/// `<pin dir>/progs/<program>` (`k2i_guard`, `k2i_node_guard`).
fn guard_program_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(PROGS_DIR).join(program)
}

/// `<pin dir>/progs/<program>_spare` (bpffs takes no dots in names).
fn spare_guard_program_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir
        .join(PROGS_DIR)
        .join(format!("{program}{SPARE_SUFFIX}"))
}

/// The loader child: installs, writes its report to stdout and returns.
pub fn child_main(settings: &Settings) -> Result<()> {
    let report = load_and_pin(settings)?;
    let text = serde_json::to_string(&report).map_err(|e| {
        Error::io(
            "encode the loader report",
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::io("write the loader report", e))
}

fn load_and_pin(settings: &Settings) -> Result<ChildReport> {
    let recreated = recreate_changed_maps(settings)?;
    let mut interception = super::install(settings)?;
    if !recreated.is_empty() {
        relink(&mut interception, settings)?;
    }
    for map in &recreated {
        if let Some(old) = &map.old
            && map.name == maps::REVNAT
        {
            migrate_revnat(&mut interception, old);
        }
    }
    pin_guard_program(&mut interception, settings)?;
    let kernel = interception.kernel;
    Ok(ChildReport {
        kernel: (kernel.0, kernel.1, kernel.2),
        cgroup: interception.cgroup.clone(),
        host_netns_cookie: interception.host_netns_cookie,
        programs: interception
            .programs
            .iter()
            .map(|p| LoadedProgram {
                name: p.name.to_owned(),
                action: LoadAction::from(&p.action),
                link_id: p.link_id,
            })
            .collect(),
        recreated_maps: recreated.into_iter().map(|m| m.name).collect(),
    })
}

/// A map definition: what the kernel reports for a map fd, and what the object asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapDef {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for MapDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The definition of a map fd, from its fdinfo.
fn pinned_def(fd: &OwnedFd) -> io::Result<MapDef> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let field = |name: &str| -> io::Result<u32> {
        let value = sys::fdinfo_value(&text, name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("no {name} in fdinfo"))
        })?;
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => value.parse(),
        };
        parsed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")))
    };
    Ok(MapDef {
        map_type: field("map_type")?,
        key_size: field("key_size")?,
        value_size: field("value_size")?,
        max_entries: field("max_entries")?,
        flags: field("map_flags")?,
    })
}

/// The pinned maps of the embedded object and their definitions, with `--identity-capacity`
/// applied as the loader applies it.
fn object_defs(settings: &Settings) -> Result<BTreeMap<String, MapDef>> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| {
        Error::io(
            "parse the embedded eBPF object",
            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        )
    })?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| {
            let max_entries = if name == maps::IDENTITY {
                settings.identity_capacity
            } else {
                m.max_entries()
            };
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            };
            (name.clone(), def)
        })
        .collect())
}

/// What to do with a pinned map whose definition differs from the object's.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Recreate; carry the entries over when the layout is the same.
    Recreate {
        migrate: bool,
    },
}

fn verdict(name: &str, pinned: MapDef, wanted: MapDef) -> Verdict {
    if pinned == wanted {
        return Verdict::Keep;
    }
    let same_layout = MapDef {
        max_entries: wanted.max_entries,
        ..pinned
    } == wanted;
    // The identity map keeps its capacity across restarts (resizing it is an uninstall); the
    // agent warns when --identity-capacity differs.
    if name == maps::IDENTITY && same_layout {
        return Verdict::Keep;
    }
    Verdict::Recreate {
        migrate: same_layout,
    }
}

/// A pinned map that was unpinned so the loader creates it anew.
struct Recreated {
    name: String,
    /// The old map, kept open to copy its entries over.
    old: Option<OwnedFd>,
}

/// Unpins every pinned map whose definition (type, key and value size, capacity, flags) differs
/// from the embedded object's, so that the loader creates and pins it anew.
///
/// aya adopts whatever is pinned under a map's name. A map of another layout (an older release's
/// config or counters) would then fail the agent's writes or the verifier, and a map of another
/// size (the reverse-NAT map, resized in this release) would keep its old memory for ever.
/// Programs still attached keep their reference to the old map until [`relink`] swaps them, so
/// there is no moment without a working map; the reverse-NAT entries are copied over afterwards
/// (socket cookies are never reused, so nothing newer is overwritten). Only the identity map's
/// capacity is kept as pinned: resizing it is an explicit uninstall.
fn recreate_changed_maps(settings: &Settings) -> Result<Vec<Recreated>> {
    if !settings.pin_dir.is_dir() {
        return Ok(Vec::new());
    }
    let defs = object_defs(settings)?;
    let mut recreated = Vec::new();
    for (name, wanted) in defs {
        let path = settings.pin_dir.join(&name);
        if !path.exists() {
            continue;
        }
        let fd = sys::obj_get(&path)
            .map_err(|e| Error::io(format!("open pinned map {}", path.display()), e))?;
        let pinned = pinned_def(&fd)
            .map_err(|e| Error::io(format!("read the definition of {}", path.display()), e))?;
        let Verdict::Recreate { migrate } = verdict(&name, pinned, wanted) else {
            continue;
        };
        tracing::warn!(
            map = %name,
            pinned = %pinned,
            wanted = %wanted,
            entries_copied = migrate && name == maps::REVNAT,
            "a pinned map differs from this release's definition; recreating it"
        );
        fs::remove_file(&path).map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
        recreated.push(Recreated {
            name,
            old: migrate.then_some(fd),
        });
    }
    Ok(recreated)
}

/// Points every pinned link (cgroup hooks and the packet guard) at the program loaded now. A
/// program whose code did not change has the same tag (map references do not count), so
/// [`super::install`] adopted its link; but the adopted program still uses the old maps.
fn relink(interception: &mut Interception, settings: &Settings) -> Result<()> {
    let pin_dir = &settings.pin_dir;
    let coverage = guard_coverage(settings);
    let ebpf = interception.ebpf_mut();
    let mut targets: Vec<(PathBuf, String)> = Vec::new();
    for (dir, tc) in [("links", false), ("tc", true)] {
        let dir = pin_dir.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let program = if tc {
                // `<ifindex>-<interface>`: the guard the interface gets now (the sync after
                // this swaps a link of the other kind anyway).
                let ifname = file.split_once('-').map_or("", |(_, name)| name);
                match coverage.as_ref().and_then(|c| c.kind(ifname)) {
                    Some(kind) => kind.program().to_owned(),
                    None => programs::GUARD.to_owned(),
                }
            } else {
                file
            };
            targets.push((entry.path(), program));
        }
    }
    for (link_path, program) in targets {
        let Some(fd) = ebpf.program(&program).and_then(|p| p.fd().ok()) else {
            tracing::warn!(
                link = %link_path.display(),
                program,
                "a pinned link names no loaded program of this release; left as it is"
            );
            continue;
        };
        let link = sys::obj_get(&link_path)
            .map_err(|e| Error::io(format!("open pinned link {}", link_path.display()), e))?;
        sys::link_update(link.as_fd(), fd.as_fd(), None).map_err(|e| {
            Error::io(
                format!("point {} at the new program", link_path.display()),
                e,
            )
        })?;
        tracing::info!(link = %link_path.display(), program, "link now runs the program with the new maps");
    }
    Ok(())
}

/// Copies the reverse-NAT entries of the replaced map, so sockets redirected before the upgrade
/// still report the metadata address as their peer. Best effort: a socket whose entry is lost
/// sees the agent's address, which is honest if less transparent.
fn migrate_revnat(interception: &mut Interception, old: &OwnedFd) {
    let copied = (|| -> std::result::Result<usize, String> {
        let old = old.try_clone().map_err(|e| e.to_string())?;
        let old = MapData::from_fd(old).map_err(|e| e.to_string())?;
        let old: HashMap<_, u64, RevNat> =
            HashMap::try_from(aya::maps::Map::LruHashMap(old)).map_err(|e| e.to_string())?;
        let new = interception
            .ebpf_mut()
            .map_mut(maps::REVNAT)
            .ok_or_else(|| "the object has no reverse-NAT map".to_owned())?;
        let mut new: HashMap<_, u64, RevNat> = HashMap::try_from(new).map_err(|e| e.to_string())?;
        let mut copied = 0;
        for entry in old.iter() {
            let Ok((cookie, value)) = entry else { break };
            if new.insert(cookie, value, 0).is_ok() {
                copied += 1;
            }
        }
        Ok(copied)
    })();
    match copied {
        Ok(n) => tracing::info!(entries = n, "copied the reverse-NAT entries to the new map"),
        Err(e) => tracing::warn!(error = %e, "could not copy the reverse-NAT entries"),
    }
}

/// Pins each loaded guard program the settings use where the agent opens it, and a second copy
/// of it beside (replacing an older release's pins); removes the pins of a guard that is off.
fn pin_guard_program(interception: &mut Interception, settings: &Settings) -> Result<()> {
    let coverage = guard_coverage(settings);
    for (kind, on) in [
        (
            guard::Kind::Pod,
            coverage.as_ref().is_some_and(|c| c.pods.is_some()),
        ),
        (guard::Kind::Node, coverage.as_ref().is_some_and(|c| c.node)),
    ] {
        let name = kind.program();
        let paths = [
            guard_program_pin(&settings.pin_dir, name),
            spare_guard_program_pin(&settings.pin_dir, name),
        ];
        for path in &paths {
            if path.exists() {
                fs::remove_file(path)
                    .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
            }
        }
        if !on {
            continue;
        }
        let dir = settings.pin_dir.join(PROGS_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let program: &mut SchedClassifier = super::program_mut(interception.ebpf_mut(), name)?;
        if program.fd().is_err() {
            // Not loaded yet: no interface of this kind existed during the install's sync.
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        for (i, path) in paths.iter().enumerate() {
            if i > 0 {
                // The pins and the guard's links keep the first copy alive; load another.
                program
                    .unload()
                    .and_then(|()| program.load())
                    .map_err(|source| Error::Program { name, source })?;
            }
            program.pin(path).map_err(|source| Error::PinProgram {
                name,
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Removes the program pins (for `uninstall`); one line per removed pin.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>> {
    let dir = pin_dir.join(PROGS_DIR);
    let mut removed = Vec::new();
    if !dir.is_dir() {
        return Ok(removed);
    }
    for entry in fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))? {
        let path = entry
            .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
            .path();
        fs::remove_file(&path).map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
        removed.push(format!(
            "program {}: unpinned",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    fs::remove_dir(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(max_entries: u32, value_size: u32) -> MapDef {
        MapDef {
            map_type: 9,
            key_size: 8,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn pinned_maps_are_kept_resized_or_replaced() {
        assert_eq!(verdict(maps::REVNAT, def(8, 40), def(8, 40)), Verdict::Keep);
        assert_eq!(
            verdict(maps::REVNAT, def(65_536, 40), def(8_192, 40)),
            Verdict::Recreate { migrate: true }
        );
        assert_eq!(
            verdict(maps::REVNAT, def(8_192, 32), def(8_192, 40)),
            Verdict::Recreate { migrate: false }
        );
        // The identity map keeps its pinned capacity, but not another layout.
        assert_eq!(
            verdict(maps::IDENTITY, def(1024, 40), def(4096, 40)),
            Verdict::Keep
        );
        assert_eq!(
            verdict(maps::IDENTITY, def(1024, 32), def(1024, 40)),
            Verdict::Recreate { migrate: false }
        );
        let mut flags = def(1, 40);
        flags.flags = 1;
        assert_eq!(
            verdict(maps::CONFIG, flags, def(1, 40)),
            Verdict::Recreate { migrate: false }
        );
    }

    #[test]
    fn the_embedded_object_has_the_reverse_nat_map_of_this_release() {
        if EBPF_OBJECT.is_empty() {
            return;
        }
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let revnat = object.maps.get(maps::REVNAT).expect("a reverse-NAT map");
        assert_eq!(revnat.max_entries(), kube2iam_common::REVNAT_CAPACITY);
        assert_eq!(revnat.value_size() as usize, std::mem::size_of::<RevNat>());
        assert_eq!(revnat.pinning(), aya_obj::maps::PinningType::ByName);
    }
}
