//! The diff: from what the kernel maps hold ([`KernelState`], the kernel module's mirror) to
//! what they should hold, as an ordered list of map writes ([`Op`]).
//!
//! The order makes every intermediate state valid for a connecting client, as cilium's
//! `updateFrontend` does: for each frontend, new memberships, then slots, then the frontend
//! with its count, then the slots past the count and the memberships that ended. A frontend
//! that goes away goes first (frontend, then its slots and members), so a full map frees room
//! before anything is added. Re-planning the same desired state gives no writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
};

use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    maps::{
        Backend, Frontend, FrontendKey, MemberKey, REVERSE_ACTIVE, REVERSE_DRAINING,
        REVERSE_PENDING, RevNat, Reverse, SlotKey,
    },
    nat::{
        EXT_SLOT_BASE, FRONTEND_ETP_LOCAL, FRONTEND_EXTERNAL, FRONTEND_SRC_RANGES, SrcRangeKey,
        src_range_prefix,
    },
};

use crate::desired::{Desired, DesiredFrontend, ExternalBackends};
use crate::kernel::state::{KernelState, Op, RangeEntry, chunk_digest};
use crate::maglev;
use crate::model::Cidr;

/// Where an op goes when the batches of many frontends are written together, phase by
/// phase (so each phase can be one batched syscall per map). Within every batch the ops
/// already come in this order, so dealing them into per-phase lists keeps each frontend's
/// make-before-break order: removed frontends go first (frontend, slots, tables, members,
/// source ranges), then memberships, source ranges, slots, Maglev table chunks (which index
/// the external slots), frontends, tail slots, tail table chunks, ended memberships and
/// ranges no longer wanted.
fn phase(op: &Op, removing: bool) -> u8 {
    match op {
        Op::DelFrontend(..) => 0,
        Op::DelSlot(_) if removing => 1,
        Op::DelTable(_) if removing => 2,
        Op::DelMember(_) if removing => 3,
        Op::DelRange(_) if removing => 4,
        Op::PutMember(_) => 5,
        Op::PutRange(_) => 6,
        Op::PutSlot(..) => 7,
        Op::PutTable(..) => 8,
        Op::PutFrontend(..) => 9,
        Op::DelSlot(_) => 10,
        Op::DelTable(_) => 11,
        Op::DelMember(_) => 12,
        Op::DelRange(_) => 13,
    }
}

/// Phases of [`phase`]: 0 to 13.
const PHASES: usize = 14;

/// All ops of `batches`, ordered by phase (each frontend's own order kept). Linear: the ops
/// are dealt into one list per phase (a first sync has millions).
pub fn by_phase(batches: &[Batch]) -> Vec<Op> {
    let mut phases: [Vec<Op>; PHASES] = Default::default();
    for batch in batches {
        // A batch that deletes a frontend or only cleans up an orphan id removes
        // everything it touches.
        let removing = batch.iter().all(|op| {
            matches!(
                op,
                Op::DelFrontend(..)
                    | Op::DelSlot(_)
                    | Op::DelTable(_)
                    | Op::DelMember(_)
                    | Op::DelRange(_)
            )
        }) && !batch.iter().any(|op| matches!(op, Op::PutFrontend(..)));
        for op in batch {
            phases[usize::from(phase(op, removing))].push(op.clone());
        }
    }
    let mut ops = Vec::with_capacity(phases.iter().map(Vec::len).sum());
    for list in phases {
        ops.extend(list);
    }
    ops
}

/// The writes for one frontend, in order. If one fails, the rest of the batch must not be
/// applied (a count could point past the slots written); other batches are independent.
pub type Batch = Vec<Op>;

impl KernelState {
    /// The writes that turn this state into `desired`, one batch per frontend (removals
    /// first). Allocates ids for new frontends. Idempotent: planning again after the writes
    /// were applied gives nothing.
    pub fn plan(&mut self, desired: &Desired) -> Vec<Batch> {
        let mut batches = Vec::new();
        let mut gone: Vec<(&FrontendKey, &Frontend)> = self
            .frontends()
            .iter()
            .filter(|(key, _)| !desired.frontends.contains_key(key))
            .collect();
        gone.sort_unstable_by_key(|(key, _)| **key);
        for (key, frontend) in gone {
            batches.push(self.removal(*key, frontend.id));
        }
        for id in self.orphan_ids() {
            let mut ops = Vec::new();
            self.remove_backends_of(id, &mut ops);
            batches.push(ops);
        }
        for (key, want) in &desired.frontends {
            batches.extend(self.update(*key, want));
        }
        batches
    }

    /// The writes that bring only `keys` to `desired` (the frontends a change touched): the
    /// same batches [`KernelState::plan`] would make for them, removals first.
    pub fn plan_frontends<'k>(
        &mut self,
        desired: &Desired,
        keys: impl IntoIterator<Item = &'k FrontendKey>,
    ) -> Vec<Batch> {
        let mut removals = Vec::new();
        let mut updates = Vec::new();
        for key in keys {
            match (
                desired.frontends.get(key),
                self.frontends().get(key).map(|f| f.id),
            ) {
                (None, Some(id)) => removals.push(self.removal(*key, id)),
                (Some(want), _) => updates.extend(self.update(*key, want)),
                (None, None) => {}
            }
        }
        removals.extend(updates);
        removals
    }

    /// The batch that removes a frontend: the frontend first (clients stop using it), then
    /// its slots and memberships.
    fn removal(&self, key: FrontendKey, id: u32) -> Batch {
        let mut ops = vec![Op::DelFrontend(key, id)];
        self.remove_backends_of(id, &mut ops);
        ops
    }

    /// The batch that brings one frontend to `want` (allocating its id if it is new), or
    /// `None` if it is already there.
    fn update(&mut self, key: FrontendKey, want: &DesiredFrontend) -> Option<Batch> {
        let current = self.frontends().get(&key).copied();
        let id = match current {
            Some(frontend) => frontend.id,
            None => self.allocate_id(),
        };
        let mut ops = Vec::new();
        let external: Vec<Backend> = want
            .external
            .iter()
            .flat_map(ExternalBackends::ordered)
            .copied()
            .collect();
        let table = self.want_table(id, &external);
        self.plan_frontend(key, id, current, want, &table, &mut ops);
        (!ops.is_empty()).then_some(ops)
    }

    fn remove_backends_of(&self, id: u32, ops: &mut Vec<Op>) {
        for (slot, _) in self.slots(id) {
            ops.push(Op::DelSlot(SlotKey { id, slot }));
        }
        for &chunk in self.table(id).into_iter().flat_map(BTreeMap::keys) {
            ops.push(Op::DelTable(MaglevKey { id, chunk }));
        }
        let mut members: Vec<&Backend> = self.members(id).into_iter().flatten().collect();
        members.sort_unstable();
        for backend in members {
            ops.push(Op::DelMember(MemberKey {
                id,
                backend: *backend,
            }));
        }
        for entry in self.ranges(id).into_iter().flatten() {
            ops.push(Op::DelRange(*entry));
        }
    }

    /// The Maglev table frontend `id` should have for its external backends `external` (in
    /// slot order), or an empty one (no table size, no external backend). Built only when the
    /// backends or the size changed since the last build for `id`, or the kernel's chunks
    /// differ from it: a full plan of thousands of frontends rebuilds nothing (a build of
    /// M = 16381 takes about 0.2 ms).
    fn want_table(&mut self, id: u32, external: &[Backend]) -> WantTable {
        let size = self.maglev_size();
        if size == 0 || external.is_empty() {
            return WantTable::default();
        }
        let in_kernel: Vec<u64> = self
            .table(id)
            .map(|t| t.values().copied().collect())
            .unwrap_or_default();
        if let Some(digests) = self.memo_table(id, size, external)
            && *digests == in_kernel
        {
            return WantTable {
                digests: digests.clone(),
                chunks: Vec::new(),
            };
        }
        let chunks: Vec<Arc<MaglevChunk>> = maglev::chunks(&maglev::table(external, size))
            .into_iter()
            .map(Arc::new)
            .collect();
        let digests: Vec<u64> = chunks.iter().map(|c| chunk_digest(c)).collect();
        self.remember_table(id, size, external, digests.clone());
        WantTable { digests, chunks }
    }

    fn plan_frontend(
        &self,
        key: FrontendKey,
        id: u32,
        current: Option<Frontend>,
        want: &DesiredFrontend,
        table: &WantTable,
        ops: &mut Vec<Op>,
    ) {
        let empty_slots = BTreeMap::new();
        let empty_members = HashSet::new();
        let slots = self.slot_map(id).unwrap_or(&empty_slots);
        let members = self.members(id).unwrap_or(&empty_members);
        let old_count = current.map_or(0, |f| f.count);
        let in_use: Vec<Option<Backend>> = (0..old_count)
            .map(|slot| slots.get(&slot).copied())
            .collect();
        let assigned = assign_slots(&in_use, &want.backends);
        let members_wanted = want.members();
        for backend in &members_wanted {
            if !members.contains(backend) {
                ops.push(Op::PutMember(MemberKey {
                    id,
                    backend: *backend,
                }));
            }
        }
        // Source ranges before the frontend that turns the filter on, gone after it.
        let empty_ranges = BTreeSet::new();
        let ranges = self.ranges(id).unwrap_or(&empty_ranges);
        let ranges_wanted = range_entries(id, &want.source_ranges);
        for entry in ranges_wanted.difference(ranges) {
            ops.push(Op::PutRange(*entry));
        }
        for (slot, backend) in (0u32..).zip(&assigned) {
            if slots.get(&slot) != Some(backend) {
                ops.push(Op::PutSlot(SlotKey { id, slot }, *backend));
            }
        }
        // External backends: their own range, this node's first (the XDP datapath serves
        // `ext_local` of them without SNAT).
        let external: Vec<Backend> = want
            .external
            .iter()
            .flat_map(ExternalBackends::ordered)
            .copied()
            .collect();
        for (slot, backend) in (EXT_SLOT_BASE..).zip(&external) {
            if slots.get(&slot) != Some(backend) {
                ops.push(Op::PutSlot(SlotKey { id, slot }, *backend));
            }
        }
        // The Maglev table indexes the external slots just written; the frontend (its new
        // `ext_count`) comes after it.
        let empty_table = BTreeMap::new();
        let table_now = self.table(id).unwrap_or(&empty_table);
        for ((chunk, digest), value) in (0u32..)
            .zip(&table.digests)
            .zip(table.chunks.iter().map(Some).chain(std::iter::repeat(None)))
        {
            if table_now.get(&chunk) != Some(digest) {
                // Built whenever a chunk differs from the kernel's (`want_table`).
                if let Some(value) = value {
                    ops.push(Op::PutTable(MaglevKey { id, chunk }, value.clone()));
                }
            }
        }
        let table_len = u32::try_from(table.digests.len()).unwrap_or(u32::MAX);
        let count = u32::try_from(assigned.len()).unwrap_or(u32::MAX);
        let ext_count = u32::try_from(external.len()).unwrap_or(u32::MAX);
        let value = Frontend {
            id,
            count,
            affinity_timeout_s: want.affinity_timeout_s,
            flags: want.external.as_ref().map_or(0, |ext| {
                FRONTEND_EXTERNAL
                    | if ext.policy_local {
                        FRONTEND_ETP_LOCAL
                    } else {
                        0
                    }
            }) | if ranges_wanted.is_empty() {
                0
            } else {
                FRONTEND_SRC_RANGES
            },
            ext_count,
            ext_local: want
                .external
                .as_ref()
                .map_or(0, |ext| u32::try_from(ext.local.len()).unwrap_or(u32::MAX)),
        };
        if current != Some(value) {
            ops.push(Op::PutFrontend(key, value));
        }
        for (&slot, _) in slots
            .range(count..EXT_SLOT_BASE)
            .chain(slots.range(EXT_SLOT_BASE.saturating_add(ext_count)..))
        {
            ops.push(Op::DelSlot(SlotKey { id, slot }));
        }
        for (&chunk, _) in table_now.range(table_len..) {
            ops.push(Op::DelTable(MaglevKey { id, chunk }));
        }
        let mut ended: Vec<&Backend> = members
            .iter()
            .filter(|b| !members_wanted.contains(b))
            .collect();
        ended.sort_unstable();
        for backend in ended {
            ops.push(Op::DelMember(MemberKey {
                id,
                backend: *backend,
            }));
        }
        for entry in ranges.difference(&ranges_wanted) {
            ops.push(Op::DelRange(*entry));
        }
    }
}

/// The trie entries of frontend `id` for `ranges` (addresses as [`Addr`] holds them, IPv4
/// mapped into IPv6).
fn range_entries(id: u32, ranges: &[Cidr]) -> BTreeSet<RangeEntry> {
    ranges
        .iter()
        .map(|c| RangeEntry {
            prefix_len: src_range_prefix(c.addr.is_ipv4(), c.len),
            key: SrcRangeKey {
                id,
                addr: crate::desired::addr(&c.addr),
            },
        })
        .collect()
}

/// A frontend's Maglev table as it should be: each chunk's digest, and the chunks themselves
/// when they had to be built (empty when the kernel already holds them all).
#[derive(Debug, Default)]
struct WantTable {
    digests: Vec<u64>,
    chunks: Vec<Arc<MaglevChunk>>,
}

/// The new slot layout: backends that stay keep their slot when it is still in range, so a
/// change moves as few slots as possible; new backends fill the holes in order.
fn assign_slots(in_use: &[Option<Backend>], want: &BTreeSet<Backend>) -> Vec<Backend> {
    let n = want.len();
    let mut layout: Vec<Option<Backend>> = vec![None; n];
    let mut placed = HashSet::new();
    for (slot, backend) in layout.iter_mut().zip(in_use) {
        if let Some(b) = backend
            && want.contains(b)
            && placed.insert(*b)
        {
            *slot = Some(*b);
        }
    }
    let mut rest = want.iter().filter(|b| !placed.contains(*b));
    layout
        .into_iter()
        .filter_map(|slot| slot.or_else(|| rest.next().copied()))
        .collect()
}

/// The `LB_REVERSE` entries the kernel should hold, for `desired` with the frontend ids of
/// `state` (the kernel's, after the pass's writes): for each TCP backend (address, port),
/// the ClusterIP frontend of the lowest (namespace, name, port, frontend key) that has it
/// among its backends. A connect through that frontend to that backend then writes no socket
/// storage (getpeername answers from the entry); a connect through any other frontend to it
/// writes storage as before. Backends whose address and port are themselves a frontend get
/// none (a connect to them is translated, so "direct" cannot be told from "through").
///
/// The agent keeps this set up to date incrementally (`crate::revindex::ReverseIndex`); this
/// whole computation is the rule's statement and the index's test oracle, built for tests only.
#[cfg(test)]
pub fn reverse_wanted(desired: &Desired, state: &KernelState) -> BTreeMap<FrontendKey, RevNat> {
    use std::collections::btree_map::Entry;

    use lb_common::maps::IPPROTO_TCP;

    use crate::desired::FrontendKind;

    let mut best: BTreeMap<FrontendKey, (&DesiredFrontend, FrontendKey)> = BTreeMap::new();
    for (key, want) in &desired.frontends {
        if key.proto != IPPROTO_TCP || want.kind != FrontendKind::ClusterIp {
            continue;
        }
        if state.frontends().get(key).is_none_or(|f| f.count == 0) {
            continue; // not (yet) in the kernel: no connect reaches a backend through it
        }
        for backend in &want.backends {
            let rkey = FrontendKey {
                addr: backend.addr,
                port: backend.port,
                proto: IPPROTO_TCP,
                _pad: 0,
            };
            if desired.frontends.contains_key(&rkey) {
                continue;
            }
            match best.entry(rkey) {
                Entry::Vacant(slot) => {
                    slot.insert((want, *key));
                }
                Entry::Occupied(mut slot) => {
                    let (f, k) = slot.get();
                    if (&want.service, u16::from_be(key.port), key)
                        < (&f.service, u16::from_be(k.port), k)
                    {
                        slot.insert((want, *key));
                    }
                }
            }
        }
    }
    best.into_iter()
        .filter_map(|(rkey, (_, key))| {
            let id = state.frontends().get(&key)?.id;
            Some((
                rkey,
                RevNat {
                    addr: key.addr,
                    port: key.port,
                    _pad: [0; 2],
                    id,
                },
            ))
        })
        .collect()
}

/// Writes to `LB_REVERSE` ([`lb_common::maps::Reverse`] states): entries to put and keys to
/// delete, in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReverseWrites {
    pub put: Vec<(FrontendKey, Reverse)>,
    pub delete: Vec<FrontendKey>,
}

impl ReverseWrites {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }
}

fn reverse_entry(service: RevNat, state: u32) -> Reverse {
    Reverse { service, state }
}

/// The first half of a round of the reverse-entry protocol, from what `LB_REVERSE` holds
/// (`current`) to `wanted` ([`reverse_wanted`]): a new entry is written
/// [`REVERSE_PENDING`]; an active entry no longer wanted, or wanted for another frontend,
/// becomes [`REVERSE_DRAINING`] (never deleted or changed at once: sockets connected through
/// it without storage need their storage first); a pending entry (or one in a state this
/// agent does not know) no longer wanted is deleted and one wanted for another frontend is
/// rewritten pending (no socket went without storage through a pending entry). Entries left
/// pending or draining then need the socket walk, and [`reverse_after_walk`]. New entries
/// stop at `capacity` entries in all (the backends past it keep socket storage).
pub fn reverse_step(
    current: &BTreeMap<FrontendKey, Reverse>,
    wanted: &BTreeMap<FrontendKey, RevNat>,
    capacity: usize,
) -> ReverseWrites {
    let mut out = ReverseWrites::default();
    for (key, entry) in current {
        let want = wanted.get(key);
        match entry.state {
            REVERSE_ACTIVE if want != Some(&entry.service) => out
                .put
                .push((*key, reverse_entry(entry.service, REVERSE_DRAINING))),
            REVERSE_ACTIVE | REVERSE_DRAINING => {}
            _ => match want {
                Some(service) if *service == entry.service && entry.state == REVERSE_PENDING => {}
                Some(service) => out
                    .put
                    .push((*key, reverse_entry(*service, REVERSE_PENDING))),
                None => out.delete.push(*key),
            },
        }
    }
    let mut room = capacity.saturating_sub(current.len());
    for (key, service) in wanted {
        if room == 0 {
            break;
        }
        if !current.contains_key(key) {
            out.put
                .push((*key, reverse_entry(*service, REVERSE_PENDING)));
            room -= 1;
        }
    }
    out
}

/// The second half of a round, once every live socket of the pending and draining entries
/// in `current` was given its storage: draining entries go; pending entries still wanted as
/// they are become [`REVERSE_ACTIVE`].
pub fn reverse_after_walk(
    current: &BTreeMap<FrontendKey, Reverse>,
    wanted: &BTreeMap<FrontendKey, RevNat>,
) -> ReverseWrites {
    let mut out = ReverseWrites::default();
    for (key, entry) in current {
        match entry.state {
            REVERSE_DRAINING => out.delete.push(*key),
            REVERSE_PENDING if wanted.get(key) == Some(&entry.service) => out
                .put
                .push((*key, reverse_entry(entry.service, REVERSE_ACTIVE))),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lb_common::{Addr, maps::IPPROTO_TCP};

    use super::*;
    use crate::{desired::FrontendKind, model::ObjectKey};

    use crate::test_support::{be, fkey};

    fn desired(frontends: &[(u8, &[u8], u32)]) -> Desired {
        let mut d = Desired::default();
        for &(f, backends, affinity) in frontends {
            d.frontends.insert(
                fkey(f),
                DesiredFrontend {
                    service: ObjectKey::new("default", format!("s{f}")),
                    port_name: String::new(),
                    kind: FrontendKind::ClusterIp,
                    policy: crate::desired::TrafficPolicy::default(),
                    affinity_timeout_s: affinity,
                    backends: backends.iter().map(|&b| be(b)).collect(),
                    external: None,
                    source_ranges: Vec::new(),
                },
            );
        }
        d
    }

    /// Plans, applies, checks every intermediate state; returns the ops.
    fn sync(state: &mut KernelState, d: &Desired) -> Vec<Op> {
        sync_from(state, d, true)
    }

    fn sync_from(state: &mut KernelState, d: &Desired, check_each_step: bool) -> Vec<Op> {
        let ops: Vec<Op> = state.plan(d).into_iter().flatten().collect();
        apply_checked(state, d, ops, check_each_step)
    }

    /// Like `sync`, writing phase by phase as the agent does.
    fn sync_by_phase(state: &mut KernelState, d: &Desired) -> Vec<Op> {
        let ops = by_phase(&state.plan(d));
        apply_checked(state, d, ops, true)
    }

    fn apply_checked(
        state: &mut KernelState,
        d: &Desired,
        ops: Vec<Op>,
        check_each_step: bool,
    ) -> Vec<Op> {
        for op in &ops {
            state.apply(op);
            if check_each_step {
                assert_consistent(state);
            }
        }
        assert!(state.plan(d).is_empty(), "not idempotent");
        assert_matches(state, d);
        ops
    }

    /// A client can connect at any moment: every frontend's slots 0..count exist and hold
    /// members.
    fn assert_consistent(state: &KernelState) {
        for (key, f) in state.frontends() {
            // The filter never runs on an empty range set (it would drop every source).
            if f.flags & FRONTEND_SRC_RANGES != 0 {
                assert!(
                    state.ranges(f.id).is_some_and(|r| !r.is_empty()),
                    "{key:?}: source-range flag without ranges"
                );
            }
            for slot in 0..f.count {
                let backend = state.slot_map(f.id).and_then(|s| s.get(&slot));
                let backend = backend.unwrap_or_else(|| panic!("{key:?}: slot {slot} missing"));
                assert!(
                    state.members(f.id).is_some_and(|m| m.contains(backend)),
                    "slot {slot} not a member"
                );
            }
        }
    }

    fn assert_matches(state: &KernelState, d: &Desired) {
        assert_eq!(state.frontends().len(), d.frontends.len());
        for (key, want) in &d.frontends {
            let f = state.frontends()[key];
            let got: BTreeSet<Backend> = state
                .slots(f.id)
                .filter(|(s, _)| *s < f.count)
                .map(|(_, b)| *b)
                .collect();
            assert_eq!(got, want.backends);
            assert_eq!(f.count as usize, want.backends.len());
            assert_eq!(state.slots(f.id).count(), want.slot_count(), "stray slots");
            assert_eq!(
                state.members(f.id).map_or(0, HashSet::len),
                want.members().len()
            );
            assert_eq!(
                state.ranges(f.id).cloned().unwrap_or_default(),
                range_entries(f.id, &want.source_ranges)
            );
            assert_eq!(
                f.flags & FRONTEND_SRC_RANGES != 0,
                !want.source_ranges.is_empty()
            );
        }
        assert!(
            state.orphan_ids().is_empty(),
            "orphan slots or members: {:?}",
            state.orphan_ids()
        );
    }

    /// Source ranges: written before the frontend turns the filter on, changed
    /// make-before-break, removed after the filter is off, and with the frontend.
    #[test]
    fn source_ranges_make_before_break() {
        let cidr = |s: &str| {
            let (a, l) = s.split_once('/').unwrap();
            Cidr::new(a.parse().unwrap(), l.parse().unwrap()).unwrap()
        };
        let with_ranges = |ranges: &[&str]| {
            let mut d = desired(&[(1, &[1], 0)]);
            for f in d.frontends.values_mut() {
                f.source_ranges = ranges.iter().map(|r| cidr(r)).collect();
            }
            d
        };
        let mut state = KernelState::from_entries([], [], [], []);
        let ops = sync(&mut state, &with_ranges(&["10.0.0.0/8"]));
        let put_range = ops.iter().position(|op| matches!(op, Op::PutRange(_)));
        let put_frontend = ops.iter().position(|op| matches!(op, Op::PutFrontend(..)));
        assert!(put_range < put_frontend, "{ops:?}");
        let ops = sync(&mut state, &with_ranges(&["10.0.0.0/8", "192.0.2.0/24"]));
        assert!(matches!(ops[..], [Op::PutRange(_)]), "{ops:?}");
        let ops = sync(&mut state, &with_ranges(&["192.0.2.0/24"]));
        assert!(matches!(ops[..], [Op::DelRange(_)]), "{ops:?}");
        // Off: the flag goes first, then the entry.
        let ops = sync_by_phase(&mut state, &with_ranges(&[]));
        assert!(
            matches!(ops[..], [Op::PutFrontend(..), Op::DelRange(_)]),
            "{ops:?}"
        );
        sync(&mut state, &with_ranges(&["10.0.0.0/8"]));
        let ops = sync_by_phase(&mut state, &Desired::default());
        assert!(matches!(ops.last(), Some(Op::DelRange(_))), "{ops:?}");
        assert_eq!(state.range_count(), 0);
    }

    #[test]
    fn first_sync_writes_members_slots_then_frontend() {
        let mut state = KernelState::from_entries([], [], [], []);
        let ops = sync(&mut state, &desired(&[(1, &[1, 2], 0)]));
        assert!(matches!(ops[0], Op::PutMember(_)));
        assert!(matches!(ops[1], Op::PutMember(_)));
        assert!(matches!(ops[2], Op::PutSlot(..)));
        assert!(matches!(ops[3], Op::PutSlot(..)));
        assert!(matches!(
            ops[4],
            Op::PutFrontend(
                _,
                Frontend {
                    id: 1,
                    count: 2,
                    ..
                }
            )
        ));
        assert_eq!(ops.len(), 5);
    }

    #[test]
    fn reapplying_gives_an_empty_delta() {
        let mut state = KernelState::from_entries([], [], [], []);
        let d = desired(&[(1, &[1, 2, 3], 0), (2, &[], 0), (3, &[4], 10)]);
        sync(&mut state, &d);
        assert!(state.plan(&d).is_empty());
    }

    #[test]
    fn one_endpoint_added_is_three_writes() {
        let mut state = KernelState::from_entries([], [], [], []);
        sync(&mut state, &desired(&[(1, &[1, 2], 0)]));
        let ops = sync(&mut state, &desired(&[(1, &[1, 2, 3], 0)]));
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(
            ops[0],
            Op::PutMember(MemberKey {
                id: 1,
                backend: be(3)
            })
        );
        assert_eq!(ops[1], Op::PutSlot(SlotKey { id: 1, slot: 2 }, be(3)));
        assert!(matches!(
            ops[2],
            Op::PutFrontend(_, Frontend { count: 3, .. })
        ));
    }

    #[test]
    fn removal_shrinks_count_before_deleting() {
        let mut state = KernelState::from_entries([], [], [], []);
        sync(&mut state, &desired(&[(1, &[1, 2, 3], 0)]));
        // Remove the backend in slot 0: the last one moves into its slot, then the count drops.
        let ops = sync(&mut state, &desired(&[(1, &[2, 3], 0)]));
        assert_eq!(
            ops,
            vec![
                Op::PutSlot(SlotKey { id: 1, slot: 0 }, be(3)),
                Op::PutFrontend(
                    fkey(1),
                    Frontend {
                        id: 1,
                        count: 2,
                        affinity_timeout_s: 0,
                        flags: 0,
                        ext_count: 0,
                        ext_local: 0,
                    }
                ),
                Op::DelSlot(SlotKey { id: 1, slot: 2 }),
                Op::DelMember(MemberKey {
                    id: 1,
                    backend: be(1)
                }),
            ]
        );
    }

    #[test]
    fn removed_frontend_goes_first_and_its_id_is_not_reused() {
        let mut state = KernelState::from_entries([], [], [], []);
        sync(&mut state, &desired(&[(1, &[1], 0)]));
        let ops = sync(&mut state, &desired(&[(2, &[1], 0)]));
        assert_eq!(ops[0], Op::DelFrontend(fkey(1), 1));
        assert_eq!(state.frontends()[&fkey(2)].id, 2);
    }

    #[test]
    fn affinity_change_rewrites_only_the_frontend() {
        let mut state = KernelState::from_entries([], [], [], []);
        sync(&mut state, &desired(&[(1, &[1, 2], 0)]));
        let ops = sync(&mut state, &desired(&[(1, &[1, 2], 60)]));
        assert_eq!(ops.len(), 1);
        assert!(matches!(
            ops[0],
            Op::PutFrontend(
                _,
                Frontend {
                    affinity_timeout_s: 60,
                    ..
                }
            )
        ));
    }

    #[test]
    fn external_backends_have_their_own_range_local_first() {
        use crate::desired::ExternalBackends;
        let mut d = desired(&[(1, &[1, 2, 3], 0)]);
        let ext = |local: &[u8], remote: &[u8]| ExternalBackends {
            policy_local: false,
            local: local.iter().map(|&b| be(b)).collect(),
            remote: remote.iter().map(|&b| be(b)).collect(),
        };
        let f = d.frontends.get_mut(&fkey(1)).unwrap();
        f.external = Some(ext(&[3], &[1, 2]));
        let mut state = KernelState::default();
        sync(&mut state, &d);
        let value = state.frontends()[&fkey(1)];
        assert_eq!(
            (value.count, value.ext_count, value.ext_local, value.flags),
            (3, 3, 1, FRONTEND_EXTERNAL)
        );
        let ext_slots: Vec<(u32, Backend)> = state
            .slots(value.id)
            .filter(|(s, _)| *s >= EXT_SLOT_BASE)
            .map(|(s, b)| (s - EXT_SLOT_BASE, *b))
            .collect();
        assert_eq!(ext_slots, [(0, be(3)), (1, be(1)), (2, be(2))]);
        // eTP Local with a fourth, local-only backend (a terminating one, say): a member,
        // an external slot, not a socket slot.
        let f = d.frontends.get_mut(&fkey(1)).unwrap();
        f.external = Some(ExternalBackends {
            policy_local: true,
            ..ext(&[4], &[])
        });
        sync(&mut state, &d);
        let value = state.frontends()[&fkey(1)];
        assert_eq!(
            (value.count, value.ext_count, value.ext_local, value.flags),
            (3, 1, 1, FRONTEND_EXTERNAL | FRONTEND_ETP_LOCAL)
        );
        let all: Vec<u32> = state.slots(value.id).map(|(s, _)| s).collect();
        assert_eq!(all, [0, 1, 2, EXT_SLOT_BASE], "tail external slots removed");
        assert!(state.members(value.id).unwrap().contains(&be(4)));
        // Back to a ClusterIP-like frontend: the external range goes.
        d.frontends.get_mut(&fkey(1)).unwrap().external = None;
        sync(&mut state, &d);
        let all: Vec<u32> = state.slots(value.id).map(|(s, _)| s).collect();
        assert_eq!(all, [0, 1, 2]);
        assert!(!state.members(value.id).unwrap().contains(&be(4)));
    }

    /// The backend of every table position, as XDP resolves it: the chunk entry, then the
    /// external slot it names.
    fn resolve_table(ops: &[Op], state: &KernelState, id: u32, m: u32) -> Vec<Backend> {
        let mut chunks: BTreeMap<u32, &MaglevChunk> = BTreeMap::new();
        for op in ops {
            if let Op::PutTable(key, chunk) = op
                && key.id == id
            {
                chunks.insert(key.chunk, chunk);
            }
        }
        let slots = state.slot_map(id).unwrap();
        (0..m)
            .map(|pos| {
                let (chunk, at) = lb_common::maglev::position(pos, m);
                let index = chunks[&chunk].entries[at as usize];
                slots[&(EXT_SLOT_BASE + index)]
            })
            .collect()
    }

    #[test]
    fn maglev_tables_are_written_between_slots_and_frontend() {
        use crate::desired::ExternalBackends;
        let m = lb_common::maglev::DEFAULT_TABLE_SIZE;
        let ext = |local: &[u8], remote: &[u8]| ExternalBackends {
            policy_local: false,
            local: local.iter().map(|&b| be(b)).collect(),
            remote: remote.iter().map(|&b| be(b)).collect(),
        };
        let with = |external: ExternalBackends| {
            let mut d = desired(&[(1, &[1, 2, 3], 0)]);
            d.frontends.get_mut(&fkey(1)).unwrap().external = Some(external);
            d
        };
        // Node a holds backend 3, node b backends 1 and 2: their external slots differ, their
        // tables name the same backend at every position.
        let mut a = KernelState::default().with_maglev_size(m);
        let mut b = KernelState::default().with_maglev_size(m);
        let ops_a = sync_by_phase(&mut a, &with(ext(&[3], &[1, 2])));
        let ops_b = sync_by_phase(&mut b, &with(ext(&[1, 2], &[3])));
        let tables = |ops: &[Op]| {
            ops.iter()
                .filter(|op| matches!(op, Op::PutTable(..)))
                .count()
        };
        assert_eq!(tables(&ops_a), 16, "one write per chunk");
        let last_slot = ops_a.iter().rposition(|op| matches!(op, Op::PutSlot(..)));
        let first_table = ops_a.iter().position(|op| matches!(op, Op::PutTable(..)));
        let frontend = ops_a
            .iter()
            .position(|op| matches!(op, Op::PutFrontend(..)));
        assert!(
            last_slot < first_table && first_table < frontend,
            "{ops_a:?}"
        );
        let id_a = a.frontends()[&fkey(1)].id;
        let id_b = b.frontends()[&fkey(1)].id;
        let table_a = resolve_table(&ops_a, &a, id_a, m);
        assert_eq!(table_a, resolve_table(&ops_b, &b, id_b, m));
        // Backend 2 leaves: the changed chunks are rewritten before the frontend; the
        // positions of backends 1 and 3 stay theirs but for a few (Maglev's disruption).
        let ops = sync_by_phase(&mut a, &with(ext(&[3], &[1])));
        let first_table = ops.iter().position(|op| matches!(op, Op::PutTable(..)));
        let frontend = ops.iter().position(|op| matches!(op, Op::PutFrontend(..)));
        assert!(first_table.is_some() && first_table < frontend, "{ops:?}");
        let mut all = ops_a.clone();
        all.extend(ops.iter().cloned());
        let after = resolve_table(&all, &a, id_a, m);
        let moved = table_a
            .iter()
            .zip(&after)
            .filter(|(before, now)| **before != be(2) && before != now)
            .count();
        assert!(
            moved * 100 <= m as usize,
            "{moved} positions of staying backends moved"
        );
        assert!(!after.contains(&be(2)));
        // Drift (a chunk in the kernel differs from what was written): the next plan
        // rebuilds the table and rewrites that chunk only.
        a.apply(&Op::PutTable(
            MaglevKey { id: id_a, chunk: 3 },
            Arc::new(MaglevChunk::default()),
        ));
        let ops = sync_by_phase(&mut a, &with(ext(&[3], &[1])));
        assert!(
            matches!(
                ops.as_slice(),
                [Op::PutTable(MaglevKey { chunk: 3, .. }, _)]
            ),
            "{ops:?}"
        );
        // No external backend: the table goes, after the frontend says ext_count 0.
        let ops = sync_by_phase(&mut a, &with(ext(&[], &[])));
        let frontend = ops.iter().position(|op| matches!(op, Op::PutFrontend(..)));
        let first_del = ops.iter().position(|op| matches!(op, Op::DelTable(..)));
        assert!(frontend < first_del, "{ops:?}");
        assert!(a.table(id_a).is_none());
        // Back with backends, then --lb-algorithm random: the tables go; then the frontend.
        sync_by_phase(&mut a, &with(ext(&[3], &[1])));
        assert_eq!(a.table(id_a).map(BTreeMap::len), Some(16));
        let mut a = a.with_maglev_size(0);
        let ops = sync_by_phase(&mut a, &with(ext(&[3], &[1])));
        assert_eq!(ops.len(), 16, "only the table chunks go: {ops:?}");
        assert!(a.table(id_a).is_none());
        let mut b = b.with_maglev_size(m);
        sync_by_phase(&mut b, &Desired::default());
        assert_eq!(b.table_chunk_count(), 0);
    }

    #[test]
    fn adopted_state_with_leftovers_is_repaired() {
        // A previous agent died mid-write: slots past the count, an orphan id, a missing slot.
        let f = Frontend {
            id: 5,
            count: 3,
            affinity_timeout_s: 0,
            flags: 0,
            ext_count: 0,
            ext_local: 0,
        };
        let mut state = KernelState::from_entries(
            [(fkey(1), f)],
            [
                (SlotKey { id: 5, slot: 0 }, be(1)),
                (SlotKey { id: 5, slot: 2 }, be(3)),
                (SlotKey { id: 5, slot: 7 }, be(9)),
                (SlotKey { id: 9, slot: 0 }, be(1)),
            ],
            [
                MemberKey {
                    id: 5,
                    backend: be(1),
                },
                MemberKey {
                    id: 9,
                    backend: be(1),
                },
            ],
            [],
        );
        // It starts inconsistent (slot 1 missing), so only the end state is checked.
        sync_from(
            &mut state,
            &desired(&[(1, &[1, 2, 3], 0), (2, &[4], 0)]),
            false,
        );
        // New ids continue past the highest seen.
        assert_eq!(state.frontends()[&fkey(2)].id, 10);
    }

    #[test]
    fn surviving_backends_keep_their_slots() {
        let mut state = KernelState::from_entries([], [], [], []);
        sync(&mut state, &desired(&[(1, &[1, 2, 3, 4], 0)]));
        let before: HashMap<Backend, u32> = state.slots(1).map(|(s, b)| (*b, s)).collect();
        sync(&mut state, &desired(&[(1, &[1, 2, 4, 5, 6], 0)]));
        for b in [be(1), be(2), be(4)] {
            let now = state.slots(1).find(|(_, x)| **x == b).map(|(s, _)| s);
            assert_eq!(now, Some(before[&b]), "{b:?} moved");
        }
    }

    #[test]
    fn planning_only_dirty_frontends_matches_a_full_plan() {
        let mut full = KernelState::from_entries([], [], [], []);
        let mut partial = KernelState::from_entries([], [], [], []);
        let before = desired(&[(1, &[1, 2], 0), (2, &[3], 0), (3, &[4, 5], 0)]);
        sync(&mut full, &before);
        sync(&mut partial, &before);
        let after = desired(&[(1, &[1, 2], 0), (2, &[3, 6], 0), (4, &[7], 0)]);
        let dirty = [fkey(2), fkey(3), fkey(4)];
        let ops: Vec<Op> = partial
            .plan_frontends(&after, &dirty)
            .into_iter()
            .flatten()
            .collect();
        for op in &ops {
            partial.apply(op);
            assert_consistent(&partial);
        }
        sync(&mut full, &after);
        assert_eq!(partial, full);
        assert!(partial.plan(&after).is_empty());
    }

    #[test]
    fn random_sequences_stay_consistent() {
        let mut next = crate::test_support::xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut state = KernelState::from_entries([], [], [], []);
        for round in 0..600 {
            let mut frontends = Vec::new();
            let mut storage: Vec<Vec<u8>> = Vec::new();
            for f in 0..(next(6) as u8) {
                let backends: Vec<u8> = (0..next(8)).map(|_| next(12) as u8).collect();
                storage.push(backends);
                frontends.push((f, storage.len() - 1, next(2) as u32 * 30));
            }
            let spec: Vec<(u8, &[u8], u32)> = frontends
                .iter()
                .map(|&(f, i, a)| (f, storage[i].as_slice(), a))
                .collect();
            // Half of the rounds written frontend by frontend, half phase by phase.
            if round % 2 == 0 {
                sync(&mut state, &desired(&spec));
            } else {
                sync_by_phase(&mut state, &desired(&spec));
            }
        }
    }

    fn rkey(n: u8) -> FrontendKey {
        let b = be(n);
        FrontendKey {
            addr: b.addr,
            port: b.port,
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }

    fn service_of(state: &KernelState, f: u8) -> RevNat {
        let key = fkey(f);
        RevNat {
            addr: key.addr,
            port: key.port,
            _pad: [0; 2],
            id: state.frontends()[&key].id,
        }
    }

    #[test]
    fn reverse_entries_name_the_lowest_service_of_each_backend() {
        let mut state = KernelState::default();
        // s1 and s2 share backend 2; s3 has none; backend 1 is s1's only.
        let mut d = desired(&[(1, &[1, 2], 0), (2, &[2, 3], 0), (3, &[], 0)]);
        // A UDP frontend and a NodePort frontend never get entries.
        let mut udp = d.frontends[&fkey(2)].clone();
        udp.backends = [be(4)].into();
        d.frontends.insert(
            FrontendKey {
                proto: lb_common::maps::IPPROTO_UDP,
                ..fkey(4)
            },
            udp.clone(),
        );
        let mut node_port = udp;
        node_port.kind = FrontendKind::NodePort;
        node_port.backends = [be(5)].into();
        d.frontends.insert(fkey(5), node_port);
        sync(&mut state, &d);
        let wanted = reverse_wanted(&d, &state);
        let expect: BTreeMap<FrontendKey, RevNat> = [
            (rkey(1), service_of(&state, 1)),
            (rkey(2), service_of(&state, 1)),
            (rkey(3), service_of(&state, 2)),
        ]
        .into();
        assert_eq!(wanted, expect);
    }

    #[test]
    fn a_backend_that_is_a_frontend_gets_no_entry() {
        let mut state = KernelState::default();
        let mut d = desired(&[(1, &[1], 0)]);
        let mut other = d.frontends[&fkey(1)].clone();
        other.service = ObjectKey::new("default", "z");
        d.frontends.insert(rkey(1), other);
        sync(&mut state, &d);
        assert!(!reverse_wanted(&d, &state).contains_key(&rkey(1)));
    }

    fn entry(service: RevNat, state: u32) -> Reverse {
        Reverse { service, state }
    }

    /// Runs rounds (step, walk, after-walk) until nothing changes; returns the states seen
    /// by each walk.
    fn settle(
        map: &mut BTreeMap<FrontendKey, Reverse>,
        wanted: &BTreeMap<FrontendKey, RevNat>,
    ) -> Vec<BTreeMap<FrontendKey, Reverse>> {
        let apply = |map: &mut BTreeMap<FrontendKey, Reverse>, w: &ReverseWrites| {
            for (k, e) in &w.put {
                map.insert(*k, *e);
            }
            for k in &w.delete {
                map.remove(k);
            }
        };
        let mut walks = Vec::new();
        for _ in 0..10 {
            let first = reverse_step(map, wanted, usize::MAX);
            apply(map, &first);
            if !map
                .values()
                .any(|e| matches!(e.state, REVERSE_PENDING | REVERSE_DRAINING))
            {
                if first.is_empty() {
                    return walks;
                }
                continue;
            }
            walks.push(map.clone());
            let second = reverse_after_walk(map, wanted);
            apply(map, &second);
        }
        panic!("did not settle: {map:?}");
    }

    #[test]
    fn reverse_protocol_pends_activates_drains_and_deletes() {
        let s = |id: u32| RevNat {
            addr: Addr::from_v4_octets([10, 96, 0, 1]),
            port: 80u16.to_be(),
            _pad: [0; 2],
            id,
        };
        let mut map = BTreeMap::new();
        // New: pending during the walk, then active.
        let wanted: BTreeMap<_, _> = [(rkey(1), s(1))].into();
        let walks = settle(&mut map, &wanted);
        assert_eq!(walks, [[(rkey(1), entry(s(1), REVERSE_PENDING))].into()]);
        assert_eq!(map, [(rkey(1), entry(s(1), REVERSE_ACTIVE))].into());
        // Same again: nothing to do.
        assert!(settle(&mut map, &wanted).is_empty());
        // Changed frontend: drained under the old one, then pending under the new one.
        let wanted: BTreeMap<_, _> = [(rkey(1), s(2))].into();
        let walks = settle(&mut map, &wanted);
        assert_eq!(
            walks,
            [
                [(rkey(1), entry(s(1), REVERSE_DRAINING))].into(),
                [(rkey(1), entry(s(2), REVERSE_PENDING))].into()
            ]
        );
        assert_eq!(map, [(rkey(1), entry(s(2), REVERSE_ACTIVE))].into());
        // Gone: drained, then deleted.
        let walks = settle(&mut map, &BTreeMap::new());
        assert_eq!(walks, [[(rkey(1), entry(s(2), REVERSE_DRAINING))].into()]);
        assert!(map.is_empty());
    }

    #[test]
    fn new_entries_stop_at_the_capacity() {
        let s = RevNat {
            addr: Addr::from_v4_octets([10, 96, 0, 1]),
            port: 80u16.to_be(),
            _pad: [0; 2],
            id: 1,
        };
        let current: BTreeMap<_, _> = [(rkey(1), entry(s, REVERSE_ACTIVE))].into();
        let wanted: BTreeMap<_, _> = (1..=5).map(|n| (rkey(n), s)).collect();
        let step = reverse_step(&current, &wanted, 3);
        assert_eq!(
            step.put,
            [
                (rkey(2), entry(s, REVERSE_PENDING)),
                (rkey(3), entry(s, REVERSE_PENDING))
            ]
        );
    }

    #[test]
    fn states_left_by_a_stopped_agent_are_finished() {
        let s = |id: u32| RevNat {
            addr: Addr::from_v4_octets([10, 96, 0, 1]),
            port: 80u16.to_be(),
            _pad: [0; 2],
            id,
        };
        // Pending still wanted: walked, activated. Pending no longer wanted: deleted without
        // a walk. Draining: walked, deleted, even if wanted again (then pending anew).
        let mut map: BTreeMap<_, _> = [
            (rkey(1), entry(s(1), REVERSE_PENDING)),
            (rkey(2), entry(s(1), REVERSE_PENDING)),
            (rkey(3), entry(s(1), REVERSE_DRAINING)),
            (rkey(4), entry(s(1), 77)),
        ]
        .into();
        let wanted: BTreeMap<_, _> = [(rkey(1), s(1)), (rkey(3), s(1))].into();
        let walks = settle(&mut map, &wanted);
        assert_eq!(
            walks[0],
            [
                (rkey(1), entry(s(1), REVERSE_PENDING)),
                (rkey(3), entry(s(1), REVERSE_DRAINING)),
            ]
            .into()
        );
        assert_eq!(
            walks[1],
            [
                (rkey(1), entry(s(1), REVERSE_ACTIVE)),
                (rkey(3), entry(s(1), REVERSE_PENDING)),
            ]
            .into()
        );
        assert_eq!(
            map,
            [
                (rkey(1), entry(s(1), REVERSE_ACTIVE)),
                (rkey(3), entry(s(1), REVERSE_ACTIVE)),
            ]
            .into()
        );
    }
}
