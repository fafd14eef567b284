//! Who is calling and which role they get: one pure function of what the kernel attests, what
//! the pod registry knows of the address, and the namespace's policy. Request handling and the
//! credential prefetch both decide through it, so the two can never disagree.

use std::{net::IpAddr, path::Path, sync::Arc};

use crate::{
    attest::{Caller, Mode},
    events::Reason,
    identity::{Annotation, PodIdentity},
    kube::Restriction,
    policy::{self, BaseArn, RoleArn},
    service_accounts::AccountRole,
};

/// The rules the deployment set.
#[derive(Debug, Clone)]
pub struct Rules {
    pub node: String,
    pub attestation: Mode,
    pub role_key: String,
    pub namespace_key: String,
    pub base_arn: Option<BaseArn>,
    pub default_role: Option<String>,
    /// The ServiceAccount annotation naming a role (`--service-account-role-key`), for messages.
    pub service_account_key: String,
    /// Sessions are tagged with the pod's service account (`--session-tags`): a pod record that
    /// does not name it yet cannot be served.
    pub needs_service_account: bool,
    /// Annotation values already resolved against `base_arn`.
    pub roles: policy::RoleResolver,
}

/// What the registry knows when a request is decided.
#[derive(Debug)]
pub struct Known<'a> {
    /// The connection's source address.
    pub peer: IpAddr,
    /// The kernel's word on the connection.
    pub caller: &'a Caller,
    /// The live pods that claim `peer`, newest first.
    pub claimants: &'a [Arc<PodIdentity>],
    /// Before the first list is complete: the record the previous agent pinned for `peer`. It
    /// is served only to the pod the kernel attests it names, never by address alone.
    pub pinned: Option<&'a Arc<PodIdentity>>,
    /// The record of the attested pod among hostNetwork pods served their own role.
    pub host_pod: Option<&'a Arc<PodIdentity>>,
    /// The attested pod's record wherever the registry has it (for naming it in refusals).
    pub attested: Option<&'a Arc<PodIdentity>>,
    /// The first full pod list has been applied.
    pub synced: bool,
    /// The registry's cgroup root, named in refusals.
    pub cgroup_root: &'a Path,
    /// kubelet's pod cgroups are below that root: the kernel can name pods on this node.
    pub pods_attestable: bool,
}

/// The namespace's restriction, as the caller found it.
#[derive(Debug, Clone)]
pub enum Namespace {
    /// `--namespace-restrictions` is off.
    Unrestricted,
    /// Restrictions are on and the namespaces are not listed yet.
    NotListed,
    /// The namespace is not in the list.
    Unknown,
    /// The namespace has no allowed-roles annotation.
    NoAnnotation,
    /// The namespace's annotation, compiled (or why it could not be).
    Restricted(Restriction),
}

impl Namespace {
    /// From the namespace watch's answer for `get(namespace)`, asked (`find`) only when
    /// restrictions are on and the namespaces are listed.
    pub fn from_lookup(
        restrictions: bool,
        listed: bool,
        find: impl FnOnce() -> Option<Option<Restriction>>,
    ) -> Self {
        match (restrictions, listed) {
            (false, _) => Namespace::Unrestricted,
            (true, false) => Namespace::NotListed,
            (true, true) => match find() {
                None => Namespace::Unknown,
                Some(None) => Namespace::NoAnnotation,
                Some(Some(r)) => Namespace::Restricted(r),
            },
        }
    }
}

/// Why a caller is refused; `kind` is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
    pub kind: &'static str,
    /// The Event to record on the pod, when the pod is the one to fix.
    pub event: Option<(PodIdentity, Reason)>,
}

impl Refusal {
    fn new(status: u16, kind: &'static str, body: String) -> Refusal {
        Refusal {
            status,
            body: format!("kube2iam-ebpf: {body}"),
            kind,
            event: None,
        }
    }

    fn on(mut self, pod: &PodIdentity, reason: Reason) -> Refusal {
        self.event = Some((pod.clone(), reason));
        self
    }
}

/// The caller's role, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Shared with the registry's record: deciding copies no pod.
    pub pod: Arc<PodIdentity>,
    pub role: RoleArn,
    pub external_id: Option<String>,
}

/// The outcome of one look.
// Returned and matched at once, never stored in bulk: the size of a refusal does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Ok(T),
    /// Not decidable yet: the watch may still bring what is missing. Look again on the next
    /// registry change, until the wait is over.
    Wait,
    Refuse(Refusal),
}

/// Which pod is calling. With `last_look` false, what the watch may still change answers
/// [`Outcome::Wait`]; with it true, it is refused.
pub fn identify(rules: &Rules, known: &Known<'_>, last_look: bool) -> Outcome<Arc<PodIdentity>> {
    let node = &rules.node;
    let peer = known.peer;
    let by_address = || match known.claimants.first() {
        Some(owner) => Outcome::Ok(owner.clone()),
        None if !last_look => Outcome::Wait,
        None => Outcome::Refuse(unknown_address(rules, known)),
    };
    let attested_pods = || known.claimants.iter().chain(known.pinned);
    match known.caller {
        Caller::NotChecked => by_address(),
        Caller::Unattested => Outcome::Refuse(Refusal::new(
            403,
            "unattested",
            format!(
                "the connection from {peer} did not come through the metadata redirect on node \
                 {node}; the agent serves only pods on this node that connect to the metadata \
                 address"
            ),
        )),
        Caller::Unresolved { cgroup_id } => Outcome::Refuse(Refusal::new(
            403,
            "unresolved_cgroup",
            format!(
                "the kernel attributes the connection from {peer} to cgroup {cgroup_id}, which is \
                 not in the cgroup tree under {} (removed, or nested deeper than the agent \
                 reads): who made it cannot be told",
                known.cgroup_root.display()
            ),
        )),
        Caller::NoPodCgroup { cgroup_id } => {
            // Where the pods of this node are in pod cgroups, a process outside them is no pod.
            let refuse = match rules.attestation {
                Mode::Require => true,
                Mode::Prefer => known.pods_attestable,
                Mode::Off => false,
            };
            if !refuse {
                return by_address();
            }
            let why = if rules.attestation == Mode::Require {
                "--identity-attestation is require"
            } else {
                "the pods of this node are in pod cgroups"
            };
            Outcome::Refuse(Refusal::new(
                403,
                "no_pod_cgroup",
                format!(
                    "the kernel attributes the connection from {peer} to cgroup {cgroup_id}, \
                     which is no pod's cgroup under {} (kubelet's layout), and {why}; run \
                     `kube2iam-agent doctor` on node {node}",
                    known.cgroup_root.display()
                ),
            ))
        }
        Caller::Pod { uid, host_netns } => {
            // Named only in refusals.
            let attested_name = || {
                known
                    .attested
                    .map(|p| p.display_name())
                    .unwrap_or_else(|| format!("with UID {uid}"))
            };
            if *host_netns {
                return match known.host_pod {
                    Some(pod) if pod.uid == *uid => Outcome::Ok(pod.clone()),
                    _ if !last_look => Outcome::Wait,
                    _ => Outcome::Refuse(Refusal::new(
                        403,
                        "host_pod_unknown",
                        format!(
                            "the kernel attributes this host-network connection to pod \
                             {}, which is not a hostNetwork pod with a role on node \
                             {node} (--host-network-pods)",
                            attested_name()
                        ),
                    )),
                };
            }
            if let Some(pod) = attested_pods().find(|p| p.uid == *uid) {
                return Outcome::Ok(pod.clone());
            }
            if !last_look {
                return Outcome::Wait;
            }
            if attested_pods().next().is_none() {
                return Outcome::Refuse(unknown_address(rules, known));
            }
            let owners: Vec<String> = attested_pods().map(|p| p.display_name()).collect();
            Outcome::Refuse(Refusal::new(
                403,
                "mismatch",
                format!(
                    "the kernel attributes the connection from {peer} to pod {}, but on node \
                     {node} {peer} belongs to {}; nothing is served",
                    attested_name(),
                    owners.join(", ")
                ),
            ))
        }
    }
}

fn unknown_address(rules: &Rules, known: &Known<'_>) -> Refusal {
    let (node, peer) = (&rules.node, known.peer);
    let not_synced = if known.synced {
        ""
    } else {
        " (the pod list is not synced yet)"
    };
    Refusal::new(
        404,
        "unknown_pod",
        format!("no pod with IP {peer} on node {node}{not_synced}"),
    )
}

/// Where a pod's role comes from.
enum Source {
    Pod,
    Account(String),
    Default,
}

/// The role `pod` gets under `rules`, its namespace's restriction and its service account's
/// role annotation (`account`, [`AccountRole::Off`] without `--service-account-roles`).
pub fn role(
    rules: &Rules,
    pod: &Arc<PodIdentity>,
    namespace: &Namespace,
    account: &AccountRole,
    last_look: bool,
) -> Outcome<Decision> {
    let who = pod.named();
    let key = &rules.role_key;
    let sa_key = &rules.service_account_key;
    let invalid = |reason: Reason, body: String| {
        Outcome::Refuse(Refusal::new(403, "invalid_annotation", body).on(pod, reason))
    };
    let (raw_role, source) = match &pod.role {
        Annotation::Value(v) => (v.as_str(), Source::Pod),
        Annotation::Oversize(len) => {
            return invalid(
                Reason::InvalidRoleAnnotation,
                format!(
                    "pod {who}: annotation {key} is {len} bytes; no valid role ARN is that long"
                ),
            );
        }
        Annotation::Absent => {
            // The pod annotation wins; without it, the service account's, then the default.
            let webhook = pod.account.as_ref().and_then(|a| a.webhook);
            let mut why_none = String::new();
            match account {
                AccountRole::Off | AccountRole::None => {}
                AccountRole::NotListed if !last_look => return Outcome::Wait,
                AccountRole::NotListed => {
                    return Outcome::Refuse(Refusal::new(
                        503,
                        "service_accounts_not_listed",
                        format!(
                            "pod {who} has no {key} annotation, and its service account's role \
                             is not known yet (the service account or pod list is not synced); \
                             try again"
                        ),
                    ));
                }
                AccountRole::Annotated { account, .. } if webhook.is_some() => {
                    if let Some(webhook) = webhook {
                        why_none = format!(
                            "; its service account {account}'s {sa_key} role is left to {}, \
                             whose {} environment ({}) the pod's containers carry",
                            webhook.provider(),
                            webhook.method(),
                            webhook.env().join(", ")
                        );
                    }
                }
                AccountRole::Annotated {
                    role: Annotation::Value(v),
                    account,
                } => {
                    return decide_role(
                        rules,
                        pod,
                        namespace,
                        v,
                        Source::Account(account.clone()),
                        last_look,
                    );
                }
                AccountRole::Annotated {
                    role: Annotation::Oversize(len),
                    account,
                } => {
                    return invalid(
                        Reason::InvalidRoleAnnotation,
                        format!(
                            "pod {who}: service account {account} annotation {sa_key} is {len} \
                             bytes; no valid role ARN is that long"
                        ),
                    );
                }
                AccountRole::Annotated {
                    role: Annotation::Absent,
                    ..
                } => {}
            }
            match &rules.default_role {
                Some(default) => (default.as_str(), Source::Default),
                None => {
                    let account_note = match (account, &pod.account) {
                        (AccountRole::None, Some(a)) => {
                            format!(
                                ", its service account {} has no {sa_key} annotation",
                                a.name
                            )
                        }
                        _ => String::new(),
                    };
                    let and = if account_note.is_empty() && why_none.is_empty() {
                        " and"
                    } else {
                        ", and"
                    };
                    return Outcome::Refuse(Refusal::new(
                        404,
                        "no_role",
                        format!(
                            "pod {who} has no {key} annotation{account_note}{why_none}{and} the \
                             agent has no --default-role"
                        ),
                    ));
                }
            }
        }
    };
    decide_role(rules, pod, namespace, raw_role, source, last_look)
}

/// The rest of [`role`] once the raw role is known: resolve it, read the external ID, apply the
/// namespace's restriction.
fn decide_role(
    rules: &Rules,
    pod: &Arc<PodIdentity>,
    namespace: &Namespace,
    raw_role: &str,
    source: Source,
    last_look: bool,
) -> Outcome<Decision> {
    let who = pod.named();
    let key = &rules.role_key;
    let sa_key = &rules.service_account_key;
    let invalid = |reason: Reason, body: String| {
        Outcome::Refuse(Refusal::new(403, "invalid_annotation", body).on(pod, reason))
    };
    let role = match rules.roles.resolve(raw_role, rules.base_arn.as_ref()) {
        Ok(role) => role,
        Err(e) => {
            let what = match &source {
                Source::Pod => format!("annotation {key}"),
                Source::Account(account) => {
                    format!("service account {account} annotation {sa_key}")
                }
                Source::Default => "--default-role".to_owned(),
            };
            return invalid(
                Reason::InvalidRoleAnnotation,
                format!("pod {who}: {what}: {e}"),
            );
        }
    };
    let from = match &source {
        Source::Pod => String::new(),
        Source::Account(account) => {
            format!(" (from service account {account}'s {sa_key} annotation)")
        }
        Source::Default => " (--default-role)".to_owned(),
    };
    let external_id = match &pod.external_id {
        Annotation::Absent => None,
        Annotation::Oversize(len) => {
            return invalid(
                Reason::InvalidExternalIdAnnotation,
                format!(
                    "pod {who}: external-ID annotation is {len} bytes; STS allows at most {}",
                    policy::MAX_EXTERNAL_ID
                ),
            );
        }
        Annotation::Value(v) => match policy::validate_external_id(v) {
            Ok(v) => Some(v.to_owned()),
            Err(e) => {
                return invalid(
                    Reason::InvalidExternalIdAnnotation,
                    format!("pod {who}: {e}"),
                );
            }
        },
    };
    let ns = &pod.namespace;
    let ns_key = &rules.namespace_key;
    let denied = |body: String| {
        Outcome::Refuse(Refusal::new(403, "role_not_allowed", body).on(pod, Reason::RoleNotAllowed))
    };
    match namespace {
        Namespace::Unrestricted => {}
        Namespace::NotListed if !last_look => return Outcome::Wait,
        Namespace::NotListed => {
            return Outcome::Refuse(Refusal::new(
                403,
                "namespaces_not_listed",
                format!(
                    "namespace restrictions are on and namespaces are not listed yet; pod {who} \
                     is refused until they are"
                ),
            ));
        }
        Namespace::Unknown => {
            return denied(format!("pod {who}: namespace {ns} is unknown to the agent"));
        }
        Namespace::NoAnnotation => {
            return denied(format!(
                "pod {who} has role {role}{from}, but namespace {ns} has no {ns_key} annotation, \
                 so it allows no role"
            ));
        }
        Namespace::Restricted(Err(e)) => return denied(format!("pod {who}: {e}")),
        Namespace::Restricted(Ok(allowed)) => {
            if !allowed.allows(&role, rules.base_arn.as_ref()) {
                return denied(format!(
                    "pod {who} has role {role}{from}, but namespace {ns} allows only {:?} \
                     (annotation {ns_key})",
                    allowed.sources()
                ));
            }
        }
    }
    if rules.needs_service_account && pod.account.is_none() {
        if !last_look {
            return Outcome::Wait;
        }
        return Outcome::Refuse(Refusal::new(
            503,
            "pod_not_listed",
            format!(
                "pod {who}: its session is tagged with its service account (--session-tags), \
                 which the agent learns from the pod list; the list is not synced since the \
                 agent started; try again"
            ),
        ));
    }
    Outcome::Ok(Decision {
        pod: pod.clone(),
        role,
        external_id,
    })
}

/// Both steps: who is calling, then their role.
pub fn decide(
    rules: &Rules,
    known: &Known<'_>,
    namespace_of: impl Fn(&str) -> Namespace,
    account_of: impl Fn(&PodIdentity) -> AccountRole,
    last_look: bool,
) -> Outcome<Decision> {
    match identify(rules, known, last_look) {
        Outcome::Ok(pod) => role(
            rules,
            &pod,
            &namespace_of(&pod.namespace),
            &account_of(&pod),
            last_look,
        ),
        Outcome::Wait => Outcome::Wait,
        Outcome::Refuse(r) => Outcome::Refuse(r),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        identity::PodAccount,
        policy::{AllowedRoles, PatternFormat},
    };

    const UID_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const UID_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

    fn rules(mode: Mode) -> Rules {
        Rules {
            node: "node-a".into(),
            attestation: mode,
            role_key: "iam.amazonaws.com/role".into(),
            namespace_key: "iam.amazonaws.com/allowed-roles".into(),
            base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            default_role: None,
            service_account_key: "eks.amazonaws.com/role-arn".into(),
            needs_service_account: false,
            roles: Default::default(),
        }
    }

    fn pod(name: &str, uid: &str, role: Option<&str>) -> Arc<PodIdentity> {
        Arc::new(PodIdentity {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            created_ms: 1,
            role: Annotation::from_option(role, 640),
            external_id: Annotation::Absent,
            account: Some(PodAccount {
                name: "default".into(),
                webhook: None,
            }),
        })
    }

    fn attested(uid: &str) -> Caller {
        Caller::Pod {
            uid: uid.into(),
            host_netns: false,
        }
    }

    fn known<'a>(caller: &'a Caller, claimants: &'a [Arc<PodIdentity>]) -> Known<'a> {
        Known {
            peer: "198.51.100.2".parse().unwrap(),
            caller,
            claimants,
            pinned: None,
            host_pod: None,
            attested: None,
            synced: true,
            cgroup_root: Path::new("/sys/fs/cgroup"),
            pods_attestable: true,
        }
    }

    fn refused<T: std::fmt::Debug>(outcome: Outcome<T>) -> Refusal {
        match outcome {
            Outcome::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn served(outcome: Outcome<Decision>) -> Decision {
        match outcome {
            Outcome::Ok(d) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    fn unrestricted(_: &str) -> Namespace {
        Namespace::Unrestricted
    }

    fn no_account(_: &PodIdentity) -> AccountRole {
        AccountRole::Off
    }

    #[test]
    fn an_attested_pod_that_owns_the_address_gets_its_role() {
        let a = [pod("web", UID_A, Some("web"))];
        let caller = attested(UID_A);
        let d = served(decide(
            &rules(Mode::Prefer),
            &known(&caller, &a),
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!(d.pod.uid, UID_A);
        assert_eq!(d.role.as_str(), "arn:aws:iam::123456789012:role/web");
    }

    #[test]
    fn another_pod_on_the_address_is_refused_after_the_wait() {
        let owner = [pod("web", UID_A, Some("web"))];
        let caller = attested(UID_B);
        let mut k = known(&caller, &owner);
        let attacker = pod("evil", UID_B, None);
        k.attested = Some(&attacker);
        assert_eq!(
            decide(&rules(Mode::Require), &k, unrestricted, no_account, false),
            Outcome::Wait
        );
        let r = refused(decide(
            &rules(Mode::Require),
            &k,
            unrestricted,
            no_account,
            true,
        ));
        assert_eq!((r.status, r.kind), (403, "mismatch"));
        assert!(
            r.body.contains("shop/evil") && r.body.contains("shop/web"),
            "{}",
            r.body
        );
        // Whatever the mode, a pod the kernel names is never served another pod's record.
        let r = refused(decide(
            &rules(Mode::Prefer),
            &k,
            unrestricted,
            no_account,
            true,
        ));
        assert_eq!(r.kind, "mismatch");
    }

    #[test]
    fn a_stale_pinned_record_is_served_only_to_its_own_pod_before_the_sync() {
        // After a restart, before the list: the address's pinned record names the finished pod.
        let gone = pod("gone", UID_A, Some("secret-role"));
        let caller = attested(UID_B);
        let mut k = known(&caller, &[]);
        k.pinned = Some(&gone);
        k.synced = false;
        let r = rules(Mode::Prefer);
        assert_eq!(
            decide(&r, &k, unrestricted, no_account, false),
            Outcome::Wait
        );
        assert_eq!(
            refused(decide(&r, &k, unrestricted, no_account, true)).kind,
            "mismatch"
        );
        let own = attested(UID_A);
        let mine = Known { caller: &own, ..k };
        assert_eq!(
            served(decide(&r, &mine, unrestricted, no_account, false))
                .pod
                .uid,
            UID_A
        );
        // By address alone (attestation off, or no pod cgroups on the node) a pinned record is
        // never served: the pod list decides.
        for (mode, caller) in [
            (Mode::Off, Caller::NotChecked),
            (Mode::Prefer, Caller::NoPodCgroup { cgroup_id: 1 }),
        ] {
            let by_address = Known {
                caller: &caller,
                pods_attestable: false,
                ..k
            };
            let r = rules(mode);
            assert_eq!(
                decide(&r, &by_address, unrestricted, no_account, false),
                Outcome::Wait
            );
            let refusal = refused(decide(&r, &by_address, unrestricted, no_account, true));
            assert_eq!(refusal.status, 404, "{mode:?}: {}", refusal.body);
        }
    }

    #[test]
    fn unresolvable_cgroups_are_refused_in_every_mode_that_attests() {
        let owner = [pod("web", UID_A, Some("web"))];
        let caller = Caller::Unresolved { cgroup_id: 77 };
        for mode in [Mode::Prefer, Mode::Require] {
            let k = Known {
                pods_attestable: false,
                ..known(&caller, &owner)
            };
            let r = refused(decide(&rules(mode), &k, unrestricted, no_account, false));
            assert_eq!((r.status, r.kind), (403, "unresolved_cgroup"));
        }
    }

    #[test]
    fn a_tie_on_one_address_serves_each_pod_its_own_role() {
        // Two pods claim one address with the same creationTimestamp: the kernel decides.
        let both = [
            pod("first", UID_A, Some("role-a")),
            pod("second", UID_B, Some("role-b")),
        ];
        for (uid, role) in [(UID_A, "role-a"), (UID_B, "role-b")] {
            let caller = attested(uid);
            let d = served(decide(
                &rules(Mode::Require),
                &known(&caller, &both),
                unrestricted,
                no_account,
                false,
            ));
            assert!(d.role.as_str().ends_with(role), "{uid} got {}", d.role);
        }
    }

    #[test]
    fn unknown_addresses_wait_then_404() {
        let caller = attested(UID_A);
        let k = known(&caller, &[]);
        assert_eq!(identify(&rules(Mode::Prefer), &k, false), Outcome::Wait);
        let r = refused(identify(&rules(Mode::Prefer), &k, true));
        assert_eq!((r.status, r.kind), (404, "unknown_pod"));
        assert!(
            r.body.contains("198.51.100.2") && r.body.contains("node-a"),
            "{}",
            r.body
        );
    }

    #[test]
    fn connections_that_skipped_the_redirect_are_refused_at_once() {
        let owner = [pod("web", UID_A, Some("web"))];
        for mode in [Mode::Require, Mode::Prefer] {
            let r = refused(identify(
                &rules(mode),
                &known(&Caller::Unattested, &owner),
                false,
            ));
            assert_eq!((r.status, r.kind), (403, "unattested"));
        }
    }

    #[test]
    fn callers_outside_pod_cgroups_fall_back_to_the_address_only_where_no_pod_is_attestable() {
        let owner = [pod("web", UID_A, Some("web"))];
        let caller = Caller::NoPodCgroup { cgroup_id: 1 };
        // Where the pods of the node are in pod cgroups, a process outside them is no pod.
        let k = known(&caller, &owner);
        let r = refused(decide(
            &rules(Mode::Prefer),
            &k,
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!((r.status, r.kind), (403, "no_pod_cgroup"));
        // A cgroup-v1 node: the kernel can name no pod, the address decides under prefer...
        let v1 = Known {
            pods_attestable: false,
            ..k
        };
        let d = served(decide(
            &rules(Mode::Prefer),
            &v1,
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!(d.pod.uid, UID_A);
        // ...and never under require.
        let r = refused(decide(
            &rules(Mode::Require),
            &v1,
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!((r.status, r.kind), (403, "no_pod_cgroup"));
        assert!(r.body.contains("doctor"), "{}", r.body);
        let off = Caller::NotChecked;
        let d = served(decide(
            &rules(Mode::Off),
            &known(&off, &owner),
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!(d.pod.uid, UID_A);
    }

    #[test]
    fn host_network_pods_are_served_only_from_their_record() {
        let host = pod("node-exporter", UID_A, Some("metrics"));
        let caller = Caller::Pod {
            uid: UID_A.into(),
            host_netns: true,
        };
        let mut k = known(&caller, &[]);
        assert_eq!(identify(&rules(Mode::Prefer), &k, false), Outcome::Wait);
        assert_eq!(
            refused(identify(&rules(Mode::Prefer), &k, true)).kind,
            "host_pod_unknown"
        );
        k.host_pod = Some(&host);
        assert_eq!(
            served(decide(
                &rules(Mode::Prefer),
                &k,
                unrestricted,
                no_account,
                false
            ))
            .pod
            .uid,
            UID_A
        );
    }

    #[test]
    fn no_role_default_role_and_invalid_annotations() {
        let caller = Caller::NotChecked;
        let plain = [pod("plain", UID_A, None)];
        let r = refused(decide(
            &rules(Mode::Off),
            &known(&caller, &plain),
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!((r.status, r.kind), (404, "no_role"));
        let mut with_default = rules(Mode::Off);
        with_default.default_role = Some("fallback".into());
        let d = served(decide(
            &with_default,
            &known(&caller, &plain),
            unrestricted,
            no_account,
            false,
        ));
        assert!(d.role.as_str().ends_with("/fallback"));
        let bad = [pod("bad", UID_A, Some("arn:aws:s3:::bucket"))];
        let r = refused(decide(
            &rules(Mode::Off),
            &known(&caller, &bad),
            unrestricted,
            no_account,
            false,
        ));
        assert_eq!((r.status, r.kind), (403, "invalid_annotation"));
        assert!(matches!(r.event, Some((_, Reason::InvalidRoleAnnotation))));
    }

    #[test]
    fn namespace_restrictions_deny_and_wait_for_the_list() {
        let caller = Caller::NotChecked;
        let web = [pod("web", UID_A, Some("admin"))];
        let k = known(&caller, &web);
        let r = rules(Mode::Off);
        let allowed = AllowedRoles::compile(
            "shop",
            "iam.amazonaws.com/allowed-roles",
            r#"["web-*"]"#,
            PatternFormat::Glob,
        )
        .unwrap();
        let restricted = |_: &str| Namespace::Restricted(Ok(Arc::new(allowed.clone())));
        let denial = refused(decide(&r, &k, restricted, no_account, false));
        assert_eq!((denial.status, denial.kind), (403, "role_not_allowed"));
        assert!(matches!(denial.event, Some((_, Reason::RoleNotAllowed))));
        assert_eq!(
            decide(&r, &k, |_| Namespace::NotListed, no_account, false),
            Outcome::Wait
        );
        assert_eq!(
            refused(decide(&r, &k, |_| Namespace::NotListed, no_account, true)).kind,
            "namespaces_not_listed"
        );
        assert_eq!(
            refused(decide(
                &r,
                &k,
                |_| Namespace::NoAnnotation,
                no_account,
                false
            ))
            .status,
            403
        );
        assert_eq!(
            refused(decide(&r, &k, |_| Namespace::Unknown, no_account, false)).status,
            403
        );
        let web_role = [pod("web", UID_A, Some("web-frontend"))];
        assert!(matches!(
            decide(
                &r,
                &known(&caller, &web_role),
                restricted,
                no_account,
                false
            ),
            Outcome::Ok(_)
        ));
    }

    fn annotated(role: &str) -> AccountRole {
        AccountRole::Annotated {
            account: "default".into(),
            role: Annotation::Value(role.into()),
        }
    }

    #[test]
    fn service_account_roles_serve_unannotated_pods_and_the_pod_annotation_wins() {
        let r = rules(Mode::Off);
        let plain = pod("plain", UID_A, None);
        let d = served(role(
            &r,
            &plain,
            &Namespace::Unrestricted,
            &annotated("sa-role"),
            false,
        ));
        assert_eq!(d.role.as_str(), "arn:aws:iam::123456789012:role/sa-role");
        let own = pod("own", UID_A, Some("pod-role"));
        let d = served(role(
            &r,
            &own,
            &Namespace::Unrestricted,
            &annotated("sa-role"),
            false,
        ));
        assert!(
            d.role.as_str().ends_with("/pod-role"),
            "the pod annotation wins"
        );
        let none = refused(role(
            &r,
            &plain,
            &Namespace::Unrestricted,
            &AccountRole::None,
            true,
        ));
        assert_eq!((none.status, none.kind), (404, "no_role"));
        assert!(
            none.body
                .contains("service account default has no eks.amazonaws.com/role-arn"),
            "{}",
            none.body
        );
    }

    #[test]
    fn service_account_roles_wait_for_the_list_and_obey_namespace_restrictions() {
        let r = rules(Mode::Off);
        let plain = pod("plain", UID_A, None);
        assert_eq!(
            role(
                &r,
                &plain,
                &Namespace::Unrestricted,
                &AccountRole::NotListed,
                false
            ),
            Outcome::Wait
        );
        let late = refused(role(
            &r,
            &plain,
            &Namespace::Unrestricted,
            &AccountRole::NotListed,
            true,
        ));
        assert_eq!(
            (late.status, late.kind),
            (503, "service_accounts_not_listed")
        );
        let allowed = AllowedRoles::compile(
            "shop",
            "iam.amazonaws.com/allowed-roles",
            r#"["web-*"]"#,
            PatternFormat::Glob,
        )
        .unwrap();
        let restricted = Namespace::Restricted(Ok(Arc::new(allowed)));
        let denial = refused(role(&r, &plain, &restricted, &annotated("admin"), false));
        assert_eq!((denial.status, denial.kind), (403, "role_not_allowed"));
        assert!(
            denial
                .body
                .contains("from service account default's eks.amazonaws.com/role-arn"),
            "{}",
            denial.body
        );
        assert!(matches!(
            role(&r, &plain, &restricted, &annotated("web-api"), false),
            Outcome::Ok(_)
        ));
        let bad = refused(role(
            &r,
            &plain,
            &Namespace::Unrestricted,
            &annotated("arn:aws:s3:::bucket"),
            false,
        ));
        assert_eq!(bad.kind, "invalid_annotation");
        assert!(
            bad.body.contains("service account default annotation"),
            "{}",
            bad.body
        );
    }

    #[test]
    fn pods_with_the_webhooks_credentials_environment_are_left_to_it() {
        use crate::identity::WebhookCredentials;
        for (webhook, provider, env) in [
            (
                WebhookCredentials::WebIdentity,
                "left to IRSA, whose web-identity environment",
                "AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE",
            ),
            (
                WebhookCredentials::ContainerCredentials,
                "left to EKS Pod Identity, whose container-credentials environment",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            ),
        ] {
            let mut r = rules(Mode::Off);
            let mut left_pod = pod("left", UID_A, None);
            Arc::make_mut(&mut left_pod).account = Some(PodAccount {
                name: "default".into(),
                webhook: Some(webhook),
            });
            let left = refused(role(
                &r,
                &left_pod,
                &Namespace::Unrestricted,
                &annotated("sa-role"),
                false,
            ));
            assert_eq!((left.status, left.kind), (404, "no_role"), "{webhook:?}");
            assert!(
                left.body.contains(provider) && left.body.contains(env),
                "{}",
                left.body
            );
            Arc::make_mut(&mut left_pod).role = Annotation::Value("own".into());
            assert!(
                matches!(
                    role(
                        &r,
                        &left_pod,
                        &Namespace::Unrestricted,
                        &annotated("sa-role"),
                        false
                    ),
                    Outcome::Ok(_)
                ),
                "the pod's own annotation still wins ({webhook:?})"
            );
            Arc::make_mut(&mut left_pod).role = Annotation::Absent;
            r.default_role = Some("fallback".into());
            let d = served(role(
                &r,
                &left_pod,
                &Namespace::Unrestricted,
                &annotated("sa-role"),
                false,
            ));
            assert!(d.role.as_str().ends_with("/fallback"), "{webhook:?}");
        }
    }

    #[test]
    fn tagged_sessions_wait_for_a_record_that_names_the_service_account() {
        let mut r = rules(Mode::Off);
        r.needs_service_account = true;
        let mut pinned = pod("web", UID_A, Some("web"));
        Arc::make_mut(&mut pinned).account = None;
        assert_eq!(
            role(
                &r,
                &pinned,
                &Namespace::Unrestricted,
                &AccountRole::Off,
                false
            ),
            Outcome::Wait
        );
        let late = refused(role(
            &r,
            &pinned,
            &Namespace::Unrestricted,
            &AccountRole::Off,
            true,
        ));
        assert_eq!((late.status, late.kind), (503, "pod_not_listed"));
        assert!(late.body.contains("--session-tags"), "{}", late.body);
        let listed = pod("web", UID_A, Some("web"));
        assert!(matches!(
            role(
                &r,
                &listed,
                &Namespace::Unrestricted,
                &AccountRole::Off,
                false
            ),
            Outcome::Ok(_)
        ));
    }
}
