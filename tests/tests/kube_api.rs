//! The Kubernetes API emulator speaks the protocol real clients expect: its wire format checked
//! with curl, and kube-rs's watcher (the agent's client), Debian's kubectl (and any other kubectl
//! on the machine) and the python `kubernetes` client listing and watching it.
//!
//! These run in the machine's network namespace, on 127.0.0.1; every client is bounded by a
//! timeout and killed by PID.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod as K8sPod, ServiceAccount};
use kube::{
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, watcher},
};
use kube2iam_tests::{
    ChildGuard, KubeApi,
    e2e::{IRSA_KEY, ROLE_KEY},
    kube_api::{
        KubeApiOptions, RequestKind, Resource, debian_kubectl, namespace, parse_rfc3339, pod,
        service_account,
    },
    process::output_within,
    unique_id, venv,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, last)
}

/// GET with curl: (HTTP status, body).
fn curl(url: &str) -> (u16, String) {
    curl_with(&[url])
}

fn curl_with(args: &[&str]) -> (u16, String) {
    let output = output_within(
        Command::new("curl")
            .args(["-sS", "-m", "10", "-w", "\n%{http_code}"])
            .args(args),
        Duration::from_secs(20),
        "curl",
    );
    assert!(
        output.status.success(),
        "curl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (code.parse().expect("status code"), body.to_owned())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn names(list: &Value) -> BTreeSet<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Watch events of a finished (curl) watch body.
fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(json_of)
        .collect()
}

fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let name = e["object"]["metadata"]["name"].as_str().unwrap_or("-");
            format!("{} {name}", e["type"].as_str().unwrap())
        })
        .collect()
}

/// A cluster with pods on two nodes.
fn populated() -> KubeApi {
    let api = KubeApi::start_loopback();
    api.add_namespace(namespace("team-a").annotate("iam.amazonaws.com/allowed-roles", "[\"r-*\"]"));
    api.add_pod(
        pod(
            "team-a",
            "a",
            "node-a",
            ip(1),
            Some("fd00::1".parse().unwrap()),
        )
        .annotate(ROLE_KEY, "r-a"),
    );
    api.add_pod(pod("team-a", "b", "node-b", ip(2), None));
    api.add_pod(pod("default", "c", "node-a", ip(3), None).host_network(true));
    api
}

#[test]
fn lists_have_the_api_server_shape_and_honour_selectors() {
    let api = populated();
    let url = api.url();

    let (code, body) = curl(&format!("{url}/api/v1/pods"));
    assert_eq!(code, 200);
    let list = json_of(&body);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );
    assert!(list["metadata"].get("continue").is_none());
    assert_eq!(names(&list), set(&["a", "b", "c"]));
    let a = &list["items"][1];
    assert_eq!(a["metadata"]["name"], "a");
    assert!(a.get("kind").is_none(), "list items carry no kind: {a}");
    for field in ["uid", "resourceVersion", "creationTimestamp", "namespace"] {
        assert!(a["metadata"][field].is_string(), "{field} missing: {a}");
    }
    assert_eq!(a["metadata"]["annotations"][ROLE_KEY], "r-a");
    assert_eq!(
        a["status"]["podIPs"],
        json!([{"ip": "10.1.0.1"}, {"ip": "fd00::1"}])
    );

    let selected = |query: &str| {
        let (code, body) = curl(&format!("{url}/api/v1/pods?{query}"));
        assert_eq!(code, 200, "{query}: {body}");
        names(&json_of(&body))
    };
    assert_eq!(
        selected("fieldSelector=spec.nodeName%3Dnode-a"),
        set(&["a", "c"])
    );
    assert_eq!(
        selected("fieldSelector=spec.nodeName=node-a,spec.hostNetwork=false"),
        set(&["a"])
    );
    assert_eq!(
        selected("fieldSelector=metadata.namespace%3Dteam-a"),
        set(&["a", "b"])
    );
    assert_eq!(selected("fieldSelector=metadata.name%3Db"), set(&["b"]));
    assert_eq!(selected("labelSelector=app%3Db"), set(&["b"]));
    assert_eq!(selected("labelSelector=app%21%3Db,app"), set(&["a", "c"]));
    assert_eq!(
        selected("limit=500&resourceVersion=0"),
        set(&["a", "b", "c"])
    );

    let (code, body) = curl(&format!("{url}/api/v1/namespaces/team-a/pods"));
    assert_eq!((code, names(&json_of(&body))), (200, set(&["a", "b"])));
    let (code, body) = curl(&format!("{url}/api/v1/namespaces/team-a/pods/a"));
    let a = json_of(&body);
    assert_eq!(
        (code, &a["kind"], &a["metadata"]["name"]),
        (200, &json!("Pod"), &json!("a"))
    );
    let (code, body) = curl(&format!("{url}/api/v1/namespaces/team-a/pods/zz"));
    let status = json_of(&body);
    assert_eq!((code, &status["reason"]), (404, &json!("NotFound")));
    assert_eq!(status["message"], "pods \"zz\" not found");

    let (code, body) = curl(&format!("{url}/api/v1/namespaces"));
    let namespaces = json_of(&body);
    assert_eq!((code, &namespaces["kind"]), (200, &json!("NamespaceList")));
    assert!(names(&namespaces).is_superset(&set(&["default", "kube-system", "team-a"])));
    let (_, body) = curl(&format!("{url}/api/v1/namespaces/team-a"));
    let team = json_of(&body);
    assert_eq!(
        team["metadata"]["annotations"]["iam.amazonaws.com/allowed-roles"],
        "[\"r-*\"]"
    );
    assert_eq!(team["status"]["phase"], "Active");

    let (code, body) = curl(&format!("{url}/api/v1/pods?fieldSelector=spec.bogus%3Dx"));
    let status = json_of(&body);
    assert_eq!((code, &status["reason"]), (400, &json!("BadRequest")));
    assert_eq!(status["message"], "field label not supported: spec.bogus");

    // Later pods are strictly later, so IP ownership by creation time is well defined.
    let created = |name: &str| {
        let pod = api.get_pod("team-a", name).unwrap();
        parse_rfc3339(pod["metadata"]["creationTimestamp"].as_str().unwrap()).unwrap()
    };
    assert!(created("b") > created("a"));
}

#[test]
fn paging_and_exact_lists_rewind_the_history() {
    let api = populated();
    let url = api.url();
    let rv_before = api.resource_version();
    api.annotate_pod("team-a", "a", ROLE_KEY, Some("r-changed"));
    api.delete_pod("team-a", "b");

    let (code, body) = curl(&format!("{url}/api/v1/pods?limit=1"));
    let page = json_of(&body);
    assert_eq!((code, names(&page)), (200, set(&["c"])));
    assert_eq!(page["metadata"]["remainingItemCount"], 1);
    let token = page["metadata"]["continue"].as_str().unwrap().to_owned();
    // A change between pages does not show: the pages are one consistent snapshot.
    api.add_pod(pod("default", "d", "node-a", ip(4), None));
    let (code, body) = curl(&format!("{url}/api/v1/pods?limit=1&continue={token}"));
    let page = json_of(&body);
    assert_eq!((code, names(&page)), (200, set(&["a"])));
    assert!(page["metadata"].get("continue").is_none());

    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?resourceVersion={rv_before}&resourceVersionMatch=Exact"
    ));
    let then = json_of(&body);
    assert_eq!((code, names(&then)), (200, set(&["a", "b", "c"])));
    assert_eq!(then["metadata"]["resourceVersion"], rv_before.to_string());
    assert_eq!(then["items"][1]["metadata"]["annotations"][ROLE_KEY], "r-a");

    let current = api.resource_version();
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?resourceVersion={}",
        current + 100
    ));
    assert_eq!((code, &json_of(&body)["reason"]), (504, &json!("Timeout")));

    api.compact();
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?resourceVersion={rv_before}&resourceVersionMatch=Exact"
    ));
    assert_eq!((code, &json_of(&body)["reason"]), (410, &json!("Expired")));
    let (code, body) = curl(&format!("{url}/api/v1/pods?limit=1&continue={token}"));
    assert_eq!((code, &json_of(&body)["reason"]), (410, &json!("Expired")));
}

#[test]
fn watches_replay_history_send_bookmarks_and_expire() {
    let api = KubeApi::start(
        None,
        "127.0.0.1:0".parse().unwrap(),
        KubeApiOptions {
            bookmark_interval: Duration::from_millis(300),
            ..KubeApiOptions::default()
        },
    );
    let url = api.url();
    let start = api.resource_version();
    api.add_pod(pod("default", "a", "node-a", ip(1), None));
    api.add_pod(pod("default", "other", "node-b", ip(2), None));
    api.annotate_pod("default", "a", ROLE_KEY, Some("r"));
    api.set_pod_phase("default", "a", "Succeeded");
    api.delete_pod("default", "a");
    let end = api.resource_version();

    // From a resourceVersion: every later change that matches, then the stream ends on time.
    let began = Instant::now();
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?watch=true&resourceVersion={start}&fieldSelector=spec.nodeName%3Dnode-a\
         &allowWatchBookmarks=true&timeoutSeconds=1"
    ));
    assert_eq!(code, 200);
    assert!(began.elapsed() < Duration::from_secs(5));
    let got = events(&body);
    let changes: Vec<String> = summary(&got)
        .into_iter()
        .filter(|s| !s.starts_with("BOOKMARK"))
        .collect();
    assert_eq!(
        changes,
        ["ADDED a", "MODIFIED a", "MODIFIED a", "DELETED a"]
    );
    let deleted = got.iter().find(|e| e["type"] == "DELETED").unwrap();
    assert_eq!(
        deleted["object"]["metadata"]["resourceVersion"],
        end.to_string()
    );
    assert_eq!(deleted["object"]["kind"], "Pod");
    let bookmark = got
        .iter()
        .find(|e| e["type"] == "BOOKMARK")
        .expect("a bookmark");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        end.to_string()
    );
    assert_eq!(bookmark["object"]["kind"], "Pod");

    // Without a resourceVersion: synthetic ADDED for what exists now.
    let (_, body) = curl(&format!("{url}/api/v1/watch/pods?timeoutSeconds=1"));
    assert_eq!(summary(&events(&body)), ["ADDED other"]);

    // Streaming list: ADDED, then the initial-events-end bookmark.
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=true&resourceVersion=0&timeoutSeconds=1"
    ));
    assert_eq!(code, 200);
    let got = events(&body);
    assert_eq!(summary(&got[..2]), ["ADDED other", "BOOKMARK -"]);
    assert_eq!(
        got[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let (code, _) = curl(&format!(
        "{url}/api/v1/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
    ));
    assert_eq!(code, 422);

    // After compaction an old resourceVersion gets the in-stream 410, as from etcd.
    api.compact();
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?watch=true&resourceVersion={start}&timeoutSeconds=5"
    ));
    assert_eq!(code, 200);
    let got = events(&body);
    assert_eq!(got.len(), 1, "{body}");
    assert_eq!(got[0]["type"], "ERROR");
    let status = &got[0]["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 410);
    assert_eq!(status["reason"], "Expired");
    assert_eq!(
        status["message"],
        format!("too old resource version: {start} ({end})")
    );
    // The current resourceVersion still works.
    let (code, body) = curl(&format!(
        "{url}/api/v1/pods?watch=true&resourceVersion={end}&timeoutSeconds=1"
    ));
    assert_eq!((code, events(&body).len()), (200, 0));
    assert!(api.watch_count(Resource::Pods) >= 6);
}

/// A curl watch running in the background, its lines delivered as they arrive.
struct LiveWatch {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl LiveWatch {
    fn start(url: &str) -> Self {
        let mut command = Command::new("curl");
        command
            .args(["-sSN", "-m", "30", url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = ChildGuard::spawn(&mut command, "curl watch");
        let stdout = child.child_mut().stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a watch event within 10 s");
        json_of(&line)
    }
}

#[test]
fn live_watches_follow_selector_moves_and_are_cut_by_faults() {
    let api = KubeApi::start_loopback();
    let url = api.url();
    api.add_pod(pod("default", "p", "", ip(1), None).pending());
    let watch = LiveWatch::start(&format!(
        "{url}/api/v1/pods?watch=1&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion={}",
        api.resource_version()
    ));
    assert!(api.wait_until(Duration::from_secs(10), |api| api.open_watches() == 1));

    // Bound to our node: it enters the selection, so the watch sees ADDED.
    api.update_pod("default", "p", |p| p["spec"]["nodeName"] = json!("node-a"));
    let e = watch.next();
    assert_eq!(
        (e["type"].as_str(), e["object"]["spec"]["nodeName"].as_str()),
        (Some("ADDED"), Some("node-a"))
    );
    api.set_pod_ips("default", "p", &[IpAddr::V4(ip(9))]);
    let e = watch.next();
    assert_eq!(
        (e["type"].as_str(), e["object"]["status"]["podIP"].as_str()),
        (Some("MODIFIED"), Some("10.1.0.9"))
    );
    // A no-op write is no event.
    api.update_pod("default", "p", |_| {});
    // Moved away: DELETED for this watch.
    api.update_pod("default", "p", |p| p["spec"]["nodeName"] = json!("node-b"));
    let e = watch.next();
    assert_eq!(e["type"], "DELETED");
    assert_eq!(e["object"]["spec"]["nodeName"], "node-a");

    // drop_watches cuts the body mid-stream: curl reports a transfer error.
    let mut watch = watch;
    api.drop_watches();
    let status = watch
        .child
        .wait_timeout(Duration::from_secs(10))
        .expect("curl ends");
    assert!(!status.success(), "a cut chunked body is an error for curl");
    assert!(api.wait_until(Duration::from_secs(5), |api| api.open_watches() == 0));

    // Down: connections are refused; open watches are cut; back up on the same port.
    let mut watch = LiveWatch::start(&format!("{url}/api/v1/pods?watch=1"));
    watch.next();
    api.set_down(true);
    let status = watch
        .child
        .wait_timeout(Duration::from_secs(10))
        .expect("curl ends");
    assert!(!status.success());
    let output = output_within(
        Command::new("curl").args(["-sS", "-m", "5", &format!("{url}/version")]),
        Duration::from_secs(10),
        "curl",
    );
    assert_eq!(
        output.status.code(),
        Some(7),
        "connection refused while down"
    );
    api.set_down(false);
    assert!(api.wait_until(Duration::from_secs(10), |_| {
        Command::new("curl")
            .args(["-sf", "-m", "2", &format!("{url}/version")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }));
    let (code, body) = curl(&format!("{url}/version"));
    assert_eq!((code, &json_of(&body)["major"]), (200, &json!("1")));
}

#[test]
fn discovery_and_event_writes() {
    let api = populated();
    let url = api.url();
    let (code, body) = curl(&format!("{url}/api"));
    assert_eq!((code, &json_of(&body)["versions"]), (200, &json!(["v1"])));
    let (_, body) = curl(&format!("{url}/api/v1"));
    let resources = json_of(&body);
    assert_eq!(resources["kind"], "APIResourceList");
    let listed: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for name in ["pods", "namespaces", "events"] {
        assert!(listed.contains(&name), "{name} in {listed:?}");
    }
    let (_, body) = curl(&format!("{url}/apis"));
    assert_eq!(json_of(&body)["kind"], "APIGroupList");
    let (_, body) = curl(&format!("{url}/version"));
    assert_eq!(json_of(&body)["gitVersion"], "v1.31.0");

    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": "a.", "namespace": "team-a"},
        "involvedObject": {"kind": "Pod", "namespace": "team-a", "name": "a", "apiVersion": "v1"},
        "reason": "RoleDenied", "message": "denied", "type": "Warning", "count": 1,
        "source": {"component": "kube2iam"},
    })
    .to_string();
    let (code, body) = curl_with(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        &event,
        &format!("{url}/api/v1/namespaces/team-a/events"),
    ]);
    assert_eq!(code, 201, "{body}");
    let created = json_of(&body);
    let name = created["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("a.") && name.len() == 7, "{name}");
    let (code, body) = curl_with(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/strategic-merge-patch+json",
        "--data",
        r#"{"count": 2, "lastTimestamp": "2030-01-01T00:00:00Z"}"#,
        &format!("{url}/api/v1/namespaces/team-a/events/{name}"),
    ]);
    assert_eq!(code, 200, "{body}");
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["count"], 2);
    assert_eq!(events[0]["reason"], "RoleDenied");
    let (code, body) = curl(&format!(
        "{url}/api/v1/namespaces/team-a/events?fieldSelector=involvedObject.name%3Da"
    ));
    assert_eq!(
        (code, json_of(&body)["items"].as_array().unwrap().len()),
        (200, 1)
    );
    assert_eq!(api.count(RequestKind::Create, Resource::Events), 1);
    assert_eq!(api.count(RequestKind::Patch, Resource::Events), 1);

    // events.k8s.io/v1, as kube-rs's Recorder writes them.
    let (code, body) = curl_with(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"e1"},"eventTime":"2030-01-01T00:00:00.000000Z","reason":"X","action":"Y","reportingController":"kube2iam","reportingInstance":"n","type":"Normal","regarding":{"kind":"Pod","name":"a","namespace":"team-a"}}"#,
        &format!("{url}/apis/events.k8s.io/v1/namespaces/team-a/events"),
    ]);
    assert_eq!(code, 201, "{body}");
    assert_eq!(api.events().len(), 2);
    // A pod in a namespace that does not exist is refused, as by the API server.
    let (code, _) = curl_with(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        &pod("nowhere", "x", "n", ip(5), None)
            .into_value()
            .to_string(),
        &format!("{url}/api/v1/namespaces/nowhere/pods"),
    ]);
    assert_eq!(code, 404);
}

// ---------------------------------------------------------------------------------------------
// kube-rs

fn kube_client(api: &KubeApi) -> kube::Client {
    let config = kube::Config::new(api.url().parse().expect("emulator URL"));
    kube::Client::try_from(config).expect("kube client")
}

#[derive(Debug)]
enum Seen {
    InitDone(BTreeSet<String>),
    Apply(String, Option<String>),
    Delete(String),
    Error(String),
}

fn name_of(pod: &K8sPod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// `namespace/name` of a ServiceAccount's metadata.
fn account_key(m: &PartialObjectMeta<ServiceAccount>) -> String {
    format!(
        "{}/{}",
        m.metadata.namespace.as_deref().unwrap_or(""),
        m.metadata.name.as_deref().unwrap_or("")
    )
}

/// Runs a kube-rs watcher of every `K` (with the default backoff, as the agent does) on its own
/// runtime and reports what it sees: objects by `key`, with the value of their `annotation`.
fn spawn_kube_watcher<K>(
    api: &KubeApi,
    config: watcher::Config,
    key: fn(&K) -> String,
    annotation: &'static str,
) -> (mpsc::Receiver<Seen>, tokio::runtime::Runtime)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _guard = runtime.enter();
        kube_client(api)
    };
    let (tx, rx) = mpsc::channel();
    runtime.spawn(async move {
        let objects: kube::Api<K> = kube::Api::all(client);
        let mut stream = watcher(objects, config).default_backoff().boxed();
        let mut init = BTreeSet::new();
        while let Some(event) = stream.next().await {
            let seen = match event {
                Ok(watcher::Event::Init) => {
                    init.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(object)) => {
                    init.insert(key(&object));
                    continue;
                }
                Ok(watcher::Event::InitDone) => Seen::InitDone(init.clone()),
                Ok(watcher::Event::Apply(object)) => {
                    let value = object
                        .meta()
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(annotation).cloned());
                    Seen::Apply(key(&object), value)
                }
                Ok(watcher::Event::Delete(object)) => Seen::Delete(key(&object)),
                Err(e) => Seen::Error(e.to_string()),
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
    (rx, runtime)
}

/// The next non-error observation (errors are collected into `errors`).
fn next_seen(rx: &mpsc::Receiver<Seen>, errors: &mut Vec<String>) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Seen::Error(e)) => errors.push(e),
            Ok(seen) => return seen,
            Err(_) => panic!("kube-rs watcher reported nothing within 30 s (errors: {errors:?})"),
        }
    }
}

fn kube_rs_scenario(streaming: bool) {
    let api = KubeApi::start_loopback();
    api.add_pod(pod("default", "mine", "node-a", ip(1), None).annotate(ROLE_KEY, "r1"));
    api.add_pod(pod("default", "theirs", "node-b", ip(2), None));
    let mut config = watcher::Config::default().fields("spec.nodeName=node-a");
    if streaming {
        config = config.streaming_lists();
    }
    let (rx, runtime) = spawn_kube_watcher(&api, config, name_of, ROLE_KEY);
    let mut errors = Vec::new();
    // Initial lists: list requests, or (streaming) watches that ask for the initial events.
    let initial = |api: &KubeApi| {
        api.requests()
            .iter()
            .filter(|r| {
                r.kind == RequestKind::List
                    || (r.kind == RequestKind::Watch
                        && r.param("sendInitialEvents").as_deref() == Some("true"))
            })
            .count()
    };

    match next_seen(&rx, &mut errors) {
        Seen::InitDone(names) => assert_eq!(names, set(&["mine"])),
        other => panic!("expected the initial list, got {other:?}"),
    }
    assert_eq!(initial(&api), 1);
    let request = api
        .requests()
        .into_iter()
        .find(|r| r.kind == RequestKind::Watch)
        .or_else(|| {
            // ListWatch: the watch follows the list; wait for it.
            api.wait_until(Duration::from_secs(10), |api| {
                api.watch_count(Resource::Pods) > 0
            });
            api.requests()
                .into_iter()
                .find(|r| r.kind == RequestKind::Watch)
        })
        .expect("a watch request");
    assert_eq!(
        request.param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-a")
    );
    assert_eq!(
        request.param("allowWatchBookmarks").as_deref(),
        Some("true")
    );

    api.annotate_pod("default", "mine", ROLE_KEY, Some("r2"));
    match next_seen(&rx, &mut errors) {
        Seen::Apply(name, role) => {
            assert_eq!((name.as_str(), role.as_deref()), ("mine", Some("r2")))
        }
        other => panic!("expected MODIFIED mine, got {other:?}"),
    }
    api.add_pod(pod("default", "new", "node-a", ip(3), None));
    api.add_pod(pod("default", "elsewhere", "node-b", ip(4), None));
    match next_seen(&rx, &mut errors) {
        Seen::Apply(name, _) => assert_eq!(name, "new"),
        other => panic!("expected ADDED new, got {other:?}"),
    }

    // A cut watch: kube-rs re-watches from its last resourceVersion, without a relist, and
    // misses nothing written while it was away.
    let watches = api.watch_count(Resource::Pods);
    api.drop_watches();
    api.delete_pod("default", "new");
    match next_seen(&rx, &mut errors) {
        Seen::Delete(name) => assert_eq!(name, "new"),
        other => panic!("expected DELETED new, got {other:?}"),
    }
    assert!(api.watch_count(Resource::Pods) > watches);
    assert_eq!(initial(&api), 1, "a cut watch needs no relist");

    // Compacted past its resourceVersion: the 410 makes kube-rs relist.
    api.wait_until(Duration::from_secs(10), |api| api.open_watches() == 1);
    api.set_down(true);
    api.annotate_pod("default", "mine", ROLE_KEY, Some("r3"));
    api.compact();
    api.set_down(false);
    let relisted = loop {
        match next_seen(&rx, &mut errors) {
            Seen::InitDone(names) => break names,
            Seen::Apply(..) if !streaming => {}
            other => panic!("expected a relist after 410, got {other:?}"),
        }
    };
    assert_eq!(relisted, set(&["mine"]));
    assert_eq!(initial(&api), 2, "exactly one relist");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("410") || e.contains("Expired") || e.contains("too old")),
        "the watcher saw the 410: {errors:?}"
    );
    api.set_pod_phase("default", "mine", "Failed");
    match next_seen(&rx, &mut errors) {
        Seen::Apply(name, role) => {
            assert_eq!((name.as_str(), role.as_deref()), ("mine", Some("r3")))
        }
        other => panic!("expected MODIFIED mine after the relist, got {other:?}"),
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn kube_rs_watcher_follows_reconnects_and_relists_after_410() {
    kube_rs_scenario(false);
}

#[test]
fn kube_rs_streaming_list_watcher_follows_reconnects_and_relists_after_410() {
    kube_rs_scenario(true);
}

// ---------------------------------------------------------------------------------------------
// kubectl

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("k2i-{label}-{}", unique_id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Kubectl<'a> {
    binary: &'a Path,
    home: TempDir,
    kubeconfig: PathBuf,
}

impl<'a> Kubectl<'a> {
    fn new(binary: &'a Path, api: &KubeApi) -> Self {
        let home = TempDir::new("kubectl");
        let kubeconfig = home.0.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        Self {
            binary,
            home,
            kubeconfig,
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.binary);
        command
            .env("HOME", &self.home.0)
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.0.join("cache"));
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let output = output_within(
            self.command().args(["--request-timeout", "10s"]).args(args),
            Duration::from_secs(60),
            "kubectl",
        );
        assert!(
            output.status.success(),
            "{} {args:?} failed ({}): {}",
            self.binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn kubectl_lists_and_watches(binary: &Path) {
    let api = populated();
    let kubectl = Kubectl::new(binary, &api);

    let list = json_of(&kubectl.run(&["get", "pods", "-A", "-o", "json"]));
    assert_eq!(list["kind"], "List");
    assert_eq!(names(&list), set(&["a", "b", "c"]));
    assert_eq!(list["items"][1]["metadata"]["annotations"][ROLE_KEY], "r-a");

    let table = table_rows(&kubectl.run(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=node-a",
    ]));
    assert_eq!(
        table[0],
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    );
    let rows: BTreeSet<String> = table[1..]
        .iter()
        .map(|r| format!("{}/{} {} {}", r[0], r[1], r[2], r[3]))
        .collect();
    assert_eq!(
        rows,
        set(&["default/c 1/1 Running", "team-a/a 1/1 Running"])
    );

    let wide = table_rows(&kubectl.run(&["get", "pods", "-n", "team-a", "-o", "wide"]));
    assert_eq!(
        &wide[0][..7],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    );
    assert_eq!(&wide[1][5..7], ["10.1.0.1", "node-a"]);

    let names_only = kubectl.run(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=node-b",
        "-o",
        "name",
    ]);
    assert_eq!(names_only.trim(), "pod/b");
    let labelled = kubectl.run(&["get", "pods", "-A", "-l", "app=a", "-o", "name"]);
    assert_eq!(labelled.trim(), "pod/a");

    let namespaces = table_rows(&kubectl.run(&["get", "namespaces"]));
    assert_eq!(namespaces[0], ["NAME", "STATUS", "AGE"]);
    assert!(
        namespaces.iter().any(|r| r[..2] == ["team-a", "Active"]),
        "{namespaces:?}"
    );
    let annotation = kubectl.run(&[
        "get",
        "namespace",
        "team-a",
        "-o",
        "jsonpath={.metadata.annotations.iam\\.amazonaws\\.com/allowed-roles}",
    ]);
    assert_eq!(annotation, "[\"r-*\"]");

    // Watch: the existing pods as ADDED, then a change as MODIFIED.
    let mut command = kubectl.command();
    command
        .args([
            "get",
            "pods",
            "-n",
            "team-a",
            "--watch",
            "-o",
            "json",
            "--output-watch-events",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut command, "kubectl watch");
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut stderr = child.child_mut().stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
    thread::spawn(move || {
        for value in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            match value {
                Ok(value) => {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    let mut next = || {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                panic!("kubectl watch printed nothing within 20 s: {err}")
            })
    };
    let mut added = BTreeSet::new();
    while added.len() < 2 {
        let event = next();
        assert_eq!(event["type"], "ADDED", "{event}");
        added.insert(
            event["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(added, set(&["a", "b"]));
    api.annotate_pod("team-a", "b", ROLE_KEY, Some("r-b"));
    let event = next();
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["metadata"]["name"], "b");
    assert_eq!(event["object"]["metadata"]["annotations"][ROLE_KEY], "r-b");
    api.delete_pod("team-a", "b");
    let event = next();
    assert_eq!(event["type"], "DELETED");
    child.kill9();
    assert!(api.list_count(Resource::Pods) >= 1 && api.watch_count(Resource::Pods) >= 1);
}

#[test]
fn debian_kubectl_lists_and_watches() {
    let kubectl = debian_kubectl();
    let version = output_within(
        Command::new(&kubectl).args(["version", "--client"]),
        Duration::from_secs(20),
        "kubectl version",
    );
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.contains("v1.20"),
        "Debian bookworm ships kubectl 1.20: {version}"
    );
    kubectl_lists_and_watches(&kubectl);
}

/// The kubectl on PATH and its `version --client` output, if there is one and it runs; else
/// `None`, having said why (Debian's kubectl is covered by `covered`).
fn path_kubectl(covered: &str) -> Option<(PathBuf, std::process::Output)> {
    let Some(found) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("kubectl"))
            .find(|candidate| candidate.is_file())
    }) else {
        eprintln!("no kubectl on PATH; Debian's is covered by {covered}");
        return None;
    };
    let version = output_within(
        Command::new(&found).args(["version", "--client"]),
        Duration::from_secs(60),
        "kubectl version",
    );
    if !version.status.success() {
        eprintln!("{} does not run; skipping it", found.display());
        return None;
    }
    Some((found, version))
}

/// Another kubectl found on PATH (a newer one, on machines that have it): the same checks.
#[test]
fn path_kubectl_lists_and_watches_if_present() {
    let Some((found, version)) = path_kubectl("debian_kubectl_lists_and_watches") else {
        return;
    };
    eprintln!(
        "checking {}: {}",
        found.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    kubectl_lists_and_watches(&found);
}

// ---------------------------------------------------------------------------------------------
// python kubernetes client

const PYTHON_CLIENT: &str = r#"
import json, sys
from kubernetes import client, watch

def out(**kw):
    print(json.dumps(kw), flush=True)

cfg = client.Configuration()
cfg.host = sys.argv[1]
v1 = client.CoreV1Api(client.ApiClient(cfg))

pods = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a")
out(listed=sorted(p.metadata.name for p in pods.items), rv=pods.metadata.resource_version,
    roles={p.metadata.name: (p.metadata.annotations or {}).get("iam.amazonaws.com/role")
           for p in pods.items},
    ips={p.metadata.name: [i.ip for i in (p.status.pod_ips or [])] for p in pods.items})
labelled = v1.list_namespaced_pod("team-a", label_selector="app=b")
out(labelled=[p.metadata.name for p in labelled.items])
ns = v1.read_namespace("team-a")
out(namespace=ns.metadata.name, annotations=ns.metadata.annotations)
sys.stdin.readline()

w = watch.Watch()
for event in w.stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=node-a",
                      resource_version=pods.metadata.resource_version, timeout_seconds=20):
    obj = event["object"]
    out(type=event["type"], name=obj.metadata.name,
        role=(obj.metadata.annotations or {}).get("iam.amazonaws.com/role"),
        rv=obj.metadata.resource_version)
    if event["type"] == "DELETED":
        w.stop()
out(phase="compact")

# With timeout_seconds the client does not retry; without, it retries a 410 once. Each starts
# when the test says so, after it has counted the watches of the one before.
for kwargs in ({"timeout_seconds": 5}, {}):
    sys.stdin.readline()
    try:
        for event in watch.Watch().stream(v1.list_pod_for_all_namespaces,
                                          resource_version=pods.metadata.resource_version,
                                          **kwargs):
            out(unexpected=event["type"])
        out(exception=None)
    except client.rest.ApiException as e:
        out(exception=e.status, reason=e.reason)
"#;

#[test]
fn python_kubernetes_client_lists_watches_and_gets_410() {
    venv::ensure_venv();
    let api = populated();
    let mut command = Command::new(venv::venv_python());
    command
        .args(["-c", PYTHON_CLIENT, &api.url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut command, "python kubernetes client");
    let mut stdin = child.child_mut().stdin.take().unwrap();
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut stderr = child.child_mut().stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next = || {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                panic!("the python client printed nothing within 30 s: {err}")
            });
        json_of(&line)
    };

    let listed = next();
    assert_eq!(listed["listed"], json!(["a", "c"]));
    assert_eq!(listed["roles"]["a"], "r-a");
    assert_eq!(listed["ips"]["a"], json!(["10.1.0.1", "fd00::1"]));
    let list_rv = listed["rv"].as_str().unwrap().to_owned();
    assert_eq!(next()["labelled"], json!(["b"]));
    let ns = next();
    assert_eq!(
        ns["annotations"]["iam.amazonaws.com/allowed-roles"],
        "[\"r-*\"]"
    );

    // Changes before the watch starts are replayed from the history; later ones stream live.
    api.add_pod(pod("team-a", "d", "node-a", ip(4), None));
    api.add_pod(pod("team-a", "e", "node-b", ip(5), None));
    writeln!(stdin, "go").unwrap();
    let e = next();
    assert_eq!(
        (e["type"].as_str(), e["name"].as_str()),
        (Some("ADDED"), Some("d"))
    );
    api.annotate_pod("team-a", "d", ROLE_KEY, Some("r-d"));
    let e = next();
    assert_eq!(
        (e["type"].as_str(), e["role"].as_str()),
        (Some("MODIFIED"), Some("r-d"))
    );
    api.delete_pod("team-a", "d");
    let e = next();
    assert_eq!(
        (e["type"].as_str(), e["name"].as_str()),
        (Some("DELETED"), Some("d"))
    );
    assert_eq!(next()["phase"], "compact");

    api.compact();
    let mut watches = api.watch_count(Resource::Pods);
    // An in-stream 410 ERROR event becomes ApiException(410): at once for a watch with
    // timeout_seconds, after one retry with the same resourceVersion for one without.
    for retries in [0, 1] {
        writeln!(stdin, "go").unwrap();
        let e = next();
        assert_eq!(e["exception"], 410, "{e}");
        assert!(
            e["reason"]
                .as_str()
                .unwrap()
                .starts_with("Expired: too old resource version"),
            "{e}"
        );
        assert_eq!(api.watch_count(Resource::Pods) - watches, 1 + retries);
        watches = api.watch_count(Resource::Pods);
    }
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.kind == RequestKind::Watch)
            .all(|r| r.param("resourceVersion").as_deref() == Some(list_rv.as_str())),
    );
    let status = child
        .wait_timeout(Duration::from_secs(20))
        .expect("python exits");
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// Placement and lifetime

/// curl run in `command`'s namespace: its exit code and stdout.
fn curl_in(mut command: Command, url: &str) -> (Option<i32>, String) {
    let output = output_within(
        command.args(["-sS", "-m", "5", url]),
        Duration::from_secs(15),
        "curl",
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn serves_inside_a_test_node_and_releases_its_port_on_drop() {
    kube2iam_tests::require_root();
    let node = kube2iam_tests::TestNode::new();
    let api = KubeApi::start_in_node(&node);
    api.add_pod(pod("default", "p", "node-a", ip(1), None));
    let url = format!("{}/api/v1/pods", api.url());
    let (code, body) = curl_in(node.command("curl"), &url);
    assert_eq!(code, Some(0));
    assert_eq!(names(&json_of(&body)), set(&["p"]));
    drop(api);
    let (code, _) = curl_in(node.command("curl"), &url);
    assert_eq!(code, Some(7), "nothing listens after drop");

    let api = KubeApi::start_loopback();
    let url = format!("{}/version", api.url());
    assert_eq!(curl(&url).0, 200);
    drop(api);
    let (code, _) = curl_in(Command::new("curl"), &url);
    assert_eq!(code, Some(7), "nothing listens after drop");
}

// ---------------------------------------------------------------------------------------------
// ServiceAccounts, as the agent's --service-account-roles watches them (metadata only)

const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

fn with_accounts() -> KubeApi {
    let api = KubeApi::start_loopback();
    api.add_namespace(namespace("team-a"));
    api.add_service_account(
        service_account("team-a", "billing")
            .annotate(IRSA_KEY, "arn:aws:iam::123456789012:role/billing"),
    );
    api.add_service_account(service_account("team-a", "default"));
    api.add_service_account(service_account("default", "default"));
    api
}

#[test]
fn service_accounts_have_the_api_server_shape_in_full_and_metadata_only() {
    let api = with_accounts();
    let url = api.url();

    let (code, body) = curl(&format!("{url}/api/v1/serviceaccounts"));
    assert_eq!(code, 200);
    let list = json_of(&body);
    assert_eq!(
        (list["kind"].as_str(), list["apiVersion"].as_str()),
        (Some("ServiceAccountList"), Some("v1"))
    );
    assert_eq!(names(&list), set(&["billing", "default"]));
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let billing = &list["items"][1];
    assert!(billing.get("kind").is_none(), "list items carry no kind");
    assert!(
        billing["metadata"].get("generation").is_none(),
        "a ServiceAccount has no generation: {billing}"
    );
    assert_eq!(
        billing["metadata"]["annotations"][IRSA_KEY],
        "arn:aws:iam::123456789012:role/billing"
    );
    let (_, body) = curl(&format!("{url}/api/v1/namespaces/team-a/serviceaccounts"));
    assert_eq!(names(&json_of(&body)), set(&["billing", "default"]));
    let (_, body) = curl(&format!(
        "{url}/api/v1/serviceaccounts?fieldSelector=metadata.name%3Dbilling"
    ));
    assert_eq!(json_of(&body)["items"].as_array().unwrap().len(), 1);
    let (code, body) = curl(&format!(
        "{url}/api/v1/serviceaccounts?fieldSelector=spec.nodeName%3Dx"
    ));
    assert_eq!(code, 400, "{body}");
    let (code, body) = curl(&format!(
        "{url}/api/v1/namespaces/team-a/serviceaccounts/nope"
    ));
    assert_eq!(code, 404);
    assert_eq!(
        json_of(&body)["message"],
        "serviceaccounts \"nope\" not found"
    );

    // Metadata only, as kube-rs asks for with Api<PartialObjectMeta<ServiceAccount>>.
    let (code, body) = curl_with(&[
        "-H",
        &format!("Accept: {METADATA_LIST}, application/json"),
        &format!("{url}/api/v1/serviceaccounts"),
    ]);
    assert_eq!(code, 200);
    let list = json_of(&body);
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    for item in list["items"].as_array().unwrap() {
        assert_eq!(item["kind"], "PartialObjectMetadata", "{item}");
        assert_eq!(item["apiVersion"], "meta.k8s.io/v1");
        assert!(item["metadata"]["uid"].is_string());
    }
    let (_, body) = curl_with(&[
        "-H",
        &format!("Accept: {METADATA}"),
        &format!("{url}/api/v1/namespaces/team-a/serviceaccounts/billing"),
    ]);
    let one = json_of(&body);
    assert_eq!(one["kind"], "PartialObjectMetadata");
    assert_eq!(
        one["metadata"]["annotations"][IRSA_KEY],
        "arn:aws:iam::123456789012:role/billing"
    );

    // A metadata-only streaming watch: objects and the closing bookmark as PartialObjectMetadata.
    let (code, body) = curl_with(&[
        "-H",
        &format!("Accept: {METADATA}"),
        &format!(
            "{url}/api/v1/namespaces/team-a/serviceaccounts?watch=1&sendInitialEvents=true\
             &resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
        ),
    ]);
    assert_eq!(code, 200);
    let got = events(&body);
    assert_eq!(
        summary(&got[..3]),
        ["ADDED billing", "ADDED default", "BOOKMARK -"]
    );
    for event in &got[..3] {
        assert_eq!(event["object"]["kind"], "PartialObjectMetadata", "{event}");
    }
    assert_eq!(
        got[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // A change of the annotation is one MODIFIED event.
    let rv = api.resource_version();
    api.annotate_service_account("team-a", "billing", IRSA_KEY, Some("arn:aws:iam::1:role/x"));
    let (_, body) = curl(&format!(
        "{url}/api/v1/serviceaccounts?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    ));
    let got = events(&body);
    assert_eq!(summary(&got), ["MODIFIED billing"]);
    assert_eq!(got[0]["object"]["kind"], "ServiceAccount");
}

#[test]
fn kube_rs_metadata_watcher_follows_service_account_annotations() {
    let api = with_accounts();
    let (rx, runtime) = spawn_kube_watcher(&api, watcher::Config::default(), account_key, IRSA_KEY);
    let mut errors = Vec::new();
    match next_seen(&rx, &mut errors) {
        Seen::InitDone(names) => assert_eq!(
            names,
            set(&["default/default", "team-a/billing", "team-a/default"])
        ),
        other => panic!("expected the initial list, got {other:?}"),
    }
    api.annotate_service_account("team-a", "default", IRSA_KEY, Some("arn:aws:iam::1:role/d"));
    match next_seen(&rx, &mut errors) {
        Seen::Apply(name, role) => assert_eq!(
            (name.as_str(), role.as_deref()),
            ("team-a/default", Some("arn:aws:iam::1:role/d"))
        ),
        other => panic!("expected MODIFIED team-a/default, got {other:?}"),
    }
    api.delete_service_account("team-a", "billing");
    match next_seen(&rx, &mut errors) {
        Seen::Delete(name) => assert_eq!(name, "team-a/billing"),
        other => panic!("expected DELETED team-a/billing, got {other:?}"),
    }
    // Every list and watch asked for metadata only.
    let requests: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.resource == Some(Resource::ServiceAccounts))
        .collect();
    assert!(
        requests.iter().any(|r| r.kind == RequestKind::List)
            && requests.iter().any(|r| r.kind == RequestKind::Watch),
        "{requests:?}"
    );
    for request in &requests {
        let accept = request.accept.as_deref().unwrap_or("");
        assert!(
            accept.contains("as=PartialObjectMetadata"),
            "{:?} {} asked for {accept:?}",
            request.kind,
            request.path
        );
    }
    assert!(errors.is_empty(), "{errors:?}");
    runtime.shutdown_timeout(Duration::from_secs(5));
}

fn kubectl_serves_service_accounts(binary: &Path) {
    let api = with_accounts();
    let kubectl = Kubectl::new(binary, &api);
    let table = table_rows(&kubectl.run(&["get", "serviceaccounts", "-A"]));
    assert_eq!(table[0], ["NAMESPACE", "NAME", "SECRETS", "AGE"]);
    let rows: BTreeSet<String> = table[1..]
        .iter()
        .map(|r| format!("{}/{} {}", r[0], r[1], r[2]))
        .collect();
    assert_eq!(
        rows,
        set(&["default/default 0", "team-a/billing 0", "team-a/default 0"])
    );
    let by_short_name = kubectl.run(&["get", "sa", "-n", "team-a", "-o", "name"]);
    assert_eq!(
        by_short_name.lines().collect::<Vec<_>>(),
        ["serviceaccount/billing", "serviceaccount/default"]
    );
    let role = kubectl.run(&[
        "get",
        "sa",
        "billing",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.metadata.annotations.eks\\.amazonaws\\.com/role-arn}",
    ]);
    assert_eq!(role, "arn:aws:iam::123456789012:role/billing");
    // kubectl annotate patches the object; the store and a watch see the change.
    let rv = api.resource_version();
    kubectl.run(&[
        "annotate",
        "sa",
        "default",
        "-n",
        "team-a",
        &format!("{IRSA_KEY}=arn:aws:iam::123456789012:role/other"),
    ]);
    let stored = api.get_service_account("team-a", "default").unwrap();
    assert_eq!(
        stored["metadata"]["annotations"][IRSA_KEY],
        "arn:aws:iam::123456789012:role/other"
    );
    assert!(api.count(RequestKind::Patch, Resource::ServiceAccounts) >= 1);
    let (_, body) = curl(&format!(
        "{}/api/v1/serviceaccounts?watch=true&resourceVersion={rv}&timeoutSeconds=1",
        api.url()
    ));
    assert_eq!(summary(&events(&body)), ["MODIFIED default"]);
    kubectl.run(&[
        "annotate",
        "sa",
        "default",
        "-n",
        "team-a",
        &format!("{IRSA_KEY}-"),
    ]);
    let stored = api.get_service_account("team-a", "default").unwrap();
    assert!(
        stored["metadata"].get("annotations").is_none(),
        "the emptied map is removed: {stored}"
    );
    let deleted = kubectl.run(&["delete", "sa", "billing", "-n", "team-a"]);
    assert!(deleted.contains("billing"), "{deleted}");
    assert!(api.get_service_account("team-a", "billing").is_none());
}

#[test]
fn debian_kubectl_gets_annotates_and_deletes_service_accounts() {
    kubectl_serves_service_accounts(&debian_kubectl());
}

/// A newer kubectl on PATH, if the machine has one: the same checks.
#[test]
fn path_kubectl_serves_service_accounts_if_present() {
    let Some((found, _)) = path_kubectl("the test above") else {
        return;
    };
    kubectl_serves_service_accounts(&found);
}
