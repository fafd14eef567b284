//! Roles from ServiceAccounts (`--service-account-roles`): a pod without a role annotation gets
//! the role its ServiceAccount's `eks.amazonaws.com/role-arn` annotation names, the annotation
//! IRSA reads, so teams moving between kube2iam and IRSA annotate once.
//!
//! ServiceAccounts are watched metadata-only (`PartialObjectMetadata`): only annotations are
//! needed, and secrets or token lists never reach the agent. Only annotated accounts are kept.
//! A pod whose containers already carry the credentials environment the EKS pod identity webhook
//! injects is left to it: IRSA's web-identity pair, or, when the ServiceAccount also has an EKS
//! Pod Identity association (which takes precedence in the webhook), the container-credentials
//! pair. SDKs read either before they ever ask the metadata service.

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
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

use crate::{
    credentials::{Admission, PREFETCH_WINDOW, PREFETCHES_PER_POD, PrefetchLimiter},
    identity::{Annotation, PodAccount, WebhookCredentials},
};

/// The annotation IRSA (the EKS pod identity webhook) reads on a ServiceAccount.
pub const IRSA_ROLE_KEY: &str = "eks.amazonaws.com/role-arn";

/// The flags (flattened into the run flags).
#[derive(Debug, Clone, Args)]
pub struct ServiceAccountArgs {
    /// Serve a pod without a role annotation the role its ServiceAccount's annotation names
    /// (--service-account-role-key), under the same namespace restrictions; the pod annotation
    /// still wins. Pods that carry the environment of IRSA (AWS_ROLE_ARN,
    /// AWS_WEB_IDENTITY_TOKEN_FILE) or of EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI,
    /// AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE) are left to it.
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
/// the credentials environment the EKS pod identity webhook injects (the container-credentials
/// one first: the webhook injects it instead of the web-identity one when both apply).
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
    let carries = |credentials: WebhookCredentials| {
        spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| {
                    let env = c.env.as_deref().unwrap_or_default();
                    credentials
                        .env()
                        .iter()
                        .all(|key| env.iter().any(|e| e.name == *key))
                })
        })
    };
    let webhook = [
        WebhookCredentials::ContainerCredentials,
        WebhookCredentials::WebIdentity,
    ]
    .into_iter()
    .find(|c| carries(*c));
    PodAccount { name, webhook }
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
pub struct ServiceAccounts {
    /// (namespace, name) → the role annotation, for annotated accounts only.
    roles: RwLock<HashMap<(String, String), Annotation>>,
    synced: AtomicBool,
    /// Watch failures that made the agent relist.
    pub restarts: AtomicU64,
    /// Bounds the prefetches role changes of one account start ("namespace/name" → its role).
    prefetches: PrefetchLimiter<Annotation>,
    /// Counts the changes, each counted once it is applied: what was decided from the accounts
    /// at one count holds while the count is unchanged.
    generation: AtomicU64,
}

impl Default for ServiceAccounts {
    fn default() -> Self {
        ServiceAccounts {
            roles: RwLock::default(),
            synced: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            prefetches: PrefetchLimiter::new(PREFETCHES_PER_POD, PREFETCH_WINDOW),
            generation: AtomicU64::new(0),
        }
    }
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

    /// Read before the accounts are: see the field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
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
        let changed = match role {
            Annotation::Absent => roles.remove(&id).is_some(),
            role => roles.insert(id, role.clone()).as_ref() != Some(&role),
        };
        drop(roles);
        self.generation.fetch_add(1, Ordering::Release);
        changed
    }

    /// Watches ServiceAccounts (metadata only) until the task is dropped. `on_change(namespace,
    /// name)` runs for every annotated account once the first list is in, and for each account
    /// whose role changes after that (the prefetch for the pods that use it), at most
    /// [`PREFETCHES_PER_POD`] times per account in [`PREFETCH_WINDOW`]: one write to an account
    /// reaches every pod that uses it on every node, so a tenant flipping the annotation must
    /// not turn each flip into AssumeRole calls. Pods still get their role's credentials when
    /// they ask.
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
            self.handle(event, &mut buffer, &key, &on_change, Instant::now());
        }
    }

    /// One watch event: `buffer` holds a relist until it is complete.
    fn handle(
        &self,
        event: Result<watcher::Event<PartialObjectMeta<ServiceAccount>>, watcher::Error>,
        buffer: &mut HashMap<(String, String), Annotation>,
        key: &str,
        on_change: &impl Fn(&str, &str),
        now: Instant,
    ) {
        match event {
            Ok(watcher::Event::Init) => buffer.clear(),
            Ok(watcher::Event::InitApply(meta)) => {
                let (id, role) = Self::read(&meta, key);
                if role != Annotation::Absent {
                    buffer.insert(id, role);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = std::mem::take(buffer);
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
                // Counted now, not after the prefetches below, which take a while.
                self.generation.fetch_add(1, Ordering::Release);
                let annotated: Vec<(String, String)> = self
                    .roles
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                tracing::info!(annotated = annotated.len(), "service account list synced");
                // The first list: every annotated account's pods waited for it.
                for id in if first { &annotated } else { &changed } {
                    self.changed(id, on_change, now);
                }
            }
            Ok(watcher::Event::Apply(meta)) => {
                let (id, role) = Self::read(&meta, key);
                if self.apply(id.clone(), role.clone()) {
                    tracing::info!(
                        service_account = format!("{}/{}", id.0, id.1),
                        role = ?role,
                        "service account role changed"
                    );
                    self.changed(&id, on_change, now);
                }
            }
            Ok(watcher::Event::Delete(meta)) => {
                let (id, _) = Self::read(&meta, key);
                if self.apply(id.clone(), Annotation::Absent) {
                    self.changed(&id, on_change, now);
                }
            }
            Err(error) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "service account watch failed; relisting with backoff");
            }
        }
        // After the event's writes, never before them.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Runs `on_change` for the account `id`, whose role just changed, within its budget.
    fn changed(&self, id: &(String, String), on_change: &impl Fn(&str, &str), now: Instant) {
        let role = self
            .roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or(Annotation::Absent);
        match self
            .prefetches
            .admit(&format!("{}/{}", id.0, id.1), &role, now)
        {
            Admission::Admitted => on_change(&id.0, &id.1),
            Admission::Limited { first } => {
                if first {
                    tracing::warn!(
                        service_account = format!("{}/{}", id.0, id.1),
                        per_account = PREFETCHES_PER_POD,
                        window = ?PREFETCH_WINDOW,
                        "the service account's role annotation keeps changing; no more \
                         prefetches for its pods in this window (they still get credentials \
                         when they ask)"
                    );
                }
            }
        }
    }

    /// Forgets the prefetch budgets of accounts that have not changed for a while.
    pub fn prune(&self, now: Instant) -> usize {
        self.prefetches.prune(now)
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
        store.generation.fetch_add(1, Ordering::Release);
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CONTAINER_CREDENTIALS_ENV, WEB_IDENTITY_ENV};

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
    fn the_webhooks_credentials_environment_is_recognized_in_any_container() {
        let env = |names: &[&str]| -> serde_json::Value {
            names
                .iter()
                .map(|n| serde_json::json!({"name": n, "value": "x"}))
                .collect()
        };
        let webhook = |pod: serde_json::Value| pod_account(Some(&spec(pod))).webhook;
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "sidecar"},
                               {"name": "app", "env": env(&["AWS_REGION", "AWS_ROLE_ARN",
                                                             "AWS_WEB_IDENTITY_TOKEN_FILE"])}],
            })),
            Some(WebhookCredentials::WebIdentity)
        );
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "app"}],
                "initContainers": [{"name": "init", "env": env(&WEB_IDENTITY_ENV)}],
            })),
            Some(WebhookCredentials::WebIdentity)
        );
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "app", "env": env(&["AWS_ROLE_ARN"])}],
            })),
            None,
            "both variables make the web-identity provider"
        );
        // A ServiceAccount with an EKS Pod Identity association: the webhook injects the
        // container-credentials pair instead of IRSA's.
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "sidecar"},
                               {"name": "app", "env": env(&[
                                   "AWS_STS_REGIONAL_ENDPOINTS",
                                   "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                   "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                               ])}],
            })),
            Some(WebhookCredentials::ContainerCredentials)
        );
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "app"}],
                "initContainers": [{"name": "init", "env": env(&CONTAINER_CREDENTIALS_ENV)}],
            })),
            Some(WebhookCredentials::ContainerCredentials)
        );
        for half in CONTAINER_CREDENTIALS_ENV {
            assert_eq!(
                webhook(serde_json::json!({
                    "containers": [{"name": "app", "env": env(&[half])}],
                })),
                None,
                "both variables are what the webhook injects ({half} alone is not)"
            );
        }
        assert_eq!(
            webhook(serde_json::json!({
                "containers": [{"name": "a", "env": env(&WEB_IDENTITY_ENV)},
                               {"name": "b", "env": env(&CONTAINER_CREDENTIALS_ENV)}],
            })),
            Some(WebhookCredentials::ContainerCredentials),
            "the method the webhook prefers is named"
        );
        assert_eq!(
            webhook(serde_json::json!({"containers": [{"name": "app"}]})),
            None
        );
    }

    fn account(
        namespace: &str,
        name: &str,
        role: Option<&str>,
    ) -> PartialObjectMeta<ServiceAccount> {
        use kube::core::PartialObjectMetaExt as _;
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            annotations: role.map(|r| [(IRSA_ROLE_KEY.to_owned(), r.to_owned())].into()),
            ..Default::default()
        }
        .into_response_partial()
    }

    #[test]
    fn a_tenant_flipping_an_accounts_annotation_starts_few_prefetches() {
        let store = ServiceAccounts::default();
        let calls = std::cell::RefCell::new(Vec::new());
        let on_change = |ns: &str, name: &str| calls.borrow_mut().push(format!("{ns}/{name}"));
        let mut buffer = HashMap::new();
        let now = Instant::now();
        let mut handle = |event: watcher::Event<PartialObjectMeta<ServiceAccount>>| {
            store.handle(Ok(event), &mut buffer, IRSA_ROLE_KEY, &on_change, now)
        };
        handle(watcher::Event::Init);
        handle(watcher::Event::InitApply(account(
            "team",
            "app",
            Some("r-0"),
        )));
        handle(watcher::Event::InitApply(account(
            "other",
            "app",
            Some("x"),
        )));
        handle(watcher::Event::InitDone);
        assert_eq!(
            calls.borrow().len(),
            2,
            "every annotated account after the first list"
        );
        // One write per flip; each one would reach every pod of the account on every node.
        for i in 1..=20 {
            handle(watcher::Event::Apply(account(
                "team",
                "app",
                Some(&format!("r-{i}")),
            )));
        }
        let team = calls.borrow().iter().filter(|c| *c == "team/app").count();
        assert_eq!(
            team as u32, PREFETCHES_PER_POD,
            "the list and then changes, within the budget"
        );
        assert_eq!(
            store.role("team", "app"),
            AccountRole::Annotated {
                account: "app".into(),
                role: Annotation::Value("r-20".into())
            },
            "requests still get the current role"
        );
        // Other accounts keep their own budget.
        handle(watcher::Event::Apply(account("other", "app", Some("y"))));
        assert_eq!(calls.borrow().last().map(String::as_str), Some("other/app"));
        // After the window, changes start prefetches again.
        store.handle(
            Ok(watcher::Event::Apply(account("team", "app", Some("r-21")))),
            &mut HashMap::new(),
            IRSA_ROLE_KEY,
            &on_change,
            now + PREFETCH_WINDOW,
        );
        assert_eq!(calls.borrow().last().map(String::as_str), Some("team/app"));
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
