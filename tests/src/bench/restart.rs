//! Part 6: kill -9 and restart under load, through the adopt path (the same binary) and the
//! upgrade path (programs that differ from the attached ones, and a pinned map of the previous
//! release's size).

use std::{mem::size_of, net::Ipv4Addr, os::fd::AsFd as _, path::Path, time::Duration};

use kube2iam_common::{RevNat, maps};

use super::{
    mono_ns,
    report::RestartResult,
    runner::{AGENT_GUARD_FLAG, GUARDED, Options, Pods, finish_client, pod_ips_seen},
    topology::{metadata, spawn_client},
    world::BenchWorld,
};
use crate::{TestNode, bpf};

/// The previous release's reverse-NAT capacity.
const PREVIOUS_REVNAT_CAPACITY: u32 = 65_536;

/// What the upgrade path meets: the reverse-NAT map pinned at the previous release's size, with
/// the entries of the map the running programs use.
fn pin_previous_release_revnat(pin_dir: &Path) {
    let path = pin_dir.join(maps::REVNAT);
    let current = aya::maps::MapData::from_pin(&path).expect("open the reverse-NAT map");
    let current: aya::maps::HashMap<_, u64, RevNat> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(current))
            .expect("the reverse-NAT map is an LRU hash");
    let old = bpf::map_create(
        bpf::MAP_TYPE_LRU_HASH,
        8,
        size_of::<RevNat>() as u32,
        PREVIOUS_REVNAT_CAPACITY,
        0,
    )
    .expect("create the previous release's map");
    for (cookie, entry) in current.iter().flatten() {
        // SAFETY: RevNat is #[repr(C)], u32 fields only, no padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const entry).cast::<u8>(), size_of::<RevNat>())
        };
        let _ = bpf::map_update(old.as_fd(), &cookie.to_ne_bytes(), bytes);
    }
    std::fs::remove_file(&path).expect("unpin the reverse-NAT map");
    bpf::obj_pin(old.as_fd(), &path).expect("pin the previous release's map");
}

fn one(
    node: &TestNode,
    world: &mut BenchWorld,
    pod: &crate::Pod<'_>,
    sources: &[String],
    client: &Path,
    o: &Options,
    upgrade: bool,
) -> RestartResult {
    let seen_before = pod_ips_seen(world).len();
    let mut command = pod.command(client);
    command.args([
        "steady",
        "--addr",
        &metadata(),
        "--bind",
        &sources.join(","),
        "--interval-ms",
        &o.restart_interval_ms.to_string(),
        "--millis",
        &o.restart_total_ms.to_string(),
        "--credentials-only",
        "1",
    ]);
    let start = mono_ns();
    let mut steady = spawn_client(&mut command, "k2i-bench-client steady");
    let kill_at = start + o.restart_kill_at_ms * 1_000_000;
    let now = mono_ns();
    if kill_at > now {
        std::thread::sleep(Duration::from_nanos(kill_at - now));
    }
    let killed = mono_ns();
    world.kill_agent();
    if upgrade {
        pin_previous_release_revnat(&node.pin_path());
    }
    let spawned = mono_ns();
    // The upgrade's programs differ from the attached ones: loaded with the kernel debug log
    // compiled in (any directive at debug level turns it on; this one prints none of it).
    let extra: &[&str] = if upgrade {
        &[
            AGENT_GUARD_FLAG,
            GUARDED,
            "--log-level",
            "info,k2i_bench_none=debug",
        ]
    } else {
        &[AGENT_GUARD_FLAG, GUARDED]
    };
    world.start_agent(node, extra);
    let ready = mono_ns();
    let out = finish_client(&mut steady, "the steady client");
    let log = world.agent.log();
    let mut events: Vec<(u64, u64, i64, bool)> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 6 && w[0] == "ev").then(|| {
                (
                    w[2].parse().unwrap_or(0),
                    w[3].parse().unwrap_or(0),
                    w[4].parse().unwrap_or(0),
                    w[5] == "1",
                )
            })
        })
        .collect();
    events.sort_unstable();
    let ok = |e: &&(u64, u64, i64, bool)| e.2 == 200;
    let last_ok_before = events
        .iter()
        .filter(ok)
        .filter(|e| e.1 <= killed)
        .map(|e| e.1)
        .max();
    let first_ok_after = events
        .iter()
        .filter(ok)
        .filter(|e| e.1 > spawned)
        .map(|e| e.1)
        .min();
    let node_key_events: Vec<_> = events.iter().filter(|e| e.3).collect();
    let leak_gap_ns = match (node_key_events.first(), node_key_events.last()) {
        (Some(first), Some(last)) => last.1 - first.0,
        _ => 0,
    };
    // How densely the requests sample time: gaps between consecutive request starts.
    let mut gaps: Vec<u64> = events.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort_unstable();
    let imds_saw = pod_ips_seen(world).len() - seen_before;
    let mut failures: std::collections::BTreeMap<i64, usize> = Default::default();
    for e in events.iter().filter(|e| e.2 != 200) {
        *failures.entry(e.2).or_default() += 1;
    }
    RestartResult {
        upgrade,
        requests: events.len(),
        ok: events.iter().filter(ok).count(),
        failures: failures.into_iter().collect(),
        node_key_responses: node_key_events.len(),
        imds_saw_pods: imds_saw,
        leak_gap_ns,
        start_to_first_served_ns: first_ok_after.map(|t| t - spawned),
        outage_ns: match (last_ok_before, first_ok_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        start_to_synced_ns: ready - spawned,
        sources: sources.len(),
        interval_ms: o.restart_interval_ms,
        kill_to_spawn_ns: spawned - killed,
        median_sample_gap_ns: gaps.get(gaps.len() / 2).copied().unwrap_or(0),
        programs_replaced: log
            .matches("replaced the pinned program atomically")
            .count(),
        maps_recreated: log.matches("recreating it").count(),
        links_repointed: log
            .matches("link now runs the program with the new maps")
            .count(),
    }
}

pub(super) fn run(
    node: &TestNode,
    world: &mut BenchWorld,
    pods: &Pods<'_>,
    ips: &[Ipv4Addr],
    client: &Path,
    o: &Options,
) -> Vec<RestartResult> {
    let sources: Vec<String> = ips[..o.restart_sources.min(ips.len())]
        .iter()
        .map(ToString::to_string)
        .collect();
    vec![
        one(node, world, &pods.p3, &sources, client, o, false),
        one(node, world, &pods.p3, &sources, client, o, true),
    ]
}
