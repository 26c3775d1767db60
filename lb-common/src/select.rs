//! Backend selection, as the programs run it for each new connection.

/// Nanoseconds per second.
const NANOS: u64 = 1_000_000_000;

/// The slot for a new connection: uniform over `0..count` given a random `u32`
/// (`bpf_get_prandom_u32`). `count` must not be 0 (the caller refuses those frontends first).
#[inline(always)]
#[must_use]
pub const fn slot_for(random: u32, count: u32) -> u32 {
    // The modulo bias is below count / 2^32: at most 1e-4 for 400 000 backends.
    random % count
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
        let mut seen = [0u32; 3];
        for random in 0..300u32 {
            seen[slot_for(random, 3) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 100), "{seen:?}");
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
