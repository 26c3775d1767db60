//! The map definitions. Keys, values, names and capacities come from `lb_common::maps`, where
//! each map is documented (key, value, writer); the static names here must equal those names,
//! which the agent checks when it loads this object.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::maps::{
    Affinity, AffinityKey, BPF_F_NO_PREALLOC, Backend, Frontend, FrontendKey, MAX_AFFINITY,
    MAX_FRONTENDS, MAX_MEMBERS, MAX_REVNAT, MAX_SLOTS, MAX_UDP_FLOWS, META_LEN, MemberKey, RevNat,
    RevNatKey, SlotKey, UdpFlowKey,
};

/// Service frontends; written by the agent.
#[map]
pub static LB_FRONTENDS: HashMap<FrontendKey, Frontend> =
    HashMap::pinned(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Backend slots `(frontend id, 0..count)`; written by the agent.
#[map]
pub static LB_SLOTS: HashMap<SlotKey, Backend> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// Which backends belong to a frontend now; written by the agent.
#[map]
pub static LB_MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(MAX_MEMBERS, BPF_F_NO_PREALLOC);

/// ClientIP affinity; written here, on connect/sendmsg.
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// Socket -> Service address for getpeername/recvmsg; written here, on connect/sendmsg.
#[map]
pub static LB_REVNAT: LruHashMap<RevNatKey, RevNat> = LruHashMap::pinned(MAX_REVNAT, 0);

/// Unconnected UDP socket -> backend; written here, on sendmsg.
#[map]
pub static LB_UDP_FLOWS: LruHashMap<UdpFlowKey, Backend> = LruHashMap::pinned(MAX_UDP_FLOWS, 0);

/// Event counters (`lb_common::stats`); written here.
#[map]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(lb_common::stats::COUNT, 0);

/// Layout version and other agent facts; written by the agent, not read here.
#[map]
pub static LB_META: Array<u32> = Array::pinned(META_LEN, 0);

/// Counts one event of kind `stat` (an index from `lb_common::stats`).
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(counter) = LB_STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot: only this CPU writes it, and programs do not migrate while
        // they run.
        unsafe { *counter += 1 };
    }
}
