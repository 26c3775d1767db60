//! The desired state: what the kernel maps should hold for a snapshot, computed purely.
//!
//! Every load-balanced Service contributes, per port, one frontend for each cluster IP
//! (internal traffic), and one for each of its external addresses: the node's IPs on the
//! port's `nodePort`, `spec.externalIPs`, and `status.loadBalancer.ingress[].ip` (VIP mode),
//! each with the set of backends this node should use for it. The socket programs serve all
//! of them for processes on the node; kube-proxy's rules for which endpoints each kind uses
//! are in [`backends_for`].

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    Addr,
    maps::{Backend, FrontendKey, MAX_FRONTENDS, MAX_SLOTS},
};

use crate::{
    model::{
        Cidr, Endpoint, EndpointSlice, Family, Node, ObjectKey, Service, ServicePort, Snapshot,
    },
    topology::{self, Policy},
};

/// What kind of Service address a frontend is, as kube-proxy tells internal traffic (to the
/// ClusterIP) from external traffic (to everything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum FrontendKind {
    /// `spec.clusterIPs`: internal traffic, `internalTrafficPolicy` applies.
    ClusterIp,
    /// A node IP (`--node-ip`) on the port's `nodePort`.
    NodePort,
    /// An address of `spec.externalIPs`, on the Service port.
    ExternalIp,
    /// An address of `status.loadBalancer.ingress[].ip` (VIP mode), on the Service port.
    LoadBalancerIp,
}

impl FrontendKind {
    /// Whether the address is external in kube-proxy's sense (eTP, not iTP, governs it).
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "externalIP",
            Self::LoadBalancerIp => "LoadBalancer IP",
        })
    }
}

/// A Service's traffic policies: `Local` (true) or `Cluster`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrafficPolicy {
    pub internal_local: bool,
    pub external_local: bool,
}

/// One frontend as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// The Service and port it comes from (for messages and inspection).
    pub service: ObjectKey,
    pub port_name: String,
    /// Which of the Service's addresses it is.
    pub kind: FrontendKind,
    /// The Service's `internalTrafficPolicy: Local` and `externalTrafficPolicy: Local` (for
    /// inspection; the backend sets already follow them).
    pub policy: TrafficPolicy,
    /// ClientIP affinity timeout in seconds, 0 for none.
    pub affinity_timeout_s: u32,
    /// Backends of the socket programs (node-originated traffic).
    pub backends: BTreeSet<Backend>,
    /// For an external frontend, the backends of traffic from outside the node (the XDP
    /// datapath); `None` for a ClusterIP.
    pub external: Option<ExternalBackends>,
    /// The sources XDP admits new flows from (`spec.loadBalancerSourceRanges` of this
    /// frontend's family), for a LoadBalancer IP only, as kube-proxy's firewall; empty: every
    /// source. See [`source_ranges`].
    pub source_ranges: Vec<Cidr>,
}

/// The backends external traffic uses (kube-proxy's `CategorizeEndpoints` for
/// `externalTrafficPolicy`): under `Local` this node's endpoints only, under `Cluster` the
/// cluster's, each ready first then serving-and-terminating.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalBackends {
    /// `externalTrafficPolicy: Local`.
    pub policy_local: bool,
    /// The backends on this node.
    pub local: BTreeSet<Backend>,
    /// The backends on other nodes (empty under `Local`).
    pub remote: BTreeSet<Backend>,
}

impl ExternalBackends {
    /// The slot order: this node's backends first.
    pub fn ordered(&self) -> impl Iterator<Item = &Backend> {
        self.local.iter().chain(&self.remote)
    }

    pub fn len(&self) -> usize {
        self.local.len() + self.remote.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `nodePort` and protocol: claimed by one Service on every node IP, whichever node IPs
/// there are (so `lb check`, which knows none, still finds two Services claiming one).
pub type NodePortClaim = (u16, crate::model::Protocol);

/// All frontends as they should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, DesiredFrontend>,
    /// Which Service holds each node port.
    pub node_ports: BTreeMap<NodePortClaim, ObjectKey>,
}

impl Desired {
    /// Backend slots over all frontends (socket and external ranges).
    pub fn backend_count(&self) -> usize {
        self.frontends
            .values()
            .map(DesiredFrontend::slot_count)
            .sum()
    }
}

impl DesiredFrontend {
    /// The slots this frontend takes: its socket backends and its external ones.
    pub fn slot_count(&self) -> usize {
        self.backends.len() + self.external.as_ref().map_or(0, ExternalBackends::len)
    }

    /// The Maglev table chunks this frontend takes with `per_table` chunks a table: one table
    /// for an external frontend with backends.
    pub fn table_chunks(&self, per_table: usize) -> usize {
        if self.external.as_ref().is_some_and(|e| !e.is_empty()) {
            per_table
        } else {
            0
        }
    }

    /// Every backend of either range (the frontend's memberships).
    pub fn members(&self) -> BTreeSet<Backend> {
        let mut all = self.backends.clone();
        if let Some(ext) = &self.external {
            all.extend(ext.ordered().copied());
        }
        all
    }
}

/// A Service (or part of one) that cannot be programmed as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {message}")]
pub struct DesiredError {
    pub service: ObjectKey,
    /// The frontend another Service holds, for a conflict over an address; `None` when the
    /// Service did not fit the maps or the conflict is over a node port.
    pub contested: Option<FrontendKey>,
    /// The Service that holds the contested frontend or node port; `None` when the Service
    /// did not fit the maps.
    pub holder: Option<ObjectKey>,
    pub message: String,
}

impl DesiredError {
    /// The problem with both Services named and, when `snapshot` knows them (manifests), their
    /// files: `Service a/x: 10.96.0.1:80/TCP is already held by Service b/y; this port is not
    /// programmed (a/x in a.yaml, b/y in b.yaml)`.
    pub fn describe(&self, snapshot: &Snapshot) -> String {
        let mut text = self.to_string();
        let located: Vec<String> = std::iter::once(&self.service)
            .chain(&self.holder)
            .filter_map(|key| Some(format!("{key} in {}", snapshot.origins.get(key)?)))
            .collect();
        if !located.is_empty() {
            text.push_str(&format!(" ({})", located.join(", ")));
        }
        text
    }
}

/// How much the maps hold: the capacities of the agent-written maps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub frontends: usize,
    pub slots: usize,
    /// Maglev table chunks each external frontend with backends takes (`--lb-algorithm
    /// maglev`: `lb_common::maglev::chunks(M)`); 0 without tables.
    pub chunks_per_table: usize,
    /// Capacity of `LB_MAGLEV`, in chunks.
    pub table_chunks: usize,
}

// Here rather than in kernel/, which knows nothing of desired states.
impl crate::kernel::Capacities {
    /// The desired-state limits these capacities allow.
    pub fn limits(&self) -> Limits {
        Limits {
            frontends: self.frontends as usize,
            slots: self.backends as usize,
            ..Limits::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frontends: MAX_FRONTENDS as usize,
            slots: MAX_SLOTS as usize,
            chunks_per_table: 0,
            table_chunks: lb_common::maglev::MAX_CHUNKS as usize,
        }
    }
}

/// The map form of an IP address.
pub fn addr(ip: &IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => Addr::from_v6_octets(v6.octets()),
    }
}

/// A frontend key for an address, port (host order) and protocol number.
pub fn frontend_key(ip: &IpAddr, port: u16, proto: u8) -> FrontendKey {
    FrontendKey {
        addr: addr(ip),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// Human form of a frontend key: `10.96.0.1:80/TCP`, `[fd00::1]:80/UDP`.
pub struct ShowFrontend<'a>(pub &'a FrontendKey);

impl fmt::Display for ShowFrontend<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.0;
        let proto = crate::model::Protocol::from_ip_proto(key.proto)
            .map_or_else(|| key.proto.to_string(), |p| p.to_string());
        write!(f, "{}/{proto}", ShowAddrPort(&key.addr, key.port))
    }
}

/// Human form of an address and network-order port.
pub struct ShowAddrPort<'a>(pub &'a Addr, pub u16);

impl fmt::Display for ShowAddrPort<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let octets = self.0.octets();
        let port = u16::from_be(self.1);
        if self.0.is_v4() {
            let v4 = std::net::Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
            write!(f, "{v4}:{port}")
        } else {
            write!(f, "[{}]:{port}", std::net::Ipv6Addr::from(octets))
        }
    }
}

/// The port an endpoint of `slice` serves `sp` on: the slice port with the Service port's
/// name and protocol, as kube-proxy matches them (pkg/proxy/endpointslicecache.go keys
/// endpoints by the slice port's name, and a Service port finds its endpoints under its own
/// name). A named `targetPort` is resolved by whoever writes the slice (the EndpointSlice
/// controller writes the pod's number under the Service port's name); a slice port named
/// after the `targetPort` instead matches nothing, and kube-proxy then rejects connections.
fn endpoint_port(slice: &EndpointSlice, sp: &ServicePort) -> Option<u16> {
    slice
        .ports
        .iter()
        .find(|p| p.protocol == sp.protocol && p.name == sp.name)
        .map(|p| p.port)
}

/// Rank of an endpoint's conditions, to pick one when the same address and port appears in
/// two slices (during a slice split or merge): ready over serving over anything.
fn rank(ep: &Endpoint) -> u8 {
    u8::from(ep.ready) * 2 + u8::from(ep.serving)
}

/// An endpoint with the port it serves a given Service port on.
#[derive(Clone, Copy)]
struct Candidate<'a> {
    endpoint: &'a Endpoint,
    port: u16,
}

impl AsRef<Endpoint> for Candidate<'_> {
    fn as_ref(&self) -> &Endpoint {
        self.endpoint
    }
}

/// The endpoints serving `sp` in `family`, each address and port once (the best-ranked copy
/// when two slices list it).
fn unique_endpoints<'a>(
    sp: &ServicePort,
    family: Family,
    slices: &'a [Arc<EndpointSlice>],
) -> BTreeMap<(IpAddr, u16), &'a Endpoint> {
    let mut unique: BTreeMap<(IpAddr, u16), &Endpoint> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(port) = endpoint_port(slice, sp) else {
            continue;
        };
        for ep in &slice.endpoints {
            match unique.entry((ep.addr, port)) {
                Entry::Vacant(v) => {
                    v.insert(ep);
                }
                Entry::Occupied(mut o) => {
                    if rank(ep) > rank(o.get()) {
                        o.insert(ep);
                    }
                }
            }
        }
    }
    unique
}

fn candidates<'a>(unique: &BTreeMap<(IpAddr, u16), &'a Endpoint>) -> Vec<Candidate<'a>> {
    unique
        .iter()
        .map(|(&(_, port), &endpoint)| Candidate { endpoint, port })
        .collect()
}

/// The backends one Service port should use for one address family on this node, for a
/// frontend of `kind`.
///
/// As kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go): the ClusterIP uses this
/// node's endpoints only under `internalTrafficPolicy: Local`, else the cluster's (ready, else
/// serving-and-terminating, narrowed by topology hints). External addresses reached from the
/// node itself (the socket programs serve only the node's processes) use the cluster's
/// endpoints whatever `externalTrafficPolicy` says: kube-proxy "short-circuits" pod and
/// host traffic to a LoadBalancer IP, NodePort or externalIP to the cluster-wide endpoints,
/// since such traffic has no client address to preserve (`UsesClusterEndpoints`: "Even if
/// the external traffic policy is Local, we need Cluster endpoints to implement short
/// circuiting").
fn backends_for(
    service: &Service,
    sp: &ServicePort,
    family: Family,
    kind: FrontendKind,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> BTreeSet<Backend> {
    let unique = unique_endpoints(sp, family, slices);
    let candidates = candidates(&unique);
    let local_only = kind == FrontendKind::ClusterIp && service.internal_local;
    let policy = Policy {
        uses_cluster: !local_only,
        uses_local: local_only,
        topology: service.topology,
    };
    let chosen = topology::categorize(&candidates, policy, node);
    let chosen = if local_only {
        chosen.local
    } else {
        chosen.cluster
    };
    chosen
        .into_iter()
        .map(|c| Backend::new(addr(&c.endpoint.addr), c.port.to_be()))
        .collect()
}

/// The backends of traffic from outside the node to an external frontend of `service`, for
/// one family (see [`ExternalBackends`]).
fn external_backends(
    service: &Service,
    sp: &ServicePort,
    family: Family,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> ExternalBackends {
    let unique = unique_endpoints(sp, family, slices);
    let candidates = candidates(&unique);
    let local_policy = service.external_local;
    let policy = Policy {
        uses_cluster: !local_policy,
        uses_local: local_policy,
        topology: service.topology,
    };
    let chosen = topology::categorize(&candidates, policy, node);
    let chosen = if local_policy {
        chosen.local
    } else {
        chosen.cluster
    };
    let mut out = ExternalBackends {
        policy_local: local_policy,
        ..ExternalBackends::default()
    };
    for c in chosen {
        let backend = Backend::new(addr(&c.endpoint.addr), c.port.to_be());
        let here = !node.name.is_empty() && c.endpoint.node_name.as_deref() == Some(&*node.name);
        if here || local_policy {
            out.local.insert(backend);
        } else {
            out.remote.insert(backend);
        }
    }
    out
}

/// The source ranges of a frontend of `kind` and `family`: kube-proxy (pkg/proxy/iptables
/// `KUBE-FW-*`, nftables `firewall-ips`) filters only the LoadBalancer ingress IPs, with the
/// ranges of their family (`MapCIDRsByIPFamily`); NodePorts, externalIPs and the ClusterIP
/// take every source, and ranges without an ingress IP filter nothing.
fn source_ranges(service: &Service, kind: FrontendKind, family: Family) -> Vec<Cidr> {
    if kind != FrontendKind::LoadBalancerIp {
        return Vec::new();
    }
    service
        .source_ranges
        .iter()
        .filter(|c| Family::of(&c.addr) == family)
        .copied()
        .collect()
}

/// kube-proxy's `LocalReadyEndpoints` for one Service (pkg/proxy/endpoints.go), what its
/// `healthCheckNodePort` reports: the distinct ready endpoints (address and port, over all the
/// Service's ports and families) on this node.
pub fn local_ready_endpoints(
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> usize {
    let mut local: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    for sp in &service.ports {
        for slice in slices {
            let Some(port) = endpoint_port(slice, sp) else {
                continue;
            };
            for ep in &slice.endpoints {
                if ep.ready && !node.name.is_empty() && ep.node_name.as_deref() == Some(&node.name)
                {
                    local.insert((ep.addr, port));
                }
            }
        }
    }
    local.len()
}

/// What one Service asks for, before conflicts and capacity are considered.
#[derive(Debug, Default)]
pub struct ServiceFrontends {
    pub frontends: Vec<(FrontendKey, DesiredFrontend)>,
    /// Its ports' `nodePort`s (claimed whether or not the node has IPs to serve them on).
    pub node_ports: Vec<NodePortClaim>,
}

/// The frontends one Service asks for (see the module doc), before conflicts and capacity
/// are considered. Empty for Services lb does not load balance (headless, ExternalName).
/// An address that appears twice (an externalIP that is also an ingress IP) is programmed
/// once, as its first kind.
pub fn service_frontends(
    key: &ObjectKey,
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> ServiceFrontends {
    let mut out = ServiceFrontends::default();
    if !service.is_load_balanced() {
        return out;
    }
    let families: BTreeSet<Family> = service.cluster_ips.iter().map(Family::of).collect();
    let mut seen: BTreeSet<FrontendKey> = BTreeSet::new();
    for sp in &service.ports {
        let proto = sp.protocol.ip_proto();
        let mut add = |ip: &IpAddr, port: u16, kind: FrontendKind| {
            let fkey = frontend_key(ip, port, proto);
            if !seen.insert(fkey) {
                return;
            }
            out.frontends.push((
                fkey,
                DesiredFrontend {
                    service: key.clone(),
                    port_name: sp.name.clone(),
                    kind,
                    policy: TrafficPolicy {
                        internal_local: service.internal_local,
                        external_local: service.external_local,
                    },
                    affinity_timeout_s: service.affinity_timeout_s.unwrap_or(0),
                    backends: backends_for(service, sp, Family::of(ip), kind, slices, node),
                    external: kind
                        .is_external()
                        .then(|| external_backends(service, sp, Family::of(ip), slices, node)),
                    source_ranges: source_ranges(service, kind, Family::of(ip)),
                },
            ));
        };
        for ip in &service.cluster_ips {
            add(ip, sp.port, FrontendKind::ClusterIp);
        }
        if let Some(node_port) = sp.node_port {
            // Node IPs of the families the Service has, as each of kube-proxy's per-family
            // proxiers serves the Services of its family.
            for ip in node
                .ips
                .iter()
                .filter(|ip| families.contains(&Family::of(ip)))
            {
                add(ip, node_port, FrontendKind::NodePort);
            }
        }
        for ip in &service.external_ips {
            add(ip, sp.port, FrontendKind::ExternalIp);
        }
        for ip in &service.load_balancer_ips {
            add(ip, sp.port, FrontendKind::LoadBalancerIp);
        }
    }
    out.node_ports = service
        .ports
        .iter()
        .filter_map(|sp| Some((sp.node_port?, sp.protocol)))
        .collect();
    out
}

/// The desired state under construction, with its backend slot count.
#[derive(Debug, Default)]
struct Merge {
    desired: Desired,
    slots: usize,
    /// Maglev table chunks.
    chunks: usize,
    errors: Vec<DesiredError>,
}

impl Merge {
    /// Adds one Service's frontends: a node port or a frontend another Service already holds
    /// is refused (that port's NodePort frontends, or that frontend), and a Service that would
    /// not fit the maps is refused whole.
    fn add(&mut self, key: &ObjectKey, wants: ServiceFrontends, limits: Limits) {
        let mut refused_ports: Vec<NodePortClaim> = Vec::new();
        let mut claims = Vec::with_capacity(wants.node_ports.len());
        for claim in wants.node_ports {
            match self.desired.node_ports.get(&claim) {
                Some(holder) if holder != key => {
                    self.errors.push(DesiredError {
                        service: key.clone(),
                        contested: None,
                        holder: Some(holder.clone()),
                        message: format!(
                            "NodePort {}/{} is already Service {holder}'s; its NodePort frontends \
                             are not programmed",
                            claim.0, claim.1
                        ),
                    });
                    refused_ports.push(claim);
                }
                _ => claims.push(claim),
            }
        }
        let mut kept = Vec::with_capacity(wants.frontends.len());
        for (fkey, frontend) in wants.frontends {
            if frontend.kind == FrontendKind::NodePort
                && refused_ports.iter().any(|&(port, proto)| {
                    fkey.port == port.to_be() && fkey.proto == proto.ip_proto()
                })
            {
                continue;
            }
            if let Some(owner) = self.desired.frontends.get(&fkey) {
                self.errors.push(DesiredError {
                    service: key.clone(),
                    contested: Some(fkey),
                    holder: Some(owner.service.clone()),
                    message: format!(
                        "{} is already Service {}'s; this port is not programmed",
                        ShowFrontend(&fkey),
                        owner.service
                    ),
                });
                continue;
            }
            kept.push((fkey, frontend));
        }
        let new_slots: usize = kept.iter().map(|(_, f)| f.slot_count()).sum();
        let new_chunks: usize = kept
            .iter()
            .map(|(_, f)| f.table_chunks(limits.chunks_per_table))
            .sum();
        let full = if self.desired.frontends.len() + kept.len() > limits.frontends {
            Some(format!(
                "map {} is full ({} frontends; see --max-frontends)",
                lb_common::maps::FRONTENDS,
                limits.frontends
            ))
        } else if self.slots + new_slots > limits.slots {
            Some(format!(
                "map {} is full ({} backend slots; see --max-backends)",
                lb_common::maps::SLOTS,
                limits.slots
            ))
        } else if self.chunks + new_chunks > limits.table_chunks {
            Some(format!(
                "map {} is full ({} Maglev table chunks, {} per external frontend at this \
                 --maglev-table-size)",
                lb_common::maglev::MAGLEV,
                limits.table_chunks,
                limits.chunks_per_table
            ))
        } else {
            None
        };
        if let Some(full) = full {
            self.errors.push(DesiredError {
                service: key.clone(),
                contested: None,
                holder: None,
                message: format!("not programmed: {full}"),
            });
            return;
        }
        self.slots += new_slots;
        self.chunks += new_chunks;
        self.desired.frontends.extend(kept);
        for claim in claims {
            self.desired.node_ports.insert(claim, key.clone());
        }
    }
}

/// Computes the desired state of a snapshot for `node`. Services are taken in key order, so
/// conflicts and capacity limits always hit the same Services.
///
/// What each Service asks for is computed on several threads for a large snapshot (it is
/// pure and most of the work); the merge, which decides conflicts and capacity, runs in key
/// order on one.
pub fn build(snapshot: &Snapshot, node: &Node, limits: Limits) -> (Desired, Vec<DesiredError>) {
    let services: Vec<(&ObjectKey, &Arc<Service>)> = snapshot.services.iter().collect();
    let wants = in_parallel(&services, |(key, service)| {
        service_frontends(key, service, snapshot.slices_of(key), node)
    });
    let mut merge = Merge::default();
    for ((key, _), wants) in services.iter().zip(wants) {
        merge.add(key, wants, limits);
    }
    (merge.desired, merge.errors)
}

/// Snapshots with fewer Services are built on one thread.
const PARALLEL_SERVICES: usize = 4096;
/// Threads at most for [`build`].
const BUILD_THREADS: usize = 4;

/// `f` of every item, in order: on one thread per core (at most [`BUILD_THREADS`]) for
/// [`PARALLEL_SERVICES`] items or more.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = if items.len() < PARALLEL_SERVICES {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(BUILD_THREADS)
    };
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let share = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(share)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for handle in handles {
            // A panic (a bug) goes on to the caller, as on one thread.
            out.extend(
                handle
                    .join()
                    .unwrap_or_else(|payload| std::panic::resume_unwind(payload)),
            );
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::convert;

    fn snapshot(yaml: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        for doc in yaml.split("\n---\n") {
            let value: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            match value["kind"].as_str().unwrap() {
                "Service" => {
                    let s = convert::service(&serde_json::from_value(value).unwrap()).unwrap();
                    snap.services.insert(s.key.clone(), Arc::new(s));
                }
                "EndpointSlice" => {
                    let s = convert::endpoint_slice(&serde_json::from_value(value).unwrap())
                        .unwrap()
                        .unwrap();
                    snap.slices
                        .entry(s.service.clone())
                        .or_default()
                        .push(Arc::new(s));
                }
                "Endpoints" => {
                    for s in convert::endpoints(&serde_json::from_value(value).unwrap()).unwrap() {
                        snap.slices
                            .entry(s.service.clone())
                            .or_default()
                            .push(Arc::new(s));
                    }
                }
                other => panic!("{other}"),
            }
        }
        snap
    }

    #[test]
    fn a_large_snapshot_built_on_threads_is_built_as_on_one() {
        // Enough Services for the threads, with conflicts (every 97th Service claims the
        // previous one's address) and a capacity limit that refuses the last ones: who wins
        // must not depend on the threads.
        let mut docs = Vec::new();
        for i in 0..(PARALLEL_SERVICES + 900) {
            let ip_of = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
            let ip = if i % 97 == 0 && i > 0 {
                ip_of(i - 1)
            } else {
                ip_of(i)
            };
            docs.push(format!(
                "kind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
            ));
            docs.push(format!(
                "kind: EndpointSlice\nmetadata: {{name: s{i}-a, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [10.1.{}.{}]}}]",
                i / 250,
                i % 250 + 1
            ));
        }
        let snap = snapshot(&docs.join("\n---\n"));
        let limits = Limits {
            frontends: PARALLEL_SERVICES + 800,
            slots: usize::MAX,
            ..Limits::default()
        };
        let mut one = Merge::default();
        for (key, service) in &snap.services {
            let wants = service_frontends(key, service, snap.slices_of(key), &node());
            one.add(key, wants, limits);
        }
        let (desired, errors) = build(&snap, &node(), limits);
        assert!(!one.errors.is_empty());
        assert_eq!(desired, one.desired);
        assert_eq!(errors, one.errors);
    }

    fn node() -> Node {
        Node {
            name: "n1".into(),
            zone: None,
            ips: vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        }
    }

    fn backends(d: &Desired, ip: &str, port: u16, proto: u8) -> Vec<String> {
        let key = frontend_key(&ip.parse().unwrap(), port, proto);
        d.frontends[&key]
            .backends
            .iter()
            .map(|b| ShowAddrPort(&b.addr, b.port).to_string())
            .collect()
    }

    const TCP: u8 = lb_common::maps::IPPROTO_TCP;
    const UDP: u8 = lb_common::maps::IPPROTO_UDP;

    /// "kind frontend" of every frontend, sorted.
    fn kinds(d: &Desired) -> Vec<String> {
        let mut out: Vec<String> = d
            .frontends
            .iter()
            .map(|(k, f)| format!("{} {}", f.kind, ShowFrontend(k)))
            .collect();
        out.sort();
        out
    }

    /// A LoadBalancer Service with externalIPs, eTP and iTP Local, endpoints on this node
    /// (n1) and another (n2), dual-stack.
    const NORTH_SOUTH: &str = "
kind: Service
metadata: {name: shop}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.50, 'fd00::50']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.9}, {ip: 198.51.100.7}, {ip: 203.0.113.10, ipMode: Proxy}]
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1], nodeName: n1}, {addresses: [10.1.0.2], nodeName: n2}]
---
kind: EndpointSlice
metadata: {name: b, labels: {kubernetes.io/service-name: shop}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:1::1'], nodeName: n2}]
";

    #[test]
    fn external_addresses_are_frontends_of_their_kind() {
        let (d, errors) = build(&snapshot(NORTH_SOUTH), &node(), Limits::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            kinds(&d),
            [
                "ClusterIP 10.96.0.50:80/TCP",
                "ClusterIP [fd00::50]:80/TCP",
                "LoadBalancer IP 203.0.113.9:80/TCP",
                "NodePort 192.0.2.10:30080/TCP",
                "NodePort [2001:db8::10]:30080/TCP",
                "externalIP 198.51.100.7:80/TCP",
            ],
            "the ingress IP that is also an externalIP once; ipMode Proxy not at all"
        );
    }

    #[test]
    fn traffic_policies_on_the_socket_path() {
        let (d, _) = build(&snapshot(NORTH_SOUTH), &node(), Limits::default());
        // iTP Local: the ClusterIP uses this node's endpoints only (none for IPv6).
        assert_eq!(backends(&d, "10.96.0.50", 80, TCP), ["10.1.0.1:8080"]);
        assert!(backends(&d, "fd00::50", 80, TCP).is_empty());
        // eTP Local: traffic from the node itself to an external address is short-circuited
        // to the cluster's endpoints, as kube-proxy does.
        for (ip, port) in [
            ("192.0.2.10", 30080),
            ("198.51.100.7", 80),
            ("203.0.113.9", 80),
        ] {
            assert_eq!(
                backends(&d, ip, port, TCP),
                ["10.1.0.1:8080", "10.1.0.2:8080"],
                "{ip}"
            );
        }
        assert_eq!(
            backends(&d, "2001:db8::10", 30080, TCP),
            ["[fd00:1::1]:8080"]
        );
    }

    #[test]
    fn external_traffic_uses_the_external_traffic_policy() {
        let (d, _) = build(&snapshot(NORTH_SOUTH), &node(), Limits::default());
        let ext = |ip: &str, port: u16| {
            d.frontends[&frontend_key(&ip.parse().unwrap(), port, TCP)]
                .external
                .clone()
        };
        assert_eq!(ext("10.96.0.50", 80), None, "a ClusterIP is not external");
        let local = ext("192.0.2.10", 30080).unwrap();
        assert!(local.policy_local);
        let shown: Vec<String> = local
            .ordered()
            .map(|b| ShowAddrPort(&b.addr, b.port).to_string())
            .collect();
        assert_eq!(
            shown,
            ["10.1.0.1:8080"],
            "eTP Local: this node's endpoint only"
        );
        assert!(
            ext("2001:db8::10", 30080).unwrap().is_empty(),
            "no IPv6 endpoint on this node: external packets are dropped"
        );
        // eTP Cluster: every endpoint, this node's first.
        let cluster = NORTH_SOUTH.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        );
        let (d, _) = build(&snapshot(&cluster), &node(), Limits::default());
        let ext = d.frontends[&frontend_key(&"203.0.113.9".parse().unwrap(), 80, TCP)]
            .external
            .clone()
            .unwrap();
        assert!(!ext.policy_local);
        let shown: Vec<String> = ext
            .ordered()
            .map(|b| ShowAddrPort(&b.addr, b.port).to_string())
            .collect();
        assert_eq!(shown, ["10.1.0.1:8080", "10.1.0.2:8080"]);
        assert_eq!(ext.local.len(), 1);
        assert_eq!(
            d.backend_count(),
            d.frontends
                .values()
                .map(|f| f.backends.len() + f.external.as_ref().map_or(0, ExternalBackends::len))
                .sum::<usize>()
        );
    }

    /// kube-proxy's firewall: the ranges of the address's family, on LoadBalancer IPs only
    /// (an externalIP that is also an ingress IP is programmed as an externalIP: unfiltered).
    #[test]
    fn source_ranges_filter_load_balancer_ips_only() {
        let yaml = NORTH_SOUTH.replace(
            "  externalTrafficPolicy: Local\n",
            "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [10.0.0.0/8, '2001:db8::/32']\n",
        );
        let (d, errors) = build(&snapshot(&yaml), &node(), Limits::default());
        assert!(errors.is_empty(), "{errors:?}");
        let ranges: Vec<String> = d
            .frontends
            .values()
            .filter(|f| !f.source_ranges.is_empty())
            .map(|f| {
                let shown: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
                format!("{} {}", f.kind, shown.join(","))
            })
            .collect();
        assert_eq!(ranges, ["LoadBalancer IP 10.0.0.0/8"]);
    }

    #[test]
    fn node_ports_need_node_ips_and_a_service_of_their_family() {
        let yaml = "kind: Service\nmetadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.96.0.51, ports: [{port: 53, protocol: UDP, nodePort: 30053}]}";
        let (d, _) = build(&snapshot(yaml), &node(), Limits::default());
        assert_eq!(
            kinds(&d),
            [
                "ClusterIP 10.96.0.51:53/UDP",
                "NodePort 192.0.2.10:30053/UDP"
            ],
            "a v4-only Service gets no NodePort on the node's IPv6 address"
        );
        let no_ips = Node {
            ips: Vec::new(),
            ..node()
        };
        let (d, _) = build(&snapshot(yaml), &no_ips, Limits::default());
        assert_eq!(kinds(&d), ["ClusterIP 10.96.0.51:53/UDP"]);
        assert_eq!(d.node_ports.len(), 1, "claimed all the same");
    }

    #[test]
    fn local_ready_endpoints_count_distinct_ready_ones_on_this_node() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: hc}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.58
  externalTrafficPolicy: Local
  healthCheckNodePort: 30999
  ports: [{name: a, port: 80, nodePort: 30001}, {name: b, port: 81, nodePort: 30002}]
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: hc}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8080}]
endpoints:
- {addresses: [10.1.0.1], nodeName: n1}
- {addresses: [10.1.0.2], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.1.0.3], nodeName: n2}
",
        );
        let key = ObjectKey::new("default", "hc");
        let svc = &snap.services[&key];
        // 10.1.0.1:8080 once, though both ports reach it; the terminating one does not count.
        assert_eq!(local_ready_endpoints(svc, snap.slices_of(&key), &node()), 1);
        let other = Node {
            name: "n3".into(),
            ..node()
        };
        assert_eq!(local_ready_endpoints(svc, snap.slices_of(&key), &other), 0);
    }

    #[test]
    fn no_node_ports_when_a_load_balancer_allocates_none() {
        let yaml = "kind: Service\nmetadata: {name: lb}\nspec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, clusterIP: 10.96.0.52, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}";
        let (d, errors) = build(&snapshot(yaml), &node(), Limits::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            kinds(&d),
            [
                "ClusterIP 10.96.0.52:80/TCP",
                "LoadBalancer IP 203.0.113.1:80/TCP"
            ]
        );
    }

    #[rstest::rstest]
    #[case::with_node_ips(true)]
    #[case::without_node_ips_as_lb_check(false)]
    fn two_services_claiming_one_node_port(#[case] with_ips: bool) {
        let snap = snapshot(
            "kind: Service\nmetadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.96.0.53, ports: [{port: 80, nodePort: 30123}]}
---
kind: Service\nmetadata: {name: b}\nspec: {type: NodePort, clusterIP: 10.96.0.54, ports: [{port: 81, nodePort: 30123}]}
---
kind: Service\nmetadata: {name: c}\nspec: {type: NodePort, clusterIP: 10.96.0.55, ports: [{port: 82, protocol: UDP, nodePort: 30123}]}",
        );
        let node = if with_ips {
            node()
        } else {
            Node {
                ips: Vec::new(),
                ..node()
            }
        };
        let (d, errors) = build(&snap, &node, Limits::default());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let text = errors[0].to_string();
        assert!(
            text.starts_with(
                "Service default/b: NodePort 30123/TCP is already Service default/a's"
            ),
            "{text}"
        );
        assert_eq!(errors[0].holder, Some(ObjectKey::new("default", "a")));
        // b keeps its ClusterIP; the UDP node port of c is another claim.
        assert!(d.frontends.values().any(|f| f.service.name == "b"));
        assert_eq!(d.node_ports.len(), 2);
    }

    #[test]
    fn an_external_ip_claimed_twice_names_both_services() {
        let snap = snapshot(
            "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.56, externalIPs: [198.51.100.1], ports: [{port: 80}]}
---
kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.57, externalIPs: [198.51.100.1], ports: [{port: 80}]}",
        );
        let (_, errors) = build(&snap, &node(), Limits::default());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "Service default/b: 198.51.100.1:80/TCP is already Service default/a's; this port is not programmed"
        );
    }

    #[test]
    fn multi_port_with_named_target_ports_per_slice() {
        // Two slices with different numbers for the pods' "web" port: resolved per endpoint.
        let snap = snapshot(
            "
kind: Service
metadata: {name: crane}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: https, port: 443, targetPort: 8443}
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: crane}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints: [{addresses: [10.1.0.1]}]
---
kind: EndpointSlice
metadata: {name: b, labels: {kubernetes.io/service-name: crane}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [10.1.0.2]}]
",
        );
        let (d, errors) = build(&snap, &node(), Limits::default());
        assert!(errors.is_empty());
        assert_eq!(
            backends(&d, "10.96.0.10", 80, TCP),
            ["10.1.0.1:8080", "10.1.0.2:9090"]
        );
        assert_eq!(backends(&d, "10.96.0.10", 443, TCP), ["10.1.0.1:8443"]);
    }

    #[test]
    fn slice_ports_match_by_the_service_port_name_only() {
        // As kube-proxy: a slice port named after the targetPort (the pods' port name) is not
        // the Service port's, so the Service has no endpoints and refuses connections.
        let snap = snapshot(
            "
kind: Service
metadata: {name: crane}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: crane}}
addressType: IPv4
ports: [{name: web, port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
---
kind: Endpoints
metadata: {name: crane}
subsets: [{addresses: [{ip: 10.1.0.2}], ports: [{name: web, port: 8080}]}]
",
        );
        let (d, errors) = build(&snap, &node(), Limits::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(backends(&d, "10.96.0.10", 80, TCP).is_empty());
    }

    #[test]
    fn selectorless_with_endpoints_and_affinity() {
        let snap = snapshot("
kind: Service
metadata: {name: ext}
spec: {clusterIP: 10.96.0.11, ports: [{port: 53, protocol: UDP}], sessionAffinity: ClientIP}
---
kind: Endpoints
metadata: {name: ext}
subsets: [{addresses: [{ip: 192.0.2.1}, {ip: 192.0.2.2}], notReadyAddresses: [{ip: 192.0.2.3}], ports: [{port: 5353, protocol: UDP}]}]
");
        let (d, _) = build(&snap, &node(), Limits::default());
        assert_eq!(
            backends(&d, "10.96.0.11", 53, UDP),
            ["192.0.2.1:5353", "192.0.2.2:5353"]
        );
        let key = frontend_key(&"10.96.0.11".parse().unwrap(), 53, UDP);
        assert_eq!(d.frontends[&key].affinity_timeout_s, 10_800);
    }

    #[test]
    fn no_endpoints_gives_an_empty_frontend() {
        let snap = snapshot(
            "kind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}",
        );
        let (d, _) = build(&snap, &node(), Limits::default());
        assert!(backends(&d, "10.96.0.12", 80, TCP).is_empty());
    }

    #[test]
    fn dual_stack_uses_slices_of_each_family() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: ds}
spec: {clusterIPs: [10.96.0.13, 'fd00::13'], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: v4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
---
kind: EndpointSlice
metadata: {name: v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:1::1']}]
",
        );
        let (d, _) = build(&snap, &node(), Limits::default());
        assert_eq!(backends(&d, "10.96.0.13", 80, TCP), ["10.1.0.1:8080"]);
        assert_eq!(backends(&d, "fd00::13", 80, TCP), ["[fd00:1::1]:8080"]);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: loc}
spec: {clusterIP: 10.96.0.14, ports: [{port: 80}], internalTrafficPolicy: Local}
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: loc}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.1], nodeName: n1}, {addresses: [10.1.0.2], nodeName: n2}]
",
        );
        let (d, _) = build(&snap, &node(), Limits::default());
        assert_eq!(backends(&d, "10.96.0.14", 80, TCP), ["10.1.0.1:80"]);
        let (d, _) = build(
            &snap,
            &Node {
                name: "n3".into(),
                zone: None,
                ips: Vec::new(),
            },
            Limits::default(),
        );
        assert!(backends(&d, "10.96.0.14", 80, TCP).is_empty());
    }

    #[test]
    fn duplicate_endpoint_across_slices_counts_once_preferring_ready() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: dup}
spec: {clusterIP: 10.96.0.15, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.1], conditions: {ready: false, serving: false}}]
---
kind: EndpointSlice
metadata: {name: b, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.1]}]
",
        );
        let (d, _) = build(&snap, &node(), Limits::default());
        assert_eq!(backends(&d, "10.96.0.15", 80, TCP), ["10.1.0.1:80"]);
    }

    #[test]
    fn unmatched_port_names_give_no_backends() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: m}
spec: {clusterIP: 10.96.0.16, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: m}}
addressType: IPv4
ports: [{name: metrics, port: 9090}]
endpoints: [{addresses: [10.1.0.1]}]
",
        );
        let (d, _) = build(&snap, &node(), Limits::default());
        assert!(backends(&d, "10.96.0.16", 80, TCP).is_empty());
    }

    #[test]
    fn headless_and_external_name_are_skipped() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: h}
spec: {clusterIP: None, ports: [{port: 80}]}
---
kind: Service
metadata: {name: e}
spec: {type: ExternalName, externalName: example.com}
",
        );
        let (d, errors) = build(&snap, &node(), Limits::default());
        assert!(d.frontends.is_empty() && errors.is_empty());
    }

    #[test]
    fn conflicting_frontend_goes_to_the_first_service() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.17, ports: [{port: 80}]}
---
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.17, ports: [{port: 80}]}
",
        );
        let (d, errors) = build(&snap, &node(), Limits::default());
        assert_eq!(d.frontends.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].service.name, "b");
        assert!(
            errors[0]
                .to_string()
                .contains("10.96.0.17:80/TCP is already Service default/a's")
        );
    }

    #[test]
    fn maglev_tables_count_against_their_map() {
        // Two NodePort Services with an endpoint each: one external frontend each (the node's
        // IPv4 address), so one table each; the ClusterIPs take none.
        let snap = snapshot(
            "
kind: Service
metadata: {name: a}
spec: {type: NodePort, clusterIP: 10.96.0.18, ports: [{port: 80, nodePort: 30001}]}
---
kind: EndpointSlice
metadata: {name: a, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.1]}]
---
kind: Service
metadata: {name: b}
spec: {type: NodePort, clusterIP: 10.96.0.19, ports: [{port: 80, nodePort: 30002}]}
---
kind: EndpointSlice
metadata: {name: b, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.2]}]
",
        );
        let limits = |table_chunks| Limits {
            chunks_per_table: 16,
            table_chunks,
            ..Limits::default()
        };
        let (d, errors) = build(&snap, &node(), limits(32));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d.frontends.len(), 4);
        let (d, errors) = build(&snap, &node(), limits(31));
        assert_eq!(d.frontends.len(), 2, "Service b refused whole");
        assert!(
            errors[0]
                .to_string()
                .contains("map LB_MAGLEV is full (31 Maglev table chunks, 16 per external"),
            "{errors:?}"
        );
    }

    #[test]
    fn capacity_limits_name_the_map() {
        let snap = snapshot(
            "
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.18, ports: [{port: 80}]}
---
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.19, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: b, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]
",
        );
        let (d, errors) = build(
            &snap,
            &node(),
            Limits {
                frontends: 1,
                slots: 10,
                ..Limits::default()
            },
        );
        assert_eq!(d.frontends.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("map LB_FRONTENDS is full (1 frontends; see --max-frontends)"),
            "{errors:?}"
        );
        let (d, errors) = build(
            &snap,
            &node(),
            Limits {
                frontends: 10,
                slots: 1,
                ..Limits::default()
            },
        );
        assert_eq!(d.frontends.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("map LB_SLOTS is full (1 backend slots; see --max-backends)"),
            "{errors:?}"
        );
    }
}
