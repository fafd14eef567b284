//! The test node (a network namespace, a test cgroup, a private bpffs) and its pods.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    HOST_IP4, HOST_IP6, METADATA_IP4, METADATA_IP6,
    process::{ip, ip_quiet, place},
    unique_id,
};

/// Where the private bpffs instances are mounted: `<RUN_ROOT>/<id>/bpf`.
pub const RUN_ROOT: &str = "/run/kube2iam-test";
/// Where `ip netns add` puts its namespace files.
const NETNS_DIR: &str = "/run/netns";
/// Pods per node: the /30s of 198.51.100.0/24.
const MAX_PODS: u32 = 64;
/// The bridge of a bridged node ([`TestNode::new_bridged`]), in the node namespace.
pub const BRIDGE: &str = "k2i-br";

/// How a node connects its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// A routed veth per pod, each with its own /30 (as the VPC CNI, Calico and Cilium do).
    Routed,
    /// Every pod's host-side veth enslaved to one Linux bridge that holds the gateway address;
    /// pods share one subnet and one L2 segment (as flannel, kubenet and the bridge CNI do).
    Bridge,
}

/// The mount point of the cgroup2 hierarchy, from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("cannot read /proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
        })
        .expect("no cgroup2 hierarchy is mounted (no cgroup2 line in /proc/mounts)")
}

/// The MAC address of `ifname` in the named namespace `netns`, from `ip -j link show`.
pub fn link_mac(netns: &str, ifname: &str) -> String {
    let output = crate::process::output_within(
        Command::new("ip").args(["-n", netns, "-j", "link", "show", ifname]),
        Duration::from_secs(10),
        "ip link show",
    );
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "ip -n {netns} -j link show {ifname}: {e}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    links[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{ifname} in {netns} has no MAC address: {links}"))
        .to_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    fn create(name: &str) -> Self {
        ip(&["netns", "add", name]);
        Self {
            name: name.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        ip_quiet(&["netns", "delete", &self.name]);
    }
}

/// A child cgroup of the cgroup2 root. On drop, every process still in it (only test processes
/// ever join it) is killed by PID, then the directory is removed.
struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    fn create(root: &Path, name: &str) -> Self {
        let path = root.join(name);
        assert!(
            !name.is_empty() && !name.contains('/') && path.parent() == Some(root),
            "refusing test cgroup {}: it must be a direct child of the cgroup2 root {}",
            path.display(),
            root.display()
        );
        assert_ne!(
            fs::canonicalize(root).ok(),
            Some(path.clone()),
            "refusing to use the cgroup2 root as a test cgroup"
        );
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create test cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// The PIDs in the cgroup and every cgroup below it.
    fn procs(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for dir in subtree(&self.path) {
            out.extend(read_procs(&dir));
        }
        out
    }

    /// Kills every process in the cgroup and waits until it is empty.
    fn sweep(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "cleanup: processes {procs:?} are still in {} after SIGKILL",
                    self.path.display()
                );
                return;
            }
            for pid in procs {
                // SAFETY: kill(2) by PID on a process in the test cgroup, which only processes
                // started by the tests join.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `dir` and every directory below it, deepest first.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

fn read_procs(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        self.sweep();
        // Pod and container cgroups the tests laid out below it go first, deepest first.
        for dir in subtree(&self.path) {
            if dir != self.path {
                let _ = fs::remove_dir(&dir);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cleanup: cannot remove cgroup {}: {e}", self.path.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// A directory removed (if empty) on drop.
struct DirGuard {
    path: PathBuf,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("cleanup: cannot remove {}: {e}", self.path.display());
        }
        // The shared parent goes when the last test leaves it; another test may still use it.
        if let Some(parent) = self.path.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// A private bpffs instance, unmounted (lazily) and its mount point removed on drop.
struct BpffsGuard {
    path: PathBuf,
}

impl BpffsGuard {
    fn mount(path: &Path) -> Self {
        fs::create_dir_all(path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let target = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: valid NUL-terminated strings; bpffs takes no mount data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = fs::remove_dir(path);
            panic!("cannot mount bpffs at {}: {e}", path.display());
        }
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for BpffsGuard {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "cleanup: cannot unmount {}: {}",
                    self.path.display(),
                    io::Error::last_os_error()
                );
            }
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cleanup: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A test "node": an EC2 host in a network namespace `k2i-node-<id>`, with no route out and no
/// link to the machine. Its lo holds the metadata addresses (169.254.169.254/32, fd00:ec2::254/128)
/// and the host IPs (192.0.2.10/32, fd00:192::10/128). It comes with a test cgroup
/// `<cgroup2 root>/k2i-test-<id>` and a private bpffs at `/run/kube2iam-test/<id>/bpf`.
///
/// Dropping it kills the processes left in the test cgroup, deletes the namespace, removes the
/// cgroup, unmounts the bpffs and removes its directory. Pods borrow the node, so they are gone
/// before it.
pub struct TestNode {
    id: String,
    topology: Topology,
    next_pod: AtomicU32,
    // Dropped in this order.
    netns: NetnsGuard,
    /// With [`TestNode::with_uplink`]: where the metadata service lives, behind the node's uplink.
    uplink: Option<NetnsGuard>,
    cgroup: CgroupGuard,
    bpffs: BpffsGuard,
    _dir: DirGuard,
}

/// The node side of the uplink veth ([`TestNode::with_uplink`]).
pub const UPLINK: &str = "k2i-up";
/// The node's address on its uplink, and the metadata side's.
pub const UPLINK_NODE4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const UPLINK_PEER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const UPLINK_NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 1);
pub const UPLINK_PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 2);

/// Writes a sysctl of the network namespace at `netns` (`/proc/sys/net/...` is per namespace, so
/// the write happens on a thread inside it).
fn netns_sysctl(netns: &Path, key: &str, value: &str) {
    let (netns, path, value) = (
        netns.to_owned(),
        Path::new("/proc/sys/net").join(key),
        value.to_owned(),
    );
    thread::spawn(move || {
        crate::process::enter_netns_on_this_thread(&netns)
            .unwrap_or_else(|e| panic!("cannot enter {}: {e}", netns.display()));
        fs::write(&path, &value)
            .unwrap_or_else(|e| panic!("cannot write {value} to {}: {e}", path.display()));
    })
    .join()
    .unwrap_or_else(|_| panic!("setting {key} in the node failed"));
}

impl TestNode {
    /// A node with a routed veth per pod ([`Topology::Routed`]), its metadata service on its
    /// own lo (packets to it are delivered locally).
    pub fn new() -> Self {
        Self::build(Topology::Routed, false)
    }

    /// A node whose pods share one Linux bridge, [`BRIDGE`] ([`Topology::Bridge`]): it holds
    /// the gateway 198.51.100.1/24 and fd00:77::1/64; pod `i` gets 198.51.100.(i+2)/24 and
    /// fd00:77::(i+2)/64.
    pub fn new_bridged() -> Self {
        Self::build(Topology::Bridge, false)
    }

    pub fn with_topology(topology: Topology) -> Self {
        Self::build(topology, false)
    }

    /// A node modelled as EC2 has it: the metadata service off the host, in a further network
    /// namespace `k2i-imds-<id>` behind the node's uplink veth [`UPLINK`]. The node routes the
    /// metadata addresses there and forwards (IPv4 and IPv6), so a pod's packet to the metadata
    /// service leaves the node the way it would on EC2, and a guard on the way out can be tested.
    /// [`crate::ImdsEmulator`], [`crate::ImdsStub`] and [`crate::packets::PacketWatch`] start
    /// there ([`TestNode::metadata_netns_path`]). The node reaches it from [`UPLINK_NODE4`].
    pub fn with_uplink() -> Self {
        Self::build(Topology::Routed, true)
    }

    fn build(topology: Topology, uplink: bool) -> Self {
        crate::require_root();
        let id = unique_id();
        // Created in the reverse of the drop order, so a failure half-way unwinds cleanly.
        let dir_path = Path::new(RUN_ROOT).join(&id);
        let dir = DirGuard {
            path: dir_path.clone(),
        };
        let bpffs = BpffsGuard::mount(&dir_path.join("bpf"));
        let cgroup = CgroupGuard::create(&cgroup2_root(), &format!("k2i-test-{id}"));
        let netns = NetnsGuard::create(&format!("k2i-node-{id}"));
        let n = netns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        let on_lo4 = if uplink {
            vec![format!("{HOST_IP4}/32")]
        } else {
            vec![format!("{METADATA_IP4}/32"), format!("{HOST_IP4}/32")]
        };
        for addr in on_lo4 {
            ip(&["-n", n, "addr", "add", &addr, "dev", "lo"]);
        }
        let on_lo6 = if uplink {
            vec![format!("{HOST_IP6}/128")]
        } else {
            vec![format!("{METADATA_IP6}/128"), format!("{HOST_IP6}/128")]
        };
        for addr in on_lo6 {
            ip(&["-n", n, "-6", "addr", "add", &addr, "dev", "lo", "nodad"]);
        }
        if topology == Topology::Bridge {
            // No STP: ports forward as soon as they are up.
            ip(&[
                "-n",
                n,
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ]);
            ip(&["-n", n, "addr", "add", "198.51.100.1/24", "dev", BRIDGE]);
            ip(&[
                "-n",
                n,
                "-6",
                "addr",
                "add",
                "fd00:77::1/64",
                "dev",
                BRIDGE,
                "nodad",
            ]);
            ip(&["-n", n, "link", "set", BRIDGE, "up"]);
        }
        let uplink = uplink.then(|| {
            let peer = NetnsGuard::create(&format!("k2i-imds-{id}"));
            let p = peer.name.as_str();
            ip(&[
                "-n", n, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", p,
            ]);
            // No duplicate address detection on the link: with both link-local addresses still
            // tentative, neighbour discovery across it stalls for the first second.
            netns_sysctl(
                &netns.path(),
                &format!("ipv6/conf/{UPLINK}/accept_dad"),
                "0",
            );
            netns_sysctl(&peer.path(), "ipv6/conf/eth0/accept_dad", "0");
            let node4 = format!("{UPLINK_NODE4}/30");
            let node6 = format!("{UPLINK_NODE6}/64");
            ip(&["-n", n, "addr", "add", &node4, "dev", UPLINK]);
            ip(&["-n", n, "-6", "addr", "add", &node6, "dev", UPLINK, "nodad"]);
            ip(&["-n", n, "link", "set", UPLINK, "up"]);
            ip(&["-n", p, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{METADATA_IP4}/32"),
                "dev",
                "lo",
            ]);
            let metadata6 = format!("{METADATA_IP6}/128");
            ip(&[
                "-n", p, "-6", "addr", "add", &metadata6, "dev", "lo", "nodad",
            ]);
            let peer4 = format!("{UPLINK_PEER4}/30");
            let peer6 = format!("{UPLINK_PEER6}/64");
            ip(&["-n", p, "addr", "add", &peer4, "dev", "eth0"]);
            ip(&["-n", p, "-6", "addr", "add", &peer6, "dev", "eth0", "nodad"]);
            ip(&["-n", p, "link", "set", "eth0", "up"]);
            let (node4, node6) = (UPLINK_NODE4.to_string(), UPLINK_NODE6.to_string());
            ip(&["-n", p, "route", "add", "default", "via", &node4]);
            ip(&[
                "-n", p, "-6", "route", "add", "default", "via", &node6, "dev", "eth0",
            ]);
            let (peer4, peer6) = (UPLINK_PEER4.to_string(), UPLINK_PEER6.to_string());
            let (m4, m6) = (format!("{METADATA_IP4}/32"), format!("{METADATA_IP6}/128"));
            ip(&["-n", n, "route", "add", &m4, "via", &peer4, "dev", UPLINK]);
            ip(&[
                "-n", n, "-6", "route", "add", &m6, "via", &peer6, "dev", UPLINK,
            ]);
            netns_sysctl(&netns.path(), "ipv4/ip_forward", "1");
            netns_sysctl(&netns.path(), "ipv6/conf/all/forwarding", "1");
            peer
        });
        Self {
            id,
            topology,
            next_pod: AtomicU32::new(0),
            netns,
            uplink,
            cgroup,
            bpffs,
            _dir: dir,
        }
    }

    /// `<pid>-<counter>`, the part shared by all of this node's names.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// The MAC address of the node's interface `ifname` (a pod's host side, or [`BRIDGE`]).
    pub fn link_mac(&self, ifname: &str) -> String {
        link_mac(self.netns_name(), ifname)
    }

    /// The node's network namespace name, `k2i-node-<id>`.
    pub fn netns_name(&self) -> &str {
        &self.netns.name
    }

    /// `/run/netns/k2i-node-<id>`, for setns.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The namespace where the node's metadata service lives: the node's own, or with
    /// [`TestNode::with_uplink`] the one behind its uplink.
    pub fn metadata_netns_path(&self) -> PathBuf {
        self.uplink.as_ref().unwrap_or(&self.netns).path()
    }

    /// With [`TestNode::with_uplink`]: the name of the namespace behind the uplink.
    pub fn uplink_netns_name(&self) -> Option<&str> {
        self.uplink.as_ref().map(|u| u.name.as_str())
    }

    /// The test cgroup, `<cgroup2 root>/k2i-test-<id>`.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup.path
    }

    /// The node's private bpffs mount.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs.path
    }

    /// The agent's pin path, `<bpffs>/kube2iam`.
    pub fn pin_path(&self) -> PathBuf {
        self.bpffs.path.join("kube2iam")
    }

    /// The PIDs currently in the test cgroup.
    pub fn cgroup_procs(&self) -> Vec<u32> {
        self.cgroup.procs()
    }

    /// The test cgroup's directory fd, the target of cgroup BPF attachments.
    pub fn open_cgroup(&self) -> OwnedFd {
        File::open(&self.cgroup.path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.cgroup.path.display()))
            .into()
    }

    /// A command that runs in the node (host) network namespace, outside the test cgroup: how
    /// the agent and other host daemons run.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        place(&mut command, None, Some(&self.netns_path()));
        command
    }

    /// A command that runs in the node (host) network namespace and inside the test cgroup: a
    /// hostNetwork pod.
    pub fn command_in_cgroup(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        place(
            &mut command,
            Some(&self.cgroup.path),
            Some(&self.netns_path()),
        );
        command
    }

    /// Lays out a pod's cgroups below the test cgroup as kubelet does (for hostNetwork pods,
    /// which have no namespace of their own; see [`Pod::use_kubelet_cgroup`] for the others).
    pub fn kubelet_cgroup(
        &self,
        driver: CgroupDriver,
        uid: &str,
        container: &str,
    ) -> KubeletCgroup {
        let (pod, ctr) = KubeletCgroup::layout(driver, uid, container);
        let (pod, ctr) = (self.cgroup.path.join(pod), self.cgroup.path.join(ctr));
        fs::create_dir_all(&ctr).unwrap_or_else(|e| panic!("cannot create {}: {e}", ctr.display()));
        KubeletCgroup {
            uid: uid.to_owned(),
            pod,
            container: ctr,
        }
    }

    /// A command in the node (host) network namespace and in `cgroup` (below the test cgroup):
    /// a hostNetwork pod's process.
    pub fn command_in(&self, program: impl AsRef<std::ffi::OsStr>, cgroup: &Path) -> Command {
        assert!(
            cgroup.starts_with(&self.cgroup.path),
            "{} is not below the test cgroup",
            cgroup.display()
        );
        let mut command = Command::new(program);
        place(&mut command, Some(cgroup), Some(&self.netns_path()));
        command
    }

    /// Adds a pod `name` (at most 9 characters, unique on this node) behind a veth.
    ///
    /// Routed: pod `i` (0-based) gets 198.51.100.(4i+2)/30 and fd00:77:<i>::2/64 on its eth0 with
    /// default routes via the node side `k2i-h-<name>`, which holds 198.51.100.(4i+1)/30 and
    /// fd00:77:<i>::1/64. Bridged: pod `i` gets 198.51.100.(i+2)/24 and fd00:77::(i+2)/64, its
    /// node side `k2i-h-<name>` is a port of [`BRIDGE`] without addresses, and the default routes
    /// go via the bridge's 198.51.100.1 and fd00:77::1.
    pub fn add_pod(&self, name: &str) -> Pod<'_> {
        assert!(
            !name.is_empty()
                && name.len() <= 9
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "pod name {name:?} must be 1..=9 characters of [A-Za-z0-9-] (interface names are at \
             most 15 bytes: k2i-h-<name>)"
        );
        let index = self.next_pod.fetch_add(1, Ordering::Relaxed);
        assert!(index < MAX_PODS, "at most {MAX_PODS} pods per test node");
        let netns = NetnsGuard::create(&format!("k2i-pod-{}-{name}", self.id));
        let pod = Pod {
            node: self,
            name: name.to_owned(),
            index,
            netns,
            cgroup: std::sync::Mutex::new(None),
        };
        let node_ns = self.netns_name();
        let pod_ns = pod.netns.name.as_str();
        let host_if = pod.host_interface();
        let (gw4, ip4) = (pod.gateway4(), pod.ip4());
        let (gw6, ip6) = (pod.gateway6(), pod.ip6());
        ip(&[
            "-n", node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", pod_ns,
        ]);
        let prefix4 = match self.topology {
            Topology::Routed => {
                ip(&[
                    "-n",
                    node_ns,
                    "addr",
                    "add",
                    &format!("{gw4}/30"),
                    "dev",
                    &host_if,
                ]);
                ip(&[
                    "-n",
                    node_ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    &host_if,
                    "nodad",
                ]);
                30
            }
            Topology::Bridge => {
                ip(&["-n", node_ns, "link", "set", &host_if, "master", BRIDGE]);
                24
            }
        };
        ip(&["-n", node_ns, "link", "set", &host_if, "up"]);
        ip(&["-n", pod_ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            pod_ns,
            "addr",
            "add",
            &format!("{ip4}/{prefix4}"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            pod_ns,
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", pod_ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            pod_ns,
            "route",
            "add",
            "default",
            "via",
            &gw4.to_string(),
        ]);
        ip(&[
            "-n",
            pod_ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gw6.to_string(),
            "dev",
            "eth0",
        ]);
        pod
    }
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Processes first; the guards then go in field order.
        self.cgroup.sweep();
    }
}

/// A pod: a network namespace `k2i-pod-<node id>-<name>` behind a veth into the node. Deleted on
/// drop (which also removes the veth).
pub struct Pod<'n> {
    node: &'n TestNode,
    name: String,
    index: u32,
    netns: NetnsGuard,
    /// The container cgroup the pod's processes join, once laid out as kubelet does; until
    /// then they join the test cgroup itself. Removed with the test cgroup.
    cgroup: std::sync::Mutex<Option<KubeletCgroup>>,
}

/// kubelet's cgroup drivers: how pod cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/<ctr>.scope`
    Systemd,
    /// `kubepods/burstable/pod<uid>/<ctr>`
    Cgroupfs,
}

/// A pod's cgroups as kubelet lays them out below the test cgroup.
#[derive(Debug, Clone)]
pub struct KubeletCgroup {
    pub uid: String,
    /// The pod-level cgroup.
    pub pod: PathBuf,
    /// The container cgroup the pod's processes join.
    pub container: PathBuf,
}

impl KubeletCgroup {
    /// The pod-level and container cgroup paths, relative to the cgroup programs attach to.
    pub fn layout(driver: CgroupDriver, uid: &str, container: &str) -> (PathBuf, PathBuf) {
        let pod = match driver {
            CgroupDriver::Systemd => PathBuf::from("kubepods.slice")
                .join("kubepods-burstable.slice")
                .join(format!(
                    "kubepods-burstable-pod{}.slice",
                    uid.replace('-', "_")
                )),
            CgroupDriver::Cgroupfs => PathBuf::from("kubepods")
                .join("burstable")
                .join(format!("pod{uid}")),
        };
        let container = match driver {
            CgroupDriver::Systemd => pod.join(format!("cri-containerd-{container}.scope")),
            CgroupDriver::Cgroupfs => pod.join(container),
        };
        (pod, container)
    }
}

impl<'n> Pod<'n> {
    pub fn node(&self) -> &'n TestNode {
        self.node
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns_name(&self) -> &str {
        &self.netns.name
    }

    /// `/run/netns/k2i-pod-<node id>-<name>`, for setns.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The MAC address of the pod's eth0.
    pub fn mac(&self) -> String {
        link_mac(self.netns_name(), "eth0")
    }

    /// The node side of the veth, `k2i-h-<name>`.
    pub fn host_interface(&self) -> String {
        format!("k2i-h-{}", self.name)
    }

    /// The pod's IPv4 address: 198.51.100.(4i+2), bridged 198.51.100.(i+2).
    pub fn ip4(&self) -> Ipv4Addr {
        match self.node.topology {
            Topology::Routed => Ipv4Addr::new(198, 51, 100, (4 * self.index + 2) as u8),
            Topology::Bridge => Ipv4Addr::new(198, 51, 100, (self.index + 2) as u8),
        }
    }

    /// The pod's IPv6 address: fd00:77:<i>::2, bridged fd00:77::(i+2).
    pub fn ip6(&self) -> Ipv6Addr {
        match self.node.topology {
            Topology::Routed => Ipv6Addr::new(0xfd00, 0x77, self.index as u16, 0, 0, 0, 0, 2),
            Topology::Bridge => Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, (self.index + 2) as u16),
        }
    }

    /// The pod's default gateway (IPv4): the node side of its veth, or the bridge.
    pub fn gateway4(&self) -> Ipv4Addr {
        match self.node.topology {
            Topology::Routed => Ipv4Addr::new(198, 51, 100, (4 * self.index + 1) as u8),
            Topology::Bridge => Ipv4Addr::new(198, 51, 100, 1),
        }
    }

    /// The pod's default gateway (IPv6): the node side of its veth, or the bridge.
    pub fn gateway6(&self) -> Ipv6Addr {
        match self.node.topology {
            Topology::Routed => Ipv6Addr::new(0xfd00, 0x77, self.index as u16, 0, 0, 0, 0, 1),
            Topology::Bridge => Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1),
        }
    }

    /// Whether `ip` is one of this pod's addresses (IPv4-mapped forms included).
    pub fn owns(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip == std::net::IpAddr::V4(self.ip4()) || ip == std::net::IpAddr::V6(self.ip6())
    }

    /// Lays the pod's cgroups out below the test cgroup as kubelet would for pod `uid`; the
    /// pod's processes started afterwards join its container cgroup. Called again (another pod
    /// that got this address), the new layout replaces the old for new processes.
    pub fn use_kubelet_cgroup(&self, driver: CgroupDriver, uid: &str) -> KubeletCgroup {
        let root = self.node.cgroup_path();
        let (pod, container) = KubeletCgroup::layout(driver, uid, &format!("ctr-{}", self.name));
        let (pod, container) = (root.join(pod), root.join(container));
        fs::create_dir_all(&container)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", container.display()));
        let laid = KubeletCgroup {
            uid: uid.to_owned(),
            pod,
            container,
        };
        *self.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = Some(laid.clone());
        laid
    }

    /// The pod's kubelet cgroup, if laid out.
    pub fn kubelet_cgroup(&self) -> Option<KubeletCgroup> {
        self.cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cgroup the pod's processes join: its container cgroup, else the test cgroup.
    pub fn process_cgroup(&self) -> PathBuf {
        self.kubelet_cgroup()
            .map_or(self.node.cgroup_path().to_owned(), |c| c.container)
    }

    /// A command that runs as a pod process: it joins the pod's cgroup (the test cgroup until
    /// [`Pod::use_kubelet_cgroup`]), then enters the pod's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        place(
            &mut command,
            Some(&self.process_cgroup()),
            Some(&self.netns_path()),
        );
        command
    }

    /// A command that runs in this pod's cgroup but in another network namespace (`netns`):
    /// a pod process that took another's address, or a hostNetwork pod (the node's netns).
    pub fn command_in_netns(&self, program: impl AsRef<std::ffi::OsStr>, netns: &Path) -> Command {
        let mut command = Command::new(program);
        place(&mut command, Some(&self.process_cgroup()), Some(netns));
        command
    }

    /// A command in the pod's network namespace that does not join the test cgroup, so no
    /// program applies to it.
    pub fn command_outside_cgroup(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        place(&mut command, None, Some(&self.netns_path()));
        command
    }
}
