//! `cargo xtask bench`: the benchmarks of issues 6 and 14, run inside a test node.
//!
//! [`runner`] builds one test node with the real agent and the emulators ([`world`]: TLS in
//! front of the Kubernetes API emulator and of STS, STS's latency, the agent in a memory cgroup of
//! its own), pods behind veths (some with extra addresses, each address a pod to the agent), and
//! measures:
//!
//! 1. [`connect`]: the cost of `connect()` from a pod: direct to the agent, rewritten by our
//!    connect4, DNATed by kube2iam's iptables rule, and a non-metadata connect with our programs
//!    in the path; conntrack on (the headline) and off;
//! 2. [`get`]: credential requests end to end: the SDK's IMDSv2 fetch, a GET per new connection,
//!    keep-alive, closed-loop throughput and open-loop load at fixed rates, against a bare hyper
//!    server (the floor) and the DNAT rule, with the server's CPU time per request; then
//!    (2b, [`attest`]) what kernel-attested identity costs per connect (the record on and off
//!    in one agent) and per request (`--identity-attestation require` against `off`);
//! 3. [`cost`]: iperf3 through a pod interface with the packet guard and without;
//! 4. [`sts`]: STS over TLS at 50–300 ms: the herd, prefetch, and a node drain;
//! 5. [`scale`]: the agent's memory (RSS, smaps, its cgroup, the BPF maps) and latency with 0,
//!    110, 250 and 737 pods on its node;
//! 6. [`restart`]: kill -9 and restart under load, through the adopt and the upgrade path.
//!
//! Comparisons alternate their variants round by round in the same run; every ratio carries a
//! bootstrap interval ([`stats::Interval`]). [`report`] turns the results into the tables
//! printed and written to BENCHMARKS.md. The load comes from wrk, iperf3 and
//! `k2i-bench-client` ([`client`]) where no ready-made tool fits (open-loop load, the SDK's
//! fetch, the herd).

pub mod attest;
pub mod client;
pub mod connect;
pub mod cost;
pub mod get;
pub mod report;
pub mod restart;
pub mod runner;
pub mod scale;
pub mod stats;
pub mod sts;
pub mod topology;
pub mod world;

use std::path::{Path, PathBuf};

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so the runner
/// and the clients in pods can compare times.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `k2i-bench-client` binary: `$K2I_BENCH_CLIENT_BIN`, else next to the running binary.
pub fn client_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("K2I_BENCH_CLIENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the path of the running binary");
    let dir = exe.parent().unwrap_or(Path::new("."));
    let path = dir.join("k2i-bench-client");
    assert!(
        path.is_file(),
        "{} is missing; build it with cargo build --release -p kube2iam-tests --bin \
         k2i-bench-client (cargo xtask bench does)",
        path.display()
    );
    path
}
