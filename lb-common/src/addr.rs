//! One address type for both families.
//!
//! The programs keep IPv4 addresses as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so a v4 service,
//! reached from a v4 socket or from a v6 socket connecting to its mapped address, is a single
//! map entry and a single code path.

/// An IP address: 16 bytes in network byte order, held as four 32-bit words exactly as
/// `struct bpf_sock_addr.user_ip6` holds them (each word is the in-memory copy of four
/// address bytes, not a host-order integer). IPv4 is stored IPv4-mapped. All zero is
/// "no address" and never appears in a map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);

const _: () = assert!(size_of::<Addr>() == 16);

/// The third word of an IPv4-mapped address, `00 00 ff ff` in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// From an IPv4 address as `bpf_sock_addr.user_ip4` holds it (network byte order in memory).
    #[inline(always)]
    #[must_use]
    pub const fn from_v4_word(ip4: u32) -> Self {
        Self([0, 0, V4_MAPPED_WORD, ip4])
    }

    /// From the four words of `bpf_sock_addr.user_ip6`.
    #[inline(always)]
    #[must_use]
    pub const fn from_v6_words(words: [u32; 4]) -> Self {
        Self(words)
    }

    /// From IPv4 octets (a.b.c.d).
    #[inline(always)]
    #[must_use]
    pub const fn from_v4_octets(octets: [u8; 4]) -> Self {
        Self::from_v4_word(u32::from_ne_bytes(octets))
    }

    /// From IPv6 octets. IPv4-mapped input stays mapped, so it equals [`Addr::from_v4_octets`].
    #[inline(always)]
    #[must_use]
    pub const fn from_v6_octets(o: [u8; 16]) -> Self {
        Self([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// Whether this is an IPv4 address (IPv4-mapped).
    #[inline(always)]
    #[must_use]
    pub const fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED_WORD
    }

    /// The IPv4 word, as `bpf_sock_addr.user_ip4` wants it. Meaningful only when [`Addr::is_v4`].
    #[inline(always)]
    #[must_use]
    pub const fn v4_word(&self) -> u32 {
        self.0[3]
    }

    /// The 16 address bytes in network order.
    #[must_use]
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.0;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_round_trips() {
        let a = Addr::from_v4_octets([10, 96, 0, 10]);
        assert!(a.is_v4());
        assert_eq!(
            a.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(a.v4_word().to_ne_bytes(), [10, 96, 0, 10]);
    }

    #[test]
    fn mapped_v6_equals_v4() {
        let mut o = [0u8; 16];
        o[10] = 0xff;
        o[11] = 0xff;
        o[12..].copy_from_slice(&[192, 168, 1, 2]);
        assert_eq!(
            Addr::from_v6_octets(o),
            Addr::from_v4_octets([192, 168, 1, 2])
        );
    }

    #[test]
    fn plain_v6_is_not_v4() {
        let mut o = [0u8; 16];
        o[0] = 0xfd;
        o[15] = 1;
        let a = Addr::from_v6_octets(o);
        assert!(!a.is_v4());
        assert_eq!(a.octets(), o);
    }
}
