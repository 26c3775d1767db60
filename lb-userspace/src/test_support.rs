//! Helpers shared by the unit tests.

use lb_common::{
    Addr,
    maps::{Backend, FrontendKey, IPPROTO_TCP},
};

/// TCP frontend `10.96.0.n:80`.
pub fn fkey(n: u8) -> FrontendKey {
    FrontendKey {
        addr: Addr::from_v4_octets([10, 96, 0, n]),
        port: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

/// Backend `10.1.0.n:8080`.
pub fn be(n: u8) -> Backend {
    Backend::new(Addr::from_v4_octets([10, 1, 0, n]), 8080u16.to_be())
}

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
