//! The node's "real IMDS": an EC2 instance metadata service emulator bound inside a test node at
//! 169.254.169.254:80 and [fd00:ec2::254]:80.
//!
//! It follows EC2's behaviour where clients depend on it: IMDSv2 session tokens
//! (`PUT /latest/api/token` with a TTL of 1..=21600 s, refused when `X-Forwarded-For` is
//! present, 401 for an invalid or expired token, token-less GETs refused in
//! `tokens_required` mode), directory listings, the credential and `iam/info` documents
//! (pretty-printed JSON with `" : "` separators, as EC2 prints them), user-data and EC2's
//! XHTML error pages. The node role's access key is [`NODE_ACCESS_KEY_ID`], a sentinel: a pod
//! that ever holds it has the node's credentials.
//!
//! Every request is recorded with its caller, and so is every accepted connection (before a
//! byte is read), so a pod that reached the node's metadata service is caught even if it sent
//! nothing.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, body::Incoming};

use crate::{
    HOST_IP4, Pod, TestNode,
    encode::{base64, random_bytes, rfc3339},
    metadata_addr4, metadata_addr6,
    ns_runtime::{Handler, HttpServer, response},
};

/// The node role's access key id: a sentinel that must never reach a pod.
pub const NODE_ACCESS_KEY_ID: &str = "ASIANODESENTINEL0001";
/// The access key id of the instance identity credentials
/// (`identity-credentials/ec2/security-credentials/ec2-instance`): also node-only.
pub const NODE_IDENTITY_ACCESS_KEY_ID: &str = "ASIANODEIDENTITY0001";
/// The node's instance profile role, as listed under `iam/security-credentials/`.
pub const NODE_ROLE: &str = "node-role";
pub const NODE_ACCOUNT_ID: &str = "123456789012";
pub const INSTANCE_PROFILE_ARN: &str = "arn:aws:iam::123456789012:instance-profile/node-profile";
pub const INSTANCE_PROFILE_ID: &str = "AIPAK2ITESTNODEPROFILE";
pub const INSTANCE_ID: &str = "i-0k2i0test0node01";
pub const REGION: &str = "us-west-2";
pub const AVAILABILITY_ZONE: &str = "us-west-2a";
/// The node's user-data, which must never reach a pod.
pub const USER_DATA: &str = "#!/bin/bash\n# k2i test node user-data: node secrets live here\n\
                             /etc/eks/bootstrap.sh k2i-test --kubelet-extra-args '--node-labels=k2i=test'\n";
/// The node's signed instance identity (`dynamic/instance-identity/pkcs7`, `signature`,
/// `rsa2048`) starts with this sentinel: a pod that holds it can log in as the node wherever
/// the instance identity is trusted.
pub const NODE_SIGNATURE_SENTINEL: &str = "K2I-NODE-SIGNED-IDENTITY";
/// How long the node credentials are valid from the emulator's start.
pub const NODE_CREDENTIALS_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// The longest token TTL IMDS accepts.
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;

/// The metadata API versions the emulator answers to, besides `latest`.
const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
];

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// A credentials document's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub last_updated: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub expiration: String,
}

impl NodeCredentials {
    fn generate(access_key_id: &str, now: SystemTime) -> Self {
        Self {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: base64(&random_bytes(30)),
            token: format!("IQoJb3JpZ2luX2VjE{}", base64(&random_bytes(240))),
            last_updated: rfc3339(now),
            expiration: rfc3339(now + NODE_CREDENTIALS_LIFETIME),
        }
    }

    /// The document EC2 serves at `iam/security-credentials/<role>`.
    pub fn document(&self) -> String {
        format!(
            "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \
             \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \
             \"Token\" : \"{}\",\n  \"Expiration\" : \"{}\"\n}}",
            self.last_updated,
            self.access_key_id,
            self.secret_access_key,
            self.token,
            self.expiration
        )
    }
}

/// Whether and how a request presented an IMDSv2 session token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenUse {
    /// No `X-aws-ec2-metadata-token` header (IMDSv1).
    Absent,
    Valid,
    /// Unknown, malformed or expired.
    Invalid,
}

/// One request the emulator received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsRequest {
    /// The address it arrived at (169.254.169.254:80 or [fd00:ec2::254]:80).
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub method: String,
    /// The path as sent (query excluded).
    pub path: String,
    pub token: TokenUse,
    pub forwarded_for: Option<String>,
    /// The status it answered; `None` while the answer is pending (delay) or if the client left.
    pub status: Option<u16>,
}

#[derive(Default)]
struct Settings {
    delay: Duration,
    tokens_required: bool,
    lenient: bool,
}

struct ImdsState {
    settings: Mutex<Settings>,
    /// Token → when it expires.
    tokens: Mutex<HashMap<String, Instant>>,
    requests: Mutex<Vec<ImdsRequest>>,
    /// (local, peer) of every accepted connection.
    connections: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    /// Leaf paths under a version (`meta-data/instance-id`, `user-data`, …) → content type, body.
    leaves: BTreeMap<String, (&'static str, String)>,
    node_credentials: NodeCredentials,
    identity_credentials: NodeCredentials,
}

/// The IMDS emulator. Stops (closing its listeners) on drop.
pub struct ImdsEmulator {
    server: HttpServer<ImdsState>,
}

impl ImdsEmulator {
    /// Listens at 169.254.169.254:80 and [fd00:ec2::254]:80 inside `node` (behind its uplink
    /// with [`TestNode::with_uplink`]).
    pub fn start(node: &TestNode) -> Self {
        let now = SystemTime::now();
        let node_credentials = NodeCredentials::generate(NODE_ACCESS_KEY_ID, now);
        let identity_credentials = NodeCredentials::generate(NODE_IDENTITY_ACCESS_KEY_ID, now);
        let state = ImdsState {
            settings: Mutex::default(),
            tokens: Mutex::default(),
            requests: Mutex::default(),
            connections: Mutex::default(),
            leaves: leaves(now, &node_credentials, &identity_credentials),
            node_credentials,
            identity_credentials,
        };
        Self {
            server: HttpServer::start(
                "imds-emulator",
                &node.metadata_netns_path(),
                &[metadata_addr4(), metadata_addr6()],
                state,
            ),
        }
    }

    /// The node role's credentials it serves (access key [`NODE_ACCESS_KEY_ID`]).
    pub fn node_credentials(&self) -> &NodeCredentials {
        &self.server.handler().node_credentials
    }

    /// The instance identity credentials it serves (access key [`NODE_IDENTITY_ACCESS_KEY_ID`]).
    pub fn identity_credentials(&self) -> &NodeCredentials {
        &self.server.handler().identity_credentials
    }

    /// Down: the listeners close and open connections are dropped, so clients get "connection
    /// refused" (or a closed connection). Up: it listens again.
    pub fn set_down(&self, down: bool) {
        self.server.set_up(!down);
    }

    pub fn is_down(&self) -> bool {
        !self.server.is_up()
    }

    /// Every answer waits this long first (a slow upstream). Zero by default.
    pub fn set_delay(&self, delay: Duration) {
        self.server
            .handler()
            .settings
            .lock()
            .expect("settings")
            .delay = delay;
    }

    /// Required: token-less (IMDSv1) GETs get 401, as with `HttpTokens=required` on EC2.
    pub fn set_tokens_required(&self, required: bool) {
        self.server
            .handler()
            .settings
            .lock()
            .expect("settings")
            .tokens_required = required;
    }

    /// Lenient: paths are read as a server less strict than IMDS might read them (see
    /// [`lenient_path`]), so that `/meta-data/iam/security-credentials/node-role` or
    /// `/latest/meta-data/iam;x/security-credentials/node-role` answer with the node's
    /// credentials. The real IMDS may or may not be this lenient; tests must hold either way.
    pub fn set_lenient(&self, lenient: bool) {
        self.server
            .handler()
            .settings
            .lock()
            .expect("settings")
            .lenient = lenient;
    }

    /// Every request received, in arrival order.
    pub fn callers(&self) -> Vec<ImdsRequest> {
        self.server
            .handler()
            .requests
            .lock()
            .expect("requests")
            .clone()
    }

    /// The requests for `path` (exact match).
    pub fn requests_for(&self, path: &str) -> Vec<ImdsRequest> {
        self.callers()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The peer of every accepted connection, in order (including connections that sent
    /// nothing).
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.server
            .handler()
            .connections
            .lock()
            .expect("connections")
            .iter()
            .map(|(_, peer)| *peer)
            .collect()
    }

    /// Every IP it saw, from connections and requests (IPv4-mapped forms shown as IPv4).
    pub fn caller_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .connections()
            .iter()
            .chain(self.callers().iter().map(|r| &r.peer))
            .map(|peer| peer.ip().to_canonical())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    pub fn saw(&self, ip: IpAddr) -> bool {
        self.caller_ips().contains(&ip.to_canonical())
    }

    /// Panics if any of `pods` ever reached the node's metadata service: an interception leak.
    pub fn assert_no_pod_seen(&self, pods: &[&Pod<'_>]) {
        let ips = self.caller_ips();
        for pod in pods {
            if ips.iter().any(|ip| pod.owns(*ip)) {
                let requests: Vec<String> = self
                    .callers()
                    .iter()
                    .filter(|r| pod.owns(r.peer.ip()))
                    .map(|r| format!("{} {} -> {:?}", r.method, r.path, r.status))
                    .collect();
                panic!(
                    "LEAK: pod {} ({} / {}) reached the node's metadata service directly; its \
                     requests there: {requests:?}; all IMDS callers: {ips:?}",
                    pod.name(),
                    pod.ip4(),
                    pod.ip6()
                );
            }
        }
    }
}

impl Handler for ImdsState {
    fn accepted(&self, local: SocketAddr, peer: SocketAddr) {
        self.connections
            .lock()
            .expect("connections")
            .push((local, peer));
    }

    async fn handle(
        self: Arc<Self>,
        local: SocketAddr,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let headers = request.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let token = match header(TOKEN_HEADER) {
            None => TokenUse::Absent,
            Some(token) if self.token_valid(&token) => TokenUse::Valid,
            Some(_) => TokenUse::Invalid,
        };
        let record = ImdsRequest {
            local,
            peer,
            method: request.method().as_str().to_owned(),
            path: request.uri().path().to_owned(),
            token,
            forwarded_for: header("x-forwarded-for"),
            status: None,
        };
        let index = {
            let mut requests = self.requests.lock().expect("requests");
            requests.push(record.clone());
            requests.len() - 1
        };
        let delay = self.settings.lock().expect("settings").delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let answer = self.answer(&record, request.method(), header(TTL_HEADER).as_deref());
        self.requests.lock().expect("requests")[index].status = Some(answer.status().as_u16());
        answer
    }
}

impl ImdsState {
    fn token_valid(&self, token: &str) -> bool {
        let mut tokens = self.tokens.lock().expect("tokens");
        let now = Instant::now();
        tokens.retain(|_, expiry| *expiry > now);
        tokens.contains_key(token)
    }

    fn answer(
        &self,
        request: &ImdsRequest,
        method: &Method,
        ttl: Option<&str>,
    ) -> Response<Full<Bytes>> {
        if request.path == TOKEN_PATH {
            if method != Method::PUT {
                return error_page(405);
            }
            if request.forwarded_for.is_some() {
                return error_page(403);
            }
            let Some(ttl) = ttl
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|t| (1..=MAX_TOKEN_TTL_SECONDS).contains(t))
            else {
                return error_page(400);
            };
            let token = base64(&random_bytes(42));
            self.tokens.lock().expect("tokens").insert(
                token.clone(),
                Instant::now() + Duration::from_secs(u64::from(ttl)),
            );
            return response(
                200,
                &[
                    ("content-type", "text/plain"),
                    ("server", "EC2ws"),
                    (TTL_HEADER, &ttl.to_string()),
                ],
                token,
            );
        }
        if method != Method::GET && method != Method::HEAD {
            return error_page(405);
        }
        match request.token {
            TokenUse::Invalid => return error_page(401),
            TokenUse::Absent if self.settings.lock().expect("settings").tokens_required => {
                return error_page(401);
            }
            _ => {}
        }
        let lenient = self.settings.lock().expect("settings").lenient;
        let path = if lenient {
            lenient_path(&request.path)
        } else {
            request.path.clone()
        };
        match self.lookup(&path) {
            Some((content_type, body)) => response(
                200,
                &[("content-type", content_type), ("server", "EC2ws")],
                body,
            ),
            None => error_page(404),
        }
    }

    /// The content at `path`: a leaf, or a directory listing (entries one per line,
    /// subdirectories with a trailing `/`), with or without a trailing slash.
    fn lookup(&self, path: &str) -> Option<(&'static str, String)> {
        let rest = path.strip_prefix('/')?;
        if rest.is_empty() {
            let mut versions: Vec<&str> = VERSIONS.to_vec();
            versions.push("latest");
            return Some(("text/plain", versions.join("\n")));
        }
        let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if version != "latest" && !VERSIONS.contains(&version) {
            return None;
        }
        if let Some(leaf) = self.leaves.get(rest) {
            return Some(leaf.clone());
        }
        let dir = rest.strip_suffix('/').unwrap_or(rest);
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut entries: Vec<String> = Vec::new();
        for key in self.leaves.keys() {
            let Some(below) = key.strip_prefix(&prefix) else {
                continue;
            };
            let entry = match below.split_once('/') {
                Some((sub, _)) => format!("{sub}/"),
                None => below.to_owned(),
            };
            if entries.last() != Some(&entry) {
                entries.push(entry);
            }
        }
        (!entries.is_empty()).then(|| ("text/plain", entries.join("\n")))
    }
}

/// How a lenient server reads a request path: percent-decoded once, cut at a decoded `?` or `#`,
/// each segment without `;params`, in lower case and without trailing dots or spaces, dot
/// segments resolved, and the version segment ignored (missing, or any value, reads as `latest`).
pub fn lenient_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                decoded.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let path = decoded.split(['?', '#']).next().unwrap_or("");
    let trailing = path.ends_with('/');
    let mut segments: Vec<String> = Vec::new();
    for raw in path.split('/') {
        let lower = raw.split(';').next().unwrap_or("").to_lowercase();
        match lower.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                let trimmed = s.trim_end_matches(['.', ' ']);
                if !trimmed.is_empty() {
                    segments.push(trimmed.to_owned());
                }
            }
        }
    }
    // The version segment is ignored: missing before a category, or anything at all.
    match segments.first().map(String::as_str) {
        None => {}
        Some(v) if v == "latest" || VERSIONS.contains(&v) => {}
        Some("meta-data" | "dynamic" | "user-data") => segments.insert(0, "latest".to_owned()),
        Some(_) => segments[0] = "latest".to_owned(),
    }
    let mut out = format!("/{}", segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// EC2's XHTML error page for `status`.
fn error_page(status: u16) -> Response<Full<Bytes>> {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD \
         XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n <head>\n  \
         <title>{status} - {reason}</title>\n </head>\n <body>\n  <h1>{status} - {reason}</h1>\n \
         </body>\n</html>\n"
    );
    response(
        status,
        &[("content-type", "text/html"), ("server", "EC2ws")],
        body,
    )
}

/// Every leaf under a version directory, with its content type and body.
fn leaves(
    now: SystemTime,
    node: &NodeCredentials,
    identity: &NodeCredentials,
) -> BTreeMap<String, (&'static str, String)> {
    let hostname = format!(
        "ip-{}.{REGION}.compute.internal",
        HOST_IP4.to_string().replace('.', "-")
    );
    let iam_info = format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"InstanceProfileArn\" : \
         \"{INSTANCE_PROFILE_ARN}\",\n  \"InstanceProfileId\" : \"{INSTANCE_PROFILE_ID}\"\n}}",
        rfc3339(now)
    );
    let identity_info = format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"AccountId\" : \
         \"{NODE_ACCOUNT_ID}\"\n}}",
        rfc3339(now)
    );
    let document = format!(
        "{{\n  \"accountId\" : \"{NODE_ACCOUNT_ID}\",\n  \"architecture\" : \"x86_64\",\n  \
         \"availabilityZone\" : \"{AVAILABILITY_ZONE}\",\n  \"imageId\" : \
         \"ami-0k2i0test0image1\",\n  \"instanceId\" : \"{INSTANCE_ID}\",\n  \"instanceType\" : \
         \"m5.large\",\n  \"pendingTime\" : \"{}\",\n  \"privateIp\" : \"{HOST_IP4}\",\n  \
         \"region\" : \"{REGION}\",\n  \"version\" : \"2017-09-30\"\n}}",
        rfc3339(now)
    );
    let text = "text/plain";
    [
        (
            "user-data",
            "application/octet-stream",
            USER_DATA.to_owned(),
        ),
        ("meta-data/ami-id", text, "ami-0k2i0test0image1".to_owned()),
        ("meta-data/ami-launch-index", text, "0".to_owned()),
        ("meta-data/hostname", text, hostname.clone()),
        ("meta-data/instance-id", text, INSTANCE_ID.to_owned()),
        ("meta-data/instance-type", text, "m5.large".to_owned()),
        ("meta-data/local-hostname", text, hostname),
        ("meta-data/local-ipv4", text, HOST_IP4.to_string()),
        ("meta-data/mac", text, "02:00:c0:00:02:0a".to_owned()),
        (
            "meta-data/placement/availability-zone",
            text,
            AVAILABILITY_ZONE.to_owned(),
        ),
        (
            "meta-data/placement/availability-zone-id",
            text,
            "usw2-az1".to_owned(),
        ),
        ("meta-data/placement/region", text, REGION.to_owned()),
        (
            "meta-data/services/domain",
            text,
            "amazonaws.com".to_owned(),
        ),
        ("meta-data/services/partition", text, "aws".to_owned()),
        ("meta-data/iam/info", text, iam_info),
        (
            "meta-data/iam/security-credentials/node-role",
            text,
            node.document(),
        ),
        (
            "meta-data/identity-credentials/ec2/info",
            text,
            identity_info,
        ),
        (
            "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            text,
            identity.document(),
        ),
        ("dynamic/instance-identity/document", text, document),
        (
            "dynamic/instance-identity/pkcs7",
            text,
            format!("{NODE_SIGNATURE_SENTINEL}-PKCS7"),
        ),
        (
            "dynamic/instance-identity/signature",
            text,
            format!("{NODE_SIGNATURE_SENTINEL}-SIGNATURE"),
        ),
        (
            "dynamic/instance-identity/rsa2048",
            text,
            format!("{NODE_SIGNATURE_SENTINEL}-RSA2048"),
        ),
    ]
    .into_iter()
    .map(|(path, content_type, body)| (path.to_owned(), (content_type, body)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::lenient_path;

    #[test]
    fn lenient_reading_of_paths() {
        for (raw, read) in [
            (
                "/latest/meta-data/instance-id",
                "/latest/meta-data/instance-id",
            ),
            (
                "/meta-data/iam/security-credentials/node-role",
                "/latest/meta-data/iam/security-credentials/node-role",
            ),
            (
                "/x/meta-data/iam/security-credentials/",
                "/latest/meta-data/iam/security-credentials/",
            ),
            (
                "/1.0/meta-data/iam/security-credentials/",
                "/1.0/meta-data/iam/security-credentials/",
            ),
            (
                "/latest/meta-data/iam;x/security-credentials/node-role",
                "/latest/meta-data/iam/security-credentials/node-role",
            ),
            (
                "/latest/meta-data/iam./security-credentials/node-role",
                "/latest/meta-data/iam/security-credentials/node-role",
            ),
            (
                "/latest/meta-data/iam%3F/security-credentials/",
                "/latest/meta-data/iam",
            ),
            (
                "/LATEST/Dynamic/instance-identity/RSA2048;x",
                "/latest/dynamic/instance-identity/rsa2048",
            ),
            (
                "/latest/meta-data/placement/..;/iam/info",
                "/latest/meta-data/iam/info",
            ),
            ("/", "/"),
        ] {
            assert_eq!(lenient_path(raw), read, "{raw}");
        }
    }
}
