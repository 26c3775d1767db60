//! Backend selection, as the programs run it for each new connection.

/// Nanoseconds per second.
const NANOS: u64 = 1_000_000_000;

/// The slot for a new connection: uniform over `0..count` given a random `u32`
/// (`bpf_get_prandom_u32`), as `floor(random * count / 2^32)` (Lemire's multiply-shift range
/// reduction): a multiplication where `random % count` is a division, which the CPU takes
/// 10-40 cycles for, on every new connection and every new north-south flow. `count` must
/// not be 0 (the caller refuses those frontends first).
#[inline(always)]
#[must_use]
pub const fn slot_for(random: u32, count: u32) -> u32 {
    // Each slot gets floor or ceil of 2^32 / count of the random values, as with a modulo:
    // the bias is below count / 2^32, at most 1e-4 for 400 000 backends.
    ((random as u64 * count as u64) >> 32) as u32
}

/// Whether an affinity entry last used at `last_used_ns` still holds at `now_ns` for a
/// timeout of `timeout_s` seconds: kube-proxy keeps a client on its backend until it has been
/// idle for the whole timeout.
#[inline(always)]
#[must_use]
pub const fn affinity_fresh(now_ns: u64, last_used_ns: u64, timeout_s: u32) -> bool {
    // A timestamp from the future (another CPU wrote it a moment ago) is fresh.
    now_ns.saturating_sub(last_used_ns) < (timeout_s as u64) * NANOS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_in_range() {
        for count in [1, 2, 3, 10, 1000] {
            for random in [0, 1, 7, u32::MAX, u32::MAX - 1, 123_456_789] {
                assert!(slot_for(random, count) < count);
            }
        }
    }

    #[test]
    fn slots_are_spread() {
        // Random values evenly over the whole u32 range: each slot gets its share, for counts
        // that divide 2^32 and counts that do not.
        for count in [2u32, 3, 10, 1000] {
            let mut all = [0u32; 1000];
            let seen = &mut all[..count as usize];
            let draws = 300 * u64::from(count);
            for i in 0..draws {
                let random = (i << 32) / draws;
                seen[slot_for(random as u32, count) as usize] += 1;
            }
            assert!(
                seen.iter().all(|&n| n.abs_diff(300) <= 1),
                "{count}: {seen:?}"
            );
        }
        // Every slot is reachable, from both ends of the range.
        assert_eq!(slot_for(0, 7), 0);
        assert_eq!(slot_for(u32::MAX, 7), 6);
    }

    #[test]
    fn affinity_expires_after_idle_timeout() {
        let t0 = 5 * NANOS;
        assert!(affinity_fresh(t0, t0, 10));
        assert!(affinity_fresh(t0 + 10 * NANOS - 1, t0, 10));
        assert!(!affinity_fresh(t0 + 10 * NANOS, t0, 10));
        assert!(!affinity_fresh(t0 + 3 * 3600 * NANOS, t0, 10_800));
        assert!(affinity_fresh(t0 + 3 * 3600 * NANOS - 1, t0, 10_800));
    }

    #[test]
    fn affinity_from_the_future_is_fresh() {
        assert!(affinity_fresh(NANOS, 2 * NANOS, 1));
    }

    #[test]
    fn max_timeout_does_not_overflow() {
        assert!(affinity_fresh(u64::MAX, u64::MAX - 1, u32::MAX));
    }
}
