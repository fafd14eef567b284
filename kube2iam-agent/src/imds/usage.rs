//! Which credential cache keys the pods on this node use now, for evicting the rest
//! ([`crate::credentials::CredentialCache::evict_unused`]).

use std::{collections::HashSet, sync::Arc};

use super::State;
use crate::{
    credentials::CacheKey,
    decision::{self, Namespace, Outcome},
    identity::{self, PodIdentity},
};

impl State {
    /// The key `pod` would be served from, as its annotations are now; `None` when it would get
    /// no credentials (no role, an invalid annotation, a namespace that does not allow the role).
    /// The same decision as a request's. Before namespaces are listed the key counts as used:
    /// keeping an entry is always safe.
    pub fn cache_key_in_use(&self, pod: &PodIdentity) -> Option<CacheKey> {
        let namespace = match self.namespace_of(&pod.namespace) {
            Namespace::NotListed => Namespace::Unrestricted,
            known => known,
        };
        let account = self.account_of(pod);
        let pod = Arc::new(pod.clone());
        match decision::role(&self.config.decision, &pod, &namespace, &account, false) {
            Outcome::Ok(decision) => self.cache_key(&decision, None).ok().map(|(key, _)| key),
            Outcome::Wait | Outcome::Refuse(_) => None,
        }
    }

    /// The keys of every pod the agent serves.
    pub fn cache_keys_in_use(&self) -> Result<HashSet<CacheKey>, identity::Error> {
        Ok(self
            .registry
            .live_pods()
            .iter()
            .filter_map(|pod| self.cache_key_in_use(pod))
            .collect())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        sync::Arc,
        time::Duration,
    };

    use futures::future::BoxFuture;

    use super::*;
    use crate::{
        credentials::{
            AssumeRequest, CacheSettings, CredentialCache, Credentials, Session, Sts, StsError,
        },
        events::PodEvents,
        identity::{Annotation, MemoryIdentityMap, Registry},
        imds::{PathRules, ServerConfig, TokenMode, token::TokenIssuer, upstream::Upstream},
        kube::Namespaces,
        policy::BaseArn,
    };

    struct NoSts;

    impl Sts for NoSts {
        fn assume_role(
            &self,
            request: AssumeRequest,
        ) -> BoxFuture<'static, Result<Credentials, StsError>> {
            Box::pin(async move {
                Err(StsError::Unavailable {
                    role: request.role_arn,
                    message: "not in this test".into(),
                })
            })
        }
    }

    pub(in crate::imds) fn state(session_per_pod: bool, default_role: Option<&str>) -> State {
        let config = ServerConfig {
            decision: crate::decision::Rules {
                node: "node-a".into(),
                attestation: crate::attest::Mode::Prefer,
                role_key: "iam.amazonaws.com/role".into(),
                namespace_key: "iam.amazonaws.com/allowed-roles".into(),
                base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
                default_role: default_role.map(str::to_owned),
                service_account_key: "eks.amazonaws.com/role-arn".into(),
                needs_service_account: false,
                roles: Default::default(),
            },
            pod_wait: Duration::ZERO,
            tokens: TokenMode::Optional,
            namespace_restrictions: false,
            session_per_pod,
            kube2iam_session_names: false,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sessions: Default::default(),
            service_account_roles: false,
            rules: PathRules::default(),
            header_read_timeout: Duration::from_secs(1),
            max_connections: 1,
            max_connections_per_caller: 1,
            max_header_bytes: 8192,
            drain_timeout: Duration::ZERO,
        };
        State {
            config,
            registry: Arc::new(Registry::new(Box::new(MemoryIdentityMap::with_capacity(
                16,
            )))),
            namespaces: Arc::new(Namespaces::default()),
            service_accounts: Default::default(),
            cache: CredentialCache::new(Arc::new(NoSts), CacheSettings::default()),
            upstream: Arc::new(Upstream::new(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9),
                Duration::from_secs(1),
            )),
            tokens: TokenIssuer::new([7; 32]),
            stats: Default::default(),
            events: PodEvents::new(Duration::ZERO, "node-a"),
            attestation: super::super::Attestation {
                map: None,
                cgroups: Arc::new(crate::attest::CgroupPods::new("/nonexistent".into())),
                host_netns_cookie: 0,
            },
            per_caller: Default::default(),
            refusal_log: crate::telemetry::LogLimiter::new(Duration::from_secs(1)),
            node_session: Default::default(),
        }
    }

    pub(in crate::imds) fn pod(
        uid: &str,
        role: Annotation,
        external_id: Annotation,
    ) -> PodIdentity {
        PodIdentity {
            namespace: "default".into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
            created_ms: 1,
            role,
            external_id,
            account: None,
        }
    }

    fn key(role: &str, external_id: Option<&str>, session: Session) -> CacheKey {
        CacheKey {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
            external_id: external_id.map(str::to_owned),
            session,
            tags: Default::default(),
        }
    }

    #[test]
    fn keys_in_use_follow_the_pods_current_annotations() {
        let state = state(false, Some("fallback"));
        let value = |v: &str| Annotation::Value(v.into());
        let pods = [
            pod("1", value("web"), Annotation::Absent),
            pod("2", value("web"), Annotation::Absent),
            pod("3", value("api"), value("ext-1")),
            pod("4", Annotation::Absent, Annotation::Absent),
            pod("5", value("not a role"), Annotation::Absent),
            pod("6", Annotation::Oversize(5000), Annotation::Absent),
            pod("7", value("api"), value("x")),
        ];
        for (n, pod) in pods.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, n as u8 + 1));
            assert!(state.registry.apply(pod, &[ip]).is_empty());
        }
        let in_use = state.cache_keys_in_use().unwrap();
        let expected: HashSet<CacheKey> = [
            key("web", None, Session::Node),
            key("api", Some("ext-1"), Session::Node),
            key("fallback", None, Session::Node),
        ]
        .into();
        assert_eq!(in_use, expected);

        // The pod's role changes: its old key is no longer in use.
        let changed = pod("3", value("batch"), value("ext-1"));
        assert!(
            state
                .registry
                .apply(&changed, &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3))])
                .is_empty()
        );
        let in_use = state.cache_keys_in_use().unwrap();
        assert!(in_use.contains(&key("batch", Some("ext-1"), Session::Node)));
        assert!(!in_use.contains(&key("api", Some("ext-1"), Session::Node)));
    }

    #[test]
    fn per_pod_sessions_are_keyed_by_pod() {
        let state = state(true, None);
        let web = pod("u1", Annotation::Value("web".into()), Annotation::Absent);
        assert_eq!(
            state.cache_key_in_use(&web),
            Some(key("web", None, Session::Pod { uid: "u1".into() }))
        );
        let none = pod("u2", Annotation::Absent, Annotation::Absent);
        assert_eq!(state.cache_key_in_use(&none), None, "no default role");
    }
}
