//! ICMP and ICMPv6 errors about translated flows, translated like the flow's packets.
//!
//! An error quotes the packet that caused it (its IP header and at least the first 8 bytes of
//! its TCP/UDP header: RFC 792, RFC 4443 section 2.4). When lb rewrote that packet, the error
//! quotes the rewritten addresses, which its receiver does not know; so the error is translated
//! back, as Linux conntrack's `nf_nat_icmp_reply_translation` does (the quoted packet by the
//! reverse of the flow's translation, the outer header as a packet of the flow in the error's
//! direction) and as Cilium's `snat_v4_rev_nat` does for its ICMP case:
//!
//! - XDP, an error about a reply lb sent (quoted `frontend -> client`, e.g. a router's
//!   Fragmentation Needed / Packet Too Big on the way to the client), found by the flow's
//!   forward entry: the quote becomes what the backend sent (`backend -> client`, with SNAT
//!   `backend -> node:port`), the outer destination the backend (with SNAT the outer source
//!   this node's address). Passed to the stack, or with SNAT sent on like the flow's packets.
//! - XDP, an error from the backend's side of an SNAT'd flow (quoted `node:port -> backend`,
//!   addressed to this node), found by the reply entry: the quote becomes what the client sent
//!   (`client -> frontend`), the outer header `frontend -> client`; sent on to the client.
//! - tc egress, an error made on this node (a pod's port unreachable, the node's own
//!   Fragmentation Needed) about a DNAT'd packet (quoted `client -> backend`), found by the
//!   reply entry: the quote becomes `client -> frontend`, the outer source the frontend.
//!
//! Checksums: the outer IPv4 header's, the quoted IPv4 header's, the quoted TCP/UDP checksum
//! when the quote holds it (an IPv4 UDP checksum of 0 stays 0), and the ICMP checksum, which
//! covers the whole quote (and, for ICMPv6, a pseudo-header with the outer addresses): every
//! changed 16-bit word is folded in incrementally (RFC 1624). Errors that match no live flow,
//! and everything that is not an error about TCP/UDP, pass untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Addr, csum,
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    nat::{CT_DIR_IN, CT_DIR_REPLY, CT_SNAT, CtEntry, CtKey, SNAT_PORT_MIN, ct_expired},
    stats,
};

use super::{
    Flow, LB_NAT_SCRATCH, Scratch, ct,
    parse::{Ext, IPV4_HLEN, IPV6_HLEN, MAX_EXT_HEADERS, ext_step, is_ext},
    xdp,
};
use crate::maps::count;

/// ICMP header length (type, code, checksum, 4 bytes of type-specific data); the quote
/// follows it.
const ICMP_HLEN: usize = 8;
/// ICMPv4 error types: destination unreachable (fragmentation needed, port unreachable...),
/// time exceeded, parameter problem (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// ICMPv6 error types 1-4: destination unreachable, packet too big, time exceeded, parameter
/// problem (RFC 4443; informational messages are 128 and up).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMPROB: u8 = 4;

/// An ICMP error's headers as found in the packet (addresses and ports as they are there,
/// ports in network order), and the translation to apply.
///
/// Offsets are `u16` on purpose: read back from map memory, a zero-extended value is never
/// negative for the verifier, whatever comparisons LLVM makes of it.
pub struct IcmpError {
    pub v6: bool,
    /// Offset of the outer IP header.
    pub l3: u16,
    /// Offset of the ICMP header.
    pub icmp: u16,
    /// Offset of the quoted IP header.
    pub inner_l3: u16,
    /// Offset of the quoted TCP/UDP header.
    pub inner_l4: u16,
    /// Quoted protocol, `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Outer source and destination.
    pub osrc: Addr,
    pub odst: Addr,
    /// The quoted packet's source and destination.
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// New values, set before [`rewrite`]: outer source and destination, quoted source and
    /// destination with their ports.
    pub new_osrc: Addr,
    pub new_odst: Addr,
    pub new_src: Addr,
    pub new_dst: Addr,
    pub new_sport: u16,
    pub new_dport: u16,
    /// tc only: the flow's key and entry (here rather than on the tc program's stack).
    pub key: CtKey,
    pub entry: CtEntry,
}

/// Working space: index 0 for XDP, 1 for tc (per CPU, not pinned, not shared with the agent).
#[map]
static LB_NAT_ICMP: PerCpuArray<IcmpError> = PerCpuArray::with_max_entries(2, 0);

/// Byte access to a packet, for code shared by XDP (direct access) and tc (skb helpers).
pub trait Packet {
    /// `N` bytes at `off`, if the packet holds them.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// Writes `N` bytes at `off`.
    fn store<const N: usize>(&self, off: usize, value: [u8; N]) -> Option<()>;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        xdp::read::<N>(self, off).ok()
    }

    #[inline(always)]
    fn store<const N: usize>(&self, off: usize, value: [u8; N]) -> Option<()> {
        xdp::write::<N>(self, off, value).ok()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        TcContext::load::<[u8; N]>(self, off).ok()
    }

    #[inline(always)]
    fn store<const N: usize>(&self, off: usize, value: [u8; N]) -> Option<()> {
        TcContext::store(self, off, &value, 0).ok()
    }
}

/// Why an ICMP message is left alone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Miss {
    /// Not an error about a TCP/UDP packet (echo, an error about ICMP, a quoted fragment):
    /// not ours, nothing counted.
    Other,
    /// The quote is truncated or malformed.
    Malformed,
}

/// The quote of the ICMP error whose outer fields (`v6`, `l3`, `icmp`, `osrc`, `odst`) `e`
/// holds: the quoted headers' offsets, protocol, addresses and ports.
// A BPF-to-BPF call of its own in XDP (its frame apart from the caller's).
#[inline(never)]
fn parse_quote<P: Packet>(p: &P, e: &mut IcmpError) -> Result<(), Miss> {
    let hdr = p.load::<2>(usize::from(e.icmp)).ok_or(Miss::Malformed)?;
    let error = if e.v6 {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAMPROB).contains(&hdr[0])
    } else {
        matches!(
            hdr[0],
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
    };
    if !error {
        return Err(Miss::Other);
    }
    let inner_l3 = usize::from(e.icmp) + ICMP_HLEN;
    let (proto, inner_l4) = if e.v6 {
        let h = p.load::<IPV6_HLEN>(inner_l3).ok_or(Miss::Malformed)?;
        if h[0] >> 4 != 6 {
            return Err(Miss::Malformed);
        }
        let mut src = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&h[24..40]);
        e.src = Addr::from_v6_octets(src);
        e.dst = Addr::from_v6_octets(dst);
        let mut next = h[6];
        let mut off = inner_l3 + IPV6_HLEN;
        for _ in 0..MAX_EXT_HEADERS {
            if !is_ext(next) {
                break;
            }
            match ext_step(next, p.load::<2>(off).ok_or(Miss::Malformed)?) {
                Ext::Skip { next: n, len } => {
                    next = n;
                    off += len;
                }
                // lb never translates fragments, so no error about one is ours.
                Ext::Fragment => return Err(Miss::Other),
                Ext::Done => break,
            }
        }
        (next, off)
    } else {
        let h = p.load::<IPV4_HLEN>(inner_l3).ok_or(Miss::Malformed)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_HLEN {
            return Err(Miss::Malformed);
        }
        // A later fragment carries no ports (and lb translates no fragments).
        if u16::from_be_bytes([h[6], h[7]]) & super::parse::IP_OFFSET != 0 {
            return Err(Miss::Other);
        }
        e.src = Addr::from_v4_octets([h[12], h[13], h[14], h[15]]);
        e.dst = Addr::from_v4_octets([h[16], h[17], h[18], h[19]]);
        (h[9], inner_l3 + ihl)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Miss::Other);
    }
    let ports = p.load::<4>(inner_l4).ok_or(Miss::Malformed)?;
    e.inner_l3 = u16::try_from(inner_l3).map_err(|_| Miss::Malformed)?;
    e.inner_l4 = u16::try_from(inner_l4).map_err(|_| Miss::Malformed)?;
    e.proto = proto;
    e.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    e.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    Ok(())
}

/// The checksum field `check` after the covered data changed by `sum` (RFC 1624 eqn. 3).
#[inline(always)]
fn apply(check: u16, sum: u32) -> u16 {
    !csum::fold(u32::from(!check) + u32::from(csum::fold(sum)))
}

/// Writes address `addr` (of family `v6`) at `off`.
#[inline(always)]
fn put_addr<P: Packet>(p: &P, v6: bool, off: usize, addr: &Addr) -> Option<()> {
    if v6 {
        p.store::<16>(off, addr.octets())
    } else {
        p.store::<4>(off, addr.v4_word().to_ne_bytes())
    }
}

/// Writes the new values of `e` into the packet with every checksum updated.
// A BPF-to-BPF call of its own in XDP: its frame is not on the stack of the caller.
#[inline(never)]
fn rewrite<P: Packet>(p: &P, e: &IcmpError) -> Option<()> {
    let v6 = e.v6;
    let (l3, inner_l3, inner_l4) = (
        usize::from(e.l3),
        usize::from(e.inner_l3),
        usize::from(e.inner_l4),
    );
    let (src_off, dst_off) = if v6 { (8, 24) } else { (12, 16) };
    // What the words covered by the ICMP checksum changed by.
    let mut icmp: u32 = 0;
    // The outer header: the IPv4 header checksum, or the ICMPv6 pseudo-header.
    let outer = csum::add_addr(
        csum::add_addr(0, &e.osrc, &e.new_osrc),
        &e.odst,
        &e.new_odst,
    );
    put_addr(p, v6, l3 + src_off, &e.new_osrc)?;
    put_addr(p, v6, l3 + dst_off, &e.new_odst)?;
    if v6 {
        icmp += u32::from(csum::fold(outer));
    } else {
        let old = u16::from_ne_bytes(p.load::<2>(l3 + 10)?);
        p.store::<2>(l3 + 10, apply(old, outer).to_ne_bytes())?;
    }
    // The quoted addresses: covered by the ICMP checksum, the quoted IPv4 header checksum and
    // the quoted TCP/UDP checksum (pseudo-header).
    let inner = u32::from(csum::fold(csum::add_addr(
        csum::add_addr(0, &e.src, &e.new_src),
        &e.dst,
        &e.new_dst,
    )));
    put_addr(p, v6, inner_l3 + src_off, &e.new_src)?;
    put_addr(p, v6, inner_l3 + dst_off, &e.new_dst)?;
    icmp += inner;
    if !v6 {
        let old = u16::from_ne_bytes(p.load::<2>(inner_l3 + 10)?);
        let new = apply(old, inner);
        p.store::<2>(inner_l3 + 10, new.to_ne_bytes())?;
        icmp += u32::from(!old) + u32::from(new);
    }
    // The quoted ports.
    let ports =
        u32::from(!e.sport) + u32::from(!e.dport) + u32::from(e.new_sport) + u32::from(e.new_dport);
    p.store::<2>(inner_l4, e.new_sport.to_ne_bytes())?;
    p.store::<2>(inner_l4 + 2, e.new_dport.to_ne_bytes())?;
    icmp += ports;
    // The quoted TCP/UDP checksum, when the quote holds it (a TCP one only with 18 bytes).
    let l4_off = inner_l4 + if e.proto == IPPROTO_TCP { 16 } else { 6 };
    if let Some(b) = p.load::<2>(l4_off) {
        let old = u16::from_ne_bytes(b);
        // An IPv4 UDP checksum of 0 means "none" and stays 0.
        if !(e.proto == IPPROTO_UDP && old == 0 && !v6) {
            let mut new = apply(old, inner + ports);
            if e.proto == IPPROTO_UDP && new == 0 {
                new = 0xffff;
            }
            p.store::<2>(l4_off, new.to_ne_bytes())?;
            icmp += u32::from(!old) + u32::from(new);
        }
    }
    let check_off = usize::from(e.icmp) + 2;
    let old = u16::from_ne_bytes(p.load::<2>(check_off)?);
    p.store::<2>(check_off, apply(old, icmp).to_ne_bytes())
}

/// Fills the outer fields of `e` from the parsed ICMP packet `flow`.
#[inline(always)]
fn outer(e: &mut IcmpError, flow: &Flow) -> Option<()> {
    e.v6 = flow.v6;
    e.l3 = u16::try_from(flow.l3).ok()?;
    e.icmp = u16::try_from(flow.l4).ok()?;
    e.osrc = flow.src;
    e.odst = flow.dst;
    Some(())
}

/// The key of the entry for the quoted packet's flow as seen in direction `dir`: the quote is
/// a packet sent by the error's receiver, so its reverse is the packet the entry was made for.
#[inline(always)]
fn quote_key(e: &IcmpError, dir: u8) -> CtKey {
    CtKey {
        src: e.dst,
        dst: e.src,
        sport: e.dport,
        dport: e.sport,
        proto: e.proto,
        dir,
        _pad: [0; 2],
    }
}

/// Which entry of its flow an error's quote matched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    None,
    /// The forward entry: the quote is a reply lb sent from a frontend.
    Forward,
    /// An SNAT'd flow's reply entry: the quote is a packet lb sent to a backend on another
    /// node.
    Reply,
}

/// Finds the live flow entry of the quote of `e` (into `s.entry`, the key in `s.ikey`) and
/// sets the new values of `e` from it.
// A BPF-to-BPF call of its own: the keys and entries live in `s`, not on the caller's stack.
#[inline(never)]
fn lookup(e: &mut IcmpError, s: &mut Scratch) -> Found {
    let now = xdp::now();
    // The flow's client entry, if the quote came from its frontend.
    super::set_client_key(&mut s.ikey, e.dst, e.dport, e.proto);
    if let Some(p) = ct::get(&s.ikey) {
        // SAFETY: copied out at once.
        s.entry = unsafe { *p };
        if s.entry.nat_addr == e.src
            && s.entry.nat_port == e.sport
            && !ct_expired(s.entry.seen, now, e.proto, s.entry.flags)
        {
            e.new_odst = s.entry.addr;
            e.new_src = s.entry.addr;
            e.new_sport = s.entry.port;
            e.new_osrc = e.osrc;
            e.new_dst = e.dst;
            e.new_dport = e.dport;
            return Found::Forward;
        }
    }
    s.ikey = quote_key(e, CT_DIR_IN);
    if let Some(p) = ct::get(&s.ikey) {
        // SAFETY: copied out at once.
        s.entry = unsafe { *p };
        if !ct_expired(s.entry.seen, now, e.proto, s.entry.flags) {
            // About a reply lb sent from a frontend.
            e.new_odst = s.entry.addr;
            e.new_src = s.entry.addr;
            e.new_sport = s.entry.port;
            if s.entry.flags & CT_SNAT != 0 {
                e.new_osrc = s.entry.nat_addr;
                e.new_dst = s.entry.nat_addr;
                e.new_dport = s.entry.nat_port;
            } else {
                e.new_osrc = e.osrc;
                e.new_dst = e.dst;
                e.new_dport = e.dport;
            }
            return Found::Forward;
        }
    }
    // About a packet lb sent with SNAT (from an allocated port) to a backend on another node.
    if u16::from_be(e.sport) < SNAT_PORT_MIN {
        return Found::None;
    }
    s.ikey.dir = CT_DIR_REPLY;
    let Some(p) = ct::get(&s.ikey) else {
        return Found::None;
    };
    // SAFETY: copied out at once.
    s.entry = unsafe { *p };
    if s.entry.flags & CT_SNAT == 0 || ct_expired(s.entry.seen, now, e.proto, s.entry.flags) {
        return Found::None;
    }
    e.new_osrc = s.entry.addr;
    e.new_odst = s.entry.nat_addr;
    e.new_src = s.entry.nat_addr;
    e.new_sport = s.entry.nat_port;
    e.new_dst = s.entry.addr;
    e.new_dport = s.entry.port;
    Found::Reply
}

/// XDP: an ICMP error (`flow`: the outer header, `l4` the ICMP header) about a translated
/// flow is translated and passed or sent on; anything else passes untouched.
// A BPF-to-BPF call of its own: the ICMP path stays out of the translation's stack frame.
#[inline(never)]
pub fn xdp_error(ctx: &XdpContext, flow: &Flow) -> u32 {
    let pass = xdp_action::XDP_PASS;
    if flow.l3 > super::parse::ETH_HLEN + super::parse::VLAN_HLEN || flow.l4 > xdp::MAX_L4_OFF {
        return pass;
    }
    let (Some(e), Some(s)) = (LB_NAT_ICMP.get_ptr_mut(0), LB_NAT_SCRATCH.get_ptr_mut(0)) else {
        return pass;
    };
    // SAFETY: this CPU's values, used by this program run only (as in `xdp::ingress`).
    let (e, s) = unsafe { (&mut *e, &mut *s) };
    if outer(e, flow).is_none() {
        return pass;
    }
    match parse_quote(ctx, e) {
        Ok(()) => {}
        Err(Miss::Other) => return pass,
        Err(Miss::Malformed) => {
            count(stats::XDP_ICMP_MALFORMED);
            return pass;
        }
    }
    // The error goes to the quoted packet's source.
    if e.odst != e.src {
        count(stats::XDP_ICMP_NO_FLOW);
        return pass;
    }
    let reply = match lookup(e, s) {
        Found::Forward => false,
        Found::Reply => true,
        Found::None => {
            count(stats::XDP_ICMP_NO_FLOW);
            return pass;
        }
    };
    if rewrite(ctx, e).is_none() {
        count(stats::XDP_ICMP_MALFORMED);
        return pass;
    }
    count(if reply {
        stats::XDP_ICMP_REPLY_XLATED
    } else {
        stats::XDP_ICMP_XLATED
    });
    if !reply && s.entry.flags & CT_SNAT == 0 {
        // To a pod on this node: the stack routes it.
        return pass;
    }
    xdp::forward_verdict(ctx, flow, reply, s)
}

/// tc egress: an ICMP error made on this node about a DNAT'd packet of a flow (quoted
/// `client -> backend`) gets the frontend back, in the quote and as its source.
// A BPF-to-BPF call of its own: the tc program's frame stays small (the chain to `rewrite`
// must fit 512 bytes).
#[inline(never)]
pub fn tc_error(ctx: &TcContext, flow: &Flow) -> i32 {
    let Some(e) = LB_NAT_ICMP.get_ptr_mut(1) else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's value, used by this program run only.
    let e = unsafe { &mut *e };
    if outer(e, flow).is_none() || parse_quote(ctx, e).is_err() || e.odst != e.src {
        return TC_ACT_OK;
    }
    // The flow's client entry (the quote goes from the client to its backend)...
    super::set_client_key(&mut e.key, e.src, e.sport, e.proto);
    if let Some(p) = ct::get(&e.key) {
        // SAFETY: copied out at once.
        e.entry = unsafe { *p };
        if e.entry.addr == e.dst && e.entry.port == e.dport && e.entry.flags & CT_SNAT == 0 {
            // The reply's new source, as a reply entry holds it.
            e.entry.addr = e.entry.nat_addr;
            e.entry.port = e.entry.nat_port;
            return tc_translate(ctx, e);
        }
    }
    // ... or its reply entry. Field by field: a whole-struct literal would be built on the
    // stack first.
    e.key.src = e.dst;
    e.key.dst = e.src;
    e.key.sport = e.dport;
    e.key.dport = e.sport;
    e.key.proto = e.proto;
    e.key.dir = CT_DIR_REPLY;
    e.key._pad = [0; 2];
    let Some(p) = ct::get(&e.key) else {
        return TC_ACT_OK;
    };
    // SAFETY: copied out at once.
    e.entry = unsafe { *p };
    if e.entry.flags & CT_SNAT != 0 {
        return TC_ACT_OK;
    }
    tc_translate(ctx, e)
}

/// [`tc_error`] with the flow's entry in `e.entry` (the frontend in `addr`, `port`): a live
/// entry's frontend goes into the error.
#[inline(always)]
fn tc_translate(ctx: &TcContext, e: &mut IcmpError) -> i32 {
    if ct_expired(e.entry.seen, xdp::now(), e.proto, e.entry.flags) {
        return TC_ACT_OK;
    }
    e.new_osrc = e.entry.addr;
    e.new_odst = e.odst;
    e.new_src = e.src;
    e.new_sport = e.sport;
    e.new_dst = e.entry.addr;
    e.new_dport = e.entry.port;
    if rewrite(ctx, e).is_some() {
        count(stats::TC_ICMP_XLATED);
    }
    TC_ACT_OK
}
