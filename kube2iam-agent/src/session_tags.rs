//! Session tags and source identity on the AssumeRole call, as EKS Pod Identity sets them, so
//! attribute-based policies written for Pod Identity (`aws:PrincipalTag/kubernetes-namespace`)
//! work unchanged and CloudTrail shows which pod acted.
//!
//! The tag keys are the six of the EKS User Guide's "Enable session tags" (`pod-id-abac.adoc`,
//! `#pod-id-abac-tags`; formerly "List of session tags added by EKS Pod Identity"). Which of
//! them are sent decides how sessions are shared: with the service-account scope only the
//! cluster, namespace and service account are tagged, and pods of one service account with one
//! role share a session; with the pod scope the pod's name and UID are tagged too, which makes
//! every session a pod's own.

use std::fmt;

use clap::{Args, ValueEnum};

use crate::{identity::PodIdentity, policy};

/// The tag keys, spelled as EKS Pod Identity spells them.
pub const EKS_CLUSTER_ARN: &str = "eks-cluster-arn";
pub const EKS_CLUSTER_NAME: &str = "eks-cluster-name";
pub const KUBERNETES_NAMESPACE: &str = "kubernetes-namespace";
pub const KUBERNETES_SERVICE_ACCOUNT: &str = "kubernetes-service-account";
pub const KUBERNETES_POD_NAME: &str = "kubernetes-pod-name";
pub const KUBERNETES_POD_UID: &str = "kubernetes-pod-uid";

/// STS limits on session tags (the STS API's `tagValueType`): characters, not bytes.
pub const MAX_TAG_VALUE: usize = 256;

/// Which session tags are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum TagScope {
    /// No session tags.
    #[default]
    Off,
    /// The cluster's ARN and name, the namespace and the service account: pods of one service
    /// account with one role share a session.
    ServiceAccount,
    /// All six tags EKS Pod Identity sets, the pod's name and UID included: one session per pod.
    Pod,
}

/// The flags (flattened into the run flags).
#[derive(Debug, Clone, Args)]
pub struct SessionTagArgs {
    /// Tag STS sessions as EKS Pod Identity does (eks-cluster-arn, eks-cluster-name,
    /// kubernetes-namespace, kubernetes-service-account, kubernetes-pod-name,
    /// kubernetes-pod-uid), all transitive. `pod` (also `--session-tags` alone) sends the six
    /// and makes every session a pod's own; `service-account` sends the first four and shares a
    /// session among the pods of one service account. The node's role then needs sts:TagSession
    /// on the roles besides sts:AssumeRole, in its permissions policy and in each role's trust
    /// policy.
    #[arg(
        long,
        env = "SESSION_TAGS",
        value_enum,
        default_value_t = TagScope::Off,
        num_args = 0..=1,
        default_missing_value = "pod"
    )]
    pub session_tags: TagScope,
    /// The cluster's ARN for the eks-cluster-arn tag
    /// (arn:aws:eks:<region>:<account>:cluster/<name>); its name is the eks-cluster-name tag
    /// unless --cluster-name says otherwise.
    #[arg(long, env = "CLUSTER_ARN")]
    pub cluster_arn: Option<String>,
    /// The cluster's name for the eks-cluster-name tag (default: from --cluster-arn).
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Set the STS source identity to `<namespace>.<pod>`: it shows in CloudTrail and stays
    /// with the session through role chaining. Makes every session a pod's own; the node's role
    /// then needs sts:SetSourceIdentity on the roles, in its permissions policy and in each role's
    /// trust policy.
    #[arg(
        long,
        env = "SOURCE_IDENTITY",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub source_identity: bool,
}

/// A bad session-tag setting, named with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "--session-tags needs the cluster for the eks-cluster-arn and eks-cluster-name tags: set \
         --cluster-arn (or at least --cluster-name)"
    )]
    NoCluster,
    #[error(
        "--cluster-arn {0:?} is not an EKS cluster ARN; expected \
         arn:<partition>:eks:<region>:<account>:cluster/<name>"
    )]
    ClusterArn(String),
    #[error("--cluster-name {name:?} and --cluster-arn {arn:?} name different clusters")]
    NameMismatch { name: String, arn: String },
    #[error("{flag} {value:?} cannot be a session tag value: {reason}")]
    TagValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

/// What one session carries besides the role: its tags, which of them are transitive, and its
/// source identity. Part of the credential cache key, so sessions with other tags never mix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionTags {
    /// (key, value), in the order sent.
    pub tags: Vec<(String, String)>,
    pub transitive_keys: Vec<String>,
    pub source_identity: Option<String>,
}

impl SessionTags {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.source_identity.is_none()
    }

    /// The permissions-only actions the node's role must be allowed on the role for this session
    /// besides sts:AssumeRole (in its own permissions policy and in the role's trust policy: IAM
    /// User Guide, "Permissions required to add session tags" and "Permissions required to set
    /// source identity"), with the flag that asks for each.
    pub fn required_actions(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if !self.tags.is_empty() {
            out.push(("sts:TagSession", "--session-tags"));
        }
        if self.source_identity.is_some() {
            out.push(("sts:SetSourceIdentity", "--source-identity"));
        }
        out
    }

    /// What to add to STS's refusal so the pod's answer names the fix.
    pub fn denial_hint(&self, role: &str) -> Option<String> {
        let actions = self.required_actions();
        if actions.is_empty() {
            return None;
        }
        let names: Vec<&str> = actions.iter().map(|(action, _)| *action).collect();
        let flags: Vec<&str> = actions.iter().map(|(_, flag)| *flag).collect();
        Some(format!(
            "this AssumeRole carried {} ({}): the node's role must be allowed {} on {role} \
             besides sts:AssumeRole: in the trust policy of {role} and in the node role's \
             permissions policy",
            if names.len() == 1 && names[0] == "sts:TagSession" {
                "session tags"
            } else if names.len() == 1 {
                "a source identity"
            } else {
                "session tags and a source identity"
            },
            flags.join(", "),
            names.join(" and ")
        ))
    }
}

/// The cluster, as the tags name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub arn: Option<String>,
    pub name: String,
}

/// The validated settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTagging {
    pub scope: TagScope,
    pub cluster: Option<Cluster>,
    pub source_identity: bool,
}

/// Why a session's tags cannot be made yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The pod's record has no service account (a record pinned by a previous agent, before the
    /// pod list is back).
    ServiceAccount,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::ServiceAccount => f.write_str("the pod's service account"),
        }
    }
}

/// Checks a value against STS's tag value rules: at most 256 characters matching
/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]*` (the STS API's `tagValueType`). Approximately that pattern:
/// Rust's alphanumeric is Unicode's Alphabetic (letters, plus some combining marks) or Numeric,
/// and its whitespace without the control characters (tab, newline, ...) is the separators.
pub fn check_tag_value(value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars > MAX_TAG_VALUE {
        return Err(format!(
            "{chars} characters, STS allows at most {MAX_TAG_VALUE}"
        ));
    }
    let allowed = "letters, digits, spaces and _.:/=+-@ are";
    match value.chars().find(|c| {
        !(c.is_alphanumeric() || (c.is_whitespace() && !c.is_control()) || "_.:/=+-@".contains(*c))
    }) {
        Some(c) if c.is_control() => Err(format!(
            "{c:?} is a control character, which STS refuses ({allowed})"
        )),
        Some(c) => Err(format!("{c:?} is not allowed ({allowed})")),
        None => Ok(()),
    }
}

/// The cluster name in an EKS cluster ARN, `arn:<partition>:eks:<region>:<account>:cluster/<name>`.
pub fn cluster_name_of(arn: &str) -> Option<&str> {
    let rest = arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let (partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let name = resource.strip_prefix("cluster/")?;
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (policy::PARTITIONS.contains(&partition)
        && service == "eks"
        && !region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && valid_name)
        .then_some(name)
}

impl SessionTagging {
    pub fn from_args(args: &SessionTagArgs) -> Result<SessionTagging, Error> {
        // Surrounding whitespace (a value read from a file with its newline) is dropped; what
        // is left is checked as the tag value it becomes before anything else, so a control
        // character inside (a tab, a newline), which STS would refuse on every AssumeRole,
        // stops the start with the flag named.
        fn tag_value<'a>(
            flag: &'static str,
            value: Option<&'a str>,
        ) -> Result<Option<&'a str>, Error> {
            let value = value.map(str::trim).filter(|v| !v.is_empty());
            if let Some(value) = value {
                check_tag_value(value).map_err(|reason| Error::TagValue {
                    flag,
                    value: value.into(),
                    reason,
                })?;
            }
            Ok(value)
        }
        let arn = match tag_value("--cluster-arn", args.cluster_arn.as_deref())? {
            Some(arn) => {
                let name = cluster_name_of(arn).ok_or_else(|| Error::ClusterArn(arn.into()))?;
                Some((arn.to_owned(), name.to_owned()))
            }
            None => None,
        };
        let name = tag_value("--cluster-name", args.cluster_name.as_deref())?;
        let cluster = match (arn, name) {
            (Some((arn, from_arn)), Some(name)) if name != from_arn => {
                return Err(Error::NameMismatch {
                    name: name.into(),
                    arn,
                });
            }
            (Some((arn, name)), _) => Some(Cluster {
                arn: Some(arn),
                name,
            }),
            (None, Some(name)) => Some(Cluster {
                arn: None,
                name: name.into(),
            }),
            (None, None) => None,
        };
        if args.session_tags != TagScope::Off && cluster.is_none() {
            return Err(Error::NoCluster);
        }
        Ok(SessionTagging {
            scope: args.session_tags,
            cluster,
            source_identity: args.source_identity,
        })
    }

    /// Whether anything is added to the AssumeRole call.
    pub fn enabled(&self) -> bool {
        self.scope != TagScope::Off || self.source_identity
    }

    /// Whether the pod's service account must be known to make its session.
    pub fn needs_service_account(&self) -> bool {
        self.scope != TagScope::Off
    }

    /// Whether every session is one pod's: it carries the pod's name, UID or source identity.
    pub fn per_pod(&self) -> bool {
        self.scope == TagScope::Pod || self.source_identity
    }

    /// The session's tags and source identity for `pod`.
    pub fn for_pod(&self, pod: &PodIdentity) -> Result<SessionTags, Missing> {
        let mut out = SessionTags::default();
        if self.scope != TagScope::Off {
            let account = pod.account.as_ref().ok_or(Missing::ServiceAccount)?;
            let mut push = |key: &str, value: &str| {
                out.tags.push((key.to_owned(), value.to_owned()));
                // Transitive, as EKS Pod Identity sets them: policies in other accounts see them
                // after role chaining, and a chained session cannot set these keys to other
                // values (STS refuses an AssumeRole that passes a key an incoming transitive tag
                // already has).
                out.transitive_keys.push(key.to_owned());
            };
            if let Some(cluster) = &self.cluster {
                if let Some(arn) = &cluster.arn {
                    push(EKS_CLUSTER_ARN, arn);
                }
                push(EKS_CLUSTER_NAME, &cluster.name);
            }
            push(KUBERNETES_NAMESPACE, &pod.namespace);
            push(KUBERNETES_SERVICE_ACCOUNT, &account.name);
            if self.scope == TagScope::Pod {
                push(KUBERNETES_POD_NAME, &pod.name);
                push(KUBERNETES_POD_UID, &pod.uid);
            }
        }
        if self.source_identity {
            out.source_identity = Some(source_identity(&pod.namespace, &pod.name));
        }
        Ok(out)
    }
}

/// The source identity of a pod: `<namespace>.<pod>` under STS's rules for it (`[\w+=,.@-]`,
/// 2 to 64 characters; longer names end in a hash of the full name, as session names do). A
/// namespace has no dot, so the first one separates the two.
pub fn source_identity(namespace: &str, pod: &str) -> String {
    policy::pod_session_name(namespace, pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Annotation, PodAccount};

    const ARN: &str = "arn:aws:eks:eu-west-1:123456789012:cluster/prod-1";

    fn args(scope: TagScope, arn: Option<&str>, name: Option<&str>) -> SessionTagArgs {
        SessionTagArgs {
            session_tags: scope,
            cluster_arn: arn.map(Into::into),
            cluster_name: name.map(Into::into),
            source_identity: false,
        }
    }

    fn pod(account: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: "web-7d4b9".into(),
            uid: "aaaaaaaa-0000-4000-8000-000000000001".into(),
            created_ms: 1,
            role: Annotation::Absent,
            external_id: Annotation::Absent,
            account: account.map(|name| PodAccount {
                name: name.into(),
                webhook: None,
            }),
        }
    }

    fn keys(tags: &SessionTags) -> Vec<&str> {
        tags.tags.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn the_pod_scope_sends_the_six_eks_pod_identity_tags_all_transitive() {
        let tagging = SessionTagging::from_args(&args(TagScope::Pod, Some(ARN), None)).unwrap();
        let tags = tagging.for_pod(&pod(Some("billing"))).unwrap();
        assert_eq!(
            tags.tags,
            [
                (EKS_CLUSTER_ARN, ARN),
                (EKS_CLUSTER_NAME, "prod-1"),
                (KUBERNETES_NAMESPACE, "shop"),
                (KUBERNETES_SERVICE_ACCOUNT, "billing"),
                (KUBERNETES_POD_NAME, "web-7d4b9"),
                (KUBERNETES_POD_UID, "aaaaaaaa-0000-4000-8000-000000000001"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(tags.transitive_keys, keys(&tags));
        assert_eq!(tags.source_identity, None);
        assert!(tagging.per_pod());
        for (_, value) in &tags.tags {
            check_tag_value(value).unwrap();
        }
    }

    #[test]
    fn the_service_account_scope_leaves_the_pod_out_and_shares_sessions() {
        let tagging =
            SessionTagging::from_args(&args(TagScope::ServiceAccount, Some(ARN), None)).unwrap();
        assert!(!tagging.per_pod());
        let a = tagging.for_pod(&pod(Some("billing"))).unwrap();
        let mut other_pod = pod(Some("billing"));
        other_pod.name = "web-other".into();
        other_pod.uid = "bbbbbbbb-0000-4000-8000-000000000002".into();
        assert_eq!(
            a,
            tagging.for_pod(&other_pod).unwrap(),
            "one session for the service account"
        );
        assert_eq!(
            keys(&a),
            [
                EKS_CLUSTER_ARN,
                EKS_CLUSTER_NAME,
                KUBERNETES_NAMESPACE,
                KUBERNETES_SERVICE_ACCOUNT
            ]
        );
        assert_ne!(a, tagging.for_pod(&pod(Some("reports"))).unwrap());
        assert_eq!(
            tagging.for_pod(&pod(None)),
            Err(Missing::ServiceAccount),
            "a pinned record without its service account cannot be tagged"
        );
    }

    #[test]
    fn source_identity_alone_tags_nothing_and_follows_sts_rules() {
        let mut a = args(TagScope::Off, None, None);
        a.source_identity = true;
        let tagging = SessionTagging::from_args(&a).unwrap();
        assert!(tagging.enabled() && tagging.per_pod() && !tagging.needs_service_account());
        let tags = tagging.for_pod(&pod(None)).unwrap();
        assert!(tags.tags.is_empty());
        assert_eq!(tags.source_identity.as_deref(), Some("shop.web-7d4b9"));
        assert_eq!(
            tags.required_actions(),
            [("sts:SetSourceIdentity", "--source-identity")]
        );
        let long = source_identity(&"n".repeat(63), &"p".repeat(253));
        assert_eq!(long.len(), 64);
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        );
    }

    #[test]
    fn no_pod_can_take_a_long_named_pods_source_identity() {
        // A CronJob's pod: `<namespace>.<pod>` is over 64 characters, so its tail is hashed.
        let victim = source_identity(
            "team-a",
            "nightly-billing-report-exporter-to-warehouse-29384756-x7k2q",
        );
        assert_eq!(victim.len(), 64);
        // Another pod of the namespace named after the victim's source identity, as far as a
        // pod name (a DNS subdomain) can spell it: short enough to be sent as it is.
        let named_after: String = victim
            .strip_prefix("team-a.")
            .unwrap()
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        assert_ne!(
            source_identity("team-a", &named_after),
            victim,
            "a name that is not cut never looks like a cut one"
        );
        // A pod name chosen so that the 32-bit FNV-1a hash of `team-a.<name>` equals the
        // victim's (found by meet-in-the-middle in seconds): the hash must resist that.
        assert_ne!(
            source_identity(
                "team-a",
                "nightly-billing-report-exporter-to-warehouse-293zzpnxyad91"
            ),
            victim,
            "the hash of a cut name resists chosen collisions"
        );
    }

    #[test]
    fn cluster_flags_are_checked() {
        assert_eq!(
            SessionTagging::from_args(&args(TagScope::Pod, None, None)),
            Err(Error::NoCluster)
        );
        for bad in [
            "arn:aws:eks:eu-west-1:123456789012:nodegroup/x",
            "arn:aws:iam::123456789012:cluster/x",
            "arn:aws:eks:eu-west-1:12345:cluster/x",
            "arn:aws:eks::123456789012:cluster/x",
            "arn:aws:eks:eu-west-1:123456789012:cluster/-x",
            "prod-1",
        ] {
            assert_eq!(
                SessionTagging::from_args(&args(TagScope::Pod, Some(bad), None)),
                Err(Error::ClusterArn(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            SessionTagging::from_args(&args(TagScope::Pod, Some(ARN), Some("other"))),
            Err(Error::NameMismatch { .. })
        ));
        let by_name =
            SessionTagging::from_args(&args(TagScope::Pod, None, Some("on-prem"))).unwrap();
        let tags = by_name.for_pod(&pod(Some("default"))).unwrap();
        assert_eq!(tags.tags[0], (EKS_CLUSTER_NAME.into(), "on-prem".into()));
        assert!(matches!(
            SessionTagging::from_args(&args(TagScope::Pod, None, Some("a,b"))),
            Err(Error::TagValue { .. })
        ));
        let off = SessionTagging::from_args(&args(TagScope::Off, None, None)).unwrap();
        assert!(!off.enabled());
        assert!(off.for_pod(&pod(None)).unwrap().is_empty());
    }

    #[test]
    fn denials_name_the_actions_the_trust_policy_lacks() {
        let tagging = SessionTagging::from_args(&SessionTagArgs {
            session_tags: TagScope::Pod,
            cluster_arn: Some(ARN.into()),
            cluster_name: None,
            source_identity: true,
        })
        .unwrap();
        let tags = tagging.for_pod(&pod(Some("default"))).unwrap();
        let hint = tags
            .denial_hint("arn:aws:iam::123456789012:role/web")
            .unwrap();
        // Both policies are named: STS checks the node role's permissions policy as well as
        // the role's trust policy for the permissions-only actions.
        assert_eq!(
            hint,
            "this AssumeRole carried session tags and a source identity (--session-tags, \
             --source-identity): the node's role must be allowed sts:TagSession and \
             sts:SetSourceIdentity on arn:aws:iam::123456789012:role/web besides \
             sts:AssumeRole: in the trust policy of arn:aws:iam::123456789012:role/web and in \
             the node role's permissions policy"
        );
        assert_eq!(SessionTags::default().denial_hint("r"), None);
    }

    #[test]
    fn tag_values_follow_sts_rules() {
        assert!(check_tag_value("arn:aws:eks:us-east-1:123456789012:cluster/a_b").is_ok());
        assert!(check_tag_value("kube-system").is_ok());
        assert!(check_tag_value("a,b").is_err());
        // STS counts characters: 256 letters of two bytes each are allowed, 257 are not.
        assert!(check_tag_value(&"x".repeat(256)).is_ok());
        assert_eq!(
            check_tag_value(&"é".repeat(256)),
            Ok(()),
            "512 bytes, 256 characters"
        );
        let long = check_tag_value(&"é".repeat(257)).unwrap_err();
        assert!(long.contains("257 characters"), "{long}");
        // Letters, digits and separators of any script (\p{L}, \p{N}, \p{Z}).
        assert!(check_tag_value("équipe 東京 ٣\u{a0}x\u{2028}y").is_ok());
        // White space that is a control character is not a separator: STS refuses it.
        for control in ["a\tb", "a\nb", "a\rb", "a\u{b}b", "a\u{85}b", "a\u{0}b"] {
            let err = check_tag_value(control).unwrap_err();
            assert!(err.contains("is a control character"), "{control:?}: {err}");
        }
    }

    #[test]
    fn control_characters_in_the_cluster_flags_stop_the_start() {
        for (arn, name, flag) in [
            (
                Some("arn:aws:eks:eu\twest-1:123456789012:cluster/prod-1"),
                None,
                "--cluster-arn",
            ),
            (
                Some("arn:aws:eks:eu-west-1:123456789012:cluster/prod\n1"),
                None,
                "--cluster-arn",
            ),
            (None, Some("prod\t1"), "--cluster-name"),
            (None, Some("prod\n1"), "--cluster-name"),
            (Some(ARN), Some("prod-1\n2"), "--cluster-name"),
        ] {
            let err = SessionTagging::from_args(&args(TagScope::Pod, arn, name)).unwrap_err();
            assert!(
                matches!(&err, Error::TagValue { flag: f, .. } if *f == flag),
                "{arn:?} {name:?}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.starts_with(flag) && message.contains("is a control character"),
                "{message}"
            );
        }
        // A trailing newline (a value read from a file) is not part of the value.
        let trimmed = SessionTagging::from_args(&args(
            TagScope::Pod,
            Some(&format!("{ARN}\n")),
            Some("prod-1\n"),
        ))
        .unwrap();
        assert_eq!(
            trimmed.cluster,
            Some(Cluster {
                arn: Some(ARN.into()),
                name: "prod-1".into()
            })
        );
    }
}
