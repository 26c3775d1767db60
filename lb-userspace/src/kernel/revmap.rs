//! The reverse map `LB_REVERSE`: TCP backend -> the one frontend whose connects to it write
//! no per-socket state, so that a TCP connect to a Service usually costs a few map lookups
//! and no write (DEVELOPERS.md, "Layout 5").
//!
//! "State" is a socket's `LB_TCP_SOCKS` slot or its `LB_SOCKS` storage (the programs write
//! either; this thread writes only storage). A socket without state shows, in getpeername,
//! the Service of its peer's entry. That is exact only if every TCP socket of the cgroup whose
//! peer is the backend and that has no state was connected through that Service, for as long
//! as the entry answers. The programs keep it so for new connects (a direct connect to an
//! address with an entry, in any state, gets state marked `SOCK_DIRECT`; a connect through
//! any other frontend gets state); this thread keeps it so for the sockets that lived before
//! a change, with the states of [`lb_common::maps::Reverse`]:
//!
//! - a new entry is written `PENDING` (getpeername ignores it, connects through it write
//!   state); after [`GRACE`], every live TCP socket whose peer is the backend and that has
//!   no state (connected to the pod directly before the entry existed) gets `SOCK_DIRECT`
//!   storage; then the entry becomes `ACTIVE`;
//! - an active entry that goes away or changes frontend becomes `DRAINING` (connects write
//!   state again, getpeername still answers); after [`GRACE`], every live socket whose peer
//!   is the backend and that has no state (connected through the entry's frontend) gets
//!   that translation as storage; then the entry is deleted (and a changed one comes back as
//!   a new, pending entry).
//!
//! [`GRACE`] covers a connect whose hook read the old state but whose socket is not yet in
//! the kernel's socket tables (the dump cannot see it): the hook and the hashing happen in
//! the same `connect()` call. A round's outcome is per backend: a backend with a socket the
//! walk could not give its storage (held by no process the agent can see: a kernel socket,
//! an io_uring fixed file, a descriptor in flight in `SCM_RIGHTS`, a process outside the
//! agent's PID namespace; or a namespace not walked, a failed write) keeps its entry's state
//! and is retried ([`RETRY`], doubling up to [`RETRY_MAX`] while nothing moves), counted in `lb_reverse_entries_stuck` and named in a warning
//! ([`STUCK_LOG_EVERY`]); the other backends move on. A pending entry only costs storage on
//! connects, a draining one keeps answering. An agent that starts finds the states its
//! predecessor left and finishes them the same way, after its first sync.
//!
//! The socket walk uses `sock_destroy`'s parts ([`super::sock_destroy`]): per network
//! namespace of the node ([`netns::on_node`]: named ones and every process's; a socket lives
//! where it was made), a `sock_diag` dump, keeping the sockets of lb's cgroup subtree (their
//! `INET_DIAG_CGROUP_ID`: getpeername runs lb's program only for those), then the descriptor
//! of each candidate through `pidfd_getfd(2)` (looked for again if it moved since the scan),
//! whose storage is written with `BPF_MAP_UPDATE_ELEM` (`BPF_NOEXIST`: a socket that got
//! storage meanwhile keeps it). It runs on this module's own thread; the sync loop only hands
//! it the changes of the wanted entries ([`crate::revindex::ReverseIndex`]) through a slot
//! that holds at most one pending change per backend (a later change of a backend replaces an
//! earlier one the thread has not taken; nothing is handed over when nothing changed).
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
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use aya_obj::generated::bpf_cmd;
use lb_common::maps::{
    Backend, FrontendKey, IPPROTO_TCP, MAX_REVERSE, REVERSE, REVERSE_ACTIVE, REVERSE_DRAINING,
    REVERSE_FILTER, REVERSE_FILTER_WORDS, REVERSE_PENDING, RevNat, Reverse, SOCK_CONNECTED,
    SOCK_DIRECT, SOCKS, SockXlate, TCP_OWNERS, TCP_SOCKS, reverse_filter_bit,
};
use prometheus_client::metrics::gauge::Gauge;

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
/// The wait before a failed round, or stuck entries, are tried again.
const RETRY: Duration = Duration::from_secs(2);
/// The longest wait before stuck entries are tried again.
const RETRY_MAX: Duration = Duration::from_secs(16);

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

    /// The Service that getpeername shows for a TCP socket without state whose peer is
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

/// The changes of the wanted entries, handed from the sync loop to the reverse-map thread:
/// one slot, not a queue (a round takes the grace and a walk, during which several sync
/// passes may hand over changes). It holds at most one change per backend key: a later
/// change of a key replaces an earlier one the thread has not taken, so it never grows past
/// the number of backends.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// Changes not yet taken by the thread (key -> the entry it should have; `None`: none).
    /// `Some` (even empty) once the first sync handed its wanted set over.
    pending: Option<BTreeMap<FrontendKey, Option<RevNat>>>,
    /// The first hand-over happened (later empty ones wake nobody).
    started: bool,
    /// The sync loop's handle is gone: the thread stops.
    closed: bool,
}

/// What [`Slot::wait_newer`] found.
enum Newer {
    Changes(BTreeMap<FrontendKey, Option<RevNat>>),
    TimedOut,
    Closed,
}

impl Slot {
    /// Adds `delta` to the pending changes; whether anything was handed over (an empty delta
    /// after the first wakes nobody).
    fn put(&self, delta: ReverseDelta) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if delta.is_empty() && state.started {
            return false;
        }
        state.started = true;
        state
            .pending
            .get_or_insert_with(BTreeMap::new)
            .extend(delta);
        drop(state);
        self.changed.notify_all();
        true
    }

    fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.changed.notify_all();
    }

    /// Takes the pending changes, waiting for them up to `wait` (`None`: for ever).
    fn wait_newer(&self, wait: Option<Duration>) -> Newer {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if state.closed {
                return Newer::Closed;
            }
            if let Some(changes) = state.pending.take() {
                return Newer::Changes(changes);
            }
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Newer::TimedOut;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
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
fn apply_delta(
    wanted: &mut BTreeMap<FrontendKey, RevNat>,
    delta: impl IntoIterator<Item = (FrontendKey, Option<RevNat>)>,
) {
    for (key, entry) in delta {
        match entry {
            Some(service) => wanted.insert(key, service),
            None => wanted.remove(&key),
        };
    }
}

/// The sync loop's handle on the reverse-map thread. Dropping it stops the thread.
pub struct ReverseMap {
    slot: Arc<Slot>,
}

impl ReverseMap {
    /// Starts the thread. Before the first [`ReverseMap::wanted`] it only rebuilds
    /// `LB_REV_FILTER` from the entries it finds, and changes no entry (an agent that starts
    /// must not drain entries its first sync still wants). `stuck` is set to the number of
    /// entries whose last socket walk could not finish (`lb_reverse_entries_stuck`).
    pub fn start(layout: &PinLayout, cgroup: PathBuf, stuck: Gauge) -> Result<Self, RevmapError> {
        let map_err = |name: &str| {
            let path = layout.map(name).display().to_string();
            move |source| RevmapError::Map { path, source }
        };
        let reverse = ReverseReader::open(layout).map_err(map_err(REVERSE))?;
        let socks = MapData::from_pin(layout.map(SOCKS)).map_err(map_err(SOCKS))?;
        let tcp_owners = MapData::from_pin(layout.map(TCP_OWNERS))
            .and_then(|data| Array::try_from(Map::Array(data)))
            .map_err(map_err(TCP_OWNERS))?;
        let tcp_socks = MapData::from_pin(layout.map(TCP_SOCKS))
            .and_then(|data| Array::try_from(Map::Array(data)))
            .map_err(map_err(TCP_SOCKS))?;
        let filter = MapData::from_pin(layout.map(REVERSE_FILTER))
            .and_then(|data| Array::try_from(Map::Array(data)))
            .map_err(map_err(REVERSE_FILTER))?;
        let slot = Arc::new(Slot::default());
        let worker = Worker {
            reverse,
            filter,
            mirror: None,
            socks,
            tcp_owners,
            tcp_socks,
            cgroup,
            home: None,
            stuck: StdHashMap::new(),
            stuck_gauge: stuck,
            retry: RETRY,
        };
        let theirs = slot.clone();
        std::thread::Builder::new()
            .name("revmap".into())
            .spawn(move || worker.run(&theirs))
            .map_err(RevmapError::Thread)?;
        Ok(Self { slot })
    }

    /// How the entries `LB_REVERSE` should hold changed (the first call: all of them, from
    /// none). Returns at once; the changes join those the thread has not taken yet.
    pub fn wanted(&self, delta: ReverseDelta) {
        if self.slot.put(delta) {
            tracing::debug!("reverse entry changes handed to the reverse-map thread");
        }
    }
}

impl Drop for ReverseMap {
    fn drop(&mut self) {
        self.slot.close();
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
    /// `LB_TCP_OWNERS` and `LB_TCP_SOCKS`: a socket that owns its slot has state already.
    tcp_owners: Array<MapData, u64>,
    tcp_socks: Array<MapData, SockXlate>,
    cgroup: PathBuf,
    /// This thread's namespace when it started (the agent's).
    home: Option<Netns>,
    /// The backends whose entries are stuck (their last walk could not finish): since when,
    /// and when that was last logged.
    stuck: StdHashMap<Backend, StuckSince>,
    stuck_gauge: Gauge,
    /// The wait before stuck entries are walked again.
    retry: Duration,
}

/// How long a stuck backend goes between two warnings.
const STUCK_LOG_EVERY: Duration = Duration::from_secs(300);
/// The most stuck backends named in the log per round (the rest are counted).
const STUCK_LOG_MAX: usize = 10;

#[derive(Clone, Copy, Debug)]
struct StuckSince {
    since: Instant,
    logged: Option<Instant>,
}

/// What a round did.
#[derive(Debug, Default)]
struct Round {
    /// Writes were made; another round may have more to do.
    progressed: bool,
    /// Entries left pending or draining because some socket of their backend could not be
    /// given its storage.
    stuck: usize,
}

/// What a walk did: sockets given storage, and the backends some of whose sockets could
/// not be (with why: the first reason met).
#[derive(Debug, Default)]
struct Walked {
    written: u64,
    stuck: BTreeMap<Backend, String>,
}

impl Walked {
    fn stick(&mut self, backend: Backend, why: impl FnOnce() -> String) {
        self.stuck.entry(backend).or_insert_with(why);
    }

    /// Every backend of `walking` is stuck (a namespace was not walked: any of them may
    /// have sockets there).
    fn stick_all(&mut self, walking: &BTreeMap<Backend, Reverse>, why: &str) {
        for backend in walking.keys() {
            self.stick(*backend, || why.to_owned());
        }
    }
}

/// `current` without the entries of `stuck` backends: what [`plan::reverse_after_walk`] may
/// move on (a stuck pending entry stays pending, a stuck draining one keeps answering).
fn settled(
    current: &BTreeMap<FrontendKey, Reverse>,
    stuck: &BTreeMap<Backend, String>,
) -> BTreeMap<FrontendKey, Reverse> {
    current
        .iter()
        .filter(|(k, _)| !stuck.contains_key(&Backend::new(k.addr, k.port)))
        .map(|(k, e)| (*k, *e))
        .collect()
}

/// Which sockets lb's programs run for: those whose cgroup is in the subtree lb attaches to.
/// getpeername never reads `LB_REVERSE` for a socket of another cgroup, so such a socket
/// needs no storage (and one the agent cannot reach holds nothing up).
#[derive(Debug, Default)]
struct CgroupScope {
    /// The subtree's cgroup ids.
    inside: HashSet<u64>,
    /// Every other cgroup id of the hierarchy.
    outside: HashSet<u64>,
}

impl CgroupScope {
    fn read(cgroup: &Path) -> Self {
        let inside = netns::cgroup_ids(cgroup);
        let outside = netns::cgroup_ids(&netns::cgroup_hierarchy_root(cgroup))
            .into_iter()
            .filter(|id| !inside.contains(id))
            .collect();
        Self { inside, outside }
    }

    /// Whether the programs may run for a socket of cgroup `id`: yes if it is in the
    /// subtree, if the kernel did not say, or if the id is no cgroup found when the scope
    /// was read (a cgroup removed since the socket was made, whose programs still run for
    /// it, or one made since).
    fn includes(&self, id: Option<u64>) -> bool {
        id.is_none_or(|id| self.inside.contains(&id) || !self.outside.contains(&id))
    }
}

/// A socket's `ip:port` for logs.
fn show(backend: &Backend) -> String {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(backend.addr.0) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    let port = u16::from_be(backend.port);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{v6}]:{port}"),
    }
}

impl Worker {
    fn run(mut self, slot: &Slot) {
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
        match slot.wait_newer(None) {
            Newer::Changes(first) => apply_delta(&mut wanted, first),
            Newer::TimedOut | Newer::Closed => return,
        }
        loop {
            let round = self.round(&wanted);
            if matches!(&round, Ok(r) if r.progressed || r.stuck == 0) {
                self.retry = RETRY;
            }
            let wait = match round {
                Ok(Round {
                    progressed: true,
                    stuck: 0,
                }) => Some(Duration::ZERO),
                Ok(Round {
                    progressed: false,
                    stuck: 0,
                }) => None,
                Ok(Round {
                    progressed: true, ..
                }) => Some(Duration::ZERO),
                Ok(Round {
                    progressed: false, ..
                }) => {
                    // Only stuck entries are left: walked again after the wait, which
                    // doubles up to RETRY_MAX while nothing moves (a socket that stays out
                    // of reach, such as a kernel socket, costs a walk every RETRY_MAX).
                    let wait = self.retry;
                    self.retry = (self.retry * 2).min(RETRY_MAX);
                    Some(wait)
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?RETRY, "reverse entries: round failed; states kept");
                    Some(RETRY)
                }
            };
            match slot.wait_newer(wait) {
                Newer::Changes(newer) => {
                    apply_delta(&mut wanted, newer);
                    self.retry = RETRY;
                }
                Newer::TimedOut => {}
                Newer::Closed => return,
            }
        }
    }

    /// One round: the first writes ([`plan::reverse_step`]), the walk, the second writes
    /// ([`plan::reverse_after_walk`]) for the backends whose sockets were all handled.
    fn round(&mut self, wanted: &BTreeMap<FrontendKey, RevNat>) -> Result<Round, MapError> {
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
            self.report_stuck(&walking, &BTreeMap::new());
            return Ok(Round {
                progressed: !first.is_empty(),
                stuck: 0,
            });
        }
        std::thread::sleep(GRACE);
        let started = Instant::now();
        let walked = self.walk(&walking);
        let second = plan::reverse_after_walk(&settled(&current, &walked.stuck), wanted);
        self.apply(&second)?;
        self.report_stuck(&walking, &walked.stuck);
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
            stuck = walked.stuck.len(),
            sockets_marked = walked.written,
            walk_ms = started.elapsed().as_secs_f64() * 1e3,
            "reverse entries updated"
        );
        Ok(Round {
            progressed: !first.is_empty() || !second.is_empty(),
            stuck: walked.stuck.len(),
        })
    }

    /// Sets `lb_reverse_entries_stuck` and warns about stuck backends: when one first gets
    /// stuck, then every [`STUCK_LOG_EVERY`] while it stays so (at most [`STUCK_LOG_MAX`]
    /// named per round).
    fn report_stuck(
        &mut self,
        walking: &BTreeMap<Backend, Reverse>,
        stuck: &BTreeMap<Backend, String>,
    ) {
        let now = Instant::now();
        let before = std::mem::take(&mut self.stuck);
        for backend in before.keys().filter(|b| !stuck.contains_key(b)) {
            if before[backend].logged.is_some() {
                tracing::info!(backend = %show(backend), "reverse entry no longer stuck");
            }
        }
        let mut named = 0;
        let mut unnamed = 0;
        for (backend, why) in stuck {
            let mut since = before.get(backend).copied().unwrap_or(StuckSince {
                since: now,
                logged: None,
            });
            let due = since
                .logged
                .is_none_or(|at| now.duration_since(at) >= STUCK_LOG_EVERY);
            if due && named < STUCK_LOG_MAX {
                named += 1;
                since.logged = Some(now);
                let entry = walking.get(backend);
                tracing::warn!(
                    backend = %show(backend),
                    service = %entry.map(|e| show(&Backend::new(e.service.addr, e.service.port))).unwrap_or_default(),
                    frontend_id = entry.map_or(0, |e| e.service.id),
                    state = entry.map_or("", |e| if e.state == REVERSE_PENDING { "pending" } else { "draining" }),
                    stuck_for_s = now.duration_since(since.since).as_secs(),
                    reason = %why,
                    retry_in = ?self.retry,
                    "reverse entry stuck: a socket to the backend could not be given its storage; the entry keeps its state"
                );
            } else if due {
                unnamed += 1;
            }
            self.stuck.insert(*backend, since);
        }
        if unnamed > 0 {
            tracing::warn!(
                more = unnamed,
                stuck = stuck.len(),
                "more reverse entries stuck (see lb_reverse_entries_stuck)"
            );
        }
        self.stuck_gauge
            .set(i64::try_from(stuck.len()).unwrap_or(i64::MAX));
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

    /// Gives every live TCP socket of the cgroup subtree whose peer is a backend of
    /// `walking` and that has no state what getpeername must show from now on: the pod
    /// (a pending entry: the socket was connected directly) or the entry's Service (a
    /// draining entry: it was connected through it). Says which backends had a socket it
    /// could not handle.
    fn walk(&self, walking: &BTreeMap<Backend, Reverse>) -> Walked {
        let deadline = Instant::now() + WALK_BUDGET;
        let scope = CgroupScope::read(&self.cgroup);
        let own = Netns::open(Path::new("/proc/self/ns/net")).ok();
        // Every namespace of the node, not only those of the subtree's processes: a socket
        // lives where it was made (a process may have made it after a setns, and gone back),
        // and the cgroup id tells which of them lb's programs run for.
        let namespaces = netns::on_node(own);
        let mut walked = Walked::default();
        for (i, ns) in namespaces.iter().enumerate() {
            if Instant::now() >= deadline {
                let left = namespaces.len() - i;
                walked.stick_all(
                    walking,
                    &format!("{left} network namespaces not reached within {WALK_BUDGET:?}"),
                );
                break;
            }
            self.walk_in(ns, walking, &scope, deadline, &mut walked);
        }
        walked
    }

    fn walk_in(
        &self,
        ns: &Netns,
        walking: &BTreeMap<Backend, Reverse>,
        scope: &CgroupScope,
        deadline: Instant,
        walked: &mut Walked,
    ) {
        let where_ = ns.path.display().to_string();
        let mut sock = match open_diag_in(ns, self.home.as_ref()) {
            Ok(sock) => sock,
            Err(e) => return walked.stick_all(walking, &format!("{where_}: {e}")),
        };
        let mut candidates: Vec<DiagSock> = Vec::new();
        for family in [AF_INET, AF_INET6] {
            match sock.dump(family, IPPROTO_TCP, TCP_PEER_STATES) {
                Ok(socks) => candidates.extend(socks.into_iter().filter(|s| {
                    walking.contains_key(&s.peer_backend())
                        // A socket its application closed is an orphan (inode 0, finishing
                        // its FIN handshake): nobody can call getpeername on it.
                        && s.inode != 0
                        && scope.includes(s.cgroup)
                })),
                Err(e) => return walked.stick_all(walking, &format!("{where_} tcp dump: {e}")),
            }
        }
        if candidates.is_empty() {
            return;
        }
        let inodes: HashSet<u64> = candidates.iter().map(|s| s.inode).collect();
        let mut owners = find_owners(ns, &inodes);
        for candidate in &candidates {
            let backend = candidate.peer_backend();
            if walked.stuck.contains_key(&backend) {
                continue; // its entry stays as it is anyway
            }
            if Instant::now() >= deadline {
                walked.stick(backend, || {
                    format!("{where_}: walk budget of {WALK_BUDGET:?} spent")
                });
                continue;
            }
            let Some(entry) = walking.get(&backend) else {
                continue;
            };
            match self.give_storage(ns, &mut sock, candidate, entry, &mut owners) {
                Ok(true) => walked.written += 1,
                Ok(false) => {}
                Err(why) => walked.stick(backend, || format!("{where_}: {why}")),
            }
        }
    }

    /// Writes `candidate`'s storage (see [`Worker::walk`]) unless it has state (its
    /// `LB_TCP_SOCKS` slot or storage): whether it wrote. A socket that cannot be reached and is still held is an error: its backend's
    /// entry must keep its state.
    fn give_storage(
        &self,
        ns: &Netns,
        sock: &mut DiagSocket,
        candidate: &DiagSock,
        entry: &Reverse,
        owners: &mut StdHashMap<u64, (u32, i32)>,
    ) -> Result<bool, String> {
        let owns_slot =
            super::sock_destroy::slot_state(&self.tcp_owners, &self.tcp_socks, candidate.cookie())
                .map_err(|e| format!("cookie {} slot lookup: {e}", candidate.cookie()))?;
        if owns_slot.is_some() {
            return Ok(false); // has state: its slot answers, not the entry
        }
        let inode = candidate.inode;
        let found = reach(
            inode,
            owners.get(&inode).copied(),
            || find_owners(ns, &[inode].into()).get(&inode).copied(),
            |pid, fd| {
                let copy = pidfd_getfd(pid, fd)?;
                let inode = inode_of(copy.as_raw_fd());
                Ok((copy, inode))
            },
            || still_held(sock, candidate),
        )?;
        let Reached::Open(copy, (pid, fd)) = found else {
            return Ok(false); // closed meanwhile: nobody calls getpeername on it any more
        };
        owners.insert(inode, (pid, fd));
        let value = if entry.state == REVERSE_PENDING {
            SockXlate {
                flags: SOCK_DIRECT,
                ..SockXlate::default()
            }
        } else {
            SockXlate {
                backend: candidate.peer_backend(),
                service: entry.service,
                flags: SOCK_CONNECTED,
            }
        };
        let mut existing = SockXlate::default();
        if lookup(&self.socks, copy.as_raw_fd(), &mut existing)
            .map_err(|e| format!("pid {pid} fd {fd} lookup: {e}"))?
        {
            return Ok(false); // has storage: it answers, not the entry
        }
        match create_storage(&self.socks, copy.as_raw_fd(), &value) {
            Ok(()) => Ok(true),
            // Got storage from its own connect meanwhile: that one is right.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(format!("pid {pid} fd {fd} update: {e}")),
        }
    }
}

/// How many times a socket's descriptor is looked for again after it was not found or had
/// moved (closed by one process while another holds it, `dup2` and close, fork and close).
const RESCANS: usize = 2;

/// What [`reach`] found.
#[derive(Debug, PartialEq, Eq)]
enum Reached<H> {
    /// A handle on the socket, and where it was found.
    Open(H, (u32, i32)),
    /// The socket is no longer held by any application.
    Gone,
}

/// Reaches socket `inode` through a process descriptor: `owner` (where a scan found it),
/// `open` (a copy of a process's descriptor and the copy's inode), `rescan` (where it is
/// now) and `still_held` (whether an application still holds it). A descriptor that moved
/// since the scan (`ESRCH`: the process exited, `EBADF`: the number was closed, another
/// inode: the number was reused) is looked for again, never taken as done; a socket that is
/// still held but cannot be reached is an error.
fn reach<H>(
    inode: u64,
    mut owner: Option<(u32, i32)>,
    mut rescan: impl FnMut() -> Option<(u32, i32)>,
    mut open: impl FnMut(u32, i32) -> io::Result<(H, Option<u64>)>,
    mut still_held: impl FnMut() -> io::Result<bool>,
) -> Result<Reached<H>, String> {
    for attempt in 0..=RESCANS {
        if let Some((pid, fd)) = owner {
            match open(pid, fd) {
                Ok((handle, found)) if found == Some(inode) => {
                    return Ok(Reached::Open(handle, (pid, fd)));
                }
                Ok(_) => {} // the number names another file now
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) => {}
                Err(e) => return Err(format!("pid {pid} fd {fd}: {e}")),
            }
        }
        // Not found, or moved: closed (then the dump no longer has it, or as an orphan),
        // or held somewhere else now.
        if !still_held().map_err(|e| format!("tcp dump: {e}"))? {
            return Ok(Reached::Gone);
        }
        if attempt < RESCANS {
            owner = rescan();
        }
    }
    Err(match owner {
        None => format!(
            "socket inode {inode} is held by no process the agent can see (a kernel socket, an io_uring fixed file, in flight in SCM_RIGHTS, or a process outside its PID namespace)"
        ),
        Some((pid, fd)) => {
            format!(
                "socket inode {inode} moved again while its descriptor was taken (last pid {pid} fd {fd})"
            )
        }
    })
}

/// Where the sockets `inodes` are open: first among `ns`'s processes, then, for those not
/// found, every process (a socket passed to a process elsewhere, or made in `ns` by a
/// process that left it).
fn find_owners(ns: &Netns, inodes: &HashSet<u64>) -> StdHashMap<u64, (u32, i32)> {
    let mut owners = socket_owners(&ns.pids, inodes);
    if owners.len() < inodes.len() {
        let missing: HashSet<u64> = inodes
            .iter()
            .filter(|i| !owners.contains_key(i))
            .copied()
            .collect();
        owners.extend(socket_owners(&all_pids(), &missing));
    }
    owners
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
    use std::cell::RefCell;

    use lb_common::Addr;

    use super::*;

    fn backend(last: u8) -> Backend {
        Backend::new(Addr::from_v4_octets([10, 0, 0, last]), 8080u16.to_be())
    }

    fn service(id: u32) -> RevNat {
        RevNat {
            addr: Addr::from_v4_octets([10, 96, 0, 1]),
            port: 80u16.to_be(),
            _pad: [0; 2],
            id,
        }
    }

    #[test]
    fn the_slot_keeps_one_pending_change_per_backend_and_skips_empty_ones() {
        let slot = Slot::default();
        assert!(
            slot.put(Vec::new()),
            "the first hand-over counts even when empty"
        );
        assert!(!slot.put(Vec::new()), "nothing changed: no wake-up");
        assert!(slot.put(vec![(key_of(&backend(1)), Some(service(1)))]));
        assert!(slot.put(vec![(key_of(&backend(2)), Some(service(1)))]));
        assert!(slot.put(vec![(key_of(&backend(1)), None)]));
        // Four hand-overs, one wake-up with one change per backend, the latest.
        let Newer::Changes(got) = slot.wait_newer(None) else {
            panic!("changes expected");
        };
        let want: BTreeMap<_, _> = [
            (key_of(&backend(1)), None),
            (key_of(&backend(2)), Some(service(1))),
        ]
        .into();
        assert_eq!(got, want);
        assert!(matches!(
            slot.wait_newer(Some(Duration::from_millis(1))),
            Newer::TimedOut
        ));
        slot.close();
        assert!(matches!(slot.wait_newer(None), Newer::Closed));
    }

    #[test]
    fn a_waiting_thread_wakes_for_new_changes() {
        let slot = Arc::new(Slot::default());
        let theirs = slot.clone();
        let waiter = std::thread::spawn(move || match theirs.wait_newer(None) {
            Newer::Changes(got) => got.len(),
            _ => usize::MAX,
        });
        std::thread::sleep(Duration::from_millis(20));
        slot.put(vec![(key_of(&backend(1)), Some(service(1)))]);
        assert_eq!(waiter.join().expect("join"), 1);
    }

    #[test]
    fn stuck_backends_keep_their_states_and_the_others_move_on() {
        let entry = |state| Reverse {
            service: service(1),
            state,
        };
        let current: BTreeMap<FrontendKey, Reverse> = [
            (key_of(&backend(1)), entry(REVERSE_PENDING)),
            (key_of(&backend(2)), entry(REVERSE_PENDING)),
            (key_of(&backend(3)), entry(REVERSE_DRAINING)),
            (key_of(&backend(4)), entry(REVERSE_DRAINING)),
        ]
        .into();
        let wanted: BTreeMap<FrontendKey, RevNat> = [
            (key_of(&backend(1)), service(1)),
            (key_of(&backend(2)), service(1)),
        ]
        .into();
        let stuck: BTreeMap<Backend, String> = [
            (backend(1), "in flight".to_owned()),
            (backend(3), "kernel socket".to_owned()),
        ]
        .into();
        let second = plan::reverse_after_walk(&settled(&current, &stuck), &wanted);
        assert_eq!(
            second.put,
            [(key_of(&backend(2)), entry(REVERSE_ACTIVE))],
            "only the walked pending entry becomes active"
        );
        assert_eq!(
            second.delete,
            [key_of(&backend(4))],
            "only the walked draining entry goes"
        );
        // Nothing stuck: everything moves.
        let all = plan::reverse_after_walk(&settled(&current, &BTreeMap::new()), &wanted);
        assert_eq!((all.put.len(), all.delete.len()), (2, 2));
    }

    #[test]
    fn sockets_of_cgroups_outside_the_subtree_are_skipped() {
        let scope = CgroupScope {
            inside: [10, 11].into(),
            outside: [1, 20].into(),
        };
        assert!(scope.includes(Some(10)));
        assert!(scope.includes(Some(11)));
        assert!(!scope.includes(Some(1)), "the root cgroup (kernel sockets)");
        assert!(!scope.includes(Some(20)), "a sibling cgroup");
        assert!(scope.includes(Some(99)), "removed or new cgroup: walked");
        assert!(scope.includes(None), "kernel without the attribute: walked");
    }

    /// A fake process table for [`reach`]: (pid, fd) -> inode, and whether the socket is
    /// still in the dump.
    struct Table {
        fds: RefCell<StdHashMap<(u32, i32), u64>>,
        held: bool,
    }

    impl Table {
        fn open(&self, pid: u32, fd: i32) -> io::Result<((u32, i32), Option<u64>)> {
            match self.fds.borrow().get(&(pid, fd)) {
                Some(inode) => Ok(((pid, fd), Some(*inode))),
                None if pid == 666 => Err(io::Error::from_raw_os_error(libc::ESRCH)),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            }
        }

        fn find(&self, inode: u64) -> Option<(u32, i32)> {
            self.fds
                .borrow()
                .iter()
                .find(|(_, i)| **i == inode)
                .map(|(k, _)| *k)
        }
    }

    fn reach_in(table: &Table, owner: Option<(u32, i32)>) -> Result<Reached<(u32, i32)>, String> {
        reach(
            7,
            owner,
            || table.find(7),
            |pid, fd| table.open(pid, fd),
            || Ok(table.held),
        )
    }

    #[test]
    fn a_descriptor_that_moved_is_looked_for_again_never_taken_as_done() {
        // Found where the scan saw it.
        let table = Table {
            fds: RefCell::new([((100, 3), 7)].into()),
            held: true,
        };
        assert_eq!(
            reach_in(&table, Some((100, 3))),
            Ok(Reached::Open((100, 3), (100, 3)))
        );
        // fork, then the parent closed it: EBADF at the parent, found at the child.
        let table = Table {
            fds: RefCell::new([((101, 3), 7)].into()),
            held: true,
        };
        assert_eq!(
            reach_in(&table, Some((100, 3))),
            Ok(Reached::Open((101, 3), (101, 3)))
        );
        // dup2 to 9 and close 3, 3 reused by another socket: inode mismatch, found at 9.
        let table = Table {
            fds: RefCell::new([((100, 3), 8), ((100, 9), 7)].into()),
            held: true,
        };
        assert_eq!(
            reach_in(&table, Some((100, 3))),
            Ok(Reached::Open((100, 9), (100, 9)))
        );
        // The process exited (ESRCH) and the socket with it.
        let table = Table {
            fds: RefCell::new(StdHashMap::new()),
            held: false,
        };
        assert_eq!(reach_in(&table, Some((666, 3))), Ok(Reached::Gone));
        // The process exited but the socket lives on out of sight (passed in flight): stuck.
        let table = Table {
            fds: RefCell::new(StdHashMap::new()),
            held: true,
        };
        let err = reach_in(&table, Some((666, 3))).expect_err("stuck");
        assert!(err.contains("no process"), "{err}");
        // Never found: a kernel socket or an io_uring fixed file.
        assert!(reach_in(&table, None).is_err());
        // Another error (EPERM: a process the agent may not ptrace) is a failure too.
        let eperm = reach(
            7,
            Some((1, 3)),
            || None,
            |_, _| -> io::Result<((), Option<u64>)> {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            },
            || Ok(true),
        );
        assert!(eperm.is_err());
    }

    #[test]
    fn backends_show_as_address_and_port() {
        assert_eq!(show(&backend(7)), "10.0.0.7:8080");
        let v6 = Backend::new(
            Addr::from_v6_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            443u16.to_be(),
        );
        assert_eq!(show(&v6), "[fd00::1]:443");
    }

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
