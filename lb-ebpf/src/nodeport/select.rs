//! The backend of a new north-south flow: its position in the frontend's Maglev table with
//! `--lb-algorithm maglev` (`lb_common::maglev`), else a random external slot.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::HashMap};
use lb_common::{
    maglev::{CHUNK, MAX_CHUNKS, MaglevChunk, MaglevKey, flow_hash, position},
    maps::{BPF_F_NO_PREALLOC, Frontend, META_MAGLEV_TABLE_SIZE},
    select::slot_for,
    stats,
};

use super::Flow;
use crate::maps::{LB_META, count};

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
