//! Header offsets and constants shared by the XDP and tc parsers (as katran's
//! `pckt_parsing.h`: every read is bounds-checked, the IPv6 extension-header walk is bounded,
//! and a failure is a verdict, never a guess).

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// One 802.1Q/802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// EtherTypes, as read from the packet with `from_be_bytes`.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 fixed header.
pub const IPV6_HLEN: usize = 40;
/// IPv4 `frag_off` bits (host order): more fragments, and the offset.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;
/// IPv6 next-header values of the extension headers the walk steps over.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked at most; a packet with more passes untouched (as Cilium's
/// `IPV6_MAX_HEADERS`).
pub const MAX_EXT_HEADERS: usize = 4;
/// TCP header without options; UDP header.
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// ICMP and ICMPv6 protocol numbers (errors about translated flows: `icmp`).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Why a packet is not translated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not TCP/UDP over IP: not ours, nothing counted.
    Other,
    /// A fragment (no ports to match).
    Fragment,
    /// Truncated or malformed headers.
    Malformed,
    /// An ICMP/ICMPv6 packet (outer header parsed): maybe an error about a translated flow.
    Icmp,
}

/// What an IPv6 extension header walk step found.
pub enum Ext {
    /// The upper-layer protocol starts here.
    Done,
    /// Step over `len` bytes to the header `next`.
    Skip { next: u8, len: usize },
    /// A fragment header.
    Fragment,
}

/// One step of the extension-header walk: `nexthdr` is the header at hand, `hdr` its first two
/// bytes (next header, length).
#[inline(always)]
pub fn ext_step(nexthdr: u8, hdr: [u8; 2]) -> Ext {
    match nexthdr {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => Ext::Skip {
            next: hdr[0],
            len: (usize::from(hdr[1]) + 1) * 8,
        },
        NEXTHDR_AUTH => Ext::Skip {
            next: hdr[0],
            len: (usize::from(hdr[1]) + 2) * 4,
        },
        NEXTHDR_FRAGMENT => Ext::Fragment,
        _ => Ext::Done,
    }
}

/// Whether `nexthdr` is an extension header the walk steps over.
#[inline(always)]
pub fn is_ext(nexthdr: u8) -> bool {
    matches!(
        nexthdr,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

/// Walks the IPv6 extension headers from header `next` at offset `off`, at most
/// [`MAX_EXT_HEADERS`] of them, reading each one's first two bytes with `read2`: the
/// header found after them and its offset (still an extension header when there were more),
/// or [`Skip::Fragment`], or [`Skip::Malformed`] when a header is cut short. Shared by the
/// XDP and tc parsers, which read the packet differently.
#[inline(always)]
pub fn ext_walk(
    mut next: u8,
    mut off: usize,
    read2: impl Fn(usize) -> Option<[u8; 2]>,
) -> Result<(u8, usize), Skip> {
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext(next) {
            break;
        }
        match ext_step(next, read2(off).ok_or(Skip::Malformed)?) {
            Ext::Skip { next: n, len } => {
                next = n;
                off += len;
            }
            Ext::Fragment => return Err(Skip::Fragment),
            Ext::Done => break,
        }
    }
    Ok((next, off))
}
