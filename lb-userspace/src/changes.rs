//! What changed between two snapshots, counted and timed the way kube-proxy counts and times
//! its changes, for the metrics an operator of kube-proxy already watches:
//!
//! - `lb_service_changes_total`, `lb_endpoint_changes_total` (kube-proxy's
//!   `kubeproxy_sync_proxy_rules_{service,endpoint}_changes_total`, counted in
//!   pkg/proxy/servicechangetracker.go `Update` and pkg/proxy/endpointschangetracker.go
//!   `EndpointSliceUpdate`): one per Service or EndpointSlice added, changed or removed.
//!   kube-proxy counts every informer event, also an update that changes nothing it uses;
//!   lb's sources hand over snapshots of what lb uses, so lb counts the objects that differ
//!   between consecutive snapshots (for the API source, `lb_source_events_total{resource}`
//!   counts the raw watch events).
//! - `lb_network_programming_duration_seconds` (kube-proxy's
//!   `kubeproxy_network_programming_duration_seconds`): for each EndpointSlice change that
//!   carries the `endpoints.kubernetes.io/last-change-trigger-time` annotation, the time from
//!   that trigger to the end of the sync pass that wrote the change into the maps. As in
//!   kube-proxy's `EndpointSliceUpdate`: trigger times from before the agent started are
//!   ignored (a restart re-reads objects changed hours ago), and the removal of a slice drops
//!   the Service's pending times (a deleted object's annotation dates from its last update,
//!   not from the deletion). kube-proxy drops the pending times when its sync fails; lb keeps
//!   them until a pass succeeds, so a failed write shows as latency instead of vanishing.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use imbl::ordmap::DiffItem;

use crate::model::{EndpointSlice, ObjectKey, Snapshot};

/// The objects that differ between two snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Services added, changed or removed.
    pub services: u64,
    /// EndpointSlices (or v1 Endpoints subsets) added, changed or removed.
    pub slices: u64,
}

/// What one EndpointSlice did between two snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SliceChange<'a> {
    /// Added or changed: the new version.
    Written(&'a EndpointSlice),
    Removed,
}

/// Calls `f` with the owning Service and the change of every slice that differs between
/// `before` and `after`. Each Service's list is sorted by slice key, so one merge walk finds
/// them; Services whose list is shared are skipped without a look.
fn slice_changes<'a>(
    before: &'a Snapshot,
    after: &'a Snapshot,
    mut f: impl FnMut(&'a ObjectKey, SliceChange<'a>),
) {
    let empty: &[Arc<EndpointSlice>] = &[];
    for item in before.slices.diff(&after.slices) {
        let (service, old, new): (&ObjectKey, &[Arc<EndpointSlice>], &[Arc<EndpointSlice>]) =
            match item {
                DiffItem::Add(key, new) => (key, empty, new),
                DiffItem::Remove(key, old) => (key, old, empty),
                DiffItem::Update {
                    old: (_, old),
                    new: (key, new),
                } => (key, old, new),
            };
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if a.key == b.key => {
                    if !Arc::ptr_eq(a, b) && a != b {
                        f(service, SliceChange::Written(b));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.key < b.key => {
                    f(service, SliceChange::Removed);
                    i += 1;
                }
                (Some(_), None) => {
                    f(service, SliceChange::Removed);
                    i += 1;
                }
                (_, Some(b)) => {
                    f(service, SliceChange::Written(b));
                    j += 1;
                }
                (None, None) => break,
            }
        }
    }
}

/// Counts the Services and EndpointSlices that differ between `before` and `after`.
pub fn count(before: &Snapshot, after: &Snapshot) -> Counted {
    let services = before.services.diff(&after.services).count() as u64;
    let mut slices = 0;
    slice_changes(before, after, |_, _| slices += 1);
    Counted { services, slices }
}

/// The EndpointSlice trigger times waiting for a sync pass to write them.
#[derive(Debug)]
pub struct ProgrammingLatency {
    /// Trigger times at or before this are ignored: the agent's start.
    since: SystemTime,
    pending: BTreeMap<ObjectKey, Vec<SystemTime>>,
}

impl ProgrammingLatency {
    /// Tracks changes triggered after `since` (the agent's start).
    pub fn new(since: SystemTime) -> Self {
        Self {
            since,
            pending: BTreeMap::new(),
        }
    }

    /// Records the trigger times of the slices that changed from `before` to `after` (a
    /// snapshot the syncer received; every one, also those a burst coalesces).
    pub fn record(&mut self, before: &Snapshot, after: &Snapshot) {
        let mut written: Vec<(&ObjectKey, SystemTime)> = Vec::new();
        slice_changes(before, after, |service, change| match change {
            SliceChange::Removed => {
                self.pending.remove(service);
            }
            SliceChange::Written(slice) => {
                if let Some(at) = slice.trigger_time.filter(|at| *at > self.since) {
                    written.push((service, at));
                }
            }
        });
        for (service, at) in written {
            self.pending.entry(service.clone()).or_default().push(at);
        }
    }

    /// Pending changes.
    pub fn len(&self) -> usize {
        self.pending.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A pass wrote everything at `now`: the latency of each pending change (0 for a trigger
    /// time in the future, i.e. a clock ahead of this node's), and nothing stays pending.
    pub fn programmed(&mut self, now: SystemTime) -> Vec<Duration> {
        std::mem::take(&mut self.pending)
            .into_values()
            .flatten()
            .map(|at| now.duration_since(at).unwrap_or_default())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::IpAddr};

    use rstest::rstest;

    use super::*;
    use crate::model::{Endpoint, Family, Service, ServiceType};

    const T0: u64 = 1_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn slice(service: &str, name: &str, ip: u8, trigger: Option<u64>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            key: ObjectKey::new("default", name),
            service: ObjectKey::new("default", service),
            family: Family::V4,
            ports: Vec::new(),
            endpoints: vec![Endpoint {
                addr: IpAddr::from([10, 1, 0, ip]),
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
                zone: None,
                zone_hints: BTreeSet::new(),
            }],
            trigger_time: trigger.map(at),
        })
    }

    /// A snapshot with these Services and slices (each list sorted by key, as sources keep it).
    fn snapshot(services: &[&str], slices: &[Arc<EndpointSlice>]) -> Snapshot {
        let mut snap = Snapshot::default();
        for name in services {
            let key = ObjectKey::new("default", *name);
            snap.services.insert(
                key.clone(),
                Arc::new(Service::new(key, ServiceType::ClusterIp)),
            );
        }
        for s in slices {
            let mut list = snap.slices.get(&s.service).cloned().unwrap_or_default();
            list.push(s.clone());
            list.sort_by(|a, b| a.key.cmp(&b.key));
            snap.slices.insert(s.service.clone(), list);
        }
        snap
    }

    #[rstest]
    #[case::nothing(&[], &[], &[], &[], 0, 0)]
    #[case::first_snapshot(&[], &[], &["a", "b"], &[("a", "a-1", 1), ("b", "b-1", 2)], 2, 2)]
    #[case::unchanged(&["a"], &[("a", "a-1", 1)], &["a"], &[("a", "a-1", 1)], 0, 0)]
    #[case::endpoint_moved(&["a"], &[("a", "a-1", 1)], &["a"], &[("a", "a-1", 9)], 0, 1)]
    #[case::slice_added_and_one_removed(
        &["a"], &[("a", "a-1", 1), ("a", "a-2", 2)],
        &["a"], &[("a", "a-2", 2), ("a", "a-3", 3)],
        0, 2
    )]
    #[case::service_and_its_slices_removed(&["a", "b"], &[("a", "a-1", 1)], &["b"], &[], 1, 1)]
    #[case::slices_without_their_service(&[], &[], &[], &[("x", "x-1", 1)], 0, 1)]
    fn counts_objects_that_differ(
        #[case] before_services: &[&str],
        #[case] before_slices: &[(&str, &str, u8)],
        #[case] after_services: &[&str],
        #[case] after_slices: &[(&str, &str, u8)],
        #[case] services: u64,
        #[case] slices: u64,
    ) {
        let make = |list: &[(&str, &str, u8)]| -> Vec<Arc<EndpointSlice>> {
            list.iter()
                .map(|(svc, name, ip)| slice(svc, name, *ip, None))
                .collect()
        };
        let before = snapshot(before_services, &make(before_slices));
        let after = snapshot(after_services, &make(after_slices));
        assert_eq!(count(&before, &after), Counted { services, slices });
    }

    /// (Service, slice, endpoint, trigger time) per slice of each snapshot in turn.
    type Step = Vec<(&'static str, &'static str, u8, Option<u64>)>;

    #[rstest]
    #[case::no_annotation(vec![vec![("a", "a-1", 1, None)]], T0 + 10, &[])]
    #[case::change_after_start(vec![vec![], vec![("a", "a-1", 1, Some(T0 + 2))]], T0 + 5, &[3])]
    #[case::change_before_start_ignored(vec![vec![("a", "a-1", 1, Some(T0 - 60))]], T0 + 5, &[])]
    #[case::coalesced_changes_each_observed(
        vec![vec![], vec![("a", "a-1", 1, Some(T0 + 1))], vec![("a", "a-1", 2, Some(T0 + 3))]],
        T0 + 4,
        &[3, 1]
    )]
    #[case::two_services(
        vec![vec![], vec![("a", "a-1", 1, Some(T0 + 1)), ("b", "b-1", 2, Some(T0 + 2))]],
        T0 + 4,
        &[3, 2]
    )]
    #[case::removal_drops_the_services_pending_times(
        vec![vec![], vec![("a", "a-1", 1, Some(T0 + 1)), ("a", "a-2", 2, Some(T0 + 1))], vec![("a", "a-1", 1, Some(T0 + 1))]],
        T0 + 4,
        &[]
    )]
    #[case::unchanged_slice_not_timed_again(
        vec![vec![], vec![("a", "a-1", 1, Some(T0 + 1))], vec![("a", "a-1", 1, Some(T0 + 1)), ("b", "b-1", 2, None)]],
        T0 + 4,
        &[3]
    )]
    #[case::clock_ahead_is_zero(vec![vec![], vec![("a", "a-1", 1, Some(T0 + 9))]], T0 + 4, &[0])]
    fn programming_latency(
        #[case] steps: Vec<Step>,
        #[case] written_at: u64,
        #[case] want_seconds: &[u64],
    ) {
        let mut latency = ProgrammingLatency::new(at(T0));
        let mut before = Snapshot::default();
        for step in &steps {
            let slices: Vec<_> = step
                .iter()
                .map(|(svc, name, ip, t)| slice(svc, name, *ip, *t))
                .collect();
            let after = snapshot(&[], &slices);
            latency.record(&before, &after);
            before = after;
        }
        assert_eq!(latency.len(), want_seconds.len());
        let mut got: Vec<u64> = latency
            .programmed(at(written_at))
            .iter()
            .map(Duration::as_secs)
            .collect();
        let mut want = want_seconds.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(latency.is_empty(), "observed once");
    }
}
