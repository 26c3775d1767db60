//! The `lb` command line. Tests outside this repository drive lb through it: keep it stable
//! and document changes in the README.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::source::convert::NodePortRange;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Debug, Parser)]
#[command(
    name = "lb",
    version,
    about = "Kubernetes Service load balancing with eBPF: a kube-proxy replacement"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log as human-readable text or as one JSON object per line (stderr), with every
    /// event's fields.
    #[arg(long, global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the programs, keep the maps in sync with the sources.
    Run(RunArgs),
    /// Detach and remove everything lb put in the kernel (like `kube-proxy --cleanup`).
    Cleanup(CleanupArgs),
    /// Validate manifests without touching the kernel.
    Check(CheckArgs),
    /// List the Service frontends and backends the kernel holds (read from the pinned maps).
    List(ListArgs),
    /// Show the datapath counters and each map's fill (read from the pinned maps).
    Stats(InspectArgs),
    /// Explain what the datapath does with a connection to ADDR:PORT[/PROTO]: the frontend,
    /// Service, policies, backends, the client's affinity entry and the deciding rule (read
    /// from the pinned maps).
    Explain(ExplainArgs),
    /// Mount a bpffs at DIR unless one is there (the DaemonSet's init container: pins must
    /// live on the host's bpffs to outlive the container).
    MountBpffs(MountBpffsArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A YAML/JSON file or a directory of them (repeatable); watched for changes.
    #[arg(long = "manifests", value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig (without it and without --manifests:
    /// the in-cluster service account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory the socket programs attach to [default: the cgroup2 mount's root].
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Where maps and links are pinned (a bpffs directory; bpffs is mounted if needed).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// This node's name, for `internalTrafficPolicy: Local` [default: $NODE_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// An address of this node (repeatable): NodePorts are served on these [default: the
    /// addresses of the --xdp-iface interfaces].
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
    /// An interface for the XDP/tc north-south datapath (repeatable).
    #[arg(long = "xdp-iface", value_name = "IF")]
    pub xdp_ifaces: Vec<String>,
    /// The range node ports are allocated from (the API server's --service-node-port-range):
    /// a manifest's nodePort outside it is an error. What the API allocated is programmed.
    #[arg(long, value_name = "LOW-HIGH", default_value = "30000-32767")]
    pub nodeport_range: NodePortRange,
    /// How a new flow from outside the node picks its backend (Cilium's names): `random`, or
    /// `maglev` (consistent hashing: every node running lb with the same endpoints picks the
    /// same backend for a flow).
    #[arg(long, value_enum, value_name = "ALGORITHM", default_value = "random")]
    pub lb_algorithm: crate::maglev::Algorithm,
    /// Entries of each Maglev table (`--lb-algorithm maglev`): one of Cilium's primes 251,
    /// 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071; well above 100 x the
    /// largest backend count of a Service.
    #[arg(long, value_name = "M", default_value = "16381", value_parser = crate::maglev::parse_table_size)]
    pub maglev_table_size: u32,
    /// Address of `/healthz`; empty disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Address of `/metrics`; empty disables it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// `/healthz` fails when a change has waited this long (seconds) without reaching the kernel.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub healthz_stale_after: u64,
    /// `/healthz` fails when the Kubernetes API has been failing this long (seconds); the
    /// datapath keeps serving the last known state meanwhile.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub api_stale_after: u64,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Re-read the maps and repair any drift this often (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub resync_period: u64,
    /// When a backend leaves a Service, also close (reset) the TCP connections lb sent to it.
    /// Connected UDP sockets to it are always closed; TCP connections stay by default, as
    /// with kube-proxy (Cilium: bpf-lb-sock-terminate-pod-connections).
    #[arg(long)]
    pub close_tcp_to_removed_backends: bool,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Also detach lb programs found on this cgroup without a pin.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MountBpffsArgs {
    /// Where (created if missing).
    #[arg(value_name = "DIR", default_value = crate::kernel::fs::BPFFS_ROOT)]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A YAML/JSON file or a directory of them (repeatable).
    #[arg(long = "manifests", value_name = "PATH", required = true)]
    pub manifests: Vec<PathBuf>,
    /// The capacities `lb run` will use: a set that would not fit them is reported.
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// A nodePort outside this range is an error.
    #[arg(long, value_name = "LOW-HIGH", default_value = "30000-32767")]
    pub nodeport_range: NodePortRange,
}

/// The map capacities (`lb run` and `lb check`).
#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// Capacity of the frontend map (Service IP x port x protocol), fixed when the maps are
    /// created; a Service that does not fit is refused with an error.
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::MAX_FRONTENDS)]
    pub max_frontends: u32,
    /// Capacity of the backend maps (endpoints summed over all frontends).
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::MAX_SLOTS)]
    pub max_backends: u32,
    /// Capacity of each north-south connection-tracking map, in entries: `LB_CT4` (one per
    /// IPv4 flow through XDP to a local backend) and `LB_CT` (one per IPv6 flow to a local
    /// backend, two per SNAT'd flow), fixed when the maps are created; rounded up to a
    /// multiple of the CPUs, each of which evicts its own least recently used flows when its
    /// share is full. Reserved up front: 160 bytes of kernel memory per `LB_CT` entry, 128
    /// per `LB_CT4` entry (Cilium's `--bpf-ct-global-tcp-max`, which also sizes its IPv4 and
    /// IPv6 tables each).
    #[arg(long, value_name = "N", default_value_t = lb_common::nat::MAX_CT,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_ct_entries: u32,
}

impl CapacityArgs {
    pub fn capacities(&self) -> crate::kernel::Capacities {
        crate::kernel::Capacities {
            frontends: self.max_frontends,
            backends: self.max_backends,
            ct: per_cpu_multiple(self.max_ct_entries, aya::util::nr_cpus().unwrap_or(1)),
        }
    }
}

/// `n` rounded up to a multiple of `cpus` (as the kernel sizes a per-CPU LRU map; down when
/// that would overflow), so that a pinned map's capacity compares equal to the one asked.
fn per_cpu_multiple(n: u32, cpus: usize) -> u32 {
    let cpus = u32::try_from(cpus).unwrap_or(1).max(1);
    n.checked_next_multiple_of(cpus).unwrap_or(n - n % cpus)
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Only the frontends of this Service (NAMESPACE/NAME, or NAME in "default").
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The Service address: `10.96.0.10:80`, `10.96.0.10:53/UDP`, `[fd00::10]:80/TCP`
    /// (TCP when no protocol is given).
    #[arg(value_name = "ADDR:PORT[/PROTO]")]
    pub target: String,
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The client's address: resolved to the network namespaces on this node that hold it
    /// (affinity is kept per client network namespace).
    #[arg(long, value_name = "IP", conflicts_with = "client_netns")]
    pub client: Option<IpAddr>,
    /// The client's network namespace: /run/netns/NAME or /proc/PID/ns/net.
    #[arg(long, value_name = "PATH")]
    pub client_netns: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::per_cpu_multiple;

    #[test]
    fn ct_capacity_is_a_multiple_of_the_cpus() {
        assert_eq!(per_cpu_multiple(524_288, 2), 524_288);
        assert_eq!(per_cpu_multiple(1_025, 2), 1_026);
        assert_eq!(per_cpu_multiple(1_024, 3), 1_026);
        assert_eq!(per_cpu_multiple(1_024, 0), 1_024);
        // Rounded down where rounding up would overflow, as the kernel does.
        assert_eq!(per_cpu_multiple(u32::MAX, 2), u32::MAX - 1);
    }
}
