//! Faults injected around a real agent in a test node (the kit's `World`: IMDS emulator, moto
//! behind the STS fault proxy, the Kubernetes API emulator). Each fault ends in a clear answer to
//! the pod and a log line, cached credentials keep being served while they are valid, the agent
//! keeps running (or, where it cannot start, says why and leaves pods refused), and no pod ever
//! reaches the node's metadata service or receives the node's credentials.
//!
//! Faults covered in tests/tests/agent.rs and not repeated here:
//! * STS throttled, and STS down with credentials cached:
//!   `sts_throttled_or_down_serves_cached_credentials_and_a_clear_5xx_without_them`;
//! * upstream IMDS down while the agent runs:
//!   `upstream_imds_down_gives_502_on_proxied_paths_while_credentials_are_served`;
//! * watch disconnects, 410 Gone and pods added while the API is down:
//!   `watch_disconnects_and_410_gone_relist_without_dropping_pods`;
//! * a restart with the API server down: `a_restarted_agent_serves_known_pods_from_the_pinned_map`;
//! * bad role ARNs, bad role names and oversized role annotations:
//!   `malformed_and_oversized_annotations_get_clear_errors`.

use std::{
    ffi::OsString,
    fs,
    os::fd::AsFd as _,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use kube2iam_common::timeouts;
use kube2iam_tests::{
    Agent, AgentOptions, FaultMode, HOST_IP4, Pod, TestNode, agent_binary,
    bpf::{AttachType, prog_query},
    clients::{ClientCredentials, ImdsCredentialsDoc},
    e2e::{
        ALLOWED_KEY, BASE_ROLE_ARN, CREDS, EXTERNAL_ID_KEY, METRICS_PORT, NODE_NAME, ROLE_KEY,
        World, pod_credentials, pod_get, role_arn,
    },
    imds::{INSTANCE_ID, NODE_ACCESS_KEY_ID, USER_DATA},
    kube_api::{self, Resource},
    process::output_within,
};

/// The agent's STS client gives up after this.
const AGENT_STS_TIMEOUT: Duration = timeouts::STS_OPERATION;
/// The agent's upstream IMDS timeout.
const AGENT_UPSTREAM_TIMEOUT: Duration = timeouts::UPSTREAM;

/// One GET from inside `pod`, giving up after `max_time`. Returns the status (0 when no HTTP
/// answer came), the body, and how long it took.
fn pod_get_within(pod: &Pod<'_>, path: &str, max_time: Duration) -> (u16, String, Duration) {
    let url = format!("http://169.254.169.254{path}");
    let mut command = pod.command("curl");
    command.args([
        "-s",
        "--path-as-is",
        "-m",
        &max_time.as_secs_f64().to_string(),
        "-w",
        "\n%{http_code}",
        &url,
    ]);
    let started = Instant::now();
    let output = output_within(&mut command, max_time + Duration::from_secs(10), "curl");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned(), took)
}

/// Polls until the pod gets credentials for `role` (after a fault clears and the agent's
/// backoff for that role has passed), or panics.
fn creds_eventually(world: &World, pod: &Pod<'_>, within: Duration) -> ImdsCredentialsDoc {
    let deadline = Instant::now() + within;
    loop {
        match pod_credentials(pod) {
            Ok(doc) => return doc,
            Err((status, body)) if Instant::now() >= deadline => panic!(
                "no credentials within {within:?} after the fault cleared: {status} {body}\n\
                 agent log:\n{}",
                world.agent.log()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn assert_running(world: &mut World) {
    assert!(
        world.agent.try_wait().is_none(),
        "the agent exited during the fault:\n{}",
        world.agent.log()
    );
}

fn assert_logged(world: &World, needles: &[&str]) {
    let log = world.agent.log();
    assert!(
        log.lines()
            .any(|line| needles.iter().all(|n| line.contains(n))),
        "no agent log line contains all of {needles:?}:\n{log}"
    );
}

fn assert_no_node_data(what: &str, body: &str) {
    for secret in [NODE_ACCESS_KEY_ID, INSTANCE_ID, USER_DATA] {
        assert!(
            !body.contains(secret),
            "LEAK: {what} carried the node's data: {body}"
        );
    }
}

#[test]
fn sts_slower_than_the_agents_timeout_fails_clearly_while_cached_roles_are_served() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let cached = node.add_pod("a");
    let slow = node.add_pod("b");
    let impatient = node.add_pod("c");
    world.add_pod(&cached, "default", "cached", &[(ROLE_KEY, "cached-role")]);
    world.wait_known(&node, &cached);
    let good = world.creds(&cached);

    // Longer than the agent's whole STS budget (attempt timeouts and retries included).
    world
        .sts
        .set_mode(FaultMode::Slow(AGENT_STS_TIMEOUT + Duration::from_secs(15)));
    world.add_pod(&slow, "default", "slow", &[(ROLE_KEY, "slow-role")]);
    world.add_pod(&impatient, "default", "hurry", &[(ROLE_KEY, "hurry-role")]);
    world.wait_known(&node, &slow);
    world.wait_known(&node, &impatient);

    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            pod_get_within(
                &slow,
                &format!("{CREDS}slow-role"),
                AGENT_STS_TIMEOUT + Duration::from_secs(20),
            )
        });
        // An SDK's IMDS client gives up after a second or two: it gets no answer, never
        // anyone else's credentials.
        let (status, body, _) = pod_get_within(
            &impatient,
            &format!("{CREDS}hurry-role"),
            Duration::from_secs(2),
        );
        assert_eq!(status, 0, "the impatient client timed out: {body}");
        // Meanwhile the cached role is answered at once.
        for _ in 0..3 {
            let started = Instant::now();
            let got = world.creds(&cached);
            assert_eq!(got.access_key_id, good.access_key_id);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "cached credentials took {:?} while STS was slow",
                started.elapsed()
            );
        }
        let (status, body, took) = waiting.join().expect("slow request thread");
        assert_eq!(status, 502, "{body}\nagent log:\n{}", world.agent.log());
        assert!(
            body.contains("STS is unavailable for") && body.contains(&role_arn("slow-role")),
            "the answer names STS and the role: {body}"
        );
        assert!(
            took >= AGENT_STS_TIMEOUT - Duration::from_secs(2)
                && took < AGENT_STS_TIMEOUT + Duration::from_secs(10),
            "the agent gave up after {took:?}, not at its STS timeout ({AGENT_STS_TIMEOUT:?})"
        );
        assert_no_node_data("the slow-STS answer", &body);
    });
    assert_logged(&world, &["WARN", "slow-role"]);
    assert_running(&mut world);

    world.sts.set_mode(FaultMode::PassThrough);
    let recovered = creds_eventually(&world, &slow, Duration::from_secs(30));
    assert_eq!(
        Some(recovered.access_key_id.clone()),
        world.moto_key_for(&role_arn("slow-role"))
    );
    world.assert_no_leak(
        &[&cached, &slow, &impatient],
        &[
            &ClientCredentials::from(&good),
            &ClientCredentials::from(&recovered),
        ],
    );
}

/// A fault mode that fails every STS call, its expected status for a role with nothing cached,
/// and what the answer must say.
fn sts_failure_is_clear_and_cached_roles_survive(
    mode: FaultMode,
    statuses: &[u16],
    says: &[&str],
    log_says: &[&str],
) {
    let node = TestNode::new();
    // Always inside the refresh window: every request also tries STS in the background, so the
    // cached answer below is served despite failed refreshes, not because none was tried.
    let mut world = World::start(
        &node,
        &["--refresh-before", "1h", "--unchecked-refresh-before"],
    );
    let cached = node.add_pod("a");
    let fresh = node.add_pod("b");
    world.add_pod(&cached, "default", "cached", &[(ROLE_KEY, "cached-role")]);
    world.wait_known(&node, &cached);
    world.creds(&cached);

    world.sts.set_mode(mode.clone());
    // A refresh started before the switch may still land: the baseline is what is cached once
    // every call goes to the fault.
    std::thread::sleep(Duration::from_secs(1));
    let good = world.creds(&cached);
    assert!(
        world
            .moto
            .assume_role_calls()
            .iter()
            .any(|c| c.access_key_id.as_deref() == Some(good.access_key_id.as_str())),
        "the cached credentials are ones STS issued"
    );
    let calls_before = world.sts.call_count();
    world.add_pod(&fresh, "default", "fresh", &[(ROLE_KEY, "fresh-role")]);
    world.wait_known(&node, &fresh);
    let (status, body, took) = pod_get_within(
        &fresh,
        &format!("{CREDS}fresh-role"),
        Duration::from_secs(30),
    );
    assert!(
        statuses.contains(&status),
        "{mode:?}: {status} {body}\nagent log:\n{}",
        world.agent.log()
    );
    for needle in says {
        assert!(body.contains(needle), "{mode:?}: {needle:?} not in {body}");
    }
    assert!(body.contains("default/fresh"), "names the pod: {body}");
    assert!(
        took < AGENT_STS_TIMEOUT + Duration::from_secs(5),
        "{mode:?} answered after {took:?}"
    );
    assert_no_node_data("the STS failure answer", &body);
    for _ in 0..3 {
        let got = world.creds(&cached);
        assert_eq!(
            got.access_key_id, good.access_key_id,
            "cached credentials while STS is {mode:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if mode != FaultMode::Refuse {
        assert!(
            world.sts.call_count() > calls_before,
            "the agent did try STS during the fault"
        );
    }
    assert_logged(&world, log_says);
    assert_running(&mut world);

    world.sts.set_mode(FaultMode::PassThrough);
    let recovered = creds_eventually(&world, &fresh, Duration::from_secs(30));
    assert_eq!(
        Some(recovered.access_key_id.clone()),
        world.moto_key_for(&role_arn("fresh-role"))
    );
    world.assert_no_leak(
        &[&cached, &fresh],
        &[
            &ClientCredentials::from(&good),
            &ClientCredentials::from(&recovered),
        ],
    );
}

#[test]
fn sts_5xx_answers_502_naming_sts_serves_cached_roles_and_recovers() {
    sts_failure_is_clear_and_cached_roles_survive(
        FaultMode::ServerError,
        &[502],
        &["STS is unavailable for", "InternalFailure", "fresh-role"],
        &["WARN", "fresh-role", "InternalFailure"],
    );
}

#[test]
fn sts_refusing_connections_answers_502_serves_cached_roles_and_recovers() {
    sts_failure_is_clear_and_cached_roles_survive(
        FaultMode::Refuse,
        &[502],
        &["STS is unavailable for", "fresh-role"],
        &["WARN", "fresh-role", "STS is unavailable"],
    );
}

#[test]
fn sts_throttling_answers_503_serves_cached_roles_and_recovers() {
    sts_failure_is_clear_and_cached_roles_survive(
        FaultMode::Throttle,
        &[503],
        &["STS throttled", "fresh-role"],
        &["WARN", "fresh-role", "throttled"],
    );
}

#[test]
fn api_down_while_pods_are_deleted_added_and_changed_converges_after_410_gone() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let steady = node.add_pod("a");
    let deleted = node.add_pod("b");
    let changed = node.add_pod("c");
    let added = node.add_pod("d");
    world.add_pod(&steady, "default", "steady", &[(ROLE_KEY, "steady-role")]);
    world.add_pod(
        &deleted,
        "default",
        "deleted",
        &[(ROLE_KEY, "deleted-role")],
    );
    world.add_pod(&changed, "default", "changed", &[(ROLE_KEY, "old-role")]);
    for pod in [&steady, &deleted, &changed] {
        world.wait_known(&node, pod);
    }
    let good = world.creds(&steady);
    let lists_before = world.api.list_count(Resource::Pods);

    // The watch is cut, the API stays down while pods change, and history is compacted: the
    // resumed watch gets 410 Gone and only a relist can show what happened.
    world.api.drop_watches();
    world.api.set_down(true);
    world.api.delete_pod("default", "deleted");
    world
        .api
        .annotate_pod("default", "changed", ROLE_KEY, Some("new-role"));
    world.add_pod(&added, "default", "added", &[(ROLE_KEY, "added-role")]);
    world.api.compact();
    // While down, what the agent knew is served.
    let during = world.creds(&steady);
    assert_eq!(during.access_key_id, good.access_key_id);
    let (status, body) = pod_get(&added, CREDS, &[]);
    assert_eq!(
        status, 404,
        "a pod the agent has not seen yet is unknown, not guessed: {body}"
    );
    std::thread::sleep(Duration::from_secs(2));
    world.api.set_down(false);

    // Converges: the deleted pod's address is forgotten, the change and the new pod are seen.
    let deadline = Instant::now() + Duration::from_secs(40);
    let deleted_ip = format!("\"{}\"", deleted.ip4());
    loop {
        let store = world.debug_store(&node);
        let done = !store.contains(&deleted_ip)
            && store.contains("new-role")
            && store.contains(&format!("\"{}\"", added.ip4()));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not converge after the API came back; store: {store}\nagent log:\n{}",
            world.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        world.api.list_count(Resource::Pods) > lists_before,
        "the agent relisted after 410 Gone"
    );
    assert_logged(
        &world,
        &["WARN", "pod watch failed; relisting with backoff"],
    );

    let (status, body) = pod_get(&deleted, CREDS, &[]);
    assert_eq!(status, 404, "the deleted pod's address: {body}");
    assert!(body.contains("no pod with IP"), "{body}");
    let (status, listed) = pod_get(&changed, CREDS, &[]);
    assert_eq!((status, listed.as_str()), (200, "new-role"));
    let got_changed = world.creds(&changed);
    let got_added = world.creds(&added);
    assert_eq!(
        Some(got_added.access_key_id.clone()),
        world.moto_key_for(&role_arn("added-role"))
    );
    let still = world.creds(&steady);
    assert_eq!(still.access_key_id, good.access_key_id);
    world.assert_no_leak(
        &[&steady, &deleted, &changed, &added],
        &[
            &ClientCredentials::from(&still),
            &ClientCredentials::from(&got_changed),
            &ClientCredentials::from(&got_added),
        ],
    );
}

#[test]
fn upstream_imds_slow_answers_502_at_the_agents_timeout_and_credentials_are_served() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    let good = world.creds(&pod);

    world
        .imds
        .set_delay(AGENT_UPSTREAM_TIMEOUT + Duration::from_secs(7));
    let (status, body, took) = pod_get_within(
        &pod,
        "/latest/meta-data/instance-id",
        Duration::from_secs(15),
    );
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("did not answer within 3s") && body.contains("169.254.169.254:80"),
        "the 502 names the upstream and the timeout: {body}"
    );
    assert!(
        took < AGENT_UPSTREAM_TIMEOUT + Duration::from_secs(3),
        "answered after {took:?}"
    );
    // Blocked paths never wait for upstream; credentials come from the cache.
    let (status, _, took) = pod_get_within(&pod, "/latest/user-data", Duration::from_secs(5));
    assert_eq!(status, 403);
    assert!(took < Duration::from_secs(2), "blocked path took {took:?}");
    let started = Instant::now();
    let got = world.creds(&pod);
    assert_eq!(got.access_key_id, good.access_key_id);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Readiness follows the upstream, with a log line each way.
    world.agent.wait_for_line(
        "upstream metadata service unreachable; not ready",
        Duration::from_secs(20),
    );
    let (ready, _) = world.admin_get(&node, "/readyz");
    assert_eq!(ready, 503, "not ready while upstream is slow");
    world.imds.set_delay(Duration::ZERO);
    world.agent.wait_for_line(
        "upstream metadata service reachable",
        Duration::from_secs(20),
    );
    let (status, body) = pod_get(&pod, "/latest/meta-data/instance-id", &[]);
    assert_eq!((status, body.as_str()), (200, INSTANCE_ID));
    assert_running(&mut world);
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

/// The options `World` starts its agent with (tests/src/e2e.rs), for an agent whose start is
/// expected to fail, which `World::start_agent` would wait on.
fn world_agent_options(world: &World) -> AgentOptions {
    let args = [
        "--node",
        NODE_NAME,
        "--api-server",
        &world.api.url(),
        "--sts-endpoint",
        &world.sts.endpoint(),
        "--base-role-arn",
        BASE_ROLE_ARN,
        "--metrics-port",
        &METRICS_PORT.to_string(),
        "--debug",
    ];
    AgentOptions {
        host_ipv6: false,
        interception_only: false,
        extra_args: args.iter().map(OsString::from).collect(),
        ..AgentOptions::default()
    }
}

#[test]
fn upstream_imds_down_at_restart_stops_the_agent_clearly_and_pods_stay_refused() {
    let node = TestNode::new();
    let mut world = World::start(&node, &[]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);
    world.creds(&pod);
    world.kill_agent();
    world.imds.set_down(true);

    // Without --region the agent reads the region from the metadata service; with it down the
    // agent cannot start, and says what to do.
    world.agent = Agent::spawn(&node, &world_agent_options(&world));
    let status = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            world.agent.try_wait()
        })
        .unwrap_or_else(|| {
            panic!(
                "the agent kept running without a region:\n{}",
                world.agent.log()
            )
        });
    assert!(!status.success());
    assert_logged(&world, &["ERROR", "--region", "169.254.169.254:80"]);
    // Fail closed: the pinned programs still send pods to the (absent) agent.
    let (status, body) = pod_get(&pod, CREDS, &[]);
    assert_eq!(status, 0, "refused while no agent runs: {body}");

    world.imds.set_down(false);
    world.start_agent(&node, &[], false, true);
    let got = world.creds(&pod);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-role"))
    );
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn sigkill_mid_request_gives_the_pod_an_error_never_upstream_data_and_a_restart_serves() {
    let node = TestNode::new();
    let mut world = World::start(&node, &["--prefetch-concurrency", "0"]);
    let pod = world.add_known_pod(&node, "a", "default", "x", &[(ROLE_KEY, "web-role")]);

    // A credential request waiting on STS, and a proxied request waiting on the upstream, when
    // the agent dies. The upstream slows down only once the STS call is out: the agent reads its
    // own node credentials for STS from the upstream.
    world.sts.set_mode(FaultMode::Slow(Duration::from_secs(8)));
    std::thread::scope(|scope| {
        let credentials = scope
            .spawn(|| pod_get_within(&pod, &format!("{CREDS}web-role"), Duration::from_secs(20)));
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(
                    Instant::now() < deadline,
                    "the request never reached {what}\nagent log:\n{}",
                    world.agent.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait("STS", &|| world.sts.assume_role_count() > 0);
        world.imds.set_delay(Duration::from_secs(5));
        let proxied = scope.spawn(|| {
            pod_get_within(
                &pod,
                "/latest/meta-data/instance-id",
                Duration::from_secs(20),
            )
        });
        wait("the upstream", &|| {
            !world
                .imds
                .requests_for("/latest/meta-data/instance-id")
                .is_empty()
        });
        let killed_at = Instant::now();
        world.kill_agent();
        for (what, handle) in [("credentials", credentials), ("proxied", proxied)] {
            let (status, body, _) = handle.join().expect("request thread");
            assert_eq!(
                status, 0,
                "the {what} request in flight when the agent died got an answer: {body}"
            );
            assert_no_node_data(what, &body);
            assert!(
                killed_at.elapsed() < Duration::from_secs(3),
                "the {what} request hung after the agent died"
            );
        }
    });
    // Dead agent: refused, never the real metadata service.
    let (status, _) = pod_get(&pod, "/latest/meta-data/instance-id", &[]);
    assert_eq!(status, 0);

    world.sts.set_mode(FaultMode::PassThrough);
    world.imds.set_delay(Duration::ZERO);
    world.start_agent(&node, &["--prefetch-concurrency", "0"], false, true);
    let got = world.creds(&pod);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("web-role"))
    );
    let (status, body) = pod_get(&pod, "/latest/meta-data/instance-id", &[]);
    assert_eq!((status, body.as_str()), (200, INSTANCE_ID));
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&got)]);
}

#[test]
fn a_full_identity_map_is_named_in_the_log_and_every_pod_is_still_served() {
    let node = TestNode::new();
    // Every pod has an IPv4 and an IPv6 address: two map entries each, so the third pod does
    // not fit.
    let world = World::start(&node, &["--identity-capacity", "4"]);
    let pods: Vec<_> = ["a", "b", "c"].iter().map(|n| node.add_pod(n)).collect();
    for (pod, name) in pods.iter().zip(["first", "second", "third"]) {
        world.add_pod(pod, "default", name, &[(ROLE_KEY, &format!("{name}-role"))]);
        std::thread::sleep(Duration::from_millis(300));
    }
    world.wait_known(&node, &pods[0]);
    world.wait_known(&node, &pods[1]);
    world.agent.wait_for_line(
        "the identity map is full (4 entries); raise --identity-capacity",
        Duration::from_secs(10),
    );
    assert_logged(&world, &["default/third", &pods[2].ip4().to_string()]);

    // The pinned map only carries pods across restarts; the agent serves from its own view, so
    // the pod that did not fit is served too (after a restart it waits for the pod list).
    let mut keys = Vec::new();
    for (pod, name) in pods.iter().zip(["first", "second", "third"]) {
        let doc = world.creds(pod);
        assert_eq!(
            Some(doc.access_key_id.clone()),
            world.moto_key_for(&role_arn(&format!("{name}-role")))
        );
        keys.push(ClientCredentials::from(&doc));
    }
    let refs: Vec<_> = pods.iter().collect();
    let got: Vec<_> = keys.iter().collect();
    world.assert_no_leak(&refs, &got);
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pin_path_outside_bpffs_is_a_clear_error_and_attaches_nothing() {
    let node = TestNode::new();
    // A directory next to the node's bpffs, on the tmpfs of /run: not a bpffs.
    let plain = node
        .bpffs()
        .parent()
        .expect("the node's run directory")
        .join("not-bpffs");
    fs::create_dir_all(&plain).expect("create the plain directory");
    let _cleanup = RemoveOnDrop(plain.clone());
    let pin_path = plain.join("kube2iam");
    let mut command = node.command(agent_binary());
    command
        .arg("--host-ip")
        .arg(HOST_IP4.to_string())
        .arg("--cgroup-path")
        .arg(node.cgroup_path())
        .arg("--bpf-pin-path")
        .arg(&pin_path)
        .args([
            "--node",
            NODE_NAME,
            "--api-server",
            "http://127.0.0.1:1",
            "--region",
            "us-west-2",
            "--base-role-arn",
            BASE_ROLE_ARN,
        ])
        .env("AWS_CONFIG_FILE", "/nonexistent/kube2iam-test/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/kube2iam-test/credentials",
        )
        .stdin(Stdio::null());
    let output = output_within(&mut command, Duration::from_secs(30), "kube2iam-agent");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "the agent must not run:\n{log}");
    assert!(
        log.contains(&format!("{} is not on a bpffs", plain.display()))
            && log.contains("mount -t bpf bpf"),
        "the error names the directory and the fix:\n{log}"
    );
    let cgroup = node.open_cgroup();
    for attach in AttachType::ALL {
        let ids =
            prog_query(cgroup.as_fd(), attach).unwrap_or_else(|e| panic!("query {attach:?}: {e}"));
        assert!(ids.is_empty(), "{attach:?} has programs attached: {ids:?}");
    }
    assert!(!pin_path.exists(), "nothing is pinned");
}

/// Namespace, pod name, annotations, what the refusal says.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, &'a [&'a str]);

#[test]
fn malformed_namespace_annotations_and_external_ids_get_clear_errors_and_others_are_served() {
    let node = TestNode::new();
    let mut world = World::start(&node, &["--namespace-restrictions"]);
    // An allowed-roles value of 8,000 patterns (120 KB; the API server allows 256 KiB).
    let oversized: Vec<String> = (0..8_000).map(|i| format!("team-{i:05}-*")).collect();
    let oversized = serde_json::to_string(&oversized).expect("JSON");
    assert!(oversized.len() > 100_000);
    for (name, value) in [
        ("good", r#"["*"]"#.to_owned()),
        ("badjson", "web-*, api-*".to_owned()),
        ("notlist", r#"{"web": true}"#.to_owned()),
        ("badglob", r#"["web-[a"]"#.to_owned()),
        ("huge", oversized),
    ] {
        world
            .api
            .add_namespace(kube_api::namespace(name).annotate(ALLOWED_KEY, &value));
    }
    let cases: [Case; 6] = [
        (
            "badjson",
            "p",
            vec![(ROLE_KEY, "web-1".into())],
            &["namespace badjson", "must be a JSON array"],
        ),
        (
            "notlist",
            "p",
            vec![(ROLE_KEY, "web-1".into())],
            &["namespace notlist", "must be a JSON array"],
        ),
        (
            "badglob",
            "p",
            vec![(ROLE_KEY, "web-1".into())],
            &["namespace badglob", "\"web-[a\" does not compile"],
        ),
        (
            "huge",
            "p",
            vec![(ROLE_KEY, "web-1".into())],
            &[
                "namespace huge",
                "lists 8000 allowed-role patterns; at most 256",
            ],
        ),
        (
            "good",
            "longid",
            vec![
                (ROLE_KEY, "web-1".into()),
                (EXTERNAL_ID_KEY, "x".repeat(5000)),
            ],
            &["good/longid", "external-ID annotation is 5000 bytes"],
        ),
        (
            "good",
            "badid",
            vec![
                (ROLE_KEY, "web-1".into()),
                (EXTERNAL_ID_KEY, "has spaces; and more".into()),
            ],
            &["good/badid", "external ID", "contains ' '"],
        ),
    ];
    let served = node.add_pod("ok");
    let pods: Vec<_> = (0..cases.len())
        .map(|i| node.add_pod(&format!("p{i}")))
        .collect();
    for ((namespace, name, annotations, _), pod) in cases.iter().zip(&pods) {
        let annotations: Vec<(&str, &str)> =
            annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
        world.add_pod(pod, namespace, name, &annotations);
    }
    world.add_pod(&served, "good", "served", &[(ROLE_KEY, "good-role")]);
    for pod in pods.iter().chain([&served]) {
        world.wait_known(&node, pod);
    }
    for ((namespace, name, _, says), pod) in cases.iter().zip(&pods) {
        // The namespace watch compiles the patterns; wait until it has (bounded).
        let started = Instant::now();
        loop {
            let (_, body) = pod_get(pod, CREDS, &[]);
            if !body.contains("is unknown to the agent") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the agent never learned namespace {namespace}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("namespace {namespace}: known after {:?}", started.elapsed());
        let started = Instant::now();
        let (status, body) = pod_get(pod, CREDS, &[]);
        assert_eq!(status, 403, "{name}: {body}");
        for needle in *says {
            assert!(body.contains(needle), "{name}: {needle:?} not in {body}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name}: answered after {:?}",
            started.elapsed()
        );
    }
    assert_logged(
        &world,
        &["WARN", "namespace badjson", "must be a JSON array"],
    );
    assert_logged(&world, &["WARN", "namespace badglob", "does not compile"]);
    assert!(
        world.moto_key_for(&role_arn("web-1")).is_none(),
        "nothing is assumed for a refused pod"
    );
    let got = world.creds(&served);
    assert_eq!(
        Some(got.access_key_id.clone()),
        world.moto_key_for(&role_arn("good-role"))
    );
    assert_running(&mut world);
    let mut refs: Vec<_> = pods.iter().collect();
    refs.push(&served);
    world.assert_no_leak(&refs, &[&ClientCredentials::from(&got)]);
}
