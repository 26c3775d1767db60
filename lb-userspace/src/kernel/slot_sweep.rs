//! Frees socket slots (`LB_TCP_OWNERS`, `LB_UDP_OWNERS`) whose owner no longer exists.
//!
//! A socket's `sock_release` program frees its slot when it closes, but the kernel skips that
//! hook for kernel sockets (`sk_kern_sock`: NFS, Ceph, iSCSI or SMB clients), while the connect
//! and sendmsg hooks run for them. A kernel client that reconnects with new sockets through a
//! Service would leave one held slot per socket, for good (DEVELOPERS.md, "Layout 5: TCP
//! sockets that need state take a slot too").
//!
//! So every [`Settings::interval`] this thread reads the owners through a writable mapping and
//! frees a slot when the same cookie has held it since the previous sweep and no socket with
//! that cookie shows in a `sock_diag` dump (every state, both families) of any network
//! namespace of the node ([`netns::on_node`]). The free is a compare-and-exchange from that
//! cookie to 0: only a held slot's owner writes it otherwise, so a slot that changed hands
//! meanwhile is never touched. Cookies are never reused, so an owner that exists nowhere can
//! never come back. A socket that exists but is in no dump (a TCP socket back in CLOSE after a
//! failed connect, unhashed) loses its slot, which costs nothing: its next connect writes its
//! state again, and getpeername answers only connected sockets.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::maps::{IPPROTO_TCP, IPPROTO_UDP, SLOT_CLAIMING, TCP_OWNERS, UDP_OWNERS};

use super::{
    PinLayout,
    mapped::MappedU64s,
    maps::MapsError,
    netns::{self, Netns},
    sock_destroy::open_diag_in,
};

/// How the sweep runs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Between two sweeps; a slot is freed at the earliest one interval after it was seen
    /// held by a socket that is gone.
    pub interval: Duration,
}

/// Every socket state (`TCPF_*` bits 1..=11): listening, closing and TIME_WAIT sockets keep
/// their cookie too.
const ALL_STATES: u32 = 0xfff;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One protocol's owners, mapped read-write.
struct Table {
    proto: u8,
    name: &'static str,
    owners: MappedU64s,
    /// Slot -> owner cookie, as the previous sweep found them held.
    seen: HashMap<usize, u64>,
}

/// Why the sweep could not start.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Map(#[from] MapsError),
    #[error("mapping {path} read-write")]
    Mapping {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the slot-sweep thread")]
    Thread(#[source] std::io::Error),
}

/// Starts the sweeping thread.
///
/// # Errors
/// Opening or mapping an owners map, or spawning the thread.
pub fn start(layout: &PinLayout, settings: Settings) -> Result<(), SweepError> {
    let mut tables = Vec::new();
    for (proto, name) in [(IPPROTO_TCP, TCP_OWNERS), (IPPROTO_UDP, UDP_OWNERS)] {
        let map: Array<MapData, u64> = super::maps::typed(layout, name)?;
        let owners =
            MappedU64s::writable(map.map(), map.len()).map_err(|source| SweepError::Mapping {
                path: layout.map(name).display().to_string(),
                source,
            })?;
        tables.push(Table {
            proto,
            name,
            owners,
            seen: HashMap::new(),
        });
    }
    std::thread::Builder::new()
        .name("slot-sweep".into())
        .spawn(move || {
            let home = Netns::current_thread().ok();
            loop {
                std::thread::sleep(settings.interval);
                sweep(&mut tables, home.as_ref());
            }
        })
        .map_err(SweepError::Thread)?;
    Ok(())
}

/// The slots of `table` held now: slot -> owner cookie (a claim still writing is no one's).
fn held(table: &Table) -> HashMap<usize, u64> {
    (0..table.owners.len())
        .filter_map(|slot| {
            let owner = table.owners.get(slot)?;
            (owner != 0 && owner & SLOT_CLAIMING == 0).then_some((slot, owner))
        })
        .collect()
}

/// One sweep over both tables: frees the slots held by the same cookie now and at the
/// previous sweep whose socket exists nowhere.
fn sweep(tables: &mut [Table], home: Option<&Netns>) {
    let started = Instant::now();
    let mut candidates: Vec<Vec<(usize, u64)>> = Vec::with_capacity(tables.len());
    for table in tables.iter_mut() {
        let now = held(table);
        candidates.push(
            now.iter()
                .filter(|(slot, owner)| table.seen.get(slot) == Some(owner))
                .map(|(slot, owner)| (*slot, *owner))
                .collect(),
        );
        table.seen = now;
    }
    if candidates.iter().all(Vec::is_empty) {
        return;
    }
    let Some(live) = live_cookies(tables, home) else {
        return; // some namespace could not be read: free nothing this time
    };
    for (table, candidates) in tables.iter_mut().zip(candidates) {
        let mut freed = 0usize;
        for (slot, owner) in candidates {
            if !live.contains(&(table.proto, owner))
                && table.owners.compare_exchange(slot, owner, 0)
            {
                table.seen.remove(&slot);
                freed += 1;
            }
        }
        if freed > 0 {
            tracing::info!(
                map = table.name,
                freed,
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "freed socket slots whose owner no longer exists (kernel sockets skip the release hook)"
            );
        }
    }
}

/// The cookies of every TCP and UDP socket of the node, as (protocol, cookie); `None` if a
/// namespace could not be dumped (then no slot may be judged gone).
fn live_cookies(tables: &[Table], home: Option<&Netns>) -> Option<HashSet<(u8, u64)>> {
    let own = Netns::open(Path::new("/proc/self/ns/net")).ok();
    let mut live = HashSet::new();
    for ns in netns::on_node(own) {
        let mut sock = match open_diag_in(&ns, home) {
            Ok(sock) => sock,
            Err(e) => {
                tracing::debug!(netns = %ns.path.display(), error = %e, "slot sweep: namespace skipped");
                // A namespace that went away meanwhile holds no socket; any other error
                // leaves its sockets unknown.
                if ns.path.exists() {
                    return None;
                }
                continue;
            }
        };
        for table in tables {
            for family in [AF_INET, AF_INET6] {
                match sock.dump(family, table.proto, ALL_STATES) {
                    Ok(socks) => live.extend(socks.iter().map(|s| (table.proto, s.cookie()))),
                    Err(e) => {
                        tracing::warn!(netns = %ns.path.display(), error = %e, "slot sweep: dump failed; no slot freed this time");
                        return None;
                    }
                }
            }
        }
    }
    Some(live)
}
