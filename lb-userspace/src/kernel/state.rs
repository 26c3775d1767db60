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
};

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
        let highest = state
            .ids
            .keys()
            .chain(state.slots.keys())
            .chain(state.members.keys())
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
            .chain(self.tables.keys())
            .copied()
            .filter(|id| !self.ids.contains_key(id))
            .collect()
    }

    fn id_in_use(&self, id: u32) -> bool {
        self.ids.contains_key(&id)
            || self.slots.contains_key(&id)
            || self.members.contains_key(&id)
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
