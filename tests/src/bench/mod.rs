//! `cargo xtask bench`: the benchmarks of issue 6, run inside a test node.
//!
//! [`runner`] builds one test node with the real agent and the emulators (the kit's
//! [`World`](crate::e2e::World)), pods behind veths (some with extra addresses, each address a
//! pod to the agent), and measures:
//!
//! 1. the cost of `connect()` from a pod: direct to the agent, rewritten by our connect4, and
//!    DNATed by kube2iam's iptables rule;
//! 2. a credential GET end to end, per new connection and over keep-alive, for the eBPF redirect,
//!    the DNAT rule and a bare hyper server (the floor);
//! 3. the STS herd (1,000 concurrent requests for one cold role) and prefetch (pods asking
//!    100 ms after they appear);
//! 4. the agent's peak RSS with 110 pods on its node, and with 5,000 in the cluster;
//! 5. kill -9 and restart under load: whether any pod request reached anything but the agent,
//!    and how soon the new process serves.
//!
//! Comparisons alternate their variants round by round in the same run. [`report`] turns the
//! results into the table printed and written to BENCHMARKS.md. The load comes from wrk and
//! from `k2i-bench-client` ([`client`]) where no ready-made tool fits.

pub mod client;
pub mod report;
pub mod runner;
pub mod stats;
pub mod topology;

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
