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

/// Decodes, then resolves `.`/`..` and empty segments. The trailing slash is kept: IMDS
/// distinguishes `security-credentials` from `security-credentials/`.
pub fn normalize(raw: &str) -> Result<String, BadPath> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
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
    /// Never forwarded; the reason names what it is.
    Blocked(&'static str),
    /// Forwarded to the upstream metadata service.
    Proxy,
}

/// User adjustments: `--allow-path` re-enables default-blocked paths, `--block-path` blocks more.
/// Neither touches the credential routes, which the agent always answers itself.
#[derive(Debug, Clone, Default)]
pub struct PathRules {
    pub allow: Vec<Regex>,
    pub block: Vec<Regex>,
}

fn is_version(s: &str) -> bool {
    s == "latest"
        || (s.len() == 10
            && s.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            }))
}

/// Classifies a normalized path (see [`normalize`]).
pub fn route(method: &hyper::Method, path: &str, rules: &PathRules) -> Route {
    let lower = path.to_ascii_lowercase();
    if method == hyper::Method::PUT && lower == "/latest/api/token" {
        return Route::Token;
    }
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let version = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    let rest_lower = rest.to_ascii_lowercase();
    // The IAM routes first: the agent answers them itself (a role may be named `user-data`).
    // The blocked segments are checked whatever the first segment is: an upstream that serves
    // `/foo/user-data` or resolves paths differently from us must still never serve user data.
    let iam = rest_lower
        .strip_prefix("meta-data/iam")
        // e.g. meta-data/iamfoo: not ours, not IAM.
        .filter(|iam| iam.is_empty() || iam.starts_with('/'))
        .filter(|_| is_version(&version.to_ascii_lowercase()));
    let default = if let Some(iam) = iam {
        match iam {
            "" | "/" => return Route::IamListing,
            "/security-credentials" | "/security-credentials/" => return Route::CredentialsList,
            "/info" | "/info/" => return Route::IamInfo,
            _ if iam.starts_with("/security-credentials/") => {
                let name = &rest["meta-data/iam/security-credentials/".len()..];
                return Route::Credentials(name.trim_end_matches('/').to_owned());
            }
            _ => Route::Blocked("meta-data/iam"),
        }
    } else if lower.split('/').any(|s| s == "user-data") {
        // Any segment, not only /{v}/user-data: no metadata path has it elsewhere.
        Route::Blocked("user-data")
    } else if lower.split('/').any(|s| s == "identity-credentials") {
        Route::Blocked("meta-data/identity-credentials")
    } else {
        Route::Proxy
    };
    if matches!(default, Route::Blocked(_)) && rules.allow.iter().any(|r| r.is_match(path)) {
        return Route::Proxy;
    }
    if matches!(default, Route::Proxy) && rules.block.iter().any(|r| r.is_match(path)) {
        return Route::Blocked("--block-path");
    }
    default
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use super::*;

    fn norm(p: &str) -> String {
        normalize(p).unwrap_or_else(|e| panic!("{p}: {e}"))
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

    #[test]
    fn routes() {
        let r = PathRules::default();
        let get = |p: &str| route(&Method::GET, &norm(p), &r);
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
        assert_eq!(
            get("/latest/meta-data/iam/something-else"),
            Route::Blocked("meta-data/iam")
        );
        assert_eq!(get("/latest/user-data"), Route::Blocked("user-data"));
        assert_eq!(get("/LATEST/USER-DATA"), Route::Blocked("user-data"));
        assert_eq!(
            get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
            Route::Blocked("meta-data/identity-credentials")
        );
        assert_eq!(get("/latest/meta-data/instance-id"), Route::Proxy);
        assert_eq!(
            get("/latest/dynamic/instance-identity/document"),
            Route::Proxy
        );
        assert_eq!(get("/"), Route::Proxy);
    }

    #[test]
    fn every_spelling_of_a_blocked_path_stays_blocked() {
        let r = PathRules::default();
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
            assert_eq!(
                route(&Method::GET, &norm(p), &r),
                Route::Blocked("user-data"),
                "{p}"
            );
        }
    }

    #[test]
    fn rules_adjust_only_the_default_blocks() {
        let rules = PathRules {
            allow: vec![Regex::new("^/[^/]+/user-data$").unwrap()],
            block: vec![Regex::new("^/latest/meta-data/public-keys").unwrap()],
        };
        assert_eq!(
            route(&Method::GET, "/latest/user-data", &rules),
            Route::Proxy
        );
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/public-keys/0", &rules),
            Route::Blocked("--block-path")
        );
        let everything = PathRules {
            allow: vec![Regex::new(".*").unwrap()],
            block: vec![],
        };
        assert_eq!(
            route(
                &Method::GET,
                "/latest/meta-data/iam/security-credentials/",
                &everything
            ),
            Route::CredentialsList,
            "credential routes are always answered by the agent"
        );
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
