//! The backend of a new north-south flow: its position in the frontend's Maglev table with
//! `--lb-algorithm maglev` (`lb_common::maglev`), else a random external slot.

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{HashMap, LruHashMap},
};
use lb_common::{
    maglev::{CHUNK, MAX_CHUNKS, MaglevChunk, MaglevKey, flow_hash, position},
    maps::{BPF_F_NO_PREALLOC, Backend, Frontend, META_MAGLEV_TABLE_SIZE, SlotKey},
    nat::EXT_SLOT_BASE,
    ns_affinity::{MAX_NS_AFFINITY, NsAffinity, NsAffinityKey},
    select::{affinity_fresh, slot_for},
    stats,
};

use super::Flow;
use crate::maps::{LB_META, LB_SLOTS, count};

/// ClientIP affinity of external clients, (client address, frontend id) -> backend; written
/// here (`lb_common::ns_affinity`).
#[map]
pub static LB_NS_AFFINITY: LruHashMap<NsAffinityKey, NsAffinity> =
    LruHashMap::pinned(MAX_NS_AFFINITY, 0);

/// The external slot index the client of `flow` sticks to (frontend with ClientIP
/// affinity): its entry is fresh and its slot still holds its backend.
// A BPF-to-BPF call of its own: its keys and values stay off the caller's frame.
#[inline(never)]
pub fn affinity_index(flow: &Flow, frontend: &Frontend, now: u64) -> Option<u32> {
    let key = NsAffinityKey {
        client: flow.src,
        id: frontend.id,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let entry = unsafe { LB_NS_AFFINITY.get(&key) }.copied()?;
    if !affinity_fresh(now, entry.last_used_ns, frontend.affinity_timeout_s)
        || entry.index >= frontend.ext_count
    {
        return None;
    }
    let slot = SlotKey {
        id: frontend.id,
        slot: EXT_SLOT_BASE + entry.index,
    };
    // SAFETY: copied out at once.
    let now_there = unsafe { LB_SLOTS.get(&slot) }.copied()?;
    (now_there == entry.backend).then_some(entry.index)
}

/// Records that the client of `flow` uses external slot `index` (holding `backend`) of
/// `frontend` as of `now`.
// A BPF-to-BPF call of its own (see `affinity_index`).
#[inline(never)]
pub fn remember(flow: &Flow, frontend: &Frontend, index: u32, backend: &Backend, now: u64) {
    let key = NsAffinityKey {
        client: flow.src,
        id: frontend.id,
        _pad: 0,
    };
    let value = NsAffinity {
        last_used_ns: now,
        backend: *backend,
        index,
    };
    if LB_NS_AFFINITY.insert(&key, &value, 0).is_err() {
        count(stats::ERR_STICKY_UPDATE);
    }
}

/// Maglev tables, (frontend id, chunk) -> [`CHUNK`] entries; written by the agent.
#[map]
pub static LB_MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(MAX_CHUNKS, BPF_F_NO_PREALLOC);

/// The index in `0..frontend.ext_count` of the external backend for the new flow `flow`
/// (`ext_count` is not 0).
///
/// Maglev: the table entry at `flow_hash % M`, so every node with the same endpoints picks the
/// same backend for the flow. Without a table size (random), or without the table entry
/// (the agent is writing it, or the table map is full), a random slot.
#[inline(always)]
pub fn external_index(flow: &Flow, frontend: &Frontend) -> u32 {
    let m = LB_META.get(META_MAGLEV_TABLE_SIZE).copied().unwrap_or(0);
    if m != 0 {
        let hash = flow_hash(&flow.src, flow.sport, flow.dport, flow.proto);
        let (chunk, at) = position(hash, m);
        let key = MaglevKey {
            id: frontend.id,
            chunk,
        };
        if let Some(p) = LB_MAGLEV.get_ptr(&key) {
            // SAFETY: one u32 read from the map value; the mask keeps the index in bounds
            // for the verifier (`at` is already below CHUNK).
            let index = unsafe { (*p).entries[(at & (CHUNK - 1)) as usize] };
            if index < frontend.ext_count {
                count(stats::XDP_MAGLEV);
                return index;
            }
        }
        count(stats::XDP_MAGLEV_MISS);
    }
    // SAFETY: helper call without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    slot_for(random, frontend.ext_count)
}
