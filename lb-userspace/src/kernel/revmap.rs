//! The reverse map `LB_REVERSE`: TCP backend -> the one frontend whose connects to it write
//! no socket storage, so that a TCP connect to a Service usually costs a few map lookups
//! instead of a socket-storage allocation (DEVELOPERS.md, "Layout 5").
//!
//! A socket without storage shows, in getpeername, the Service of its peer's entry. That is
//! exact only if every TCP socket of the cgroup whose peer is the backend and that has no
//! storage was connected through that Service, for as long as the entry answers. The
//! programs keep it so for new connects (a direct connect to an address with an entry, in
//! any state, gets storage marked `SOCK_DIRECT`; a connect through any other frontend gets
//! storage); this thread keeps it so for the sockets that lived before a change, with the
//! states of [`lb_common::maps::Reverse`]:
//!
//! - a new entry is written `PENDING` (getpeername ignores it, connects through it create
//!   storage); after [`GRACE`], every live TCP socket whose peer is the backend and that has
//!   no storage (connected to the pod directly before the entry existed) gets `SOCK_DIRECT`
//!   storage; then the entry becomes `ACTIVE`;
//! - an active entry that goes away or changes frontend becomes `DRAINING` (connects create
//!   storage again, getpeername still answers); after [`GRACE`], every live socket whose peer
//!   is the backend and that has no storage (connected through the entry's frontend) gets
//!   that translation as storage; then the entry is deleted (and a changed one comes back as
//!   a new, pending entry).
//!
//! [`GRACE`] covers a connect whose hook read the old state but whose socket is not yet in
//! the kernel's socket tables (the dump cannot see it): the hook and the hashing happen in
//! the same `connect()` call. A round that fails anywhere (a namespace not entered, a dump,
//! a storage write) leaves the states as they are and is retried: a pending entry only
//! costs storage on connects, a draining one keeps answering. An agent that starts finds the
//! states its predecessor left and finishes them the same way, after its first sync.
//!
//! The socket walk is `sock_destroy`'s ([`super::sock_destroy`]): per network namespace of
//! the cgroup's processes, a `sock_diag` dump, then the descriptor of each candidate through
//! `pidfd_getfd(2)`, whose storage is written with `BPF_MAP_UPDATE_ELEM` (`BPF_NOEXIST`: a
//! socket that got storage meanwhile keeps it). It runs on this module's own thread; the
//! sync loop only hands it the wanted entries ([`crate::plan::reverse_wanted`]).
//!
//! This thread also keeps `LB_REV_FILTER` ([`lb_common::maps::REVERSE_FILTER`]): the bit of
//! every key is set before an entry with that key is written, and a bit is cleared only at
//! the start of a later round, from the entries then in the map. So a clear bit always means
//! "no entry", and the programs' miss (a connect or getpeername to an address without an
//! entry) reads one array word instead of looking `LB_REVERSE` up.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use aya_obj::generated::bpf_cmd;
use lb_common::maps::{
    Backend, FrontendKey, IPPROTO_TCP, MAX_REVERSE, REVERSE, REVERSE_ACTIVE, REVERSE_DRAINING,
    REVERSE_FILTER, REVERSE_FILTER_WORDS, REVERSE_PENDING, RevNat, Reverse, SOCK_CONNECTED,
    SOCK_DIRECT, SOCKS, SockXlate, reverse_filter_bit,
};

use super::{
    PinLayout,
    netns::{self, Netns},
    sock_destroy::{
        AF_INET, AF_INET6, DiagSock, DiagSocket, bpf, fd_u32, lookup, open_diag_in, pidfd_getfd,
        socket_owners, zeroed_attr,
    },
};
use crate::{
    plan::{self, ReverseWrites},
    revindex::ReverseDelta,
};

/// How long after writing pending or draining states the sockets are walked: a connect
/// whose hook read the earlier state is in the socket tables by then.
pub const GRACE: Duration = Duration::from_secs(1);
/// The longest one walk over every namespace may take; a walk that takes longer failed.
const WALK_BUDGET: Duration = Duration::from_secs(5);
/// The wait before a failed round is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// TCP states (include/net/tcp_states.h) in which a socket may still be held by an
/// application that calls getpeername: every connected state.
const TCP_PEER_STATES: u32 = (1 << 1) // ESTABLISHED
    | (1 << 2) // SYN_SENT
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// What the agent could not set up.
#[derive(Debug, thiserror::Error)]
pub enum RevmapError {
    #[error("opening pinned map {path}")]
    Map {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("starting the reverse-map thread")]
    Thread(#[source] io::Error),
}

/// Reads `LB_REVERSE`.
pub struct ReverseReader {
    map: HashMap<MapData, FrontendKey, Reverse>,
}

impl ReverseReader {
    /// Opens the pinned `LB_REVERSE`.
    pub fn open(layout: &PinLayout) -> Result<Self, MapError> {
        let data = MapData::from_pin(layout.map(REVERSE))?;
        let map = HashMap::try_from(Map::HashMap(data))?;
        Ok(Self { map })
    }

    /// The Service that getpeername shows for a TCP socket without storage whose peer is
    /// `backend` (the entry, active or draining), as the programs answer it.
    pub fn answer(&self, backend: &Backend) -> Option<RevNat> {
        let entry = self.map.get(&key_of(backend), 0).ok()?;
        matches!(entry.state, REVERSE_ACTIVE | REVERSE_DRAINING).then_some(entry.service)
    }

    /// Every entry.
    fn all(&self) -> Result<BTreeMap<FrontendKey, Reverse>, MapError> {
        self.map.iter().collect()
    }
}

/// The `LB_REVERSE` key of a TCP backend.
fn key_of(backend: &Backend) -> FrontendKey {
    FrontendKey {
        addr: backend.addr,
        port: backend.port,
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

/// The word index and mask of `key`'s bit in `LB_REV_FILTER`.
fn filter_bit(key: &FrontendKey) -> (usize, u64) {
    let bit = reverse_filter_bit(&key.addr, key.port);
    ((bit / 64) as usize, 1 << (bit % 64))
}

/// The words of `LB_REV_FILTER` with exactly the bits of `keys` set.
fn filter_words<'a>(keys: impl IntoIterator<Item = &'a FrontendKey>) -> Vec<u64> {
    let mut words = vec![0; REVERSE_FILTER_WORDS as usize];
    for key in keys {
        let (word, mask) = filter_bit(key);
        words[word] |= mask;
    }
    words
}

/// Brings the thread's copy of the wanted entries up to date.
fn apply_delta(wanted: &mut BTreeMap<FrontendKey, RevNat>, delta: ReverseDelta) {
    for (key, entry) in delta {
        match entry {
            Some(service) => wanted.insert(key, service),
            None => wanted.remove(&key),
        };
    }
}

/// The sync loop's handle on the reverse-map thread.
pub struct ReverseMap {
    tx: mpsc::Sender<ReverseDelta>,
}

impl ReverseMap {
    /// Starts the thread. Before the first [`ReverseMap::wanted`] it only rebuilds
    /// `LB_REV_FILTER` from the entries it finds, and changes no entry (an agent that starts
    /// must not drain entries its first sync still wants).
    pub fn start(layout: &PinLayout, cgroup: PathBuf) -> Result<Self, RevmapError> {
        let map_err = |name: &str| {
            let path = layout.map(name).display().to_string();
            move |source| RevmapError::Map { path, source }
        };
        let reverse = ReverseReader::open(layout).map_err(map_err(REVERSE))?;
        let socks = MapData::from_pin(layout.map(SOCKS)).map_err(map_err(SOCKS))?;
        let filter = MapData::from_pin(layout.map(REVERSE_FILTER))
            .and_then(|data| Array::try_from(Map::Array(data)))
            .map_err(map_err(REVERSE_FILTER))?;
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            reverse,
            filter,
            mirror: None,
            socks,
            cgroup,
            home: None,
        };
        std::thread::Builder::new()
            .name("revmap".into())
            .spawn(move || worker.run(&rx))
            .map_err(RevmapError::Thread)?;
        Ok(Self { tx })
    }

    /// How the entries `LB_REVERSE` should hold changed (the first call: all of them, from
    /// none). Returns at once.
    pub fn wanted(&self, delta: ReverseDelta) {
        if self.tx.send(delta).is_err() {
            tracing::error!("the reverse-map thread has stopped; TCP connects keep socket storage");
        }
    }
}

struct Worker {
    reverse: ReverseReader,
    /// `LB_REV_FILTER`.
    filter: Array<MapData, u64>,
    /// What `LB_REV_FILTER` holds, as this thread last wrote it (the only writer); `None`
    /// until a [`Worker::filter_sync`] succeeded (at start: whatever a predecessor left).
    mirror: Option<Vec<u64>>,
    /// `LB_SOCKS`, written through a copy of a client's socket descriptor.
    socks: MapData,
    cgroup: PathBuf,
    /// This thread's namespace when it started (the agent's).
    home: Option<Netns>,
}

/// What a round did.
enum Round {
    /// Every entry is as wanted, active.
    Settled,
    /// Writes were made; another round may have more to do.
    Progressed,
}

/// Why a round stopped.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("LB_REVERSE: {0}")]
    Map(#[from] MapError),
    #[error("{what}: {source}")]
    Walk {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} network namespaces not reached within the walk budget")]
    Deadline(usize),
}

fn walk_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RoundError {
    let what = what.into();
    move |source| RoundError::Walk { what, source }
}

impl Worker {
    fn run(mut self, rx: &mpsc::Receiver<ReverseDelta>) {
        match Netns::current_thread() {
            Ok(home) => self.home = Some(home),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the agent's network namespace; reverse entries stay pending");
            }
        }
        // Entries a stopped agent left answer with their bits set, before the first sync.
        if let Err(e) = self
            .reverse
            .all()
            .and_then(|current| self.filter_sync(&current))
        {
            tracing::warn!(error = %e, "LB_REV_FILTER: not rebuilt at start; retried each round");
        }
        let mut wanted = BTreeMap::new();
        let Ok(first) = rx.recv() else { return };
        apply_delta(&mut wanted, first);
        loop {
            while let Ok(newer) = rx.try_recv() {
                apply_delta(&mut wanted, newer);
            }
            let wait = match self.round(&wanted) {
                Ok(Round::Progressed) => continue,
                Ok(Round::Settled) => None,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?RETRY, "reverse entries: round failed; states kept");
                    Some(RETRY)
                }
            };
            let next = match wait {
                None => rx.recv().map(Some).map_err(|_| ()),
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(newer) => Ok(Some(newer)),
                    Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                },
            };
            match next {
                Ok(Some(newer)) => apply_delta(&mut wanted, newer),
                Ok(None) => {}
                Err(()) => return,
            }
        }
    }

    /// One round: the first writes ([`plan::reverse_step`]), the walk, the second writes
    /// ([`plan::reverse_after_walk`]).
    fn round(&mut self, wanted: &BTreeMap<FrontendKey, RevNat>) -> Result<Round, RoundError> {
        let current = self.reverse.all()?;
        self.filter_sync(&current)?;
        let first = plan::reverse_step(&current, wanted, MAX_REVERSE as usize);
        self.apply(&first)?;
        let current = if first.is_empty() {
            current
        } else {
            self.reverse.all()?
        };
        let walking: BTreeMap<Backend, Reverse> = current
            .iter()
            .filter(|(_, e)| matches!(e.state, REVERSE_PENDING | REVERSE_DRAINING))
            .map(|(k, e)| (Backend::new(k.addr, k.port), *e))
            .collect();
        if walking.is_empty() {
            return Ok(if first.is_empty() {
                Round::Settled
            } else {
                Round::Progressed
            });
        }
        std::thread::sleep(GRACE);
        let started = Instant::now();
        let written = self.walk(&walking)?;
        let second = plan::reverse_after_walk(&current, wanted);
        self.apply(&second)?;
        tracing::info!(
            pending = walking
                .values()
                .filter(|e| e.state == REVERSE_PENDING)
                .count(),
            draining = walking
                .values()
                .filter(|e| e.state == REVERSE_DRAINING)
                .count(),
            activated = second.put.len(),
            deleted = second.delete.len(),
            sockets_marked = written,
            walk_ms = started.elapsed().as_secs_f64() * 1e3,
            "reverse entries updated"
        );
        Ok(Round::Progressed)
    }

    /// Makes `LB_REV_FILTER` hold exactly the bits of `current` (what `LB_REVERSE` holds
    /// now; only this thread writes it): the bits of entries deleted since are cleared.
    fn filter_sync(&mut self, current: &BTreeMap<FrontendKey, Reverse>) -> Result<(), MapError> {
        let needed = filter_words(current.keys());
        for (i, word) in needed.iter().enumerate() {
            if self.mirror.as_ref().and_then(|m| m.get(i)) == Some(word) {
                continue;
            }
            #[expect(
                clippy::cast_possible_truncation,
                reason = "below REVERSE_FILTER_WORDS"
            )]
            self.filter.set(i as u32, word, 0)?;
            if let Some(mirror) = &mut self.mirror {
                mirror[i] = *word;
            }
        }
        self.mirror = Some(needed);
        Ok(())
    }

    /// Sets the filter bit of every key in `keys` that is not set yet, before entries with
    /// those keys are written.
    fn filter_set<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a FrontendKey>,
    ) -> Result<(), MapError> {
        for key in keys {
            let (i, mask) = filter_bit(key);
            #[expect(
                clippy::cast_possible_truncation,
                reason = "below REVERSE_FILTER_WORDS"
            )]
            let index = i as u32;
            let word = match &self.mirror {
                Some(mirror) => mirror[i],
                None => self.filter.get(&index, 0)?,
            };
            if word & mask != 0 {
                continue;
            }
            self.filter.set(index, word | mask, 0)?;
            if let Some(mirror) = &mut self.mirror {
                mirror[i] = word | mask;
            }
        }
        Ok(())
    }

    fn apply(&mut self, writes: &ReverseWrites) -> Result<(), MapError> {
        self.filter_set(writes.put.iter().map(|(key, _)| key))?;
        let map = &mut self.reverse.map;
        for (key, entry) in &writes.put {
            map.insert(key, entry, 0)?;
        }
        for key in &writes.delete {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Gives every live TCP socket of the cgroup's namespaces whose peer is a backend of
    /// `walking` and that has no storage what getpeername must show from now on: the pod
    /// (a pending entry: the socket was connected directly) or the entry's Service (a
    /// draining entry: it was connected through it). Returns how many sockets got storage.
    fn walk(&self, walking: &BTreeMap<Backend, Reverse>) -> Result<u64, RoundError> {
        let deadline = Instant::now() + WALK_BUDGET;
        let own = Netns::open(Path::new("/proc/self/ns/net")).ok();
        let namespaces = netns::in_cgroup_subtree(&self.cgroup, own);
        let mut written = 0;
        for (i, ns) in namespaces.iter().enumerate() {
            if Instant::now() >= deadline {
                return Err(RoundError::Deadline(namespaces.len() - i));
            }
            written += self.walk_in(ns, walking)?;
        }
        Ok(written)
    }

    fn walk_in(&self, ns: &Netns, walking: &BTreeMap<Backend, Reverse>) -> Result<u64, RoundError> {
        let where_ = ns.path.display().to_string();
        let mut sock = open_diag_in(ns, self.home.as_ref()).map_err(walk_err(&where_))?;
        let mut candidates: Vec<DiagSock> = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let socks = sock
                .dump(family, IPPROTO_TCP, TCP_PEER_STATES)
                .map_err(walk_err(format!("{where_} tcp dump")))?;
            candidates.extend(
                socks
                    .into_iter()
                    .filter(|s| walking.contains_key(&s.peer_backend())),
            );
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        // A socket its application closed is an orphan (inode 0, finishing its FIN
        // handshake): nobody can call getpeername on it.
        candidates.retain(|s| s.inode != 0);
        let inodes: HashSet<u64> = candidates.iter().map(|s| s.inode).collect();
        let mut owners: StdHashMap<u64, (u32, i32)> = socket_owners(&ns.pids, &inodes);
        if owners.len() < inodes.len() {
            // Held by a process outside the cgroup (passed to it, or a process that never
            // ran lb's programs): every process is searched, and storage on a socket whose
            // hooks do not run changes nothing.
            let missing: HashSet<u64> = inodes
                .iter()
                .filter(|i| !owners.contains_key(i))
                .copied()
                .collect();
            owners.extend(socket_owners(&all_pids(), &missing));
        }
        let mut written = 0;
        for candidate in &candidates {
            let Some(&(pid, fd)) = owners.get(&candidate.inode) else {
                // Not found in any process: closed since the dump (then the next dump no
                // longer has it, or has it as an orphan), or in flight in a
                // descriptor-passing message. Storage cannot be written on a live one, so
                // the entry must not change state yet: the round fails and is retried.
                if still_held(&mut sock, candidate)
                    .map_err(walk_err(format!("{where_} tcp dump")))?
                {
                    return Err(RoundError::Walk {
                        what: format!("{where_} socket inode {}", candidate.inode),
                        source: io::Error::from(io::ErrorKind::NotFound),
                    });
                }
                continue;
            };
            let backend = candidate.peer_backend();
            let Some(entry) = walking.get(&backend) else {
                continue;
            };
            let value = if entry.state == REVERSE_PENDING {
                SockXlate {
                    flags: SOCK_DIRECT,
                    ..SockXlate::default()
                }
            } else {
                SockXlate {
                    backend,
                    service: entry.service,
                    flags: SOCK_CONNECTED,
                }
            };
            let copy = match pidfd_getfd(pid, fd) {
                Ok(copy) => copy,
                // The process or descriptor is gone since the scan.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) => continue,
                Err(e) => return Err(walk_err(format!("{where_} pid {pid} fd {fd}"))(e)),
            };
            // The descriptor may have been closed and its number reused since the scan.
            if inode_of(copy.as_raw_fd()) != Some(candidate.inode) {
                continue;
            }
            let mut existing = SockXlate::default();
            if lookup(&self.socks, copy.as_raw_fd(), &mut existing)
                .map_err(walk_err(format!("{where_} pid {pid} fd {fd} lookup")))?
            {
                continue; // has storage: the storage answers, not the entry
            }
            match create_storage(&self.socks, copy.as_raw_fd(), &value) {
                Ok(()) => written += 1,
                // Got storage from its own connect meanwhile: that one is right.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(walk_err(format!("{where_} pid {pid} fd {fd} update"))(e)),
            }
        }
        Ok(written)
    }
}

/// Whether `candidate` is still in its namespace's sockets, held by an application (not an
/// orphan). `sock` is a `sock_diag` socket of that namespace.
fn still_held(sock: &mut DiagSocket, candidate: &DiagSock) -> io::Result<bool> {
    Ok(sock
        .dump(candidate.family, IPPROTO_TCP, TCP_PEER_STATES)?
        .iter()
        .any(|s| s.inode == candidate.inode && s.inode != 0))
}

/// Every process id in `/proc`.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode of descriptor `fd` (a socket's, as `sock_diag` and `/proc/PID/fd` name it).
fn inode_of(fd: i32) -> Option<u64> {
    // SAFETY: fstat fills the zeroed struct for a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstat(fd, &raw mut st) } == 0).then_some(st.st_ino)
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_NOEXIST` of socket `key` in socket-storage map `map`:
/// creates the socket's value (`EEXIST` if it has one).
fn create_storage(map: &MapData, key: i32, value: &SockXlate) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = fd_u32(map.fd().as_fd())?;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(value) as u64;
    attr.__bindgen_anon_2.flags = BPF_NOEXIST;
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

#[cfg(test)]
mod tests {
    use lb_common::Addr;

    use super::*;

    fn key(last: u8, port: u16) -> FrontendKey {
        FrontendKey {
            addr: Addr::from_v4_octets([10, 244, 0, last]),
            port: port.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }

    /// The words hold exactly the keys' bits, as the programs test them.
    #[test]
    fn filter_words_hold_exactly_the_keys() {
        let keys = [key(1, 80), key(2, 80), key(1, 8080)];
        let words = filter_words(&keys);
        for k in &keys {
            let bit = reverse_filter_bit(&k.addr, k.port);
            assert_ne!(words[(bit >> 6) as usize] & (1 << (bit & 63)), 0);
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert!((1..=3).contains(&set));
        assert!(filter_words(&[]).iter().all(|w| *w == 0));
    }
}
