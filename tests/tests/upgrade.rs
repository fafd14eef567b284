//! Upgrades over pinned state: the agent loads and attaches in a short-lived child process and
//! meets maps an older release pinned with another definition.
//!
//! Needs root and the agent binary (`cargo build -p kube2iam-agent`; `cargo xtask test` builds
//! it).

use std::{fs, mem::size_of, net::SocketAddr, os::fd::AsFd as _, process::Command};

use kube2iam_common::{REVNAT_CAPACITY, RevNat, ip6_words, maps, port_repr, programs};
use kube2iam_tests::{
    Agent, AgentStub, ImdsStub, TestNode, bpf, metadata_addr4, probe, probe::ProbeResult,
};

const PROBE: &str = env!("CARGO_BIN_EXE_k2i-probe");

fn probe_from(command: Command, addr: SocketAddr) -> ProbeResult {
    let addr = addr.to_string();
    probe::run(command, &["--addr", addr.as_str()])
}

/// The bytes of a reverse-NAT entry as the kernel stores it.
fn revnat_bytes(entry: &RevNat) -> Vec<u8> {
    // SAFETY: RevNat is #[repr(C)] with only u32 fields and no padding (its size is asserted to
    // be 40 in kube2iam-common), so all its bytes are initialised.
    unsafe {
        std::slice::from_raw_parts((entry as *const RevNat).cast::<u8>(), size_of::<RevNat>())
    }
    .to_vec()
}

#[test]
fn a_reverse_nat_map_of_another_size_is_recreated_with_its_entries_and_the_links_use_it() {
    let node = TestNode::new();
    let imds = ImdsStub::start(&node);
    let stub = AgentStub::start(&node);
    let pod = node.add_pod("a");
    let mut agent = Agent::start(&node);
    agent.kill9();

    // What an older release left pinned: the same layout with 65,536 entries, holding the entry
    // of one socket it redirected.
    let path = node.pin_path().join(maps::REVNAT);
    fs::remove_file(&path).expect("unpin this release's map");
    let old = bpf::map_create(
        bpf::MAP_TYPE_LRU_HASH,
        8,
        size_of::<RevNat>() as u32,
        65_536,
        0,
    )
    .expect("create the older release's map");
    let cookie: u64 = 0x4b32_0000_0000_0042;
    let entry = RevNat {
        orig_addr: ip6_words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 169, 254, 169, 254]),
        new_addr: ip6_words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]),
        orig_port: port_repr(80),
        new_port: port_repr(8181),
    };
    bpf::map_update(old.as_fd(), &cookie.to_ne_bytes(), &revnat_bytes(&entry))
        .expect("write the older release's entry");
    bpf::obj_pin(old.as_fd(), &path).expect("pin the older release's map");
    let old_id = bpf::map_info(old.as_fd()).expect("map info").id;
    drop(old);

    let agent = Agent::start(&node);
    assert!(
        agent.log().contains("recreating it"),
        "the agent should say it recreates the map:\n{}",
        agent.log()
    );
    let new = bpf::pinned_map_info(&path);
    assert_ne!(new.id, old_id, "the pinned map should be a new one");
    assert_eq!(new.max_entries, REVNAT_CAPACITY);
    assert_eq!(new.value_size as usize, size_of::<RevNat>());

    let data = aya::maps::MapData::from_pin(&path).expect("open the new map");
    let map: aya::maps::HashMap<_, u64, RevNat> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash");
    let copied = map
        .get(&cookie, 0)
        .expect("the older release's entry was copied");
    assert_eq!(
        revnat_bytes(&copied),
        revnat_bytes(&entry),
        "the copied entry should be the same"
    );

    // Every hook's link runs a program that uses the new map, not the old one.
    for program in [programs::CONNECT4, programs::GETPEERNAME4] {
        let link = bpf::pinned_link_info(&node.pin_path().join("links").join(program));
        let ids = bpf::prog_map_ids(link.prog_id);
        assert!(
            ids.contains(&new.id) && !ids.contains(&old_id),
            "{program} should use the new reverse-NAT map {} (its maps: {ids:?})",
            new.id
        );
    }
    let result = probe_from(pod.command(PROBE), metadata_addr4());
    assert!(
        result.ok && result.reached_agent_stub(),
        "a pod connect after the upgrade: {result:?}"
    );
    assert_eq!(
        result.peer.as_deref(),
        Some("169.254.169.254:80"),
        "getpeername works with the new map"
    );
    assert_eq!(stub.connections(), 1);
    imds.assert_no_pod_seen(&[&pod]);
}

#[test]
fn a_restart_over_unchanged_pins_recreates_nothing_and_the_agent_holds_no_loader() {
    let node = TestNode::new();
    let _imds = ImdsStub::start(&node);
    let _stub = AgentStub::start(&node);
    let mut agent = Agent::start(&node);
    let path = node.pin_path().join(maps::REVNAT);
    let before = bpf::pinned_map_info(&path);
    let link = node.pin_path().join("links").join(programs::CONNECT4);
    let link_before = bpf::pinned_link_info(&link);
    agent.kill9();

    let agent = Agent::start(&node);
    assert!(
        agent.log().contains("recreated_maps=[]"),
        "nothing should be recreated:\n{}",
        agent.log()
    );
    assert_eq!(bpf::pinned_map_info(&path).id, before.id);
    let link_after = bpf::pinned_link_info(&link);
    assert_eq!(link_after.id, link_before.id, "the same link");
    assert_eq!(
        link_after.prog_id, link_before.prog_id,
        "an unchanged program is adopted, not replaced"
    );
    // The long-lived agent never loaded the object: the programs it holds are the guard's two
    // copies (the second puts the guard back in front on TCX), opened from their pins; the
    // loader child (which loaded everything) has exited.
    let fds = fs::read_dir(format!("/proc/{}/fd", agent.pid())).expect("list the agent's fds");
    let mut programs_held: Vec<u32> = fds
        .flatten()
        .filter(|fd| {
            fs::read_link(fd.path())
                .map(|target| target.to_string_lossy().contains("bpf-prog"))
                .unwrap_or(false)
        })
        .filter_map(|fd| {
            let info = fs::read_to_string(format!(
                "/proc/{}/fdinfo/{}",
                agent.pid(),
                fd.file_name().to_string_lossy()
            ))
            .ok()?;
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    programs_held.sort_unstable();
    let progs = node.pin_path().join("progs");
    // Both guards (pod interfaces, and the node guard on every other interface), each with
    // its spare copy.
    let mut guard_copies: Vec<u32> = [programs::GUARD, programs::NODE_GUARD]
        .iter()
        .flat_map(|name| [name.to_string(), format!("{name}_spare")])
        .collect::<Vec<_>>()
        .iter()
        .map(|name| {
            let fd = bpf::obj_get(&progs.join(name))
                .unwrap_or_else(|e| panic!("open the pinned program {name}: {e}"));
            bpf::prog_info(fd.as_fd())
                .unwrap_or_else(|e| panic!("read the pinned program {name}: {e}"))
                .id
        })
        .collect();
    guard_copies.sort_unstable();
    assert_eq!(
        programs_held, guard_copies,
        "the agent should hold only the guards' copies it opened from their pins"
    );
    let children =
        fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.pid())).unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "the loader child should have exited: {children:?}"
    );
}
