//! Request paths: normalized before any decision, so no spelling reaches a blocked path, and
//! classified into the routes the agent answers itself, blocks, or forwards.

use regex::Regex;

/// Why a path was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("the path contains a control character or NUL")]
    Control,
    #[error("the path has an invalid percent-encoding")]
    Encoding,
    #[error("the path is not absolute")]
    Relative,
}

/// Percent-decodes until stable (at most a few rounds): `%252e` is `.` to us, so it cannot hide
/// a dot segment that a lenient upstream would decode a second time.
fn decode(path: &str) -> Result<String, BadPath> {
    let mut current = path.to_owned();
    for _ in 0..4 {
        let decoded = percent_encoding::percent_decode_str(&current)
            .decode_utf8()
            .map_err(|_| BadPath::Encoding)?
            .into_owned();
        // A '%' not followed by two hex digits is left alone by the decoder; refuse it.
        if has_stray_percent(&decoded) && decoded == current {
            return Err(BadPath::Encoding);
        }
        if decoded == current {
            return Ok(decoded);
        }
        current = decoded;
    }
    Err(BadPath::Encoding)
}

fn has_stray_percent(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| {
        b[i] == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// Whether `path` is what [`normalize`] makes of it (the paths SDKs send): absolute, of letters,
/// digits, `-`, `_` and `.` only (nothing to decode, no backslash), with no empty, `.` or `..`
/// segment but a trailing slash.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    // One pass over the bytes: what every request's path goes through.
    let rest = rest.as_bytes();
    let mut start = 0;
    for (i, &b) in rest.iter().enumerate() {
        if b == b'/' {
            // Not the last segment: it may not be empty either.
            if matches!(&rest[start..i], b"" | b"." | b"..") {
                return false;
            }
            start = i + 1;
        } else if !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return false;
        }
    }
    !matches!(&rest[start..], b"." | b"..")
}

/// Decodes, then resolves `.`/`..` and empty segments. The trailing slash is kept: IMDS
/// distinguishes `security-credentials` from `security-credentials/`.
pub fn normalize(raw: &str) -> Result<String, BadPath> {
    // By bytes: `?` and `#` are ASCII, never part of a longer UTF-8 character.
    let end = raw
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(raw.len());
    let path = &raw[..end];
    if is_normal(path) {
        return Ok(path.to_owned());
    }
    normalize_path(path)
}

/// [`normalize`] without the short cut, after the query and fragment are cut off.
fn normalize_path(path: &str) -> Result<String, BadPath> {
    let decoded = decode(path)?;
    if decoded.chars().any(|c| c.is_control()) {
        return Err(BadPath::Control);
    }
    // Backslashes are separators to some servers; treat them as such.
    let decoded = decoded.replace('\\', "/");
    if !decoded.starts_with('/') {
        return Err(BadPath::Relative);
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Re-encodes a normalized path for the upstream request line.
pub fn encode(path: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}');
    percent_encoding::utf8_percent_encode(path, KEEP).to_string()
}

/// What a normalized path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`.
    Token,
    /// `/{v}/meta-data/iam` or `/{v}/meta-data/iam/`.
    IamListing,
    /// `/{v}/meta-data/iam/security-credentials[/]`.
    CredentialsList,
    /// `/{v}/meta-data/iam/security-credentials/<name>`.
    Credentials(String),
    /// `/{v}/meta-data/iam/info`.
    IamInfo,
    /// Never forwarded; the refusal says why and what to do.
    Blocked(Refusal),
    /// Forwarded to the upstream metadata service.
    Proxy,
}

/// Why a path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node's credentials (its IAM role, its instance identity credentials), under any
    /// spelling. Never forwarded, whatever `--allow-path` says.
    NodeCredentials(&'static str),
    /// The node's own data (user-data, the signed instance identity), under any spelling.
    /// Forwarded only when an `--allow-path` matches.
    NodeOnly(&'static str),
    /// Not on the list of metadata that is safe for any pod ([`SAFE_META_DATA`]), and no
    /// `--allow-path` matches.
    NotAllowed,
    /// An `--block-path` matches.
    BlockPath,
    /// A segment that servers read differently: a dot segment with parameters (`..;x`, which
    /// some servers resolve as `..`), or characters outside ASCII (fullwidth dots, which some
    /// normalize to `.`). Never forwarded, whatever `--allow-path` says: an allowed prefix
    /// followed by such a segment could be read upstream as a path outside it.
    Ambiguous,
}

impl Refusal {
    /// The 403 body for `path` (normalized). Every refusal names `--allow-path`.
    pub fn message(&self, path: &str) -> String {
        match self {
            Refusal::NodeCredentials(what) => format!(
                "kube2iam-ebpf: {path} reads the node's {what}, which pods never get (no \
                 --allow-path forwards it); a pod's own role is at \
                 /latest/meta-data/iam/security-credentials/"
            ),
            Refusal::NodeOnly(what) => format!(
                "kube2iam-ebpf: {path} reads the node's {what}, which is not forwarded to pods; \
                 if every pod may read it, forward it with --allow-path '<regex>'"
            ),
            Refusal::NotAllowed => format!(
                "kube2iam-ebpf: {path} is not on the list of metadata forwarded to pods; forward \
                 it with --allow-path '<regex>'"
            ),
            Refusal::BlockPath => format!(
                "kube2iam-ebpf: {path} is blocked by --block-path (an --allow-path does not \
                 override it)"
            ),
            Refusal::Ambiguous => format!(
                "kube2iam-ebpf: {path} has a segment that servers read in different ways (a \
                 dot segment with parameters, or characters outside ASCII); it is not forwarded, \
                 whatever --allow-path says"
            ),
        }
    }
}

/// User adjustments: `--allow-path` forwards paths beyond the default allow list (and the
/// node's user-data or signed identity, when it matches them), `--block-path` refuses paths that
/// would otherwise be forwarded. Neither touches the credential routes, which the agent always
/// answers itself, nor the node's credentials, which are never forwarded.
#[derive(Debug, Clone, Default)]
pub struct PathRules {
    pub allow: Vec<Regex>,
    pub block: Vec<Regex>,
}

/// `latest`, `1.0` or a dated version (`2009-04-04`).
fn is_version(s: &str) -> bool {
    s == "latest"
        || s == "1.0"
        || (s.len() == 10
            && s.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            }))
}

/// Categories under `/{version}/meta-data/` that any pod may read: facts about the instance
/// and its network that the pod could learn elsewhere, and nothing that identifies or
/// authenticates as the node. The names are IMDS's instance metadata categories (the EC2 User
/// Guide, "Instance metadata categories"). An entry ending in `/` covers everything below it.
pub const SAFE_META_DATA: &[&str] = &[
    "ami-id",
    "ami-launch-index",
    "ami-manifest-path",
    "ancestor-ami-ids",
    "autoscaling/",
    "block-device-mapping/",
    "events/",
    "hostname",
    "instance-action",
    "instance-id",
    "instance-life-cycle",
    "instance-type",
    "kernel-id",
    "local-hostname",
    "local-ipv4",
    "mac",
    "network/",
    "placement/",
    "product-codes",
    "public-hostname",
    "public-ipv4",
    "ramdisk-id",
    "reservation-id",
    "security-groups",
    "services/",
    "spot/",
];

/// Entries under `/{version}/dynamic/` that any pod may read: the unsigned instance identity
/// document (the same facts as above) and the monitoring setting. Its signatures (`pkcs7`,
/// `signature`, `rsa2048`) are the node's identity and are not here.
pub const SAFE_DYNAMIC: &[&str] = &["instance-identity/document", "fws/instance-monitoring"];

/// How a lenient upstream may read one segment: letters in any case (including Unicode case
/// folding, which maps `ſ` to `s`), with `;params` and anything after a `?` or `#` (a decoded
/// `%3F` or `%23`) ignored, without trailing dots or surrounding whitespace, and with characters
/// outside ASCII dropped. The result is what node-only names are compared with, so that no
/// spelling that some server would resolve to one of them is forwarded.
pub fn lenient_segment(segment: &str) -> String {
    let cut = segment.find([';', '?', '#']).unwrap_or(segment.len());
    let folded: String = segment[..cut]
        .chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .filter(char::is_ascii)
        .collect();
    folded
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .trim_end_matches(['.', ' '])
        .to_owned()
}

/// A segment that a lenient server may read as `.` or `..` or as nothing though it is neither
/// (`..;x`, `.;`, fullwidth dots), or that holds characters outside ASCII. [`normalize`] has
/// already resolved the real dot segments.
fn ambiguous(segment: &str) -> bool {
    !segment.is_ascii()
        || (!segment.is_empty() && matches!(lenient_segment(segment).as_str(), "" | "." | ".."))
}

/// The node-only data a segment names, read leniently. Checked in every segment position: no
/// metadata path that is safe for pods has one of these names as a segment.
fn node_only(segment: &str) -> Option<Refusal> {
    match lenient_segment(segment).as_str() {
        "iam" | "security-credentials" => Some(Refusal::NodeCredentials(
            "IAM role credentials (meta-data/iam)",
        )),
        "identity-credentials" => Some(Refusal::NodeCredentials(
            "instance identity credentials (meta-data/identity-credentials)",
        )),
        "user-data" => Some(Refusal::NodeOnly("user-data")),
        "pkcs7" | "signature" | "rsa2048" => Some(Refusal::NodeOnly(
            "signed instance identity (dynamic/instance-identity/pkcs7, signature, rsa2048)",
        )),
        _ => None,
    }
}

/// A segment every server reads the same way: no parameters, query or fragment characters, no
/// trailing dot, nothing outside `[A-Za-z0-9._:@+=,-]`. MAC and IP addresses, IDs and category
/// names are all plain.
fn is_plain(segment: &str) -> bool {
    !segment.is_empty()
        && !segment.ends_with('.')
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+=,-".contains(&b))
}

/// Whether a normalized path is on the default allow list: a version listing, or a path under
/// [`SAFE_META_DATA`] or [`SAFE_DYNAMIC`], every segment plain. Letter case is ignored.
pub fn is_safe_for_pods(path: &str) -> bool {
    let inner = path.trim_start_matches('/');
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        // The root lists the versions.
        return true;
    }
    let lower = inner.to_ascii_lowercase();
    let segments: Vec<&str> = lower.split('/').collect();
    if !segments.iter().all(|s| is_plain(s)) || !is_version(segments[0]) {
        return false;
    }
    let under = |list: &[&str], rest: &[&str]| {
        let rest = rest.join("/");
        rest.is_empty()
            || list.iter().any(|entry| match entry.strip_suffix('/') {
                Some(tree) => rest == tree || rest.starts_with(entry),
                // A listing of the directories that lead to an entry is safe too.
                None => rest == *entry || entry.starts_with(&format!("{rest}/")),
            })
    };
    match segments.get(1).copied() {
        // The version's listing: dynamic/, meta-data/, user-data (names only).
        None => true,
        Some("meta-data") => under(SAFE_META_DATA, &segments[2..]),
        Some("dynamic") => under(SAFE_DYNAMIC, &segments[2..]),
        Some(_) => false,
    }
}

/// The agent's own IAM routes: `/{v}/meta-data/iam[/…]` with a real version, in any letter case.
fn own_iam_route(path: &str) -> Option<Route> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let version = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    // Compared without regard to ASCII case, without lowercased copies.
    let starts = |s: &str, prefix: &str| {
        s.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    if !(version.eq_ignore_ascii_case("latest") || is_version(version)) {
        return None;
    }
    const IAM: &str = "meta-data/iam";
    const CREDENTIALS: &str = "/security-credentials/";
    if !starts(rest, IAM) {
        return None;
    }
    let iam = &rest[IAM.len()..];
    let is = |s: &str| iam.eq_ignore_ascii_case(s);
    if is("") || is("/") {
        Some(Route::IamListing)
    } else if is("/security-credentials") || is(CREDENTIALS) {
        Some(Route::CredentialsList)
    } else if is("/info") || is("/info/") {
        Some(Route::IamInfo)
    } else if starts(iam, CREDENTIALS) {
        let name = &iam[CREDENTIALS.len()..];
        Some(Route::Credentials(name.trim_end_matches('/').to_owned()))
    } else {
        None
    }
}

/// Classifies a normalized path (see [`normalize`]):
/// 1. the IMDSv2 token PUT and the IAM routes, which the agent answers itself;
/// 2. the node's credentials, user-data and signed identity — a segment with one of their names,
///    anywhere in the path, read as a lenient server would ([`lenient_segment`]) — refused;
///    then any path with an [`ambiguous`] segment; user-data and the signed identity are
///    forwarded when an `--allow-path` matches;
/// 3. what is safe for any pod ([`is_safe_for_pods`]) or matched by an `--allow-path` is
///    forwarded unless an `--block-path` matches; everything else is refused.
pub fn route(method: &hyper::Method, path: &str, rules: &PathRules) -> Route {
    if method == hyper::Method::PUT && path.eq_ignore_ascii_case("/latest/api/token") {
        return Route::Token;
    }
    // The IAM routes first: the agent answers them itself (a role may be named `user-data`).
    if let Some(own) = own_iam_route(path) {
        return own;
    }
    let allowed = || rules.allow.iter().any(|r| r.is_match(path));
    let mut node_data = None;
    for refusal in path.split('/').filter_map(node_only) {
        match refusal {
            Refusal::NodeCredentials(_) => return Route::Blocked(refusal),
            _ => node_data = node_data.or(Some(refusal)),
        }
    }
    if path.split('/').any(ambiguous) {
        return Route::Blocked(Refusal::Ambiguous);
    }
    if let Some(refusal) = node_data
        && !allowed()
    {
        return Route::Blocked(refusal);
    }
    if node_data.is_none() && !is_safe_for_pods(path) && !allowed() {
        return Route::Blocked(Refusal::NotAllowed);
    }
    if rules.block.iter().any(|r| r.is_match(path)) {
        return Route::Blocked(Refusal::BlockPath);
    }
    Route::Proxy
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use super::*;

    fn norm(p: &str) -> String {
        normalize(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// The short cut for paths already normal gives what the full normalization gives: every
    /// path of up to 6 characters over an alphabet with each character that matters.
    #[test]
    fn normal_paths_are_what_normalizing_makes_of_them() {
        // With `?` and `#` (cut off first) and a character of two bytes in UTF-8.
        let alphabet = ['/', '.', 'a', '-', '%', '\\', '2', '?', '#', '\u{e9}'];
        let mut paths = vec![String::new()];
        let mut normal = 0;
        for _ in 0..6 {
            let mut longer = Vec::new();
            for p in &paths {
                for c in alphabet {
                    let mut full = p.clone();
                    full.push(c);
                    // The path before `?` or `#`, cut by characters: what normalize, which
                    // cuts by bytes, goes on with.
                    let q = &full[..full.find(['?', '#']).unwrap_or(full.len())];
                    if is_normal(q) {
                        normal += 1;
                        assert_eq!(normalize_path(q), Ok(q.to_owned()));
                        assert_eq!(normalize(&full), Ok(q.to_owned()), "{full:?}");
                    } else {
                        assert_eq!(normalize(&full), normalize_path(q), "{full:?}");
                    }
                    if !is_normal(q) && q.starts_with('/') {
                        // Not normal: normalizing changes it, or refuses it, or it holds a
                        // character the short cut leaves to the full path.
                        let changed = normalize_path(q).map_or(true, |n| n != q);
                        let unusual = q.contains(['%', '\\']) || !q.is_ascii();
                        let dots = q.split('/').any(|s| s == "." || s == "..");
                        assert!(changed || unusual || dots, "{q:?}");
                    }
                    longer.push(full);
                }
            }
            paths = longer;
        }
        assert!(normal > 5_000, "{normal} normal paths");
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(norm("/latest/meta-data/"), "/latest/meta-data/");
        assert_eq!(
            norm("/latest//meta-data///instance-id"),
            "/latest/meta-data/instance-id"
        );
        assert_eq!(
            norm("/latest/meta-data/./iam/../user-data"),
            "/latest/meta-data/user-data"
        );
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials/../../../user-data"),
            "/latest/user-data"
        );
        assert_eq!(norm("/../../latest/user-data"), "/latest/user-data");
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("/latest/meta-data/iam/.."), "/latest/meta-data/");
        assert_eq!(norm("/latest\\user-data"), "/latest/user-data");
        assert_eq!(norm("/latest/user-data?x=1"), "/latest/user-data");
    }

    #[test]
    fn encodings_are_decoded_until_stable() {
        assert_eq!(norm("/latest/%75ser-data"), "/latest/user-data");
        assert_eq!(
            norm("/latest/meta-data/iam/%2e%2e/%2E%2E/user-data"),
            "/latest/user-data"
        );
        assert_eq!(
            norm("/latest/meta-data/iam/%252e%252e/%252e%252e/user-data"),
            "/latest/user-data"
        );
        assert_eq!(norm("/latest%2fuser-data"), "/latest/user-data");
        assert_eq!(normalize("/latest/%zz"), Err(BadPath::Encoding));
        assert_eq!(normalize("/latest/%00user-data"), Err(BadPath::Control));
        assert_eq!(normalize("/latest/%ff"), Err(BadPath::Encoding));
        assert_eq!(normalize("latest"), Err(BadPath::Relative));
    }

    const USER_DATA: Route = Route::Blocked(Refusal::NodeOnly("user-data"));
    const NODE_IAM: Route = Route::Blocked(Refusal::NodeCredentials(
        "IAM role credentials (meta-data/iam)",
    ));
    const IDENTITY_CREDENTIALS: Route = Route::Blocked(Refusal::NodeCredentials(
        "instance identity credentials (meta-data/identity-credentials)",
    ));
    const SIGNED_IDENTITY: Route = Route::Blocked(Refusal::NodeOnly(
        "signed instance identity (dynamic/instance-identity/pkcs7, signature, rsa2048)",
    ));

    fn get(p: &str) -> Route {
        route(&Method::GET, &norm(p), &PathRules::default())
    }

    #[test]
    fn routes() {
        let r = PathRules::default();
        assert_eq!(route(&Method::PUT, "/latest/api/token", &r), Route::Token);
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/2009-04-04/meta-data/iam/security-credentials/"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/web"),
            Route::Credentials("web".into())
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/arn:aws:iam::123456789012:role/a/web"),
            Route::Credentials("arn:aws:iam::123456789012:role/a/web".into())
        );
        assert_eq!(get("/latest/meta-data/iam/info"), Route::IamInfo);
        assert_eq!(get("/latest/meta-data/iam/"), Route::IamListing);
        assert_eq!(get("/latest/meta-data/iam/something-else"), NODE_IAM);
        assert_eq!(get("/latest/user-data"), USER_DATA);
        assert_eq!(get("/LATEST/USER-DATA"), USER_DATA);
        assert_eq!(
            get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
            IDENTITY_CREDENTIALS
        );
        assert_eq!(
            get("/latest/meta-data/identity-credentials/ec2/info"),
            IDENTITY_CREDENTIALS
        );
        assert_eq!(get("/latest/meta-data/instance-id"), Route::Proxy);
        assert_eq!(
            get("/latest/dynamic/instance-identity/document"),
            Route::Proxy
        );
        assert_eq!(get("/"), Route::Proxy);
    }

    /// What SDKs, CNI plugins, node termination handlers and cloud-init read stays forwarded.
    #[test]
    fn metadata_safe_for_any_pod_is_forwarded() {
        for p in [
            "/",
            "/latest",
            "/latest/",
            "/1.0/",
            "/latest/meta-data",
            "/latest/meta-data/",
            "/latest/meta-data/ami-id",
            "/latest/meta-data/hostname",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-type",
            "/latest/meta-data/instance-life-cycle",
            "/latest/meta-data/local-ipv4",
            "/latest/meta-data/local-hostname",
            "/latest/meta-data/mac",
            "/latest/meta-data/placement/",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/availability-zone-id",
            "/latest/meta-data/services/domain",
            "/latest/meta-data/services/partition",
            "/latest/meta-data/network/interfaces/macs/",
            "/latest/meta-data/network/interfaces/macs/02:00:c0:00:02:0a/local-ipv4s",
            "/latest/meta-data/network/interfaces/macs/02:00:c0:00:02:0a/vpc-ipv4-cidr-blocks",
            "/latest/meta-data/events/maintenance/scheduled",
            "/latest/meta-data/events/recommendations/rebalance",
            "/latest/meta-data/spot/instance-action",
            "/latest/meta-data/spot/termination-time",
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            "/latest/meta-data/block-device-mapping/root",
            "/2021-07-15/meta-data/placement/region",
            "/latest/dynamic",
            "/latest/dynamic/",
            "/latest/dynamic/instance-identity",
            "/latest/dynamic/instance-identity/",
            "/latest/dynamic/instance-identity/document",
            "/latest/dynamic/fws/instance-monitoring",
            "/LATEST/META-DATA/INSTANCE-ID",
        ] {
            assert_eq!(get(p), Route::Proxy, "{p}");
        }
    }

    /// Anything not known to be safe is refused, naming `--allow-path`.
    #[test]
    fn metadata_not_on_the_allow_list_is_refused() {
        for p in [
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/tags/instance/Name",
            "/latest/meta-data/some-future-category",
            "/latest/meta-data/placementx",
            "/latest/meta-data/instance-id-x",
            "/latest/dynamic/instance-identity/other",
            "/latest/api/token",
            "/x/meta-data/instance-id",
            "/meta-data/instance-id",
            "/latest/x",
            // A segment a lenient server could read as something else.
            "/latest/meta-data/placement/region;x",
            "/latest/meta-data/placement/region.",
            "/latest/meta-data/placement/region%3F/x",
            "/latest/meta-data/placement/a%20b",
        ] {
            let route = get(p);
            assert_eq!(route, Route::Blocked(Refusal::NotAllowed), "{p}");
            assert!(
                Refusal::NotAllowed
                    .message(&norm(p))
                    .contains("--allow-path"),
                "{p}"
            );
        }
    }

    /// Issue 11: each of these was forwarded with the agent's own token, and a lenient upstream
    /// would have answered with the node's credentials.
    #[test]
    fn iam_under_another_version_is_answered_by_the_agent() {
        assert_eq!(
            get("/1.0/meta-data/iam/security-credentials/"),
            Route::CredentialsList
        );
        assert_eq!(
            get("/1.0/meta-data/iam/security-credentials/node-role"),
            Route::Credentials("node-role".into())
        );
        assert_eq!(get("/1.0/meta-data/iam/info"), Route::IamInfo);
    }

    #[test]
    fn iam_without_a_version_is_refused() {
        assert_eq!(get("/meta-data/iam/security-credentials/"), NODE_IAM);
        assert_eq!(
            get("/meta-data/iam/security-credentials/node-role"),
            NODE_IAM
        );
        assert_eq!(get("/meta-data/iam/info"), NODE_IAM);
    }

    #[test]
    fn iam_with_params_is_refused() {
        assert_eq!(
            get("/latest/meta-data/iam;x/security-credentials/"),
            NODE_IAM
        );
        assert_eq!(
            get("/latest/meta-data/iam;x/security-credentials/node-role"),
            NODE_IAM
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials;x/node-role"),
            NODE_IAM
        );
        assert_eq!(get("/latest/meta-data/iam/info;x"), NODE_IAM);
        assert_eq!(get("/latest/meta-data;x/iam/info"), NODE_IAM);
    }

    #[test]
    fn iam_with_an_encoded_question_mark_is_refused() {
        assert_eq!(
            get("/latest/meta-data/iam%3F/security-credentials/"),
            NODE_IAM
        );
        assert_eq!(
            get("/latest/meta-data/iam%3f/security-credentials/node-role"),
            NODE_IAM
        );
        assert_eq!(get("/latest/meta-data/iam%3Fx"), NODE_IAM);
        assert_eq!(get("/latest/meta-data/iam%23/info"), NODE_IAM);
    }

    #[test]
    fn iam_with_a_trailing_dot_is_refused() {
        assert_eq!(
            get("/latest/meta-data/iam./security-credentials/"),
            NODE_IAM
        );
        assert_eq!(
            get("/latest/meta-data/iam../security-credentials/node-role"),
            NODE_IAM
        );
        assert_eq!(get("/latest/meta-data/iam%2e/info"), NODE_IAM);
        assert_eq!(get("/latest/meta-data/iam%20/info"), NODE_IAM);
    }

    #[test]
    fn iam_in_any_segment_position_is_refused() {
        for p in [
            "/x/meta-data/iam/security-credentials/node-role",
            "/latest/latest/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/placement/iam/security-credentials/node-role",
            "/latest/meta-data/network/security-credentials/node-role",
            "/latest/meta-data/network/interfaces/macs/x/iam",
            "/iam/security-credentials/node-role",
            // Unicode case folding: `ſ` (long s) upper-cases to `S`.
            "/latest/meta-data/iam/%C5%BFecurity-credentials/node-role",
        ] {
            assert_eq!(get(p), NODE_IAM, "{p}");
        }
    }

    #[test]
    fn signed_instance_identity_is_refused() {
        for p in [
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/latest/dynamic/instance-identity/PKCS7",
            "/latest/dynamic/instance-identity/rsa2048;x",
            "/latest/dynamic/instance-identity/signature.",
            "/latest/dynamic/instance-identity/pkcs7%3F",
            "/2009-04-04/dynamic/instance-identity/pkcs7",
            "/1.0/dynamic/instance-identity/signature",
            "/dynamic/instance-identity/rsa2048",
            "/latest/dynamic/instance-identity/document/../rsa2048",
        ] {
            assert_eq!(get(p), SIGNED_IDENTITY, "{p}");
        }
    }

    #[test]
    fn user_data_and_identity_credentials_under_lenient_spellings_are_refused() {
        for p in [
            "/latest/user-data;x",
            "/latest/user-data.",
            "/latest/user-data%3F",
            "/1.0/user-data",
            "/user-data",
            "/latest/meta-data/placement/user-data",
        ] {
            assert_eq!(get(p), USER_DATA, "{p}");
        }
        for p in [
            "/latest/meta-data/identity-credentials;x/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/identity-credentials./ec2/info",
            "/meta-data/identity-credentials/ec2/info",
        ] {
            assert_eq!(get(p), IDENTITY_CREDENTIALS, "{p}");
        }
    }

    #[test]
    fn ambiguous_segments_are_refused_whatever_allow_path_says() {
        let rules = PathRules {
            allow: vec![Regex::new("^/latest/meta-data/tags/").unwrap()],
            block: Vec::new(),
        };
        for path in [
            // A Tomcat-style `..;` walks out of the allowed prefix, up to user-data.
            "/latest/meta-data/tags/..;/..;/user-data",
            "/latest/meta-data/tags/.;/instance",
            "/latest/meta-data/tags/..;x/..;y/dynamic/instance-identity/pkcs7",
            // Fullwidth full stops, which NFKC normalization turns into `..`.
            "/latest/meta-data/tags/\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/user-data",
            "/latest/meta-data/tags/instance/N\u{e4}me",
        ] {
            assert_eq!(
                route(&Method::GET, path, &rules),
                Route::Blocked(Refusal::Ambiguous),
                "{path}"
            );
        }
        // What the allow-path means stays forwarded.
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/tags/instance/Name", &rules),
            Route::Proxy
        );
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/placement/region", &rules),
            Route::Proxy
        );
    }

    #[test]
    fn lenient_segments() {
        assert_eq!(lenient_segment("IAM;x"), "iam");
        assert_eq!(lenient_segment("iam?x"), "iam");
        assert_eq!(lenient_segment("iam#x"), "iam");
        assert_eq!(lenient_segment("iam..."), "iam");
        assert_eq!(lenient_segment(" iam . "), "iam");
        assert_eq!(lenient_segment("\u{17f}ignature"), "signature");
        assert_eq!(lenient_segment("user\u{200b}-data"), "user-data");
        assert_eq!(lenient_segment("..;x"), "");
        assert_eq!(lenient_segment("instance-id"), "instance-id");
    }

    #[test]
    fn every_spelling_of_a_blocked_path_stays_blocked() {
        for p in [
            "/latest/meta-data/iam/security-credentials/../../user-data",
            "/latest/meta-data/iam/security-credentials/%2e%2e/%2e%2e/user-data",
            "/latest/meta-data/iam/security-credentials/%2E%2E/%2E%2E/user-data",
            "/latest/meta-data/iam/security-credentials/%252e%252e/%252e%252e/user-data",
            "/latest/meta-data/iam/security-credentials/..%2f..%2fuser-data",
            "//latest//user-data",
            "/latest/./user-data",
            "/latest/user-data/",
            "/Latest/User-Data",
            "/latest/%75%73%65%72-data",
            "/latest/meta-data/../user-data",
            "/latest\\user-data",
            "/latest/meta-data/user-data",
            // Found by the path_route fuzzer: a first segment that is not a version.
            "/late/tmseta-data/iam/security-credentials/%2e%2e/%2E%2E/user-data",
            "/user-data",
            "/x/user-data",
            "/latest/meta-data/iamx/user-data",
        ] {
            assert_eq!(get(p), USER_DATA, "{p}");
        }
    }

    #[test]
    fn allow_path_forwards_user_data_and_more_but_never_node_credentials() {
        let rules = PathRules {
            allow: vec![
                Regex::new("^/[^/]+/user-data$").unwrap(),
                Regex::new("^/latest/meta-data/tags/instance/").unwrap(),
            ],
            block: vec![Regex::new("^/latest/meta-data/public-keys").unwrap()],
        };
        let with = |p: &str| route(&Method::GET, &norm(p), &rules);
        assert_eq!(with("/latest/user-data"), Route::Proxy);
        assert_eq!(with("/latest/meta-data/tags/instance/Name"), Route::Proxy);
        assert_eq!(with("/latest/user-data;x"), USER_DATA, "the regex decides");
        assert_eq!(
            with("/latest/meta-data/public-keys/0"),
            Route::Blocked(Refusal::NotAllowed)
        );
        let everything = PathRules {
            allow: vec![Regex::new(".*").unwrap()],
            block: vec![Regex::new("^/latest/meta-data/public-keys").unwrap()],
        };
        let with = |p: &str| route(&Method::GET, &norm(p), &everything);
        assert_eq!(
            with("/latest/meta-data/iam/security-credentials/"),
            Route::CredentialsList,
            "credential routes are always answered by the agent"
        );
        for p in [
            "/latest/meta-data/iam/something-else",
            "/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/iam;x/security-credentials/node-role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/user-data/../meta-data/iam./security-credentials/node-role",
        ] {
            let route = with(p);
            assert!(
                matches!(route, Route::Blocked(Refusal::NodeCredentials(_))),
                "{p}: {route:?}"
            );
        }
        assert_eq!(
            with("/latest/dynamic/instance-identity/rsa2048"),
            Route::Proxy
        );
        assert_eq!(
            with("/latest/meta-data/public-keys/0"),
            Route::Blocked(Refusal::BlockPath),
            "--block-path wins over --allow-path"
        );
        assert_eq!(with("/latest/meta-data/instance-id"), Route::Proxy);
    }

    #[test]
    fn block_path_refuses_safe_metadata() {
        let rules = PathRules {
            allow: vec![],
            block: vec![Regex::new("^/latest/meta-data/network/").unwrap()],
        };
        assert_eq!(
            route(
                &Method::GET,
                "/latest/meta-data/network/interfaces/macs/",
                &rules
            ),
            Route::Blocked(Refusal::BlockPath)
        );
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/instance-id", &rules),
            Route::Proxy
        );
    }

    #[test]
    fn every_refusal_names_allow_path() {
        for refusal in [
            Refusal::NodeCredentials("x"),
            Refusal::NodeOnly("x"),
            Refusal::NotAllowed,
            Refusal::BlockPath,
        ] {
            let message = refusal.message("/p");
            assert!(
                message.contains("--allow-path") && message.contains("/p"),
                "{message}"
            );
        }
    }

    #[test]
    fn encode_round_trips_through_normalize() {
        for p in [
            "/latest/meta-data/tags/instance/a b",
            "/latest/meta-data/x{y}",
        ] {
            assert_eq!(norm(&encode(p)), p);
        }
        // A literal '%' cannot survive decoding until stable; IMDS paths never have one.
        assert_eq!(normalize(&encode("/latest/x%y")), Err(BadPath::Encoding));
    }
}
