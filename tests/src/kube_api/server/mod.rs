//! The HTTP side: routing, discovery, list/get and writes, on hyper 1; watches in [`watch`],
//! patches in [`patch`].

mod patch;
mod watch;

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{
    ApiRequest, RequestKind, Shared,
    select::{FieldSelector, LabelSelector},
    store::{ApiError, Key, Resource},
    table::{self, Format},
};

type Body = BoxBody<Bytes, io::Error>;
type ServiceError = Box<dyn std::error::Error + Send + Sync>;

/// Largest request body accepted (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Accepts connections until `shutdown` fires. While the server is down the listener is closed,
/// so connects are refused, and reopened on the same address when it comes back.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let mut down = shared.down_tx.subscribe();
    let mut listener = Some(listener);
    loop {
        let is_down = *down.borrow_and_update();
        if is_down {
            listener = None;
        } else if listener.is_none() {
            match bind_with_retry(addr).await {
                Some(l) => listener = Some(l),
                None => {
                    eprintln!("kube-api emulator: cannot rebind {addr}; giving up");
                    return;
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = down.changed() => continue,
            accepted = accept(listener.as_ref()) => {
                let Ok((stream, _peer)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(shared.clone(), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn bind_with_retry(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return Some(listener);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(
        serde_json::to_vec(value).expect("JSON values serialize"),
    ));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.status(),
    )
}

/// Query parameters, percent-decoded (`+` is a space, as in Go's url.ParseQuery).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let pairs = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some("true" | "1" | "True" | "TRUE" | "t" | "T") => Ok(Some(true)),
            Some("false" | "0" | "False" | "FALSE" | "f" | "F" | "") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value for {name}: strconv.ParseBool: parsing {other:?}: invalid syntax"
            ))),
        }
    }
}

/// A request path naming a resource, a collection or one object.
#[derive(Debug)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    /// Came in under the deprecated `/watch/` prefix.
    watch_prefix: bool,
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (rest, group_v1) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => (rest, false),
        ["apis", "events.k8s.io", "v1", rest @ ..] => (rest, true),
        _ => return None,
    };
    let (rest, watch_prefix) = match rest {
        ["watch", rest @ ..] => (rest, true),
        rest => (rest, false),
    };
    let resource = |plural: &str| -> Option<Resource> {
        match (plural, group_v1) {
            ("pods", false) => Some(Resource::Pods),
            ("namespaces", false) => Some(Resource::Namespaces),
            ("events", false) => Some(Resource::Events),
            ("events", true) => Some(Resource::EventsV1),
            ("serviceaccounts", false) => Some(Resource::ServiceAccounts),
            _ => None,
        }
    };
    let target = |resource, namespace: Option<&str>, name: Option<&str>| Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        watch_prefix,
    };
    match rest {
        ["namespaces", ns, plural] => {
            let r = resource(plural)?;
            r.namespaced().then(|| target(r, Some(ns), None))
        }
        ["namespaces", ns, plural, name] => {
            let r = resource(plural)?;
            r.namespaced().then(|| target(r, Some(ns), Some(name)))
        }
        ["namespaces", name] if !group_v1 => Some(target(Resource::Namespaces, None, Some(name))),
        [plural] => Some(target(resource(plural)?, None, None)),
        _ => None,
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ServiceError> {
    if *shared.down_tx.borrow() {
        // Close the connection without an answer, as a crashed server would.
        return Err("the API server is down".into());
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("cannot read the request body: {e}"),
            )));
        }
    };
    let path = parts.uri.path().to_owned();
    let query = Query::parse(parts.uri.query());
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let target = parse_target(&path);
    let watching = target.as_ref().is_some_and(|t| t.watch_prefix)
        || matches!(query.get("watch"), Some("true" | "1"));
    let kind = match (&parts.method, &target) {
        (_, None) => RequestKind::Other,
        (&Method::GET, Some(_)) if watching => RequestKind::Watch,
        (&Method::GET, Some(t)) if t.name.is_some() => RequestKind::Get,
        (&Method::GET, Some(_)) => RequestKind::List,
        (&Method::POST, Some(_)) => RequestKind::Create,
        (&Method::PUT, Some(_)) => RequestKind::Update,
        (&Method::PATCH, Some(_)) => RequestKind::Patch,
        (&Method::DELETE, Some(_)) => RequestKind::Delete,
        (_, Some(_)) => RequestKind::Other,
    };
    shared.record(ApiRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        kind,
        resource: target.as_ref().map(|t| t.resource),
        user_agent: header("user-agent"),
        accept: header("accept"),
        body: (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned()),
    });
    let format = Format::from_accept(header("accept").as_deref(), query.get("includeObject"));

    let Some(target) = target else {
        return Ok(match (&parts.method, path.trim_end_matches('/')) {
            (&Method::GET, "/version") => json_response(StatusCode::OK, &version()),
            (&Method::GET, "/api") => json_response(StatusCode::OK, &api_versions(&shared)),
            (&Method::GET, "/api/v1") => json_response(StatusCode::OK, &core_resources()),
            (&Method::GET, "/apis") => json_response(StatusCode::OK, &api_groups()),
            (&Method::GET, "/apis/events.k8s.io") => json_response(StatusCode::OK, &events_group()),
            (&Method::GET, "/apis/events.k8s.io/v1") => {
                json_response(StatusCode::OK, &events_resources())
            }
            (&Method::GET, "/healthz" | "/livez" | "/readyz") => {
                let mut response = Response::new(full("ok"));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response
            }
            _ => error_response(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        });
    };

    let result = match kind {
        RequestKind::Watch => watch::watch(&shared, &target, &query, format),
        RequestKind::List => list(&shared, &target, &query, format),
        RequestKind::Get => get(&shared, &target, format),
        RequestKind::Create => {
            let content_type = header("content-type");
            create(&shared, &target, content_type.as_deref(), &body)
        }
        RequestKind::Update => update(&shared, &target, &body),
        RequestKind::Patch => {
            let content_type = header("content-type");
            patch::patch(&shared, &target, content_type.as_deref(), &body)
        }
        RequestKind::Delete => delete(&shared, &target),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({})",
                parts.method
            ),
        )),
    };
    Ok(result.unwrap_or_else(|e| error_response(&e)))
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "31",
        "gitVersion": "v1.31.0",
        "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T07:28:49Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions(shared: &Shared) -> Value {
    let address = shared
        .addr
        .get()
        .map(ToString::to_string)
        .unwrap_or_default();
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    })
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn core_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
             "verbs": VERBS, "shortNames": ["ev"],
             "storageVersionHash": "r2yiGXH7wu8="},
            {"name": "namespaces", "singularName": "namespace", "namespaced": false,
             "kind": "Namespace", "verbs": ["create", "delete", "get", "list", "patch",
             "update", "watch"], "shortNames": ["ns"], "storageVersionHash": "Q3oi5N2YM8M="},
            {"name": "namespaces/status", "singularName": "", "namespaced": false,
             "kind": "Namespace", "verbs": ["get", "patch", "update"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
             "verbs": VERBS, "shortNames": ["po"], "categories": ["all"],
             "storageVersionHash": "xPOwRZ+Yhw8="},
            {"name": "pods/status", "singularName": "", "namespaced": true, "kind": "Pod",
             "verbs": ["get", "patch", "update"]},
            {"name": "serviceaccounts", "singularName": "serviceaccount", "namespaced": true,
             "kind": "ServiceAccount", "verbs": VERBS, "shortNames": ["sa"],
             "storageVersionHash": "pbx9ZvyFpBE="},
        ],
    })
}

fn events_group() -> Value {
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "events.k8s.io",
        "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "events.k8s.io/v1", "version": "v1"},
    })
}

fn api_groups() -> Value {
    let mut group = events_group();
    if let Some(map) = group.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})
}

fn events_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "events.k8s.io/v1",
        "resources": [
            {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
             "verbs": VERBS, "shortNames": ["ev"], "storageVersionHash": "r2yiGXH7wu8="},
        ],
    })
}

/// The selection a list or watch request makes.
struct Selection {
    resource: Resource,
    namespace: Option<String>,
    fields: FieldSelector,
    labels: LabelSelector,
}

impl Selection {
    fn new(target: &Target, query: &Query) -> Result<Self, ApiError> {
        let resource = target.resource;
        let mut fields = FieldSelector::parse(resource, query.get("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.0))?;
        let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.0))?;
        if let Some(name) = &target.name {
            fields.require("metadata.name", name);
        }
        Ok(Self {
            resource,
            namespace: target.namespace.clone(),
            fields,
            labels,
        })
    }

    /// The selection, and the resource version the request names (an empty one is none).
    fn with_resource_version<'q>(
        target: &Target,
        query: &'q Query,
    ) -> Result<(Self, Option<&'q str>), ApiError> {
        let selection = Self::new(target, query)?;
        let rv = query.get("resourceVersion").filter(|rv| !rv.is_empty());
        Ok((selection, rv))
    }

    fn matches(&self, key: &Key, object: &Value) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.0)
            && self.fields.matches(self.resource, object)
            && self.labels.matches(object)
    }

    fn has_selectors(&self) -> bool {
        !self.fields.is_empty() || !self.labels.is_empty()
    }
}

fn parse_rv(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {text:?}")))
}

fn too_large(requested: u64, current: u64) -> ApiError {
    ApiError {
        details: Some(json!({"causes": [{"reason": "ResourceVersionTooLarge",
                                         "message": "Too large resource version"}],
                             "retryAfterSeconds": 1})),
        ..ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
    }
}

/// Objects in a list response carry no kind/apiVersion, as from a real API server.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use \
    the continue token in this response to retrieve the remainder of the results. Continuing \
    with the provided token results in an inconsistent list - objects that were created, \
    modified, or deleted between the time the first chunk was returned and now may show up in \
    the list.";

fn encode_continue(rv: u64, last: &Key) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [last.0, last.1]});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, Key), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = value["rv"].as_u64().ok_or_else(bad)?;
    let ns = value["start"][0].as_str().ok_or_else(bad)?;
    let name = value["start"][1].as_str().ok_or_else(bad)?;
    Ok((rv, (ns.to_owned(), name.to_owned())))
}

fn list(
    shared: &Shared,
    target: &Target,
    query: &Query,
    format: Format,
) -> Result<Response<Body>, ApiError> {
    let (selection, rv_param) = Selection::with_resource_version(target, query)?;
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let limit = match query.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
        None => 0,
    };
    let continue_token = query.get("continue").filter(|c| !c.is_empty());

    let store = shared.store.lock().expect("store lock");
    let (rv, objects, start_after, paging) = if let Some(token) = continue_token {
        if rv_param.is_some() {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (rv, last) = decode_continue(token)?;
        let objects = store
            .snapshot(selection.resource, rv)
            .map_err(|_| ApiError::new(410, "Expired", CONTINUE_TOO_OLD))?;
        (rv, objects, Some(last), true)
    } else {
        match (rv_param, rv_match) {
            (None, Some(_)) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            (None, None) => (
                store.rv(),
                store.all(selection.resource).clone(),
                None,
                true,
            ),
            (Some("0"), Some("Exact")) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            // Served from the watch cache, which ignores limit.
            (Some("0"), _) => (
                store.rv(),
                store.all(selection.resource).clone(),
                None,
                false,
            ),
            (Some(text), None | Some("NotOlderThan")) => {
                let requested = parse_rv(text)?;
                if requested > store.rv() {
                    return Err(too_large(requested, store.rv()));
                }
                (
                    store.rv(),
                    store.all(selection.resource).clone(),
                    None,
                    true,
                )
            }
            (Some(text), Some("Exact")) => {
                let requested = parse_rv(text)?;
                if requested > store.rv() {
                    return Err(too_large(requested, store.rv()));
                }
                let objects = store.snapshot(selection.resource, requested)?;
                (requested, objects, None, true)
            }
            (Some(_), Some(other)) => {
                return Err(ApiError::bad_request(format!(
                    "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \
                     \"Exact\", \"NotOlderThan\""
                )));
            }
        }
    };
    drop(store);

    let selected: Vec<(&Key, &Value)> = objects
        .iter()
        .filter(|(key, _)| start_after.as_ref().is_none_or(|last| *key > last))
        .filter(|(key, object)| selection.matches(key, object))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    let page: Vec<&Value> = if paging && limit > 0 && selected.len() > limit as usize {
        let page = &selected[..limit as usize];
        let last = page.last().expect("limit > 0").0;
        metadata["continue"] = json!(encode_continue(rv, last));
        if !selection.has_selectors() {
            metadata["remainingItemCount"] = json!(selected.len() - page.len());
        }
        page.iter().map(|(_, o)| *o).collect()
    } else {
        selected.iter().map(|(_, o)| *o).collect()
    };

    let body = match format {
        Format::Object => json!({
            "kind": format!("{}List", selection.resource.kind()),
            "apiVersion": selection.resource.api_version(),
            "metadata": metadata,
            "items": page.iter().map(|o| list_item(o)).collect::<Vec<_>>(),
        }),
        Format::Table {
            api_version,
            include,
        } => table::table(
            selection.resource,
            &page,
            api_version,
            include,
            metadata,
            true,
        ),
        Format::Metadata { api_version } => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": api_version,
            "metadata": metadata,
            // The API server sets each item's kind and apiVersion (PartialObjectMetadata).
            "items": page
                .iter()
                .map(|o| table::partial_metadata(o, api_version))
                .collect::<Vec<_>>(),
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn represent(resource: Resource, object: &Value, format: Format) -> Value {
    match format {
        Format::Object => object.clone(),
        Format::Table {
            api_version,
            include,
        } => table::table(
            resource,
            &[object],
            api_version,
            include,
            json!({"resourceVersion": object["metadata"]["resourceVersion"]}),
            true,
        ),
        Format::Metadata { api_version } => table::partial_metadata(object, api_version),
    }
}

fn key_of(target: &Target) -> Key {
    (
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    )
}

fn get(shared: &Shared, target: &Target, format: Format) -> Result<Response<Body>, ApiError> {
    let key = key_of(target);
    let store = shared.store.lock().expect("store lock");
    let object = store
        .get(target.resource, &key)
        .ok_or_else(|| ApiError::not_found(target.resource, &key.1))?;
    Ok(json_response(
        StatusCode::OK,
        &represent(target.resource, object, format),
    ))
}

/// 405 for a method the target does not take.
fn method_not_allowed() -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized: cannot decode the body as JSON: {e}"
        ))
    })
}

fn create(
    shared: &Shared,
    target: &Target,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    if target.name.is_some() {
        return Err(method_not_allowed());
    }
    if let Some(ct) = content_type
        && !ct.starts_with("application/json")
        && !ct.starts_with("*/*")
    {
        return Err(unsupported_media_type(ct));
    }
    let object = parse_body(body)?;
    if let Some(kind) = object.get("kind").and_then(Value::as_str)
        && kind != target.resource.kind()
    {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (kind {kind:?} does not match {})",
            target.resource.kind()
        )));
    }
    let created =
        shared.write(|store| store.create(target.resource, target.namespace.as_deref(), object))?;
    Ok(json_response(StatusCode::CREATED, &created))
}

fn update(shared: &Shared, target: &Target, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let key = key_of(target);
    if target.name.is_none() {
        return Err(method_not_allowed());
    }
    let replacement = parse_body(body)?;
    if replacement["metadata"]["name"].as_str() != Some(key.1.as_str()) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let expected = replacement["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_owned);
    if expected.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::invalid(
            target.resource,
            &key.1,
            format!(
                "{} \"{}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be \
                 specified for an update",
                target.resource.kind(),
                key.1
            ),
        ));
    }
    let updated = shared.write(|store| {
        store.update(target.resource, &key, expected.as_deref(), |object| {
            *object = replacement;
            Ok(())
        })
    })?;
    Ok(json_response(StatusCode::OK, &updated))
}

fn unsupported_media_type(content_type: &str) -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type})"
        ),
    )
}

fn delete(shared: &Shared, target: &Target) -> Result<Response<Body>, ApiError> {
    if target.name.is_none() {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "deleting collections is not supported by this emulator",
        ));
    }
    let key = key_of(target);
    let deleted = shared.write(|store| store.delete(target.resource, &key))?;
    Ok(json_response(StatusCode::OK, &deleted))
}

#[cfg(test)]
mod tests {
    use super::{
        patch::{json_patch, merge_patch},
        watch::event_for,
        *,
    };
    use crate::kube_api::store::ChangeKind;

    #[test]
    fn targets() {
        let t = parse_target("/api/v1/pods").unwrap();
        assert_eq!(
            (t.resource, t.namespace, t.name),
            (Resource::Pods, None, None)
        );
        let t = parse_target("/api/v1/namespaces/ns/pods/p").unwrap();
        assert_eq!(
            (t.resource, t.namespace.as_deref(), t.name.as_deref()),
            (Resource::Pods, Some("ns"), Some("p"))
        );
        let t = parse_target("/api/v1/namespaces/ns").unwrap();
        assert_eq!(
            (t.resource, t.namespace.as_deref(), t.name.as_deref()),
            (Resource::Namespaces, None, Some("ns"))
        );
        let t = parse_target("/api/v1/watch/namespaces/ns/pods").unwrap();
        assert!(t.watch_prefix);
        let t = parse_target("/apis/events.k8s.io/v1/namespaces/ns/events/e").unwrap();
        assert_eq!(t.resource, Resource::EventsV1);
        assert!(parse_target("/api/v1/namespaces/ns/namespaces").is_none());
        assert!(parse_target("/api/v1/services").is_none());
        assert!(parse_target("/api/v1/namespaces/a/pods/b/status").is_none());
    }

    #[test]
    fn queries_decode() {
        let q = Query::parse(Some(
            "fieldSelector=spec.nodeName%3Dn1%2Cmetadata.name%3Da&x=a+b",
        ));
        assert_eq!(
            q.get("fieldSelector"),
            Some("spec.nodeName=n1,metadata.name=a")
        );
        assert_eq!(q.get("x"), Some("a b"));
        let q = Query::parse(Some("lone=%&short=a%2"));
        assert_eq!(q.get("lone"), Some("%"));
        assert_eq!(q.get("short"), Some("a%2"));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("ns".to_owned(), "p".to_owned());
        let token = encode_continue(42, &key);
        assert_eq!(decode_continue(&token).unwrap(), (42, key));
        assert!(decode_continue("garbage!").is_err());
    }

    #[test]
    fn patches() {
        let mut v = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}, "count": 1});
        merge_patch(
            &mut v,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}, "count": 2}),
        );
        assert_eq!(
            v,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}, "count": 2})
        );
        json_patch(
            &mut v,
            &json!([{"op": "replace", "path": "/count", "value": 5},
                    {"op": "add", "path": "/metadata/annotations/x~1y", "value": "z"},
                    {"op": "remove", "path": "/metadata/annotations/b"}]),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"metadata": {"annotations": {"c": "3", "x/y": "z"}}, "count": 5})
        );
        assert!(json_patch(&mut v, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }

    #[test]
    fn selections_turn_moves_into_added_and_deleted() {
        let target = parse_target("/api/v1/pods").unwrap();
        let query = Query::parse(Some("fieldSelector=spec.nodeName%3Dn1"));
        let selection = Selection::new(&target, &query).unwrap();
        let key = ("ns".to_owned(), "p".to_owned());
        let pending = json!({"metadata": {"resourceVersion": "1"}, "spec": {}});
        let bound = json!({"metadata": {"resourceVersion": "2"}, "spec": {"nodeName": "n1"}});
        let moved = json!({"metadata": {"resourceVersion": "3"}, "spec": {"nodeName": "n2"}});
        let e = event_for(
            &selection,
            ChangeKind::Modified,
            &key,
            &bound,
            Some(&pending),
        );
        assert_eq!(e.unwrap().0, "ADDED");
        let e = event_for(&selection, ChangeKind::Modified, &key, &moved, Some(&bound)).unwrap();
        assert_eq!(e.0, "DELETED");
        assert_eq!(e.1["metadata"]["resourceVersion"], "3");
        assert_eq!(e.1["spec"]["nodeName"], "n1");
        assert!(event_for(&selection, ChangeKind::Added, &key, &pending, None).is_none());
    }
}
