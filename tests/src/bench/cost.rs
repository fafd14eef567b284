//! Part 3: what the packet guard costs the rest of a pod's traffic: iperf3 from a pod whose
//! interface has the guard (tc ingress on the node side) against one without, to an iperf3
//! server on the node. TCP bulk throughput, and UDP with 64-byte datagrams (packet rate, where a
//! per-packet program shows most).

use std::time::Duration;

use super::{
    report::{CostResult, CostRow},
    runner::{CLIENT_TIMEOUT, Options, Pods, rotation},
    topology::{run_client, spawn_client},
};
use crate::{HOST_IP4, Pod, TestNode};

const IPERF_PORT: u16 = 5201;

struct Variant<'p, 'n> {
    pod: &'p Pod<'n>,
    key: &'static str,
    udp: bool,
}

/// iperf3's JSON result: (bits/s received, packets/s received).
fn parse(json: &str, udp: bool) -> Option<(f64, f64)> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let end = &value["end"];
    if udp {
        let sum = &end["sum"];
        let seconds = sum["seconds"].as_f64()?;
        let packets = sum["packets"].as_f64()? - sum["lost_packets"].as_f64().unwrap_or(0.0);
        let bits = sum["bits_per_second"].as_f64()?
            * (1.0 - sum["lost_percent"].as_f64().unwrap_or(0.0) / 100.0);
        Some((bits, packets / seconds.max(1e-9)))
    } else {
        let sum = &end["sum_received"];
        Some((sum["bits_per_second"].as_f64()?, 0.0))
    }
}

pub(super) fn run(node: &TestNode, pods: &Pods<'_>, o: &Options) -> CostResult {
    if which("iperf3").is_none() {
        return CostResult {
            rows: Vec::new(),
            rounds: 0,
            secs: 0.0,
            missing: Some("iperf3 is not installed (cargo xtask install installs it)".into()),
        };
    }
    let mut server = spawn_client(
        node.command("iperf3").args([
            "-s",
            "-B",
            &HOST_IP4.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ]),
        "iperf3 server",
    );
    std::thread::sleep(Duration::from_millis(300));
    let variants = [
        Variant {
            pod: &pods.p7,
            key: "tcp",
            udp: false,
        },
        Variant {
            pod: &pods.p0,
            key: "tcp+g",
            udp: false,
        },
        Variant {
            pod: &pods.p7,
            key: "udp",
            udp: true,
        },
        Variant {
            pod: &pods.p0,
            key: "udp+g",
            udp: true,
        },
    ];
    let mut rows: Vec<CostRow> = variants
        .iter()
        .map(|v| CostRow {
            key: v.key,
            udp: v.udp,
            guarded: v.key.ends_with("+g"),
            round_bits: Vec::new(),
            round_pps: Vec::new(),
        })
        .collect();
    // iperf3 takes whole seconds.
    let secs = o.iperf_ms.div_ceil(1000).max(1);
    for round in 0..o.cost_rounds {
        for i in rotation(variants.len(), round) {
            let v = &variants[i];
            // Outside the test cgroup: the connect4 rewrite is part 1's subject; this is the
            // guard on the pod's interface alone.
            let mut command = v.pod.command_outside_cgroup("iperf3");
            command.args([
                "-c",
                &HOST_IP4.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ]);
            if v.udp {
                command.args(["-u", "-b", "0", "-l", "64"]);
            }
            let out = run_client(&mut command, CLIENT_TIMEOUT, "iperf3");
            let parsed = parse(&out, v.udp);
            rows[i].round_bits.push(parsed.map(|p| p.0));
            rows[i]
                .round_pps
                .push(parsed.map(|p| p.1).filter(|_| v.udp));
        }
    }
    server.kill9();
    CostResult {
        rows,
        rounds: o.cost_rounds,
        secs: secs as f64,
        missing: None,
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}
