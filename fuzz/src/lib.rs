//! The properties the fuzz targets check, one function per target. Each takes the raw fuzz input
//! and panics when a property does not hold.
//!
//! The same file is compiled into `kube2iam-agent/tests/fuzz_corpus.rs`, which replays every
//! committed corpus file and crash reproducer on stable Rust in CI, so the fuzzers and CI check
//! exactly the same things.

use std::time::{Duration, Instant};

use hyper::Method;
use kube2iam_agent::{
    imds::path::{self, BadPath, PathRules, Route},
    policy::{self, AllowedRoles, BaseArn, PatternFormat, RoleArn},
};

/// The fuzz targets, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: [&str; 4] = [
    "path_route",
    "path_spellings",
    "annotations",
    "allowed_roles",
];

const METHODS: [Method; 5] = [
    Method::GET,
    Method::HEAD,
    Method::PUT,
    Method::POST,
    Method::DELETE,
];

/// Runs a target's property on one input: the corpus replay calls this.
pub fn check(target: &str, data: &[u8], budget: Duration) {
    match target {
        "path_route" => path_route(data),
        "path_spellings" => path_spellings(data),
        "annotations" => annotations(data),
        "allowed_roles" => allowed_roles(data, budget),
        other => panic!("unknown fuzz target {other:?}; known: {TARGETS:?}"),
    }
}

/// A model of an upstream metadata service more lenient than IMDS, to check that nothing the
/// agent forwards could be read upstream as the node's credentials or data. Such a server may:
/// percent-decode the request target once or twice; take a decoded `?` or `#` as the start of
/// the query or fragment; treat `\` as `/`; drop `;params` from a segment; compare letters
/// without case (ASCII or Unicode, where `ſ` upper-cases to `S`); drop trailing dots and spaces
/// from a segment; resolve `.` and `..` after all that; and ignore the version segment, or look
/// for a category wherever it appears. Each reading is a list of segments.
///
/// Written independently of the agent's own normalization, so that the two can disagree.
pub fn lenient_readings(target: &str) -> Vec<Vec<String>> {
    let once = decode_once(target);
    let twice = decode_once(&once);
    let mut readings = Vec::new();
    for text in [target.to_owned(), once, twice] {
        for query_cut in [false, true] {
            let text = if query_cut {
                text.split(['?', '#']).next().unwrap_or("").to_owned()
            } else {
                text.clone()
            };
            for fold in [Fold::Ascii, Fold::Lower, Fold::UpperLower] {
                let mut segments: Vec<String> = Vec::new();
                for raw in text.split(['/', '\\']) {
                    let segment = raw.split(';').next().unwrap_or("");
                    let segment = fold.apply(segment);
                    let segment = segment.trim_end_matches(['.', ' ']).trim();
                    match segment {
                        "" | "." => {}
                        ".." => {
                            segments.pop();
                        }
                        s => segments.push(s.to_owned()),
                    }
                }
                if !readings.contains(&segments) {
                    readings.push(segments);
                }
            }
        }
    }
    readings
}

#[derive(Clone, Copy)]
enum Fold {
    Ascii,
    Lower,
    UpperLower,
}

impl Fold {
    fn apply(self, s: &str) -> String {
        match self {
            Fold::Ascii => s.to_ascii_lowercase(),
            Fold::Lower => s.to_lowercase(),
            Fold::UpperLower => s.to_uppercase().to_lowercase(),
        }
    }
}

/// One round of percent-decoding, leaving malformed escapes as they are (as lenient servers do).
fn decode_once(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What node-only data a reading names, in any position (the version ignored): the node's IAM
/// role (`meta-data/iam/…`), its instance identity credentials, its user-data, or its signed
/// instance identity (`instance-identity/{pkcs7,signature,rsa2048}`).
pub fn reads_node_data(segments: &[String]) -> Option<&'static str> {
    let at = |i: usize| segments.get(i).map(String::as_str);
    (0..segments.len()).find_map(|i| match (at(i), at(i + 1)) {
        (Some("user-data"), _) => Some("user-data"),
        (Some("meta-data"), Some("iam")) => Some("meta-data/iam"),
        (Some("meta-data"), Some("identity-credentials")) => Some("identity-credentials"),
        (Some("iam"), Some("security-credentials" | "info")) => Some("iam"),
        (Some("identity-credentials"), Some("ec2")) => Some("identity-credentials"),
        (Some("instance-identity"), Some("pkcs7" | "signature" | "rsa2048")) => {
            Some("signed instance identity")
        }
        _ => None,
    })
}

/// `imds::path::normalize` + `route` on any request path:
/// * a normalized path is absolute, decoded, and free of control characters, backslashes, empty
///   and dot segments;
/// * re-encoding it for the upstream request line and normalizing again gives it back (what is
///   forwarded means what was decided on);
/// * no forwarded path, read by a lenient upstream ([`lenient_readings`]), names the node's
///   credentials, user-data or signed identity ([`reads_node_data`]), whatever the method and
///   letter case; and every such reading is itself on the default allow list, so a lenient
///   upstream cannot be steered past it;
/// * letter case never decides whether a path leaves the node.
pub fn path_route(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let Ok(normalized) = path::normalize(&raw) else {
        return;
    };
    assert_normalized(&raw, &normalized);
    let rules = PathRules::default();
    for method in &METHODS {
        let route = path::route(method, &normalized, &rules);
        if route == Route::Proxy {
            let forwarded = path::encode(&normalized);
            for reading in lenient_readings(&forwarded) {
                assert_eq!(
                    reads_node_data(&reading),
                    None,
                    "{raw:?} normalizes to {normalized:?} and {method} forwards it as \
                     {forwarded:?}, which a lenient upstream reads as {reading:?}"
                );
                let joined = format!("/{}", reading.join("/"));
                assert!(
                    path::is_safe_for_pods(&joined),
                    "{raw:?} → {normalized:?} is forwarded as {forwarded:?}, which a lenient \
                     upstream reads as {joined:?}, not on the allow list"
                );
            }
        }
        // Letter case never decides whether a path leaves the node.
        for variant in [
            normalized.to_ascii_lowercase(),
            normalized.to_ascii_uppercase(),
        ] {
            let other = path::route(method, &variant, &rules);
            assert_eq!(
                route == Route::Proxy,
                other == Route::Proxy,
                "{method} {normalized:?} → {route:?} but {variant:?} → {other:?}"
            );
        }
        if let Route::Credentials(name) = &route {
            assert!(
                !name.is_empty() && !name.ends_with('/'),
                "{normalized:?}: credentials route with name {name:?}"
            );
        }
    }
}

fn assert_normalized(raw: &str, normalized: &str) {
    assert!(
        normalized.starts_with('/'),
        "{raw:?} → {normalized:?}: not absolute"
    );
    assert!(
        !normalized.chars().any(char::is_control),
        "{raw:?} → {normalized:?}: control character"
    );
    assert!(
        !normalized.contains('\\'),
        "{raw:?} → {normalized:?}: backslash"
    );
    assert!(
        !normalized.contains('%'),
        "{raw:?} → {normalized:?}: not fully decoded"
    );
    let relative = &normalized[1..];
    let inner = relative.strip_suffix('/').unwrap_or(relative);
    if !inner.is_empty() {
        for segment in inner.split('/') {
            assert!(
                !matches!(segment, "" | "." | ".."),
                "{raw:?} → {normalized:?}: segment {segment:?} survived"
            );
        }
    }
    let forwarded = path::encode(normalized);
    assert_eq!(
        path::normalize(&forwarded).as_deref(),
        Ok(normalized),
        "{raw:?} → {normalized:?} is forwarded as {forwarded:?}, which means something else"
    );
    if !normalized.contains(['?', '#']) {
        assert_eq!(
            path::normalize(normalized).as_deref(),
            Ok(normalized),
            "{raw:?} → {normalized:?} is not a fixed point"
        );
    }
}

/// Paths of the node's credentials and data, what they must normalize to (lowercase, without
/// the trailing slash), and whether the agent answers them itself (its IAM routes) rather than
/// refusing them.
const BLOCKED_BASES: [(&str, &str, bool); 12] = [
    (
        "/latest/meta-data/iam/security-credentials/../../user-data",
        "/latest/meta-data/user-data",
        false,
    ),
    ("/latest/user-data", "/latest/user-data", false),
    ("/2009-04-04/user-data/", "/2009-04-04/user-data", false),
    (
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        false,
    ),
    (
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/iam/security-credentials/node-role",
        true,
    ),
    (
        "/1.0/meta-data/iam/security-credentials/",
        "/1.0/meta-data/iam/security-credentials",
        true,
    ),
    (
        "/meta-data/iam/security-credentials/node-role",
        "/meta-data/iam/security-credentials/node-role",
        false,
    ),
    (
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/info",
        true,
    ),
    (
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/pkcs7",
        false,
    ),
    (
        "/latest/dynamic/instance-identity/signature",
        "/latest/dynamic/instance-identity/signature",
        false,
    ),
    (
        "/2021-03-23/dynamic/instance-identity/rsa2048",
        "/2021-03-23/dynamic/instance-identity/rsa2048",
        false,
    ),
    ("/k2i/user-data", "/k2i/user-data", false),
];

/// The input as a stream of choices; zero once it runs out.
struct Choices<'a>(std::slice::Iter<'a, u8>);

impl Choices<'_> {
    fn next(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }
}

fn percent(byte: u8, upper: bool) -> String {
    if upper {
        format!("%{byte:02X}")
    } else {
        format!("%{byte:02x}")
    }
}

/// Spells one character of a path in a way that any server that percent-decodes (once or
/// repeatedly), ignores case, treats `\` as `/` or resolves dot segments reads back unchanged —
/// or, when `lenient` allows it and the character ends a segment, in a way only a lenient server
/// reads back unchanged: `;params`, a trailing dot, an encoded `?`. Returns whether it chose one
/// of the lenient spellings.
fn spell_char(c: char, lenient: bool, choices: &mut Choices<'_>, out: &mut String) -> bool {
    let choice = choices.next();
    let upper = choice & 0x80 != 0;
    match choice & 0x0f {
        1 if c.is_ascii_alphabetic() => out.push(if c.is_ascii_lowercase() {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        }),
        2 if c.is_ascii() => out.push_str(&percent(c as u8, upper)),
        3 if c.is_ascii() => out.push_str(&format!("%25{}", &percent(c as u8, upper)[1..])),
        4 if c.is_ascii() => out.push_str(&format!("%2525{}", &percent(c as u8, upper)[1..])),
        5 if c == '/' => out.push_str("//"),
        6 if c == '/' => out.push_str("/./"),
        7 if c == '/' => out.push('\\'),
        8 if c == '/' => out.push_str(&percent(b'\\', upper)),
        9 if c == '/' => out.push_str("/k2i/../"),
        10 if c == '/' => out.push_str(&format!("/{}/", percent(b'.', upper))),
        11 if c == '/' => out.push_str(&format!("/k2i/{}{}/", percent(b'.', upper), ".")),
        12 if c == '/' => out.push_str("/./k2i/%2e%2E/"),
        13 if c == '/' && lenient => {
            out.push_str(if upper { ";K2I=1/" } else { ";k2i/" });
            return true;
        }
        14 if c == '/' && lenient => {
            out.push_str(if upper { "%2E/" } else { "./" });
            return true;
        }
        15 if c == '/' && lenient => {
            out.push_str(if upper { "%253F/" } else { "%3f/" });
            return true;
        }
        _ => out.push(c),
    }
    false
}

/// Every spelling of the node's credentials and data — user-data, identity credentials, the
/// IAM role under any version or none, the signed instance identity — built from the input as a
/// series of choices (case flips, single, double and triple percent-encoding, `//`, `/./`, `\`,
/// `x/..` detours, query strings, fragments, leading `..`, and what only a lenient upstream reads
/// back unchanged: `;params`, trailing dots, an encoded `?`) is refused as a bad path, refused,
/// or answered by the agent's own IAM routes — never forwarded. Spellings every server reads the
/// same way normalize to the path itself.
pub fn path_spellings(data: &[u8]) {
    let mut choices = Choices(data.iter());
    let (base, expected, own_route) = BLOCKED_BASES[choices.next() as usize % BLOCKED_BASES.len()];
    let mut spelled = String::new();
    match choices.next() % 4 {
        1 => spelled.push_str("/.."),
        2 => spelled.push_str("/../.."),
        3 => spelled.push_str("/%2e%2e"),
        _ => {}
    }
    let mut lenient = false;
    for (i, c) in base.char_indices() {
        // A suffix on the segment before the first `/` would make the path relative.
        lenient |= spell_char(c, i > 0, &mut choices, &mut spelled);
    }
    match choices.next() % 9 {
        1 => spelled.push('/'),
        2 => spelled.push_str("/."),
        3 => spelled.push_str("?x=1"),
        4 => spelled.push_str("#k2i"),
        5 => spelled.push_str("?../../meta-data/instance-id"),
        6 => {
            spelled.push_str(";k2i");
            lenient = true;
        }
        7 => {
            spelled.push('.');
            lenient = true;
        }
        8 => {
            spelled.push_str("%3F");
            lenient = true;
        }
        _ => {}
    }
    let normalized = match path::normalize(&spelled) {
        Ok(normalized) => normalized,
        Err(BadPath::Encoding) => return,
        Err(e) => panic!("{spelled:?} (a spelling of {base:?}) is refused as {e:?}"),
    };
    if !lenient {
        assert_eq!(
            normalized.to_ascii_lowercase().trim_end_matches('/'),
            expected,
            "{spelled:?} is a spelling of {base:?}"
        );
    }
    let rules = PathRules::default();
    for method in &METHODS {
        let route = path::route(method, &normalized, &rules);
        let answered_by_agent = matches!(
            route,
            Route::IamListing | Route::CredentialsList | Route::Credentials(_) | Route::IamInfo
        );
        assert!(
            // A lenient-only spelling may also turn a `..` into a plain segment, which can move
            // the path under the agent's own IAM routes: answered there, still never forwarded.
            matches!(route, Route::Blocked(_)) || ((own_route || lenient) && answered_by_agent),
            "{method} {spelled:?} (a spelling of {base:?}) → {normalized:?} → {route:?}"
        );
    }
}

/// Splits the input into `n` text fields at `\n`.
fn fields<const N: usize>(data: &[u8]) -> [String; N] {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(N, '\n');
    std::array::from_fn(|_| parts.next().unwrap_or("").to_owned())
}

const BASES: [&str; 3] = [
    "arn:aws:iam::123456789012:role/",
    "arn:aws-cn:iam::123456789012:role/eks/",
    "arn:aws-us-gov:iam::210987654321:role/a/b/",
];

fn fixed_base(selector: u8) -> Option<BaseArn> {
    let index = selector as usize % (BASES.len() + 1);
    BASES.get(index).map(|b| {
        BaseArn::parse(b).unwrap_or_else(|e| panic!("the fixed base {b:?} is invalid: {e}"))
    })
}

fn is_session_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

fn assert_role_invariants(input: &str, role: &RoleArn, base: Option<&BaseArn>) {
    let arn = role.as_str();
    assert_eq!(
        RoleArn::parse(arn).as_ref(),
        Ok(role),
        "{input:?} → {arn:?} does not re-parse to itself"
    );
    for b in [None, base] {
        assert_eq!(
            policy::resolve_role(arn, b).as_ref(),
            Ok(role),
            "resolving {arn:?} again (base {b:?}) changes it"
        );
    }
    assert_eq!(
        format!("{}{}", role.prefix(), role.path_and_name()),
        arn,
        "{input:?}: prefix + path/name"
    );
    assert!(
        role.prefix().ends_with(":role/") && role.prefix().starts_with("arn:"),
        "{input:?}: prefix {:?}",
        role.prefix()
    );
    let name = role.name();
    assert!(
        !name.is_empty()
            && name.len() <= policy::MAX_ROLE_NAME
            && name.chars().all(is_session_char)
            && role.path_and_name().ends_with(name),
        "{input:?}: role name {name:?}"
    );
    assert!(
        arn.len() <= "arn:aws-us-gov:iam::123456789012:role/".len() + policy::MAX_ROLE_PATH + 64,
        "{input:?}: {} bytes",
        arn.len()
    );
    let listed = policy::listed_name(role, base);
    assert!(arn.ends_with(listed), "listed {listed:?} for {arn:?}");
    if listed != arn {
        let base = base.map(BaseArn::as_str).unwrap_or("");
        assert_eq!(format!("{base}{listed}"), arn, "listed {listed:?}");
    }
}

/// Annotation and ARN parsing: `policy::resolve_role`, `RoleArn::parse`, `BaseArn`,
/// `validate_external_id` and session names never panic; a resolved role re-parses to itself and
/// resolves to itself again (idempotence), whatever the base; a parsed base re-parses to itself.
///
/// Input: `<selector byte><role annotation>\n<base ARN candidate>\n<external ID>`.
pub fn annotations(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let [value, base_text, external_id] = fields::<3>(rest);

    let parsed_base = BaseArn::parse(&base_text);
    if let Ok(base) = &parsed_base {
        assert!(base.as_str().ends_with('/'), "{base_text:?} → {base:?}");
        assert_eq!(
            BaseArn::parse(base.as_str()).as_ref(),
            Ok(base),
            "{base_text:?}: a parsed base re-parses to itself"
        );
        assert!(
            policy::resolve_role("x", Some(base)).is_ok(),
            "{base_text:?}: a valid base completes a valid name"
        );
    }
    if let Ok(base) = BaseArn::from_instance_profile(&base_text) {
        assert!(
            base.as_str().ends_with(":role/"),
            "{base_text:?} → {base:?}"
        );
        assert_eq!(BaseArn::parse(base.as_str()).as_ref(), Ok(&base));
    }

    let bases = [fixed_base(selector), parsed_base.ok()];
    for base in bases.iter().map(Option::as_ref) {
        let resolved = policy::resolve_role(&value, base);
        if let Ok(role) = &resolved {
            assert_role_invariants(&value, role, base);
            assert_eq!(
                policy::resolve_role(&format!(" {value}\t"), base).as_ref(),
                Ok(role),
                "surrounding whitespace changes {value:?}"
            );
        }
        if let Ok(arn) = RoleArn::parse(&value) {
            assert_role_invariants(&value, &arn, base);
        }
    }

    if let Ok(id) = policy::validate_external_id(&external_id) {
        assert_eq!(id, external_id);
        let len = id.chars().count();
        assert!(
            (policy::MIN_EXTERNAL_ID..=policy::MAX_EXTERNAL_ID).contains(&len),
            "external ID of {len} characters accepted"
        );
    }

    for name in [
        policy::node_session_name(&value),
        policy::pod_session_name(&value, &external_id),
        policy::session_name(&base_text),
    ] {
        assert!(
            (2..=policy::MAX_SESSION_NAME).contains(&name.len())
                && name.chars().all(is_session_char),
            "session name {name:?} breaks STS rules"
        );
    }
}

/// Namespace allowed-role patterns: `AllowedRoles::compile` with globs and regexps never panics,
/// compiles within `budget`, names the namespace when it refuses, accepts only patterns that are
/// valid on their own (so a pattern cannot break out of the anchoring), and matching is bounded
/// too. A literal glob allows exactly its own role; `*` allows every role of the base account;
/// without a base ARN, patterns that do not start with `arn:` allow nothing.
///
/// Input: `<flags byte><annotation or patterns>\n<role annotation>`. Flag bit 0 picks regexp
/// over glob; bit 1 takes the text as the raw annotation, otherwise the text is a tab-separated
/// list of patterns, encoded as the JSON array; bits 2–3 pick the base ARN.
pub fn allowed_roles(data: &[u8], budget: Duration) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let format = if flags & 1 != 0 {
        PatternFormat::Regexp
    } else {
        PatternFormat::Glob
    };
    let [text, role_value] = fields::<2>(rest);
    let annotation = if flags & 2 != 0 {
        text
    } else {
        let patterns: Vec<&str> = text.split('\t').collect();
        serde_json::to_string(&patterns).unwrap_or_else(|e| panic!("JSON of {patterns:?}: {e}"))
    };
    let base = fixed_base(flags >> 2);
    let base = base.as_ref();

    let started = Instant::now();
    let compiled = AllowedRoles::compile("team", "k2i/allowed", &annotation, format);
    let elapsed = started.elapsed();
    assert!(
        elapsed < budget,
        "compiling {annotation:?} ({format:?}) took {elapsed:?}"
    );
    let allowed = match compiled {
        Ok(allowed) => allowed,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("namespace team"),
                "the refusal does not name the namespace: {message}"
            );
            return;
        }
    };
    let sources: Vec<String> = allowed.sources().into_iter().map(str::to_owned).collect();
    for source in &sources {
        match format {
            PatternFormat::Regexp => assert!(
                regex::Regex::new(source).is_ok(),
                "regexp pattern {source:?} was accepted but is not a regular expression on its \
                 own: anchoring it as ^(?:…)$ does not hold"
            ),
            PatternFormat::Glob => assert!(
                policy::glob_to_regex(source).is_ok(),
                "glob {source:?} accepted but does not translate"
            ),
        }
    }

    let Ok(role) = policy::resolve_role(&role_value, base) else {
        return;
    };
    let started = Instant::now();
    let allows = allowed.allows(&role, base);
    let elapsed = started.elapsed();
    assert!(
        elapsed < budget,
        "matching {} against {annotation:?} took {elapsed:?}",
        role.as_str()
    );
    // A pattern without `arn:` names roles relative to the base ARN: without one it allows
    // nothing (it would otherwise allow its roles in every account).
    if base.is_none() && sources.iter().all(|s| !s.starts_with("arn:")) {
        assert!(
            !allows,
            "{sources:?} has no full-ARN pattern and there is no base ARN, but allows {}",
            role.as_str()
        );
    }
    if let Some(subject) = base.and_then(|b| role.as_str().strip_prefix(b.as_str()))
        && format == PatternFormat::Glob
    {
        if sources.iter().any(|s| s == "*") {
            assert!(allows, "* allows {}", role.as_str());
        }
        let literal = |s: &str| !s.starts_with("arn:") && !s.contains(['*', '?', '[', '{', '\\']);
        if sources.iter().all(|s| literal(s)) {
            assert_eq!(
                allows,
                sources.iter().any(|s| s == subject),
                "literal globs {sources:?} and role {} (subject {subject:?})",
                role.as_str()
            );
        }
    }
}
