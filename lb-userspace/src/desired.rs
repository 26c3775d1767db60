//! The desired state: what the kernel maps should hold for a snapshot, computed purely.
//!
//! Every load-balanced Service contributes one frontend per (cluster IP, port, protocol)
//! with the set of backends this node should use for it.

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
    model::{Endpoint, EndpointSlice, Family, Node, ObjectKey, Service, ServicePort, Snapshot},
    topology::{self, Policy},
};

/// One frontend as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// The Service and port it comes from (for messages and inspection).
    pub service: ObjectKey,
    pub port_name: String,
    /// ClientIP affinity timeout in seconds, 0 for none.
    pub affinity_timeout_s: u32,
    pub backends: BTreeSet<Backend>,
}

/// All frontends as they should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, DesiredFrontend>,
}

impl Desired {
    pub fn backend_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }
}

/// A Service (or part of one) that cannot be programmed as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {message}")]
pub struct DesiredError {
    pub service: ObjectKey,
    /// The frontend another Service holds, for a conflict; `None` when the Service did not
    /// fit the maps.
    pub contested: Option<FrontendKey>,
    /// The Service that holds the contested frontend.
    pub holder: Option<ObjectKey>,
    pub message: String,
}

impl DesiredError {
    /// The problem with both Services named and, when `snapshot` knows them (manifests), their
    /// files: `Service a/x: 10.96.0.1:80/TCP is already held by Service b/y; this port is not
    /// programmed (a/x in a.yaml, b/y in b.yaml)`.
    pub fn describe(&self, snapshot: &Snapshot) -> String {
        let mut text = match (&self.contested, &self.holder) {
            (Some(fkey), Some(holder)) => format!(
                "Service {}: {} is already held by Service {holder}; this port is not programmed",
                self.service,
                ShowFrontend(fkey),
            ),
            _ => self.to_string(),
        };
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frontends: MAX_FRONTENDS as usize,
            slots: MAX_SLOTS as usize,
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

/// The backends one Service port should use for one address family on this node.
fn backends_for(
    service: &Service,
    sp: &ServicePort,
    family: Family,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> BTreeSet<Backend> {
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
    let candidates: Vec<Candidate<'_>> = unique
        .iter()
        .map(|(&(_, port), &endpoint)| Candidate { endpoint, port })
        .collect();
    let policy = Policy {
        uses_cluster: !service.internal_local,
        uses_local: service.internal_local,
        topology: service.topology,
    };
    let chosen = topology::categorize(&candidates, policy, node);
    let chosen = if service.internal_local {
        chosen.local
    } else {
        chosen.cluster
    };
    chosen
        .into_iter()
        .map(|c| Backend::new(addr(&c.endpoint.addr), c.port.to_be()))
        .collect()
}

/// The frontends one Service asks for, before conflicts and capacity are considered.
/// Empty for Services lb does not load balance (headless, ExternalName).
pub fn service_frontends(
    key: &ObjectKey,
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &Node,
) -> Vec<(FrontendKey, DesiredFrontend)> {
    if !service.is_load_balanced() {
        return Vec::new();
    }
    let mut frontends = Vec::with_capacity(service.cluster_ips.len() * service.ports.len());
    for ip in &service.cluster_ips {
        for sp in &service.ports {
            frontends.push((
                frontend_key(ip, sp.port, sp.protocol.ip_proto()),
                DesiredFrontend {
                    service: key.clone(),
                    port_name: sp.name.clone(),
                    affinity_timeout_s: service.affinity_timeout_s.unwrap_or(0),
                    backends: backends_for(service, sp, Family::of(ip), slices, node),
                },
            ));
        }
    }
    frontends
}

/// The desired state under construction, with its backend slot count.
#[derive(Debug, Default)]
struct Merge {
    desired: Desired,
    slots: usize,
    errors: Vec<DesiredError>,
}

impl Merge {
    /// Adds one Service's frontends: a frontend another Service already holds is refused,
    /// and a Service that would not fit the maps is refused whole.
    fn add(
        &mut self,
        key: &ObjectKey,
        frontends: Vec<(FrontendKey, DesiredFrontend)>,
        limits: Limits,
    ) {
        let mut kept = Vec::with_capacity(frontends.len());
        for (fkey, frontend) in frontends {
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
        let new_slots: usize = kept.iter().map(|(_, f)| f.backends.len()).sum();
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
        self.desired.frontends.extend(kept);
    }
}

/// Computes the desired state of a snapshot for `node`. Services are taken in key order, so
/// conflicts and capacity limits always hit the same Services.
pub fn build(snapshot: &Snapshot, node: &Node, limits: Limits) -> (Desired, Vec<DesiredError>) {
    let mut merge = Merge::default();
    for (key, service) in &snapshot.services {
        let frontends = service_frontends(key, service, snapshot.slices_of(key), node);
        merge.add(key, frontends, limits);
    }
    (merge.desired, merge.errors)
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

    fn node() -> Node {
        Node {
            name: "n1".into(),
            zone: None,
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
