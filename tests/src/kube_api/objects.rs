//! Building realistic Kubernetes objects (pods, namespaces, service accounts) as JSON, and the small pieces of
//! metadata the API server fills in: UIDs, RFC 3339 timestamps, generated names.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};

use crate::HOST_IP4;

/// A Kubernetes object under construction: the JSON the API server stores, plus builder methods.
/// [`pod`] and [`namespace`] make one; `KubeApi::add_pod`/`add_namespace` store it, filling in
/// what the server owns (uid, resourceVersion, creationTimestamp) unless the object sets it.
#[derive(Clone, Debug, PartialEq)]
pub struct KubeObject {
    value: Value,
}

impl KubeObject {
    /// Wraps any object (it must have `metadata.name`).
    pub fn from_value(value: Value) -> Self {
        Self { value }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn into_value(self) -> Value {
        self.value
    }

    /// Sets an annotation.
    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        set_map_entry(&mut self.value, "annotations", key, Some(value));
        self
    }

    /// Sets a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        set_map_entry(&mut self.value, "labels", key, Some(value));
        self
    }

    /// Sets `status.phase` (Pending, Running, Succeeded, Failed, Unknown; Active or Terminating
    /// for a namespace).
    pub fn phase(mut self, phase: &str) -> Self {
        self.value["status"]["phase"] = json!(phase);
        self
    }

    /// Marks a pod `spec.hostNetwork` (its IPs become the node's host IP).
    pub fn host_network(mut self, host_network: bool) -> Self {
        let spec = object_mut(&mut self.value, "spec");
        if host_network {
            spec.insert("hostNetwork".into(), json!(true));
            let host_ip = self.value["status"]["hostIP"].clone();
            if let Some(ip) = host_ip.as_str().and_then(|ip| ip.parse::<IpAddr>().ok()) {
                set_pod_ips(&mut self.value, &[ip]);
            }
        } else {
            spec.remove("hostNetwork");
        }
        self
    }

    /// Replaces a pod's `status.podIP`/`status.podIPs` (the first address is `podIP`).
    pub fn ips(mut self, ips: &[IpAddr]) -> Self {
        set_pod_ips(&mut self.value, ips);
        self
    }

    /// A pod that has not started yet: phase Pending, no IPs, containers waiting.
    pub fn pending(mut self) -> Self {
        set_pod_ips(&mut self.value, &[]);
        let status = object_mut(&mut self.value, "status");
        status.insert("phase".into(), json!("Pending"));
        if let Some(Value::Array(statuses)) = status.get_mut("containerStatuses") {
            for container in statuses {
                container["ready"] = json!(false);
                container["started"] = json!(false);
                container["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
            }
        }
        self
    }

    /// Sets `metadata.creationTimestamp` explicitly (RFC 3339, seconds), instead of letting the
    /// server assign one.
    pub fn created_at(mut self, timestamp: &str) -> Self {
        self.value["metadata"]["creationTimestamp"] = json!(timestamp);
        self
    }

    /// Sets `metadata.uid` explicitly.
    pub fn uid(mut self, uid: &str) -> Self {
        self.value["metadata"]["uid"] = json!(uid);
        self
    }

    /// Any other change.
    pub fn with(mut self, change: impl FnOnce(&mut Value)) -> Self {
        change(&mut self.value);
        self
    }
}

impl From<KubeObject> for Value {
    fn from(object: KubeObject) -> Self {
        object.value
    }
}

/// A running pod scheduled on `node`, as the API server returns it after the kubelet reported
/// it: one container, phase Running, Ready, `status.podIP` = `ip4` and `status.podIPs` = `[ip4,
/// ip6]`, `status.hostIP` = the test node's host IP.
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip4: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
) -> KubeObject {
    let started = rfc3339(unix_now());
    let mut value = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastProbeTime": null,
                 "lastTransitionTime": started},
                {"type": "Ready", "status": "True", "lastProbeTime": null,
                 "lastTransitionTime": started},
                {"type": "ContainersReady", "status": "True", "lastProbeTime": null,
                 "lastTransitionTime": started},
                {"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                 "lastTransitionTime": started},
            ],
            "hostIP": HOST_IP4.to_string(),
            "hostIPs": [{"ip": HOST_IP4.to_string()}],
            "startTime": started,
            "containerStatuses": [{
                "name": "app",
                "state": {"running": {"startedAt": started}},
                "lastState": {},
                "ready": true,
                "restartCount": 0,
                "image": "registry.k8s.io/pause:3.10",
                "imageID": "registry.k8s.io/pause@sha256:ee6521f290b2168b6e0935a181d4cff9be1ac3f505666ef0e3c98fae8199917a",
                "containerID": format!("containerd://{}", hex_id()),
                "started": true,
            }],
            "qosClass": "BestEffort",
        },
    });
    let mut ips = vec![IpAddr::V4(ip4)];
    ips.extend(ip6.map(IpAddr::V6));
    set_pod_ips(&mut value, &ips);
    KubeObject { value }
}

/// An active namespace, labelled `kubernetes.io/metadata.name` as the API server does.
pub fn namespace(name: &str) -> KubeObject {
    KubeObject {
        value: json!({
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/metadata.name": name},
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }),
    }
}

/// A ServiceAccount as the API server stores it since Kubernetes 1.24: metadata only (no token
/// secrets are listed).
pub fn service_account(namespace: &str, name: &str) -> KubeObject {
    KubeObject {
        value: json!({
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace},
        }),
    }
}

/// Sets (`Some`) or removes (`None`) `metadata.<field>.<key>`; an emptied map is removed, as the
/// API server omits empty maps.
pub(crate) fn set_map_entry(object: &mut Value, field: &str, key: &str, value: Option<&str>) {
    let metadata = object_mut(object, "metadata");
    match value {
        Some(value) => {
            let map = metadata
                .entry(field)
                .or_insert_with(|| Value::Object(Map::new()));
            if !map.is_object() {
                *map = Value::Object(Map::new());
            }
            map.as_object_mut()
                .expect("just made an object")
                .insert(key.to_owned(), json!(value));
        }
        None => {
            if let Some(Value::Object(map)) = metadata.get_mut(field) {
                map.remove(key);
                if map.is_empty() {
                    metadata.remove(field);
                }
            }
        }
    }
}

/// Sets `status.podIP` and `status.podIPs` (both removed for an empty list).
pub(crate) fn set_pod_ips(pod: &mut Value, ips: &[IpAddr]) {
    let status = object_mut(pod, "status");
    match ips.first() {
        Some(first) => {
            status.insert("podIP".into(), json!(first.to_string()));
            let list: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
            status.insert("podIPs".into(), Value::Array(list));
        }
        None => {
            status.remove("podIP");
            status.remove("podIPs");
        }
    }
}

/// `value[field]` as a JSON object, created (or replacing a non-object) if needed.
pub(crate) fn object_mut<'v>(value: &'v mut Value, field: &str) -> &'v mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    let slot = value
        .as_object_mut()
        .expect("just made an object")
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the form of `metav1.Time`.
pub fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` to Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let time = time.split('.').next()?;
    let mut time = time.splitn(3, ':').map(str::parse::<i64>);
    let (hour, minute, second) = (time.next()?.ok()?, time.next()?.ok()?, time.next()?.ok()?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

// Howard Hinnant's civil-calendar algorithms.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `n` random bytes from the kernel.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into the rest of `bytes`.
        let n = unsafe {
            libc::getrandom(
                bytes[filled..].as_mut_ptr().cast(),
                N - filled,
                0 as libc::c_uint,
            )
        };
        assert!(
            n > 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted,
            "getrandom failed: {}",
            std::io::Error::last_os_error()
        );
        if n > 0 {
            filled += n as usize;
        }
    }
    bytes
}

/// A random (version 4) UUID, the form of `metadata.uid`.
pub fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The 5-character suffix the API server appends to `metadata.generateName`.
pub(crate) fn name_suffix() -> String {
    // The alphabet of k8s.io/apimachinery/pkg/util/rand.String: no vowels, no 0/1/3.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn hex_id() -> String {
    random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How `kubectl get` shows an age (duration.HumanDuration): `42s`, `3m12s`, `125m`, `4h5m`,
/// `20h`, `3d4h`, `120d`.
pub(crate) fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        return match secs % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if days < 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        };
    }
    format!("{days}d")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
        for t in [0, 951_782_400, 1_767_225_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2025-12-31T23:59:59.123456Z"),
            Some(1_767_225_599)
        );
    }

    #[test]
    fn uids_are_version_4() {
        let uid = new_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
        assert_ne!(uid, new_uid());
    }

    #[test]
    fn pod_builder_sets_ips_and_annotations() {
        let pod = pod(
            "ns",
            "p",
            "node-1",
            Ipv4Addr::new(10, 0, 0, 5),
            Some("fd00::5".parse().unwrap()),
        )
        .annotate("iam.amazonaws.com/role", "r");
        let v = pod.value();
        assert_eq!(v["status"]["podIP"], "10.0.0.5");
        assert_eq!(v["status"]["podIPs"][1]["ip"], "fd00::5");
        assert_eq!(v["metadata"]["annotations"]["iam.amazonaws.com/role"], "r");
        let hn = pod.clone().host_network(true);
        assert_eq!(hn.value()["status"]["podIP"], HOST_IP4.to_string());
        assert_eq!(hn.value()["spec"]["hostNetwork"], true);
        let pending = pod.pending();
        assert!(pending.value()["status"].get("podIP").is_none());
        assert_eq!(pending.value()["status"]["phase"], "Pending");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(900), "15m");
        assert_eq!(human_duration(7500), "125m");
        assert_eq!(human_duration(14_700), "4h5m");
        assert_eq!(human_duration(72_000), "20h");
    }
}
