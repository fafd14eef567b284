//! Part 5: the agent's memory, and how memory and latency scale with the pods on its node.
//!
//! Each row starts a fresh agent (in its memory cgroup) with N pods on the node, each with a role
//! of its own (the most cache entries), lets it sync, asks once for every pod's credentials (the
//! SDK's first fetch), then measures latency under open-loop SDK load from all N pods, and its
//! memory once idle.

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use super::{
    report::{MemoryResult, MemoryRow, MemorySnapshot},
    runner::{AGENT_GUARD_FLAG, CLIENT_TIMEOUT, GUARDED, Options, Pods, addresses},
    stats::Dist,
    topology::{
        clear_refs, cpu_ns, fields, memory_kib, metadata, pinned_map_memory, register, run_client,
        samples, smaps, wait_forgotten, wait_known,
    },
    world::{BenchWorld, STS_LATENCY_MS},
};
use crate::{
    FaultMode, Pod, TestNode,
    e2e::{NODE_NAME, ROLE_KEY},
    kube_api,
};

/// Deletes every pod on the agent's node from the API and waits until the agent forgot them.
fn clear_node(world: &BenchWorld, node: &TestNode) {
    let mut ips = Vec::new();
    for pod in world.api.pods() {
        if pod["spec"]["nodeName"].as_str() != Some(NODE_NAME) {
            continue;
        }
        let (Some(namespace), Some(name)) = (
            pod["metadata"]["namespace"].as_str(),
            pod["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        if let Some(ip) = pod["status"]["podIP"]
            .as_str()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        {
            ips.push(ip);
        }
        world.api.delete_pod(namespace, name);
    }
    wait_forgotten(world, node, &ips, Duration::from_secs(30));
}

/// One credential round: every address lists its role and fetches its credentials, all at
/// once. Panics unless every pod got its credentials.
fn credential_round(pods: &[(&Pod<'_>, &[Ipv4Addr])], client: &Path) {
    for (pod, ips) in pods {
        if ips.is_empty() {
            continue;
        }
        let mut command = pod.command(client);
        command.args(["plan", "--addr", &metadata()]);
        for ip in *ips {
            command.arg("--item").arg(format!("{ip}@0"));
        }
        let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client plan");
        let ok = out
            .lines()
            .filter(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 5 && w[0] == "first" && w[3] == "200" && w[4] == "200"
            })
            .count();
        assert_eq!(ok, ips.len(), "credential round: {out}");
    }
}

fn snapshot(world: &BenchWorld) -> MemorySnapshot {
    let memcg = world.memory.as_ref();
    MemorySnapshot {
        process: memory_kib(world.agent.pid()),
        cgroup_current: memcg.and_then(|m| m.current()),
        cgroup_peak: memcg.and_then(|m| m.peak()),
        cgroup_kernel: memcg.and_then(|m| m.kernel()),
        cgroup_anon_cache: memcg.and_then(|m| m.anon_and_cache()),
        sockets: std::fs::read_dir(format!("/proc/{}/fd", world.agent.pid()))
            .map(|fds| {
                fds.flatten()
                    .filter(|fd| {
                        std::fs::read_link(fd.path())
                            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0),
        sockets_by_peer: super::topology::sockets_by_peer(world.agent.pid()),
    }
}

/// The loader child's peak RSS, from the agent's "loader child done" log line.
fn loader_peak_kib(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("loader child done"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peak_rss_kib="))?
        .parse()
        .ok()
}

/// Open-loop SDK fetches from `ips` (round robin) at `rate`/s for `ms`: latency and the agent's
/// CPU per HTTP request.
fn loaded_latency(
    world: &BenchWorld,
    pod: &Pod<'_>,
    ips: &[Ipv4Addr],
    client: &Path,
    rate: u32,
    ms: u64,
) -> (Dist, Option<f64>, u64) {
    let binds: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let mut command = pod.command(client);
    command.args([
        "open",
        "--pattern",
        "sdk",
        "--addr",
        &metadata(),
        "--rate",
        &rate.to_string(),
        "--conns",
        "8",
        "--millis",
        &ms.to_string(),
        "--bind",
        &binds.join(","),
    ]);
    let cpu0 = cpu_ns(world.agent.pid());
    let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client open");
    let cpu1 = cpu_ns(world.agent.pid());
    let dist = Dist::from_samples(&samples(&out));
    let errors = fields(&out, "summary")
        .get("errors")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if dist.count() > 0 => Some((b - a) as f64 / (3 * dist.count()) as f64),
        _ => None,
    };
    (dist, cpu, errors)
}

pub(super) fn run(
    node: &TestNode,
    world: &mut BenchWorld,
    pods: &Pods<'_>,
    client: &Path,
    o: &Options,
) -> (MemoryResult, Vec<Ipv4Addr>) {
    let most = o.scale_pods.iter().copied().max().unwrap_or(0).max(110);
    // Even indices go to p3, odd ones to p4: p3 takes the larger half of an odd count.
    let half = most.div_ceil(2);
    let ips3 = addresses(node, &pods.p3, 20, half);
    let ips4 = addresses(node, &pods.p4, 30, most - half);
    // Pod i of a row: the i-th address, alternating between the two pod namespaces.
    let all: Vec<(&Pod<'_>, Ipv4Addr)> = (0..most)
        .map(|i| {
            if i % 2 == 0 {
                (&pods.p3, ips3[i / 2])
            } else {
                (&pods.p4, ips4[i / 2])
            }
        })
        .collect();
    // Many distinct roles: STS answers at once here (TLS stays), or a row would wait minutes
    // for STS at 50–300 ms a call.
    world.sts.set_mode(FaultMode::PassThrough);

    let mut configs: Vec<(usize, usize)> = Vec::new();
    for &n in &o.scale_pods {
        let reps = if n == 110 { o.memory_repeats } else { 1 };
        configs.extend(std::iter::repeat_n((n, n), reps));
    }
    configs.push((110, o.cluster_pods));
    let mut rows: Vec<MemoryRow> = Vec::new();
    let mut reps_seen: std::collections::HashMap<(usize, usize), usize> = Default::default();
    for (n, cluster) in configs {
        clear_node(world, node);
        let rep = {
            let r = reps_seen.entry((n, cluster)).or_default();
            *r += 1;
            *r
        };
        let here = &all[..n];
        for (i, (_, ip)) in here.iter().enumerate() {
            register(
                &world.api,
                *ip,
                &format!("team-{}", i % 10),
                &format!("app-{i}-r{rep}"),
                Some(&format!("mem-role-{i}")),
            );
        }
        if cluster > n {
            for i in 0..cluster - n {
                let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8);
                let object = kube_api::pod(
                    &format!("team-{}", i % 50),
                    &format!("off-{i}"),
                    &format!("node-{}", 1 + i % 45),
                    ip,
                    None,
                )
                .annotate(ROLE_KEY, &format!("off-role-{}", i % 100));
                world.api.add_pod(object);
            }
        }
        world.kill_agent();
        if let Some(m) = &world.memory {
            m.reset_peak();
        }
        world.start_agent(node, &[AGENT_GUARD_FLAG, GUARDED]);
        let ips: Vec<Ipv4Addr> = here.iter().map(|(_, ip)| *ip).collect();
        wait_known(world, node, &ips, Duration::from_secs(60));
        let synced = snapshot(world);
        let started = std::time::Instant::now();
        let on3: Vec<Ipv4Addr> = here
            .iter()
            .filter(|(p, _)| std::ptr::eq(*p, &pods.p3))
            .map(|(_, ip)| *ip)
            .collect();
        let on4: Vec<Ipv4Addr> = here
            .iter()
            .filter(|(p, _)| std::ptr::eq(*p, &pods.p4))
            .map(|(_, ip)| *ip)
            .collect();
        credential_round(&[(&pods.p3, &on3), (&pods.p4, &on4)], client);
        let round = started.elapsed();
        let after = snapshot(world);
        // From here on, smaps' Referenced counts what serving and idling touch.
        clear_refs(world.agent.pid());
        let (latency, cpu, errors) = if on3.is_empty() {
            (Dist::default(), None, 0)
        } else {
            loaded_latency(world, &pods.p3, &on3, client, 100, 1000)
        };
        std::thread::sleep(Duration::from_secs(1));
        let steady = snapshot(world);
        rows.push(MemoryRow {
            node_pods: n,
            cluster_pods: cluster,
            rep,
            synced,
            after,
            steady,
            smaps: smaps(world.agent.pid()),
            loader_peak_kib: loader_peak_kib(&world.agent.log()),
            round,
            latency,
            latency_errors: errors,
            cpu_per_request_ns: cpu,
        });
    }
    world.sts.set_mode(FaultMode::Latency {
        min: Duration::from_millis(STS_LATENCY_MS.0),
        max: Duration::from_millis(STS_LATENCY_MS.1),
    });
    let btf = run_client(
        Command::new(client).arg("btf"),
        CLIENT_TIMEOUT,
        "k2i-bench-client btf",
    );
    let f = fields(&btf, "btf");
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let agent = crate::agent_binary();
    // The restart part uses the pods of the last row (110 on the node).
    let last: Vec<Ipv4Addr> = all[..110.min(most)]
        .iter()
        .filter(|(p, _)| std::ptr::eq(*p, &pods.p3))
        .map(|(_, ip)| *ip)
        .collect();
    (
        MemoryResult {
            rows,
            maps: pinned_map_memory(world.agent.pin_path()),
            btf_bytes: num("bytes"),
            btf_parse_ns: num("parse_ns"),
            btf_peak_kib: num("hwm_after_kib").saturating_sub(num("hwm_before_kib")),
            agent_binary: agent.display().to_string(),
            agent_binary_bytes: std::fs::metadata(&agent).map_or(0, |m| m.len()),
        },
        last,
    )
}
