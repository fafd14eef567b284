//! Part 2b: what kernel-attested identity (issue 10) costs, per connect and per request.
//!
//! Per connect, one running agent: a redirected connect from a pod in a kubelet pod cgroup with
//! the attestation record (connect4 walks the cgroup ancestors and writes `K2I_CONNECTING`,
//! sock_ops moves the record to `K2I_ATTEST` at `TCP_CONNECT_CB` and asks for the close callback)
//! against the same connect with the record turned off in the pinned config (`FLAG_ATTEST_OFF`,
//! what the agent writes for `--identity-attestation off`): the same build and programs, one flag
//! apart, alternated round by round. sock_ops stays attached and runs in both; without a record
//! it finds none to move.
//!
//! Per request: the agent restarted with `--identity-attestation require` and with `off`,
//! alternating; in each, GETs of the pod's credentials on a new connection each and over one
//! kept-alive connection, with the agent's CPU time per request. `require` adds the kernel's
//! record and the agent's lookup of the connection's record and of its cgroup's pod.

use std::path::Path;

use kube2iam_common::FLAG_ATTEST_OFF;

use super::{
    report::{AttestRequestRow, AttestResult, ConnectRow, GetMode},
    runner::{
        AGENT_CPU, AGENT_FLAGS, AGENT_GUARD_FLAG, AgentPin, CLIENT_CPU, CLIENT_TIMEOUT, GUARDED,
        Options, Placement, pod_command, progress, rotation,
    },
    stats::Dist,
    topology::{Dnat, agent_addr, cpu_ns, fields, metadata, run_client, samples, wait_known},
    world::BenchWorld,
};
use crate::{CgroupDriver, Pod, TestNode, kube_api, maps};

const ROLE: &str = "bench-role";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/bench-role";

/// Restores the record flag the agent wrote, also on panic.
struct RecordFlag<'a> {
    pin_path: &'a Path,
    original: u32,
}

impl<'a> RecordFlag<'a> {
    fn new(pin_path: &'a Path) -> Self {
        let config = maps::read_config(pin_path).expect("the agent's config in the pinned map");
        Self {
            pin_path,
            original: config.flags,
        }
    }

    fn set(&self, record: bool) {
        let mut config =
            maps::read_config(self.pin_path).expect("the agent's config in the pinned map");
        if record {
            config.flags &= !FLAG_ATTEST_OFF;
        } else {
            config.flags |= FLAG_ATTEST_OFF;
        }
        maps::write_config(self.pin_path, &config);
    }
}

impl Drop for RecordFlag<'_> {
    fn drop(&mut self) {
        if let Some(mut config) = maps::read_config(self.pin_path) {
            config.flags = self.original;
            maps::write_config(self.pin_path, &config);
        }
    }
}

/// Removes the pod's kubelet cgroups again, also on panic. While any kubelet pod cgroup exists
/// below the attach cgroup, `--identity-attestation prefer` (the default) refuses processes
/// outside pod cgroups, which is where the other parts' clients run.
struct KubeletLayout {
    root: std::path::PathBuf,
    container: std::path::PathBuf,
}

impl Drop for KubeletLayout {
    fn drop(&mut self) {
        // Deepest first, up to (not including) the attach cgroup; the clients have exited.
        let mut dir = Some(self.container.as_path());
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) {
                break;
            }
            let _ = std::fs::remove_dir(d);
            dir = d.parent();
        }
    }
}

/// The agent's flags in this part: the run's own, plus the attestation mode.
fn agent_flags(mode: &str) -> Vec<&str> {
    vec![
        AGENT_GUARD_FLAG,
        GUARDED,
        "--prefetch-concurrency",
        "0",
        "--identity-attestation",
        mode,
    ]
}

pub(super) fn run(
    node: &TestNode,
    world: &mut BenchWorld,
    pod: &Pod<'_>,
    dnat_pod: &Pod<'_>,
    client: &Path,
    o: &Options,
) -> AttestResult {
    // The pod as kubelet lays it out (systemd driver), so the kernel's record names it.
    let uid = kube_api::new_uid();
    let laid = pod.use_kubelet_cgroup(CgroupDriver::Systemd, &uid);
    let layout = KubeletLayout {
        root: node.cgroup_path().to_owned(),
        container: laid.container,
    };
    world.api.add_pod(
        kube_api::pod(
            "bench",
            "bench-attest",
            crate::e2e::NODE_NAME,
            pod.ip4(),
            None,
        )
        .uid(&uid)
        .annotate(crate::e2e::ROLE_KEY, ROLE),
    );
    wait_known(
        world,
        node,
        &[pod.ip4()],
        std::time::Duration::from_secs(20),
    );

    let connect_rows = per_connect(node, world, pod, dnat_pod, client, o);
    let request_rows = per_request(node, world, pod, client, o);
    // Later parts get the node and the agent as the run started them (p8 is not used again).
    world.api.delete_pod("bench", "bench-attest");
    drop(layout);
    world.kill_agent();
    world.start_agent(node, &AGENT_FLAGS);
    AttestResult {
        connect_rows,
        connect_rounds: o.connect_rounds,
        per_batch: o.connects_per_batch,
        request_rows,
        request_rounds: o.attest_rounds,
        latency_ms: o.latency_ms,
    }
}

fn per_connect(
    node: &TestNode,
    world: &BenchWorld,
    pod: &Pod<'_>,
    dnat_pod: &Pod<'_>,
    client: &Path,
    o: &Options,
) -> Vec<ConnectRow> {
    progress("2b. attestation: per connect");
    // (key, label, placement, address, record)
    let variants: [(&'static str, &str, Placement, String, bool); 3] = [
        (
            "a",
            "(a) direct to the agent's address, no program of ours (baseline)",
            Placement::Outside,
            agent_addr(),
            false,
        ),
        (
            "b-att",
            "(b) 169.254.169.254 rewritten, with the attestation record and sock_ops moving it",
            Placement::Cgroup,
            metadata(),
            true,
        ),
        (
            "b-off",
            "(b) the same connect with the record off (FLAG_ATTEST_OFF: the agent's \
             `--identity-attestation off`); sock_ops runs and finds none",
            Placement::Cgroup,
            metadata(),
            false,
        ),
    ];
    let pin_path = node.pin_path();
    let flag = RecordFlag::new(&pin_path);
    let pinned = AgentPin::new(world.agent.pid(), AGENT_CPU);
    // Conntrack on, as on a node running kube-proxy (the connect part's headline view).
    let mut dnat = Dnat::new(node, dnat_pod);
    dnat.install();
    let mut rows: Vec<ConnectRow> = variants
        .iter()
        .map(|(key, label, ..)| ConnectRow {
            key,
            label: (*label).to_owned(),
            conntrack: true,
            dist: Dist::default(),
            round_medians: Vec::new(),
        })
        .collect();
    for round in 0..o.connect_rounds {
        for i in rotation(variants.len(), round) {
            let (_, _, placement, addr, record) = &variants[i];
            flag.set(*record);
            let mut command = pod_command(pod, *placement, client);
            command.args([
                "connect",
                "--addr",
                addr,
                "--count",
                &o.connects_per_batch.to_string(),
                "--cpu",
                &CLIENT_CPU.to_string(),
            ]);
            let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client connect");
            let s = samples(&out);
            assert_eq!(s.len(), o.connects_per_batch, "connect samples: {out}");
            let batch = Dist::from_samples(&s);
            rows[i].round_medians.push(batch.median().map(|m| m as f64));
            rows[i].dist.merge(&batch);
        }
    }
    dnat.remove();
    drop(pinned);
    drop(flag);
    rows
}

fn per_request(
    node: &TestNode,
    world: &mut BenchWorld,
    pod: &Pod<'_>,
    client: &Path,
    o: &Options,
) -> Vec<AttestRequestRow> {
    progress("2b. attestation: per request (agent restarted per mode and round)");
    let modes = ["require", "off"];
    let kinds = [GetMode::New1, GetMode::Ka1];
    let mut rows: Vec<AttestRequestRow> = kinds
        .iter()
        .flat_map(|kind| {
            modes.iter().map(move |mode| AttestRequestRow {
                mode,
                kind: *kind,
                dist: Dist::default(),
                round_p50: Vec::new(),
                round_p99: Vec::new(),
                round_cpu_ns: Vec::new(),
                errors: 0,
            })
        })
        .collect();
    for round in 0..o.attest_rounds {
        for m in rotation(modes.len(), round) {
            let mode = modes[m];
            world.kill_agent();
            world.start_agent(node, &agent_flags(mode));
            wait_known(
                world,
                node,
                &[pod.ip4()],
                std::time::Duration::from_secs(20),
            );
            // One fetch through STS first: the measured requests come from the agent's cache.
            let (status, body) = crate::e2e::pod_get(pod, CREDENTIALS, &[]);
            assert_eq!(
                status,
                200,
                "attestation {mode}: the pod's credentials: {body}\n{}",
                world.agent.log()
            );
            for kind in kinds {
                let mut command = pod_command(pod, Placement::Cgroup, client);
                command.args(["get"]);
                if kind == GetMode::Ka1 {
                    command.args(["--pattern", "keepalive"]);
                }
                command.args([
                    "--path",
                    CREDENTIALS,
                    "--threads",
                    "1",
                    "--millis",
                    &o.latency_ms.to_string(),
                    "--addr",
                    &metadata(),
                ]);
                let cpu0 = cpu_ns(world.agent.pid());
                let out = run_client(&mut command, CLIENT_TIMEOUT, "k2i-bench-client get");
                let cpu1 = cpu_ns(world.agent.pid());
                let dist = Dist::from_samples(&samples(&out));
                let errors: u64 = fields(&out, "summary")
                    .get("errors")
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                let row = rows
                    .iter_mut()
                    .find(|r| r.mode == mode && r.kind == kind)
                    .expect("a row per mode and kind");
                row.round_p50.push(dist.median().map(|x| x as f64));
                row.round_p99.push(dist.p99().map(|x| x as f64));
                row.round_cpu_ns.push(match (cpu0, cpu1) {
                    (Some(a), Some(b)) if dist.count() > 0 => {
                        Some((b - a) as f64 / dist.count() as f64)
                    }
                    _ => None,
                });
                row.errors += errors;
                row.dist.merge(&dist);
            }
        }
    }
    rows
}
