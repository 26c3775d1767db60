//! The world as lb needs it: Services and their endpoints, already validated, independent of
//! where they came from (manifests or the Kubernetes API) and of the kernel.

use std::{collections::BTreeSet, fmt, net::IpAddr, sync::Arc, time::SystemTime};

use imbl::{OrdMap, ordmap::DiffItem};

/// A Service's (or any namespaced object's) identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number the kernel programs match on.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => lb_common::maps::IPPROTO_TCP,
            Self::Udp => lb_common::maps::IPPROTO_UDP,
            Self::Sctp => lb_common::maps::IPPROTO_SCTP,
        }
    }

    pub const fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            lb_common::maps::IPPROTO_TCP => Some(Self::Tcp),
            lb_common::maps::IPPROTO_UDP => Some(Self::Udp),
            lb_common::maps::IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// IP family of an address or an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// `spec.ports[].targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// "" when the Service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// Topology hints opt-in, from `spec.trafficDistribution` or the
/// `service.kubernetes.io/topology-mode` annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    /// No topology filtering.
    None,
    /// Use zone hints when every ready endpoint has them (kube-proxy's canUseTopology).
    ZoneHints,
}

/// An address range of `spec.loadBalancerSourceRanges`: the network address (host bits
/// cleared, as kube-proxy's `ParseCIDR` gives it) and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The range holding the addresses whose first `len` bits are `addr`'s (`len` at most
    /// the family's width, else `None`).
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let masked = match addr {
            IpAddr::V4(a) => {
                if len > 32 {
                    return None;
                }
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                if len > 128 {
                    return None;
                }
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Some(Self { addr: masked, len })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        Self::new(*ip, self.len).is_some_and(|c| c.addr == self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A Service, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// ClientIP affinity timeout in seconds; `None` for `sessionAffinity: None`.
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (VIP mode).
    pub load_balancer_ips: Vec<IpAddr>,
    pub health_check_node_port: Option<u16>,
    pub topology: TopologyMode,
    /// `spec.loadBalancerSourceRanges` (both families; each LoadBalancer IP uses those of its
    /// own). Empty: every source.
    pub source_ranges: Vec<Cidr>,
}

impl Service {
    /// A Service of this type with the API's defaults: no addresses, no ports, no affinity,
    /// traffic policies Cluster, no topology.
    pub fn new(key: ObjectKey, service_type: ServiceType) -> Self {
        Self {
            key,
            service_type,
            cluster_ips: Vec::new(),
            ports: Vec::new(),
            affinity_timeout_s: None,
            internal_local: false,
            external_local: false,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            health_check_node_port: None,
            topology: TopologyMode::None,
            source_ranges: Vec::new(),
        }
    }

    /// Whether lb programs anything for it: not ExternalName, not headless.
    pub fn is_load_balanced(&self) -> bool {
        self.service_type != ServiceType::ExternalName && !self.cluster_ips.is_empty()
    }
}

/// One port of an EndpointSlice (or of an Endpoints subset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint: an address with its conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones`; empty when the endpoint has no hints.
    pub zone_hints: BTreeSet<String>,
}

impl AsRef<Self> for Endpoint {
    fn as_ref(&self) -> &Self {
        self
    }
}

/// An EndpointSlice, or the slice-equivalent of one v1 Endpoints subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// The slice's own identity (for Endpoints: the Endpoints name plus a subset suffix).
    pub key: ObjectKey,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: ObjectKey,
    pub family: Family,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation (RFC 3339): when the
    /// change this version of the slice carries happened (the pod or Service event that made
    /// the controller write it). `None` when absent or unreadable. Only for the network
    /// programming latency metric, as kube-proxy uses it.
    pub trigger_time: Option<SystemTime>,
}

/// Everything a source knows at one moment. Sources hand complete snapshots to the syncer,
/// so a relist or a reload is applied as one atomic change.
///
/// The maps are persistent (structure-sharing) maps: a clone costs nothing, and a snapshot
/// made from the previous one by a few inserts shares all the rest with it, so
/// [`Snapshot::touched_since`] finds what changed by skipping the shared parts. Sources keep
/// that sharing (see [`Snapshot::rebased_on`]), which keeps a one-object change O(log N).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: OrdMap<ObjectKey, Arc<Service>>,
    /// EndpointSlices by owning Service, each list sorted by slice key.
    pub slices: OrdMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), when the source knows it.
    pub zone: Option<String>,
    /// Where each Service was read, for messages that name it: its manifest file. Empty for
    /// the API source (an object's identity is its location there).
    pub origins: OrdMap<ObjectKey, Arc<str>>,
}

impl Snapshot {
    pub fn slices_of(&self, service: &ObjectKey) -> &[Arc<EndpointSlice>] {
        self.slices.get(service).map_or(&[], Vec::as_slice)
    }

    /// The Services whose inputs (the Service or its EndpointSlices) differ from `before`.
    /// Costs in proportion to the difference when the two share structure.
    pub fn touched_since(&self, before: &Snapshot) -> BTreeSet<ObjectKey> {
        fn keys<'a, V: PartialEq>(
            before: &'a OrdMap<ObjectKey, V>,
            after: &'a OrdMap<ObjectKey, V>,
        ) -> impl Iterator<Item = &'a ObjectKey> {
            before.diff(after).map(|item| match item {
                DiffItem::Add(key, _) | DiffItem::Remove(key, _) => key,
                DiffItem::Update { new: (key, _), .. } => key,
            })
        }
        keys(&before.services, &self.services)
            .chain(keys(&before.slices, &self.slices))
            .cloned()
            .collect()
    }

    /// This snapshot's content, built as `base` plus the differences, so that it shares
    /// structure with `base` (for a source that builds each snapshot from scratch).
    #[must_use]
    pub fn rebased_on(self, base: &Snapshot) -> Snapshot {
        Snapshot {
            services: rebased(&base.services, &self.services),
            slices: rebased(&base.slices, &self.slices),
            zone: self.zone,
            origins: rebased(&base.origins, &self.origins),
        }
    }
}

/// `target`'s content, made as `base` with the differences applied so that it shares
/// structure with `base`.
pub fn rebased<V: Clone + PartialEq>(
    base: &OrdMap<ObjectKey, V>,
    target: &OrdMap<ObjectKey, V>,
) -> OrdMap<ObjectKey, V> {
    let mut out = base.clone();
    for item in base.diff(target) {
        match item {
            DiffItem::Add(key, value)
            | DiffItem::Update {
                new: (key, value), ..
            } => {
                out.insert(key.clone(), value.clone());
            }
            DiffItem::Remove(key, _) => {
                out.remove(key);
            }
        }
    }
    out
}

/// What lb knows about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `topology.kubernetes.io/zone` of the Node, when known.
    pub zone: Option<String>,
    /// The node's addresses that NodePorts are served on (`--node-ip`).
    pub ips: Vec<IpAddr>,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> Arc<Service> {
        Arc::new(Service {
            cluster_ips: vec![IpAddr::from([10, 96, 0, 1])],
            ..Service::new(ObjectKey::new("default", name), ServiceType::ClusterIp)
        })
    }

    #[test]
    fn rebased_snapshot_shares_what_did_not_change() {
        let names: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        let base = Snapshot {
            services: names
                .iter()
                .map(|n| (ObjectKey::new("default", n), service(n)))
                .collect(),
            ..Snapshot::default()
        };
        // The same content built from scratch, except one Service changed and one gone.
        let mut fresh = Snapshot {
            services: base
                .services
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Snapshot::default()
        };
        fresh
            .services
            .insert(ObjectKey::new("default", "s7"), service("s7-changed"));
        fresh.services.remove(&ObjectKey::new("default", "s9"));
        let rebased = fresh.clone().rebased_on(&base);
        assert_eq!(rebased, fresh);
        assert_eq!(
            rebased.touched_since(&base),
            BTreeSet::from([
                ObjectKey::new("default", "s7"),
                ObjectKey::new("default", "s9")
            ])
        );
        assert!(
            base.clone()
                .rebased_on(&base)
                .services
                .ptr_eq(&base.services),
            "no change, same map"
        );
    }
}
