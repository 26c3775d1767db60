//! The sync loop: the one place that writes the agent's maps.
//!
//! Sources send complete snapshots; the loop keeps the newest, turns it into the desired
//! state, plans the writes against its mirror of the maps and applies them, as kube-proxy's
//! `syncProxyRules` does a pass per change: gated on the first snapshot, a retry with backoff
//! when writes fail, a periodic resync that re-reads the maps to repair drift, and the
//! elapsed time in metrics.

use std::{
    collections::BTreeSet,
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    desired::{self, Limits},
    health::Health,
    kernel::maps::Maps,
    metrics::{Metrics, SyncLabels},
    model::{Node, Snapshot},
    plan::KernelState,
};

/// What sources tell the syncer.
#[derive(Debug)]
pub enum Update {
    /// Everything the source knows now, and how many of its objects it rejected.
    Snapshot {
        snapshot: Arc<Snapshot>,
        source_errors: usize,
    },
    /// Stop after the current pass.
    Shutdown,
}

/// Retry delays after failed writes: 0.5 s doubling to 30 s.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Syncer {
    maps: Maps,
    state: KernelState,
    node: Node,
    limits: Limits,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    resync_period: Duration,
    /// Desired-state problems last logged, so each is logged once.
    known_problems: BTreeSet<String>,
}

impl Syncer {
    pub fn new(
        maps: Maps,
        state: KernelState,
        node: Node,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        resync_period: Duration,
    ) -> Self {
        Self {
            maps,
            state,
            node,
            limits: Limits::default(),
            health,
            metrics,
            resync_period,
            known_problems: BTreeSet::new(),
        }
    }

    /// Runs until [`Update::Shutdown`] or until every sender is gone.
    pub fn run(mut self, updates: &mpsc::Receiver<Update>) {
        let mut latest: Option<(Arc<Snapshot>, usize)> = None;
        let mut retry: Option<(Instant, Duration)> = None;
        let mut next_resync = Instant::now() + self.resync_period;
        loop {
            let wake = retry.map_or(next_resync, |(at, _)| at.min(next_resync));
            let mut resync = false;
            match updates.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Update::Snapshot {
                    snapshot,
                    source_errors,
                }) => {
                    self.health.queued();
                    latest = Some((snapshot, source_errors));
                    // Coalesce a burst: only the newest snapshot matters.
                    loop {
                        match updates.try_recv() {
                            Ok(Update::Snapshot {
                                snapshot,
                                source_errors,
                            }) => latest = Some((snapshot, source_errors)),
                            Ok(Update::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                            Err(mpsc::TryRecvError::Empty) => break,
                        }
                    }
                }
                Ok(Update::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let due_retry = retry.is_some_and(|(at, _)| at <= Instant::now());
                    resync = !due_retry && next_resync <= Instant::now();
                    if !due_retry && !resync {
                        continue;
                    }
                }
            }
            let Some((snapshot, source_errors)) = latest.clone() else {
                next_resync = Instant::now() + self.resync_period;
                continue; // nothing to sync before the first snapshot
            };
            if resync {
                next_resync = Instant::now() + self.resync_period;
                match self.maps.read_state() {
                    Ok(state) => {
                        if state != self.state {
                            tracing::warn!(
                                "the maps differ from what lb wrote (changed by someone else?); repairing"
                            );
                        }
                        self.state = state;
                    }
                    Err(e) => {
                        tracing::error!(error = %anyhow::Error::from(e), "resync: reading the maps failed")
                    }
                }
            }
            if self.sync(&snapshot, source_errors) {
                retry = None;
            } else {
                let delay = retry.map_or(RETRY_MIN, |(_, d)| (d * 2).min(RETRY_MAX));
                tracing::warn!(retry_in = ?delay, "sync incomplete; retrying");
                retry = Some((Instant::now() + delay, delay));
            }
        }
    }

    /// One pass: desired state, plan, writes. Returns whether every write succeeded.
    pub fn sync(&mut self, snapshot: &Snapshot, source_errors: usize) -> bool {
        let started = Instant::now();
        let (desired, problems) = desired::build(snapshot, &self.node, self.limits);
        self.log_problems(&problems);
        let batches = self.state.plan(&desired);
        let mut writes = 0u64;
        let mut failures = 0usize;
        for batch in &batches {
            for op in batch {
                match self.maps.apply(op) {
                    Ok(()) => {
                        self.state.apply(op);
                        writes += 1;
                    }
                    Err(e) => {
                        // The rest of this frontend's batch would break its ordering; the next
                        // pass plans it again from what did get written.
                        tracing::error!(error = %anyhow::Error::from(e), "map write failed");
                        failures += 1;
                        break;
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        let services: BTreeSet<_> = desired.frontends.values().map(|f| &f.service).collect();
        let m = &self.metrics;
        m.services
            .set(i64::try_from(services.len()).unwrap_or(i64::MAX));
        m.frontends
            .set(i64::try_from(self.state.frontends().len()).unwrap_or(i64::MAX));
        m.backends
            .set(i64::try_from(self.state.slot_count()).unwrap_or(i64::MAX));
        m.map_writes.inc_by(writes);
        m.sync_duration.observe(elapsed.as_secs_f64());
        m.config_errors
            .set(i64::try_from(source_errors + problems.len()).unwrap_or(i64::MAX));
        let ok = failures == 0;
        m.syncs
            .get_or_create(&SyncLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.health.synced();
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            m.last_sync.set(now.as_secs_f64());
        }
        if writes > 0 || failures > 0 {
            tracing::info!(
                services = services.len(),
                frontends = self.state.frontends().len(),
                backends = self.state.slot_count(),
                writes,
                failed_frontends = failures,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "synced"
            );
        }
        ok
    }

    fn log_problems(&mut self, problems: &[desired::DesiredError]) {
        let now: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
        for p in now.difference(&self.known_problems) {
            tracing::error!("{p}");
        }
        for p in self.known_problems.difference(&now) {
            tracing::info!("resolved: {p}");
        }
        self.known_problems = now;
    }
}
