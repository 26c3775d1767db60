//! Everything lb puts in the kernel: the embedded programs, their pinned maps and links.
//!
//! Layout under `--pin-path` (default `/sys/fs/bpf/lb`):
//!
//! ```text
//! maps/LB_FRONTENDS ...   every map of lb_common::maps::SPECS
//! links/lb_connect4 ...   one bpf_link per program, attached to --cgroup
//! ```
//!
//! Pinned links keep the programs attached when the agent exits; a new agent loads its
//! programs with the pinned maps and swaps them into the existing links (`BPF_LINK_UPDATE`),
//! so a restart or an upgrade never detaches anything and never attaches twice.

pub mod attach;
pub mod fs;
pub mod maps;
pub mod object;
pub mod sys;

use std::path::{Path, PathBuf};

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
