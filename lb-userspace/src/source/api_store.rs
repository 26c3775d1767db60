//! The Kubernetes API source's pure part: what the watches told lb, as lb's model. Each
//! resource's objects are a [`Cache`] fed with kube-rs watcher events: a (re)list
//! (`Init`, `InitApply`..., `InitDone`) replaces the resource's objects atomically at
//! `InitDone`, and unchanged objects keep their `Arc` through it, so the syncer sees no change
//! and writes nothing for them. Objects live in persistent maps updated in place, so a
//! snapshot costs nothing to take and the syncer finds a one-object change without walking
//! every Service. No I/O here: the async watch loop is [`super::kube`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use imbl::{OrdMap, ordmap::DiffItem};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{ResourceExt as _, runtime::watcher};

use super::convert::{self, FieldError};
use crate::model::{self, EndpointSlice, ObjectKey, Service, Snapshot};

/// The Node label carrying its zone, for topology hints.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Objects by key, and why others were rejected.
type Objects<T> = OrdMap<ObjectKey, Arc<T>>;
type Rejections = BTreeMap<ObjectKey, String>;

/// One watched resource's objects, as lb's model, with the relist in progress.
#[derive(Debug)]
struct Cache<T> {
    objects: Objects<T>,
    /// Objects (and rejections) seen since `Init`, replacing `objects` (and `rejected`) at
    /// `InitDone`.
    relist: Option<(BTreeMap<ObjectKey, Arc<T>>, Rejections)>,
    /// An `InitDone` was seen: the resource has been listed completely once.
    synced: bool,
    /// Objects lb cannot use, with why (kept out, or kept at their last good version).
    rejected: Rejections,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            objects: OrdMap::new(),
            relist: None,
            synced: false,
            rejected: BTreeMap::new(),
        }
    }
}

/// What converting an API object gave.
enum Converted<T> {
    /// The object in lb's model.
    Object(ObjectKey, T),
    /// Valid, but nothing for lb (an FQDN EndpointSlice).
    Ignored(ObjectKey),
    /// Not usable: the field and why.
    Invalid(ObjectKey, FieldError),
}

impl<T: PartialEq> Cache<T> {
    /// Applies one watch event; returns whether `objects` changed.
    fn on_event<K>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(&K) -> Converted<T>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some((BTreeMap::new(), BTreeMap::new()));
                false
            }
            watcher::Event::InitApply(object) => {
                let converted = convert(&object);
                let previous = match &converted {
                    Converted::Object(key, _)
                    | Converted::Ignored(key)
                    | Converted::Invalid(key, _) => self.objects.get(key).cloned(),
                };
                let (relist, rejected) = self.relist.get_or_insert_with(Default::default);
                match converted {
                    Converted::Object(key, value) => {
                        // Unchanged objects keep their identity through the relist.
                        let value = previous
                            .filter(|p| **p == value)
                            .unwrap_or_else(|| Arc::new(value));
                        relist.insert(key, value);
                    }
                    Converted::Ignored(_) => {}
                    Converted::Invalid(key, error) => {
                        rejected.insert(key.clone(), error.to_string());
                        if let Some(previous) = previous {
                            relist.insert(key, previous);
                        }
                    }
                }
                false
            }
            watcher::Event::InitDone => {
                self.synced = true;
                let Some((relist, rejected)) = self.relist.take() else {
                    return false;
                };
                self.rejected = rejected;
                // Built on the current map, so what the relist did not change stays shared.
                let relisted = model::rebased(&self.objects, &OrdMap::from(relist));
                let changed = !relisted.ptr_eq(&self.objects);
                self.objects = relisted;
                changed
            }
            watcher::Event::Apply(object) => match convert(&object) {
                Converted::Object(key, value) => {
                    self.rejected.remove(&key);
                    if self.objects.get(&key).is_some_and(|p| **p == value) {
                        return false;
                    }
                    self.objects.insert(key, Arc::new(value));
                    true
                }
                Converted::Ignored(key) => {
                    self.rejected.remove(&key);
                    self.objects.remove(&key).is_some()
                }
                Converted::Invalid(key, error) => {
                    // The last good version, if any, stays in force.
                    self.rejected.insert(key, error.to_string());
                    false
                }
            },
            watcher::Event::Delete(object) => {
                let key = match convert(&object) {
                    Converted::Object(key, _)
                    | Converted::Ignored(key)
                    | Converted::Invalid(key, _) => key,
                };
                self.rejected.remove(&key);
                self.objects.remove(&key).is_some()
            }
        }
    }
}

fn meta_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn convert_service(svc: &core::Service) -> Converted<Service> {
    match convert::service(svc) {
        Ok(service) => Converted::Object(service.key.clone(), service),
        Err(error) => Converted::Invalid(meta_key(&svc.metadata), error),
    }
}

fn convert_slice(slice: &discovery::EndpointSlice) -> Converted<EndpointSlice> {
    match convert::endpoint_slice(slice) {
        Ok(Some(converted)) => Converted::Object(converted.key.clone(), converted),
        Ok(None) => Converted::Ignored(meta_key(&slice.metadata)),
        Err(error) => Converted::Invalid(meta_key(&slice.metadata), error),
    }
}

/// Everything the API told lb, as the syncer's snapshot.
#[derive(Debug, Default)]
pub struct ApiStore {
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    /// The Node's zone; `zone_synced` once the Node watch listed (or was given up).
    zone: Option<String>,
    zone_synced: bool,
    /// Objects rejected, as last logged (so each problem is logged once).
    logged: BTreeSet<String>,
    /// The EndpointSlices by Service, as of `indexed` (brought up to date per snapshot).
    by_service: OrdMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    indexed: Objects<EndpointSlice>,
}

impl ApiStore {
    /// Applies a Service event; whether the snapshot changed.
    pub fn on_service(&mut self, event: watcher::Event<core::Service>) -> bool {
        self.services.on_event(event, convert_service)
    }

    /// Applies an EndpointSlice event; whether the snapshot changed.
    pub fn on_slice(&mut self, event: watcher::Event<discovery::EndpointSlice>) -> bool {
        self.slices.on_event(event, convert_slice)
    }

    /// Applies a Node event (only this node is watched); whether the zone changed.
    pub fn on_node(&mut self, event: watcher::Event<core::Node>) -> bool {
        let zone_of = |node: &core::Node| {
            node.labels()
                .get(ZONE_LABEL)
                .cloned()
                .filter(|z| !z.is_empty())
        };
        let before = self.zone.clone();
        match event {
            watcher::Event::Init => return false,
            watcher::Event::InitApply(node) | watcher::Event::Apply(node) => {
                self.zone = zone_of(&node)
            }
            watcher::Event::InitDone => self.zone_synced = true,
            watcher::Event::Delete(_) => self.zone = None,
        }
        self.zone != before
    }

    /// Gives up on the Node watch (no permission): topology hints without a zone are off.
    pub fn without_node(&mut self) {
        self.zone_synced = true;
    }

    /// Every resource has been listed completely once: the snapshot is the world.
    pub fn ready(&self) -> bool {
        self.services.synced && self.slices.synced && self.zone_synced
    }

    /// Objects lb currently cannot use.
    pub fn rejected(&self) -> usize {
        self.services.rejected.len() + self.slices.rejected.len()
    }

    /// Logs rejected objects, each once while it lasts.
    pub fn log_rejected(&mut self) {
        let now: BTreeSet<String> = self
            .services
            .rejected
            .iter()
            .map(|(k, e)| format!("Service {k}: {e}"))
            .chain(
                self.slices
                    .rejected
                    .iter()
                    .map(|(k, e)| format!("EndpointSlice {k}: {e}")),
            )
            .collect();
        for problem in now.difference(&self.logged) {
            tracing::error!("{problem} (from the API; the last valid version, if any, stays)");
        }
        for problem in self.logged.difference(&now) {
            tracing::info!("resolved: {problem}");
        }
        self.logged = now;
    }

    /// The snapshot to send: O(what changed since the last one).
    pub fn snapshot(&mut self) -> Snapshot {
        self.index_slices();
        Snapshot {
            services: self.services.objects.clone(),
            slices: self.by_service.clone(),
            zone: self.zone.clone(),
            origins: OrdMap::new(),
        }
    }

    /// Brings the by-Service index up to the current slices, visiting only what changed.
    fn index_slices(&mut self) {
        let current = self.slices.objects.clone();
        let by_service = &mut self.by_service;
        for item in self.indexed.diff(&current) {
            match item {
                DiffItem::Add(_, new) => index(by_service, new),
                DiffItem::Remove(_, old) => unindex(by_service, old),
                DiffItem::Update {
                    old: (_, old),
                    new: (_, new),
                } => {
                    unindex(by_service, old);
                    index(by_service, new);
                }
            }
        }
        self.indexed = current;
    }
}

/// Adds `slice` to its Service's list, kept sorted by slice key.
fn index(by_service: &mut OrdMap<ObjectKey, Vec<Arc<EndpointSlice>>>, slice: &Arc<EndpointSlice>) {
    let list = by_service.entry(slice.service.clone()).or_default();
    match list.binary_search_by(|s| s.key.cmp(&slice.key)) {
        Ok(at) => list[at] = slice.clone(),
        Err(at) => list.insert(at, slice.clone()),
    }
}

/// Takes `slice` off its Service's list, and the list off the map when it is empty.
fn unindex(
    by_service: &mut OrdMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    slice: &Arc<EndpointSlice>,
) {
    let Some(list) = by_service.get_mut(&slice.service) else {
        return;
    };
    list.retain(|s| s.key != slice.key);
    if list.is_empty() {
        by_service.remove(&slice.service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> core::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> discovery::EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip]})).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    fn listed(
        store: &mut ApiStore,
        services: Vec<core::Service>,
        slices: Vec<discovery::EndpointSlice>,
    ) -> bool {
        let mut changed = store.on_service(watcher::Event::Init);
        for s in services {
            changed |= store.on_service(watcher::Event::InitApply(s));
        }
        changed |= store.on_service(watcher::Event::InitDone);
        changed |= store.on_slice(watcher::Event::Init);
        for s in slices {
            changed |= store.on_slice(watcher::Event::InitApply(s));
        }
        changed |= store.on_slice(watcher::Event::InitDone);
        changed
    }

    #[test]
    fn not_ready_until_every_resource_listed() {
        let mut store = ApiStore::default();
        store.without_node();
        assert!(!store.ready());
        store.on_service(watcher::Event::Init);
        store.on_service(watcher::Event::InitApply(service("a", "10.96.0.1")));
        store.on_service(watcher::Event::InitDone);
        assert!(!store.ready(), "slices not listed yet");
        listed(&mut store, vec![service("a", "10.96.0.1")], vec![]);
        assert!(store.ready());
    }

    #[test]
    fn relist_is_atomic_and_keeps_unchanged_objects() {
        let mut store = ApiStore::default();
        store.without_node();
        assert!(listed(
            &mut store,
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![slice("a-1", "a", &["10.1.0.1"])]
        ));
        let before = store.snapshot();
        // The same world listed again: nothing changes, identities are kept.
        assert!(!listed(
            &mut store,
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![slice("a-1", "a", &["10.1.0.1"])]
        ));
        let after = store.snapshot();
        let a = ObjectKey::new("default", "a");
        assert!(Arc::ptr_eq(&before.services[&a], &after.services[&a]));
        assert!(Arc::ptr_eq(&before.slices[&a][0], &after.slices[&a][0]));
        // During a relist the old world stays whole; at InitDone "b", missed while the watch
        // was down, is gone.
        store.on_service(watcher::Event::Init);
        store.on_service(watcher::Event::InitApply(service("a", "10.96.0.1")));
        assert_eq!(
            store.snapshot().services.len(),
            2,
            "not replaced before InitDone"
        );
        assert!(store.on_service(watcher::Event::InitDone));
        assert_eq!(store.snapshot().services.len(), 1);
    }

    #[test]
    fn incremental_events() {
        let mut store = ApiStore::default();
        store.without_node();
        listed(
            &mut store,
            vec![service("a", "10.96.0.1")],
            vec![slice("a-1", "a", &["10.1.0.1"])],
        );
        assert!(store.on_slice(watcher::Event::Apply(slice(
            "a-1",
            "a",
            &["10.1.0.1", "10.1.0.2"]
        ))));
        assert!(
            !store.on_slice(watcher::Event::Apply(slice(
                "a-1",
                "a",
                &["10.1.0.1", "10.1.0.2"]
            ))),
            "no-op update"
        );
        assert_eq!(
            store.snapshot().slices[&ObjectKey::new("default", "a")][0]
                .endpoints
                .len(),
            2
        );
        assert!(store.on_service(watcher::Event::Delete(service("a", "10.96.0.1"))));
        assert!(store.snapshot().services.is_empty());
    }

    #[test]
    fn slices_by_service_follow_moves_and_deletes() {
        let mut store = ApiStore::default();
        store.without_node();
        listed(
            &mut store,
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![
                slice("a-2", "a", &["10.1.0.2"]),
                slice("a-1", "a", &["10.1.0.1"]),
            ],
        );
        let (a, b) = (
            ObjectKey::new("default", "a"),
            ObjectKey::new("default", "b"),
        );
        let names = |snap: &Snapshot, service: &ObjectKey| -> Vec<String> {
            snap.slices_of(service)
                .iter()
                .map(|s| s.key.name.clone())
                .collect()
        };
        let first = store.snapshot();
        assert_eq!(names(&first, &a), ["a-1", "a-2"], "sorted by slice key");
        // A slice relabelled to another Service moves; a deleted one goes.
        store.on_slice(watcher::Event::Apply(slice("a-2", "b", &["10.1.0.2"])));
        let second = store.snapshot();
        assert_eq!(names(&second, &a), ["a-1"]);
        assert_eq!(names(&second, &b), ["a-2"]);
        assert_eq!(
            second.touched_since(&first),
            BTreeSet::from([a.clone(), b.clone()])
        );
        store.on_slice(watcher::Event::Delete(slice("a-1", "a", &[])));
        let third = store.snapshot();
        assert!(!third.slices.contains_key(&a));
        assert_eq!(third.touched_since(&second), BTreeSet::from([a]));
        assert!(
            third.services.ptr_eq(&second.services),
            "unchanged Services are shared, not copied"
        );
    }

    #[test]
    fn invalid_update_keeps_the_last_good_version() {
        let mut store = ApiStore::default();
        store.without_node();
        listed(&mut store, vec![service("a", "10.96.0.1")], vec![]);
        let mut bad = service("a", "10.96.0.1");
        bad.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 0;
        assert!(!store.on_service(watcher::Event::Apply(bad)));
        assert_eq!(store.rejected(), 1);
        assert_eq!(store.snapshot().services.len(), 1);
        assert!(!store.on_service(watcher::Event::Apply(service("a", "10.96.0.1"))));
        assert_eq!(store.rejected(), 0);
    }

    #[test]
    fn node_zone() {
        let mut store = ApiStore::default();
        let node: core::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}
        }))
        .unwrap();
        store.on_node(watcher::Event::Init);
        store.on_node(watcher::Event::InitApply(node));
        store.on_node(watcher::Event::InitDone);
        listed(&mut store, vec![], vec![]);
        assert!(store.ready());
        assert_eq!(store.snapshot().zone.as_deref(), Some("z1"));
    }
}
