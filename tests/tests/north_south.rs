//! The north-south datapath (XDP on `--xdp-iface`, tc egress on the same interface) with
//! traffic from outside the node: an external client namespace behind a router namespace
//! reaches the node namespace, where the agent runs (`nsenter --net=...`, as a DaemonSet pod
//! with hostNetwork would) and pods hang off the node's bridge.
//!
//! ```text
//! ext (10.250.1.2) -- router (10.250.1.1 | 10.250.2.1) -- n0 (10.250.2.2) node -- br0 -- pods
//! ```

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Netns, Node, Outcome, Proc, TempDir, die_with_parent, lb_bin, run_client, testpod_bin, unique,
};

const EXT4: &str = "10.250.1.2";
const EXT6: &str = "fd00:250:1::2";
const NODE4: &str = "10.250.2.2";
const NODE6: &str = "fd00:250:2::2";

/// The topology; everything is removed on drop (namespaces delete their veths).
struct Topology {
    ext: Netns,
    _router: Netns,
    node: Node,
    _servers: Vec<Proc>,
}

fn sysctl(ns: &Netns, settings: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", &ns.name, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    lb_tests::sh(&args);
}

/// Starts a test server that answers "NAME CLIENT-ADDR" in pod namespace `netns`.
fn serve_showing_client(netns: &Netns, name: &str, port: u16) -> Proc {
    let mut child = die_with_parent(&mut Command::new(testpod_bin()))
        .arg("--netns")
        .arg(netns.path())
        .args(["serve", "--name", name, "--show-client"])
        .args(["--tcp", &port.to_string(), "--udp", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lb-testpod serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    Proc(child)
}

impl Topology {
    fn new() -> Self {
        let mut node = Node::new();
        let id = unique("ns");
        let ext = Netns::new(format!("{id}e"));
        let router = Netns::new(format!("{id}r"));
        let node_ns = node.client.name.clone();
        ext.ip(&[
            "link",
            "add",
            "e0",
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &router.name,
        ]);
        router.ip(&[
            "link", "add", "r1", "type", "veth", "peer", "name", "n0", "netns", &node_ns,
        ]);
        for (ns, dev, v4, v6) in [
            (&ext, "e0", "10.250.1.2/24", "fd00:250:1::2/64"),
            (&router, "r0", "10.250.1.1/24", "fd00:250:1::1/64"),
            (&router, "r1", "10.250.2.1/24", "fd00:250:2::1/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        node.client
            .ip(&["addr", "add", "10.250.2.2/24", "dev", "n0"]);
        node.client.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:250:2::2/64",
            "dev",
            "n0",
            "nodad",
        ]);
        node.client.ip(&["link", "set", "n0", "up"]);
        // Only routes to the test's own namespaces.
        ext.ip(&["route", "add", "10.250.2.0/24", "via", "10.250.1.1"]);
        ext.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:2::/64",
            "via",
            "fd00:250:1::1",
        ]);
        node.client
            .ip(&["route", "add", "10.250.1.0/24", "via", "10.250.2.1"]);
        node.client.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:1::/64",
            "via",
            "fd00:250:2::1",
        ]);
        for ns in [&router, &node.client] {
            sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
        }
        let mut servers = Vec::new();
        for (n, name) in [(1u8, "pod1"), (2, "pod2")] {
            let pod = node.add_pod(n, name, &[], &[]);
            pod.netns
                .ip(&["route", "add", "default", "via", "10.200.0.1"]);
            pod.netns
                .ip(&["-6", "route", "add", "default", "via", "fd00:200::1"]);
            servers.push(serve_showing_client(&pod.netns, name, 8080));
        }
        let topo = Self {
            ext,
            _router: router,
            node,
            _servers: servers,
        };
        // IPv6 link-local addresses stay tentative (duplicate address detection) for a
        // second or two after a link comes up, and neighbour discovery across the router
        // fails meanwhile: wait until every namespace has settled.
        let mut all: Vec<&Netns> = vec![&topo.ext, &topo._router, &topo.node.client];
        all.extend(topo.node.pods.iter().map(|p| &p.netns));
        let deadline = Instant::now() + Duration::from_secs(10);
        for ns in all {
            while !ns
                .ip(&["-6", "addr", "show", "tentative"])
                .trim()
                .is_empty()
            {
                assert!(
                    Instant::now() < deadline,
                    "{}: addresses stay tentative",
                    ns.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        topo
    }

    /// The external client's requests.
    fn client(&self, args: &[&str]) -> Vec<Outcome> {
        run_client(None, &self.ext.path(), args)
    }
}

/// `lb run` inside the node namespace with `--xdp-iface n0`; stopped and cleaned up on drop.
struct NodeAgent {
    pin_path: PathBuf,
    netns: PathBuf,
    child: Option<Proc>,
    log: PathBuf,
}

impl NodeAgent {
    fn start(topo: &Topology, manifests: &std::path::Path) -> Self {
        let pin_path = PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
        let log = std::env::temp_dir().join(format!("{}.log", unique("lb-agent")));
        let log_file = std::fs::File::create(&log).expect("log");
        let child = die_with_parent(&mut Command::new("nsenter"))
            .arg(format!("--net={}", topo.node.client.path().display()))
            .arg(lb_bin())
            .arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--cgroup")
            .arg(&topo.node.cgroup.path)
            .arg("--pin-path")
            .arg(&pin_path)
            .args(["--node-name", "node-a", "--xdp-iface", "n0"])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn lb run");
        Self {
            pin_path,
            netns: topo.node.client.path(),
            child: Some(Proc(child)),
            log,
        }
    }

    fn lb(&self, args: &[&str]) -> String {
        let out = Command::new(lb_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run lb");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `lb list` shows every one of `frontends`.
    fn wait_for(&self, frontends: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = self.lb(&["list"]);
            if frontends.iter().all(|f| list.contains(f)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "frontends {frontends:?} not programmed: {list}\nagent log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A datapath counter from `lb stats`.
    fn stat(&self, name: &str) -> u64 {
        let stats = self.lb(&["stats"]);
        stats
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no counter {name} in:\n{stats}"))
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        drop(self.child.take());
        let _cleaned = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(lb_bin())
            .args(["cleanup", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        let _gone = std::fs::remove_file(&self.log);
    }
}

/// A dual-stack NodePort Service, eTP Local, TCP and UDP on nodePort 30080; pod1 is on this
/// node (node-a), pod2 on node-b. And "elsewhere" (nodePort 30081), eTP Local with its only
/// endpoint on node-b.
const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIPs: [10.96.50.1, 'fd00:96::50:1']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.200.0.11], nodeName: node-a}
- {addresses: [10.200.0.12], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: ['fd00:200::11'], nodeName: node-a}
- {addresses: ['fd00:200::12'], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere}
spec:
  type: NodePort
  clusterIP: 10.96.50.2
  externalTrafficPolicy: Local
  ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: elsewhere-1, labels: {kubernetes.io/service-name: elsewhere}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints:
- {addresses: [10.200.0.12], nodeName: node-b}
";

/// Every answer came from pod1 and saw the external client's own address.
fn assert_local_pod_saw_client(
    agent: &NodeAgent,
    outcomes: &[Outcome],
    client: &str,
    service: &str,
) {
    assert!(!outcomes.is_empty());
    for o in outcomes {
        let backend = o.backend.as_deref().unwrap_or_else(|| {
            panic!(
                "request to {service} failed: {o:?} in {outcomes:?}\n{}",
                agent.lb(&["stats"])
            )
        });
        let (pod, seen) = backend.split_once(' ').expect("NAME CLIENT");
        assert_eq!(pod, "pod1", "eTP Local: only this node's endpoint");
        let seen: std::net::SocketAddr = seen.parse().expect("client address");
        assert_eq!(seen.ip().to_string(), client, "client IP preserved");
        assert_eq!(
            o.peer.as_deref(),
            Some(service),
            "the reply came from the NodePort"
        );
    }
}

#[test]
fn nodeport_from_outside_reaches_the_local_pod_with_the_client_ip() {
    let topo = Topology::new();
    let dir = TempDir::new("ns");
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    // --node-ip defaults to n0's addresses.
    agent.wait_for(&[
        "10.250.2.2:30080/TCP",
        "[fd00:250:2::2]:30080/UDP",
        "10.250.2.2:30081/TCP",
    ]);
    let v4 = format!("{NODE4}:30080");
    let v6 = format!("[{NODE6}]:30080");
    assert_local_pod_saw_client(
        &agent,
        &topo.client(&["tcp", &v4, "--count", "6"]),
        EXT4,
        &v4,
    );
    assert_local_pod_saw_client(
        &agent,
        &topo.client(&["tcp", &v4, "--count", "4", "--keepalive"]),
        EXT4,
        &v4,
    );
    assert_local_pod_saw_client(
        &agent,
        &topo.client(&["udp", &v4, "--count", "4", "--connected"]),
        EXT4,
        &v4,
    );
    assert_local_pod_saw_client(
        &agent,
        &topo.client(&["tcp", &v6, "--count", "4"]),
        EXT6,
        &v6,
    );
    assert_local_pod_saw_client(
        &agent,
        &topo.client(&["udp", &v6, "--count", "4", "--connected"]),
        EXT6,
        &v6,
    );
    assert!(agent.stat("xdp_new_flow") >= 14, "{}", agent.lb(&["stats"]));
    assert!(agent.stat("xdp_tracked") > 0);
    assert!(agent.stat("tc_reply_xlated") > 0);
}

#[test]
fn etp_local_without_a_local_endpoint_drops() {
    let topo = Topology::new();
    let dir = TempDir::new("ns");
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    agent.wait_for(&["10.250.2.2:30081/TCP"]);
    let before = agent.stat("xdp_drop_no_local_endpoint");
    let outcomes = topo.client(&["tcp", &format!("{NODE4}:30081")]);
    assert_eq!(outcomes.len(), 1);
    // std's connect_timeout reports its own timeout (no errno); a reset would be ECONNREFUSED.
    assert_eq!(
        (outcomes[0].errno, outcomes[0].error.as_deref()),
        (None, Some("connection timed out")),
        "dropped: the client times out, no reset"
    );
    assert!(agent.stat("xdp_drop_no_local_endpoint") > before);
}
