use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use kube2iam_agent::{
    bpf::{self, Action},
    cli::{Cli, Command, RunArgs, UninstallArgs},
    telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = match cli.command {
        None => run(&cli.run, cli.log.debug_enabled()),
        Some(Command::Uninstall(args)) => uninstall(&args),
        Some(Command::InternalNetnsProbe) => Ok(()),
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

fn run(args: &RunArgs, kernel_debug_log: bool) -> anyhow::Result<()> {
    let settings = args.settings(kernel_debug_log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        // Handlers first: once "interception active" is logged, SIGTERM must mean a clean exit.
        let shutdown = Shutdown::listen()?;
        let mut interception = bpf::install(&settings)?;
        for program in &interception.programs {
            match &program.action {
                Action::Skipped(why) => tracing::info!(program = program.name, "skipped: {why}"),
                action => tracing::info!(
                    program = program.name,
                    link_id = program.link_id,
                    ?action,
                    "hook ready"
                ),
            }
        }
        tracing::info!(
            kernel = %interception.kernel,
            cgroup = %interception.cgroup.display(),
            pin_dir = %interception.pin_dir.display(),
            agent = %format!("{}:{}", settings.agent_ip4, settings.agent_port),
            agent_ipv6 = ?settings.agent_ip6,
            host_netns_cookie = interception.host_netns_cookie,
            "interception active"
        );
        if kernel_debug_log {
            spawn_kernel_log_reader(interception.ebpf_mut())?;
        }
        shutdown.wait().await;
        anyhow::Ok(())
    })?;
    tracing::info!(
        "shutting down; the pinned programs stay attached and keep pods away from the real \
         metadata service (`kube2iam-agent uninstall` detaches them)"
    );
    Ok(())
}

/// Forwards the programs' aya-log events into our log.
fn spawn_kernel_log_reader(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("read the programs' log buffer")?;
    // SAFETY: the logger owns its ring buffer fd and keeps it open while the AsyncFd lives.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("poll the programs' log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// SIGTERM and SIGINT, listened for from the moment this exists.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let kernel = bpf::host::check_kernel()?;
    bpf::host::check_privileges(kernel)?;
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
