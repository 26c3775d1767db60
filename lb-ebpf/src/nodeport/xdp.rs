//! XDP at ingress of an `--xdp-iface`: external frontends to backends on this node.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use lb_common::{
    Addr, csum,
    maps::{Backend, Frontend, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, SlotKey},
    nat::{CtEntry, EXT_SLOT_BASE, FRONTEND_ETP_LOCAL, FRONTEND_EXTERNAL},
    select::slot_for,
    stats,
};

use super::{
    Flow, LB_CT, in_key, is_member,
    parse::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Ext, IP_MF, IP_OFFSET,
        IPV4_HLEN, IPV6_HLEN, MAX_EXT_HEADERS, Skip, TCP_HLEN, UDP_HLEN, VLAN_HLEN, ext_step,
        is_ext,
    },
    reply_key,
};
use crate::maps::{LB_FRONTENDS, LB_SLOTS, count};

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
    let verdict = match parse(ctx) {
        Ok(flow) => translate(ctx, &flow),
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
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return None;
    }
    Some((start + off) as *mut [u8; N])
}

/// Reads `N` bytes at `off`.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u8; N], Skip> {
    let p = bytes::<N>(ctx, off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds-checked against data_end just above; byte arrays have no alignment.
    Ok(unsafe { *p })
}

/// Writes `N` bytes at `off` (which [`parse`] has already checked).
#[inline(always)]
fn write<const N: usize>(ctx: &XdpContext, off: usize, value: [u8; N]) -> Result<(), Skip> {
    let p = bytes::<N>(ctx, off).ok_or(Skip::Malformed)?;
    // SAFETY: bounds-checked against data_end just above.
    unsafe { *p = value };
    Ok(())
}

fn addr16(b: [u8; 16]) -> Addr {
    Addr::from_v6_octets(b)
}

/// Ethernet (+ one VLAN tag), IPv4 (options; fragments skipped) or IPv6 (up to
/// [`MAX_EXT_HEADERS`] extension headers; fragments skipped), then the TCP or UDP ports.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Flow, Skip> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(read::<2>(ctx, 12).map_err(|_| Skip::Other)?);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be_bytes(read::<2>(ctx, ETH_HLEN + 2).map_err(|_| Skip::Other)?);
        l3 += VLAN_HLEN;
    }
    let (v6, proto, l4, src, dst) = match ethertype {
        ETH_P_IP => {
            let h = read::<IPV4_HLEN>(ctx, l3)?;
            if h[0] >> 4 != 4 {
                return Err(Skip::Malformed);
            }
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < IPV4_HLEN {
                return Err(Skip::Malformed);
            }
            let proto = h[9];
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return Err(Skip::Other);
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            if frag & (IP_MF | IP_OFFSET) != 0 {
                return Err(Skip::Fragment);
            }
            let src = Addr::from_v4_octets([h[12], h[13], h[14], h[15]]);
            let dst = Addr::from_v4_octets([h[16], h[17], h[18], h[19]]);
            (false, proto, l3 + ihl, src, dst)
        }
        ETH_P_IPV6 => {
            let h = read::<IPV6_HLEN>(ctx, l3)?;
            if h[0] >> 4 != 6 {
                return Err(Skip::Malformed);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&h[24..40]);
            let mut next = h[6];
            let mut off = l3 + IPV6_HLEN;
            for _ in 0..MAX_EXT_HEADERS {
                if !is_ext(next) {
                    break;
                }
                match ext_step(next, read::<2>(ctx, off)?) {
                    Ext::Skip { next: n, len } => {
                        next = n;
                        off += len;
                    }
                    Ext::Fragment => return Err(Skip::Fragment),
                    Ext::Done => break,
                }
            }
            if is_ext(next) {
                return Err(Skip::Malformed);
            }
            if next != IPPROTO_TCP && next != IPPROTO_UDP {
                return Err(Skip::Other);
            }
            (true, next, off, addr16(src), addr16(dst))
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
    Ok(Flow {
        v6,
        proto,
        l3,
        l4,
        src,
        dst,
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
    })
}

/// An external frontend's packet goes to its flow's backend, or a new one.
#[inline(always)]
fn translate(ctx: &XdpContext, flow: &Flow) -> Verdict {
    let key = FrontendKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces values whole.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(&key) }).copied() else {
        return pass(None);
    };
    if frontend.flags & FRONTEND_EXTERNAL == 0 {
        return pass(None);
    }
    let ikey = in_key(flow);
    // SAFETY: copied out at once.
    let (backend, stat) = match unsafe { LB_CT.get(&ikey) }.copied() {
        Some(entry) => {
            let backend = Backend::new(entry.addr, entry.port);
            if !is_member(entry.id, &backend) {
                // The backend left the Service: this flow ends here. Its entries go, so
                // that a new flow on the same ports starts afresh.
                let _gone = LB_CT.remove(&ikey);
                let _gone = LB_CT.remove(&reply_key(flow, &backend));
                return drop(stats::XDP_DROP_STALE);
            }
            (backend, stats::XDP_TRACKED)
        }
        None => match new_flow(flow, &frontend) {
            Ok(backend) => (backend, stats::XDP_NEW_FLOW),
            Err(verdict) => return verdict,
        },
    };
    if dnat(ctx, flow, &backend).is_err() {
        return pass(Some(stats::XDP_PASS_MALFORMED));
    }
    pass(Some(stat))
}

/// Chooses a backend for a new flow and records the flow (both directions).
#[inline(always)]
fn new_flow(flow: &Flow, frontend: &Frontend) -> Result<Backend, Verdict> {
    if frontend.ext_count == 0 {
        return Err(if frontend.flags & FRONTEND_ETP_LOCAL != 0 {
            drop(stats::XDP_DROP_NO_LOCAL)
        } else {
            pass(Some(stats::XDP_PASS_NO_BACKEND))
        });
    }
    if frontend.ext_local < frontend.ext_count {
        return Err(pass(Some(stats::XDP_PASS_REMOTE)));
    }
    // SAFETY: helper call without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        id: frontend.id,
        slot: EXT_SLOT_BASE + slot_for(random, frontend.ext_count),
    };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { LB_SLOTS.get(&slot) }).copied() else {
        return Err(pass(Some(stats::ERR_SLOT_MISSING)));
    };
    let ikey = in_key(flow);
    let entry = CtEntry {
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
        id: frontend.id,
    };
    let backend = if LB_CT.insert(&ikey, &entry, u64::from(BPF_NOEXIST)).is_ok() {
        backend
    } else {
        // Another CPU recorded this flow a moment ago: follow it.
        // SAFETY: copied out at once.
        match unsafe { LB_CT.get(&ikey) }.copied() {
            Some(e) => Backend::new(e.addr, e.port),
            None => return Err(drop(stats::XDP_ERR_CT_UPDATE)),
        }
    };
    let reply = CtEntry {
        addr: flow.dst,
        port: flow.dport,
        _pad: [0; 2],
        id: frontend.id,
    };
    if LB_CT.insert(&reply_key(flow, &backend), &reply, 0).is_err() {
        let _gone = LB_CT.remove(&ikey);
        return Err(drop(stats::XDP_ERR_CT_UPDATE));
    }
    Ok(backend)
}

/// Rewrites the destination to `backend`, updating the IPv4 header checksum and the TCP/UDP
/// checksum (pseudo-header address and port) incrementally.
#[inline(always)]
fn dnat(ctx: &XdpContext, flow: &Flow, backend: &Backend) -> Result<(), Skip> {
    let check_off = flow.l4_check();
    let old_check = u16::from_ne_bytes(read::<2>(ctx, check_off)?);
    let udp_no_check = flow.proto == IPPROTO_UDP && old_check == 0 && !flow.v6;
    let mut l4_check = old_check;
    if flow.v6 {
        l4_check = csum::update(
            l4_check,
            &csum::addr_words(&flow.dst),
            &csum::addr_words(&backend.addr),
        );
        write::<16>(ctx, flow.l3 + 24, backend.addr.octets())?;
    } else {
        let old = csum::v4_words(flow.dst.v4_word());
        let new = csum::v4_words(backend.addr.v4_word());
        let ip_check = u16::from_ne_bytes(read::<2>(ctx, flow.l3 + 10)?);
        write::<2>(
            ctx,
            flow.l3 + 10,
            csum::update(ip_check, &old, &new).to_ne_bytes(),
        )?;
        write::<4>(ctx, flow.l3 + 16, backend.addr.v4_word().to_ne_bytes())?;
        l4_check = csum::update(l4_check, &old, &new);
    }
    l4_check = csum::update(l4_check, &[flow.dport], &[backend.port]);
    write::<2>(ctx, flow.l4 + 2, backend.port.to_ne_bytes())?;
    if !udp_no_check {
        if flow.proto == IPPROTO_UDP && l4_check == 0 {
            // A computed UDP checksum of 0 is sent as all ones (RFC 768).
            l4_check = 0xffff;
        }
        write::<2>(ctx, check_off, l4_check.to_ne_bytes())?;
    }
    Ok(())
}
