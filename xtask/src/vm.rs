//! `cargo xtask vm-test`: the kernel matrix. Each kernel of [`vm_kernels::KERNELS`] boots twice
//! under qemu with an initramfs that holds the agent, the probe and the VM's init
//! (tests/src/bin/k2i-vm-init): once with systemd's unified cgroup layout, where the agent runs
//! with the production defaults (cgroup2 root, /sys/fs/bpf/kube2iam) and its capabilities are
//! checked, and once with a cgroup-v1 layout where the agent mounts cgroup2 and bpffs itself.
//!
//! One row per kernel: release, accelerator, boot seconds, tests passed/failed/skipped, skipped
//! hooks, what the kernel attested for a pod (its cgroup on the cgroup2 layout, the cgroup2 root
//! on the v1 layout), the doctor's summary. Console logs stay in `.cache/vm/logs`.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    cmd,
    vm_initramfs::{self, Payload},
    vm_kernels::{self, Kernel, KernelSpec},
    vm_qemu::{self, Accel, Boot, Outcome},
};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The kernel to test: 5.10, 6.1, 6.12 or all.
    #[arg(long, default_value = "all")]
    pub kernel: String,
    /// Search the minimal capability sets (dozens of agent starts per kernel) instead of
    /// verifying the documented ones.
    #[arg(long)]
    pub find_caps: bool,
    /// Skip the capability checks.
    #[arg(long, conflicts_with = "find_caps")]
    pub no_caps: bool,
    /// VMs run at once (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Use TCG even where KVM would work.
    #[arg(long)]
    pub tcg: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            kernel: "all".into(),
            find_caps: false,
            no_caps: false,
            jobs: None,
            tcg: false,
        }
    }
}

/// The capability sets `--find-caps` measured in these VMs (README, requirements): per kernel,
/// the smallest set each job works with when the agent runs as root with nothing else. The
/// default run verifies them: each set works, and each set with one capability fewer does not.
/// (`--find-caps` also finds the CAP_SYS_ADMIN-based alternatives.)
fn documented_caps(kernel: &str) -> &'static [(&'static str, &'static str)] {
    match kernel {
        // No SO_NETNS_COOKIE: the netns probe creates a child of the (mode 0555) cgroup2 root;
        // BPF memory is charged to RLIMIT_MEMLOCK (64 KiB), which the agent lifts.
        "5.10" => &[
            ("install", "bpf+perfmon+net_admin+sys_resource+dac_override"),
            ("restart", "bpf+perfmon+net_admin+sys_resource+dac_override"),
            ("upgrade", "bpf+perfmon+net_admin+sys_resource+dac_override"),
            ("uninstall", "bpf+net_admin"),
        ],
        // Restart and upgrade read the pinned programs' tags from the links' fdinfo and swap
        // through the links, which needs no CAP_SYS_ADMIN.
        _ => &[
            ("install", "bpf+perfmon+net_admin"),
            ("restart", "bpf+perfmon+net_admin"),
            ("upgrade", "bpf+perfmon+net_admin"),
            ("uninstall", "bpf+net_admin"),
        ],
    }
}

/// Console timeout per VM.
const TIMEOUT: Duration = Duration::from_secs(420);
const FIND_CAPS_TIMEOUT: Duration = Duration::from_secs(3600);
const MEMORY_MIB: u32 = 1536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// cgroup2 at /sys/fs/cgroup, bpffs at /sys/fs/bpf (systemd's unified layout).
    V2,
    /// cgroup v1 hierarchies only; no bpffs.
    V1,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::V2 => "v2",
            Layout::V1 => "v1",
        }
    }
}

struct Job {
    kernel: Kernel,
    initramfs: PathBuf,
    layout: Layout,
}

struct Done {
    kernel: String,
    layout: Layout,
    log: PathBuf,
    outcome: Result<Outcome>,
}

pub fn run(args: &Args) -> Result<()> {
    let specs: Vec<KernelSpec> = if args.kernel == "all" {
        vm_kernels::KERNELS.to_vec()
    } else {
        vec![vm_kernels::spec(&args.kernel).with_context(|| {
            format!(
                "--kernel {}: expected one of {} or all",
                args.kernel,
                vm_kernels::KERNELS.map(|k| k.name).join(", ")
            )
        })?]
    };
    let started = Instant::now();
    let kernels = specs
        .into_iter()
        .map(vm_kernels::ensure)
        .collect::<Result<Vec<_>>>()?;
    let payload = payload()?;
    let cache = vm_kernels::cache_dir();
    let logs = cache.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut jobs = VecDeque::new();
    for kernel in &kernels {
        let initramfs = cache.join(format!("initramfs-{}.cpio", kernel.spec.name));
        let size = vm_initramfs::build(&payload, kernel, &initramfs)?;
        println!(
            "kernel {}: {} (Debian {} {}; on EKS: {}), initramfs {} MiB",
            kernel.spec.name,
            kernel.release,
            kernel.spec.suite,
            kernel.version,
            kernel.spec.seen_on,
            size >> 20
        );
        for layout in [Layout::V2, Layout::V1] {
            jobs.push_back(Job {
                kernel: kernel.clone(),
                initramfs: initramfs.clone(),
                layout,
            });
        }
    }
    let accel = choose_accel(args, &jobs)?;
    println!(
        "accelerator: {} ({})",
        accel.name(),
        match accel {
            Accel::Kvm => "KVM runs the kernel",
            Accel::Tcg if args.tcg => "--tcg",
            Accel::Tcg => "no usable KVM here",
        }
    );

    let workers = args
        .jobs
        .unwrap_or_else(|| {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, jobs.len().max(1));
    let queue = Arc::new(Mutex::new(jobs));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let queue = Arc::clone(&queue);
        let results = Arc::clone(&results);
        let args = args.clone();
        let logs = logs.clone();
        handles.push(thread::spawn(move || {
            loop {
                let job = queue.lock().expect("queue lock").pop_front();
                let Some(job) = job else { break };
                let log = logs.join(format!(
                    "{}-{}.log",
                    job.kernel.spec.name,
                    job.layout.name()
                ));
                println!(
                    "booting {} ({}) with the {} cgroup layout",
                    job.kernel.spec.name,
                    job.kernel.release,
                    job.layout.name()
                );
                let outcome = run_job(&job, &args, accel, &log);
                if let Ok(o) = &outcome {
                    println!(
                        "  {} {}: {:.1}s{}",
                        job.kernel.spec.name,
                        job.layout.name(),
                        o.total_secs,
                        o.problem
                            .as_deref()
                            .map(|p| format!(" ({p})"))
                            .unwrap_or_default()
                    );
                }
                results.lock().expect("results lock").push(Done {
                    kernel: job.kernel.spec.name.to_owned(),
                    layout: job.layout,
                    log,
                    outcome,
                });
            }
        }));
    }
    for handle in handles {
        if handle.join().is_err() {
            bail!("a VM worker thread panicked");
        }
    }
    let results = std::mem::take(&mut *results.lock().expect("results lock"));
    let ok = report(&kernels, &results, started.elapsed());
    if !ok {
        bail!(
            "the kernel matrix failed; console logs are in {}",
            logs.display()
        );
    }
    Ok(())
}

/// Builds the agent, the probe and the VM's init, and strips their debug info.
fn payload() -> Result<Payload> {
    let bins = ["kube2iam-agent", "k2i-probe", "k2i-raw", "k2i-vm-init"];
    let mut command = cmd::cargo();
    command.args(["build", "-p", "kube2iam-agent", "-p", "kube2iam-tests"]);
    for bin in bins {
        command.args(["--bin", bin]);
    }
    command
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped());
    eprintln!("$ {}", cmd::display(&command));
    let mut child = command.spawn().context("could not start cargo build")?;
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo's output")?;
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if message["reason"] == "compiler-artifact"
                && let Some(exe) = message["executable"].as_str()
                && let Some(name) = message["target"]["name"].as_str()
            {
                found.push((name.to_owned(), PathBuf::from(exe)));
            }
        }
    }
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("cargo build of the VM binaries failed ({status})");
    }
    let staging = vm_kernels::cache_dir().join("bin");
    let get = |name: &str| -> Result<PathBuf> {
        let path = found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("cargo build reported no executable {name}"))?;
        vm_initramfs::stripped(&path, &staging)
    };
    Ok(Payload {
        init: get("k2i-vm-init")?,
        agent: get("kube2iam-agent")?,
        probe: get("k2i-probe")?,
        raw: get("k2i-raw")?,
    })
}

/// KVM when it boots a kernel here, else TCG.
fn choose_accel(args: &Args, jobs: &VecDeque<Job>) -> Result<Accel> {
    if args.tcg || !vm_qemu::kvm_present() {
        return Ok(Accel::Tcg);
    }
    let Some(job) = jobs.front() else {
        return Ok(Accel::Tcg);
    };
    let log = vm_kernels::cache_dir().join("logs/kvm-probe.log");
    let probe = Boot {
        image: &job.kernel.image,
        initramfs: &job.initramfs,
        append: "k2i.layout=v2 k2i.caps=off".into(),
        log,
        timeout: vm_qemu::KVM_PROBE + Duration::from_secs(2),
        memory_mib: MEMORY_MIB,
    };
    let outcome = vm_qemu::boot(&probe, Accel::Kvm, true)?;
    Ok(if outcome.kernel_seen {
        Accel::Kvm
    } else {
        Accel::Tcg
    })
}

fn run_job(job: &Job, args: &Args, accel: Accel, log: &Path) -> Result<Outcome> {
    let mut append = format!("k2i.layout={}", job.layout.name());
    let mut timeout = TIMEOUT;
    if job.layout == Layout::V2 {
        if args.no_caps {
            append.push_str(" k2i.caps=off");
        } else if args.find_caps {
            append.push_str(" k2i.caps=find");
            timeout = FIND_CAPS_TIMEOUT;
        } else {
            append.push_str(" k2i.caps=verify");
            for (scenario, set) in documented_caps(job.kernel.spec.name) {
                append.push_str(&format!(" k2i.caps.{scenario}={set}"));
            }
        }
    }
    let boot = Boot {
        image: &job.kernel.image,
        initramfs: &job.initramfs,
        append,
        log: log.to_owned(),
        timeout,
        memory_mib: MEMORY_MIB,
    };
    let outcome = vm_qemu::boot(&boot, accel, false)?;
    if accel == Accel::Kvm && outcome.boot_secs.is_none() {
        // KVM started but never got the init going: try the same VM under TCG.
        return vm_qemu::boot(&boot, Accel::Tcg, false);
    }
    Ok(outcome)
}

fn str_of<'a>(event: &'a Value, key: &str) -> &'a str {
    event.get(key).and_then(Value::as_str).unwrap_or("")
}

fn count(outcome: &Outcome, key: &str) -> u64 {
    outcome
        .done()
        .and_then(|d| d.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// `doctor: 17 ok, 1 warn (x), 0 fail: the agent can run` → `17 ok, 1 warn (x), 0 fail`.
pub fn short_doctor(summary: &str) -> String {
    let s = summary.strip_prefix("doctor: ").unwrap_or(summary);
    s.split(": the agent").next().unwrap_or(s).to_owned()
}

/// Prints the table, the capability sets and the failures; `true` when everything passed.
fn report(kernels: &[Kernel], results: &[Done], elapsed: Duration) -> bool {
    let mut ok = true;
    let find = |kernel: &str, layout: Layout| {
        results
            .iter()
            .find(|d| d.kernel == kernel && d.layout == layout)
    };
    let header = [
        "kernel",
        "release",
        "accel",
        "boot s",
        "run s",
        "passed",
        "failed",
        "skipped",
        "known",
        "skipped hooks",
        "attestation (v2 / v1)",
        "doctor (v2 / v1 layout)",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut failures = Vec::new();
    let mut caps_rows = Vec::new();
    let mut notes = Vec::new();
    for kernel in kernels {
        let name = kernel.spec.name;
        let mut boot = Vec::new();
        let mut run = 0.0;
        let (mut passed, mut failed, mut skipped, mut known) = (0, 0, 0, 0);
        let mut hooks: Vec<String> = Vec::new();
        let mut doctors = Vec::new();
        let mut attestation = Vec::new();
        let mut accel = "-";
        for layout in [Layout::V2, Layout::V1] {
            let Some(done) = find(name, layout) else {
                continue;
            };
            let outcome = match &done.outcome {
                Ok(outcome) => outcome,
                Err(e) => {
                    failures.push(format!("{name} {}: {e:#}", layout.name()));
                    failed += 1;
                    continue;
                }
            };
            accel = outcome.accel.map(Accel::name).unwrap_or("-");
            boot.push(
                outcome
                    .boot_secs
                    .map(|s| format!("{s:.1}"))
                    .unwrap_or_else(|| "-".into()),
            );
            run += outcome.total_secs;
            passed += count(outcome, "passed");
            failed += count(outcome, "failed");
            skipped += count(outcome, "skipped");
            known += count(outcome, "known");
            for event in outcome.events_of("hooks") {
                for hook in event["skipped"].as_array().into_iter().flatten() {
                    if let Some(hook) = hook.as_str()
                        && !hooks.iter().any(|h| h == hook)
                    {
                        hooks.push(hook.to_owned());
                    }
                }
            }
            for event in outcome.events_of("doctor") {
                doctors.push(short_doctor(str_of(event, "summary")));
            }
            for event in outcome.events_of("attestation") {
                attestation.push(str_of(event, "result").to_owned());
            }
            if let Some(problem) = &outcome.problem {
                failed += 1;
                failures.push(format!(
                    "{name} {}: {problem} (console log: {})",
                    layout.name(),
                    done.log.display()
                ));
            }
            for event in outcome.events_of("test") {
                if str_of(event, "status") == "known" {
                    notes.push(format!(
                        "{name} {}: {}: {}",
                        layout.name(),
                        str_of(event, "name"),
                        str_of(event, "detail").lines().next().unwrap_or("")
                    ));
                }
                if str_of(event, "status") == "fail" {
                    let detail: Vec<&str> = str_of(event, "detail").lines().take(12).collect();
                    failures.push(format!(
                        "{name} {}: {}: {}\n    (console log: {})",
                        layout.name(),
                        str_of(event, "name"),
                        detail.join("\n    "),
                        done.log.display()
                    ));
                }
            }
            for event in outcome.events_of("caps") {
                let set: Vec<&str> = event["set"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let verdict = match (
                    str_of(event, "mode"),
                    event.get("ok").and_then(Value::as_bool),
                ) {
                    ("find", _) => "found (minimal)",
                    (_, Some(true)) => "verified",
                    _ => "NOT verified",
                };
                caps_rows.push(vec![
                    name.to_owned(),
                    str_of(event, "scenario").to_owned(),
                    set.join(" + "),
                    verdict.to_owned(),
                ]);
            }
        }
        if failed > 0 {
            ok = false;
        }
        rows.push(vec![
            name.to_owned(),
            kernel.release.clone(),
            accel.to_owned(),
            boot.join(" / "),
            format!("{run:.0}"),
            passed.to_string(),
            failed.to_string(),
            skipped.to_string(),
            known.to_string(),
            if hooks.is_empty() {
                "none".into()
            } else {
                hooks.join(", ")
            },
            attestation.join(" / "),
            doctors.join(" / "),
        ]);
    }
    println!("\nkernel matrix ({:.0}s):", elapsed.as_secs_f64());
    print_table(&header, &rows);
    if !caps_rows.is_empty() {
        println!("\ncapabilities (root with a reduced bounding set):");
        print_table(&["kernel", "job", "capabilities", "result"], &caps_rows);
    }
    if !notes.is_empty() {
        println!("\nknown failures (documented, not counted as failed):");
        for note in &notes {
            println!("  {note}");
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for failure in &failures {
            println!("  {failure}");
        }
    }
    ok
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("  {}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_summaries_shorten() {
        assert_eq!(
            short_doctor("doctor: 17 ok, 1 warn (bpffs), 0 fail: the agent can run"),
            "17 ok, 1 warn (bpffs), 0 fail"
        );
        assert_eq!(short_doctor("no summary line"), "no summary line");
    }

    #[test]
    fn every_kernel_documents_its_capabilities() {
        for kernel in vm_kernels::KERNELS {
            let sets = documented_caps(kernel.name);
            for job in ["install", "restart", "upgrade", "uninstall"] {
                assert!(
                    sets.iter().any(|(j, _)| *j == job),
                    "{} has no documented set for {job}",
                    kernel.name
                );
            }
        }
    }
}
