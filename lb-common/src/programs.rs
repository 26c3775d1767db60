//! The programs' names: the function names of the entry points in lb-ebpf/src/main.rs (the
//! ELF symbol is the program name, and the kernel keeps its first 15 bytes,
//! `BPF_OBJ_NAME_LEN - 1`). The agent loads and attaches them by these names and recognises
//! its own attachments by [`PREFIX`]; renaming an entry point means renaming it here.

/// What every lb program name starts with, on a cgroup or an interface.
pub const PREFIX: &str = "lb_";

/// `cgroup/connect4`: TCP and connected-UDP connects to a Service address (IPv4).
pub const CONNECT4: &str = "lb_connect4";
/// `cgroup/connect6`: the same for IPv6 (and IPv4-mapped addresses).
pub const CONNECT6: &str = "lb_connect6";
/// `cgroup/sendmsg4`: unconnected UDP sends to a Service address (IPv4).
pub const SENDMSG4: &str = "lb_sendmsg4";
/// `cgroup/sendmsg6`: the same for IPv6.
pub const SENDMSG6: &str = "lb_sendmsg6";
/// `cgroup/recvmsg4`: unconnected UDP replies shown as coming from the Service (IPv4).
pub const RECVMSG4: &str = "lb_recvmsg4";
/// `cgroup/recvmsg6`: the same for IPv6.
pub const RECVMSG6: &str = "lb_recvmsg6";
/// `cgroup/getpeername4`: getpeername(2) shows the Service, not the backend (IPv4).
pub const GETPEERNAME4: &str = "lb_getpeername4";
/// `cgroup/getpeername6`: the same for IPv6.
pub const GETPEERNAME6: &str = "lb_getpeername6";
/// `cgroup/sock_release`: a closing UDP socket's `LB_UDP_SOCKS` entry goes with it.
pub const SOCK_RELEASE: &str = "lb_sock_release";
/// XDP on the `--xdp-iface` interfaces: the north-south datapath's ingress.
pub const XDP: &str = "lb_xdp";
/// tc egress on the same interfaces: reverse translation of replies.
pub const TC_EGRESS: &str = "lb_tc_egress";

/// Every name, for checks.
pub const ALL: [&str; 11] = [
    CONNECT4,
    CONNECT6,
    SENDMSG4,
    SENDMSG6,
    RECVMSG4,
    RECVMSG6,
    GETPEERNAME4,
    GETPEERNAME6,
    SOCK_RELEASE,
    XDP,
    TC_EGRESS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_share_the_prefix() {
        for name in ALL {
            assert!(name.starts_with(PREFIX), "{name}");
            // BPF_OBJ_NAME_LEN is 16 with the NUL: longer names are cut in bpftool's view.
            assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
        }
    }
}
