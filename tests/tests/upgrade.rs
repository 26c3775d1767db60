//! An upgrade from the previous layout's release: the lb of layout 4 (main at 4c31145, built
//! from that commit by `cargo xtask test`, `lb_tests::previous_lb_bin`) serves a Service with
//! live sockets and north-south flows, stops (its pins stay), and the current lb starts on
//! the same pins. A connection made to a pod directly still shows the pod; every socket opened
//! through the Service still shows the Service (getpeername of a TCP connection and of a
//! connected UDP socket; the source of UDP replies, including a reply to a datagram sent
//! before the upgrade and read after it); connections and flows keep their backend; new
//! connections work; a first attempt that fails half-way is carried on by the next start; the
//! programs are swapped into the pinned links (no second attachment); the pinned layout
//! version is the current one; and `lb cleanup` leaves nothing.
//!
//! Topology: `lb_tests::north_south::Topology` (the node namespace holds the client cgroup's
//! sockets, pod1 and pod2 behind its bridge, and the external client behind a router).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Outcome, TempDir, attached_programs, lb_bin,
    north_south::{FlowClient, NODE4, NodeAgent, Topology},
    previous_lb_bin, testpod_bin,
};

const SVC: &str = "10.96.71.1:80";
/// pod1's address and port, one of the Service's endpoints.
const POD1: &str = "10.200.0.11:8080";
/// The layout version of the release the test upgrades from; the current lb's is the next
/// (an lb upgrades from the previous layout only).
const PREVIOUS_LAYOUT: u32 = 4;

/// A NodePort Service on 10.96.71.1:80 and node port 30101, TCP and UDP, on pod1 and pod2.
const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: upgrade}
spec:
  type: NodePort
  clusterIP: 10.96.71.1
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30101}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30101}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: upgrade-1, labels: {kubernetes.io/service-name: upgrade}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.200.0.11], nodeName: node-a}
- {addresses: [10.200.0.12], nodeName: node-a}
";

/// The value at `index` of the pinned `LB_CT_FWD` (read with bpftool).
fn forward_bucket(pin: &Path, index: u32) -> u32 {
    let bytes = lb_tests::pinned::lookup(&pin.join("maps/LB_CT_FWD"), &index.to_ne_bytes())
        .expect("an array has every index");
    u32::from_ne_bytes(bytes.try_into().expect("4 bytes"))
}

/// Entries of the pinned `LB_REVERSE` (read with bpftool).
fn reverse_entries(pin: &Path) -> usize {
    lb_tests::pinned::try_dump(&pin.join("maps/LB_REVERSE")).map_or(0, |e| e.len())
}

/// The layout version recorded in the pinned `LB_META` (read with bpftool, not with lb).
fn pinned_layout_version(pin: &Path) -> u32 {
    let bytes = lb_tests::pinned::lookup(&pin.join("maps/LB_META"), &0u32.to_ne_bytes())
        .expect("LB_META index 0");
    u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn wait_layout_version(agent: &NodeAgent, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.pin_path.join("maps/LB_META").exists()
        || pinned_layout_version(&agent.pin_path) != want
    {
        assert!(
            Instant::now() < deadline,
            "the pinned layout version is not {want}\nagent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One socket of the client cgroup running a script of `lb-testpod steps` that holds at a
/// `pause` step until [`HeldSocket::go_on`].
struct HeldSocket {
    child: Child,
    what: &'static str,
}

impl HeldSocket {
    /// Starts the script in the node's cgroup and namespace and waits until it is paused.
    fn start(topo: &Topology, what: &'static str, kind: &str, steps: &[&str]) -> Self {
        let mut child = lb_tests::die_with_parent(&mut Command::new(testpod_bin()))
            .arg("--cgroup")
            .arg(&topo.node.cgroup.path)
            .arg("--netns")
            .arg(topo.node.client.path())
            .args(["steps", "--socket", kind, "--timeout-ms", "3000"])
            .args(steps)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lb-testpod steps");
        let mut line = String::new();
        BufReader::new(child.stderr.as_mut().expect("stderr"))
            .read_line(&mut line)
            .expect("read stderr");
        assert_eq!(line.trim(), "paused", "{what}: the script did not pause");
        Self { child, what }
    }

    /// Lets the script finish; its outcomes, one per step.
    fn go_on(mut self) -> Vec<Outcome> {
        let mut stdin = self.child.stdin.take().expect("stdin");
        writeln!(stdin).expect("resume the script");
        drop(stdin);
        let out = self.child.wait_with_output().expect("wait for the script");
        assert!(
            out.status.success(),
            "{}: {}",
            self.what,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: output {:?}: {e}",
                self.what,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// The pod name in an answer ("NAME CLIENT-ADDR:PORT").
fn pod(outcome: &Outcome, what: &str) -> String {
    let answer = outcome
        .backend
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: no answer: {outcome:?}"));
    answer.split(' ').next().unwrap_or_default().to_owned()
}

fn assert_shows_service(outcome: &Outcome, what: &str) {
    assert_eq!(
        outcome.peer.as_deref(),
        Some(SVC),
        "{what} must show the Service: {outcome:?}"
    );
}

#[test]
fn live_sockets_and_flows_survive_an_upgrade_from_the_previous_release() {
    let previous = previous_lb_bin();
    let topo = Topology::new();
    let dir = TempDir::new("upg");
    dir.write("services.yaml", SERVICE);
    let mut agent = NodeAgent::start_binary(&topo.node, &dir.0, &previous);
    agent.wait_for(&[
        "10.96.71.1:80/TCP",
        "10.96.71.1:80/UDP",
        "10.250.2.2:30101/TCP",
        "10.250.2.2:30101/UDP",
    ]);
    wait_layout_version(&agent, PREVIOUS_LAYOUT);

    // Live sockets of the client cgroup, each held at `pause` across the upgrade.
    let tcp = HeldSocket::start(
        &topo,
        "TCP connection",
        "tcp4",
        &[
            &format!("connect:{SVC}"),
            "send",
            "readline",
            "pause",
            "getpeername",
            "send",
            "readline",
        ],
    );
    // A connection made to a pod directly (not through the Service) must keep showing the pod,
    // whatever the new layout learns about that pod's Services.
    let direct = HeldSocket::start(
        &topo,
        "TCP connection to a pod directly",
        "tcp4",
        &[
            &format!("connect:{POD1}"),
            "send",
            "readline",
            "pause",
            "getpeername",
            "send",
            "readline",
        ],
    );
    // The second datagram's reply waits in the socket and is read after the upgrade.
    let unconnected = HeldSocket::start(
        &topo,
        "unconnected UDP socket",
        "udp4",
        &[
            &format!("sendto:{SVC}"),
            "recvfrom",
            &format!("sendto:{SVC}"),
            "pause",
            "recvfrom",
            &format!("sendto:{SVC}"),
            "recvfrom",
        ],
    );
    let connected = HeldSocket::start(
        &topo,
        "connected UDP socket",
        "udp4",
        &[
            &format!("connect:{SVC}"),
            "send",
            "recvfrom",
            "send",
            "pause",
            "recvfrom",
            "getpeername",
            "send",
            "recvfrom",
        ],
    );
    // North-south flows from the external client through the NodePort.
    let nodeport = format!("{NODE4}:30101");
    let ns_tcp = FlowClient::tcp(&topo.ext, None, &nodeport).expect("NodePort TCP flow");
    let ns_udp = FlowClient::udp(&topo.ext, None, &nodeport).expect("NodePort UDP flow");
    let first = |answer: Result<String, String>, what: &str| {
        answer
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let ns_tcp_pod = first(ns_tcp.ask(), "NodePort TCP before the upgrade");
    let ns_udp_pod = first(ns_udp.ask(), "NodePort UDP before the upgrade");

    // The upgrade: the old agent stops (its pins and links stay), the current lb takes over.
    assert_eq!(agent.stop(), Some(0), "the previous lb exits 0 on SIGTERM");
    // A first attempt fails half-way (after the cgroup links took the new programs, at an
    // interface that does not exist): the previous version stays recorded, and the next start
    // carries the upgrade on.
    let failed = Command::new("nsenter")
        .arg(format!("--net={}", agent.netns.display()))
        .arg(lb_bin())
        .arg("run")
        .arg("--manifests")
        .arg(&dir.0)
        .arg("--cgroup")
        .arg(&topo.node.cgroup.path)
        .arg("--pin-path")
        .arg(&agent.pin_path)
        .args(["--node-name", "node-a", "--node-ip", NODE4])
        .args(["--xdp-iface", "n0", "--xdp-iface", "lbnope0"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("lb run");
    let failure = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && failure.contains("lbnope0"),
        "the interrupted upgrade: {failure}"
    );
    assert_eq!(
        pinned_layout_version(&agent.pin_path),
        PREVIOUS_LAYOUT,
        "an unfinished upgrade does not record the new version"
    );
    agent.set_binary(&lb_bin());
    let started = Instant::now();
    agent.start_again();
    wait_layout_version(&agent, PREVIOUS_LAYOUT + 1);
    eprintln!(
        "upgrade from layout {PREVIOUS_LAYOUT}: version recorded {:?} after the start",
        started.elapsed()
    );
    let log = agent.log_text();
    assert!(
        log.contains("upgrading the pinned maps"),
        "the new agent says it upgrades:\n{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("upgrad") || l.contains("migrated"))
    {
        eprintln!("agent: {line}");
    }

    // Sockets opened before the upgrade.
    let out = tcp.go_on();
    assert_eq!(out.len(), 7, "{out:?}");
    assert_shows_service(&out[2], "TCP getpeername before the upgrade");
    assert_shows_service(&out[4], "TCP getpeername after the upgrade");
    assert_eq!(
        pod(&out[6], "TCP after the upgrade"),
        pod(&out[2], "TCP before the upgrade"),
        "the TCP connection keeps its backend: {out:?}"
    );
    assert_shows_service(&out[6], "TCP getpeername (readline) after the upgrade");

    let out = direct.go_on();
    assert_eq!(out.len(), 7, "{out:?}");
    for (i, when) in [(2, "before"), (4, "after"), (6, "after")] {
        assert_eq!(
            out[i].peer.as_deref(),
            Some(POD1),
            "a direct connection's getpeername {when} the upgrade shows the pod: {out:?}"
        );
    }

    let out = unconnected.go_on();
    assert_eq!(out.len(), 7, "{out:?}");
    for (i, what) in [
        (1, "unconnected UDP reply before the upgrade"),
        (
            4,
            "unconnected UDP reply to a datagram sent before the upgrade, read after it",
        ),
        (6, "unconnected UDP reply after the upgrade"),
    ] {
        assert_shows_service(&out[i], what);
    }

    let out = connected.go_on();
    assert_eq!(out.len(), 9, "{out:?}");
    for (i, what) in [
        (2, "connected UDP reply before the upgrade"),
        (
            5,
            "connected UDP reply to a datagram sent before the upgrade, read after it",
        ),
        (6, "connected UDP getpeername after the upgrade"),
        (8, "connected UDP reply after the upgrade"),
    ] {
        assert_shows_service(&out[i], what);
    }
    assert_eq!(
        pod(&out[8], "connected UDP after the upgrade"),
        pod(&out[2], "connected UDP before the upgrade"),
        "the connected UDP socket keeps its backend: {out:?}"
    );

    // Every LB_CT_FWD bucket was set before the new XDP program ran (a layout-4 flow has a
    // forward entry, which the new program looks up only where the bucket says so), and the
    // map is marked consistent.
    for (proto, name) in [(6u8, "TCP"), (17, "UDP")] {
        let ip: std::net::Ipv4Addr = NODE4.parse().expect("node IPv4");
        let bucket = lb_common::nat::ct_forward_bucket(
            &lb_common::Addr::from_v4_octets(ip.octets()),
            30101u16.to_be(),
            proto,
        );
        assert_eq!(
            forward_bucket(&agent.pin_path, bucket),
            1,
            "the NodePort's {name} bucket after the upgrade"
        );
    }
    assert_eq!(
        forward_bucket(&agent.pin_path, lb_common::nat::CT_FORWARD_CONSISTENT),
        1,
        "LB_CT_FWD marked consistent"
    );

    // North-south flows keep their backend.
    assert_eq!(
        first(ns_tcp.ask(), "NodePort TCP after the upgrade"),
        ns_tcp_pod
    );
    assert_eq!(
        first(ns_udp.ask(), "NodePort UDP after the upgrade"),
        ns_udp_pod
    );

    // New connections through the upgraded datapath.
    for outcome in topo.node.client(&["tcp", SVC, "--count", "4"]) {
        assert_shows_service(&outcome, "a new TCP connection");
    }
    for outcome in topo.node.client(&["udp", SVC, "--count", "4"]) {
        assert_shows_service(&outcome, "a new unconnected UDP socket");
    }
    let fresh = FlowClient::tcp(&topo.ext, None, &nodeport).expect("a new NodePort TCP flow");
    first(fresh.ask(), "a new NodePort TCP flow");
    // A direct TCP connection to a backend (once its reverse entry exists) writes its state
    // in a slot of the new LB_TCP_SOCKS, which its close frees; it shows the pod.
    let deadline = Instant::now() + Duration::from_secs(15);
    while reverse_entries(&agent.pin_path) == 0 {
        assert!(
            Instant::now() < deadline,
            "no LB_REVERSE entry after the upgrade"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (claimed, released) = (
        agent.stat("tcp_socks_claimed"),
        agent.stat("tcp_socks_released"),
    );
    for outcome in topo.node.client(&["tcp", POD1, "--count", "2"]) {
        assert_eq!(
            outcome.peer.as_deref(),
            Some(POD1),
            "a new direct TCP connection shows the pod: {outcome:?}"
        );
    }
    assert_eq!(
        agent.stat("tcp_socks_claimed"),
        claimed + 2,
        "slots claimed"
    );
    assert_eq!(
        agent.stat("tcp_socks_released"),
        released + 2,
        "slots freed at close"
    );

    // The programs were swapped into the pinned links: one per hook, no second attachment;
    // the release hook is new in layout 5, attached by the upgrade.
    let programs = attached_programs(&topo.node.cgroup.path);
    assert_eq!(programs.len(), 9, "{programs:?}");
    assert!(
        !agent.pin_path.join("upgrade-from-4").exists(),
        "nothing left aside after the upgrade"
    );

    // `lb cleanup` (the current lb) removes everything.
    assert_eq!(agent.stop(), Some(0));
    let out = Command::new("nsenter")
        .arg(format!("--net={}", agent.netns.display()))
        .arg(lb_bin())
        .args(["cleanup", "--pin-path"])
        .arg(&agent.pin_path)
        .arg("--cgroup")
        .arg(&topo.node.cgroup.path)
        .output()
        .expect("lb cleanup");
    assert!(
        out.status.success(),
        "lb cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.pin_path.exists(), "pins left after lb cleanup");
    assert!(
        attached_programs(&topo.node.cgroup.path).is_empty(),
        "programs left on the cgroup"
    );
    let links = topo.node.client.ip(&["link", "show", "n0"]);
    assert!(!links.contains("xdp"), "XDP left on n0: {links}");
}
