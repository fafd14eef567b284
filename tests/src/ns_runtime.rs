//! Async networking inside a test node: a tokio runtime whose thread lives in the node's network
//! namespace, a minimal HTTP/1 client, and an HTTP/1 server that can be taken down (connections
//! refused, open connections closed) and brought back on the same addresses.
//!
//! The runtime is current-thread: every socket it creates (listeners, accepted and outgoing
//! connections) belongs to the namespace its one thread entered. Work from the test thread is
//! handed over with [`NetnsRuntime::block_on`] / [`NetnsRuntime::spawn`], never run in place.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};

use crate::process::enter_netns_on_this_thread;

/// A current-thread tokio runtime on a dedicated thread inside a network namespace. Dropping it
/// stops the runtime, which drops every task and closes every socket it owns.
pub struct NetnsRuntime {
    label: String,
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NetnsRuntime {
    /// Starts the runtime thread in the namespace at `netns`; panics if it cannot enter it.
    pub fn start(label: &str, netns: &Path) -> Self {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let netns = netns.to_owned();
        let thread = thread::Builder::new()
            .name(format!("{label}-rt"))
            .spawn(move || {
                if let Err(e) = enter_netns_on_this_thread(&netns) {
                    let _ = handle_tx.send(Err(format!(
                        "cannot enter network namespace {}: {e}",
                        netns.display()
                    )));
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(format!("cannot build a tokio runtime: {e}")));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
                // Dropping `runtime` here cancels the remaining tasks.
            })
            .unwrap_or_else(|e| panic!("cannot spawn the {label} runtime thread: {e}"));
        match handle_rx.recv() {
            Ok(Ok(handle)) => Self {
                label: label.to_owned(),
                handle,
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("{label}: {e}");
            }
            Err(_) => {
                let _ = thread.join();
                panic!("{label}: the runtime thread ended before starting");
            }
        }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `future` on the runtime's thread (inside the namespace) and waits for its output.
    /// Must not be called from a task of this runtime.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().unwrap_or_else(|_| {
            panic!(
                "{}: a task panicked or the runtime stopped before it finished",
                self.label
            )
        })
    }

    /// Spawns `future` on the runtime's thread.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// Sends `request` to `addr` from inside the namespace, giving up after `timeout`.
    pub fn request(
        &self,
        addr: SocketAddr,
        request: HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, String> {
        self.block_on(async move {
            match tokio::time::timeout(timeout, request.send(addr)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no response from {addr} within {timeout:?}")),
            }
        })
    }
}

impl Drop for NetnsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("cleanup: the {} runtime thread panicked", self.label);
        }
    }
}

/// An HTTP/1.1 request for [`HttpRequest::send`]: one request on a fresh connection.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: String,
    /// Path and query, e.g. `/latest/api/token`.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn put(path: &str) -> Self {
        Self::new("PUT", path)
    }

    pub fn post(path: &str) -> Self {
        Self::new("POST", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Connects to `addr`, sends the request (with `Host: <addr>` unless a Host header is set)
    /// and reads the whole response. Errors name the step that failed.
    pub async fn send(self, addr: SocketAddr) -> Result<HttpResponse, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut builder = Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str());
        if !self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            builder = builder.header("host", addr.to_string());
        }
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder
            .body(Full::new(Bytes::from(self.body)))
            .map_err(|e| format!("invalid request {} {}: {e}", self.method, self.path))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{} {} to {addr}: {e}", self.method, self.path))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the response body from {addr}: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

/// A whole HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What an [`HttpServer`] does with its connections and requests.
pub trait Handler: Send + Sync + 'static {
    /// Called for every accepted connection, before anything is read from it.
    fn accepted(&self, _local: SocketAddr, _peer: SocketAddr) {}

    /// Answers one request that arrived at `local` from `peer`.
    fn handle(
        self: Arc<Self>,
        local: SocketAddr,
        peer: SocketAddr,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// One listener's accept loop: the stop signal and the task (which owns the listener and the
/// connections it accepted).
struct AcceptTask {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// An HTTP/1.1 server on fixed addresses inside a network namespace, with keep-alive. While it
/// is down its listeners are closed (connects are refused) and the connections it had are
/// closed.
pub struct HttpServer<H: Handler> {
    label: String,
    addrs: Vec<SocketAddr>,
    handler: Arc<H>,
    accept: Mutex<Option<Vec<AcceptTask>>>,
    // Last, so the tasks above are stopped before the runtime goes.
    runtime: NetnsRuntime,
}

impl<H: Handler> HttpServer<H> {
    /// Listens on `addrs` inside the namespace at `netns`; panics if a bind fails.
    pub fn start(label: &str, netns: &Path, addrs: &[SocketAddr], handler: H) -> Self {
        let server = Self {
            label: label.to_owned(),
            addrs: addrs.to_vec(),
            handler: Arc::new(handler),
            accept: Mutex::new(None),
            runtime: NetnsRuntime::start(label, netns),
        };
        server.set_up(true);
        server
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    pub fn runtime(&self) -> &NetnsRuntime {
        &self.runtime
    }

    pub fn is_up(&self) -> bool {
        self.accept.lock().expect("accept lock").is_some()
    }

    /// Up: listen on the addresses again (no-op if listening); panics if a bind fails.
    /// Down: close the listeners and every open connection; when this returns, connects are
    /// refused.
    pub fn set_up(&self, up: bool) {
        let mut accept = self.accept.lock().expect("accept lock");
        match (up, accept.is_some()) {
            (true, false) => {
                let addrs = self.addrs.clone();
                let handler = Arc::clone(&self.handler);
                let tasks = self
                    .runtime
                    .block_on(async move { bind_all(&addrs, handler).await });
                match tasks {
                    Ok(tasks) => *accept = Some(tasks),
                    Err(e) => panic!("{}: {e}", self.label),
                }
            }
            (false, true) => {
                if let Some(tasks) = accept.take() {
                    self.runtime.block_on(stop_all(tasks));
                }
            }
            _ => {}
        }
    }
}

impl<H: Handler> Drop for HttpServer<H> {
    fn drop(&mut self) {
        let tasks = self.accept.get_mut().ok().and_then(Option::take);
        if let Some(tasks) = tasks {
            // Stopping the runtime (the next field) would drop them anyway; this closes the
            // sockets in order.
            for task in tasks {
                let _ = task.stop.send(());
            }
        }
    }
}

async fn bind_all<H: Handler>(
    addrs: &[SocketAddr],
    handler: Arc<H>,
) -> Result<Vec<AcceptTask>, String> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push((*addr, listener));
    }
    Ok(listeners
        .into_iter()
        .map(|(local, listener)| {
            let (stop, stop_rx) = oneshot::channel();
            let task = tokio::spawn(accept_loop(local, listener, Arc::clone(&handler), stop_rx));
            AcceptTask { stop, task }
        })
        .collect())
}

async fn stop_all(tasks: Vec<AcceptTask>) {
    for task in tasks {
        let _ = task.stop.send(());
        let _ = task.task.await;
    }
}

async fn accept_loop<H: Handler>(
    local: SocketAddr,
    listener: TcpListener,
    handler: Arc<H>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                handler.accepted(local, peer);
                connections.spawn(serve_connection(local, peer, stream, Arc::clone(&handler)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Aborts every connection task and waits until each is dropped (its socket closed).
    connections.shutdown().await;
}

async fn serve_connection<H: Handler>(
    local: SocketAddr,
    peer: SocketAddr,
    stream: TcpStream,
    handler: Arc<H>,
) {
    let service = service_fn(move |request| {
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.handle(local, peer, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A response with `status`, the given headers and `body`.
pub fn response(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(body.into()))
        // Only fixed, valid status codes and header names reach here.
        .unwrap_or_else(|e| panic!("invalid test response ({status}, {headers:?}): {e}"))
}

/// Decodes `application/x-www-form-urlencoded` text into its pairs, in order.
pub fn form_pairs(text: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(text)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The pairs as a map (the last value wins).
pub fn form_map(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}
