//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624), shared by the
//! XDP/tc programs and the tests that check them against a full computation.
//!
//! All 16-bit words here are as they lie in memory (read with `from_ne_bytes`): the one's
//! complement sum is byte-order independent (RFC 1071 section 2(B)), so a checksum field read
//! and written the same way stays correct on any host.

/// Adds `word` to a 32-bit one's complement accumulator.
#[inline(always)]
#[must_use]
pub const fn add(sum: u32, word: u16) -> u32 {
    sum + word as u32
}

/// Folds a 32-bit accumulator to 16 bits (end-around carry).
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    folded
}

/// The checksum field after the words `old` of the covered data became `new` (RFC 1624 eqn.
/// 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
#[must_use]
pub fn update(check: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut sum = u32::from(!check);
    for &w in old {
        sum = add(sum, !w);
    }
    for &w in new {
        sum = add(sum, w);
    }
    !fold(sum)
}

/// Adds the one's complement difference of the 16-byte address `old` -> `new` to the
/// accumulator `sum`, from the addresses' four 32-bit words without building the eight 16-bit
/// ones: the halves of a word as it lies in memory are its low and high 16 bits on either
/// byte order, and their sum is what [`update`] adds over [`addr_words`]. For IPv4 addresses
/// (mapped) the other words are the same in both and cancel out (`!w + w` is one's
/// complement zero). On the BPF stack the two `[u16; 8]` copies would cost 32 bytes of the
/// 512 a call chain has.
#[inline(always)]
#[must_use]
pub const fn add_addr(mut sum: u32, old: &crate::Addr, new: &crate::Addr) -> u32 {
    let mut i = 0;
    while i < 4 {
        let o = !old.0[i];
        let n = new.0[i];
        sum += (o & 0xffff) + (o >> 16) + (n & 0xffff) + (n >> 16);
        i += 1;
    }
    sum
}

/// [`update`] for a 16-byte address `old` that became `new` ([`add_addr`]): the same result,
/// bit for bit.
#[inline(always)]
#[must_use]
pub fn update_addr(check: u16, old: &crate::Addr, new: &crate::Addr) -> u16 {
    !fold(add_addr(u32::from(!check), old, new))
}

/// The words of a 16-byte address, as they lie in memory.
#[inline(always)]
#[must_use]
pub fn addr_words(addr: &crate::Addr) -> [u16; 8] {
    let mut out = [0u16; 8];
    let mut i = 0;
    while i < 4 {
        let b = addr.0[i].to_ne_bytes();
        out[2 * i] = u16::from_ne_bytes([b[0], b[1]]);
        out[2 * i + 1] = u16::from_ne_bytes([b[2], b[3]]);
        i += 1;
    }
    out
}

/// The two words of an IPv4 address word (`Addr::v4_word`), as they lie in memory.
#[inline(always)]
#[must_use]
pub fn v4_words(word: u32) -> [u16; 2] {
    let b = word.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

/// The full checksum of `data` (odd length padded with a zero byte), starting from `sum`:
/// for tests and for building expected packets.
#[must_use]
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = add(sum, u16::from_ne_bytes([c[0], c[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = add(sum, u16::from_ne_bytes([*last, 0]));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 header with a correct checksum (from RFC 1071's usual example shape).
    fn header(dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 172, 16, 10, 99, 0, 0, 0, 0,
        ];
        h[16..20].copy_from_slice(&dst);
        let c = !fold(sum_bytes(0, &h));
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn full_checksum_of_a_correct_header_is_zero() {
        assert_eq!(!fold(sum_bytes(0, &header([172, 16, 10, 12]))), 0);
    }

    #[test]
    fn incremental_update_equals_full_computation() {
        for (old, new) in [
            ([172, 16, 10, 12], [10, 1, 0, 7]),
            ([0, 0, 0, 0], [255, 255, 255, 255]),
            ([255, 255, 255, 255], [0, 0, 0, 1]),
            ([192, 0, 2, 10], [192, 0, 2, 10]),
        ] {
            let before = header(old);
            let check = u16::from_ne_bytes([before[10], before[11]]);
            let updated = update(
                check,
                &v4_words(u32::from_ne_bytes(old)),
                &v4_words(u32::from_ne_bytes(new)),
            );
            let expected = header(new);
            assert_eq!(
                updated.to_ne_bytes(),
                [expected[10], expected[11]],
                "{old:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn address_update_equals_the_word_update() {
        let v4 = |o: [u8; 4]| crate::Addr::from_v4_octets(o);
        let v6 = |o: [u8; 16]| crate::Addr::from_v6_octets(o);
        let cases = [
            (
                "v4 to v4",
                v4([203, 0, 113, 7]),
                v4([10, 201, 0, 10]),
                0x1c46,
            ),
            ("v4, check 0", v4([192, 0, 2, 1]), v4([10, 0, 0, 1]), 0),
            (
                "v4, check ffff",
                v4([192, 0, 2, 1]),
                v4([10, 0, 0, 1]),
                0xffff,
            ),
            (
                "same address",
                v4([192, 0, 2, 1]),
                v4([192, 0, 2, 1]),
                0x1234,
            ),
            (
                "v6 to v6",
                v6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                v6([
                    0xfd, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
                ]),
                0xbeef,
            ),
            ("all ones to zero", v6([0xff; 16]), v6([0; 16]), 0x0001),
        ];
        for (name, old, new, check) in cases {
            assert_eq!(
                update_addr(check, &old, &new),
                update(check, &addr_words(&old), &addr_words(&new)),
                "{name}"
            );
        }
    }

    #[test]
    fn address_words_cover_all_bytes() {
        let a = crate::Addr::from_v4_octets([10, 1, 2, 3]);
        let words = addr_words(&a);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[2 * i..2 * i + 2].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, a.octets());
    }
}
