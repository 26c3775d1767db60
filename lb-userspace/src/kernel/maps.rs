//! The agent's handles on the pinned maps: reading what the kernel holds, applying
//! [`Op`]s, and reading the counters.

use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    maglev::{MAGLEV, MaglevChunk, MaglevKey},
    maps::{
        AFFINITY, Affinity, AffinityKey, Backend, FRONTENDS, Frontend, FrontendKey, LAYOUT_VERSION,
        MEMBER_PRESENT, MEMBERS, META, META_LAYOUT_VERSION, META_MAGLEV_TABLE_SIZE, MemberKey,
        REVNAT, RevNat, RevNatKey, SLOTS, STATS, SlotKey, UDP_FLOWS, UdpFlowKey,
    },
};

use aya::maps::IterableMap as _;

use super::{PinLayout, sys};

/// Elements per batched syscall: big enough to amortise the syscall, small enough to keep
/// each one short.
const BATCH: usize = 4096;
use super::state::{KernelState, Op};

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
    Batch {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
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

/// Handles on every pinned map.
pub struct Maps {
    /// Capacities of the agent-written maps, for "map full" errors.
    capacities: super::Capacities,
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Backend>,
    members: HashMap<MapData, MemberKey, u32>,
    /// Maglev table chunks (`--lb-algorithm maglev`).
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    revnat: HashMap<MapData, RevNatKey, RevNat>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    udp_flows: HashMap<MapData, UdpFlowKey, Backend>,
    stats: PerCpuArray<MapData, u64>,
    meta: Array<MapData, u32>,
}

/// Entries and capacity of one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

impl Fill {
    /// Entries over capacity, 0 for a map without one.
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        // Entries are far below 2^52: exact as f64.
        self.entries as f64 / f64::from(self.capacity)
    }
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
        let frontends: HashMap<MapData, FrontendKey, Frontend> = typed(layout, FRONTENDS)?;
        let slots: HashMap<MapData, SlotKey, Backend> = typed(layout, SLOTS)?;
        let capacity = |map: &MapData| map.info().map(|i| i.max_entries()).unwrap_or(0);
        Ok(Self {
            capacities: super::Capacities {
                frontends: capacity(frontends.map()),
                backends: capacity(slots.map()),
            },
            frontends,
            slots,
            members: typed(layout, MEMBERS)?,
            maglev: typed(layout, MAGLEV)?,
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

    /// Records the Maglev table size the XDP program hashes flows into (0: random choice).
    /// Written before any table of that size.
    pub fn record_maglev_table_size(&mut self, size: u32) -> Result<(), MapsError> {
        self.meta
            .set(META_MAGLEV_TABLE_SIZE, size, 0)
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
        let tables = self
            .maglev
            .iter()
            .map(|entry| entry.map(|(key, chunk)| (key, super::state::chunk_digest(&chunk))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(MAGLEV))?;
        Ok(KernelState::from_entries(frontends, slots, members).with_tables(tables))
    }

    /// Applies writes that are all of the same kind (as the syncer groups
    /// them), in order, with batched syscalls. Deleting what is already gone is not an
    /// error. On failure: how many went through, and the error of the next one.
    pub fn apply_group(&mut self, ops: &[Op]) -> Result<(), (usize, MapsError)> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        let (name, capacity, fd) = match first {
            Op::PutMember(_) | Op::DelMember(_) => (
                MEMBERS,
                self.capacities.backends,
                self.members.map().fd().as_fd(),
            ),
            Op::PutSlot(..) | Op::DelSlot(_) => (
                SLOTS,
                self.capacities.backends,
                self.slots.map().fd().as_fd(),
            ),
            Op::PutFrontend(..) | Op::DelFrontend(..) => (
                FRONTENDS,
                self.capacities.frontends,
                self.frontends.map().fd().as_fd(),
            ),
            Op::PutTable(..) | Op::DelTable(_) => (
                MAGLEV,
                lb_common::maglev::MAX_CHUNKS,
                self.maglev.map().fd().as_fd(),
            ),
        };
        let deleting = matches!(
            first,
            Op::DelMember(_) | Op::DelSlot(_) | Op::DelFrontend(..) | Op::DelTable(_)
        );
        let mut done = 0;
        for chunk in ops.chunks(BATCH) {
            let mut offset = 0;
            while offset < chunk.len() {
                let rest = &chunk[offset..];
                // The keys (and values) of this run's ops, all of `first`'s kind.
                macro_rules! of {
                    ($pat:pat => $out:expr) => {
                        rest.iter().filter_map(|op| match op {
                            $pat => Some($out),
                            _ => None,
                        })
                    };
                }
                let result = match first {
                    Op::PutMember(_) => {
                        let keys: Vec<MemberKey> = of!(Op::PutMember(k) => *k).collect();
                        sys::map_update_batch(fd, &keys, &vec![MEMBER_PRESENT; keys.len()])
                    }
                    Op::PutSlot(..) => {
                        let (keys, values): (Vec<SlotKey>, Vec<Backend>) =
                            of!(Op::PutSlot(k, v) => (*k, *v)).unzip();
                        sys::map_update_batch(fd, &keys, &values)
                    }
                    Op::PutFrontend(..) => {
                        let (keys, values): (Vec<FrontendKey>, Vec<Frontend>) =
                            of!(Op::PutFrontend(k, v) => (*k, *v)).unzip();
                        sys::map_update_batch(fd, &keys, &values)
                    }
                    Op::PutTable(..) => {
                        let (keys, values): (Vec<MaglevKey>, Vec<MaglevChunk>) =
                            of!(Op::PutTable(k, v) => (*k, **v)).unzip();
                        sys::map_update_batch(fd, &keys, &values)
                    }
                    Op::DelTable(_) => {
                        sys::map_delete_batch(fd, &of!(Op::DelTable(k) => *k).collect::<Vec<_>>())
                    }
                    Op::DelMember(_) => {
                        sys::map_delete_batch(fd, &of!(Op::DelMember(k) => *k).collect::<Vec<_>>())
                    }
                    Op::DelSlot(_) => {
                        sys::map_delete_batch(fd, &of!(Op::DelSlot(k) => *k).collect::<Vec<_>>())
                    }
                    Op::DelFrontend(..) => sys::map_delete_batch(
                        fd,
                        &of!(Op::DelFrontend(k, _) => *k).collect::<Vec<_>>(),
                    ),
                };
                match result {
                    Ok(()) => offset = chunk.len(),
                    // Already gone: as good as deleted; go on after it.
                    Err(e) if deleting && e.error.raw_os_error() == Some(libc::ENOENT) => {
                        offset += e.done + 1
                    }
                    Err(e) => {
                        let err = match e.error.raw_os_error() {
                            Some(libc::E2BIG | libc::ENOSPC) => MapsError::Full {
                                map: name,
                                capacity,
                            },
                            _ => MapsError::Batch {
                                map: name,
                                source: e.error,
                            },
                        };
                        return Err((done + offset + e.done, err));
                    }
                }
            }
            done += chunk.len();
        }
        Ok(())
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

    /// The frontend at `key`, if the kernel has one.
    pub fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, MapsError> {
        match self.frontends.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapsError::Read {
                map: FRONTENDS,
                source,
            }),
        }
    }

    /// The backend in slot `slot` of frontend `id`, if there is one.
    pub fn slot(&self, id: u32, slot: u32) -> Result<Option<Backend>, MapsError> {
        match self.slots.get(&SlotKey { id, slot }, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapsError::Read { map: SLOTS, source }),
        }
    }

    /// Whether `backend` is one of frontend `id`'s members (what the programs check before
    /// reusing a remembered backend).
    pub fn is_member(&self, id: u32, backend: Backend) -> bool {
        self.members.get(&MemberKey { id, backend }, 0).is_ok()
    }

    /// The affinity entries of frontend `id`: client netns cookie and entry (an iteration of
    /// the whole LRU map).
    pub fn affinity_of(&self, id: u32) -> Vec<(u64, Affinity)> {
        self.affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.id == id)
            .map(|(key, value)| (key.client, value))
            .collect()
    }

    /// The capacity of the pinned map `name` (0 when unknown).
    pub fn capacity(&self, name: &str) -> u32 {
        let map = match name {
            FRONTENDS => self.frontends.map(),
            SLOTS => self.slots.map(),
            MEMBERS => self.members.map(),
            MAGLEV => self.maglev.map(),
            REVNAT => self.revnat.map(),
            AFFINITY => self.affinity.map(),
            UDP_FLOWS => self.udp_flows.map(),
            _ => return 0,
        };
        map.info().map(|i| i.max_entries()).unwrap_or(0)
    }

    /// Entries and capacity of every map that has a capacity (not the socket storage, the
    /// counters or the layout record), each counted by iteration: for inspection and scrapes,
    /// not hot paths.
    pub fn fill(&self) -> Vec<Fill> {
        let sizes = self.conn_table_sizes();
        [
            (FRONTENDS, self.frontends.keys().count()),
            (SLOTS, self.slots.keys().count()),
            (MEMBERS, self.members.keys().count()),
            (MAGLEV, self.maglev.keys().count()),
            (AFFINITY, sizes.affinity),
            (REVNAT, sizes.revnat),
            (UDP_FLOWS, sizes.udp_flows),
        ]
        .into_iter()
        .map(|(map, entries)| Fill {
            map,
            entries,
            capacity: self.capacity(map),
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
