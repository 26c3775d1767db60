//! Socket-slot tables: a socket's state in the slot its cookie picks, owned with a
//! compare-and-exchange (`lb_common::maps::SOCK_SLOTS` has the protocol). One table per
//! protocol: `LB_TCP_OWNERS`/`LB_TCP_SOCKS` and `LB_UDP_OWNERS`/`LB_UDP_SOCKS`.

use aya_ebpf::maps::Array;
use lb_common::maps::{SLOT_CLAIMING, sock_slot};

/// An owners array and the state array beside it, index for index.
pub struct Slots<T: 'static> {
    pub owners: &'static Array<u64>,
    pub states: &'static Array<T>,
}

impl<T: Copy> Slots<T> {
    /// The state of the socket with cookie `cookie` if it owns its slot. The pointer is
    /// valid while the program runs; only the socket's own syscalls write it (under the
    /// socket lock), and the slot is freed only when the socket closes.
    #[inline(always)]
    pub fn owned(&self, cookie: u64) -> Option<*mut T> {
        let slot = sock_slot(cookie);
        let owner = self.owners.get_ptr_mut(slot)?;
        // SAFETY: a pointer into the array's value, read once.
        if unsafe { owner.read_volatile() } != cookie {
            return None;
        }
        self.states.get_ptr_mut(slot)
    }

    /// Claims the slot of the socket with cookie `cookie` if it is free and writes `value`
    /// there; whether it did. The owner says "claiming" ([`SLOT_CLAIMING`]) until the state
    /// is whole: two sockets of one slot racing here cannot both win, and the agent, which
    /// reads owner, state and owner again, never takes the previous owner's state for this
    /// socket's.
    #[inline(always)]
    pub fn claim(&self, cookie: u64, value: &T) -> bool {
        let slot = sock_slot(cookie);
        let (Some(owner), Some(state)) =
            (self.owners.get_ptr_mut(slot), self.states.get_ptr_mut(slot))
        else {
            return false;
        };
        // SAFETY: an aligned u64 in the array's value, valid while the program runs.
        if unsafe { compare_exchange(owner, 0, cookie | SLOT_CLAIMING) } != 0 {
            return false;
        }
        // SAFETY: the slot is this socket's now; only its own syscalls touch the state. The
        // owner is published with a second compare-and-exchange, not a plain store: BPF's
        // atomic instructions with a fetch are full barriers on every architecture, so a
        // reader that sees the plain cookie sees the whole state (a plain store may be
        // reordered before the state's on arm64).
        unsafe {
            *state = *value;
            compare_exchange(owner, cookie | SLOT_CLAIMING, cookie);
        }
        true
    }

    /// Frees the slot of the closing socket with cookie `cookie` if it owns it; whether it
    /// did. Only the owner changes a held slot's owner (another socket's claim needs 0), so
    /// the read and the store need no atomic pair; each is one 64-bit access.
    #[inline(always)]
    pub fn release(&self, cookie: u64) -> bool {
        let Some(owner) = self.owners.get_ptr_mut(sock_slot(cookie)) else {
            return false;
        };
        // SAFETY: an aligned u64 in the array's value, valid while the program runs.
        unsafe {
            if owner.read_volatile() != cookie {
                return false;
            }
            owner.write_volatile(0);
        }
        true
    }
}

/// Sets `*owner` from `expected` to `new` atomically, and returns what it held (BPF
/// `cmpxchg_64`, a full barrier: Rust's BPF target has no compare-and-exchange, though the
/// kernel has had the instruction since 5.12).
///
/// # Safety
/// `owner` points to an aligned u64 in a map value, valid while the program runs.
#[inline(always)]
unsafe fn compare_exchange(owner: *mut u64, expected: u64, new: u64) -> u64 {
    let mut previous: u64 = expected;
    // SAFETY: one atomic instruction on the caller's valid, aligned pointer; r0 holds the
    // expected value in and the value found out.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({owner} + 0, r0, {new})",
            owner = in(reg) owner,
            new = in(reg) new,
            inout("r0") previous,
            options(nostack),
        );
    }
    previous
}
