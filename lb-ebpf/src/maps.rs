//! The map definitions. Keys, values, names and capacities come from `lb_common::maps`, where
//! each map is documented (key, value, writer); the static names here must equal those names,
//! which the agent checks when it loads this object.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC as NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type},
    cty::c_void,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use lb_common::maps::{
    Affinity, AffinityKey, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, Backend, DgramXlate, Frontend,
    FrontendKey, MAX_AFFINITY, MAX_FRONTENDS, MAX_MEMBERS, MAX_REVERSE, MAX_REVNAT, MAX_SLOTS,
    MAX_UDP_FLOWS, META_LEN, MemberKey, REVERSE_FILTER_WORDS, RevNat, RevNatKey, Reverse,
    SOCK_SLOTS, SlotKey, SockXlate, UdpFlowKey,
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

/// TCP backend -> the one frontend whose connects to it write no per-socket state, and which
/// getpeername shows for a socket without state (no slot, no storage) whose peer is that
/// backend
/// (`lb_common::maps::Reverse`, with its protocol); written by the agent.
#[map]
pub static LB_REVERSE: HashMap<FrontendKey, Reverse> =
    HashMap::pinned(MAX_REVERSE, BPF_F_NO_PREALLOC);

/// One bit per hash of a TCP backend's address and port (`lb_common::maps::reverse_filter_bit`),
/// set while `LB_REVERSE` may hold an entry with that key; written by the agent. A clear bit
/// answers "no reverse entry" with one array read, which the verifier inlines.
#[map]
pub static LB_REV_FILTER: Array<u64> = Array::pinned(REVERSE_FILTER_WORDS, 0);

/// ClientIP affinity; written here, on connect/sendmsg.
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// `LIBBPF_PIN_BY_NAME`.
const PIN_BY_NAME: usize = 1;

/// A socket storage map pinned by name. aya-ebpf's `SkStorage` has no pinning field, and
/// socket storage must survive an agent restart like every other map (sockets connected
/// through the old programs keep showing the Service address), so this is its BTF definition
/// with one: the loader reads the field types, the pointers are never dereferenced.
#[repr(C)]
pub struct PinnedSkStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are placeholders the loader reads through BTF; nothing is shared.
unsafe impl<T> Sync for PinnedSkStorage<T> {}

impl<T> PinnedSkStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The value of the socket behind `ctx` (created zeroed if `create` and absent): a
    /// pointer to this socket's own value, valid while the program runs.
    #[inline(always)]
    pub fn get_ptr(&self, ctx: &SockAddrContext, create: bool) -> Option<*mut T> {
        self.get_ptr_on(ctx_sock(ctx), create)
    }

    /// The value of socket `sk` (the context's socket, or a socket a helper returned for it),
    /// created zeroed if `create` and absent.
    #[inline(always)]
    pub fn get_ptr_on(&self, sk: *mut c_void, create: bool) -> Option<*mut T> {
        let flags = if create {
            u64::from(BPF_SK_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: `sk` is a socket pointer the verifier tracks (the context's, or a helper's
        // non-null result); the helper returns null or a pointer to a value of the map's
        // value size.
        let value = unsafe {
            let map = core::ptr::from_ref(self).cast_mut().cast();
            bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags).cast::<T>()
        };
        (!value.is_null()).then_some(value)
    }
}

/// The socket of a sock_addr context.
#[inline(always)]
pub fn ctx_sock(ctx: &SockAddrContext) -> *mut c_void {
    // SAFETY: the context's socket pointer is valid for the program's run.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast()
}

/// TCP/MPTCP socket -> what lb did with it (`SockXlate`: the connected backend and Service),
/// as `LB_TCP_SOCKS`, for MPTCP sockets, TCP sockets whose slot there another socket held,
/// and those translated before an upgrade from layout 4; written here, on such a socket's
/// connect to a Service or to a backend with a reverse entry, and by the agent for sockets
/// whose backend's reverse entry stops answering. Freed by the kernel with the socket.
#[btf_map]
pub static LB_SOCKS: PinnedSkStorage<SockXlate> = PinnedSkStorage::new();

/// TCP socket slots, indexed by `sock_slot(cookie)`: the cookie of the socket owning the
/// slot, 0 when free (`lb_common::maps::SOCK_SLOTS` has the protocol); claimed here on the
/// socket's first connect that needs state, freed by `lb_sock_release` when it closes.
/// Mappable: the agent counts the slots held through a read-only mapping.
#[map]
pub static LB_TCP_OWNERS: Array<u64> = Array::pinned(SOCK_SLOTS, BPF_F_MMAPABLE);

/// The state (`SockXlate`) of the TCP socket owning the same index of `LB_TCP_OWNERS`, for
/// getpeername and its later connects; written here, whole when the socket claims the slot.
/// A socket whose slot is held keeps its state in `LB_SOCKS` instead.
#[map]
pub static LB_TCP_SOCKS: Array<SockXlate> = Array::pinned(SOCK_SLOTS, 0);

/// UDP socket -> what lb did with it (`DgramXlate`), as `LB_UDP_SOCKS`, for the sockets whose
/// slot there another socket held, and those translated before an upgrade from layout 4;
/// written here, on such a socket's first connect or sendmsg to a Service. Freed by the
/// kernel with the socket.
#[btf_map]
pub static LB_DGRAMS: PinnedSkStorage<DgramXlate> = PinnedSkStorage::new();

/// UDP socket slots, indexed by `sock_slot(cookie)`: the cookie of the socket owning the
/// slot, 0 when free (`lb_common::maps::SOCK_SLOTS` has the protocol); claimed here on the
/// socket's first connect or sendmsg to a Service, freed by `lb_sock_release` when it closes.
/// Mappable: the agent counts the slots held through a read-only mapping.
#[map]
pub static LB_UDP_OWNERS: Array<u64> = Array::pinned(SOCK_SLOTS, BPF_F_MMAPABLE);

/// The state (`DgramXlate`) of the socket owning the same index of `LB_UDP_OWNERS`: what lb
/// did with it, for getpeername/recvmsg/sendmsg; written here, whole when the socket claims
/// the slot. A socket whose slot is held keeps its state in `LB_DGRAMS` instead.
#[map]
pub static LB_UDP_SOCKS: Array<DgramXlate> = Array::pinned(SOCK_SLOTS, 0);

/// Unconnected UDP socket and backend -> Service, for recvmsg; written here, on sendmsg to a
/// Service, deleted on a direct connect/sendmsg to the backend. Read only for sockets whose
/// `LB_SOCKS` entry has `SOCK_DATAGRAMS`.
#[map]
pub static LB_REVNAT: LruHashMap<RevNatKey, RevNat> = LruHashMap::pinned(MAX_REVNAT, 0);

/// Unconnected UDP socket -> backend; written here, on sendmsg.
#[map]
pub static LB_UDP_FLOWS: LruHashMap<UdpFlowKey, Backend> = LruHashMap::pinned(MAX_UDP_FLOWS, 0);

/// Event counters (`lb_common::stats`); written here.
#[map]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(lb_common::stats::COUNT, 0);

/// Layout version and other agent facts; written by the agent. The XDP program reads the
/// Maglev table size (`META_MAGLEV_TABLE_SIZE`) for each new flow.
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
