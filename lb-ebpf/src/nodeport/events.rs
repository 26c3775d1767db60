//! Rare events of the north-south datapath, logged with aya-log (the agent forwards the
//! records into its own logs): a conntrack insert that failed (map full or a racing writer),
//! a FIB lookup that failed, a rewrite that failed after the packet parsed. Each is its own
//! BPF-to-BPF function, called only on those branches: the per-packet path carries a call
//! instruction it does not take, and the log record's frame is not on the stack of the
//! callers.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::{error, warn};

/// A conntrack entry could not be stored (`LB_CT4` or `LB_CT` full of live entries, or an
/// update error);
/// `frontend` is the frontend id, `proto` the IP protocol.
#[inline(never)]
pub fn ct_insert_failed(ctx: &XdpContext, frontend: u32, proto: u8) {
    error!(
        ctx,
        "xdp: conntrack insert failed (frontend id {}, protocol {}): LB_CT4/LB_CT full or an update error",
        frontend,
        proto
    );
}

/// No free SNAT port for a new flow to a backend on another node after every try.
#[inline(never)]
pub fn no_snat_port(ctx: &XdpContext, frontend: u32) {
    warn!(
        ctx,
        "xdp: no free SNAT port for a new flow of frontend id {} (ports 61000-65535 busy)",
        frontend
    );
}

/// `bpf_fib_lookup` failed with `ret` (`BPF_FIB_LKUP_RET_*`): no route, forwarding disabled,
/// MTU exceeded...
#[inline(never)]
pub fn fib_failed(ctx: &XdpContext, ret: u32) {
    warn!(
        ctx,
        "xdp: FIB lookup failed (BPF_FIB_LKUP_RET {}) for a translated packet", ret
    );
}

/// A packet that parsed could not be rewritten (an offset beyond what the program reaches).
#[inline(never)]
pub fn rewrite_failed(ctx: &XdpContext, l4: u32) {
    error!(
        ctx,
        "xdp: a parsed packet could not be rewritten (L4 header at offset {})", l4
    );
}
