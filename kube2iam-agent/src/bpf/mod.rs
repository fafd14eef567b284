//! Loading, attaching, pinning and adopting the kernel programs, and the typed map access.
//!
//! Lifecycle: the programs are attached to the target cgroup with bpf_link, and the links and
//! maps are pinned under the pin directory. A restarted agent adopts what is pinned: links are
//! never detached on start, so there is no moment without interception; if the embedded object
//! changed, each link's program is swapped atomically (BPF_LINK_UPDATE). Only `uninstall`
//! detaches.

pub mod egress;
pub mod guard;
pub mod host;
pub mod loader;
pub mod sys;
pub mod tcfilter;

use std::{
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramFd, SockOps, links::FdLink},
};
use kube2iam_common::{
    CONFIG_KEY, Config, Counter, FLAG_AGENT_IP6, FLAG_ATTEST_OFF, FLAG_ENABLED, FLAG_HOST_PODS,
    ip6_words, maps, port_repr, programs,
};

pub use self::host::KernelVersion;

/// The compiled programs, built by `build.rs` (aya-build) and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kube2iam"));

/// Errors of the kernel side of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse the kernel release {release:?}")]
    KernelVersion { release: String },
    #[error(
        "kernel {found} is too old: kube2iam-ebpf needs Linux {minimum} or newer (bpf_link for \
         cgroups and the netns cookie helper arrived in 5.7, the ring buffer and getpeername \
         hooks in 5.8)"
    )]
    KernelTooOld {
        found: KernelVersion,
        minimum: KernelVersion,
    },
    #[error(
        "missing privileges: this needs {need}; effective \
         capabilities are {caps:#x}. Run as root or grant them in the pod's securityContext"
    )]
    Privileges { need: &'static str, caps: u64 },
    #[error(
        "{path} is not a cgroup2 directory; pass --cgroup-path with a directory of the cgroup2 hierarchy"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{path} is not on a bpffs; mount one (mount -t bpf bpf {path}) or choose a --bpf-pin-path \
         under /sys/fs/bpf"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot mount {fstype} at {}", path.display())]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}: the kernel made no bpf_link")]
    NoLink {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("read link info of {name}")]
    LinkInfo {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pin link {name} at {}", path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pin program {name} at {}", path.display())]
    PinProgram {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the embedded eBPF object has no {kind} named {name}; the build is broken")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the pinned link {} is attached to cgroup id {pinned}, but --cgroup-path {} is cgroup id \
         {wanted}; run `kube2iam-agent uninstall` first to move interception to another cgroup",
        link.display(), cgroup.display()
    )]
    PinnedElsewhere {
        link: PathBuf,
        pinned: u64,
        cgroup: PathBuf,
        wanted: u64,
    },
    #[error("could not learn the host network namespace cookie: {0}")]
    NetnsCookie(String),
    #[error(
        "this binary was built with AYA_BUILD_SKIP and embeds no eBPF programs; rebuild without it"
    )]
    NoPrograms,
}

impl Error {
    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            action: action.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the agent learns the cookie of its own (the host's) network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CookieSource {
    /// getsockopt(SO_NETNS_COOKIE) where the kernel has it (5.14), else the probe program.
    Auto,
    /// getsockopt(SO_NETNS_COOKIE) only.
    Sockopt,
    /// A probe program in a private cgroup that records the cookie of the agent's own child.
    Probe,
}

/// What the programs should do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cgroup to attach to; `None` = the cgroup2 root.
    pub cgroup_path: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub agent_ip4: Ipv4Addr,
    pub agent_ip6: Option<Ipv6Addr>,
    pub agent_port: u16,
    pub metadata_ip4: Ipv4Addr,
    pub metadata_ip6: Ipv6Addr,
    pub metadata_port: u16,
    /// Compile the programs' debug events in (aya-log); off, the verifier prunes them.
    pub kernel_debug_log: bool,
    pub cookie_source: CookieSource,
    /// Entries of the identity map when it is first created.
    pub identity_capacity: u32,
    /// Which host interfaces get the packet guard; `None` turns the guard off.
    pub packet_guard: Option<guard::InterfacePatterns>,
    /// Put the node guard on every other interface but loopback (`--node-guard`).
    pub node_guard: bool,
    /// Use cls_bpf filters for the guard even where TCX exists (testing aid).
    pub guard_netlink: bool,
    /// Redirect the metadata connects of hostNetwork pods listed in the host-pods map.
    pub host_network_pods: bool,
    /// Attach the egress backstop (`k2i_egress`) beside the connect hooks.
    pub egress_guard: bool,
    /// Record who connected for the agent's attestation; off with `--identity-attestation
    /// off`, where nothing reads the records.
    pub attestation_records: bool,
}

impl Settings {
    fn config(&self, host_netns_cookie: u64, log_level: u8) -> Config {
        let mut flags = FLAG_ENABLED;
        if self.agent_ip6.is_some() {
            flags |= FLAG_AGENT_IP6;
        }
        if self.host_network_pods {
            flags |= FLAG_HOST_PODS;
        }
        if !self.attestation_records {
            flags |= FLAG_ATTEST_OFF;
        }
        Config {
            host_netns_cookie,
            agent_ip4: u32::from_ne_bytes(self.agent_ip4.octets()),
            agent_port: port_repr(self.agent_port),
            agent_ip6: ip6_words(self.agent_ip6.unwrap_or(Ipv6Addr::UNSPECIFIED).octets()),
            metadata_ip4: u32::from_ne_bytes(self.metadata_ip4.octets()),
            metadata_port: port_repr(self.metadata_port),
            metadata_ip6: ip6_words(self.metadata_ip6.octets()),
            flags,
            log_level: u32::from(log_level),
        }
    }
}

/// What happened to one program on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Attached for the first time and pinned.
    Attached,
    /// A pinned link ran the same program: left untouched.
    Adopted,
    /// A pinned link ran another program: swapped atomically through the link.
    Replaced,
    /// Not available on this kernel.
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct ProgramReport {
    pub name: &'static str,
    pub action: Action,
    pub link_id: Option<u32>,
}

/// The running interception: the loaded object (for map access) and what start-up did.
pub struct Interception {
    ebpf: Ebpf,
    guard: Option<(guard::Guard, guard::Coverage)>,
    pub kernel: KernelVersion,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub host_netns_cookie: u64,
    pub programs: Vec<ProgramReport>,
}

/// The cgroup address hooks, with the kernel that brought each (`None`: every supported one).
pub const HOOKS: [(&str, Option<KernelVersion>); 4] = [
    (programs::CONNECT4, None),
    (programs::CONNECT6, None),
    (programs::GETPEERNAME4, Some(KernelVersion::GETPEERNAME)),
    (programs::GETPEERNAME6, Some(KernelVersion::GETPEERNAME)),
];

/// aya-log level for the kernel programs: 0 = off, 4 = debug.
const KERNEL_LOG_OFF: u8 = 0;
const KERNEL_LOG_DEBUG: u8 = 4;

/// Loads the programs, writes the config and attaches (or adopts) every hook.
pub fn install(settings: &Settings) -> Result<Interception> {
    if EBPF_OBJECT.is_empty() {
        return Err(Error::NoPrograms);
    }
    let kernel = host::check_kernel()?;
    host::check_privileges(kernel, host::Task::Load)?;
    host::raise_memlock();

    let cgroup = match &settings.cgroup_path {
        Some(path) => path.clone(),
        None => host::cgroup2_root()?,
    };
    host::check_cgroup2_dir(&cgroup)?;
    let cgroup_id = host::cgroup_id(&cgroup)?;
    host::prepare_pin_dir(&settings.pin_dir)?;

    let log_level = if settings.kernel_debug_log {
        KERNEL_LOG_DEBUG
    } else {
        KERNEL_LOG_OFF
    };
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&settings.pin_dir)
        .map_max_entries(maps::IDENTITY, settings.identity_capacity)
        .override_global("AYA_LOG_LEVEL", &log_level, true)
        .load(EBPF_OBJECT)?;

    let host_netns_cookie = host_netns_cookie(&mut ebpf, &cgroup, settings.cookie_source)?;

    // The config goes in before any attach, so a freshly attached program never runs without it.
    let config = settings.config(host_netns_cookie, log_level);
    let previous = {
        let mut map = config_map(&mut ebpf)?;
        let previous = map.get(&CONFIG_KEY, 0).ok();
        map.insert(CONFIG_KEY, config, 0)
            .map_err(|source| Error::Map {
                name: maps::CONFIG,
                source,
            })?;
        previous
    };
    // Programs loaded with another log level must be replaced even if their code is the same.
    let log_level_changed = previous.is_some_and(|p| p.log_level != u32::from(log_level));

    let cgroup_file = fs::File::open(&cgroup)
        .map_err(|e| Error::io(format!("open cgroup {}", cgroup.display()), e))?;
    let mut reports = Vec::with_capacity(HOOKS.len());
    let mut skipped_notice = false;
    for (name, needs) in HOOKS {
        if let Some(needs) = needs
            && kernel < needs
        {
            if !skipped_notice {
                tracing::info!(
                    %kernel,
                    "getpeername hooks need Linux {needs}; redirected sockets will report the \
                     agent's address as their peer"
                );
                skipped_notice = true;
            }
            reports.push(ProgramReport {
                name,
                action: Action::Skipped(format!("needs Linux {needs}")),
                link_id: None,
            });
            continue;
        }
        let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
        program
            .load()
            .map_err(|source| Error::Program { name, source })?;
        let link_path = link_path(&settings.pin_dir, name);
        let report = if link_path.exists() {
            let fd = program
                .fd()
                .map_err(|source| Error::Program { name, source })?;
            adopt(name, fd, &link_path, cgroup_id, &cgroup, log_level_changed)?
        } else {
            attach(name, &link_path, || {
                let id = program.attach(&cgroup_file, CgroupAttachMode::Single)?;
                program.take_link(id).map(FdLink::try_from)
            })?
        };
        reports.push(report);
    }
    // The attestation hook: sock_ops on the same cgroup.
    {
        let name = programs::SOCK_OPS;
        let program: &mut SockOps = program_mut(&mut ebpf, name)?;
        program
            .load()
            .map_err(|source| Error::Program { name, source })?;
        let link_path = link_path(&settings.pin_dir, name);
        let report = if link_path.exists() {
            let fd = program
                .fd()
                .map_err(|source| Error::Program { name, source })?;
            adopt(name, fd, &link_path, cgroup_id, &cgroup, log_level_changed)?
        } else {
            attach(name, &link_path, || {
                let id = program.attach(&cgroup_file, CgroupAttachMode::Single)?;
                program.take_link(id).map(FdLink::try_from)
            })?
        };
        reports.push(report);
    }
    reports.push(egress_backstop(
        &mut ebpf,
        settings,
        &cgroup,
        cgroup_id,
        log_level_changed,
    )?);

    if settings.packet_guard.is_none() {
        tracing::warn!(
            "packet guard off: raw-socket traffic from pods to the metadata service is not dropped \
             on pod interfaces"
        );
    }
    if !settings.node_guard {
        tracing::warn!(
            "node guard off: packets to the metadata service that enter the node by another \
             interface (a tunnel or overlay device after decapsulation, the uplink) are not dropped"
        );
    }
    let guard = match guard::Coverage::new(settings.packet_guard.clone(), settings.node_guard) {
        Some(coverage) => {
            let mut g = guard::Guard::new(&settings.pin_dir, kernel, settings.guard_netlink)?;
            let changes = g.sync(&mut ebpf, &coverage)?;
            tracing::info!(
                attached = ?changes.attached,
                adopted = ?changes.adopted,
                replaced = ?changes.replaced,
                released = ?changes.released,
                repaired = ?changes.repaired,
                "packet guards on the node's interfaces"
            );
            for (interface, error) in &changes.failed {
                tracing::error!(interface, "packet guard: {error}");
            }
            Some((g, coverage))
        }
        None => None,
    };

    Ok(Interception {
        ebpf,
        guard,
        kernel,
        cgroup,
        pin_dir: settings.pin_dir.clone(),
        host_netns_cookie,
        programs: reports,
    })
}

/// Attaches or adopts the egress backstop, or removes it when it is turned off.
fn egress_backstop(
    ebpf: &mut Ebpf,
    settings: &Settings,
    cgroup: &Path,
    cgroup_id: u64,
    force_replace: bool,
) -> Result<ProgramReport> {
    if settings.egress_guard {
        return egress::install(ebpf, &settings.pin_dir, cgroup, cgroup_id, force_replace);
    }
    let removed = egress::release(&settings.pin_dir)?;
    tracing::warn!(
        removed,
        "egress guard off: packets that pod sockets send to the metadata service after a DNAT, \
         or from raw sockets, are not dropped unless the packet guard sees them"
    );
    Ok(ProgramReport {
        name: programs::EGRESS,
        action: Action::Skipped("--egress-guard false".into()),
        link_id: None,
    })
}

/// Attaches with `make_link` (which returns the program's link as an FdLink) and pins the link.
fn attach(
    name: &'static str,
    link_path: &Path,
    make_link: impl FnOnce() -> std::result::Result<
        std::result::Result<FdLink, aya::programs::links::LinkError>,
        aya::programs::ProgramError,
    >,
) -> Result<ProgramReport> {
    // On kernels with bpf_link (all we support) aya attaches through BPF_LINK_CREATE, which for
    // cgroups always behaves as BPF_F_ALLOW_MULTI and rejects any flag: "Single" passes no
    // flag, and other programs (Cilium's socket LB) keep running beside ours.
    let link = make_link()
        .map_err(|source| Error::Program { name, source })?
        .map_err(|source| Error::NoLink { name, source })?;
    let info = link
        .info()
        .map_err(|source| Error::LinkInfo { name, source })?;
    link.pin(link_path).map_err(|source| Error::Pin {
        name,
        path: link_path.to_owned(),
        source,
    })?;
    Ok(ProgramReport {
        name,
        action: Action::Attached,
        link_id: Some(info.id()),
    })
}

/// Adopts the link pinned at `link_path` if it holds `new`'s program (same tag), else swaps
/// `new` in behind it; the link must be on `cgroup`.
fn adopt(
    name: &'static str,
    new: &ProgramFd,
    link_path: &Path,
    cgroup_id: u64,
    cgroup: &Path,
    force_replace: bool,
) -> Result<ProgramReport> {
    let link = sys::obj_get(link_path)
        .map_err(|e| Error::io(format!("open pinned link {}", link_path.display()), e))?;
    let info = sys::link_info(link.as_fd()).map_err(|e| {
        Error::io(
            format!("read info of pinned link {}", link_path.display()),
            e,
        )
    })?;
    if info.cgroup_id != cgroup_id {
        return Err(Error::PinnedElsewhere {
            link: link_path.to_owned(),
            pinned: info.cgroup_id,
            cgroup: cgroup.to_owned(),
            wanted: cgroup_id,
        });
    }
    let old_tag = sys::link_prog_tag(link.as_fd()).map_err(|e| {
        Error::io(
            format!("read the program tag of {}", link_path.display()),
            e,
        )
    })?;
    let new_tag = sys::prog_tag(new.as_fd()).map_err(|e| Error::io("read new program tag", e))?;
    if old_tag == new_tag && !force_replace {
        return Ok(ProgramReport {
            name,
            action: Action::Adopted,
            link_id: Some(info.id),
        });
    }
    sys::swap_link_prog(link.as_fd(), new.as_fd(), info.prog_id)
        .map_err(|e| Error::io(format!("replace the program behind link {name}"), e))?;
    tracing::info!(
        program = name,
        link_id = info.id,
        old_tag = %hex(&old_tag),
        new_tag = %hex(&new_tag),
        "replaced the pinned program atomically"
    );
    Ok(ProgramReport {
        name,
        action: Action::Replaced,
        link_id: Some(info.id),
    })
}

/// Bytes as lowercase hex, as the kernel prints a program tag.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn config_map(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, u32, Config>> {
    let map = ebpf.map_mut(maps::CONFIG).ok_or(Error::Missing {
        kind: "map",
        name: maps::CONFIG,
    })?;
    HashMap::try_from(map).map_err(|source| Error::Map {
        name: maps::CONFIG,
        source,
    })
}

impl Interception {
    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map = self.ebpf.map(maps::COUNTERS).ok_or(Error::Missing {
            kind: "map",
            name: maps::COUNTERS,
        })?;
        read_counters(PerCpuArray::try_from(map).map_err(|source| Error::Map {
            name: maps::COUNTERS,
            source,
        })?)
    }

    /// Turns interception off without detaching: pods' metadata connects are refused
    /// (fail-closed) until an agent writes an enabled config again.
    pub fn disable(&mut self) -> Result<()> {
        let mut map = config_map(&mut self.ebpf)?;
        let mut config = map.get(&CONFIG_KEY, 0).map_err(|source| Error::Map {
            name: maps::CONFIG,
            source,
        })?;
        config.flags &= !FLAG_ENABLED;
        map.insert(CONFIG_KEY, config, 0)
            .map_err(|source| Error::Map {
                name: maps::CONFIG,
                source,
            })
    }

    /// Takes the pinned identity map for the pod registry. Its capacity is the pinned map's,
    /// which a restart does not change (that would drop what pods are known).
    pub fn take_identity_map(&mut self) -> Result<crate::identity::BpfIdentityMap> {
        let map = self.ebpf.take_map(maps::IDENTITY).ok_or(Error::Missing {
            kind: "map",
            name: maps::IDENTITY,
        })?;
        let capacity = match &map {
            aya::maps::Map::HashMap(data) => data.info().map(|i| i.max_entries()).unwrap_or(0),
            _ => 0,
        };
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: maps::IDENTITY,
            source,
        })?;
        Ok(crate::identity::BpfIdentityMap::new(map, capacity))
    }

    /// Takes the pinned attestation map (connection → who connected).
    pub fn take_attest_map(&mut self) -> Result<crate::attest::AttestMap> {
        let map = self.ebpf.take_map(maps::ATTEST).ok_or(Error::Missing {
            kind: "map",
            name: maps::ATTEST,
        })?;
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: maps::ATTEST,
            source,
        })?;
        Ok(crate::attest::AttestMap::new(map))
    }

    /// Takes the pinned map of hostNetwork pods' cgroups.
    pub fn take_host_pods_map(&mut self) -> Result<crate::attest::HostPodsMap> {
        let map = self.ebpf.take_map(maps::HOST_PODS).ok_or(Error::Missing {
            kind: "map",
            name: maps::HOST_PODS,
        })?;
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: maps::HOST_PODS,
            source,
        })?;
        Ok(crate::attest::HostPodsMap::new(map))
    }

    /// Attaches the guard to interfaces that appeared, releases vanished ones.
    pub fn sync_guard(&mut self) -> Result<Option<guard::GuardChanges>> {
        match &mut self.guard {
            Some((g, coverage)) => g.sync(&mut self.ebpf, coverage).map(Some),
            None => Ok(None),
        }
    }

    /// The loaded object, for the debug-log reader.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

fn read_counters<T: std::borrow::Borrow<MapData>>(
    map: PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, u64)>> {
    Counter::ALL
        .into_iter()
        .map(|counter| {
            let values = map.get(&(counter as u32), 0).map_err(|source| Error::Map {
                name: maps::COUNTERS,
                source,
            })?;
            Ok((counter, values.iter().sum()))
        })
        .collect()
}

/// Where an installation pins its links: one file per hook, named after its program.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The pinned link of program `name`.
pub fn link_path(pin_dir: &Path, name: &str) -> PathBuf {
    links_dir(pin_dir).join(name)
}

/// Reads the config an installation wrote to its pinned config map: `None` when the map is
/// not pinned or holds no config.
pub fn pinned_config(pin_dir: &Path) -> std::result::Result<Option<Config>, aya::maps::MapError> {
    let path = pin_dir.join(maps::CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)?;
    let map: HashMap<_, u32, Config> = HashMap::try_from(aya::maps::Map::HashMap(data))?;
    match map.get(&CONFIG_KEY, 0) {
        Ok(config) => Ok(Some(config)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the counters of a pinned installation (for `inspect` and tests).
pub fn pinned_counters(pin_dir: &Path) -> Result<Vec<(Counter, u64)>> {
    let path = pin_dir.join(maps::COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map {
        name: maps::COUNTERS,
        source,
    })?;
    let map = aya::maps::Map::PerCpuArray(data);
    read_counters(PerCpuArray::try_from(map).map_err(|source| Error::Map {
        name: maps::COUNTERS,
        source,
    })?)
}

/// The host (agent's own) network namespace cookie.
fn host_netns_cookie(ebpf: &mut Ebpf, cgroup: &Path, source: CookieSource) -> Result<u64> {
    if source != CookieSource::Probe {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::io("create a socket", io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        match sys::netns_cookie(&socket) {
            Ok(cookie) => return Ok(cookie),
            Err(e)
                if source == CookieSource::Auto && e.raw_os_error() == Some(libc::ENOPROTOOPT) =>
            {
                tracing::info!(
                    "this kernel has no SO_NETNS_COOKIE (5.14); learning the host netns cookie with a probe program"
                );
            }
            Err(e) => {
                return Err(Error::NetnsCookie(format!(
                    "getsockopt(SO_NETNS_COOKIE): {e}"
                )));
            }
        }
    }
    let cookie = probe_netns_cookie(ebpf, cgroup)?;
    tracing::info!(
        cookie,
        "learned the host netns cookie with the probe program"
    );
    Ok(cookie)
}

/// The hidden subcommand the probe child runs: one connect() that the probe program sees.
pub const NETNS_PROBE_SUBCOMMAND: &str = "internal-netns-probe";

/// Runs in the probe child: a UDP connect sends no packet but passes through connect4.
pub fn netns_probe_child() -> io::Result<()> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.connect((Ipv4Addr::LOCALHOST, 9))
}

/// Removes the probe cgroup on every path out.
struct ProbeCgroup(PathBuf);

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove the netns probe cgroup");
        }
    }
}

fn probe_netns_cookie(ebpf: &mut Ebpf, cgroup: &Path) -> Result<u64> {
    let dir = cgroup.join(format!("kube2iam-netns-probe-{}", std::process::id()));
    if dir.exists() {
        let _ = fs::remove_dir(&dir);
    }
    fs::create_dir(&dir)
        .map_err(|e| Error::io(format!("create probe cgroup {}", dir.display()), e))?;
    let guard = ProbeCgroup(dir);
    let name = programs::NETNS_PROBE;
    let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
    program
        .load()
        .map_err(|source| Error::Program { name, source })?;
    let cgroup_file = fs::File::open(&guard.0)
        .map_err(|e| Error::io(format!("open probe cgroup {}", guard.0.display()), e))?;
    // Link-based attach: multi-program by nature (see `attach`).
    let link = program
        .attach(&cgroup_file, CgroupAttachMode::Single)
        .map_err(|source| Error::Program { name, source })?;

    let procs = fs::OpenOptions::new()
        .write(true)
        .open(guard.0.join("cgroup.procs"))
        .map_err(|e| Error::io("open the probe cgroup's cgroup.procs", e))?;
    let procs_fd = procs.as_raw_fd();
    let exe =
        std::env::current_exe().map_err(|e| Error::io("find the agent's own executable", e))?;
    let mut child = Command::new(exe);
    child.arg(NETNS_PROBE_SUBCOMMAND);
    // SAFETY: only write(2) between fork and exec; the fd stays open in the parent.
    unsafe {
        child.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = child
        .status()
        .map_err(|e| Error::io("run the netns probe child", e))?;
    program
        .detach(link)
        .map_err(|source| Error::Program { name, source })?;
    drop(procs);
    drop(guard);
    if !status.success() {
        return Err(Error::NetnsCookie(format!(
            "the probe child failed: {status}"
        )));
    }
    let map = ebpf.map(maps::NETNS_PROBE).ok_or(Error::Missing {
        kind: "map",
        name: maps::NETNS_PROBE,
    })?;
    let array: Array<_, u64> = Array::try_from(map).map_err(|source| Error::Map {
        name: maps::NETNS_PROBE,
        source,
    })?;
    let cookie = array.get(&0, 0).map_err(|source| Error::Map {
        name: maps::NETNS_PROBE,
        source,
    })?;
    if cookie == 0 {
        return Err(Error::NetnsCookie(
            "the probe program saw no connect".into(),
        ));
    }
    Ok(cookie)
}

/// Detaches and unpins everything under `pin_dir`; returns one line per removed object.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>> {
    let mut removed = guard::uninstall(pin_dir)?;
    removed.extend(loader::uninstall(pin_dir)?);
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let links_dir = links_dir(pin_dir);
    if links_dir.is_dir() {
        for entry in read_dir_sorted(&links_dir)? {
            let link = sys::obj_get(&entry)
                .map_err(|e| Error::io(format!("open pinned link {}", entry.display()), e))?;
            let info = sys::link_info(link.as_fd())
                .map_err(|e| Error::io(format!("read info of {}", entry.display()), e))?;
            let how = match sys::link_detach(link.as_fd()) {
                Ok(()) => "detached and unpinned",
                // Kernels before 5.9 cannot force a detach; unpinning drops the last reference
                // once no process holds the link open.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    "unpinned (detached when the last holder closes it)"
                }
                Err(e) => return Err(Error::io(format!("detach link {}", entry.display()), e)),
            };
            fs::remove_file(&entry)
                .map_err(|e| Error::io(format!("unpin {}", entry.display()), e))?;
            removed.push(format!(
                "link {} (link id {}, program id {}, cgroup id {}): {how}",
                file_name(&entry),
                info.id,
                info.prog_id,
                info.cgroup_id
            ));
        }
        fs::remove_dir(&links_dir)
            .map_err(|e| Error::io(format!("remove {}", links_dir.display()), e))?;
    }
    for entry in read_dir_sorted(pin_dir)? {
        if entry.is_dir() {
            return Err(Error::io(
                format!(
                    "{} is not ours; remove it by hand if it is stale",
                    entry.display()
                ),
                io::ErrorKind::DirectoryNotEmpty.into(),
            ));
        }
        fs::remove_file(&entry).map_err(|e| Error::io(format!("unpin {}", entry.display()), e))?;
        removed.push(format!("map {}: unpinned", file_name(&entry)));
    }
    fs::remove_dir(pin_dir).map_err(|e| Error::io(format!("remove {}", pin_dir.display()), e))?;
    removed.push(format!("directory {}: removed", pin_dir.display()));
    Ok(removed)
}

/// A program of the object by name, as its type.
pub(crate) fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
