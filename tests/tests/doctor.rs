//! `kube2iam-agent doctor` on the host kernel, pointed at a test node's cgroup and private bpffs
//! (never at the machine's cgroup2 root): its probes work, they leave nothing behind, and it
//! reports the pinned state, other programs, and the reasons the agent cannot run.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use kube2iam_tests::{
    Agent, TestNode, agent_binary,
    bpf::{self, AttachType, CgroupLink},
    process::output_within,
};

/// Runs the doctor against the node's cgroup and pin path; `configure` may change the command.
fn doctor(node: &TestNode, cgroup: &Path, configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = node.command(agent_binary());
    command
        .arg("doctor")
        .arg("--cgroup-path")
        .arg(cgroup)
        .arg("--bpf-pin-path")
        .arg(node.pin_path());
    configure(&mut command);
    output_within(
        &mut command,
        Duration::from_secs(60),
        "kube2iam-agent doctor",
    )
}

/// The report's row for `check`: `(status, result)`, the result's wrapped lines joined. Columns
/// are found from the header's offsets.
fn row(output: &Output, check: &str) -> (String, String) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<Vec<char>> = stdout.lines().map(|l| l.chars().collect()).collect();
    let header: String = lines
        .first()
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    let (Some(status_at), Some(result_at), Some(fix_at)) = (
        header.find("STATUS"),
        header.find("RESULT"),
        header.find("WHAT TO DO"),
    ) else {
        panic!("the doctor printed no table header:\n{stdout}");
    };
    let cell = |line: &[char], from: usize, to: usize| -> String {
        line.iter()
            .skip(from)
            .take(to.saturating_sub(from))
            .collect::<String>()
            .trim()
            .to_owned()
    };
    let start = lines
        .iter()
        .position(|l| cell(l, 0, status_at) == check)
        .unwrap_or_else(|| panic!("the doctor printed no {check:?} row:\n{stdout}"));
    let status = cell(&lines[start], status_at, result_at);
    let mut result = cell(&lines[start], result_at, fix_at);
    for line in lines[start + 1..]
        .iter()
        .take_while(|l| cell(l, 0, result_at).is_empty() && !l.is_empty())
    {
        let more = cell(line, result_at, fix_at);
        if !more.is_empty() {
            result.push(' ');
            result.push_str(&more);
        }
    }
    (status, result)
}

fn describe(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Nothing the doctor made is left: no child cgroup of the target, no transient pin directory.
fn assert_nothing_left(node: &TestNode) {
    let children: Vec<_> = fs::read_dir(node.cgroup_path())
        .expect("list the test cgroup")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(
        children.is_empty(),
        "the doctor left cgroups behind: {children:?}"
    );
    let pins: Vec<_> = fs::read_dir(node.bpffs())
        .expect("list the node's bpffs")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("doctor"))
        .collect();
    assert!(pins.is_empty(), "the doctor left pins behind: {pins:?}");
}

#[test]
fn doctor_on_a_fresh_node_finds_every_feature_and_leaves_nothing_behind() {
    let node = TestNode::new();
    let output = doctor(&node, node.cgroup_path(), |_| {});
    assert!(
        output.status.success(),
        "the doctor should pass here: {}",
        describe(&output)
    );
    for check in [
        "kernel",
        "capabilities",
        "BTF",
        "hook connect4",
        "hook connect6",
        "hook getpeername4",
        "hook getpeername6",
        "netns cookie helper",
        "SO_NETNS_COOKIE",
        "cgroup2",
        "target cgroup",
        "cgroup bpf_link",
        "socket matching",
        "others at connect4",
        "others at connect6",
        "bpffs",
        "programs",
        "pinned state",
    ] {
        let (status, result) = row(&output, check);
        assert_eq!(status, "ok", "{check}: {result}\n{}", describe(&output));
    }
    let (_, programs) = row(&output, "programs");
    assert!(
        programs.contains("k2i_connect4") && programs.contains("k2i_getpeername6"),
        "the embedded programs should all load: {programs}"
    );
    let (_, pinned) = row(&output, "pinned state");
    assert!(pinned.starts_with("nothing at"), "{pinned}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("doctor: ") && l.ends_with("the agent can run")),
        "the last line is the summary:\n{stdout}"
    );
    assert_nothing_left(&node);
}

#[test]
fn doctor_reports_the_pinned_state_and_other_programs_on_the_cgroup() {
    let node = TestNode::new();
    let other = CgroupLink::attach(
        bpf::load_port_rewrite_connect4(7777, 7778),
        node.cgroup_path(),
        AttachType::Inet4Connect,
    );
    let mut agent = Agent::start(&node);
    agent.kill9();

    let output = doctor(&node, node.cgroup_path(), |_| {});
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "{}", describe(&output));
    let (status, pinned) = row(&output, "pinned state");
    assert_eq!(status, "ok", "{pinned}");
    for part in [
        "k2i_connect4 (link",
        "config enabled (agent 192.0.2.10:8181)",
        "programs match this binary",
        "adopts them",
    ] {
        assert!(
            pinned.contains(part),
            "pinned state should say {part:?}: {pinned}"
        );
    }
    let (status, others4) = row(&output, "others at connect4");
    assert_eq!(status, "WARN", "{others4}");
    let other_id = other.info().prog_id;
    assert!(
        others4.contains(&format!("id {other_id}")),
        "the other connect4 program (id {other_id}) should be listed, and ours not: {others4}"
    );
    let (status, others6) = row(&output, "others at connect6");
    assert_eq!(
        (status.as_str(), others6.as_str()),
        ("ok", "no other program")
    );
    assert_nothing_left(&node);
}

#[test]
fn doctor_fails_when_the_pinned_links_belong_to_another_cgroup() {
    let node = TestNode::new();
    let mut agent = Agent::start(&node);
    agent.kill9();
    // The node's pins, checked against another cgroup2 directory.
    let elsewhere = node.cgroup_path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("create a child cgroup");
    let output = doctor(&node, &elsewhere, |_| {});
    let _ = fs::remove_dir(&elsewhere);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (status, pinned) = row(&output, "pinned state");
    assert_eq!(status, "FAIL", "{pinned}");
    assert!(pinned.contains("another cgroup"), "{pinned}");
}

#[test]
fn doctor_fails_without_privileges_and_on_a_path_that_is_not_cgroup2() {
    let node = TestNode::new();
    let output = doctor(&node, node.cgroup_path(), |command| {
        // SAFETY: prctl only, between fork and exec; root keeps uid 0 but gets no capability.
        unsafe {
            command.pre_exec(|| {
                for cap in 0..=63 {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                }
                Ok(())
            });
        }
    });
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (status, caps) = row(&output, "capabilities");
    assert_eq!(status, "FAIL", "{caps}");
    let (status, hook) = row(&output, "hook connect4");
    assert_eq!(status, "FAIL", "without capabilities nothing loads: {hook}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("the agent cannot run"),
        "{}",
        describe(&output)
    );
    assert_nothing_left(&node);

    let output = doctor(&node, Path::new("/proc"), |_| {});
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let (status, target) = row(&output, "target cgroup");
    assert_eq!(status, "FAIL", "{target}");
    assert!(target.contains("not a cgroup2 directory"), "{target}");
}
