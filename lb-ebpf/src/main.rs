//! lb's kernel programs: Service translation at the socket, once per connection.
//!
//! Attached to the agent's cgroup: `connect4/6` (TCP and connected UDP) and `sendmsg4/6`
//! (unconnected UDP) send a Service address to a backend; `recvmsg4/6` and `getpeername4/6`
//! show the Service address back to the client; `sock_release` frees a closing socket's
//! slot. Each entry point is a thin wrapper over
//! [`xlate`], which does the work and returns what happened; the entry point turns that into
//! the syscall's verdict.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: the helpers take pointers"
)]

mod maps;
mod nodeport;
mod slots;
mod sock;
mod xlate;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};

use crate::{
    sock::{V4, V6},
    xlate::{Hook, Reverse},
};

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    xlate::forward::<V4>(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    xlate::forward::<V6>(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate::forward::<V4>(&ctx, Hook::SendMsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate::forward::<V6>(&ctx, Hook::SendMsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<V4>(&ctx, Reverse::RecvMsg)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<V6>(&ctx, Reverse::RecvMsg)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<V4>(&ctx, Reverse::GetPeerName)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    xlate::reverse::<V6>(&ctx, Reverse::GetPeerName)
}

/// A socket closes: its `LB_TCP_SOCKS` or `LB_UDP_SOCKS` slot, if it owns one, is free again.
/// Never refuses.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    xlate::released(&ctx);
    1
}

/// North-south: packets from outside the node to external frontends (`nodeport::xdp`).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    nodeport::xdp::ingress(&ctx)
}

/// North-south: backends' replies get their frontend back as source (`nodeport::tc`).
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    nodeport::tc::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here: eBPF programs cannot panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
