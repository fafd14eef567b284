//! Watches: the initial events or the history after a resource version, then the store's
//! changes as they happen, bookmarks, and the 410 Expired a client must relist after.

use std::{
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Response,
    body::{Frame, SizeHint},
    header::{CONTENT_TYPE, HeaderValue},
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use super::{Body, Query, Selection, Shared, Target, parse_rv, too_large};
use crate::kube_api::{
    store::{ApiError, ChangeKind, Key, Resource, Store},
    table::{self, Format},
};

/// The body of a watch response: frames from the task that follows the store.
struct WatchBody {
    frames: mpsc::Receiver<Result<Frame<Bytes>, io::Error>>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.frames.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Where a watch starts.
enum Start {
    /// Synthetic ADDED events for the current state, then changes after `rv`; with
    /// `initial_events_end`, a BOOKMARK annotated `k8s.io/initial-events-end` after them.
    Initial {
        objects: Vec<Value>,
        rv: u64,
        initial_events_end: bool,
    },
    /// Changes after `rv`.
    From(u64),
    /// An ERROR event (410 Expired), then the end of the stream.
    Expired(ApiError),
}

struct WatchSpec {
    selection: Selection,
    format: Format,
    bookmarks: bool,
    timeout: Duration,
}

pub(super) fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
    format: Format,
) -> Result<Response<Body>, ApiError> {
    let (selection, rv_param) = Selection::with_resource_version(target, query)?;
    let bookmarks = query.flag("allowWatchBookmarks")?.unwrap_or(false);
    let send_initial = query.flag("sendInitialEvents")?;
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let max = shared.options.max_watch_timeout;
    let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        Some(t) => {
            let secs: u64 = t
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?;
            Duration::from_secs(secs).min(max)
        }
        None => max,
    };
    if send_initial.is_some() {
        if rv_match != Some("NotOlderThan") {
            return Err(ApiError::invalid(
                selection.resource,
                "",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
                 resourceVersionMatch to NotOlderThan",
            ));
        }
        if send_initial == Some(true) && !bookmarks {
            return Err(ApiError::invalid(
                selection.resource,
                "",
                "allowWatchBookmarks: Required value: sendInitialEvents requires \
                 allowWatchBookmarks to be true",
            ));
        }
    } else if rv_match.is_some() {
        return Err(ApiError::bad_request(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided",
        ));
    }

    let start = {
        let store = shared.store.lock().expect("store lock");
        let current = || -> Vec<Value> {
            store
                .all(selection.resource)
                .iter()
                .filter(|(key, object)| selection.matches(key, object))
                .map(|(_, object)| object.clone())
                .collect()
        };
        match (rv_param, send_initial) {
            (_, Some(true)) => {
                if let Some(text) = rv_param {
                    let requested = parse_rv(text)?;
                    if requested > store.rv() {
                        return Err(too_large(requested, store.rv()));
                    }
                }
                Start::Initial {
                    objects: current(),
                    rv: store.rv(),
                    initial_events_end: true,
                }
            }
            (None, Some(false)) => Start::From(store.rv()),
            (None | Some("0"), None) => Start::Initial {
                objects: current(),
                rv: store.rv(),
                initial_events_end: false,
            },
            (Some(text), _) => {
                let requested = parse_rv(text)?;
                if requested > store.rv() {
                    return Err(too_large(requested, store.rv()));
                }
                match store.changes_after(requested) {
                    Ok(_) => Start::From(requested),
                    Err(expired) => Start::Expired(expired),
                }
            }
        }
    };

    let (tx, rx) = mpsc::channel(256);
    let spec = WatchSpec {
        selection,
        format,
        bookmarks,
        timeout,
    };
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let _open = OpenWatch::new(&task_shared);
        run_watch(&task_shared, spec, start, tx).await;
    });
    let mut response = Response::new(WatchBody { frames: rx }.boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Counts open watch streams.
struct OpenWatch<'s>(&'s Shared);

impl<'s> OpenWatch<'s> {
    fn new(shared: &'s Shared) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(event_type: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_object(resource: Resource, rv: u64, initial_events_end: bool) -> Value {
    let mut object = json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    // What the API server's empty object for the type serializes to.
    match resource {
        Resource::Pods => {
            object["spec"] = json!({"containers": null});
            object["status"] = json!({});
        }
        Resource::Namespaces => {
            object["spec"] = json!({});
            object["status"] = json!({});
        }
        Resource::Events => {
            object["involvedObject"] = json!({});
            object["source"] = json!({});
            object["firstTimestamp"] = Value::Null;
            object["lastTimestamp"] = Value::Null;
            object["eventTime"] = Value::Null;
            object["reportingComponent"] = json!("");
            object["reportingInstance"] = json!("");
        }
        Resource::EventsV1 => {
            object["eventTime"] = Value::Null;
            object["regarding"] = json!({});
        }
        // An empty ServiceAccount has nothing but its type and metadata.
        Resource::ServiceAccounts => {}
    }
    object
}

/// Converts a change to the event a watch with `selection` sees, if any: an object moving into
/// the selection is ADDED, one moving out is DELETED.
pub(super) fn event_for(
    selection: &Selection,
    kind: ChangeKind,
    key: &Key,
    object: &Value,
    prev: Option<&Value>,
) -> Option<(&'static str, Value)> {
    let now = selection.matches(key, object);
    let before = prev.is_some_and(|prev| selection.matches(key, prev));
    match kind {
        ChangeKind::Added => now.then(|| ("ADDED", object.clone())),
        ChangeKind::Deleted => before.then(|| ("DELETED", object.clone())),
        ChangeKind::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", object.clone())),
            (false, true) => Some(("ADDED", object.clone())),
            (true, false) => {
                let mut gone = prev.cloned().unwrap_or_default();
                gone["metadata"]["resourceVersion"] = object["metadata"]["resourceVersion"].clone();
                Some(("DELETED", gone))
            }
            (false, false) => None,
        },
    }
}

struct Sender {
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    format: Format,
    resource: Resource,
    sent_columns: bool,
}

impl Sender {
    async fn frame(&self, bytes: Bytes) -> bool {
        self.tx.send(Ok(Frame::data(bytes))).await.is_ok()
    }

    async fn event(&mut self, event_type: &str, object: Value) -> bool {
        let object = match self.format {
            Format::Object => object,
            Format::Table {
                api_version,
                include,
            } => {
                let with_columns = !self.sent_columns;
                self.sent_columns = true;
                table::table(
                    self.resource,
                    &[&object],
                    api_version,
                    include,
                    json!({"resourceVersion": object["metadata"]["resourceVersion"]}),
                    with_columns,
                )
            }
            Format::Metadata { api_version } => table::partial_metadata(&object, api_version),
        };
        self.frame(event_line(event_type, object)).await
    }

    async fn bookmark(&self, rv: u64, initial_events_end: bool) -> bool {
        let object = bookmark_object(self.resource, rv, initial_events_end);
        // Every object of a watch goes through the representation the client asked for, the
        // bookmark too: a metadata-only watch gets a PartialObjectMetadata bookmark.
        let object = match self.format {
            Format::Metadata { api_version } => table::partial_metadata(&object, api_version),
            _ => object,
        };
        self.frame(event_line("BOOKMARK", object)).await
    }

    async fn error(&self, error: &ApiError) -> bool {
        self.frame(event_line("ERROR", error.status())).await
    }
}

/// Watch events, as (type, object).
type WatchEvents = Vec<(&'static str, Value)>;

/// Collects what happened after `pos` for this watch; `Err` if the history no longer reaches.
fn collect(store: &Store, selection: &Selection, pos: u64) -> Result<(WatchEvents, u64), ApiError> {
    let events = store
        .changes_after(pos)?
        .filter(|change| change.resource == selection.resource)
        .filter_map(|change| {
            event_for(
                selection,
                change.kind,
                &change.key,
                &change.object,
                change.prev.as_ref(),
            )
        })
        .collect();
    Ok((events, store.rv()))
}

async fn run_watch(
    shared: &Shared,
    spec: WatchSpec,
    start: Start,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
) {
    let deadline = Instant::now() + spec.timeout;
    let mut changes = shared.rv_tx.subscribe();
    let mut dropped = shared.drop_tx.subscribe();
    let mut down = shared.down_tx.subscribe();
    let mut sender = Sender {
        tx,
        format: spec.format,
        resource: spec.selection.resource,
        sent_columns: false,
    };
    let mut pos = match start {
        Start::Expired(error) => {
            sender.error(&error).await;
            return;
        }
        Start::From(rv) => rv,
        Start::Initial {
            objects,
            rv,
            initial_events_end,
        } => {
            for object in objects {
                if !sender.event("ADDED", object).await {
                    return;
                }
            }
            if initial_events_end && !sender.bookmark(rv, true).await {
                return;
            }
            rv
        }
    };
    let bookmark_every = shared.options.bookmark_interval;
    let mut next_bookmark = Instant::now() + bookmark_every;
    loop {
        changes.borrow_and_update();
        let collected = {
            let store = shared.store.lock().expect("store lock");
            collect(&store, &spec.selection, pos)
        };
        match collected {
            Ok((events, rv)) => {
                for (event_type, object) in events {
                    if !sender.event(event_type, object).await {
                        return;
                    }
                }
                pos = rv;
            }
            Err(expired) => {
                sender.error(&expired).await;
                return;
            }
        }
        // Faults first: a change that races with a cut must not slip through before it.
        tokio::select! {
            biased;
            _ = dropped.changed() => {
                let _ = sender.tx.send(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "watch dropped by the test",
                ))).await;
                return;
            }
            _ = down.changed() => {
                if *down.borrow_and_update() {
                    let _ = sender.tx.send(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the API server went down",
                    ))).await;
                    return;
                }
            }
            _ = sender.tx.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {
                if !sender.bookmark(pos, false).await {
                    return;
                }
                next_bookmark = Instant::now() + bookmark_every;
            }
        }
    }
}
