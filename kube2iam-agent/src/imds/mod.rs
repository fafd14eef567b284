//! The metadata server pods reach through the redirect: IMDS-compatible answers for the pod's
//! own role, IMDSv2 tokens bound to the pod, the node's credentials and data never forwarded,
//! metadata that is safe for any pod (an allow list) proxied to the node's metadata service.

mod header_clock;
mod health;
pub mod path;
#[cfg(test)]
mod tests;
pub mod token;
pub mod upstream;
mod usage;

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures::future::Either;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::Semaphore};

use self::{
    header_clock::HeaderClock,
    path::{PathRules, Route},
    token::TokenIssuer,
    upstream::Upstream,
};
use crate::{
    attest::{self, AttestMap, Caller, CgroupPods},
    credentials::{CacheKey, CredentialCache, Held, Issued, Session, StsError, imds_time},
    decision::{self, Decision, Known, Namespace, Outcome, Refusal},
    events::{PodEvents, Reason},
    identity::{CallerView, PodIdentity, Registry},
    kube::Namespaces,
    metrics::{RequestMetrics, RouteLabel},
    policy,
    service_accounts::{AccountRole, ServiceAccounts},
    session_tags::SessionTagging,
    telemetry::LogLimiter,
};

// Header names made once: a name given as a string is parsed on every lookup.
const TOKEN_HEADER: header::HeaderName =
    header::HeaderName::from_static("x-aws-ec2-metadata-token");
const TTL_HEADER: header::HeaderName =
    header::HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
const FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

/// Whether token-less (IMDSv1) requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TokenMode {
    #[default]
    Optional,
    Required,
}

/// How the server decides and answers.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Who gets which role.
    pub decision: decision::Rules,
    pub pod_wait: Duration,
    pub tokens: TokenMode,
    pub namespace_restrictions: bool,
    pub session_per_pod: bool,
    /// Sessions named as kube2iam named them, one per pod.
    pub kube2iam_session_names: bool,
    /// The agent's address on the node, which kube2iam's `/healthz` reported.
    pub host_ip: IpAddr,
    /// Session tags and source identity on AssumeRole.
    pub sessions: SessionTagging,
    /// Pods without a role annotation get their ServiceAccount's role.
    pub service_account_roles: bool,
    pub rules: PathRules,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Connections one source address may hold open at once.
    pub max_connections_per_caller: usize,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

/// The kernel side of attestation: the pinned record map and the cgroup → pod resolver.
pub struct Attestation {
    /// `None` where the kernel could not attach the sock_ops program.
    pub map: Option<AttestMap>,
    pub cgroups: Arc<CgroupPods>,
    pub host_netns_cookie: u64,
}

/// What the handlers share.
pub struct State {
    pub config: ServerConfig,
    pub registry: Arc<Registry>,
    pub namespaces: Arc<Namespaces>,
    pub service_accounts: Arc<ServiceAccounts>,
    pub cache: Arc<CredentialCache>,
    pub upstream: Arc<Upstream>,
    pub tokens: TokenIssuer,
    pub stats: RequestMetrics,
    /// Events on pods that are refused.
    pub events: Arc<PodEvents>,
    pub attestation: Attestation,
    /// Open connections per caller.
    pub per_caller: Mutex<HashMap<CallerKey, usize>>,
    /// Keeps refusals from flooding the log.
    pub refusal_log: LogLimiter,
    /// The node's session name, made once (from `config.decision.node`).
    pub node_session: OnceLock<String>,
}

/// The registry's view for one look, owned so [`Known`] can borrow it.
struct Snapshot<'a> {
    view: CallerView,
    cgroup_root: &'a std::path::Path,
    pods_attestable: bool,
}

impl Snapshot<'_> {
    fn known<'a>(&'a self, caller: &'a Caller, peer: IpAddr) -> Known<'a> {
        Known {
            peer,
            caller,
            claimants: &self.view.claimants,
            pinned: self.view.pinned.as_ref(),
            host_pod: self.view.host_pod.as_ref(),
            attested: self.view.attested.as_ref(),
            synced: self.view.synced,
            cgroup_root: self.cgroup_root,
            pods_attestable: self.pods_attestable,
        }
    }
}

/// The counts of changes to everything a caller's pod and role are decided from: the registry,
/// the namespaces, the ServiceAccounts and the cgroup scan (the rules, the caller and its
/// address do not change for a connection). Read before any of them is read, so a decision is
/// never filed under a count newer than what it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct World {
    pods: u64,
    namespaces: u64,
    accounts: u64,
    cgroups: u64,
}

/// What a connection's requests found, for its next request while the [`World`] it was found
/// in is unchanged: the calling pod, and the role decided for it with the cache entry of its
/// credentials. Only what was found is kept; a refusal is decided afresh each time.
struct Remembered {
    world: World,
    pod: Arc<PodIdentity>,
    role: Option<Role>,
}

struct Role {
    decision: Decision,
    /// The credentials' cache entry, once a request asked for them.
    cached: Option<Cached>,
}

struct Cached {
    key: CacheKey,
    held: Held,
    /// What the connection last served from the entry, to serve again while the cache says it
    /// would give the same ([`CredentialCache::reuse`]).
    served: Option<Served>,
}

struct Served {
    /// The entry's version, read just before the credentials were got.
    version: u64,
    creds: Arc<Issued>,
    document: Bytes,
    /// Whether `document` is this connection's own copy. The answer every connection shares
    /// counts its users in one place, which each request would move between the runtime's
    /// threads; a connection that serves it a second time takes a copy of its own.
    own: bool,
}

/// One connection: who is calling and from where (fixed for its life), what its last request
/// found, and how long it has waited for its next request's headers.
struct Conn {
    /// The server's state, held once per connection: a clone per request would move its
    /// count between the runtime's threads on every request.
    state: Arc<State>,
    caller: Caller,
    peer: IpAddr,
    remembered: Mutex<Option<Remembered>>,
    headers: HeaderClock,
}

impl Conn {
    /// What the last request found, if the world is still the one it was found in.
    fn recall(&self, world: World) -> Option<Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|r| r.world == world)
    }

    fn remember(&self, found: Option<Remembered>) {
        *self.remembered.lock().unwrap_or_else(|p| p.into_inner()) = found;
    }
}

/// An answer the agent gives itself.
struct Reply {
    status: StatusCode,
    body: String,
}

impl Reply {
    fn new(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            body: body.into(),
        }
    }
}

/// The answer to a request that found `body`, or was refused.
fn reply<B: Into<Bytes>>(result: Result<B, Reply>) -> Response<Full<Bytes>> {
    match result {
        Ok(body) => text(StatusCode::OK, body),
        Err(r) => text(r.status, r.body),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

/// Metadata requests have no body. A few bytes are tolerated (and ignored) for clients that send
/// one anyway; anything larger, or of unknown length (chunked), is refused unread.
pub const MAX_BODY_BYTES: u64 = 1024;

/// The body's size when it is too large to accept (`None`: no body, or a small one).
fn oversized_body(request: &Request<Incoming>) -> Option<String> {
    use hyper::body::Body as _;
    match request.body().size_hint().upper() {
        Some(n) if n <= MAX_BODY_BYTES => None,
        Some(n) => Some(format!("{n} bytes")),
        None => Some("a body of unknown length (chunked)".to_owned()),
    }
}

/// Whether a request's IMDSv2 token admits it, checked when it arrives.
enum TokenCheck {
    Valid,
    Missing,
    Rejected(token::Invalid),
}

/// What the path asks for.
enum Target {
    Refused(path::BadPath),
    Health,
    Route { normalized: String, route: Route },
}

/// What a request asks, taken from it before its answer is awaited, so the request (which
/// shares the connection's read buffer) is gone by then. Hyper reads ahead on a kept-alive
/// connection while an answer is pending; a request still alive then keeps that buffer shared,
/// and each request would cost the connection a fresh 8 KiB buffer.
struct Head {
    method: Method,
    target: Target,
    /// The path as sent (without the query), kept only where it differs from the normalized
    /// one: for the log.
    sent_path: Option<String>,
    oversized: Option<String>,
    token: TokenCheck,
    /// For the token route: the token's requested lifetime (`None`: no such header), and
    /// whether the request was forwarded.
    ttl: Option<Result<Duration, String>>,
    forwarded: bool,
    /// For the proxy only.
    accept: Option<String>,
}

impl Head {
    fn of(request: &Request<Incoming>, state: &State, peer: IpAddr) -> Head {
        let method = request.method().clone();
        let sent = request.uri().path();
        let (target, sent_path) = match path::normalize(sent) {
            Err(e) => (Target::Refused(e), Some(sent.to_owned())),
            Ok(normalized) => {
                let sent_path = (normalized != sent).then(|| sent.to_owned());
                let target = if normalized == health::PATH {
                    Target::Health
                } else {
                    let route = path::route(&method, &normalized, &state.config.rules);
                    Target::Route { normalized, route }
                };
                (target, sent_path)
            }
        };
        let headers = request.headers();
        let token = match headers.get(&TOKEN_HEADER) {
            Some(value) => {
                let token = value.to_str().unwrap_or("");
                match state.tokens.check(token, peer, SystemTime::now()) {
                    Ok(()) => TokenCheck::Valid,
                    Err(why) => TokenCheck::Rejected(why),
                }
            }
            None => TokenCheck::Missing,
        };
        // The token route's own headers, read for every request: whether a request reaches
        // that route is decided apart from this.
        let ttl = headers
            .get(&TTL_HEADER)
            .map(|v| token::parse_ttl(Some(v.to_str().unwrap_or("invalid"))));
        let accept = match &target {
            Target::Route {
                route: Route::Proxy,
                ..
            } => headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            _ => None,
        };
        Head {
            oversized: oversized_body(request),
            forwarded: headers.contains_key(&FORWARDED_FOR),
            method,
            target,
            sent_path,
            token,
            ttl,
            accept,
        }
    }

    /// The path as sent, for the log.
    fn sent_path(&self) -> &str {
        match (&self.sent_path, &self.target) {
            (Some(sent), _) => sent,
            (None, Target::Route { normalized, .. }) => normalized,
            (None, Target::Health) => health::PATH,
            (None, Target::Refused(_)) => "",
        }
    }
}

/// The IMDS credential document.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument<'a> {
    code: &'a str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
}

impl State {
    fn namespace_of(&self, namespace: &str) -> Namespace {
        Namespace::from_lookup(
            self.config.namespace_restrictions,
            self.namespaces.synced(),
            || self.namespaces.get(namespace),
        )
    }

    /// The role the pod's ServiceAccount names, as far as the watches know it.
    fn account_of(&self, pod: &PodIdentity) -> AccountRole {
        if !self.config.service_account_roles {
            return AccountRole::Off;
        }
        match &pod.account {
            Some(account) => self.service_accounts.role(&pod.namespace, &account.name),
            None => AccountRole::NotListed,
        }
    }

    fn world(&self) -> World {
        World {
            pods: self.registry.generation(),
            namespaces: self.namespaces.generation(),
            accounts: self.service_accounts.generation(),
            cgroups: self.attestation.cgroups.generation(),
        }
    }

    /// The role of the pod in `found`, decided by the first request that needed it.
    async fn role_of<'f>(
        &self,
        found: &'f mut Remembered,
        caller: &Caller,
        peer: IpAddr,
    ) -> Result<&'f mut Role, Reply> {
        if found.role.is_none() {
            let decision = self.decide_for(&found.pod, caller, peer).await?;
            // After a wait, the caller is identified afresh: keep the pod the role is for.
            if decision.pod.uid != found.pod.uid {
                found.pod = decision.pod.clone();
            }
            found.role = Some(Role {
                decision,
                cached: None,
            });
        }
        Ok(found.role.as_mut().expect("decided above"))
    }

    /// What the registry knows of `peer` and the attested pod, right now.
    fn snapshot(&self, caller: &Caller, peer: IpAddr) -> Snapshot<'_> {
        let attested = match caller {
            Caller::Pod { uid, .. } => Some(uid.as_str()),
            _ => None,
        };
        Snapshot {
            view: self.registry.view(peer, attested),
            cgroup_root: self.attestation.cgroups.root(),
            pods_attestable: self.attestation.cgroups.pod_count() > 0,
        }
    }

    fn look(&self, caller: &Caller, peer: IpAddr, last_look: bool) -> Outcome<Decision> {
        let snapshot = self.snapshot(caller, peer);
        decision::decide(
            &self.config.decision,
            &snapshot.known(caller, peer),
            |ns| self.namespace_of(ns),
            |pod| self.account_of(pod),
            last_look,
        )
    }

    /// Who is calling and which role they get, or the reason they get none. Waits up to
    /// `--pod-wait` for the watches to bring what is missing, woken by each change.
    async fn decide(&self, caller: &Caller, peer: IpAddr) -> Result<Decision, Reply> {
        // Pod changes wake the registry; namespace lists are waited for in short steps.
        self.wait_for(Some(Duration::from_millis(100)), |last_look| {
            self.look(caller, peer, last_look)
        })
        .await
    }

    /// The role of `pod`, which [`State::caller_pod`] found calling: decided at once from
    /// what it found, else (something the watches may still bring is missing) as
    /// [`State::decide`] decides, looking at the caller afresh each time.
    async fn decide_for(
        &self,
        pod: &Arc<PodIdentity>,
        caller: &Caller,
        peer: IpAddr,
    ) -> Result<Decision, Reply> {
        let namespace = self.namespace_of(&pod.namespace);
        let account = self.account_of(pod);
        match decision::role(&self.config.decision, pod, &namespace, &account, false) {
            Outcome::Ok(decision) => Ok(decision),
            Outcome::Refuse(refusal) => Err(self.refuse(refusal)),
            // Boxed, as in wait_for.
            Outcome::Wait => Box::pin(self.decide(caller, peer)).await,
        }
    }

    /// Looks with `look` until it decides, looking again on each registry change (and every
    /// `step`, for what does not wake the registry) until `--pod-wait` is over; the last look
    /// decides whatever is still missing.
    async fn wait_for<T>(
        &self,
        step: Option<Duration>,
        mut look: impl FnMut(bool) -> Outcome<T>,
    ) -> Result<T, Reply> {
        // The first look reads no clock: it is the last one only without a wait, and it
        // mostly decides.
        match self.settled(look(self.config.pod_wait.is_zero())) {
            Some(decided) => decided,
            // Boxed: the waiting is rare, and its state (a timer, a registry subscription)
            // would otherwise make every request's future larger, which every request moves.
            None => Box::pin(self.keep_looking(step, look)).await,
        }
    }

    /// What a look decided, as the answer (refusals recorded); `None` while it waits.
    fn settled<T>(&self, outcome: Outcome<T>) -> Option<Result<T, Reply>> {
        match outcome {
            Outcome::Ok(found) => Some(Ok(found)),
            Outcome::Refuse(refusal) => Some(Err(self.refuse(refusal))),
            Outcome::Wait => None,
        }
    }

    /// [`State::wait_for`] after a first look that could not decide.
    async fn keep_looking<T>(
        &self,
        step: Option<Duration>,
        mut look: impl FnMut(bool) -> Outcome<T>,
    ) -> Result<T, Reply> {
        let mut settle = |last_look: bool| self.settled(look(last_look));
        let deadline = tokio::time::Instant::now() + self.config.pod_wait;
        let mut changes = self.registry.subscribe();
        loop {
            changes.mark_unchanged();
            if let Some(decided) = settle(tokio::time::Instant::now() >= deadline) {
                return decided;
            }
            let wake = step.map_or(deadline, |step| {
                deadline.min(tokio::time::Instant::now() + step)
            });
            let _ = tokio::time::timeout_at(wake, changes.changed()).await;
        }
    }

    /// Records the refusal (Event, metric) and turns it into the answer.
    fn refuse(&self, refusal: Refusal) -> Reply {
        if let Some((pod, reason)) = &refusal.event {
            self.events.record(pod, *reason, &refusal.body);
        }
        self.stats.refused(refusal.kind);
        Reply::new(
            StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN),
            refusal.body,
        )
    }

    /// The pod calling: any pod of this node, on every route (those that serve a role then
    /// decide it from this pod, [`State::decide_for`]).
    async fn caller_pod(&self, caller: &Caller, peer: IpAddr) -> Result<Arc<PodIdentity>, Reply> {
        self.wait_for(None, |last_look| {
            let snapshot = self.snapshot(caller, peer);
            decision::identify(
                &self.config.decision,
                &snapshot.known(caller, peer),
                last_look,
            )
        })
        .await
    }

    /// What the credentials of `decision` are cached under, and the session's name (`peer` is
    /// the pod's address, which kube2iam's session names carry; `None` when not answering a
    /// request): one session per pod with `--session-per-pod`, when the tags name the pod, or
    /// with kube2iam's session names, else one per role, external ID and tag set, named after
    /// the node.
    fn cache_key(
        &self,
        decision: &Decision,
        peer: Option<IpAddr>,
    ) -> Result<(CacheKey, Cow<'_, str>), crate::session_tags::Missing> {
        let tags = self.config.sessions.for_pod(&decision.pod)?;
        // The key does not depend on whether the address is known: kube2iam's names are one
        // session per pod, like --session-per-pod.
        let per_pod = self.config.session_per_pod
            || self.config.kube2iam_session_names
            || self.config.sessions.per_pod();
        let (session, session_name) = if per_pod {
            let named = peer
                .filter(|_| self.config.kube2iam_session_names)
                .map(|ip| policy::kube2iam_session_name(ip, &decision.role));
            (
                Session::Pod {
                    uid: decision.pod.uid.clone(),
                },
                Cow::Owned(named.unwrap_or_else(|| {
                    policy::pod_session_name(&decision.pod.namespace, &decision.pod.name)
                })),
            )
        } else {
            (
                Session::Node,
                Cow::Borrowed(
                    self.node_session
                        .get_or_init(|| policy::node_session_name(&self.config.decision.node))
                        .as_str(),
                ),
            )
        };
        Ok((
            CacheKey {
                role_arn: decision.role.shared(),
                external_id: decision.external_id.clone(),
                session,
                tags,
            },
            session_name,
        ))
    }

    /// Starts fetching credentials for a pod the watch just saw, if it would get a role: the
    /// same decision a request from the pod would get, without waiting for anything.
    pub fn prefetch(self: &Arc<Self>, pod: &PodIdentity) {
        if self.config.kube2iam_session_names {
            // Those names carry the pod's address, which the watch does not hand over here.
            return;
        }
        let namespace = self.namespace_of(&pod.namespace);
        let account = self.account_of(pod);
        let pod = Arc::new(pod.clone());
        if let Outcome::Ok(decision) =
            decision::role(&self.config.decision, &pod, &namespace, &account, false)
            && let Ok((key, session_name)) = self.cache_key(&decision, None)
        {
            self.cache.prefetch(key, &session_name);
        }
    }

    fn check_token(&self, head: &Head, peer: IpAddr) -> Result<(), Reply> {
        if self.token_admits(head) {
            return Ok(());
        }
        if let TokenCheck::Rejected(why) = &head.token {
            tracing::debug!(%peer, ?why, "rejected IMDSv2 token");
        }
        Err(Reply::new(StatusCode::UNAUTHORIZED, ""))
    }

    /// Whether the request's IMDSv2 token (or its absence) admits it.
    fn token_admits(&self, head: &Head) -> bool {
        match &head.token {
            TokenCheck::Valid => true,
            TokenCheck::Rejected(_) => false,
            TokenCheck::Missing => self.config.tokens != TokenMode::Required,
        }
    }

    /// Whether `name`, from a credentials path, names the role decided for the pod.
    fn names_role(&self, name: &str, decision: &Decision) -> bool {
        let base = self.config.decision.base_arn.as_ref();
        name == policy::listed_name(&decision.role, base)
            || name == decision.role.as_str()
            || policy::resolve_role(name, base).is_ok_and(|r| r == decision.role)
    }

    fn issue_token(&self, head: &Head, peer: IpAddr) -> Response<Full<Bytes>> {
        if head.forwarded {
            return text(StatusCode::FORBIDDEN, "");
        }
        let ttl = head.ttl.clone().unwrap_or_else(|| token::parse_ttl(None));
        match &ttl {
            Ok(ttl) => {
                let mut response = text(
                    StatusCode::OK,
                    self.tokens.issue(peer, *ttl, SystemTime::now()),
                );
                if let Ok(value) = header::HeaderValue::from_str(&ttl.as_secs().to_string()) {
                    response.headers_mut().insert(TTL_HEADER, value);
                }
                response
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e.clone()),
        }
    }

    /// What the connection served from `cached` last, again, while the cache would give the
    /// same ([`CredentialCache::reuse`]).
    fn serve_again(&self, cached: &mut Cached) -> Option<Bytes> {
        let served = cached.served.as_mut()?;
        if !self
            .cache
            .reuse(&cached.held, served.version, &served.creds)
        {
            return None;
        }
        if !served.own {
            served.document = Bytes::copy_from_slice(&served.document);
            served.own = true;
        }
        Some(served.document.clone())
    }

    async fn credentials(&self, role: &mut Role, peer: IpAddr) -> Result<Bytes, Reply> {
        if !role
            .cached
            .as_ref()
            .is_some_and(|cached| cached.held.is_current())
        {
            let (key, session_name) =
                self.cache_key(&role.decision, Some(peer))
                    .map_err(|missing| {
                        Reply::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "kube2iam-ebpf: pod {}: {missing} is not known yet; try again",
                                role.decision.pod.display_name()
                            ),
                        )
                    })?;
            let held = self.cache.hold(&key, &session_name);
            role.cached = Some(Cached {
                key,
                held,
                served: None,
            });
        }
        let Role {
            decision,
            cached: Some(cached),
        } = role
        else {
            unreachable!("held above");
        };
        if let Some(document) = self.serve_again(cached) {
            return Ok(document);
        }
        // Read before the credentials are: newer credentials after this move it again.
        let version = cached.held.version();
        let creds = match self.cache.cached(&cached.key, &cached.held) {
            Some(creds) => Ok(creds),
            // Boxed: a call to STS is rare, and its state would otherwise make every
            // request's future larger, which every request moves.
            None => Box::pin(self.cache.fetch_missing(&cached.key, &cached.held)).await,
        };
        let creds = creds.map_err(|e| {
            let status = match e {
                StsError::Denied { .. } => StatusCode::FORBIDDEN,
                StsError::Throttled { .. } => StatusCode::SERVICE_UNAVAILABLE,
                StsError::Unavailable { .. } => StatusCode::BAD_GATEWAY,
            };
            let body = format!("kube2iam-ebpf: pod {}: {e}", decision.pod.display_name());
            self.events
                .record(&decision.pod, Reason::AssumeRoleFailed, &body);
            Reply::new(status, body)
        })?;
        // Rendered once per set of credentials, not per request.
        let document = match creds.rendered() {
            Some(document) => document,
            None => {
                let document = CredentialDocument {
                    code: "Success",
                    last_updated: imds_time(creds.last_updated),
                    kind: "AWS-HMAC",
                    access_key_id: &creds.access_key_id,
                    secret_access_key: &creds.secret_access_key,
                    token: &creds.session_token,
                    expiration: imds_time(creds.expiration),
                };
                let document = serde_json::to_string_pretty(&document)
                    .map_err(|e| Reply::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                creds.keep_rendered(document)
            }
        };
        cached.served = Some(Served {
            version,
            creds,
            document: document.clone(),
            own: false,
        });
        Ok(document)
    }

    /// Answers one request, counts it and logs it (refusals rate-limited per caller and status).
    async fn answer(&self, head: Head, started: Instant, conn: &Conn) -> Response<Full<Bytes>> {
        let peer = conn.peer;
        // Before anything is looked at (see World).
        let world = self.world();
        let mut found = conn.recall(world);
        let caller = &conn.caller;
        let (route, response, decided) = self.handle(&head, caller, peer, &mut found, world).await;
        let role = found
            .as_ref()
            .filter(|_| decided)
            .and_then(|f| f.role.as_ref())
            .map(|r| r.decision.role.as_str());
        self.finish(&head, started, conn, route, response.status(), role);
        // Kept only if nothing changed while the request was answered either.
        conn.remember(found.filter(|f| f.world == self.world()));
        response
    }

    /// [`State::answer`] without waiting, for the one request it can answer so: a kept
    /// connection asking again for the credentials it was served last, with nothing they were
    /// decided and cached from changed since. `None`: anything else (it is then answered by
    /// `answer`, which would answer this one the same).
    fn answer_at_once(
        &self,
        head: &Head,
        started: Instant,
        conn: &Conn,
    ) -> Option<Response<Full<Bytes>>> {
        let Target::Route {
            route: Route::Credentials(name),
            ..
        } = &head.target
        else {
            return None;
        };
        if head.oversized.is_some()
            || !self.token_admits(head)
            || !(head.method == Method::GET || head.method == Method::HEAD)
        {
            return None;
        }
        // Before anything is looked at (see World).
        let world = self.world();
        let mut remembered = conn.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let found = remembered.as_mut().filter(|f| f.world == world)?;
        let role = found.role.as_mut()?;
        if !self.names_role(name, &role.decision) {
            return None;
        }
        let document = self.serve_again(role.cached.as_mut()?)?;
        let response = text(StatusCode::OK, document);
        let role_name = role.decision.role.as_str();
        self.finish(
            head,
            started,
            conn,
            RouteLabel::Credentials,
            StatusCode::OK,
            Some(role_name),
        );
        // Kept only if nothing changed while the request was answered either.
        if self.world() != world {
            *remembered = None;
        }
        Some(response)
    }

    /// Counts and logs an answered request (refusals rate-limited per caller and status), and
    /// starts the connection's wait for its next request's headers.
    fn finish(
        &self,
        head: &Head,
        started: Instant,
        conn: &Conn,
        route: RouteLabel,
        status: StatusCode,
        role: Option<&str>,
    ) {
        let (caller, peer) = (&conn.caller, conn.peer);
        let (method, uri_path) = (&head.method, head.sent_path());
        let elapsed = started.elapsed();
        // Answered: the connection's next request has its header timeout from now.
        conn.headers.answered(started + elapsed);
        let latency_us = elapsed.as_micros() as u64;
        self.stats.observe(route, status.as_u16(), elapsed);
        let attested = caller.label();
        if status.is_client_error() && status != StatusCode::UNAUTHORIZED
            || status.is_server_error()
        {
            let key = format!("{peer} {}", status.as_u16());
            if let Some(suppressed) = self.refusal_log.allow(&key) {
                let pod = self
                    .registry
                    .lookup(peer)
                    .ok()
                    .flatten()
                    .map(|p| p.display_name());
                tracing::warn!(peer = %peer, pod, role, attested, method = %method, path = uri_path, route = route.as_str(), status = status.as_u16(), latency_us, suppressed, "request refused");
            }
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            let pod = self
                .registry
                .lookup(peer)
                .ok()
                .flatten()
                .map(|p| p.display_name());
            tracing::debug!(peer = %peer, pod, role, attested, method = %method, path = uri_path, route = route.as_str(), status = status.as_u16(), latency_us, "request");
        }
    }

    /// Answers one request. Returns the route label (metrics), the response, and whether it
    /// decided a role (the one `found` then holds). What the request finds is left in `found`,
    /// where the connection's previous request left what it found if `world` is unchanged.
    async fn handle(
        &self,
        head: &Head,
        caller: &Caller,
        peer: IpAddr,
        found: &mut Option<Remembered>,
        world: World,
    ) -> (RouteLabel, Response<Full<Bytes>>, bool) {
        if let Some(size) = &head.oversized {
            let mut response = text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "kube2iam-ebpf: metadata requests carry no body; this one has {size} (at \
                     most {MAX_BODY_BYTES} bytes are accepted and ignored)"
                ),
            );
            // The rest of the body is never read: the connection cannot be reused.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return (RouteLabel::BadPath, response, false);
        }
        let (normalized, route) = match &head.target {
            Target::Refused(e) => {
                return (
                    RouteLabel::BadPath,
                    text(StatusCode::BAD_REQUEST, format!("kube2iam-ebpf: {e}")),
                    false,
                );
            }
            Target::Health => {
                // For the node itself (kubelet's probes) and its pods; other hosts are refused,
                // as on every route.
                if !health::from_node(peer, self.config.host_ip)
                    && let Err(r) = self.caller_pod(caller, peer).await
                {
                    return (RouteLabel::Refused, text(r.status, r.body), false);
                }
                return (RouteLabel::Healthz, Box::pin(self.healthz()).await, false);
            }
            Target::Route { normalized, route } => (normalized, route),
        };
        let method = &head.method;
        // Every route is for the pods of this node only: the token and the proxy too.
        if found.is_none() {
            match self.caller_pod(caller, peer).await {
                Ok(pod) => {
                    *found = Some(Remembered {
                        world,
                        pod,
                        role: None,
                    });
                }
                Err(r) => return (RouteLabel::Refused, text(r.status, r.body), false),
            }
        }
        let found = found.as_mut().expect("found above");
        if *route == Route::Token {
            return (RouteLabel::Token, self.issue_token(head, peer), false);
        }
        if let Err(reply) = self.check_token(head, peer) {
            return (
                RouteLabel::Unauthorized,
                text(reply.status, reply.body),
                false,
            );
        }
        if method != Method::GET && method != Method::HEAD {
            return (
                RouteLabel::Method,
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "kube2iam-ebpf: only GET and HEAD",
                ),
                false,
            );
        }
        let base = self.config.decision.base_arn.as_ref();
        match route {
            Route::Token => unreachable!("answered above"),
            Route::IamListing => (
                RouteLabel::IamListing,
                text(StatusCode::OK, "info\nsecurity-credentials/"),
                false,
            ),
            Route::CredentialsList => {
                let (body, decided) = match self.role_of(found, caller, peer).await {
                    Ok(role) => (
                        Ok(policy::listed_name(&role.decision.role, base).to_owned()),
                        true,
                    ),
                    Err(r) => (Err(r), false),
                };
                (RouteLabel::CredentialsList, reply(body), decided)
            }
            Route::Credentials(name) => {
                let (body, decided) = match self.role_of(found, caller, peer).await {
                    Ok(role) => {
                        let decision = &role.decision;
                        let body = if self.names_role(name, decision) {
                            self.credentials(role, peer).await
                        } else {
                            let body = format!(
                                "kube2iam-ebpf: pod {} has role {}, not {name}",
                                decision.pod.display_name(),
                                policy::listed_name(&decision.role, base),
                            );
                            self.events
                                .record(&decision.pod, Reason::UnknownRole, &body);
                            Err(Reply::new(StatusCode::NOT_FOUND, body))
                        };
                        (body, true)
                    }
                    Err(r) => (Err(r), false),
                };
                (RouteLabel::Credentials, reply(body), decided)
            }
            Route::IamInfo => {
                let (body, decided) = match self.role_of(found, caller, peer).await {
                    Ok(role) => (
                        Ok(serde_json::json!({
                            "Code": "Success",
                            "LastUpdated": imds_time(SystemTime::now()),
                            "InstanceProfileArn": role.decision.role.as_str(),
                            "InstanceProfileId": "kube2iam-ebpf",
                        })
                        .to_string()),
                        true,
                    ),
                    Err(r) => (Err(r), false),
                };
                (RouteLabel::IamInfo, reply(body), decided)
            }
            Route::Blocked(refusal) => (
                RouteLabel::Blocked,
                text(StatusCode::FORBIDDEN, refusal.message(normalized)),
                false,
            ),
            Route::Proxy => {
                // IMDS takes no query parameters: none is forwarded, so nothing a pod writes
                // after `?` reaches the upstream.
                let target = path::encode(normalized);
                // Boxed, as the waiting in decide_for.
                match Box::pin(
                    self.upstream
                        .get(method.clone(), &target, head.accept.as_deref()),
                )
                .await
                {
                    Ok(up) => {
                        let mut response = Response::new(Full::new(up.body));
                        *response.status_mut() = up.status;
                        if let Some(ct) = up.headers.get(header::CONTENT_TYPE) {
                            response
                                .headers_mut()
                                .insert(header::CONTENT_TYPE, ct.clone());
                        }
                        (RouteLabel::Proxy, response, false)
                    }
                    Err(e) => (
                        RouteLabel::Proxy,
                        text(StatusCode::BAD_GATEWAY, format!("kube2iam-ebpf: {e}")),
                        false,
                    ),
                }
            }
        }
    }
}

/// Connections that did not come through the redirect, held at once while they get their 403.
const UNATTESTED_CONNECTIONS: usize = 64;
/// How long such a connection has to send its request.
const UNATTESTED_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers 503 and closes, without reading the request.
async fn reject_busy(mut stream: tokio::net::TcpStream, why: &'static str) {
    let body = format!("kube2iam-ebpf: {why}; try again\n");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

/// Whose share of the connections a connection counts against: the pod the kernel names, else
/// the source address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    Pod(String),
    Address(IpAddr),
}

impl CallerKey {
    fn of(caller: &Caller, peer: IpAddr) -> CallerKey {
        match caller {
            Caller::Pod { uid, .. } => CallerKey::Pod(uid.clone()),
            _ => CallerKey::Address(peer),
        }
    }
}

/// One open connection of a caller, counted while it lives.
struct CallerSlot {
    state: Arc<State>,
    key: CallerKey,
}

impl CallerSlot {
    fn take(state: &Arc<State>, key: CallerKey) -> Option<CallerSlot> {
        let mut open = state.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= state.config.max_connections_per_caller {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            state: state.clone(),
            key,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut open = self
            .state
            .per_caller
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serves pods on `listener` until `shutdown` fires, then drains in-flight requests (bounded).
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let unattested = Arc::new(Semaphore::new(UNATTESTED_CONNECTIONS));
    // Where connections arrive: the listener's own address, unless it listens on every address
    // (then each connection is asked, a syscall).
    let bound = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().to_canonical().is_unspecified());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let peer_ip = peer.ip().to_canonical();
        let _ = stream.set_nodelay(true);
        let local = bound.unwrap_or_else(|| stream.local_addr().unwrap_or(peer));
        let watcher = graceful.watcher();
        let (state, permits, unattested) = (state.clone(), permits.clone(), unattested.clone());
        tokio::spawn(async move {
            // Who is calling decides which slots the connection may take.
            let caller = attest::identify(
                state.config.decision.attestation,
                state.attestation.map.as_ref(),
                &state.attestation.cgroups,
                state.attestation.host_netns_cookie,
                peer,
                local,
            )
            .await;
            state.stats.caller(caller.label());
            let (permit, slot, header_timeout) = if caller == Caller::Unattested {
                // Not through the redirect on this node: it only gets its refusal, from a small
                // pool of its own with a short header timeout, never a pod's slot.
                let Ok(permit) = unattested.try_acquire_owned() else {
                    return;
                };
                (permit, None, UNATTESTED_HEADER_TIMEOUT)
            } else {
                let Ok(permit) = permits.try_acquire_owned() else {
                    state.stats.rejected_connection();
                    reject_busy(stream, "the agent's --max-connections are open").await;
                    return;
                };
                // One caller (a pod, by its attested UID where the kernel names it) cannot take
                // every slot.
                let Some(slot) = CallerSlot::take(&state, CallerKey::of(&caller, peer_ip)) else {
                    state.stats.rejected_connection();
                    reject_busy(
                        stream,
                        "this caller's --max-connections-per-caller are open",
                    )
                    .await;
                    return;
                };
                (permit, Some(slot), state.config.header_read_timeout)
            };
            let keep_alive = slot.is_some();
            let conn = Arc::new(Conn {
                state: state.clone(),
                caller,
                peer: peer_ip,
                remembered: Mutex::new(None),
                headers: HeaderClock::new(Instant::now().into()),
            });
            let conn_for_service = conn.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                conn_for_service.headers.answering();
                let started = Instant::now();
                let head = Head::of(&request, &conn_for_service.state, peer_ip);
                drop(request);
                let state = &conn_for_service.state;
                match state.answer_at_once(&head, started, &conn_for_service) {
                    Some(response) => Either::Left(std::future::ready(Ok(response))),
                    // Boxed: the future that may wait is large, and hyper moves the future of
                    // every request, the ones answered at once too.
                    None => {
                        let conn = conn_for_service.clone();
                        Either::Right(Box::pin(async move {
                            Ok::<_, Infallible>(conn.state.answer(head, started, &conn).await)
                        }))
                    }
                }
            });
            // The header timeout is the connection's HeaderClock, not hyper's timer (which
            // would register a timer per request).
            let connection = http1::Builder::new()
                .header_read_timeout(None)
                .max_buf_size(state.config.max_header_bytes.max(8192))
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = watcher.watch(connection) => {}
                // Closed (dropped) unanswered, as hyper's header timeout closes it.
                () = conn.headers.expired(header_timeout) => {}
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    let drain = state.config.drain_timeout;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "in-flight requests did not finish in time");
    }
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
