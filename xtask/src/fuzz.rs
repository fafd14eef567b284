//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (request routing and path
//! normalization, annotation and ARN parsing, namespace pattern compilation) for a while each,
//! minimizes their corpora, keeps crash reproducers, and reports executions and crashes.
//!
//! The corpora under `fuzz/corpus/<target>/` and the reproducers under
//! `fuzz/regressions/<target>/` are committed; `kube2iam-agent/tests/fuzz_corpus.rs` replays
//! them on stable Rust in CI. Fuzzing needs nightly and cargo-fuzz, which this command installs
//! (they are not part of `cargo xtask install`: building cargo-fuzz takes minutes).

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, install};

/// The targets, in the order they run (`[[bin]]`s of fuzz/Cargo.toml).
pub const TARGETS: &[&str] = &[
    "path_route",
    "path_spellings",
    "annotations",
    "allowed_roles",
];

/// libFuzzer kills an input that runs longer than this (seconds); the properties themselves
/// allow one second for compiling and matching patterns.
const INPUT_TIMEOUT_SECS: u32 = 5;
/// Inputs are request paths and annotation values: a few KiB covers every interesting shape.
const MAX_LEN: u32 = 4096;
/// Artifact name prefixes libFuzzer writes for a failing input.
const FAILURE_PREFIXES: &[&str] = &["crash-", "timeout-", "oom-", "leak-", "slow-unit-"];

#[derive(clap::Args)]
pub struct Args {
    /// Minutes to fuzz each target.
    #[arg(long, default_value_t = 1)]
    minutes: u32,
    /// Fuzz only this target (default: all).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
    /// Run the targets at the same time (one core each) instead of one after another.
    #[arg(long)]
    parallel: bool,
    /// The sanitizer to build with. The targets are safe Rust checking logic properties, so
    /// none is the default: it runs several times faster than address.
    #[arg(long, default_value = "none", value_parser = ["none", "address"])]
    sanitizer: String,
    /// Keep the corpus as it grew instead of minimizing it with `cargo fuzz cmin`.
    #[arg(long)]
    no_cmin: bool,
}

/// What one run found.
struct Outcome {
    target: String,
    executions: Option<u64>,
    seconds: Option<u64>,
    failures: Vec<PathBuf>,
    corpus_files: usize,
    exit_ok: bool,
}

fn fuzz_dir() -> PathBuf {
    cmd::workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz <subcommand>` in the workspace root, with the agent's build script told
/// to skip the eBPF object (the fuzz targets never load it).
fn cargo_fuzz(subcommand: &str, sanitizer: &str) -> std::process::Command {
    let mut command = cmd::cargo();
    command.env("AYA_BUILD_SKIP", "1").args([
        "+nightly",
        "fuzz",
        subcommand,
        "--sanitizer",
        sanitizer,
    ]);
    command
}

pub fn run(args: &Args) -> Result<()> {
    install::fuzz_tools()?;
    let targets: Vec<&str> = match &args.target {
        Some(target) => vec![target.as_str()],
        None => TARGETS.to_vec(),
    };
    for target in &targets {
        let corpus = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("create {}", corpus.display()))?;
    }
    cmd::run(&mut cargo_fuzz("build", &args.sanitizer))?;

    let logs = fuzz_dir().join("target/logs");
    fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    if args.parallel {
        let children = targets
            .iter()
            .map(|target| start(target, args, &logs))
            .collect::<Result<Vec<_>>>()?;
        for (target, child, reader) in children {
            outcomes.push(finish(target, child, reader)?);
        }
    } else {
        for target in &targets {
            let (target, child, reader) = start(target, args, &logs)?;
            outcomes.push(finish(target, child, reader)?);
        }
    }

    if !args.no_cmin {
        for outcome in &mut outcomes {
            // Set-cover merging keeps about half the files a plain merge keeps, with the same
            // features.
            cmd::run(
                cargo_fuzz("cmin", &args.sanitizer)
                    .arg(&outcome.target)
                    .args(["--", "-set_cover_merge=1"]),
            )?;
            outcome.corpus_files = count_files(&fuzz_dir().join("corpus").join(&outcome.target));
        }
    }
    for outcome in &mut outcomes {
        outcome.failures = keep_reproducers(&outcome.target)?;
    }
    report(&outcomes, started.elapsed().as_secs());
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.exit_ok || !o.failures.is_empty())
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in {}: the inputs are in fuzz/regressions/<target>/, which \
             the replay test (cargo test -p kube2iam-agent --test fuzz_corpus) runs; fix the bug \
             and commit the reproducer with the fix",
            failed.join(", ")
        );
    }
    Ok(())
}

type Running = (String, Child, thread::JoinHandle<Result<()>>);

/// Starts `cargo fuzz run <target>`, its output going to `<logs>/<target>.log`, with progress
/// lines echoed.
fn start(target: &str, args: &Args, logs: &Path) -> Result<Running> {
    let seconds = u64::from(args.minutes.max(1)) * 60;
    let mut command = cargo_fuzz("run", &args.sanitizer);
    command
        .arg(target)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("$ {}", cmd::display(&command));
    let mut child = command
        .spawn()
        .with_context(|| format!("start cargo fuzz run {target}"))?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let stderr = child.stderr.take().context("fuzzer stderr")?;
    let stdout = child.stdout.take().context("fuzzer stdout")?;
    let label = target.to_owned();
    let reader = thread::spawn(move || -> Result<()> {
        // stdout carries only what the target prints itself; keep it in the log too.
        let out_label = label.clone();
        let out = thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
                .into_iter()
                .map(|line| format!("[{out_label} stdout] {line}"))
                .collect::<Vec<_>>()
        });
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            writeln!(log, "{line}")?;
            if is_progress(&line) {
                eprintln!("[{label}] {line}");
            }
        }
        for line in out.join().unwrap_or_default() {
            writeln!(log, "{line}")?;
        }
        Ok(())
    });
    Ok((target.to_owned(), child, reader))
}

fn is_progress(line: &str) -> bool {
    [
        "pulse",
        "DONE",
        "Done ",
        "ERROR",
        "panicked",
        "Test unit written",
        "SUMMARY",
        "stat::",
    ]
    .iter()
    .any(|needle| line.contains(needle))
}

fn finish(
    target: String,
    mut child: Child,
    reader: thread::JoinHandle<Result<()>>,
) -> Result<Outcome> {
    let status = child
        .wait()
        .with_context(|| format!("wait for cargo fuzz run {target}"))?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the log reader of {target} panicked"))??;
    let log_path = fuzz_dir().join("target/logs").join(format!("{target}.log"));
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let (executions, seconds) = parse_stats(&log);
    Ok(Outcome {
        corpus_files: count_files(&fuzz_dir().join("corpus").join(&target)),
        target,
        executions,
        seconds,
        failures: Vec::new(),
        exit_ok: status.success(),
    })
}

/// Executions and seconds from libFuzzer's `stat::number_of_executed_units` /
/// `Done N runs in S second(s)` lines.
fn parse_stats(log: &str) -> (Option<u64>, Option<u64>) {
    let mut executions = None;
    let mut seconds = None;
    for line in log.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = n.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            let mut words = rest.split_whitespace();
            let runs = words.next().and_then(|n| n.parse().ok());
            executions = executions.or(runs);
            seconds = words.nth(2).and_then(|s| s.parse().ok());
        }
    }
    (executions, seconds)
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Moves libFuzzer's failing inputs from `fuzz/artifacts/<target>/` to the committed
/// `fuzz/regressions/<target>/`, which the replay test runs.
fn keep_reproducers(target: &str) -> Result<Vec<PathBuf>> {
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let Ok(entries) = fs::read_dir(&artifacts) else {
        return Ok(Vec::new());
    };
    let regressions = fuzz_dir().join("regressions").join(target);
    let mut kept = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !FAILURE_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        fs::create_dir_all(&regressions)
            .with_context(|| format!("create {}", regressions.display()))?;
        let to = regressions.join(&name);
        fs::copy(entry.path(), &to)
            .with_context(|| format!("copy {} to {}", entry.path().display(), to.display()))?;
        fs::remove_file(entry.path())
            .with_context(|| format!("remove {}", entry.path().display()))?;
        kept.push(to);
    }
    Ok(kept)
}

fn report(outcomes: &[Outcome], total_seconds: u64) {
    eprintln!("\nfuzzing summary ({total_seconds} s):");
    eprintln!(
        "  {:<16} {:>8} {:>14} {:>10} {:>8} {:>9}",
        "target", "seconds", "executions", "exec/s", "corpus", "failures"
    );
    for o in outcomes {
        let rate = match (o.executions, o.seconds) {
            (Some(n), Some(s)) if s > 0 => (n / s).to_string(),
            _ => "-".into(),
        };
        eprintln!(
            "  {:<16} {:>8} {:>14} {:>10} {:>8} {:>9}",
            o.target,
            o.seconds.map_or("-".into(), |s| s.to_string()),
            o.executions.map_or("-".into(), |n| n.to_string()),
            rate,
            o.corpus_files,
            o.failures.len() + usize::from(!o.exit_ok && o.failures.is_empty()),
        );
        for failure in &o.failures {
            eprintln!("    reproducer: {}", failure.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_stats() {
        let log = "#1048576 pulse  cov: 812 ft: 3345 corp: 420/18Kb exec/s: 20000 rss: 80Mb\n\
                   Done 12000000 runs in 600 second(s)\n\
                   stat::number_of_executed_units: 12000345\n\
                   stat::average_exec_per_sec:     20000\n";
        assert_eq!(parse_stats(log), (Some(12_000_345), Some(600)));
        assert_eq!(
            parse_stats("Done 77 runs in 3 second(s)\n"),
            (Some(77), Some(3))
        );
        assert_eq!(
            parse_stats("==1== ERROR: libFuzzer: deadly signal\n"),
            (None, None)
        );
    }

    #[test]
    fn every_fuzz_target_is_listed() {
        let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is not a [[bin]] of fuzz/Cargo.toml"
            );
        }
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(
            bins,
            TARGETS.len(),
            "fuzz/Cargo.toml has targets xtask does not run"
        );
    }
}
