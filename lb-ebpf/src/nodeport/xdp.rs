//! XDP at ingress of an `--xdp-iface`: external frontends to backends on this node.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    Addr, csum,
    maps::{Backend, Frontend, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, META_MEMBER_EPOCH, SlotKey},
    nat::{
        CT_CLOSING, CT_DIR_CLIENT, CT_DIR_IN, CT_DIR_REPLY, CT_FIN_CLIENT, CT_REFRESH_NS, CT_SNAT,
        CtEntry, EXT_SLOT_BASE, FRONTEND_ETP_LOCAL, FRONTEND_EXTERNAL, SNAT_PORT_MIN, SNAT_TRIES,
        ct_closing_seen, ct_expired, ct_flags_after, snat_port,
    },
    stats,
};

use super::{
    Flow, LB_NAT_FLOW, LB_NAT_SCRATCH, Scratch, ct, events, in_key, is_member, load_entry,
    mark_forward, may_have_forward,
    parse::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, Skip, TCP_HLEN, UDP_HLEN, VLAN_HLEN, ext_walk,
        is_ext,
    },
    reply_key, set_client_key, src_range, touch,
};
use crate::maps::{LB_FRONTENDS, LB_META, LB_SLOTS, count};

/// The program's verdict on a packet, and the counter that says why (if any).
struct Verdict {
    action: u32,
    stat: Option<u32>,
}

const fn pass(stat: Option<u32>) -> Verdict {
    Verdict {
        action: xdp_action::XDP_PASS,
        stat,
    }
}

const fn drop(stat: u32) -> Verdict {
    Verdict {
        action: xdp_action::XDP_DROP,
        stat: Some(stat),
    }
}

/// The XDP entry point's work: the action for this packet.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    let Some(f) = LB_NAT_FLOW.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch value, used by this program run only (an XDP run is not
    // preempted by another on the same CPU).
    let flow = unsafe { &mut *f };
    let verdict = match parse(ctx, flow) {
        Ok(()) => {
            if flow.l3 > ETH_HLEN + VLAN_HLEN || flow.l4 > MAX_L4_OFF {
                pass(Some(stats::XDP_PASS_MALFORMED))
            } else {
                // Looked up here, before any other call: a packet to no frontend and to no
                // allocated SNAT port (everything but replies of SNAT'd flows) leaves at once.
                let key = FrontendKey {
                    addr: flow.dst,
                    port: flow.dport,
                    proto: flow.proto,
                    _pad: 0,
                };
                match LB_FRONTENDS.get_ptr(&key) {
                    Some(frontend) => translate(ctx, flow, frontend),
                    None if u16::from_be(flow.dport) < SNAT_PORT_MIN => {
                        return xdp_action::XDP_PASS;
                    }
                    // A call of its own (not inlined like `translate`): the chain through
                    // `reply` and `rewrite` must fit beside the entry's frame.
                    None => reply(ctx, flow),
                }
            }
        }
        Err(Skip::Icmp) => return super::icmp::xdp_error(ctx, flow),
        Err(Skip::Other) => pass(None),
        Err(Skip::Fragment) => pass(Some(stats::XDP_PASS_FRAGMENT)),
        Err(Skip::Malformed) => pass(Some(stats::XDP_PASS_MALFORMED)),
    };
    if let Some(stat) = verdict.stat {
        count(stat);
    }
    verdict.action
}

/// A pointer to `N` bytes at `off`, if the packet holds them.
#[inline(always)]
pub(super) fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    // Offsets read back from map memory (`LB_NAT_FLOW`) are unknown to the verifier: bound
    // them before the pointer arithmetic.
    if off > MAX_OFF {
        return None;
    }
    // Volatile: LLVM would otherwise hoist these loads into the callers of the BPF-to-BPF
    // functions and pass plain integers, on which the verifier refuses pointer arithmetic.
    // SAFETY: the context pointer the program was called with.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + off + N > end {
        return None;
    }
    Some((start + off) as *mut [u8; N])
}

/// Reads `N` bytes at `off`.
#[inline(always)]
pub(super) fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u8; N], Skip> {
    let p = bytes::<N>(ctx, off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds-checked against data_end just above; byte arrays have no alignment.
    Ok(unsafe { *p })
}

/// Writes `N` bytes at `off` (which [`parse`] has already checked).
#[inline(always)]
pub(super) fn write<const N: usize>(
    ctx: &XdpContext,
    off: usize,
    value: [u8; N],
) -> Result<(), Skip> {
    let p = bytes::<N>(ctx, off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds-checked against data_end just above.
    unsafe { *p = value };
    Ok(())
}

/// Ethernet (+ one VLAN tag), IPv4 (options; fragments skipped) or IPv6 (up to
/// [`MAX_EXT_HEADERS`] extension headers; fragments skipped), then the TCP or UDP ports,
/// into `out`.
///
/// Header fields are read through one bounds-checked pointer per header, not copied: a copy
/// of the IPv6 header would take 40 bytes of the entry's frame (and the addresses 32 more),
/// and every byte of that frame counts against the 512 bytes of each call chain below it.
// Inlined into the entry function (see `translate`); reading in place keeps its share of the
// entry's frame at 8 bytes.
#[inline(always)]
fn parse(ctx: &XdpContext, out: &mut Flow) -> Result<(), Skip> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(read::<2>(ctx, 12).map_err(|_| Skip::Other)?);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be_bytes(read::<2>(ctx, ETH_HLEN + 2).map_err(|_| Skip::Other)?);
        l3 += VLAN_HLEN;
    }
    let (v6, proto, l4) = match ethertype {
        ETH_P_IP => {
            let h = bytes::<IPV4_HLEN>(ctx, l3).ok_or(Skip::Malformed)?;
            // SAFETY: bounds-checked against data_end by `bytes`; byte arrays have no
            // alignment, and the words are read unaligned.
            let (vihl, proto, frag, src, dst) = unsafe {
                let h = h.cast::<u8>();
                (
                    *h,
                    *h.add(9),
                    u16::from_be_bytes([*h.add(6), *h.add(7)]),
                    h.add(12).cast::<u32>().read_unaligned(),
                    h.add(16).cast::<u32>().read_unaligned(),
                )
            };
            if vihl >> 4 != 4 {
                return Err(Skip::Malformed);
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < IPV4_HLEN {
                return Err(Skip::Malformed);
            }
            let icmp = proto == IPPROTO_ICMP;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP && !icmp {
                return Err(Skip::Other);
            }
            if frag & (IP_MF | IP_OFFSET) != 0 {
                return Err(if icmp { Skip::Other } else { Skip::Fragment });
            }
            let src = Addr::from_v4_word(src);
            let dst = Addr::from_v4_word(dst);
            if icmp {
                return Err(icmp_found(out, false, l3, l3 + ihl, src, dst));
            }
            out.src = src;
            out.dst = dst;
            (false, proto, l3 + ihl)
        }
        ETH_P_IPV6 => {
            let h = bytes::<IPV6_HLEN>(ctx, l3).ok_or(Skip::Malformed)?;
            // SAFETY: as above.
            let (version, first) = unsafe {
                let h = h.cast::<u8>();
                (*h >> 4, *h.add(6))
            };
            if version != 6 {
                return Err(Skip::Malformed);
            }
            // SAFETY: as above; the addresses at 8 and 24, four words each.
            let (src, dst) = unsafe {
                let h = h.cast::<u8>();
                (v6_addr(h.add(8)), v6_addr(h.add(24)))
            };
            let (next, off) = ext_walk(first, l3 + IPV6_HLEN, |off| read::<2>(ctx, off).ok())?;
            if is_ext(next) {
                return Err(Skip::Malformed);
            }
            if next == IPPROTO_ICMPV6 {
                return Err(icmp_found(out, true, l3, off, src, dst));
            }
            if next != IPPROTO_TCP && next != IPPROTO_UDP {
                return Err(Skip::Other);
            }
            out.src = src;
            out.dst = dst;
            (true, next, off)
        }
        _ => return Err(Skip::Other),
    };
    let need = if proto == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    let ports = read::<4>(ctx, l4)?;
    // The whole fixed header must be there (the checksum is rewritten).
    if bytes::<1>(ctx, l4 + need - 1).is_none() {
        return Err(Skip::Malformed);
    }
    out.v6 = v6;
    out.proto = proto;
    out.l3 = l3;
    out.l4 = l4;
    out.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    out.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    Ok(())
}

/// The IPv6 address at `p` (16 bytes in network order) as an [`Addr`], read as four
/// unaligned words (the BPF backend emits them as byte loads and shifts: no alignment is
/// assumed on any architecture).
///
/// # Safety
/// `p` points at 16 readable bytes.
#[inline(always)]
unsafe fn v6_addr(p: *const u8) -> Addr {
    let w = p.cast::<u32>();
    // SAFETY: the caller's 16 bytes; unaligned reads. Each word keeps the packet's byte
    // order, as `Addr::from_v6_octets` builds it.
    unsafe {
        Addr::from_v6_words([
            w.read_unaligned(),
            w.add(1).read_unaligned(),
            w.add(2).read_unaligned(),
            w.add(3).read_unaligned(),
        ])
    }
}

/// Records an ICMP/ICMPv6 packet's outer header in `out` for `icmp::xdp_error`.
#[inline(always)]
fn icmp_found(out: &mut Flow, v6: bool, l3: usize, l4: usize, src: Addr, dst: Addr) -> Skip {
    out.v6 = v6;
    out.proto = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    out.l3 = l3;
    out.l4 = l4;
    out.src = src;
    out.dst = dst;
    out.sport = 0;
    out.dport = 0;
    Skip::Icmp
}

/// TCP flags byte: SYN, ACK (FIN and RST: `lb_common::nat`).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Address families for `bpf_fib_lookup`.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The member epoch (`lb_common::maps::META_MEMBER_EPOCH`) as the agent last wrote it.
#[inline(always)]
fn member_epoch() -> u32 {
    LB_META
        .get_ptr(META_MEMBER_EPOCH)
        // SAFETY: a u32 in the map's value; volatile, so that it is read where it stands
        // (before the membership lookup or the slot read that it guards).
        .map_or(0, |p| unsafe { core::ptr::read_volatile(p) })
}

/// The clock of [`CtEntry::seen`].
#[inline(always)]
pub(super) fn now() -> u64 {
    // SAFETY: helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The TCP flags of `flow`'s packet (0 for UDP).
#[inline(always)]
fn tcp_flags(ctx: &XdpContext, flow: &Flow) -> u8 {
    if flow.proto != IPPROTO_TCP {
        return 0;
    }
    // Two bytes (data offset, flags): a one-byte bounds check compiles to a comparison the
    // verifier does not turn into a packet range.
    read::<2>(ctx, flow.l4 + 12).map_or(0, |b| b[1])
}

/// Whether an existing entry no longer stands for this packet's flow: idle past its
/// timeout, or closing (a FIN or RST from either side) and the client opens the same
/// 5-tuple again (a SYN).
#[inline(always)]
fn stale(entry: &CtEntry, proto: u8, flags: u8, now: u64) -> bool {
    ct_expired(entry.seen, now, proto, entry.flags)
        || (ct_closing_seen(entry.flags) && flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// Records this packet in its entry: a FIN sets `fin` (`CT_FIN_CLIENT` in a client entry,
/// which serves both directions; `CT_CLOSING` in an entry of one direction), an RST closes
/// the flow (`lb_common::nat::ct_flags_after`), and `seen` moves on at most once per
/// [`CT_REFRESH_NS`] (a map write per second, not per packet).
/// Returns whether `seen` moved (then the flow's other entry is touched too).
#[inline(always)]
fn refresh(entry: *mut CtEntry, old: &CtEntry, tcp: u8, fin: u8, now: u64) -> bool {
    let flags = ct_flags_after(old.flags, tcp, fin);
    let changed = flags != old.flags;
    if changed || now.saturating_sub(old.seen) > CT_REFRESH_NS {
        // SAFETY: a pointer into the map's value; concurrent writers store the same kind of
        // value (a racing refresh loses one timestamp, never the entry). `flags` is written
        // only when it changes: tc egress sets `CT_FIN_BACKEND` in the same byte, and a
        // refresh writing back its older copy could drop that bit (the flow would then keep
        // the established timeout, as half-closed: longer, never a lost translation).
        unsafe {
            if changed {
                (*entry).flags = flags;
            }
            (*entry).seen = now;
        }
        return true;
    }
    false
}

/// The reply key of the flow of `flow` (client side) with forward entry `s.entry`, into
/// `s.rkey`.
#[inline(always)]
fn set_reply_key(flow: &Flow, s: &mut Scratch) {
    let backend = Backend::new(s.entry.addr, s.entry.port);
    s.rkey = reply_key(flow, &backend);
    if s.entry.flags & CT_SNAT != 0 {
        s.rkey.dst = s.entry.nat_addr;
        s.rkey.dport = s.entry.nat_port;
    }
}

/// Touches the reply entry of the flow of `flow` with forward entry `s.entry` (its `seen`
/// becomes `s.now`).
// A BPF-to-BPF call of its own: the entry's frame (with `translate` in it) is near the limit
// of the call chain's 512 bytes (its key would be built on that stack).
#[inline(never)]
fn touch_reply(flow: &Flow, s: &mut Scratch) {
    set_reply_key(flow, s);
    touch(&s.rkey, s.now);
}

/// Touches the forward entry (client to frontend) of the SNAT'd flow whose reply entry is
/// `s.entry`.
// A BPF-to-BPF call of its own: `reply`'s frame is on the longest call chain.
#[inline(never)]
fn touch_forward(proto: u8, s: &mut Scratch) {
    // Field by field: a whole-struct literal would be built on the stack first.
    s.ikey.src = s.entry.nat_addr;
    s.ikey.dst = s.entry.addr;
    s.ikey.sport = s.entry.nat_port;
    s.ikey.dport = s.entry.port;
    s.ikey.proto = proto;
    s.ikey.dir = CT_DIR_IN;
    s.ikey._pad = [0; 2];
    touch(&s.ikey, s.now);
}

/// Removes the entries of the flow of `flow` (client side) with forward entry `s.entry`
/// under `s.ikey`: a client entry is the flow's only one, a forward entry has a reply entry
/// (its key is built in `s.rkey`).
#[inline(always)]
fn remove_flow(flow: &Flow, s: &mut Scratch) {
    if s.ikey.dir != CT_DIR_CLIENT {
        set_reply_key(flow, s);
        ct::remove(&s.rkey);
    }
    ct::remove(&s.ikey);
}

/// The entry of the flow of `flow` (client side), its key left in `s.ikey`: the client entry
/// ([`CT_DIR_CLIENT`]) if it is this flow's (its frontend is the packet's destination), else
/// the forward entry ([`CT_DIR_IN`]: an SNAT'd flow, a second flow of the client's port, or
/// a flow of layout 4).
///
/// `opening`: the packet opens a TCP connection (SYN without ACK) to a frontend without
/// backends on other nodes. Without a client entry it is a new flow, and the forward key is
/// not looked up (a cache-cold miss in a large map, a quarter of a new flow's cost): such a
/// forward entry of the same 5-tuple can only be a second flow of the client's port whose
/// holder has ended or a flow of layout 4, caught in its handshake (a retransmitted SYN,
/// which may go to another backend: the first one's SYN-ACK never reached the client), or a
/// closed flow opened again. Any other packet looks the forward key up only if the
/// frontend's `LB_CT_FWD` bucket says such entries may exist (`lb_common::nat::ct_forward_bucket`).
#[inline(always)]
fn lookup_flow(flow: &Flow, s: &mut Scratch, opening: bool) -> Option<*mut CtEntry> {
    set_client_key(&mut s.ikey, flow.src, flow.sport, flow.proto);
    match ct::get(&s.ikey) {
        Some(p) => {
            // SAFETY: fields read once from the map value.
            let (addr, port) = unsafe { ((*p).nat_addr, (*p).nat_port) };
            if addr == flow.dst && port == flow.dport {
                return Some(p);
            }
        }
        None if opening => return None,
        None => {}
    }
    // No forward entry of a flow to this frontend was ever stored: the forward key would
    // miss too (a second cold lookup on every new UDP flow).
    if !may_have_forward(flow) {
        return None;
    }
    s.ikey = in_key(flow);
    ct::get(&s.ikey)
}

/// Offsets above this are not translated (IPv6 extension headers of more than 16 KiB).
pub(super) const MAX_L4_OFF: usize = 0x4000;
/// Largest offset [`bytes`] accepts.
const MAX_OFF: usize = MAX_L4_OFF + 64;

/// A packet (`flow`) to `frontend` (a value of `LB_FRONTENDS`) goes to its flow's backend if
/// the frontend is external, to a new one if it has none yet.
///
/// The parsed flow comes through map memory on purpose: the verifier then sees its offsets
/// as one bounded range instead of one state per path through the parser (IPv4 options,
/// VLAN, IPv6 extension headers), and verifies what follows once instead of per path. With
/// `parse` inlined into the same function this holds because the map lookups and helper
/// calls between them make LLVM read `l3`/`l4` back from `LB_NAT_FLOW` rather than keep
/// `parse`'s registers (check the object when moving code between them: a refused or much
/// longer verification is the symptom).
// Inlined into the entry function: a BPF-to-BPF call costs about 8 ns on an established
// flow's packet here (measured: three empty calls added 26 ns), as every return of the JIT'd
// code goes through the kernel's return thunk (`spec_rstack_overflow: Safe RET` on this AMD
// EPYC), which mispredicts it.
#[inline(always)]
fn translate(ctx: &XdpContext, flow: &Flow, frontend: *const Frontend) -> Verdict {
    // SAFETY: a map value, copied out at once; the agent replaces values whole.
    let frontend = unsafe { *frontend };
    if frontend.flags & FRONTEND_EXTERNAL == 0 {
        return pass(None);
    }
    let Some(s) = LB_NAT_SCRATCH.get_ptr_mut(0) else {
        return pass(None);
    };
    // SAFETY: as for `flow` in `ingress`.
    let s = unsafe { &mut *s };
    let now = now();
    s.now = now;
    let tcp = tcp_flags(ctx, flow);
    let mut stat = stats::XDP_TRACKED;
    let mut tracked = false;
    // SNAT'd flows have forward entries only: a SYN to a frontend with remote backends may
    // be a retransmission of one (its SYN-ACK late rather than lost).
    let opening = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN && frontend.ext_local >= frontend.ext_count;
    if let Some(p) = lookup_flow(flow, s, opening) {
        // Copied out at once.
        load_entry(&mut s.entry, p);
        if stale(&s.entry, flow.proto, tcp, now) {
            remove_flow(flow, s);
            count(stats::XDP_CT_EXPIRED);
        } else {
            let client = s.ikey.dir == CT_DIR_CLIENT;
            let fin = if client { CT_FIN_CLIENT } else { CT_CLOSING };
            if refresh(p, &s.entry, tcp, fin, now) && !client {
                touch_reply(flow, s);
            }
            tracked = true;
        }
    }
    if tracked {
        // Read before the membership: a deletion after this read moves the epoch again.
        let epoch = member_epoch();
        if s.entry.epoch != epoch && !still_member(flow, s, epoch) {
            return drop(stats::XDP_DROP_STALE);
        }
    } else {
        if !src_range::admits(&frontend, &flow.src) {
            return drop(stats::XDP_DROP_SOURCE_RANGE);
        }
        if let Err(verdict) = new_flow(ctx, flow, &frontend, s) {
            return verdict;
        }
        stat = if s.entry.flags & CT_SNAT != 0 {
            stats::XDP_NEW_FLOW_SNAT
        } else {
            stats::XDP_NEW_FLOW
        };
    }
    let snat = s.entry.flags & CT_SNAT != 0;
    let rewritten = if snat {
        rewrite(ctx, flow, NAT_BOTH, s)
    } else if flow.v6 {
        rewrite(ctx, flow, NAT_DST, s)
    } else {
        rewrite_v4_dst(ctx, flow, s)
    };
    if rewritten.is_err() {
        events::rewrite_failed(ctx, flow.l4 as u32);
        return pass(Some(stats::XDP_PASS_MALFORMED));
    }
    if !snat {
        return pass(Some(stat));
    }
    count(stat);
    forward(ctx, flow, false, s)
}

/// Whether the backend of the tracked flow of `flow` (forward entry `s.entry` under key
/// `s.ikey`) is still a member of its frontend, looked up because the member epoch moved to
/// `epoch` since the entry was stamped: if so the entry gets `epoch`, else the flow ends here
/// (the backend left the Service) and its entries go, so that a new flow on the same ports
/// starts afresh.
// A BPF-to-BPF call of its own: the entry's frame is on the longest call chain, and this
// runs only after a backend left some Service.
#[inline(never)]
fn still_member(flow: &Flow, s: &mut Scratch, epoch: u32) -> bool {
    let backend = Backend::new(s.entry.addr, s.entry.port);
    if !is_member(s.entry.id, &backend) {
        remove_flow(flow, s);
        return false;
    }
    if let Some(p) = ct::get(&s.ikey) {
        // SAFETY: a pointer into the map's value (a racing stamp stores an epoch too).
        unsafe { (*p).epoch = epoch };
    }
    true
}

/// A backend's reply to an SNAT'd flow (to this node's address and an allocated port) gets
/// the frontend as source and the client as destination, and goes back out.
// A BPF-to-BPF call of its own: inlined, its locals would share one 512-byte frame with
// everything else and overflow it.
#[inline(never)]
fn reply(ctx: &XdpContext, flow: &Flow) -> Verdict {
    // Allocated ports only: everything else misses here without a map lookup.
    if u16::from_be(flow.dport) < SNAT_PORT_MIN {
        return pass(None);
    }
    let Some(s) = LB_NAT_SCRATCH.get_ptr_mut(0) else {
        return pass(None);
    };
    // SAFETY: as for `flow` in `ingress`.
    let s = unsafe { &mut *s };
    let key = flow.ct_key(CT_DIR_REPLY);
    let Some(p) = ct::get(&key) else {
        return pass(None);
    };
    // Copied out at once.
    load_entry(&mut s.entry, p);
    let now = now();
    if s.entry.flags & CT_SNAT == 0 || ct_expired(s.entry.seen, now, flow.proto, s.entry.flags) {
        return pass(None);
    }
    if refresh(p, &s.entry, tcp_flags(ctx, flow), CT_CLOSING, now) {
        s.now = now;
        touch_forward(flow.proto, s);
    }
    count(stats::XDP_REPLY_XLATED);
    if rewrite(ctx, flow, NAT_REPLY, s).is_err() {
        events::rewrite_failed(ctx, flow.l4 as u32);
        return pass(Some(stats::XDP_PASS_MALFORMED));
    }
    forward(ctx, flow, true, s)
}

/// Fills `p` with `bpf_fib_lookup` parameters for a packet of `flow` from `src` to `dst`.
#[inline(always)]
fn fib_params(
    ctx: &XdpContext,
    flow: &Flow,
    src: Addr,
    dst: Addr,
    p: &mut bpf_fib_lookup,
) -> Option<()> {
    // SAFETY: a plain C struct of integers and unions of integers; all zero is valid.
    *p = unsafe { core::mem::zeroed() };
    p.l4_protocol = flow.proto;
    // SAFETY: the context pointer the program was called with.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if flow.v6 {
        let len = u16::from_be_bytes(read::<2>(ctx, flow.l3 + 4).ok()?);
        p.family = AF_INET6;
        p.__bindgen_anon_1.tot_len = len.wrapping_add(IPV6_HLEN as u16);
        p.__bindgen_anon_3.ipv6_src = src.0;
        p.__bindgen_anon_4.ipv6_dst = dst.0;
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_1.tot_len = u16::from_be_bytes(read::<2>(ctx, flow.l3 + 2).ok()?);
        p.__bindgen_anon_3.ipv4_src = src.v4_word();
        p.__bindgen_anon_4.ipv4_dst = dst.v4_word();
    }
    Some(())
}

/// Sends the translated packet of flow entry `s.entry` (a `reply` or forward packet) out by
/// the kernel's FIB: its route, its neighbour's MAC, `bpf_redirect`. Without a resolved
/// neighbour (or behind a VLAN tag) the stack takes it.
// A BPF-to-BPF call of its own (see `reply`); at most five arguments.
#[inline(never)]
fn forward(ctx: &XdpContext, flow: &Flow, reply: bool, s: &mut Scratch) -> Verdict {
    if flow.l3 != ETH_HLEN {
        return pass(Some(stats::XDP_PASS_NO_NEIGH));
    }
    let (src, dst) = if reply {
        (s.entry.addr, s.entry.nat_addr)
    } else {
        (s.entry.nat_addr, s.entry.addr)
    };
    if fib_params(ctx, flow, src, dst, &mut s.fib).is_none() {
        return pass(Some(stats::XDP_PASS_MALFORMED));
    }
    // SAFETY: the XDP context and a parameter struct of the size passed.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &raw mut s.fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if write::<6>(ctx, 0, s.fib.dmac).is_err() || write::<6>(ctx, 6, s.fib.smac).is_err() {
                return pass(Some(stats::XDP_PASS_MALFORMED));
            }
            // SAFETY: helper call with plain arguments.
            let action = unsafe { bpf_redirect(s.fib.ifindex, 0) } as u32;
            Verdict {
                action,
                stat: Some(stats::XDP_REDIRECT),
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => pass(Some(stats::XDP_PASS_NO_NEIGH)),
        _ => {
            events::fib_failed(ctx, ret as u32);
            pass(Some(stats::XDP_ERR_FIB))
        }
    }
}

/// [`forward`] for a translated ICMP error (`icmp::xdp_error`): the action, its reason
/// counted.
#[inline(always)]
pub(super) fn forward_verdict(ctx: &XdpContext, flow: &Flow, reply: bool, s: &mut Scratch) -> u32 {
    let verdict = forward(ctx, flow, reply, s);
    if let Some(stat) = verdict.stat {
        count(stat);
    }
    verdict.action
}

/// This node's address for packets to `dst`, as the route chooses it (`BPF_FIB_LOOKUP_SRC`:
/// the route's preferred source, else the outgoing device's address).
// A BPF-to-BPF call of its own (see `reply`).
#[inline(never)]
fn node_addr(ctx: &XdpContext, flow: &Flow, dst: Addr, s: &mut Scratch) -> Option<Addr> {
    fib_params(ctx, flow, Addr::default(), dst, &mut s.fib)?;
    // SAFETY: as in `forward`.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &raw mut s.fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if ret != 0 {
        events::fib_failed(ctx, ret as u32);
        return None;
    }
    // SAFETY: the helper filled the member of the family it was given.
    let addr = unsafe {
        if flow.v6 {
            Addr(s.fib.__bindgen_anon_3.ipv6_src)
        } else {
            Addr::from_v4_word(s.fib.__bindgen_anon_3.ipv4_src)
        }
    };
    Some(addr)
}

/// Finds a free SNAT port for the reply entry `s.reply` under key `s.rkey` (whose `dport` it
/// sets) and stores the entry: an insert that fails while a live flow holds the port, tried
/// at up to [`SNAT_TRIES`] ports.
// A BPF-to-BPF call of its own: the verifier walks the loop once here.
#[inline(never)]
fn alloc_port(s: &mut Scratch, proto: u8, now: u64) -> bool {
    // SAFETY: helper call without arguments.
    let draw = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_TRIES {
        s.rkey.dport = snat_port(draw, i).to_be();
        if ct::insert(&s.rkey, &s.reply, u64::from(BPF_NOEXIST)).is_ok() {
            return true;
        }
        // A port held by a flow that has ended is free.
        if let Some(old) = ct::get(&s.rkey) {
            // SAFETY: fields read once from the map value.
            let (seen, flags) = unsafe { ((*old).seen, (*old).flags) };
            if ct_expired(seen, now, proto, flags) && ct::insert(&s.rkey, &s.reply, 0).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Chooses a backend for a new flow and records the flow in `s.entry` and the map: a backend
/// on this node as it is (one client entry, or a forward and a reply entry when another flow
/// holds the client's), one on another node with SNAT to this node's address and a free port
/// (a forward and a reply entry).
// A BPF-to-BPF call of its own (see `reply`).
#[inline(never)]
fn new_flow(
    ctx: &XdpContext,
    flow: &Flow,
    frontend: &Frontend,
    s: &mut Scratch,
) -> Result<(), Verdict> {
    let now = s.now;
    // Before the slot is read: a backend deleted after this read moves the epoch, and the
    // flow's next packet looks its membership up. Kept in the entry at once (the fields
    // below leave it), not on this frame, which is on the longest call chain.
    s.entry.epoch = member_epoch();
    if frontend.ext_count == 0 {
        return Err(if frontend.flags & FRONTEND_ETP_LOCAL != 0 {
            drop(stats::XDP_DROP_NO_LOCAL)
        } else {
            pass(Some(stats::XDP_PASS_NO_BACKEND))
        });
    }
    let sticky = frontend.affinity_timeout_s != 0;
    let kept = if sticky {
        super::select::affinity_index(flow, frontend, now)
    } else {
        None
    };
    let index = kept.unwrap_or_else(|| super::select::external_index(flow, frontend));
    let slot = SlotKey {
        id: frontend.id,
        slot: EXT_SLOT_BASE + index,
    };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { LB_SLOTS.get(&slot) }).copied() else {
        return Err(pass(Some(stats::ERR_SLOT_MISSING)));
    };
    if sticky {
        // Refreshed by every new flow, as kube-proxy's `recent` match is.
        super::select::remember(flow, frontend, index, &backend, now);
        count(if kept.is_some() {
            stats::XDP_AFFINITY_HIT
        } else {
            stats::XDP_AFFINITY_NEW
        });
    }
    // Field by field: a whole-struct literal would be built on the stack first.
    s.entry.addr = backend.addr;
    s.entry.port = backend.port;
    s.entry.flags = 0;
    s.entry._pad = 0;
    s.entry.id = frontend.id;
    // Volatile: LLVM would merge these zero stores into a call of `memset`, a byte loop.
    let nat = (&raw mut s.entry.nat_addr.0).cast::<u32>();
    for i in 0..4 {
        // SAFETY: the four words of `nat_addr`, in the scratch value.
        unsafe { nat.add(i).write_volatile(0) };
    }
    // SAFETY: fields of the scratch value; `_pad2` follows the u16 `nat_port`, 2-aligned.
    unsafe {
        (&raw mut s.entry.nat_port).write_volatile(0);
        (&raw mut s.entry._pad2).cast::<u16>().write_volatile(0);
    }
    s.entry.seen = now;
    // This node's backends come first in the external range; the others need SNAT.
    let snat = index >= frontend.ext_local;
    if !snat && client_entry(flow, s, now) {
        return Ok(());
    }
    s.reply = s.entry;
    s.reply.epoch = 0;
    s.reply.addr = flow.dst;
    s.reply.port = flow.dport;
    s.rkey = reply_key(flow, &backend);
    if snat {
        // The forward key (`lookup_flow` leaves the client key when it skipped it).
        s.ikey = in_key(flow);
        let Some(node) = node_addr(ctx, flow, backend.addr, s) else {
            return Err(pass(Some(stats::XDP_ERR_FIB)));
        };
        s.entry.flags = CT_SNAT;
        s.entry.nat_addr = node;
        s.reply.flags = CT_SNAT;
        s.reply.nat_addr = flow.src;
        s.reply.nat_port = flow.sport;
        s.rkey.dst = node;
        if !alloc_port(s, flow.proto, now) {
            events::no_snat_port(ctx, frontend.id);
            return Err(drop(stats::XDP_DROP_NO_PORT));
        }
        s.entry.nat_port = s.rkey.dport;
    }
    // `s.ikey` is the forward key (an SNAT'd flow, or `client_entry` found the client key
    // held): readers must look it up from now on.
    mark_forward(flow);
    if ct::insert(&s.ikey, &s.entry, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU recorded this flow a moment ago: follow it.
        if snat {
            ct::remove(&s.rkey);
        }
        let Some(p) = ct::get(&s.ikey) else {
            events::ct_insert_failed(ctx, frontend.id, flow.proto);
            return Err(drop(stats::XDP_ERR_CT_UPDATE));
        };
        // Copied out at once.
        load_entry(&mut s.entry, p);
        return Ok(());
    }
    if !snat && ct::insert(&s.rkey, &s.reply, 0).is_err() {
        ct::remove(&s.ikey);
        events::ct_insert_failed(ctx, frontend.id, flow.proto);
        return Err(drop(stats::XDP_ERR_CT_UPDATE));
    }
    Ok(())
}

/// Stores the new flow of `flow` to a backend on this node (`s.entry`, without the frontend
/// yet) as its one client entry ([`CT_DIR_CLIENT`], key left in `s.ikey`), or follows the
/// entry another CPU stored for it a moment ago (into `s.entry`). False when the key is held
/// by another live flow of the client's address and port (to another frontend): the flow
/// then gets a forward and a reply entry (`s.ikey` the forward key, `s.entry` as it came).
#[inline(always)]
fn client_entry(flow: &Flow, s: &mut Scratch, now: u64) -> bool {
    s.entry.nat_addr = flow.dst;
    s.entry.nat_port = flow.dport;
    set_client_key(&mut s.ikey, flow.src, flow.sport, flow.proto);
    if ct::insert(&s.ikey, &s.entry, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    if let Some(p) = ct::get(&s.ikey) {
        // SAFETY: fields read once from the map value.
        let (addr, port, seen, flags) =
            unsafe { ((*p).nat_addr, (*p).nat_port, (*p).seen, (*p).flags) };
        if addr == flow.dst && port == flow.dport {
            // Another CPU recorded this flow a moment ago: follow it.
            load_entry(&mut s.entry, p);
            return true;
        }
        // The key's flow has ended: this one takes it over.
        if ct_expired(seen, now, flow.proto, flags)
            && ct::insert(&s.ikey, &s.entry, u64::from(BPF_ANY)).is_ok()
        {
            return true;
        }
    }
    s.entry.nat_addr = Addr::default();
    s.entry.nat_port = 0;
    s.ikey = in_key(flow);
    false
}

/// An address and port as [`rewrite_one`] reads them: by reference (in the scratch or the
/// parsed flow, both map memory), so that no 16-byte copy lands on the stack.
#[derive(Clone, Copy)]
struct Endpoint<'a> {
    addr: &'a Addr,
    port: u16,
}

/// Writes `new` over `old` (the address at `addr_off`, the port at `port_off`), folding the
/// changes into the IPv4 header checksum and the L4 checksum `l4`.
#[inline(always)]
fn rewrite_one(
    ctx: &XdpContext,
    flow: &Flow,
    old: Endpoint<'_>,
    new: Endpoint<'_>,
    (addr_off, port_off): (usize, usize),
    mut l4: u16,
) -> Result<u16, Skip> {
    if flow.v6 {
        l4 = csum::update_addr(l4, old.addr, new.addr);
        let p = bytes::<16>(ctx, addr_off)
            .ok_or(Skip::Malformed)?
            .cast::<u32>();
        for i in 0..4 {
            // SAFETY: bounds-checked against data_end by `bytes`; unaligned word stores (byte
            // stores, as the BPF backend emits them) of the address as it lies in memory
            // (network order).
            unsafe { p.add(i).write_unaligned(new.addr.0[i]) };
        }
    } else {
        let o = csum::v4_words(old.addr.v4_word());
        let n = csum::v4_words(new.addr.v4_word());
        let ip_check = u16::from_ne_bytes(read::<2>(ctx, flow.l3 + 10)?);
        write::<2>(
            ctx,
            flow.l3 + 10,
            csum::update(ip_check, &o, &n).to_ne_bytes(),
        )?;
        write::<4>(ctx, addr_off, new.addr.v4_word().to_ne_bytes())?;
        l4 = csum::update(l4, &o, &n);
    }
    l4 = csum::update(l4, &[old.port], &[new.port]);
    write::<2>(ctx, port_off, new.port.to_ne_bytes())?;
    Ok(l4)
}

/// [`rewrite`] with [`NAT_DST`] for an IPv4 packet, the common case (a flow to a backend on
/// this node), inlined into `translate`: the same words folded in the same order (so the same
/// bytes), without the BPF-to-BPF call, the other modes' branches and the IPv6 address words
/// that the general version loads.
#[inline(always)]
fn rewrite_v4_dst(ctx: &XdpContext, flow: &Flow, s: &Scratch) -> Result<(), Skip> {
    let check_off = flow.l4_check();
    let old_check = u16::from_ne_bytes(read::<2>(ctx, check_off)?);
    let o = csum::v4_words(flow.dst.v4_word());
    let n = csum::v4_words(s.entry.addr.v4_word());
    // One bounds check for the header: the checksum at 10, the destination at 16.
    let ip = bytes::<IPV4_HLEN>(ctx, flow.l3).ok_or(Skip::Malformed)?;
    // SAFETY: bounds-checked against data_end just above; byte arrays have no alignment.
    unsafe {
        let ip_check = u16::from_ne_bytes([(*ip)[10], (*ip)[11]]);
        let new_check = csum::update(ip_check, &o, &n).to_ne_bytes();
        (*ip)[10] = new_check[0];
        (*ip)[11] = new_check[1];
        let dst = s.entry.addr.v4_word().to_ne_bytes();
        (*ip)[16] = dst[0];
        (*ip)[17] = dst[1];
        (*ip)[18] = dst[2];
        (*ip)[19] = dst[3];
    }
    let mut l4 = csum::update(old_check, &o, &n);
    l4 = csum::update(l4, &[flow.dport], &[s.entry.port]);
    let ports = bytes::<4>(ctx, flow.l4).ok_or(Skip::Malformed)?;
    let port = s.entry.port.to_ne_bytes();
    // SAFETY: as above.
    unsafe {
        (*ports)[2] = port[0];
        (*ports)[3] = port[1];
    }
    if flow.proto == IPPROTO_UDP {
        if old_check == 0 {
            // No checksum (IPv4 UDP may send none): it stays none.
            return Ok(());
        }
        if l4 == 0 {
            // A computed UDP checksum of 0 is sent as all ones (RFC 768).
            l4 = 0xffff;
        }
    }
    write::<2>(ctx, check_off, l4.to_ne_bytes())
}

/// [`rewrite`]: the destination becomes the backend (`s.entry.addr`, local backend).
const NAT_DST: u8 = 0;
/// [`rewrite`]: also the source becomes this node's address and port (`s.entry.nat_*`).
const NAT_BOTH: u8 = 1;
/// [`rewrite`]: a reply entry: the source becomes the frontend (`s.entry.addr`), the
/// destination the client (`s.entry.nat_*`).
const NAT_REPLY: u8 = 2;

/// Rewrites the packet's addresses and ports from the entry `s.entry` as `mode` says,
/// updating the IPv4 header checksum and the TCP/UDP checksum (pseudo-header addresses and
/// ports) incrementally (RFC 1624).
// A BPF-to-BPF call of its own (see `reply`).
#[inline(never)]
fn rewrite(ctx: &XdpContext, flow: &Flow, mode: u8, s: &Scratch) -> Result<(), Skip> {
    let at = |addr, port| Endpoint { addr, port };
    let (src, dst) = if mode == NAT_REPLY {
        (
            at(&s.entry.addr, s.entry.port),
            at(&s.entry.nat_addr, s.entry.nat_port),
        )
    } else {
        (
            at(&s.entry.nat_addr, s.entry.nat_port),
            at(&s.entry.addr, s.entry.port),
        )
    };
    let snat = mode != NAT_DST;
    let check_off = flow.l4_check();
    let old_check = u16::from_ne_bytes(read::<2>(ctx, check_off)?);
    let udp_no_check = flow.proto == IPPROTO_UDP && old_check == 0 && !flow.v6;
    let (src_off, dst_off) = if flow.v6 { (8, 24) } else { (12, 16) };
    let mut l4 = rewrite_one(
        ctx,
        flow,
        at(&flow.dst, flow.dport),
        dst,
        (flow.l3 + dst_off, flow.l4 + 2),
        old_check,
    )?;
    if snat {
        l4 = rewrite_one(
            ctx,
            flow,
            at(&flow.src, flow.sport),
            src,
            (flow.l3 + src_off, flow.l4),
            l4,
        )?;
    }
    if !udp_no_check {
        if flow.proto == IPPROTO_UDP && l4 == 0 {
            // A computed UDP checksum of 0 is sent as all ones (RFC 768).
            l4 = 0xffff;
        }
        write::<2>(ctx, check_off, l4.to_ne_bytes())?;
    }
    Ok(())
}
