//! A stand-in for the API server's discovery endpoints, so that `kubectl create --dry-run=client`
//! can map the kinds of the rendered manifests to resources without a cluster. It lists only the
//! built-in groups and kinds the chart uses (plus the ServiceMonitor CRD), so an object of any
//! other kind fails kubectl's mapping the way it would on a cluster that lacks it.
//!
//! Serves plain HTTP on 127.0.0.1 (an ephemeral port) until dropped; one request per connection.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// (resource, kind, namespaced).
type Resource = (&'static str, &'static str, bool);

/// (group, version, resources).
const RESOURCES: &[(&str, &str, &[Resource])] = &[
    (
        "",
        "v1",
        &[
            ("configmaps", "ConfigMap", true),
            ("events", "Event", true),
            ("namespaces", "Namespace", false),
            ("pods", "Pod", true),
            ("secrets", "Secret", true),
            ("serviceaccounts", "ServiceAccount", true),
            ("services", "Service", true),
        ],
    ),
    ("apps", "v1", &[("daemonsets", "DaemonSet", true)]),
    (
        "rbac.authorization.k8s.io",
        "v1",
        &[
            ("clusterrolebindings", "ClusterRoleBinding", false),
            ("clusterroles", "ClusterRole", false),
            ("rolebindings", "RoleBinding", true),
            ("roles", "Role", true),
        ],
    ),
    (
        "monitoring.coreos.com",
        "v1",
        &[("servicemonitors", "ServiceMonitor", true)],
    ),
];

pub struct Discovery {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Discovery {
    pub fn start() -> Result<Discovery> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the discovery stand-in")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        // A broken client connection only fails that request.
                        let _ = serve(stream, addr);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Discovery {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, addr: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let path = request
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (status, body) = match respond(path, addr) {
        Some(body) => ("200 OK", body),
        None => (
            "404 Not Found",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404,
                   "message": format!("{path} is not served by the discovery stand-in")}),
        ),
    };
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn respond(path: &str, addr: SocketAddr) -> Option<Value> {
    let path = path.trim_end_matches('/');
    match path {
        "/api" => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
        })),
        "/apis" => {
            let groups: Vec<Value> = RESOURCES
                .iter()
                .filter(|(group, _, _)| !group.is_empty())
                .map(|(group, version, _)| {
                    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        _ => RESOURCES.iter().find_map(|(group, version, resources)| {
            let (group_version, own_path) = if group.is_empty() {
                (version.to_string(), format!("/api/{version}"))
            } else {
                (format!("{group}/{version}"), format!("/apis/{group}/{version}"))
            };
            (path == own_path).then(|| {
                let list: Vec<Value> = resources
                    .iter()
                    .map(|(name, kind, namespaced)| {
                        json!({"name": name, "singularName": kind.to_lowercase(),
                               "namespaced": namespaced, "kind": kind,
                               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
                    })
                    .collect();
                json!({"kind": "APIResourceList", "apiVersion": "v1",
                       "groupVersion": group_version, "resources": list})
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6443))
    }

    #[test]
    fn lists_the_groups_and_their_resources() {
        let groups = respond("/apis", addr()).unwrap();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["apps", "rbac.authorization.k8s.io", "monitoring.coreos.com"]
        );
        let apps = respond("/apis/apps/v1/", addr()).unwrap();
        assert_eq!(apps["groupVersion"], "apps/v1");
        assert_eq!(apps["resources"][0]["kind"], "DaemonSet");
        let core = respond("/api/v1", addr()).unwrap();
        let namespaces = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "namespaces")
            .unwrap();
        assert_eq!(namespaces["namespaced"], false);
        assert!(respond("/apis/policy/v1", addr()).is_none());
    }
}
