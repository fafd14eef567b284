//! Starting processes inside a test node: cgroup and network namespace placement, guards that
//! kill by PID, and running a command to completion under a deadline.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Where a child process goes before it runs `exec`: optionally into a cgroup (by writing "0" to
/// the cgroup's `cgroup.procs`), then optionally into a network namespace (setns).
///
/// Both files are opened here, before `fork`, so the child only makes async-signal-safe calls
/// (`write`, `setns`). They are opened `O_CLOEXEC` and vanish at `exec`.
pub fn place(command: &mut Command, cgroup: Option<&Path>, netns: Option<&Path>) {
    let procs = cgroup.map(|cgroup| {
        let path = cgroup.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {} for writing: {e}", path.display()))
    });
    let netns = netns.map(|netns| {
        File::open(netns)
            .unwrap_or_else(|e| panic!("cannot open network namespace {}: {e}", netns.display()))
    });
    // SAFETY: the closure runs between fork and exec; it only calls write(2) and setns(2) on
    // descriptors opened above and builds io::Error from an errno, none of which allocate or
    // take locks.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if n != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves the calling thread into a network namespace. Sockets it creates afterwards live there.
/// Use it on a dedicated thread only: the rest of the process stays where it was.
pub fn enter_netns_on_this_thread(netns: &Path) -> io::Result<()> {
    let file = File::open(netns)?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the network namespace at `netns` (getsockopt `SO_NETNS_COOKIE`, Linux 5.14),
/// read from a socket made there on a short-lived thread.
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    let netns = netns.to_owned();
    thread::spawn(move || {
        enter_netns_on_this_thread(&netns)?;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid socket and an output buffer of `len` bytes; 71 is SO_NETNS_COOKIE.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                71,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the netns cookie thread panicked")))
}

/// A started child process that is killed (SIGKILL, by PID) and reaped when dropped, if it is
/// still running.
pub struct ChildGuard {
    child: Child,
    name: String,
    reaped: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command`, panicking with `name` if that fails.
    pub fn spawn(command: &mut Command, name: &str) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Self {
            child,
            name: name.to_owned(),
            reaped: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The standard streams the command was given as `Stdio::piped()`.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has ended (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waitpid on {} failed: {e}", self.name));
        }
        self.reaped
    }

    /// Waits until the process ends or `timeout` passes.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process, by PID, if it has not been reaped yet.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.try_wait().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the PID of our own unreaped child, which therefore cannot have
        // been reused.
        unsafe { libc::kill(pid, signal) };
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} (pid {}) survived SIGKILL", self.name, self.pid()))
    }

    /// SIGTERM and wait up to `timeout`; SIGKILL and panic if it does not end in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "{} (pid {}) did not exit within {timeout:?} of SIGTERM",
                    self.name,
                    self.pid()
                );
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_wait_quiet().is_none() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: as in `signal`: our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

impl ChildGuard {
    fn try_wait_quiet(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().ok().flatten();
        }
        self.reaped
    }
}

/// Runs `command` to completion, capturing stdout and stderr; kills it and panics if it takes
/// longer than `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration, name: &str) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(command, name);
    let stdout = drain(guard.child_mut().stdout.take());
    let stderr = drain(guard.child_mut().stderr.take());
    let status = guard.wait_timeout(timeout);
    let status = match status {
        Some(status) => status,
        None => {
            guard.kill9();
            let stdout = stdout.join().unwrap_or_default();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{name} did not finish within {timeout:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(stream: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `ip <args>` from the machine's namespaces (use `-n <netns>` to configure a test
/// namespace), panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let output = output_within(Command::new("ip").args(args), Duration::from_secs(20), "ip");
    assert!(
        output.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Like [`ip`], for cleanup paths: reports a failure on stderr instead of panicking.
pub fn ip_quiet(args: &[&str]) -> bool {
    let spawned = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match spawned {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            eprintln!(
                "cleanup: `ip {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("cleanup: cannot run `ip {}`: {e}", args.join(" "));
            false
        }
    }
}
