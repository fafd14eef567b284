//! Roles from ServiceAccounts (`--service-account-roles`): a pod without a role annotation gets
//! the role its ServiceAccount's `eks.amazonaws.com/role-arn` annotation names, the annotation
//! IRSA reads, so teams moving between kube2iam and IRSA annotate once.
//!
//! ServiceAccounts are watched metadata-only (`PartialObjectMetadata`): only annotations are
//! needed, and secrets or token lists never reach the agent. Only annotated accounts are kept.
//! A pod whose containers already carry IRSA's web-identity environment (injected by the EKS
//! pod identity webhook) is left to IRSA: its SDK reads that environment before it ever asks the
//! metadata service.

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use clap::Args;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{PodSpec, ServiceAccount};
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, watcher},
};
use kube2iam_common::ROLE_CAP;

use crate::identity::{Annotation, PodAccount};

/// The annotation IRSA (the EKS pod identity webhook) reads on a ServiceAccount.
pub const IRSA_ROLE_KEY: &str = "eks.amazonaws.com/role-arn";
/// The environment the webhook injects into each container for IRSA.
pub const WEB_IDENTITY_ENV: [&str; 2] = ["AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"];

/// The flags (flattened into the run flags).
#[derive(Debug, Clone, Args)]
pub struct ServiceAccountArgs {
    /// Serve a pod without a role annotation the role its ServiceAccount's annotation names
    /// (--service-account-role-key), under the same namespace restrictions; the pod annotation
    /// still wins. Pods that carry IRSA's web-identity environment are left to IRSA.
    #[arg(
        long,
        env = "SERVICE_ACCOUNT_ROLES",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub service_account_roles: bool,
    /// The ServiceAccount annotation naming the role (IRSA's, by default).
    #[arg(long, env = "SERVICE_ACCOUNT_ROLE_KEY", default_value = IRSA_ROLE_KEY)]
    pub service_account_role_key: String,
}

/// What the pod spec says about its service account: its name (`default` when the spec names
/// none, as the API server's ServiceAccount admission sets it) and whether a container carries
/// the web-identity environment.
pub fn pod_account(spec: Option<&PodSpec>) -> PodAccount {
    let name = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .filter(|n| !n.is_empty())
                // The deprecated alias, still filled in by the API server.
                .or(s.service_account.as_deref().filter(|n| !n.is_empty()))
        })
        .unwrap_or("default")
        .to_owned();
    let web_identity = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| {
                let env = c.env.as_deref().unwrap_or_default();
                WEB_IDENTITY_ENV
                    .iter()
                    .all(|key| env.iter().any(|e| e.name == *key))
            })
    });
    PodAccount { name, web_identity }
}

/// A ServiceAccount's role, as the watch knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRole {
    /// `--service-account-roles` is off.
    Off,
    /// ServiceAccounts are not listed yet, or the pod's record does not name its service account
    /// yet (pinned by a previous agent, before the pod list is back).
    NotListed,
    /// The service account has no role annotation (or does not exist).
    None,
    /// The service account's annotation.
    Annotated { account: String, role: Annotation },
}

/// The annotated ServiceAccounts, kept by a metadata-only watch.
#[derive(Default)]
pub struct ServiceAccounts {
    /// (namespace, name) → the role annotation, for annotated accounts only.
    roles: RwLock<HashMap<(String, String), Annotation>>,
    synced: AtomicBool,
    /// Watch failures that made the agent relist.
    pub restarts: AtomicU64,
}

impl ServiceAccounts {
    /// The role of `namespace/name`.
    pub fn role(&self, namespace: &str, name: &str) -> AccountRole {
        if !self.synced() {
            return AccountRole::NotListed;
        }
        match self
            .roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
        {
            Some(role) => AccountRole::Annotated {
                account: name.to_owned(),
                role: role.clone(),
            },
            None => AccountRole::None,
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn read(meta: &PartialObjectMeta<ServiceAccount>, key: &str) -> ((String, String), Annotation) {
        let m = &meta.metadata;
        let id = (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        );
        let role = Annotation::from_option(
            m.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str),
            ROLE_CAP,
        );
        (id, role)
    }

    /// Records one account; returns whether its role changed.
    fn apply(&self, id: (String, String), role: Annotation) -> bool {
        let mut roles = self.roles.write().unwrap_or_else(|p| p.into_inner());
        match role {
            Annotation::Absent => roles.remove(&id).is_some(),
            role => roles.insert(id, role.clone()).as_ref() != Some(&role),
        }
    }

    /// Watches ServiceAccounts (metadata only) until the task is dropped. `on_change(namespace,
    /// name)` runs for every annotated account once the first list is in, and for each account
    /// whose role changes after that (the prefetch for the pods that use it).
    pub async fn watch(
        self: std::sync::Arc<Self>,
        client: Client,
        key: String,
        on_change: impl Fn(&str, &str) + Send + 'static,
    ) {
        let api: Api<PartialObjectMeta<ServiceAccount>> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut buffer: HashMap<(String, String), Annotation> = HashMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(meta)) => {
                    let (id, role) = Self::read(&meta, &key);
                    if role != Annotation::Absent {
                        buffer.insert(id, role);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = std::mem::take(&mut buffer);
                    let changed: Vec<(String, String)> = {
                        let mut roles = self.roles.write().unwrap_or_else(|p| p.into_inner());
                        let mut changed: Vec<_> = fresh
                            .iter()
                            .filter(|(id, role)| roles.get(*id) != Some(*role))
                            .map(|(id, _)| id.clone())
                            .collect();
                        changed.extend(roles.keys().filter(|id| !fresh.contains_key(*id)).cloned());
                        *roles = fresh;
                        changed
                    };
                    let first = !self.synced.swap(true, Ordering::AcqRel);
                    let annotated: Vec<(String, String)> = self
                        .roles
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .keys()
                        .cloned()
                        .collect();
                    tracing::info!(annotated = annotated.len(), "service account list synced");
                    // The first list: every annotated account's pods waited for it.
                    for (namespace, name) in if first { &annotated } else { &changed } {
                        on_change(namespace, name);
                    }
                }
                Ok(watcher::Event::Apply(meta)) => {
                    let (id, role) = Self::read(&meta, &key);
                    if self.apply(id.clone(), role.clone()) {
                        tracing::info!(
                            service_account = format!("{}/{}", id.0, id.1),
                            role = ?role,
                            "service account role changed"
                        );
                        on_change(&id.0, &id.1);
                    }
                }
                Ok(watcher::Event::Delete(meta)) => {
                    let (id, _) = Self::read(&meta, &key);
                    if self.apply(id.clone(), Annotation::Absent) {
                        on_change(&id.0, &id.1);
                    }
                }
                Err(error) => {
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "service account watch failed; relisting with backoff");
                }
            }
        }
    }

    /// A store filled by hand, for unit tests of the callers.
    #[cfg(test)]
    pub fn listed(entries: &[(&str, &str, &str)]) -> ServiceAccounts {
        let store = ServiceAccounts::default();
        for (namespace, name, role) in entries {
            store.apply(
                ((*namespace).into(), (*name).into()),
                Annotation::Value((*role).into()),
            );
        }
        store.synced.store(true, Ordering::Release);
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).expect("a pod spec")
    }

    #[test]
    fn the_service_account_name_defaults_as_the_api_server_does() {
        assert_eq!(pod_account(None).name, "default");
        assert_eq!(
            pod_account(Some(&spec(serde_json::json!({"containers": []})))).name,
            "default"
        );
        let named = spec(serde_json::json!({"containers": [], "serviceAccountName": "billing"}));
        assert_eq!(pod_account(Some(&named)).name, "billing");
        let alias = spec(serde_json::json!({"containers": [], "serviceAccount": "old"}));
        assert_eq!(pod_account(Some(&alias)).name, "old");
    }

    #[test]
    fn the_webhooks_web_identity_environment_is_recognized_in_any_container() {
        let env = |names: &[&str]| -> serde_json::Value {
            names
                .iter()
                .map(|n| serde_json::json!({"name": n, "value": "x"}))
                .collect()
        };
        let irsa = spec(serde_json::json!({
            "containers": [{"name": "sidecar"},
                           {"name": "app", "env": env(&["AWS_REGION", "AWS_ROLE_ARN",
                                                         "AWS_WEB_IDENTITY_TOKEN_FILE"])}],
        }));
        assert!(pod_account(Some(&irsa)).web_identity);
        let init = spec(serde_json::json!({
            "containers": [{"name": "app"}],
            "initContainers": [{"name": "init", "env": env(&WEB_IDENTITY_ENV)}],
        }));
        assert!(pod_account(Some(&init)).web_identity);
        let half = spec(serde_json::json!({
            "containers": [{"name": "app", "env": env(&["AWS_ROLE_ARN"])}],
        }));
        assert!(
            !pod_account(Some(&half)).web_identity,
            "both variables make the web-identity provider"
        );
    }

    #[test]
    fn the_store_answers_not_listed_until_synced_and_tracks_changes() {
        let store = ServiceAccounts::default();
        assert_eq!(store.role("shop", "billing"), AccountRole::NotListed);
        let store = ServiceAccounts::listed(&[("shop", "billing", "arn:aws:iam::1:role/b")]);
        assert_eq!(
            store.role("shop", "billing"),
            AccountRole::Annotated {
                account: "billing".into(),
                role: Annotation::Value("arn:aws:iam::1:role/b".into())
            }
        );
        assert_eq!(store.role("other", "billing"), AccountRole::None);
        let id = ("shop".to_owned(), "billing".to_owned());
        assert!(!store.apply(
            id.clone(),
            Annotation::Value("arn:aws:iam::1:role/b".into())
        ));
        assert!(store.apply(
            id.clone(),
            Annotation::Value("arn:aws:iam::1:role/c".into())
        ));
        assert!(store.apply(id.clone(), Annotation::Absent));
        assert_eq!(store.role("shop", "billing"), AccountRole::None);
        assert!(!store.apply(id, Annotation::Absent));
    }
}
