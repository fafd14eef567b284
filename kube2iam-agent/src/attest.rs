//! Kernel attestation: which pod made the connection the agent accepted.
//!
//! At a redirected connect the kernel program records the connecting task's cgroup v2 id and the
//! socket's netns cookie; a `sock_ops` callback moves that record under the connection's
//! addresses and ports ([`ConnKey`]), where the agent reads it for each connection it accepts.
//! The cgroup id names a pod through the directory layout kubelet gives pods, for both cgroup
//! drivers:
//!
//! * systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<ctr>`
//!   (the UID's dashes written as underscores; Guaranteed pods sit directly under
//!   `kubepods.slice` as `kubepods-pod<uid>.slice`)
//! * cgroupfs: `kubepods/burstable/pod<uid>/<ctr>` (Guaranteed: `kubepods/pod<uid>/<ctr>`)
//!
//! A pod cannot change its cgroup or forge a record: the address a connection comes from can be
//! spoofed on a shared L2 segment or inherited from a finished pod, the cgroup cannot.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use kube2iam_common::{Attestation, ConnKey, ip6_words};

/// Whether a pod must be attested by the kernel to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Serve only connections the kernel attributes to the pod that owns the address.
    Require,
    /// As `require` wherever the kernel can name the pod; where it cannot (the connecting
    /// process is in no pod's cgroup v2, as on cgroup-v1-only nodes), the address alone
    /// decides. A connection that did not come through the redirect is refused either way.
    #[default]
    Prefer,
    /// The address alone decides (kube2iam's behaviour). Callers must still be pods on this
    /// node.
    Off,
}

/// The kernel's word on one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The connecting task ran in the cgroup of pod `uid`.
    Pod {
        uid: String,
        /// The socket was in the host network namespace (a hostNetwork pod).
        host_netns: bool,
    },
    /// The connection came through the redirect from a task in no pod's cgroup (cgroup id
    /// given): pods on this node are not in cgroup v2, or the caller is no pod.
    NoPodCgroup { cgroup_id: u64 },
    /// The connection came through the redirect, but neither the task's cgroup nor any of its
    /// recorded ancestors is in the cgroup tree the agent reads (removed, or hidden deeper than
    /// the agent scans): who made it cannot be told, so it is not served.
    Unresolved { cgroup_id: u64 },
    /// No record: the connection did not come through the redirect on this node (another
    /// node, a direct connect to the agent's port, or hand-made packets).
    Unattested,
    /// Attestation is off.
    NotChecked,
}

impl Caller {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Caller::Pod { .. } => "pod",
            Caller::NoPodCgroup { .. } => "no_pod_cgroup",
            Caller::Unresolved { .. } => "unresolved_cgroup",
            Caller::Unattested => "unattested",
            Caller::NotChecked => "off",
        }
    }
}

/// The key the `sock_ops` program stored this connection under: the client (the accepted
/// socket's peer) and the agent (its local address).
pub fn conn_key(peer: SocketAddr, local: SocketAddr) -> ConnKey {
    let words = |ip: IpAddr| {
        ip6_words(match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        })
    };
    ConnKey {
        client_addr: words(peer.ip()),
        agent_addr: words(local.ip()),
        client_port: u32::from(peer.port()),
        agent_port: u32::from(local.port()),
    }
}

/// The UID in one path component, if the component is a kubelet pod cgroup.
pub fn pod_uid_of_component(component: &str) -> Option<String> {
    // cgroupfs driver: `pod<uid>`.
    if let Some(uid) = component.strip_prefix("pod")
        && is_uid(uid)
    {
        return Some(uid.to_owned());
    }
    // systemd driver: `kubepods[-<qos>]-pod<uid with _>.slice`.
    let slice = component.strip_suffix(".slice")?;
    if !slice.starts_with("kubepods-") {
        return None;
    }
    let (_, uid) = slice.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A Kubernetes pod UID: a UUID, or the 32 hex digits kubelet gives static pods.
fn is_uid(s: &str) -> bool {
    let hex_or_dash = s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let uuid = s.len() == 36
        && s.bytes()
            .enumerate()
            .all(|(i, b)| (b == b'-') == matches!(i, 8 | 13 | 18 | 23));
    let hash = s.len() == 32 && !s.contains('-');
    hex_or_dash && (uuid || hash)
}

/// The pod a cgroup path (relative to the attach cgroup) belongs to: the outermost pod
/// component below a `kubepods` one, with its index. Nested cgroups a container makes inside
/// its own cannot name another pod: the outermost match is kubelet's.
pub fn pod_of_path(relative: &Path) -> Option<(usize, String)> {
    let mut under_kubepods = false;
    for (i, component) in relative.components().enumerate() {
        let name = component.as_os_str().to_str()?;
        if under_kubepods && let Some(uid) = pod_uid_of_component(name) {
            return Some((i, uid));
        }
        if name == "kubepods" || name.starts_with("kubepods.") || name.starts_with("kubepods-") {
            under_kubepods = true;
        }
    }
    None
}

/// One pod's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    /// The id of the pod-level cgroup (containers are below it).
    pub pod_cgroup_id: u64,
}

#[derive(Default)]
struct Scan {
    /// Every cgroup id in the tree at the last scan → its pod, if any.
    ids: HashMap<u64, Option<PodCgroup>>,
    /// Pod UID → its pod-level cgroup id.
    pods: HashMap<String, u64>,
    at: Option<Instant>,
}

/// Deeper than any kubelet layout (with room for a test or a container runtime's nesting).
const MAX_DEPTH: usize = 16;
/// A miss rescans the tree at most this often.
const MIN_RESCAN: Duration = Duration::from_millis(50);

/// cgroup id → pod, from the cgroup2 tree below the cgroup the programs are attached to.
/// Cached; a cgroup id not seen yet triggers a rescan (rate-limited).
pub struct CgroupPods {
    root: PathBuf,
    scan: Mutex<Scan>,
    /// How many pod cgroups the last scan found (read by every request, without the lock).
    pod_count: AtomicUsize,
    /// Counts the scans stored, each counted after it is: what was decided from one scan holds
    /// while the count is unchanged.
    generation: AtomicU64,
    /// One scan at a time; concurrent misses wait for it and reuse its result.
    scanning: tokio::sync::Mutex<()>,
}

impl CgroupPods {
    pub fn new(root: PathBuf) -> CgroupPods {
        CgroupPods {
            root,
            scan: Mutex::default(),
            pod_count: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            scanning: tokio::sync::Mutex::new(()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes `scan` as what the tree holds now.
    fn store(&self, scan: Scan) {
        let mut state = self.state();
        self.pod_count.store(scan.pods.len(), Ordering::Relaxed);
        *state = scan;
        drop(state);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Read before the scan's results are: see the field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Scan> {
        self.scan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the last scan says of `id`: `None` if it was not in the tree then.
    pub fn cached(&self, id: u64) -> Option<Option<PodCgroup>> {
        self.state().ids.get(&id).cloned()
    }

    /// Rescans now (blocking): for start-up and the host-pods sync.
    pub fn rescan(&self) -> io::Result<()> {
        self.store(scan_tree(&self.root)?);
        Ok(())
    }

    /// The pod a connection's record names: the outermost pod cgroup among the task's
    /// recorded ancestors (which a process cannot leave or hide while its pod runs), else what
    /// the scan says of the task's own cgroup. `Err(())` when the record's cgroups are not in
    /// the tree at all.
    pub async fn resolve_record(&self, record: &Attestation) -> Result<Option<PodCgroup>, ()> {
        for pass in 0..2 {
            if let Some(found) = self.lookup_record(record) {
                return Ok(found);
            }
            if pass == 0 {
                self.rescan_for_miss().await;
            }
        }
        Err(())
    }

    /// From the cache: `Some(pod or none)` when the record can be decided, `None` on a miss.
    fn lookup_record(&self, record: &Attestation) -> Option<Option<PodCgroup>> {
        let scan = self.state();
        // Level order: the first pod found is the outermost.
        for id in record.ancestors.iter().filter(|id| **id != 0) {
            if let Some(Some(pod)) = scan.ids.get(id) {
                return Some(Some(pod.clone()));
            }
        }
        scan.ids.get(&record.cgroup_id).cloned()
    }

    async fn rescan_for_miss(&self) {
        let _one = self.scanning.lock().await;
        let recent = self.state().at.is_some_and(|at| at.elapsed() < MIN_RESCAN);
        if recent {
            tokio::time::sleep(MIN_RESCAN).await;
        }
        let root = self.root.clone();
        match tokio::task::spawn_blocking(move || scan_tree(&root)).await {
            Ok(Ok(scan)) => self.store(scan),
            Ok(Err(e)) => tracing::warn!(root = %self.root.display(), "cannot scan cgroups: {e}"),
            Err(e) => tracing::warn!("cgroup scan failed: {e}"),
        }
    }

    /// The pod-level cgroup id of pod `uid`, as of the last scan.
    pub fn pod_cgroup(&self, uid: &str) -> Option<u64> {
        self.state().pods.get(uid).copied()
    }

    /// How many pod cgroups the last scan found.
    pub fn pod_count(&self) -> usize {
        self.pod_count.load(Ordering::Relaxed)
    }
}

/// Walks the tree below `root` (cgroup ids are the directories' inode numbers on cgroup2).
fn scan_tree(root: &Path) -> io::Result<Scan> {
    let mut scan = Scan {
        at: Some(Instant::now()),
        ..Scan::default()
    };
    let root_id = fs::metadata(root)?.ino();
    scan.ids.insert(root_id, None);
    let mut stack = vec![(root.to_owned(), 0usize, None::<PodCgroup>)];
    while let Some((dir, depth, pod)) = stack.pop() {
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue; // removed while scanning
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if !kind.is_dir() {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let id = meta.ino();
            let this_pod = match &pod {
                Some(p) => Some(p.clone()),
                None => path
                    .strip_prefix(root)
                    .ok()
                    .and_then(pod_of_path)
                    .filter(|(i, _)| *i + 1 == depth_of(root, &path))
                    .map(|(_, uid)| {
                        scan.pods.insert(uid.clone(), id);
                        PodCgroup {
                            uid,
                            pod_cgroup_id: id,
                        }
                    }),
            };
            scan.ids.insert(id, this_pod.clone());
            stack.push((path, depth + 1, this_pod));
        }
    }
    Ok(scan)
}

fn depth_of(root: &Path, path: &Path) -> usize {
    path.strip_prefix(root)
        .map(|p| p.components().count())
        .unwrap_or(0)
}

/// The pinned attestation map, read for each accepted connection.
pub struct AttestMap {
    map: BpfHashMap<MapData, ConnKey, Attestation>,
}

impl AttestMap {
    pub fn new(map: BpfHashMap<MapData, ConnKey, Attestation>) -> AttestMap {
        AttestMap { map }
    }

    /// The record for a connection, if the kernel made one.
    pub fn get(&self, key: &ConnKey) -> Option<Attestation> {
        self.map.get(key, 0).ok()
    }
}

/// The pinned map of hostNetwork pods' cgroups whose metadata connects are redirected.
pub struct HostPodsMap {
    map: Mutex<BpfHashMap<MapData, u64, u8>>,
}

impl HostPodsMap {
    pub fn new(map: BpfHashMap<MapData, u64, u8>) -> HostPodsMap {
        HostPodsMap {
            map: Mutex::new(map),
        }
    }

    /// Makes the map hold exactly `ids`.
    pub fn set(&self, ids: &HashSet<u64>) -> Result<(), aya::maps::MapError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let present: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for id in present.iter().filter(|id| !ids.contains(id)) {
            let _ = map.remove(id);
        }
        for id in ids.iter().filter(|id| !present.contains(id)) {
            map.insert(id, 1, 0)?;
        }
        Ok(())
    }
}

/// Looks the caller up: the connection's record, then the pod its cgroup belongs to.
pub async fn identify(
    mode: Mode,
    map: Option<&AttestMap>,
    pods: &CgroupPods,
    host_netns_cookie: u64,
    peer: SocketAddr,
    local: SocketAddr,
) -> Caller {
    if mode == Mode::Off {
        return Caller::NotChecked;
    }
    let Some(record) = map.and_then(|m| m.get(&conn_key(peer, local))) else {
        return Caller::Unattested;
    };
    match pods.resolve_record(&record).await {
        Ok(Some(pod)) => Caller::Pod {
            uid: pod.uid,
            host_netns: record.netns_cookie == host_netns_cookie,
        },
        Ok(None) => Caller::NoPodCgroup {
            cgroup_id: record.cgroup_id,
        },
        Err(()) => Caller::Unresolved {
            cgroup_id: record.cgroup_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2f1c3a4b-5d6e-4f70-8a9b-0c1d2e3f4a5b";

    #[test]
    fn both_cgroup_drivers_name_the_pod() {
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-abc.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_of_path(Path::new(&systemd)), Some((2, UID.into())));
        let guaranteed = format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_of_path(Path::new(&guaranteed)), Some((1, UID.into())));
        let cgroupfs = format!("kubepods/besteffort/pod{UID}/0123456789abcdef");
        assert_eq!(pod_of_path(Path::new(&cgroupfs)), Some((2, UID.into())));
        let cgroupfs_guaranteed = format!("kubepods/pod{UID}");
        assert_eq!(
            pod_of_path(Path::new(&cgroupfs_guaranteed)),
            Some((1, UID.into()))
        );
        let static_pod = "kubepods/burstable/pod0123456789abcdef0123456789abcdef/ctr";
        assert_eq!(
            pod_of_path(Path::new(static_pod)).map(|(_, u)| u),
            Some("0123456789abcdef0123456789abcdef".into())
        );
    }

    #[test]
    fn the_outermost_pod_wins_and_kubepods_must_come_first() {
        let other = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let nested = format!("kubepods/burstable/pod{UID}/ctr/pod{other}");
        assert_eq!(
            pod_of_path(Path::new(&nested)).map(|(_, u)| u),
            Some(UID.into())
        );
        assert_eq!(
            pod_of_path(Path::new(&format!("system.slice/pod{UID}"))),
            None
        );
        assert_eq!(pod_of_path(Path::new(&format!("pod{UID}"))), None);
        assert_eq!(pod_of_path(Path::new("kubepods/burstable")), None);
        assert_eq!(pod_uid_of_component("podnot-a-uid"), None);
        assert_eq!(pod_uid_of_component("kubepods-burstable.slice"), None);
        assert_eq!(
            pod_uid_of_component(&format!("pod{}", &UID[..35])),
            None,
            "a truncated UID is no UID"
        );
    }

    #[test]
    fn scan_maps_container_cgroups_to_their_pod() {
        let dir = std::env::temp_dir().join(format!("k2i-attest-unit-{}", std::process::id()));
        let pod_dir = dir.join(format!("kubepods/burstable/pod{UID}"));
        fs::create_dir_all(pod_dir.join("ctr-a")).unwrap();
        fs::create_dir_all(dir.join("system.slice")).unwrap();
        let scan = scan_tree(&dir).unwrap();
        let id = |p: &Path| fs::metadata(p).unwrap().ino();
        let pod_id = id(&pod_dir);
        let expected = Some(PodCgroup {
            uid: UID.into(),
            pod_cgroup_id: pod_id,
        });
        assert_eq!(scan.ids.get(&id(&pod_dir.join("ctr-a"))), Some(&expected));
        assert_eq!(scan.ids.get(&pod_id), Some(&expected));
        assert_eq!(scan.ids.get(&id(&dir.join("system.slice"))), Some(&None));
        assert_eq!(scan.pods.get(UID), Some(&pod_id));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_record_names_its_pod_by_ancestor_even_when_its_own_cgroup_is_hidden_or_gone() {
        let dir = std::env::temp_dir().join(format!("k2i-attest-anc-{}", std::process::id()));
        let pod_dir = dir.join(format!("kubepods/burstable/pod{UID}"));
        fs::create_dir_all(pod_dir.join("ctr")).unwrap();
        fs::create_dir_all(dir.join("system.slice")).unwrap();
        let id = |p: &Path| fs::metadata(p).unwrap().ino();
        let pods = CgroupPods::new(dir.clone());
        pods.rescan().unwrap();
        let record = |leaf: u64, ancestors: &[u64]| {
            let mut a = [0u64; kube2iam_common::ATTEST_ANCESTORS];
            a[..ancestors.len()].copy_from_slice(ancestors);
            Attestation {
                cgroup_id: leaf,
                netns_cookie: 0,
                socket_cookie: 0,
                ancestors: a,
            }
        };
        let chain = [
            id(&dir.join("kubepods")),
            id(&dir.join("kubepods/burstable")),
            id(&pod_dir),
            id(&pod_dir.join("ctr")),
        ];
        // A leaf the scan never saw (too deep, or removed), below the pod's cgroup.
        let hidden = record(u64::MAX - 7, &chain);
        assert_eq!(
            pods.resolve_record(&hidden).await.map(|p| p.map(|p| p.uid)),
            Ok(Some(UID.to_owned()))
        );
        // A known non-pod cgroup: no pod.
        let system = id(&dir.join("system.slice"));
        assert_eq!(
            pods.resolve_record(&record(system, &[system])).await,
            Ok(None)
        );
        // An unknown cgroup with no pod among its ancestors cannot be told: unresolved.
        let unknown = record(u64::MAX - 9, &[system, u64::MAX - 8]);
        assert_eq!(pods.resolve_record(&unknown).await, Err(()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn conn_keys_use_the_mapped_form_for_ipv4() {
        let peer: SocketAddr = "198.51.100.2:40000".parse().unwrap();
        let local: SocketAddr = "192.0.2.10:8181".parse().unwrap();
        let mapped_peer: SocketAddr = "[::ffff:198.51.100.2]:40000".parse().unwrap();
        assert_eq!(conn_key(peer, local), conn_key(mapped_peer, local));
        let key = conn_key(peer, local);
        assert_eq!(key.client_port, 40000);
        assert_eq!(key.agent_port, 8181);
        assert_eq!(
            key.agent_addr,
            kube2iam_common::ip4_mapped(u32::from_ne_bytes([192, 0, 2, 10]))
        );
    }
}
