//! Which endpoints a Service port uses on this node: kube-proxy's `CategorizeEndpoints`
//! (pkg/proxy/topology.go), as a pure function.
//!
//! - Cluster policy: ready endpoints (narrowed to this zone's hints when topology applies);
//!   if there are none, serving-and-terminating endpoints.
//! - Local policy: this node's ready endpoints; if none, this node's serving-and-terminating
//!   ones; never an endpoint elsewhere.

use crate::model::{Endpoint, Node, TopologyMode};

/// The endpoints a Service port may use, split by traffic policy. `E` is whatever the caller
/// carries per endpoint (an `&Endpoint`, or one with its resolved port).
#[derive(Debug, PartialEq, Eq)]
pub struct Categorized<E> {
    /// For `Cluster` traffic policy (empty if no policy of the Service is `Cluster`).
    pub cluster: Vec<E>,
    /// For `Local` traffic policy (empty if no policy of the Service is `Local`).
    pub local: Vec<E>,
    /// Whether any usable endpoint exists anywhere in the cluster.
    pub has_any: bool,
}

/// What the Service asks for.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Some traffic uses cluster-wide endpoints.
    pub uses_cluster: bool,
    /// Some traffic uses only this node's endpoints.
    pub uses_local: bool,
    pub topology: TopologyMode,
}

fn is_local(ep: &Endpoint, node: &Node) -> bool {
    !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str())
}

fn serving_terminating(ep: &Endpoint) -> bool {
    ep.serving && ep.terminating
}

/// kube-proxy's canUseTopology: zone hints apply only if the node has a zone, every ready
/// endpoint carries hints, and at least one is hinted for this zone.
fn can_use_topology<E: AsRef<Endpoint>>(
    endpoints: &[E],
    topology: TopologyMode,
    node: &Node,
) -> bool {
    if topology != TopologyMode::ZoneHints {
        return false;
    }
    let Some(zone) = node.zone.as_deref().filter(|z| !z.is_empty()) else {
        return false;
    };
    let mut for_zone = false;
    for ep in endpoints.iter().map(AsRef::as_ref).filter(|ep| ep.ready) {
        if ep.zone_hints.is_empty() {
            return false;
        }
        for_zone |= ep.zone_hints.contains(zone);
    }
    for_zone
}

/// Splits `endpoints` as kube-proxy does for one Service port on `node`.
pub fn categorize<E: AsRef<Endpoint> + Copy>(
    endpoints: &[E],
    policy: Policy,
    node: &Node,
) -> Categorized<E> {
    let select = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<E> {
        endpoints
            .iter()
            .copied()
            .filter(|e| keep(e.as_ref()))
            .collect()
    };
    let mut out = Categorized {
        cluster: Vec::new(),
        local: Vec::new(),
        has_any: false,
    };
    if policy.uses_cluster {
        let zone = can_use_topology(endpoints, policy.topology, node)
            .then_some(node.zone.as_deref())
            .flatten();
        out.cluster = select(&|ep| ep.ready && zone.is_none_or(|z| ep.zone_hints.contains(z)));
        if out.cluster.is_empty() {
            out.cluster = select(&serving_terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !policy.uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints.iter().map(AsRef::as_ref) {
        if ep.ready {
            out.has_any = true;
            local_ready |= is_local(ep, node);
        } else if serving_terminating(ep) {
            out.has_any = true;
            local_serving_terminating |= is_local(ep, node);
        }
    }
    if local_ready {
        out.local = select(&|ep| is_local(ep, node) && ep.ready);
    } else if local_serving_terminating {
        out.local = select(&|ep| is_local(ep, node) && serving_terminating(ep));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    /// An endpoint `10.0.0.<n>` with conditions (ready, serving, terminating), node and hints.
    fn ep(
        n: u8,
        (ready, serving, terminating): (bool, bool, bool),
        node: &str,
        hints: &[&str],
    ) -> Endpoint {
        Endpoint {
            addr: IpAddr::from([10, 0, 0, n]),
            ready,
            serving,
            terminating,
            node_name: (!node.is_empty()).then(|| node.to_owned()),
            zone: None,
            zone_hints: hints.iter().map(|&h| h.to_owned()).collect(),
        }
    }

    const READY: (bool, bool, bool) = (true, true, false);
    const TERMINATING: (bool, bool, bool) = (false, true, true);
    const NOT_SERVING: (bool, bool, bool) = (false, false, true);
    const NOT_READY: (bool, bool, bool) = (false, false, false);

    fn ids(eps: &[&Endpoint]) -> Vec<u8> {
        eps.iter()
            .map(|e| match e.addr {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    struct Case {
        name: &'static str,
        endpoints: Vec<Endpoint>,
        policy: Policy,
        node_zone: Option<&'static str>,
        cluster: Vec<u8>,
        local: Vec<u8>,
        has_any: bool,
    }

    const CLUSTER: Policy = Policy {
        uses_cluster: true,
        uses_local: false,
        topology: TopologyMode::None,
    };
    const LOCAL: Policy = Policy {
        uses_cluster: false,
        uses_local: true,
        topology: TopologyMode::None,
    };
    const HINTS: Policy = Policy {
        uses_cluster: true,
        uses_local: false,
        topology: TopologyMode::ZoneHints,
    };

    #[test]
    fn table() {
        let cases = vec![
            Case {
                name: "cluster: ready endpoints only",
                endpoints: vec![
                    ep(1, READY, "n1", &[]),
                    ep(2, NOT_READY, "n1", &[]),
                    ep(3, TERMINATING, "n2", &[]),
                ],
                policy: CLUSTER,
                node_zone: None,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "cluster: no ready, fall back to serving-terminating",
                endpoints: vec![
                    ep(1, NOT_READY, "n1", &[]),
                    ep(2, TERMINATING, "n2", &[]),
                    ep(3, NOT_SERVING, "n1", &[]),
                ],
                policy: CLUSTER,
                node_zone: None,
                cluster: vec![2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "cluster: nothing usable",
                endpoints: vec![ep(1, NOT_READY, "n1", &[]), ep(2, NOT_SERVING, "n1", &[])],
                policy: CLUSTER,
                node_zone: None,
                cluster: vec![],
                local: vec![],
                has_any: false,
            },
            Case {
                name: "local: only this node's ready endpoints",
                endpoints: vec![
                    ep(1, READY, "n1", &[]),
                    ep(2, READY, "n2", &[]),
                    ep(3, TERMINATING, "n1", &[]),
                ],
                policy: LOCAL,
                node_zone: None,
                cluster: vec![],
                local: vec![1],
                has_any: true,
            },
            Case {
                name: "local: no local ready, local serving-terminating",
                endpoints: vec![ep(1, TERMINATING, "n1", &[]), ep(2, READY, "n2", &[])],
                policy: LOCAL,
                node_zone: None,
                cluster: vec![],
                local: vec![1],
                has_any: true,
            },
            Case {
                name: "local: none here, never a hop elsewhere",
                endpoints: vec![ep(2, READY, "n2", &[]), ep(3, READY, "", &[])],
                policy: LOCAL,
                node_zone: None,
                cluster: vec![],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "both policies",
                endpoints: vec![ep(1, READY, "n1", &[]), ep(2, READY, "n2", &[])],
                policy: Policy {
                    uses_cluster: true,
                    uses_local: true,
                    topology: TopologyMode::None,
                },
                node_zone: None,
                cluster: vec![1, 2],
                local: vec![1],
                has_any: true,
            },
            Case {
                name: "hints: same zone preferred",
                endpoints: vec![
                    ep(1, READY, "n1", &["a"]),
                    ep(2, READY, "n2", &["b"]),
                    ep(3, READY, "n3", &["a"]),
                ],
                policy: HINTS,
                node_zone: Some("a"),
                cluster: vec![1, 3],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "hints: one ready endpoint without hints disables them",
                endpoints: vec![ep(1, READY, "n1", &["a"]), ep(2, READY, "n2", &[])],
                policy: HINTS,
                node_zone: Some("a"),
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "hints: none for this zone disables them",
                endpoints: vec![ep(1, READY, "n1", &["b"]), ep(2, READY, "n2", &["c"])],
                policy: HINTS,
                node_zone: Some("a"),
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "hints: node without a zone ignores them",
                endpoints: vec![ep(1, READY, "n1", &["a"]), ep(2, READY, "n2", &["b"])],
                policy: HINTS,
                node_zone: None,
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "hints: not opted in",
                endpoints: vec![ep(1, READY, "n1", &["a"]), ep(2, READY, "n2", &["b"])],
                policy: CLUSTER,
                node_zone: Some("a"),
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
        ];
        for case in cases {
            let node = Node {
                name: "n1".into(),
                zone: case.node_zone.map(str::to_owned),
                ips: Vec::new(),
            };
            let refs: Vec<&Endpoint> = case.endpoints.iter().collect();
            let got = categorize(&refs, case.policy, &node);
            assert_eq!(ids(&got.cluster), case.cluster, "{}: cluster", case.name);
            assert_eq!(ids(&got.local), case.local, "{}: local", case.name);
            assert_eq!(got.has_any, case.has_any, "{}: has_any", case.name);
        }
    }

    #[test]
    fn unnamed_node_has_no_local_endpoints() {
        let e = ep(1, READY, "", &[]);
        let got = categorize(&[&e], LOCAL, &Node::default());
        assert!(got.local.is_empty());
    }
}
