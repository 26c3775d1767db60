//! Everything lb puts in the kernel: the embedded programs, their pinned maps and links.
//!
//! Layout under `--pin-path` (default `/sys/fs/bpf/lb`):
//!
//! ```text
//! maps/LB_FRONTENDS ...   every map of lb_common::maps::SPECS
//! maps/LB_NAMES           each frontend id's Service, port name and kind (names.rs)
//! links/lb_connect4 ...   one bpf_link per program, attached to --cgroup
//! links/xdp@IF, tc@IF     XDP ingress and tcx egress on each --xdp-iface (see [`xdp`])
//! ```
//!
//! Pinned links keep the programs attached when the agent exits; a new agent loads its
//! programs with the pinned maps and swaps them into the existing links (`BPF_LINK_UPDATE`),
//! so a restart or an upgrade never detaches anything and never attaches twice.

pub mod attach;
pub mod batch;
pub mod ct_forward;
pub mod ebpf_log;
pub mod fs;
pub mod mapped;
pub mod maps;
pub mod names;
pub mod netns;
pub mod object;
pub mod revmap;
pub mod sock_destroy;
pub mod state;
pub mod sys;
pub mod upgrade;
pub mod xdp;

use std::path::{Path, PathBuf};

/// The capacities of the agent-sized maps (`lb run --max-frontends`, `--max-backends`,
/// `--max-ct-entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    /// Backend slots over all frontends (and memberships, one each).
    pub backends: u32,
    /// Connection-tracking entries, of `LB_CT` and of `LB_CT4` each (one per north-south
    /// flow to a local backend, two per SNAT'd flow), already a multiple
    /// of the possible CPUs (the kernel rounds a per-CPU LRU map's capacity so).
    pub ct: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            frontends: lb_common::maps::MAX_FRONTENDS,
            backends: lb_common::maps::MAX_SLOTS,
            ct: lb_common::nat::MAX_CT,
        }
    }
}

impl Capacities {
    /// The capacity of map `spec` under these settings.
    pub fn of(&self, spec: &lb_common::maps::MapSpec) -> u32 {
        match spec.name {
            lb_common::maps::FRONTENDS => self.frontends,
            lb_common::maps::SLOTS | lb_common::maps::MEMBERS => self.backends,
            lb_common::nat::CT | lb_common::nat::CT4 => self.ct,
            _ => spec.max_entries,
        }
    }
}

/// Where lb's pins live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
}
