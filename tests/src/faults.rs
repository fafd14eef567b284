//! A fault-injecting HTTP proxy in front of moto, on its own port of the node's loopback. The
//! agent is pointed at it with `--sts-endpoint http://127.0.0.1:<port>`.
//!
//! It records every request (the STS query parameters, from the form body and the query
//! string) and answers according to its [`FaultMode`], which tests switch at runtime.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};

use crate::{
    TestNode,
    encode::request_id,
    imds::{INSTANCE_ID, NODE_ACCOUNT_ID, NODE_ROLE},
    moto::AssumeRoleCall,
    ns_runtime::{Handler, HttpRequest, HttpServer, form_map, form_pairs, response},
};

/// The proxy's default port on the node's loopback.
pub const FAULT_PROXY_PORT: u16 = 5001;
/// How long a forwarded request may take upstream before the proxy answers 502.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// How the proxy answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward to moto unchanged.
    PassThrough,
    /// HTTP 400 with STS's `Throttling` / "Rate exceeded" error.
    Throttle,
    /// HTTP 500 with an `InternalFailure` error.
    ServerError,
    /// Wait this long, then forward.
    Slow(Duration),
    /// Wait a time drawn uniformly from `min..=max` (a fixed sequence, by request number), then
    /// forward: a remote service's latency.
    Latency { min: Duration, max: Duration },
    /// Closed listener: connects are refused, open connections are closed.
    Refuse,
    /// What STS answers when the role's trust policy does not allow this permissions-only action
    /// for the caller: HTTP 403 `AccessDenied` naming it, for an AssumeRole that needs it
    /// (`sts:TagSession`: one with session tags; `sts:SetSourceIdentity`: one with a source
    /// identity). Other requests are forwarded.
    TrustPolicyLacks(&'static str),
}

/// One request the proxy received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StsRequest {
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    /// The `Action` parameter (`AssumeRole`, …).
    pub action: Option<String>,
    /// All parameters in order: the query string's, then the form body's.
    pub params: Vec<(String, String)>,
    /// The mode it was answered in.
    pub mode: FaultMode,
    /// The status returned; `None` while pending.
    pub status: Option<u16>,
}

impl StsRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The session tags of an AssumeRole (`Tags.member.N.Key` / `.Value`), in member order.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in 1.. {
            let key = self.param(&format!("Tags.member.{n}.Key"));
            let value = self.param(&format!("Tags.member.{n}.Value"));
            match (key, value) {
                (Some(k), Some(v)) => out.push((k.to_owned(), v.to_owned())),
                (Some(k), None) => out.push((k.to_owned(), String::new())),
                _ => break,
            }
        }
        out
    }

    /// `TransitiveTagKeys.member.N`, in order.
    pub fn transitive_tag_keys(&self) -> Vec<String> {
        (1..)
            .map_while(|n| self.param(&format!("TransitiveTagKeys.member.{n}")))
            .map(str::to_owned)
            .collect()
    }

    /// `SourceIdentity`.
    pub fn source_identity(&self) -> Option<&str> {
        self.param("SourceIdentity")
    }

    /// The permissions-only actions this request needs besides sts:AssumeRole.
    fn needs(&self, action: &str) -> bool {
        match action {
            "sts:TagSession" => !self.tags().is_empty() || !self.transitive_tag_keys().is_empty(),
            "sts:SetSourceIdentity" => self.source_identity().is_some(),
            _ => false,
        }
    }

    /// The AssumeRole call this request made, if it is one.
    pub fn assume_role(&self) -> Option<AssumeRoleCall> {
        if self.action.as_deref() != Some("AssumeRole") {
            return None;
        }
        let params = form_map(&self.params);
        Some(AssumeRoleCall {
            role_arn: params.get("RoleArn").cloned().unwrap_or_default(),
            session_name: params.get("RoleSessionName").cloned().unwrap_or_default(),
            external_id: params.get("ExternalId").cloned(),
            duration: params
                .get("DurationSeconds")
                .and_then(|d| d.parse().ok())
                .map(Duration::from_secs),
            access_key_id: None,
        })
    }
}

struct ProxyState {
    upstream: SocketAddr,
    mode: Mutex<FaultMode>,
    requests: Mutex<Vec<StsRequest>>,
}

/// The proxy. Stops on drop.
pub struct FaultProxy {
    server: HttpServer<ProxyState>,
}

impl FaultProxy {
    /// Listens at 127.0.0.1:[`FAULT_PROXY_PORT`] in `node`, forwarding to `upstream` (moto).
    pub fn start(node: &TestNode, upstream: SocketAddr) -> Self {
        Self::start_on(node, FAULT_PROXY_PORT, upstream)
    }

    pub fn start_on(node: &TestNode, port: u16, upstream: SocketAddr) -> Self {
        let state = ProxyState {
            upstream,
            mode: Mutex::new(FaultMode::PassThrough),
            requests: Mutex::default(),
        };
        Self {
            server: HttpServer::start(
                "sts-fault-proxy",
                &node.netns_path(),
                &[SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)],
                state,
            ),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addrs()[0]
    }

    /// `http://127.0.0.1:<port>`, for `--sts-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Switches the mode; takes effect for the next request (and at once for `Refuse`).
    pub fn set_mode(&self, mode: FaultMode) {
        let refuse = mode == FaultMode::Refuse;
        *self.server.handler().mode.lock().expect("mode") = mode;
        self.server.set_up(!refuse);
    }

    pub fn mode(&self) -> FaultMode {
        self.server.handler().mode.lock().expect("mode").clone()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<StsRequest> {
        self.server
            .handler()
            .requests
            .lock()
            .expect("requests")
            .clone()
    }

    /// How many requests arrived (any action, any mode).
    pub fn call_count(&self) -> usize {
        self.server
            .handler()
            .requests
            .lock()
            .expect("requests")
            .len()
    }

    /// Every AssumeRole request, as sent (also those answered with a fault).
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.requests()
            .iter()
            .filter_map(StsRequest::assume_role)
            .collect()
    }

    /// Every AssumeRole request with all its parameters (tags, source identity), as sent.
    pub fn assume_role_requests(&self) -> Vec<StsRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.action.as_deref() == Some("AssumeRole"))
            .collect()
    }

    pub fn assume_role_count(&self) -> usize {
        self.assume_role_calls().len()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.server
            .handler()
            .requests
            .lock()
            .expect("requests")
            .clear();
    }
}

impl Handler for ProxyState {
    async fn handle(
        self: Arc<Self>,
        _local: SocketAddr,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return response(400, &[], format!("cannot read the request body: {e}")),
        };
        let mut params = parts
            .uri
            .query()
            .map(|q| form_pairs(q.as_bytes()))
            .unwrap_or_default();
        params.extend(form_pairs(&body));
        let mode = self.mode.lock().expect("mode").clone();
        let record = StsRequest {
            peer,
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            action: form_map(&params).get("Action").cloned(),
            params,
            mode: mode.clone(),
            status: None,
        };
        let index = {
            let mut requests = self.requests.lock().expect("requests");
            requests.push(record);
            requests.len() - 1
        };
        let denied = match &mode {
            FaultMode::TrustPolicyLacks(action) => {
                let requests = self.requests.lock().expect("requests");
                let request = &requests[index];
                (request.action.as_deref() == Some("AssumeRole") && request.needs(action)).then(
                    || {
                        format!(
                            "User: arn:aws:sts::{NODE_ACCOUNT_ID}:assumed-role/{NODE_ROLE}/\
                             {INSTANCE_ID} is not authorized to perform: {action} on resource: {}",
                            request.param("RoleArn").unwrap_or_default()
                        )
                    },
                )
            }
            _ => None,
        };
        let answer = match mode {
            _ if denied.is_some() => sts_error(
                403,
                "Sender",
                "AccessDenied",
                denied.as_deref().unwrap_or_default(),
            ),
            FaultMode::Throttle => sts_error(400, "Sender", "Throttling", "Rate exceeded"),
            FaultMode::ServerError => sts_error(
                500,
                "Receiver",
                "InternalFailure",
                "The request processing has failed because of an unknown error, exception or \
                 failure.",
            ),
            FaultMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                self.forward(&parts, body).await
            }
            FaultMode::Latency { min, max } => {
                tokio::time::sleep(drawn_latency(index as u64, min, max)).await;
                self.forward(&parts, body).await
            }
            // A request that was in flight when the mode changed to Refuse.
            FaultMode::PassThrough | FaultMode::Refuse | FaultMode::TrustPolicyLacks(_) => {
                self.forward(&parts, body).await
            }
        };
        self.requests.lock().expect("requests")[index].status = Some(answer.status().as_u16());
        answer
    }
}

impl ProxyState {
    async fn forward(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let mut request = HttpRequest::new(
            parts.method.as_str(),
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        )
        .body(body.to_vec());
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name.as_str()) {
                request = request.header(name.as_str(), &String::from_utf8_lossy(value.as_bytes()));
            }
        }
        let upstream = self.upstream;
        match tokio::time::timeout(UPSTREAM_TIMEOUT, request.send(upstream)).await {
            Ok(Ok(answer)) => {
                let headers: Vec<(&str, &str)> = answer
                    .headers
                    .iter()
                    .filter(|(name, _)| !is_hop_by_hop(name))
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                response(answer.status, &headers, answer.body)
            }
            Ok(Err(e)) => response(
                502,
                &[("content-type", "text/plain")],
                format!("upstream: {e}"),
            ),
            Err(_) => response(
                504,
                &[("content-type", "text/plain")],
                format!("upstream {upstream} did not answer within {UPSTREAM_TIMEOUT:?}"),
            ),
        }
    }
}

/// The `n`th request's latency in `min..=max`: a splitmix64 hash of `n`, so runs repeat.
fn drawn_latency(n: u64, min: Duration, max: Duration) -> Duration {
    let mut z = n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let span = max.saturating_sub(min).as_micros() as u64;
    min + Duration::from_micros(if span == 0 { 0 } else { z % (span + 1) })
}

/// Headers the proxy sets itself on each side (the body is re-framed).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "expect" | "te"
    )
}

/// An STS (awsQuery) error response.
fn sts_error(status: u16, kind: &str, code: &str, message: &str) -> Response<Full<Bytes>> {
    let id = request_id();
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    \
         <Type>{kind}</Type>\n    <Code>{code}</Code>\n    <Message>{message}</Message>\n  \
         </Error>\n  <RequestId>{id}</RequestId>\n</ErrorResponse>\n"
    );
    response(
        status,
        &[("content-type", "text/xml"), ("x-amzn-requestid", &id)],
        body,
    )
}
