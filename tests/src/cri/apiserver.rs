//! The Kubernetes API as a pod's in-cluster client sees it: HTTPS at
//! `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`, a server certificate signed by the cluster
//! CA that the service account volume carries as `ca.crt`, and a bearer token from that volume.
//!
//! [`ApiFront`] terminates TLS (rustls) in front of the plain-HTTP [`KubeApi`] emulator and
//! records the `Authorization` header of every request it forwards, so a test can tell that the
//! agent authenticated with the token the kubelet mounted. The CA and the server certificate are
//! made with openssl for each front.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::{HOST_IP4, KubeApi, TestNode, ns_runtime::NetnsRuntime, process::output_within};

/// TLS in front of a [`KubeApi`], listening on the node's host IP. Stops on drop.
pub struct ApiFront {
    addr: SocketAddr,
    ca_pem: String,
    authorizations: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    // Dropped last: stopping the runtime closes the listener and every connection.
    _runtime: NetnsRuntime,
}

impl Drop for ApiFront {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: cannot remove {}: {e}", self.dir.display());
        }
    }
}

impl ApiFront {
    /// Listens on `<host IP>:<free port>` in the node and forwards to `api`. `dir` receives the
    /// CA and server key material and is removed on drop.
    pub fn start(node: &TestNode, api: &KubeApi, dir: &Path) -> ApiFront {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let pki = Pki::create(dir);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_chain)
            .and_then(|certs| certs.collect())
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", pki.server_chain.display()));
        let key = PrivateKeyDer::from_pem_file(&pki.server_key)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", pki.server_key.display()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| panic!("the API front's certificate is unusable: {e}"));
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let runtime = NetnsRuntime::start("api-front", &node.netns_path());
        let listener = runtime
            .block_on(TcpListener::bind(SocketAddr::new(HOST_IP4.into(), 0)))
            .unwrap_or_else(|e| panic!("the API front cannot listen on {HOST_IP4}: {e}"));
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let upstream = api.addr();
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let seen = authorizations.clone();
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    forward(tls, server, seen).await;
                });
            }
        });
        ApiFront {
            addr,
            ca_pem: fs::read_to_string(&pki.ca_cert)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", pki.ca_cert.display())),
            authorizations,
            dir: dir.to_owned(),
            _runtime: runtime,
        }
    }

    /// Where in-cluster clients connect: `KUBERNETES_SERVICE_HOST` / `_PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster CA, PEM: the service account volume's `ca.crt`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The `Authorization` header of every request forwarded so far (empty string when a request
    /// had none).
    pub fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().expect("authorizations").clone()
    }
}

/// Copies both ways; on the client's side, notes the Authorization header of each request head.
async fn forward<C>(client: C, mut server: TcpStream, seen: Arc<Mutex<Vec<String>>>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = server.split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            note_authorizations(&mut head, &buf[..n], &seen);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// Request heads start at a request line; the clients here send no request bodies (GET, watch)
/// except small JSON for Events, which never contains a line starting with "Authorization:".
fn note_authorizations(pending: &mut Vec<u8>, chunk: &[u8], seen: &Mutex<Vec<String>>) {
    pending.extend_from_slice(chunk);
    while let Some(end) = find(pending, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 4);
        if !head.starts_with(|c: char| c.is_ascii_uppercase()) || !head.contains(" HTTP/1.") {
            continue;
        }
        let authorization = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        seen.lock().expect("authorizations").push(authorization);
    }
    // A body that is not a head: keep the buffer bounded.
    if pending.len() > 1 << 20 {
        pending.clear();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A cluster CA and a server certificate for the host IP, `kubernetes.default.svc` and friends.
struct Pki {
    ca_cert: PathBuf,
    server_key: PathBuf,
    server_chain: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Pki {
        let path = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            let output = output_within(
                Command::new("openssl").args(args).current_dir(dir),
                Duration::from_secs(30),
                "openssl",
            );
            assert!(
                output.status.success(),
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=k2i-test-cluster-ca",
        ];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
        openssl(&ca);
        let mut csr = vec!["req", "-new", "-subj", "/CN=kube-apiserver"];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&csr);
        fs::write(
            path("server.ext"),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=IP:{HOST_IP4},DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            ),
        )
        .expect("write server.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Pki {
            ca_cert: path("ca.crt"),
            server_key: path("server.key"),
            server_chain: path("server.crt"),
        }
    }
}
