//! Watching `--manifests` paths: inotify (through notify) for changes within a few hundred
//! milliseconds, plus a periodic check of file sizes and times in case an event is missed
//! (a directory replaced, a watch lost).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use notify::{RecursiveMode, Watcher as _};

use super::manifests::{Manifests, list_files};
use crate::{
    health::SourceProgress,
    metrics::ManifestLoads,
    model::{Snapshot, Update},
};

/// Quiet time after a write in progress before reloading (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(100);
/// Quiet time after an event that ends a change (a file renamed into place, closed after
/// writing, removed): only long enough to take a burst of such events as one reload.
const QUICK: Duration = Duration::from_millis(3);
/// Reload at the latest this long after the first event, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_millis(400);
/// How often to compare file sizes and times.
const POLL: Duration = Duration::from_secs(2);

type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64, u64)>)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    for path in paths {
        let files = list_files(path).unwrap_or_else(|_| vec![path.clone()]);
        for file in files {
            let meta = std::fs::metadata(&file).ok();
            let stamp = meta.and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())));
            out.push((file, stamp));
        }
    }
    out
}

/// The directories to watch: each directory path, and the parent of each file path (so an
/// editor's write-and-rename is seen).
fn watch_dirs(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            }
        })
        .collect()
}

/// Whether an event is a change, and whether it ends one: `Some(true)` for a file renamed
/// into place, closed after writing, created empty or removed (reload at once), `Some(false)`
/// for a write in progress (wait for the writer to finish), `None` for a read.
fn change_kind(kind: &notify::EventKind) -> Option<bool> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(true),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Some(true),
        _ => Some(false),
    }
}

/// Logs what is wrong in the manifests, each problem once while it lasts.
fn report(errors: &[super::manifests::ManifestError], known: &mut BTreeSet<String>) {
    let mut now = BTreeSet::new();
    for e in errors {
        let text = e.to_string();
        if !known.contains(&text) {
            tracing::error!(
                file = %e.file.display(),
                document = e.document,
                object = e.object.as_deref(),
                field = e.field.as_deref(),
                reason = %e.message,
                error = %text,
                "manifest problem"
            );
        }
        now.insert(text);
    }
    for e in known.difference(&now) {
        tracing::info!(problem = %e, "resolved");
    }
    *known = now;
}

/// Loads the manifests once (logging problems) and returns the snapshot and error count.
/// Reads every manifest, recording the time it took.
fn load(
    manifests: &mut Manifests,
    gauge: &ManifestLoads,
    progress: &SourceProgress,
) -> (Snapshot, Vec<super::manifests::ManifestError>) {
    let _busy = progress.busy();
    let started = Instant::now();
    // A bug in parsing must not end the watcher (every later change would be lost while the
    // agent looks healthy): a panic is one more error, and the last snapshot stays in force.
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| manifests.load()))
        .unwrap_or_else(|_| {
            let error = super::manifests::ManifestError::internal(
                manifests.paths(),
                "internal error while reading the manifests (a bug: please report it); \
                 keeping the last snapshot",
            );
            (manifests.last().clone(), vec![error])
        });
    gauge.record(started.elapsed());
    loaded
}

pub fn initial_load(
    manifests: &mut Manifests,
    known: &mut BTreeSet<String>,
    gauge: &ManifestLoads,
    progress: &SourceProgress,
) -> (Snapshot, usize) {
    let (snapshot, errors) = load(manifests, gauge, progress);
    report(&errors, known);
    (snapshot, errors.len())
}

/// Watches in a thread of its own, sending a snapshot to `updates` whenever the manifests'
/// content changes. Ends when the receiver is gone.
pub fn spawn(
    mut manifests: Manifests,
    mut last: Arc<Snapshot>,
    mut known: BTreeSet<String>,
    updates: mpsc::Sender<Update>,
    gauge: ManifestLoads,
    progress: Arc<SourceProgress>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("manifests".into()).spawn(move || {
        let (events_tx, events) = mpsc::channel();
        let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Only the fact that something changed matters; the reload looks at everything.
            // Reads (our own included) are not changes.
            if let Some(complete) = event.map_or(Some(false), |e| change_kind(&e.kind)) {
                let _receiver_gone = events_tx.send(complete);
            }
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch manifests; checking every {POLL:?} instead");
                None
            }
        };
        let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
        let mut stamp = fingerprint(manifests.paths());
        let mut known_count = known.len();
        loop {
            // (Re)arm watches: a watched directory may have been removed and created again.
            if let Some(w) = watcher.as_mut() {
                for dir in watch_dirs(manifests.paths()) {
                    if !watched.contains(&dir) && w.watch(&dir, RecursiveMode::NonRecursive).is_ok() {
                        watched.insert(dir);
                    }
                }
            }
            let changed = match events.recv_timeout(POLL) {
                Ok(mut complete) => {
                    let first = Instant::now();
                    while first.elapsed() < MAX_DELAY {
                        let settle = if complete { QUICK } else { SETTLE };
                        match events.recv_timeout(settle) {
                            Ok(c) => complete = c,
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    true
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = fingerprint(manifests.paths());
                    if now == stamp {
                        // Watches may be gone with their directory: re-arm next round.
                        watched.retain(|d| d.exists());
                        false
                    } else {
                        true
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // No watcher: poll only.
                    std::thread::sleep(POLL);
                    fingerprint(manifests.paths()) != stamp
                }
            };
            if !changed {
                continue;
            }
            stamp = fingerprint(manifests.paths());
            let (snapshot, errors) = load(&mut manifests, &gauge, &progress);
            report(&errors, &mut known);
            if *last != snapshot || errors.len() != known_count {
                known_count = errors.len();
                last = Arc::new(snapshot);
                let update = Update::Snapshot { snapshot: last.clone(), source_errors: errors.len() };
                if updates.send(update).is_err() {
                    return;
                }
            }
        }
    })
}
