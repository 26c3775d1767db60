//! Socket-level Service load balancing against the real kernel: a client namespace and cgroup
//! per test, pods in namespaces of their own, `lb run` on manifests in a temp directory.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    Agent, Cgroup, Node, Outcome, TempDir, attached_programs, backends, lb_bin, run_client,
    service_manifest as service, unique,
};

/// A node with `n` pods named pod1..podN serving TCP and UDP 8080.
fn node_with_pods(n: u8) -> Node {
    let mut node = Node::new();
    for i in 1..=n {
        node.add_pod(i, &format!("pod{i}"), &[8080], &[8080]);
    }
    node
}

/// A node with pods and lb running on manifests; fields drop in order (lb first).
struct Fixture {
    agent: Agent,
    _dir: TempDir,
    node: Node,
}

/// `pods` pods (pod1..podN, TCP and UDP 8080), and lb on the files `manifests` makes from
/// the pods' IPv4 addresses.
fn start(pods: u8, manifests: impl FnOnce(&[String]) -> Vec<(&'static str, String)>) -> Fixture {
    let node = node_with_pods(pods);
    let dir = TempDir::new("m");
    for (name, text) in manifests(&ip4s(&node)) {
        dir.write(name, &text);
    }
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    Fixture {
        agent,
        _dir: dir,
        node,
    }
}

fn ip4s(node: &Node) -> Vec<String> {
    node.pods.iter().map(|p| p.ip4.to_string()).collect()
}

/// How many distinct backends answered (panics on a failed request).
fn distinct(out: &[Outcome]) -> usize {
    backends(out).into_iter().collect::<BTreeSet<_>>().len()
}

/// Every request saw `peer` as its peer (getpeername or the reply's source).
fn assert_peer(out: &[Outcome], peer: &str) {
    assert!(
        out.iter().all(|o| o.peer.as_deref() == Some(peer)),
        "expected peer {peer}: {out:?}"
    );
}

fn count(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn tcp_reaches_every_backend_and_getpeername_shows_the_service() {
    let f = start(3, |ips| {
        vec![(
            "web.yaml",
            service("web", "10.96.0.10", 80, 8080, "TCP", ips),
        )]
    });
    let out = f.node.client(&["tcp", "10.96.0.10:80", "--count", "90"]);
    let seen = count(&backends(&out));
    assert_eq!(
        seen.len(),
        3,
        "every backend gets new connections: {seen:?}"
    );
    assert!(seen.values().all(|&n| n >= 10), "roughly uniform: {seen:?}");
    assert_peer(&out, "10.96.0.10:80");
}

#[test]
fn keepalive_connection_stays_on_its_backend() {
    let f = start(3, |ips| {
        vec![(
            "web.yaml",
            service("web", "10.96.0.10", 80, 8080, "TCP", ips),
        )]
    });
    for _ in 0..5 {
        let seen: BTreeSet<String> =
            backends(
                &f.node
                    .client(&["tcp", "10.96.0.10:80", "--count", "30", "--keepalive"]),
            )
            .into_iter()
            .collect();
        assert_eq!(seen.len(), 1, "one connection, one backend: {seen:?}");
    }
}

#[test]
fn multi_port_service_with_named_target_ports() {
    // The seed's crane Service: http 80 -> the pods' port named "web", https 443 -> 8443.
    // pod1 serves "web" on 8080, pod2 on 9090: the EndpointSlice controller writes each pod's
    // number under the Service port's name ("http"), so the name resolves per endpoint.
    let mut node = Node::new();
    node.add_pod(1, "pod1", &[8080, 8443], &[]);
    node.add_pod(2, "pod2", &[9090, 8443], &[]);
    let dir = TempDir::new("m");
    dir.write(
        "crane.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: crane}}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, port: 80, targetPort: web}}
  - {{name: https, port: 443, targetPort: 8443}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: crane-a, labels: {{kubernetes.io/service-name: crane}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: https, port: 8443}}]
endpoints: [{{addresses: ['{}']}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: crane-b, labels: {{kubernetes.io/service-name: crane}}}}
addressType: IPv4
ports: [{{name: http, port: 9090}}, {{name: https, port: 8443}}]
endpoints: [{{addresses: ['{}']}}]
",
            node.pods[0].ip4, node.pods[1].ip4
        ),
    );
    let _agent = Agent::start(&node.cgroup.path, &dir.0);
    for port in ["80", "443"] {
        let seen: BTreeSet<String> =
            backends(&node.client(&["tcp", &format!("10.96.0.20:{port}"), "--count", "40"]))
                .into_iter()
                .collect();
        assert_eq!(
            seen,
            BTreeSet::from(["pod1".to_owned(), "pod2".to_owned()]),
            "port {port}"
        );
    }
}

#[test]
fn client_ip_affinity_sticks_until_idle_for_the_timeout() {
    let node = node_with_pods(3);
    let dir = TempDir::new("m");
    let svc = service("sticky", "10.96.0.30", 80, 8080, "TCP", &ip4s(&node))
        .replace("  ports:", "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n  ports:");
    dir.write("sticky.yaml", &svc);
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    assert_eq!(agent.list()[0].affinity_timeout_seconds, 2);
    // Many new connections, and use every second for 4 s (longer than the timeout, never
    // idle for it): always the same backend.
    let first = backends(&node.client(&["tcp", "10.96.0.30:80", "--count", "30"]));
    let first_set: BTreeSet<&String> = first.iter().collect();
    assert_eq!(first_set.len(), 1, "affinity: {first:?}");
    let sticky =
        backends(&node.client(&["tcp", "10.96.0.30:80", "--count", "5", "--pause-ms", "1000"]));
    assert!(
        sticky.iter().all(|b| *b == first[0]),
        "refreshed by use: {sticky:?} vs {}",
        first[0]
    );
    // Idle longer than the timeout: the next connection is random again. With three backends
    // the chance of seeing only the first one in 12 rounds is 3^-12.
    let mut after_expiry = Vec::new();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(2200));
        let b = backends(&node.client(&["tcp", "10.96.0.30:80"])).remove(0);
        if b != first[0] {
            return;
        }
        after_expiry.push(b);
    }
    panic!("affinity never expired: {after_expiry:?}");
}

#[test]
fn selectorless_service_with_manual_endpoints() {
    let node = node_with_pods(2);
    let dir = TempDir::new("m");
    dir.write(
        "external.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: external-service}}
spec:
  clusterIP: 10.96.0.40
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: external-service}}
subsets:
- addresses: [{{ip: '{}'}}, {{ip: '{}'}}]
  ports: [{{port: 8080}}]
",
            node.pods[0].ip4, node.pods[1].ip4
        ),
    );
    let _agent = Agent::start(&node.cgroup.path, &dir.0);
    let seen: BTreeSet<String> = backends(&node.client(&["tcp", "10.96.0.40:80", "--count", "40"]))
        .into_iter()
        .collect();
    assert_eq!(seen.len(), 2);
}

#[test]
fn no_endpoints_refuses_tcp_and_udp_at_once() {
    let node = node_with_pods(1);
    let dir = TempDir::new("m");
    dir.write(
        "none.yaml",
        &service("none", "10.96.0.50", 80, 8080, "TCP", &[]),
    );
    dir.write(
        "none-udp.yaml",
        &service("none-udp", "10.96.0.51", 53, 8080, "UDP", &[]),
    );
    let _agent = Agent::start(&node.cgroup.path, &dir.0);
    let started = Instant::now();
    let tcp = node.client(&["tcp", "10.96.0.50:80"]);
    assert_eq!(tcp[0].errno, Some(libc::ECONNREFUSED), "{tcp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not a timeout"
    );
    for args in [
        &["udp", "10.96.0.51:53"][..],
        &["udp", "10.96.0.51:53", "--connected"],
    ] {
        let udp = node.client(args);
        assert_eq!(udp[0].errno, Some(libc::ECONNREFUSED), "{args:?}: {udp:?}");
    }
}

#[test]
fn udp_replies_come_from_the_service_address() {
    let f = start(3, |ips| {
        vec![(
            "dns.yaml",
            service("dns", "10.96.0.53", 53, 8080, "UDP", ips),
        )]
    });
    // Unconnected, a new socket per request: spread over the backends, replies from the VIP.
    let out = f.node.client(&["udp", "10.96.0.53:53", "--count", "60"]);
    assert_eq!(distinct(&out), 3, "{out:?}");
    assert_peer(&out, "10.96.0.53:53");
    // One unconnected socket keeps its backend, as a conntrack entry would keep it.
    let same =
        backends(
            &f.node
                .client(&["udp", "10.96.0.53:53", "--count", "20", "--same-socket"]),
        );
    assert_eq!(same.iter().collect::<BTreeSet<_>>().len(), 1, "{same:?}");
    // Connected: getpeername and recv show the Service address.
    let out = f
        .node
        .client(&["udp", "10.96.0.53:53", "--count", "30", "--connected"]);
    assert!(count(&backends(&out)).len() > 1, "{out:?}");
    assert_peer(&out, "10.96.0.53:53");
}

#[test]
fn ipv6_services_and_v4_mapped_sockets() {
    let node = node_with_pods(2);
    let dir = TempDir::new("m");
    let ip6s: Vec<String> = node.pods.iter().map(|p| p.ip6.to_string()).collect();
    dir.write(
        "v6.yaml",
        &service("web6", "fd00:96::10", 80, 8080, "TCP", &ip6s),
    );
    dir.write(
        "v6udp.yaml",
        &service("dns6", "fd00:96::53", 53, 8080, "UDP", &ip6s),
    );
    dir.write(
        "v4.yaml",
        &service("web4", "10.96.0.60", 80, 8080, "TCP", &ip4s(&node)),
    );
    let _agent = Agent::start(&node.cgroup.path, &dir.0);
    let out = node.client(&["tcp", "[fd00:96::10]:80", "--count", "30"]);
    assert_eq!(distinct(&out), 2);
    assert_peer(&out, "[fd00:96::10]:80");
    let out = node.client(&["udp", "[fd00:96::53]:53", "--count", "30"]);
    assert_eq!(distinct(&out), 2);
    assert_peer(&out, "[fd00:96::53]:53");
    // An AF_INET6 socket connecting to ::ffff:10.96.0.60 reaches the v4 Service.
    let out = node.client(&["tcp", "10.96.0.60:80", "--count", "30", "--mapped"]);
    assert_eq!(distinct(&out), 2);
    assert_peer(&out, "[::ffff:10.96.0.60]:80");
}

#[test]
fn manifest_changes_reach_the_kernel_within_a_second() {
    let node = node_with_pods(3);
    let dir = TempDir::new("m");
    let ips = ip4s(&node);
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.70", 80, 8080, "TCP", &ips[..1]),
    );
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    let be = |ips: &[String]| {
        ips.iter()
            .map(|ip| format!("{ip}:8080"))
            .collect::<Vec<_>>()
    };
    let within = Duration::from_secs(1);
    // Update: two more endpoints.
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.70", 80, 8080, "TCP", &ips),
    );
    let all = be(&ips);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    agent.wait_for("10.96.0.70:80/TCP", Some(&all), within);
    assert_eq!(
        count(&backends(&node.client(&[
            "tcp",
            "10.96.0.70:80",
            "--count",
            "60"
        ])))
        .len(),
        3
    );
    // Add: a new file with a new Service.
    dir.write(
        "api.yaml",
        &service("api", "10.96.0.71", 80, 8080, "TCP", &ips[2..]),
    );
    let api = be(&ips[2..]);
    agent.wait_for("10.96.0.71:80/TCP", Some(&[api[0].as_str()]), within);
    assert_eq!(backends(&node.client(&["tcp", "10.96.0.71:80"])), ["pod3"]);
    // Delete: the file goes, the Service goes, the address is no longer translated.
    dir.remove("api.yaml");
    agent.wait_for("10.96.0.71:80/TCP", None, within);
    assert_eq!(
        node.client(&["tcp", "10.96.0.71:80"])[0].errno,
        Some(libc::ENETUNREACH)
    );
}

#[test]
fn bad_files_and_objects_are_isolated() {
    let node = node_with_pods(1);
    let dir = TempDir::new("m");
    let ips = ip4s(&node);
    dir.write(
        "good.yaml",
        &service("good", "10.96.0.80", 80, 8080, "TCP", &ips),
    );
    dir.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [",
    );
    let mixed = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: badport}}\nspec: {{clusterIP: 10.96.0.82, ports: [{{port: 70000}}]}}\n",
        service("fine", "10.96.0.81", 80, 8080, "TCP", &ips)
    );
    dir.write("mixed.yaml", &mixed);
    let mut agent = Agent::start(&node.cgroup.path, &dir.0);
    for vip in ["10.96.0.80:80", "10.96.0.81:80"] {
        assert_eq!(backends(&node.client(&["tcp", vip])), ["pod1"], "{vip}");
    }
    let log = agent.log_text();
    assert!(
        log.contains("broken.yaml") && log.contains("invalid YAML"),
        "{log}"
    );
    assert!(
        log.contains("Service default/badport: spec.ports[0].port: 70000 is out of range"),
        "{log}"
    );
    assert!(agent.running());
    assert!(
        agent.metrics_text().contains("lb_config_errors 2"),
        "{}",
        agent.metrics_text()
    );
    // A file turning bad later keeps its last good objects, and the agent stays up.
    let loads = agent.metric("lb_manifest_loads_total").unwrap_or(0.0);
    dir.write("good.yaml", "kind: [");
    agent.wait_metric_above("lb_manifest_loads_total", loads, Duration::from_secs(5));
    assert_eq!(backends(&node.client(&["tcp", "10.96.0.80:80"])), ["pod1"]);
    assert!(agent.running());
}

#[test]
fn processes_outside_the_cgroup_are_not_translated() {
    let f = start(1, |ips| {
        vec![(
            "web.yaml",
            service("web", "10.96.0.90", 80, 8080, "TCP", ips),
        )]
    });
    assert_eq!(
        backends(&f.node.client(&["tcp", "10.96.0.90:80"])),
        ["pod1"]
    );
    // Same network namespace, another cgroup: the Service address is just an address.
    let other = Cgroup::new(&unique("lto"));
    let out = run_client(
        Some(&other.path),
        &f.node.client.path(),
        &["tcp", "10.96.0.90:80"],
    );
    assert_eq!(out[0].errno, Some(libc::ENETUNREACH), "{out:?}");
}

#[test]
fn restart_keeps_serving_and_adopts_without_a_second_attachment() {
    let node = node_with_pods(2);
    let dir = TempDir::new("m");
    let ips = ip4s(&node);
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.100", 80, 8080, "TCP", &ips),
    );
    let mut agent = Agent::start(&node.cgroup.path, &dir.0);
    let attached = attached_programs(&node.cgroup.path);
    // Four sock_addr hooks of each family and the release hook.
    assert_eq!(attached.len(), 9, "{attached:?}");
    assert_eq!(agent.stop(), Some(0), "SIGTERM exits 0");
    // No agent: the datapath keeps serving from the pinned links and maps.
    assert_eq!(
        count(&backends(&node.client(&[
            "tcp",
            "10.96.0.100:80",
            "--count",
            "30"
        ])))
        .len(),
        2
    );
    assert_eq!(attached_programs(&node.cgroup.path).len(), 9);
    // A new agent adopts: same number of attachments, no map writes for an unchanged world.
    agent.restart();
    assert_eq!(
        attached_programs(&node.cgroup.path).len(),
        9,
        "no second attachment"
    );
    assert!(
        agent.metrics_text().contains("lb_map_writes_total 0"),
        "{}",
        agent.metrics_text()
    );
    assert!(
        agent.log_text().contains("links_adopted=9"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        count(&backends(&node.client(&[
            "tcp",
            "10.96.0.100:80",
            "--count",
            "30"
        ])))
        .len(),
        2
    );
    // And it reconciles what changed while it was away.
    assert_eq!(agent.stop(), Some(0));
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.100", 80, 8080, "TCP", &ips[..1]),
    );
    agent.restart();
    agent.wait_for(
        "10.96.0.100:80/TCP",
        Some(&[&format!("{}:8080", ips[0])]),
        Duration::from_secs(1),
    );
    assert_eq!(
        count(&backends(&node.client(&[
            "tcp",
            "10.96.0.100:80",
            "--count",
            "20"
        ])))
        .len(),
        1
    );
}

#[test]
fn cleanup_leaves_nothing_attached_or_pinned() {
    let mut f = start(1, |ips| {
        vec![(
            "web.yaml",
            service("web", "10.96.0.110", 80, 8080, "TCP", ips),
        )]
    });
    assert_eq!(f.agent.stop(), Some(0));
    let out = Command::new(lb_bin())
        .arg("cleanup")
        .arg("--pin-path")
        .arg(&f.agent.pin_path)
        .arg("--cgroup")
        .arg(&f.node.cgroup.path)
        .output()
        .expect("lb cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(attached_programs(&f.node.cgroup.path).is_empty());
    assert!(
        !f.agent.pin_path.exists(),
        "pins left under {}",
        f.agent.pin_path.display()
    );
    assert_eq!(
        f.node.client(&["tcp", "10.96.0.110:80"])[0].errno,
        Some(libc::ENETUNREACH)
    );
    // Idempotent.
    let again = Command::new(lb_bin())
        .arg("cleanup")
        .arg("--pin-path")
        .arg(&f.agent.pin_path)
        .output()
        .expect("lb cleanup");
    assert!(again.status.success());
}

#[test]
fn metrics_count_datapath_events() {
    let node = node_with_pods(1);
    let dir = TempDir::new("m");
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.120", 80, 8080, "TCP", &ip4s(&node)),
    );
    dir.write(
        "none.yaml",
        &service("none", "10.96.0.121", 80, 8080, "TCP", &[]),
    );
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    backends(&node.client(&["tcp", "10.96.0.120:80", "--count", "5"]));
    node.client(&["tcp", "10.96.0.121:80"]);
    let text = agent.metrics_text();
    assert!(
        text.contains("lb_datapath_events_total{event=\"connect_xlated\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("lb_datapath_events_total{event=\"refused_no_backend\"} 1"),
        "{text}"
    );
    assert!(text.contains("lb_services 2"), "{text}");
    assert!(text.contains("lb_backends 1"), "{text}");
    // Idle, the agent does not read its manifests again (its own reads are no changes).
    let loads = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("lb_manifest_loads_total"))
            .map(str::to_owned)
    };
    let before = loads(&text);
    assert!(before.is_some(), "{text}");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(loads(&agent.metrics_text()), before);
}

/// `lb run` on the manifests in `dir` with pins at `pin`, without HTTP endpoints: for the
/// refusals, which exit before anything is attached.
fn run_on_pins(node: &Node, dir: &TempDir, pin: &std::path::Path) -> std::process::Output {
    Command::new(lb_bin())
        .arg("run")
        .arg("--manifests")
        .arg(&dir.0)
        .arg("--cgroup")
        .arg(&node.cgroup.path)
        .arg("--pin-path")
        .arg(pin)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("lb run")
}

#[test]
fn maps_of_another_layout_are_refused_not_misread() {
    let node = Node::new();
    let dir = TempDir::new("m");
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.130", 80, 8080, "TCP", &[]),
    );
    // A pinned LB_FRONTENDS with another key size, as an older lb might have left.
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
    std::fs::create_dir_all(pin.join("maps")).expect("mkdir pins");
    let map = pin.join("maps/LB_FRONTENDS");
    lb_tests::sh(&[
        "bpftool",
        "map",
        "create",
        map.to_str().expect("utf-8"),
        "type",
        "hash",
        "key",
        "12",
        "value",
        "16",
        "entries",
        "16",
        "name",
        "LB_FRONTENDS",
    ]);
    let out = run_on_pins(&node, &dir, &pin);
    let _gone = std::fs::remove_file(&map);
    let _gone = std::fs::remove_dir_all(&pin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was made by another version of lb: its key size is 12, this lb needs 20"),
        "{err}"
    );
    assert!(
        attached_programs(&node.cgroup.path).is_empty(),
        "nothing attached on refusal"
    );
}

#[test]
fn maps_of_an_older_layout_version_are_refused_with_how_to_upgrade() {
    let node = Node::new();
    let dir = TempDir::new("m");
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.131", 80, 8080, "TCP", &[]),
    );
    // The metadata map an lb of layout version 2 left (the version is checked before shapes).
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
    std::fs::create_dir_all(pin.join("maps")).expect("mkdir pins");
    let meta = pin.join("maps/LB_META");
    let meta_path = meta.to_str().expect("utf-8");
    lb_tests::sh(&[
        "bpftool", "map", "create", meta_path, "type", "array", "key", "4", "value", "4",
        "entries", "4", "name", "LB_META",
    ]);
    lb_tests::sh(&[
        "bpftool", "map", "update", "pinned", meta_path, "key", "0", "0", "0", "0", "value", "2",
        "0", "0", "0",
    ]);
    let out = run_on_pins(&node, &dir, &pin);
    let _gone = std::fs::remove_file(&meta);
    let _gone = std::fs::remove_dir_all(&pin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("have layout version 2, this lb uses ")
            && err.contains("lb cleanup --pin-path"),
        "{err}"
    );
    assert!(attached_programs(&node.cgroup.path).is_empty());
}

#[test]
fn check_names_file_object_and_field() {
    let dir = TempDir::new("m");
    dir.write(
        "ok.yaml",
        &service("ok", "10.96.0.140", 80, 8080, "TCP", &[]),
    );
    let bad = dir.write("bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: nope, namespace: shop}\nspec: {ports: [{port: 80}]}\n");
    let out = Command::new(lb_bin())
        .arg("check")
        .arg("--manifests")
        .arg(&dir.0)
        .output()
        .expect("lb check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{} (document 1): Service shop/nope: spec.clusterIP: missing",
            bad.display()
        )),
        "{err}"
    );
    dir.remove("bad.yaml");
    let out = Command::new(lb_bin())
        .arg("check")
        .arg("--manifests")
        .arg(&dir.0)
        .output()
        .expect("lb check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 Services"));
    let out = Command::new(lb_bin())
        .arg("check")
        .arg("--manifests")
        .arg(&dir.0)
        .args(["--max-frontends", "0"])
        .output()
        .expect("lb check");
    assert!(!out.status.success(), "a set over the capacity is invalid");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Service default/ok")
            && err.contains("map LB_FRONTENDS is full (0 frontends; see --max-frontends)"),
        "{err}"
    );
}

#[test]
fn map_capacities_are_set_by_flags_and_kept_across_restarts() {
    let node = node_with_pods(1);
    let dir = TempDir::new("m");
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        dir.write(
            &format!("{name}.yaml"),
            &service(
                name,
                &format!("10.96.0.{}", 150 + i),
                80,
                8080,
                "TCP",
                &ip4s(&node),
            ),
        );
    }
    let mut agent = Agent::start_manifests_with(
        &node.cgroup.path,
        &dir.0,
        &["--max-frontends", "2"],
        Duration::from_secs(20),
    );
    // Two fit; the third is refused, with the map and its capacity named.
    assert_eq!(agent.list().len(), 2);
    let log = agent.log_text();
    assert!(
        log.contains("Service default/c: not programmed: map LB_FRONTENDS is full (2 frontends; see --max-frontends)"),
        "{log}"
    );
    assert!(agent.metrics_text().contains("lb_config_errors 1"));
    assert_eq!(agent.stop(), Some(0));
    // Another capacity on the same pins is refused with what to do, not misread.
    let out = Command::new(lb_bin())
        .arg("run")
        .arg("--manifests")
        .arg(&dir.0)
        .arg("--cgroup")
        .arg(&node.cgroup.path)
        .arg("--pin-path")
        .arg(&agent.pin_path)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("lb run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds 2 entries at most, and lb was asked for --max-frontends 65536"),
        "{err}"
    );
    // The datapath kept serving meanwhile.
    assert_eq!(backends(&node.client(&["tcp", "10.96.0.150:80"])), ["pod1"]);
}
