//! Part 2: credential requests end to end, against a bare hyper server (the floor) and
//! kube2iam's DNAT rule: the SDK's IMDSv2 fetch, a single GET per connection, keep-alive, and
//! open-loop load at fixed rates; with the server's CPU time per request.

use std::{io::BufRead as _, path::Path};

use super::{
    report::{GetMode, GetResult, GetRow, TailRow},
    runner::{AGENT_FLAGS, CLIENT_TIMEOUT, Options, Placement, Pods, pod_command, rotation},
    stats::Dist,
    topology::{Dnat, cpu_ns, fields, metadata, run_client, run_delay_ns, samples, spawn_client},
    world::BenchWorld,
};
use crate::{HOST_IP4, Pod, TestNode, e2e::CREDS};

/// The floor server's port on the node's host IP.
const FLOOR_PORT: u16 = 8282;
const ROLE: &str = "bench-role";

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("k2i-wrk requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  io.write("k2i-hist")
  for i = 1, #latency do
    local v, c = latency(i)
    io.write(string.format(" %d:%d", v, c))
  end
  io.write("\n")
end
"#;

struct Variant<'p, 'n> {
    /// Each variant runs from a pod of its own: they would otherwise share the agent's
    /// TIME_WAIT 4-tuples while their TCP timestamps differ (the offset hashes the destination
    /// address the client connects to, which DNAT hides), and PAWS would drop reused-port SYNs.
    pod: &'p Pod<'n>,
    key: &'static str,
    label: &'static str,
    placement: Placement,
    host: String,
    nat: bool,
    /// The process whose CPU time serves this variant's requests.
    server_pid: u32,
}

/// One run's outcome.
struct Outcome {
    dist: Dist,
    /// HTTP requests answered (an SDK fetch is three).
    requests: u64,
    secs: f64,
    errors: u64,
    late: u64,
    offered: u64,
    first_error: Option<String>,
}

fn num(map: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    map.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn run_wrk(v: &Variant<'_, '_>, script: &Path, path: &str, conns: usize, ms: u64) -> Outcome {
    let secs = ms.div_ceil(1000).max(1);
    let mut command = pod_command(v.pod, v.placement, "wrk");
    command.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--timeout",
        "2s",
        "-s",
    ]);
    command.arg(script);
    command.arg(format!("http://{}{path}", v.host));
    let out = run_client(&mut command, CLIENT_TIMEOUT, "wrk");
    let summary = fields(&out, "k2i-wrk");
    let mut dist = Dist::default();
    if let Some(hist) = out.lines().find_map(|l| l.strip_prefix("k2i-hist")) {
        for pair in hist.split_whitespace() {
            if let Some((v, c)) = pair.split_once(':')
                && let (Ok(v), Ok(c)) = (v.parse::<u64>(), c.parse::<u64>())
            {
                dist.add_weighted(v * 1000, c);
            }
        }
    }
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| num(&summary, k))
        .sum();
    Outcome {
        dist,
        requests: num(&summary, "requests"),
        secs: num(&summary, "duration_us").max(1) as f64 / 1e6,
        errors,
        late: 0,
        offered: 0,
        first_error: (errors > 0).then(|| out.lines().next().unwrap_or("").to_owned()),
    }
}

/// `k2i-bench-client get` or `open`.
fn run_client_mode(
    v: &Variant<'_, '_>,
    client: &Path,
    args: &[String],
    per_sample: u64,
) -> Outcome {
    let mut command = pod_command(v.pod, v.placement, client);
    command.args(args);
    command.args(["--addr", &v.host]);
    let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client");
    let summary = fields(&out, "summary");
    let dist = Dist::from_samples(&samples(&out));
    Outcome {
        requests: dist.count() * per_sample,
        dist,
        secs: num(&summary, "elapsed_ns").max(1) as f64 / 1e9,
        errors: num(&summary, "errors"),
        late: num(&summary, "late"),
        offered: num(&summary, "offered"),
        first_error: out
            .lines()
            .find_map(|l| l.strip_prefix("error "))
            .map(str::to_owned),
    }
}

/// The floor serves the agent's own answers for the bench pod: the token, the listing and the
/// credentials, byte for byte.
fn floor_bodies(pod: &Pod<'_>, tmp: &Path) -> (Vec<String>, std::path::PathBuf, usize) {
    let (status, token) = crate::e2e::pod_request(
        pod,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
    );
    assert_eq!(status, 200, "the agent's IMDSv2 token: {token}");
    let (status, listing) = crate::e2e::pod_get(pod, CREDS, &[]);
    assert_eq!(status, 200, "the bench pod's listing: {listing}");
    let creds_path = format!("{CREDS}{ROLE}");
    let (status, body) = crate::e2e::pod_get(pod, &creds_path, &[]);
    assert_eq!(status, 200, "the bench pod's credentials: {body}");
    let write = |name: &str, text: &str| {
        let path = tmp.join(name);
        std::fs::write(&path, text).expect("write a floor body");
        path
    };
    let creds_file = write("credentials.json", &body);
    let routes = vec![
        format!("/latest/api/token={}", write("token", &token).display()),
        format!("{CREDS}={}", write("listing", &listing).display()),
    ];
    (routes, creds_file, body.len())
}

/// Runs the part with the agent restarted with attestation off, and restarts it as it was.
///
/// A DNATed connection never went through the connect hooks, so it carries no attestation, and
/// an attesting agent refuses it (that is what attestation is for). (c) stands for kube2iam,
/// which serves by address: this part runs the agent with attestation off for every variant;
/// part 2b gives what attestation adds per request.
pub(super) fn run(
    node: &TestNode,
    world: &mut BenchWorld,
    pods: &Pods<'_>,
    client: &Path,
    tmp: &Path,
    o: &Options,
) -> GetResult {
    let restart = |world: &mut BenchWorld, extra: &[&str]| {
        world.kill_agent();
        world.start_agent(node, extra);
        let (status, _) = crate::e2e::pod_get(&pods.p0, &format!("{CREDS}{ROLE}"), &[]);
        assert_eq!(status, 200, "the bench pod's credentials after a restart");
    };
    let mut off = AGENT_FLAGS.to_vec();
    off.extend(["--identity-attestation", "off"]);
    restart(world, &off);
    let result = measure(node, world, pods, client, tmp, o);
    restart(world, &AGENT_FLAGS);
    result
}

fn measure(
    node: &TestNode,
    world: &BenchWorld,
    pods: &Pods<'_>,
    client: &Path,
    tmp: &Path,
    o: &Options,
) -> GetResult {
    let path = format!("{CREDS}{ROLE}");
    let (routes, creds_file, body_bytes) = floor_bodies(&pods.p0, tmp);
    let script = tmp.join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let floor_addr = format!("{HOST_IP4}:{FLOOR_PORT}");
    let mut floor_cmd = node.command(client);
    floor_cmd.args([
        "floor",
        "--listen",
        &floor_addr,
        "--body-file",
        &creds_file.to_string_lossy(),
        "--seconds",
        "1200",
    ]);
    for route in &routes {
        floor_cmd.args(["--route", route]);
    }
    let mut floor = spawn_client(&mut floor_cmd, "floor server");
    let floor_pid = floor.pid();
    let stdout = floor.child_mut().stdout.take().expect("piped stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the floor server's first line");
    assert!(line.starts_with("listening"), "floor server: {line:?}");

    let agent = world.agent.pid();
    let var = |pod, key, label, placement, host: &str, nat, server_pid| Variant {
        pod,
        key,
        label,
        placement,
        host: host.to_owned(),
        nat,
        server_pid,
    };
    let variants = [
        var(
            &pods.p6,
            "floor",
            "floor: bare hyper server, same answers, reached directly",
            Placement::Outside,
            &floor_addr,
            true,
            floor_pid,
        ),
        var(
            &pods.p0,
            "b",
            "(b) agent via our connect4 (pod with the packet guard)",
            Placement::Cgroup,
            &metadata(),
            true,
            agent,
        ),
        var(
            &pods.p5,
            "c",
            "(c) agent via kube2iam's DNAT rule",
            Placement::Outside,
            &metadata(),
            true,
            agent,
        ),
        var(
            &pods.p6,
            "floor0",
            "floor, without conntrack",
            Placement::Outside,
            &floor_addr,
            false,
            floor_pid,
        ),
        var(
            &pods.p0,
            "b0",
            "(b), without conntrack",
            Placement::Cgroup,
            &metadata(),
            false,
            agent,
        ),
    ];
    let modes = [
        GetMode::Sdk1,
        GetMode::New1,
        GetMode::Ka1,
        GetMode::KaMax,
        GetMode::OpenKa,
        GetMode::OpenSdk,
    ];
    let applies = |mode: GetMode, v: &Variant<'_, '_>| {
        v.nat || matches!(mode, GetMode::Sdk1 | GetMode::New1 | GetMode::Ka1)
    };
    let mut rows: Vec<GetRow> = Vec::new();
    for mode in modes {
        for v in variants.iter().filter(|v| applies(mode, v)) {
            rows.push(GetRow {
                mode,
                variant: v.key,
                label: v.label.to_owned(),
                conntrack: v.nat,
                dist: Dist::default(),
                round_p50: Vec::new(),
                round_p99: Vec::new(),
                round_rps: Vec::new(),
                round_cpu_ns: Vec::new(),
                errors: 0,
                late: 0,
                offered: 0,
                first_error: None,
            });
        }
    }
    let ms = |m: u64| m.to_string();
    let mut dnat = Dnat::new(node, &pods.p5);
    for round in 0..o.get_rounds {
        for (m, mode) in modes.iter().enumerate() {
            let these: Vec<&Variant<'_, '_>> =
                variants.iter().filter(|v| applies(*mode, v)).collect();
            for i in rotation(these.len(), round + m) {
                let v = these[i];
                if v.nat {
                    dnat.install();
                } else {
                    dnat.remove();
                }
                let cpu0 = cpu_ns(v.server_pid);
                let outcome = match mode {
                    GetMode::Sdk1 => run_client_mode(
                        v,
                        client,
                        &[
                            "get".into(),
                            "--pattern".into(),
                            "sdk".into(),
                            "--threads".into(),
                            "1".into(),
                            "--millis".into(),
                            ms(o.latency_ms),
                        ],
                        3,
                    ),
                    GetMode::New1 => run_client_mode(
                        v,
                        client,
                        &[
                            "get".into(),
                            "--path".into(),
                            path.clone(),
                            "--threads".into(),
                            "1".into(),
                            "--millis".into(),
                            ms(o.latency_ms),
                        ],
                        1,
                    ),
                    GetMode::Ka1 => run_client_mode(
                        v,
                        client,
                        &[
                            "get".into(),
                            "--pattern".into(),
                            "keepalive".into(),
                            "--path".into(),
                            path.clone(),
                            "--threads".into(),
                            "1".into(),
                            "--millis".into(),
                            ms(o.latency_ms),
                        ],
                        1,
                    ),
                    GetMode::KaMax => {
                        run_wrk(v, &script, &path, o.keepalive_connections, o.throughput_ms)
                    }
                    GetMode::OpenKa => run_client_mode(
                        v,
                        client,
                        &[
                            "open".into(),
                            "--pattern".into(),
                            "keepalive".into(),
                            "--path".into(),
                            path.clone(),
                            "--rate".into(),
                            o.open_keepalive_rate.to_string(),
                            "--conns".into(),
                            o.open_threads.to_string(),
                            "--millis".into(),
                            ms(o.open_ms),
                        ],
                        1,
                    ),
                    GetMode::OpenSdk => run_client_mode(
                        v,
                        client,
                        &[
                            "open".into(),
                            "--pattern".into(),
                            "sdk".into(),
                            "--rate".into(),
                            o.open_sdk_rate.to_string(),
                            "--conns".into(),
                            o.open_threads.to_string(),
                            "--millis".into(),
                            ms(o.open_ms),
                        ],
                        3,
                    ),
                };
                let cpu = match (cpu0, cpu_ns(v.server_pid)) {
                    (Some(a), Some(b)) if outcome.requests > 0 => {
                        Some((b - a) as f64 / outcome.requests as f64)
                    }
                    _ => None,
                };
                let row = rows
                    .iter_mut()
                    .find(|r| r.mode == *mode && r.variant == v.key)
                    .expect("a row per mode and variant");
                row.round_p50.push(outcome.dist.median().map(|x| x as f64));
                row.round_p99.push(outcome.dist.p99().map(|x| x as f64));
                row.round_rps
                    .push(Some(outcome.dist.count() as f64 / outcome.secs));
                row.round_cpu_ns.push(cpu);
                row.dist.merge(&outcome.dist);
                row.errors += outcome.errors;
                row.late += outcome.late;
                row.offered += outcome.offered;
                if row.first_error.is_none() {
                    row.first_error = outcome.first_error;
                }
            }
        }
    }
    let tail = tail_probe(node, pods, client, floor_pid, &floor_addr, &path, o);
    dnat.remove();
    drop(floor);
    GetResult {
        tail,
        rows,
        rounds: o.get_rounds,
        body_bytes,
        latency_ms: o.latency_ms,
        throughput_secs: o.throughput_ms.div_ceil(1000).max(1),
        open_ms: o.open_ms,
        keepalive_connections: o.keepalive_connections,
        open_keepalive_rate: o.open_keepalive_rate,
        open_sdk_rate: o.open_sdk_rate,
        open_threads: o.open_threads,
        dnat_matched: dnat.matched,
    }
}

/// Where the floor's keep-alive tail comes from: the same one-client keep-alive run against the
/// floor (conntrack on), (n) as everywhere else, (f) with client and floor at SCHED_FIFO (they
/// never wait behind other runnable tasks), and (i) with a SCHED_IDLE busy loop on every CPU
/// (which yields at once to any other task but keeps the CPUs from going idle, so no wake-up
/// from idle is measured: on a virtual machine, an idle vCPU is descheduled by the host).
fn tail_probe(
    node: &TestNode,
    pods: &Pods<'_>,
    client: &Path,
    floor_pid: u32,
    floor_addr: &str,
    path: &str,
    o: &Options,
) -> Vec<TailRow> {
    let keys = [
        ("n", "as in the tables above"),
        ("f", "client and floor at SCHED_FIFO"),
        ("i", "a SCHED_IDLE busy loop on every CPU"),
    ];
    let mut rows: Vec<TailRow> = keys
        .iter()
        .map(|(key, label)| TailRow {
            key,
            label: (*label).to_owned(),
            dist: Dist::default(),
            round_p99: Vec::new(),
            run_delay_ns: 0,
        })
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chrt_floor = |args: &[&str]| {
        let mut command = std::process::Command::new("chrt");
        command.args(args).arg(floor_pid.to_string());
        let _ =
            crate::process::output_within(&mut command, std::time::Duration::from_secs(10), "chrt");
    };
    for round in 0..o.get_rounds {
        for i in rotation(keys.len(), round) {
            let key = keys[i].0;
            let mut command = match key {
                "f" => {
                    chrt_floor(&["-a", "-f", "-p", "20"]);
                    let mut c = pod_command(&pods.p6, Placement::Outside, "chrt");
                    c.args(["-f", "20"]).arg(client);
                    c
                }
                _ => pod_command(&pods.p6, Placement::Outside, client),
            };
            let spinners: Vec<_> = if key == "i" {
                (0..cpus)
                    .map(|cpu| {
                        let mut c = node.command("chrt");
                        c.args(["-i", "0"]).arg(client).args([
                            "spin",
                            "--cpu",
                            &cpu.to_string(),
                            "--millis",
                            &(o.latency_ms + 400).to_string(),
                        ]);
                        spawn_client(&mut c, "spinner")
                    })
                    .collect()
            } else {
                Vec::new()
            };
            if key == "i" {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            command.args([
                "get",
                "--pattern",
                "keepalive",
                "--path",
                path,
                "--threads",
                "1",
                "--millis",
                &o.latency_ms.to_string(),
                "--addr",
                floor_addr,
            ]);
            let floor_delay0 = run_delay_ns(floor_pid);
            let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client (tail)");
            let client_delay = fields(&out, "summary")
                .get("run_delay_ns")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            rows[i].run_delay_ns +=
                client_delay + run_delay_ns(floor_pid).saturating_sub(floor_delay0);
            if key == "f" {
                chrt_floor(&["-a", "-o", "-p", "0"]);
            }
            for mut spinner in spinners {
                let _ = super::runner::finish_client(&mut spinner, "spinner");
            }
            let dist = Dist::from_samples(&samples(&out));
            rows[i].round_p99.push(dist.p99().map(|x| x as f64));
            rows[i].dist.merge(&dist);
        }
    }
    rows
}
