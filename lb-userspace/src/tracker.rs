//! The desired state kept across snapshots, so that a change costs in proportion to what
//! changed, not to the number of Services.
//!
//! The Services to look at are those [`Snapshot::touched_since`] the previous snapshot, found
//! without visiting the structure the two share. Sources keep an object's `Arc` while the
//! object is unchanged; a touched Service is recomputed only when its own `Arc` or one of its
//! EndpointSlices' `Arc`s differs from last time. The frontends it touched are returned as the
//! dirty set the planner diffs. Whenever the incremental path could differ from
//! [`desired::build`], the whole state is rebuilt instead, so the result is always exactly
//! what `build` would give: when a change claims a frontend another Service holds or touches
//! a Service in a conflict (who wins depends on the order of all Services), while a Service
//! is refused for a full map (a change anywhere can let it in), or when a large share of the
//! Services changed. A conflict elsewhere does not stop the incremental path.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use lb_common::maps::FrontendKey;

use crate::{
    desired::{self, Desired, DesiredError, Limits, NodePortClaim},
    model::{EndpointSlice, Node, ObjectKey, Service, Snapshot},
};

/// One Service's inputs (by identity) and the frontends they gave (held in the desired
/// state; here only their keys and backend count).
#[derive(Debug)]
struct Entry {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    frontends: Vec<FrontendKey>,
    /// The node ports it holds.
    node_ports: Vec<NodePortClaim>,
    slots: usize,
    /// Maglev table chunks of its frontends.
    chunks: usize,
}

impl Entry {
    fn same_inputs(&self, service: &Arc<Service>, slices: &[Arc<EndpointSlice>]) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// What an update changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Everything was recomputed: plan the whole state.
    Full,
    /// Only these frontends may differ: plan them.
    Frontends(BTreeSet<FrontendKey>),
}

/// The desired state and how it was made.
#[derive(Debug)]
pub struct Tracker {
    node: Node,
    limits: Limits,
    entries: HashMap<ObjectKey, Entry>,
    /// The snapshot `entries` and `desired` were made from.
    seen: Snapshot,
    desired: Desired,
    problems: Vec<DesiredError>,
    slots: usize,
    /// Maglev table chunks over all frontends.
    chunks: usize,
    /// What the last update found changed.
    touched: BTreeSet<ObjectKey>,
}

/// Above this share of changed Services, recomputing everything is as cheap and simpler.
const FULL_REBUILD_SHARE: usize = 4;

impl Tracker {
    pub fn new(node: Node, limits: Limits) -> Self {
        Self {
            node,
            limits,
            entries: HashMap::new(),
            seen: Snapshot::default(),
            desired: Desired::default(),
            problems: Vec::new(),
            slots: 0,
            chunks: 0,
            touched: BTreeSet::new(),
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Services (or ports) that could not be programmed as asked.
    pub fn problems(&self) -> &[DesiredError] {
        &self.problems
    }

    /// Load-balanced Services in the desired state.
    pub fn services(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !e.frontends.is_empty())
            .count()
    }

    /// Brings the desired state up to `snapshot`.
    pub fn update(&mut self, snapshot: &Snapshot) -> Change {
        self.touched = snapshot.touched_since(&self.seen);
        let touched = std::mem::take(&mut self.touched);
        let change = self.apply(snapshot, &touched);
        self.touched = touched;
        self.seen = snapshot.clone();
        change
    }

    /// The Services whose inputs (the Service or its EndpointSlices) the last update found
    /// changed, for other per-Service state kept alongside (the health check ports).
    pub fn touched(&self) -> &BTreeSet<ObjectKey> {
        &self.touched
    }

    fn apply(&mut self, snapshot: &Snapshot, touched: &BTreeSet<ObjectKey>) -> Change {
        if snapshot.zone != self.node.zone {
            // Topology hints of every Service depend on the zone.
            self.node.zone.clone_from(&snapshot.zone);
            self.rebuild(snapshot);
            return Change::Full;
        }
        let mut changed: Vec<&ObjectKey> = Vec::new();
        let mut removed: Vec<ObjectKey> = Vec::new();
        for key in touched {
            match snapshot.services.get_key_value(key) {
                Some((key, service)) => {
                    let unchanged = self
                        .entries
                        .get(key)
                        .is_some_and(|e| e.same_inputs(service, snapshot.slices_of(key)));
                    if !unchanged {
                        changed.push(key);
                    }
                }
                None if self.entries.contains_key(key) => removed.push(key.clone()),
                None => {} // EndpointSlices without their Service
            }
        }
        if changed.is_empty() && removed.is_empty() {
            return Change::Frontends(BTreeSet::new());
        }
        let total = snapshot.services.len().max(self.entries.len());
        let contended = changed
            .iter()
            .copied()
            .chain(&removed)
            .any(|key| self.in_conflict(key));
        if contended
            || self.refused_for_capacity()
            || (changed.len() + removed.len()) * FULL_REBUILD_SHARE > total
        {
            self.rebuild(snapshot);
            return Change::Full;
        }
        let mut dirty = BTreeSet::new();
        for key in &removed {
            self.remove(key, &mut dirty);
        }
        for key in changed {
            self.remove(key, &mut dirty);
            let service = &snapshot.services[key];
            let slices = snapshot.slices_of(key);
            let wants = desired::service_frontends(key, service, slices, &self.node);
            let frontends = wants.frontends;
            let conflict = frontends
                .iter()
                .any(|(fkey, _)| self.desired.frontends.contains_key(fkey))
                || wants
                    .node_ports
                    .iter()
                    .any(|claim| self.desired.node_ports.contains_key(claim));
            let slots: usize = frontends.iter().map(|(_, f)| f.slot_count()).sum();
            let per_table = self.limits.chunks_per_table;
            let chunks: usize = frontends
                .iter()
                .map(|(_, f)| f.table_chunks(per_table))
                .sum();
            let fits = self.desired.frontends.len() + frontends.len() <= self.limits.frontends
                && self.slots + slots <= self.limits.slots
                && self.chunks + chunks <= self.limits.table_chunks;
            if conflict || !fits {
                // Who wins depends on the order of all Services: let the full build decide.
                self.rebuild(snapshot);
                return Change::Full;
            }
            self.slots += slots;
            self.chunks += chunks;
            let mut keys = Vec::with_capacity(frontends.len());
            for (fkey, frontend) in frontends {
                dirty.insert(fkey);
                keys.push(fkey);
                self.desired.frontends.insert(fkey, frontend);
            }
            for claim in &wants.node_ports {
                self.desired.node_ports.insert(*claim, key.clone());
            }
            let entry = Entry {
                service: service.clone(),
                slices: slices.to_vec(),
                frontends: keys,
                node_ports: wants.node_ports,
                slots,
                chunks,
            };
            self.entries.insert(key.clone(), entry);
        }
        Change::Frontends(dirty)
    }

    fn remove(&mut self, key: &ObjectKey, dirty: &mut BTreeSet<FrontendKey>) {
        if let Some(old) = self.entries.remove(key) {
            self.slots -= old.slots;
            self.chunks -= old.chunks;
            for fkey in old.frontends {
                self.desired.frontends.remove(&fkey);
                dirty.insert(fkey);
            }
            for claim in old.node_ports {
                self.desired.node_ports.remove(&claim);
            }
        }
    }

    /// Recomputes everything, as [`desired::build`] does, keeping each Service's inputs.
    fn rebuild(&mut self, snapshot: &Snapshot) {
        let (desired, problems) = desired::build(snapshot, &self.node, self.limits);
        // Each Service's frontends as programmed (a refused port or Service has none).
        let mut programmed: HashMap<&ObjectKey, (Vec<FrontendKey>, usize, usize)> = HashMap::new();
        let per_table = self.limits.chunks_per_table;
        for (fkey, frontend) in &desired.frontends {
            let (keys, slots, chunks) = programmed.entry(&frontend.service).or_default();
            keys.push(*fkey);
            *slots += frontend.slot_count();
            *chunks += frontend.table_chunks(per_table);
        }
        let mut claimed: HashMap<&ObjectKey, Vec<NodePortClaim>> = HashMap::new();
        for (claim, holder) in &desired.node_ports {
            claimed.entry(holder).or_default().push(*claim);
        }
        self.entries.clear();
        for (key, service) in &snapshot.services {
            let (frontends, slots, chunks) = programmed.remove(key).unwrap_or_default();
            self.entries.insert(
                key.clone(),
                Entry {
                    service: service.clone(),
                    slices: snapshot.slices_of(key).to_vec(),
                    frontends,
                    node_ports: claimed.remove(key).unwrap_or_default(),
                    slots,
                    chunks,
                },
            );
        }
        self.slots = desired.backend_count();
        self.chunks = desired
            .frontends
            .values()
            .map(|f| f.table_chunks(per_table))
            .sum();
        self.desired = desired;
        self.problems = problems;
    }

    /// The Service holding the frontend or node port a conflict is about (`None` for a full
    /// map).
    fn holder<'a>(&self, problem: &'a DesiredError) -> Option<&'a ObjectKey> {
        problem.holder.as_ref()
    }

    /// Whether `key` is in a conflict (refused a frontend, or holds one another Service was
    /// refused): a change to it is decided by the full build. Holders are not changed
    /// incrementally, so the desired state still names them.
    fn in_conflict(&self, key: &ObjectKey) -> bool {
        self.problems
            .iter()
            .any(|p| p.service == *key || self.holder(p) == Some(key))
    }

    /// Some Service was refused because the maps were full. (A conflict's holder is always
    /// programmed; were it not, the safe side is to count it here and rebuild on every
    /// change.)
    fn refused_for_capacity(&self) -> bool {
        self.problems.iter().any(|p| self.holder(p).is_none())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::{
        Endpoint, EndpointPort, Family, Protocol, ServicePort, ServiceType, TargetPort,
    };

    fn service(name: &str, vip: u8, port: u16) -> Arc<Service> {
        Arc::new(Service {
            cluster_ips: vec![IpAddr::from([10, 96, 0, vip])],
            ports: vec![ServicePort {
                name: String::new(),
                port,
                protocol: Protocol::Tcp,
                target_port: TargetPort::Number(80),
                node_port: None,
            }],
            ..Service::new(ObjectKey::new("default", name), ServiceType::ClusterIp)
        })
    }

    fn slice(service: &str, backends: &[u8]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            key: ObjectKey::new("default", format!("{service}-x")),
            service: ObjectKey::new("default", service),
            family: Family::V4,
            ports: vec![EndpointPort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            endpoints: backends
                .iter()
                .map(|&b| Endpoint {
                    addr: IpAddr::from([10, 1, 0, b]),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                    zone: None,
                    zone_hints: BTreeSet::new(),
                })
                .collect(),
            trigger_time: None,
        })
    }

    fn check(tracker: &Tracker, snapshot: &Snapshot) {
        let (want, problems) = desired::build(snapshot, &Node::default(), Limits::default());
        assert_eq!(tracker.desired(), &want);
        assert_eq!(tracker.problems(), problems.as_slice());
    }

    #[test]
    fn one_changed_service_dirties_only_its_frontends() {
        let mut snap = Snapshot::default();
        for i in 0..20u8 {
            let name = format!("s{i}");
            snap.services
                .insert(ObjectKey::new("default", &name), service(&name, i, 80));
            snap.slices.insert(
                ObjectKey::new("default", &name),
                vec![slice(&name, &[1, 2])],
            );
        }
        let mut tracker = Tracker::new(Node::default(), Limits::default());
        assert_eq!(tracker.update(&snap), Change::Full);
        check(&tracker, &snap);
        assert_eq!(
            tracker.update(&snap),
            Change::Frontends(BTreeSet::new()),
            "nothing changed"
        );
        snap.slices.insert(
            ObjectKey::new("default", "s3"),
            vec![slice("s3", &[1, 2, 3])],
        );
        let Change::Frontends(dirty) = tracker.update(&snap) else {
            panic!("not incremental")
        };
        assert_eq!(dirty.len(), 1);
        check(&tracker, &snap);
    }

    #[test]
    fn conflicts_fall_back_to_the_full_build_for_their_services_only() {
        let mut snap = Snapshot::default();
        for i in 0..10u8 {
            let name = format!("s{i}");
            snap.services
                .insert(ObjectKey::new("default", &name), service(&name, i, 80));
        }
        let mut tracker = Tracker::new(Node::default(), Limits::default());
        tracker.update(&snap);
        // s9 takes s1's address and port: s1 keeps it (key order), s9 is refused.
        snap.services
            .insert(ObjectKey::new("default", "s9"), service("s9", 1, 80));
        assert_eq!(tracker.update(&snap), Change::Full);
        check(&tracker, &snap);
        assert_eq!(tracker.problems().len(), 1);
        // A Service outside the conflict changes: incremental, the conflict stays reported.
        snap.slices.insert(
            ObjectKey::new("default", "s4"),
            vec![slice("s4", &[1, 2, 3])],
        );
        let Change::Frontends(dirty) = tracker.update(&snap) else {
            panic!("a change outside the conflict is incremental")
        };
        assert_eq!(dirty.len(), 1);
        check(&tracker, &snap);
        assert_eq!(tracker.problems().len(), 1);
        // The holder goes: s9 gets the frontend, which only the full build can decide.
        snap.services.remove(&ObjectKey::new("default", "s1"));
        assert_eq!(tracker.update(&snap), Change::Full);
        check(&tracker, &snap);
        assert!(tracker.problems().is_empty());
        // Resolved again.
        snap.services
            .insert(ObjectKey::new("default", "s9"), service("s9", 9, 80));
        tracker.update(&snap);
        check(&tracker, &snap);
        assert!(tracker.problems().is_empty());
    }

    #[test]
    fn random_evolution_with_full_maps_matches_the_full_build() {
        let seen = random_evolution(Limits {
            frontends: 12,
            slots: 30,
            ..Limits::default()
        });
        assert!(seen.full_maps > 100 && seen.incremental > 100, "{seen:?}");
    }

    #[test]
    fn random_evolution_with_a_full_maglev_map_matches_the_full_build() {
        // Maglev tables of 2 chunks, room for 5: the table map fills before the others.
        let seen = random_evolution(Limits {
            chunks_per_table: 2,
            table_chunks: 10,
            ..Limits::default()
        });
        assert!(seen.full_maps > 50 && seen.incremental > 100, "{seen:?}");
    }

    #[test]
    fn random_evolution_with_conflicts_matches_the_full_build() {
        let seen = random_evolution(Limits::default());
        assert!(seen.full_maps == 0 && seen.conflicts > 100, "{seen:?}");
        assert!(seen.node_port_conflicts > 50, "{seen:?}");
        assert!(seen.incremental > seen.steps / 2, "{seen:?}");
    }

    /// How often each case came up in [`random_evolution`].
    #[derive(Debug, Default)]
    struct Seen {
        steps: usize,
        incremental: usize,
        full_maps: usize,
        conflicts: usize,
        node_port_conflicts: usize,
    }

    /// 500 random steps over 40 Services (address conflicts, Services and slices coming and
    /// going, snapshots sharing no structure); after each, the tracker equals the full build.
    fn random_evolution(limits: Limits) -> Seen {
        let mut next = crate::test_support::xorshift(0x2545_f491_4f6c_dd1du64);
        let mut snap = Snapshot::default();
        let node = Node {
            ips: vec![IpAddr::from([192, 0, 2, 10])],
            ..Node::default()
        };
        let mut tracker = Tracker::new(node.clone(), limits);
        let mut seen = Seen::default();
        for _ in 0..500 {
            for _ in 0..=next(3) {
                let i = next(40);
                let name = format!("s{i}");
                let key = ObjectKey::new("default", &name);
                match next(5) {
                    0 => {
                        snap.services.remove(&key);
                        snap.slices.remove(&key);
                    }
                    4 => {
                        // The Service goes, its slices stay (or come before it).
                        snap.services.remove(&key);
                    }
                    1 => {
                        // Same address or node port as another Service now and then:
                        // conflicts.
                        let vip = u8::try_from(next(45)).unwrap();
                        let mut svc = service(&name, vip, 80);
                        if next(2) == 0 {
                            let svc = Arc::make_mut(&mut svc);
                            svc.service_type = ServiceType::NodePort;
                            svc.ports[0].node_port =
                                Some(30_000 + u16::try_from(next(45)).unwrap());
                        }
                        snap.services.insert(key, svc);
                    }
                    _ => {
                        let backends: Vec<u8> = (0..next(7))
                            .map(|_| u8::try_from(next(9)).unwrap())
                            .collect();
                        snap.slices.insert(key, vec![slice(&name, &backends)]);
                    }
                }
            }
            if next(5) == 0 {
                // Now and then a snapshot that shares no structure with the last one.
                snap = Snapshot {
                    services: snap
                        .services
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    slices: snap
                        .slices
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    zone: None,
                    origins: imbl::OrdMap::new(),
                };
            }
            seen.steps += 1;
            if matches!(tracker.update(&snap), Change::Frontends(_)) {
                seen.incremental += 1;
            }
            let (want, problems) = desired::build(&snap, &node, limits);
            assert_eq!(tracker.desired(), &want);
            assert_eq!(tracker.problems(), problems.as_slice());
            seen.full_maps += usize::from(problems.iter().any(|p| p.holder.is_none()));
            seen.conflicts += usize::from(problems.iter().any(|p| p.contested.is_some()));
            seen.node_port_conflicts += usize::from(
                problems
                    .iter()
                    .any(|p| p.contested.is_none() && p.holder.is_some()),
            );
        }
        seen
    }
}
