//! `sessionAffinity: ClientIP` for traffic from outside the node (the XDP datapath).
//!
//! kube-proxy keeps a client IP on one backend of a Service port for new connections until
//! the client has been idle for `timeoutSeconds` (its `recent` match, refreshed by each new
//! connection). The socket path keys this by the client's network namespace ([`crate::maps::AFFINITY`]);
//! from outside the node the client is known by its address, so [`NS_AFFINITY`] is keyed by
//! (frontend id, client address). The XDP program reads it for a new flow of a frontend
//! with `Frontend::affinity_timeout_s > 0` and writes it after choosing; the agent only reads
//! it (inspection). LRU: the oldest clients make room when it is full.

use crate::{Addr, maps::Backend};

/// Pinned name.
pub const NS_AFFINITY: &str = "LB_NS_AFFINITY";

/// Capacity: clients x external frontends with affinity.
pub const MAX_NS_AFFINITY: u32 = 1 << 16;

/// Key of [`NS_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsAffinityKey {
    /// The client's address as the packet carries it (IPv4-mapped for IPv4).
    pub client: Addr,
    /// [`crate::maps::Frontend::id`].
    pub id: u32,
    /// Always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<NsAffinityKey>() == 24);

/// Value of [`NS_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsAffinity {
    /// `bpf_ktime_get_coarse_ns()` of the client's last new flow to the frontend.
    pub last_used_ns: u64,
    /// The backend the client sticks to.
    pub backend: Backend,
    /// Its index in the frontend's external slots when it was chosen; the entry holds only
    /// while slot `EXT_SLOT_BASE + index` still holds `backend` (a removed backend, or one
    /// whose slot moved, ends the affinity, as kube-proxy's does when the endpoint goes).
    pub index: u32,
}
const _: () = assert!(size_of::<NsAffinity>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::{NsAffinity, NsAffinityKey};

    // SAFETY: #[repr(C)], integers only, padding explicit (size assertions above).
    unsafe impl aya::Pod for NsAffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NsAffinity {}
}
