//! A Kubernetes API server emulator for tests: the pods and namespaces a node agent watches,
//! served over plain HTTP/1.1 with the wire protocol real clients use (kube-rs, client-go's
//! kubectl, the python `kubernetes` client).
//!
//! What it serves:
//! - discovery: `/api`, `/api/v1`, `/apis`, `/apis/events.k8s.io[/v1]`, `/version`, `/healthz`;
//! - pods, namespaces, service accounts and events (core `v1` and `events.k8s.io/v1`): list,
//!   get, watch, create, update, patch (merge, strategic-merge as merge, JSON patch) and delete,
//!   on the collection, namespaced and item paths (and the deprecated `/watch/` prefix);
//! - lists with `resourceVersion` + `resourceVersionMatch` (`NotOlderThan`, `Exact` by rewinding
//!   the history), `limit`/`continue` paging (ignored for `resourceVersion=0`, as the watch
//!   cache does), `fieldSelector`, `labelSelector`; `Table` and `PartialObjectMetadata` output
//!   when the `Accept` header asks for them (kubectl does; kube-rs's metadata-only watches do),
//!   bookmarks included;
//! - watches streaming newline-delimited JSON events over chunked encoding from any
//!   resourceVersion still in the history, synthetic ADDED events for a watch without one (or
//!   `0`, or `sendInitialEvents=true`, which ends them with an `initial-events-end` BOOKMARK),
//!   periodic BOOKMARKs when allowed, ADDED/DELETED for objects moving in or out of a selector,
//!   the stream closed after `timeoutSeconds`, and an ERROR event with a 410 `Expired` Status for
//!   a resourceVersion older than the history (as the API server sends after compaction).
//!
//! It runs no controllers: namespaces get no `default` ServiceAccount (kube-controller-manager
//! creates those), and deleting a namespace leaves its objects.
//!
//! One resourceVersion counter is shared by all objects, as etcd's revision is. Tests drive the
//! state through [`KubeApi`]'s methods and inject faults with [`KubeApi::compact`],
//! [`KubeApi::drop_watches`] and [`KubeApi::set_down`].

mod kubectl;
mod objects;
mod select;
mod server;
mod store;
mod table;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::watch;

pub use kubectl::{debian_kubectl, debian_kubectl_dir};
pub use objects::{KubeObject, namespace, new_uid, parse_rfc3339, pod, rfc3339, service_account};
pub use store::{ApiError, Resource};

use crate::process::enter_netns_on_this_thread;

/// Tunables of the emulator.
#[derive(Clone, Debug)]
pub struct KubeApiOptions {
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The longest a watch stays open (also when the client asks for more or sets no timeout).
    pub max_watch_timeout: Duration,
    /// How many changes the history keeps; older resourceVersions are compacted away.
    pub history_limit: usize,
}

impl Default for KubeApiOptions {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            max_watch_timeout: Duration::from_secs(300),
            history_limit: 10_000,
        }
    }
}

/// What a recorded request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    List,
    Watch,
    Get,
    Create,
    Update,
    Patch,
    Delete,
    /// Discovery, version, health, or an unknown path.
    Other,
}

/// A request the emulator received.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: String,
    pub kind: RequestKind,
    pub resource: Option<Resource>,
    pub user_agent: Option<String>,
    /// The `Accept` header (the representation asked for: `as=Table`, `as=PartialObjectMetadata`).
    pub accept: Option<String>,
    /// The body of a write.
    pub body: Option<String>,
}

impl ApiRequest {
    /// A query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| decode_component(v))
        })
    }
}

fn decode_component(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// State shared by the control API and the server.
struct Shared {
    store: Mutex<store::Store>,
    /// The current resourceVersion, published after every write (wakes the watches).
    rv_tx: watch::Sender<u64>,
    /// Bumped by `drop_watches`.
    drop_tx: watch::Sender<u64>,
    down_tx: watch::Sender<bool>,
    requests: Mutex<Vec<ApiRequest>>,
    open_watches: AtomicUsize,
    options: KubeApiOptions,
    addr: OnceLock<SocketAddr>,
}

impl Shared {
    fn record(&self, request: ApiRequest) {
        self.requests.lock().expect("requests lock").push(request);
    }

    /// Runs a write against the store and wakes the watches.
    fn write<T>(
        &self,
        write: impl FnOnce(&mut store::Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut store = self.store.lock().expect("store lock");
        let result = write(&mut store);
        let rv = store.rv();
        drop(store);
        self.rv_tx.send_replace(rv);
        result
    }
}

/// A running Kubernetes API emulator. Dropping it closes every connection and stops its thread.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Starts on `127.0.0.1:<free port>` in the calling process's network namespace.
    pub fn start_loopback() -> Self {
        Self::start(
            None,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            KubeApiOptions::default(),
        )
    }

    /// Starts on `127.0.0.1:<free port>` inside a test node's network namespace, where the agent
    /// reaches it.
    pub fn start_in_node(node: &crate::TestNode) -> Self {
        Self::start(
            Some(&node.netns_path()),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            KubeApiOptions::default(),
        )
    }

    /// Starts listening on `addr` (port 0 picks one), inside the network namespace at `netns`
    /// when given; panics if it cannot.
    pub fn start(netns: Option<&Path>, addr: SocketAddr, options: KubeApiOptions) -> Self {
        let (rv_tx, _) = watch::channel(0);
        let (drop_tx, _) = watch::channel(0);
        let (down_tx, _) = watch::channel(false);
        let store = store::Store::new(options.history_limit);
        rv_tx.send_replace(store.rv());
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv_tx,
            drop_tx,
            down_tx,
            requests: Mutex::default(),
            open_watches: AtomicUsize::new(0),
            options,
            addr: OnceLock::new(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (bound_tx, bound_rx) = std_mpsc::channel::<Result<SocketAddr, String>>();
        let netns: Option<PathBuf> = netns.map(Path::to_owned);
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || {
                if let Some(netns) = &netns
                    && let Err(e) = enter_netns_on_this_thread(netns)
                {
                    let _ = bound_tx.send(Err(format!("setns {}: {e}", netns.display())));
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(addr).await {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = bound_tx.send(Err(format!("bind {addr}: {e}")));
                            return;
                        }
                    };
                    let local = listener
                        .local_addr()
                        .expect("bound listener has an address");
                    let _ = thread_shared.addr.set(local);
                    let _ = bound_tx.send(Ok(local));
                    server::serve(listener, thread_shared, shutdown_rx).await;
                });
                // Dropping the runtime here cancels every connection task.
            })
            .expect("cannot spawn the kube-api thread");
        let addr = match bound_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("the Kubernetes API emulator cannot start: {e}"),
            Err(_) => panic!("the Kubernetes API emulator thread died while starting"),
        };
        Self {
            shared,
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at the emulator (no credentials: it accepts everyone).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    \
             server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    \
             user: emulator\ncurrent-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            self.url()
        )
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().expect("store lock").rv()
    }

    fn write<T>(
        &self,
        write: impl FnOnce(&mut store::Store) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.shared.write(write)
    }

    fn key(namespace: &str, name: &str) -> store::Key {
        (namespace.to_owned(), name.to_owned())
    }

    // --- pods -------------------------------------------------------------------------------

    /// Creates a pod (and its namespace if missing); returns it as stored. Panics if it exists.
    pub fn add_pod(&self, pod: KubeObject) -> Value {
        let pod = pod.into_value();
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        self.write(|store| {
            if store
                .get(Resource::Namespaces, &Self::key("", &namespace))
                .is_none()
            {
                store.create(
                    Resource::Namespaces,
                    None,
                    objects::namespace(&namespace).into_value(),
                )?;
            }
            store.create(Resource::Pods, Some(&namespace), pod)
        })
        .unwrap_or_else(|e| panic!("add_pod: {}", e.message))
    }

    /// Changes a pod (a MODIFIED event, unless nothing changed); returns it. Panics if missing.
    pub fn update_pod(
        &self,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Value {
        self.update(Resource::Pods, &Self::key(namespace, name), change)
    }

    /// Sets (`Some`) or removes (`None`) a pod annotation.
    pub fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Value {
        self.update_pod(namespace, name, |pod| {
            objects::set_map_entry(pod, "annotations", key, value)
        })
    }

    /// Sets a pod's `status.phase`.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> Value {
        self.update_pod(namespace, name, |pod| pod["status"]["phase"] = json!(phase))
    }

    /// Sets a pod's `status.podIP`/`status.podIPs` (empty: removes them).
    pub fn set_pod_ips(&self, namespace: &str, name: &str, ips: &[IpAddr]) -> Value {
        self.update_pod(namespace, name, |pod| objects::set_pod_ips(pod, ips))
    }

    /// The first step of a graceful deletion: `metadata.deletionTimestamp` is set (MODIFIED);
    /// [`KubeApi::delete_pod`] finishes it.
    pub fn begin_delete_pod(&self, namespace: &str, name: &str) -> Value {
        self.update_pod(namespace, name, |pod| {
            pod["metadata"]["deletionTimestamp"] = json!(rfc3339(objects::unix_now() + 30));
            pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        })
    }

    /// Deletes a pod (a DELETED event); returns its last state. Panics if missing.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Value {
        self.write(|store| store.delete(Resource::Pods, &Self::key(namespace, name)))
            .unwrap_or_else(|e| panic!("delete_pod: {}", e.message))
    }

    pub fn get_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Resource::Pods, &Self::key(namespace, name))
    }

    /// Every pod, ordered by namespace and name.
    pub fn pods(&self) -> Vec<Value> {
        self.objects(Resource::Pods)
    }

    // --- namespaces -------------------------------------------------------------------------

    /// Creates a namespace; returns it as stored. Panics if it exists.
    pub fn add_namespace(&self, namespace: KubeObject) -> Value {
        self.write(|store| store.create(Resource::Namespaces, None, namespace.into_value()))
            .unwrap_or_else(|e| panic!("add_namespace: {}", e.message))
    }

    /// Sets (`Some`) or removes (`None`) a namespace annotation.
    pub fn annotate_namespace(&self, name: &str, key: &str, value: Option<&str>) -> Value {
        self.update(Resource::Namespaces, &Self::key("", name), |ns| {
            objects::set_map_entry(ns, "annotations", key, value)
        })
    }

    /// Changes a namespace.
    pub fn update_namespace(&self, name: &str, change: impl FnOnce(&mut Value)) -> Value {
        self.update(Resource::Namespaces, &Self::key("", name), change)
    }

    /// Deletes a namespace (its pods stay: there is no namespace controller).
    pub fn delete_namespace(&self, name: &str) -> Value {
        self.write(|store| store.delete(Resource::Namespaces, &Self::key("", name)))
            .unwrap_or_else(|e| panic!("delete_namespace: {}", e.message))
    }

    pub fn get_namespace(&self, name: &str) -> Option<Value> {
        self.get(Resource::Namespaces, &Self::key("", name))
    }

    pub fn namespaces(&self) -> Vec<Value> {
        self.objects(Resource::Namespaces)
    }

    // --- service accounts -------------------------------------------------------------------

    /// Creates a service account (and its namespace if missing); returns it as stored. Panics if
    /// it exists.
    pub fn add_service_account(&self, account: KubeObject) -> Value {
        let account = account.into_value();
        let namespace = account["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        self.write(|store| {
            if store
                .get(Resource::Namespaces, &Self::key("", &namespace))
                .is_none()
            {
                store.create(
                    Resource::Namespaces,
                    None,
                    objects::namespace(&namespace).into_value(),
                )?;
            }
            store.create(Resource::ServiceAccounts, Some(&namespace), account)
        })
        .unwrap_or_else(|e| panic!("add_service_account: {}", e.message))
    }

    /// Sets (`Some`) or removes (`None`) a service account annotation.
    pub fn annotate_service_account(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Value {
        self.update(
            Resource::ServiceAccounts,
            &Self::key(namespace, name),
            |account| objects::set_map_entry(account, "annotations", key, value),
        )
    }

    /// Deletes a service account (a DELETED event); returns its last state.
    pub fn delete_service_account(&self, namespace: &str, name: &str) -> Value {
        self.write(|store| store.delete(Resource::ServiceAccounts, &Self::key(namespace, name)))
            .unwrap_or_else(|e| panic!("delete_service_account: {}", e.message))
    }

    pub fn get_service_account(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Resource::ServiceAccounts, &Self::key(namespace, name))
    }

    // --- events -----------------------------------------------------------------------------

    /// The Event objects clients created (core `v1` and `events.k8s.io/v1`), as stored now
    /// (patches applied), ordered by namespace and name within each API group.
    pub fn events(&self) -> Vec<Value> {
        let mut events = self.objects(Resource::Events);
        events.extend(self.objects(Resource::EventsV1));
        events
    }

    // --- generic ----------------------------------------------------------------------------

    fn update(
        &self,
        resource: Resource,
        key: &store::Key,
        change: impl FnOnce(&mut Value),
    ) -> Value {
        self.write(|store| {
            store.update(resource, key, None, |object| {
                change(object);
                Ok(())
            })
        })
        .unwrap_or_else(|e| panic!("update {}: {}", resource.plural(), e.message))
    }

    fn get(&self, resource: Resource, key: &store::Key) -> Option<Value> {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .get(resource, key)
            .cloned()
    }

    /// Every object of `resource`, ordered by namespace and name.
    pub fn objects(&self, resource: Resource) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .all(resource)
            .values()
            .cloned()
            .collect()
    }

    // --- faults -----------------------------------------------------------------------------

    /// Forgets the history: a watch from an earlier resourceVersion gets a 410 Expired ERROR
    /// event, an `Exact` list or a `continue` from before gets 410. Open watches that are
    /// caught up keep streaming, as they do over an etcd compaction.
    pub fn compact(&self) {
        self.shared.store.lock().expect("store lock").compact();
    }

    /// Cuts every open watch stream mid-body (no terminating chunk), as a dropped connection
    /// does. New watches are served as usual.
    pub fn drop_watches(&self) {
        self.shared
            .drop_tx
            .send_modify(|generation| *generation += 1);
    }

    /// While down, the listener is closed (connects are refused), open watch streams are cut
    /// and requests on kept-alive connections get the connection closed without an answer.
    /// Back up, it listens on the same address again.
    pub fn set_down(&self, down: bool) {
        self.shared.down_tx.send_replace(down);
    }

    pub fn is_down(&self) -> bool {
        *self.shared.down_tx.borrow()
    }

    // --- observation ------------------------------------------------------------------------

    /// Every request received so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// How many requests of `kind` for `resource` it received.
    pub fn count(&self, kind: RequestKind, resource: Resource) -> usize {
        self.shared
            .requests
            .lock()
            .expect("requests lock")
            .iter()
            .filter(|r| r.kind == kind && r.resource == Some(resource))
            .count()
    }

    /// List requests for `resource` so far.
    pub fn list_count(&self, resource: Resource) -> usize {
        self.count(RequestKind::List, resource)
    }

    /// Watch requests for `resource` so far.
    pub fn watch_count(&self, resource: Resource) -> usize {
        self.count(RequestKind::Watch, resource)
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !thread::panicking()
        {
            panic!("the Kubernetes API emulator thread panicked");
        }
    }
}
