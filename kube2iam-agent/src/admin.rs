//! The admin server on `--metrics-port`: `/healthz`, `/readyz`, `/metrics`, and `/debug/store`
//! with `--debug`. A separate port: pods going through the redirect only ever reach the
//! metadata server.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{imds::State, kube::WatchStats};

/// What readiness is made of.
#[derive(Default)]
pub struct Readiness {
    /// Programs attached and config written.
    pub interception: AtomicBool,
    /// The last upstream probe succeeded.
    pub upstream: AtomicBool,
}

pub struct Admin {
    pub state: Arc<State>,
    pub readiness: Arc<Readiness>,
    pub watch_stats: Arc<WatchStats>,
    pub counters: Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>,
    pub debug: bool,
}

impl Admin {
    /// `None` when ready, else the reasons.
    pub fn not_ready(&self) -> Option<Vec<&'static str>> {
        let mut reasons = Vec::new();
        if !self.readiness.interception.load(Ordering::Acquire) {
            reasons.push("programs not attached");
        }
        if !self.state.registry.synced() {
            reasons.push("pod watch not synced");
        }
        if self.state.config.namespace_restrictions && !self.state.namespaces.synced() {
            reasons.push("namespace watch not synced");
        }
        if !self.readiness.upstream.load(Ordering::Acquire) {
            reasons.push("upstream metadata service unreachable");
        }
        (!reasons.is_empty()).then_some(reasons)
    }

    /// Prometheus text. The shipping work replaces this with prometheus-client; the names stay.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE kube2iam_requests_total counter");
        let requests = self
            .state
            .stats
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut requests: Vec<_> = requests.into_iter().collect();
        requests.sort();
        for ((route, status), n) in requests {
            let _ = writeln!(
                out,
                "kube2iam_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let cache = &self.state.cache.stats;
        for (name, value) in [
            ("kube2iam_credential_cache_hits_total", &cache.hits),
            ("kube2iam_credential_cache_misses_total", &cache.misses),
            (
                "kube2iam_credential_cache_refreshes_total",
                &cache.refreshes,
            ),
            (
                "kube2iam_credential_cache_prefetches_total",
                &cache.prefetches,
            ),
            (
                "kube2iam_credential_stale_served_total",
                &cache.stale_served,
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE kube2iam_sts_calls_total counter");
        for (result, value) in [
            ("success", &cache.sts_success),
            ("throttled", &cache.sts_throttled),
            ("denied", &cache.sts_denied),
            ("unavailable", &cache.sts_unavailable),
        ] {
            let _ = writeln!(
                out,
                "kube2iam_sts_calls_total{{result=\"{result}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let entries = self.state.registry.entries().map(|e| e.len()).unwrap_or(0);
        let _ = writeln!(
            out,
            "# TYPE kube2iam_identity_map_entries gauge\nkube2iam_identity_map_entries {entries}\n\
             # TYPE kube2iam_identity_map_capacity gauge\nkube2iam_identity_map_capacity {}",
            self.state.registry.capacity()
        );
        let _ = writeln!(out, "# TYPE kube2iam_bpf_events_total counter");
        for (name, value) in (self.counters)() {
            let _ = writeln!(out, "kube2iam_bpf_events_total{{event=\"{name}\"}} {value}");
        }
        let _ = writeln!(
            out,
            "# TYPE kube2iam_watch_restarts_total counter\n\
             kube2iam_watch_restarts_total{{resource=\"pods\"}} {}\n\
             kube2iam_watch_restarts_total{{resource=\"namespaces\"}} {}",
            self.watch_stats.pod_restarts.load(Ordering::Relaxed),
            self.watch_stats.namespace_restarts.load(Ordering::Relaxed)
        );
        out
    }

    fn debug_store(&self) -> String {
        let entries = self.state.registry.entries().unwrap_or_default();
        let list: Vec<_> = entries
            .into_iter()
            .map(|(ip, pod)| {
                serde_json::json!({
                    "ip": ip.to_string(),
                    "namespace": pod.namespace,
                    "name": pod.name,
                    "uid": pod.uid,
                    "role": match &pod.role {
                        crate::identity::Annotation::Value(v) => serde_json::Value::from(v.as_str()),
                        crate::identity::Annotation::Oversize(n) => serde_json::Value::from(format!("<{n} bytes: too long>")),
                        crate::identity::Annotation::Absent => serde_json::Value::Null,
                    },
                })
            })
            .collect();
        serde_json::to_string_pretty(&list).unwrap_or_default()
    }

    fn respond(&self, path: &str) -> (StatusCode, String) {
        match path {
            "/healthz" => (StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.not_ready() {
                None => (StatusCode::OK, "ready\n".into()),
                Some(reasons) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", reasons.join(", ")),
                ),
            },
            "/metrics" => (StatusCode::OK, self.metrics()),
            "/debug/store" if self.debug => (StatusCode::OK, self.debug_store()),
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let admin = admin.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let (status, body) = admin.respond(request.uri().path());
            async move {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
