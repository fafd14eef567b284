//! The metadata server pods reach through the redirect: IMDS-compatible answers for the pod's
//! own role, IMDSv2 tokens bound to the pod, the node's credentials and data never forwarded,
//! metadata that is safe for any pod (an allow list) proxied to the node's metadata service.

pub mod path;
pub mod token;
pub mod upstream;
mod usage;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::Semaphore};

use self::{
    path::{PathRules, Route},
    token::TokenIssuer,
    upstream::Upstream,
};
use crate::{
    credentials::{CacheKey, CredentialCache, Session, StsError, imds_time},
    events::{PodEvents, Reason},
    identity::{Annotation, PodIdentity, Registry},
    kube::Namespaces,
    metrics::RequestMetrics,
    policy::{self, BaseArn, RoleArn},
};

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

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
    pub node: String,
    pub pod_wait: Duration,
    pub tokens: TokenMode,
    pub role_key: String,
    pub namespace_key: String,
    pub base_arn: Option<BaseArn>,
    pub default_role: Option<String>,
    pub namespace_restrictions: bool,
    pub session_per_pod: bool,
    pub rules: PathRules,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

/// What the handlers share.
pub struct State {
    pub config: ServerConfig,
    pub registry: Arc<Registry>,
    pub namespaces: Arc<Namespaces>,
    pub cache: Arc<CredentialCache>,
    pub upstream: Arc<Upstream>,
    pub tokens: TokenIssuer,
    pub stats: RequestMetrics,
    /// Events on pods that are refused.
    pub events: Arc<PodEvents>,
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

/// The pod's role, decided.
struct Decision {
    pod: PodIdentity,
    role: RoleArn,
    external_id: Option<String>,
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
    /// Who is calling and which role they get, or the reason they get none.
    async fn decide(&self, peer: IpAddr) -> Result<Decision, Reply> {
        let config = &self.config;
        let pod = self
            .registry
            .wait_for(peer, config.pod_wait)
            .await
            .map_err(|e| Reply::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .ok_or_else(|| self.unknown_peer(peer))?;
        let who = pod.display_name();
        let forbidden = |reason: Reason, body: String| {
            self.events.record(&pod, reason, &body);
            Reply::new(StatusCode::FORBIDDEN, body)
        };
        let raw_role = match &pod.role {
            Annotation::Value(v) => v.clone(),
            Annotation::Oversize(len) => {
                return Err(forbidden(
                    Reason::InvalidRoleAnnotation,
                    format!(
                        "kube2iam-ebpf: pod {who}: annotation {} is {len} bytes; no valid role \
                         ARN is that long",
                        config.role_key
                    ),
                ));
            }
            Annotation::Absent => match &config.default_role {
                Some(default) => default.clone(),
                None => {
                    return Err(Reply::new(
                        StatusCode::NOT_FOUND,
                        format!(
                            "kube2iam-ebpf: pod {who} has no {} annotation and the agent has no \
                             --default-role",
                            config.role_key
                        ),
                    ));
                }
            },
        };
        let role = policy::resolve_role(&raw_role, config.base_arn.as_ref()).map_err(|e| {
            forbidden(
                Reason::InvalidRoleAnnotation,
                format!(
                    "kube2iam-ebpf: pod {who}: annotation {}: {e}",
                    config.role_key
                ),
            )
        })?;
        let external_id = match &pod.external_id {
            Annotation::Absent => None,
            Annotation::Oversize(len) => {
                return Err(forbidden(
                    Reason::InvalidExternalIdAnnotation,
                    format!(
                        "kube2iam-ebpf: pod {who}: external-ID annotation is {len} bytes; STS \
                         allows at most {}",
                        policy::MAX_EXTERNAL_ID
                    ),
                ));
            }
            Annotation::Value(v) => Some(
                policy::validate_external_id(v)
                    .map_err(|e| {
                        forbidden(
                            Reason::InvalidExternalIdAnnotation,
                            format!("kube2iam-ebpf: pod {who}: {e}"),
                        )
                    })?
                    .to_owned(),
            ),
        };
        if config.namespace_restrictions {
            self.check_namespace(&pod, &role)
                .await
                .map_err(|body| Reply::new(StatusCode::FORBIDDEN, body))?;
        }
        Ok(Decision {
            pod,
            role,
            external_id,
        })
    }

    /// The answer for an address no pod in the identity map has. When the map is full, the
    /// caller may be a pod the watch could not record: say so, and how to fix it.
    fn unknown_peer(&self, peer: IpAddr) -> Reply {
        let config = &self.config;
        let capacity = self.registry.capacity();
        let full = capacity > 0
            && self
                .registry
                .entries()
                .is_ok_and(|entries| entries.len() >= capacity as usize);
        if full {
            return Reply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "kube2iam-ebpf: no pod with IP {peer} on node {} in the identity map, and the \
                     identity map is full ({capacity} entries): pods beyond it are not served; \
                     raise --identity-capacity",
                    config.node
                ),
            );
        }
        Reply::new(
            StatusCode::NOT_FOUND,
            format!(
                "kube2iam-ebpf: no pod with IP {peer} on node {} (waited {:?})",
                config.node, config.pod_wait
            ),
        )
    }

    async fn check_namespace(&self, pod: &PodIdentity, role: &RoleArn) -> Result<(), String> {
        let key = &self.config.namespace_key;
        if !self.namespaces.synced()
            && tokio::time::timeout(self.config.pod_wait, self.namespaces.wait_synced())
                .await
                .is_err()
        {
            return Err(format!(
                "kube2iam-ebpf: namespace restrictions are on and namespaces are not listed yet; \
                 pod {} is refused until they are",
                pod.display_name()
            ));
        }
        let who = pod.display_name();
        let denied = |body: String| {
            self.events.record(pod, Reason::RoleNotAllowed, &body);
            Err(body)
        };
        match self.namespaces.get(&pod.namespace) {
            None => denied(format!(
                "kube2iam-ebpf: pod {who}: namespace {} is unknown to the agent",
                pod.namespace
            )),
            Some(None) => denied(format!(
                "kube2iam-ebpf: pod {who} has role {role}, but namespace {} has no {key} \
                 annotation, so it allows no role",
                pod.namespace
            )),
            Some(Some(Err(e))) => denied(format!("kube2iam-ebpf: pod {who}: {e}")),
            Some(Some(Ok(allowed))) if allowed.allows(role, self.config.base_arn.as_ref()) => {
                Ok(())
            }
            Some(Some(Ok(allowed))) => denied(format!(
                "kube2iam-ebpf: pod {who} has role {role}, but namespace {} allows only {:?} \
                 (annotation {key})",
                pod.namespace,
                allowed.sources()
            )),
        }
    }

    fn cache_key(&self, decision: &Decision) -> (CacheKey, String) {
        let session = if self.config.session_per_pod {
            Session::Pod {
                uid: decision.pod.uid.clone(),
            }
        } else {
            Session::Node
        };
        let session_name = if self.config.session_per_pod {
            policy::pod_session_name(&decision.pod.namespace, &decision.pod.name)
        } else {
            policy::node_session_name(&self.config.node)
        };
        (
            CacheKey {
                role_arn: decision.role.as_str().to_owned(),
                external_id: decision.external_id.clone(),
                session,
            },
            session_name,
        )
    }

    /// Starts fetching credentials for a pod the watch just saw, if it would get a role.
    pub fn prefetch(self: &Arc<Self>, pod: &PodIdentity) {
        let role = match &pod.role {
            Annotation::Value(v) => v.clone(),
            Annotation::Absent => match &self.config.default_role {
                Some(d) => d.clone(),
                None => return,
            },
            Annotation::Oversize(_) => return,
        };
        let Ok(role) = policy::resolve_role(&role, self.config.base_arn.as_ref()) else {
            return;
        };
        let external_id = match &pod.external_id {
            Annotation::Value(v) if policy::validate_external_id(v).is_ok() => Some(v.clone()),
            Annotation::Absent => None,
            _ => return,
        };
        if self.config.namespace_restrictions
            && self.namespaces.synced()
            && !matches!(
                self.namespaces.get(&pod.namespace),
                Some(Some(Ok(allowed))) if allowed.allows(&role, self.config.base_arn.as_ref())
            )
        {
            return;
        }
        let decision = Decision {
            pod: pod.clone(),
            role,
            external_id,
        };
        let (key, session_name) = self.cache_key(&decision);
        self.cache.prefetch(key, &session_name);
    }

    fn check_token(&self, request: &Request<Incoming>, peer: IpAddr) -> Result<(), Reply> {
        match request.headers().get(TOKEN_HEADER) {
            Some(value) => {
                let token = value.to_str().unwrap_or("");
                self.tokens
                    .check(token, peer, SystemTime::now())
                    .map_err(|why| {
                        tracing::debug!(%peer, ?why, "rejected IMDSv2 token");
                        Reply::new(StatusCode::UNAUTHORIZED, "")
                    })
            }
            None if self.config.tokens == TokenMode::Required => {
                Err(Reply::new(StatusCode::UNAUTHORIZED, ""))
            }
            None => Ok(()),
        }
    }

    fn issue_token(&self, request: &Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        if request.headers().contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "");
        }
        let ttl = request
            .headers()
            .get(TTL_HEADER)
            .map(|v| v.to_str().unwrap_or("invalid"));
        match token::parse_ttl(ttl) {
            Ok(ttl) => {
                let mut response = text(
                    StatusCode::OK,
                    self.tokens.issue(peer, ttl, SystemTime::now()),
                );
                if let Ok(value) = header::HeaderValue::from_str(&ttl.as_secs().to_string()) {
                    response.headers_mut().insert(TTL_HEADER, value);
                }
                response
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        }
    }

    async fn credentials(&self, decision: &Decision) -> Result<String, Reply> {
        let (key, session_name) = self.cache_key(decision);
        let creds = self.cache.get(&key, &session_name).await.map_err(|e| {
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
        let document = CredentialDocument {
            code: "Success",
            last_updated: imds_time(creds.last_updated),
            kind: "AWS-HMAC",
            access_key_id: &creds.access_key_id,
            secret_access_key: &creds.secret_access_key,
            token: &creds.session_token,
            expiration: imds_time(creds.expiration),
        };
        serde_json::to_string_pretty(&document)
            .map_err(|e| Reply::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }

    /// Answers one request. Returns the route label (metrics) and the response.
    async fn handle(
        &self,
        request: Request<Incoming>,
        peer: IpAddr,
    ) -> (&'static str, Response<Full<Bytes>>, Option<String>) {
        if let Some(size) = oversized_body(&request) {
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
            return ("bad_path", response, None);
        }
        let normalized = match path::normalize(request.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                return (
                    "bad_path",
                    text(StatusCode::BAD_REQUEST, format!("kube2iam-ebpf: {e}")),
                    None,
                );
            }
        };
        let method = request.method().clone();
        let route = path::route(&method, &normalized, &self.config.rules);
        if route == Route::Token {
            return ("token", self.issue_token(&request, peer), None);
        }
        if let Err(reply) = self.check_token(&request, peer) {
            return ("unauthorized", text(reply.status, reply.body), None);
        }
        if method != Method::GET && method != Method::HEAD {
            return (
                "method",
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "kube2iam-ebpf: only GET and HEAD",
                ),
                None,
            );
        }
        let reply = |r: Result<String, Reply>| match r {
            Ok(body) => text(StatusCode::OK, body),
            Err(r) => text(r.status, r.body),
        };
        match route {
            Route::Token => unreachable!("answered above"),
            Route::IamListing => (
                "iam_listing",
                text(StatusCode::OK, "info\nsecurity-credentials/"),
                None,
            ),
            Route::CredentialsList => {
                let result = self.decide(peer).await;
                let role = result.as_ref().ok().map(|d| d.role.as_str().to_owned());
                let body = result.map(|d| {
                    policy::listed_name(&d.role, self.config.base_arn.as_ref()).to_owned()
                });
                ("credentials_list", reply(body), role)
            }
            Route::Credentials(name) => {
                let result = self.decide(peer).await;
                let role = result.as_ref().ok().map(|d| d.role.as_str().to_owned());
                let body = match result {
                    Ok(decision) => {
                        let listed =
                            policy::listed_name(&decision.role, self.config.base_arn.as_ref());
                        let same = name == listed
                            || name == decision.role.as_str()
                            || policy::resolve_role(&name, self.config.base_arn.as_ref())
                                .is_ok_and(|r| r == decision.role);
                        if same {
                            self.credentials(&decision).await
                        } else {
                            let body = format!(
                                "kube2iam-ebpf: pod {} has role {listed}, not {name}",
                                decision.pod.display_name()
                            );
                            self.events
                                .record(&decision.pod, Reason::UnknownRole, &body);
                            Err(Reply::new(StatusCode::NOT_FOUND, body))
                        }
                    }
                    Err(r) => Err(r),
                };
                ("credentials", reply(body), role)
            }
            Route::IamInfo => {
                let result = self.decide(peer).await;
                let role = result.as_ref().ok().map(|d| d.role.as_str().to_owned());
                let body = result.map(|d| {
                    serde_json::json!({
                        "Code": "Success",
                        "LastUpdated": imds_time(SystemTime::now()),
                        "InstanceProfileArn": d.role.as_str(),
                        "InstanceProfileId": "kube2iam-ebpf",
                    })
                    .to_string()
                });
                ("iam_info", reply(body), role)
            }
            Route::Blocked(refusal) => (
                "blocked",
                text(StatusCode::FORBIDDEN, refusal.message(&normalized)),
                None,
            ),
            Route::Proxy => {
                let query = request
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                let target = format!("{}{query}", path::encode(&normalized));
                let accept = request
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                match self.upstream.get(method, &target, accept).await {
                    Ok(up) => {
                        let mut response = Response::new(Full::new(up.body));
                        *response.status_mut() = up.status;
                        if let Some(ct) = up.headers.get(header::CONTENT_TYPE) {
                            response
                                .headers_mut()
                                .insert(header::CONTENT_TYPE, ct.clone());
                        }
                        ("proxy", response, None)
                    }
                    Err(e) => (
                        "proxy",
                        text(StatusCode::BAD_GATEWAY, format!("kube2iam-ebpf: {e}")),
                        None,
                    ),
                }
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
    loop {
        let (mut stream, peer) = tokio::select! {
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.stats.rejected_connection();
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let peer_ip = peer.ip().to_canonical();
        let state_for_conn = state.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let state = state_for_conn.clone();
            async move {
                let started = Instant::now();
                let method = request.method().clone();
                let uri_path = request.uri().path().to_owned();
                let (route, response, role) = state.handle(request, peer_ip).await;
                let status = response.status();
                state
                    .stats
                    .observe(route, status.as_u16(), started.elapsed());
                let pod = state
                    .registry
                    .lookup(peer_ip)
                    .ok()
                    .flatten()
                    .map(|p| p.display_name());
                if status.is_client_error() && status != StatusCode::UNAUTHORIZED
                    || status.is_server_error()
                {
                    tracing::warn!(peer = %peer_ip, pod, role, %method, path = uri_path, route, status = status.as_u16(), latency_us = started.elapsed().as_micros() as u64, "request refused");
                } else {
                    tracing::debug!(peer = %peer_ip, pod, role, %method, path = uri_path, route, status = status.as_u16(), latency_us = started.elapsed().as_micros() as u64, "request");
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(state.config.header_read_timeout)
            .max_buf_size(state.config.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
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
