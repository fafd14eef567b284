//! Part 4: STS over TLS with its real latency (50–300 ms a call): the herd (many requests for
//! one cold role), prefetch (pods asking soon after they appear) and a node drain (a node's
//! worth of pods with roles of their own arriving within a second).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use super::{
    mono_ns,
    report::{DrainResult, HerdResult, HerdRun, PrefetchResult, StsResult},
    runner::{AGENT_GUARD_FLAG, CLIENT_TIMEOUT, GUARDED, Options, Pods, addresses, finish_client},
    stats::Dist,
    topology::{
        fields, metadata, metric, metric_with, register, run_client, samples, spawn_client,
        wait_known,
    },
    world::{BenchWorld, STS_LATENCY_MS},
};
use crate::{
    Pod, TestNode,
    e2e::{CREDS, role_arn},
};

pub(super) fn run(
    node: &TestNode,
    world: &mut BenchWorld,
    pods: &Pods<'_>,
    client: &Path,
    o: &Options,
) -> StsResult {
    // The agent of parts 1–3 runs with --prefetch-concurrency 0: the herd's roles are cold.
    let herd_ips = addresses(node, &pods.p1, 1, o.herds * 10);
    for (i, ip) in herd_ips.iter().enumerate() {
        let role = format!("herd-role-{}", i / 10);
        register(&world.api, *ip, "herd", &format!("herd-{i}"), Some(&role));
    }
    wait_known(world, node, &herd_ips, Duration::from_secs(20));
    let herd = herd(world, &pods.p1, &herd_ips, client, o);

    // Prefetch on (the default), for pods that appear from now on.
    world.kill_agent();
    world.start_agent(node, &[AGENT_GUARD_FLAG, GUARDED]);
    let prefetch_concurrency = 8;
    let prefetch_ips = addresses(node, &pods.p2, 10, usize::from(o.prefetch_pods));
    let prefetch = arrivals(
        world,
        node,
        &pods.p2,
        &prefetch_ips,
        "pf",
        o.prefetch_gap_ms * 1_000_000,
        o.prefetch_delay_ms,
        client,
    );
    let drain_ips = addresses(node, &pods.p2, 11, usize::from(o.drain_pods));
    let gap = o.drain_window_ms * 1_000_000 / u64::from(o.drain_pods.max(1));
    let drain = arrivals(
        world,
        node,
        &pods.p2,
        &drain_ips,
        "drain",
        gap,
        o.prefetch_delay_ms,
        client,
    );
    StsResult {
        latency_ms: STS_LATENCY_MS,
        herd,
        prefetch: PrefetchResult {
            arrivals: prefetch,
            gap_ms: o.prefetch_gap_ms,
        },
        drain: DrainResult {
            arrivals: drain,
            window_ms: o.drain_window_ms,
        },
        prefetch_concurrency,
        delay_ms: o.prefetch_delay_ms,
    }
}

fn herd(
    world: &BenchWorld,
    pod: &Pod<'_>,
    ips: &[Ipv4Addr],
    client: &Path,
    o: &Options,
) -> HerdResult {
    let mut runs = Vec::new();
    for h in 0..o.herds {
        let role = format!("herd-role-{h}");
        let arn = role_arn(&role);
        let sources: Vec<String> = ips[h * 10..h * 10 + 10]
            .iter()
            .map(ToString::to_string)
            .collect();
        let proxy_before = count_role(&world.sts.assume_role_calls(), &arn);
        let mut command = pod.command(client);
        command.args([
            "herd",
            "--addr",
            &metadata(),
            "--path",
            &format!("{CREDS}{role}"),
            "--conns",
            &o.herd_requests.to_string(),
            "--bind",
            &sources.join(","),
        ]);
        let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client herd");
        let f = fields(&out, "herd");
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        runs.push(HerdRun {
            role: role.clone(),
            requests: o.herd_requests,
            answered: num("answered") as usize,
            failures: num("failures") as usize,
            statuses: f.get("statuses").cloned().unwrap_or_default(),
            distinct_keys: num("distinct_keys") as usize,
            node_key: num("node_key") as usize,
            all_answered_ns: num("all_answered_ns"),
            completion: Dist::from_samples(&samples(&out)),
            proxy_assume_role: count_role(&world.sts.assume_role_calls(), &arn) - proxy_before,
            moto_assume_role: count_role(&world.moto.assume_role_calls(), &arn),
        });
    }
    HerdResult { runs }
}

fn count_role(calls: &[crate::AssumeRoleCall], arn: &str) -> usize {
    calls.iter().filter(|c| c.role_arn == arn).count()
}

/// Pods at `ips` appear in the API `gap` ns apart, each with a role of its own; each asks
/// (listing, then credentials) `delay_ms` after it appeared.
#[allow(clippy::too_many_arguments)]
fn arrivals(
    world: &BenchWorld,
    node: &TestNode,
    pod: &Pod<'_>,
    ips: &[Ipv4Addr],
    prefix: &str,
    gap: u64,
    delay_ms: u64,
    client: &Path,
) -> super::report::Arrivals {
    let hits0 = metric(world, node, "kube2iam_credential_cache_hits_total");
    let misses0 = metric(world, node, "kube2iam_credential_cache_misses_total");
    let sts = |suffix: &str, labels: &[&str]| {
        metric_with(
            world,
            node,
            &format!("kube2iam_sts_call_duration_seconds_{suffix}"),
            labels,
        )
    };
    let sts0 = (sts("count", &[]), sts("sum", &[]));
    let delay = delay_ms * 1_000_000;
    let base = mono_ns() + 500_000_000;
    let mut command = pod.command(client);
    command.args(["plan", "--addr", &metadata()]);
    for (i, ip) in ips.iter().enumerate() {
        command
            .arg("--item")
            .arg(format!("{ip}@{}", base + i as u64 * gap + delay));
    }
    let mut plan = spawn_client(&mut command, "k2i-bench-client plan");
    let mut add_lateness = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let at = base + i as u64 * gap;
        let now = mono_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        add_lateness.push(mono_ns().saturating_sub(at));
        register(
            &world.api,
            *ip,
            prefix,
            &format!("{prefix}-{i}"),
            Some(&format!("{prefix}-role-{i}")),
        );
    }
    let out = finish_client(&mut plan, "the plan client");
    let hits = metric(world, node, "kube2iam_credential_cache_hits_total") - hits0;
    let misses = metric(world, node, "kube2iam_credential_cache_misses_total") - misses0;
    let sts_calls = sts("count", &[]) - sts0.0;
    let sts_seconds = sts("sum", &[]) - sts0.1;
    let mut first = Dist::default();
    let mut credentials = Dist::default();
    let mut ok = 0;
    let mut ask_lateness = Vec::new();
    let mut last_answer = base;
    for line in out.lines().filter(|l| l.starts_with("first ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 7 {
            continue;
        }
        ask_lateness.push(w[2].parse::<u64>().unwrap_or(0));
        if w[3] == "200" && w[4] == "200" {
            ok += 1;
        }
        let listing: u64 = w[5].parse().unwrap_or(0);
        let creds: u64 = w[6].parse().unwrap_or(0);
        if let Some(i) = ips.iter().position(|ip| ip.to_string() == w[1]) {
            let asked = base + i as u64 * gap + delay + w[2].parse::<u64>().unwrap_or(0);
            last_answer = last_answer.max(asked + listing + creds);
        }
        first.add_samples(&[listing + creds]);
        credentials.add_samples(&[creds]);
    }
    let moto_calls = world
        .moto
        .assume_role_calls()
        .iter()
        .filter(|c| c.role_arn.contains(&format!("/{prefix}-role-")))
        .count();
    super::report::Arrivals {
        pods: ips.len(),
        ok,
        hits: hits as u64,
        misses: misses as u64,
        first,
        credentials,
        max_add_lateness_ns: add_lateness.into_iter().max().unwrap_or(0),
        max_ask_lateness_ns: ask_lateness.into_iter().max().unwrap_or(0),
        moto_calls,
        sts_calls: sts_calls as u64,
        sts_mean_ns: (sts_calls > 0.0).then(|| (sts_seconds / sts_calls * 1e9) as u64),
        first_appear_to_last_answer_ns: last_answer.saturating_sub(base),
    }
}
