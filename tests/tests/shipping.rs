//! What a platform team watches the agent by: Prometheus metrics (checked by promtool), Events
//! on refused pods (rate-limited), health and readiness, and `kube2iam-agent inspect` on the
//! pins. Each test runs the real agent in a test node against the emulators, and ends with the
//! no-leak checks every end-to-end test makes.

use std::time::{Duration, Instant};

use kube2iam_tests::{
    FaultMode, TestNode,
    clients::ClientCredentials,
    e2e::{ALLOWED_KEY, CREDS, ROLE_KEY, World, pod_get},
    kube_api::{self, RequestKind, Resource},
    observe::{Scrape, promtool_check, run_inspect, scrape, wait_for},
};
use serde_json::Value;

#[test]
fn metrics_pass_promtool_and_count_requests_sts_calls_and_redirects_without_pod_labels() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "web", &[(ROLE_KEY, "web-role")]);

    let before = scrape(&world, &node);
    promtool_check(&before.text);
    let credentials_200 = [("route", "credentials"), ("status", "200")];
    assert_eq!(
        before.value("kube2iam_requests_total", &credentials_200),
        0.0
    );

    let got = world.creds(&pod);
    let (status, _) = pod_get(&pod, "/latest/user-data", &[]);
    assert_eq!(status, 403);
    let after = scrape(&world, &node);
    promtool_check(&after.text);

    let m = |name: &str, labels: &[(&str, &str)]| after.value(name, labels);
    assert_eq!(m("kube2iam_requests_total", &credentials_200), 1.0);
    assert_eq!(
        m(
            "kube2iam_requests_total",
            &[("route", "credentials_list"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "kube2iam_requests_total",
            &[("route", "blocked"), ("status", "403")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "kube2iam_request_duration_seconds_count",
            &[("route", "credentials")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "kube2iam_request_duration_seconds_bucket",
            &[("route", "credentials"), ("le", "+Inf")]
        ),
        1.0
    );
    // One AssumeRole (the prefetch, or the request if it came first), and it succeeded.
    assert_eq!(m("kube2iam_sts_calls_total", &[("result", "success")]), 1.0);
    assert_eq!(
        m("kube2iam_sts_calls_total", &[("result", "throttled")]),
        0.0
    );
    assert_eq!(
        m(
            "kube2iam_sts_call_duration_seconds_count",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        m("kube2iam_credential_cache_hits_total", &[])
            + m("kube2iam_credential_cache_misses_total", &[]),
        1.0,
        "the one credentials request went through the cache"
    );
    assert_eq!(m("kube2iam_credential_cache_entries", &[]), 1.0);
    // The pod's IPv4 and IPv6 addresses.
    assert_eq!(m("kube2iam_identity_map_entries", &[]), 2.0);
    assert_eq!(m("kube2iam_identity_map_capacity", &[]), 1024.0);
    // Three connects from the pod to 169.254.169.254 (list, get, user-data), all redirected.
    assert!(
        m("kube2iam_bpf_events_total", &[("event", "redirected_ipv4")])
            - before.value("kube2iam_bpf_events_total", &[("event", "redirected_ipv4")])
            >= 3.0,
        "{}",
        after.text
    );
    assert!(
        after
            .get(
                "kube2iam_bpf_events_total",
                &[("event", "skipped_host_netns")]
            )
            .is_some()
    );
    assert_eq!(
        m("kube2iam_watch_restarts_total", &[("resource", "pods")]),
        0.0
    );
    assert_eq!(m("kube2iam_watch_synced", &[("resource", "pods")]), 1.0);
    assert_eq!(m("kube2iam_upstream_reachable", &[]), 1.0);
    assert_eq!(m("kube2iam_ready", &[]), 1.0);
    assert_eq!(
        m(
            "kube2iam_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // No unbounded labels: no address, pod name or role anywhere in a label.
    let ip = pod.ip4().to_string();
    for value in after.label_values() {
        assert!(
            !value.contains(&ip) && !value.contains("web") && !value.contains("arn:"),
            "a label carries a pod detail: {value:?}"
        );
    }
    // Scrapers that ask for OpenMetrics get it.
    let (status, body) = {
        let url = format!(
            "http://{}:{}/metrics",
            kube2iam_tests::HOST_IP4,
            kube2iam_tests::e2e::METRICS_PORT
        );
        let output = kube2iam_tests::process::output_within(
            node.command("curl").args([
                "-s",
                "-H",
                "Accept: application/openmetrics-text; version=1.0.0",
                "-w",
                "\n%{http_code} %{content_type}",
                &url,
            ]),
            Duration::from_secs(10),
            "curl openmetrics",
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
        (status.to_owned(), body.to_owned())
    };
    assert!(
        status.starts_with("200 application/openmetrics-text"),
        "{status}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

/// The Events about pod `namespace/name`.
fn pod_events(world: &World, namespace: &str, name: &str) -> Vec<Value> {
    world
        .api
        .events()
        .into_iter()
        .filter(|e| {
            e["involvedObject"]["namespace"] == namespace && e["involvedObject"]["name"] == name
        })
        .collect()
}

fn uid_of(world: &World, namespace: &str, name: &str) -> String {
    world
        .api
        .get_pod(namespace, name)
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .expect("the pod has a uid")
}

/// Waits until the pod has exactly one Event with `reason` whose count is `count`; returns it.
fn wait_event(world: &World, namespace: &str, name: &str, reason: &str, count: i64) -> Value {
    wait_for(
        Duration::from_secs(15),
        &format!("an Event {reason} with count {count} on {namespace}/{name}"),
        || {
            let events: Vec<_> = pod_events(world, namespace, name)
                .into_iter()
                .filter(|e| e["reason"] == reason)
                .collect();
            match events.as_slice() {
                [event] if event["count"] == count => Ok(event.clone()),
                _ => Err(events),
            }
        },
    )
}

#[test]
fn refused_pods_get_events_rate_limited_per_pod_and_reason_with_repeats_counted() {
    let node = TestNode::new();
    let world = World::start(
        &node,
        &["--namespace-restrictions", "--event-interval", "4s"],
    );
    world
        .api
        .add_namespace(kube_api::namespace("team").annotate(ALLOWED_KEY, r#"["web-*"]"#));
    let denied = node.add_pod("a");
    let malformed = node.add_pod("b");
    let throttled = node.add_pod("c");
    world.add_pod(&denied, "team", "admin", &[(ROLE_KEY, "admin-role")]);
    world.add_pod(&malformed, "team", "typo", &[(ROLE_KEY, "web role")]);
    world.wait_known(&node, &denied);
    world.wait_known(&node, &malformed);

    // A burst of refusals: one Event at once, the rest only counted.
    let started = Instant::now();
    for _ in 0..5 {
        let (status, body) = pod_get(&denied, CREDS, &[]);
        assert_eq!(status, 403, "{body}");
    }
    let burst = started.elapsed();
    let event = wait_event(&world, "team", "admin", "RoleNotAllowed", 1);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(
        event["involvedObject"]["uid"],
        uid_of(&world, "team", "admin")
    );
    assert_eq!(event["source"]["component"], "kube2iam-ebpf");
    assert_eq!(event["source"]["host"], kube2iam_tests::e2e::NODE_NAME);
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("namespace team allows only") && message.contains(ALLOWED_KEY),
        "{message}"
    );
    let (status, _) = pod_get(&malformed, CREDS, &[]);
    assert_eq!(status, 403);
    let event = wait_event(&world, "team", "typo", "InvalidRoleAnnotation", 1);
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a valid role name")),
        "{event}"
    );
    assert!(
        burst < Duration::from_secs(3),
        "five refusals took {burst:?}"
    );
    assert_eq!(
        world.api.count(RequestKind::Create, Resource::Events),
        2,
        "one write per pod and reason: {:?}",
        world.api.events()
    );
    assert_eq!(world.api.count(RequestKind::Patch, Resource::Events), 0);

    // After the interval, the suppressed repeats raise the count in one PATCH.
    let event = wait_event(&world, "team", "admin", "RoleNotAllowed", 5);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "updated before the interval passed: {event}"
    );
    assert_eq!(world.api.count(RequestKind::Patch, Resource::Events), 1);
    assert_eq!(world.api.count(RequestKind::Create, Resource::Events), 2);

    // STS failures, with nothing cached, are Events too (the prefetch alone records none).
    world.sts.set_mode(FaultMode::Throttle);
    world.add_pod(&throttled, "team", "batch", &[(ROLE_KEY, "web-batch")]);
    world.wait_known(&node, &throttled);
    std::thread::sleep(Duration::from_millis(500));
    assert!(pod_events(&world, "team", "batch").is_empty());
    let (status, body) = pod_get(&throttled, &format!("{CREDS}web-batch"), &[]);
    assert_eq!(status, 503, "{body}");
    let event = wait_event(&world, "team", "batch", "AssumeRoleFailed", 1);
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("STS throttled")),
        "{event}"
    );
    world.sts.set_mode(FaultMode::PassThrough);

    // Requests never wait for the API server: with it down, a refusal is still answered at
    // once, and the failed write is only counted.
    world.api.set_down(true);
    let started = Instant::now();
    let (status, body) = pod_get(&throttled, &format!("{CREDS}web-other"), &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal waited {:?}",
        started.elapsed()
    );
    let counted = |scrape: &Scrape, reason: &str, outcome: &str| {
        scrape.value(
            "kube2iam_pod_events_total",
            &[("reason", reason), ("outcome", outcome)],
        )
    };
    let metrics = wait_for(
        Duration::from_secs(15),
        "the failed UnknownRole write counted",
        || {
            let s = scrape(&world, &node);
            if counted(&s, "UnknownRole", "failed") == 1.0 {
                Ok(s)
            } else {
                Err(s.text)
            }
        },
    );
    world.api.set_down(false);
    assert_eq!(counted(&metrics, "RoleNotAllowed", "created"), 1.0);
    assert_eq!(counted(&metrics, "RoleNotAllowed", "suppressed"), 4.0);
    assert_eq!(counted(&metrics, "RoleNotAllowed", "updated"), 1.0);
    assert_eq!(counted(&metrics, "InvalidRoleAnnotation", "created"), 1.0);
    assert_eq!(counted(&metrics, "AssumeRoleFailed", "created"), 1.0);
    promtool_check(&metrics.text);
    world.assert_no_leak(&[&denied, &malformed, &throttled], &[]);
}

fn admin(world: &World, node: &TestNode, path: &str) -> (u16, String) {
    world.admin_get(node, path)
}

#[test]
fn readyz_follows_the_watch_and_the_upstream_metadata_service_while_healthz_stays_ok() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    wait_for(
        Duration::from_secs(15),
        "ready after start",
        || match admin(&world, &node, "/readyz") {
            (200, body) if body.trim() == "ready" => Ok(()),
            other => Err(other),
        },
    );
    assert_eq!(admin(&world, &node, "/healthz"), (200, "ok\n".into()));
    let pid = world.agent.pid();

    // The node's metadata service goes away: not ready (with the reason), still alive.
    world.imds.set_down(true);
    let body = wait_for(
        Duration::from_secs(20),
        "not ready while upstream is down",
        || match admin(&world, &node, "/readyz") {
            (503, body) => Ok(body),
            other => Err(other),
        },
    );
    assert!(
        body.starts_with("not ready: ")
            && body.contains("upstream metadata service unreachable (169.254.169.254:80)"),
        "{body}"
    );
    assert_eq!(admin(&world, &node, "/healthz").0, 200);
    assert_eq!(scrape(&world, &node).value("kube2iam_ready", &[]), 0.0);
    assert_eq!(
        scrape(&world, &node).value("kube2iam_upstream_reachable", &[]),
        0.0
    );

    // It comes back: ready again, the same process.
    world.imds.set_down(false);
    wait_for(
        Duration::from_secs(20),
        "ready after recovery",
        || match admin(&world, &node, "/readyz") {
            (200, _) => Ok(()),
            other => Err(other),
        },
    );
    assert!(world.agent.try_wait().is_none(), "the agent kept running");
    assert_eq!(world.agent.pid(), pid);

    // A restarted agent with the API server down: serving from the pins, but not ready until
    // the pod watch has synced.
    world.kill_agent();
    world.api.set_down(true);
    world.start_agent(&node, &[], false, false);
    let body = wait_for(
        Duration::from_secs(20),
        "not ready before the pod list",
        || match admin(&world, &node, "/readyz") {
            (503, body) => Ok(body),
            other => Err(other),
        },
    );
    assert!(body.contains("pod watch not synced"), "{body}");
    assert_eq!(admin(&world, &node, "/healthz").0, 200);
    world.api.set_down(false);
    wait_for(
        Duration::from_secs(30),
        "ready once the pods are listed",
        || match admin(&world, &node, "/readyz") {
            (200, _) => Ok(()),
            other => Err(other),
        },
    );
    world.assert_no_leak(&[], &[]);
}

#[test]
fn inspect_prints_the_pinned_identity_map_and_counters_while_running_and_after_exit() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let web = world.add_known_pod(&node, "a", "default", "web", &[(ROLE_KEY, "web-role")]);
    let plain = world.add_known_pod(&node, "b", "default", "plain", &[]);
    let got = world.creds(&web);
    let pin_path = world.agent.pin_path().to_owned();
    let web_uid = uid_of(&world, "default", "web");

    let check = |when: &str| {
        let output = run_inspect(&node, &pin_path, &[]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "inspect {when}: {}\n{text}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let row = |ip: std::net::Ipv4Addr| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(&ip.to_string()))
                .unwrap_or_else(|| panic!("inspect {when}: no row for {ip}:\n{text}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(row(web.ip4())[1..], ["default/web", "web-role", "-"]);
        assert_eq!(row(plain.ip4())[1..], ["default/plain", "-", "-"]);
        assert!(
            text.contains("identity map (4 of 1024 entries)"),
            "inspect {when}:\n{text}"
        );
        assert!(text.contains("k2i_connect4"), "inspect {when}:\n{text}");
        let redirected: u64 = text
            .lines()
            .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                ["redirected_ipv4", n] => n.parse().ok(),
                _ => None,
            })
            .unwrap_or_else(|| panic!("inspect {when}: no redirected_ipv4 counter:\n{text}"));
        assert!(redirected >= 2, "inspect {when}:\n{text}");

        let output = run_inspect(&node, &pin_path, &["--output", "json"]);
        let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "inspect --output json {when}: {e}\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        let entry = json["identities"]
            .as_array()
            .and_then(|list| {
                list.iter()
                    .find(|i| i["ip"] == web.ip4().to_string())
                    .cloned()
            })
            .unwrap_or_else(|| panic!("inspect --output json {when}: no {}: {json}", web.ip4()));
        assert_eq!(entry["namespace"], "default");
        assert_eq!(entry["pod"], "web");
        assert_eq!(entry["role"], "web-role");
        assert_eq!(entry["uid"], web_uid);
        text
    };
    let running = check("while the agent runs");
    assert!(
        running.contains("enabled: metadata connects from pods go to the agent"),
        "{running}"
    );

    let status = world.agent.terminate();
    assert!(status.success(), "{status}");
    check("after the agent stopped");

    // An empty directory is not an agent's: a clear error.
    let output = run_inspect(&node, &node.bpffs().join("nothing-here"), &[]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nothing is pinned there"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    world.assert_no_leak(&[&web, &plain], &[&ClientCredentials::from(&got)]);
}
