//! Reading and writing the destination of a `bpf_sock_addr`, per address family.
//!
//! The verifier allows only 4-byte accesses to `user_ip6` and `user_port`, so each word is
//! read and written on its own with volatile accesses the compiler cannot merge.

use aya_ebpf::bindings::bpf_sock_addr;
use lb_common::Addr;

/// A socket address family as a sock_addr hook sees it.
pub trait Family {
    /// The destination (connect, sendmsg) or peer/source (getpeername, recvmsg) address.
    fn addr(sa: *const bpf_sock_addr) -> Addr;
    /// Replaces it. Fails if `addr` cannot be expressed in this family (v6 for a v4 socket).
    fn set_addr(sa: *mut bpf_sock_addr, addr: Addr) -> Result<(), ()>;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    #[inline(always)]
    fn addr(sa: *const bpf_sock_addr) -> Addr {
        // SAFETY: `sa` is the program's context; user_ip4 is readable in every v4 hook.
        Addr::from_v4_word(unsafe { core::ptr::addr_of!((*sa).user_ip4).read_volatile() })
    }

    #[inline(always)]
    fn set_addr(sa: *mut bpf_sock_addr, addr: Addr) -> Result<(), ()> {
        if !addr.is_v4() {
            return Err(());
        }
        // SAFETY: as above; user_ip4 is writable in connect/sendmsg/recvmsg/getpeername.
        unsafe { core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(addr.v4_word()) };
        Ok(())
    }
}

impl Family for V6 {
    #[inline(always)]
    fn addr(sa: *const bpf_sock_addr) -> Addr {
        // SAFETY: `sa` is the program's context; user_ip6 is readable in every v6 hook.
        let word = |i: usize| unsafe { core::ptr::addr_of!((*sa).user_ip6[i]).read_volatile() };
        Addr::from_v6_words([word(0), word(1), word(2), word(3)])
    }

    #[inline(always)]
    fn set_addr(sa: *mut bpf_sock_addr, addr: Addr) -> Result<(), ()> {
        // A v4 backend is written IPv4-mapped: the socket is dual-stack, as it was when the
        // client connected to the mapped Service address.
        for i in 0..4 {
            // SAFETY: as above; user_ip6 is writable in 4-byte words.
            unsafe { core::ptr::addr_of_mut!((*sa).user_ip6[i]).write_volatile(addr.0[i]) };
        }
        Ok(())
    }
}

/// The port, in network byte order (the low 16 bits of `user_port`).
#[inline(always)]
pub fn port(sa: *const bpf_sock_addr) -> u16 {
    // SAFETY: `sa` is the program's context.
    let port = unsafe { core::ptr::addr_of!((*sa).user_port).read_volatile() };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "user_port holds a __be16 zero-extended"
    )]
    let port = port as u16;
    port
}

/// Replaces the port (network byte order).
#[inline(always)]
pub fn set_port(sa: *mut bpf_sock_addr, port_be: u16) {
    // SAFETY: `sa` is the program's context; user_port is writable in these hooks.
    unsafe { core::ptr::addr_of_mut!((*sa).user_port).write_volatile(u32::from(port_be)) };
}

/// The socket's IP protocol (`IPPROTO_*`).
#[inline(always)]
pub fn protocol(sa: *const bpf_sock_addr) -> u32 {
    // SAFETY: `sa` is the program's context.
    unsafe { core::ptr::addr_of!((*sa).protocol).read_volatile() }
}
