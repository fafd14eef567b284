//! Pod address → identity: the pinned BPF map and the registry that keeps it true.
//!
//! The pod watch writes, the metadata server reads on every request. The map is pinned, so a
//! restarted agent answers known pods at once; the first relist then removes what is stale.
//! Of two pods claiming one address, the newer (creationTimestamp, then UID) owns it, and deleting
//! a pod only removes the addresses it still owns.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use kube2iam_common::{
    EXTERNAL_ID_CAP, IDENTITY_EXTERNAL_ID_OVERSIZE, IDENTITY_ROLE_OVERSIZE, Identity,
    NAMESPACE_CAP, POD_NAME_CAP, ROLE_CAP, UID_CAP,
};
use tokio::sync::watch;

/// A map key: the 16-byte address, IPv4 in its mapped form.
pub type Key = [u8; 16];

pub fn key(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_of(key: &Key) -> IpAddr {
    Ipv6Addr::from(*key).to_canonical()
}

/// An annotation as stored: absent, a value, or a value too long for any valid use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Annotation {
    Absent,
    Value(String),
    /// Longer than the field holds (its length in bytes): an error for the pod, never truncated.
    Oversize(usize),
}

impl Annotation {
    pub fn from_option(value: Option<&str>, cap: usize) -> Annotation {
        match value.map(str::trim) {
            None | Some("") => Annotation::Absent,
            Some(v) if v.len() > cap => Annotation::Oversize(v.len()),
            Some(v) => Annotation::Value(v.to_owned()),
        }
    }

    /// The annotation as `inspect` and `/debug/store` show it: the value, a note of its length
    /// when it was too long to keep, or nothing.
    pub fn shown(&self) -> Option<String> {
        match self {
            Annotation::Absent => None,
            Annotation::Value(v) => Some(v.clone()),
            Annotation::Oversize(n) => Some(format!("<{n} bytes: too long>")),
        }
    }
}

/// Who a pod is, as far as credentials go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub created_ms: u64,
    pub role: Annotation,
    pub external_id: Annotation,
    /// The pod's service account, from the watch. Kept in memory only: the pinned map does not
    /// hold it, so a record a previous agent pinned has `None` until the pod list is back.
    pub account: Option<PodAccount>,
}

/// What the pod spec says about its service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAccount {
    /// `spec.serviceAccountName` (`default` when the spec names none).
    pub name: String,
    /// The credentials environment the EKS pod identity webhook injected into some container:
    /// IRSA's (`AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`) or, when the ServiceAccount has
    /// an EKS Pod Identity association, which takes precedence there, Pod Identity's
    /// (`AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
    pub webhook: Option<WebhookCredentials>,
}

/// The environment the webhook injects into each container for IRSA.
pub const WEB_IDENTITY_ENV: [&str; 2] = ["AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"];
/// The environment the webhook injects instead when the pod's ServiceAccount has an EKS Pod
/// Identity association: the container-credentials method takes precedence over IRSA's
/// (aws/amazon-eks-pod-identity-webhook, `pkg/handler/handler.go`, `buildPodPatchConfig`).
pub const CONTAINER_CREDENTIALS_ENV: [&str; 2] = [
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
];

/// Which credentials the EKS pod identity webhook gave a pod's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookCredentials {
    /// IRSA: `AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`.
    WebIdentity,
    /// EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
    ContainerCredentials,
}

impl WebhookCredentials {
    /// The environment variables that make the SDK's provider, all of which a container carries.
    pub fn env(self) -> [&'static str; 2] {
        match self {
            WebhookCredentials::WebIdentity => WEB_IDENTITY_ENV,
            WebhookCredentials::ContainerCredentials => CONTAINER_CREDENTIALS_ENV,
        }
    }

    /// Who serves the pod instead, as messages name it.
    pub fn provider(self) -> &'static str {
        match self {
            WebhookCredentials::WebIdentity => "IRSA",
            WebhookCredentials::ContainerCredentials => "EKS Pod Identity",
        }
    }

    /// The SDK provider the environment makes, as messages name it.
    pub fn method(self) -> &'static str {
        match self {
            WebhookCredentials::WebIdentity => "web-identity",
            WebhookCredentials::ContainerCredentials => "container-credentials",
        }
    }
}

impl PodIdentity {
    /// `namespace/name`, as errors and logs name the pod.
    pub fn display_name(&self) -> String {
        self.named().to_string()
    }

    /// `namespace/name`, written where it is shown (no String of its own).
    pub fn named(&self) -> impl fmt::Display + '_ {
        struct Named<'a>(&'a PodIdentity);
        impl fmt::Display for Named<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}", self.0.namespace, self.0.name)
            }
        }
        Named(self)
    }

    /// Whether `self` wins an address over `other`.
    pub fn newer_than(&self, other: &PodIdentity) -> bool {
        (self.created_ms, &self.uid) > (other.created_ms, &other.uid)
    }
}

/// Errors of the identity map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: {field} is {len} bytes, more than the {cap} a valid object has")]
    FieldTooLong {
        pod: String,
        field: &'static str,
        len: usize,
        cap: usize,
    },
    #[error(
        "the identity map is full ({capacity} entries); raise --identity-capacity (pod {pod} at \
         {ip} is served, but not pinned: after a restart it waits for the pod list)"
    )]
    Full {
        capacity: u32,
        pod: String,
        ip: IpAddr,
    },
    #[error("identity map {action}")]
    Map {
        action: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("identity map entry for {ip} is corrupt: {reason}")]
    Corrupt { ip: IpAddr, reason: String },
}

fn put(buf: &mut [u8], len: &mut u16, value: &str) {
    buf[..value.len()].copy_from_slice(value.as_bytes());
    *len = value.len() as u16;
}

/// Encodes for the BPF map. Namespace, name and UID always fit for objects the API server
/// accepted; annotations that do not fit are stored as flags, never truncated.
pub fn encode(pod: &PodIdentity) -> Result<Identity, Error> {
    let too_long = |field, len, cap| Error::FieldTooLong {
        pod: pod.display_name(),
        field,
        len,
        cap,
    };
    for (field, value, cap) in [
        ("namespace", &pod.namespace, NAMESPACE_CAP),
        ("name", &pod.name, POD_NAME_CAP),
        ("uid", &pod.uid, UID_CAP),
    ] {
        if value.len() > cap {
            return Err(too_long(field, value.len(), cap));
        }
    }
    let mut out = Identity {
        created_ms: pod.created_ms,
        namespace_len: 0,
        name_len: 0,
        uid_len: 0,
        role_len: 0,
        external_id_len: 0,
        flags: 0,
        _pad: 0,
        namespace: [0; NAMESPACE_CAP],
        name: [0; POD_NAME_CAP],
        uid: [0; UID_CAP],
        role: [0; ROLE_CAP],
        external_id: [0; EXTERNAL_ID_CAP],
    };
    put(&mut out.namespace, &mut out.namespace_len, &pod.namespace);
    put(&mut out.name, &mut out.name_len, &pod.name);
    put(&mut out.uid, &mut out.uid_len, &pod.uid);
    match &pod.role {
        Annotation::Absent => {}
        Annotation::Value(v) => put(&mut out.role, &mut out.role_len, v),
        Annotation::Oversize(len) => {
            out.flags |= IDENTITY_ROLE_OVERSIZE;
            out.role_len = (*len).min(u16::MAX as usize) as u16;
        }
    }
    match &pod.external_id {
        Annotation::Absent => {}
        Annotation::Value(v) => put(&mut out.external_id, &mut out.external_id_len, v),
        Annotation::Oversize(len) => {
            out.flags |= IDENTITY_EXTERNAL_ID_OVERSIZE;
            out.external_id_len = (*len).min(u16::MAX as usize) as u16;
        }
    }
    Ok(out)
}

fn get_str(buf: &[u8], len: u16, field: &str) -> Result<String, String> {
    let bytes = buf
        .get(..len as usize)
        .ok_or_else(|| format!("{field} length {len} exceeds its field"))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{field} is not UTF-8"))
}

pub fn decode(raw: &Identity) -> Result<PodIdentity, String> {
    let annotation = |buf: &[u8], len: u16, oversize: bool, field| {
        if oversize {
            Ok(Annotation::Oversize(len as usize))
        } else if len == 0 {
            Ok(Annotation::Absent)
        } else {
            get_str(buf, len, field).map(Annotation::Value)
        }
    };
    Ok(PodIdentity {
        namespace: get_str(&raw.namespace, raw.namespace_len, "namespace")?,
        name: get_str(&raw.name, raw.name_len, "name")?,
        uid: get_str(&raw.uid, raw.uid_len, "uid")?,
        created_ms: raw.created_ms,
        role: annotation(
            &raw.role,
            raw.role_len,
            raw.flags & IDENTITY_ROLE_OVERSIZE != 0,
            "role",
        )?,
        external_id: annotation(
            &raw.external_id,
            raw.external_id_len,
            raw.flags & IDENTITY_EXTERNAL_ID_OVERSIZE != 0,
            "external id",
        )?,
        account: None,
    })
}

/// Storage for identities: the pinned BPF map in the agent, a plain map in unit tests.
pub trait IdentityMap: Send + Sync {
    fn get(&self, key: &Key) -> Result<Option<PodIdentity>, Error>;
    fn insert(&self, key: Key, pod: &PodIdentity) -> Result<(), Error>;
    fn remove(&self, key: &Key) -> Result<(), Error>;
    fn keys(&self) -> Result<Vec<Key>, Error>;
    fn capacity(&self) -> u32;
}

/// The pinned BPF hash map.
pub struct BpfIdentityMap {
    map: RwLock<BpfHashMap<MapData, Key, Identity>>,
    capacity: u32,
}

impl BpfIdentityMap {
    pub fn new(map: BpfHashMap<MapData, Key, Identity>, capacity: u32) -> Self {
        BpfIdentityMap {
            map: RwLock::new(map),
            capacity,
        }
    }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
        || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl IdentityMap for BpfIdentityMap {
    fn get(&self, key: &Key) -> Result<Option<PodIdentity>, Error> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        match map.get(key, 0) {
            Ok(raw) => decode(&raw).map(Some).map_err(|reason| Error::Corrupt {
                ip: ip_of(key),
                reason,
            }),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(Error::Map {
                action: "lookup",
                source,
            }),
        }
    }

    fn insert(&self, key: Key, pod: &PodIdentity) -> Result<(), Error> {
        let raw = encode(pod)?;
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert(key, raw, 0).map_err(|source| match &source {
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                Error::Full {
                    capacity: self.capacity,
                    pod: pod.display_name(),
                    ip: ip_of(&key),
                }
            }
            _ => Error::Map {
                action: "update",
                source,
            },
        })
    }

    fn remove(&self, key: &Key) -> Result<(), Error> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                action: "delete",
                source,
            }),
        }
    }

    fn keys(&self) -> Result<Vec<Key>, Error> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Map {
                action: "iterate",
                source,
            })
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// An in-memory map with the same contract, for unit tests.
#[derive(Default)]
pub struct MemoryIdentityMap {
    entries: Mutex<HashMap<Key, PodIdentity>>,
    capacity: u32,
}

impl MemoryIdentityMap {
    pub fn with_capacity(capacity: u32) -> Self {
        MemoryIdentityMap {
            entries: Mutex::default(),
            capacity,
        }
    }
}

impl IdentityMap for MemoryIdentityMap {
    fn get(&self, key: &Key) -> Result<Option<PodIdentity>, Error> {
        Ok(self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned())
    }

    fn insert(&self, key: Key, pod: &PodIdentity) -> Result<(), Error> {
        encode(pod)?;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !entries.contains_key(&key) && entries.len() >= self.capacity as usize {
            return Err(Error::Full {
                capacity: self.capacity,
                pod: pod.display_name(),
                ip: ip_of(&key),
            });
        }
        entries.insert(key, pod.clone());
        Ok(())
    }

    fn remove(&self, key: &Key) -> Result<(), Error> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        Ok(())
    }

    fn keys(&self) -> Result<Vec<Key>, Error> {
        Ok(self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect())
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// A live pod from the watch.
#[derive(Debug, Clone)]
struct LivePod {
    /// Shared with the requests that read it.
    identity: Arc<PodIdentity>,
    keys: Vec<Key>,
}

#[derive(Default)]
struct RegistryState {
    /// Live pods from the watch: UID → record and addresses.
    pods: HashMap<String, LivePod>,
    /// Address → the UIDs of the live pods claiming it.
    by_key: HashMap<Key, Vec<String>>,
    /// hostNetwork pods served their own role (`--host-network-pods`): UID → record.
    host_pods: HashMap<String, Arc<PodIdentity>>,
    /// What the previous agent pinned, until the first list is complete: served only through
    /// [`Registry::claimants`], where attestation decides who may use it.
    pinned: HashMap<Key, Arc<PodIdentity>>,
    /// What the BPF map holds, as this agent wrote it (or found it).
    written: HashMap<Key, PodIdentity>,
    /// During a relist: the UIDs seen so far.
    relist: Option<HashSet<String>>,
    synced: bool,
}

impl RegistryState {
    /// The live pods claiming `k`, newest first.
    fn live_claimants(&self, k: &Key) -> Vec<&Arc<PodIdentity>> {
        let mut out: Vec<&Arc<PodIdentity>> = self
            .by_key
            .get(k)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.pods.get(uid).map(|p| &p.identity))
            .collect();
        out.sort_by(|a, b| (b.created_ms, &b.uid).cmp(&(a.created_ms, &a.uid)));
        out
    }

    /// Before the sync: the record pinned for `k`, unless the watch already has that pod.
    fn pinned_for(&self, k: &Key) -> Option<&Arc<PodIdentity>> {
        if self.synced {
            return None;
        }
        self.pinned
            .get(k)
            .filter(|p| !self.pods.contains_key(&p.uid))
    }

    /// A pod by UID: live, hostNetwork, or (before the sync) pinned.
    fn pod(&self, uid: &str) -> Option<&Arc<PodIdentity>> {
        self.pods
            .get(uid)
            .map(|p| &p.identity)
            .or_else(|| self.host_pods.get(uid))
            .or_else(|| {
                (!self.synced)
                    .then(|| self.pinned.values().find(|p| p.uid == uid))
                    .flatten()
            })
    }

    /// What the BPF map should hold for `k`: the newest live claimant, else (before the first
    /// list is complete) the pinned record.
    fn wanted(&self, k: &Key) -> Option<PodIdentity> {
        match self.live_claimants(k).first() {
            Some(owner) => Some(PodIdentity::clone(owner)),
            None if !self.synced => self.pinned.get(k).map(|p| PodIdentity::clone(p)),
            None => None,
        }
    }
}

/// Keeps the pods of this node in memory, where requests read them without a syscall, and the
/// pinned BPF map in line with it, so a restarted agent knows its pods at once. Wakes waiting
/// requests on every change.
pub struct Registry {
    map: Box<dyn IdentityMap>,
    /// Read by every request (many readers at once), written by the watch.
    state: RwLock<RegistryState>,
    /// Wakes those waiting for a change (the count is `generation`).
    changed: watch::Sender<()>,
    /// Counts the changes (see [`Registry::bump`]).
    generation: AtomicU64,
}

/// What one request reads of the registry, under one lock.
#[derive(Debug, Default)]
pub struct CallerView {
    /// The live pods claiming the address, newest first.
    pub claimants: Vec<Arc<PodIdentity>>,
    /// Before the sync: the record a previous agent pinned for the address.
    pub pinned: Option<Arc<PodIdentity>>,
    /// The attested pod among the hostNetwork pods served their own role.
    pub host_pod: Option<Arc<PodIdentity>>,
    /// The attested pod wherever the registry has it.
    pub attested: Option<Arc<PodIdentity>>,
    pub synced: bool,
}

impl Registry {
    /// Takes over the map, reading what a previous agent pinned (once, at start).
    pub fn new(map: Box<dyn IdentityMap>) -> Registry {
        let mut state = RegistryState::default();
        match map.keys() {
            Ok(keys) => {
                for k in keys {
                    match map.get(&k) {
                        Ok(Some(pod)) => {
                            state.pinned.insert(k, Arc::new(pod.clone()));
                            state.written.insert(k, pod);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("{e}; removing the entry");
                            let _ = map.remove(&k);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the pinned identity map: {e}"),
        }
        if !state.pinned.is_empty() {
            tracing::info!(
                entries = state.pinned.len(),
                "pinned pod identities adopted until the pod list is synced"
            );
        }
        Registry {
            map,
            state: RwLock::new(state),
            changed: watch::Sender::new(()),
            generation: AtomicU64::new(0),
        }
    }

    /// For changes.
    fn state(&self) -> std::sync::RwLockWriteGuard<'_, RegistryState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// For reads: requests read at once, without waiting for each other.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// After every change, never before it: what was decided from the registry at one
    /// generation holds while the generation is unchanged.
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.send_replace(());
    }

    /// Read before the registry is: see [`Registry::bump`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Writes what the BPF map should hold for `keys`.
    fn persist(
        &self,
        state: &mut RegistryState,
        keys: impl IntoIterator<Item = Key>,
    ) -> Vec<Error> {
        let mut errors = Vec::new();
        for k in keys {
            let wanted = state.wanted(&k);
            if state.written.get(&k) == wanted.as_ref() {
                continue;
            }
            match wanted {
                Some(pod) => {
                    if let Some(old) = state.written.get(&k).filter(|o| o.uid != pod.uid) {
                        tracing::info!(
                            ip = %ip_of(&k),
                            pod = %pod.display_name(),
                            previous = %old.display_name(),
                            "address now owned by another pod"
                        );
                    }
                    match self.map.insert(k, &pod) {
                        Ok(()) => {
                            state.written.insert(k, pod);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                None => match self.map.remove(&k) {
                    Ok(()) => {
                        state.written.remove(&k);
                    }
                    Err(e) => errors.push(e),
                },
            }
        }
        errors
    }

    /// Records a live pod with its addresses. Errors are per address and logged by the caller;
    /// the other addresses are still written.
    pub fn apply(&self, pod: &PodIdentity, ips: &[IpAddr]) -> Vec<Error> {
        let mut state = self.state();
        if let Some(seen) = state.relist.as_mut() {
            seen.insert(pod.uid.clone());
        }
        state.host_pods.remove(&pod.uid);
        let keys: Vec<Key> = ips.iter().map(|ip| key(*ip)).collect();
        let previous = state
            .pods
            .insert(
                pod.uid.clone(),
                LivePod {
                    identity: Arc::new(pod.clone()),
                    keys: keys.clone(),
                },
            )
            .map(|p| p.keys)
            .unwrap_or_default();
        for k in previous.iter().filter(|k| !keys.contains(k)) {
            if let Some(uids) = state.by_key.get_mut(k) {
                uids.retain(|u| *u != pod.uid);
                if uids.is_empty() {
                    state.by_key.remove(k);
                }
            }
        }
        for k in &keys {
            let uids = state.by_key.entry(*k).or_default();
            if !uids.contains(&pod.uid) {
                uids.push(pod.uid.clone());
            }
        }
        let touched: Vec<Key> = keys.iter().chain(previous.iter()).copied().collect();
        let errors = self.persist(&mut state, touched);
        drop(state);
        self.bump();
        errors
    }

    /// Records a hostNetwork pod served its own role: it has no address of its own, the kernel
    /// names it by its cgroup.
    pub fn apply_host_pod(&self, pod: &PodIdentity) -> Vec<Error> {
        let errors = self.remove_live(&pod.uid);
        let mut state = self.state();
        if let Some(seen) = state.relist.as_mut() {
            seen.insert(pod.uid.clone());
        }
        state
            .host_pods
            .insert(pod.uid.clone(), Arc::new(pod.clone()));
        drop(state);
        self.bump();
        errors
    }

    fn remove_live(&self, uid: &str) -> Vec<Error> {
        let mut state = self.state();
        let Some(gone) = state.pods.remove(uid) else {
            return Vec::new();
        };
        for k in &gone.keys {
            if let Some(uids) = state.by_key.get_mut(k) {
                uids.retain(|u| u != uid);
                if uids.is_empty() {
                    state.by_key.remove(k);
                }
            }
        }
        let errors = self.persist(&mut state, gone.keys);
        // Counted at once (before the lock is let go): a relist removes pods one by one and
        // bumps only at its end.
        self.generation.fetch_add(1, Ordering::Release);
        errors
    }

    /// Forgets a pod (deleted, or finished): its addresses go to the next claimant, if any.
    pub fn remove_pod(&self, uid: &str) -> Vec<Error> {
        let errors = self.remove_live(uid);
        self.state().host_pods.remove(uid);
        self.bump();
        errors
    }

    /// A (re)list starts: pods applied until [`Registry::end_relist`] are the live set.
    pub fn begin_relist(&self) {
        self.state().relist = Some(HashSet::new());
    }

    /// The list is complete: pods not in it are gone (deleted while the watch was down), and so
    /// are the records pinned by a previous agent that the list did not confirm.
    pub fn end_relist(&self) -> Vec<Error> {
        let seen = {
            let mut state = self.state();
            let seen = state.relist.take().unwrap_or_default();
            state.host_pods.retain(|uid, _| seen.contains(uid));
            self.generation.fetch_add(1, Ordering::Release);
            seen
        };
        let stale: Vec<String> = self
            .read()
            .pods
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        let mut errors = Vec::new();
        for uid in stale {
            errors.extend(self.remove_live(&uid));
        }
        let mut state = self.state();
        state.synced = true;
        let pinned = std::mem::take(&mut state.pinned);
        for (k, pod) in &pinned {
            if !seen.contains(&pod.uid) {
                tracing::info!(ip = %ip_of(k), pod = %pod.display_name(), "removing a stale address");
            }
        }
        let written: Vec<Key> = state.written.keys().copied().collect();
        errors.extend(self.persist(&mut state, written));
        drop(state);
        self.bump();
        errors
    }

    /// Whether the first full list has been applied.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// What a request from `ip` needs to know, read at one moment: the claimants of `ip`, its
    /// pinned record, and the pod with UID `attested` (the one the kernel names, if any).
    pub fn view(&self, ip: IpAddr, attested: Option<&str>) -> CallerView {
        let state = self.read();
        let k = key(ip);
        CallerView {
            claimants: state.live_claimants(&k).into_iter().cloned().collect(),
            pinned: state.pinned_for(&k).cloned(),
            host_pod: attested.and_then(|uid| state.host_pods.get(uid).cloned()),
            attested: attested.and_then(|uid| state.pod(uid).cloned()),
            synced: state.synced,
        }
    }

    /// The pod that owns `ip` by address alone: the newest claimant, else (before the sync)
    /// the pinned record. For display; serving decides in [`crate::decision`].
    pub fn lookup(&self, ip: IpAddr) -> Result<Option<PodIdentity>, Error> {
        let state = self.read();
        let k = key(ip);
        Ok(state
            .live_claimants(&k)
            .first()
            .copied()
            .or_else(|| state.pinned_for(&k))
            .map(|p| PodIdentity::clone(p)))
    }

    /// The UIDs of the hostNetwork pods served their own role.
    pub fn host_pod_uids(&self) -> Vec<String> {
        self.read().host_pods.keys().cloned().collect()
    }

    /// Every live pod (for the prefetch when the namespaces arrive).
    pub fn live_pods(&self) -> Vec<PodIdentity> {
        let state = self.read();
        state
            .pods
            .values()
            .map(|p| PodIdentity::clone(&p.identity))
            .chain(state.host_pods.values().map(|p| PodIdentity::clone(p)))
            .collect()
    }

    /// Registry changes, to wait on.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Looks `ip` up, waiting up to `timeout` for the watch to add it (woken by each change,
    /// not polling).
    pub async fn wait_for(
        &self,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<Option<PodIdentity>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        loop {
            changes.mark_unchanged();
            if let Some(pod) = self.lookup(ip)? {
                return Ok(Some(pod));
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.lookup(ip),
            }
        }
    }

    /// What the BPF map holds, by address.
    pub fn entries(&self) -> Result<Vec<(IpAddr, PodIdentity)>, Error> {
        let mut out: Vec<(IpAddr, PodIdentity)> = self
            .state()
            .written
            .iter()
            .map(|(k, pod)| (ip_of(k), pod.clone()))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    pub fn capacity(&self) -> u32 {
        self.map.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use super::*;

    fn pod(name: &str, uid: &str, created_ms: u64, role: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
            created_ms,
            role: Annotation::from_option(role, ROLE_CAP),
            external_id: Annotation::Absent,
            account: None,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn registry() -> Registry {
        Registry::new(Box::new(MemoryIdentityMap::with_capacity(16)))
    }

    #[test]
    fn encode_round_trips_and_flags_oversize_annotations() {
        let mut p = pod("web", "u1", 5, Some("arn:aws:iam::123456789012:role/web"));
        p.external_id = Annotation::from_option(Some("ext-1"), EXTERNAL_ID_CAP);
        assert_eq!(decode(&encode(&p).unwrap()).unwrap(), p);
        let long = "r".repeat(ROLE_CAP + 1);
        p.role = Annotation::from_option(Some(&long), ROLE_CAP);
        assert_eq!(p.role, Annotation::Oversize(ROLE_CAP + 1));
        assert_eq!(
            decode(&encode(&p).unwrap()).unwrap().role,
            Annotation::Oversize(ROLE_CAP + 1)
        );
        let exact = "r".repeat(ROLE_CAP);
        p.role = Annotation::from_option(Some(&exact), ROLE_CAP);
        assert_eq!(
            decode(&encode(&p).unwrap()).unwrap().role,
            Annotation::Value(exact)
        );
        p.name = "n".repeat(POD_NAME_CAP + 1);
        assert!(matches!(
            encode(&p),
            Err(Error::FieldTooLong { field: "name", .. })
        ));
    }

    #[test]
    fn keys_map_ipv4_and_keep_ipv6() {
        assert_eq!(ip_of(&key(ip(7))), ip(7));
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(ip_of(&key(v6)), v6);
        assert_eq!(
            &key(ip(7))[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
    }

    #[test]
    fn newest_pod_owns_a_reused_address() {
        let r = registry();
        let old = pod("old", "u-old", 100, Some("old-role"));
        let new = pod("new", "u-new", 200, Some("new-role"));
        assert!(r.apply(&old, &[ip(1)]).is_empty());
        assert!(r.apply(&new, &[ip(1)]).is_empty());
        assert_eq!(r.lookup(ip(1)).unwrap().unwrap().uid, "u-new");
        // A late event for the old pod does not take the address back...
        assert!(r.apply(&old, &[ip(1)]).is_empty());
        assert_eq!(r.lookup(ip(1)).unwrap().unwrap().uid, "u-new");
        // ...and deleting it does not remove the new owner.
        assert!(r.remove_pod("u-old").is_empty());
        assert_eq!(r.lookup(ip(1)).unwrap().unwrap().uid, "u-new");
        assert!(r.remove_pod("u-new").is_empty());
        assert_eq!(r.lookup(ip(1)).unwrap(), None);
    }

    #[test]
    fn updates_replace_annotations_and_dropped_addresses_go() {
        let r = registry();
        r.apply(&pod("web", "u1", 1, Some("a")), &[ip(1), ip(2)]);
        r.apply(&pod("web", "u1", 1, Some("b")), &[ip(1)]);
        assert_eq!(
            r.lookup(ip(1)).unwrap().unwrap().role,
            Annotation::Value("b".into())
        );
        assert_eq!(r.lookup(ip(2)).unwrap(), None);
    }

    #[test]
    fn relist_keeps_live_pods_and_drops_stale_ones() {
        let map = MemoryIdentityMap::with_capacity(16);
        // Left in the pinned map by a previous agent.
        map.insert(key(ip(1)), &pod("live", "u1", 1, None)).unwrap();
        map.insert(key(ip(2)), &pod("gone", "u2", 1, None)).unwrap();
        let r = Registry::new(Box::new(map));
        assert!(
            r.lookup(ip(2)).unwrap().is_some(),
            "served from the pins before the list"
        );
        r.begin_relist();
        r.apply(&pod("live", "u1", 1, None), &[ip(1)]);
        assert!(
            r.lookup(ip(2)).unwrap().is_some(),
            "nothing dropped mid-list"
        );
        assert!(r.end_relist().is_empty());
        assert!(r.synced());
        assert!(r.lookup(ip(1)).unwrap().is_some());
        assert_eq!(r.lookup(ip(2)).unwrap(), None);
    }

    #[test]
    fn a_full_map_is_a_clear_error_and_keeps_the_rest() {
        let r = Registry::new(Box::new(MemoryIdentityMap::with_capacity(1)));
        assert!(r.apply(&pod("a", "u1", 1, None), &[ip(1)]).is_empty());
        let errors = r.apply(&pod("b", "u2", 2, None), &[ip(2)]);
        assert!(
            matches!(errors.as_slice(), [Error::Full { capacity: 1, .. }]),
            "{errors:?}"
        );
        assert!(errors[0].to_string().contains("--identity-capacity"));
        assert!(r.lookup(ip(1)).unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_pod_appears_and_give_up_at_the_deadline() {
        let r = Arc::new(registry());
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_for(ip(9), Duration::from_secs(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        r.apply(&pod("late", "u9", 1, None), &[ip(9)]);
        let found = waiter.await.unwrap().unwrap();
        assert_eq!(found.map(|p| p.name), Some("late".into()));
        let start = tokio::time::Instant::now();
        assert_eq!(
            r.wait_for(ip(10), Duration::from_secs(1)).await.unwrap(),
            None
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
