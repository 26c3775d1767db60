//! NodePort, LoadBalancer ingress IPs and externalIPs reached from the node itself (a client
//! pod in lb's cgroup): the socket programs send them to a backend as they do a ClusterIP,
//! with kube-proxy's endpoint rules (internalTrafficPolicy applies to the ClusterIP only;
//! node-originated traffic to an external address uses the cluster's endpoints even under
//! externalTrafficPolicy: Local).

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{Agent, Node, TempDir, backends};

/// A LoadBalancer Service on 80 (nodePort 30080, externalIP 198.51.100.7, ingress
/// 203.0.113.9), TCP and UDP, eTP and iTP Local; pod1 on this node (node-a), pod2 on node-b.
fn shop(pod1: &str, pod2: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.1
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports:
  - {{name: web, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, port: 53, targetPort: 8080, protocol: UDP, nodePort: 30053}}
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.9}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: shop-1, labels: {{kubernetes.io/service-name: shop}}}}
addressType: IPv4
ports: [{{name: web, port: 8080}}, {{name: dns, port: 8080, protocol: UDP}}]
endpoints:
- {{addresses: ['{pod1}'], nodeName: node-a}}
- {{addresses: ['{pod2}'], nodeName: node-b}}
"
    )
}

fn seen(node: &Node, args: &[&str]) -> BTreeSet<String> {
    backends(&node.client(args)).into_iter().collect()
}

#[test]
fn node_ports_load_balancer_and_external_ips_from_the_node() {
    let mut node = Node::new();
    node.add_pod(1, "pod1", &[8080], &[8080]);
    node.add_pod(2, "pod2", &[8080], &[8080]);
    let dir = TempDir::new("m");
    dir.write(
        "shop.yaml",
        &shop(&node.pods[0].ip4.to_string(), &node.pods[1].ip4.to_string()),
    );
    // 192.0.2.10 stands for the node's address (TEST-NET-1: never routed; the client
    // namespace has no route, so only a translated connect succeeds).
    let agent = Agent::start_manifests_with(
        &node.cgroup.path,
        &dir.0,
        &["--node-ip", "192.0.2.10"],
        Duration::from_secs(20),
    );
    // lb list names each frontend's kind and the Service's policies.
    let out = agent.lb(&["list", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("lb list json");
    let kinds: BTreeSet<&str> = rows.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ClusterIP", "NodePort", "externalIP", "LoadBalancer"]),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| r["policy"] == "iTP=Local,eTP=Local"),
        "{rows:?}"
    );
    let both = BTreeSet::from(["pod1".to_owned(), "pod2".to_owned()]);
    for addr in ["192.0.2.10:30080", "198.51.100.7:80", "203.0.113.9:80"] {
        let out = node.client(&["tcp", addr, "--count", "30"]);
        assert_eq!(
            backends(&out).into_iter().collect::<BTreeSet<_>>(),
            both,
            "{addr}: eTP Local is short-circuited to every endpoint for the node's own traffic"
        );
        assert!(
            out.iter().all(|o| o.peer.as_deref() == Some(addr)),
            "{addr}: getpeername shows the address the client asked for: {out:?}"
        );
    }
    for addr in ["192.0.2.10:30053", "198.51.100.7:53", "203.0.113.9:53"] {
        assert_eq!(seen(&node, &["udp", addr, "--count", "30"]), both, "{addr}");
    }
    // iTP Local: the ClusterIP uses this node's endpoint only.
    assert_eq!(
        seen(&node, &["tcp", "10.96.5.1:80", "--count", "20"]),
        BTreeSet::from(["pod1".to_owned()])
    );
    // Another address of the "node" on the node port is not a frontend.
    assert_eq!(
        node.client(&["tcp", "192.0.2.11:30080"])[0].errno,
        Some(libc::ENETUNREACH)
    );
    drop(agent);
}

#[test]
fn lb_check_names_both_services_of_a_node_port_and_the_range() {
    let dir = TempDir::new("m");
    let service = |name: &str, ip: &str, node_port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, clusterIP: {ip}, ports: [{{port: 80, nodePort: {node_port}}}]}}\n"
        )
    };
    dir.write("a.yaml", &service("a", "10.96.5.2", 30123));
    dir.write("b.yaml", &service("b", "10.96.5.3", 30123));
    dir.write("c.yaml", &service("c", "10.96.5.4", 8080));
    let out = std::process::Command::new(lb_tests::lb_bin())
        .args(["check", "--manifests"])
        .arg(&dir.0)
        .output()
        .expect("lb check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Service default/b: NodePort 30123/TCP is already Service default/a's")
            && stderr.contains("a.yaml")
            && stderr.contains("b.yaml"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.ports[0].nodePort: 8080 is outside the node port range 30000-32767"),
        "{stderr}"
    );
}

/// GET / on the health check port: (status, body), polling until `want` status or 2 s.
fn health_check(port: u16, want: Option<u16>) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let got = lb_tests::http_get(addr, "/");
        if got.as_ref().map(|(code, _)| *code) == want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn health_check_node_port_answers_as_kube_proxy() {
    let dir = TempDir::new("m");
    let cgroup = lb_tests::Cgroup::new(&lb_tests::unique("hc"));
    let port = lb_tests::free_port();
    let service = |node_name: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.9
  externalTrafficPolicy: Local
  healthCheckNodePort: {port}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [10.244.1.1], nodeName: {node_name}}}]
"
        )
    };
    dir.write("web.yaml", &service("node-a"));
    let agent = Agent::start_manifests_with(
        &cgroup.path,
        &dir.0,
        &["--node-ip", "127.0.0.1"],
        Duration::from_secs(20),
    );
    let (code, body) = health_check(port, Some(200)).expect("health check answers");
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(
        json,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );
    // The endpoint moves to another node: 503 within a second.
    let moved = std::time::Instant::now();
    dir.write("web.yaml", &service("node-b"));
    let (code, body) = health_check(port, Some(503)).expect("health check answers");
    assert_eq!(code, 503, "{body}");
    assert!(
        moved.elapsed() < Duration::from_secs(1),
        "{:?} after the change",
        moved.elapsed()
    );
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    // The Service goes: so does its port.
    dir.remove("web.yaml");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while lb_tests::http_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "/").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} still open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(agent);
}
