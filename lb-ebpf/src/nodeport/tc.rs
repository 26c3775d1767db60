//! tc egress on an `--xdp-iface`: a backend's reply to a translated flow gets the frontend
//! back as its source.
//!
//! Replies leave through the stack, which XDP does not see. The packet may be non-linear and
//! its checksum may be left to the device (CHECKSUM_PARTIAL, common on veth), so this side
//! reads and writes through the skb helpers and updates checksums with
//! `bpf_l3_csum_replace`/`bpf_l4_csum_replace`, which handle both cases.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use lb_common::{
    Addr,
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    nat::{
        CT_DIR_IN, CT_DIR_REPLY, CT_FIN_BACKEND, CT_REFRESH_NS, CT_SNAT, CtKey, client_key,
        ct_expired, ct_flags_after,
    },
    stats,
};

use super::{
    Flow, ct,
    parse::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, ext_walk,
    },
};
use crate::maps::count;

/// The tc entry point's work: always lets the packet go on (translated or not).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(f) = LB_NAT_TC_FLOW.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's value, used by this program run only (tc egress runs with bottom
    // halves off, so XDP does not interleave on this CPU; it has its own map anyway).
    let flow = unsafe { &mut *f };
    if parse(ctx, flow).is_some() {
        if flow.proto == IPPROTO_ICMP || flow.proto == IPPROTO_ICMPV6 {
            return super::icmp::tc_error(ctx, flow);
        }
        reply(ctx, flow);
    }
    TC_ACT_OK
}

/// The parsed packet, in map memory rather than on the program's stack (the ICMP path's
/// call chain must fit 512 bytes); one per CPU, not pinned.
#[map]
static LB_NAT_TC_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// A backend's reply (`flow`) to a tracked flow gets its frontend back as source.
// A BPF-to-BPF call of its own: its frame is not on the stack of the ICMP path.
#[inline(never)]
fn reply(ctx: &TcContext, flow: &Flow) {
    // The flow's one entry, keyed by the client, when the reply comes from its backend.
    let key = client_key(flow.dst, flow.dport, flow.proto);
    if let Some(p) = ct::get(&key) {
        // SAFETY: copied out at once.
        let entry = unsafe { *p };
        if entry.addr == flow.src && entry.port == flow.sport && entry.flags & CT_SNAT == 0 {
            let now = super::xdp::now();
            if ct_expired(entry.seen, now, flow.proto, entry.flags) {
                count(stats::TC_CT_EXPIRED);
                return;
            }
            // The backend's FIN half-closes the flow (`CT_FIN_BACKEND`; closed once the
            // client's FIN is in too), an RST closes it.
            let flags = ct_flags_after(entry.flags, tcp_flags(ctx, flow), CT_FIN_BACKEND);
            if flags != entry.flags {
                // SAFETY: a pointer into the map's value. XDP writes this byte only when it
                // changes too (a client's FIN or RST); a race of the two loses at most one
                // FIN bit (the flow keeps the established timeout, never its translation).
                unsafe {
                    (*p).flags = flags;
                    (*p).seen = now;
                }
            } else if now.saturating_sub(entry.seen) > CT_REFRESH_NS {
                // SAFETY: a pointer into the map's value (a racing refresh loses one
                // timestamp, never the entry).
                unsafe { (*p).seen = now };
            }
            if snat_back(ctx, flow, entry.nat_addr, entry.nat_port).is_some() {
                count(stats::TC_REPLY_XLATED);
            }
            return;
        }
    }
    // A reply entry: a second flow of the client's port, or a flow of layout 4.
    let key = flow.ct_key(CT_DIR_REPLY);
    let Some(p) = ct::get(&key) else {
        return;
    };
    // SAFETY: copied out at once.
    let entry = unsafe { *p };
    let now = super::xdp::now();
    // An expired entry is absent, as in XDP: the flow has ended (a client packet would start
    // a new one).
    if ct_expired(entry.seen, now, flow.proto, entry.flags) {
        count(stats::TC_CT_EXPIRED);
        return;
    }
    if now.saturating_sub(entry.seen) > CT_REFRESH_NS {
        // Replies keep the whole flow alive: this entry and the forward one.
        // SAFETY: a pointer into the map's value (a racing refresh loses one timestamp,
        // never the entry).
        unsafe { (*p).seen = now };
        let fwd = CtKey {
            src: flow.dst,
            dst: entry.addr,
            sport: flow.dport,
            dport: entry.port,
            proto: flow.proto,
            dir: CT_DIR_IN,
            _pad: [0; 2],
        };
        super::touch(&fwd, now);
    }
    if snat_back(ctx, flow, entry.addr, entry.port).is_some() {
        count(stats::TC_REPLY_XLATED);
    }
}

/// The TCP flags byte of `flow`'s packet (0 for UDP or a short packet).
#[inline(always)]
fn tcp_flags(ctx: &TcContext, flow: &Flow) -> u8 {
    if flow.proto != IPPROTO_TCP {
        return 0;
    }
    load::<1>(ctx, flow.l4 + 13).map_or(0, |b| b[0])
}

fn load<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    ctx.load::<[u8; N]>(off).ok()
}

/// Ethernet (+ one VLAN tag in the frame), IPv4 or IPv6, TCP, UDP or ICMP/ICMPv6 (`l4` the
/// ICMP header); `None` for anything else (fragments included: they carry no ports, and a
/// reply's first fragment is left alone like the rest), into `out`.
// A BPF-to-BPF call of its own: its frame is not on the stack of what follows.
#[inline(never)]
fn parse(ctx: &TcContext, out: &mut Flow) -> Option<()> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(load::<2>(ctx, 12)?);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be_bytes(load::<2>(ctx, ETH_HLEN + 2)?);
        l3 += 4;
    }
    let (v6, proto, l4, src, dst) = match ethertype {
        ETH_P_IP => {
            let h = load::<IPV4_HLEN>(ctx, l3)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            if h[0] >> 4 != 4 || ihl < IPV4_HLEN || frag & (IP_MF | IP_OFFSET) != 0 {
                return None;
            }
            (
                false,
                h[9],
                l3 + ihl,
                Addr::from_v4_octets([h[12], h[13], h[14], h[15]]),
                Addr::from_v4_octets([h[16], h[17], h[18], h[19]]),
            )
        }
        ETH_P_IPV6 => {
            let h = load::<IPV6_HLEN>(ctx, l3)?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&h[24..40]);
            let (next, off) = ext_walk(h[6], l3 + IPV6_HLEN, |off| load::<2>(ctx, off)).ok()?;
            (
                true,
                next,
                off,
                Addr::from_v6_octets(src),
                Addr::from_v6_octets(dst),
            )
        }
        _ => return None,
    };
    let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != icmp {
        return None;
    }
    let ports = load::<4>(ctx, l4)?;
    out.v6 = v6;
    out.proto = proto;
    out.l3 = l3;
    out.l4 = l4;
    out.src = src;
    out.dst = dst;
    out.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    out.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(())
}

/// Rewrites the source to `addr:port` (the frontend), with checksums.
#[inline(always)]
fn snat_back(ctx: &TcContext, flow: &Flow, addr: Addr, port: u16) -> Option<()> {
    let check = flow.l4_check();
    // An IPv4 UDP checksum of 0 means "none" and stays 0.
    let mangled = if flow.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    if flow.v6 {
        for i in 0..4 {
            ctx.l4_csum_replace(
                check,
                u64::from(flow.src.0[i]),
                u64::from(addr.0[i]),
                pseudo | 4,
            )
            .ok()?;
        }
        ctx.store(flow.l3 + 8, &addr.octets(), 0).ok()?;
    } else {
        let (old, new) = (flow.src.v4_word(), addr.v4_word());
        ctx.l3_csum_replace(flow.l3 + 10, u64::from(old), u64::from(new), 4)
            .ok()?;
        ctx.l4_csum_replace(check, u64::from(old), u64::from(new), pseudo | 4)
            .ok()?;
        ctx.store(flow.l3 + 12, &new.to_ne_bytes(), 0).ok()?;
    }
    ctx.l4_csum_replace(check, u64::from(flow.sport), u64::from(port), mangled | 2)
        .ok()?;
    ctx.store(flow.l4, &port.to_ne_bytes(), 0).ok()?;
    Some(())
}
