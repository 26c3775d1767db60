//! Sockets connected to a backend that left its Service (issue 10, section 3): lb closes the
//! connected UDP sockets it sent there (and, with `--close-tcp-to-removed-backends`, the TCP
//! connections), so the application gets an error and reconnects to a live backend; sockets
//! lb did not translate are left alone; affinity and UDP-flow entries never bring a removed
//! backend back.
//!
//! The clients are `lb-testpod stream`: one socket, a request every 10 ms, one JSON line per
//! reply or error, reconnecting after an error.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use lb_tests::{Agent, Netns, Node, Proc, TempDir, backends, die_with_parent, testpod_bin};
use serde::Deserialize;

/// What lb promises: within this long after the backend left the Service in the kernel, its
/// sockets are closed.
const WITHIN: Duration = Duration::from_secs(1);

/// A Service (`affinity`: ClientIP with the default timeout) with one EndpointSlice holding
/// `pods` (addresses) on `target`.
fn service(
    name: &str,
    ip: &str,
    port: u16,
    target: u16,
    proto: &str,
    affinity: bool,
    pods: &[String],
) -> String {
    let text = lb_tests::service_manifest(name, ip, port, target, proto, pods);
    if affinity {
        text.replacen("  ports:", "  sessionAffinity: ClientIP\n  ports:", 1)
    } else {
        text
    }
}

/// One line of `lb-testpod stream`.
#[derive(Clone, Debug, Deserialize)]
struct Event {
    t_ms: u64,
    backend: Option<String>,
    #[expect(dead_code, reason = "shown in failure messages")]
    op: Option<String>,
    errno: Option<i32>,
    so_error: Option<i32>,
    #[expect(dead_code, reason = "shown in failure messages")]
    error: Option<String>,
}

impl Event {
    fn is_error(&self) -> bool {
        self.backend.is_none()
    }

    /// An error that means "the socket was closed under me" (not a lost reply).
    fn is_abort(&self) -> bool {
        self.is_error() && self.errno != Some(libc::EAGAIN)
    }

    fn aborted_with(&self, errno: i32) -> bool {
        self.errno == Some(errno) || self.so_error == Some(errno)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).expect("ms"))
        .expect("clock")
}

/// A running `lb-testpod stream` in the node's client namespace and cgroup; its events
/// arrive on a channel as they are printed.
struct Stream {
    _proc: Proc,
    events: mpsc::Receiver<Event>,
    seen: Vec<Event>,
}

impl Stream {
    fn start(node: &Node, args: &[&str]) -> Self {
        let mut cmd = Command::new(testpod_bin());
        die_with_parent(&mut cmd)
            .arg("--cgroup")
            .arg(&node.cgroup.path)
            .arg("--netns")
            .arg(node.client.path())
            .arg("stream")
            .args(args)
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lb-testpod stream");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event: Event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stream output {line:?}: {e}"));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Self {
            _proc: Proc(child),
            events,
            seen: Vec::new(),
        }
    }

    /// The next event matching `want`, within `within`; panics with everything seen if none.
    fn wait(&mut self, within: Duration, what: &str, want: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if want(&event) {
                        return event;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {within:?}; events: {:#?}",
                    self.seen.iter().rev().take(20).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Every event for `duration` from now.
    fn collect(&mut self, duration: Duration) -> Vec<Event> {
        let deadline = Instant::now() + duration;
        let mut out = Vec::new();
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(event.clone());
            out.push(event);
        }
        out
    }

    /// The first reply's backend.
    fn first_backend(&mut self) -> String {
        self.wait(Duration::from_secs(3), "reply", |e| e.backend.is_some())
            .backend
            .expect("a reply")
    }
}

/// UDP datagrams that reached `netns` (its UDP and UDP6 MIBs: delivered, no port, errors).
fn udp_datagrams_in(netns: &Netns) -> u64 {
    let read = |file: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["cat", file])
            .output()
            .expect("nsenter cat");
        assert!(out.status.success(), "reading {file} in {}", netns.name);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    const FIELDS: [&str; 3] = ["InDatagrams", "NoPorts", "InErrors"];
    let snmp = read("/proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        udp.next().expect("Udp header"),
        udp.next().expect("Udp values"),
    );
    let v4: u64 = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| FIELDS.contains(n))
        .map(|(_, v)| v.parse::<u64>().expect("counter"))
        .sum();
    let v6: u64 = read("/proc/net/snmp6")
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(n, _)| FIELDS.iter().any(|f| *n == format!("Udp6{f}")))
        .map(|(_, v)| v.trim().parse::<u64>().expect("counter"))
        .sum();
    v4 + v6
}

/// Two pods (pod1, pod2) serving TCP 8080 and UDP 5353, and lb on `svc` made from their
/// addresses; fields drop in order (clients, lb, then the node).
struct Fixture {
    agent: Agent,
    dir: TempDir,
    node: Node,
}

impl Fixture {
    fn start(file: &str, svc: impl Fn(&[String]) -> String, flags: &[&str]) -> Self {
        let mut node = Node::new();
        node.add_pod(1, "pod1", &[8080], &[5353]);
        node.add_pod(2, "pod2", &[8080], &[5353]);
        let dir = TempDir::new("m");
        dir.write(file, &svc(&Self::ips_of(&node)));
        let agent =
            Agent::start_manifests_with(&node.cgroup.path, &dir.0, flags, Duration::from_secs(20));
        Self { agent, dir, node }
    }

    fn ips_of(node: &Node) -> Vec<String> {
        node.pods.iter().map(|p| p.ip4.to_string()).collect()
    }

    fn pod(&self, name: &str) -> &lb_tests::Pod {
        self.node
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Rewrites `file` with only the pods named `keep`, waits until the kernel holds exactly
    /// them for `frontend`, and returns the wall-clock time (ms) it saw that at (an upper
    /// bound of when the removal reached the kernel).
    fn set_backends(
        &self,
        file: &str,
        frontend: &str,
        target: u16,
        keep: &[&str],
        svc: impl Fn(&[String]) -> String,
    ) -> u64 {
        let ips: Vec<String> = keep.iter().map(|n| self.pod(n).ip4.to_string()).collect();
        self.dir.write(file, &svc(&ips));
        let want: Vec<String> = ips.iter().map(|ip| format!("{ip}:{target}")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        self.agent
            .wait_for(frontend, Some(&want), Duration::from_secs(3));
        now_ms()
    }

    /// A Prometheus sample's value (0 if absent).
    fn metric(&self, sample: &str) -> f64 {
        self.agent
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn other(name: &str) -> &'static str {
    if name == "pod1" { "pod2" } else { "pod1" }
}

const DNS: &str = "10.96.0.20:53/UDP";

fn dns(ips: &[String]) -> String {
    service("dns", "10.96.0.20", 53, 5353, "UDP", false, ips)
}

#[test]
fn connected_udp_to_a_removed_backend_is_closed_and_reconnects_to_a_live_one() {
    let f = Fixture::start("dns.yaml", dns, &[]);
    let mut client = Stream::start(&f.node, &["10.96.0.20:53", "--duration-ms", "15000"]);
    let gone = client.first_backend();
    let live = other(&gone);
    let removed_at = f.set_backends("dns.yaml", DNS, 5353, &[live], dns);

    // The socket is closed under the client: ECONNABORTED (from recv, or pending in SO_ERROR
    // when the send after the close found the socket disconnected).
    let abort = client.wait(Duration::from_secs(3), "error", Event::is_abort);
    assert!(
        abort.aborted_with(libc::ECONNABORTED),
        "expected ECONNABORTED: {abort:?}"
    );
    assert!(
        abort.t_ms <= removed_at + 1000,
        "closed {} ms after the removal reached the kernel (limit {WITHIN:?})",
        abort.t_ms.saturating_sub(removed_at)
    );
    let to_gone_after_abort = client.collect(Duration::from_millis(300));

    // From removal + 1 s on, the removed pod receives nothing; the client is served by the
    // live pod.
    let quiet_from = removed_at + 1000;
    std::thread::sleep(Duration::from_millis(quiet_from.saturating_sub(now_ms())));
    let before = udp_datagrams_in(&f.pod(&gone).netns);
    let later = client.collect(Duration::from_millis(1500));
    let after = udp_datagrams_in(&f.pod(&gone).netns);
    assert_eq!(
        before,
        after,
        "{gone} received {} datagrams after removal + 1 s",
        after - before
    );
    let replies: Vec<&str> = to_gone_after_abort
        .iter()
        .chain(&later)
        .filter_map(|e| e.backend.as_deref())
        .collect();
    assert!(
        replies.len() > 20,
        "too few replies after reconnecting: {later:?}"
    );
    assert!(
        replies.iter().all(|b| *b == live),
        "after the reconnect only {live} answers: {replies:?}"
    );
    assert!(
        later.iter().all(|e| !e.is_error()),
        "no errors after the reconnect: {later:?}"
    );
    assert!(f.metric("lb_sockets_destroyed_total{proto=\"udp\"}") >= 1.0);
    assert!(f.metric("lb_socket_destroy_failures_total").abs() < f64::EPSILON);
}

#[test]
fn udp_connected_to_the_pod_directly_is_not_closed() {
    let f = Fixture::start("dns.yaml", dns, &[]);
    // Through the Service (the control: this one must close) ...
    let mut via_service = Stream::start(&f.node, &["10.96.0.20:53", "--duration-ms", "15000"]);
    let gone = via_service.first_backend();
    let live = other(&gone);
    // ... and straight to the same pod's address from the same namespace and cgroup.
    let pod_addr = format!("{}:5353", f.pod(&gone).ip4);
    let mut direct = Stream::start(&f.node, &[&pod_addr, "--duration-ms", "15000"]);
    assert_eq!(direct.first_backend(), gone);
    let removed_at = f.set_backends("dns.yaml", DNS, 5353, &[live], dns);

    via_service.wait(Duration::from_secs(3), "error", Event::is_abort);
    // The direct socket keeps talking to the pod, without an error, well past the removal.
    let until = removed_at + 1500;
    let events = direct.collect(Duration::from_millis(until.saturating_sub(now_ms())));
    assert!(
        events.iter().all(|e| !e.is_error()),
        "the direct socket got an error: {events:?}"
    );
    let late: Vec<&Event> = events
        .iter()
        .filter(|e| e.t_ms > removed_at + 1000)
        .collect();
    assert!(
        late.len() > 20,
        "too few direct replies late on: {events:?}"
    );
    assert!(
        late.iter()
            .all(|e| e.backend.as_deref() == Some(gone.as_str())),
        "the direct socket still reaches {gone}: {late:?}"
    );
}

const WEB: &str = "10.96.0.21:80/TCP";

fn web(ips: &[String]) -> String {
    service("web", "10.96.0.21", 80, 8080, "TCP", false, ips)
}

#[test]
fn tcp_to_a_removed_backend_stays_established_by_default() {
    let f = Fixture::start("web.yaml", web, &[]);
    let mut client = Stream::start(
        &f.node,
        &["10.96.0.21:80", "--tcp", "--duration-ms", "15000"],
    );
    let gone = client.first_backend();
    let removed_at = f.set_backends("web.yaml", WEB, 8080, &[other(&gone)], web);
    let until = removed_at + 1500;
    let events = client.collect(Duration::from_millis(until.saturating_sub(now_ms())));
    assert!(
        events.iter().all(|e| !e.is_error()),
        "the connection broke: {events:?}"
    );
    let late: Vec<&Event> = events
        .iter()
        .filter(|e| e.t_ms > removed_at + 1000)
        .collect();
    assert!(late.len() > 20, "too few replies late on: {events:?}");
    assert!(
        late.iter()
            .all(|e| e.backend.as_deref() == Some(gone.as_str())),
        "the established connection stays on {gone}: {late:?}"
    );
    assert!(f.metric("lb_sockets_destroyed_total{proto=\"tcp\"}").abs() < f64::EPSILON);
}

#[test]
fn tcp_to_a_removed_backend_is_reset_with_the_flag() {
    let f = Fixture::start("web.yaml", web, &["--close-tcp-to-removed-backends"]);
    let mut client = Stream::start(
        &f.node,
        &["10.96.0.21:80", "--tcp", "--duration-ms", "15000"],
    );
    let gone = client.first_backend();
    let live = other(&gone);
    let removed_at = f.set_backends("web.yaml", WEB, 8080, &[live], web);
    let abort = client.wait(Duration::from_secs(3), "error", Event::is_abort);
    assert!(
        abort.aborted_with(libc::ECONNABORTED),
        "expected ECONNABORTED: {abort:?}"
    );
    assert!(
        abort.t_ms <= removed_at + 1000,
        "closed {} ms after the removal reached the kernel (limit {WITHIN:?})",
        abort.t_ms.saturating_sub(removed_at)
    );
    let later = client.collect(Duration::from_millis(800));
    let replies: Vec<&str> = later.iter().filter_map(|e| e.backend.as_deref()).collect();
    assert!(
        replies.len() > 10,
        "too few replies after reconnecting: {later:?}"
    );
    assert!(
        later.iter().all(|e| e.backend.as_deref() == Some(live)),
        "the new connection goes to {live}: {later:?}"
    );
    assert!(f.metric("lb_sockets_destroyed_total{proto=\"tcp\"}") >= 1.0);
}

#[test]
fn affinity_and_udp_flows_never_return_to_a_removed_backend() {
    const STICKY: &str = "10.96.0.22:80/TCP";
    const FLOW: &str = "10.96.0.23:53/UDP";
    let sticky = |ips: &[String]| service("sticky", "10.96.0.22", 80, 8080, "TCP", true, ips);
    let flow = |ips: &[String]| service("flow", "10.96.0.23", 53, 5353, "UDP", false, ips);
    let f = Fixture::start("sticky.yaml", sticky, &[]);
    f.dir.write("flow.yaml", &flow(&Fixture::ips_of(&f.node)));
    let all: Vec<String> = Fixture::ips_of(&f.node)
        .iter()
        .map(|ip| format!("{ip}:5353"))
        .collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    f.agent.wait_for(FLOW, Some(&all), Duration::from_secs(3));

    // ClientIP affinity: every connection on one backend.
    let first = backends(&f.node.client(&["tcp", "10.96.0.22:80", "--count", "10"]));
    let gone = first[0].clone();
    assert!(first.iter().all(|b| *b == gone), "affinity: {first:?}");
    // An unconnected UDP socket keeps its flow's backend.
    let mut flow_client = Stream::start(
        &f.node,
        &["10.96.0.23:53", "--unconnected", "--duration-ms", "15000"],
    );
    let flow_gone = flow_client.first_backend();
    let early = flow_client.collect(Duration::from_millis(200));
    assert!(
        early
            .iter()
            .all(|e| e.backend.as_deref() == Some(flow_gone.as_str())),
        "a flow stays on its backend: {early:?}"
    );

    // The affinity backend leaves: new connections go to the other one.
    let live = other(&gone);
    f.set_backends("sticky.yaml", STICKY, 8080, &[live], sticky);
    let after = backends(&f.node.client(&["tcp", "10.96.0.22:80", "--count", "10"]));
    assert!(
        after.iter().all(|b| b == live),
        "affinity moved to {live}: {after:?}"
    );
    // The flow's backend leaves: the same socket's next datagrams go to the other one, with
    // no error (an unconnected socket has nothing to close).
    let flow_live = other(&flow_gone);
    let removed_at = f.set_backends("flow.yaml", FLOW, 5353, &[flow_live], flow);
    let moved = flow_client.collect(Duration::from_millis(500));
    assert!(moved.iter().all(|e| !e.is_error()), "{moved:?}");
    let after_removal: Vec<&Event> = moved.iter().filter(|e| e.t_ms > removed_at).collect();
    assert!(!after_removal.is_empty(), "{moved:?}");
    assert!(
        after_removal
            .iter()
            .all(|e| e.backend.as_deref() == Some(flow_live)),
        "the flow moved to {flow_live}: {moved:?}"
    );

    // Both come back: the entries now point at the live backends and stay there; the
    // removed backend is never chosen from the old entries again.
    f.set_backends("sticky.yaml", STICKY, 8080, &["pod1", "pod2"], sticky);
    let back = backends(&f.node.client(&["tcp", "10.96.0.22:80", "--count", "10"]));
    assert!(
        back.iter().all(|b| b == live),
        "affinity stays on {live}: {back:?}"
    );
    f.set_backends("flow.yaml", FLOW, 5353, &["pod1", "pod2"], flow);
    let stays = flow_client.collect(Duration::from_millis(500));
    assert!(
        stays
            .iter()
            .all(|e| e.backend.as_deref() == Some(flow_live)),
        "the flow stays on {flow_live}: {stays:?}"
    );
}
