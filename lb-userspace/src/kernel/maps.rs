//! The agent's handles on the pinned maps: reading what the kernel holds, applying
//! [`Op`]s, and reading the counters.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::maps::{
    AFFINITY, Affinity, AffinityKey, Backend, FRONTENDS, Frontend, FrontendKey, LAYOUT_VERSION,
    MAX_FRONTENDS, MAX_MEMBERS, MAX_SLOTS, MEMBER_PRESENT, MEMBERS, META, META_LAYOUT_VERSION,
    MemberKey, REVNAT, RevNat, RevNatKey, SLOTS, STATS, SlotKey, UDP_FLOWS, UdpFlowKey,
};

use super::PinLayout;
use crate::plan::{KernelState, Op};

/// A map that could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path}")]
    Open {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("reading map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is full (capacity {capacity})")]
    Full { map: &'static str, capacity: u32 },
    #[error("writing map {map}")]
    Write {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn open(path: &Path) -> Result<Map, MapsError> {
    let wrap = |source| MapsError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(path).map_err(wrap)?;
    Map::from_map_data(data).map_err(wrap)
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    layout: &PinLayout,
    name: &str,
) -> Result<T, MapsError> {
    let path = layout.map(name);
    T::try_from(open(&path)?).map_err(|source| MapsError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// The layout version recorded in a pinned `LB_META`.
pub fn read_layout_version(path: &Path) -> Result<u32, MapError> {
    let data = MapData::from_pin(path)?;
    let meta: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)?;
    meta.get(&META_LAYOUT_VERSION, 0)
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// Handles on every pinned map.
pub struct Maps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Backend>,
    members: HashMap<MapData, MemberKey, u32>,
    revnat: HashMap<MapData, RevNatKey, RevNat>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    udp_flows: HashMap<MapData, UdpFlowKey, Backend>,
    stats: PerCpuArray<MapData, u64>,
    meta: Array<MapData, u32>,
}

/// How full the per-connection maps are (entries, by iteration).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnTableSizes {
    pub revnat: usize,
    pub affinity: usize,
    pub udp_flows: usize,
}

impl Maps {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, MapsError> {
        Ok(Self {
            frontends: typed(layout, FRONTENDS)?,
            slots: typed(layout, SLOTS)?,
            members: typed(layout, MEMBERS)?,
            revnat: typed(layout, REVNAT)?,
            affinity: typed(layout, AFFINITY)?,
            udp_flows: typed(layout, UDP_FLOWS)?,
            stats: typed(layout, STATS)?,
            meta: typed(layout, META)?,
        })
    }

    /// A second handle on the counters, for the metrics scrape.
    pub fn open_stats(layout: &PinLayout) -> Result<PerCpuArray<MapData, u64>, MapsError> {
        typed(layout, STATS)
    }

    /// Records this build's layout version, so another version of lb can tell.
    pub fn record_layout_version(&mut self) -> Result<(), MapsError> {
        self.meta
            .set(META_LAYOUT_VERSION, LAYOUT_VERSION, 0)
            .map_err(|source| MapsError::Write { map: META, source })
    }

    /// What the agent-written maps hold now.
    pub fn read_state(&self) -> Result<KernelState, MapsError> {
        let read = |map| move |source| MapsError::Read { map, source };
        let frontends = self
            .frontends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(FRONTENDS))?;
        let slots = self
            .slots
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(SLOTS))?;
        let members = self
            .members
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(MEMBERS))?;
        Ok(KernelState::from_entries(frontends, slots, members))
    }

    /// Applies one write. Deleting what is already gone is not an error.
    pub fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        let (map, capacity, result) = match op {
            Op::PutMember(key) => (
                MEMBERS,
                MAX_MEMBERS,
                self.members.insert(key, MEMBER_PRESENT, 0),
            ),
            Op::PutSlot(key, backend) => (SLOTS, MAX_SLOTS, self.slots.insert(key, backend, 0)),
            Op::PutFrontend(key, value) => (
                FRONTENDS,
                MAX_FRONTENDS,
                self.frontends.insert(key, value, 0),
            ),
            Op::DelFrontend(key) => (FRONTENDS, MAX_FRONTENDS, self.frontends.remove(key)),
            Op::DelSlot(key) => (SLOTS, MAX_SLOTS, self.slots.remove(key)),
            Op::DelMember(key) => (MEMBERS, MAX_MEMBERS, self.members.remove(key)),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(op, Op::DelFrontend(_) | Op::DelSlot(_) | Op::DelMember(_))
                    && (errno(&e) == Some(libc::ENOENT) || matches!(e, MapError::KeyNotFound)) =>
            {
                Ok(())
            }
            Err(e) if matches!(errno(&e), Some(libc::E2BIG | libc::ENOSPC)) => {
                Err(MapsError::Full { map, capacity })
            }
            Err(source) => Err(MapsError::Write { map, source }),
        }
    }

    /// The datapath counters, summed over CPUs, indexed as `lb_common::stats`.
    pub fn stats(&self) -> Result<Vec<u64>, MapsError> {
        (0..lb_common::stats::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .map_err(|source| MapsError::Read { map: STATS, source })
            })
            .collect()
    }

    /// Entries in the per-connection maps (an iteration each: for inspection, not hot paths).
    pub fn conn_table_sizes(&self) -> ConnTableSizes {
        ConnTableSizes {
            revnat: self.revnat.keys().count(),
            affinity: self.affinity.keys().count(),
            udp_flows: self.udp_flows.keys().count(),
        }
    }
}
