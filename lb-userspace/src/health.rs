//! `/healthz` and `/livez` state, with kube-proxy's semantics: healthy once the first full
//! sync is in the kernel, and unhealthy again when a change has waited longer than the stale
//! time without reaching the kernel (the agent is stuck or its writes keep failing).
//! `/healthz` also fails while the Kubernetes API has been unreachable for longer than its
//! own stale time (the datapath still serves the last known state); `/livez`, for liveness
//! probes, does not, since restarting the agent cannot fix the API.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

#[derive(Debug, Default)]
struct State {
    /// When the last complete sync finished.
    last_synced: Option<(Instant, SystemTime)>,
    /// When the oldest change not yet in the kernel arrived.
    pending_since: Option<Instant>,
}

/// Whether a source is making progress: it marks when it starts working on input and when
/// it is done, so a source stuck in one piece of work shows, by name, in `/healthz` and in
/// `lb_source_stalled{source}`.
#[derive(Debug)]
pub struct SourceProgress {
    name: &'static str,
    busy_since: Mutex<Option<Instant>>,
}

/// Marks its source busy until dropped.
#[must_use = "the source is busy only while the guard lives"]
pub struct Busy<'a>(&'a SourceProgress);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

impl SourceProgress {
    /// A source named `name` (a metric label: `manifests`, `kubernetes`).
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            busy_since: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Plain data: a panic while holding the lock cannot leave it inconsistent.
        self.busy_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The source starts a piece of work; it is done when the guard drops.
    pub fn busy(&self) -> Busy<'_> {
        *self.lock() = Some(Instant::now());
        Busy(self)
    }

    /// How long the current piece of work has taken, if one is under way.
    pub fn busy_for(&self) -> Option<Duration> {
        self.lock().map(|since| since.elapsed())
    }
}

/// Shared by the syncer (writer) and the HTTP server (reader).
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    stale_after: Duration,
    /// The API source's health and how long it may fail before `/healthz` says so.
    source: Option<(Arc<SourceHealth>, Duration)>,
    /// The sources' progress; one busy for `stale_after` makes both endpoints fail.
    progress: Vec<Arc<SourceProgress>>,
}

/// What `/healthz` answers.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(skip)]
    pub healthy: bool,
    /// RFC 3339 time of the last complete sync, if any.
    pub last_updated: Option<String>,
    pub current_time: String,
    /// Seconds the oldest unsynced change has waited.
    pub pending_seconds: Option<f64>,
    /// Seconds the Kubernetes API has been failing, if it is.
    pub source_failing_seconds: Option<f64>,
    /// The source stuck in one piece of work for longer than the stale time, if any.
    pub stuck_source: Option<&'static str>,
}

/// RFC 3339 in UTC to the second, as kube-proxy's `/healthz` shows its times.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .and_then(|ts| jiff::Timestamp::from_second(ts.as_second()))
        .map_or_else(|_| "1970-01-01T00:00:00Z".to_owned(), |ts| ts.to_string())
}

impl Health {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            stale_after,
            source: None,
            progress: Vec::new(),
        }
    }

    /// Watches `progress`: a source busy for the stale time makes `/healthz` and `/livez` fail.
    pub fn with_progress(mut self, progress: Arc<SourceProgress>) -> Self {
        self.progress.push(progress);
        self
    }

    /// The first source busy for the stale time or longer.
    fn stuck(&self) -> Option<&'static str> {
        self.progress
            .iter()
            .find(|p| p.busy_for().is_some_and(|b| b >= self.stale_after))
            .map(|p| p.name())
    }

    /// Makes `/healthz` fail when the API source has been failing for `stale_after`.
    pub fn with_source(mut self, source: Arc<SourceHealth>, stale_after: Duration) -> Self {
        self.source = Some((source, stale_after));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived that is not in the kernel yet.
    pub fn queued(&self) {
        self.lock().pending_since.get_or_insert_with(Instant::now);
    }

    /// Everything received so far is in the kernel.
    pub fn synced(&self) {
        let mut state = self.lock();
        state.last_synced = Some((Instant::now(), SystemTime::now()));
        state.pending_since = None;
    }

    /// `/healthz`: synced, nothing stuck, and the API source (if any) not failing for long.
    pub fn report(&self) -> Report {
        let state = self.lock();
        let pending = state.pending_since.map(|t| t.elapsed());
        let failing = self
            .source
            .as_ref()
            .and_then(|(source, limit)| Some((source.failing_for()?, *limit)));
        let stuck = self.stuck();
        let healthy = state.last_synced.is_some()
            && pending.is_none_or(|p| p < self.stale_after)
            && failing.is_none_or(|(for_, limit)| for_ < limit)
            && stuck.is_none();
        Report {
            healthy,
            last_updated: state.last_synced.map(|(_, wall)| rfc3339(wall)),
            current_time: rfc3339(SystemTime::now()),
            pending_seconds: pending.map(|p| p.as_secs_f64()),
            source_failing_seconds: failing.map(|(for_, _)| for_.as_secs_f64()),
            stuck_source: stuck,
        }
    }

    /// `/livez`: the sync loop is not stuck (a change has not waited for the stale time) and no
    /// source is stuck in one piece of work.
    pub fn live(&self) -> bool {
        self.lock()
            .pending_since
            .is_none_or(|p| p.elapsed() < self.stale_after)
            && self.stuck().is_none()
    }

    /// How long a source may be busy with one piece of work before it counts as stuck.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }
}

/// Whether the API source works, for `/healthz` and metrics.
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// When the current run of failures started; `None` while the API answers.
    failing_since: Mutex<Option<Instant>>,
}

impl SourceHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.failing_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long the API has been failing, if it is.
    pub fn failing_for(&self) -> Option<Duration> {
        self.lock().map(|since| since.elapsed())
    }

    /// Records a failed request; whether it starts a run of failures.
    pub(crate) fn failed(&self) -> bool {
        let mut since = self.lock();
        let first = since.is_none();
        since.get_or_insert_with(Instant::now);
        first
    }

    /// Records an answer; how long the run of failures it ends lasted, if one did.
    pub(crate) fn answered(&self) -> Option<Duration> {
        self.lock().take().map(|since| since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_first_sync() {
        let h = Health::new(Duration::from_secs(60));
        assert!(!h.report().healthy);
        h.queued();
        assert!(!h.report().healthy);
        h.synced();
        assert!(h.report().healthy);
    }

    #[test]
    fn stale_pending_change_is_unhealthy() {
        let h = Health::new(Duration::from_millis(0));
        h.synced();
        assert!(h.report().healthy);
        h.queued();
        assert!(!h.report().healthy);
        h.synced();
        assert!(h.report().healthy);
    }

    #[test]
    fn a_source_busy_for_the_stale_time_is_named_and_unhealthy() {
        let progress = SourceProgress::new("manifests");
        let h = Health::new(Duration::from_millis(50)).with_progress(progress.clone());
        h.synced();
        {
            let _busy = progress.busy();
            assert!(h.report().healthy, "busy, but not for long");
            std::thread::sleep(Duration::from_millis(60));
            let report = h.report();
            assert!(!report.healthy);
            assert_eq!(report.stuck_source, Some("manifests"));
            assert!(!h.live());
        }
        // Done: healthy again.
        assert!(h.report().healthy);
        assert!(h.live());
        assert_eq!(h.report().stuck_source, None);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40Z"
        );
    }
}
