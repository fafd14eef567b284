//! The admin server on `--metrics-port`: `/healthz`, `/readyz`, `/metrics`, and `/debug/store`
//! with `--debug`. A separate port: pods going through the redirect only ever reach the
//! metadata server.
//!
//! `/healthz` answers 200 while the process serves at all (liveness: a restart would not help
//! anything it could report). `/readyz` answers 200 when the programs are attached with their
//! config written, the pod watch (and the namespace watch, with namespace restrictions, and the
//! service account watch, with service account roles) has synced, and the last probe of the node's metadata service succeeded; otherwise 503 with the
//! reasons, one per line after `not ready:`. An upstream outage therefore takes the pod out of
//! readiness without restarting it, and it comes back by itself.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{metrics, status::Sources};

pub struct Admin {
    sources: Arc<Sources>,
    registry: Registry,
    debug: bool,
}

impl Admin {
    pub fn new(sources: Sources, debug: bool) -> Admin {
        let sources = Arc::new(sources);
        Admin {
            registry: metrics::registry(sources.clone()),
            sources,
            debug,
        }
    }

    /// `None` when ready, else the reasons.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        self.sources.not_ready()
    }

    /// The metrics in the Prometheus text format, or OpenMetrics; (content type, body).
    pub fn metrics(&self, openmetrics: bool) -> (&'static str, String) {
        metrics::encode(&self.registry, openmetrics)
    }

    fn debug_store(&self) -> String {
        let entries = self.sources.state.registry.entries().unwrap_or_default();
        let list: Vec<_> = entries
            .into_iter()
            .map(|(ip, pod)| {
                serde_json::json!({
                    "ip": ip.to_string(),
                    "namespace": pod.namespace,
                    "name": pod.name,
                    "uid": pod.uid,
                    "role": pod.role.shown(),
                })
            })
            .collect();
        serde_json::to_string_pretty(&list).unwrap_or_default()
    }

    /// (status, content type, body) for a GET of `path`.
    fn respond(&self, path: &str, accept: &str) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match path {
            "/healthz" | "/livez" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match self.not_ready() {
                None => (StatusCode::OK, TEXT, "ready\n".into()),
                Some(reasons) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {}\n", reasons.join(", ")),
                ),
            },
            "/metrics" => {
                let (content_type, body) =
                    self.metrics(accept.contains("application/openmetrics-text"));
                (StatusCode::OK, content_type, body)
            }
            "/debug/store" if self.debug => {
                (StatusCode::OK, "application/json", self.debug_store())
            }
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // The admin port is reachable from the pod network too: a bound number of connections (and
    // the header timeout) keep anyone from tying it up, and probes from failing with it.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let admin = admin.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let accept = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (status, content_type, body) = admin.respond(request.uri().path(), accept);
            async move {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(content_type),
                );
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// Open connections the admin port accepts; more are closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
