//! Closing the sockets lb sent to a backend that left its Service.
//!
//! A connected socket is translated once, at `connect()`: a connected UDP socket whose backend
//! leaves the Service keeps sending to it for as long as the application lives (kube-proxy's
//! conntrack cleanup moves such a flow; lb has no per-packet NAT to move). So when a backend
//! leaves a frontend, lb closes the sockets it connected to that (frontend, backend) pair,
//! with the errno `ECONNABORTED`; the application sees the error and reconnects, and the
//! connect hook picks a live backend. TCP keeps its established connections by default, as
//! with kube-proxy; `lb run --close-tcp-to-removed-backends` closes those too (with a reset),
//! as Cilium's `bpf-lb-sock-terminate-pod-connections` does.
//!
//! The mechanism is `sock_diag` netlink (`CONFIG_INET_DIAG_DESTROY`), not a BPF socket
//! iterator calling the `bpf_sock_destroy()` kfunc as Cilium does: aya-obj 0.3.0 cannot load
//! a program with a kfunc call (it neither resolves the kfunc's kernel BTF id nor emits
//! `BPF_PSEUDO_KFUNC_CALL`: the call relocation fails as an unknown function), and this kernel
//! refuses every `BPF_PROG_TYPE_TRACING` program, iterators included (EPERM at load; bpftool:
//! "program_type tracing is NOT available"). Both routes reach one network namespace at a time
//! (a socket iterator walks the namespace it was created in, a netlink socket talks to its
//! own), so either way lb enters each namespace.
//! What lb translated a socket to is in its `LB_TCP_SOCKS` or `LB_UDP_SOCKS` slot, picked by
//! the socket cookie that the dump reports. A socket whose slot another socket held (and an
//! MPTCP socket, and one the agent gave state) has it in its `LB_SOCKS` or `LB_DGRAMS` socket
//! storage. A `sock_diag` dump returns storage
//! for TCP only (`INET_DIAG_REQ_SK_BPF_STORAGES` is filled for connection sockets, not UDP:
//! measured on 6.18), so lb reads it the way the map is keyed, by the socket itself: per
//! namespace, dump the connected UDP (and, with the flag, TCP) sockets of both families; the
//! candidates are those whose peer is a removed backend's address and port (usually none);
//! for each, find the process descriptor that holds it (its inode in `/proc/PID/fd` of the
//! cgroup's processes in that namespace), take a copy with `pidfd_getfd(2)`, look the copy up
//! in that storage, and destroy the socket only if its value names a removed (frontend id,
//! backend) pair (`SOCK_DESTROY` by address and cookie; the kernel checks the cookie, so a
//! reused address never closes another socket). A socket connected to the pod directly has
//! no value and is never touched.
//!
//! Namespaces: those of the processes in the cgroup subtree lb attaches to, and the agent's
//! own ([`super::netns`]). A dedicated thread enters each (`setns`) only to open its netlink
//! socket, then returns home; the sync loop hands it the removed pairs through a channel and
//! never waits for it. A pass is bounded ([`PASS_BUDGET`]); what fails is logged and counted
//! (`lb_socket_destroy_failures_total{reason}`), what is closed is counted
//! (`lb_sockets_destroyed_total{proto}`).

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, MapError};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use lb_common::{
    Addr,
    maps::{
        Backend, DGRAMS, DgramXlate, IPPROTO_TCP, IPPROTO_UDP, MEMBERS, MemberKey, REVERSE,
        SOCK_CONNECTED, SOCKS, SockXlate, TCP_OWNERS, TCP_SOCKS, UDP_OWNERS, UDP_SOCKS,
    },
};

use super::{
    PinLayout,
    netns::{self, Netns},
};
use crate::metrics::{SockFailureLabels, SockLabels, SockMetrics};

/// The longest one pass over every namespace may take; namespaces not reached by then are
/// counted as failures (`reason="deadline"`) and logged.
pub const PASS_BUDGET: Duration = Duration::from_secs(5);
/// The longest one netlink answer may take.
const RECV_TIMEOUT: Duration = Duration::from_secs(1);

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_sockid`: sport, dport (be16), src[4], dst[4] (be32), if (u32),
/// cookie[2] (u32).
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad (u8), states (u32), id.
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8), id, expires, rqueue, wqueue,
/// uid, inode (u32).
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states (include/net/tcp_states.h) as `idiag_states` bits.
const TCPF_ESTABLISHED: u32 = 1 << 1;
const TCPF_SYN_SENT: u32 = 1 << 2;
const TCPF_CLOSE_WAIT: u32 = 1 << 8;
/// A connected UDP socket is `TCP_ESTABLISHED`; TCP sockets an application still uses.
const UDP_STATES: u32 = TCPF_ESTABLISHED;
const TCP_STATES: u32 = TCPF_ESTABLISHED | TCPF_SYN_SENT | TCPF_CLOSE_WAIT;

pub(super) const AF_INET: u8 = 2;
pub(super) const AF_INET6: u8 = 10;

/// What the agent could not set up.
#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("opening pinned map {path}")]
    Map {
        path: String,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Maps(#[from] super::maps::MapsError),
    #[error("starting the socket-closing thread")]
    Thread(#[source] io::Error),
}

/// What [`SockDestroyer`] closes.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The cgroup v2 directory lb attaches to: its processes' namespaces are searched.
    pub cgroup: PathBuf,
    /// Close TCP connections too (`--close-tcp-to-removed-backends`).
    pub tcp: bool,
}

/// The sync loop's handle on the socket-closing thread.
pub struct SockDestroyer {
    tx: mpsc::Sender<Vec<MemberKey>>,
}

impl SockDestroyer {
    /// Starts the thread; it checks once that `sock_diag` can do the work here and logs if
    /// not.
    pub fn start(
        layout: &PinLayout,
        settings: Settings,
        metrics: SockMetrics,
    ) -> Result<Self, SockDestroyError> {
        let open = |name: &str| {
            let path = layout.map(name);
            MapData::from_pin(&path).map_err(|source| SockDestroyError::Map {
                path: path.display().to_string(),
                source,
            })
        };
        let socks = open(SOCKS)?;
        let dgrams = open(DGRAMS)?;
        let members: HashMap<MapData, MemberKey, u32> = super::maps::typed(layout, MEMBERS)?;
        let udp_socks: Array<MapData, DgramXlate> = super::maps::typed(layout, UDP_SOCKS)?;
        let udp_owners: Array<MapData, u64> = super::maps::typed(layout, UDP_OWNERS)?;
        let tcp_socks: Array<MapData, SockXlate> = super::maps::typed(layout, TCP_SOCKS)?;
        let tcp_owners: Array<MapData, u64> = super::maps::typed(layout, TCP_OWNERS)?;
        let reverse =
            super::revmap::ReverseReader::open(layout).map_err(|source| SockDestroyError::Map {
                path: layout.map(REVERSE).display().to_string(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            settings,
            socks,
            dgrams,
            udp_owners,
            udp_socks,
            tcp_owners,
            tcp_socks,
            members,
            reverse,
            metrics,
            home: None,
        };
        std::thread::Builder::new()
            .name("sock-destroy".into())
            .spawn(move || worker.run(&rx))
            .map_err(SockDestroyError::Thread)?;
        Ok(Self { tx })
    }

    /// Memberships the sync loop just deleted from the maps: close the sockets lb connected
    /// to them. Returns at once (the work happens on the socket-closing thread).
    pub fn backends_removed(&self, removed: Vec<MemberKey>) {
        if removed.is_empty() {
            return;
        }
        if self.tx.send(removed).is_err() {
            tracing::error!("the socket-closing thread has stopped; stale sockets stay open");
        }
    }
}

struct Worker {
    settings: Settings,
    /// `LB_SOCKS` (TCP) and `LB_DGRAMS` (UDP), looked up with a copy of a client's socket
    /// descriptor.
    socks: MapData,
    dgrams: MapData,
    /// `LB_UDP_OWNERS` and `LB_UDP_SOCKS`: a UDP socket's state in the slot its cookie
    /// picks, if the socket owns the slot.
    udp_owners: Array<MapData, u64>,
    udp_socks: Array<MapData, DgramXlate>,
    /// `LB_TCP_OWNERS` and `LB_TCP_SOCKS`: the same for TCP sockets.
    tcp_owners: Array<MapData, u64>,
    tcp_socks: Array<MapData, SockXlate>,
    /// `LB_MEMBERS`: a pair that is a member again by the time of the pass keeps its sockets.
    members: HashMap<MapData, MemberKey, u32>,
    /// `LB_REVERSE`: the Service of TCP sockets connected without state.
    reverse: super::revmap::ReverseReader,
    metrics: SockMetrics,
    /// This thread's namespace when it started (the agent's), to return to after each
    /// `setns`.
    home: Option<Netns>,
}

/// A pass's counts.
#[derive(Debug, Default)]
struct Tally {
    namespaces: usize,
    udp: u64,
    tcp: u64,
    failures: u64,
    first_error: Option<String>,
}

impl Tally {
    fn fail(&mut self, metrics: &SockMetrics, reason: &'static str, what: impl FnOnce() -> String) {
        self.fail_n(metrics, reason, 1, what);
    }

    fn fail_n(
        &mut self,
        metrics: &SockMetrics,
        reason: &'static str,
        n: u64,
        what: impl FnOnce() -> String,
    ) {
        self.failures += n;
        metrics
            .failures
            .get_or_create(&SockFailureLabels { reason })
            .inc_by(n);
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }
}

impl Worker {
    fn run(mut self, rx: &mpsc::Receiver<Vec<MemberKey>>) {
        match Netns::current_thread() {
            Ok(home) => self.home = Some(home),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the agent's network namespace; stale sockets will not be closed")
            }
        }
        self.self_check();
        while let Ok(first) = rx.recv() {
            // Coalesce what queued up meanwhile into one pass.
            let mut removed: HashSet<MemberKey> = first.into_iter().collect();
            while let Ok(more) = rx.try_recv() {
                removed.extend(more);
            }
            removed.retain(|pair| !self.is_member(pair));
            if !removed.is_empty() {
                self.pass(&removed);
            }
        }
    }

    /// Whether `pair` is in `LB_MEMBERS` now (re-added since the sync loop removed it).
    fn is_member(&self, pair: &MemberKey) -> bool {
        match self.members.get(pair, 0) {
            Ok(_) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => {
                tracing::warn!(error = %e, "reading LB_MEMBERS; treating the pair as removed");
                false
            }
        }
    }

    /// Tries a dump and a destroy of nothing in the agent's namespace, so a kernel or a
    /// privilege that cannot close sockets shows at start, not at the first removal.
    fn self_check(&mut self) {
        let Some(home) = &self.home else { return };
        let result = self.open_in(home).and_then(|mut sock| {
            sock.dump(AF_INET, IPPROTO_UDP, UDP_STATES)?;
            match sock.destroy(AF_INET, IPPROTO_UDP, &[0; SOCKID_LEN]) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                Err(e) => Err(e),
                Ok(()) => Ok(()),
            }
        });
        if let Err(e) = result {
            tracing::warn!(
                error = %e,
                "sock_diag cannot dump or destroy sockets here (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN); sockets connected to removed backends will not be closed"
            );
        }
    }

    /// A sock_diag netlink socket in `ns` ([`open_diag_in`]).
    fn open_in(&self, ns: &Netns) -> io::Result<DiagSocket> {
        open_diag_in(ns, self.home.as_ref())
    }

    fn pass(&self, removed: &HashSet<MemberKey>) {
        let started = Instant::now();
        let deadline = started + PASS_BUDGET;
        let mut tally = Tally::default();
        let backends: HashSet<Backend> = removed.iter().map(|pair| pair.backend).collect();
        let own = Netns::open(Path::new("/proc/self/ns/net")).ok();
        let namespaces = netns::in_cgroup_subtree(&self.settings.cgroup, own);
        for (i, ns) in namespaces.iter().enumerate() {
            if Instant::now() >= deadline {
                let left = namespaces.len() - i;
                tally.fail_n(&self.metrics, "deadline", left as u64, || {
                    format!("{left} network namespaces not reached within {PASS_BUDGET:?}")
                });
                break;
            }
            tally.namespaces += 1;
            self.close_in(ns, removed, &backends, &mut tally);
        }
        let took = started.elapsed();
        self.metrics.pass_seconds.set(took.as_secs_f64());
        if tally.failures > 0 {
            tracing::warn!(
                pairs = removed.len(),
                namespaces = tally.namespaces,
                udp_closed = tally.udp,
                tcp_closed = tally.tcp,
                failures = tally.failures,
                first_error = tally.first_error.as_deref().unwrap_or_default(),
                took_ms = took.as_secs_f64() * 1e3,
                "closing sockets of removed backends: some failed"
            );
        } else if tally.udp + tally.tcp > 0 {
            tracing::info!(
                pairs = removed.len(),
                namespaces = tally.namespaces,
                udp_closed = tally.udp,
                tcp_closed = tally.tcp,
                took_ms = took.as_secs_f64() * 1e3,
                "closed sockets connected to removed backends"
            );
        }
    }

    /// Closes the sockets in `ns` that lb connected to a pair in `removed` (`backends`: their
    /// backends, to pick the candidates from the dumps).
    fn close_in(
        &self,
        ns: &Netns,
        removed: &HashSet<MemberKey>,
        backends: &HashSet<Backend>,
        tally: &mut Tally,
    ) {
        let mut sock = match self.open_in(ns) {
            Ok(sock) => sock,
            Err(e) => {
                tally.fail(&self.metrics, "netns", || {
                    format!("{}: {e}", ns.path.display())
                });
                return;
            }
        };
        let mut protocols = vec![(IPPROTO_UDP, UDP_STATES, "udp")];
        if self.settings.tcp {
            protocols.push((IPPROTO_TCP, TCP_STATES, "tcp"));
        }
        let mut candidates: Vec<(u8, &'static str, DiagSock)> = Vec::new();
        for (proto, states, label) in protocols {
            for family in [AF_INET, AF_INET6] {
                match sock.dump(family, proto, states) {
                    Ok(socks) => candidates.extend(
                        socks
                            .into_iter()
                            .filter(|s| backends.contains(&s.peer_backend()))
                            .map(|s| (proto, label, s)),
                    ),
                    Err(e) => tally.fail(&self.metrics, "dump", || {
                        format!("{} {label} dump: {e}", ns.path.display())
                    }),
                }
            }
        }
        tracing::debug!(netns = %ns.path.display(), candidates = candidates.len(), "connected to removed backends");
        if candidates.is_empty() {
            return;
        }
        let wanted: HashSet<u64> = candidates.iter().map(|(_, _, s)| s.inode).collect();
        let owners = socket_owners(&ns.pids, &wanted);
        for (proto, label, candidate) in &candidates {
            let Some(&(pid, fd)) = owners.get(&candidate.inode) else {
                // No process of the cgroup holds it (passed elsewhere, or closed meanwhile).
                continue;
            };
            let found = self.storage_of(
                *proto,
                candidate.cookie(),
                pid,
                fd,
                candidate.peer_backend(),
            );
            let xlate = match found {
                Ok(Some(xlate)) => xlate,
                Ok(None) => continue, // not translated by lb: connected to the pod directly
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue, // gone
                Err(e) => {
                    tally.fail(&self.metrics, "lookup", || {
                        format!("{} pid {pid} fd {fd}: {e}", ns.path.display())
                    });
                    continue;
                }
            };
            if !candidate.is_stale(&xlate, removed) {
                continue;
            }
            match sock.destroy(candidate.family, *proto, &candidate.id) {
                Ok(()) => {
                    tracing::debug!(
                        netns = %ns.path.display(),
                        pid,
                        fd,
                        cookie = candidate.cookie(),
                        proto = label,
                        frontend_id = xlate.service.id,
                        "closed"
                    );
                    if *proto == IPPROTO_TCP {
                        tally.tcp += 1;
                    } else {
                        tally.udp += 1;
                    }
                    self.metrics
                        .destroyed
                        .get_or_create(&SockLabels { proto: label })
                        .inc();
                }
                // Closed by its owner since the dump.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => tally.fail(&self.metrics, "destroy", || {
                    format!("{} {label} destroy: {e}", ns.path.display())
                }),
            }
        }
    }

    /// What lb connected the socket to that process `pid` holds as descriptor `fd` (socket
    /// cookie `cookie`): its `LB_TCP_SOCKS` value (TCP, by cookie) or else its `LB_SOCKS`
    /// value, or the connected part of its `LB_UDP_SOCKS` value (UDP, by cookie) or else of
    /// its `LB_DGRAMS` value; the storage maps are looked up through a copy of the
    /// descriptor (they are keyed by a socket descriptor of the caller). A TCP socket without
    /// state whose peer `peer` has an active or draining `LB_REVERSE` entry was connected
    /// through that entry's frontend ([`super::revmap`]).
    fn storage_of(
        &self,
        proto: u8,
        cookie: u64,
        pid: u32,
        fd: i32,
        peer: Backend,
    ) -> io::Result<Option<SockXlate>> {
        if proto == IPPROTO_UDP {
            if let Some(state) = slot_state(&self.udp_owners, &self.udp_socks, cookie)? {
                return Ok(Some(state.conn));
            }
        } else if let Some(state) = slot_state(&self.tcp_owners, &self.tcp_socks, cookie)? {
            return Ok(Some(state));
        }
        let copy = pidfd_getfd(pid, fd)?;
        if proto == IPPROTO_UDP {
            let mut value = DgramXlate::default();
            let found = lookup(&self.dgrams, copy.as_raw_fd(), &mut value)?;
            return Ok(found.then_some(value.conn));
        }
        let mut value = SockXlate::default();
        if lookup(&self.socks, copy.as_raw_fd(), &mut value)? {
            return Ok(Some(value));
        }
        if let Some(service) = self.reverse.answer(&peer) {
            return Ok(Some(SockXlate {
                backend: peer,
                service,
                flags: SOCK_CONNECTED,
            }));
        }
        // The entry may have been drained since the first lookup: then the socket has
        // storage now (the agent writes it before deleting the entry).
        let found = lookup(&self.socks, copy.as_raw_fd(), &mut value)?;
        Ok(found.then_some(value))
    }
}

/// The state in the slot of the socket with cookie `cookie` (`owners` and `states`: one
/// protocol's slot table), if the socket owns the slot. The owner is read before and after
/// the state: the same socket's state, not a slot that changed hands in between.
pub(super) fn slot_state<T: aya::Pod>(
    owners: &Array<MapData, u64>,
    states: &Array<MapData, T>,
    cookie: u64,
) -> io::Result<Option<T>> {
    let slot = lb_common::maps::sock_slot(cookie);
    let owner = || owners.get(&slot, 0).map_err(io::Error::other);
    if owner()? != cookie {
        return Ok(None);
    }
    let state = states.get(&slot, 0).map_err(io::Error::other)?;
    Ok((owner()? == cookie).then_some(state))
}

/// A sock_diag netlink socket in `ns`: the calling thread enters `ns` to create it, then
/// returns to `home` (the socket keeps the namespace it was created in).
pub(super) fn open_diag_in(ns: &Netns, home: Option<&Netns>) -> io::Result<DiagSocket> {
    ns.enter()?;
    let sock = DiagSocket::new();
    if let Some(home) = home
        && let Err(e) = home.enter()
    {
        // Every later namespace is entered explicitly, so nothing depends on where this
        // thread stays; say it all the same.
        tracing::warn!(error = %e, "returning to the agent's network namespace");
    }
    sock
}

/// `BPF_MAP_LOOKUP_ELEM` of socket `key` in socket-storage map `map` into `value`: whether
/// the socket has an entry.
pub(super) fn lookup<V: aya::Pod>(map: &MapData, key: i32, value: &mut V) -> io::Result<bool> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = fd_u32(map.fd().as_fd())?;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_mut(value) as u64;
    match bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where each socket inode of `wanted` is open: (pid, descriptor), searched in `pids`'
/// `/proc/PID/fd`.
pub(super) fn socket_owners(
    pids: &[u32],
    wanted: &HashSet<u64>,
) -> std::collections::HashMap<u64, (u32, i32)> {
    let mut found = std::collections::HashMap::new();
    for &pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(&target.to_string_lossy())
                && wanted.contains(&inode)
            {
                found.entry(inode).or_insert((pid, fd));
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

/// The inode of a `/proc/PID/fd` link to a socket (`socket:[12345]`).
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`; needs
/// `CAP_SYS_PTRACE` over the process).
pub(super) fn pidfd_getfd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let new_fd = |rc: libc::c_long| -> io::Result<OwnedFd> {
        let raw = libc::c_int::try_from(rc).map_err(|_| io::Error::last_os_error())?;
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the kernel just handed us.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscalls with integer arguments.
    let pidfd = new_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: as above; pidfd is ours and open.
    new_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// One socket of a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DiagSock {
    pub(super) family: u8,
    /// Its `inet_diag_sockid` as the kernel sent it: the key of `SOCK_DESTROY`.
    id: [u8; SOCKID_LEN],
    /// `idiag_inode`: the socket's inode, as `/proc/PID/fd` links name it.
    pub(super) inode: u64,
    /// The socket's cgroup v2 id (`INET_DIAG_CGROUP_ID`, the inode of its cgroup directory),
    /// if the kernel sent it.
    pub(super) cgroup: Option<u64>,
}

impl DiagSock {
    /// The peer: address and port (network byte order, as [`lb_common::maps::Backend`]).
    fn peer(&self) -> (Addr, u16) {
        let dst = &self.id[20..36];
        let addr = if self.family == AF_INET {
            Addr::from_v4_octets([dst[0], dst[1], dst[2], dst[3]])
        } else {
            let mut octets = [0; 16];
            octets.copy_from_slice(dst);
            Addr::from_v6_octets(octets)
        };
        (addr, u16::from_ne_bytes([self.id[2], self.id[3]]))
    }

    /// The socket cookie (`idiag_cookie`: low word, then high word).
    pub(super) fn cookie(&self) -> u64 {
        let word = |at: usize| {
            u64::from(u32::from_ne_bytes([
                self.id[at],
                self.id[at + 1],
                self.id[at + 2],
                self.id[at + 3],
            ]))
        };
        word(40) | (word(44) << 32)
    }

    /// The peer as a [`Backend`].
    pub(super) fn peer_backend(&self) -> Backend {
        let (addr, port) = self.peer();
        Backend::new(addr, port)
    }

    /// Whether lb connected this socket (its state `xlate`: slot, storage or reverse entry) to a pair in
    /// `removed`, and it still talks to that backend (a socket reconnected elsewhere since
    /// keeps its old value).
    fn is_stale(&self, xlate: &SockXlate, removed: &HashSet<MemberKey>) -> bool {
        // Only a socket whose last connect() went through a Service (a socket reconnected
        // straight to the pod has the flag cleared by the connect hook).
        xlate.flags & SOCK_CONNECTED != 0
            && self.peer_backend() == xlate.backend
            && removed.contains(&MemberKey {
                id: xlate.service.id,
                backend: xlate.backend,
            })
    }
}

/// A zeroed `bpf_attr`: the kernel rejects non-zero bytes past the fields a command uses.
pub(super) fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of integer structs; all zeroes is valid.
    unsafe { std::mem::zeroed() }
}

pub(super) fn fd_u32(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `bpf(cmd, attr)`; the return value (a new descriptor for some commands) as a descriptor
/// when positive.
pub(super) fn bpf(cmd: bpf_cmd, attr: &bpf_attr) -> io::Result<Option<OwnedFd>> {
    // SAFETY: the bpf syscall reads `size_of::<bpf_attr>()` bytes of a live, zero-initialised
    // bpf_attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_ref(attr),
            size_of::<bpf_attr>(),
        )
    };
    let raw = libc::c_int::try_from(rc).map_err(|_| io::Error::last_os_error())?;
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a positive return of a descriptor-returning command is a new descriptor; the
    // commands used here that return 0 on success return no descriptor.
    Ok((raw > 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// A `NETLINK_SOCK_DIAG` socket, bound for good to the namespace it was created in.
pub(super) struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: plain socket creation; the descriptor is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: libc::time_t::try_from(RECV_TIMEOUT.as_secs()).unwrap_or(1),
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a live timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        // SAFETY: sends a live buffer of the given length to the kernel (netlink port 0).
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self) -> io::Result<usize> {
        // SAFETY: receives into our own buffer, at most its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// The sockets of `family`/`proto` in `states`.
    pub(super) fn dump(&mut self, family: u8, proto: u8, states: u32) -> io::Result<Vec<DiagSock>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(&dump_request(seq, family, proto, states))?;
        let mut socks = Vec::new();
        loop {
            let n = self.recv()?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            for message in messages(&self.buf[..n]) {
                if message.seq != seq {
                    continue; // an answer to an earlier request that timed out
                }
                match message.kind {
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(sock) = parse_diag_msg(message.payload) {
                            socks.push(sock);
                        }
                    }
                    t if t == NLMSG_DONE => return Ok(socks),
                    t if t == NLMSG_ERROR => {
                        return match nlmsg_error(message.payload) {
                            Some(0) | None => Ok(socks),
                            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// `SOCK_DESTROY` of the socket `id` (address, ports, interface and cookie, as dumped).
    fn destroy(&mut self, family: u8, proto: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(&destroy_request(seq, family, proto, id))?;
        loop {
            let n = self.recv()?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            for message in messages(&self.buf[..n]) {
                if message.seq == seq && message.kind == NLMSG_ERROR {
                    return match nlmsg_error(message.payload) {
                        Some(0) => Ok(()),
                        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                        None => Err(io::Error::from(io::ErrorKind::InvalidData)),
                    };
                }
            }
        }
    }
}

/// Netlink's own message types (small positive constants).
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message: header, then `body`.
fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDR_LEN + body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(NLMSG_HDR_LEN + body.len());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

/// `struct inet_diag_req_v2`.
fn req_v2(family: u8, proto: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut req = Vec::with_capacity(REQ_V2_LEN);
    req.extend_from_slice(&[family, proto, 0, 0]);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(id);
    req
}

/// A netlink flag constant (they fit 16 bits).
const fn flags(bits: libc::c_int) -> u16 {
    bits as u16
}

/// A dump of `family`/`proto` sockets in `states`.
fn dump_request(seq: u32, family: u8, proto: u8, states: u32) -> Vec<u8> {
    message(
        SOCK_DIAG_BY_FAMILY,
        flags(libc::NLM_F_REQUEST | libc::NLM_F_DUMP),
        seq,
        &req_v2(family, proto, states, &[0; SOCKID_LEN]),
    )
}

/// `SOCK_DESTROY` of one socket.
fn destroy_request(seq: u32, family: u8, proto: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    message(
        SOCK_DESTROY,
        flags(libc::NLM_F_REQUEST | libc::NLM_F_ACK),
        seq,
        &req_v2(family, proto, u32::MAX, id),
    )
}

/// One netlink message of a received buffer.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The messages of a netlink datagram; stops at the first malformed header.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        let len = usize::try_from(u32_at(buf, 0)?).ok()?;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return None;
        }
        let message = Message {
            kind: u16_at(buf, 4)?,
            seq: u32_at(buf, 8)?,
            payload: &buf[NLMSG_HDR_LEN..len],
        };
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some(message)
    })
}

/// The errno of an `NLMSG_ERROR` payload (`struct nlmsgerr`: a negative errno first); 0 is
/// an acknowledgement.
fn nlmsg_error(payload: &[u8]) -> Option<i32> {
    let error = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    Some(-error)
}

/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h): the cgroup v2 id of the socket
/// (the cgroup whose programs run for it), a u64 the kernel adds to every full socket's
/// answer (net/ipv4/inet_diag.c `inet_diag_msg_attrs_fill`, since 5.7; not requested).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// A `struct inet_diag_msg` and, from its attributes, the cgroup id.
fn parse_diag_msg(payload: &[u8]) -> Option<DiagSock> {
    let header = payload.get(..DIAG_MSG_LEN)?;
    let mut id = [0; SOCKID_LEN];
    id.copy_from_slice(&header[4..4 + SOCKID_LEN]);
    Some(DiagSock {
        family: header[0],
        id,
        inode: u64::from(u32_at(header, DIAG_MSG_LEN - 4)?),
        cgroup: cgroup_attr(payload.get(align4(DIAG_MSG_LEN)..).unwrap_or_default()),
    })
}

/// The `INET_DIAG_CGROUP_ID` value among netlink attributes (`struct nlattr`: len u16,
/// type u16, then the value, each attribute 4-aligned).
fn cgroup_attr(mut attrs: &[u8]) -> Option<u64> {
    while let (Some(len), Some(kind)) = (u16_at(attrs, 0), u16_at(attrs, 2)) {
        let len = usize::from(len);
        if len < 4 || len > attrs.len() {
            return None;
        }
        // NLA_TYPE_MASK: the top two bits are flags.
        if kind & 0x3fff == INET_DIAG_CGROUP_ID && len >= 12 {
            return Some(u64::from_ne_bytes(attrs.get(4..12)?.try_into().ok()?));
        }
        attrs = attrs.get(align4(len)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{Backend, RevNat};

    use super::*;

    fn backend(last: u8, port: u16) -> Backend {
        Backend::new(Addr::from_v4_octets([10, 0, 0, last]), port.to_be())
    }

    fn xlate(id: u32, backend: Backend) -> SockXlate {
        SockXlate {
            backend,
            service: RevNat {
                addr: Addr::from_v4_octets([10, 96, 0, 1]),
                port: 53u16.to_be(),
                _pad: [0; 2],
                id,
            },
            flags: SOCK_CONNECTED,
        }
    }

    /// A sockid for a v4 socket from 10.200.0.1:40000 to `dst`:`dport` with `cookie`.
    fn sockid_v4(dst: [u8; 4], dport: u16, cookie: u64) -> [u8; SOCKID_LEN] {
        let mut id = [0; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&dport.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 200, 0, 1]);
        id[20..24].copy_from_slice(&dst);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "splitting the cookie in words"
        )]
        let (low, high) = (cookie as u32, (cookie >> 32) as u32);
        id[40..44].copy_from_slice(&low.to_ne_bytes());
        id[44..48].copy_from_slice(&high.to_ne_bytes());
        id
    }

    /// What the kernel sends for one socket: an inet_diag_msg (and an attribute lb ignores).
    fn diag_message(family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
        let mut body = vec![family, 1, 0, 0];
        body.extend_from_slice(id);
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&4242u32.to_ne_bytes()); // idiag_inode
        body.extend_from_slice(&[8, 0, 13, 0, 1, 2, 3, 4]);
        message(SOCK_DIAG_BY_FAMILY, 2, 9, &body)
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let dump = dump_request(3, AF_INET, IPPROTO_UDP, UDP_STATES);
        assert_eq!(dump.len(), NLMSG_HDR_LEN + REQ_V2_LEN);
        assert_eq!(u32_at(&dump, 0), Some(u32::try_from(dump.len()).unwrap()));
        assert_eq!(u16_at(&dump, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u16_at(&dump, 6), Some(1 | 0x300)); // NLM_F_REQUEST | NLM_F_DUMP
        assert_eq!(&dump[16..20], &[AF_INET, IPPROTO_UDP, 0, 0]);
        assert_eq!(u32_at(&dump, 20), Some(1 << 1));

        let id = sockid_v4([10, 0, 0, 7], 5353, 5);
        let destroy = destroy_request(4, AF_INET6, IPPROTO_TCP, &id);
        assert_eq!(destroy.len(), NLMSG_HDR_LEN + REQ_V2_LEN);
        assert_eq!(u16_at(&destroy, 4), Some(SOCK_DESTROY));
        assert_eq!(u16_at(&destroy, 6), Some(1 | 4)); // NLM_F_REQUEST | NLM_F_ACK
        assert_eq!(&destroy[NLMSG_HDR_LEN + 8..], &id);
    }

    #[test]
    fn dumps_give_address_port_and_cookie() {
        let cookie = 0x1234_5678_9abc_def0;
        let id = sockid_v4([10, 0, 0, 7], 5353, cookie);
        let mut datagram = diag_message(AF_INET, &id);
        datagram.extend(diag_message(AF_INET, &sockid_v4([10, 0, 0, 8], 53, 6)));
        let socks: Vec<DiagSock> = messages(&datagram)
            .filter_map(|m| parse_diag_msg(m.payload))
            .collect();
        assert_eq!(socks.len(), 2);
        assert_eq!(socks[0].id, id);
        assert_eq!(socks[0].cookie(), cookie);
        assert_eq!(socks[0].inode, 4242);
        assert_eq!(
            socks[0].peer(),
            (Addr::from_v4_octets([10, 0, 0, 7]), 5353u16.to_be())
        );
        assert_eq!(socks[1].cookie(), 6);
        // The attribute diag_message adds is type 13 (INET_DIAG_PEERS-like), not the cgroup.
        assert_eq!(socks[0].cgroup, None);
    }

    #[test]
    fn dumps_give_the_cgroup_id_after_other_attributes() {
        let id = sockid_v4([10, 0, 0, 7], 5353, 1);
        let mut body = vec![AF_INET, 1, 0, 0];
        body.extend_from_slice(&id);
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&7u32.to_ne_bytes()); // idiag_inode
        // INET_DIAG_SHUTDOWN (u8, padded to 8 bytes), INET_DIAG_PAD (empty), then the id.
        body.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&[4, 0, 14, 0]);
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&0x1_0000_2345u64.to_ne_bytes());
        let datagram = message(SOCK_DIAG_BY_FAMILY, 2, 9, &body);
        let socks: Vec<DiagSock> = messages(&datagram)
            .filter_map(|m| parse_diag_msg(m.payload))
            .collect();
        assert_eq!(socks[0].cgroup, Some(0x1_0000_2345));
        assert_eq!(socks[0].inode, 7);
        // A truncated attribute gives none.
        assert_eq!(cgroup_attr(&[12, 0, 21, 0, 1, 2]), None);
    }

    #[test]
    fn errors_and_acks() {
        let ack = message(NLMSG_ERROR, 0, 1, &0i32.to_ne_bytes());
        let enoent = message(NLMSG_ERROR, 0, 2, &(-libc::ENOENT).to_ne_bytes());
        let mut both = ack.clone();
        both.extend(&enoent);
        let errors: Vec<Option<i32>> = messages(&both).map(|m| nlmsg_error(m.payload)).collect();
        assert_eq!(errors, [Some(0), Some(libc::ENOENT)]);
        assert_eq!(messages(&both[..10]).count(), 0, "truncated header");
    }

    #[test]
    fn only_sockets_lb_sent_to_a_removed_pair_are_stale() {
        let gone = backend(7, 5353);
        let removed: HashSet<MemberKey> = [MemberKey {
            id: 3,
            backend: gone,
        }]
        .into();
        let to_gone = DiagSock {
            family: AF_INET,
            id: sockid_v4([10, 0, 0, 7], 5353, 1),
            inode: 1,
            cgroup: None,
        };
        let elsewhere = DiagSock {
            family: AF_INET,
            id: sockid_v4([10, 0, 0, 9], 80, 2),
            inode: 2,
            cgroup: None,
        };
        let cases = [
            (
                "lb's socket to the removed pair",
                &to_gone,
                xlate(3, gone),
                true,
            ),
            (
                "same backend through another frontend",
                &to_gone,
                xlate(4, gone),
                false,
            ),
            (
                "value of another backend",
                &to_gone,
                xlate(3, backend(8, 5353)),
                false,
            ),
            (
                "reconnected elsewhere since",
                &elsewhere,
                xlate(3, gone),
                false,
            ),
            (
                "reconnected straight to the pod since (connect hook cleared the flag)",
                &to_gone,
                SockXlate {
                    flags: 0,
                    ..xlate(3, gone)
                },
                false,
            ),
        ];
        for (name, sock, xlate, want) in cases {
            assert_eq!(sock.is_stale(&xlate, &removed), want, "{name}");
        }
        assert_eq!(to_gone.peer_backend(), gone);
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn v6_and_mapped_peers() {
        let mut id = [0; SOCKID_LEN];
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7];
        id[20..36].copy_from_slice(&mapped);
        let sock = DiagSock {
            family: AF_INET6,
            id,
            inode: 0,
            cgroup: None,
        };
        assert_eq!(sock.peer().0, Addr::from_v4_octets([10, 0, 0, 7]));
    }
}
