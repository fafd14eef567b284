//! The guard rows of the kernel matrix: the tc packet guard goes (and stays) in front of a
//! classifier that passes every packet on, as Cilium's does (TCX from 6.6, cls_bpf filters
//! before); and the egress backstop, on the cgroup2 root beside the connect hooks, drops what a
//! pod's sockets send to the metadata address when the tc guard is off, while the node itself
//! still reaches it.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    thread,
    time::Duration,
};

use kube2iam_common::{Counter, programs};
use kube2iam_tests::{
    METADATA_IP4, bpf, maps, metadata_addr4, metadata_addr6,
    packets::{PacketWatch, WATCH_PORT},
    process::output_within,
};

use crate::{
    report::{Outcome, Tally},
    suite::{Kernel, PIN_DIR},
    topology::{Node, POD_IP4, POD_IP6, assert_redirected},
    vmagent::{self, VmAgent},
};

const RAW: &str = "/bin/k2i-raw";
const HOST_INTERFACE: &str = "k2i-h-a";
const FOREIGN: &str = "k2i_test_ok";

fn ifindex() -> u32 {
    let name = CString::new(HOST_INTERFACE).expect("no NUL");
    // SAFETY: a valid NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {HOST_INTERFACE}");
    index
}

/// A classifier returning TC_ACT_OK put at the head of the pod interface's ingress hook: a
/// TCX link (kept open here) from 6.6, a cls_bpf filter at priority 1 before. `handle` tells
/// filters apart.
fn foreign_first(tcx: bool, handle: u32) -> Option<OwnedFd> {
    let prog = load_foreign();
    if tcx {
        let link = bpf::tcx_attach_first(prog.as_fd(), ifindex())
            .unwrap_or_else(|e| panic!("attach the foreign classifier with TCX: {e}"));
        return Some(link);
    }
    bpf::tc_filter_add(ifindex(), 1, handle, prog.as_fd(), FOREIGN)
        .unwrap_or_else(|e| panic!("add the foreign cls_bpf filter: {e}"));
    None
}

/// Sends a raw SYN and UDP datagrams (IPv4, IPv6) from the pod to the metadata addresses.
fn send_raw(node: &Node) {
    let port = WATCH_PORT.to_string();
    let src = POD_IP4.to_string();
    let runs: [Vec<&str>; 3] = [
        vec!["syn", &src, "169.254.169.254", &port],
        vec!["udp", "169.254.169.254", &port],
        vec!["udp", "fd00:ec2::254", &port],
    ];
    for args in runs {
        let output = output_within(
            node.pod_command(RAW).args(&args),
            Duration::from_secs(20),
            "k2i-raw",
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("\"ok\":true") || stdout.contains("Operation not permitted"),
            "k2i-raw {args:?}: {stdout}"
        );
    }
    thread::sleep(Duration::from_millis(500));
}

fn seen_from_pod(watch: &PacketWatch) -> Vec<&'static str> {
    watch
        .seen_from(IpAddr::V4(POD_IP4))
        .into_iter()
        .chain(watch.seen_from(IpAddr::V6(POD_IP6)))
        .map(|s| s.kind)
        .collect()
}

fn stop(agent: &mut Option<VmAgent>) {
    if let Some(mut old) = agent.take() {
        let status = old.terminate().unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "the agent should exit 0 on SIGTERM");
    }
}

/// What the agent logs when it puts the guard back in front.
const REPAIRED: &str = "packet guard put back in front";

/// Loads the TC_ACT_OK classifier. Before 5.11 programs are charged to RLIMIT_MEMLOCK (64 KiB
/// by default): the limit is lifted for the load only, since the agents this init starts later
/// inherit it and the capability rows measure whether they can lift it themselves.
fn load_foreign() -> OwnedFd {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: getrlimit writes, setrlimit reads the structs; init runs as root.
    let saved = unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) == 0
            && libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0
    };
    let prog = bpf::load_tc_ok(FOREIGN);
    if saved {
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &old) };
    }
    prog
}

/// Both guard rows; `agent` is the running agent before and after.
pub fn rows(tally: &mut Tally, kernel: Kernel, node: &Node, agent: &mut Option<VmAgent>) {
    let tcx = kernel >= Kernel(6, 6);
    let mode = if tcx { "TCX" } else { "cls_bpf" };
    tally.run(
        "packet guard goes and stays in front of a classifier that returns OK",
        || {
            stop(agent);
            let watch = PacketWatch::start_in(Path::new("/proc/self/ns/net"));
            let _first = foreign_first(tcx, 1);
            let started = VmAgent::start(
                &[
                    "--host-interface",
                    "k2i-h-+",
                    "--egress-guard",
                    "false",
                    "--guard-resync-interval",
                    "1s",
                ],
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            send_raw(node);
            let before = seen_from_pod(&watch);
            // Someone attaches in front again (a CNI restarting): the agent must overtake it. The
            // start-up sync already logged one repair; wait for the next.
            let repairs = started.count(REPAIRED);
            let _second = foreign_first(tcx, 2);
            started
                .wait_for_more(REPAIRED, repairs, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            send_raw(node);
            let after = seen_from_pod(&watch);
            let (code, _, table) = vmagent::doctor_with(&["--host-interface", "k2i-h-+"], None);
            *agent = Some(started);
            assert!(
                before.is_empty(),
                "{mode}: packets passed a classifier attached before the guard: {before:?}"
            );
            assert!(
                after.is_empty(),
                "{mode}: packets passed a classifier attached in front later: {after:?}"
            );
            assert_eq!(code, Some(0), "{table}");
            assert!(
                table.contains("first on all 1 matching"),
                "the doctor's packet guard row:\n{table}"
            );
            assert!(
                table.contains("first on all 2 other"),
                "the doctor's node guard row (k2i-n0, k2i-n1):\n{table}"
            );
            Outcome::Pass(format!(
                "{mode}: the guard runs ahead of a TC_ACT_OK classifier attached first, and is \
                 put back in front when another goes ahead; the node guard is first on the \
                 other interfaces"
            ))
        },
    );
    tally.run(
        "egress backstop drops pod packets to the metadata address with the packet guard off",
        || {
            stop(agent);
            // Start clean: the tc guard from the row before must not be what drops.
            let output = vmagent::agent_command(&["uninstall"], None, Duration::from_secs(60));
            assert!(output.status.success(), "uninstall before the row failed");
            let started =
                VmAgent::start(&["--packet-guard", "false", "--node-guard", "false"], None)
                    .unwrap_or_else(|e| panic!("{e}"));
            let link = Path::new(PIN_DIR).join("links").join(programs::EGRESS);
            let info = bpf::pinned_link_info(&link);
            let root = bpf::open_cgroup(Path::new("/sys/fs/cgroup"));
            let attached = bpf::prog_query(root.as_fd(), bpf::AttachType::InetEgress)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY egress: {e}"));
            let watch = PacketWatch::start_in(Path::new("/proc/self/ns/net"));
            send_raw(node);
            // A TCP connect to another port of the metadata address is not rewritten; its SYN
            // must not get there either.
            let other_port = SocketAddr::new(IpAddr::V4(METADATA_IP4), WATCH_PORT);
            let tcp = node.pod_probe(other_port, &[]);
            thread::sleep(Duration::from_millis(500));
            let seen = seen_from_pod(&watch);
            let counted4 = maps::counter(Path::new(PIN_DIR), Counter::EgressDropped4);
            let counted6 = maps::counter(Path::new(PIN_DIR), Counter::EgressDropped6);
            // The node's own sockets, in the same (root) cgroup, still get through, and the
            // pod's ordinary connect still goes to the agent.
            let host4 = node.host_probe(metadata_addr4());
            let host6 = node.host_probe(metadata_addr6());
            let pod = node.pod_probe(metadata_addr4(), &[]);
            *agent = Some(started);
            assert!(
                attached.contains(&info.prog_id),
                "k2i_egress is not attached at the cgroup2 root: {attached:?}"
            );
            assert!(
                seen.is_empty(),
                "pod packets reached the metadata address: {seen:?}"
            );
            assert!(
                !tcp.ok,
                "the TCP connect to port {WATCH_PORT} must fail: {tcp:?}"
            );
            assert!(counted4 >= 3, "IPv4 drops counted: {counted4}");
            assert!(counted6 >= 1, "IPv6 drops counted: {counted6}");
            for host in [&host4, &host6] {
                assert!(
                    host.ok && host.reached_imds_stub(),
                    "the node must still reach its metadata service: {host:?}"
                );
            }
            assert_redirected(&pod, IpAddr::V4(POD_IP4), "pod connect with the backstop");
            node.assert_no_leak();
            Outcome::Pass(format!(
                "raw SYN, UDP, IPv6 UDP and a TCP SYN to port {WATCH_PORT} dropped ({counted4} \
                 IPv4, {counted6} IPv6); the node reaches the metadata service"
            ))
        },
    );
}
