//! North-south translation state: the connection-tracking map of the XDP/tc datapath, and the
//! frontend fields and slot range it reads.
//!
//! Traffic from outside the node to an external frontend (NodePort, externalIP, LoadBalancer
//! IP; see [`crate::maps::Frontend::flags`]) is translated per packet: the XDP program on each
//! `--xdp-iface` rewrites the destination to a backend (DNAT) and records the flow in [`CT`],
//! one entry per direction as Cilium's `bpf/lib/conntrack.h` does; the tc egress program on the
//! same interface finds the reply's entry and restores the frontend as its source. Both
//! programs write [`CT`]; the agent only reads it (inspection).
//!
//! External backends live in their own slot range of [`crate::maps::SLOTS`]:
//! `(id, EXT_SLOT_BASE + 0..ext_count)`, this node's first. They can differ from the socket
//! path's `0..count` (kube-proxy gives node-originated traffic to an external address the
//! cluster's endpoints, and external traffic under `externalTrafficPolicy: Local` this node's
//! only), so each path has its own range and its own make-before-break order.

use crate::Addr;

/// Pinned name of the connection-tracking map.
pub const CT: &str = "LB_CT";

/// Connection-tracking entries (two per flow); LRU, so the oldest flows make room when it is
/// full. 256 Ki entries are 128 Ki flows, about 20 MiB of kernel memory.
pub const MAX_CT: u32 = 1 << 18;

/// First slot number of a frontend's external backends.
pub const EXT_SLOT_BASE: u32 = 1 << 31;

/// [`crate::maps::Frontend::flags`]: the address is external (NodePort, externalIP,
/// LoadBalancer IP), so the XDP datapath serves packets to it from outside the node.
pub const FRONTEND_EXTERNAL: u32 = 1;
/// [`crate::maps::Frontend::flags`]: `externalTrafficPolicy: Local`. External backends are this
/// node's only and a packet with none is dropped (kube-proxy's "no local endpoints" DROP).
pub const FRONTEND_ETP_LOCAL: u32 = 2;

/// [`CtKey::dir`]: a packet from a client to a frontend, as received on an `--xdp-iface`.
pub const CT_DIR_IN: u8 = 1;
/// [`CtKey::dir`]: a backend's reply to a client, as it leaves through an `--xdp-iface`.
pub const CT_DIR_REPLY: u8 = 2;

/// Key of [`CT`]: a packet's 5-tuple as it is seen before translation, and its direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address (the client for [`CT_DIR_IN`], the backend for [`CT_DIR_REPLY`]).
    pub src: Addr,
    /// Destination address (the frontend for [`CT_DIR_IN`], the client for [`CT_DIR_REPLY`]).
    pub dst: Addr,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// [`CT_DIR_IN`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// Value of [`CT`]: what the packet's peer address becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// [`CT_DIR_IN`]: the backend (new destination). [`CT_DIR_REPLY`]: the frontend (new
    /// source).
    pub addr: Addr,
    /// Port of `addr`, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u8; 2],
    /// [`crate::maps::Frontend::id`] when the flow began; the flow ends when its backend is no
    /// longer a member of this id (the backend left the Service).
    pub id: u32,
}
const _: () = assert!(size_of::<CtEntry>() == 24);

#[cfg(feature = "user")]
mod pod {
    use super::{CtEntry, CtKey};

    // SAFETY: #[repr(C)], integers only, padding explicit (size assertions above).
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
}
