//! Abusive clients against the real agent in a test node: slowloris headers, ten thousand idle
//! connections, oversized headers, request lines and bodies. The agent must cut them off or
//! answer 4xx/503 cleanly, stay within bounded memory, and keep serving well-behaved pods. Every
//! client runs inside a pod (its traffic is redirected to the agent like any metadata request),
//! and every test is bounded in count and time.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use kube2iam_tests::{
    Pod, TestNode,
    clients::ClientCredentials,
    e2e::{CREDS, ROLE_KEY, World, pod_get},
    process::output_within,
};
use serde_json::Value;

/// Runs a Python client in the pod and parses the JSON it prints last.
fn python_in_pod(pod: &Pod<'_>, script: &str, args: &[&str], timeout: Duration) -> Value {
    let output = output_within(
        pod.command("python3").arg("-c").arg(script).args(args),
        timeout,
        "python client in pod",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "the client printed no JSON ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The agent's resident memory, from /proc/<pid>/status.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn pod_with_role<'n>(world: &World, node: &'n TestNode, name: &str) -> Pod<'n> {
    world.add_known_pod(node, name, "default", name, &[(ROLE_KEY, "web-role")])
}

/// Sends a request one byte at a time (every `interval` seconds), or connects and sends
/// nothing (`silent`), until the server closes the connection or `limit` seconds pass.
const SLOW_CLIENT: &str = r#"
import json, socket, sys, time
mode, interval, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
request = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: "
           + b"a" * 2000 + b"\r\n\r\n")
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
start = time.monotonic()
outcome, sent = "still open", 0
while time.monotonic() - start < limit:
    if mode == "trickle" and sent < len(request):
        try:
            s.send(request[sent:sent + 1])
            sent += 1
        except OSError as e:
            outcome = "send failed: " + type(e).__name__
            break
    s.settimeout(interval)
    try:
        data = s.recv(4096)
        outcome = "closed" if data == b"" else "answered " + data.split(b"\r\n")[0].decode()
        break
    except socket.timeout:
        pass
    except OSError as e:
        outcome = "reset: " + type(e).__name__
        break
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start, "sent": sent}))
"#;

#[test]
fn slowloris_clients_are_cut_off_at_the_header_read_timeout() {
    let node = TestNode::new();
    let world = World::start(&node, &["--header-read-timeout", "1s"]);
    let attacker = pod_with_role(&world, &node, "slow");
    let victim = pod_with_role(&world, &node, "victim");
    let good = world.creds(&victim);

    std::thread::scope(|scope| {
        let trickle = scope.spawn(|| {
            python_in_pod(
                &attacker,
                SLOW_CLIENT,
                &["trickle", "0.2", "15"],
                Duration::from_secs(40),
            )
        });
        let silent = scope.spawn(|| {
            python_in_pod(
                &attacker,
                SLOW_CLIENT,
                &["silent", "0.2", "15"],
                Duration::from_secs(40),
            )
        });
        // Other pods are served throughout.
        for _ in 0..4 {
            let got = world.creds(&victim);
            assert_eq!(got.access_key_id, good.access_key_id);
            std::thread::sleep(Duration::from_millis(250));
        }
        for (what, handle) in [("trickle", trickle), ("silent", silent)] {
            let result = handle.join().expect("slow client thread");
            let outcome = result["outcome"].as_str().unwrap_or("");
            let seconds = result["seconds"].as_f64().unwrap_or(f64::MAX);
            assert!(
                outcome == "closed"
                    || outcome.starts_with("reset")
                    || outcome.starts_with("answered HTTP/1.1 408")
                    || outcome.starts_with("send failed"),
                "the {what} client was not cut off: {result}\nagent log:\n{}",
                world.agent.log()
            );
            assert!(
                (0.8..4.0).contains(&seconds),
                "the {what} client was cut off after {seconds} s, not at the 1 s header \
                 timeout: {result}"
            );
            if what == "trickle" {
                let sent = result["sent"].as_u64().unwrap_or(0);
                assert!(
                    sent < 30,
                    "{sent} bytes trickled in before the cut: {result}"
                );
            }
        }
    });
    let after = world.creds(&victim);
    assert_eq!(after.access_key_id, good.access_key_id);
    world.assert_no_leak(&[&attacker, &victim], &[&ClientCredentials::from(&after)]);
}

/// Opens `count` connections and sends nothing on them; classifies what the server does with
/// each within `settle` seconds, holds the rest open for `hold` seconds, then closes them all.
/// With a fourth argument, `expect_held`, it stops settling one second after no more than that
/// many are left open (so a slow server gets the whole `settle`, a prompt one none of it).
const IDLE_FLOOD: &str = r#"
import json, resource, selectors, socket, sys, time
count, settle, hold = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
expect_held = int(sys.argv[4]) if len(sys.argv) > 4 else -1
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = count + 256
resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
start = time.monotonic()
sockets, connect_errors = [], {}
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(("169.254.169.254", 80))
        s.setblocking(False)
        sockets.append(s)
    except OSError as e:
        connect_errors[type(e).__name__] = connect_errors.get(type(e).__name__, 0) + 1
        s.close()
connect_seconds = time.monotonic() - start
selector = selectors.DefaultSelector()
for s in sockets:
    selector.register(s, selectors.EVENT_READ)
answers, closed, reset, open_ = {}, 0, 0, len(sockets)
deadline = time.monotonic() + settle
while time.monotonic() < deadline and open_ > 0:
    for key, _ in selector.select(timeout=0.2):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            reset += 1
            data = None
        if data:
            line = data.split(b"\r\n")[0].decode(errors="replace")
            answers[line] = answers.get(line, 0) + 1
        elif data == b"":
            closed += 1
        selector.unregister(s)
        s.close()
        open_ -= 1
    if 0 <= expect_held and open_ <= expect_held:
        deadline = min(deadline, time.monotonic() + 1.0)
print("holding", open_, flush=True)
time.sleep(hold)
for key in list(selector.get_map().values()):
    key.fileobj.close()
print(json.dumps({"connected": len(sockets), "connect_errors": connect_errors,
                  "connect_seconds": connect_seconds, "answers": answers,
                  "closed_without_answer": closed, "reset": reset, "held_open": open_}))
"#;

#[test]
fn ten_thousand_idle_connections_get_a_clean_503_beyond_the_limit_with_bounded_memory() {
    const CONNECTIONS: usize = 10_000;
    const LIMIT: usize = 200;
    let node = TestNode::new();
    // Idle connections are held as long as a client may take to send its headers: make that
    // longer than the test, so the limit, not the timeout, is what is exercised.
    let world = World::start(
        &node,
        &[
            "--max-connections",
            &LIMIT.to_string(),
            // One caller may take every slot here: this test is about the global limit.
            "--max-connections-per-caller",
            &LIMIT.to_string(),
            "--header-read-timeout",
            "60s",
        ],
    );
    let flooder = pod_with_role(&world, &node, "flood");
    let victim = pod_with_role(&world, &node, "victim");
    let good = world.creds(&victim);
    let pid = world.agent.pid();
    let before = vm_rss_kib(pid);

    let peak = AtomicU64::new(before);
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(vm_rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let flood = scope.spawn(|| {
            python_in_pod(
                &flooder,
                IDLE_FLOOD,
                &[&CONNECTIONS.to_string(), "5", "6"],
                Duration::from_secs(120),
            )
        });
        // While the flood holds every slot, another pod is refused cleanly: a 503, not a hang
        // or a reset.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut refused = None;
        while refused.is_none() && Instant::now() < deadline {
            let (status, body) = pod_get(&victim, "/latest/meta-data/instance-id", &[]);
            if status == 503 {
                refused = Some(body);
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let result = flood.join().expect("flood thread");
        done.store(true, Ordering::Relaxed);
        assert!(
            refused.is_some(),
            "another pod was never answered 503 while the limit was reached; flood: {result}"
        );
        result
    });
    let elapsed = started.elapsed();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "{CONNECTIONS} idle connections in {elapsed:?}: {result}; agent VmRSS {before} kB before, \
         {peak} kB peak"
    );

    assert_eq!(
        result["connected"].as_u64(),
        Some(CONNECTIONS as u64),
        "every connect succeeded (the kernel queues them for the agent): {result}"
    );
    let rejected = result["answers"]["HTTP/1.1 503 Service Unavailable"]
        .as_u64()
        .unwrap_or(0);
    let held = result["held_open"].as_u64().unwrap_or(0);
    assert_eq!(
        held, LIMIT as u64,
        "exactly --max-connections idle connections are held: {result}"
    );
    assert_eq!(
        rejected,
        (CONNECTIONS - LIMIT) as u64,
        "every connection beyond the limit is answered 503: {result}"
    );
    assert_eq!(
        result["answers"].as_object().map(|a| a.len()),
        Some(1),
        "no other answers: {result}"
    );
    // 200 held connections and 9,800 refused ones: a few MiB, far from a leak per connection.
    assert!(
        peak < before + 64 * 1024,
        "the agent grew from {before} kB to {peak} kB under {CONNECTIONS} idle connections"
    );
    let settled = vm_rss_kib(pid);
    assert!(
        settled < before + 64 * 1024,
        "the agent kept {settled} kB (from {before} kB) after the flood"
    );

    // The slots free up when the flood closes its connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = pod_get(&victim, CREDS, &[]);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still refuses after the idle connections closed ({status})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = world.creds(&victim);
    assert_eq!(after.access_key_id, good.access_key_id);
    world.assert_no_leak(&[&flooder, &victim], &[&ClientCredentials::from(&after)]);
}

/// Sends each named raw request on its own connection and reports the status line the server
/// answered (0 when none) and whether it then closed the connection.
const RAW_REQUESTS: &str = r#"
import json, socket, sys, time
TOKEN = b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n"
def head(path, headers=b"", method=b"GET"):
    return method + b" " + path + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n" + headers
cases = {
    "header_20k": head(b"/latest/meta-data/instance-id", b"X-Big: " + b"a" * 20000 + b"\r\n") + b"\r\n",
    "headers_200": head(b"/latest/meta-data/instance-id",
                        b"".join(b"X-H%d: v\r\n" % i for i in range(200))) + b"\r\n",
    "uri_20k": head(b"/latest/meta-data/" + b"a" * 20000) + b"\r\n",
    "body_10m_get": head(b"/latest/meta-data/iam/security-credentials/",
                         b"Content-Length: 10000000\r\n") + b"\r\n" + b"x" * 65536,
    "body_chunked_put": head(b"/latest/api/token", TOKEN + b"Transfer-Encoding: chunked\r\n",
                             b"PUT") + b"\r\n" + (b"4000\r\n" + b"y" * 0x4000 + b"\r\n") * 4,
    "body_64k_put": head(b"/latest/api/token", TOKEN + b"Content-Length: 65536\r\n", b"PUT")
                    + b"\r\n" + b"z" * 65536,
}
results = {}
for name, request in cases.items():
    s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    try:
        s.sendall(request)
    except OSError:
        pass
    data = b""
    closed = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        if b"\r\n\r\n" in data and not closed:
            s.settimeout(1)
    line = data.split(b"\r\n")[0].decode(errors="replace")
    status = int(line.split()[1]) if line.startswith("HTTP/1.1 ") else 0
    body = data.split(b"\r\n\r\n", 1)[1][:200].decode(errors="replace") if b"\r\n\r\n" in data else ""
    results[name] = {"status": status, "closed": closed, "body": body}
    s.close()
print(json.dumps(results))
"#;

#[test]
fn oversized_headers_request_lines_and_bodies_get_4xx_and_the_agent_keeps_serving() {
    let node = TestNode::new();
    let world = World::start(&node, &[]);
    let pod = pod_with_role(&world, &node, "big");
    let good = world.creds(&pod);
    let upstream_before = world.imds.callers().len();
    let sts_before = world.sts.call_count();

    let results = python_in_pod(&pod, RAW_REQUESTS, &[], Duration::from_secs(90));
    let expect: [(&str, &[u16]); 6] = [
        ("header_20k", &[431]),
        ("headers_200", &[431]),
        ("uri_20k", &[414, 431]),
        ("body_10m_get", &[413]),
        ("body_chunked_put", &[413]),
        ("body_64k_put", &[413]),
    ];
    for (case, statuses) in expect {
        let status = results[case]["status"].as_u64().unwrap_or(0) as u16;
        assert!(
            statuses.contains(&status),
            "{case}: expected {statuses:?}, got {}\nall: {results}\nagent log:\n{}",
            results[case],
            world.agent.log()
        );
        assert_eq!(
            results[case]["closed"],
            Value::Bool(true),
            "{case}: the connection is closed after the refusal: {results}"
        );
    }
    assert_eq!(
        world.imds.callers().len(),
        upstream_before,
        "refused requests never reach the upstream"
    );
    assert_eq!(world.sts.call_count(), sts_before, "nor STS");
    let after = world.creds(&pod);
    assert_eq!(after.access_key_id, good.access_key_id);
    world.assert_no_leak(&[&pod], &[&ClientCredentials::from(&after)]);
}

#[test]
fn one_caller_at_its_connection_limit_leaves_room_for_every_other_pod() {
    const CONNECTIONS: usize = 1_000;
    const LIMIT: usize = 200;
    const PER_CALLER: usize = 50;
    let node = TestNode::new();
    let world = World::start(
        &node,
        &[
            "--max-connections",
            &LIMIT.to_string(),
            "--max-connections-per-caller",
            &PER_CALLER.to_string(),
            "--header-read-timeout",
            "60s",
        ],
    );
    let flooder = pod_with_role(&world, &node, "flood");
    let victim = pod_with_role(&world, &node, "victim");
    let result = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            python_in_pod(
                &flooder,
                IDLE_FLOOD,
                // Up to 30 s for the refusals (the machine may be busy), then 8 s of holding.
                &[&CONNECTIONS.to_string(), "30", "8", &PER_CALLER.to_string()],
                Duration::from_secs(120),
            )
        });
        // While the flooder holds all it may, the victim is served as usual.
        std::thread::sleep(Duration::from_secs(4));
        let doc = world.creds(&victim);
        let result = flood.join().expect("flood thread");
        (doc, result)
    });
    let (doc, result) = result;
    let held = result["held_open"].as_u64().unwrap_or(0);
    assert_eq!(
        held, PER_CALLER as u64,
        "the flooder holds exactly --max-connections-per-caller: {result}"
    );
    let rejected = result["answers"]["HTTP/1.1 503 Service Unavailable"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        rejected,
        (CONNECTIONS - PER_CALLER) as u64,
        "every connection beyond its share is answered 503: {result}"
    );
    world.assert_no_leak(&[&flooder, &victim], &[&ClientCredentials::from(&doc)]);
}
