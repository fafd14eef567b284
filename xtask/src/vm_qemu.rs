//! Booting one VM under qemu and reading its console: the serial console goes to a log file
//! kept for reading, and the `K2I {json}` lines the VM's init prints become events.
//!
//! Acceleration: KVM is tried first when /dev/kvm exists, but some hosts' KVM (nested or
//! paravirtual) cannot run stock kernels and hangs before the kernel prints anything. A KVM boot
//! that shows no kernel line within [`KVM_PROBE`] is killed and the run falls back to TCG.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// The prefix of the init's event lines; keep in step with tests/src/bin/k2i-vm-init/report.rs.
pub const MARKER: &str = "K2I ";
/// How long a KVM boot may stay silent before KVM is judged unusable.
pub const KVM_PROBE: Duration = Duration::from_secs(10);
/// The kernel's first console line.
const KERNEL_BANNER: &str = "Linux version";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One boot.
pub struct Boot<'a> {
    pub image: &'a Path,
    pub initramfs: &'a Path,
    /// Extra kernel command line (`k2i.layout=v1` ...).
    pub append: String,
    pub log: PathBuf,
    pub timeout: Duration,
    pub memory_mib: u32,
}

/// What came back from one boot.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accel: Option<Accel>,
    /// Host seconds from starting qemu to the init's `boot` event.
    pub boot_secs: Option<f64>,
    /// Host seconds from starting qemu to its exit.
    pub total_secs: f64,
    pub events: Vec<Value>,
    /// Why the run did not finish normally (timeout, qemu failure), if it did not.
    pub problem: Option<String>,
    /// Whether the kernel printed its banner (KVM works when it does).
    pub kernel_seen: bool,
}

impl Outcome {
    pub fn events_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events
            .iter()
            .filter(move |e| e.get("event").and_then(Value::as_str) == Some(kind))
    }

    pub fn done(&self) -> Option<&Value> {
        self.events_of("done").next()
    }
}

/// The event in a console line, if it carries one.
pub fn parse_event(line: &str) -> Option<Value> {
    let at = line.find(MARKER)?;
    serde_json::from_str(line[at + MARKER.len()..].trim()).ok()
}

fn qemu_command(boot: &Boot<'_>, accel: Accel) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => command.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => command.args(["-accel", "tcg", "-cpu", "max"]),
    };
    command
        .args(["-m", &boot.memory_mib.to_string(), "-smp", "1"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(boot.image)
        .arg("-initrd")
        .arg(boot.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 oops=panic rdinit=/init {}{}",
            match accel {
                // QEMU 7.2's TCG mis-emulates the segment-prefixed cmpxchg16b that SLUB's fast
                // path uses on 6.8+ kernels (random double faults in kmem_cache_alloc). Hiding
                // CX16 (feature bit 4*32+13; older kernels take only numbers) makes SLUB use its
                // locked path; nothing the tests look at depends on it.
                Accel::Tcg => "clearcpuid=141 ",
                Accel::Kvm => "",
            },
            boot.append
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

enum Line {
    Out(String, Instant),
    Closed,
}

/// Kills qemu by PID and reaps it.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Boots once with `accel`. With `probe` set, gives up (problem "kvm-silent") when the kernel
/// prints nothing within [`KVM_PROBE`].
pub fn boot(boot: &Boot<'_>, accel: Accel, probe: bool) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = qemu_command(boot, accel)
        .spawn()
        .context("could not start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let qemu = Qemu(child);
    let mut log =
        fs::File::create(&boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
    let (tx, rx) = mpsc::channel();
    for stream in [
        stdout.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        stderr.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                if tx.send(Line::Out(line, Instant::now())).is_err() {
                    return;
                }
                buf.clear();
            }
            let _ = tx.send(Line::Closed);
        });
    }
    drop(tx);

    let mut outcome = Outcome {
        accel: Some(accel),
        ..Outcome::default()
    };
    let deadline = started + boot.timeout;
    let mut open = 2;
    let mut kernel_seen = false;
    while open > 0 {
        let now = Instant::now();
        let limit = if probe && !kernel_seen {
            (started + KVM_PROBE).min(deadline)
        } else {
            deadline
        };
        if now >= limit {
            outcome.problem = Some(if probe && !kernel_seen {
                "kvm-silent".to_owned()
            } else {
                format!("timed out after {:.0}s", boot.timeout.as_secs_f64())
            });
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(Line::Out(line, at)) => {
                let _ = writeln!(log, "{line}");
                if line.contains(KERNEL_BANNER) {
                    kernel_seen = true;
                }
                if let Some(event) = parse_event(&line) {
                    if event.get("event").and_then(Value::as_str) == Some("boot") {
                        outcome.boot_secs = Some((at - started).as_secs_f64());
                        kernel_seen = true;
                    }
                    outcome.events.push(event);
                }
            }
            Ok(Line::Closed) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(qemu);
    outcome.kernel_seen = kernel_seen;
    outcome.total_secs = started.elapsed().as_secs_f64();
    if outcome.problem.is_none() && outcome.done().is_none() {
        outcome.problem = Some("the VM stopped before its init reported `done`".to_owned());
    }
    let _ = writeln!(
        log,
        "== xtask: accel {}, {:.1}s, {}",
        accel.name(),
        outcome.total_secs,
        outcome.problem.as_deref().unwrap_or("finished")
    );
    Ok(outcome)
}

/// Whether KVM is worth trying at all.
pub fn kvm_present() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_found_after_the_marker() {
        let line = "\r[   12.3] noise K2I {\"event\":\"test\",\"name\":\"x\",\"status\":\"pass\"}";
        let event = parse_event(line).expect("an event");
        assert_eq!(event["event"], "test");
        assert_eq!(event["status"], "pass");
        assert!(parse_event("K2I {broken").is_none());
        assert!(parse_event("Linux version 6.1").is_none());
    }
}
