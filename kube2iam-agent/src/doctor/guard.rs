//! The doctor's rows for the packet guard (on every interface matching `--host-interface`,
//! present and first) and the egress backstop (its pinned link).

use std::{os::fd::AsFd as _, path::Path};

use super::Check;
use crate::bpf::{
    egress,
    guard::{self, InterfacePatterns, InterfaceStatus, Placement},
    sys,
};

const GUARD: &str = "packet guard";
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
            GUARD,
            format!(
                "{} interfaces match --host-interface ({}); the agent guards them when it starts",
                statuses.len(),
                list(&names(|_| true))
            ),
        );
    }
    if missing.is_empty() && behind.is_empty() {
        return Check::ok(
            GUARD,
            format!(
                "first on all {} matching interfaces ({})",
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
        GUARD,
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

/// The packet guard row for this host.
pub fn packet_guard_check(pin_dir: &Path, patterns: Option<&InterfacePatterns>) -> Check {
    let Some(patterns) = patterns else {
        return Check::warn(
            GUARD,
            "off (--packet-guard false)",
            "raw IP and AF_PACKET traffic from pods to the metadata service is not dropped on \
             their interfaces; turn it on unless another layer blocks it",
        );
    };
    let all: Vec<String> = guard::interfaces()
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    match guard::status(pin_dir, patterns) {
        Ok(statuses) => packet_guard_row(&statuses, &all, pin_dir.exists()),
        Err(e) => Check::warn(
            GUARD,
            format!("cannot read the interfaces' tc programs: {e}"),
            "needs CAP_NET_ADMIN (and CAP_BPF for TCX)",
        ),
    }
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
    use crate::doctor::Status;

    fn iface(name: &str, placement: Placement) -> InterfaceStatus {
        InterfaceStatus {
            name: name.into(),
            ifindex: 1,
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
    fn no_matching_interface_names_the_ones_there_are() {
        let row = packet_guard_row(&[], &["eth0".into(), "net1".into()], true);
        assert_eq!(row.status, Status::Warn);
        assert!(row.result.contains("eth0, net1"), "{}", row.result);
        assert!(row.fix.contains("Multus"), "{}", row.fix);
    }
}
