//! The tests run inside the VM, with the production defaults: the agent attaches at the VM's
//! cgroup2 root and pins under /sys/fs/bpf/kube2iam. The v1 suite boots with a cgroup-v1 layout
//! (no cgroup2, no bpffs mounted), where the agent mounts both itself.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use kube2iam_tests::{
    bpf::{self, AttachType},
    metadata_addr_mapped, metadata_addr4, metadata_addr6,
    process::enter_netns_on_this_thread,
};
use serde_json::json;

use crate::{
    report::{Outcome, Tally, emit},
    topology::{self, Node, POD_IP4, POD_IP6, assert_redirected},
    vmagent::{self, VmAgent},
};

pub const PIN_DIR: &str = "/sys/fs/bpf/kube2iam";
pub const OWN_CGROUP2: &str = "/run/kube2iam/cgroup2";

/// The kernel the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Kernel(pub u32, pub u32);

impl Kernel {
    pub fn current() -> (Kernel, String) {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let kernel = Kernel(parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (kernel, release)
    }

    /// getpeername4/6 hooks.
    pub fn has_getpeername(self) -> bool {
        self >= Kernel(5, 8)
    }
}

/// What the host wants in its row besides the tests.
#[derive(Default)]
pub struct Findings {
    pub skipped_hooks: Vec<String>,
}

fn link_path(name: &str) -> PathBuf {
    Path::new(PIN_DIR).join("links").join(name)
}

const HOOK_LINKS: [(&str, AttachType); 6] = [
    ("k2i_connect4", AttachType::Inet4Connect),
    ("k2i_connect6", AttachType::Inet6Connect),
    ("k2i_getpeername4", AttachType::Inet4GetPeerName),
    ("k2i_getpeername6", AttachType::Inet6GetPeerName),
    // The attestation hook.
    ("k2i_sock_ops", AttachType::CgroupSockOps),
    ("k2i_egress", AttachType::InetEgress),
];

/// The link ids of the pinned links that exist.
fn link_ids() -> Vec<(String, u32)> {
    HOOK_LINKS
        .iter()
        .filter(|(name, _)| link_path(name).exists())
        .map(|(name, _)| {
            (
                (*name).to_owned(),
                bpf::pinned_link_info(&link_path(name)).id,
            )
        })
        .collect()
}

/// The programs the agent skipped, from its `skipped:` log lines.
fn skipped_hooks(agent: &VmAgent) -> Vec<String> {
    agent
        .lines()
        .iter()
        .filter(|l| l.contains("skipped:"))
        .filter_map(|l| {
            let start = l.find("program=\"")? + "program=\"".len();
            let end = l[start..].find('"')? + start;
            Some(l[start..end].to_owned())
        })
        .collect()
}

/// Asserts the agent attached at `cgroup` with pins under PIN_DIR; returns a description.
fn assert_attached_at(cgroup: &Path, kernel: Kernel) -> String {
    let cgroup_id = fs::metadata(cgroup)
        .unwrap_or_else(|e| panic!("stat {}: {e}", cgroup.display()))
        .ino();
    let cgroup_fd = bpf::open_cgroup(cgroup);
    let mut attached = Vec::new();
    for (name, attach) in HOOK_LINKS {
        let path = link_path(name);
        let optional = matches!(
            attach,
            AttachType::Inet4GetPeerName | AttachType::Inet6GetPeerName
        );
        if optional && !kernel.has_getpeername() {
            assert!(!path.exists(), "{name} needs Linux 5.8 but was pinned");
            continue;
        }
        let info = bpf::pinned_link_info(&path);
        assert_eq!(
            info.cgroup_id,
            cgroup_id,
            "{name} should be attached at {} (cgroup id {cgroup_id}), link says cgroup id {}",
            cgroup.display(),
            info.cgroup_id
        );
        let ids = bpf::prog_query(cgroup_fd.as_fd(), attach)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {attach:?}: {e}"));
        assert!(
            ids.contains(&info.prog_id),
            "{name}: program {} is not attached at {}: {ids:?}",
            info.prog_id,
            cgroup.display()
        );
        attached.push(format!("{name}=link {}", info.id));
    }
    for map in [
        "K2I_CONFIG",
        "K2I_COUNTERS",
        "K2I_REVNAT",
        "K2I_CONNECTING",
        "K2I_ATTEST",
        "K2I_HOST_PODS",
    ] {
        assert!(
            Path::new(PIN_DIR).join(map).exists(),
            "map {map} is not pinned under {PIN_DIR}"
        );
    }
    format!(
        "{} (cgroup id {cgroup_id}): {}",
        cgroup.display(),
        attached.join(", ")
    )
}

fn assert_nothing_attached(cgroup: &Path) {
    let cgroup_fd = bpf::open_cgroup(cgroup);
    for (name, attach) in HOOK_LINKS {
        let ids = bpf::prog_query(cgroup_fd.as_fd(), attach)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {attach:?}: {e}"));
        assert!(
            ids.is_empty(),
            "after uninstall nothing may stay attached at {} for {name}: {ids:?}",
            cgroup.display()
        );
    }
}

fn run_doctor(tally: &mut Tally, name: &str, expect: impl Fn(&str) + 'static) -> Option<String> {
    let mut summary = None;
    tally.run(name, || {
        let (code, line, table) = vmagent::doctor(None);
        summary = Some(line.clone());
        assert_eq!(
            code,
            Some(0),
            "the doctor says the agent cannot run:\n{table}"
        );
        expect(&table);
        Outcome::Pass(line)
    });
    summary
}

fn doctor_row<'a>(table: &'a str, check: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(check) && l[check.len()..].starts_with("  "))
}

/// A check's row with its continuation lines, joined.
fn doctor_full_row(table: &str, check: &str) -> String {
    let mut lines = table
        .lines()
        .skip_while(|l| !(l.starts_with(check) && l[check.len()..].starts_with("  ")));
    let mut row = lines.next().unwrap_or("").to_owned();
    for more in lines.take_while(|l| l.starts_with(' ')) {
        row.push(' ');
        row.push_str(more.trim());
    }
    row
}

/// The production-defaults suite (cgroup2 at /sys/fs/cgroup, bpffs at /sys/fs/bpf).
pub fn production(tally: &mut Tally, kernel: Kernel) -> Option<Node> {
    let mut node = None;
    tally.run("node and pod network", || {
        node = Some(topology::build());
        Outcome::Pass(
            "lo: 169.254.169.254, fd00:ec2::254, 192.0.2.10; pod 198.51.100.2 behind a veth".into(),
        )
    });
    let node = node?;
    let doctor = run_doctor(tally, "doctor before install", |table| {
        let row = doctor_row(table, "pinned state").unwrap_or("");
        assert!(
            row.contains("nothing at"),
            "fresh VM, nothing pinned: {row}"
        );
    });
    emit(json!({"event": "doctor", "summary": doctor}));

    let cgroup = PathBuf::from("/sys/fs/cgroup");
    let mut agent: Option<VmAgent> = None;
    let mut findings = Findings::default();
    tally.run(
        "agent attaches at the cgroup2 root and pins in /sys/fs/bpf",
        || {
            let started = VmAgent::start(&[], None).unwrap_or_else(|e| panic!("{e}"));
            findings.skipped_hooks = skipped_hooks(&started);
            let what = assert_attached_at(&cgroup, kernel);
            agent = Some(started);
            Outcome::Pass(what)
        },
    );
    emit(json!({"event": "hooks", "skipped": findings.skipped_hooks}));

    tally.run("pod connect to 169.254.169.254 goes to the agent", || {
        let result = node.pod_probe(metadata_addr4(), &[]);
        assert_redirected(&result, IpAddr::V4(POD_IP4), "169.254.169.254:80");
        assert!(node.agent_stub.saw(IpAddr::V4(POD_IP4)));
        node.assert_no_leak();
        Outcome::Pass(format!("peer seen by the agent: {POD_IP4}"))
    });
    tally.run("host netns connect is not rewritten", || {
        let result = node.host_probe(metadata_addr4());
        assert!(
            result.ok && result.reached_imds_stub(),
            "the node itself must reach the metadata service: {result:?}"
        );
        Outcome::Pass("reached the metadata service directly".into())
    });
    tally.run("pod connect to [fd00:ec2::254] goes to the agent", || {
        let result = node.pod_probe(metadata_addr6(), &[]);
        assert_redirected(&result, IpAddr::V6(POD_IP6), "[fd00:ec2::254]:80");
        node.assert_no_leak();
        Outcome::Pass(format!("peer seen by the agent: {POD_IP6}"))
    });
    tally.run(
        "dual-stack connect to ::ffff:169.254.169.254 goes to the agent",
        || {
            let result = node.pod_probe(metadata_addr_mapped(), &["--socket", "inet6"]);
            assert_redirected(&result, IpAddr::V4(POD_IP4), "[::ffff:169.254.169.254]:80");
            node.assert_no_leak();
            Outcome::Pass("AF_INET6 socket, IPv4-mapped address".into())
        },
    );
    tally.run("getpeername reports the metadata address", || {
        if !kernel.has_getpeername() {
            println!("getpeername hooks need Linux 5.8; skipped on {kernel:?}");
            return Outcome::Skip("getpeername hooks need Linux 5.8".into());
        }
        let cases: [(SocketAddr, &[&str], &str); 3] = [
            (metadata_addr4(), &[], "169.254.169.254:80"),
            (metadata_addr6(), &[], "[fd00:ec2::254]:80"),
            (
                metadata_addr_mapped(),
                &["--socket", "inet6"],
                "[::ffff:169.254.169.254]:80",
            ),
        ];
        for (addr, extra, peer) in cases {
            let result = node.pod_probe(addr, extra);
            assert!(result.reached_agent_stub(), "{addr}: {result:?}");
            assert_eq!(result.peer.as_deref(), Some(peer), "{addr}: {result:?}");
        }
        node.assert_no_leak();
        Outcome::Pass("IPv4, IPv6 and mapped sockets report the address they asked for".into())
    });
    let mut attestation = None;
    tally.run(
        "attestation names the pod's cgroup and netns (cgroup2 layout)",
        || {
            let summary = crate::attest::cgroup2(&node);
            attestation = Some(summary.clone());
            node.assert_no_leak();
            Outcome::Pass(summary)
        },
    );
    emit(json!({
        "event": "attestation",
        "result": if attestation.is_some() { "pod cgroup" } else { "FAIL" },
    }));
    tally.run("doctor sees the installed agent", || {
        let (code, line, table) = vmagent::doctor(None);
        assert_eq!(code, Some(0), "{table}");
        let mut row = String::new();
        let mut lines = table.lines().skip_while(|l| !l.starts_with("pinned state"));
        if let Some(first) = lines.next() {
            row.push_str(first);
            for more in lines.take_while(|l| l.starts_with(' ')) {
                row.push(' ');
                row.push_str(more.trim());
            }
        }
        assert!(row.contains("adopts them"), "pinned state row: {row}");
        assert!(row.contains("config enabled"), "pinned state row: {row}");
        Outcome::Pass(line)
    });
    tally.run("restart with pinned links leaves no gap", || {
        let mut old = agent.take().expect("the agent from the install test");
        let before = link_ids();
        let hammer = Hammer::start();
        // Let the hammer get going, then take the agent away and bring a new one.
        thread::sleep(Duration::from_millis(500));
        let killed_at = Instant::now();
        old.kill9();
        let new = VmAgent::start(&[], None).unwrap_or_else(|e| panic!("{e}"));
        let ready_at = Instant::now();
        thread::sleep(Duration::from_millis(500));
        let stats = hammer.stop();
        let after = link_ids();
        let adopted = new.lines().iter().filter(|l| l.contains("Adopted")).count();
        agent = Some(new);
        let during = stats.within(killed_at, ready_at);
        assert!(
            stats.imds == 0 && stats.errors.is_empty(),
            "interception lapsed during the restart: {stats:?}"
        );
        assert!(during > 0, "no connect happened while the agent was down: {stats:?}");
        assert_eq!(before, after, "the restarted agent must adopt the pinned links");
        assert_eq!(adopted, before.len(), "every hook should be adopted:\n{}", agent.as_ref().map(|a| a.log()).unwrap_or_default());
        node.assert_no_leak();
        Outcome::Pass(format!(
            "{} connects, {during} while no agent ran ({:.1}s), all reached the agent; links {:?} adopted",
            stats.total,
            (ready_at - killed_at).as_secs_f64(),
            after.iter().map(|(_, id)| *id).collect::<Vec<_>>()
        ))
    });
    crate::guard::rows(tally, kernel, &node, &mut agent);
    tally.run("uninstall detaches and unpins everything", || {
        if let Some(mut agent) = agent.take() {
            let status = agent.terminate().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                status.success(),
                "the agent should exit 0 on SIGTERM: {status}"
            );
        }
        let output = vmagent::agent_command(&["uninstall"], None, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "uninstall failed ({}): {stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !Path::new(PIN_DIR).exists(),
            "{PIN_DIR} should be gone: {stdout}"
        );
        assert_nothing_attached(&cgroup);
        let result = node.pod_probe(metadata_addr4(), &[]);
        assert!(
            result.reached_imds_stub(),
            "with nothing attached the pod reaches the metadata service again: {result:?}"
        );
        Outcome::Pass(format!("{} objects removed", stdout.lines().count()))
    });
    Some(node)
}

/// The cgroup-v1 layout suite: no cgroup2 and no bpffs mounted. Later the pod moves into a
/// net_cls,net_prio cgroup with a class id, as a container runtime on cgroup v1 does; kernels
/// before 5.14 then stop matching sockets to cgroup2 descendants (every socket counts as the
/// root's).
pub fn legacy(tally: &mut Tally, kernel: Kernel, net_cls: Option<PathBuf>) {
    let mut node = None;
    tally.run("node and pod network", || {
        node = Some(topology::build());
        Outcome::Pass("lo: 169.254.169.254, 192.0.2.10; pod 198.51.100.2 behind a veth".into())
    });
    let Some(mut node) = node else { return };
    let doctor = run_doctor(tally, "doctor on the cgroup-v1 layout", |table| {
        let row = doctor_row(table, "cgroup2").unwrap_or("");
        assert!(row.contains("not mounted; mountable"), "cgroup2 row: {row}");
        let row = doctor_full_row(table, "attestation");
        assert!(
            row.contains("WARN") && row.contains("prefer") && row.contains("require"),
            "the attestation row names the fallback: {row}"
        );
    });
    emit(json!({"event": "doctor", "summary": doctor}));

    let mut agent = None;
    let mut findings = Findings::default();
    tally.run(
        "agent mounts cgroup2 and bpffs itself and attaches there",
        || {
            let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
            assert!(
                !mounts
                    .lines()
                    .any(|l| l.split_whitespace().nth(2) == Some("cgroup2")),
                "the v1 layout must not have cgroup2 mounted before the agent:\n{mounts}"
            );
            let started = VmAgent::start(&[], None).unwrap_or_else(|e| panic!("{e}"));
            findings.skipped_hooks = skipped_hooks(&started);
            let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
            let has = |target: &str, fstype: &str| {
                mounts.lines().any(|l| {
                    let mut f = l.split_whitespace();
                    (f.nth(1), f.next()) == (Some(target), Some(fstype))
                })
            };
            assert!(
                has(OWN_CGROUP2, "cgroup2"),
                "no cgroup2 at {OWN_CGROUP2}:\n{mounts}"
            );
            assert!(
                has("/sys/fs/bpf", "bpf"),
                "no bpffs at /sys/fs/bpf:\n{mounts}"
            );
            let what = assert_attached_at(Path::new(OWN_CGROUP2), kernel);
            agent = Some(started);
            Outcome::Pass(what)
        },
    );
    emit(json!({"event": "hooks", "skipped": findings.skipped_hooks}));
    tally.run("pod connect goes to the agent", || {
        let result = node.pod_probe(metadata_addr4(), &[]);
        assert_redirected(&result, IpAddr::V4(POD_IP4), "169.254.169.254:80");
        let result = node.pod_probe(metadata_addr_mapped(), &["--socket", "inet6"]);
        assert_redirected(&result, IpAddr::V4(POD_IP4), "[::ffff:169.254.169.254]:80");
        node.assert_no_leak();
        Outcome::Pass("IPv4 and IPv4-mapped".into())
    });
    tally.run("host netns connect is not rewritten", || {
        let result = node.host_probe(metadata_addr4());
        assert!(result.ok && result.reached_imds_stub(), "{result:?}");
        Outcome::Pass("reached the metadata service directly".into())
    });
    let mut attestation = None;
    tally.run(
        "attestation on the cgroup-v1 layout names the cgroup2 root",
        || {
            let summary = crate::attest::cgroup_v1(&node, Path::new(OWN_CGROUP2));
            attestation = Some(summary.clone());
            node.assert_no_leak();
            Outcome::Pass(summary)
        },
    );
    emit(json!({
        "event": "attestation",
        "result": if attestation.is_some() { "cgroup2 root" } else { "FAIL" },
    }));
    tally.run(
        "pod in a net_cls cgroup with a class id still goes to the agent",
        || {
            let cgroup = net_cls
                .clone()
                .expect("the v1 layout has a net_cls,net_prio hierarchy");
            fs::write(cgroup.join("net_cls.classid"), "0x100001")
                .unwrap_or_else(|e| panic!("write net_cls.classid: {e}"));
            node.pod_cgroup = Some(cgroup);
            let result = node.pod_probe(metadata_addr4(), &[]);
            assert_redirected(
                &result,
                IpAddr::V4(POD_IP4),
                "169.254.169.254:80 from net_cls",
            );
            node.assert_no_leak();
            Outcome::Pass(
                if crate::dmesg().contains("disabling cgroup2 socket matching") {
                    "the kernel disabled cgroup2 socket matching; the root attachment still applies"
                        .into()
                } else {
                    "cgroup2 socket matching stayed on beside net_cls".into()
                },
            )
        },
    );
    tally.run("doctor sees what net_cls activation means here", || {
        let (code, line, table) = vmagent::doctor(None);
        let row = doctor_row(&table, "socket matching")
            .unwrap_or("")
            .to_owned();
        if kernel < Kernel(5, 14) {
            assert_eq!(code, Some(1), "the agent cannot start here now:\n{table}");
            assert!(row.contains("FAIL"), "socket matching row: {row}\n{table}");
        } else {
            assert_eq!(code, Some(0), "{table}");
        }
        Outcome::Pass(line)
    });
    let restart = || {
        if let Some(mut old) = agent.take() {
            old.kill9();
        }
        let started = VmAgent::start(&[], None).unwrap_or_else(|e| panic!("{e}"));
        let result = node.pod_probe(metadata_addr4(), &[]);
        agent = Some(started);
        assert_redirected(&result, IpAddr::V4(POD_IP4), "after the restart");
        node.assert_no_leak();
        Outcome::Pass("the restarted agent learned the host cookie and adopted the links".into())
    };
    let name = "agent restarts after net_cls activation";
    if kernel < Kernel(5, 14) {
        // Without SO_NETNS_COOKIE the agent learns the host cookie with a probe program on a
        // child cgroup; with cgroup2 socket matching off, that program never runs.
        tally.run_known_failure(
            name,
            "kernels before 5.14 lack SO_NETNS_COOKIE, and the agent's probe program on a child \
             cgroup sees nothing once net_cls/net_prio turned cgroup2 socket matching off",
            restart,
        );
    } else {
        tally.run(name, restart);
    }
    tally.run("uninstall detaches and unpins everything", || {
        if let Some(mut agent) = agent.take() {
            let status = agent.terminate().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                status.success(),
                "the agent should exit 0 on SIGTERM: {status}"
            );
        }
        let output = vmagent::agent_command(&["uninstall"], None, Duration::from_secs(60));
        assert!(
            output.status.success(),
            "uninstall failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!Path::new(PIN_DIR).exists());
        assert_nothing_attached(Path::new(OWN_CGROUP2));
        Outcome::Pass("nothing attached at /run/kube2iam/cgroup2".into())
    });
}

/// A pod thread that connects to the metadata address over and over (bounded in count and
/// time) and sorts the answers: the agent stand-in, the real metadata service (a leak), or an
/// error (refused: interception or agent missing).
struct Hammer {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<HammerStats>,
}

#[derive(Debug, Default)]
struct HammerStats {
    total: usize,
    agent: usize,
    imds: usize,
    errors: Vec<String>,
    /// When each connect that reached the agent finished.
    answered_at: Vec<Instant>,
}

impl HammerStats {
    fn within(&self, from: Instant, to: Instant) -> usize {
        self.answered_at
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .count()
    }
}

const HAMMER_MAX: usize = 20_000;
const HAMMER_TIME: Duration = Duration::from_secs(150);

impl Hammer {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut stats = HammerStats::default();
            if let Err(e) = enter_netns_on_this_thread(&topology::pod_netns()) {
                stats.errors.push(format!("setns into the pod: {e}"));
                return stats;
            }
            let deadline = Instant::now() + HAMMER_TIME;
            while !flag.load(Ordering::SeqCst)
                && stats.total < HAMMER_MAX
                && Instant::now() < deadline
            {
                stats.total += 1;
                match one_request() {
                    Ok(body) if body.contains("agent-stub") => {
                        stats.agent += 1;
                        stats.answered_at.push(Instant::now());
                    }
                    Ok(body) if body.contains("imds-stub") => stats.imds += 1,
                    Ok(body) => stats.errors.push(format!("unexpected answer {body:?}")),
                    Err(e) => {
                        if stats.errors.len() < 20 {
                            stats.errors.push(e.to_string());
                        }
                    }
                }
            }
            stats
        });
        Self { stop, thread }
    }

    fn stop(self) -> HammerStats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_else(|_| HammerStats {
            errors: vec!["the hammer thread panicked".into()],
            ..HammerStats::default()
        })
    }
}

fn one_request() -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&metadata_addr4(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /latest/meta-data/ HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}
