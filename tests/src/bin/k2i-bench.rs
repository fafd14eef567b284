//! k2i-bench: runs the benchmarks of `cargo xtask bench` (see `kube2iam_tests::bench`), prints
//! the report and writes it to `--out` (BENCHMARKS.md).
//!
//! `k2i-bench [--quick] [--only PART,…] [--out FILE] [--command TEXT] [--revision TEXT]
//! [--build-secs N]`:
//! `--quick` measures less (for trying the harness; not for numbers); `--only` runs some of
//! connect, get, attest, cost, sts, memory, restart; `--command`, `--revision` and `--build-secs` are what the
//! report says produced it. Needs root, the release agent (`K2I_AGENT_BIN`), wrk, iptables,
//! nft, openssl and iperf3.

use std::{path::PathBuf, process::ExitCode};

use kube2iam_tests::bench::{
    report::load_average,
    runner::{self, Options},
};

fn main() -> ExitCode {
    let mut options = Options::full();
    let mut out = PathBuf::from("BENCHMARKS.md");
    let mut command = "k2i-bench".to_owned();
    let mut revision = "unknown".to_owned();
    let mut build_secs = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("k2i-bench: {name} needs a value");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--quick" => {
                let only = std::mem::take(&mut options.only);
                options = Options {
                    only,
                    ..Options::quick()
                };
            }
            "--only" => options
                .only
                .extend(value("--only").split(',').map(str::to_owned)),
            "--out" => out = PathBuf::from(value("--out")),
            "--command" => command = value("--command"),
            "--revision" => revision = value("--revision"),
            "--build-secs" => build_secs = value("--build-secs").parse().ok(),
            other => {
                eprintln!(
                    "k2i-bench: unknown argument {other:?}; usage: k2i-bench [--quick] [--only \
                     PART,…] [--out FILE] [--command TEXT] [--revision TEXT] [--build-secs N]"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(part) = options
        .only
        .iter()
        .find(|p| !runner::PARTS.contains(&p.as_str()))
    {
        eprintln!(
            "k2i-bench: --only {part}: the parts are {}",
            runner::PARTS.join(", ")
        );
        return ExitCode::from(2);
    }
    for tool in ["wrk", "iptables", "nft", "openssl", "iperf3"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !found {
            eprintln!("k2i-bench: {tool} is not installed (cargo xtask install installs it)");
            return ExitCode::FAILURE;
        }
    }
    raise_open_files_limit();
    let mut report = runner::run(&options);
    report.command = command;
    report.revision = revision;
    report.build_secs = build_secs;
    report.load_after = load_average();
    report.cpu_after = kube2iam_tests::bench::report::CpuSample::now();
    let text = report.markdown();
    println!("{text}");
    if let Err(e) = std::fs::write(&out, &text) {
        eprintln!("k2i-bench: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!("k2i-bench: wrote {}", out.display());
    let missed = report
        .targets()
        .iter()
        .filter(|t| t.met == Some(false))
        .count();
    if missed > 0 {
        eprintln!(
            "k2i-bench: {missed} target(s) missed; see {}",
            out.display()
        );
    }
    ExitCode::SUCCESS
}

/// The herd holds 1,000 connections open at once, in the client and in the agent (which inherits
/// this limit): raise the soft limit on open files to the hard one, as container runtimes set it.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
