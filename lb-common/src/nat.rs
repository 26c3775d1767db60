//! North-south translation state: the connection-tracking map of the XDP/tc datapath, and the
//! frontend fields and slot range it reads.
//!
//! Traffic from outside the node to an external frontend (NodePort, externalIP, LoadBalancer
//! IP; see [`crate::maps::Frontend::flags`]) is translated per packet: the XDP program on each
//! `--xdp-iface` rewrites the destination to a backend (DNAT) and records the flow in one
//! entry keyed by the client ([`CT_DIR_CLIENT`]; in [`CT4`] for IPv4, [`CT`] for IPv6); the tc egress program on the same
//! interface finds it from the reply and restores the frontend as its source. SNAT'd flows
//! (and a second flow of one client port) have one entry per direction, as Cilium's
//! `bpf/lib/conntrack.h` keeps them. A flow to a
//! backend on another node (`externalTrafficPolicy: Cluster`) is also SNAT'd to this node's
//! address and a port of [`SNAT_PORT_MIN`]..=[`SNAT_PORT_MAX`] ([`CT_SNAT`]); its reply comes
//! back through XDP, which translates it and sends both directions out by FIB lookup. Entries
//! expire by protocol state ([`ct_timeout_ns`]). Both programs write [`CT`] and [`CT4`]; the
//! agent only reads them (inspection).
//!
//! External backends live in their own slot range of [`crate::maps::SLOTS`]:
//! `(id, EXT_SLOT_BASE + 0..ext_count)`, this node's first. They can differ from the socket
//! path's `0..count` (kube-proxy gives node-originated traffic to an external address the
//! cluster's endpoints, and external traffic under `externalTrafficPolicy: Local` this node's
//! only), so each path has its own range and its own make-before-break order.

use crate::Addr;

/// Pinned name of the connection-tracking map.
pub const CT: &str = "LB_CT";

/// Default capacity of [`CT`] and of [`CT4`] each, in entries (one per flow to a backend on
/// this node, two per SNAT'd flow): `lb run --max-ct-entries` sets it when the maps are
/// created. LRU with one list per CPU ([`crate::maps::BPF_F_NO_COMMON_LRU`]), so the oldest
/// flows of a CPU make room when that CPU's share (`capacity / CPUs`) is full. Preallocated
/// (key, value, hash and LRU nodes; the maps' memlock as measured on kernel 6.18): 160 bytes
/// per [`CT`] entry and 128 per [`CT4`] entry, so 512 Ki entries each take 80 + 64 MiB.
/// Cilium's default for TCP (`--bpf-ct-global-tcp-max`) is the same 512 Ki entries, for each
/// family; Katran's flow table defaults to 8 M flows (one entry per flow).
pub const MAX_CT: u32 = 1 << 19;

/// Pinned name of the IPv4 client-entry map: the [`CT_DIR_CLIENT`] entries of IPv4 flows,
/// under an 8-byte key ([`CtKey4`]) instead of [`CT`]'s 40. Everything else (IPv6 client
/// entries, the 5-tuple entries of SNAT'd flows and of second flows of a client port, and
/// every flow of layout 4) stays in [`CT`]. Cilium splits its conntrack by family the same
/// way (`cilium_ct4_global`, `cilium_ct6_global`).
///
/// Why: an established or new IPv4 flow to a backend on this node, the common north-south
/// case, looks its client entry up on every packet. The kernel hashes the whole key
/// (`jhash2` over its words) and compares it whole in the bucket, so 8 bytes instead of 40
/// save three `jhash` mixing rounds and four word compares per lookup and per insert.
/// Written by both programs, read by the agent (inspection); the same capacity as [`CT`]
/// (`--max-ct-entries`), and the same per-CPU LRU lists.
pub const CT4: &str = "LB_CT4";

/// Key of [`CT4`]: an IPv4 client's address and port and the protocol (what a
/// [`CT_DIR_CLIENT`] [`CtKey`] holds of an IPv4 flow; [`CtKey::client4`]). Its value is the
/// same [`CtEntry`] the client key would have in [`CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    /// The client's IPv4 address, network byte order ([`Addr::v4_word`]).
    pub addr: u32,
    /// The client's port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub _pad: u8,
}
const _: () = assert!(size_of::<CtKey4>() == 8);

impl CtKey {
    /// The [`CT4`] key of this key, if it is stored there: a [`CT_DIR_CLIENT`] key of an IPv4
    /// client. `None` for every key [`CT`] holds.
    #[inline(always)]
    #[must_use]
    pub const fn client4(&self) -> Option<CtKey4> {
        if self.dir == CT_DIR_CLIENT && self.src.is_v4() {
            Some(CtKey4 {
                addr: self.src.v4_word(),
                port: self.sport,
                proto: self.proto,
                _pad: 0,
            })
        } else {
            None
        }
    }
}

/// Pinned name of the forward-entry filter: which frontends may have forward (5-tuple) entries
/// in [`CT`].
pub const CT_FORWARD: &str = "LB_CT_FWD";

/// Buckets of [`CT_FORWARD`] (u32 values, 512 KiB as the kernel rounds each value to 8
/// bytes). A frontend's bucket is [`ct_forward_bucket`] of its address, port and protocol.
pub const CT_FORWARD_BUCKETS: u32 = 1 << 16;

/// The index of [`CT_FORWARD`] after its buckets (no frontend hashes to it): 1 once the agent
/// has made the buckets consistent with [`CT`] (set them all where `CT` may hold forward
/// entries they do not record, or found nothing to set), 0 in a map just created. An agent
/// that finds [`CT`] pinned and this 0 (a start that stopped between creating the map and
/// filling it) sets every bucket before attaching.
pub const CT_FORWARD_CONSISTENT: u32 = CT_FORWARD_BUCKETS;

/// The [`CT_FORWARD`] bucket of the frontend `addr`:`port` (network byte order) of protocol
/// `proto`.
///
/// A bucket is 0 while no flow to a frontend of the bucket has been stored with a forward
/// entry ([`CT_DIR_IN`], keyed by the 5-tuple) since the map was created, and 1 once one may
/// have been: XDP sets it before it stores such an entry (an SNAT'd flow, a second flow of
/// one client port), and nothing clears it. A client packet with no client entry for its
/// flow looks its forward key up only when the bucket is 1: a new UDP flow (no SYN says it
/// is new) to a frontend whose backends are all on this node then costs one cold `LB_CT`
/// lookup, not two. The agent sets every bucket to 1 before attaching the programs on an
/// upgrade from layout 4 (whose flows all have forward entries) and whenever it finds `LB_CT`
/// pinned without this map or with [`CT_FORWARD_CONSISTENT`] 0.
pub fn ct_forward_bucket(addr: &Addr, port: u16, proto: u8) -> u32 {
    const K: u32 = 0x9e37_79b1;
    let mut h = u32::from(port) | (u32::from(proto) << 16);
    let mut i = 0;
    while i < 4 {
        h = (h ^ addr.0[i]).wrapping_mul(K);
        h ^= h >> 16;
        i += 1;
    }
    h.wrapping_mul(K) >> (32 - CT_FORWARD_BUCKETS.trailing_zeros())
}

/// First slot number of a frontend's external backends.
pub const EXT_SLOT_BASE: u32 = 1 << 31;

/// [`crate::maps::Frontend::flags`]: the address is external (NodePort, externalIP,
/// LoadBalancer IP), so the XDP datapath serves packets to it from outside the node.
pub const FRONTEND_EXTERNAL: u32 = 1;
/// [`crate::maps::Frontend::flags`]: `externalTrafficPolicy: Local`. External backends are this
/// node's only and a packet with none is dropped (kube-proxy's "no local endpoints" DROP).
pub const FRONTEND_ETP_LOCAL: u32 = 2;

/// [`crate::maps::Frontend::flags`]: a LoadBalancer IP whose Service has
/// `spec.loadBalancerSourceRanges` of this frontend's family. XDP admits a new flow only from a
/// source inside one of them ([`SRC_RANGES`]); established flows are not checked again (as
/// kube-proxy's firewall matches `ctstate NEW` only).
pub const FRONTEND_SRC_RANGES: u32 = 4;

/// Pinned name of the source-range filter.
pub const SRC_RANGES: &str = "LB_SRC_RANGES";

/// Source ranges over all frontends (an LPM trie allocates per entry, so the capacity costs
/// nothing up front). Cilium's `LB4_SRC_RANGE_MAP_SIZE` default is the same.
pub const MAX_SRC_RANGES: u32 = 1 << 16;

/// The data part of a [`SRC_RANGES`] key, an LPM-trie key whose prefix length
/// ([`src_range_prefix`]) covers the whole frontend id and then the range's prefix of the
/// address. Value: [`SRC_RANGE_PRESENT`]. Written by the agent (make before break: the
/// ranges before the frontend's [`FRONTEND_SRC_RANGES`] flag, the flag off before the ranges
/// go); read by XDP for a new flow to a frontend with the flag, with the client address as
/// the key and the full prefix length.
///
/// One trie for both families, as [`Addr`] holds IPv4 addresses mapped into IPv6
/// (`::ffff:a.b.c.d`); a frontend gets only the ranges of its own family (kube-proxy ignores
/// the other family's, `MapCIDRsByIPFamily`). Cilium keeps one trie per family keyed by
/// `(rev_nat_id, address)` the same way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// [`crate::maps::Frontend::id`], host order; always matched in full, so its byte order
    /// does not matter to the trie.
    pub id: u32,
    /// The range's network address (host bits zero), or the client address of a lookup.
    pub addr: Addr,
}
const _: () = assert!(size_of::<SrcRangeKey>() == 20);

/// The value of every [`SRC_RANGES`] entry.
pub const SRC_RANGE_PRESENT: u32 = 1;

/// Prefix length of a [`SRC_RANGES`] key for a range of `bits` bits of an address of
/// family `v4` (IPv4 ranges sit behind the 96-bit mapped prefix): the 32 bits of the id,
/// then the address bits.
pub const fn src_range_prefix(v4: bool, bits: u8) -> u32 {
    let bits = bits as u32;
    32 + if v4 { 96 + bits } else { bits }
}

/// Prefix length of a lookup: everything (id and the whole address).
pub const SRC_RANGE_FULL: u32 = 32 + 128;

/// [`CtKey::dir`]: a packet from a client to a frontend, as received on an `--xdp-iface`.
pub const CT_DIR_IN: u8 = 1;
/// [`CtKey::dir`]: a backend's reply to a client, as it leaves through an `--xdp-iface`.
pub const CT_DIR_REPLY: u8 = 2;
/// [`CtKey::dir`]: the one entry of a flow to a backend on this node (no SNAT), keyed by what
/// both directions know: the client's address and port and the protocol ([`client_key`]);
/// `dst` and `dport` are 0. Its [`CtEntry`] holds the backend (`addr`, `port`) and the
/// frontend (`nat_addr`, `nat_port`): a client packet matches it when its destination is that
/// frontend, a reply when its source is that backend. A second live flow of the same client
/// address and port (to another frontend) cannot share the key and gets a [`CT_DIR_IN`] and a
/// [`CT_DIR_REPLY`] entry instead, as SNAT'd flows and every flow of layout 4 have; readers
/// look the client entry up first and those second. Layout 5 (layout 4 had two entries per
/// flow, which these programs still read).
pub const CT_DIR_CLIENT: u8 = 3;

/// The [`CT_DIR_CLIENT`] key of a flow from client `addr`:`port` (network order) over
/// `proto`.
#[inline(always)]
pub const fn client_key(addr: Addr, port: u16, proto: u8) -> CtKey {
    CtKey {
        src: addr,
        dst: Addr([0; 4]),
        sport: port,
        dport: 0,
        proto,
        dir: CT_DIR_CLIENT,
        _pad: [0; 2],
    }
}

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
    /// [`CT_DIR_IN`], [`CT_DIR_REPLY`] or [`CT_DIR_CLIENT`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// Value of [`CT`]: what the packet's peer address becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// [`CT_DIR_IN`] and [`CT_DIR_CLIENT`]: the backend (new destination). [`CT_DIR_REPLY`]:
    /// the frontend (new source).
    pub addr: Addr,
    /// Port of `addr`, network byte order.
    pub port: u16,
    /// [`CT_SNAT`], [`CT_CLOSING`], [`CT_FIN_CLIENT`], [`CT_FIN_BACKEND`].
    pub flags: u8,
    /// Always 0.
    pub _pad: u8,
    /// [`crate::maps::Frontend::id`] when the flow began; the flow ends when its backend is no
    /// longer a member of this id (the backend left the Service).
    pub id: u32,
    /// With [`CT_SNAT`]: [`CT_DIR_IN`]: this node's address the flow leaves with (new
    /// source); [`CT_DIR_REPLY`]: the client (new destination). [`CT_DIR_CLIENT`] (never
    /// SNAT'd): the frontend (the reply's new source). Otherwise 0.
    pub nat_addr: Addr,
    /// Port of `nat_addr`, network byte order: the allocated source port ([`CT_DIR_IN`]), the
    /// client's port ([`CT_DIR_REPLY`]) or the frontend's port ([`CT_DIR_CLIENT`]).
    pub nat_port: u16,
    /// Always 0.
    pub _pad2: [u8; 2],
    /// [`CT_DIR_IN`] and [`CT_DIR_CLIENT`]: the member epoch (`crate::maps::META_MEMBER_EPOCH`) at which the
    /// backend was last known to be a member of `id`; while the epoch stays, no member has
    /// left and the membership lookup is skipped. 0 in [`CT_DIR_REPLY`] entries (unused).
    pub epoch: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, nanoseconds) of a recent packet in this
    /// direction, refreshed at most every [`CT_REFRESH_NS`]; an entry idle for longer than
    /// [`ct_timeout_ns`] is treated as absent.
    pub seen: u64,
}
const _: () = assert!(size_of::<CtEntry>() == 56);

/// [`CtEntry::flags`]: the flow's backend is on another node; its packets leave with this
/// node's address and an allocated port as source (`externalTrafficPolicy: Cluster`), and
/// XDP forwards both directions itself (FIB lookup and redirect).
pub const CT_SNAT: u8 = 1;
/// [`CtEntry::flags`]: the flow is closed; the entry expires after [`CT_TIMEOUT_CLOSING_NS`]
/// without traffic. Set by a TCP RST from either side; in an entry of one direction
/// ([`CT_DIR_IN`], [`CT_DIR_REPLY`]: SNAT'd flows, a client port's second flow, layout 4) also
/// by a FIN in that direction, as in layout 4, where the flow's other entry keeps the
/// established timeout and touches this one. A [`CT_DIR_CLIENT`] entry serves both
/// directions, so a FIN there sets [`CT_FIN_CLIENT`] or [`CT_FIN_BACKEND`] instead.
pub const CT_CLOSING: u8 = 2;
/// [`CtEntry::flags`] of a [`CT_DIR_CLIENT`] entry: the client sent a FIN (set by XDP). Alone,
/// the flow is half-closed and keeps the established timeout: the backend may still answer
/// (a request followed by `shutdown(SHUT_WR)`, as `nc -N` or an HTTP/1.0 client does).
/// Layout 5 (layout 4 never set it).
pub const CT_FIN_CLIENT: u8 = 4;
/// [`CtEntry::flags`] of a [`CT_DIR_CLIENT`] entry: the backend sent a FIN (set by tc egress).
/// With [`CT_FIN_CLIENT`] the flow is closed ([`ct_closed`]). Layout 5.
pub const CT_FIN_BACKEND: u8 = 8;

/// Idle lifetime of a TCP entry that is not closed (Cilium's `CT_CONNECTION_LIFETIME_TCP`,
/// 6 h), half-closed ones included.
pub const CT_TIMEOUT_TCP_NS: u64 = 21_600 * 1_000_000_000;
/// Lifetime of a closed TCP entry ([`ct_closed`]; Cilium's `CT_CLOSE_TIMEOUT`, 10 s).
pub const CT_TIMEOUT_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// Idle lifetime of a UDP entry (Cilium's `CT_CONNECTION_LIFETIME_NONTCP`, 60 s).
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;
/// `seen` is rewritten at most this often (one map write per second per flow, not per
/// packet).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// TCP flags byte (offset 13 of the TCP header): FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flags byte: RST.
pub const TCP_RST: u8 = 0x04;

/// Whether an entry with `flags` stands for a closed TCP flow: an RST seen ([`CT_CLOSING`]),
/// or a FIN seen from both sides ([`CT_FIN_CLIENT`] and [`CT_FIN_BACKEND`]). A flow closed in
/// one direction only is not: its other direction still carries data.
///
/// The per-direction rule is conntrack's: Cilium keeps `tx_closing` and `rx_closing` in its
/// `ct_entry` and gives an entry its close timeout only when `ct_entry_alive` (`!rx_closing
/// || !tx_closing`) is false (`bpf/lib/conntrack.h`); Linux's `nf_conntrack_proto_tcp.c`
/// moves to `TCP_CONNTRACK_CLOSE` (10 s) on an RST from either side, and keeps a half-closed
/// flow in `FIN_WAIT` / `CLOSE_WAIT` (2 min / 60 s, refreshed by every packet). lb follows
/// Cilium for the half-closed timeout (the established one), so that a backend answering a
/// half-closed request after minutes of work is still translated.
pub const fn ct_closed(flags: u8) -> bool {
    flags & CT_CLOSING != 0
        || flags & (CT_FIN_CLIENT | CT_FIN_BACKEND) == CT_FIN_CLIENT | CT_FIN_BACKEND
}

/// Whether either side of the flow of an entry with `flags` has sent a FIN or RST: then a
/// client's SYN (without ACK) opens a new flow on the same ports rather than retransmitting
/// the old one's.
pub const fn ct_closing_seen(flags: u8) -> bool {
    flags & (CT_CLOSING | CT_FIN_CLIENT | CT_FIN_BACKEND) != 0
}

/// The flags of an entry (`flags`) after a TCP packet with flags byte `tcp` passed: an RST
/// closes the flow ([`CT_CLOSING`]); a FIN sets `fin`, the bit of the packet's side:
/// [`CT_FIN_CLIENT`] (a client packet, XDP) or [`CT_FIN_BACKEND`] (a backend's, tc egress) for
/// a [`CT_DIR_CLIENT`] entry, [`CT_CLOSING`] for an entry of one direction. 0 for UDP (`tcp`
/// 0) leaves `flags` as they are.
pub const fn ct_flags_after(flags: u8, tcp: u8, fin: u8) -> u8 {
    if tcp & TCP_RST != 0 {
        flags | CT_CLOSING
    } else if tcp & TCP_FIN != 0 {
        flags | fin
    } else {
        flags
    }
}

/// How long an entry of protocol `proto` with `flags` lives without traffic, in nanoseconds.
pub const fn ct_timeout_ns(proto: u8, flags: u8) -> u64 {
    if proto != crate::maps::IPPROTO_TCP {
        CT_TIMEOUT_UDP_NS
    } else if ct_closed(flags) {
        CT_TIMEOUT_CLOSING_NS
    } else {
        CT_TIMEOUT_TCP_NS
    }
}

/// Whether an entry last seen at `seen` has expired at `now` (both `bpf_ktime_get_coarse_ns`).
pub const fn ct_expired(entry_seen: u64, now: u64, proto: u8, flags: u8) -> bool {
    now.saturating_sub(entry_seen) > ct_timeout_ns(proto, flags)
}

/// Source ports allocated for SNAT, host order, inclusive. Above Linux's default
/// `ip_local_port_range` (32768-60999), so they do not collide with the node's own
/// connections, and above the NodePort range, so a reply to one is never a frontend.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// See [`SNAT_PORT_MIN`].
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Ports tried for one new flow before giving up (each try is one insert into [`CT`] that
/// fails if a live flow holds that port for the same backend).
pub const SNAT_TRIES: u32 = 16;

/// The `i`-th port to try for a flow whose random draw is `random` (host order).
pub const fn snat_port(random: u32, i: u32) -> u16 {
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    // An odd stride visits every port of the span once per `span` tries.
    let stride = 7_919;
    SNAT_PORT_MIN + (random.wrapping_add(i.wrapping_mul(stride)) % span) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_buckets_are_in_range_and_tell_frontends_apart() {
        let v4 = |last: u8| Addr::from_v4_octets([10, 0, 0, last]);
        let mut buckets = [0u32; 1536];
        let mut n = 0;
        for last in 0..=255u8 {
            for port in [80u16, 443, 30080] {
                for proto in [6u8, 17] {
                    let bucket = ct_forward_bucket(&v4(last), port.to_be(), proto);
                    assert!(bucket < CT_FORWARD_BUCKETS);
                    buckets[n] = bucket;
                    n += 1;
                }
            }
        }
        buckets.sort_unstable();
        let distinct = 1 + buckets.windows(2).filter(|w| w[0] != w[1]).count();
        // 1536 frontends: a good spread leaves few sharing a bucket.
        assert!(distinct > 1_400, "{distinct} distinct buckets");
        assert_ne!(
            ct_forward_bucket(&v4(1), 80u16.to_be(), 6),
            ct_forward_bucket(&v4(1), 80u16.to_be(), 17),
            "TCP and UDP of one address and port"
        );
    }

    #[test]
    fn snat_ports_stay_in_range_and_differ() {
        for r in [0, 1, 4535, 4536, u32::MAX] {
            let mut seen = [0u16; SNAT_TRIES as usize];
            for i in 0..SNAT_TRIES {
                let p = snat_port(r, i);
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p));
                assert!(!seen.contains(&p), "port {p} tried twice");
                seen[i as usize] = p;
            }
        }
    }

    #[test]
    fn client_keys_hold_the_client_only() {
        let client = Addr::from_v4_octets([192, 0, 2, 1]);
        let tcp = crate::maps::IPPROTO_TCP;
        let key = client_key(client, 40_000u16.to_be(), tcp);
        assert_eq!(
            key,
            CtKey {
                src: client,
                dst: Addr::default(),
                sport: 40_000u16.to_be(),
                dport: 0,
                proto: tcp,
                dir: CT_DIR_CLIENT,
                _pad: [0; 2],
            }
        );
        // Never equal to a forward or reply key of the same client.
        assert_ne!(key.dir, CT_DIR_IN);
        assert_ne!(key.dir, CT_DIR_REPLY);
    }

    #[test]
    fn only_ipv4_client_keys_go_to_ct4() {
        let v4 = Addr::from_v4_octets([192, 0, 2, 1]);
        let v6 = Addr::from_v6_octets([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let frontend = Addr::from_v4_octets([10, 0, 0, 1]);
        let (tcp, udp) = (crate::maps::IPPROTO_TCP, crate::maps::IPPROTO_UDP);
        let port = 40_000u16.to_be();
        let five_tuple = |dir| CtKey {
            src: v4,
            dst: frontend,
            sport: port,
            dport: 80u16.to_be(),
            proto: tcp,
            dir,
            _pad: [0; 2],
        };
        let cases: &[(&str, CtKey, Option<CtKey4>)] = &[
            (
                "ipv4 client, tcp",
                client_key(v4, port, tcp),
                Some(CtKey4 {
                    addr: v4.v4_word(),
                    port,
                    proto: tcp,
                    _pad: 0,
                }),
            ),
            (
                "ipv4 client, udp",
                client_key(v4, port, udp),
                Some(CtKey4 {
                    addr: v4.v4_word(),
                    port,
                    proto: udp,
                    _pad: 0,
                }),
            ),
            ("ipv6 client", client_key(v6, port, tcp), None),
            ("ipv4 forward", five_tuple(CT_DIR_IN), None),
            ("ipv4 reply", five_tuple(CT_DIR_REPLY), None),
        ];
        for (name, key, want) in cases {
            assert_eq!(key.client4(), *want, "{name}");
        }
    }

    #[test]
    fn src_range_prefixes() {
        assert_eq!(src_range_prefix(true, 0), 128);
        assert_eq!(src_range_prefix(true, 32), SRC_RANGE_FULL);
        assert_eq!(src_range_prefix(false, 0), 32);
        assert_eq!(src_range_prefix(false, 128), SRC_RANGE_FULL);
    }

    #[test]
    fn expiry_by_state() {
        let s = 1_000;
        let tcp = crate::maps::IPPROTO_TCP;
        let udp = crate::maps::IPPROTO_UDP;
        let both = CT_FIN_CLIENT | CT_FIN_BACKEND;
        // (name, protocol, flags, idle ns, expired)
        let cases: &[(&str, u8, u8, u64, bool)] = &[
            ("udp within its timeout", udp, 0, CT_TIMEOUT_UDP_NS, false),
            ("udp past its timeout", udp, 0, CT_TIMEOUT_UDP_NS + 1, true),
            (
                "udp ignores tcp state bits",
                udp,
                both,
                CT_TIMEOUT_UDP_NS,
                false,
            ),
            (
                "tcp established past udp's",
                tcp,
                0,
                CT_TIMEOUT_UDP_NS + 1,
                false,
            ),
            (
                "tcp established at its timeout",
                tcp,
                0,
                CT_TIMEOUT_TCP_NS,
                false,
            ),
            (
                "tcp established past it",
                tcp,
                0,
                CT_TIMEOUT_TCP_NS + 1,
                true,
            ),
            (
                "snat established",
                tcp,
                CT_SNAT,
                CT_TIMEOUT_CLOSING_NS + 1,
                false,
            ),
            // One-entry flows: one side's FIN is a half-close, not the end.
            (
                "client fin only",
                tcp,
                CT_FIN_CLIENT,
                CT_TIMEOUT_CLOSING_NS + 1,
                false,
            ),
            (
                "client fin only, 11 s",
                tcp,
                CT_FIN_CLIENT,
                11_000_000_000,
                false,
            ),
            (
                "client fin only, past tcp",
                tcp,
                CT_FIN_CLIENT,
                CT_TIMEOUT_TCP_NS + 1,
                true,
            ),
            (
                "backend fin only",
                tcp,
                CT_FIN_BACKEND,
                CT_TIMEOUT_CLOSING_NS + 1,
                false,
            ),
            (
                "both fins, within closing",
                tcp,
                both,
                CT_TIMEOUT_CLOSING_NS,
                false,
            ),
            (
                "both fins, past closing",
                tcp,
                both,
                CT_TIMEOUT_CLOSING_NS + 1,
                true,
            ),
            // An RST (either side), and a FIN of a one-direction entry (layout 4 too).
            (
                "closing, within",
                tcp,
                CT_CLOSING,
                CT_TIMEOUT_CLOSING_NS,
                false,
            ),
            (
                "closing, past",
                tcp,
                CT_CLOSING,
                CT_TIMEOUT_CLOSING_NS + 1,
                true,
            ),
            (
                "rst after client fin",
                tcp,
                CT_CLOSING | CT_FIN_CLIENT,
                CT_TIMEOUT_CLOSING_NS + 1,
                true,
            ),
            (
                "snat closing",
                tcp,
                CT_SNAT | CT_CLOSING,
                CT_TIMEOUT_CLOSING_NS + 1,
                true,
            ),
        ];
        for &(name, proto, flags, idle, want) in cases {
            assert_eq!(ct_expired(s, s + idle, proto, flags), want, "{name}");
        }
        // A clock read before `seen` (another CPU refreshed it) is not expiry.
        assert!(!ct_expired(s, 0, tcp, CT_CLOSING));
    }

    #[test]
    fn close_flags_by_packet() {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        // (name, flags before, tcp flags byte, the entry's FIN bit, flags after)
        let cases: &[(&str, u8, u8, u8, u8)] = &[
            ("ack changes nothing", 0, ACK, CT_FIN_CLIENT, 0),
            ("udp (no tcp byte)", CT_SNAT, 0, CT_CLOSING, CT_SNAT),
            ("client fin", 0, TCP_FIN | ACK, CT_FIN_CLIENT, CT_FIN_CLIENT),
            (
                "backend fin",
                0,
                TCP_FIN | ACK,
                CT_FIN_BACKEND,
                CT_FIN_BACKEND,
            ),
            (
                "backend fin after client's",
                CT_FIN_CLIENT,
                TCP_FIN | ACK,
                CT_FIN_BACKEND,
                CT_FIN_CLIENT | CT_FIN_BACKEND,
            ),
            ("client rst", 0, TCP_RST, CT_FIN_CLIENT, CT_CLOSING),
            ("backend rst", 0, TCP_RST | ACK, CT_FIN_BACKEND, CT_CLOSING),
            (
                "one-direction fin",
                CT_SNAT,
                TCP_FIN | ACK,
                CT_CLOSING,
                CT_SNAT | CT_CLOSING,
            ),
            (
                "syn changes nothing",
                CT_FIN_CLIENT,
                SYN,
                CT_FIN_CLIENT,
                CT_FIN_CLIENT,
            ),
        ];
        for &(name, flags, tcp, fin, want) in cases {
            assert_eq!(ct_flags_after(flags, tcp, fin), want, "{name}");
        }
        // The close rule over those: only both FINs or an RST close.
        let closed = |tcp_client: u8, tcp_backend: u8| {
            let f = ct_flags_after(0, tcp_client, CT_FIN_CLIENT);
            ct_closed(ct_flags_after(f, tcp_backend, CT_FIN_BACKEND))
        };
        assert!(!closed(TCP_FIN, 0), "half-closed by the client");
        assert!(!closed(0, TCP_FIN), "half-closed by the backend");
        assert!(closed(TCP_FIN, TCP_FIN), "closed by both");
        assert!(closed(TCP_RST, 0) && closed(0, TCP_RST), "reset by either");
        // Any close opens the ports to a new flow's SYN; nothing else does.
        assert!(ct_closing_seen(CT_FIN_CLIENT) && ct_closing_seen(CT_FIN_BACKEND));
        assert!(ct_closing_seen(CT_CLOSING) && !ct_closing_seen(CT_SNAT));
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{CtEntry, CtKey, CtKey4, SrcRangeKey};

    // SAFETY: #[repr(C)], integers only, padding explicit (size assertions above).
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SrcRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
}
