//! How the north-south datapath picks a backend for a new flow from outside the node:
//! `--lb-algorithm maglev` on two nodes (the same flow reaches the same backend through
//! either node, and a removed backend moves few other flows).
//!
//! ```text
//! node-a (10.250.2.2, a0) ---- veth ---- (b0, 10.250.2.3) node-b
//!   backends 10.202.0.11-13               backends 10.201.0.11-13
//! ```
//!
//! The flows are crafted frames run through each agent's XDP program with
//! `BPF_PROG_TEST_RUN` inside that node's namespace (so its FIB lookups see the node's
//! routes); the backend is the translated frame's destination.

use std::collections::BTreeMap;

use lb_tests::{
    Node, TempDir,
    xdp::{
        NsAgent, ProgFd, TCP, XDP_DROP, XDP_PASS, XDP_REDIRECT, in_netns, ipv4_destination,
        ipv4_frame, sysctl, test_run_timed,
    },
};

const NODE_A: &str = "10.250.2.2";
const NODE_B: &str = "10.250.2.3";

/// Two nodes joined by a veth pair; each routes the other's pod range through it.
struct TwoNodes {
    a: Node,
    b: Node,
}

impl TwoNodes {
    fn new() -> Self {
        let a = Node::new();
        let b = Node::new();
        a.client.ip(&[
            "link",
            "add",
            "a0",
            "type",
            "veth",
            "peer",
            "name",
            "b0",
            "netns",
            &b.client.name,
        ]);
        for (node, dev, addr, far, via) in [
            (&a, "a0", NODE_A, "10.201.0.0/24", NODE_B),
            (&b, "b0", NODE_B, "10.202.0.0/24", NODE_A),
        ] {
            node.client
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
            node.client.ip(&["link", "set", dev, "up"]);
            node.client.ip(&["route", "add", far, "via", via]);
            sysctl(&node.client, &["net.ipv4.ip_forward=1"]);
        }
        Self { a, b }
    }

    /// `lb run --lb-algorithm maglev` on both nodes, from the manifests in `dir`.
    fn agents(&self, dir: &TempDir, extra: &[&str]) -> (NsAgent, NsAgent) {
        let start = |node: &Node, name: &str, iface: &str, ip: &str| {
            let mut args = vec!["--node-name", name, "--xdp-iface", iface, "--node-ip", ip];
            args.extend_from_slice(extra);
            NsAgent::start(&node.client, &node.cgroup.path, &dir.0, &args)
        };
        (
            start(&self.a, "node-a", "a0", NODE_A),
            start(&self.b, "node-b", "b0", NODE_B),
        )
    }
}

/// A NodePort Service (eTP Cluster) with three endpoints on each node, minus `without`.
fn spread_service(without: &[&str]) -> String {
    let mut out = String::from(
        "apiVersion: v1
kind: Service
metadata: {name: spread}
spec:
  type: NodePort
  clusterIP: 10.96.70.1
  ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: spread-1, labels: {kubernetes.io/service-name: spread}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints:
",
    );
    for (node, range) in [("node-a", "10.202.0"), ("node-b", "10.201.0")] {
        for host in 11..=13 {
            let addr = format!("{range}.{host}");
            if !without.contains(&addr.as_str()) {
                out.push_str(&format!("- {{addresses: [{addr}], nodeName: {node}}}\n"));
            }
        }
    }
    out
}

/// The backend ("ADDR:PORT") each of `flows` (client, source port) reaches through the
/// program `xdp` of the node in `ns` at `node_ip:30100`.
fn backends_of(
    node: &Node,
    xdp: &ProgFd,
    node_ip: &str,
    flows: &[(String, u16)],
) -> Vec<(u32, String)> {
    timed_backends_of(node, xdp, node_ip, flows).0
}

/// [`backends_of`], and the mean run time of the program per flow (ns, as the kernel
/// measures one test run).
fn timed_backends_of(
    node: &Node,
    xdp: &ProgFd,
    node_ip: &str,
    flows: &[(String, u16)],
) -> (Vec<(u32, String)>, u64) {
    let frames: Vec<Vec<u8>> = flows
        .iter()
        .map(|(client, sport)| ipv4_frame(client, *sport, node_ip, 30100, TCP))
        .collect();
    let prog = xdp.0;
    in_netns(&node.client, move || {
        // Borrow the descriptor on this thread without taking ownership of it.
        let prog = std::mem::ManuallyDrop::new(ProgFd(prog));
        let mut total = 0u64;
        let picked = frames
            .iter()
            .map(|frame| {
                let (verdict, out, ns) = test_run_timed(&prog, frame);
                total += u64::from(ns);
                (verdict, ipv4_destination(&out))
            })
            .collect::<Vec<_>>();
        let mean = total / (picked.len().max(1) as u64);
        (picked, mean)
    })
}

/// Flows from five clients, `n` source ports from `first`.
fn flows(first: u16, n: u16) -> Vec<(String, u16)> {
    (0..n)
        .map(|i| (format!("192.0.2.{}", 1 + i % 5), first + i))
        .collect()
}

const ALL: [&str; 6] = [
    "10.202.0.11:8080",
    "10.202.0.12:8080",
    "10.202.0.13:8080",
    "10.201.0.11:8080",
    "10.201.0.12:8080",
    "10.201.0.13:8080",
];

#[test]
fn maglev_sends_a_flow_to_the_same_backend_through_either_node() {
    let nodes = TwoNodes::new();
    let dir = TempDir::new("mg");
    dir.write("spread.yaml", &spread_service(&[]));
    let (a, b) = nodes.agents(&dir, &["--lb-algorithm", "maglev"]);
    a.wait_for(&["10.250.2.2:30100/TCP"], &ALL);
    b.wait_for(&["10.250.2.3:30100/TCP"], &ALL);
    let (xdp_a, xdp_b) = (a.prog("xdp@a0"), b.prog("xdp@b0"));
    let flows = flows(40_000, 120);
    let via_a = backends_of(&nodes.a, &xdp_a, NODE_A, &flows);
    let via_b = backends_of(&nodes.b, &xdp_b, NODE_B, &flows);
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for ((flow, (va, ba)), (vb, bb)) in flows.iter().zip(&via_a).zip(&via_b) {
        for (node, verdict, backend) in [("a", va, ba), ("b", vb, bb)] {
            assert!(
                [XDP_PASS, XDP_REDIRECT].contains(verdict) && ALL.contains(&backend.as_str()),
                "{flow:?} via node-{node}: verdict {verdict}, to {backend}\n{}",
                a.lb(&["stats"])
            );
        }
        assert_eq!(
            ba, bb,
            "{flow:?}: node-a and node-b picked different backends"
        );
        *spread.entry(ba.as_str()).or_default() += 1;
    }
    // 120 flows over six backends: every backend gets some (each has 1/6 of the table).
    assert_eq!(spread.len(), 6, "{spread:?}");
    for node in [&a, &b] {
        assert_eq!(node.stat("xdp_maglev"), 120);
        assert_eq!(node.stat("xdp_maglev_miss"), 0);
    }
}

/// The control: with the default random choice the nodes agree on about one flow in six, so
/// the test above measures Maglev, not a property of the topology.
#[test]
fn random_choice_differs_between_nodes() {
    let nodes = TwoNodes::new();
    let dir = TempDir::new("mg");
    dir.write("spread.yaml", &spread_service(&[]));
    let (a, b) = nodes.agents(&dir, &[]);
    a.wait_for(&["10.250.2.2:30100/TCP"], &ALL);
    b.wait_for(&["10.250.2.3:30100/TCP"], &ALL);
    let flows = flows(42_000, 120);
    let via_a = backends_of(&nodes.a, &a.prog("xdp@a0"), NODE_A, &flows);
    let via_b = backends_of(&nodes.b, &b.prog("xdp@b0"), NODE_B, &flows);
    let same = via_a.iter().zip(&via_b).filter(|(x, y)| x.1 == y.1).count();
    assert!(same < 60, "{same} of 120 flows agree by chance");
    assert_eq!(a.stat("xdp_maglev"), 0);
}

#[test]
fn maglev_moves_few_flows_when_a_backend_goes() {
    let nodes = TwoNodes::new();
    let dir = TempDir::new("mg");
    dir.write("spread.yaml", &spread_service(&[]));
    let (a, b) = nodes.agents(&dir, &["--lb-algorithm", "maglev"]);
    a.wait_for(&["10.250.2.2:30100/TCP"], &ALL);
    b.wait_for(&["10.250.2.3:30100/TCP"], &ALL);
    let (xdp_a, xdp_b) = (a.prog("xdp@a0"), b.prog("xdp@b0"));
    // Node-b's table with all six backends.
    let flows = flows(41_000, 300);
    let before = backends_of(&nodes.b, &xdp_b, NODE_B, &flows);
    // 10.201.0.12 leaves the Service.
    let gone = "10.201.0.12:8080";
    dir.write("spread.yaml", &spread_service(&["10.201.0.12"]));
    for node in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while node.lb(&["list"]).contains(gone) {
            assert!(std::time::Instant::now() < deadline, "{gone} still listed");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // The same flows as new ones on node-a (never seen there), with five backends.
    let after = backends_of(&nodes.a, &xdp_a, NODE_A, &flows);
    let (mut stayed, mut moved, mut of_gone) = (0, 0, 0);
    for ((flow, (_, was)), (verdict, now)) in flows.iter().zip(&before).zip(&after) {
        assert!(
            [XDP_PASS, XDP_REDIRECT].contains(verdict) && ALL.contains(&now.as_str()),
            "{flow:?}: verdict {verdict}, to {now}"
        );
        assert_ne!(now, gone, "{flow:?}: a new flow to the removed backend");
        if was == gone {
            of_gone += 1;
        } else if was == now {
            stayed += 1;
        } else {
            moved += 1;
        }
    }
    // Maglev: the flows of the removed backend spread over the others; of the rest only a
    // few percent move (2% of the positions of the staying backends in the unit tests).
    assert!(of_gone > 0);
    assert!(
        moved * 100 <= (stayed + moved) * 5,
        "{moved} of {} flows of staying backends moved",
        stayed + moved
    );
    // On node-b, the tracked flows of the removed backend end (dropped: never another pod);
    // the others keep their backend.
    let again = backends_of(&nodes.b, &xdp_b, NODE_B, &flows);
    for ((flow, (_, was)), (verdict, now)) in flows.iter().zip(&before).zip(&again) {
        if was == gone {
            assert_eq!(
                *verdict, XDP_DROP,
                "{flow:?}: a flow of the removed backend"
            );
        } else {
            assert_eq!(now, was, "{flow:?}: an established flow moved");
        }
    }
    eprintln!(
        "{} flows: {of_gone} were on the removed backend, {stayed} kept theirs, {moved} moved",
        flows.len()
    );
}

/// A NodePort Service with ClientIP affinity (eTP Local) and its endpoints on node-a, minus
/// `without`.
fn sticky_service(pods: &[(&str, &str)], timeout_s: u32) -> String {
    let mut out = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: sticky}}
spec:
  type: NodePort
  clusterIP: 10.96.80.1
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_s}}}}}
  ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30110}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky-1, labels: {{kubernetes.io/service-name: sticky}}}}
addressType: IPv4
ports: [{{name: tcp, port: 8080}}]
endpoints:
"
    );
    for (_, addr) in pods {
        out.push_str(&format!("- {{addresses: [{addr}], nodeName: node-a}}\n"));
    }
    out
}

/// What a new flow costs the XDP program with Maglev and with random choice: reported, not
/// asserted (`cargo test ... -- --nocapture` prints it). Node-a runs maglev, node-b random,
/// each with three local endpoints (eTP Local: DNAT and pass, no SNAT or FIB lookup, so the
/// difference is the choice); rounds of fresh flows alternate between them.
#[test]
fn new_flow_cost_with_maglev_and_random() {
    let nodes = TwoNodes::new();
    let dir = TempDir::new("mg");
    dir.write(
        "spread.yaml",
        &spread_service(&[]).replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        ),
    );
    let a = NsAgent::start(
        &nodes.a.client,
        &nodes.a.cgroup.path,
        &dir.0,
        &[
            "--node-name",
            "node-a",
            "--xdp-iface",
            "a0",
            "--node-ip",
            NODE_A,
            "--lb-algorithm",
            "maglev",
        ],
    );
    let b = NsAgent::start(
        &nodes.b.client,
        &nodes.b.cgroup.path,
        &dir.0,
        &[
            "--node-name",
            "node-b",
            "--xdp-iface",
            "b0",
            "--node-ip",
            NODE_B,
        ],
    );
    a.wait_for(&["10.250.2.2:30100/TCP"], &ALL[..3]);
    b.wait_for(&["10.250.2.3:30100/TCP"], &ALL[3..]);
    let (xdp_a, xdp_b) = (a.prog("xdp@a0"), b.prog("xdp@b0"));
    let (mut maglev, mut random) = (Vec::new(), Vec::new());
    for round in 0..8u16 {
        let flows = flows(20_000 + round * 500, 500);
        let (picked, ns) = timed_backends_of(&nodes.a, &xdp_a, NODE_A, &flows);
        assert!(picked.iter().all(|(v, _)| *v == XDP_PASS), "{picked:?}");
        maglev.push(ns);
        let (picked, ns) = timed_backends_of(&nodes.b, &xdp_b, NODE_B, &flows);
        assert!(picked.iter().all(|(v, _)| *v == XDP_PASS), "{picked:?}");
        random.push(ns);
    }
    assert_eq!(a.stat("xdp_maglev"), 4_000);
    maglev.sort_unstable();
    random.sort_unstable();
    eprintln!(
        "new flow, local backend (test-run, 8 rounds of 500 fresh flows, ns): maglev median {} \
         [{}-{}], random median {} [{}-{}]",
        maglev[4], maglev[0], maglev[7], random[4], random[0], random[7]
    );
}

/// ClientIP affinity from outside: real TCP connections from an external client namespace
/// (each from a new source port) to a NodePort, with Maglev on (which alone would spread
/// them by source port).
#[test]
fn client_ip_affinity_keeps_an_external_client_on_one_pod() {
    let mut node = Node::new();
    let ext = lb_tests::Netns::new(lb_tests::unique("af"));
    ext.ip(&[
        "link",
        "add",
        "e0",
        "type",
        "veth",
        "peer",
        "name",
        "x0",
        "netns",
        &node.client.name,
    ]);
    ext.ip(&["addr", "add", "10.250.3.2/24", "dev", "e0"]);
    ext.ip(&["link", "set", "e0", "up"]);
    node.client
        .ip(&["addr", "add", "10.250.3.1/24", "dev", "x0"]);
    node.client.ip(&["link", "set", "x0", "up"]);
    sysctl(&node.client, &["net.ipv4.ip_forward=1"]);
    let mut pods = Vec::new();
    for (n, name) in [(1u8, "pod1"), (2, "pod2"), (3, "pod3")] {
        let pod = node.add_pod(n, name, &[8080], &[]);
        pod.netns
            .ip(&["route", "add", "default", "via", lb_tests::CLIENT_IP4]);
        pods.push((name, pod.ip4.to_string()));
    }
    let pods: Vec<(&str, &str)> = pods.iter().map(|(n, a)| (*n, a.as_str())).collect();
    let timeout_s = 2;
    let dir = TempDir::new("af");
    dir.write("sticky.yaml", &sticky_service(&pods, timeout_s));
    let agent = NsAgent::start(
        &node.client,
        &node.cgroup.path,
        &dir.0,
        &[
            "--node-name",
            "node-a",
            "--xdp-iface",
            "x0",
            "--node-ip",
            "10.250.3.1",
            "--lb-algorithm",
            "maglev",
        ],
    );
    agent.wait_for(&["10.250.3.1:30110/TCP"], &["10.200.0.13:8080"]);
    let connect = |n: usize| {
        let count = n.to_string();
        let outcomes = lb_tests::run_client(
            None,
            &ext.path(),
            &["tcp", "10.250.3.1:30110", "--count", &count],
        );
        let got = lb_tests::backends(&outcomes);
        assert_eq!(got.len(), n, "{outcomes:?}");
        got
    };
    // Eight connections, eight source ports: one pod (by chance with three pods: 3^-7).
    let first = connect(8);
    assert!(
        first.iter().all(|p| *p == first[0]),
        "affinity: {first:?}\n{}",
        agent.lb(&["stats"])
    );
    assert_eq!(
        (
            agent.stat("xdp_affinity_new"),
            agent.stat("xdp_affinity_hit")
        ),
        (1, 7)
    );
    // Its pod leaves the Service: the client moves to another one, and stays there.
    let stuck = first[0].clone();
    let rest: Vec<(&str, &str)> = pods.iter().copied().filter(|(n, _)| *n != stuck).collect();
    let gone = pods
        .iter()
        .find(|(n, _)| *n == stuck)
        .map(|(_, a)| *a)
        .unwrap();
    dir.write("sticky.yaml", &sticky_service(&rest, timeout_s));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while agent.lb(&["list"]).contains(&format!("{gone}:8080")) {
        assert!(std::time::Instant::now() < deadline, "{gone} still listed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let moved = connect(6);
    assert!(
        moved.iter().all(|p| *p == moved[0] && *p != stuck),
        "after {stuck} left: {moved:?}"
    );
    assert_eq!(agent.stat("xdp_affinity_new"), 2);
    // Idle past the timeout: the next connection chooses afresh (and records it).
    std::thread::sleep(std::time::Duration::from_millis(
        u64::from(timeout_s) * 1000 + 500,
    ));
    connect(1);
    assert_eq!(agent.stat("xdp_affinity_new"), 3);
    assert_eq!(agent.stat("xdp_affinity_hit"), 7 + 5);
}
