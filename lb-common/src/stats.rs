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

// North-south (XDP on --xdp-iface, tc egress on the same interface).
/// XDP: a new flow to an external frontend was sent to a backend on this node (DNAT).
pub const XDP_NEW_FLOW: u32 = 14;
/// XDP: a packet of a tracked flow was sent to its backend.
pub const XDP_TRACKED: u32 = 15;
/// XDP: dropped, `externalTrafficPolicy: Local` and no endpoint on this node (kube-proxy
/// drops these too).
pub const XDP_DROP_NO_LOCAL: u32 = 16;
/// XDP: dropped, the flow's backend left the Service (the client sees a timeout, never
/// another backend's data).
pub const XDP_DROP_STALE: u32 = 17;
/// XDP: passed to the stack untouched, the frontend has no endpoint at all under
/// `externalTrafficPolicy: Cluster` (nothing listens there: the stack answers with a TCP
/// reset or an ICMP port unreachable, as kube-proxy's REJECT rule).
pub const XDP_PASS_NO_BACKEND: u32 = 18;
/// XDP: retired, no longer counted (a new flow to a backend on another node is now
/// translated with SNAT: [`XDP_NEW_FLOW_SNAT`]); the number stays so later ones keep theirs.
pub const XDP_PASS_REMOTE: u32 = 19;
/// XDP: an IPv4 fragment or an IPv6 packet with a fragment header, passed untouched (no
/// ports to match; never translated, so never misrouted).
pub const XDP_PASS_FRAGMENT: u32 = 20;
/// XDP: a truncated or malformed IP/TCP/UDP header, or IPv6 extension headers deeper than
/// the parser walks, passed untouched.
pub const XDP_PASS_MALFORMED: u32 = 21;
/// XDP: a new flow was translated but its connection-tracking entries could not be stored;
/// the packet is dropped (a reply could not be translated back).
pub const XDP_ERR_CT_UPDATE: u32 = 22;
/// tc egress: a backend's reply got its frontend address back as source.
pub const TC_REPLY_XLATED: u32 = 23;
/// XDP: a new flow to a backend on another node (`externalTrafficPolicy: Cluster`) was
/// translated with DNAT and SNAT to this node's address and an allocated port.
pub const XDP_NEW_FLOW_SNAT: u32 = 24;
/// XDP: a backend's reply to an SNAT'd flow was translated back (source the frontend,
/// destination the client).
pub const XDP_REPLY_XLATED: u32 = 25;
/// XDP: a translated SNAT packet was sent out with `bpf_redirect` after a FIB lookup.
pub const XDP_REDIRECT: u32 = 26;
/// XDP: the FIB lookup found a route but no resolved neighbour (or the packet carries a VLAN
/// tag): the translated packet was passed to the stack.
pub const XDP_PASS_NO_NEIGH: u32 = 27;
/// XDP: the FIB lookup failed (no route, forwarding disabled, MTU exceeded) for an SNAT
/// packet; passed to the stack untranslated (new flow) or translated (tracked).
pub const XDP_ERR_FIB: u32 = 28;
/// XDP: no free SNAT port for a new flow after `nat::SNAT_TRIES` tries; dropped (the client
/// retries).
pub const XDP_DROP_NO_PORT: u32 = 29;
/// XDP: a connection-tracking entry had expired (idle, or closed TCP) and was replaced by a
/// new flow.
pub const XDP_CT_EXPIRED: u32 = 30;
/// XDP: a new flow to a LoadBalancer IP whose Service has `loadBalancerSourceRanges` came
/// from a source outside them; dropped (kube-proxy's firewall chain drops it too).
pub const XDP_DROP_SOURCE_RANGE: u32 = 31;

/// XDP: a new flow's backend came from the frontend's Maglev table (`--lb-algorithm maglev`).
pub const XDP_MAGLEV: u32 = 32;
/// XDP: `--lb-algorithm maglev`, but the frontend's table chunk was missing or named no
/// external slot (while the agent rewrites it, or the table map is full): picked at random.
pub const XDP_MAGLEV_MISS: u32 = 33;
/// XDP: a new flow of a frontend with ClientIP affinity went to the client's backend.
pub const XDP_AFFINITY_HIT: u32 = 34;
/// XDP: a new flow of a frontend with ClientIP affinity chose a backend (no entry for the
/// client, or it had expired or its backend left) and recorded it.
pub const XDP_AFFINITY_NEW: u32 = 35;

/// XDP: an ICMP/ICMPv6 error about a reply lb sent from a frontend (e.g. a router's
/// Fragmentation Needed or Packet Too Big on the way to the client) was translated for the
/// flow's backend (quote and destination) and passed to it or sent on.
pub const XDP_ICMP_XLATED: u32 = 36;
/// XDP: an ICMP/ICMPv6 error from the backend's side of an SNAT'd flow (quoting a packet
/// from this node's SNAT port) was translated for the client and sent on to it.
pub const XDP_ICMP_REPLY_XLATED: u32 = 37;
/// tc egress: an ICMP/ICMPv6 error made on this node about a DNAT'd packet (a pod's port
/// unreachable, the node's Fragmentation Needed) got the frontend back (quote and source).
pub const TC_ICMP_XLATED: u32 = 38;
/// XDP: an ICMP/ICMPv6 error about TCP/UDP matched no live flow; passed untouched.
pub const XDP_ICMP_NO_FLOW: u32 = 39;
/// XDP: an ICMP/ICMPv6 error with a truncated or malformed quote; passed untouched.
pub const XDP_ICMP_MALFORMED: u32 = 40;
/// tc egress: a reply's connection-tracking entry had expired; the reply left untranslated
/// (as XDP treats an expired entry as absent).
pub const TC_CT_EXPIRED: u32 = 41;

/// connect: translated without writing per-socket state, neither a slot nor socket storage
/// (the backend's `LB_REVERSE` entry is active for this frontend; getpeername answers from
/// it). Also counted in [`CONNECT_XLATED`].
pub const CONNECT_NO_STORAGE: u32 = 42;
/// connect: a direct connect (not through a Service) to a backend address that has an
/// `LB_REVERSE` entry got state (a slot or storage) marked `SOCK_DIRECT`, so getpeername
/// shows the pod.
pub const CONNECT_DIRECT_MARKED: u32 = 43;
/// getpeername: a socket without state was shown its Service from `LB_REVERSE`. Also
/// counted in [`GETPEERNAME_XLATED`].
pub const GETPEERNAME_REVERSE: u32 = 44;
/// connect/sendmsg: a UDP socket's first translation found its `LB_UDP_SOCKS` slot held by
/// another open socket, so its state went to socket storage (`LB_DGRAMS`) instead: exact
/// all the same, at the cost of the kernel's allocation.
pub const UDP_SOCKS_TAKEN: u32 = 45;
/// connect/sendmsg: a UDP socket claimed its `LB_UDP_SOCKS` slot. Minus
/// [`UDP_SOCKS_RELEASED`]: the slots held now.
pub const UDP_SOCKS_CLAIMED: u32 = 46;
/// sock_release: a closing UDP socket freed its `LB_UDP_SOCKS` slot.
pub const UDP_SOCKS_RELEASED: u32 = 47;
/// connect: a TCP socket that needs state found its `LB_TCP_SOCKS` slot held by another open
/// socket, so its state went to socket storage (`LB_SOCKS`) instead: exact all the same, at
/// the cost of the kernel's allocation.
pub const TCP_SOCKS_TAKEN: u32 = 48;
/// connect: a TCP socket claimed its `LB_TCP_SOCKS` slot. Minus [`TCP_SOCKS_RELEASED`]: the
/// slots held now.
pub const TCP_SOCKS_CLAIMED: u32 = 49;
/// sock_release: a closing TCP socket freed its `LB_TCP_SOCKS` slot.
pub const TCP_SOCKS_RELEASED: u32 = 50;

/// Number of counters.
pub const COUNT: u32 = 51;

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
    "xdp_new_flow",
    "xdp_tracked",
    "xdp_drop_no_local_endpoint",
    "xdp_drop_backend_gone",
    "xdp_pass_no_endpoint",
    "xdp_pass_remote_backend",
    "xdp_pass_fragment",
    "xdp_pass_malformed",
    "xdp_err_ct_update",
    "tc_reply_xlated",
    "xdp_new_flow_snat",
    "xdp_reply_xlated",
    "xdp_redirect",
    "xdp_pass_no_neigh",
    "xdp_err_fib",
    "xdp_drop_no_snat_port",
    "xdp_ct_expired",
    "xdp_drop_source_range",
    "xdp_maglev",
    "xdp_maglev_miss",
    "xdp_affinity_hit",
    "xdp_affinity_new",
    "xdp_icmp_xlated",
    "xdp_icmp_reply_xlated",
    "tc_icmp_xlated",
    "xdp_icmp_no_flow",
    "xdp_icmp_malformed",
    "tc_ct_expired",
    "connect_no_storage",
    "connect_direct_marked",
    "getpeername_reverse",
    "udp_socks_taken",
    "udp_socks_claimed",
    "udp_socks_released",
    "tcp_socks_taken",
    "tcp_socks_claimed",
    "tcp_socks_released",
];
