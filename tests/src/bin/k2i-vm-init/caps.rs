//! The capabilities the agent needs on this kernel, measured: the agent runs as root with its
//! bounding set cut down (as a pod that drops ALL and adds a few), and a set "works" when the
//! whole job gets done, not just the start.
//!
//! * `find`: start from every capability, cut everything but the usual suspects in one step,
//!   then drop one capability at a time while the job still works. The result is minimal: each
//!   capability left is needed. Done twice, trying CAP_SYS_ADMIN first and last, because there
//!   are two kinds of answer (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN).
//! * `verify`: the documented set works and every set with one capability fewer does not.
//!
//! Then the doctor must agree: with the install set it says the agent can run, and with any one
//! capability fewer it says it cannot.

use std::{net::IpAddr, path::Path, time::Duration};

use kube2iam_common::caps;
use kube2iam_tests::metadata_addr4;
use serde_json::json;

use crate::{
    report::{Outcome, Tally, emit},
    suite::PIN_DIR,
    topology::{Node, POD_IP4},
    vmagent::{self, VmAgent},
};

fn name(cap: u32) -> String {
    caps::name(cap)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("CAP_{cap}"))
}

fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|c| mask & (1u64 << c) != 0)
        .map(name)
        .collect()
}

/// `bpf+net_admin` → mask.
pub fn parse_set(spec: &str) -> Option<u64> {
    spec.split('+')
        .filter(|s| !s.is_empty())
        .map(|s| caps::number(s).map(|n| 1u64 << n))
        .sum::<Option<u64>>()
}

fn all() -> u64 {
    let last = vmagent::cap_last_cap().min(63);
    if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    }
}

fn bit(cap: u32) -> u64 {
    1u64 << cap
}

/// The capabilities worth trying one by one (in this order); everything else is dropped in one
/// step first.
const SUSPECTS: [u32; 11] = [
    caps::SYS_ADMIN,
    caps::PERFMON,
    caps::SYS_RESOURCE,
    caps::DAC_OVERRIDE,
    2,  // dac_read_search
    3,  // fowner
    14, // ipc_lock
    19, // sys_ptrace
    13, // net_raw
    caps::BPF,
    caps::NET_ADMIN,
];

/// What a scenario needs to prove.
#[derive(Clone, Copy, Debug)]
pub enum Scenario {
    /// A fresh agent attaches, and a pod's metadata connect reaches it.
    Install,
    /// A restarted agent adopts the pinned links, and a pod's connect reaches it.
    Restart,
    /// A restarted agent whose programs differ from the pinned ones swaps them through the
    /// pinned links (BPF_LINK_UPDATE), as after an upgrade, and a pod's connect reaches it. The
    /// new programs differ here by their kernel log level (`--log-level debug`), which makes the
    /// agent replace them exactly as a new eBPF object would.
    Upgrade,
    /// `kube2iam-agent uninstall` detaches and unpins everything.
    Uninstall,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Install,
        Scenario::Restart,
        Scenario::Upgrade,
        Scenario::Uninstall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Install => "install",
            Scenario::Restart => "restart",
            Scenario::Upgrade => "upgrade",
            Scenario::Uninstall => "uninstall",
        }
    }
}

/// Removes whatever a trial left (with full capabilities).
fn reset() {
    let _ = vmagent::agent_command(&["uninstall"], None, Duration::from_secs(60));
}

fn redirected(node: &Node) -> Result<(), String> {
    let result = node.pod_probe(metadata_addr4(), &[]);
    if result.ok && result.reached_agent_stub() && result.seen_as() == Some(IpAddr::V4(POD_IP4)) {
        Ok(())
    } else {
        Err(format!(
            "the pod's connect did not reach the agent: {result:?}"
        ))
    }
}

fn last_error(agent: &VmAgent) -> String {
    let lines = agent.lines();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR"))
        .or(lines.last())
        .cloned()
        .unwrap_or_default()
}

fn first_line(text: &str) -> String {
    text.lines()
        .nth(1)
        .or(text.lines().next())
        .unwrap_or("")
        .to_owned()
}

/// Runs the scenario with `caps`; `Ok` when the whole job got done.
fn trial(scenario: Scenario, node: &Node, caps: u64) -> Result<(), String> {
    reset();
    let result = match scenario {
        Scenario::Install => VmAgent::start(&[], Some(caps))
            .map_err(|e| first_line(&e))
            .and_then(|mut agent| {
                let held = agent.cap_eff().unwrap_or(0);
                if held != caps {
                    let _ = agent.terminate();
                    return Err(format!(
                        "the agent holds {} instead of {}",
                        names(held).join("+"),
                        names(caps).join("+")
                    ));
                }
                let done = redirected(node);
                let stopped = agent.terminate();
                done.and(stopped.map(drop))
                    .map_err(|e| format!("{e} ({})", last_error(&agent)))
            }),
        Scenario::Restart => {
            let mut first = VmAgent::start(&[], None).map_err(|e| format!("setup: {e}"))?;
            first.kill9();
            VmAgent::start(&[], Some(caps))
                .map_err(|e| first_line(&e))
                .and_then(|mut agent| {
                    let adopted = agent.lines().iter().any(|l| l.contains("Adopted"));
                    let done = redirected(node).and_then(|()| {
                        adopted
                            .then_some(())
                            .ok_or_else(|| "the links were not adopted".into())
                    });
                    let stopped = agent.terminate();
                    done.and(stopped.map(drop))
                })
        }
        Scenario::Upgrade => {
            let mut first = VmAgent::start(&[], None).map_err(|e| format!("setup: {e}"))?;
            first.kill9();
            VmAgent::start(&["--log-level", "debug"], Some(caps))
                .map_err(|e| first_line(&e))
                .and_then(|mut agent| {
                    let replaced = agent
                        .lines()
                        .iter()
                        .filter(|l| l.contains("replaced the pinned program atomically"))
                        .count();
                    let done = redirected(node).and_then(|()| {
                        (replaced > 0)
                            .then_some(())
                            .ok_or_else(|| "no program was replaced".into())
                    });
                    let stopped = agent.terminate();
                    done.and(stopped.map(drop))
                })
        }
        Scenario::Uninstall => {
            let mut first = VmAgent::start(&[], None).map_err(|e| format!("setup: {e}"))?;
            first.kill9();
            let output =
                vmagent::agent_command(&["uninstall"], Some(caps), Duration::from_secs(60));
            if output.status.success() && !Path::new(PIN_DIR).exists() {
                Ok(())
            } else {
                Err(format!(
                    "uninstall: {}",
                    String::from_utf8_lossy(&output.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ))
            }
        }
    };
    reset();
    println!(
        "caps| {} with {}: {}",
        scenario.name(),
        names(caps).join(" "),
        match &result {
            Ok(()) => "works".to_owned(),
            Err(e) => format!("fails: {e}"),
        }
    );
    result
}

/// Greedy minimisation from every capability, trying removals in `order`.
fn minimize(scenario: Scenario, node: &Node, order: &[u32]) -> Result<u64, String> {
    let full = all();
    trial(scenario, node, full).map_err(|e| format!("fails even with every capability: {e}"))?;
    let suspects: u64 = SUSPECTS.iter().map(|c| bit(*c)).sum::<u64>() & full;
    let mut set = if trial(scenario, node, suspects).is_ok() {
        suspects
    } else {
        full
    };
    for cap in order.iter().copied().chain(0..=63) {
        if set & bit(cap) == 0 {
            continue;
        }
        let without = set & !bit(cap);
        if trial(scenario, node, without).is_ok() {
            set = without;
        }
    }
    Ok(set)
}

/// `find` for every scenario; then the doctor's verdict is checked against the install set.
pub fn find(tally: &mut Tally, node: &Node) {
    let mut install_set = None;
    for scenario in Scenario::ALL {
        let mut sets = Vec::new();
        tally.run(
            &format!("capabilities: find the minimal set for {}", scenario.name()),
            || {
                // CAP_SYS_ADMIN first: the fine-grained answer; then last: the coarse one.
                let fine: Vec<u32> = SUSPECTS.to_vec();
                let head = [caps::BPF, caps::NET_ADMIN, caps::PERFMON];
                let coarse: Vec<u32> = head
                    .into_iter()
                    .chain(
                        SUSPECTS
                            .into_iter()
                            .filter(|c| !head.contains(c) && *c != caps::SYS_ADMIN),
                    )
                    .chain([caps::SYS_ADMIN])
                    .collect();
                for order in [fine, coarse] {
                    let set = minimize(scenario, node, &order).unwrap_or_else(|e| panic!("{e}"));
                    if !sets.contains(&set) {
                        sets.push(set);
                    }
                }
                Outcome::Pass(
                    sets.iter()
                        .map(|s| names(*s).join("+"))
                        .collect::<Vec<_>>()
                        .join(" | "),
                )
            },
        );
        for set in &sets {
            emit(
                json!({"event": "caps", "scenario": scenario.name(), "mode": "find", "set": names(*set)}),
            );
        }
        if matches!(scenario, Scenario::Install) {
            install_set = sets.first().copied();
        }
    }
    if let Some(set) = install_set {
        doctor_agrees(tally, set);
    }
}

/// `verify` for each scenario with its documented set.
pub fn verify(tally: &mut Tally, node: &Node, expected: &[(Scenario, u64)]) {
    for (scenario, set) in expected {
        let (scenario, set) = (*scenario, *set);
        let passed = tally.run(
            &format!(
                "capabilities: {} needs exactly {}",
                scenario.name(),
                names(set).join("+")
            ),
            || {
                trial(scenario, node, set).unwrap_or_else(|e| {
                    panic!(
                        "{} does not work with {}: {e}",
                        scenario.name(),
                        names(set).join("+")
                    )
                });
                for cap in names_of(set) {
                    let fewer = set & !bit(cap);
                    assert!(
                        trial(scenario, node, fewer).is_err(),
                        "{} also works without {}: the documented set is not minimal",
                        scenario.name(),
                        name(cap)
                    );
                }
                Outcome::Pass(format!(
                    "works, and fails without any one of {}",
                    names(set).join(", ")
                ))
            },
        );
        emit(json!({
            "event": "caps", "scenario": scenario.name(), "mode": "verify",
            "set": names(set), "ok": passed,
        }));
    }
    if let Some((_, set)) = expected
        .iter()
        .find(|(s, _)| matches!(s, Scenario::Install))
    {
        doctor_agrees(tally, *set);
    }
}

fn names_of(set: u64) -> Vec<u32> {
    (0..64).filter(|c| set & bit(*c) != 0).collect()
}

/// The doctor says "can run" with the install set and "cannot run" with any one capability
/// fewer.
fn doctor_agrees(tally: &mut Tally, set: u64) {
    tally.run(
        "capabilities: the doctor's verdict matches the measured set",
        || {
            reset();
            let (code, summary, table) = vmagent::doctor(Some(set));
            assert_eq!(
                code,
                Some(0),
                "with {} the agent runs, but the doctor says: {summary}\n{table}",
                names(set).join("+")
            );
            for cap in names_of(set) {
                let (code, summary, _) = vmagent::doctor(Some(set & !bit(cap)));
                assert_eq!(
                    code,
                    Some(1),
                    "without {} the agent cannot run, but the doctor says: {summary}",
                    name(cap)
                );
            }
            Outcome::Pass(format!(
                "agrees for {} and each one fewer",
                names(set).join("+")
            ))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_parse_and_print() {
        assert_eq!(parse_set("bpf+net_admin"), Some(bit(39) | bit(12)));
        assert_eq!(parse_set("CAP_SYS_ADMIN"), Some(bit(21)));
        assert_eq!(parse_set("bpf+nonsense"), None);
        assert_eq!(names(bit(39) | bit(12)), vec!["CAP_NET_ADMIN", "CAP_BPF"]);
    }
}
