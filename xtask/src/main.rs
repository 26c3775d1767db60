//! `cargo xtask`: everything a fresh machine needs to build, test, demo and benchmark lb.

/// `writeln!` into a `String`, which cannot fail.
macro_rules! push_line {
    ($dst:expr, $($arg:tt)*) => {{
        $dst.push_str(&format!($($arg)*));
        $dst.push('\n');
    }};
}

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod image;
mod previous;
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
    /// Set up, build, and build the container image of deploy/Containerfile (FROM scratch:
    /// the binary and the shared libraries it links; no registry needed).
    Image {
        /// The image's name.
        #[arg(long, default_value = "localhost/lb:dev")]
        tag: String,
    },
    /// Set up, build, lint, and run the unit and the privileged integration tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Build the lb release of the previous layout version (the upgrade test's starting
    /// point; `cargo xtask test` does this) at target/layout-N/lb.
    PreviousRelease,
    /// Set up, build, and show lb on the seed's Services with network-namespace "pods".
    Demo,
    /// Measure lb against direct pod access and kube-proxy-style iptables/nftables rules;
    /// writes bench/results/<name>.{json,md} and PNG plots.
    Bench {
        /// A smoke run (under 3 minutes): fewer Services, fewer transactions.
        #[arg(long)]
        quick: bool,
        /// Name of the result files [default: the UTC start time].
        #[arg(long)]
        name: Option<String>,
        /// Only these parts, comma-separated: clusterip, xdp, nodeport [default: all].
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The Katran XDP peer's directory (build.sh, measure.py), measured beside lb's XDP
        /// rows; needs KATRAN_MIRROR [default: $KATRAN_PEER, else Katran is not measured].
        #[arg(long, value_name = "DIR")]
        katran_peer: Option<std::path::PathBuf>,
    },
    /// Run each cargo-fuzz target (manifest parsing, API-object conversion) for a while from
    /// the seed corpus in fuzz/corpus; fails on a crash, hang or out-of-memory.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Write the bench's Service set as lb manifests (for profiling lb by hand).
    GenServices {
        /// How many Services.
        #[arg(long)]
        services: usize,
        /// Endpoints per Service (10.201.0.10 onwards).
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Directory to write into.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cmd::build_release()
        }
        Task::Image { tag } => {
            setup::run()?;
            cmd::build_release()?;
            image::run(&tag)
        }
        Task::Test { filter } => test::run(filter.as_deref()),
        Task::PreviousRelease => {
            setup::run()?;
            previous::build()
        }
        Task::Demo => demo::run(),
        Task::Bench {
            quick,
            name,
            only,
            katran_peer,
        } => bench::run(bench::Options {
            quick,
            name,
            only,
            katran_peer,
        }),
        Task::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)
        }
        Task::GenServices {
            services,
            endpoints,
            out,
        } => bench::generate(services, endpoints, &out),
    }
}
