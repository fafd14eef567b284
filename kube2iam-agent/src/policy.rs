//! Which role a pod gets, as pure functions: annotation → role ARN, default role, namespace
//! restrictions, STS session names. Every refusal names the pod or namespace and the fix.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
};

use regex::Regex;

/// AWS partitions whose IAM ARNs we accept.
pub const PARTITIONS: [&str; 3] = ["aws", "aws-cn", "aws-us-gov"];
/// IAM limits: role name ≤ 64, path ≤ 512 (including its slashes).
pub const MAX_ROLE_NAME: usize = 64;
pub const MAX_ROLE_PATH: usize = 512;
/// STS ExternalId length limits.
pub const MIN_EXTERNAL_ID: usize = 2;
pub const MAX_EXTERNAL_ID: usize = 1224;
/// STS RoleSessionName limits.
pub const MAX_SESSION_NAME: usize = 64;

/// A validated IAM role ARN: `arn:<partition>:iam::<account>:role/<path/><name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    /// Shared: a decision, its cache key and its log line each hold the ARN.
    arn: Arc<str>,
    /// Byte offset of `<path/><name>` (after `:role/`).
    resource: usize,
    /// Byte offset of `<name>`.
    name: usize,
}

impl RoleArn {
    /// Parses and validates a full role ARN.
    pub fn parse(value: &str) -> Result<RoleArn, RoleError> {
        let invalid = |reason: &str| RoleError::InvalidArn {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = value
            .strip_prefix("arn:")
            .ok_or_else(|| invalid("an ARN starts with arn:"))?;
        let mut parts = rest.splitn(5, ':');
        let (partition, service, region, account, resource) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts
                .next()
                .ok_or_else(|| invalid("expected arn:<partition>:iam::<account>:role/<name>"))?,
        );
        if !PARTITIONS.contains(&partition) {
            return Err(invalid("the partition must be aws, aws-cn or aws-us-gov"));
        }
        if service != "iam" {
            return Err(invalid("the service must be iam"));
        }
        if !region.is_empty() {
            return Err(invalid(
                "IAM ARNs have an empty region field (arn:aws:iam::…)",
            ));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the account must be 12 digits"));
        }
        let path_and_name = resource
            .strip_prefix("role/")
            .ok_or_else(|| invalid("the resource must be role/<name>"))?;
        validate_path_and_name(path_and_name).map_err(|reason| invalid(&reason))?;
        let resource_at = value.len() - path_and_name.len();
        let name_at = resource_at + path_and_name.rfind('/').map_or(0, |i| i + 1);
        Ok(RoleArn {
            arn: Arc::from(value),
            resource: resource_at,
            name: name_at,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The ARN, shared rather than copied.
    pub fn shared(&self) -> Arc<str> {
        self.arn.clone()
    }

    /// `<path/><name>`, what kube2iam calls the role when it is in the base account.
    pub fn path_and_name(&self) -> &str {
        &self.arn[self.resource..]
    }

    pub fn name(&self) -> &str {
        &self.arn[self.name..]
    }

    /// `arn:<partition>:iam::<account>:role/`.
    pub fn prefix(&self) -> &str {
        &self.arn[..self.resource]
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

fn validate_path_and_name(path_and_name: &str) -> Result<(), String> {
    let (path, name) = match path_and_name.rfind('/') {
        Some(i) => (&path_and_name[..=i], &path_and_name[i + 1..]),
        None => ("", path_and_name),
    };
    if name.is_empty() {
        return Err("the role name is empty".into());
    }
    if name.len() > MAX_ROLE_NAME {
        return Err(format!(
            "the role name is {} characters; IAM allows at most {MAX_ROLE_NAME}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "the role name contains {c:?}; IAM allows letters, digits and +=,.@_-"
        ));
    }
    // The IAM path includes its leading slash, which the ARN omits.
    if path.len() + 1 > MAX_ROLE_PATH {
        return Err(format!(
            "the role path is {} characters; IAM allows at most {MAX_ROLE_PATH}",
            path.len() + 1
        ));
    }
    if path.split('/').rev().skip(1).any(str::is_empty) {
        return Err("the role path has an empty segment (//)".into());
    }
    if let Some(c) = path.chars().find(|c| !('\u{21}'..='\u{7e}').contains(c)) {
        return Err(format!(
            "the role path contains {c:?}; IAM allows printable ASCII"
        ));
    }
    Ok(())
}

/// The base ARN role names are resolved against: `arn:<partition>:iam::<account>:role/<path/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn(String);

impl BaseArn {
    /// Accepts `arn:aws:iam::123456789012:role/` (trailing slash optional) with an optional path.
    pub fn parse(value: &str) -> Result<BaseArn, RoleError> {
        let with_slash = if value.ends_with('/') {
            value.to_owned()
        } else {
            format!("{value}/")
        };
        // Validate by appending a name: the rest must be a valid role ARN.
        RoleArn::parse(&format!("{with_slash}x")).map_err(|e| match e {
            RoleError::InvalidArn { reason, .. } => RoleError::InvalidBaseArn {
                value: value.to_owned(),
                reason,
            },
            other => other,
        })?;
        Ok(BaseArn(with_slash))
    }

    /// The base from an instance profile ARN (IMDS `iam/info` `InstanceProfileArn`):
    /// `arn:aws:iam::123456789012:instance-profile/…` → `arn:aws:iam::123456789012:role/`.
    pub fn from_instance_profile(arn: &str) -> Result<BaseArn, RoleError> {
        let invalid = || RoleError::InvalidBaseArn {
            value: arn.to_owned(),
            reason: "expected arn:<partition>:iam::<account>:instance-profile/<name>".into(),
        };
        let (prefix, _) = arn.split_once(":instance-profile/").ok_or_else(invalid)?;
        BaseArn::parse(&format!("{prefix}:role/")).map_err(|_| invalid())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a role value was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("{value:?} is not a valid IAM role ARN: {reason}")]
    InvalidArn { value: String, reason: String },
    #[error("{value:?} is not a valid role name: {reason}")]
    InvalidName { value: String, reason: String },
    #[error(
        "{value:?} is a role name, but the agent has no base ARN to complete it; set \
         --base-role-arn (or --auto-discover-base-arn) or annotate a full role ARN"
    )]
    NoBaseArn { value: String },
    #[error("--base-role-arn {value:?} is invalid: {reason}")]
    InvalidBaseArn { value: String, reason: String },
}

/// Turns an annotation value (name, `path/name` or full ARN) into a role ARN.
pub fn resolve_role(value: &str, base: Option<&BaseArn>) -> Result<RoleArn, RoleError> {
    let value = value.trim();
    if value.starts_with("arn:") {
        return RoleArn::parse(value);
    }
    // kube2iam users sometimes write the IAM path with its leading slash.
    let relative = value.strip_prefix('/').unwrap_or(value);
    if relative.is_empty() {
        return Err(RoleError::InvalidName {
            value: value.to_owned(),
            reason: "it is empty".into(),
        });
    }
    validate_path_and_name(relative).map_err(|reason| RoleError::InvalidName {
        value: value.to_owned(),
        reason,
    })?;
    let base = base.ok_or_else(|| RoleError::NoBaseArn {
        value: value.to_owned(),
    })?;
    RoleArn::parse(&format!("{}{relative}", base.as_str()))
}

/// [`resolve_role`] with a memory of the values it resolved: a request for a pod's role then
/// costs a lookup, not a parse and two copies. Only roles are remembered (refusals are rare and
/// are made afresh), each against the base ARN it was resolved with: a different base forgets
/// them all. At most [`RoleResolver::REMEMBERED`] values; past that it starts over.
#[derive(Debug, Default)]
pub struct RoleResolver {
    memo: RwLock<Resolved>,
}

#[derive(Debug, Default)]
struct Resolved {
    base: Option<BaseArn>,
    roles: HashMap<Box<str>, RoleArn>,
}

impl RoleResolver {
    pub const REMEMBERED: usize = 1024;

    pub fn resolve(&self, value: &str, base: Option<&BaseArn>) -> Result<RoleArn, RoleError> {
        {
            let memo = self.memo.read().unwrap_or_else(|p| p.into_inner());
            if memo.base.as_ref() == base
                && let Some(role) = memo.roles.get(value)
            {
                return Ok(role.clone());
            }
        }
        let role = resolve_role(value, base)?;
        let mut memo = self.memo.write().unwrap_or_else(|p| p.into_inner());
        if memo.base.as_ref() != base || memo.roles.len() >= Self::REMEMBERED {
            memo.roles.clear();
            memo.base = base.cloned();
        }
        memo.roles.insert(value.into(), role.clone());
        Ok(role)
    }
}

/// A clone starts with nothing remembered.
impl Clone for RoleResolver {
    fn clone(&self) -> Self {
        RoleResolver::default()
    }
}

/// The name a client asks for after listing `security-credentials/`: the path and name when the
/// role is in the base account (as kube2iam answers), the full ARN otherwise.
pub fn listed_name<'a>(role: &'a RoleArn, base: Option<&BaseArn>) -> &'a str {
    match base {
        Some(base) if role.as_str().starts_with(base.as_str()) => {
            &role.as_str()[base.as_str().len()..]
        }
        _ => role.as_str(),
    }
}

/// Validates an external-ID annotation.
pub fn validate_external_id(value: &str) -> Result<&str, String> {
    let len = value.chars().count();
    if !(MIN_EXTERNAL_ID..=MAX_EXTERNAL_ID).contains(&len) {
        return Err(format!(
            "external ID {value:?} has {len} characters; STS needs {MIN_EXTERNAL_ID} to {MAX_EXTERNAL_ID}"
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+=,.@:/_-".contains(*c)))
    {
        return Err(format!(
            "external ID {value:?} contains {c:?}; STS allows letters, digits and +=,.@:/_-"
        ));
    }
    Ok(value)
}

/// How namespace allowed-role patterns are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PatternFormat {
    /// `*`, `?`, `[abc]`, `{a,b}`; `*` also matches `/`.
    #[default]
    Glob,
    /// Rust regular expressions, anchored at both ends (kube2iam's were not).
    Regexp,
}

/// One compiled allowed-role pattern. Patterns that start with `arn:` match the full role ARN;
/// others match what follows the base ARN, so only roles under it (in its account), and nothing
/// when there is no base ARN.
#[derive(Debug, Clone)]
struct Pattern {
    source: String,
    full_arn: bool,
    regex: Regex,
}

/// The compiled size one allowed-role pattern may reach (the regex crate's unit).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Allowed-role patterns one namespace may list. Each is compiled when the namespace changes,
/// so this bounds the work one annotation (up to 256 KiB) can cause; globs and regexps cover
/// many roles in one pattern.
pub const MAX_ALLOWED_PATTERNS: usize = 256;

/// A namespace's allowed roles, compiled from its annotation.
#[derive(Debug, Clone)]
pub struct AllowedRoles {
    patterns: Vec<Pattern>,
}

/// Why a namespace annotation could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error(
        "namespace {namespace}: annotation {key} must be a JSON array of strings, like \
         [\"web-*\"]: {reason}"
    )]
    BadJson {
        namespace: String,
        key: String,
        reason: String,
    },
    #[error(
        "namespace {namespace}: annotation {key} lists {count} allowed-role patterns; at most \
         {MAX_ALLOWED_PATTERNS} are accepted (one glob or regexp can cover many roles)"
    )]
    TooManyPatterns {
        namespace: String,
        key: String,
        count: usize,
    },
    #[error("namespace {namespace}: allowed-role pattern {pattern:?} does not compile: {reason}")]
    BadPattern {
        namespace: String,
        pattern: String,
        reason: String,
    },
}

/// Translates a glob into an anchored regular expression.
pub fn glob_to_regex(glob: &str) -> Result<String, String> {
    let mut out = String::from("^(?:");
    let mut chars = glob.chars().peekable();
    let mut braces = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                let mut class = String::from("[");
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == ']' {
                        closed = true;
                        break;
                    }
                    if c == '\\' || c == '[' || c == '^' {
                        class.push('\\');
                    }
                    class.push(c);
                }
                if !closed {
                    return Err("unclosed [".into());
                }
                class.push(']');
                out.push_str(&class);
            }
            '{' => {
                braces += 1;
                out.push_str("(?:");
            }
            ',' if braces > 0 => out.push('|'),
            '}' if braces > 0 => {
                braces -= 1;
                out.push(')');
            }
            '\\' => match chars.next() {
                Some(next) => out.push_str(&regex::escape(&next.to_string())),
                None => return Err("trailing \\".into()),
            },
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    if braces > 0 {
        return Err("unclosed {".into());
    }
    out.push_str(")$");
    Ok(out)
}

impl AllowedRoles {
    /// Compiles a namespace's annotation value.
    pub fn compile(
        namespace: &str,
        key: &str,
        annotation: &str,
        format: PatternFormat,
    ) -> Result<AllowedRoles, NamespaceError> {
        let sources: Vec<String> =
            serde_json::from_str(annotation).map_err(|e| NamespaceError::BadJson {
                namespace: namespace.to_owned(),
                key: key.to_owned(),
                reason: e.to_string(),
            })?;
        if sources.len() > MAX_ALLOWED_PATTERNS {
            return Err(NamespaceError::TooManyPatterns {
                namespace: namespace.to_owned(),
                key: key.to_owned(),
                count: sources.len(),
            });
        }
        let patterns = sources
            .into_iter()
            .map(|source| {
                let bad = |reason: String| NamespaceError::BadPattern {
                    namespace: namespace.to_owned(),
                    pattern: source.clone(),
                    reason,
                };
                let build = |expr: &str| {
                    regex::RegexBuilder::new(expr)
                        .size_limit(PATTERN_SIZE_LIMIT)
                        .build()
                        .map_err(|e| bad(e.to_string()))
                };
                let expr = match format {
                    PatternFormat::Glob => glob_to_regex(&source).map_err(bad)?,
                    PatternFormat::Regexp => {
                        // It must be a regex on its own: `a)|(b` would close the anchoring
                        // group early and leave `^(?:a)|(b)$`, which matches any prefix `a`.
                        build(&source)?;
                        format!("^(?:{source})$")
                    }
                };
                let regex = build(&expr)?;
                Ok(Pattern {
                    full_arn: source.starts_with("arn:"),
                    source,
                    regex,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedRoles { patterns })
    }

    /// Whether the role is allowed. A pattern that starts with `arn:` matches the full role ARN.
    /// Any other pattern names roles relative to the base ARN: it matches the part of the role
    /// ARN after the base, and only roles under the base (in its account). Without a base ARN
    /// such a pattern allows no role: it names no account, and `["app-*"]` must not allow
    /// `app-admin` in every account.
    pub fn allows(&self, role: &RoleArn, base: Option<&BaseArn>) -> bool {
        self.patterns.iter().any(|p| {
            if p.full_arn {
                p.regex.is_match(role.as_str())
            } else {
                base.and_then(|b| role.as_str().strip_prefix(b.as_str()))
                    .is_some_and(|subject| p.regex.is_match(subject))
            }
        })
    }

    /// The patterns that can allow nothing because they are relative (no `arn:` prefix) and
    /// there is no base ARN to bind them to an account: for messages and warnings.
    pub fn unbound_patterns(&self, base: Option<&BaseArn>) -> Vec<&str> {
        if base.is_some() {
            return Vec::new();
        }
        self.patterns
            .iter()
            .filter(|p| !p.full_arn)
            .map(|p| p.source.as_str())
            .collect()
    }

    /// The patterns as written, for error messages.
    pub fn sources(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.source.as_str()).collect()
    }
}

/// Sanitizes a string to STS RoleSessionName rules (`[\w+=,.@-]{2,64}`).
pub fn session_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| if is_name_char(c) { c } else { '-' })
        .collect();
    if name.len() > MAX_SESSION_NAME {
        // Keep it unique, also against a pod that picks its name to take another's: 64 bits of
        // SHA-256 of the full value replace the cut tail (a 32-bit FNV hash was matched by a
        // chosen name in seconds), after a `_`, which no Kubernetes name has, so no name that
        // is sent uncut can spell a cut one.
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(raw.as_bytes());
        name.truncate(MAX_SESSION_NAME - 17);
        name.push('_');
        for byte in &digest[..8] {
            name.push_str(&format!("{byte:02x}"));
        }
    }
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// The node-wide session name, `kube2iam-<node>`.
pub fn node_session_name(node: &str) -> String {
    session_name(&format!("kube2iam-{node}"))
}

/// The per-pod session name, `<namespace>.<pod>`, for CloudTrail attribution.
pub fn pod_session_name(namespace: &str, pod: &str) -> String {
    session_name(&format!("{namespace}.{pod}"))
}

/// kube2iam's session name (iam/iam.go, `sessionName`): the 32-bit FNV-1a hash of the pod's
/// address in hex, `-`, the role's name (the ARN after its last `/`), cut to 64 characters.
pub fn kube2iam_session_name(pod_ip: std::net::IpAddr, role: &RoleArn) -> String {
    let hash = pod_ip.to_string().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{hash:x}-{}", role.name())
        .chars()
        .take(MAX_SESSION_NAME)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()
    }

    #[test]
    fn the_resolver_answers_as_resolve_role_for_each_base() {
        let resolver = RoleResolver::default();
        let other = BaseArn::parse("arn:aws:iam::210987654321:role/").unwrap();
        let values = [
            "web",
            "/team/web",
            "arn:aws:iam::123456789012:role/db",
            "",
            "a b",
            "web",
        ];
        // Twice each, against two bases in turn: the memory must never answer for the other.
        for _ in 0..2 {
            for base in [Some(&base()), Some(&other), None] {
                for value in values {
                    assert_eq!(
                        resolver.resolve(value, base),
                        resolve_role(value, base),
                        "{value:?} against {base:?}"
                    );
                }
            }
        }
        let remembered = |r: &RoleResolver| r.memo.read().unwrap().roles.len();
        resolver.resolve("web", Some(&base())).unwrap();
        assert_eq!(remembered(&resolver), 1, "a new base starts over");
        assert_eq!(
            remembered(&resolver.clone()),
            0,
            "a clone remembers nothing"
        );
        for i in 0..RoleResolver::REMEMBERED + 5 {
            let name = format!("role-{i}");
            assert_eq!(resolver.resolve(&name, Some(&base())).unwrap().name(), name);
        }
        assert!(remembered(&resolver) <= RoleResolver::REMEMBERED);
    }

    #[test]
    fn full_arns_pass_through_in_every_partition() {
        for partition in PARTITIONS {
            let arn = format!("arn:{partition}:iam::123456789012:role/web");
            let role = resolve_role(&arn, None).unwrap();
            assert_eq!(role.as_str(), arn);
            assert_eq!(role.name(), "web");
        }
        let role =
            resolve_role("arn:aws:iam::210987654321:role/team/a/web", Some(&base())).unwrap();
        assert_eq!(role.path_and_name(), "team/a/web");
        assert_eq!(role.name(), "web");
        assert_eq!(role.prefix(), "arn:aws:iam::210987654321:role/");
    }

    #[test]
    fn names_and_paths_use_the_base_arn() {
        let role = resolve_role("web", Some(&base())).unwrap();
        assert_eq!(role.as_str(), "arn:aws:iam::123456789012:role/web");
        let role = resolve_role("team/web", Some(&base())).unwrap();
        assert_eq!(role.as_str(), "arn:aws:iam::123456789012:role/team/web");
        let role = resolve_role("/team/web", Some(&base())).unwrap();
        assert_eq!(role.as_str(), "arn:aws:iam::123456789012:role/team/web");
        let with_path = BaseArn::parse("arn:aws-cn:iam::123456789012:role/eks").unwrap();
        assert_eq!(with_path.as_str(), "arn:aws-cn:iam::123456789012:role/eks/");
        assert_eq!(
            resolve_role("web", Some(&with_path)).unwrap().as_str(),
            "arn:aws-cn:iam::123456789012:role/eks/web"
        );
    }

    #[test]
    fn a_name_without_base_arn_says_what_to_set() {
        let err = resolve_role("web", None).unwrap_err();
        assert!(matches!(err, RoleError::NoBaseArn { .. }));
        assert!(err.to_string().contains("--base-role-arn"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_reasons() {
        let cases = [
            ("arn:aws:iam::12345:role/web", "12 digits"),
            ("arn:aws:s3:::bucket", "service must be iam"),
            (
                "arn:aws:iam:us-east-1:123456789012:role/web",
                "empty region",
            ),
            ("arn:azure:iam::123456789012:role/web", "partition"),
            ("arn:aws:iam::123456789012:user/bob", "role/<name>"),
            ("arn:aws:iam::123456789012:role/", "empty"),
            ("arn:aws:iam::123456789012:role/a//web", "empty segment"),
            ("arn:aws:iam::123456789012", "expected"),
        ];
        for (value, reason) in cases {
            let err = resolve_role(value, Some(&base())).unwrap_err().to_string();
            assert!(err.contains(reason), "{value}: {err}");
        }
        for value in ["", "  ", "web role", "web\u{e9}", "a/"] {
            let err = resolve_role(value, Some(&base())).unwrap_err();
            assert!(
                matches!(err, RoleError::InvalidName { .. }),
                "{value:?}: {err}"
            );
        }
    }

    #[test]
    fn length_limits_are_iams() {
        let name64 = "r".repeat(64);
        assert!(resolve_role(&name64, Some(&base())).is_ok());
        let err = resolve_role(&"r".repeat(65), Some(&base()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 64"), "{err}");
        // Path of 512 characters including both slashes: 510 between them.
        let path = format!("{}/", "p".repeat(510));
        assert!(resolve_role(&format!("{path}web"), Some(&base())).is_ok());
        let path = format!("{}/", "p".repeat(511));
        let err = resolve_role(&format!("{path}web"), Some(&base()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 512"), "{err}");
    }

    #[test]
    fn base_arn_validation() {
        assert!(BaseArn::parse("arn:aws:iam::123456789012:role/").is_ok());
        let err = BaseArn::parse("arn:aws:iam::123:role/").unwrap_err();
        assert!(matches!(err, RoleError::InvalidBaseArn { .. }), "{err}");
        assert!(BaseArn::parse("123456789012").is_err());
        let from_profile =
            BaseArn::from_instance_profile("arn:aws:iam::123456789012:instance-profile/nodes")
                .unwrap();
        assert_eq!(from_profile, base());
        assert!(BaseArn::from_instance_profile("arn:aws:iam::123456789012:role/x").is_err());
    }

    #[test]
    fn listed_name_is_short_in_the_base_account_only() {
        let b = base();
        let own = resolve_role("team/web", Some(&b)).unwrap();
        assert_eq!(listed_name(&own, Some(&b)), "team/web");
        let other = resolve_role("arn:aws:iam::210987654321:role/web", Some(&b)).unwrap();
        assert_eq!(listed_name(&other, Some(&b)), other.as_str());
        assert_eq!(listed_name(&own, None), own.as_str());
    }

    #[test]
    fn external_ids() {
        assert!(validate_external_id("abc-123:/=").is_ok());
        assert!(validate_external_id("a").unwrap_err().contains("2 to 1224"));
        assert!(validate_external_id(&"x".repeat(1225)).is_err());
        assert!(
            validate_external_id("has space")
                .unwrap_err()
                .contains("' '")
        );
    }

    fn allowed(json: &str, format: PatternFormat) -> AllowedRoles {
        AllowedRoles::compile("team", "iam.amazonaws.com/allowed-roles", json, format).unwrap()
    }

    #[test]
    fn glob_restrictions() {
        let b = base();
        let rules = allowed(
            r#"["web-*", "batch/?ob", "arn:aws:iam::210987654321:role/x-{a,b}"]"#,
            PatternFormat::Glob,
        );
        let role = |v: &str| resolve_role(v, Some(&b)).unwrap();
        assert!(rules.allows(&role("web-frontend"), Some(&b)));
        assert!(rules.allows(&role("batch/job"), Some(&b)));
        assert!(!rules.allows(&role("batch/jobs"), Some(&b)));
        assert!(!rules.allows(&role("api"), Some(&b)));
        assert!(rules.allows(&role("arn:aws:iam::210987654321:role/x-a"), Some(&b)));
        assert!(!rules.allows(&role("arn:aws:iam::210987654321:role/x-c"), Some(&b)));
        // A relative pattern never admits a role of another account.
        assert!(!rules.allows(
            &role("arn:aws:iam::210987654321:role/web-frontend"),
            Some(&b)
        ));
        // `*` crosses path separators, as in kube2iam.
        assert!(rules.allows(&role("web-a/b"), Some(&b)));
    }

    #[test]
    fn regexp_restrictions_are_anchored() {
        let b = base();
        let rules = allowed(
            r#"["web-[0-9]+", "arn:aws:iam::\\d{12}:role/shared"]"#,
            PatternFormat::Regexp,
        );
        let role = |v: &str| resolve_role(v, Some(&b)).unwrap();
        assert!(rules.allows(&role("web-42"), Some(&b)));
        // Unanchored (kube2iam) would accept these; anchored does not.
        assert!(!rules.allows(&role("web-42-admin"), Some(&b)));
        assert!(!rules.allows(&role("admin-web-42"), Some(&b)));
        assert!(rules.allows(&role("arn:aws:iam::999999999999:role/shared"), Some(&b)));
        assert!(!rules.allows(&role("arn:aws:iam::999999999999:role/shared2"), Some(&b)));
    }

    #[test]
    fn empty_list_allows_nothing() {
        let b = base();
        let rules = allowed("[]", PatternFormat::Glob);
        assert!(!rules.allows(&resolve_role("web", Some(&b)).unwrap(), Some(&b)));
    }

    /// Issue 11: without a base ARN, `["app-*"]` matched `app-*` roles in every account.
    #[test]
    fn name_only_patterns_without_a_base_arn_allow_no_role() {
        for (format, json) in [
            (PatternFormat::Glob, r#"["app-*", "web", "*", "*/*"]"#),
            (PatternFormat::Regexp, r#"["app-.*", "web", ".*", ".*/.*"]"#),
        ] {
            let rules = allowed(json, format);
            for arn in [
                "arn:aws:iam::123456789012:role/web",
                "arn:aws:iam::123456789012:role/app-x",
                "arn:aws:iam::999999999999:role/app-admin",
                "arn:aws-cn:iam::999999999999:role/team/app-x",
            ] {
                let role = resolve_role(arn, None).unwrap();
                assert!(!rules.allows(&role, None), "{format:?} allows {arn}");
            }
            assert_eq!(rules.unbound_patterns(None).len(), 4);
        }
    }

    #[test]
    fn name_only_patterns_are_bound_to_the_base_arns_account() {
        let b = base();
        let rules = allowed(r#"["app-*"]"#, PatternFormat::Glob);
        let own = resolve_role("app-x", Some(&b)).unwrap();
        assert!(rules.allows(&own, Some(&b)));
        for other in [
            "arn:aws:iam::999999999999:role/app-x",
            "arn:aws-cn:iam::123456789012:role/app-x",
        ] {
            let role = resolve_role(other, Some(&b)).unwrap();
            assert!(!rules.allows(&role, Some(&b)), "{other}");
        }
        assert!(rules.unbound_patterns(Some(&b)).is_empty());
        // With a path in the base ARN, only roles under that path.
        let with_path = BaseArn::parse("arn:aws:iam::123456789012:role/team/").unwrap();
        let under = resolve_role("app-x", Some(&with_path)).unwrap();
        assert!(rules.allows(&under, Some(&with_path)));
        let outside = resolve_role("arn:aws:iam::123456789012:role/app-x", None).unwrap();
        assert!(!rules.allows(&outside, Some(&with_path)));
    }

    #[test]
    fn full_arn_patterns_work_without_a_base_arn() {
        let rules = allowed(
            r#"["arn:aws:iam::123456789012:role/app-*", "app-*"]"#,
            PatternFormat::Glob,
        );
        let own = resolve_role("arn:aws:iam::123456789012:role/app-x", None).unwrap();
        assert!(rules.allows(&own, None));
        let other = resolve_role("arn:aws:iam::999999999999:role/app-x", None).unwrap();
        assert!(!rules.allows(&other, None));
        assert_eq!(rules.unbound_patterns(None), vec!["app-*"]);
    }

    #[test]
    fn malformed_annotations_name_the_namespace() {
        for (json, what) in [
            ("web-*", "JSON array"),
            ("{\"a\":1}", "JSON array"),
            ("[1, 2]", "JSON array"),
        ] {
            let err = AllowedRoles::compile(
                "team",
                "iam.amazonaws.com/allowed-roles",
                json,
                PatternFormat::Glob,
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("namespace team") && err.contains(what),
                "{json}: {err}"
            );
        }
        let err =
            AllowedRoles::compile("team", "k", r#"["web-["]"#, PatternFormat::Glob).unwrap_err();
        assert!(matches!(err, NamespaceError::BadPattern { .. }), "{err}");
        let err =
            AllowedRoles::compile("team", "k", r#"["web-("]"#, PatternFormat::Regexp).unwrap_err();
        assert!(matches!(err, NamespaceError::BadPattern { .. }), "{err}");
        // Found by the allowed_roles fuzzer: balanced once wrapped, but it breaks out of the
        // anchoring group, so `web)|(x` would allow every role that starts with `web`.
        for breakout in [r#"["x?)(a"]"#, r#"["web)|(x"]"#, r#"["a)|(.*"]"#] {
            let err =
                AllowedRoles::compile("team", "k", breakout, PatternFormat::Regexp).unwrap_err();
            assert!(matches!(err, NamespaceError::BadPattern { .. }), "{err}");
        }
    }

    #[test]
    fn the_number_of_patterns_is_bounded() {
        let list = |n: usize| {
            serde_json::to_string(&(0..n).map(|i| format!("r-{i}-*")).collect::<Vec<_>>()).unwrap()
        };
        let rules = allowed(&list(MAX_ALLOWED_PATTERNS), PatternFormat::Glob);
        assert_eq!(rules.sources().len(), MAX_ALLOWED_PATTERNS);
        let err = AllowedRoles::compile(
            "team",
            "k",
            &list(MAX_ALLOWED_PATTERNS + 1),
            PatternFormat::Glob,
        )
        .unwrap_err();
        assert!(
            matches!(err, NamespaceError::TooManyPatterns { count, .. } if count == MAX_ALLOWED_PATTERNS + 1),
            "{err}"
        );
        assert!(err.to_string().contains("namespace team"), "{err}");
    }

    #[test]
    fn glob_translation() {
        assert_eq!(glob_to_regex("a*b").unwrap(), "^(?:a.*b)$");
        assert_eq!(glob_to_regex("a.b").unwrap(), "^(?:a\\.b)$");
        assert_eq!(glob_to_regex("[!ab]").unwrap(), "^(?:[^ab])$");
        assert_eq!(glob_to_regex("{x,y}z").unwrap(), "^(?:(?:x|y)z)$");
        assert_eq!(glob_to_regex("a,b").unwrap(), "^(?:a,b)$");
        assert!(glob_to_regex("{a").is_err());
        assert!(glob_to_regex("[a").is_err());
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(
            node_session_name("ip-10-0-0-1.ec2.internal"),
            "kube2iam-ip-10-0-0-1.ec2.internal"
        );
        assert_eq!(
            pod_session_name("default", "web-7d4b9"),
            "default.web-7d4b9"
        );
        assert_eq!(session_name("a b/c"), "a-b-c");
        assert_eq!(session_name("x"), "x-");
        let long = pod_session_name(&"n".repeat(63), &"p".repeat(200));
        assert_eq!(long.len(), 64);
        let other = pod_session_name(&"n".repeat(63), &format!("{}q", "p".repeat(199)));
        assert_ne!(long, other, "truncated names stay distinct");
        assert!(long.chars().all(is_name_char));
    }

    #[test]
    fn kube2iam_session_names_match_kube2iams() {
        let role = |arn: &str| RoleArn::parse(arn).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        // FNV-1a 32 of the address text, in hex without padding (Go's %x), then the role name.
        assert_eq!(
            kube2iam_session_name(ip("10.0.0.1"), &role("arn:aws:iam::123456789012:role/web")),
            "debebe8d-web"
        );
        assert_eq!(
            kube2iam_session_name(
                ip("192.168.12.7"),
                &role("arn:aws:iam::123456789012:role/team-a/app")
            ),
            "9f400fd6-app",
            "the path is not part of the name"
        );
        assert_eq!(
            kube2iam_session_name(ip("10.1.3.130"), &role("arn:aws:iam::123456789012:role/x")),
            "200b200-x",
            "no zero padding"
        );
        assert_eq!(
            kube2iam_session_name(ip("fd00::1"), &role("arn:aws:iam::123456789012:role/x")),
            "9954580a-x"
        );
        let long = kube2iam_session_name(
            ip("10.0.0.1"),
            &role(&format!(
                "arn:aws:iam::123456789012:role/{}",
                "r".repeat(64)
            )),
        );
        assert_eq!(long.len(), 64, "cut to 64 characters as kube2iam did");
        assert!(long.starts_with("debebe8d-rrr"));
        assert!(long.chars().all(is_name_char));
    }
}
