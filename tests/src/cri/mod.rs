//! Running the chart's DaemonSet pod the way a cluster runs it: the pod template from
//! `helm template`, the image from `cargo xtask image`, and runc as the OCI runtime, driven the
//! way the kubelet and containerd drive it, inside a test node.
//!
//! [`Kubelet`] fills in only what a kubelet (and the API server's ServiceAccount admission) adds
//! to a pod: the downward API values (`spec.nodeName`, `status.hostIP`, `status.hostIPs`, …),
//! `$(VAR)` expansion in `args`, the `kubernetes` service's environment variables, the service
//! account volume (token, `ca.crt`, namespace) at /var/run/secrets/kubernetes.io/serviceaccount,
//! /etc/hosts and /dev/termination-log (the kubelet's), /etc/hostname and /etc/resolv.conf
//! (containerd's, from the sandbox), emptyDir volumes
//! (tmpfs for `medium: Memory`), the pod's cgroup in kubelet's cgroupfs layout
//! (`kubepods/<qos>/pod<uid>/<container id>`), and httpGet probes. [`spec`] turns each container
//! into runc's config.json as containerd's CRI plugin does; [`seccomp`] gives `RuntimeDefault`
//! as containerd generates it.
//!
//! The node's paths are the test node's: its hostPath `/sys/fs/bpf` is the node's private bpffs
//! and its `/sys/fs/cgroup` is built from the test cgroup per [`CgroupLayout`], so the agent
//! attaches to the test cgroup, never to the machine's root. The node's network namespace is the
//! test node's (hostNetwork).

pub mod apiserver;
pub mod chart;
pub mod image;
pub mod seccomp;
pub mod spec;

use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, OpenOptions},
    io::{self, BufRead as _, BufReader, Read},
    net::IpAddr,
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub use apiserver::ApiFront;
pub use image::{Image, image_archive};
use spec::{CgroupNamespace, ContainerSpec, CriMount};

use crate::{
    Pod, TestNode,
    kube_api::new_uid,
    node::{RUN_ROOT, cgroup2_root},
    process::{ChildGuard, output_within},
};

/// How the node's `/sys/fs/cgroup` looks, which the chart mounts into the agent's container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v2 only, as on AL2023 and Bottlerocket: `/sys/fs/cgroup` is the cgroup2 root, and
    /// containerd gives each container a private cgroup namespace.
    Unified,
    /// systemd's hybrid layout (this machine's): `/sys/fs/cgroup` is a tmpfs and cgroup2 is at
    /// `/sys/fs/cgroup/unified`. containerd keeps containers in the host's cgroup namespace.
    Hybrid,
    /// cgroup v1 only, as on Amazon Linux 2: no cgroup2 under `/sys/fs/cgroup` at all; the
    /// agent mounts one itself (CAP_SYS_ADMIN). Host cgroup namespace.
    V1,
}

/// What the kubelet's node offers pods.
pub struct Kubelet<'n> {
    node: &'n TestNode,
    layout: CgroupLayout,
    dir: PathBuf,
    /// The node name pods are scheduled on (`spec.nodeName`).
    pub node_name: String,
    /// `status.hostIPs` (the first is `status.hostIP`).
    pub host_ips: Vec<IpAddr>,
    api_host: IpAddr,
    api_port: u16,
    ca_pem: String,
    /// The service account token the kubelet mounts.
    pub token: String,
    /// The kubelet's seccomp root (`/var/lib/kubelet/seccomp`), where Localhost profiles live
    /// (the chart ships none: containerd's RuntimeDefault lets the agent run).
    seccomp_root: PathBuf,
    /// What the node's `/sys/fs/cgroup` is.
    host_cgroupfs: PathBuf,
    /// The node's (host) cgroup namespace: a process holding one rooted at the test cgroup.
    node_cgroupns: Option<ChildGuard>,
    mounts: Mutex<Vec<PathBuf>>,
    runtime_default: Mutex<HashMap<Vec<String>, Value>>,
}

impl<'n> Kubelet<'n> {
    /// A kubelet for `node` whose pods reach the API through `api`.
    pub fn new(node: &'n TestNode, layout: CgroupLayout, api: &ApiFront) -> Kubelet<'n> {
        let dir = Path::new(RUN_ROOT).join(format!("{}-kubelet", node.id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut kubelet = Kubelet {
            node,
            layout,
            dir: dir.clone(),
            node_name: crate::e2e::NODE_NAME.to_owned(),
            host_ips: vec![crate::HOST_IP4.into(), crate::HOST_IP6.into()],
            api_host: api.addr().ip(),
            api_port: api.addr().port(),
            ca_pem: api.ca_pem().to_owned(),
            token: format!("k2i-test-token-{}", new_uid()),
            seccomp_root: dir.join("seccomp"),
            host_cgroupfs: node.cgroup_path().to_owned(),
            node_cgroupns: None,
            mounts: Mutex::default(),
            runtime_default: Mutex::default(),
        };
        // The node's bpffs is shared, as systemd mounts /sys/fs/bpf; containerd refuses
        // HostToContainer propagation from a private mount.
        make_shared(node.bpffs());
        match layout {
            CgroupLayout::Unified => {}
            CgroupLayout::Hybrid | CgroupLayout::V1 => {
                let cgroupfs = dir.join("sys-fs-cgroup");
                kubelet.mount_tmpfs(&cgroupfs, "mode=755,size=64k");
                if layout == CgroupLayout::Hybrid {
                    let unified = cgroupfs.join("unified");
                    fs::create_dir(&unified).expect("create unified/");
                    kubelet.bind(node.cgroup_path(), &unified);
                }
                kubelet.host_cgroupfs = cgroupfs;
                kubelet.node_cgroupns = Some(cgroupns_holder(node.cgroup_path()));
            }
        }
        kubelet
    }

    pub fn layout(&self) -> CgroupLayout {
        self.layout
    }

    pub fn node(&self) -> &'n TestNode {
        self.node
    }

    fn mount_tmpfs(&self, target: &Path, options: &str) {
        fs::create_dir_all(target).expect("create a tmpfs mount point");
        mount(Some("tmpfs"), target, Some("tmpfs"), 0, Some(options))
            .unwrap_or_else(|e| panic!("cannot mount tmpfs at {}: {e}", target.display()));
        self.mounts.lock().expect("mounts").push(target.to_owned());
    }

    fn bind(&self, source: &Path, target: &Path) {
        mount(
            Some(&source.to_string_lossy()),
            target,
            None,
            libc::MS_BIND,
            None,
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot bind {} to {}: {e}",
                source.display(),
                target.display()
            )
        });
        self.mounts.lock().expect("mounts").push(target.to_owned());
    }

    /// A pod of the DaemonSet `daemonset` (a rendered object). `images` is the node's image
    /// store: image references and the OCI archives they resolve to. Volumes are set up, init
    /// containers run to completion, then the containers start. Containers whose image is not in
    /// the store (the uninstall mode's pause container) are not run; [`PodSandbox::skipped`]
    /// lists them.
    pub fn start_pod(&'n self, daemonset: &Value, images: &[(&str, &Path)]) -> PodSandbox<'n> {
        let template = daemonset["spec"]["template"].clone();
        let uid = new_uid();
        let spec = &template["spec"];
        assert_eq!(
            spec["hostNetwork"], true,
            "the test kubelet runs hostNetwork pods only (the node's network namespace)"
        );
        let dir = self.dir.join("pods").join(&uid);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let test_cgroup = self
            .node
            .cgroup_path()
            .file_name()
            .expect("the test cgroup has a name")
            .to_string_lossy()
            .into_owned();
        let qos = qos_class(spec);
        let cgroup_parent = match qos {
            "guaranteed" => format!("/{test_cgroup}/kubepods/pod{uid}"),
            qos => format!("/{test_cgroup}/kubepods/{qos}/pod{uid}"),
        };
        let mut pod = PodSandbox {
            kubelet: self,
            name: format!(
                "{}-{}",
                daemonset["metadata"]["name"].as_str().unwrap_or("pod"),
                &uid[..5]
            ),
            uid,
            template,
            dir,
            cgroup_parent,
            images: images
                .iter()
                .map(|(reference, archive)| ((*reference).to_owned(), archive.to_path_buf()))
                .collect(),
            unpacked: HashMap::new(),
            volumes: HashMap::new(),
            containers: Vec::new(),
            skipped: Vec::new(),
            init_results: Vec::new(),
            mounts: Vec::new(),
            restarts: 0,
        };
        pod.set_up_volumes();
        let init: Vec<Value> = pod.template["spec"]["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for container in &init {
            assert!(
                pod.images
                    .contains_key(container["image"].as_str().unwrap_or("")),
                "init container image {} is not in the node's image store",
                container["image"]
            );
            let result = pod.run_to_completion(container);
            let ok = result.status.success();
            pod.init_results.push(result);
            if !ok {
                // The kubelet would retry it; the test sees the failure.
                return pod;
            }
        }
        let containers: Vec<Value> = pod.template["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for container in &containers {
            if !pod
                .images
                .contains_key(container["image"].as_str().unwrap_or(""))
            {
                pod.skipped
                    .push(container["name"].as_str().unwrap_or("").to_owned());
                continue;
            }
            let started = pod.start_container(container);
            pod.containers.push(started);
        }
        pod
    }

    /// Capabilities in `wanted` that no container here can get (missing from this machine's own
    /// bounding set).
    pub fn unavailable(&self, wanted: &[&str]) -> Vec<String> {
        wanted
            .iter()
            .filter(|c| machine_lacks(c))
            .map(|c| (*c).to_owned())
            .collect()
    }

    /// RuntimeDefault as containerd generates it for `caps` (cached per set).
    fn runtime_default(&self, caps: &[String], archive: &Path) -> Value {
        let mut key = caps.to_vec();
        key.sort();
        if let Some(profile) = self.runtime_default.lock().expect("profiles").get(&key) {
            return profile.clone();
        }
        let profile = seccomp::containerd_default(caps, archive, &self.dir.join("containerd"));
        self.runtime_default
            .lock()
            .expect("profiles")
            .insert(key, profile.clone());
        profile
    }

    /// Processes of a pod container laid out as the kubelet lays them out: in
    /// `<test cgroup>/kubepods/besteffort/pod<uid>/<container id>` and `pod`'s network namespace.
    pub fn app_container(&self, pod: &Pod<'_>, uid: &str) -> AppContainer {
        let cgroup = self
            .node
            .cgroup_path()
            .join("kubepods/besteffort")
            .join(format!("pod{uid}"))
            .join(container_id());
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", cgroup.display()));
        AppContainer {
            cgroup,
            netns: pod.netns_path(),
            top: self
                .node
                .cgroup_path()
                .join("kubepods/besteffort")
                .join(format!("pod{uid}")),
        }
    }
}

impl Drop for Kubelet<'_> {
    fn drop(&mut self) {
        if let Some(mut holder) = self.node_cgroupns.take() {
            holder.kill9();
        }
        let mounts = std::mem::take(&mut *self.mounts.lock().expect("mounts"));
        for target in mounts.iter().rev() {
            unmount(target);
        }
        // runc made the pods' cgroups in every v1 hierarchy too; their parents stay behind.
        if let Some(name) = self.node.cgroup_path().file_name() {
            for hierarchy in v1_hierarchies() {
                remove_cgroup_tree(&hierarchy.join(name));
            }
        }
        remove_cgroup_tree(&self.node.cgroup_path().join("kubepods"));
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("cleanup: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A test pod's container cgroup (kubelet's layout). Its processes are killed and the cgroups
/// removed on drop.
pub struct AppContainer {
    cgroup: PathBuf,
    netns: PathBuf,
    top: PathBuf,
}

impl AppContainer {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// A command that runs as a process of this container.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        crate::process::place(&mut command, Some(&self.cgroup), Some(&self.netns));
        command
    }
}

impl Drop for AppContainer {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.top);
    }
}

/// One run of an init container.
pub struct InitResult {
    pub name: String,
    pub status: ExitStatus,
    pub log: String,
}

/// A pod on the node: its sandbox directory, cgroup parent, volumes and containers. Dropping it
/// kills what still runs (SIGKILL through runc), removes the containers and the pod's cgroups,
/// and unmounts its volumes.
pub struct PodSandbox<'k> {
    kubelet: &'k Kubelet<'k>,
    pub uid: String,
    pub name: String,
    template: Value,
    dir: PathBuf,
    cgroup_parent: String,
    images: HashMap<String, PathBuf>,
    unpacked: HashMap<String, Image>,
    volumes: HashMap<String, PathBuf>,
    containers: Vec<Container>,
    skipped: Vec<String>,
    init_results: Vec<InitResult>,
    mounts: Vec<PathBuf>,
    restarts: u32,
}

impl<'k> PodSandbox<'k> {
    /// The init containers' runs.
    pub fn init_results(&self) -> &[InitResult] {
        &self.init_results
    }

    /// Containers not run (another image than the agent's).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The pod spec as rendered.
    pub fn spec(&self) -> &Value {
        &self.template["spec"]
    }

    /// The running container `name`.
    pub fn container(&self, name: &str) -> &Container {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {} has no running container {name}", self.name))
    }

    pub fn container_mut(&mut self, name: &str) -> &mut Container {
        let pod = self.name.clone();
        self.containers
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {pod} has no running container {name}"))
    }

    fn set_up_volumes(&mut self) {
        let volumes: Vec<Value> = self.template["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for volume in volumes {
            let name = volume["name"]
                .as_str()
                .expect("a volume has a name")
                .to_owned();
            let path = if let Some(host_path) = volume["hostPath"].as_object() {
                let path = host_path["path"].as_str().expect("hostPath.path");
                let mapped = match path.trim_end_matches('/') {
                    "/sys/fs/bpf" => self.kubelet.node.bpffs().to_owned(),
                    "/sys/fs/cgroup" => self.kubelet.host_cgroupfs.clone(),
                    other => panic!(
                        "hostPath {other} has no counterpart on the test node (only /sys/fs/bpf \
                         and /sys/fs/cgroup)"
                    ),
                };
                match host_path.get("type").and_then(Value::as_str).unwrap_or("") {
                    "Directory" => assert!(
                        mapped.is_dir(),
                        "hostPath {path} (type Directory) does not exist on the node"
                    ),
                    "DirectoryOrCreate" => fs::create_dir_all(&mapped).expect("create hostPath"),
                    "" => {}
                    other => panic!("hostPath type {other} is not handled by the test kubelet"),
                }
                mapped
            } else if let Some(empty_dir) = volume["emptyDir"].as_object() {
                let path = self.dir.join("volumes/kubernetes.io~empty-dir").join(&name);
                fs::create_dir_all(&path).expect("create emptyDir");
                if empty_dir.get("medium").and_then(Value::as_str) == Some("Memory") {
                    let size = empty_dir
                        .get("sizeLimit")
                        .and_then(Value::as_str)
                        .map(|s| format!(",size={}", s.trim_end_matches('i').to_ascii_lowercase()))
                        .unwrap_or_default();
                    mount(
                        Some("tmpfs"),
                        &path,
                        Some("tmpfs"),
                        0,
                        Some(&format!("mode=777{size}")),
                    )
                    .unwrap_or_else(|e| panic!("cannot mount the emptyDir {name}: {e}"));
                    self.mounts.push(path.clone());
                }
                path
            } else {
                panic!("volume {name} is of a kind the test kubelet does not handle: {volume}");
            };
            self.volumes.insert(name, path);
        }
        // The ServiceAccount admission plugin's kube-api-access volume.
        let sa = self
            .dir
            .join("volumes/kubernetes.io~projected/kube-api-access");
        fs::create_dir_all(&sa).expect("create the service account volume");
        for (file, content) in [
            ("token", self.kubelet.token.as_str()),
            ("ca.crt", self.kubelet.ca_pem.as_str()),
            ("namespace", chart::NAMESPACE),
        ] {
            fs::write(sa.join(file), content).expect("write the service account volume");
        }
        self.volumes.insert("kube-api-access".into(), sa);
        let etc = self.dir.join("etc");
        fs::create_dir_all(&etc).expect("create etc");
        fs::write(
            etc.join("hosts"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )
        .expect("write hosts");
        // dnsPolicy Default: the node's resolver; the test node has none.
        fs::write(etc.join("resolv.conf"), "# the test node has no resolver\n")
            .expect("write resolv.conf");
        fs::write(
            etc.join("hostname"),
            format!("{}\n", self.kubelet.node_name),
        )
        .expect("write hostname");
    }

    /// The CRI mounts of `container`: its volumeMounts, the service account volume and the
    /// kubelet's files.
    fn cri_mounts(&self, container: &Value, instance: &Path) -> Vec<CriMount> {
        let readonly_root = container["securityContext"]["readOnlyRootFilesystem"] == true;
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().expect("volumeMount.name");
            let host_path = self
                .volumes
                .get(name)
                .unwrap_or_else(|| panic!("volumeMount {name} names no volume"))
                .clone();
            mounts.push(CriMount {
                host_path,
                container_path: mount["mountPath"].as_str().expect("mountPath").to_owned(),
                readonly: mount["readOnly"] == true,
                propagation: mount["mountPropagation"]
                    .as_str()
                    .unwrap_or("None")
                    .to_owned(),
            });
        }
        if self.template["spec"]["automountServiceAccountToken"] != false {
            mounts.push(CriMount {
                host_path: self.volumes["kube-api-access"].clone(),
                container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                readonly: true,
                propagation: "None".into(),
            });
        }
        let etc = self.dir.join("etc");
        for (file, path) in [
            ("hosts", "/etc/hosts"),
            ("resolv.conf", "/etc/resolv.conf"),
            ("hostname", "/etc/hostname"),
        ] {
            mounts.push(CriMount {
                host_path: etc.join(file),
                container_path: path.into(),
                readonly: readonly_root,
                propagation: "None".into(),
            });
        }
        let termination_log = instance.join("termination-log");
        fs::write(&termination_log, "").expect("write termination-log");
        mounts.push(CriMount {
            host_path: termination_log,
            container_path: "/dev/termination-log".into(),
            readonly: false,
            propagation: "None".into(),
        });
        mounts
    }

    /// The container's environment, as the kubelet makes it.
    fn environment(&self, container: &Value) -> Vec<(String, String)> {
        let k = self.kubelet;
        let host = k.api_host.to_string();
        let port = k.api_port.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
            ("KUBERNETES_PORT".into(), format!("tcp://{host}:{port}")),
            (
                format!("KUBERNETES_PORT_{port}_TCP"),
                format!("tcp://{host}:{port}"),
            ),
            (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
            (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
            (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host.clone()),
        ];
        let host_ips: Vec<String> = k.host_ips.iter().map(IpAddr::to_string).collect();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => self.name.clone(),
                    "metadata.namespace" => chart::NAMESPACE.to_owned(),
                    "metadata.uid" => self.uid.clone(),
                    "spec.nodeName" => k.node_name.clone(),
                    "spec.serviceAccountName" => self.template["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                    // hostNetwork: the pod's IPs are the node's.
                    "status.hostIP" | "status.podIP" => host_ips[0].clone(),
                    "status.hostIPs" | "status.podIPs" => host_ips.join(","),
                    other => panic!("fieldRef {other} is not filled by the test kubelet"),
                }
            } else {
                panic!("env {name}: only value and fieldRef are filled by the test kubelet: {var}");
            };
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
        env
    }

    fn seccomp(&self, container: &Value) -> Option<Value> {
        match spec::seccomp_profile(&self.template["spec"], container) {
            ("Unconfined", _) => None,
            ("RuntimeDefault", _) => Some(
                self.kubelet
                    .runtime_default(&spec::capabilities(container), &self.archive(container)),
            ),
            ("Localhost", Some(profile)) => {
                Some(seccomp::localhost(&self.kubelet.seccomp_root.join(profile)))
            }
            other => panic!("seccompProfile {other:?} is not handled"),
        }
    }

    fn archive(&self, container: &Value) -> PathBuf {
        self.images[container["image"].as_str().unwrap_or("")].clone()
    }

    /// The container's image, unpacked (once per pod and image).
    fn image(&mut self, container: &Value) -> Image {
        let reference = container["image"].as_str().unwrap_or("").to_owned();
        if let Some(image) = self.unpacked.get(&reference) {
            return image.clone();
        }
        let dir = self
            .dir
            .join("images")
            .join(self.unpacked.len().to_string());
        let image = Image::unpack(&self.archive(container), &dir);
        self.unpacked.insert(reference, image.clone());
        image
    }

    /// The runc spec and bundle of a new instance of `container`.
    fn prepare(&mut self, container: &Value, id: &str) -> (PathBuf, Value) {
        let image = self.image(container);
        let name = container["name"].as_str().expect("container name");
        let bundle = self
            .dir
            .join("containers")
            .join(format!("{name}-{}", &id[..12]));
        fs::create_dir_all(&bundle).expect("create the bundle");
        let env = self.environment(container);
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|a| expand(a, &env))
            .collect();
        let spec = ContainerSpec {
            image: &image,
            container,
            env,
            args,
            mounts: self.cri_mounts(container, &bundle),
            netns: self.kubelet.node.netns_path(),
            cgroupns: match (self.kubelet.layout, &self.kubelet.node_cgroupns) {
                (CgroupLayout::Unified, _) | (_, None) => CgroupNamespace::Private,
                (_, Some(holder)) => CgroupNamespace::Join(PathBuf::from(format!(
                    "/proc/{}/ns/cgroup",
                    holder.pid()
                ))),
            },
            cgroups_path: format!("{}/{id}", self.cgroup_parent),
            seccomp: self.seccomp(container),
            oom_score_adj: self.oom_score_adj(),
            available_caps: spec::own_bounding_set(),
        }
        .build();
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("serialize the spec"),
        )
        .expect("write config.json");
        (bundle, spec)
    }

    /// The kubelet's OOM score for the pod: -997 for node-critical pods. Lowering it needs
    /// CAP_SYS_RESOURCE; without it here, the test process's own score is kept.
    fn oom_score_adj(&self) -> i64 {
        let wanted = if self.template["spec"]["priorityClassName"]
            .as_str()
            .is_some_and(|p| p.starts_with("system-"))
        {
            -997
        } else {
            1000
        };
        let own: i64 = fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if machine_lacks("CAP_SYS_RESOURCE") {
            wanted.max(own)
        } else {
            wanted
        }
    }

    fn runc(&self) -> Command {
        let mut command = Command::new("runc");
        command.arg("--root").arg(self.dir.join("runc"));
        command
    }

    /// Where the container's processes are in the (machine's) cgroup2 hierarchy.
    fn unified_cgroup(&self, id: &str) -> PathBuf {
        let relative = format!("{}/{id}", self.cgroup_parent);
        cgroup2_root().join(relative.trim_start_matches('/'))
    }

    /// Starts `container` with `runc run` (foreground, as containerd's shim keeps it).
    fn start_container(&mut self, container: &Value) -> Container {
        let id = container_id();
        let (bundle, spec) = self.prepare(container, &id);
        let cgroup = self.unified_cgroup(&id);
        let mut command = self.runc();
        command
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "runc run");
        let log = Arc::new(Log::default());
        log.capture(child.child_mut().stdout.take());
        log.capture(child.child_mut().stderr.take());
        Container {
            name: container["name"].as_str().unwrap_or("").to_owned(),
            id,
            bundle,
            runc_root: self.dir.join("runc"),
            process: spec["process"].clone(),
            cgroup,
            child,
            log,
            spec: container.clone(),
        }
    }

    /// Runs an init container to completion.
    fn run_to_completion(&mut self, container: &Value) -> InitResult {
        let mut started = self.start_container(container);
        let status = started
            .child
            .wait_timeout(Duration::from_secs(120))
            .unwrap_or_else(|| {
                panic!(
                    "init container {} did not finish in 120 s:\n{}",
                    started.name,
                    started.log()
                )
            });
        started.wait_log_closed();
        let result = InitResult {
            name: started.name.clone(),
            status,
            log: started.log(),
        };
        drop(started);
        result
    }

    /// Kills `name` (SIGKILL, as an OOM kill or a crash) and starts it again, as the kubelet
    /// restarts a container: a new container in the same pod.
    pub fn kill_and_restart(&mut self, name: &str) {
        let index = self
            .containers
            .iter()
            .position(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name}"));
        let mut old = self.containers.remove(index);
        old.signal("KILL");
        old.wait_exit(Duration::from_secs(20));
        let container = old.spec.clone();
        drop(old);
        self.restarts += 1;
        let started = self.start_container(&container);
        self.containers.insert(index, started);
    }

    /// Stops the pod as the kubelet does when it is deleted (a rolling update): SIGTERM to every
    /// container, SIGKILL after `terminationGracePeriodSeconds`. Returns each container's exit
    /// status.
    pub fn terminate(mut self) -> Vec<(String, ExitStatus, String)> {
        let grace = Duration::from_secs(
            self.template["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        );
        let mut results = Vec::new();
        for mut container in std::mem::take(&mut self.containers) {
            container.signal("TERM");
            let status = match container.child.wait_timeout(grace) {
                Some(status) => status,
                None => {
                    container.signal("KILL");
                    container.wait_exit(Duration::from_secs(20))
                }
            };
            container.wait_log_closed();
            results.push((container.name.clone(), status, container.log()));
        }
        results
    }

    /// `kubectl exec <pod> -c <container> -- <args>`: runc exec with the container's process
    /// spec (user, capabilities, environment, seccomp) and `args`.
    pub fn exec(&self, container: &str, args: &[&str]) -> Output {
        let container = self.container(container);
        let mut process = container.process.clone();
        process["args"] = json!(args);
        let file = container.bundle.join(format!("exec-{}.json", new_uid()));
        fs::write(&file, serde_json::to_vec(&process).expect("process json")).expect("write");
        let mut command = self.runc();
        command
            .args(["exec", "--process"])
            .arg(&file)
            .arg(&container.id);
        let output = output_within(&mut command, Duration::from_secs(60), "runc exec");
        let _ = fs::remove_file(&file);
        output
    }

    /// The kubelet's httpGet probe `kind` (`readinessProbe`, `livenessProbe`) of `container`:
    /// the HTTP status, 0 when nothing answered.
    pub fn probe(&self, container: &str, kind: &str) -> u16 {
        let spec = &self.container(container).spec;
        let probe = &spec[kind]["httpGet"];
        let port = match &probe["port"] {
            Value::Number(n) => n.as_u64().expect("a port number"),
            Value::String(name) => spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("probe port {name} is not a container port")),
            other => panic!("unexpected probe port {other}"),
        };
        let url = format!(
            "http://{}:{port}{}",
            self.kubelet.host_ips[0],
            probe["path"].as_str().unwrap_or("/")
        );
        let output = output_within(
            self.kubelet.node.command("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "2",
                "-w",
                "%{http_code}",
                &url,
            ]),
            Duration::from_secs(10),
            "probe",
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Probes `kind` until it answers 200, or panics with the container's log.
    pub fn wait_probe(&self, container: &str, kind: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.probe(container, kind);
            if status == 200 {
                return;
            }
            let c = self.container(container);
            if Instant::now() >= deadline || c.has_exited() {
                panic!(
                    "{kind} of {container} answered {status} (not 200) within {timeout:?}.\n--- log \
                     ---\n{}",
                    c.log()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PodSandbox<'_> {
    fn drop(&mut self) {
        for container in std::mem::take(&mut self.containers) {
            drop(container);
        }
        for target in self.mounts.iter().rev() {
            unmount(target);
        }
        let parent = cgroup2_root().join(self.cgroup_parent.trim_start_matches('/'));
        remove_cgroup_tree(&parent);
        for hierarchy in v1_hierarchies() {
            remove_cgroup_tree(&hierarchy.join(self.cgroup_parent.trim_start_matches('/')));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("cleanup: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A container started by runc.
pub struct Container {
    pub name: String,
    pub id: String,
    bundle: PathBuf,
    runc_root: PathBuf,
    process: Value,
    cgroup: PathBuf,
    child: ChildGuard,
    log: Arc<Log>,
    spec: Value,
}

impl Container {
    /// Everything the container printed so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The config.json runc ran it with.
    pub fn config(&self) -> Value {
        let text = fs::read(self.bundle.join("config.json")).expect("read config.json");
        serde_json::from_slice(&text).expect("config.json")
    }

    /// Its cgroup in the cgroup2 hierarchy.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The container's init process, as the host sees it (from `runc state`).
    pub fn pid(&self) -> Option<u32> {
        let output = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["state", &self.id])
            .output()
            .ok()?;
        let state: Value = serde_json::from_slice(&output.stdout).ok()?;
        (state["status"] == "running")
            .then(|| state["pid"].as_u64())
            .flatten()
            .map(|p| p as u32)
    }

    pub fn has_exited(&self) -> bool {
        self.log.closed()
    }

    /// Waits until a log line contains `needle`; panics with the log on timeout or exit.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) {
        self.log.wait_for(needle, timeout, &self.name);
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["kill", &self.id, signal])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = self
            .child
            .wait_timeout(timeout)
            .unwrap_or_else(|| panic!("container {} did not exit within {timeout:?}", self.name));
        self.wait_log_closed();
        status
    }

    fn wait_log_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log.closed() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.child.try_wait().is_none() {
            self.signal("KILL");
            if self.child.wait_timeout(Duration::from_secs(10)).is_none() {
                self.child.kill9();
            }
        }
        if thread::panicking() {
            eprintln!(
                "--- container {} ({}) log ---\n{}\n---",
                self.name,
                self.id,
                self.log()
            );
        }
        // `runc run` deletes the container when it ends; this is for a runc that was killed.
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        remove_cgroup_tree(&self.cgroup);
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    open: usize,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn capture<R: Read + Send + 'static>(self: &Arc<Self>, stream: Option<R>) {
        let Some(stream) = stream else { return };
        self.state.lock().expect("log").open += 1;
        let log = Arc::clone(self);
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                log.state.lock().expect("log").lines.push(line);
                log.changed.notify_all();
            }
            log.state.lock().expect("log").open -= 1;
            log.changed.notify_all();
        });
    }

    fn text(&self) -> String {
        self.state.lock().expect("log").lines.join("\n")
    }

    fn closed(&self) -> bool {
        self.state.lock().expect("log").open == 0
    }

    fn wait_for(&self, needle: &str, timeout: Duration, name: &str) {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("log");
        loop {
            if state.lines.iter().any(|l| l.contains(needle)) {
                return;
            }
            let now = Instant::now();
            if state.open == 0 || now >= deadline {
                let text = state.lines.join("\n");
                drop(state);
                panic!(
                    "container {name} {} before logging {needle:?}.\n--- log ---\n{text}",
                    if now >= deadline {
                        "timed out"
                    } else {
                        "exited"
                    }
                );
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("log")
                .0;
        }
    }
}

/// The kubelet's `$(VAR)` expansion: references to defined variables are replaced, `$$` is a
/// literal `$`, anything else is left as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(n, _)| *n == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Whether this machine's own bounding set lacks `capability` (then no container gets it).
pub fn machine_lacks(capability: &str) -> bool {
    spec::own_bounding_set() & (1 << spec::capability_number(capability)) == 0
}

/// The pod's QoS class directory: Guaranteed pods sit directly under kubepods, the others under
/// `burstable` or `besteffort`.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .collect();
    let any = containers
        .iter()
        .any(|c| c["resources"]["requests"].is_object() || c["resources"]["limits"].is_object());
    if !any {
        return "besteffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let r = &c["resources"];
        ["cpu", "memory"]
            .iter()
            .all(|k| r["limits"][k].is_string() && r["limits"][k] == r["requests"][k].clone())
    });
    if guaranteed {
        "guaranteed"
    } else {
        "burstable"
    }
}

fn container_id() -> String {
    format!("{}{}", new_uid(), new_uid()).replace('-', "")
}

/// A process that holds a cgroup namespace rooted at `cgroup`: the test node's host cgroup
/// namespace, in which a cgroup2 mount shows the test cgroup as its root.
fn cgroupns_holder(cgroup: &Path) -> ChildGuard {
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("cannot open {}/cgroup.procs: {e}", cgroup.display()));
    let mut command = Command::new("sleep");
    command
        .arg("86400")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only write(2) and unshare(2) on a descriptor opened above.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ChildGuard::spawn(&mut command, "cgroup namespace holder")
}

/// The mount points of the cgroup v1 hierarchies.
fn v1_hierarchies() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(target))
        })
        .collect()
}

/// Kills what is left in a cgroup tree (test processes only live there) and removes it
/// bottom-up.
fn remove_cgroup_tree(top: &Path) {
    if !top.is_dir() {
        return;
    }
    let mut dirs = vec![top.to_owned()];
    let mut index = 0;
    while index < dirs.len() {
        if let Ok(entries) = fs::read_dir(&dirs[index]) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
        }
        index += 1;
    }
    for dir in dirs.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) by PID on a process in a test pod's cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cleanup: cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn make_shared(path: &Path) {
    mount(None, path, None, libc::MS_SHARED, None)
        .unwrap_or_else(|e| panic!("cannot make {} a shared mount: {e}", path.display()));
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let source = source.map(c);
    let fstype = fstype.map(c);
    let data = data.map(c);
    let target = CString::new(target.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: NUL-terminated strings that outlive the call, or null pointers.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unmount(target: &Path) {
    if let Ok(c) = CString::new(target.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "cleanup: cannot unmount {}: {}",
                target.display(),
                io::Error::last_os_error()
            );
        }
    }
}
