//! The doctor's rows for the packet guard (on every interface matching `--host-interface`,
//! present and first), the node guard (on every other interface but loopback) and the egress
//! backstop (its pinned link).

use std::{os::fd::AsFd as _, path::Path};

use super::report::Check;
use crate::bpf::{
    egress,
    guard::{self, Coverage, InterfacePatterns, InterfaceStatus, Kind, Placement},
    sys,
};

const GUARD: &str = "packet guard";
const NODE_GUARD: &str = "node guard";
const EGRESS: &str = "egress guard";
/// Interfaces named in one row, at most.
const SHOWN: usize = 8;

fn list(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

/// The packet guard row from what [`guard::status`] found. `installed`: the agent has run here
/// (its pin directory exists); before that, no interface is guarded yet and that is expected.
pub fn packet_guard_row(
    statuses: &[InterfaceStatus],
    all_interfaces: &[String],
    installed: bool,
) -> Check {
    guard_row(GUARD, "matching", statuses, all_interfaces, installed)
}

/// The row of one guard (`label`) over the interfaces it covers (`which`: how the row names
/// them).
fn guard_row(
    label: &'static str,
    which: &str,
    statuses: &[InterfaceStatus],
    all_interfaces: &[String],
    installed: bool,
) -> Check {
    if statuses.is_empty() && label == NODE_GUARD {
        return Check::ok(
            NODE_GUARD,
            "no interface other than the pod interfaces and loopback",
        );
    }
    if statuses.is_empty() {
        return Check::warn(
            GUARD,
            format!(
                "no interface matches --host-interface; this node has {}",
                list(all_interfaces)
            ),
            "set --host-interface (chart: hostInterface) to the host side of the pod \
             interfaces, e.g. eni+ (VPC CNI), cali+ (Calico), lxc+ (Cilium); with Multus or \
             macvlan/ipvlan see docs/troubleshooting.md",
        );
    }
    let names = |f: fn(&Placement) -> bool| -> Vec<String> {
        statuses
            .iter()
            .filter(|s| f(&s.placement))
            .map(|s| s.name.clone())
            .collect()
    };
    let first = names(|p| matches!(p, Placement::First));
    let missing = names(|p| matches!(p, Placement::Missing));
    let behind: Vec<String> = statuses
        .iter()
        .filter_map(|s| match &s.placement {
            Placement::NotFirst { before } => Some(format!("{} (behind {before})", s.name)),
            _ => None,
        })
        .collect();
    if !installed {
        return Check::ok(
            label,
            format!(
                "{} {which} interfaces ({}); the agent guards them when it starts",
                statuses.len(),
                list(&names(|_| true))
            ),
        );
    }
    if missing.is_empty() && behind.is_empty() {
        return Check::ok(
            label,
            format!(
                "first on all {} {which} interfaces ({})",
                first.len(),
                list(&first)
            ),
        );
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("unguarded: {}", list(&missing)));
    }
    if !behind.is_empty() {
        problems.push(format!("not first: {}", list(&behind)));
    }
    Check::warn(
        label,
        format!(
            "{}; first on {} of {}",
            problems.join("; "),
            first.len(),
            statuses.len()
        ),
        "a running agent repairs this within --guard-resync-interval; if it persists, the \
         agent's log says why (packet guard errors), or another program keeps putting itself \
         first (kube2iam_packet_guard_interfaces{state=\"not_first\"})",
    )
}

/// The packet guard and node guard rows for this host.
pub fn packet_guard_checks(
    pin_dir: &Path,
    patterns: Option<&InterfacePatterns>,
    node: bool,
) -> Vec<Check> {
    let off_pods = || {
        Check::warn(
            GUARD,
            "off (--packet-guard false)",
            "raw IP and AF_PACKET traffic from pods to the metadata service is not dropped on \
             their interfaces; turn it on unless another layer blocks it",
        )
    };
    let off_node = || {
        Check::warn(
            NODE_GUARD,
            "off (--node-guard false)",
            "a packet a pod wraps in a tunnel (VXLAN, IPIP, GRE) to the node's own address is \
             forwarded to the metadata service after decapsulation; turn it on",
        )
    };
    let Some(coverage) = Coverage::new(patterns.cloned(), node) else {
        return vec![off_pods(), off_node()];
    };
    let all: Vec<String> = guard::interfaces()
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    let statuses = match guard::status(pin_dir, &coverage) {
        Ok(statuses) => statuses,
        Err(e) => {
            let unreadable = |label| {
                Check::warn(
                    label,
                    format!("cannot read the interfaces' tc programs: {e}"),
                    "needs CAP_NET_ADMIN (and CAP_BPF for TCX)",
                )
            };
            return vec![unreadable(GUARD), unreadable(NODE_GUARD)];
        }
    };
    let of = |kind: Kind| -> Vec<InterfaceStatus> {
        statuses
            .iter()
            .filter(|s| s.kind == kind)
            .cloned()
            .collect()
    };
    let installed = pin_dir.exists();
    vec![
        if patterns.is_some() {
            packet_guard_row(&of(Kind::Pod), &all, installed)
        } else {
            off_pods()
        },
        if node {
            guard_row(NODE_GUARD, "other", &of(Kind::Node), &all, installed)
        } else {
            off_node()
        },
    ]
}

/// The egress backstop row: its pinned link, once the agent has run.
pub fn egress_check(pin_dir: &Path, enabled: bool) -> Check {
    let path = egress::link_path(pin_dir);
    if !enabled {
        return Check::warn(
            EGRESS,
            "off (--egress-guard false)",
            "a pod that DNATs another address to the metadata service, or sends raw packets \
             on an interface the packet guard does not cover, reaches it; turn it on",
        );
    }
    if !pin_dir.exists() {
        return Check::ok(
            EGRESS,
            "not attached yet; the agent attaches it beside the connect hooks",
        );
    }
    match sys::obj_get(&path).and_then(|link| sys::link_info(link.as_fd())) {
        Ok(info) => Check::ok(
            EGRESS,
            format!("attached (link {}, cgroup id {})", info.id, info.cgroup_id),
        ),
        Err(e) => Check::warn(
            EGRESS,
            format!("no pinned link at {}: {e}", path.display()),
            "a starting agent attaches it; an agent older than the backstop does not",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    fn iface(name: &str, placement: Placement) -> InterfaceStatus {
        InterfaceStatus {
            name: name.into(),
            ifindex: 1,
            kind: Kind::Pod,
            placement,
        }
    }

    #[test]
    fn unguarded_and_not_first_interfaces_are_named() {
        let statuses = [
            iface("lxc1", Placement::First),
            iface("lxc2", Placement::Missing),
            iface(
                "lxc3",
                Placement::NotFirst {
                    before: "TCX program cil_from_container (id 9)".into(),
                },
            ),
        ];
        let row = packet_guard_row(&statuses, &[], true);
        assert_eq!(row.status, Status::Warn);
        assert!(row.result.contains("unguarded: lxc2"), "{}", row.result);
        assert!(
            row.result
                .contains("not first: lxc3 (behind TCX program cil_from_container (id 9))"),
            "{}",
            row.result
        );
        assert!(row.result.contains("first on 1 of 3"), "{}", row.result);

        let all_first = [iface("lxc1", Placement::First)];
        assert_eq!(packet_guard_row(&all_first, &[], true).status, Status::Ok);
        // Before the agent ever ran, nothing is guarded yet, as expected.
        let fresh = [iface("lxc1", Placement::Missing)];
        assert_eq!(packet_guard_row(&fresh, &[], false).status, Status::Ok);
    }

    #[test]
    fn the_node_guard_row_names_its_own_unguarded_interfaces() {
        let statuses = [
            InterfaceStatus {
                kind: Kind::Node,
                ..iface("eth0", Placement::First)
            },
            InterfaceStatus {
                kind: Kind::Node,
                ..iface("flannel.1", Placement::Missing)
            },
        ];
        let row = guard_row(NODE_GUARD, "other", &statuses, &[], true);
        assert_eq!(row.status, Status::Warn);
        assert_eq!(row.name, NODE_GUARD);
        assert!(
            row.result.contains("unguarded: flannel.1"),
            "{}",
            row.result
        );
        // Nothing but pod interfaces and loopback: nothing to guard, and that is fine.
        assert_eq!(
            guard_row(NODE_GUARD, "other", &[], &["lo".into()], true).status,
            Status::Ok
        );
    }

    #[test]
    fn no_matching_interface_names_the_ones_there_are() {
        let row = packet_guard_row(&[], &["eth0".into(), "net1".into()], true);
        assert_eq!(row.status, Status::Warn);
        assert!(row.result.contains("eth0, net1"), "{}", row.result);
        assert!(row.fix.contains("Multus"), "{}", row.fix);
    }
}
