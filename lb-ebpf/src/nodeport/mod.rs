//! North-south datapath: packets from outside the node to NodePorts, externalIPs and
//! LoadBalancer IPs, translated per packet.
//!
//! - [`xdp`] runs on each `--xdp-iface` at ingress: parses the packet, finds an external
//!   frontend, keeps each flow on one backend through the connection-tracking maps ([`ct`]) and
//!   rewrites the destination (DNAT) with incremental checksum updates; then hands the packet
//!   to the stack, which routes it to the pod. A backend on another node also gets SNAT to
//!   this node's address and an allocated port, and XDP sends the packet out itself (FIB
//!   lookup, `bpf_redirect`); the backend's reply comes back through XDP too.
//! - [`tc`] runs at egress of the same interface: a backend's reply leaves through the stack
//!   (XDP never sees it), and gets the frontend back as its source there.
//!
//! Everything that is not for an external frontend passes untouched after one hash lookup
//! (or none, for what is not TCP/UDP over IP).

pub mod ct;
pub mod events;
pub mod icmp;
pub mod parse;
pub mod select;
pub mod src_range;
pub mod tc;
pub mod xdp;

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray},
};
use lb_common::{
    Addr,
    maps::{BPF_F_NO_PREALLOC, Backend, MemberKey},
    nat::{
        CT_DIR_CLIENT, CT_DIR_IN, CT_DIR_REPLY, CT_FORWARD_BUCKETS, CtEntry, CtKey, MAX_SRC_RANGES,
        SrcRangeKey, ct_forward_bucket,
    },
};

use crate::maps::LB_MEMBERS;

/// Which frontends may have forward entries in `LB_CT` (`lb_common::nat::ct_forward_bucket`
/// has the protocol): a bucket becomes 1 here before XDP stores a forward entry; the agent
/// sets them all where they may miss entries (`lb_common::nat::CT_FORWARD_CONSISTENT`). One
/// more index after the buckets holds the agent's mark.
#[map]
pub static LB_CT_FWD: Array<u32> = Array::pinned(CT_FORWARD_BUCKETS + 1, 0);

/// The `LB_CT_FWD` bucket of the frontend `flow` is sent to.
#[inline(always)]
fn forward_bucket(flow: &Flow) -> Option<*mut u32> {
    LB_CT_FWD.get_ptr_mut(ct_forward_bucket(&flow.dst, flow.dport, flow.proto))
}

/// Whether `LB_CT` may hold a forward entry ([`CT_DIR_IN`]) of a flow to the frontend `flow`
/// is sent to: its bucket is not 0 (or cannot be read).
#[inline(always)]
pub fn may_have_forward(flow: &Flow) -> bool {
    // SAFETY: a u32 in the array's value, read once.
    forward_bucket(flow).is_none_or(|p| unsafe { p.read_volatile() } != 0)
}

/// Records that a forward entry of a flow to the frontend `flow` is sent to is about to be
/// stored (before the store: a packet that finds the entry finds the bucket set).
#[inline(always)]
pub fn mark_forward(flow: &Flow) {
    if let Some(p) = forward_bucket(flow) {
        // SAFETY: as above; every writer stores the same value, so a plain store is enough.
        unsafe {
            if p.read_volatile() == 0 {
                p.write_volatile(1);
            }
        }
    }
}

/// Source ranges of LoadBalancer IPs (`lb_common::nat::SRC_RANGES`); written by the agent.
#[map]
pub static LB_SRC_RANGES: LpmTrie<SrcRangeKey, u32> =
    LpmTrie::pinned(MAX_SRC_RANGES, BPF_F_NO_PREALLOC);

/// Per-CPU working space of the XDP program: its larger values live here instead of on the
/// 512-byte BPF stack. Not pinned and not shared with the agent (no agreement to keep).
pub struct Scratch {
    /// `bpf_fib_lookup` parameters and results.
    pub fib: bpf_fib_lookup,
    /// The forward entry of the packet's flow (found or being created).
    pub entry: CtEntry,
    /// The reply entry of a flow being created.
    pub reply: CtEntry,
    /// The reply key of a flow being created.
    pub rkey: CtKey,
    /// The forward key of the packet's flow.
    pub ikey: CtKey,
    /// `bpf_ktime_get_coarse_ns()` when the packet arrived.
    pub now: u64,
}

/// One [`Scratch`] per CPU.
#[map]
pub static LB_NAT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The parsed packet, handed from the XDP parser to the translation through map memory (see
/// `xdp::translate`); one per CPU, not pinned.
#[map]
pub static LB_NAT_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// A parsed TCP/UDP packet: addresses and ports as they are in the packet (network order),
/// and where its headers are.
#[derive(Clone, Copy)]
pub struct Flow {
    pub v6: bool,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// The connection-tracking key of this packet in direction `dir`.
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check(&self) -> usize {
        self.l4
            + if self.proto == lb_common::maps::IPPROTO_TCP {
                16
            } else {
                6
            }
    }
}

/// The key of the reply entry for a client flow `flow` sent to `backend`.
#[inline(always)]
pub fn reply_key(flow: &Flow, backend: &Backend) -> CtKey {
    CtKey {
        src: backend.addr,
        dst: flow.src,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// Whether `backend` still belongs to frontend `id`.
#[inline(always)]
pub fn is_member(id: u32, backend: &Backend) -> bool {
    let key = MemberKey {
        id,
        backend: *backend,
    };
    LB_MEMBERS.get_ptr(&key).is_some()
}

/// Sets `seen` of the entry under `key` (the other direction of a flow whose entry was just
/// refreshed) to `now`, if it exists: either direction's packets keep the whole flow alive.
#[inline(always)]
pub fn touch(key: &CtKey, now: u64) {
    if let Some(p) = ct::get(key) {
        // SAFETY: a pointer into the map's value; a racing writer stores a timestamp too.
        unsafe { (*p).seen = now };
    }
}

/// Copies the conntrack entry at `src` (a map value) into `dst`, eight bytes at a time. A
/// plain `*dst = *src` between a map value and scratch memory compiles to a call of
/// `memmove`, a byte loop of about 450 instructions for the 56 bytes, on every tracked
/// packet.
#[inline(always)]
pub fn load_entry(dst: &mut CtEntry, src: *const CtEntry) {
    const WORDS: usize = size_of::<CtEntry>() / 8;
    let from = src.cast::<u64>();
    let to = core::ptr::from_mut(dst).cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: `CtEntry` is 56 bytes with 8-byte alignment (it holds a u64), so both hold
        // `WORDS` aligned u64s; `src` points into a map value of that size. Volatile: LLVM
        // would merge the loads back into a `memmove` call.
        unsafe { to.add(i).write(from.add(i).read_volatile()) };
    }
}

/// Sets `key` to the client key (`lb_common::nat::client_key`) of client `addr`:`port` over
/// `proto`, field by field: the key built whole would be zeroed by a call of `memset` (a
/// byte loop) on the stack and then copied.
#[inline(always)]
pub fn set_client_key(key: &mut CtKey, addr: Addr, port: u16, proto: u8) {
    key.src = addr;
    let dst = (&raw mut key.dst.0).cast::<u32>();
    for i in 0..4 {
        // SAFETY: the four words of `key.dst`. Volatile: LLVM would merge the stores back
        // into a `memset` call.
        unsafe { dst.add(i).write_volatile(0) };
    }
    key.sport = port;
    key.dport = 0;
    key.proto = proto;
    key.dir = CT_DIR_CLIENT;
    key._pad = [0; 2];
}

/// The forward key for `flow` (client to frontend).
#[inline(always)]
pub fn in_key(flow: &Flow) -> CtKey {
    flow.ct_key(CT_DIR_IN)
}
