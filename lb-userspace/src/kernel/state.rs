//! The agent's mirror of the maps it writes, and the writes themselves: what the kernel
//! holds, as read at start and kept current by each [`Op`] the kernel accepted. The plan
//! (crate::plan) turns the difference to the desired state into ops; this module knows
//! nothing of desired states.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::BuildHasher as _,
    sync::Arc,
};

use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    maps::{Backend, Frontend, FrontendKey, MemberKey, SlotKey},
    nat::SrcRangeKey,
};

/// One entry of the source-range trie (`lb_common::nat::SRC_RANGES`): its prefix length
/// (over the id and the address) and its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeEntry {
    pub prefix_len: u32,
    pub key: SrcRangeKey,
}

impl std::fmt::Display for RangeEntry {
    /// The range as a CIDR (`192.0.2.0/24`, `2001:db8::/32`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = std::net::Ipv6Addr::from(self.key.addr.octets());
        // Prefix lengths count the 32 bits of the id first, then IPv4 sits behind ::ffff:0:0/96.
        let bits = self.prefix_len.saturating_sub(32);
        match addr.to_ipv4_mapped() {
            Some(v4) => write!(f, "{v4}/{}", bits.saturating_sub(96)),
            None => write!(f, "{addr}/{bits}"),
        }
    }
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutMember(MemberKey),
    PutSlot(SlotKey, Backend),
    /// One chunk of a frontend's Maglev table (`LB_MAGLEV`); shared, as chunks are 4 KiB.
    PutTable(MaglevKey, Arc<MaglevChunk>),
    PutFrontend(FrontendKey, Frontend),
    /// A frontend that goes away, with its id.
    DelFrontend(FrontendKey, u32),
    DelSlot(SlotKey),
    DelTable(MaglevKey),
    DelMember(MemberKey),
    PutRange(RangeEntry),
    DelRange(RangeEntry),
}

/// A digest of a table chunk: the mirror keeps this instead of the 4 KiB chunk. Stable within
/// one agent process only (it compares chunks, it is never stored).
pub fn chunk_digest(chunk: &MaglevChunk) -> u64 {
    // Fixed keys (not RandomState): digests of equal chunks must be equal.
    std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(chunk.entries)
}

impl Op {
    /// The frontend id the write belongs to.
    pub const fn id(&self) -> u32 {
        match self {
            Self::PutMember(k) | Self::DelMember(k) => k.id,
            Self::PutSlot(k, _) | Self::DelSlot(k) => k.id,
            Self::PutTable(k, _) | Self::DelTable(k) => k.id,
            Self::PutFrontend(_, f) => f.id,
            Self::DelFrontend(_, id) => *id,
            Self::PutRange(e) | Self::DelRange(e) => e.key.id,
        }
    }
}

/// The plan's cache of Maglev tables: per frontend id, the table size and external backends
/// (slot order) of the last table built for it, and its chunks' digests. A cache, not part of
/// the kernel's state: it never makes two states unequal.
#[derive(Clone, Debug, Default)]
struct TableMemo(HashMap<u32, (u32, Vec<Backend>, Vec<u64>)>);

impl PartialEq for TableMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TableMemo {}

/// What the agent-written maps hold, as read from the kernel and kept current by [`Op`]s
/// that succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    frontends: HashMap<FrontendKey, Frontend>,
    /// Frontend id -> its key, for the ids in use.
    ids: HashMap<u32, FrontendKey>,
    slots: HashMap<u32, BTreeMap<u32, Backend>>,
    members: HashMap<u32, HashSet<Backend>>,
    /// Frontend id -> its source ranges.
    ranges: HashMap<u32, BTreeSet<RangeEntry>>,
    /// Frontend id -> its Maglev table chunks (chunk number -> [`chunk_digest`]).
    tables: HashMap<u32, BTreeMap<u32, u64>>,
    /// The Maglev table size `M` the plan builds tables of; 0: `--lb-algorithm random`, no
    /// tables (and the plan removes any).
    maglev_size: u32,
    /// The plan's cache of built tables (see [`TableMemo`]).
    memo: TableMemo,
    next_id: u32,
}

impl KernelState {
    /// The state of freshly read maps. Entries that do not fit together (slots or members of
    /// an id without a frontend) are kept, so the next plan removes them.
    pub fn from_entries(
        frontends: impl IntoIterator<Item = (FrontendKey, Frontend)>,
        slots: impl IntoIterator<Item = (SlotKey, Backend)>,
        members: impl IntoIterator<Item = MemberKey>,
        ranges: impl IntoIterator<Item = RangeEntry>,
    ) -> Self {
        let mut state = Self {
            next_id: 1,
            ..Self::default()
        };
        for (key, value) in frontends {
            state.apply(&Op::PutFrontend(key, value));
        }
        for (key, backend) in slots {
            state.apply(&Op::PutSlot(key, backend));
        }
        for key in members {
            state.apply(&Op::PutMember(key));
        }
        for entry in ranges {
            state.apply(&Op::PutRange(entry));
        }
        let highest = state
            .ids
            .keys()
            .chain(state.slots.keys())
            .chain(state.members.keys())
            .chain(state.ranges.keys())
            .chain(state.tables.keys())
            .max()
            .copied()
            .unwrap_or(0);
        state.next_id = highest.wrapping_add(1).max(1);
        state
    }

    /// Adds the Maglev table chunks read from `LB_MAGLEV` (key and [`chunk_digest`]).
    #[must_use]
    pub fn with_tables(mut self, chunks: impl IntoIterator<Item = (MaglevKey, u64)>) -> Self {
        for (key, digest) in chunks {
            self.tables
                .entry(key.id)
                .or_default()
                .insert(key.chunk, digest);
            if key.id >= self.next_id {
                self.next_id = key.id.wrapping_add(1).max(1);
            }
        }
        self
    }

    /// Plans Maglev tables of `size` entries for the external frontends (`--lb-algorithm
    /// maglev`), or none with 0.
    #[must_use]
    pub fn with_maglev_size(mut self, size: u32) -> Self {
        self.maglev_size = size;
        self
    }

    /// The Maglev table size the plan uses (0: none).
    pub fn maglev_size(&self) -> u32 {
        self.maglev_size
    }

    /// Takes the entries of `fresh` (just read from the maps), keeping the id counter so ids
    /// stay unused, and the table size; returns whether the entries differed.
    pub fn replace_entries(&mut self, fresh: Self) -> bool {
        let next_id = self.next_id.max(fresh.next_id);
        let differed = self.frontends != fresh.frontends
            || self.slots != fresh.slots
            || self.members != fresh.members
            || self.ranges != fresh.ranges
            || self.tables != fresh.tables;
        *self = Self {
            next_id,
            maglev_size: self.maglev_size,
            memo: std::mem::take(&mut self.memo),
            ..fresh
        };
        differed
    }

    /// The chunk digests of the last table built for `id`, if it was built for table size
    /// `size` and `external` backends.
    pub fn memo_table(&self, id: u32, size: u32, external: &[Backend]) -> Option<&Vec<u64>> {
        self.memo
            .0
            .get(&id)
            .filter(|(m, backends, _)| *m == size && backends == external)
            .map(|(_, _, digests)| digests)
    }

    /// Remembers the table built for `id`.
    pub fn remember_table(&mut self, id: u32, size: u32, external: &[Backend], digests: Vec<u64>) {
        self.memo.0.insert(id, (size, external.to_vec(), digests));
    }

    /// The Maglev table chunks of frontend `id` (chunk number -> digest), if it has any.
    pub fn table(&self, id: u32) -> Option<&BTreeMap<u32, u64>> {
        self.tables.get(&id)
    }

    /// Entries of `LB_MAGLEV`.
    pub fn table_chunk_count(&self) -> usize {
        self.tables.values().map(BTreeMap::len).sum()
    }

    pub fn frontends(&self) -> &HashMap<FrontendKey, Frontend> {
        &self.frontends
    }

    /// Backends in slot order for frontend `id` (all slots present, including past the count).
    pub fn slots(&self, id: u32) -> impl Iterator<Item = (u32, &Backend)> {
        self.slots
            .get(&id)
            .into_iter()
            .flatten()
            .map(|(s, b)| (*s, b))
    }

    pub fn slot_count(&self) -> usize {
        self.slots.values().map(BTreeMap::len).sum()
    }

    /// Entries of `LB_MEMBERS`.
    pub fn member_count(&self) -> usize {
        self.members.values().map(HashSet::len).sum()
    }

    /// The source ranges of frontend `id`, if it has any.
    pub fn ranges(&self, id: u32) -> Option<&BTreeSet<RangeEntry>> {
        self.ranges.get(&id)
    }

    /// Entries of the source-range trie.
    pub fn range_count(&self) -> usize {
        self.ranges.values().map(BTreeSet::len).sum()
    }

    /// Records a write that the kernel accepted.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutMember(MemberKey { id, backend }) => {
                self.members.entry(id).or_default().insert(backend);
            }
            Op::PutSlot(SlotKey { id, slot }, backend) => {
                self.slots.entry(id).or_default().insert(slot, backend);
            }
            Op::PutTable(MaglevKey { id, chunk }, ref value) => {
                self.tables
                    .entry(id)
                    .or_default()
                    .insert(chunk, chunk_digest(value));
            }
            Op::DelTable(MaglevKey { id, chunk }) => {
                if let Some(chunks) = self.tables.get_mut(&id) {
                    chunks.remove(&chunk);
                    if chunks.is_empty() {
                        self.tables.remove(&id);
                    }
                }
            }
            Op::PutFrontend(key, value) => {
                if let Some(old) = self.frontends.insert(key, value) {
                    self.ids.remove(&old.id);
                }
                self.ids.insert(value.id, key);
            }
            Op::DelFrontend(key, _) => {
                if let Some(old) = self.frontends.remove(&key) {
                    self.ids.remove(&old.id);
                    self.memo.0.remove(&old.id);
                }
            }
            Op::DelSlot(SlotKey { id, slot }) => {
                if let Some(slots) = self.slots.get_mut(&id) {
                    slots.remove(&slot);
                    if slots.is_empty() {
                        self.slots.remove(&id);
                    }
                }
            }
            Op::DelMember(MemberKey { id, backend }) => {
                if let Some(members) = self.members.get_mut(&id) {
                    members.remove(&backend);
                    if members.is_empty() {
                        self.members.remove(&id);
                    }
                }
            }
            Op::PutRange(entry) => {
                self.ranges.entry(entry.key.id).or_default().insert(entry);
            }
            Op::DelRange(entry) => {
                if let Some(ranges) = self.ranges.get_mut(&entry.key.id) {
                    ranges.remove(&entry);
                    if ranges.is_empty() {
                        self.ranges.remove(&entry.key.id);
                    }
                }
            }
        }
    }

    /// Records writes that the kernel accepted, as [`KernelState::apply`] one by one; runs
    /// of one frontend's members or slots (as the planner emits them) look its entry up once.
    pub fn apply_all(&mut self, ops: &[Op]) {
        let mut rest = ops;
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|op| {
                    std::mem::discriminant(*op) == std::mem::discriminant(first)
                        && op.id() == first.id()
                })
                .count();
            let (now, later) = rest.split_at(run);
            match first {
                Op::PutMember(MemberKey { id, .. }) => {
                    let members = self.members.entry(*id).or_default();
                    members.reserve(now.len());
                    for op in now {
                        if let Op::PutMember(key) = op {
                            members.insert(key.backend);
                        }
                    }
                }
                Op::PutSlot(SlotKey { id, .. }, _) => {
                    let slots = self.slots.entry(*id).or_default();
                    for op in now {
                        if let Op::PutSlot(key, backend) = op {
                            slots.insert(key.slot, *backend);
                        }
                    }
                }
                _ => {
                    for op in now {
                        self.apply(op);
                    }
                }
            }
            rest = later;
        }
    }

    /// Slot -> backend of frontend `id`, if it has any slots.
    pub fn slot_map(&self, id: u32) -> Option<&BTreeMap<u32, Backend>> {
        self.slots.get(&id)
    }

    /// The members (`LB_MEMBERS` entries) of frontend `id`, if it has any.
    pub fn members(&self, id: u32) -> Option<&HashSet<Backend>> {
        self.members.get(&id)
    }

    /// Ids that have slots or members but no frontend (left by an agent that died
    /// mid-write): all of their entries should go.
    pub fn orphan_ids(&self) -> BTreeSet<u32> {
        self.slots
            .keys()
            .chain(self.members.keys())
            .chain(self.ranges.keys())
            .chain(self.tables.keys())
            .copied()
            .filter(|id| !self.ids.contains_key(id))
            .collect()
    }

    fn id_in_use(&self, id: u32) -> bool {
        self.ids.contains_key(&id)
            || self.slots.contains_key(&id)
            || self.members.contains_key(&id)
            || self.ranges.contains_key(&id)
            || self.tables.contains_key(&id)
    }

    /// A frontend id that is not in use. Ids grow and are not reused while the agent runs,
    /// so affinity and flow entries of a removed frontend never match a new one.
    pub fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.id_in_use(id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{Addr, nat::src_range_prefix};

    use super::*;

    /// A trie entry shows as the CIDR it was made from, in both families.
    #[rstest::rstest]
    #[case::v4("192.0.2.0", 24)]
    #[case::v4_host("10.1.2.3", 32)]
    #[case::v4_all("0.0.0.0", 0)]
    #[case::v6("2001:db8::", 32)]
    #[case::v6_host("fd00:250:1::3", 128)]
    fn ranges_show_as_cidrs(#[case] addr: &str, #[case] len: u8) {
        let ip: std::net::IpAddr = addr.parse().unwrap();
        let entry = RangeEntry {
            prefix_len: src_range_prefix(ip.is_ipv4(), len),
            key: SrcRangeKey {
                id: 7,
                addr: crate::desired::addr(&ip),
            },
        };
        assert_eq!(entry.to_string(), format!("{addr}/{len}"));
    }

    #[test]
    fn applying_runs_at_once_is_applying_one_by_one() {
        let mut next = crate::test_support::xorshift(0x2545_f491_4f6c_dd1d);
        let backend = |n: u64| Backend::new(Addr::from_v4_octets([10, 1, 0, n as u8]), 80);
        let fkey = |n: u64| FrontendKey {
            addr: Addr::from_v4_octets([10, 96, 0, n as u8]),
            port: 80,
            proto: 6,
            _pad: 0,
        };
        let mut ops = Vec::new();
        for _ in 0..5000 {
            let id = 1 + next(4) as u32;
            // Runs of one kind and id, as the planner emits them, and singles between.
            let kind = next(6);
            for _ in 0..1 + next(5) {
                let op = match kind {
                    0 => Op::PutMember(MemberKey {
                        id,
                        backend: backend(next(9)),
                    }),
                    1 => Op::DelMember(MemberKey {
                        id,
                        backend: backend(next(9)),
                    }),
                    2 => Op::PutSlot(
                        SlotKey {
                            id,
                            slot: next(6) as u32,
                        },
                        backend(next(9)),
                    ),
                    3 => Op::DelSlot(SlotKey {
                        id,
                        slot: next(6) as u32,
                    }),
                    4 => Op::PutFrontend(
                        fkey(next(3)),
                        Frontend {
                            id,
                            count: next(4) as u32,
                            affinity_timeout_s: 0,
                            flags: 0,
                            ext_count: 0,
                            ext_local: 0,
                        },
                    ),
                    _ => Op::DelFrontend(fkey(next(3)), id),
                };
                ops.push(op);
            }
        }
        let mut one_by_one = KernelState::from_entries([], [], [], []);
        for op in &ops {
            one_by_one.apply(op);
        }
        let mut at_once = KernelState::from_entries([], [], [], []);
        for piece in ops.chunks(97) {
            at_once.apply_all(piece);
        }
        assert_eq!(at_once, one_by_one);
    }
}
