//! Service translation: the work behind every hook.

use aya_ebpf::{
    EbpfContext as _,
    cty::c_void,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval, generated::bpf_skc_to_mptcp_sock,
    },
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    maps::{
        Affinity, AffinityKey, Backend, DgramXlate, FLOW_REVERSE, Frontend, FrontendKey,
        IPPROTO_TCP, IPPROTO_UDP, MemberKey, REVERSE_ACTIVE, REVERSE_DRAINING, RevNat, RevNatKey,
        SOCK_CONNECTED, SOCK_DATAGRAMS, SOCK_DIRECT, SOCK_OVERFLOW, SlotKey, SockFlow, SockXlate,
        UdpFlowKey, reverse_filter_bit,
    },
    select::{affinity_fresh, slot_for},
    stats,
};

use crate::{
    maps::{
        LB_AFFINITY, LB_DGRAMS, LB_FRONTENDS, LB_MEMBERS, LB_REV_FILTER, LB_REVERSE, LB_REVNAT,
        LB_SLOTS, LB_SOCKS, LB_TCP_OWNERS, LB_TCP_SOCKS, LB_UDP_FLOWS, LB_UDP_OWNERS, LB_UDP_SOCKS,
        count, ctx_sock,
    },
    slots::Slots,
    sock::{self, Family},
};

/// The TCP socket slots: `LB_TCP_OWNERS` and `LB_TCP_SOCKS`.
#[inline(always)]
fn tcp_slots() -> Slots<SockXlate> {
    Slots {
        owners: &LB_TCP_OWNERS,
        states: &LB_TCP_SOCKS,
    }
}

/// The UDP socket slots: `LB_UDP_OWNERS` and `LB_UDP_SOCKS`.
#[inline(always)]
fn udp_slots() -> Slots<DgramXlate> {
    Slots {
        owners: &LB_UDP_OWNERS,
        states: &LB_UDP_SOCKS,
    }
}

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
        direct(ctx, &key, hook);
        return Verdict::Pass;
    };
    if frontend.count == 0 {
        return Verdict::Refuse(stats::REFUSED_NO_BACKEND);
    }
    let service = RevNat {
        addr: key.addr,
        port: key.port,
        _pad: [0; 2],
        id: frontend.id,
    };
    let chosen = match hook {
        Hook::Connect => connect(ctx, &key, &frontend, service),
        Hook::SendMsg => send(ctx, &key, &frontend, service),
    };
    let (backend, stat) = match chosen {
        Ok(chosen) => chosen,
        Err(stat) => return Verdict::Refuse(stat),
    };
    if F::set_addr(sa, backend.addr).is_err() {
        return Verdict::Refuse(stats::ERR_FAMILY);
    }
    sock::set_port(sa, backend.port);
    Verdict::Translated(stat)
}

/// connect() to a Service: the backend, remembered in the socket's state for getpeername
/// unless the backend's `LB_REVERSE` entry answers for this frontend. Returns the backend and
/// the counter to bump.
///
/// A TCP socket's state is its `LB_TCP_SOCKS` slot, else its `LB_SOCKS` storage
/// ([`tcp_state`]). For MPTCP the connect hook runs on the first subflow, while the
/// application calls getpeername on the MPTCP socket, so the state goes on that one, always
/// as storage (the hook has no cookie of it). A UDP socket's state is its `LB_UDP_SOCKS`
/// entry ([`dgram_state`]).
#[inline(always)]
fn connect(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    service: RevNat,
) -> Result<(Backend, u32), u32> {
    if key.proto == IPPROTO_UDP {
        return connect_udp(ctx, key, frontend, service);
    }
    let backend = choose(ctx, key, frontend, None)?;
    let xlate = SockXlate {
        backend,
        service,
        flags: SOCK_CONNECTED,
    };
    let sk = ctx_sock(ctx);
    if key.proto != IPPROTO_TCP {
        let _stored = store(LB_SOCKS.get_ptr_on(sk, true), &xlate);
        return Ok((backend, stats::CONNECT_XLATED));
    }
    // SAFETY: helper call on the context's socket; it returns the subflow's MPTCP socket or
    // null (not a subflow).
    let msk = unsafe { bpf_skc_to_mptcp_sock(sk) };
    if !msk.is_null() {
        let _stored = store(LB_SOCKS.get_ptr_on(msk.cast(), true), &xlate);
        return Ok((backend, stats::CONNECT_XLATED));
    }
    let cookie = socket_cookie(ctx);
    match tcp_state(sk, cookie) {
        // A socket with state from an earlier connect (one that failed, or a disconnect):
        // its state answers getpeername, so it must say this connect.
        Some(state) => {
            // SAFETY: this socket's own state, written under the socket lock that every hook
            // runs with.
            unsafe { *state = xlate };
            if reverse_answers(&backend, key, frontend.id) {
                count(stats::CONNECT_NO_STORAGE);
            }
        }
        // getpeername answers from the reverse entry: nothing to write.
        None if reverse_answers(&backend, key, frontend.id) => count(stats::CONNECT_NO_STORAGE),
        None => {
            let _stored = tcp_insert(sk, cookie, &xlate);
        }
    }
    Ok((backend, stats::CONNECT_XLATED))
}

/// Writes `xlate` to a socket's storage, or counts that the kernel had none to give;
/// whether it wrote.
#[inline(always)]
fn store(state: Option<*mut SockXlate>, xlate: &SockXlate) -> bool {
    match state {
        Some(state) => {
            // SAFETY: the socket's own storage, written under the socket lock that every hook
            // runs with.
            unsafe { *state = *xlate };
            true
        }
        None => {
            count(stats::ERR_REVNAT_UPDATE);
            false
        }
    }
}

/// The TCP socket `sk`'s state (`cookie` is its cookie): its `LB_TCP_SOCKS` slot if it owns
/// it, else its `LB_SOCKS` storage (a socket whose slot another socket held, one the agent
/// gave state, or one translated before an upgrade from layout 4). `None`: no state. The
/// pointer is valid while the program runs; only the socket's own syscalls write a slot's
/// state, under the socket lock, and the slot is freed only when the socket closes.
#[inline(always)]
fn tcp_state(sk: *mut c_void, cookie: u64) -> Option<*mut SockXlate> {
    tcp_slots()
        .owned(cookie)
        .or_else(|| LB_SOCKS.get_ptr_on(sk, false))
}

/// A TCP socket's first state, `value`: its `LB_TCP_SOCKS` slot when free, else its
/// `LB_SOCKS` storage (the kernel allocates it); whether it wrote. Without either (memory)
/// the socket is translated all the same, and getpeername shows the backend (counted as
/// `err_revnat_update`).
#[inline(always)]
fn tcp_insert(sk: *mut c_void, cookie: u64, value: &SockXlate) -> bool {
    if tcp_slots().claim(cookie, value) {
        count(stats::TCP_SOCKS_CLAIMED);
        return true;
    }
    count(stats::TCP_SOCKS_TAKEN);
    store(LB_SOCKS.get_ptr_on(sk, true), value)
}

/// The `LB_REVERSE` key of a TCP backend.
#[inline(always)]
fn reverse_key(addr: lb_common::Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

/// Whether `LB_REVERSE` may hold an entry for TCP backend `addr`:`port`: its bit in
/// `LB_REV_FILTER` (the agent sets it before writing such an entry and clears it only after
/// the last one went). A clear bit is exact ("no entry"); a set one only means "look".
#[inline(always)]
fn reverse_may_have(addr: &lb_common::Addr, port: u16) -> bool {
    let bit = reverse_filter_bit(addr, port);
    LB_REV_FILTER
        .get(bit >> 6)
        .is_some_and(|word| word & (1u64 << (bit & 63)) != 0)
}

/// Whether a TCP connect through frontend `key` (id `id`) to `backend` may skip per-socket
/// state (no slot, no storage): the backend's reverse entry is active and names this frontend
/// (address, port and id: an id a restarted agent reused for another frontend before a stale
/// entry drained does not match).
#[inline(always)]
fn reverse_answers(backend: &Backend, key: &FrontendKey, id: u32) -> bool {
    // SAFETY: the value is read at once; the agent replaces values whole.
    unsafe { LB_REVERSE.get(&reverse_key(backend.addr, backend.port)) }.is_some_and(|entry| {
        entry.state == REVERSE_ACTIVE
            && entry.service.id == id
            && entry.service.addr == key.addr
            && entry.service.port == key.port
    })
}

/// connect() of a UDP socket to a Service. A socket that already sent datagrams to this
/// Service keeps their backend: with kube-proxy the connected socket's datagrams have the
/// same 5-tuple, so the same conntrack entry. Its unconnected flows stay.
#[inline(always)]
fn connect_udp(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    service: RevNat,
) -> Result<(Backend, u32), u32> {
    let cookie = socket_cookie(ctx);
    let state = dgram_state(ctx, cookie);
    let backend = if frontend.affinity_timeout_s != 0 {
        choose_with_affinity(ctx, frontend)?
    } else {
        // SAFETY: this socket's own entry, read under the socket lock.
        let current = state.map(|state| unsafe { &*state });
        match current.and_then(|state| datagram_backend(cookie, state, key, frontend)) {
            Some(backend) => {
                count(stats::UDP_FLOW_HIT);
                backend
            }
            None => pick(frontend)?,
        }
    };
    let conn = SockXlate {
        backend,
        service,
        flags: SOCK_CONNECTED,
    };
    match state {
        // SAFETY: as above; the socket's own value.
        Some(state) => unsafe {
            let current = &mut (*state).conn;
            current.backend = backend;
            current.service = service;
            current.flags |= SOCK_CONNECTED;
        },
        None => dgram_insert(
            ctx,
            cookie,
            &DgramXlate {
                conn,
                ..DgramXlate::default()
            },
        ),
    }
    Ok((backend, stats::CONNECT_XLATED))
}

/// The socket cookie of the context's socket (the kernel gives it one on first use).
#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The UDP socket's state: in its `LB_UDP_SOCKS` slot if it owns it (`cookie`, the
/// socket's, is the slot's owner), else its `LB_DGRAMS` storage (a socket whose slot another
/// socket held, or one translated before an upgrade from layout 4). `None`: lb never
/// translated this socket. The pointer is valid while the program runs; only the socket's
/// own syscalls write the state, under the socket lock, and the slot is freed only when the
/// socket closes.
#[inline(always)]
fn dgram_state(ctx: &SockAddrContext, cookie: u64) -> Option<*mut DgramXlate> {
    udp_slots()
        .owned(cookie)
        .or_else(|| LB_DGRAMS.get_ptr(ctx, false))
}

/// A UDP socket's first state, `value`: its `LB_UDP_SOCKS` slot when free (see
/// [`Slots::claim`]), else its `LB_DGRAMS` storage (the kernel allocates it). Without either
/// (memory) the socket is translated all the same, and its replies show the backend (counted
/// as `err_revnat_update`).
#[inline(always)]
fn dgram_insert(ctx: &SockAddrContext, cookie: u64, value: &DgramXlate) {
    if udp_slots().claim(cookie, value) {
        count(stats::UDP_SOCKS_CLAIMED);
        return;
    }
    count(stats::UDP_SOCKS_TAKEN);
    match LB_DGRAMS.get_ptr(ctx, true) {
        // SAFETY: this socket's own storage, written under the socket lock.
        Some(state) => unsafe { *state = *value },
        None => count(stats::ERR_REVNAT_UPDATE),
    }
}

/// sock_release: a closing TCP or UDP socket's slot, if it owns one, is free again (the next
/// owner writes the whole state). Other sockets return at once.
#[inline(always)]
pub fn released(ctx: &SockContext) {
    // SAFETY: the context's socket is valid for the program's run.
    let protocol = unsafe { (*ctx.sock).protocol };
    let tcp = protocol == u32::from(IPPROTO_TCP);
    if !tcp && protocol != u32::from(IPPROTO_UDP) {
        return;
    }
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if tcp {
        if tcp_slots().release(cookie) {
            count(stats::TCP_SOCKS_RELEASED);
        }
    } else if udp_slots().release(cookie) {
        count(stats::UDP_SOCKS_RELEASED);
    }
}

/// The socket the application holds: the MPTCP socket of an MPTCP subflow, else the
/// context's socket.
#[inline(always)]
fn app_socket(ctx: &SockAddrContext) -> *mut c_void {
    let sk = ctx_sock(ctx);
    // SAFETY: helper call on the context's socket; it returns the subflow's MPTCP socket or
    // null (not a subflow).
    let msk = unsafe { bpf_skc_to_mptcp_sock(sk) };
    if msk.is_null() { sk } else { msk.cast() }
}

/// sendmsg() to a Service (an address given with the datagram). A socket connected to this
/// same Service sends to its connected backend (kube-proxy: the same 5-tuple, the same
/// conntrack entry; a datagram sent elsewhere would get a reply the connected socket never
/// delivers). Otherwise the socket's flow to this Service: one of its own `flows` in its
/// storage (created here on the socket's first datagram to a Service), which keeps the
/// backend for its later datagrams and shows the Service on its replies; a socket that
/// already has [`SOCK_FLOWS`](lb_common::maps::SOCK_FLOWS) flows to other Services keeps
/// further ones in the LRU maps (`LB_UDP_FLOWS`, `LB_REVNAT`), marked [`SOCK_OVERFLOW`].
#[inline(always)]
fn send(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    service: RevNat,
) -> Result<(Backend, u32), u32> {
    let cookie = socket_cookie(ctx);
    let Some(state) = dgram_state(ctx, cookie) else {
        // The socket's first datagram through lb: its state is this one flow, written once.
        let backend = choose(ctx, key, frontend, None)?;
        let mut value = DgramXlate::default();
        value.conn.flags = SOCK_DATAGRAMS;
        value.flows[0] = SockFlow {
            frontend: *key,
            backend,
            id: frontend.id,
            flags: FLOW_REVERSE,
        };
        dgram_insert(ctx, cookie, &value);
        return Ok((backend, stats::SENDMSG_XLATED));
    };
    // SAFETY: this socket's own entry, read and written under the socket lock.
    let state = unsafe { &mut *state };
    if state.conn.flags & SOCK_CONNECTED != 0
        && state.conn.service.addr == key.addr
        && state.conn.service.port == key.port
    {
        return Ok((state.conn.backend, stats::SENDMSG_CONNECTED));
    }
    let Some(slot) = own_flow(state, key) else {
        state.conn.flags |= SOCK_OVERFLOW;
        let backend = choose(ctx, key, frontend, Some(cookie))?;
        remember_datagram(cookie, &backend, &service);
        // Replies from this backend now answer for this Service (the LRU entry), not for
        // an own flow that went to the same backend.
        for flow in &mut state.flows {
            if flow.id != 0 && flow.backend == backend {
                flow.flags &= !FLOW_REVERSE;
            }
        }
        return Ok((backend, stats::SENDMSG_XLATED));
    };
    let current = state.flows.get(slot).copied().unwrap_or_default();
    let backend = if frontend.affinity_timeout_s != 0 {
        choose_with_affinity(ctx, frontend)?
    } else if current.id != 0 && is_member(frontend.id, &current.backend) {
        count(stats::UDP_FLOW_HIT);
        current.backend
    } else {
        pick(frontend)?
    };
    // The flow, and the last datagram to a backend decides which Service its replies show
    // (as the LRU entry keyed by backend did): other flows to the same backend stop
    // answering for theirs until they send again.
    for (i, flow) in state.flows.iter_mut().enumerate() {
        if i == slot {
            *flow = SockFlow {
                frontend: *key,
                backend,
                id: frontend.id,
                flags: FLOW_REVERSE,
            };
        } else if flow.id != 0 && flow.backend == backend {
            flow.flags &= !FLOW_REVERSE;
        }
    }
    state.conn.flags |= SOCK_DATAGRAMS;
    Ok((backend, stats::SENDMSG_XLATED))
}

/// The index of the socket's own flow to `key`, else of its first empty slot, else `None`
/// (all taken by other Services).
#[inline(always)]
fn own_flow(state: &DgramXlate, key: &FrontendKey) -> Option<usize> {
    let mut empty = None;
    for (i, flow) in state.flows.iter().enumerate() {
        if flow.id == 0 {
            if empty.is_none() {
                empty = Some(i);
            }
        } else if flow.frontend == *key {
            return Some(i);
        }
    }
    empty
}

/// The backend this socket's datagrams to `key` went to (its own flow, else its overflow
/// entry in `LB_UDP_FLOWS`), while that backend is still a member of the frontend.
#[inline(always)]
fn datagram_backend(
    cookie: u64,
    state: &DgramXlate,
    key: &FrontendKey,
    frontend: &Frontend,
) -> Option<Backend> {
    if state.conn.flags & SOCK_DATAGRAMS != 0 {
        for flow in &state.flows {
            if flow.id != 0 && flow.frontend == *key {
                return is_member(frontend.id, &flow.backend).then_some(flow.backend);
            }
        }
    }
    if state.conn.flags & SOCK_OVERFLOW != 0 {
        let fkey = UdpFlowKey {
            cookie,
            frontend: *key,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once.
        if let Some(backend) = unsafe { LB_UDP_FLOWS.get(&fkey) }.copied()
            && is_member(frontend.id, &backend)
        {
            return Some(backend);
        }
    }
    None
}

/// connect/sendmsg to an address that is not a Service. A socket that reached this address
/// as a Service backend (its `LB_REVNAT` entry) now talks to it directly, so replies from it
/// must show it, as kube-proxy's separate conntrack entries would: the entry goes, until the
/// socket sends through the Service again. A connect() also ends the socket's connection to
/// a Service (getpeername shows the new peer). Sockets lb never translated have no state and
/// pay one slot owner's read and one empty storage lookup; a TCP connect first reads its
/// address's `LB_REV_FILTER` bit (an array word), and looks `LB_REVERSE` up only where the
/// bit is set.
#[inline(always)]
fn direct(ctx: &SockAddrContext, key: &FrontendKey, hook: Hook) {
    if key.proto != IPPROTO_UDP {
        if hook != Hook::Connect {
            return;
        }
        let sk = ctx_sock(ctx);
        if key.proto != IPPROTO_TCP {
            if let Some(state) = LB_SOCKS.get_ptr_on(sk, false) {
                // SAFETY: this socket's own storage, written under the socket lock.
                unsafe { (*state).flags &= !SOCK_CONNECTED };
            }
            return;
        }
        // SAFETY: the value is only tested for presence.
        if reverse_may_have(&key.addr, key.port)
            && unsafe { LB_REVERSE.get(&reverse_key(key.addr, key.port)) }.is_some()
        {
            // A direct connect to a backend that has a reverse entry (in any state): the
            // socket gets state, so getpeername shows the pod, not the entry's Service.
            direct_to_backend(ctx, sk);
        } else if let Some(state) = tcp_state(sk, socket_cookie(ctx)) {
            // SAFETY: this socket's own state, written under the socket lock.
            unsafe { (*state).flags &= !SOCK_CONNECTED };
        }
        return;
    }
    let cookie = socket_cookie(ctx);
    let Some(state) = dgram_state(ctx, cookie) else {
        return;
    };
    // SAFETY: this socket's own entry, read and written under the socket lock.
    let state = unsafe { &mut *state };
    let flags = state.conn.flags;
    if hook == Hook::Connect && flags & SOCK_CONNECTED != 0 {
        state.conn.flags = flags & !SOCK_CONNECTED;
    }
    if flags & SOCK_DATAGRAMS != 0 {
        for flow in &mut state.flows {
            if flow.id != 0
                && flow.flags & FLOW_REVERSE != 0
                && flow.backend.addr == key.addr
                && flow.backend.port == key.port
            {
                flow.flags &= !FLOW_REVERSE;
                count(stats::REVNAT_CLEARED_DIRECT);
            }
        }
    }
    if flags & SOCK_OVERFLOW != 0 {
        let rkey = RevNatKey {
            cookie,
            addr: key.addr,
            port: key.port,
            _pad: [0; 6],
        };
        if LB_REVNAT.remove(&rkey).is_ok() {
            count(stats::REVNAT_CLEARED_DIRECT);
        }
    }
}

/// A TCP connect of socket `sk` straight to a backend address that has a reverse entry: its
/// state says [`SOCK_DIRECT`] (and no longer [`SOCK_CONNECTED`]), so that getpeername shows
/// the pod.
#[inline(always)]
fn direct_to_backend(ctx: &SockAddrContext, sk: *mut c_void) {
    let marked = SockXlate {
        flags: SOCK_DIRECT,
        ..SockXlate::default()
    };
    let app = app_socket(ctx);
    let marked_now = if app != sk {
        if LB_SOCKS.get_ptr_on(app, false).is_some() {
            // A subflow that the MPTCP path manager adds to a connection lb already handled
            // (`__mptcp_subflow_connect` connects it to the connection's peer, the backend,
            // in the connection's cgroup): what the application connected to stands.
            return;
        }
        store(LB_SOCKS.get_ptr_on(app, true), &marked)
    } else {
        let cookie = socket_cookie(ctx);
        match tcp_state(sk, cookie) {
            Some(state) => {
                // SAFETY: this socket's own state, written under the socket lock.
                unsafe { *state = marked };
                true
            }
            None => tcp_insert(sk, cookie, &marked),
        }
    };
    if marked_now {
        count(stats::CONNECT_DIRECT_MARKED);
    }
}

/// An unconnected UDP socket with more Services than its own flows: (socket, backend) ->
/// Service goes in the LRU map, skipping the write when the entry is already there (the lookup also marks it
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

/// The backend for this operation: the client's affinity backend, the UDP flow backend of
/// the socket with cookie `flow`, or a random one.
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    flow: Option<u64>,
) -> Result<Backend, u32> {
    if frontend.affinity_timeout_s != 0 {
        return choose_with_affinity(ctx, frontend);
    }
    if let Some(cookie) = flow {
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

/// Which reverse hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reverse {
    /// recvmsg() with a source address (UDP).
    RecvMsg,
    /// getpeername().
    GetPeerName,
}

/// recvmsg/getpeername: a backend address the client sees becomes the Service address it
/// asked for. The socket's state ([`dgram_state`] for UDP, [`tcp_state`] for TCP, `LB_SOCKS`
/// storage for the others) is the gate: a socket without it was never translated (a TCP
/// socket may answer from its peer's reverse entry) and is left alone at once. A connected
/// socket's peer comes from the state; a recvmsg source that is not the connected backend
/// is looked for among the socket's own flows (the one that last sent to that backend
/// answers), and in `LB_REVNAT` only if the socket has [`SOCK_OVERFLOW`]. getpeername reads
/// neither: a peer exists only after connect(), which the state records. Always lets the
/// syscall proceed (these hooks cannot refuse).
#[inline(always)]
pub fn reverse<F: Family>(ctx: &SockAddrContext, hook: Reverse) -> i32 {
    let sa = ctx.sock_addr;
    // recvmsg runs for UDP only; getpeername for every socket, whose protocol picks the map.
    let service = if hook == Reverse::RecvMsg || sock::protocol(sa) == u32::from(IPPROTO_UDP) {
        let cookie = socket_cookie(ctx);
        let Some(state) = dgram_state(ctx, cookie) else {
            return SYS_PROCEED;
        };
        // SAFETY: this socket's own storage; the socket's own syscalls write it, under the
        // socket lock this hook runs with too.
        let state = unsafe { &*state };
        let addr = F::addr(sa);
        let port = sock::port(sa);
        match connected_service(&state.conn, addr, port) {
            Some(service) => Some(service),
            None if hook == Reverse::RecvMsg => reverse_datagram(cookie, state, addr, port),
            None => None,
        }
    } else if sock::protocol(sa) == u32::from(IPPROTO_TCP) {
        // A plain TCP socket (not MPTCP: those always have storage, and their protocol is not
        // TCP here). One without state may have been connected through a Service whose
        // reverse entry answers for its peer.
        let addr = F::addr(sa);
        let port = sock::port(sa);
        match tcp_state(ctx_sock(ctx), socket_cookie(ctx)) {
            // SAFETY: as above.
            Some(state) => connected_service(unsafe { &*state }, addr, port),
            None => reverse_peer(addr, port),
        }
    } else {
        match LB_SOCKS.get_ptr(ctx, false) {
            // SAFETY: as above.
            Some(state) => connected_service(unsafe { &*state }, F::addr(sa), sock::port(sa)),
            None => return SYS_PROCEED,
        }
    };
    if let Some(service) = service
        && F::set_addr(sa, service.addr).is_ok()
    {
        sock::set_port(sa, service.port);
        count(match hook {
            Reverse::RecvMsg => stats::RECVMSG_XLATED,
            Reverse::GetPeerName => stats::GETPEERNAME_XLATED,
        });
    }
    SYS_PROCEED
}

/// The Service of a TCP socket without state whose peer is `addr`:`port`: the peer's
/// reverse entry, active or draining (a pending one does not answer yet: the sockets
/// connected to the backend directly before it was written may not be marked yet).
#[inline(always)]
fn reverse_peer(addr: lb_common::Addr, port: u16) -> Option<RevNat> {
    if !reverse_may_have(&addr, port) {
        return None;
    }
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    let entry = unsafe { LB_REVERSE.get(&reverse_key(addr, port)) }.copied()?;
    if entry.state != REVERSE_ACTIVE && entry.state != REVERSE_DRAINING {
        return None;
    }
    count(stats::GETPEERNAME_REVERSE);
    Some(entry.service)
}

/// The Service of a connected socket whose peer (or datagram source) is its backend.
#[inline(always)]
fn connected_service(conn: &SockXlate, addr: lb_common::Addr, port: u16) -> Option<RevNat> {
    (conn.flags & SOCK_CONNECTED != 0 && conn.backend.addr == addr && conn.backend.port == port)
        .then_some(conn.service)
}

/// The Service a datagram from `addr`:`port` answers for: the socket's own flow to that
/// backend, else its overflow entry.
#[inline(always)]
fn reverse_datagram(
    cookie: u64,
    state: &DgramXlate,
    addr: lb_common::Addr,
    port: u16,
) -> Option<RevNat> {
    if state.conn.flags & SOCK_DATAGRAMS != 0 {
        for flow in &state.flows {
            if flow.id != 0
                && flow.flags & FLOW_REVERSE != 0
                && flow.backend.addr == addr
                && flow.backend.port == port
            {
                return Some(RevNat {
                    addr: flow.frontend.addr,
                    port: flow.frontend.port,
                    _pad: [0; 2],
                    id: flow.id,
                });
            }
        }
    }
    if state.conn.flags & SOCK_OVERFLOW != 0 {
        let key = RevNatKey {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        // SAFETY: the value is copied out at once.
        return unsafe { LB_REVNAT.get(&key) }.copied();
    }
    None
}
