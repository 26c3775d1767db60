//! `spec.loadBalancerSourceRanges`: which clients may open a flow to a LoadBalancer IP.
//!
//! kube-proxy's firewall (the iptables proxier's `KUBE-FW-*` chain, the nftables proxier's
//! `firewall-ips` map) filters new connections to the Service's LoadBalancer ingress IPs only,
//! never its NodePorts, externalIPs or ClusterIP; Cilium's `lb4_src_range_ok` does the same
//! with an LPM trie keyed by service and client address, as here. The agent sets
//! `FRONTEND_SRC_RANGES` only on such frontends, so every other packet pays one flag test.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    Addr,
    maps::Frontend,
    nat::{FRONTEND_SRC_RANGES, SRC_RANGE_FULL, SrcRangeKey},
};

use super::LB_SRC_RANGES;

/// Whether a new flow from `src` to `frontend` is admitted: always, unless the frontend has
/// source ranges and none of them holds `src`.
#[inline(always)]
pub fn admits(frontend: &Frontend, src: &Addr) -> bool {
    frontend.flags & FRONTEND_SRC_RANGES == 0 || in_ranges(frontend.id, src)
}

/// The trie lookup, a BPF-to-BPF call of its own (its key stays off the caller's frame).
#[inline(never)]
fn in_ranges(id: u32, src: &Addr) -> bool {
    let key = Key::new(SRC_RANGE_FULL, SrcRangeKey { id, addr: *src });
    LB_SRC_RANGES.get(&key).is_some()
}
