//! TLS in front of the emulators, as the real Kubernetes API server and STS speak it: a test CA
//! made with `openssl` (RSA 2048, as kubeadm and AWS use), and a front that terminates TLS
//! (rustls) on a port of the node's loopback and forwards the plain bytes to an emulator.
//!
//! The agent trusts the CA through `SSL_CERT_FILE` (the AWS SDK reads the platform's roots,
//! which rustls-native-certs takes from there) and a kubeconfig's `certificate-authority-data`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use crate::{TestNode, ns_runtime::NetnsRuntime, process::output_within};

/// A CA and a server certificate for 127.0.0.1 and localhost, in a directory of their own.
pub struct TestCa {
    dir: PathBuf,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = output_within(
        Command::new("openssl").args(args).current_dir(dir),
        Duration::from_secs(60),
        "openssl",
    );
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestCa {
    /// Creates the CA and the server certificate under `dir` (which must exist).
    pub fn create(dir: &Path) -> Self {
        let dir = dir.join("tls");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        let rsa = ["-newkey", "rsa:2048", "-nodes"];
        openssl(
            &dir,
            &[
                &["req", "-x509"][..],
                &rsa,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kube2iam-test-ca",
                ],
            ]
            .concat(),
        );
        openssl(
            &dir,
            &[
                &["req"][..],
                &rsa,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-in",
                "server.pem",
                "-outform",
                "DER",
                "-out",
                "server.der",
            ],
        );
        openssl(
            &dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "server.key",
                "-outform",
                "DER",
                "-out",
                "server.key.der",
            ],
        );
        let read =
            |name: &str| fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        Self {
            cert_der: read("server.der"),
            key_der: read("server.key.der"),
            dir,
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The machine's CA bundle with the test CA added: what `SSL_CERT_FILE` points a client at,
    /// so it loads as many roots as on a real node.
    pub fn bundle_with_system_roots(&self) -> PathBuf {
        let path = self.dir.join("bundle.pem");
        let mut bundle = fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        bundle.extend(fs::read(self.ca_pem()).expect("read ca.pem"));
        fs::write(&path, bundle).expect("write the CA bundle");
        path
    }

    /// A kubeconfig for `server` (an `https://` URL) that trusts the test CA and sends a bearer
    /// token, as a service account does.
    pub fn kubeconfig(&self, server: &str) -> PathBuf {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD
            .encode(fs::read(self.ca_pem()).expect("read ca.pem"));
        let path = self.dir.join("kubeconfig");
        fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: \
                 {server}\n    certificate-authority-data: {ca}\nusers:\n- name: agent\n  user:\n    \
                 token: kube2iam-test-token\ncontexts:\n- name: test\n  context:\n    cluster: \
                 test\n    user: agent\ncurrent-context: test\n"
            ),
        )
        .expect("write the kubeconfig");
        path
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .expect("the server certificate and key match");
        Arc::new(config)
    }
}

/// Terminates TLS at 127.0.0.1:`port` in a node and forwards each connection's bytes to
/// `backend`. Stops (closing every connection) on drop.
pub struct TlsFront {
    addr: SocketAddr,
    _runtime: NetnsRuntime,
}

impl TlsFront {
    pub fn start(node: &TestNode, port: u16, backend: SocketAddr, ca: &TestCa) -> Self {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let runtime = NetnsRuntime::start("tls-front", &node.netns_path());
        let acceptor = TlsAcceptor::from(ca.server_config());
        let listener = runtime
            .block_on(TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("TLS front: listen on {addr}: {e}"));
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        Self {
            addr,
            _runtime: runtime,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}
