//! The connection-tracking maps and the one way the programs reach them: IPv4 client entries
//! in `LB_CT4` (8-byte keys), everything else in `LB_CT` (`lb_common::nat::CT4`, `CT`).
//!
//! Callers build a [`CtKey`] as before; [`CtKey::client4`] says which map holds it, so no
//! caller can look a key up in the wrong one.

use aya_ebpf::{macros::map, maps::LruHashMap};
use lb_common::{
    maps::BPF_F_NO_COMMON_LRU,
    nat::{CtEntry, CtKey, CtKey4, MAX_CT},
};

/// Connection tracking (`lb_common::nat`): IPv6 client entries, a forward and a reply entry
/// per SNAT'd flow and per second flow of a client port, every flow of layout 4; written by
/// both programs. Per-CPU LRU lists; the agent sets the capacity (`--max-ct-entries`).
#[map]
static LB_CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CT, BPF_F_NO_COMMON_LRU);

/// The client entries of IPv4 flows (`lb_common::nat::CT4`), one per flow to a backend on this
/// node; written by both programs. Per-CPU LRU lists, the capacity of `LB_CT`.
#[map]
static LB_CT4: LruHashMap<CtKey4, CtEntry> = LruHashMap::pinned(MAX_CT, BPF_F_NO_COMMON_LRU);

/// The entry under `key`, if any (a pointer into the map's value).
#[inline(always)]
pub fn get(key: &CtKey) -> Option<*mut CtEntry> {
    match key.client4() {
        Some(k) => LB_CT4.get_ptr_mut(&k),
        None => LB_CT.get_ptr_mut(key),
    }
}

/// Stores `value` under `key` (`flags`: `BPF_ANY`, `BPF_NOEXIST`); the helper's error code
/// (`-EEXIST` under `BPF_NOEXIST`, `-E2BIG` never: LRU maps evict).
#[inline(always)]
pub fn insert(key: &CtKey, value: &CtEntry, flags: u64) -> Result<(), i32> {
    match key.client4() {
        Some(k) => LB_CT4.insert(&k, value, flags),
        None => LB_CT.insert(key, value, flags),
    }
}

/// Removes the entry under `key`, if any.
#[inline(always)]
pub fn remove(key: &CtKey) {
    let _gone = match key.client4() {
        Some(k) => LB_CT4.remove(&k),
        None => LB_CT.remove(key),
    };
}
