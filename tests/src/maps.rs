//! The agent's pinned maps, read and changed through aya as a second userspace would.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use kube2iam_common::{
    Attestation, CONFIG_KEY, COUNTER_SLOTS, Config, ConnKey, Counter, ip6_octets, ip6_words, maps,
};

fn open(pin_path: &Path, name: &str) -> Map {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("cannot open pinned map {}: {e}", path.display()));
    Map::from_map_data(data)
        .unwrap_or_else(|e| panic!("pinned map {} has an unexpected type: {e}", path.display()))
}

fn config_map(pin_path: &Path) -> HashMap<MapData, u32, Config> {
    HashMap::try_from(open(pin_path, maps::CONFIG))
        .unwrap_or_else(|e| panic!("{} is not a u32 → Config hash map: {e}", maps::CONFIG))
}

/// The config the agent wrote, if any.
pub fn read_config(pin_path: &Path) -> Option<Config> {
    config_map(pin_path).get(&CONFIG_KEY, 0).ok()
}

/// Deletes the config entry: the programs then refuse metadata connects from pods.
pub fn delete_config(pin_path: &Path) {
    config_map(pin_path)
        .remove(&CONFIG_KEY)
        .unwrap_or_else(|e| panic!("cannot delete the config from {}: {e}", maps::CONFIG));
}

/// Writes `config` as the config entry.
pub fn write_config(pin_path: &Path, config: &Config) {
    config_map(pin_path)
        .insert(CONFIG_KEY, config, 0)
        .unwrap_or_else(|e| panic!("cannot write the config to {}: {e}", maps::CONFIG));
}

/// The counters, summed over CPUs, indexed by [`Counter`].
pub fn counters(pin_path: &Path) -> [u64; COUNTER_SLOTS as usize] {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pin_path, maps::COUNTERS))
        .unwrap_or_else(|e| panic!("{} is not a per-CPU u64 array: {e}", maps::COUNTERS));
    let mut sums = [0u64; COUNTER_SLOTS as usize];
    for (slot, sum) in sums.iter_mut().enumerate() {
        let values = map
            .get(&(slot as u32), 0)
            .unwrap_or_else(|e| panic!("cannot read counter slot {slot}: {e}"));
        *sum = values.iter().sum();
    }
    sums
}

/// One counter, summed over CPUs.
pub fn counter(pin_path: &Path, counter: Counter) -> u64 {
    counters(pin_path)[counter as usize]
}

/// The attestation map's key for a connection from `client` to `agent`, built as the kernel
/// builds it (IPv4 in the mapped form, ports in host order).
pub fn conn_key(client: SocketAddr, agent: SocketAddr) -> ConnKey {
    let words = |ip: IpAddr| {
        ip6_words(match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        })
    };
    ConnKey {
        client_addr: words(client.ip()),
        agent_addr: words(agent.ip()),
        client_port: u32::from(client.port()),
        agent_port: u32::from(agent.port()),
    }
}

/// A key of the attestation map as (client, agent) socket addresses.
pub fn conn_addrs(key: &ConnKey) -> (SocketAddr, SocketAddr) {
    let addr = |words: [u32; 4], port: u32| {
        let ip = Ipv6Addr::from(ip6_octets(words));
        SocketAddr::new(IpAddr::V6(ip).to_canonical(), port as u16)
    };
    (
        addr(key.client_addr, key.client_port),
        addr(key.agent_addr, key.agent_port),
    )
}

fn attest_map(pin_path: &Path) -> HashMap<MapData, ConnKey, Attestation> {
    HashMap::try_from(open(pin_path, maps::ATTEST)).unwrap_or_else(|e| {
        panic!(
            "{} is not a ConnKey → Attestation hash map: {e}",
            maps::ATTEST
        )
    })
}

/// Every record of the attestation map, as ((client, agent), record).
pub fn attestations(pin_path: &Path) -> Vec<((SocketAddr, SocketAddr), Attestation)> {
    attest_map(pin_path)
        .iter()
        .filter_map(Result::ok)
        .map(|(key, value)| (conn_addrs(&key), value))
        .collect()
}

/// The kernel's record for the connection from `client` to `agent`, if there is one.
pub fn attestation(pin_path: &Path, client: SocketAddr, agent: SocketAddr) -> Option<Attestation> {
    attest_map(pin_path).get(&conn_key(client, agent), 0).ok()
}

fn host_pods_map(pin_path: &Path) -> HashMap<MapData, u64, u8> {
    HashMap::try_from(open(pin_path, maps::HOST_PODS))
        .unwrap_or_else(|e| panic!("{} is not a u64 → u8 hash map: {e}", maps::HOST_PODS))
}

/// Lists the pod cgroup `cgroup_id` as a hostNetwork pod served its own role, as the agent's
/// host-pods sync does.
pub fn add_host_pod(pin_path: &Path, cgroup_id: u64) {
    host_pods_map(pin_path)
        .insert(cgroup_id, 1, 0)
        .unwrap_or_else(|e| panic!("cannot write {cgroup_id} to {}: {e}", maps::HOST_PODS));
}

/// Takes `cgroup_id` off the host-pods map.
pub fn remove_host_pod(pin_path: &Path, cgroup_id: u64) {
    host_pods_map(pin_path)
        .remove(&cgroup_id)
        .unwrap_or_else(|e| panic!("cannot remove {cgroup_id} from {}: {e}", maps::HOST_PODS));
}
