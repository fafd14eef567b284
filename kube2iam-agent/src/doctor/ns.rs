//! Fork and mount-namespace plumbing for the probes: a forked child that connects from a
//! cgroup, and a forked child in a private mount namespace whose checks come back through a
//! pipe. Both fork only while the process is single-threaded.

use std::{
    fs,
    io::{self, Read as _},
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use super::report::Check;

/// Forks a child that joins `cgroup` and connects a UDP socket to 127.0.0.1:9; `Ok(true)` when
/// the connect was refused with EPERM (the program ran).
pub(super) fn connect_from(cgroup: &Path) -> Result<bool, String> {
    if !single_threaded() {
        return Err("the doctor forks only single-threaded".into());
    }
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(|e| format!("open cgroup.procs: {e}"))?;
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    // SAFETY: the process is single-threaded (checked above); the child makes plain syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: plain syscalls on valid arguments, then _exit.
        unsafe {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(3);
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                libc::_exit(3);
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 9u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let rc = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let errno = *libc::__errno_location();
            libc::_exit(match (rc, errno) {
                (0, _) => 1,
                (_, libc::EPERM) => 0,
                _ => 2,
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(procs);
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        Some(3) => Err("the child could not join the cgroup or open a socket".into()),
        _ => Err(format!(
            "the child's connect failed otherwise (status {status:#x})"
        )),
    }
}

/// Whether this process has a single thread (forking is then safe for any code).
fn single_threaded() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map(|n| n.trim() == "1")
        })
        .unwrap_or(false)
}

/// Runs `probe` in a forked child inside a private mount namespace (needs CAP_SYS_ADMIN), so
/// what it mounts is gone when it exits; its checks come back through a pipe.
pub(super) fn in_private_mount_ns(
    probe: impl FnOnce() -> Result<Vec<Check>, String>,
) -> Result<Vec<Check>, String> {
    if !single_threaded() {
        return Err("the doctor runs its mount probes only single-threaded".into());
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let result = enter_private_mount_ns().and_then(|()| probe());
        let text = match result {
            Ok(checks) => {
                let mut text = String::from("ok\n");
                for c in checks {
                    text.push_str(&c.encode());
                    text.push('\n');
                }
                text
            }
            Err(e) => format!("err\n{}\n", e.replace('\n', " ")),
        };
        let mut file = fs::File::from(write_end);
        let _ = io::Write::write_all(&mut file, text.as_bytes());
        drop(file);
        // SAFETY: leave the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(write_end);
    let mut text = String::new();
    let _ = fs::File::from(read_end).read_to_string(&mut text);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut lines = text.lines();
    match lines.next() {
        Some("ok") => Ok(lines.filter_map(Check::decode).collect()),
        Some("err") => Err(lines.next().unwrap_or("failed").to_owned()),
        _ => Err(format!("the probe process died (wait status {status:#x})")),
    }
}

fn enter_private_mount_ns() -> Result<(), String> {
    // SAFETY: plain syscalls on no pointers but static strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS): {} (needs CAP_SYS_ADMIN)",
                io::Error::last_os_error()
            ));
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!("make / private: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}
