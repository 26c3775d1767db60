//! Issue 9's north-south behaviours that the other test files do not cover, end to end in
//! the two-node topology of `lb_tests::north_south` (agents started in their node's
//! namespace): LoadBalancer ingress IPs and externalIPs reached on either node (one agent per
//! node; TCP and UDP, IPv4 and IPv6), `healthCheckNodePort` answering on each node's address
//! from outside, NodePorts on every `--node-ip` and refused without endpoints, the XDP/tc
//! links adopted by a restarted agent and removed by `lb cleanup` (native and generic XDP),
//! and `lb check` naming both Services of one external IP:port.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    Cgroup, Netns, TempDir, http_get, lb_bin,
    north_south::{
        EXT4, EXT6, NODE_B4, NODE_B6, NODE4, NODE6, NodeAgent, POD_B4, ROUTER_EXT4, TwoNodes,
        in_netns,
    },
    run_client, unique,
};

/// An external address the router sends to `node` (as a cloud load balancer or a BGP route
/// would), and the external client reaches through the router.
fn route_to(topo: &TwoNodes, ip: &str, node: &str) {
    let (family, router) = if ip.contains(':') {
        ("-6", "fd00:250:1::1")
    } else {
        ("-4", ROUTER_EXT4)
    };
    topo.router
        .ip(&[family, "route", "replace", ip, "via", node]);
    topo.ext
        .ip(&[family, "route", "replace", ip, "via", router]);
}

/// From outside, `count` new flows per protocol to each of `ips` (port 80), with the router
/// sending them to `node`: every answer came from `local` (seeing `client`) or `remote`
/// (seeing `node`, SNAT), both answered, and each reply came from the address asked.
fn reach_both_pods_through(
    topo: &TwoNodes,
    agent: &NodeAgent,
    ips: &[&str],
    (node, client): (&str, &str),
    (local, remote): (&str, &str),
) {
    for ip in ips {
        route_to(topo, ip, node);
        let addr = if ip.contains(':') {
            format!("[{ip}]:80")
        } else {
            format!("{ip}:80")
        };
        for proto in ["tcp", "udp"] {
            let outcomes = run_client(None, &topo.ext.path(), &[proto, &addr, "--count", "16"]);
            let mut pods = BTreeSet::new();
            for o in &outcomes {
                let answer = o.backend.as_deref().unwrap_or_else(|| {
                    panic!(
                        "{proto} {addr} via {node} failed: {o:?}\n{}\n{}",
                        agent.lb(&["stats"]),
                        agent.log_text()
                    )
                });
                let (pod, seen) = answer.split_once(' ').expect("NAME CLIENT");
                let seen: std::net::SocketAddr = seen.parse().expect("client address");
                let want = if pod == local { client } else { node };
                assert_eq!(
                    seen.ip().to_string(),
                    want,
                    "{proto} {addr} via {node}: {pod} (a local pod sees the client, a pod on the other node this node's address)"
                );
                assert_eq!(o.peer.as_deref(), Some(addr.as_str()), "reply from {addr}");
                pods.insert(pod.to_owned());
            }
            assert_eq!(
                pods,
                BTreeSet::from([local.to_owned(), remote.to_owned()]),
                "{proto} {addr} via {node}: 16 new flows reach both pods"
            );
        }
    }
    assert!(
        agent.stat("xdp_new_flow_snat") > 0,
        "{}",
        agent.lb(&["stats"])
    );
    assert!(agent.stat("xdp_new_flow") > 0, "{}", agent.lb(&["stats"]));
}

/// A LoadBalancer Service (eTP Cluster) on port 80, TCP and UDP, with externalIP
/// 198.51.100.7 and ingress IP 203.0.113.9; pod1 on node-a, podb on node-b.
const SHOP: &str = "apiVersion: v1
kind: Service
metadata: {name: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.70.1
  externalIPs: [198.51.100.7]
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30070}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30070}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.9}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-1, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.200.0.11], nodeName: node-a}
- {addresses: [10.201.0.2], nodeName: node-b}
";

#[test]
fn lb_ip_and_external_ip_reach_every_pod_from_either_node() {
    let mut topo = TwoNodes::new();
    topo.add_pod_a(1, "pod1", &[8080], &[8080]);
    let dir = TempDir::new("nsa");
    dir.write("shop.yaml", SHOP);
    let a = topo.agent_a(&dir.0, &[]);
    let b = topo.agent_b(&dir.0, &[]);
    for agent in [&a, &b] {
        agent.wait_for(&[
            "198.51.100.7:80/TCP",
            "198.51.100.7:80/UDP",
            "203.0.113.9:80/TCP",
            "203.0.113.9:80/UDP",
        ]);
    }
    let ips = ["198.51.100.7", "203.0.113.9"];
    reach_both_pods_through(&topo, &a, &ips, (NODE4, EXT4), ("pod1", "podb"));
    reach_both_pods_through(&topo, &b, &ips, (NODE_B4, EXT4), ("podb", "pod1"));
}

/// [`SHOP`] in IPv6: externalIP 2001:db8:70::7, ingress IP 2001:db8:70::9.
const SHOP6: &str = "apiVersion: v1
kind: Service
metadata: {name: shop6}
spec:
  type: LoadBalancer
  clusterIP: fd00:96::70:9
  ipFamilies: [IPv6]
  externalIPs: ['2001:db8:70::7']
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30078}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30078}
status:
  loadBalancer:
    ingress: [{ip: '2001:db8:70::9'}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop6-1, labels: {kubernetes.io/service-name: shop6}}
addressType: IPv6
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: ['fd00:200::11'], nodeName: node-a}
- {addresses: ['fd00:201::2'], nodeName: node-b}
";

#[test]
fn ipv6_lb_ip_and_external_ip_reach_every_pod_from_either_node() {
    let mut topo = TwoNodes::new();
    topo.add_pod_a(1, "pod1", &[8080], &[8080]);
    let dir = TempDir::new("nsa");
    dir.write("shop6.yaml", SHOP6);
    let a = topo.agent_a(&dir.0, &[]);
    let b = topo.agent_b(&dir.0, &[]);
    for agent in [&a, &b] {
        agent.wait_for(&[
            "[2001:db8:70::7]:80/TCP",
            "[2001:db8:70::7]:80/UDP",
            "[2001:db8:70::9]:80/TCP",
            "[2001:db8:70::9]:80/UDP",
        ]);
    }
    let ips = ["2001:db8:70::7", "2001:db8:70::9"];
    reach_both_pods_through(&topo, &a, &ips, (NODE6, EXT6), ("pod1", "podb"));
    reach_both_pods_through(&topo, &b, &ips, (NODE_B6, EXT6), ("podb", "pod1"));
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local`, healthCheckNodePort 32100 and
/// ingress IP 203.0.113.20, whose one endpoint is `pod` on `node`.
fn local_web(pod: &str, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.70.2
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{{port: 80, targetPort: 8080, nodePort: 30071}}]
status:
  loadBalancer:
    ingress: [{{ip: 203.0.113.20}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: ['{pod}'], nodeName: {node}}}]
"
    )
}

/// GET / on `node`:32100 from the external client: (status, body).
fn health_check_from_outside(topo: &TwoNodes, node: &str) -> Option<(u16, String)> {
    let addr: std::net::SocketAddr = format!("{node}:32100").parse().expect("addr");
    in_netns(&topo.ext, move || http_get(addr, "/"))
}

/// Polls the health check on `node` until it answers `code` (within `within`); the body and
/// how long it took.
fn wait_health(topo: &TwoNodes, node: &str, code: u16, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    loop {
        let got = health_check_from_outside(topo, node);
        if let Some((c, body)) = &got
            && *c == code
        {
            return (body.clone(), started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "{node}:32100 is not {code} after {within:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one TCP request's outcome to `addr` from the external client.
fn one_tcp(topo: &TwoNodes, addr: &str) -> lb_tests::Outcome {
    let mut outcomes = run_client(None, &topo.ext.path(), &["tcp", addr]);
    assert_eq!(outcomes.len(), 1);
    outcomes.remove(0)
}

#[test]
fn health_check_node_port_answers_on_each_node_and_follows_the_local_endpoint() {
    let mut topo = TwoNodes::new();
    topo.add_pod_a(1, "pod1", &[8080], &[]);
    let dir = TempDir::new("nsa");
    dir.write("web.yaml", &local_web("10.200.0.11", "node-a"));
    let a = topo.agent_a(&dir.0, &[]);
    let b = topo.agent_b(&dir.0, &[]);
    for agent in [&a, &b] {
        agent.wait_for(&["203.0.113.20:80/TCP"]);
    }
    // kube-proxy's JSON and codes, on each node's own address, reached from outside.
    let (body, _) = wait_health(&topo, NODE4, 200, Duration::from_secs(5));
    let json: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(
        json,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );
    let (body, _) = wait_health(&topo, NODE_B4, 503, Duration::from_secs(5));
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    // The load balancer's address sent to node-a: the local pod, the client's own address.
    route_to(&topo, "203.0.113.20", NODE4);
    let o = one_tcp(&topo, "203.0.113.20:80");
    let answer = o.backend.as_deref().unwrap_or_else(|| panic!("{o:?}"));
    assert!(answer.starts_with(&format!("pod1 {EXT4}:")), "{answer}");
    // Sent to node-b, which has no endpoint: dropped there, never a hop to node-a.
    route_to(&topo, "203.0.113.20", NODE_B4);
    let dropped = b.stat("xdp_drop_no_local_endpoint");
    let o = one_tcp(&topo, "203.0.113.20:80");
    assert_eq!(
        (o.errno, o.error.as_deref()),
        (None, Some("connection timed out")),
        "{o:?}"
    );
    assert!(b.stat("xdp_drop_no_local_endpoint") > dropped);
    // The endpoint moves to podb on node-b: both nodes' answers follow.
    let moved = Instant::now();
    dir.write("web.yaml", &local_web(POD_B4, "node-b"));
    let (body, b_after) = wait_health(&topo, NODE_B4, 200, Duration::from_secs(5));
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    let (_, _) = wait_health(&topo, NODE4, 503, Duration::from_secs(5));
    let a_after = moved.elapsed();
    eprintln!("health checks updated after the change: node-b {b_after:?}, node-a {a_after:?}");
    assert!(
        b_after < Duration::from_secs(1) && a_after < Duration::from_secs(1),
        "within 1 s of the change: node-b {b_after:?}, node-a {a_after:?}"
    );
    b.wait_for(&["10.201.0.2:8080"]);
    let o = one_tcp(&topo, "203.0.113.20:80");
    let answer = o.backend.as_deref().unwrap_or_else(|| panic!("{o:?}"));
    assert!(answer.starts_with(&format!("podb {EXT4}:")), "{answer}");
    drop((a, b));
}

/// `BPF_TCX_EGRESS` (enum bpf_attach_type).
const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_PROG_QUERY`.
const BPF_PROG_QUERY: i64 = 16;

/// How many programs are attached at tcx egress of `dev` in `ns` (`BPF_PROG_QUERY` by
/// ifindex; this bpftool predates tcx).
fn tcx_egress_count(ns: &Netns, dev: &str) -> u32 {
    let dev = std::ffi::CString::new(dev).expect("name");
    in_netns(ns, move || {
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev:?}");
        // union bpf_attr's query: target_ifindex at 0, attach_type at 4, prog_cnt at 24
        // (no buffers: the kernel only counts).
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
        attr[4..8].copy_from_slice(&BPF_TCX_EGRESS.to_ne_bytes());
        // SAFETY: a zeroed 128-byte attribute with the query's fields set; no pointers.
        let ret =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        assert_eq!(
            ret,
            0,
            "BPF_PROG_QUERY: {}",
            std::io::Error::last_os_error()
        );
        u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes"))
    })
}

/// The XDP attachment's mode on `dev` in `ns` ("driver" for native, "generic"), if any, and
/// how many tcx egress programs there are.
fn attachments(ns: &Netns, dev: &str) -> (Option<String>, u32) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["bpftool", "-j", "net", "show", "dev", dev])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let xdp = json[0]["xdp"][0]["mode"].as_str().map(str::to_owned);
    (xdp, tcx_egress_count(ns, dev))
}

#[test]
fn xdp_and_tc_links_are_adopted_on_restart_and_removed_by_cleanup() {
    // One veth (native XDP) and one bridge, whose driver has no native XDP: generic mode
    // with a warning.
    let ns = Netns::new(unique("xa"));
    let cgroup = Cgroup::new(&unique("xa"));
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.ip(&["link", "add", "d0", "type", "bridge"]);
    for (dev, addr) in [("v0", "10.251.0.1/24"), ("d0", "10.251.1.1/24")] {
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["link", "set", "v1", "up"]);
    let dir = TempDir::new("nsa");
    dir.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.96.70.3, ports: [{port: 80, nodePort: 30072}]}\n",
    );
    let mut agent = NodeAgent::start_in(
        &ns,
        &cgroup.path,
        &dir.0,
        &["--node-name", "n", "--xdp-iface", "v0", "--xdp-iface", "d0"],
    );
    agent.wait_for(&["10.251.0.1:30072/TCP", "10.251.1.1:30072/TCP"]);
    assert_eq!(attachments(&ns, "v0"), (Some("driver".to_owned()), 1));
    assert_eq!(attachments(&ns, "d0"), (Some("generic".to_owned()), 1));
    assert!(
        agent
            .log_text()
            .contains("native XDP refused by the driver; using generic XDP"),
        "{}",
        agent.log_text()
    );
    for kind in ["xdp", "tc"] {
        for dev in ["v0", "d0"] {
            assert!(agent.pin_path.join(format!("links/{kind}@{dev}")).exists());
        }
    }
    // SIGTERM leaves the datapath attached; a new agent adopts it: no second attachment.
    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent
        .log_text()
        .matches("north-south datapath attached")
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("mode=\"adopted\"").count() + log.matches("mode=adopted").count(),
        2,
        "{log}"
    );
    assert_eq!(attachments(&ns, "v0"), (Some("driver".to_owned()), 1));
    assert_eq!(attachments(&ns, "d0"), (Some("generic".to_owned()), 1));
    // lb cleanup removes every XDP and tc attachment and the pins.
    assert_eq!(agent.stop(), Some(0));
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(lb_bin())
        .args(["cleanup", "--pin-path"])
        .arg(&agent.pin_path)
        .output()
        .expect("lb cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(attachments(&ns, "v0"), (None, 0));
    assert_eq!(attachments(&ns, "d0"), (None, 0));
    assert!(!agent.pin_path.exists(), "pins removed");
    drop(agent);
}

#[test]
fn lb_check_names_both_services_of_one_external_ip_port() {
    let dir = TempDir::new("nsa");
    let service = |name: &str, ip: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]{extra}}}\n"
        )
    };
    dir.write(
        "a.yaml",
        &service("a", "10.96.70.4", ", externalIPs: [198.51.100.9]"),
    );
    dir.write(
        "b.yaml",
        &service("b", "10.96.70.5", ", externalIPs: [198.51.100.9]"),
    );
    let out = Command::new(lb_bin())
        .args(["check", "--manifests"])
        .arg(&dir.0)
        .output()
        .expect("lb check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("198.51.100.9:80/TCP is already Service default/a's")
            && stderr.contains("a.yaml")
            && stderr.contains("b.yaml"),
        "{stderr}"
    );
}

/// A NodePort Service (eTP Cluster) on 30076 whose endpoint is pod1, and one on 30077 without
/// endpoints.
const TWO_PORTS: &str = "apiVersion: v1
kind: Service
metadata: {name: served}
spec:
  type: NodePort
  clusterIP: 10.96.70.7
  ports: [{port: 80, targetPort: 8080, nodePort: 30076}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: served-1, labels: {kubernetes.io/service-name: served}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.200.0.11], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  clusterIP: 10.96.70.8
  ports: [{port: 80, targetPort: 8080, nodePort: 30077}]
";

#[test]
fn node_ports_on_every_node_ip_and_refused_without_endpoints() {
    let mut topo = TwoNodes::new();
    topo.add_pod_a(1, "pod1", &[8080], &[]);
    // A second address of node-a, on the same interface.
    let second = "10.250.2.12";
    topo.node_a
        .client
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "n0"]);
    let dir = TempDir::new("nsa");
    dir.write("svc.yaml", TWO_PORTS);
    let a = topo.agent_a(&dir.0, &["--node-ip", NODE4, "--node-ip", second]);
    a.wait_for(&[
        "10.250.2.2:30076/TCP",
        "10.250.2.12:30076/TCP",
        "10.250.2.2:30077/TCP",
    ]);
    for ip in [NODE4, second] {
        let addr = format!("{ip}:30076");
        let o = one_tcp(&topo, &addr);
        let answer = o
            .backend
            .as_deref()
            .unwrap_or_else(|| panic!("{addr}: {o:?}"));
        assert!(answer.starts_with(&format!("pod1 {EXT4}:")), "{answer}");
        assert_eq!(o.peer.as_deref(), Some(addr.as_str()));
    }
    // No endpoint at all (eTP Cluster): the stack answers, as kube-proxy's REJECT.
    let passed = a.stat("xdp_pass_no_endpoint");
    let o = one_tcp(&topo, &format!("{NODE4}:30077"));
    assert_eq!(o.errno, Some(libc::ECONNREFUSED), "{o:?}");
    assert!(
        a.stat("xdp_pass_no_endpoint") > passed,
        "{}",
        a.lb(&["stats"])
    );
}
