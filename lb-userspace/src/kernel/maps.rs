//! The agent's handles on the pinned maps: reading what the kernel holds, applying
//! [`Op`]s, and reading the counters.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key as LpmKey,
};
use lb_common::{
    maglev::{MAGLEV, MaglevChunk, MaglevKey},
    maps::{
        AFFINITY, Affinity, AffinityKey, Backend, DgramXlate, FRONTENDS, Frontend, FrontendKey,
        LAYOUT_VERSION, MEMBER_PRESENT, MEMBERS, META, META_LAYOUT_VERSION, META_MAGLEV_TABLE_SIZE,
        META_MEMBER_EPOCH, MemberKey, REVNAT, RevNat, RevNatKey, SLOTS, STATS, SlotKey, SockXlate,
        TCP_OWNERS, TCP_SOCKS, UDP_FLOWS, UDP_OWNERS, UDP_SOCKS, UdpFlowKey,
    },
    nat::{CT, CT4, CtEntry, CtKey, CtKey4, SRC_RANGE_PRESENT, SRC_RANGES, SrcRangeKey},
};

use aya::maps::IterableMap as _;

use super::{PinLayout, batch};

/// Threads at most for one long run of writes (the first sync; see [`batch`]).
pub const WRITER_THREADS: usize = 4;
use super::state::{KernelState, Op, RangeEntry};

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

/// The error of a write to map `name` that failed with `error`: "full" for E2BIG/ENOSPC.
pub fn map_error(name: &'static str, capacity: u32, error: std::io::Error) -> MapsError {
    match error.raw_os_error() {
        Some(libc::E2BIG | libc::ENOSPC) => MapsError::Full {
            map: name,
            capacity,
        },
        _ => MapsError::Batch {
            map: name,
            source: error,
        },
    }
}

fn open(path: &Path) -> Result<Map, MapsError> {
    let wrap = |source| MapsError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(path).map_err(wrap)?;
    Map::from_map_data(data).map_err(wrap)
}

pub(super) fn typed<T: TryFrom<Map, Error = MapError>>(
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
    /// UDP sockets lb translated, a slot per socket cookie (its capacity only), and the
    /// slots' owners, mapped (those not 0 are the fill; `None` if the mapping failed).
    udp_socks: Array<MapData, DgramXlate>,
    udp_owners: Option<super::mapped::MappedU64s>,
    /// The same for TCP sockets.
    tcp_socks: Array<MapData, SockXlate>,
    tcp_owners: Option<super::mapped::MappedU64s>,
    stats: PerCpuArray<MapData, u64>,
    meta: Array<MapData, u32>,
    /// The north-south connection tracking (read for its fill only).
    ct: HashMap<MapData, CtKey, CtEntry>,
    /// Its IPv4 client entries (the same).
    ct4: HashMap<MapData, CtKey4, CtEntry>,
    src_ranges: LpmTrie<MapData, SrcRangeKey, u32>,
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
    /// `LB_UDP_SOCKS` slots held (one per open UDP socket that lb translated and that owns
    /// its slot): the owners in `LB_UDP_OWNERS` that are not 0.
    pub udp_socks: usize,
    /// `LB_TCP_SOCKS` slots held, the same way (`LB_TCP_OWNERS`).
    pub tcp_socks: usize,
    /// `LB_CT` (one entry per IPv6 north-south flow to a local backend, two per SNAT'd flow).
    pub ct: usize,
    /// `LB_CT4` (one entry per IPv4 north-south flow to a local backend).
    pub ct4: usize,
}

impl Maps {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, MapsError> {
        let frontends: HashMap<MapData, FrontendKey, Frontend> = typed(layout, FRONTENDS)?;
        let slots: HashMap<MapData, SlotKey, Backend> = typed(layout, SLOTS)?;
        let ct: HashMap<MapData, CtKey, CtEntry> = typed(layout, CT)?;
        let capacity = |map: &MapData| map.info().map(|i| i.max_entries()).unwrap_or(0);
        Ok(Self {
            capacities: super::Capacities {
                frontends: capacity(frontends.map()),
                backends: capacity(slots.map()),
                ct: capacity(ct.map()),
            },
            frontends,
            slots,
            members: typed(layout, MEMBERS)?,
            maglev: typed(layout, MAGLEV)?,
            revnat: typed(layout, REVNAT)?,
            affinity: typed(layout, AFFINITY)?,
            udp_flows: typed(layout, UDP_FLOWS)?,
            udp_socks: typed(layout, UDP_SOCKS)?,
            udp_owners: mapped_owners(layout, UDP_OWNERS)?,
            tcp_socks: typed(layout, TCP_SOCKS)?,
            tcp_owners: mapped_owners(layout, TCP_OWNERS)?,
            stats: typed(layout, STATS)?,
            meta: typed(layout, META)?,
            ct,
            ct4: typed(layout, CT4)?,
            src_ranges: typed(layout, SRC_RANGES)?,
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
        let ranges = self
            .src_ranges
            .keys()
            .map(|key| {
                key.map(|k| RangeEntry {
                    prefix_len: k.prefix_len(),
                    key: k.data(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(SRC_RANGES))?;
        let tables = self
            .maglev
            .iter()
            .map(|entry| entry.map(|(key, chunk)| (key, super::state::chunk_digest(&chunk))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read(MAGLEV))?;
        Ok(KernelState::from_entries(frontends, slots, members, ranges).with_tables(tables))
    }

    /// Applies writes that are all of the same kind (as the syncer groups them) with
    /// batched syscalls ([`batch::write`]: chunks, several threads for a long run, single
    /// writes where the kernel refuses batches). The writes of one group are independent:
    /// they may go in any order. Deleting what is already gone is not an error. On failure:
    /// the index of the first write that did not go through (all before it did; some after
    /// it may have, and writing those again is harmless), and its error.
    pub fn apply_group(&mut self, ops: &[Op]) -> Result<(), (usize, MapsError)> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        let threads = batch::threads_for(ops.len(), WRITER_THREADS);
        // The keys (and values) of `ops`, all of `first`'s kind.
        macro_rules! of {
            ($pat:pat => $out:expr) => {
                ops.iter().filter_map(|op| match op {
                    $pat => Some($out),
                    _ => None,
                })
            };
        }
        // Batched deletions of the keys of `ops` from one map.
        macro_rules! del {
            ($map:expr, $pat:pat => $key:expr) => {{
                let keys: Vec<_> = of!($pat => $key).collect();
                let map = $map.map().fd().as_fd();
                batch::write(
                    &batch::Deletes { map, keys: &keys },
                    keys.len(),
                    batch::CHUNK,
                    threads,
                )
            }};
        }
        let backends = self.capacities.backends;
        let frontends = self.capacities.frontends;
        let chunks = lb_common::maglev::MAX_CHUNKS;
        let ranges = lb_common::nat::MAX_SRC_RANGES;
        let (name, capacity, result) = match first {
            Op::PutMember(_) => {
                let keys: Vec<MemberKey> = of!(Op::PutMember(k) => *k).collect();
                let values = vec![MEMBER_PRESENT; keys.len()];
                let map = self.members.map().fd().as_fd();
                (MEMBERS, backends, batch_put(map, &keys, &values, threads))
            }
            Op::PutSlot(..) => {
                let (keys, values): (Vec<SlotKey>, Vec<Backend>) =
                    of!(Op::PutSlot(k, v) => (*k, *v)).unzip();
                let map = self.slots.map().fd().as_fd();
                (SLOTS, backends, batch_put(map, &keys, &values, threads))
            }
            Op::PutFrontend(..) => {
                let (keys, values): (Vec<FrontendKey>, Vec<Frontend>) =
                    of!(Op::PutFrontend(k, v) => (*k, *v)).unzip();
                let map = self.frontends.map().fd().as_fd();
                (
                    FRONTENDS,
                    frontends,
                    batch_put(map, &keys, &values, threads),
                )
            }
            Op::PutTable(..) => {
                let (keys, values): (Vec<MaglevKey>, Vec<MaglevChunk>) =
                    of!(Op::PutTable(k, v) => (*k, **v)).unzip();
                let map = self.maglev.map().fd().as_fd();
                (MAGLEV, chunks, batch_put(map, &keys, &values, threads))
            }
            Op::PutRange(_) => {
                let keys: Vec<LpmKey<SrcRangeKey>> =
                    of!(Op::PutRange(e) => LpmKey::new(e.prefix_len, e.key)).collect();
                let values = vec![SRC_RANGE_PRESENT; keys.len()];
                let map = self.src_ranges.map().fd().as_fd();
                (SRC_RANGES, ranges, batch_put(map, &keys, &values, threads))
            }
            Op::DelMember(_) => (
                MEMBERS,
                backends,
                del!(self.members, Op::DelMember(k) => *k),
            ),
            Op::DelSlot(_) => (SLOTS, backends, del!(self.slots, Op::DelSlot(k) => *k)),
            Op::DelFrontend(..) => (
                FRONTENDS,
                frontends,
                del!(self.frontends, Op::DelFrontend(k, _) => *k),
            ),
            Op::DelTable(_) => (MAGLEV, chunks, del!(self.maglev, Op::DelTable(k) => *k)),
            Op::DelRange(_) => (
                SRC_RANGES,
                ranges,
                del!(self.src_ranges, Op::DelRange(e) => LpmKey::new(e.prefix_len, e.key)),
            ),
        };
        // Deleted members (all of them, or some before a failure) end their flows: the XDP
        // program looks a tracked flow's membership up again once the epoch has moved.
        if matches!(first, Op::DelMember(_)) {
            // On failure the whole group is reported undone: deleting again is harmless,
            // and the retry moves the epoch.
            self.bump_member_epoch().map_err(|e| (0, e))?;
        }
        result.map_err(|stopped| (stopped.index, map_error(name, capacity, stopped.error)))
    }

    /// Adds 1 (wrapping) to the member epoch (`lb_common::maps::META_MEMBER_EPOCH`), after
    /// [`MEMBERS`] deletions are in the map.
    fn bump_member_epoch(&mut self) -> Result<(), MapsError> {
        let epoch = self
            .meta
            .get(&META_MEMBER_EPOCH, 0)
            .map_err(|source| MapsError::Read { map: META, source })?;
        self.meta
            .set(META_MEMBER_EPOCH, epoch.wrapping_add(1), 0)
            .map_err(|source| MapsError::Write { map: META, source })
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

    /// Whether XDP would admit a new flow from `client` to frontend `id` by its source ranges
    /// (the same full-length trie lookup as `lb-ebpf` `src_range.rs`).
    pub fn src_range_admits(&self, id: u32, client: &std::net::IpAddr) -> bool {
        let key = LpmKey::new(
            lb_common::nat::SRC_RANGE_FULL,
            SrcRangeKey {
                id,
                addr: crate::desired::addr(client),
            },
        );
        self.src_ranges.get(&key, 0).is_ok()
    }

    /// The source ranges of frontend `id` as CIDRs (an iteration of the trie).
    pub fn src_ranges_of(&self, id: u32) -> Vec<String> {
        self.src_ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().id == id)
            .map(|k| {
                RangeEntry {
                    prefix_len: k.prefix_len(),
                    key: k.data(),
                }
                .to_string()
            })
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
            UDP_SOCKS => self.udp_socks.map(),
            TCP_SOCKS => self.tcp_socks.map(),
            CT => self.ct.map(),
            CT4 => self.ct4.map(),
            SRC_RANGES => self.src_ranges.map(),
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
            (UDP_SOCKS, sizes.udp_socks),
            (TCP_SOCKS, sizes.tcp_socks),
            (CT, sizes.ct),
            (CT4, sizes.ct4),
            (SRC_RANGES, self.src_ranges.keys().count()),
        ]
        .into_iter()
        .map(|(map, entries)| Fill {
            map,
            entries,
            capacity: self.capacity(map),
        })
        .collect()
    }

    /// Slots held now in the table whose owners are `owners`: the owners that are not 0 (512
    /// KiB read through its mapping, tens of microseconds); 0 if it is not mapped. Not the
    /// claim and release counters: per-CPU counters can lose an increment to preemption, and
    /// the difference would drift.
    fn slots_held(owners: Option<&super::mapped::MappedU64s>) -> usize {
        owners.map_or(0, super::mapped::MappedU64s::count_nonzero)
    }

    /// Entries in the per-connection maps (an iteration each: for inspection, not hot paths).
    pub fn conn_table_sizes(&self) -> ConnTableSizes {
        ConnTableSizes {
            revnat: self.revnat.keys().count(),
            affinity: self.affinity.keys().count(),
            udp_flows: self.udp_flows.keys().count(),
            udp_socks: Self::slots_held(self.udp_owners.as_ref()),
            tcp_socks: Self::slots_held(self.tcp_owners.as_ref()),
            ct: self.ct.keys().count(),
            ct4: self.ct4.keys().count(),
        }
    }
}

/// The owners array `name` (`LB_UDP_OWNERS`, `LB_TCP_OWNERS`) mapped read-only, for counting
/// the slots held; `None` (logged: that fill then reads 0) if the mapping fails.
fn mapped_owners(
    layout: &PinLayout,
    name: &'static str,
) -> Result<Option<super::mapped::MappedU64s>, MapsError> {
    let owners: Array<MapData, u64> = typed(layout, name)?;
    Ok(super::mapped::MappedU64s::new(owners.map(), owners.len())
        .map_err(|e| tracing::warn!(map = name, error = %e, "owners not mapped: its fill reads 0"))
        .ok())
}

/// Batched updates of `keys` to `values` in `map` ([`batch::write`]).
fn batch_put<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    threads: usize,
) -> Result<(), batch::Stopped> {
    batch::write(
        &batch::Updates { map, keys, values },
        keys.len(),
        batch::CHUNK,
        threads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_name_the_map() {
        let err = map_error(SLOTS, 8, std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(err.to_string(), "writing map LB_SLOTS");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(
            chain.contains("LB_SLOTS") && chain.contains("memory"),
            "{chain}"
        );
        for errno in [libc::E2BIG, libc::ENOSPC] {
            let err = map_error(MEMBERS, 8, std::io::Error::from_raw_os_error(errno));
            assert_eq!(err.to_string(), "map LB_MEMBERS is full (capacity 8)");
        }
    }
}
