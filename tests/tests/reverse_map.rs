//! The reverse map `LB_REVERSE` (layout 5, issue 11): a TCP connect through the one frontend
//! a backend's entry names writes no socket storage, and getpeername answers from the entry;
//! every other socket keeps exact answers: direct connects to a backend (also those opened
//! before the pod was a backend), sockets through a Service that is then deleted, loses the
//! backend or hands it to another frontend, an address reused by another pod, and an agent
//! stopped in the middle of the protocol.
//!
//! Real sockets in the node's client namespace and cgroup (`lb-testpod hold`: TCP sockets
//! kept open while the test changes the Services, each reporting getpeername and the pod
//! that answers on it); the map is read with bpftool.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Agent, Cgroup, Node, Proc, TempDir, die_with_parent, service_manifest, testpod_bin, unique,
};
use serde::Deserialize;

/// States of `lb_common::maps::Reverse`.
const PENDING: u32 = 1;
const ACTIVE: u32 = 2;
const DRAINING: u32 = 3;

/// Long enough for a round of the protocol (1 s grace before each socket walk) or two.
const SETTLE: Duration = Duration::from_secs(10);

/// One held socket, as `lb-testpod hold` reports it.
#[derive(Clone, Debug, Deserialize)]
struct Held {
    to: String,
    peer: Option<String>,
    backend: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Report {
    held: Vec<Held>,
    error: Option<String>,
}

/// `lb-testpod hold` in the node's client namespace and cgroup.
struct Holder {
    _proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn start(node: &Node) -> Self {
        Self::start_in(node, &node.cgroup.path)
    }

    /// `lb-testpod hold` in the node's client namespace and cgroup `cgroup`.
    fn start_in(node: &Node, cgroup: &std::path::Path) -> Self {
        let mut cmd = Command::new(testpod_bin());
        die_with_parent(&mut cmd)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--netns")
            .arg(node.client.path())
            .arg("hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lb-testpod hold");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            _proc: Proc(child),
            stdin,
            stdout,
        }
    }

    /// Sends `line`; returns the report as it is (errors included).
    fn report(&mut self, line: &str) -> Report {
        writeln!(self.stdin, "{line}").expect("write to hold");
        self.stdin.flush().expect("flush");
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("read hold");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("hold output {out:?}: {e}"))
    }

    fn command(&mut self, line: &str) -> Vec<Held> {
        let report = self.report(line);
        assert!(report.error.is_none(), "{line}: {report:?}");
        for held in &report.held {
            assert!(held.error.is_none(), "{held:?}");
        }
        report.held
    }

    /// Opens a socket to `addr`; returns every socket's report.
    fn open(&mut self, addr: &str) -> Vec<Held> {
        self.command(&format!("open {addr}"))
    }

    fn show(&mut self) -> Vec<Held> {
        self.command("show")
    }
}

/// One `LB_REVERSE` entry: backend, Service (address:port), state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    backend: String,
    service: String,
    state: u32,
}

/// An IPv4-mapped address and a network-order port from a key or value.
fn addr_port(bytes: &[u8]) -> String {
    let ip = std::net::Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]);
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    format!("{ip}:{port}")
}

fn reverse_entries(agent: &Agent) -> Vec<Entry> {
    let mut entries: Vec<Entry> = lb_tests::pinned::dump(&agent.pin_path.join("maps/LB_REVERSE"))
        .iter()
        .map(|e| Entry {
            backend: addr_port(&e.key),
            service: addr_port(&e.value),
            state: u32::from_ne_bytes([e.value[24], e.value[25], e.value[26], e.value[27]]),
        })
        .collect();
    entries.sort_by(|a, b| a.backend.cmp(&b.backend));
    entries
}

/// Writes one `LB_REVERSE` entry as a stopped agent could have left it.
fn write_entry(agent: &Agent, entry: &Entry, id: u32) {
    let parse = |s: &str| -> ([u8; 4], u16) {
        let a: std::net::SocketAddrV4 = s.parse().expect("addr:port");
        (a.ip().octets(), a.port())
    };
    let (b_ip, b_port) = parse(&entry.backend);
    let (s_ip, s_port) = parse(&entry.service);
    let mut key = vec![0u8; 10];
    key.extend([0xff, 0xff]);
    key.extend(b_ip);
    key.extend(b_port.to_be_bytes());
    key.extend([6, 0]);
    let mut value = vec![0u8; 10];
    value.extend([0xff, 0xff]);
    value.extend(s_ip);
    value.extend(s_port.to_be_bytes());
    value.extend([0, 0]);
    value.extend(id.to_ne_bytes());
    value.extend(entry.state.to_ne_bytes());
    lb_tests::pinned::update(&agent.pin_path.join("maps/LB_REVERSE"), &key, &value);
}

/// Waits until the entries are exactly `want` (backend, service, state), sorted by backend.
fn wait_entries(agent: &Agent, want: &[(&str, &str, u32)]) {
    wait_entries_within(agent, want, SETTLE);
}

/// [`wait_entries`] for up to `within`.
fn wait_entries_within(agent: &Agent, want: &[(&str, &str, u32)], within: Duration) {
    let want: Vec<Entry> = want
        .iter()
        .map(|(b, s, state)| Entry {
            backend: (*b).to_owned(),
            service: (*s).to_owned(),
            state: *state,
        })
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let got = reverse_entries(agent);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "LB_REVERSE is {got:?}, not {want:?} after {within:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counter(agent: &Agent, event: &str) -> f64 {
    agent
        .metric(&format!("lb_datapath_events_total{{event=\"{event}\"}}"))
        .unwrap_or(0.0)
}

/// The peers of the sockets opened to `to`.
fn peers_to(held: &[Held], to: &str) -> Vec<String> {
    held.iter()
        .filter(|h| h.to == to)
        .map(|h| h.peer.clone().expect("peer"))
        .collect()
}

/// A node with pods pod1..=podN serving TCP 8080.
fn node(pods: u8) -> Node {
    let mut node = Node::new();
    for n in 1..=pods {
        node.add_pod(n, &format!("pod{n}"), &[8080], &[]);
    }
    node
}

fn ip(node: &Node, n: usize) -> String {
    node.pods[n - 1].ip4.to_string()
}

fn pod_addr(node: &Node, n: usize) -> String {
    format!("{}:8080", ip(node, n))
}

fn svc(name: &str, cluster_ip: &str, pods: &[String]) -> String {
    service_manifest(name, cluster_ip, 80, 8080, "TCP", pods)
}

#[test]
fn service_connects_write_no_storage_and_getpeername_shows_the_service() {
    let node = node(2);
    let dir = TempDir::new("rev");
    dir.write(
        "web.yaml",
        &svc("web", "10.96.0.41", &[ip(&node, 1), ip(&node, 2)]),
    );
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    wait_entries(
        &agent,
        &[
            (&pod_addr(&node, 1), "10.96.0.41:80", ACTIVE),
            (&pod_addr(&node, 2), "10.96.0.41:80", ACTIVE),
        ],
    );
    let before = counter(&agent, "connect_no_storage");
    let xlated = counter(&agent, "connect_xlated");
    let mut hold = Holder::start(&node);
    for _ in 0..6 {
        hold.open("10.96.0.41:80");
    }
    let held = hold.show();
    assert_eq!(peers_to(&held, "10.96.0.41:80"), vec!["10.96.0.41:80"; 6]);
    assert!(held.iter().all(|h| h.backend.is_some()), "{held:?}");
    assert_eq!(counter(&agent, "connect_no_storage") - before, 6.0);
    assert_eq!(counter(&agent, "connect_xlated") - xlated, 6.0);
    assert!(counter(&agent, "getpeername_reverse") >= 6.0);
    // A Service without entries of its own (its backend belongs to "web", the lower name)
    // still gets storage: peer shown from it.
    dir.write("zz.yaml", &svc("zz", "10.96.0.42", &[ip(&node, 1)]));
    agent.wait_for("10.96.0.42:80/TCP", Some(&[&pod_addr(&node, 1)]), SETTLE);
    let before = counter(&agent, "connect_no_storage");
    let held = hold.open("10.96.0.42:80");
    assert_eq!(peers_to(&held, "10.96.0.42:80"), ["10.96.0.42:80"]);
    assert_eq!(counter(&agent, "connect_no_storage"), before);
}

#[test]
fn direct_connects_to_a_backend_show_the_pod_also_those_opened_before() {
    let node = node(2);
    let dir = TempDir::new("rev");
    dir.write("other.yaml", &svc("other", "10.96.0.50", &[ip(&node, 2)]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    let mut hold = Holder::start(&node);
    // Connected to pod1 directly while pod1 is no backend: no storage.
    let p1 = pod_addr(&node, 1);
    hold.open(&p1);
    // pod1 becomes a backend of "web".
    dir.write("web.yaml", &svc("web", "10.96.0.51", &[ip(&node, 1)]));
    wait_entries(
        &agent,
        &[
            (&p1, "10.96.0.51:80", ACTIVE),
            (&pod_addr(&node, 2), "10.96.0.50:80", ACTIVE),
        ],
    );
    let marked = counter(&agent, "connect_direct_marked");
    // A direct connect now, one through the Service, one more direct (IPv4-mapped).
    hold.open(&p1);
    hold.open("10.96.0.51:80");
    hold.open(&format!("[::ffff:{}]:8080", ip(&node, 1)));
    let held = hold.show();
    assert_eq!(peers_to(&held, &p1), [p1.clone(), p1.clone()], "{held:?}");
    assert_eq!(peers_to(&held, "10.96.0.51:80"), ["10.96.0.51:80"]);
    assert_eq!(
        peers_to(&held, &format!("[::ffff:{}]:8080", ip(&node, 1))),
        [format!("[::ffff:{}]:8080", ip(&node, 1))]
    );
    assert!(held.iter().all(|h| h.backend.as_deref() == Some("pod1")));
    assert_eq!(counter(&agent, "connect_direct_marked") - marked, 2.0);
}

#[test]
fn service_sockets_keep_the_service_when_it_is_deleted_loses_the_backend_or_changes() {
    let node = node(3);
    let dir = TempDir::new("rev");
    let (p1, p2, p3) = (pod_addr(&node, 1), pod_addr(&node, 2), pod_addr(&node, 3));
    dir.write(
        "b.yaml",
        &svc("b", "10.96.0.61", &[ip(&node, 1), ip(&node, 2)]),
    );
    dir.write("c.yaml", &svc("c", "10.96.0.62", &[ip(&node, 3)]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    wait_entries(
        &agent,
        &[
            (&p1, "10.96.0.61:80", ACTIVE),
            (&p2, "10.96.0.61:80", ACTIVE),
            (&p3, "10.96.0.62:80", ACTIVE),
        ],
    );
    let mut hold = Holder::start(&node);
    let before = counter(&agent, "connect_no_storage");
    // Enough sockets through "b" to reach both pods; one through "c".
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let held = hold.open("10.96.0.61:80");
        reached.insert(held.last().and_then(|h| h.backend.clone()).expect("reply"));
        if reached.len() == 2 {
            break;
        }
    }
    assert_eq!(reached.len(), 2, "{reached:?}");
    hold.open("10.96.0.62:80");
    let through_b = peers_to(&hold.show(), "10.96.0.61:80").len();
    assert_eq!(
        counter(&agent, "connect_no_storage") - before,
        f64::from(u32::try_from(through_b + 1).expect("count"))
    );

    // The frontend of pod1 changes: "a" (a lower name) claims it. Then "b" loses pod2.
    dir.write("a.yaml", &svc("a", "10.96.0.60", &[ip(&node, 1)]));
    dir.write("b.yaml", &svc("b", "10.96.0.61", &[ip(&node, 1)]));
    wait_entries(
        &agent,
        &[
            (&p1, "10.96.0.60:80", ACTIVE),
            (&p3, "10.96.0.62:80", ACTIVE),
        ],
    );
    hold.open("10.96.0.60:80");
    let held = hold.show();
    assert_eq!(
        peers_to(&held, "10.96.0.61:80"),
        vec!["10.96.0.61:80"; through_b],
        "{held:?}"
    );
    assert_eq!(peers_to(&held, "10.96.0.60:80"), ["10.96.0.60:80"]);
    assert_eq!(peers_to(&held, "10.96.0.62:80"), ["10.96.0.62:80"]);

    // "c" is deleted, "a" too: their sockets keep their Services.
    dir.remove("c.yaml");
    dir.remove("a.yaml");
    wait_entries(&agent, &[(&p1, "10.96.0.61:80", ACTIVE)]);
    let held = hold.show();
    assert_eq!(peers_to(&held, "10.96.0.62:80"), ["10.96.0.62:80"]);
    assert_eq!(peers_to(&held, "10.96.0.60:80"), ["10.96.0.60:80"]);
    assert_eq!(
        peers_to(&held, "10.96.0.61:80"),
        vec!["10.96.0.61:80"; through_b]
    );
    // Everything still talks to its pod.
    assert!(held.iter().all(|h| h.backend.is_some()), "{held:?}");
}

#[test]
fn a_reused_pod_address_shows_each_socket_what_it_connected_to() {
    let node = node(1);
    let dir = TempDir::new("rev");
    let p1 = pod_addr(&node, 1);
    dir.write("old.yaml", &svc("old", "10.96.0.71", &[ip(&node, 1)]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    wait_entries(&agent, &[(&p1, "10.96.0.71:80", ACTIVE)]);
    let mut hold = Holder::start(&node);
    hold.open("10.96.0.71:80");
    // The pod goes away and "another pod" with its address becomes a backend of "new", in
    // one change (the old Service keeps its address, without endpoints).
    dir.write("old.yaml", &svc("old", "10.96.0.71", &[]));
    dir.write("new.yaml", &svc("new", "10.96.0.72", &[ip(&node, 1)]));
    wait_entries(&agent, &[(&p1, "10.96.0.72:80", ACTIVE)]);
    hold.open("10.96.0.72:80");
    hold.open(&p1);
    let held = hold.show();
    assert_eq!(peers_to(&held, "10.96.0.71:80"), ["10.96.0.71:80"]);
    assert_eq!(peers_to(&held, "10.96.0.72:80"), ["10.96.0.72:80"]);
    assert_eq!(peers_to(&held, &p1), std::slice::from_ref(&p1));
}

#[test]
fn an_agent_stopped_mid_protocol_finishes_it_on_start() {
    let node = node(2);
    let dir = TempDir::new("rev");
    let (p1, p2) = (pod_addr(&node, 1), pod_addr(&node, 2));
    dir.write("web.yaml", &svc("web", "10.96.0.81", &[ip(&node, 1)]));
    dir.write("web2.yaml", &svc("web2", "10.96.0.82", &[]));
    let mut agent = Agent::start(&node.cgroup.path, &dir.0);
    wait_entries(&agent, &[(&p1, "10.96.0.81:80", ACTIVE)]);
    let id_of = |agent: &Agent, frontend: &str| {
        agent
            .list()
            .iter()
            .find(|f| f.frontend == frontend)
            .unwrap_or_else(|| panic!("{frontend} not listed"))
            .id
    };
    let (id, id2) = (
        id_of(&agent, "10.96.0.81:80/TCP"),
        id_of(&agent, "10.96.0.82:80/TCP"),
    );
    let mut hold = Holder::start(&node);
    // Through "web" without storage, and directly to pod2 (no entry yet: no storage).
    hold.open("10.96.0.81:80");
    hold.open(&p2);
    agent.stop();
    // What an agent stopped in the middle leaves: web's entry draining (web was being
    // deleted), and pod2's entry pending (pod2 had just become web2's backend; its direct
    // sockets were not marked yet).
    let entry = |backend: &str, service: &str, state| Entry {
        backend: backend.to_owned(),
        service: service.to_owned(),
        state,
    };
    write_entry(&agent, &entry(&p1, "10.96.0.81:80", DRAINING), id);
    write_entry(&agent, &entry(&p2, "10.96.0.82:80", PENDING), id2);
    assert_eq!(
        reverse_entries(&agent),
        [
            entry(&p1, "10.96.0.81:80", DRAINING),
            entry(&p2, "10.96.0.82:80", PENDING)
        ]
    );
    // Pending: getpeername ignores it, so the direct socket still shows the pod.
    assert_eq!(peers_to(&hold.show(), &p2), std::slice::from_ref(&p2));
    dir.remove("web.yaml");
    dir.write("web2.yaml", &svc("web2", "10.96.0.82", &[ip(&node, 2)]));
    agent.restart();
    wait_entries(&agent, &[(&p2, "10.96.0.82:80", ACTIVE)]);
    hold.open("10.96.0.82:80");
    let held = hold.show();
    assert_eq!(peers_to(&held, "10.96.0.81:80"), ["10.96.0.81:80"]);
    assert_eq!(peers_to(&held, &p2), std::slice::from_ref(&p2), "{held:?}");
    assert_eq!(peers_to(&held, "10.96.0.82:80"), ["10.96.0.82:80"]);
    assert!(held.iter().all(|h| h.backend.is_some()), "{held:?}");
}

#[test]
fn a_socket_without_storage_to_a_removed_backend_is_reset_with_the_flag() {
    let node = node(2);
    let dir = TempDir::new("rev");
    dir.write(
        "web.yaml",
        &svc("web", "10.96.0.91", &[ip(&node, 1), ip(&node, 2)]),
    );
    let agent = start_closing(&node, &dir, "10.96.0.91:80");
    let (mut hold, to_pod1) = open_counting(&agent, &node, "connect_no_storage");
    // pod1 leaves: its socket (no storage: the reverse entry names the Service) is reset,
    // the others stay.
    dir.write("web.yaml", &svc("web", "10.96.0.91", &[ip(&node, 2)]));
    wait_only_reset(&mut hold, &agent, to_pod1);
}

#[test]
fn a_socket_whose_state_is_in_its_slot_to_a_removed_backend_is_reset_with_the_flag() {
    // "aweb" sorts first and owns pod1's and pod2's reverse entries, so connects through
    // "web" (the same pods) write their state in a LB_TCP_SOCKS slot. pod1 leaves "web" only:
    // the socket through web to pod1 is found by its slot (its cookie, from the dump) and
    // reset; the others stay.
    let node = node(2);
    let dir = TempDir::new("rev");
    let pods = [ip(&node, 1), ip(&node, 2)];
    dir.write("aweb.yaml", &svc("aweb", "10.96.0.92", &pods));
    dir.write("web.yaml", &svc("web", "10.96.0.91", &pods));
    let agent = start_closing(&node, &dir, "10.96.0.92:80");
    // Each connect through web claimed a slot.
    let (mut hold, to_pod1) = open_counting(&agent, &node, "tcp_socks_claimed");
    dir.write("web.yaml", &svc("web", "10.96.0.91", &[ip(&node, 2)]));
    wait_only_reset(&mut hold, &agent, to_pod1);
}

/// An agent with `--close-tcp-to-removed-backends` on the manifests in `dir`, once pod1's and
/// pod2's reverse entries name `owner` and are active.
fn start_closing(node: &Node, dir: &TempDir, owner: &str) -> Agent {
    let agent = Agent::start_manifests_with(
        &node.cgroup.path,
        &dir.0,
        &["--close-tcp-to-removed-backends"],
        Duration::from_secs(20),
    );
    wait_entries(
        &agent,
        &[
            (&pod_addr(node, 1), owner, ACTIVE),
            (&pod_addr(node, 2), owner, ACTIVE),
        ],
    );
    agent
}

/// Opens connections through web (10.96.0.91:80) until one reaches pod1
/// ([`open_until_pod1`]), and checks that each connect counted `event` once: the holder and
/// the index of pod1's socket.
fn open_counting(agent: &Agent, node: &Node, event: &str) -> (Holder, usize) {
    let before = counter(agent, event);
    let mut hold = Holder::start(node);
    let to_pod1 = open_until_pod1(&mut hold, "10.96.0.91:80");
    let opened = hold.show().len();
    assert_eq!(
        counter(agent, event) - before,
        f64::from(u32::try_from(opened).expect("count")),
        "{event}: one per connect"
    );
    (hold, to_pod1)
}

/// Opens sockets to `to` until one reaches pod1 (at most 40); its index among the held ones.
fn open_until_pod1(hold: &mut Holder, to: &str) -> usize {
    for i in 0..40 {
        let held = hold.open(to);
        if held[i].backend.as_deref() == Some("pod1") {
            return i;
        }
    }
    panic!("no socket to pod1 in 40 connects to {to}");
}

/// Waits (up to [`SETTLE`]) until a held socket is reset, and checks that it is the one at
/// `index` and only that one.
fn wait_only_reset(hold: &mut Holder, agent: &Agent, index: usize) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let report = hold.report("show");
        let reset: Vec<usize> = report
            .held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.error.is_some())
            .map(|(i, _)| i)
            .collect();
        if !reset.is_empty() {
            assert_eq!(reset, [index], "{report:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod1's socket was not reset: {report:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `lb_reverse_entries_stuck`.
fn stuck(agent: &Agent) -> f64 {
    agent.metric("lb_reverse_entries_stuck").unwrap_or(-1.0)
}

/// The peer of held socket `i`.
fn peer_of(held: &[Held], i: usize) -> Option<String> {
    held.get(i).and_then(|h| h.peer.clone())
}

#[test]
fn a_socket_the_walk_cannot_reach_holds_only_its_own_backend() {
    let node = node(2);
    let dir = TempDir::new("rev");
    let (p1, p2) = (pod_addr(&node, 1), pod_addr(&node, 2));
    dir.write("web.yaml", &svc("web", "10.96.0.101", &[]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    let mut hold = Holder::start(&node);
    // Direct sockets to both pods before they are backends (no storage), the one to pod1
    // then in flight in an SCM_RIGHTS message: held by no process.
    hold.open(&p1);
    hold.open(&p2);
    let report = hold.report("stash 0");
    assert!(report.error.is_none(), "{report:?}");
    assert_eq!(report.held[0].error.as_deref(), Some("in flight"));
    dir.write(
        "web.yaml",
        &svc("web", "10.96.0.101", &[ip(&node, 1), ip(&node, 2)]),
    );
    // pod2's entry goes on; pod1's stays pending while its socket is out of reach.
    wait_entries(
        &agent,
        &[
            (&p1, "10.96.0.101:80", PENDING),
            (&p2, "10.96.0.101:80", ACTIVE),
        ],
    );
    let deadline = Instant::now() + SETTLE;
    while stuck(&agent) != 1.0 {
        assert!(Instant::now() < deadline, "{}", agent.metrics_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reverse entry stuck"))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.iter().all(|l| l.contains(&p1)),
        "{log}"
    );
    // Retries (after 2 s, then 4 s, each with the 1 s grace) but one warning: rate-limited.
    std::thread::sleep(Duration::from_secs(7));
    let log = agent.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("reverse entry stuck"))
            .count(),
        1,
        "{log}"
    );
    assert_eq!(reverse_entries(&agent)[0].state, PENDING);
    assert_eq!(peer_of(&hold.report("show").held, 1), Some(p2.clone()));
    // Back in a process: the next retry (at most 16 s away, the backoff's cap) marks it
    // and the entry goes on.
    let report = hold.report("unstash 0");
    assert!(report.error.is_none(), "{report:?}");
    wait_entries_within(
        &agent,
        &[
            (&p1, "10.96.0.101:80", ACTIVE),
            (&p2, "10.96.0.101:80", ACTIVE),
        ],
        Duration::from_secs(25),
    );
    let deadline = Instant::now() + SETTLE;
    while stuck(&agent) != 0.0 {
        assert!(Instant::now() < deadline, "{}", agent.metrics_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    hold.open("10.96.0.101:80");
    let held = hold.show();
    assert_eq!(peer_of(&held, 0), Some(p1));
    assert_eq!(peer_of(&held, 1), Some(p2));
    assert_eq!(peer_of(&held, 2).as_deref(), Some("10.96.0.101:80"));
}

#[test]
fn a_socket_out_of_reach_in_another_cgroup_holds_nothing() {
    let node = node(1);
    let dir = TempDir::new("rev");
    let p1 = pod_addr(&node, 1);
    dir.write("web.yaml", &svc("web", "10.96.0.111", &[]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    // A process of a cgroup outside lb's (its getpeername never runs lb's program), its
    // socket to pod1 in flight.
    let elsewhere = Cgroup::new(&unique("revx"));
    let mut hold = Holder::start_in(&node, &elsewhere.path);
    hold.open(&p1);
    // A process of lb's cgroup in the same namespace (so that the namespace is walked even
    // by a walk limited to the namespaces of the cgroup's processes), with a direct socket
    // of its own to pod1.
    let mut inside = Holder::start(&node);
    inside.open(&p1);
    let report = hold.report("stash 0");
    assert!(report.error.is_none(), "{report:?}");
    dir.write("web.yaml", &svc("web", "10.96.0.111", &[ip(&node, 1)]));
    wait_entries(&agent, &[(&p1, "10.96.0.111:80", ACTIVE)]);
    assert_eq!(stuck(&agent), 0.0);
    let report = hold.report("unstash 0");
    assert!(report.error.is_none(), "{report:?}");
    assert_eq!(peer_of(&hold.show(), 0), Some(p1.clone()));
    assert_eq!(peer_of(&inside.show(), 0), Some(p1));
}

#[test]
fn a_direct_socket_made_in_another_namespace_is_found() {
    let node = node(2);
    let dir = TempDir::new("rev");
    let p1 = pod_addr(&node, 1);
    dir.write("web.yaml", &svc("web", "10.96.0.121", &[]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    let mut hold = Holder::start(&node);
    // From pod2's namespace (where no process of the cgroup is) straight to pod1, then
    // back: the socket lives in pod2's namespace, held by a process of the client's.
    let pod2_ns = node.pods[1].netns.path();
    let held = hold.command(&format!("open-in {} {p1}", pod2_ns.display()));
    assert_eq!(peer_of(&held, 0), Some(p1.clone()));
    hold.open(&p1);
    dir.write("web.yaml", &svc("web", "10.96.0.121", &[ip(&node, 1)]));
    wait_entries(&agent, &[(&p1, "10.96.0.121:80", ACTIVE)]);
    let held = hold.show();
    assert_eq!(peer_of(&held, 0), Some(p1.clone()), "{held:?}");
    assert_eq!(peer_of(&held, 1), Some(p1.clone()), "{held:?}");
    assert!(held.iter().all(|h| h.backend.as_deref() == Some("pod1")));
}

#[test]
fn a_socket_whose_descriptor_keeps_moving_is_never_skipped() {
    let node = node(1);
    let dir = TempDir::new("rev");
    let p1 = pod_addr(&node, 1);
    dir.write("web.yaml", &svc("web", "10.96.0.131", &[]));
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    let mut hold = Holder::start(&node);
    // Direct sockets to pod1 before it is a backend, each with its only descriptor moving
    // to another number every 100 µs: the walk's scan and its pidfd_getfd see different
    // numbers (EBADF, or another file), as after a fork whose parent closes its copy.
    for _ in 0..4 {
        hold.open(&p1);
    }
    for i in 0..4 {
        let report = hold.report(&format!("churn {i}"));
        assert!(report.error.is_none(), "{report:?}");
    }
    dir.write("web.yaml", &svc("web", "10.96.0.131", &[ip(&node, 1)]));
    wait_entries(&agent, &[(&p1, "10.96.0.131:80", ACTIVE)]);
    for i in 0..4 {
        let report = hold.report(&format!("unchurn {i}"));
        assert!(report.error.is_none(), "{report:?}");
    }
    let held = hold.show();
    assert_eq!(peers_to(&held, &p1), vec![p1.clone(); 4], "{held:?}");
    assert!(held.iter().all(|h| h.backend.as_deref() == Some("pod1")));
}
