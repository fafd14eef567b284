//! What the VM tells the host: one `K2I {json}` line per event on the console, which
//! `cargo xtask vm-test` reads from the serial log. Everything else on the console (kernel
//! messages, the agent's log, the doctor's table) is for people reading the kept log.

use std::{
    panic::{self, AssertUnwindSafe},
    time::Instant,
};

use serde_json::{Value, json};

/// The prefix `cargo xtask vm-test` looks for; keep in step with xtask/src/vm.rs.
pub const MARKER: &str = "K2I ";

/// Prints one event line.
pub fn emit(event: Value) {
    println!("{MARKER}{event}");
}

/// Seconds since boot, from /proc/uptime.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// How one test ended.
pub enum Outcome {
    Pass(String),
    Skip(String),
}

#[derive(Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Known failures: tests that fail for a documented reason on this kernel.
    pub known: usize,
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

impl Tally {
    /// Runs a test that is known to fail here for `reason`: its failure is reported as
    /// `known` (with the reason and the message); a pass fails, so the expectation gets updated
    /// once the cause is fixed.
    pub fn run_known_failure(
        &mut self,
        name: &str,
        reason: &str,
        test: impl FnOnce() -> Outcome,
    ) -> bool {
        println!("--- test {name} (known to fail here: {reason})");
        let start = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(test));
        let secs = start.elapsed().as_secs_f64();
        let (status, detail) = match result {
            Err(payload) => {
                self.known += 1;
                ("known", format!("{reason}: {}", panic_message(payload)))
            }
            Ok(_) => {
                self.failed += 1;
                (
                    "fail",
                    format!("passed, but was expected to fail ({reason}); update the expectation"),
                )
            }
        };
        println!("--- {status} {name} ({secs:.1}s)");
        emit(json!({
            "event": "test",
            "name": name,
            "status": status,
            "detail": detail,
            "secs": (secs * 10.0).round() / 10.0,
        }));
        status != "fail"
    }

    /// Runs one test, catching its panic, and emits its result.
    pub fn run(&mut self, name: &str, test: impl FnOnce() -> Outcome) -> bool {
        println!("--- test {name}");
        let start = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(test));
        let secs = start.elapsed().as_secs_f64();
        let (status, detail) = match result {
            Ok(Outcome::Pass(detail)) => {
                self.passed += 1;
                ("pass", detail)
            }
            Ok(Outcome::Skip(reason)) => {
                self.skipped += 1;
                ("skip", reason)
            }
            Err(payload) => {
                self.failed += 1;
                ("fail", panic_message(payload))
            }
        };
        println!("--- {status} {name} ({secs:.1}s)");
        emit(json!({
            "event": "test",
            "name": name,
            "status": status,
            "detail": detail,
            "secs": (secs * 10.0).round() / 10.0,
        }));
        status != "fail"
    }
}
