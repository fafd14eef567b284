//! `cargo xtask clean-test-env`: removes what integration tests left behind (see `leftovers`),
//! after a crash or a killed test run. Processes inside test namespaces and cgroups are killed
//! first, so nothing keeps the namespaces or the BPF programs alive.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    cmd,
    leftovers::{self, Leftovers, RUN_DIR},
};

/// How long killed processes get to exit and the kernel to release what they held.
const SETTLE: Duration = Duration::from_secs(5);

pub fn run() -> Result<()> {
    let found = Leftovers::find()?;
    let run_dir = Path::new(RUN_DIR);
    if found.is_empty() && !run_dir.exists() {
        println!("clean-test-env: nothing to remove");
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "clean-test-env needs root to remove: {}",
            found.lines().join(", ")
        );
    }

    let mut removed = Vec::new();
    let mut failures = Vec::new();
    let mut record = |what: String, result: Result<String>| match result {
        Ok(note) => removed.push(format!("{what}{note}")),
        Err(error) => failures.push(format!("{what}: {error:#}")),
    };
    for name in &found.netns {
        record(format!("netns {name}"), remove_netns(name));
    }
    for cgroup in &found.cgroups {
        record(
            format!("cgroup {}", cgroup.display()),
            remove_cgroup_tree(cgroup),
        );
    }
    // Deleting the namespaces took their veths along; look again for the ones outside.
    for name in leftovers::links()? {
        record(format!("link {name}"), remove_link(&name));
    }
    for mount in found.mounts.iter().rev() {
        record(format!("mount {}", mount.display()), unmount(mount));
    }
    if run_dir.exists() {
        record(format!("directory {RUN_DIR}"), remove_run_dir(run_dir));
    }

    for line in &removed {
        println!("removed {line}");
    }
    let remaining = Leftovers::find_settled(SETTLE)?;
    failures.extend(
        remaining
            .lines()
            .into_iter()
            .map(|line| format!("{line} remains")),
    );
    if !failures.is_empty() {
        bail!(
            "clean-test-env could not remove everything:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Kills every process in the namespace, then deletes its name (the namespace itself goes
/// when nothing holds it any more).
fn remove_netns(name: &str) -> Result<String> {
    let mut killed = BTreeSet::new();
    let deadline = Instant::now() + SETTLE;
    loop {
        let pids = cmd::output(cmd::command("ip").args(["netns", "pids", name]))?;
        let pids: Vec<i32> = pids
            .lines()
            .filter_map(|pid| pid.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} are still running in it");
        }
        for pid in pids {
            if kill(pid)? {
                killed.insert(pid);
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    cmd::output(cmd::command("ip").args(["netns", "delete", name]))?;
    Ok(killed_note(&killed))
}

/// Kills the processes of the cgroup and of every cgroup below it, and removes them deepest
/// first.
fn remove_cgroup_tree(top: &Path) -> Result<String> {
    let mut cgroups = Vec::new();
    deepest_first(top, &mut cgroups)?;
    let mut killed = BTreeSet::new();
    for cgroup in &cgroups {
        let deadline = Instant::now() + SETTLE;
        loop {
            let procs = cgroup.join("cgroup.procs");
            let pids = fs::read_to_string(&procs)
                .with_context(|| format!("reading {}", procs.display()))?;
            for pid in pids.lines().filter_map(|pid| pid.trim().parse().ok()) {
                if kill(pid)? {
                    killed.insert(pid);
                }
            }
            match fs::remove_dir(cgroup) {
                Ok(()) => break,
                // Busy while the killed processes are still exiting.
                Err(error)
                    if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("rmdir {}", cgroup.display()));
                }
            }
        }
    }
    let nested = cgroups.len() - 1;
    let mut note = killed_note(&killed);
    if nested > 0 {
        note.push_str(&format!(" with {nested} nested cgroup(s)"));
    }
    Ok(note)
}

/// `dir` and the directories below it, children before their parent.
fn deepest_first(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            deepest_first(&entry.path(), out)?;
        }
    }
    out.push(dir.to_owned());
    Ok(())
}

fn remove_link(name: &str) -> Result<String> {
    match cmd::output(cmd::command("ip").args(["link", "delete", name])) {
        Ok(_) => Ok(String::new()),
        // Gone meanwhile: its peer's namespace was being destroyed.
        Err(_) if !leftovers::links()?.iter().any(|link| link == name) => Ok(String::new()),
        Err(error) => Err(error),
    }
}

/// Lazily detaches the mount (MNT_DETACH), so a busy one goes too.
fn unmount(path: &Path) -> Result<String> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(String::new());
    }
    let error = io::Error::last_os_error();
    // EINVAL: no longer a mount point, e.g. already detached with a stacked mount.
    if error.raw_os_error() == Some(libc::EINVAL)
        && !leftovers::mounts_under(path)?.contains(&path.to_owned())
    {
        return Ok(String::new());
    }
    Err(anyhow!(error).context(format!("umount2 {}", path.display())))
}

fn remove_run_dir(dir: &Path) -> Result<String> {
    // Never descend into a file system that is still mounted here.
    let mounts = leftovers::mounts_under(dir)?;
    if !mounts.is_empty() {
        bail!("still mounted: {mounts:?}");
    }
    fs::remove_dir_all(dir)?;
    Ok(String::new())
}

/// SIGKILL; `Ok(false)` when the process had already exited.
fn kill(pid: i32) -> Result<bool> {
    if pid <= 1 || pid == std::process::id() as i32 {
        bail!("refusing to kill pid {pid}: it is init or this process");
    }
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(anyhow!(error).context(format!("kill -9 {pid}")))
}

fn killed_note(killed: &BTreeSet<i32>) -> String {
    if killed.is_empty() {
        String::new()
    } else {
        let pids: Vec<String> = killed.iter().map(i32::to_string).collect();
        format!(" (killed {})", pids.join(", "))
    }
}
