//! Helpers shared by the unit tests.

/// A deterministic pseudo-random source for randomized tests (xorshift64): `next(n)` is in
/// `0..n`. The same seed gives the same sequence, so a failing step can be replayed.
pub fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
