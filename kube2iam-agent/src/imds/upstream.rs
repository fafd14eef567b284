//! The node's real metadata service, reached from the host namespace (never rewritten), with a
//! pooled client, timeouts, and the agent's own IMDSv2 token, so forwarding never depends on
//! the pod's hop limit or token.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, header::HeaderMap};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

const TOKEN_TTL: u64 = 21_600;
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Why the upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the metadata service at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the metadata service at {addr} is unreachable: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
}

/// A response from upstream.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Upstream {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    token: Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(connector);
        Upstream {
            addr,
            client,
            timeout,
            token: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response, Error> {
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Error::Unreachable {
                    addr: self.addr,
                    reason: crate::error_chain(&e),
                })?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| Error::Unreachable {
                addr: self.addr,
                reason: e.to_string(),
            })?;
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| Error::Timeout {
                addr: self.addr,
                timeout: self.timeout,
            })?
    }

    fn uri(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// The agent's own upstream token; `None` where upstream has no IMDSv2 (then v1 is used).
    async fn token(&self, renew: bool) -> Result<Option<String>, Error> {
        if !renew
            && let Some((token, until)) =
                self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
            && Instant::now() < until
        {
            return Ok(Some(token));
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(self.uri("/latest/api/token"))
            .header(TTL_HEADER, TOKEN_TTL.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Unreachable {
                addr: self.addr,
                reason: e.to_string(),
            })?;
        let response = self.send(request).await?;
        if !response.status.is_success() {
            tracing::debug!(status = %response.status, "upstream issued no token; using IMDSv1");
            return Ok(None);
        }
        let token = String::from_utf8_lossy(&response.body).trim().to_owned();
        // Renew well before the upstream expires it.
        let until = Instant::now() + Duration::from_secs(TOKEN_TTL - 600);
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some((token.clone(), until));
        Ok(Some(token))
    }

    /// GET (or HEAD) `path_and_query` upstream with the agent's token; one retry with a new
    /// token if upstream says the old one is no longer valid.
    pub async fn get(
        &self,
        method: Method,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<Response, Error> {
        let mut renew = false;
        loop {
            let token = self.token(renew).await?;
            let mut builder = Request::builder()
                .method(method.clone())
                .uri(self.uri(path_and_query));
            if let Some(token) = &token {
                builder = builder.header(TOKEN_HEADER, token);
            }
            if let Some(accept) = accept {
                builder = builder.header(hyper::header::ACCEPT, accept);
            }
            let request =
                builder
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| Error::Unreachable {
                        addr: self.addr,
                        reason: e.to_string(),
                    })?;
            let response = self.send(request).await?;
            if response.status == StatusCode::UNAUTHORIZED && token.is_some() && !renew {
                renew = true;
                continue;
            }
            return Ok(response);
        }
    }

    /// A GET whose body must be a successful text answer.
    pub async fn get_text(&self, path: &str) -> Result<String, String> {
        let response = self
            .get(Method::GET, path, None)
            .await
            .map_err(|e| e.to_string())?;
        if response.status.is_success() {
            Ok(String::from_utf8_lossy(&response.body).trim().to_owned())
        } else {
            Err(format!("upstream {path} answered {}", response.status))
        }
    }

    /// Whether upstream answers at all (readiness).
    pub async fn reachable(&self) -> bool {
        self.get(Method::GET, "/latest/meta-data/instance-id", None)
            .await
            .is_ok_and(|r| r.status.is_success())
    }
}
