//! The BPF maps: names, capacities, keys and values.
//!
//! Byte order: ports are in network byte order (as `bpf_sock_addr.user_port` holds them in
//! its low 16 bits); addresses are [`Addr`] (network order, IPv4-mapped for v4). Everything
//! else is host order.
//!
//! A Service frontend is found in [`FRONTENDS`]; its backends sit in [`SLOTS`] at
//! `(id, 0..count)`, and [`MEMBERS`] says which backends currently belong to `id` (the
//! programs check it before reusing a remembered backend). The agent writes these three, in
//! make-before-break order: members, then slots, then the frontend with its count, then the
//! tail slots and members it no longer needs. The programs only read them.
//!
//! The programs write the per-connection state, which lives and dies with the socket: a
//! TCP socket's in its [`TCP_SOCKS`] slot (picked by the socket cookie, owned as
//! [`TCP_OWNERS`] says, freed by the `sock_release` program when the socket closes), or in its
//! [`SOCKS`] socket storage when another socket holds the slot (and always for MPTCP): what a
//! connected socket was sent to, to show the Service address back. A socket connected through
//! a Service to a backend whose [`REVERSE`] entry answers for that Service has neither. A UDP
//! socket's in its [`UDP_SOCKS`] slot (owned as [`UDP_OWNERS`] says), with an unconnected
//! socket's first [`SOCK_FLOWS`] flows, Service -> backend, for its later datagrams and for
//! recvmsg, or in [`DGRAMS`] (socket storage of the same value) when another socket holds the
//! slot; [`REVNAT`] and [`UDP_FLOWS`] the flows of a socket that sent to more Services than
//! that (the overflow, LRU); [`AFFINITY`] ClientIP session affinity. The agent never writes
//! them, except the [`SOCKS`] storage it gives sockets whose backend's [`REVERSE`] entry is
//! about to stop answering for them.
//!
//! A socket's slot, then its storage, is the gate of the reverse hooks: a socket with neither
//! was never translated (or, for TCP, answers from [`REVERSE`]), and recvmsg/getpeername leave
//! it alone without any other lookup; [`REVNAT`] is read only for sockets whose state has
//! [`SOCK_OVERFLOW`].

use crate::Addr;

/// Bumped whenever a key, value or the meaning of a field changes. The agent stores it in
/// [`META`] when it creates the maps and refuses to adopt pinned maps with another value.
///
/// 3: [`SockXlate`] gained `flags` ([`SOCK_CONNECTED`], [`SOCK_DATAGRAMS`]), and unconnected
/// UDP sockets get a [`SOCKS`] entry too (the reverse hooks read [`REVNAT`] only for those);
/// [`Frontend`] gained `ext_count`/`ext_local` and `flags` has a meaning (the north-south
/// backend range at `EXT_SLOT_BASE`); the conntrack map `LB_CT` is new (its value with the
/// SNAT fields and the `seen` timestamp, 56 bytes).
///
/// 4: `LB_SRC_RANGES` (source ranges of LoadBalancer IPs, an LPM trie) is new, and
/// [`Frontend::flags`] has `FRONTEND_SRC_RANGES`.
/// Also 4: UDP sockets keep their state in [`DGRAMS`] ([`DgramXlate`]: the connected part as in
/// [`SockXlate`], and an unconnected socket's first [`SOCK_FLOWS`] flows, Service ->
/// backend), [`SOCKS`] holds the other sockets' (TCP, MPTCP); [`SOCK_OVERFLOW`] is new, and
/// [`REVNAT`] and [`UDP_FLOWS`] hold only the flows of sockets that sent to more Services.
/// Also 4: the Maglev tables `LB_MAGLEV` ([`crate::maglev`]) are new, and [`META`] holds their
/// size at [`META_MAGLEV_TABLE_SIZE`]; the north-south ClientIP affinity map
/// `LB_NS_AFFINITY` ([`crate::ns_affinity`]) is new.
/// Also 4: `LB_STATS` has more counters (ICMP error translation, tc conntrack expiry).
///
/// 5: an agent of layout 5 takes over layout-4 pins in place, map by map, as the agent's
/// declared change list says (`lb-userspace/src/kernel/upgrade.rs`, `CHANGES`: every change of
/// a pinned map from here on gets an entry there).
/// Also 5: `LB_CT` keeps a flow to a backend on this node in one entry keyed by the client
/// (`nat::CT_DIR_CLIENT`, the frontend in its `nat_addr`/`nat_port`) instead of a forward and
/// a reply entry. Entries of layout 4 keep their meaning and layout-5 programs still read
/// them (a second flow of a client port and SNAT'd flows are stored that way), so an upgrade
/// keeps `LB_CT` as it is.
/// Also 5: [`REVERSE`] (backend -> the one frontend whose connects write no socket storage) is
/// new, and [`SockXlate::flags`] has [`SOCK_DIRECT`]. Layout-4 entries keep their meaning: a
/// layout-4 socket always has storage, and a socket with storage never reads [`REVERSE`].
/// Also 5: [`REVERSE_FILTER`] is new: a bit per hash of a backend's address and port
/// ([`reverse_filter_bit`]), set by the agent before it writes a [`REVERSE`] entry with that
/// key and cleared only once no entry has it, so that a connect or getpeername to an
/// address with no entry (the miss) reads one array word instead of a second hash lookup.
/// Also 5: a UDP socket's [`DgramXlate`] goes in its [`UDP_SOCKS`] slot (an array indexed by
/// the socket cookie's low bits, owned as [`UDP_OWNERS`] says, freed by the new
/// `sock_release` program when the socket closes) instead of [`DGRAMS`] (socket storage), which now holds only the
/// state of sockets whose slot another socket held and of those translated before the
/// upgrade; the programs read the slot first, then [`DGRAMS`], so layout-4 sockets keep their
/// state.
/// Also 5: a TCP socket's [`SockXlate`] goes the same way in its [`TCP_SOCKS`] slot (owned as
/// [`TCP_OWNERS`] says) instead of [`SOCKS`], which now holds the state of MPTCP sockets, of
/// TCP sockets whose slot another socket held, of those the agent gives state for a draining
/// [`REVERSE`] entry, and of those translated before the upgrade.
/// Also 5: `LB_CT4` (`nat::CT4`) is new and holds the client entries of IPv4 flows under an
/// 8-byte key; `LB_CT` keeps the rest, and every entry of layout 4 where it was. Layout 5 is
/// not released yet, so no pin set holds IPv4 client entries in `LB_CT`: a development build
/// from before `LB_CT4` leaves its IPv4 flows to local pods there, unmoved (they start again
/// after the restart, as after `lb cleanup`).
pub const LAYOUT_VERSION: u32 = 5;

/// IP protocol numbers as `bpf_sock_addr.protocol` reports them.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// `BPF_F_NO_PREALLOC`: the large service maps grow with use instead of reserving their full
/// capacity up front.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`, kernel 5.5): an array whose values user space
/// can `mmap(2)` and read without a syscall per element.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_COMMON_LRU` (`include/uapi/linux/bpf.h`): an LRU hash map keeps one LRU list per
/// CPU instead of one list behind a global lock; each CPU's list holds `max_entries / CPUs`
/// entries (the kernel rounds `max_entries` up to a multiple of the possible CPUs). Cilium
/// creates its conntrack maps this way (`LRU_MEM_FLAVOR`).
pub const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Pinned names, also the programs' map names (at most 15 bytes: `BPF_OBJ_NAME_LEN`).
pub const FRONTENDS: &str = "LB_FRONTENDS";
pub const SLOTS: &str = "LB_SLOTS";
pub const MEMBERS: &str = "LB_MEMBERS";
pub const AFFINITY: &str = "LB_AFFINITY";
pub const SOCKS: &str = "LB_SOCKS";
pub const DGRAMS: &str = "LB_DGRAMS";
pub const REVNAT: &str = "LB_REVNAT";
pub const UDP_FLOWS: &str = "LB_UDP_FLOWS";
pub const UDP_SOCKS: &str = "LB_UDP_SOCKS";
pub const UDP_OWNERS: &str = "LB_UDP_OWNERS";
pub const TCP_SOCKS: &str = "LB_TCP_SOCKS";
pub const TCP_OWNERS: &str = "LB_TCP_OWNERS";
pub const STATS: &str = "LB_STATS";
pub const REVERSE: &str = "LB_REVERSE";
pub const REVERSE_FILTER: &str = "LB_REV_FILTER";
pub const META: &str = "LB_META";

/// Frontends: one per (Service IP, port, protocol). The default capacity, as Cilium's
/// (`bpf-lb-map-max`); `lb run --max-frontends` sets another when the maps are created. A
/// hash map's bucket array is sized by its capacity, so the default stays moderate.
pub const MAX_FRONTENDS: u32 = 1 << 16;
/// Backend slots over all frontends (frontends x endpoints), default capacity
/// (`lb run --max-backends`).
pub const MAX_SLOTS: u32 = 1 << 19;
/// Frontend/backend memberships: one per slot (same capacity as [`SLOTS`]).
pub const MAX_MEMBERS: u32 = MAX_SLOTS;
/// ClientIP affinity entries (client x Service port); LRU.
pub const MAX_AFFINITY: u32 = 1 << 16;
/// Unconnected UDP (socket, backend) pairs remembered for recvmsg, beyond a socket's
/// [`SOCK_FLOWS`] own; LRU.
pub const MAX_REVNAT: u32 = 1 << 16;
/// Unconnected UDP (socket, frontend) pairs beyond a socket's [`SOCK_FLOWS`] own; LRU.
pub const MAX_UDP_FLOWS: u32 = 1 << 16;
/// Slots of each socket-slot table, [`UDP_SOCKS`] with [`UDP_OWNERS`] and [`TCP_SOCKS`] with
/// [`TCP_OWNERS`] (a power of two: a socket's slot is its cookie's low bits, see
/// [`sock_slot`]). UDP: 240 + 8 bytes each, 15.5 MiB; TCP: 48 + 8 bytes each, 3.5 MiB. A
/// socket whose slot another open socket holds keeps its state in socket storage instead
/// ([`DGRAMS`], [`SOCKS`]), which the kernel allocates and charges per socket: about 0.7 µs
/// more on the connect or first datagram (measured with `perf` on 6.18), exact all the same.
///
/// The slots: an owners array holds at each index the cookie of the open socket that owns
/// it, 0 for a free slot (the kernel's cookies start at 1); the state array at the same
/// index holds the owner's state. A socket claims its free slot with an atomic
/// compare-and-exchange of the owner (0 -> its cookie with [`SLOT_CLAIMING`]) on its first
/// translation, writes the whole state, then stores its plain cookie; the `sock_release`
/// program sets the owner back to 0 when the socket closes. Only the owner reads the state,
/// after checking the owner; the agent reads the owner, the state and the owner again, and
/// takes the state only if both reads are the cookie it looks for. The owners are an array
/// of their own so that the check every socket makes (translated or not) reads 8 bytes, of
/// which neighbouring sockets share a cache line, rather than a whole state.
pub const SOCK_SLOTS: u32 = 1 << 16;

/// An owner ([`UDP_OWNERS`], [`TCP_OWNERS`]) with this bit set is a socket cookie (the rest)
/// still writing its state into the slot it just claimed: no one's yet for the agent, which
/// compares the whole value with a cookie. Kernel cookies are a 64-bit count from 1 and
/// never reach it.
pub const SLOT_CLAIMING: u64 = 1 << 63;

/// The slot ([`UDP_SOCKS`], [`TCP_SOCKS`]) of the socket with cookie `cookie`: its low bits.
/// The kernel hands out socket cookies in increasing order (`gen_cookie_next`, per-CPU
/// batches), so sockets made one after another use neighbouring slots, and a slot comes
/// round again only after [`SOCK_SLOTS`] newer cookies.
pub const fn sock_slot(cookie: u64) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the mask keeps the low 16 bits"
    )]
    let slot = (cookie & (SOCK_SLOTS as u64 - 1)) as u32;
    slot
}
/// Reverse entries (backend address, port, protocol -> one frontend): at most one per
/// backend, so the slots' default capacity.
pub const MAX_REVERSE: u32 = MAX_SLOTS;
/// log2 of the bits of [`REVERSE_FILTER`]: 2^21 bits (256 KiB), so that with the usual few
/// thousand backends a miss finds its bit clear almost always (at [`MAX_REVERSE`] entries
/// about one address in five still finds it set, and pays the [`REVERSE`] lookup).
pub const REVERSE_FILTER_BITS_LOG2: u32 = 21;
/// Entries (64-bit words) of [`REVERSE_FILTER`].
pub const REVERSE_FILTER_WORDS: u32 = 1 << (REVERSE_FILTER_BITS_LOG2 - 6);
/// Entries of [`META`].
pub const META_LEN: u32 = 4;
/// Index in [`META`] of the layout version.
pub const META_LAYOUT_VERSION: u32 = 0;
/// Index in [`META`] of the Maglev table size `M` of `LB_MAGLEV` (`--maglev-table-size`),
/// written by the agent before any table; 0 with `--lb-algorithm random` (the XDP program then
/// picks external backends at random). Read by the XDP program for each new flow.
pub const META_MAGLEV_TABLE_SIZE: u32 = 1;
/// Index in [`META`] of the member epoch: the agent adds 1 (wrapping) after every group of
/// [`MEMBERS`] deletions, once they are in the map. The XDP program stamps a flow's
/// conntrack entry with the epoch it last saw the flow's backend a member at
/// ([`crate::nat::CtEntry::epoch`]) and looks [`MEMBERS`] up again only when the epoch has
/// moved since, so that an established flow's packet costs one array read instead of a hash
/// lookup while no backend leaves; a flow whose backend left is still dropped at its next
/// packet after the deletion.
pub const META_MEMBER_EPOCH: u32 = 2;

/// Key of [`FRONTENDS`]: where a client connects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// The Service address (ClusterIP); never zero.
    pub addr: Addr,
    /// The Service port, network byte order; never zero.
    pub port: u16,
    /// [`IPPROTO_TCP`], [`IPPROTO_UDP`] or [`IPPROTO_SCTP`].
    pub proto: u8,
    /// Always 0, so keys hash the same on both sides.
    pub _pad: u8,
}
const _: () = assert!(size_of::<FrontendKey>() == 20);

/// Value of [`FRONTENDS`]: the frontend's backend set and its settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Names this frontend's [`SLOTS`], [`MEMBERS`] and [`AFFINITY`] entries. Allocated by the
    /// agent, never 0, not reused while the agent runs (so stale affinity never matches).
    pub id: u32,
    /// Backends in slots `0..count`. 0 means "a Service without a usable endpoint": the
    /// programs refuse the connection (ECONNREFUSED), as kube-proxy's REJECT rule does.
    pub count: u32,
    /// ClientIP session affinity timeout in seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
    /// [`crate::nat::FRONTEND_EXTERNAL`] and [`crate::nat::FRONTEND_ETP_LOCAL`]; 0 for a
    /// ClusterIP (the XDP datapath leaves packets to it alone).
    pub flags: u32,
    /// External backends (packets from outside the node, served by the XDP datapath) in slots
    /// `EXT_SLOT_BASE + 0..ext_count` ([`crate::nat::EXT_SLOT_BASE`]); 0 for a ClusterIP.
    pub ext_count: u32,
    /// How many of the external backends, the first ones, are on this node (all of them under
    /// `externalTrafficPolicy: Local`).
    pub ext_local: u32,
}
const _: () = assert!(size_of::<Frontend>() == 24);

/// Key of [`SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// [`Frontend::id`].
    pub id: u32,
    /// `0..Frontend::count`.
    pub slot: u32,
}
const _: () = assert!(size_of::<SlotKey>() == 8);

/// A backend (endpoint address and port); the value of [`SLOTS`] and [`UDP_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address, same family as the frontend.
    pub addr: Addr,
    /// Endpoint port, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Backend>() == 20);

impl Backend {
    #[inline(always)]
    #[must_use]
    pub const fn new(addr: Addr, port_be: u16) -> Self {
        Self {
            addr,
            port: port_be,
            _pad: [0; 2],
        }
    }
}

/// Key of [`MEMBERS`]: "this backend is one of frontend `id`'s slots". The value is a `u32`,
/// [`MEMBER_PRESENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// [`Frontend::id`].
    pub id: u32,
    pub backend: Backend,
}
const _: () = assert!(size_of::<MemberKey>() == 24);

/// The value stored in [`MEMBERS`].
pub const MEMBER_PRESENT: u32 = 1;

/// Key of [`AFFINITY`]: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client: its network namespace cookie. At connect time the source address is not
    /// chosen yet, and every pod has its own network namespace, so the netns is the client IP.
    pub client: u64,
    /// [`Frontend::id`].
    pub id: u32,
    /// Always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

/// Value of [`AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity {
    /// `bpf_ktime_get_ns()` of the client's last new connection to the frontend.
    pub last_used_ns: u64,
    /// The backend the client sticks to; used only while it is still a member.
    pub backend: Backend,
    /// Always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Affinity>() == 32);

/// Key of [`REVNAT`]: a translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address the socket was sent to.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<RevNatKey>() == 32);

/// Value of [`REVNAT`]: what the client asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat {
    /// The Service address the client connected or sent to.
    pub addr: Addr,
    /// The Service port, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u8; 2],
    /// [`Frontend::id`] at translation time (for inspection).
    pub id: u32,
}
const _: () = assert!(size_of::<RevNat>() == 24);

/// How many unconnected-UDP flows (Service -> backend) a socket keeps in its own
/// [`DGRAMS`] value; flows beyond these go to [`UDP_FLOWS`] and [`REVNAT`]. A resolver
/// socket talks to one or two Services; four keep the value (240 bytes) within the
/// kernel's 512-byte allocation class together with the element header.
pub const SOCK_FLOWS: usize = 4;

/// One unconnected-UDP flow of a socket, in its [`DgramXlate::flows`]: datagrams to
/// `frontend` go to `backend` (the socket's conntrack entry, with kube-proxy), and replies
/// from `backend` show `frontend` while [`FLOW_REVERSE`] is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlow {
    /// The Service address, port and protocol the socket sent to.
    pub frontend: FrontendKey,
    /// The backend its datagrams go to; used again only while it is still a member.
    pub backend: Backend,
    /// [`Frontend::id`] when the backend was chosen; 0: an empty slot.
    pub id: u32,
    /// [`FLOW_REVERSE`]; other bits 0.
    pub flags: u32,
}
const _: () = assert!(size_of::<SockFlow>() == 48);

/// [`SockFlow::flags`]: replies from the backend are shown as coming from the Service.
/// Cleared when the socket sends to the backend's address directly (kube-proxy would see a
/// separate, untranslated flow), set again by its next datagram through the Service.
pub const FLOW_REVERSE: u32 = 1;

/// What lb did with one TCP or MPTCP socket, for getpeername: the value of its [`TCP_SOCKS`]
/// slot, or of its [`SOCKS`] storage (keyed by the socket itself). A socket with neither was
/// never translated, or answers from [`REVERSE`]. Written only by the socket's own syscalls,
/// under the socket lock (and by the agent into the storage of a socket whose [`REVERSE`]
/// entry is about to stop answering); gone with the socket. Also the connected part of a UDP
/// socket's [`DgramXlate`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockXlate {
    /// The backend the socket is connected to; meaningful with [`SOCK_CONNECTED`].
    pub backend: Backend,
    /// The Service address and port it connected to, and the frontend id; meaningful with
    /// [`SOCK_CONNECTED`].
    pub service: RevNat,
    /// [`SOCK_CONNECTED`] | [`SOCK_DATAGRAMS`] | [`SOCK_OVERFLOW`] | [`SOCK_DIRECT`]; other
    /// bits 0.
    pub flags: u32,
}
const _: () = assert!(size_of::<SockXlate>() == 48);

/// What lb did with one UDP socket, for getpeername, recvmsg and its later sends: in its
/// [`UDP_SOCKS`] slot ([`SOCK_SLOTS`] says how slots are owned), or in its [`DGRAMS`] storage when another socket
/// held the slot (and for sockets layout 4 translated). Apart from [`SOCKS`] so that a TCP
/// socket's storage is only the small [`SockXlate`]. Written only by the socket's own
/// syscalls, under the socket lock; the `sock_release` program frees the slot when the
/// socket closes, and the kernel frees storage with the socket, so nothing here outlives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DgramXlate {
    /// The connected part: backend, Service and flags, as for a TCP socket.
    pub conn: SockXlate,
    /// The unconnected flows (with [`SOCK_DATAGRAMS`] in `conn.flags`), filled from the
    /// first slot.
    pub flows: [SockFlow; SOCK_FLOWS],
}
const _: () = assert!(size_of::<DgramXlate>() == 48 + 48 * SOCK_FLOWS);

/// [`SockXlate::flags`]: the socket's last connect() went to `service` and was sent to
/// `backend` (TCP, connected UDP, MPTCP: then it is the MPTCP socket's entry, not the
/// subflow's). Cleared by a connect() to an address that is not a Service.
pub const SOCK_CONNECTED: u32 = 1;
/// [`SockXlate::flags`]: the socket's last connect() went to a backend address that has a
/// [`REVERSE`] entry, directly (not through a Service), or it was connected so before the
/// entry was written (the agent marks it, see [`Reverse`]). Only a marker: what matters is
/// that the socket has state (a slot or storage), so getpeername does not read [`REVERSE`]
/// for it.
pub const SOCK_DIRECT: u32 = 8;
/// [`SockXlate::flags`]: the socket sent datagrams to a Service with sendmsg (unconnected
/// UDP): its [`DgramXlate::flows`] hold them. Never cleared.
pub const SOCK_DATAGRAMS: u32 = 2;
/// [`SockXlate::flags`]: the socket sent datagrams to more Services than its flows hold, so
/// [`UDP_FLOWS`] and [`REVNAT`] may hold `(cookie, ...)` entries for it. Never cleared.
pub const SOCK_OVERFLOW: u32 = 4;

/// Key of [`UDP_FLOWS`]: an unconnected UDP socket sending to a frontend. Like a conntrack
/// entry for kube-proxy, it keeps the socket's datagrams on one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    pub frontend: FrontendKey,
    /// Always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<UdpFlowKey>() == 32);

/// Value of [`REVERSE`], keyed by a [`FrontendKey`] that holds a backend's address, port and
/// protocol ([`IPPROTO_TCP`] only): the one frontend (`service`) whose TCP connects to this
/// backend write no per-socket state (no [`TCP_SOCKS`] slot, no [`SOCKS`] storage) while
/// `state` is [`REVERSE_ACTIVE`]; getpeername of a TCP socket without state whose peer is
/// this backend shows `service`. Below, "state" is a socket's slot or storage; the agent
/// gives a socket state only as [`SOCKS`] storage.
///
/// Written by the agent (`lb-userspace/src/kernel/revmap.rs`), only where the choice is
/// deterministic (the ClusterIP frontend of the lowest Service and port claiming the
/// backend), in this order, so that every socket stays exact:
/// - new: [`REVERSE_PENDING`] (connects through the Service write state as before; direct
///   connects to the backend get state marked [`SOCK_DIRECT`]; getpeername ignores the
///   entry), then the agent gives every live socket already connected to the backend
///   without state (a direct one) [`SOCK_DIRECT`] storage, then [`REVERSE_ACTIVE`];
/// - going away or changing: [`REVERSE_DRAINING`] (connects write state again; getpeername
///   still answers for sockets without state), then the agent gives every live socket
///   connected to the backend without state (through `service`) the Service translation as
///   storage, then deletes the entry.
///
/// The programs only read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Reverse {
    /// The frontend's address, port and id (the id is compared on connect).
    pub service: RevNat,
    /// [`REVERSE_PENDING`], [`REVERSE_ACTIVE`] or [`REVERSE_DRAINING`].
    pub state: u32,
}
const _: () = assert!(size_of::<Reverse>() == 28);

/// [`Reverse::state`]: written, live sockets not yet marked; connects write state,
/// getpeername ignores the entry.
pub const REVERSE_PENDING: u32 = 1;
/// [`Reverse::state`]: connects through `service` to this backend write no state.
pub const REVERSE_ACTIVE: u32 = 2;
/// [`Reverse::state`]: about to go; connects write state, getpeername still answers for
/// sockets without state.
pub const REVERSE_DRAINING: u32 = 3;

/// The bit of [`REVERSE_FILTER`] for a TCP backend `addr`:`port` (port in network byte
/// order, as in [`FrontendKey`]): `0..2^REVERSE_FILTER_BITS_LOG2`, word `bit / 64`, bit
/// `bit % 64` of that word. One function for both sides, so the agent sets exactly the bit
/// the programs test.
///
/// A multiplicative (Fibonacci) hash over the address words and the port, with a shift
/// between rounds so that high input bits (the last octets of an IPv4 address, in network
/// order) reach every output bit; the top bits of the last product are the index.
#[inline(always)]
#[must_use]
pub fn reverse_filter_bit(addr: &Addr, port: u16) -> u32 {
    const K: u32 = 0x9e37_79b1;
    let mut h = u32::from(port);
    let mut i = 0;
    while i < 4 {
        h = (h ^ addr.0[i]).wrapping_mul(K);
        h ^= h >> 16;
        i += 1;
    }
    h.wrapping_mul(K) >> (32 - REVERSE_FILTER_BITS_LOG2)
}

/// Map types, for the agent's shape check of pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    /// Socket local storage (key: a socket; capacity 0: one value per socket).
    SkStorage,
    /// Longest-prefix match (key: prefix length, then the data).
    LpmTrie,
}

/// What a map must look like; the agent compares pinned maps against it before adopting them.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// Written by the agent (true) or by the programs (false).
    pub agent_writes: bool,
    /// The capacity is the agent's choice (`max_entries` above is the default).
    pub sized_by_agent: bool,
}

const fn size<T>() -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "map keys and values are a few dozen bytes"
    )]
    let size = size_of::<T>() as u32;
    size
}

/// Every map lb pins, in the order the agent checks them.
pub const SPECS: &[MapSpec] = &[
    MapSpec {
        name: FRONTENDS,
        kind: MapKind::Hash,
        key_size: size::<FrontendKey>(),
        value_size: size::<Frontend>(),
        max_entries: MAX_FRONTENDS,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: true,
    },
    MapSpec {
        name: SLOTS,
        kind: MapKind::Hash,
        key_size: size::<SlotKey>(),
        value_size: size::<Backend>(),
        max_entries: MAX_SLOTS,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: true,
    },
    MapSpec {
        name: MEMBERS,
        kind: MapKind::Hash,
        key_size: size::<MemberKey>(),
        value_size: size::<u32>(),
        max_entries: MAX_MEMBERS,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: true,
    },
    MapSpec {
        name: AFFINITY,
        kind: MapKind::LruHash,
        key_size: size::<AffinityKey>(),
        value_size: size::<Affinity>(),
        max_entries: MAX_AFFINITY,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: SOCKS,
        kind: MapKind::SkStorage,
        key_size: size::<u32>(),
        value_size: size::<SockXlate>(),
        max_entries: 0,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: DGRAMS,
        kind: MapKind::SkStorage,
        key_size: size::<u32>(),
        value_size: size::<DgramXlate>(),
        max_entries: 0,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: UDP_OWNERS,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: SOCK_SLOTS,
        // The agent counts the slots held by reading the owners through a mapping.
        flags: BPF_F_MMAPABLE,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: UDP_SOCKS,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<DgramXlate>(),
        max_entries: SOCK_SLOTS,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: TCP_OWNERS,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: SOCK_SLOTS,
        // As UDP_OWNERS: read through a mapping.
        flags: BPF_F_MMAPABLE,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: TCP_SOCKS,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<SockXlate>(),
        max_entries: SOCK_SLOTS,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: REVNAT,
        kind: MapKind::LruHash,
        key_size: size::<RevNatKey>(),
        value_size: size::<RevNat>(),
        max_entries: MAX_REVNAT,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: UDP_FLOWS,
        kind: MapKind::LruHash,
        key_size: size::<UdpFlowKey>(),
        value_size: size::<Backend>(),
        max_entries: MAX_UDP_FLOWS,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: REVERSE,
        kind: MapKind::Hash,
        key_size: size::<FrontendKey>(),
        value_size: size::<Reverse>(),
        max_entries: MAX_REVERSE,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: REVERSE_FILTER,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: REVERSE_FILTER_WORDS,
        flags: 0,
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: STATS,
        kind: MapKind::PerCpuArray,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: crate::stats::COUNT,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
    MapSpec {
        name: META,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<u32>(),
        max_entries: META_LEN,
        flags: 0,
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: crate::nat::CT,
        kind: MapKind::LruHash,
        key_size: size::<crate::nat::CtKey>(),
        value_size: size::<crate::nat::CtEntry>(),
        max_entries: crate::nat::MAX_CT,
        flags: BPF_F_NO_COMMON_LRU,
        agent_writes: false,
        sized_by_agent: true,
    },
    MapSpec {
        name: crate::nat::CT4,
        kind: MapKind::LruHash,
        key_size: size::<crate::nat::CtKey4>(),
        value_size: size::<crate::nat::CtEntry>(),
        max_entries: crate::nat::MAX_CT,
        flags: BPF_F_NO_COMMON_LRU,
        agent_writes: false,
        sized_by_agent: true,
    },
    MapSpec {
        name: crate::nat::CT_FORWARD,
        kind: MapKind::Array,
        key_size: size::<u32>(),
        value_size: size::<u32>(),
        // The buckets, then the agent's CT_FORWARD_CONSISTENT mark.
        max_entries: crate::nat::CT_FORWARD_BUCKETS + 1,
        flags: 0,
        // Its mark at every start; every bucket to 1 on an upgrade or when the buckets may
        // miss forward entries of LB_CT (kernel/ct_forward.rs).
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: crate::nat::SRC_RANGES,
        kind: MapKind::LpmTrie,
        // The trie's key: a u32 prefix length before the data.
        key_size: size::<u32>() + size::<crate::nat::SrcRangeKey>(),
        value_size: size::<u32>(),
        max_entries: crate::nat::MAX_SRC_RANGES,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: crate::maglev::MAGLEV,
        kind: MapKind::Hash,
        key_size: size::<crate::maglev::MaglevKey>(),
        value_size: size::<crate::maglev::MaglevChunk>(),
        max_entries: crate::maglev::MAX_CHUNKS,
        flags: BPF_F_NO_PREALLOC,
        agent_writes: true,
        sized_by_agent: false,
    },
    MapSpec {
        name: crate::ns_affinity::NS_AFFINITY,
        kind: MapKind::LruHash,
        key_size: size::<crate::ns_affinity::NsAffinityKey>(),
        value_size: size::<crate::ns_affinity::NsAffinity>(),
        max_entries: crate::ns_affinity::MAX_NS_AFFINITY,
        flags: 0,
        agent_writes: false,
        sized_by_agent: false,
    },
];

#[cfg(feature = "user")]
mod pod {
    use super::{
        Affinity, AffinityKey, Backend, DgramXlate, Frontend, FrontendKey, MemberKey, RevNat,
        RevNatKey, Reverse, SlotKey, SockFlow, SockXlate, UdpFlowKey,
    };

    // SAFETY: all of these are #[repr(C)], made of integers only, with every padding byte an
    // explicit field (checked by the size assertions above): any bit pattern is valid.
    unsafe impl aya::Pod for FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Frontend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Affinity {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UdpFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockXlate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DgramXlate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Reverse {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        for spec in SPECS {
            assert!(spec.name.len() <= 15, "{} is too long", spec.name);
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in SPECS.iter().enumerate() {
            for b in &SPECS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
        }
    }

    /// Pod addresses of a /16 on one port, and one address on many ports, spread over the
    /// filter's bits: a miss to an address without an entry finds its bit clear nearly
    /// always while entries are few.
    #[test]
    fn reverse_filter_bits_spread() {
        let bits = |keys: &mut dyn Iterator<Item = (Addr, u16)>| {
            let mut words = [0u64; REVERSE_FILTER_WORDS as usize];
            let (mut n, mut distinct) = (0, 0);
            for (addr, port) in keys {
                let bit = reverse_filter_bit(&addr, port);
                let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
                if words[word] & mask == 0 {
                    distinct += 1;
                }
                words[word] |= mask;
                n += 1;
            }
            (n, distinct)
        };
        let v4 = |a: u8, b: u8| Addr::from_v4_octets([10, 244, a, b]);
        let (n, distinct) = bits(
            &mut (0..=255u8).flat_map(|a| (0..=255u8).map(move |b| (v4(a, b), 8080u16.to_be()))),
        );
        // Expected distinct bits for 65 536 random keys in 2^21 bits: about 64 525.
        assert!(distinct > n * 97 / 100, "{distinct} of {n}");
        let (n, distinct) = bits(&mut (1..=10_000u16).map(|p| (v4(1, 1), p.to_be())));
        assert!(distinct > n * 99 / 100, "{distinct} of {n}");
    }
}
