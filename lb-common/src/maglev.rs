//! Maglev consistent hashing for the north-south datapath (`lb run --lb-algorithm maglev`):
//! the table's storage, shared by the agent (which builds the tables) and the XDP program
//! (which looks a new flow up in them), and the flow hash both sides must agree on.
//!
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
//! section 3.4: each external frontend gets a lookup table of `M` entries (`M` prime,
//! [`DEFAULT_TABLE_SIZE`] as Cilium's `--bpf-lb-maglev-table-size`), each entry naming one
//! backend, filled from per-backend permutations so that every backend holds `M/N` entries
//! (+-1) and a change of the backend set moves few entries. A new flow takes the entry at
//! `flow_hash % M`; connection tracking keeps it there afterwards. The agent builds the table
//! from the backends' addresses and ports only (`lb-userspace/src/maglev.rs`), and the flow
//! hash leaves out everything node-specific, so two nodes with the same endpoints pick the
//! same backend for the same flow.
//!
//! Storage: [`MAGLEV`] is a hash map keyed by (frontend id, chunk) whose value is
//! [`CHUNK`] consecutive entries ([`MaglevChunk`]); a lookup is one hash lookup. Each entry is
//! an index into the frontend's external slot range (`EXT_SLOT_BASE + index`, this node's
//! backends first, as `Frontend::ext_local` says), so the XDP program then reads the backend
//! from `LB_SLOTS` exactly as for a random pick. `M` itself is in `LB_META` at
//! [`crate::maps::META_MAGLEV_TABLE_SIZE`] (0: no tables, random choice).

use crate::Addr;

/// Pinned name of the Maglev table map.
pub const MAGLEV: &str = "LB_MAGLEV";

/// Entries per [`MaglevChunk`] (a power of two, so the XDP program bounds an index by a mask).
pub const CHUNK: u32 = 1024;

/// Cilium's default table size (`--bpf-lb-maglev-table-size`).
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// The table sizes Cilium accepts (`pkg/maglev`: primes, each about twice the previous);
/// `lb run --maglev-table-size` takes one of them.
pub const ALLOWED_TABLE_SIZES: [u32; 10] = [
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
];

/// Chunks of one table of `m` entries.
#[must_use]
pub const fn chunks(m: u32) -> u32 {
    m.div_ceil(CHUNK)
}

/// Capacity of [`MAGLEV`] in chunks: 4 096 external frontends at the default table size
/// (16 chunks each, 4 KiB of entries per chunk, 64 KiB per table), or 512 at the largest.
/// Preallocation is off, so memory follows the tables that exist.
pub const MAX_CHUNKS: u32 = 1 << 16;

/// Key of [`MAGLEV`]: one chunk of one frontend's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// [`crate::maps::Frontend::id`].
    pub id: u32,
    /// Table positions `chunk * CHUNK .. (chunk + 1) * CHUNK`.
    pub chunk: u32,
}
const _: () = assert!(size_of::<MaglevKey>() == 8);

/// Value of [`MAGLEV`]: [`CHUNK`] table entries, each an index into the frontend's external
/// slots (`0..Frontend::ext_count`, host order). Positions past `M` in the last chunk are
/// [`NO_ENTRY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevChunk {
    pub entries: [u32; CHUNK as usize],
}
const _: () = assert!(size_of::<MaglevChunk>() == 4 * CHUNK as usize);

impl Default for MaglevChunk {
    fn default() -> Self {
        Self {
            entries: [NO_ENTRY; CHUNK as usize],
        }
    }
}

/// A table position that names no backend (past `M`).
pub const NO_ENTRY: u32 = u32::MAX;

/// The fixed seed of [`flow_hash`]: the same on every node and in every version (Cilium
/// takes its seed from the cluster configuration; lb has none to share, so it is a constant).
pub const FLOW_HASH_SEED: u32 = 0x6c62_6d67;

/// Bob Jenkins' lookup3 `final` mix of three words (the kernel's `__jhash_final`).
#[inline(always)]
const fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// lookup3's `mix` of three words (the kernel's `__jhash_mix`).
#[inline(always)]
const fn jhash_mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(4);
    b = b.wrapping_add(a);
    (a, b, c)
}

/// The hash of a new flow that picks its table position: lookup3 (the kernel's `jhash2`)
/// over the client address (16 bytes, IPv4-mapped for IPv4), the source and destination
/// ports and the protocol, with [`FLOW_HASH_SEED`].
///
/// The destination address is left out on purpose: a NodePort's destination is each node's
/// own address, and a flow that an upstream load balancer moves from one node to another keeps
/// everything else. Words are taken in network byte order as they sit in memory, so the hash
/// is the same on every little-endian node (BPF is little-endian here).
#[inline(always)]
#[must_use]
pub const fn flow_hash(src: &Addr, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let w = src.0;
    // 6 words: the address, the ports, the protocol; lookup3 with length 6 * 4.
    let init = 0xdead_beef_u32
        .wrapping_add(6 << 2)
        .wrapping_add(FLOW_HASH_SEED);
    let (a, b, c) = jhash_mix(
        init.wrapping_add(w[0]),
        init.wrapping_add(w[1]),
        init.wrapping_add(w[2]),
    );
    let ports = (sport_be as u32) | ((dport_be as u32) << 16);
    jhash_final(
        a.wrapping_add(w[3]),
        b.wrapping_add(ports),
        c.wrapping_add(proto as u32),
    )
}

/// The table position of a flow hash in a table of `m` entries, as (chunk, index in chunk).
#[inline(always)]
#[must_use]
pub const fn position(hash: u32, m: u32) -> (u32, u32) {
    let pos = hash % m;
    (pos / CHUNK, pos % CHUNK)
}

#[cfg(feature = "user")]
mod pod {
    use super::{MaglevChunk, MaglevKey};

    // SAFETY: #[repr(C)], integers only, no padding (size assertions above).
    unsafe impl aya::Pod for MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MaglevChunk {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_sizes_are_prime_and_fit_the_chunks() {
        for m in ALLOWED_TABLE_SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
            assert!(chunks(m) * CHUNK >= m);
            assert!(chunks(m) <= MAX_CHUNKS);
        }
        assert!(ALLOWED_TABLE_SIZES.contains(&DEFAULT_TABLE_SIZE));
    }

    #[test]
    fn flow_hash_depends_on_each_field_and_is_fixed() {
        let a = Addr::from_v4_octets([10, 250, 1, 2]);
        let b = Addr::from_v4_octets([10, 250, 1, 3]);
        let h = flow_hash(&a, 40_000u16.to_be(), 30_080u16.to_be(), 6);
        assert_ne!(h, flow_hash(&b, 40_000u16.to_be(), 30_080u16.to_be(), 6));
        assert_ne!(h, flow_hash(&a, 40_001u16.to_be(), 30_080u16.to_be(), 6));
        assert_ne!(h, flow_hash(&a, 40_000u16.to_be(), 30_081u16.to_be(), 6));
        assert_ne!(h, flow_hash(&a, 40_000u16.to_be(), 30_080u16.to_be(), 17));
        // Pinned: a change of this value changes which backend every node picks, so it must
        // be deliberate (and all nodes upgraded together).
        assert_eq!(h, FLOW_HASH_PINNED, "{h}");
    }

    const FLOW_HASH_PINNED: u32 = 2_493_051_314;

    #[test]
    fn flow_hash_spreads_source_ports() {
        let a = Addr::from_v4_octets([10, 250, 1, 2]);
        let m = 251;
        let mut hits = [0u32; 251];
        for port in 0..25_100u16 {
            hits[(flow_hash(&a, port.to_be(), 80u16.to_be(), 6) % m) as usize] += 1;
        }
        // 100 per position on average; a decent hash keeps every one within 50..150.
        assert!(hits.iter().all(|&n| (50..150).contains(&n)), "{hits:?}");
    }

    #[test]
    fn positions_split_into_chunks() {
        assert_eq!(position(0, 16_381), (0, 0));
        assert_eq!(position(1_024, 16_381), (1, 0));
        assert_eq!(position(16_380, 16_381), (15, 1_020));
        assert_eq!(position(16_381, 16_381), (0, 0));
    }
}
