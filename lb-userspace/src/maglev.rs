//! Maglev lookup tables (`lb run --lb-algorithm maglev`): Eisenbud et al., "Maglev: A Fast
//! and Reliable Software Network Load Balancer", NSDI 2016, section 3.4, with equal weights.
//!
//! Each backend gets a permutation of the `M` table positions from two hashes of its name
//! (`offset`, `skip`); the backends then take turns claiming their next preferred free
//! position until the table is full. Every backend ends with `M/N` entries (+-1), and
//! removing or adding one backend moves little more than that backend's share.
//!
//! The name is the backend's address (16 bytes, IPv4-mapped for IPv4, network order) and
//! port (2 bytes, network order): no node name, no frontend id, nothing a restart changes.
//! The hash is FNV-1a (64 bit) of those 18 bytes, finalised by MurmurHash3's `fmix64` under
//! two fixed seeds (one for `offset`, one for `skip`), all specified here rather than taken
//! from a library whose output could change between versions. The backends take turns in a
//! canonical order (address, then port), so two nodes with the same endpoints build the same
//! table whatever order their sources listed them in. The XDP program hashes a new flow to a
//! position (`lb_common::maglev::flow_hash`), so both nodes send the flow to one backend.

use lb_common::{
    maglev::{ALLOWED_TABLE_SIZES, CHUNK, MaglevChunk, NO_ENTRY},
    maps::Backend,
};

/// Seeds of the two backend hashes.
const SEED_OFFSET: u64 = 0x6c62_2d6f_6666_7365;
const SEED_SKIP: u64 = 0x6c62_2d73_6b69_7021;

/// The backend-selection algorithm for traffic from outside the node (`--lb-algorithm`,
/// Cilium's `--bpf-lb-algorithm` names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// A random backend per new flow.
    #[default]
    Random,
    /// Maglev consistent hashing: the same backend for a flow on every node.
    Maglev,
}

/// `--maglev-table-size` that is not one of Cilium's primes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "maglev table size {0} is not allowed: use one of Cilium's primes {sizes} (M should be \
     well above 100 x the largest backend count of a Service)",
    sizes = ALLOWED_TABLE_SIZES.map(|m| m.to_string()).join(", ")
)]
pub struct BadTableSize(pub u32);

/// Parses and checks `--maglev-table-size`: one of [`ALLOWED_TABLE_SIZES`] (all prime, as the
/// permutations need).
pub fn parse_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if ALLOWED_TABLE_SIZES.contains(&m) {
        Ok(m)
    } else {
        Err(BadTableSize(m).to_string())
    }
}

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The bytes a backend is known by: address then port, network order.
fn name(backend: &Backend) -> [u8; 18] {
    let mut out = [0u8; 18];
    for (chunk, word) in out.chunks_exact_mut(4).zip(backend.addr.0) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    out[16..].copy_from_slice(&backend.port.to_ne_bytes());
    out
}

/// A backend's permutation of `0..m`: position `j` of it is `(offset + j * skip) % m`.
fn offset_skip(backend: &Backend, m: u32) -> (u32, u32) {
    let h = fnv1a64(&name(backend));
    let m = u64::from(m);
    // Both below m, so they fit u32.
    let offset = u32::try_from(fmix64(h ^ SEED_OFFSET) % m).unwrap_or(0);
    let skip = u32::try_from(fmix64(h ^ SEED_SKIP) % (m - 1) + 1).unwrap_or(1);
    (offset, skip)
}

/// The canonical turn order: address bytes, then port (as numbers).
fn canonical(backend: &Backend) -> ([u8; 16], u16) {
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&name(backend)[..16]);
    (addr, u16::from_be(backend.port))
}

/// The lookup table of `m` entries (`m` prime, at least 2) for `backends`: entry `p` is the
/// index in `backends` of the backend that serves table position `p`. Empty for no backends.
/// The result depends on the set of backends only, not on their order in the slice.
#[must_use]
pub fn table(backends: &[Backend], m: u32) -> Vec<u32> {
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| canonical(&backends[i]));
    // Each backend's next preferred position, advanced by its skip (mod m) after each try.
    let mut perms: Vec<(u32, u32)> = order
        .iter()
        .map(|&i| offset_skip(&backends[i], m))
        .collect();
    let mut entries = vec![NO_ENTRY; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (turn, &i) in order.iter().enumerate() {
            let (pos, skip) = &mut perms[turn];
            loop {
                let here = *pos as usize;
                // pos + skip < 2m fits u32 for every allowed m.
                *pos += *skip;
                if *pos >= m {
                    *pos -= m;
                }
                if entries[here] == NO_ENTRY {
                    entries[here] = u32::try_from(i).unwrap_or(NO_ENTRY);
                    break;
                }
            }
            filled += 1;
            if filled == entries.len() {
                break 'fill;
            }
        }
    }
    entries
}

/// The table cut into the chunks `LB_MAGLEV` stores (the last one padded with
/// [`NO_ENTRY`]).
#[must_use]
pub fn chunks(table: &[u32]) -> Vec<MaglevChunk> {
    table
        .chunks(CHUNK as usize)
        .map(|part| {
            let mut chunk = MaglevChunk::default();
            chunk.entries[..part.len()].copy_from_slice(part);
            chunk
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lb_common::{Addr, maglev::DEFAULT_TABLE_SIZE};
    use rstest::rstest;

    use super::*;

    fn be(i: u32) -> Backend {
        let [a, b, c, d] = (0x0a01_0000 + i).to_be_bytes();
        Backend::new(Addr::from_v4_octets([a, b, c, d]), 8080u16.to_be())
    }

    fn backends(n: u32) -> Vec<Backend> {
        (1..=n).map(be).collect()
    }

    /// The backend of every position.
    fn resolved(set: &[Backend], m: u32) -> Vec<Backend> {
        table(set, m).iter().map(|&i| set[i as usize]).collect()
    }

    #[rstest]
    #[case::one_backend_takes_all(1, 251)]
    #[case::two_backends(2, 251)]
    #[case::three_in_the_smallest_table(3, 251)]
    #[case::ten_default_size(10, DEFAULT_TABLE_SIZE)]
    #[case::hundred_default_size(100, DEFAULT_TABLE_SIZE)]
    #[case::more_backends_than_positions(300, 251)]
    fn every_position_names_a_backend(#[case] n: u32, #[case] m: u32) {
        let set = backends(n);
        let t = table(&set, m);
        assert_eq!(t.len(), m as usize);
        assert!(t.iter().all(|&i| (i as usize) < set.len()));
    }

    #[rstest]
    #[case::two(2, 251)]
    #[case::seven(7, 1_021)]
    #[case::ten(10, DEFAULT_TABLE_SIZE)]
    #[case::hundred(100, DEFAULT_TABLE_SIZE)]
    #[case::v6_and_ports(0, DEFAULT_TABLE_SIZE)]
    fn each_backend_gets_its_share(#[case] n: u32, #[case] m: u32) {
        let set = if n == 0 {
            (0..16u16)
                .map(|i| {
                    let mut o = [0u8; 16];
                    o[0] = 0xfd;
                    o[15] = (i % 4) as u8 + 1;
                    Backend::new(Addr::from_v6_octets(o), (8080 + i / 4).to_be())
                })
                .collect()
        } else {
            backends(n)
        };
        let mut counts = vec![0u32; set.len()];
        for i in table(&set, m) {
            counts[i as usize] += 1;
        }
        let share = m / u32::try_from(set.len()).unwrap();
        for c in counts {
            // The paper's fill gives each backend floor(M/N) or ceil(M/N).
            assert!((share..=share + 1).contains(&c), "{c} vs {share}");
        }
    }

    #[test]
    fn the_order_of_the_backends_does_not_matter() {
        let set = backends(20);
        let mut shuffled = set.clone();
        shuffled.reverse();
        shuffled.swap(3, 11);
        assert_eq!(
            resolved(&set, DEFAULT_TABLE_SIZE),
            resolved(&shuffled, DEFAULT_TABLE_SIZE)
        );
    }

    #[test]
    fn a_table_is_fixed_for_its_backends() {
        // Pinned: every node and every version must build this same table; a change here
        // moves flows between nodes running different versions.
        let t = table(&backends(3), 251);
        let first: Vec<u32> = t.iter().take(12).copied().collect();
        assert_eq!(first, table(&backends(3), 251)[..12]);
        let digest = t
            .iter()
            .fold(0u64, |h, &i| h.wrapping_mul(31).wrapping_add(u64::from(i)));
        assert_eq!(
            digest, EXPECTED_DIGEST,
            "table of 3 backends, M=251: {first:?}"
        );
    }

    /// The digest of the table in `a_table_is_fixed_for_its_backends`.
    const EXPECTED_DIGEST: u64 = 9_413_502_276_505_833_534;

    /// Positions whose backend differs between two tables.
    fn moved(a: &[Backend], b: &[Backend]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    #[rstest]
    #[case::remove_one_of_ten(10, DEFAULT_TABLE_SIZE)]
    #[case::remove_one_of_hundred(100, DEFAULT_TABLE_SIZE)]
    #[case::remove_one_of_five_small_table(5, 1_021)]
    fn removing_a_backend_moves_mostly_its_own_positions(#[case] n: u32, #[case] m: u32) {
        let set = backends(n);
        let before = resolved(&set, m);
        let gone = set[n as usize / 2];
        let rest: Vec<Backend> = set.iter().copied().filter(|b| *b != gone).collect();
        let after = resolved(&rest, m);
        // Every position of the removed backend moves; of the others, Maglev moves few
        // (the paper's figure 7: a small fraction beyond the removed share).
        let own = before.iter().filter(|b| **b == gone).count();
        let others = moved(&before, &after) - own;
        assert!(
            others * 100 <= m as usize * 3,
            "{others} of the other positions moved ({own} were the removed backend's)"
        );
        eprintln!("n={n} m={m}: removed backend held {own}, {others} other positions moved");
    }

    #[rstest]
    #[case::add_to_nine(9, DEFAULT_TABLE_SIZE)]
    #[case::add_to_ninety_nine(99, DEFAULT_TABLE_SIZE)]
    fn adding_a_backend_takes_about_its_share(#[case] n: u32, #[case] m: u32) {
        let set = backends(n);
        let before = resolved(&set, m);
        let mut more = set.clone();
        more.push(be(n + 1));
        let after = resolved(&more, m);
        let new_share = after.iter().filter(|b| **b == be(n + 1)).count();
        let changed = moved(&before, &after);
        // Positions that changed hands: the new backend's, plus a small surplus.
        assert!(changed >= new_share);
        eprintln!("n={n} m={m}: {changed} positions moved, {new_share} to the new backend");
        assert!(
            (changed - new_share) * 100 <= m as usize * 3,
            "{changed} moved, {new_share} to the new backend"
        );
    }

    #[test]
    fn chunks_cover_the_table_and_pad_the_end() {
        let t = table(&backends(4), DEFAULT_TABLE_SIZE);
        let c = chunks(&t);
        assert_eq!(c.len(), 16);
        assert_eq!(
            c[15].entries[(DEFAULT_TABLE_SIZE % CHUNK) as usize],
            NO_ENTRY
        );
        assert_eq!(c[1].entries[0], t[CHUNK as usize]);
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for chunk in &c {
            for &e in &chunk.entries {
                *counts.entry(e).or_default() += 1;
            }
        }
        assert_eq!(
            counts[&NO_ENTRY],
            (16 * CHUNK - DEFAULT_TABLE_SIZE) as usize
        );
    }

    #[rstest]
    #[case::default("16381", Ok(16_381))]
    #[case::smallest("251", Ok(251))]
    #[case::largest("131071", Ok(131_071))]
    #[case::prime_not_in_the_list("16369", Err(()))]
    #[case::not_prime("16384", Err(()))]
    #[case::zero("0", Err(()))]
    #[case::not_a_number("big", Err(()))]
    fn table_sizes(#[case] arg: &str, #[case] want: Result<u32, ()>) {
        let got = parse_table_size(arg);
        match want {
            Ok(m) => assert_eq!(got, Ok(m)),
            Err(()) => {
                let e = got.unwrap_err();
                assert!(e.contains(arg), "{e}");
            }
        }
    }
}
