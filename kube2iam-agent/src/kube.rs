//! The Kubernetes side: watch the pods on this node into the identity registry, and the
//! namespaces' allowed roles into memory. Watch errors (disconnects, 410 Gone) relist with
//! backoff; nothing still valid is dropped in between.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use kube2iam_common::{EXTERNAL_ID_CAP, ROLE_CAP};

use crate::{
    identity::{Annotation, PodIdentity, Registry},
    policy::{AllowedRoles, NamespaceError, PatternFormat},
};

/// Errors setting up the Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build a Kubernetes client config ({hint})")]
    Config {
        hint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// How to reach the API server: kube2iam's flags, else in-cluster config or ~/.kube/config.
pub async fn client(
    api_server: Option<&str>,
    kubeconfig: Option<&std::path::Path>,
) -> Result<Client, Error> {
    let config = if let Some(path) = kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| Error::Config {
            hint: format!("read --kubeconfig {}", path.display()),
            source: Box::new(e),
        })?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| Error::Config {
                hint: format!("use --kubeconfig {}", path.display()),
                source: Box::new(e),
            })?
    } else {
        match kube::Config::infer().await {
            Ok(config) => config,
            Err(e) if api_server.is_some() => {
                tracing::debug!(error = %e, "no in-cluster config; using --api-server alone");
                let url = api_server.unwrap_or_default();
                kube::Config::new(url.parse().map_err(|e| Error::Config {
                    hint: format!("--api-server {url:?} is not a URL"),
                    source: Box::new(e),
                })?)
            }
            Err(e) => {
                return Err(Error::Config {
                    hint: "not in a cluster and no --api-server or --kubeconfig".into(),
                    source: Box::new(e),
                });
            }
        }
    };
    let mut config = config;
    if let Some(url) = api_server {
        config.cluster_url = url.parse().map_err(|e| Error::Config {
            hint: format!("--api-server {url:?} is not a URL"),
            source: Box::new(e),
        })?;
    }
    Client::try_from(config).map_err(Error::Client)
}

/// The annotation keys the agent reads.
#[derive(Debug, Clone)]
pub struct Keys {
    pub role: String,
    pub external_id: String,
    pub namespace: String,
    /// hostNetwork pods with a role annotation are served (`--host-network-pods`).
    pub host_network_pods: bool,
}

/// What a pod event means for the registry.
#[derive(Debug, PartialEq, Eq)]
pub enum PodState {
    /// Running (or starting) with addresses: serve it.
    Live(PodIdentity, Vec<IpAddr>),
    /// A running hostNetwork pod with a role annotation, with `--host-network-pods`: served by
    /// its cgroup, not an address.
    HostNetwork(PodIdentity),
    /// Not servable (host network, finished, no address yet): forget what it owned.
    Gone { uid: String },
}

/// Reads a pod object. Pure, so the rules are unit-tested.
pub fn pod_state(pod: &Pod, keys: &Keys) -> Option<PodState> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let gone = || Some(PodState::Gone { uid: uid.clone() });
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return gone();
    }
    let annotations = meta.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let created_ms = meta
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond().max(0) as u64)
        .unwrap_or(0);
    let identity = PodIdentity {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: uid.clone(),
        created_ms,
        role: Annotation::from_option(annotation(&keys.role), ROLE_CAP),
        external_id: Annotation::from_option(annotation(&keys.external_id), EXTERNAL_ID_CAP),
        account: Some(crate::service_accounts::pod_account(spec)),
    };
    if host_network {
        // Its address is the node's: only the kernel's attestation can tell it apart, and only
        // a pod that asks for a role of its own leaves the node's metadata service.
        return if keys.host_network_pods && identity.role != Annotation::Absent {
            Some(PodState::HostNetwork(identity))
        } else {
            gone()
        };
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|list| list.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return gone();
    }
    Some(PodState::Live(identity, ips))
}

/// Counters the watches keep for metrics and readiness.
#[derive(Debug, Default)]
pub struct WatchStats {
    pub pod_restarts: AtomicU64,
    pub namespace_restarts: AtomicU64,
}

/// Watches this node's pods into the registry until the task is dropped. `on_live` sees every
/// live pod (the credential prefetch).
pub async fn watch_pods(
    client: Client,
    node: String,
    keys: Keys,
    registry: Arc<Registry>,
    stats: Arc<WatchStats>,
    on_live: impl Fn(&PodIdentity) + Send + 'static,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let log_errors = |pod: &str, errors: Vec<crate::identity::Error>| {
        for error in errors {
            tracing::error!(pod, "{error}");
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => registry.begin_relist(),
            Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => {
                match pod_state(&pod, &keys) {
                    Some(PodState::Live(identity, ips)) => {
                        log_errors(&identity.display_name(), registry.apply(&identity, &ips));
                        on_live(&identity);
                    }
                    Some(PodState::HostNetwork(identity)) => {
                        log_errors(&identity.display_name(), registry.apply_host_pod(&identity));
                        on_live(&identity);
                    }
                    Some(PodState::Gone { uid }) => log_errors(&uid, registry.remove_pod(&uid)),
                    None => {}
                }
            }
            Ok(watcher::Event::InitDone) => {
                log_errors("-", registry.end_relist());
                tracing::info!(node, "pod list synced");
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    log_errors(uid, registry.remove_pod(uid));
                }
            }
            Err(error) => {
                stats.pod_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "pod watch failed; relisting with backoff");
            }
        }
    }
}

/// A namespace's restriction: its compiled allowed roles, or why they could not be read.
pub type Restriction = Result<Arc<AllowedRoles>, NamespaceError>;

/// The namespaces' allowed roles, kept by a watch.
#[derive(Default)]
pub struct Namespaces {
    restrictions: RwLock<HashMap<String, Option<Restriction>>>,
    synced: AtomicBool,
    changed: tokio::sync::Notify,
    /// Counts the watch's events, each counted once it is applied: what was decided from the
    /// namespaces at one count holds while the count is unchanged.
    generation: AtomicU64,
}

impl Namespaces {
    /// `None` when the namespace is unknown; `Some(None)` when it has no annotation.
    pub fn get(&self, namespace: &str) -> Option<Option<Restriction>> {
        self.restrictions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .cloned()
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Read before the namespaces are: see the field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Waits until the first namespace list is in (bounded by the caller's timeout).
    pub async fn wait_synced(&self) {
        loop {
            let notified = self.changed.notified();
            if self.synced() {
                return;
            }
            notified.await;
        }
    }

    fn compile(ns: &Namespace, key: &str, format: PatternFormat) -> (String, Option<Restriction>) {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let restriction = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(|value| AllowedRoles::compile(&name, key, value, format).map(Arc::new));
        if let Some(Err(e)) = &restriction {
            tracing::warn!(namespace = name, "{e}");
        }
        (name, restriction)
    }

    /// Watches namespaces until the task is dropped.
    pub async fn watch(
        self: Arc<Self>,
        client: Client,
        key: String,
        format: PatternFormat,
        stats: Arc<WatchStats>,
    ) {
        let api: Api<Namespace> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut buffer = HashMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(ns)) => {
                    let (name, r) = Self::compile(&ns, &key, format);
                    buffer.insert(name, r);
                }
                Ok(watcher::Event::InitDone) => {
                    *self.restrictions.write().unwrap_or_else(|p| p.into_inner()) =
                        std::mem::take(&mut buffer);
                    self.synced.store(true, Ordering::Release);
                    self.changed.notify_waiters();
                }
                Ok(watcher::Event::Apply(ns)) => {
                    let (name, r) = Self::compile(&ns, &key, format);
                    self.restrictions
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, r);
                }
                Ok(watcher::Event::Delete(ns)) => {
                    if let Some(name) = ns.metadata.name {
                        self.restrictions
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&name);
                    }
                }
                Err(error) => {
                    stats.namespace_restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "namespace watch failed; relisting with backoff");
                }
            }
            // After the event's writes, never before them.
            self.generation.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            role: "iam.amazonaws.com/role".into(),
            external_id: "iam.amazonaws.com/external-id".into(),
            namespace: "iam.amazonaws.com/allowed-roles".into(),
            host_network_pods: false,
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a pod object")
    }

    fn base(extra_status: serde_json::Value, host_network: bool) -> Pod {
        let mut status = serde_json::json!({"phase": "Running", "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]});
        if let (Some(s), Some(extra)) = (status.as_object_mut(), extra_status.as_object()) {
            for (k, v) in extra {
                s.insert(k.clone(), v.clone());
            }
        }
        pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "team", "uid": "u-1",
                "creationTimestamp": "2026-11-26T10:00:00Z",
                "annotations": {"iam.amazonaws.com/role": "web-role",
                                "iam.amazonaws.com/external-id": "ext-42"}},
            "spec": {"nodeName": "node-a", "hostNetwork": host_network, "containers": []},
            "status": status
        }))
    }

    #[test]
    fn a_running_pod_is_live_with_every_address() {
        let Some(PodState::Live(identity, ips)) =
            pod_state(&base(serde_json::json!({}), false), &keys())
        else {
            panic!("expected a live pod");
        };
        assert_eq!(identity.display_name(), "team/web");
        assert_eq!(identity.role, Annotation::Value("web-role".into()));
        assert_eq!(identity.external_id, Annotation::Value("ext-42".into()));
        assert_eq!(identity.created_ms, 1_795_687_200_000);
        assert_eq!(
            ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn host_network_and_finished_pods_are_gone() {
        let gone = Some(PodState::Gone { uid: "u-1".into() });
        assert_eq!(pod_state(&base(serde_json::json!({}), true), &keys()), gone);
        for phase in ["Succeeded", "Failed"] {
            assert_eq!(
                pod_state(&base(serde_json::json!({"phase": phase}), false), &keys()),
                gone
            );
        }
        let no_ip = base(serde_json::json!({"podIP": null, "podIPs": null}), false);
        assert_eq!(pod_state(&no_ip, &keys()), gone);
    }

    #[test]
    fn annotated_host_network_pods_are_served_only_with_the_flag() {
        let host = base(serde_json::json!({}), true);
        let with_flag = Keys {
            host_network_pods: true,
            ..keys()
        };
        let Some(PodState::HostNetwork(identity)) = pod_state(&host, &with_flag) else {
            panic!("expected a hostNetwork pod with its own role");
        };
        assert_eq!(identity.role, Annotation::Value("web-role".into()));
        let mut plain = host.clone();
        plain.metadata.annotations = None;
        assert_eq!(
            pod_state(&plain, &with_flag),
            Some(PodState::Gone { uid: "u-1".into() }),
            "without an annotation a hostNetwork pod keeps the node's metadata service"
        );
    }

    #[test]
    fn pod_ip_alone_is_enough() {
        let p = base(serde_json::json!({"podIPs": null}), false);
        let Some(PodState::Live(_, ips)) = pod_state(&p, &keys()) else {
            panic!("expected a live pod");
        };
        assert_eq!(ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }
}
