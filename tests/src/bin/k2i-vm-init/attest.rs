//! Kernel attestation in the VM: the record the programs keep for a redirected connection names
//! the connecting task's cgroup v2 and its netns. With the cgroup2 layout a pod process in a
//! kubelet-like cgroup is named by that cgroup, and a hostNetwork pod listed in the host-pods
//! map (found through its ancestors) too; on the cgroup-v1 layout pods are in no cgroup v2, so
//! the record names the root of the agent's own cgroup2 mount, and the agent falls back as
//! documented (`--identity-attestation prefer` serves by address, `require` refuses).

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use kube2iam_common::{Attestation, FLAG_HOST_PODS};
use kube2iam_tests::{
    HOST_IP4, maps, metadata_addr4,
    probe::{self, HeldProbe},
    process::{netns_cookie, place},
};

use crate::{
    suite::PIN_DIR,
    topology::{self, AGENT_PORT, Node, POD_IP4, assert_redirected},
};

/// The pod UIDs of the kubelet-like cgroups made here.
const POD_UID: &str = "0f6e5d4c-3b2a-4190-8877-665544332211";
const HOST_POD_UID: &str = "7a8b9c0d-1e2f-4a3b-9c4d-5e6f7a8b9c0d";
/// A TCG VM is slow; nothing here should take this long.
const WAIT: Duration = Duration::from_secs(60);

fn agent_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(HOST_IP4), AGENT_PORT)
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// A pod cgroup and its container cgroup as kubelet's systemd driver lays them out below `root`.
fn systemd_layout(root: &Path, qos: &str, uid: &str, container: &str) -> (PathBuf, PathBuf) {
    let pod = root
        .join("kubepods.slice")
        .join(format!("kubepods-{qos}.slice"))
        .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")));
    let container = pod.join(format!("cri-containerd-{container}.scope"));
    fs::create_dir_all(&container)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", container.display()));
    (pod, container)
}

/// Removes `leaf` and its parents up to (not including) `root`, deepest first.
fn remove_up_to(root: &Path, leaf: &Path) {
    let mut dir = Some(leaf);
    while let Some(d) = dir.filter(|d| *d != root && d.starts_with(root)) {
        let _ = fs::remove_dir(d);
        dir = d.parent();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what} (waited {WAIT:?})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redirected connect by `command` (a placed `k2i-probe`), held open: the kernel's record for
/// exactly that connection. The probe then finishes (answered by the agent stand-in, which sees
/// `source`) and the record must go with the connection.
fn held_record(node: &Node, command: Command, source: IpAddr) -> Attestation {
    let pin = Path::new(PIN_DIR);
    let held = HeldProbe::start(command, &["--addr", &metadata_addr4().to_string()]);
    let client = held.local;
    assert_eq!(client.ip(), source, "the probe's own address");
    wait_until(
        &format!("the agent stand-in never accepted {client}"),
        || node.agent_stub.peers().contains(&client),
    );
    let record = maps::attestation(pin, client, agent_addr()).unwrap_or_else(|| {
        panic!(
            "no record for {client} → {}; the map holds {:?}",
            agent_addr(),
            maps::attestations(pin)
        )
    });
    let result = held.finish();
    assert_redirected(&result, source, "the held connect");
    wait_until(
        &format!("the record for {client} outlived its connection"),
        || maps::attestation(pin, client, agent_addr()).is_none(),
    );
    record
}

/// cgroup2 layout: a pod process in a kubelet-like container cgroup, and a hostNetwork pod's
/// process listed through its pod cgroup. Returns the row's summary.
pub fn cgroup2(node: &Node) -> String {
    let root = Path::new("/sys/fs/cgroup");
    let pin = Path::new(PIN_DIR);
    let config = maps::read_config(pin).expect("the agent wrote its config");

    let (pod, container) = systemd_layout(root, "burstable", POD_UID, "app");
    let mut command = Command::new(topology::PROBE);
    place(&mut command, Some(&container), Some(&topology::pod_netns()));
    let pod_record = held_record(node, command, IpAddr::V4(POD_IP4));
    assert_eq!(
        pod_record.cgroup_id,
        inode(&container),
        "the record names the container cgroup {} (pod cgroup {} is {})",
        container.display(),
        pod.display(),
        inode(&pod)
    );
    assert_ne!(
        pod_record.netns_cookie, config.host_netns_cookie,
        "the pod's socket is not in the host namespace"
    );
    let netns = match netns_cookie(&topology::pod_netns()) {
        Ok(cookie) => {
            assert_eq!(pod_record.netns_cookie, cookie, "the pod's netns cookie");
            "the pod's netns cookie"
        }
        // Linux < 5.14 has no SO_NETNS_COOKIE to compare with.
        Err(_) => "a netns cookie other than the host's",
    };

    // Not through the redirect: no record.
    let direct = HeldProbe::start(
        node.pod_command(topology::PROBE),
        &["--addr", &agent_addr().to_string()],
    );
    let client = direct.local;
    wait_until(
        &format!("the agent stand-in never accepted {client}"),
        || node.agent_stub.peers().contains(&client),
    );
    assert_eq!(
        maps::attestation(pin, client, agent_addr()),
        None,
        "a direct connect to the agent's address has no record"
    );
    let result = direct.finish();
    assert!(result.reached_agent_stub(), "{result:?}");

    // A hostNetwork pod: its process is in the host namespace; the programs find its pod cgroup
    // among the task's ancestors (bpf_get_current_ancestor_cgroup_id) once it is listed.
    let (host_pod, host_container) = systemd_layout(root, "besteffort", HOST_POD_UID, "exporter");
    let host_probe = || {
        let mut command = Command::new(topology::PROBE);
        place(&mut command, Some(&host_container), None);
        command
    };
    let unlisted = probe::run(host_probe(), &["--addr", &metadata_addr4().to_string()]);
    assert!(
        unlisted.reached_imds_stub(),
        "an unlisted host process keeps the metadata service: {unlisted:?}"
    );
    let mut flagged = config;
    flagged.flags |= FLAG_HOST_PODS;
    maps::write_config(pin, &flagged);
    maps::add_host_pod(pin, inode(&host_pod));
    let record = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        held_record(node, host_probe(), IpAddr::V4(HOST_IP4))
    }));
    maps::remove_host_pod(pin, inode(&host_pod));
    maps::write_config(pin, &config);
    let record = record.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert_eq!(
        record.cgroup_id,
        inode(&host_container),
        "the record names the hostNetwork pod's container cgroup"
    );
    assert_eq!(
        record.netns_cookie, config.host_netns_cookie,
        "in the host namespace"
    );

    let summary = format!(
        "pod: its container cgroup (id {}) and {netns}; hostNetwork pod: its container cgroup \
         (id {}), pod cgroup {} found as an ancestor; direct connect: no record",
        inode(&container),
        record.cgroup_id,
        inode(&host_pod)
    );
    remove_up_to(root, &container);
    remove_up_to(root, &host_container);
    summary
}

/// cgroup-v1 layout: a pod process in kubelet's cgroupfs layout on the v1 hierarchies is in no
/// cgroup v2, so its record names the root of the agent's cgroup2 mount `own_cgroup2`.
pub fn cgroup_v1(node: &Node, own_cgroup2: &Path) -> String {
    // The controllers kubelet puts pods in that this kernel has as v1 hierarchies (6.12 has no
    // v1 memory controller). Not net_cls: the suite turns that on later, on purpose.
    let relative = Path::new("kubepods/burstable")
        .join(format!("pod{POD_UID}"))
        .join("app");
    let hierarchies: Vec<PathBuf> = ["cpu,cpuacct", "memory", "pids"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h))
        .filter(|h| h.join("cgroup.procs").exists())
        .collect();
    assert!(
        !hierarchies.is_empty(),
        "no cpu, memory or pids v1 hierarchy is mounted"
    );
    let mut command = Command::new(topology::PROBE);
    for hierarchy in &hierarchies {
        let container = hierarchy.join(&relative);
        fs::create_dir_all(&container)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", container.display()));
        place(&mut command, Some(&container), None);
    }
    place(&mut command, None, Some(&topology::pod_netns()));
    let record = held_record(node, command, IpAddr::V4(POD_IP4));
    for hierarchy in &hierarchies {
        remove_up_to(hierarchy, &hierarchy.join(&relative));
    }
    let root = inode(own_cgroup2);
    assert_eq!(
        record.cgroup_id,
        root,
        "a pod on cgroup v1 is in the cgroup2 root {} (id {root}); the record says {}",
        own_cgroup2.display(),
        record.cgroup_id
    );
    let names: Vec<String> = hierarchies
        .iter()
        .filter_map(|h| h.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    format!(
        "pod in {} on the v1 hierarchies {}: the record names the cgroup2 root (id {root}), no \
         pod cgroup",
        relative.display(),
        names.join(", ")
    )
}
