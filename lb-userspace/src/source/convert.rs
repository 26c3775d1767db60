//! Kubernetes objects (k8s-openapi types) to the validated [`crate::model`], shared by every
//! source. Each check names the field it rejects, so the message a user sees points at the
//! line to fix.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::model::{
    Cidr, Endpoint, EndpointPort, EndpointSlice, Family, ObjectKey, Protocol, Service, ServicePort,
    ServiceType, TargetPort, TopologyMode,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for `timeoutSeconds` (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// A rejected field: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path in the object, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// `metadata.namespace` (default "default") and `metadata.name` (required).
pub fn object_key(meta: &ObjectMeta) -> Result<ObjectKey, FieldError> {
    let name = match meta.name.as_deref() {
        Some(name) if !name.is_empty() => name,
        _ => return err("metadata.name", "missing"),
    };
    let namespace = match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    };
    Ok(ObjectKey::new(namespace, name))
}

fn port_number(field: &str, value: i32) -> Result<u16, FieldError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => err(field, format!("{value} is out of range 1-65535")),
    }
}

fn protocol(field: &str, value: Option<&str>) -> Result<Protocol, FieldError> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => err(
            field,
            format!("unsupported protocol {other:?} (TCP, UDP or SCTP)"),
        ),
    }
}

fn ip(field: &str, value: &str) -> Result<IpAddr, FieldError> {
    match value.parse::<IpAddr>() {
        Ok(addr) if !addr.is_unspecified() => Ok(addr),
        Ok(_) => err(field, format!("{value:?} is the unspecified address")),
        Err(_) => err(field, format!("{value:?} is not an IP address")),
    }
}

/// A v1 Service.
pub fn service(svc: &core::Service) -> Result<Service, FieldError> {
    let key = object_key(&svc.metadata)?;
    let Some(spec) = svc.spec.as_ref() else {
        return err("spec", "missing");
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return err(
                "spec.type",
                format!(
                    "unknown type {other:?} (ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ),
            );
        }
    };
    let mut out = Service::new(key, service_type);
    if service_type == ServiceType::ExternalName {
        // A DNS alias: nothing to load balance. The API server refuses addresses on it.
        external_name_has_no_addresses(spec)?;
        return Ok(out);
    }
    out.cluster_ips = cluster_ips(spec)?;
    ip_families(spec, &out.cluster_ips)?;
    out.ports = service_ports(spec, !out.cluster_ips.is_empty())?;
    out.affinity_timeout_s = session_affinity(spec)?;
    out.internal_local = traffic_policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    out.external_local = traffic_policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    for (i, addr) in spec.external_ips.iter().flatten().enumerate() {
        out.external_ips
            .push(ip(&format!("spec.externalIPs[{i}]"), addr)?);
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ingress) in ingress.into_iter().flatten().enumerate() {
        // ipMode Proxy: the load balancer proxies, so in-cluster clients must go through it.
        if ingress.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(addr) = ingress.ip.as_deref() {
            out.load_balancer_ips
                .push(ip(&format!("status.loadBalancer.ingress[{i}].ip"), addr)?);
        }
    }
    if let Some(port) = spec.health_check_node_port.filter(|&p| p != 0) {
        if service_type != ServiceType::LoadBalancer || !out.external_local {
            return err(
                "spec.healthCheckNodePort",
                "may only be set on a LoadBalancer Service with externalTrafficPolicy: Local",
            );
        }
        out.health_check_node_port = Some(port_number("spec.healthCheckNodePort", port)?);
    }
    out.topology = topology_mode(&svc.metadata, spec);
    out.source_ranges = source_ranges(spec, service_type)?;
    Ok(out)
}

/// `spec.loadBalancerSourceRanges`, checked as the API server checks them (pkg/apis/core/
/// validation `ValidateService`): on a LoadBalancer Service only, each entry a CIDR, with
/// surrounding spaces allowed ("a historical accident", which kube-proxy's
/// `MapCIDRsByIPFamily` trims too). Host bits are cleared, as kube-proxy's parse does.
fn source_ranges(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
) -> Result<Vec<Cidr>, FieldError> {
    let Some(ranges) = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty())
    else {
        return Ok(Vec::new());
    };
    if service_type != ServiceType::LoadBalancer {
        return err(
            "spec.loadBalancerSourceRanges",
            "may only be used when `type` is 'LoadBalancer'",
        );
    }
    let mut out = Vec::with_capacity(ranges.len());
    for (i, text) in ranges.iter().enumerate() {
        let field = format!("spec.loadBalancerSourceRanges[{i}]");
        out.push(cidr(&field, text)?);
    }
    Ok(out)
}

/// One CIDR (`ADDRESS/LENGTH`), spaces around it ignored.
fn cidr(field: &str, text: &str) -> Result<Cidr, FieldError> {
    let bad = || {
        err(
            field,
            format!("{text:?} is not a valid CIDR (e.g. 192.0.2.0/24 or 2001:db8::/32)"),
        )
    };
    let Some((addr, len)) = text.trim().split_once('/') else {
        return bad();
    };
    let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u8>()) else {
        return bad();
    };
    Cidr::new(addr, len).map_or_else(bad, Ok)
}

fn cluster_ips(spec: &core::ServiceSpec) -> Result<Vec<IpAddr>, FieldError> {
    let single = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let list: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if single == Some("None") || list.first() == Some(&"None") {
        if list.len() > 1 {
            return err(
                "spec.clusterIPs[1]",
                "must be absent when spec.clusterIPs[0] is \"None\" (a headless Service)",
            );
        }
        return Ok(Vec::new());
    }
    let (field, values): (&str, Vec<&str>) = match (single, list.is_empty()) {
        (_, false) => ("spec.clusterIPs", list),
        (Some(one), true) => ("spec.clusterIP", vec![one]),
        (None, true) => {
            return err(
                "spec.clusterIP",
                "missing: lb does not allocate ClusterIPs; set one, or \"None\" for a headless Service",
            );
        }
    };
    if let (Some(one), "spec.clusterIPs") = (single, field)
        && values.first() != Some(&one)
    {
        return err(
            "spec.clusterIPs[0]",
            format!("{:?} differs from spec.clusterIP {one:?}", values[0]),
        );
    }
    if values.len() > 2 {
        return err(field, "at most two addresses, one per IP family");
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let name = if field == "spec.clusterIP" {
            field.to_owned()
        } else {
            format!("{field}[{i}]")
        };
        out.push(ip(&name, value)?);
    }
    if out.len() == 2 && Family::of(&out[0]) == Family::of(&out[1]) {
        return err(
            "spec.clusterIPs",
            "both addresses have the same IP family; dual-stack needs one of each",
        );
    }
    Ok(out)
}

/// `spec.ipFamilyPolicy` and `spec.ipFamilies` against each other and against the cluster
/// IPs, as the API server's `validateServiceClusterIPsRelatedFields` and `validateIPFamilies`
/// check them (pkg/apis/core/validation/validation.go): known values, no duplicate family, at
/// most two, `SingleStack` with one family and one address, and each `clusterIPs[i]` of the
/// family `ipFamilies[i]` names. A dual-stack policy with a single address is accepted where
/// the API server would allocate the second address, except `RequireDualStack`, which lb
/// cannot honour without allocating.
fn ip_families(spec: &core::ServiceSpec, cluster_ips: &[IpAddr]) -> Result<(), FieldError> {
    let policy = spec.ip_family_policy.as_deref();
    match policy {
        None | Some("SingleStack" | "PreferDualStack" | "RequireDualStack") => {}
        Some(other) => {
            return err(
                "spec.ipFamilyPolicy",
                format!(
                    "unknown value {other:?} (SingleStack, PreferDualStack or RequireDualStack)"
                ),
            );
        }
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if families.len() > 2 {
        return err("spec.ipFamilies", "at most two families, IPv4 and IPv6");
    }
    let mut parsed = Vec::with_capacity(families.len());
    for (i, family) in families.iter().enumerate() {
        let family = match family.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            other => {
                return err(
                    format!("spec.ipFamilies[{i}]"),
                    format!("unknown family {other:?} (IPv4 or IPv6)"),
                );
            }
        };
        if parsed.contains(&family) {
            return err(
                format!("spec.ipFamilies[{i}]"),
                format!("duplicate family {:?}", families[i]),
            );
        }
        parsed.push(family);
    }
    if policy == Some("SingleStack") {
        if families.len() > 1 {
            return err(
                "spec.ipFamilyPolicy",
                "SingleStack with two ipFamilies: use PreferDualStack or RequireDualStack",
            );
        }
        if cluster_ips.len() > 1 {
            return err(
                "spec.ipFamilyPolicy",
                "SingleStack with two clusterIPs: use PreferDualStack or RequireDualStack",
            );
        }
    }
    for (i, (ip, family)) in cluster_ips.iter().zip(&parsed).enumerate() {
        if Family::of(ip) != *family {
            // Name the field the manifest used.
            let field = if spec.cluster_ips.as_ref().is_none_or(Vec::is_empty) {
                "spec.clusterIP".to_owned()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            return err(
                field,
                format!(
                    "{ip} is not an {} address, as spec.ipFamilies[{i}] says",
                    families[i]
                ),
            );
        }
    }
    if policy == Some("RequireDualStack") && cluster_ips.len() == 1 {
        return err(
            "spec.clusterIPs",
            "RequireDualStack needs two addresses, one per family (lb does not allocate \
             ClusterIPs)",
        );
    }
    Ok(())
}

/// An ExternalName Service has no cluster IPs and no IP families (the API server's
/// validation forbids setting them).
fn external_name_has_no_addresses(spec: &core::ServiceSpec) -> Result<(), FieldError> {
    if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
        return err(
            "spec.clusterIP",
            "may not be set for an ExternalName Service",
        );
    }
    if spec.cluster_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
        return err(
            "spec.clusterIPs",
            "may not be set for an ExternalName Service",
        );
    }
    if spec.ip_families.as_ref().is_some_and(|f| !f.is_empty()) {
        return err(
            "spec.ipFamilies",
            "may not be set for an ExternalName Service",
        );
    }
    if spec.ip_family_policy.is_some() {
        return err(
            "spec.ipFamilyPolicy",
            "may not be set for an ExternalName Service",
        );
    }
    Ok(())
}

/// A port's `nodePort` against the Service's type, as the API server validates it: only
/// NodePort and LoadBalancer Services have them, and those have one on every port (lb does
/// not allocate them), except a LoadBalancer with `allocateLoadBalancerNodePorts: false`; one
/// node port serves one port of a protocol.
fn node_port_rules(
    spec: &core::ServiceSpec,
    field: &str,
    node_port: Option<u16>,
    protocol: Protocol,
    earlier: &[ServicePort],
) -> Result<(), FieldError> {
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match (service_type, node_port) {
        ("NodePort" | "LoadBalancer", Some(n)) => {
            if let Some(i) = earlier
                .iter()
                .position(|p| p.node_port == Some(n) && p.protocol == protocol)
            {
                return err(
                    format!("{field}.nodePort"),
                    format!("duplicate node port {n}/{protocol} (also spec.ports[{i}])"),
                );
            }
            Ok(())
        }
        ("LoadBalancer", None) if spec.allocate_load_balancer_node_ports == Some(false) => Ok(()),
        ("NodePort" | "LoadBalancer", None) => err(
            format!("{field}.nodePort"),
            format!(
                "missing: lb does not allocate node ports (the API server would, from its \
                 --service-node-port-range); set one on every port of a {service_type} Service"
            ),
        ),
        (_, Some(_)) => err(
            format!("{field}.nodePort"),
            format!("may not be set on a {service_type} Service"),
        ),
        (_, None) => Ok(()),
    }
}

/// The range node ports are allocated from (`--nodeport-range`; the API server's
/// `--service-node-port-range`, default 30000-32767). lb validates manifests against it; the
/// API source programs what the API server allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortRange {
    pub low: u16,
    pub high: u16,
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self {
            low: 30_000,
            high: 32_767,
        }
    }
}

impl NodePortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl std::fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;

    /// `LOW-HIGH`, 1 <= LOW <= HIGH <= 65535.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a port range like 30000-32767");
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || low > high {
            return Err(format!(
                "{text:?}: the range must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535"
            ));
        }
        Ok(Self { low, high })
    }
}

fn service_ports(
    spec: &core::ServiceSpec,
    has_cluster_ip: bool,
) -> Result<Vec<ServicePort>, FieldError> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && has_cluster_ip {
        return err(
            "spec.ports",
            "a Service with a cluster IP needs at least one port",
        );
    }
    let mut out: Vec<ServicePort> = Vec::with_capacity(ports.len());
    let mut seen: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_number(&format!("{field}.port"), p.port)?;
        let protocol = protocol(&format!("{field}.protocol"), p.protocol.as_deref())?;
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return err(
                format!("{field}.name"),
                "missing: every port of a multi-port Service needs a name",
            );
        }
        if let Some(first) = names.insert(p.name.as_deref().unwrap_or_default(), i)
            && !name.is_empty()
        {
            return err(
                format!("{field}.name"),
                format!("duplicate name {name:?} (also spec.ports[{first}])"),
            );
        }
        if let Some(first) = seen.insert((port, protocol), i) {
            return err(
                field,
                format!("duplicate port {port}/{protocol} (also spec.ports[{first}])"),
            );
        }
        let target_port = match &p.target_port {
            None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(&format!("{field}.targetPort"), *n)?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                // kubectl accepts "8080" as a string; the API server stores it as a name, but
                // a numeric name can never match a port name, so treat it as the number.
                Ok(n) => TargetPort::Number(port_number(&format!("{field}.targetPort"), n)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(&format!("{field}.nodePort"), n)?),
        };
        node_port_rules(spec, &field, node_port, protocol, &out)?;
        out.push(ServicePort {
            name,
            port,
            protocol,
            target_port,
            node_port,
        });
    }
    Ok(out)
}

fn session_affinity(spec: &core::ServiceSpec) -> Result<Option<u32>, FieldError> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Ok(Some(t)),
                    _ => err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"),
                    ),
                },
            }
        }
        Some(other) => err(
            "spec.sessionAffinity",
            format!("unknown value {other:?} (None or ClientIP)"),
        ),
    }
}

fn traffic_policy(field: &str, value: Option<&str>) -> Result<bool, FieldError> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => err(field, format!("unknown value {other:?} (Cluster or Local)")),
    }
}

fn topology_mode(meta: &ObjectMeta, spec: &core::ServiceSpec) -> TopologyMode {
    // As kube-proxy: trafficDistribution, when set, wins over the annotations.
    if let Some(distribution) = spec.traffic_distribution.as_deref() {
        return match distribution {
            "PreferClose" | "PreferSameZone" | "PreferSameNode" => TopologyMode::ZoneHints,
            _ => TopologyMode::None,
        };
    }
    let annotations = meta.annotations.as_ref();
    let mode = annotations
        .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION))
        .or_else(|| annotations.and_then(|a| a.get(TOPOLOGY_HINTS_ANNOTATION)));
    match mode.map(String::as_str) {
        Some("Auto" | "auto") => TopologyMode::ZoneHints,
        _ => TopologyMode::None,
    }
}

/// The annotation the EndpointSlice (and Endpoints) controllers set to the time of the change
/// a write carries (`endpoints.kubernetes.io/last-change-trigger-time`, RFC 3339).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The object's trigger time; `None` when absent or unreadable (kube-proxy's
/// getLastChangeTriggerTime also ignores a bad value: it only feeds a metric).
fn trigger_time(meta: &ObjectMeta) -> Option<std::time::SystemTime> {
    let text = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let at: jiff::Timestamp = text.parse().ok()?;
    Some(std::time::SystemTime::from(at))
}

/// A discovery.k8s.io/v1 EndpointSlice. `Ok(None)` for FQDN slices, which kube-proxy ignores.
pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
) -> Result<Option<EndpointSlice>, FieldError> {
    let key = object_key(&slice.metadata)?;
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty());
    let Some(service_name) = service_name else {
        return err(
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "missing: the label names the Service this slice belongs to",
        );
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => return Ok(None),
        other => {
            return err(
                "addressType",
                format!("unknown value {other:?} (IPv4, IPv6 or FQDN)"),
            );
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        // A port without a number means "all ports" to the API; kube-proxy skips it.
        let Some(number) = p.port else { continue };
        let name = p.name.clone().unwrap_or_default();
        // The API server refuses two ports of one name: kube-proxy finds a Service port's
        // endpoints by that name, so it must say one thing.
        if let Some(first) = ports.iter().position(|q: &EndpointPort| q.name == name) {
            return err(
                format!("{field}.name"),
                format!("duplicate name {name:?} (also ports[{first}])"),
            );
        }
        ports.push(EndpointPort {
            name,
            port: port_number(&format!("{field}.port"), number)?,
            protocol: protocol(&format!("{field}.protocol"), p.protocol.as_deref())?,
        });
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}].addresses");
        // kube-proxy uses the first address only; the others are for other consumers.
        let Some(first) = ep.addresses.first() else {
            return err(field, "empty: an endpoint needs an address");
        };
        let addr = ip(&format!("{field}[0]"), first)?;
        if Family::of(&addr) != family {
            return err(
                format!("{field}[0]"),
                format!("{first:?} is not an {} address", slice.address_type),
            );
        }
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(Endpoint {
            addr,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone().filter(|s| !s.is_empty()),
            zone: ep.zone.clone().filter(|s| !s.is_empty()),
            zone_hints: ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
        });
    }
    Ok(Some(EndpointSlice {
        service: ObjectKey::new(key.namespace.clone(), service_name.clone()),
        key,
        family,
        ports,
        endpoints,
        trigger_time: trigger_time(&slice.metadata),
    }))
}

/// A v1 Endpoints, as the slices the EndpointSlice mirroring controller would make of it:
/// one per subset and address family. `notReadyAddresses` are neither ready nor serving.
pub fn endpoints(eps: &core::Endpoints) -> Result<Vec<EndpointSlice>, FieldError> {
    let key = object_key(&eps.metadata)?;
    let mut out = Vec::new();
    for (i, subset) in eps.subsets.iter().flatten().enumerate() {
        let field = format!("subsets[{i}]");
        let mut ports = Vec::new();
        for (j, p) in subset.ports.iter().flatten().enumerate() {
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(&format!("{field}.ports[{j}].port"), p.port)?,
                protocol: protocol(
                    &format!("{field}.ports[{j}].protocol"),
                    p.protocol.as_deref(),
                )?,
            });
        }
        let mut by_family: BTreeMap<Family, Vec<Endpoint>> = BTreeMap::new();
        let lists = [
            ("addresses", subset.addresses.as_ref(), true),
            (
                "notReadyAddresses",
                subset.not_ready_addresses.as_ref(),
                false,
            ),
        ];
        for (list, addresses, ready) in lists {
            for (j, a) in addresses.into_iter().flatten().enumerate() {
                let addr = ip(&format!("{field}.{list}[{j}].ip"), &a.ip)?;
                by_family
                    .entry(Family::of(&addr))
                    .or_default()
                    .push(Endpoint {
                        addr,
                        ready,
                        serving: ready,
                        terminating: false,
                        node_name: a.node_name.clone().filter(|s| !s.is_empty()),
                        zone: None,
                        zone_hints: BTreeSet::new(),
                    });
            }
        }
        for (family, endpoints) in by_family {
            let suffix = match family {
                Family::V4 => "v4",
                Family::V6 => "v6",
            };
            out.push(EndpointSlice {
                key: ObjectKey::new(
                    key.namespace.clone(),
                    format!("{}/subset{i}-{suffix}", key.name),
                ),
                service: key.clone(),
                family,
                ports: ports.clone(),
                endpoints,
                trigger_time: trigger_time(&eps.metadata),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> core::Service {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn field_of(yaml: &str) -> String {
        service(&svc(yaml)).unwrap_err().field
    }

    const BASE: &str = "
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
";

    #[test]
    fn minimal_service() {
        let s = service(&svc(BASE)).unwrap();
        assert_eq!(s.key, ObjectKey::new("shop", "web"));
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].port, 80);
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(s.affinity_timeout_s, None);
        assert!(s.is_load_balanced());
    }

    #[test]
    fn namespace_defaults() {
        let s = service(&svc(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}",
        ))
        .unwrap();
        assert_eq!(s.key.namespace, "default");
    }

    #[test]
    fn affinity_defaults_to_three_hours() {
        let s = service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], sessionAffinity: ClientIP}")).unwrap();
        assert_eq!(s.affinity_timeout_s, Some(10_800));
        let s = service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}}")).unwrap();
        assert_eq!(s.affinity_timeout_s, Some(5));
    }

    /// Each rejection names the field at fault (a module of its own for rstest, as below).
    mod rejections {
        use super::field_of;

        #[rstest::rstest]
        #[case::missing_clusterip(
            "metadata: {name: a}\nspec: {ports: [{port: 1}]}",
            "spec.clusterIP"
        )]
        #[case::bad_clusterip(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.300, ports: [{port: 1}]}",
            "spec.clusterIP"
        )]
        #[case::port_too_big(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 70000}]}",
            "spec.ports[0].port"
        )]
        #[case::port_zero(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 0}]}",
            "spec.ports[0].port"
        )]
        #[case::target_too_big(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1, targetPort: 65536}]}",
            "spec.ports[0].targetPort"
        )]
        #[case::duplicate_port(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{name: a, port: 1}, {name: b, port: 1}]}",
            "spec.ports[1]"
        )]
        #[case::duplicate_name(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{name: a, port: 1}, {name: a, port: 2}]}",
            "spec.ports[1].name"
        )]
        #[case::unnamed_multi_port(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{name: a, port: 1}, {port: 2}]}",
            "spec.ports[1].name"
        )]
        #[case::bad_protocol(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1, protocol: ICMP}]}",
            "spec.ports[0].protocol"
        )]
        #[case::no_ports("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1}", "spec.ports")]
        #[case::no_name(
            "metadata: {}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}",
            "metadata.name"
        )]
        #[case::bad_affinity(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], sessionAffinity: Cookie}",
            "spec.sessionAffinity"
        )]
        #[case::affinity_timeout(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        )]
        #[case::bad_type(
            "metadata: {name: a}\nspec: {type: Magic, clusterIP: 10.0.0.1, ports: [{port: 1}]}",
            "spec.type"
        )]
        #[case::bad_policy(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], internalTrafficPolicy: Nearby}",
            "spec.internalTrafficPolicy"
        )]
        #[case::same_family_dual_stack(
            "metadata: {name: a}\nspec: {clusterIPs: [10.0.0.1, 10.0.0.2], ports: [{port: 1}]}",
            "spec.clusterIPs"
        )]
        #[case::clusterips_disagree(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, clusterIPs: [10.0.0.2], ports: [{port: 1}]}",
            "spec.clusterIPs[0]"
        )]
        #[case::no_spec("metadata: {name: a}", "spec")]
        #[case::source_ranges_not_lb(
            "metadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.0.0.1, ports: [{port: 1, nodePort: 30001}], loadBalancerSourceRanges: [10.0.0.0/8]}",
            "spec.loadBalancerSourceRanges"
        )]
        #[case::source_range_no_prefix(
            "metadata: {name: a}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.1, ports: [{port: 1, nodePort: 30001}], loadBalancerSourceRanges: [10.0.0.0/8, 10.1.0.0]}",
            "spec.loadBalancerSourceRanges[1]"
        )]
        #[case::source_range_too_long(
            "metadata: {name: a}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.1, ports: [{port: 1, nodePort: 30001}], loadBalancerSourceRanges: [10.0.0.0/33]}",
            "spec.loadBalancerSourceRanges[0]"
        )]
        #[case::source_range_garbage(
            "metadata: {name: a}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.1, ports: [{port: 1, nodePort: 30001}], loadBalancerSourceRanges: ['10.0.0.0/8,10.1.0.0/16']}",
            "spec.loadBalancerSourceRanges[0]"
        )]
        fn name_the_field(#[case] yaml: &str, #[case] field: &str) {
            assert_eq!(field_of(yaml), field);
        }
    }

    /// Spaces around an entry are accepted (as the API server does), host bits cleared, both
    /// families kept.
    #[test]
    fn source_ranges_parse_as_the_api_server_accepts_them() {
        let s = service(&svc("metadata: {name: a}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.1, ports: [{port: 1, nodePort: 30001}], loadBalancerSourceRanges: [' 10.0.0.0/8 ', 192.0.2.7/24, '2001:db8::1/32']}")).unwrap();
        let shown: Vec<String> = s.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]);
        assert!(s.source_ranges[1].contains(&"192.0.2.200".parse().unwrap()));
        assert!(!s.source_ranges[1].contains(&"192.0.3.1".parse().unwrap()));
        assert!(!s.source_ranges[0].contains(&"2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn headless_and_external_name_are_not_load_balanced() {
        let headless = service(&svc(
            "metadata: {name: a}\nspec: {clusterIP: None, ports: [{port: 1}]}",
        ))
        .unwrap();
        assert!(!headless.is_load_balanced());
        let ext = service(&svc(
            "metadata: {name: a}\nspec: {type: ExternalName, externalName: example.com}",
        ))
        .unwrap();
        assert!(!ext.is_load_balanced());
    }

    #[test]
    fn dual_stack() {
        let s = service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, clusterIPs: [10.0.0.1, 'fd00::1'], ports: [{port: 1}]}")).unwrap();
        assert_eq!(s.cluster_ips.len(), 2);
    }

    #[test]
    fn named_and_numeric_string_target_ports() {
        let s = service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{name: a, port: 1, targetPort: http}, {name: b, port: 2, targetPort: '8443'}]}")).unwrap();
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(8443));
    }

    #[test]
    fn topology_opt_in() {
        let s = service(&svc("metadata: {name: a, annotations: {service.kubernetes.io/topology-mode: Auto}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}")).unwrap();
        assert_eq!(s.topology, TopologyMode::ZoneHints);
        let s = service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}], trafficDistribution: PreferClose}")).unwrap();
        assert_eq!(s.topology, TopologyMode::ZoneHints);
        assert_eq!(service(&svc(BASE)).unwrap().topology, TopologyMode::None);
    }

    fn slice(yaml: &str) -> Result<Option<EndpointSlice>, FieldError> {
        endpoint_slice(&serde_saphyr::from_str(yaml).unwrap())
    }

    #[test]
    fn slice_conditions_default_as_kube_proxy_reads_them() {
        let s = slice(
            "
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.0.1]
- addresses: [10.1.0.2]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  zone: z1
  hints: {forZones: [{name: z1}]}
",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.service, ObjectKey::new("default", "web"));
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        let e = &s.endpoints[1];
        assert!(!e.ready && e.serving && e.terminating);
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert!(e.zone_hints.contains("z1"));
    }

    /// NodePort and LoadBalancer fields: the node ports and the health check port (a
    /// module of its own for rstest, as below).
    mod node_ports {
        use super::{service, svc};

        #[rstest::rstest]
        #[case::node_port(
            "type: NodePort, ports: [{port: 80, nodePort: 30080}]",
            Ok(())
        )]
        #[case::node_port_without_node_port(
            "type: NodePort, ports: [{port: 80}]",
            Err("spec.ports[0].nodePort")
        )]
        #[case::load_balancer_without_node_port(
            "type: LoadBalancer, ports: [{port: 80}]",
            Err("spec.ports[0].nodePort")
        )]
        #[case::load_balancer_without_node_ports_allocated(
            "type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]",
            Ok(())
        )]
        #[case::node_port_on_a_cluster_ip(
            "ports: [{port: 80, nodePort: 30080}]",
            Err("spec.ports[0].nodePort")
        )]
        #[case::node_port_twice(
            "type: NodePort, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]",
            Err("spec.ports[1].nodePort")
        )]
        #[case::node_port_shared_by_tcp_and_udp(
            "type: NodePort, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 80, protocol: UDP, nodePort: 30080}]",
            Ok(())
        )]
        #[case::health_check_node_port_on_a_node_port(
            "type: NodePort, healthCheckNodePort: 30999, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]",
            Err("spec.healthCheckNodePort")
        )]
        #[case::health_check_node_port_on_a_load_balancer(
            "type: LoadBalancer, healthCheckNodePort: 30999, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]",
            Ok(())
        )]
        fn rules(#[case] spec: &str, #[case] want: Result<(), &str>) {
            let yaml = format!("metadata: {{name: a}}\nspec: {{clusterIP: 10.0.0.1, {spec}}}");
            let got = service(&svc(&yaml)).map(drop).map_err(|e| e.field);
            assert_eq!(got, want.map_err(str::to_owned));
        }
    }

    #[test]
    fn node_port_ranges_parse() {
        assert_eq!(
            "30000-32767".parse::<NodePortRange>(),
            Ok(NodePortRange::default())
        );
        assert!("80-90".parse::<NodePortRange>().unwrap().contains(85));
        for bad in ["", "30000", "0-10", "20-10", "1-70000", "a-b"] {
            assert!(bad.parse::<NodePortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slice_rejections() {
        let no_label = slice("metadata: {name: x}\naddressType: IPv4\nendpoints: []").unwrap_err();
        assert_eq!(
            no_label.field,
            "metadata.labels[kubernetes.io/service-name]"
        );
        let wrong_family = slice("metadata: {name: x, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]").unwrap_err();
        assert_eq!(wrong_family.field, "endpoints[0].addresses[0]");
        let bad_port = slice("metadata: {name: x, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{port: 99999}]\nendpoints: []").unwrap_err();
        assert_eq!(bad_port.field, "ports[0].port");
        let duplicate = slice("metadata: {name: x, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{name: http, port: 80}, {name: http, port: 81}]\nendpoints: []").unwrap_err();
        assert_eq!(duplicate.field, "ports[1].name");
        assert!(slice("metadata: {name: x, labels: {kubernetes.io/service-name: a}}\naddressType: FQDN\nendpoints: [{addresses: [example.com]}]").unwrap().is_none());
    }

    #[test]
    fn endpoints_become_slices_per_subset_and_family() {
        let eps: core::Endpoints = serde_saphyr::from_str(
            "
metadata: {name: ext}
subsets:
- addresses: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]
  notReadyAddresses: [{ip: 10.0.0.2}]
  ports: [{port: 80}]
",
        )
        .unwrap();
        let slices = endpoints(&eps).unwrap();
        assert_eq!(slices.len(), 2);
        let v4 = slices.iter().find(|s| s.family == Family::V4).unwrap();
        assert_eq!(v4.service, ObjectKey::new("default", "ext"));
        assert_eq!(v4.endpoints.len(), 2);
        assert!(v4.endpoints[0].ready);
        assert!(!v4.endpoints[1].ready && !v4.endpoints[1].serving);
        assert_eq!(v4.ports[0].port, 80);
    }

    /// The trigger-time annotation, on slices and on v1 Endpoints (a module of its own for
    /// rstest, as below).
    mod trigger_times {
        use std::time::{Duration, SystemTime};

        use super::{endpoints, slice};

        #[rstest::rstest]
        #[case::absent("", None)]
        #[case::utc(
            "annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-01-02T03:04:05Z'}",
            Some(1_767_323_045_000)
        )]
        #[case::nanoseconds_and_offset(
            "annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-01-02T04:04:05.250000000+01:00'}",
            Some(1_767_323_045_250)
        )]
        #[case::unreadable_is_ignored(
            "annotations: {endpoints.kubernetes.io/last-change-trigger-time: yesterday}",
            None
        )]
        fn read_from_slices_and_endpoints(#[case] meta: &str, #[case] unix_ms: Option<u64>) {
            let want = unix_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
            let s = slice(&format!(
                "metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}, {meta}}}\naddressType: IPv4\nendpoints: []"
            ))
            .unwrap()
            .unwrap();
            assert_eq!(s.trigger_time, want);
            let eps = serde_saphyr::from_str(&format!(
                "metadata: {{name: web, {meta}}}\nsubsets: [{{addresses: [{{ip: 10.0.0.1}}], ports: [{{port: 80}}]}}]"
            ))
            .unwrap();
            assert_eq!(endpoints(&eps).unwrap()[0].trigger_time, want);
        }
    }

    /// Table tests of the IP-family rules (a module of their own: rstest's expansion needs
    /// the `core` crate, which the `core` alias of k8s' core/v1 shadows above).
    mod ip_families {
        use super::{service, svc};

        /// A Service with these spec lines added to a ClusterIP Service's.
        fn with_spec(lines: &str) -> k8s_openapi::api::core::v1::Service {
            svc(&format!(
                "metadata: {{name: a}}\nspec:\n  ports: [{{port: 1}}]\n{}",
                lines
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            ))
        }

        #[rstest::rstest]
        #[case::v6_address_v4_family("clusterIP: fd00::1\nipFamilies: [IPv4]", "spec.clusterIP")]
        #[case::v4_address_v6_family("clusterIP: 10.0.0.1\nipFamilies: [IPv6]", "spec.clusterIP")]
        #[case::v6_in_cluster_ips_v4_family(
            "clusterIPs: ['fd00::1']\nipFamilies: [IPv4]",
            "spec.clusterIPs[0]"
        )]
        #[case::second_address_wrong_family(
            "clusterIPs: [10.0.0.1, fd00::1]\nipFamilies: [IPv4, IPv4]",
            "spec.ipFamilies[1]"
        )]
        #[case::families_swapped(
            "clusterIPs: [10.0.0.1, fd00::1]\nipFamilies: [IPv6, IPv4]\nipFamilyPolicy: PreferDualStack",
            "spec.clusterIPs[0]"
        )]
        #[case::unknown_family("clusterIP: 10.0.0.1\nipFamilies: [IPv5]", "spec.ipFamilies[0]")]
        #[case::three_families(
            "clusterIP: 10.0.0.1\nipFamilies: [IPv4, IPv6, IPv4]",
            "spec.ipFamilies"
        )]
        #[case::unknown_policy(
            "clusterIP: 10.0.0.1\nipFamilyPolicy: DualStack",
            "spec.ipFamilyPolicy"
        )]
        #[case::single_stack_two_addresses(
            "clusterIPs: [10.0.0.1, fd00::1]\nipFamilyPolicy: SingleStack",
            "spec.ipFamilyPolicy"
        )]
        #[case::single_stack_two_families(
            "clusterIP: 10.0.0.1\nipFamilies: [IPv4, IPv6]\nipFamilyPolicy: SingleStack",
            "spec.ipFamilyPolicy"
        )]
        #[case::require_dual_stack_one_address(
            "clusterIP: 10.0.0.1\nipFamilyPolicy: RequireDualStack",
            "spec.clusterIPs"
        )]
        #[case::cluster_ip_differs_from_cluster_ips(
            "clusterIP: 10.0.0.2\nclusterIPs: [10.0.0.1]",
            "spec.clusterIPs[0]"
        )]
        #[case::none_with_a_second_address("clusterIPs: [None, 10.0.0.1]", "spec.clusterIPs[1]")]
        #[case::two_v4_addresses("clusterIPs: [10.0.0.1, 10.0.0.2]", "spec.clusterIPs")]
        fn ip_family_rules(#[case] spec: &str, #[case] field: &str) {
            let e = service(&with_spec(spec)).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }

        #[rstest::rstest]
        #[case::v4_with_family(
            "clusterIP: 10.0.0.1\nipFamilies: [IPv4]\nipFamilyPolicy: SingleStack"
        )]
        #[case::v6_with_family("clusterIP: fd00::1\nipFamilies: [IPv6]")]
        #[case::dual_stack(
            "clusterIPs: [fd00::1, 10.0.0.1]\nipFamilies: [IPv6, IPv4]\nipFamilyPolicy: RequireDualStack"
        )]
        #[case::prefer_dual_stack_one_address(
            "clusterIP: 10.0.0.1\nipFamilies: [IPv4, IPv6]\nipFamilyPolicy: PreferDualStack"
        )]
        #[case::headless_dual_stack(
            "clusterIP: None\nipFamilies: [IPv4, IPv6]\nipFamilyPolicy: RequireDualStack"
        )]
        fn ip_family_rules_accept(#[case] spec: &str) {
            if let Err(e) = service(&with_spec(spec)) {
                panic!("{spec}: {e}");
            }
        }

        #[rstest::rstest]
        #[case::cluster_ip("clusterIP: 10.0.0.1", "spec.clusterIP")]
        #[case::families("ipFamilies: [IPv4]", "spec.ipFamilies")]
        #[case::policy("ipFamilyPolicy: SingleStack", "spec.ipFamilyPolicy")]
        fn external_name_has_no_addresses(#[case] spec: &str, #[case] field: &str) {
            let e = service(&svc(&format!(
                "metadata: {{name: a}}\nspec: {{type: ExternalName, externalName: example.com, {}}}",
                spec.replace('\n', ", ")
            )))
            .unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }
}
