//! Datapath event counters: what the programs did with each socket operation, counted per
//! CPU in [`crate::maps::STATS`] (indexed by these numbers) and exported by the agent as
//! `lb_datapath_events_total{event=...}`. Every miss, refusal and failure has its reason here
//! instead of being guessed at.

/// A new connection (connect) to a frontend was sent to a backend.
pub const CONNECT_XLATED: u32 = 0;
/// A datagram on an unconnected UDP socket (sendmsg) was sent to a backend.
pub const SENDMSG_XLATED: u32 = 1;
/// Refused with ECONNREFUSED: the frontend exists but has no usable endpoint.
pub const REFUSED_NO_BACKEND: u32 = 2;
/// ClientIP affinity: the client's remembered backend was reused.
pub const AFFINITY_HIT: u32 = 3;
/// ClientIP affinity: a backend was chosen and remembered (first use, expired or gone).
pub const AFFINITY_NEW: u32 = 4;
/// An unconnected UDP socket kept its backend.
pub const UDP_FLOW_HIT: u32 = 5;
/// recvmsg: a reply's source was shown as the Service address.
pub const RECVMSG_XLATED: u32 = 6;
/// getpeername: the peer was shown as the Service address.
pub const GETPEERNAME_XLATED: u32 = 7;
/// Refused: the frontend's count points at a slot that does not exist (agent bug or race).
pub const ERR_SLOT_MISSING: u32 = 8;
/// Refused: the backend's family cannot be reached from this socket (a v6 backend for a
/// v4 socket).
pub const ERR_FAMILY: u32 = 9;
/// Translated, but the reverse entry (socket storage or LRU) could not be stored
/// (getpeername/recvmsg will show the backend address).
pub const ERR_REVNAT_UPDATE: u32 = 10;
/// Translated, but the affinity or UDP flow entry could not be stored.
pub const ERR_STICKY_UPDATE: u32 = 11;

/// sendmsg on a connected socket, addressed to the Service it is connected to: sent to its
/// connected backend (the same flow, as one conntrack entry keeps it with kube-proxy).
pub const SENDMSG_CONNECTED: u32 = 12;
/// A socket addressed a backend directly (connect or sendmsg) that it had reached through a
/// Service: its reverse entry was dropped, so replies from that backend show the backend
/// until the socket sends through the Service again.
pub const REVNAT_CLEARED_DIRECT: u32 = 13;

/// Number of counters.
pub const COUNT: u32 = 14;

/// Counter names, indexed by number.
pub const NAMES: [&str; COUNT as usize] = [
    "connect_xlated",
    "sendmsg_xlated",
    "refused_no_backend",
    "affinity_hit",
    "affinity_new",
    "udp_flow_hit",
    "recvmsg_xlated",
    "getpeername_xlated",
    "err_slot_missing",
    "err_family",
    "err_revnat_update",
    "err_sticky_update",
    "sendmsg_connected",
    "revnat_cleared_direct",
];
