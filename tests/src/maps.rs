//! The agent's pinned maps, read and changed through aya as a second userspace would.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use kube2iam_common::{CONFIG_KEY, COUNTER_SLOTS, Config, Counter, maps};

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
