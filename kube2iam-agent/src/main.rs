use std::process::ExitCode;

use anyhow::Context as _;
use kube2iam_agent::{
    agent, bpf,
    cli::{Cli, Command, DoctorArgs, InspectArgs, InspectFormat, RunArgs, UninstallArgs},
    inspect, kube2iam, telemetry,
};

fn main() -> ExitCode {
    let (cli, kube2iam_warnings) = match kube2iam::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(kube2iam::ParseError::Clap(e)) => e.exit(),
        Err(e @ kube2iam::ParseError::Kube2iam(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::InternalNetnsProbe) = cli.command {
        return match bpf::netns_probe_child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netns probe: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if bpf::loader::is_child() {
        // The agent has logged the warnings about its flags already.
        return loader_child(&cli);
    }
    for warning in kube2iam_warnings {
        tracing::warn!("{warning}");
    }
    if let Some(Command::Doctor(args)) = &cli.command {
        return doctor(args);
    }
    let result = match cli.command {
        None => run(&cli.run, cli.log.debug_enabled()),
        Some(Command::Uninstall(args)) => uninstall(&args),
        Some(Command::Inspect(args)) => run_inspect(&args),
        Some(Command::InternalNetnsProbe | Command::Doctor(_)) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain: what failed, then each cause.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The short-lived child that loads and attaches the programs (see `bpf::loader`).
fn loader_child(cli: &Cli) -> ExitCode {
    // SAFETY: no other thread exists yet; the variable must not reach the netns probe's child.
    unsafe { std::env::remove_var(bpf::loader::CHILD_ENV) };
    let result = cli
        .run
        .settings(cli.log.debug_enabled())
        .map_err(anyhow::Error::from)
        .and_then(|settings| bpf::loader::child_main(&settings).map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("loading the programs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs, kernel_debug_log: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(agent::run(args, kernel_debug_log))
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let kernel = bpf::host::check_kernel()?;
    bpf::host::check_privileges(kernel, bpf::host::Task::Uninstall)?;
    let removed = bpf::uninstall(&args.bpf_pin_path)?;
    if removed.is_empty() {
        println!(
            "nothing to remove: {} does not exist",
            args.bpf_pin_path.display()
        );
    }
    for line in removed {
        println!("{line}");
    }
    Ok(())
}

fn run_inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let report = inspect::read(&args.bpf_pin_path)?;
    match args.output {
        InspectFormat::Table => print!("{}", inspect::render(&report)),
        InspectFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encode the report as JSON")?
        ),
    }
    Ok(())
}

/// Prints the doctor's table and summary; exits 1 when the agent cannot run here.
fn doctor(args: &DoctorArgs) -> ExitCode {
    let packet_guard = match args.guards.packet_guard_patterns() {
        Ok(patterns) => patterns,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let report = kube2iam_agent::doctor::run(&kube2iam_agent::doctor::Options {
        cgroup_path: args.cgroup_path.clone(),
        pin_dir: args.bpf_pin_path.clone(),
        packet_guard,
        node_guard: args.guards.node_guard,
        egress_guard: args.guards.egress_guard,
    });
    print!("{}", report.table());
    println!("{}", report.summary());
    if report.can_run() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
