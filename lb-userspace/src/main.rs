//! `lb`: Kubernetes Service load balancing with eBPF, a kube-proxy replacement for one node.

use std::process::ExitCode;

use clap::Parser as _;
use lb_userspace::{
    cli::{self, Command},
    explain, inspect,
    kernel::{self, PinLayout},
    logging, run,
};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(args))),
        Command::Cleanup(args) => cleanup(&args),
        Command::Check(args) => match inspect::check(&args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::List(args) => inspect::list(&args),
        Command::Stats(args) => inspect::stats(&args),
        Command::Explain(args) => explain::explain(&args),
        Command::MountBpffs(args) => mount_bpffs(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup(args: &cli::CleanupArgs) -> anyhow::Result<()> {
    let cleaned = kernel::attach::cleanup(&PinLayout::new(&args.pin_path), args.cgroup.as_deref())?;
    println!(
        "removed {} links and {} pins under {}",
        cleaned.links_detached,
        cleaned.pins_removed,
        args.pin_path.display()
    );
    Ok(())
}

fn mount_bpffs(args: &cli::MountBpffsArgs) -> anyhow::Result<()> {
    let dir = args.dir.display();
    if kernel::fs::mount_bpffs_if_missing(&args.dir)? {
        println!("mounted bpffs at {dir}");
    } else {
        println!("bpffs already mounted at {dir}");
    }
    Ok(())
}
