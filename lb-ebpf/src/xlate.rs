//! Service translation: the work behind every hook.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    programs::SockAddrContext,
};
use lb_common::{
    maps::{
        Affinity, AffinityKey, Backend, Frontend, FrontendKey, MemberKey, RevNat, RevNatKey,
        SlotKey, SockXlate, UdpFlowKey,
    },
    select::{affinity_fresh, slot_for},
    stats,
};

use crate::{
    maps::{
        LB_AFFINITY, LB_FRONTENDS, LB_MEMBERS, LB_REVNAT, LB_SLOTS, LB_SOCKS, LB_UDP_FLOWS, count,
    },
    sock::{self, Family},
};

/// Return values of a cgroup sock_addr program.
const SYS_REJECT: i32 = 0;
const SYS_PROCEED: i32 = 1;
/// The errno a refused connection gets: what kube-proxy's `REJECT` rule gives a client of a
/// Service without endpoints.
const ECONNREFUSED: i32 = 111;

/// Which forward hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// connect(): TCP, connected UDP.
    Connect,
    /// sendmsg() with an address: unconnected UDP.
    SendMsg,
}

/// What [`try_forward`] decided.
enum Verdict {
    /// Not a Service address: the syscall goes on untouched.
    Pass,
    /// Sent to a backend; the counter to bump.
    Translated(u32),
    /// The syscall fails with ECONNREFUSED; the counter says why.
    Refuse(u32),
}

/// connect/sendmsg: a Service address becomes one of its backends.
#[inline(always)]
pub fn forward<F: Family>(ctx: &SockAddrContext, hook: Hook) -> i32 {
    match try_forward::<F>(ctx, hook) {
        Verdict::Pass => SYS_PROCEED,
        Verdict::Translated(stat) => {
            count(stat);
            SYS_PROCEED
        }
        Verdict::Refuse(stat) => {
            count(stat);
            // SAFETY: a helper call; it only sets the syscall's return value (kernel >= 5.18).
            // It cannot fail for a cgroup program with a valid errno.
            let _ignored = unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
    }
}

#[inline(always)]
fn try_forward<F: Family>(ctx: &SockAddrContext, hook: Hook) -> Verdict {
    let sa = ctx.sock_addr;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "IPPROTO_* values fit a byte"
    )]
    let proto = sock::protocol(sa) as u8;
    let key = FrontendKey {
        addr: F::addr(sa),
        port: sock::port(sa),
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(&key) }).copied() else {
        return Verdict::Pass;
    };
    if frontend.count == 0 {
        return Verdict::Refuse(stats::REFUSED_NO_BACKEND);
    }
    // Only unconnected UDP needs the socket's cookie (connected sockets keep their state in
    // socket storage).
    let cookie = match hook {
        // SAFETY: helper call on the program's own context.
        Hook::SendMsg => unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        Hook::Connect => 0,
    };
    let backend = match choose(ctx, &key, &frontend, cookie, hook) {
        Ok(backend) => backend,
        Err(stat) => return Verdict::Refuse(stat),
    };
    if F::set_addr(sa, backend.addr).is_err() {
        return Verdict::Refuse(stats::ERR_FAMILY);
    }
    sock::set_port(sa, backend.port);
    let service = RevNat {
        addr: key.addr,
        port: key.port,
        _pad: [0; 2],
        id: frontend.id,
    };
    match hook {
        Hook::Connect => remember_socket(ctx, backend, service),
        Hook::SendMsg => remember_datagram(cookie, &backend, &service),
    }
    Verdict::Translated(match hook {
        Hook::Connect => stats::CONNECT_XLATED,
        Hook::SendMsg => stats::SENDMSG_XLATED,
    })
}

/// A connected socket: its backend and Service go in its own storage.
#[inline(always)]
fn remember_socket(ctx: &SockAddrContext, backend: Backend, service: RevNat) {
    match LB_SOCKS.get_ptr(ctx, true) {
        // SAFETY: this socket's own storage; only this socket's syscalls touch it.
        Some(state) => unsafe { *state = SockXlate { backend, service } },
        None => count(stats::ERR_REVNAT_UPDATE),
    }
}

/// An unconnected UDP socket can send to many Services: (socket, backend) -> Service goes in
/// the LRU map, skipping the write when the entry is already there (the lookup also marks it
/// used for the LRU).
#[inline(always)]
fn remember_datagram(cookie: u64, backend: &Backend, service: &RevNat) {
    let rkey = RevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    // SAFETY: the value is only compared.
    if let Some(existing) = unsafe { LB_REVNAT.get(&rkey) }
        && existing == service
    {
        return;
    }
    if LB_REVNAT.insert(&rkey, service, 0).is_err() {
        count(stats::ERR_REVNAT_UPDATE);
    }
}

/// The backend for this operation: the client's affinity backend, the socket's UDP flow
/// backend, or a random one.
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    cookie: u64,
    hook: Hook,
) -> Result<Backend, u32> {
    if frontend.affinity_timeout_s != 0 {
        return choose_with_affinity(ctx, frontend);
    }
    if hook == Hook::SendMsg {
        return choose_for_udp_flow(key, frontend, cookie);
    }
    pick(frontend)
}

/// ClientIP affinity: the same client (network namespace) gets the same backend until it
/// has been idle for the timeout, or the backend leaves the Service.
#[inline(always)]
fn choose_with_affinity(ctx: &SockAddrContext, frontend: &Frontend) -> Result<Backend, u32> {
    let akey = AffinityKey {
        // SAFETY: helper call on the program's own context.
        client: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        id: frontend.id,
        _pad: 0,
    };
    // SAFETY: helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(&akey) {
        // SAFETY: a map value pointer from a successful lookup; a concurrent writer can only
        // make the timestamp or backend another valid one, which the checks below accept.
        let entry = unsafe { &mut *entry };
        if affinity_fresh(now, entry.last_used_ns, frontend.affinity_timeout_s)
            && is_member(frontend.id, &entry.backend)
        {
            entry.last_used_ns = now;
            count(stats::AFFINITY_HIT);
            return Ok(entry.backend);
        }
    }
    let backend = pick(frontend)?;
    let entry = Affinity {
        last_used_ns: now,
        backend,
        _pad: 0,
    };
    if LB_AFFINITY.insert(&akey, &entry, 0).is_err() {
        count(stats::ERR_STICKY_UPDATE);
    }
    count(stats::AFFINITY_NEW);
    Ok(backend)
}

/// Unconnected UDP: a socket keeps sending to the backend it first got, as a conntrack entry
/// would keep it with kube-proxy, while that backend stays in the Service.
#[inline(always)]
fn choose_for_udp_flow(
    key: &FrontendKey,
    frontend: &Frontend,
    cookie: u64,
) -> Result<Backend, u32> {
    let fkey = UdpFlowKey {
        cookie,
        frontend: *key,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(backend) = unsafe { LB_UDP_FLOWS.get(&fkey) }.copied()
        && is_member(frontend.id, &backend)
    {
        count(stats::UDP_FLOW_HIT);
        return Ok(backend);
    }
    let backend = pick(frontend)?;
    if LB_UDP_FLOWS.insert(&fkey, &backend, 0).is_err() {
        count(stats::ERR_STICKY_UPDATE);
    }
    Ok(backend)
}

/// A uniformly random backend of the frontend.
#[inline(always)]
fn pick(frontend: &Frontend) -> Result<Backend, u32> {
    // SAFETY: helper call without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        id: frontend.id,
        slot: slot_for(random, frontend.count),
    };
    // SAFETY: the value is copied out at once.
    unsafe { LB_SLOTS.get(&slot) }
        .copied()
        .ok_or(stats::ERR_SLOT_MISSING)
}

#[inline(always)]
fn is_member(id: u32, backend: &Backend) -> bool {
    let key = MemberKey {
        id,
        backend: *backend,
    };
    LB_MEMBERS.get_ptr(&key).is_some()
}

/// recvmsg/getpeername: a backend address the client sees becomes the Service address it
/// asked for: from the socket's storage when it was connect()ed to that backend, else (an
/// unconnected UDP socket) from the LRU map. Always lets the syscall proceed (these hooks
/// cannot refuse).
#[inline(always)]
pub fn reverse<F: Family>(ctx: &SockAddrContext, stat: u32) -> i32 {
    let sa = ctx.sock_addr;
    let addr = F::addr(sa);
    let port = sock::port(sa);
    let connected = LB_SOCKS
        .get_ptr(ctx, false)
        // SAFETY: this socket's own storage, copied out at once.
        .map(|state| unsafe { *state })
        .filter(|state| state.backend.addr == addr && state.backend.port == port)
        .map(|state| state.service);
    let service = connected.or_else(|| {
        let key = RevNatKey {
            // SAFETY: helper call on the program's own context.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr,
            port,
            _pad: [0; 6],
        };
        // SAFETY: the value is copied out at once.
        unsafe { LB_REVNAT.get(&key) }.copied()
    });
    if let Some(service) = service
        && F::set_addr(sa, service.addr).is_ok()
    {
        sock::set_port(sa, service.port);
        count(stat);
    }
    SYS_PROCEED
}
