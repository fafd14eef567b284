//! Part 1: what one `connect()` from a pod costs: direct to the agent, rewritten by our
//! connect4, DNATed by kube2iam's rule, and (what we cost everybody else) a connect to another
//! destination with our programs in the path.

use std::path::Path;

use super::{
    report::{ConnectResult, ConnectRow},
    runner::{
        AGENT_CPU, AgentPin, CLIENT_CPU, CLIENT_TIMEOUT, Options, Placement, Pods, pod_command,
        rotation,
    },
    stats::Dist,
    topology::{Dnat, agent_addr, metadata, run_client, samples},
    world::BenchWorld,
};
use crate::{Pod, TestNode};

struct Variant<'p, 'n> {
    pod: &'p Pod<'n>,
    key: &'static str,
    label: &'static str,
    placement: Placement,
    addr: String,
    nat: bool,
}

/// Every variant connects to the agent's listener (192.0.2.10:8181), directly or through a
/// rewrite. The headline variants run with kube2iam's nat table present, which turns conntrack
/// on for every packet of the node's namespace, as on any node running kube-proxy; the second
/// view repeats (a), (b) and (b+g) with the table deleted. Connects end with a reset, so no
/// TIME_WAIT is shared between variants.
pub(super) fn run(
    node: &TestNode,
    world: &BenchWorld,
    pods: &Pods<'_>,
    client: &Path,
    o: &Options,
) -> ConnectResult {
    let (plain, guarded, dnat_pod) = (&pods.p7, &pods.p0, &pods.p5);
    let v = |pod, key, label, placement, addr: String, nat| Variant {
        pod,
        key,
        label,
        placement,
        addr,
        nat,
    };
    let variants = [
        v(
            plain,
            "a",
            "(a) direct to the agent's address, no program of ours (baseline)",
            Placement::Outside,
            agent_addr(),
            true,
        ),
        v(
            plain,
            "o",
            "(o) the same connect from the test cgroup: our connect4 runs and lets it pass",
            Placement::Cgroup,
            agent_addr(),
            true,
        ),
        v(
            guarded,
            "o+g",
            "(o+g) as (o), from a pod with the packet guard: what any other connect of a pod pays",
            Placement::Cgroup,
            agent_addr(),
            true,
        ),
        v(
            plain,
            "b",
            "(b) 169.254.169.254 rewritten by our connect4",
            Placement::Cgroup,
            metadata(),
            true,
        ),
        v(
            guarded,
            "b+g",
            "(b+g) as (b), from a pod with the packet guard (as deployed)",
            Placement::Cgroup,
            metadata(),
            true,
        ),
        v(
            dnat_pod,
            "c",
            "(c) 169.254.169.254 DNATed by kube2iam's iptables rule, no program of ours",
            Placement::Outside,
            metadata(),
            true,
        ),
        v(
            plain,
            "a0",
            "(a) without conntrack (nat table deleted)",
            Placement::Outside,
            agent_addr(),
            false,
        ),
        v(
            plain,
            "b0",
            "(b) without conntrack",
            Placement::Cgroup,
            metadata(),
            false,
        ),
        v(
            guarded,
            "b+g0",
            "(b+g) without conntrack",
            Placement::Cgroup,
            metadata(),
            false,
        ),
    ];
    // The agent accepts every connection; when its worker wakes on the client's CPU it can
    // preempt the client inside connect() and add its accept to the measured time, in some
    // batches and not others. The agent's threads go to one CPU and the client to the other
    // for this part, the same for every variant.
    let pinned = AgentPin::new(world.agent.pid(), AGENT_CPU);
    let mut dnat = Dnat::new(node, dnat_pod);
    let mut rows: Vec<ConnectRow> = variants
        .iter()
        .map(|v| ConnectRow {
            key: v.key,
            label: v.label.to_owned(),
            conntrack: v.nat,
            dist: Dist::default(),
            round_medians: Vec::new(),
        })
        .collect();
    for round in 0..o.connect_rounds {
        for i in rotation(variants.len(), round) {
            let v = &variants[i];
            if v.nat {
                dnat.install();
            } else {
                dnat.remove();
            }
            let mut command = pod_command(v.pod, v.placement, client);
            command.args([
                "connect",
                "--addr",
                &v.addr,
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
    ConnectResult {
        rows,
        rounds: o.connect_rounds,
        per_batch: o.connects_per_batch,
        dnat_rule: dnat.rule().join(" "),
        dnat_matched: dnat.matched,
    }
}
