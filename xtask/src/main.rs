//! `cargo xtask`: everything a fresh machine needs to build, test, demo and benchmark lb.

mod cmd;
mod demo;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (nightly rust-src, bpf-linker, bpftool,
    /// iproute2, ...). Idempotent.
    Setup,
    /// Set up, then build `target/release/lb` and the test pods.
    Build,
    /// Set up, build, lint, and run the unit and the privileged integration tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Set up, build, and show lb on the seed's Services with network-namespace "pods".
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cmd::build_release()
        }
        Task::Test { filter } => test::run(filter.as_deref()),
        Task::Demo => demo::run(),
    }
}
