//! Every socket pattern of the README's "Socket patterns" table, one test per row: what a
//! client sees through lb must be what kube-proxy shows it (conntrack keeps each flow apart,
//! so a client always sees the address it sent to).
//!
//! Each test runs `lb-testpod steps`: one socket, a script of syscalls, one outcome per step
//! (sends give an empty outcome; receives give the answering pod and the source address;
//! getpeername gives the peer).

use std::{collections::BTreeSet, process::Stdio};

use lb_tests::{
    Agent, Node, Outcome, Proc, TempDir, die_with_parent, service_manifest as service, testpod_bin,
};

/// UDP Service with one backend (pod1).
const DNS: &str = "10.96.0.20:53";
/// UDP Service with three backends (pod1..pod3).
const DNS3: &str = "10.96.0.21:53";
/// UDP Service sharing pod1:8080 with [`DNS`].
const ALT: &str = "10.96.0.22:53";
/// UDP Service with one backend (pod2).
const OTHER: &str = "10.96.0.23:53";
/// UDP Service with one backend (pod3): the fifth v4 UDP Service, so that one socket can
/// send to more Services than its socket storage keeps flows for.
const FIFTH: &str = "10.96.0.24:53";
/// TCP Service with three backends.
const WEB: &str = "10.96.0.10:80";
/// TCP Service sharing pod1:8080 with [`WEB`].
const WEB1: &str = "10.96.0.11:80";
/// TCP Service on pod1's MPTCP server (port 8081).
const WEBM: &str = "10.96.0.12:80";
/// IPv6 UDP Services: one backend (pod1), three backends.
const DNS_V6: &str = "[fd00:96::20]:53";
const DNS3_V6: &str = "[fd00:96::21]:53";

/// The MPTCP server's port in pod1.
const MPTCP_PORT: u16 = 8081;

/// Three pods (pod1..pod3, TCP and UDP 8080), the Services above, lb; fields drop in order.
struct Fixture {
    _mptcp: Option<Proc>,
    agent: Agent,
    _dir: TempDir,
    node: Node,
}

fn start() -> Fixture {
    start_with(false)
}

fn start_with(mptcp_server: bool) -> Fixture {
    let mut node = Node::new();
    for i in 1..=3 {
        node.add_pod(i, &format!("pod{i}"), &[8080], &[8080]);
    }
    let v4: Vec<String> = node.pods.iter().map(|p| p.ip4.to_string()).collect();
    let v6: Vec<String> = node.pods.iter().map(|p| p.ip6.to_string()).collect();
    let mptcp = mptcp_server.then(|| serve_mptcp(&node));
    let dir = TempDir::new("m");
    let ip = |vip: &str| {
        vip.rsplit_once(':')
            .map(|(ip, _)| ip.trim_matches(['[', ']']).to_owned())
            .expect("ip:port")
    };
    let files = [
        ("dns", service("dns", &ip(DNS), 53, 8080, "UDP", &v4[..1])),
        ("dns3", service("dns3", &ip(DNS3), 53, 8080, "UDP", &v4)),
        ("alt", service("alt", &ip(ALT), 53, 8080, "UDP", &v4[..1])),
        (
            "other",
            service("other", &ip(OTHER), 53, 8080, "UDP", &v4[1..2]),
        ),
        (
            "fifth",
            service("fifth", &ip(FIFTH), 53, 8080, "UDP", &v4[2..3]),
        ),
        ("web", service("web", &ip(WEB), 80, 8080, "TCP", &v4)),
        (
            "web1",
            service("web1", &ip(WEB1), 80, 8080, "TCP", &v4[..1]),
        ),
        (
            "webm",
            service("webm", &ip(WEBM), 80, MPTCP_PORT, "TCP", &v4[..1]),
        ),
        (
            "dns6",
            service("dns6", &ip(DNS_V6), 53, 8080, "UDP", &v6[..1]),
        ),
        (
            "dns36",
            service("dns36", &ip(DNS3_V6), 53, 8080, "UDP", &v6),
        ),
    ];
    for (name, text) in &files {
        dir.write(&format!("{name}.yaml"), text);
    }
    let agent = Agent::start(&node.cgroup.path, &dir.0);
    Fixture {
        _mptcp: mptcp,
        agent,
        _dir: dir,
        node,
    }
}

/// `lb-testpod serve-mptcp` in pod1, answering "pod1m".
fn serve_mptcp(node: &Node) -> Proc {
    use std::io::BufRead as _;
    let mut child = die_with_parent(&mut std::process::Command::new(testpod_bin()))
        .arg("--netns")
        .arg(node.pods[0].netns.path())
        .args([
            "serve-mptcp",
            "--name",
            "pod1m",
            "--port",
            &MPTCP_PORT.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lb-testpod serve-mptcp");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready", "MPTCP server did not start");
    Proc(child)
}

impl Fixture {
    /// Runs a script on one new socket of `socket` kind.
    fn steps(&self, socket: &str, steps: &[&str]) -> Vec<Outcome> {
        let mut args = vec!["steps", "--socket", socket, "--timeout-ms", "1500"];
        args.extend_from_slice(steps);
        let out = self.node.client(&args);
        assert_eq!(
            out.len(),
            steps.len() + steps.iter().map(|s| extra_outcomes(s)).sum::<usize>(),
            "{steps:?}: {out:?}"
        );
        out
    }

    /// Pod `n`'s IPv4 address with port 8080, as `ip:port`.
    fn pod(&self, n: usize) -> String {
        format!("{}:8080", self.node.pods[n - 1].ip4)
    }

    /// Pod `n`'s IPv4-mapped address with port 8080, as `[::ffff:ip]:port`.
    fn pod_mapped(&self, n: usize) -> String {
        format!("[::ffff:{}]:8080", self.node.pods[n - 1].ip4)
    }

    fn pod_v6(&self, n: usize) -> String {
        format!("[{}]:8080", self.node.pods[n - 1].ip6)
    }

    /// Asserts the agent's counter of datapath `event`.
    #[track_caller]
    fn assert_events(&self, event: &str, n: u64) {
        let text = self.agent.metrics_text();
        let line = format!("lb_datapath_events_total{{event=\"{event}\"}} {n}");
        assert!(text.lines().any(|l| l == line), "want {line}:\n{text}");
    }
}

/// `recvmmsg:N` reports N outcomes for one step.
fn extra_outcomes(step: &str) -> usize {
    step.strip_prefix("recvmmsg:")
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n - 1)
}

fn mapped(vip: &str) -> String {
    format!("[::ffff:{}", vip.replacen(':', "]:", 1))
}

/// A step that sent: no error.
#[track_caller]
fn assert_sent(o: &Outcome, all: &[Outcome]) {
    assert!(o.errno.is_none() && o.error.is_none(), "{o:?} in {all:?}");
}

/// A receive: the answering pod (or any, if None) and the address the client saw.
#[track_caller]
fn assert_answer(o: &Outcome, backend: Option<&str>, peer: &str, all: &[Outcome]) {
    assert!(o.backend.is_some(), "no answer: {o:?} in {all:?}");
    if let Some(b) = backend {
        assert_eq!(o.backend.as_deref(), Some(b), "answered by: {all:?}");
    }
    assert_eq!(o.peer.as_deref(), Some(peer), "source shown: {all:?}");
}

fn backend(o: &Outcome) -> &str {
    o.backend.as_deref().unwrap_or("(none)")
}

#[test]
fn tcp_connect_shows_the_service() {
    let f = start();
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        let out = f.steps(
            "tcp4",
            &["connect:10.96.0.10:80", "send", "readline", "getpeername"],
        );
        assert_sent(&out[0], &out);
        assert_answer(&out[2], None, WEB, &out);
        assert_eq!(out[3].peer.as_deref(), Some(WEB), "{out:?}");
        seen.insert(backend(&out[2]).to_owned());
    }
    assert!(seen.len() > 1, "new connections spread: {seen:?}");
}

#[test]
fn connected_udp_send_recv_getpeername_show_the_service() {
    let f = start();
    let out = f.steps(
        "udp4",
        &[
            "connect:10.96.0.21:53",
            "send",
            "recv",
            "getpeername",
            "send",
            "recvfrom",
            "send",
            "recvmsg",
        ],
    );
    let first = backend(&out[2]).to_owned();
    assert_eq!(out[2].peer, None);
    assert_eq!(out[3].peer.as_deref(), Some(DNS3), "{out:?}");
    assert_answer(&out[5], Some(&first), DNS3, &out);
    assert_answer(&out[7], Some(&first), DNS3, &out);
}

#[test]
fn connected_udp_sendto_its_own_service_stays_on_its_backend() {
    // kube-proxy: sendto() to the connected address has the connected 5-tuple, so the same
    // conntrack entry and backend; a datagram sent to another pod would get an answer the
    // connected socket never delivers. Three backends, eight sockets: a random choice per
    // datagram fails this (2/3)^8 of the time... and every other time.
    let f = start();
    for _ in 0..8 {
        let out = f.steps(
            "udp4",
            &[
                "connect:10.96.0.21:53",
                "send",
                "recv",
                "sendto:10.96.0.21:53",
                "recvfrom",
                "sendmsg:10.96.0.21:53",
                "recvmsg",
                "sendto:10.96.0.21:53",
                "recv",
            ],
        );
        let first = backend(&out[2]).to_owned();
        assert_answer(&out[4], Some(&first), DNS3, &out);
        assert_answer(&out[6], Some(&first), DNS3, &out);
        assert_eq!(out[8].backend.as_deref(), Some(first.as_str()), "{out:?}");
    }
    f.assert_events("sendmsg_connected", 8 * 3);
}

#[test]
fn connected_udp_sendto_another_service_gets_no_answer_as_with_kube_proxy() {
    // The answer comes from another peer than the connected one: the kernel does not deliver
    // it to a connected socket, with kube-proxy (source: the other Service) as with lb
    // (source: its pod). The connection itself carries on.
    let f = start();
    let out = f.steps(
        "udp4",
        &[
            "connect:10.96.0.20:53",
            "send",
            "recv",
            "sendto:10.96.0.23:53",
            "quiet:300",
            "send",
            "recvfrom",
        ],
    );
    assert_eq!(backend(&out[2]), "pod1", "{out:?}");
    assert_sent(&out[3], &out);
    assert_eq!(
        out[4].errno,
        Some(libc::EAGAIN),
        "nothing delivered: {out:?}"
    );
    assert_answer(&out[6], Some("pod1"), DNS, &out);
}

#[test]
fn unconnected_sendto_keeps_its_backend_and_answers_show_the_service() {
    let f = start();
    let mut steps = Vec::new();
    for _ in 0..5 {
        steps.extend(["sendto:10.96.0.21:53", "recvfrom"]);
    }
    let out = f.steps("udp4", &steps);
    let first = backend(&out[1]).to_owned();
    for o in out.iter().skip(1).step_by(2) {
        assert_answer(o, Some(&first), DNS3, &out);
    }
}

#[test]
fn sendmsg_and_recvmsg_show_the_service() {
    let f = start();
    let out = f.steps(
        "udp4",
        &[
            "sendmsg:10.96.0.21:53",
            "recvmsg",
            "sendmsg:10.96.0.21:53",
            "recvmsg",
            "sendmsg:10.96.0.20:53",
            "recvmsg",
        ],
    );
    let first = backend(&out[1]).to_owned();
    assert_answer(&out[1], None, DNS3, &out);
    assert_answer(&out[3], Some(&first), DNS3, &out);
    assert_answer(&out[5], Some("pod1"), DNS, &out);
}

#[test]
fn sendmmsg_to_services_and_a_pod_labels_each_answer() {
    // One call sends to two Services and straight to a pod; one recvmmsg gets the three
    // answers, each from where its datagram went.
    let f = start();
    let to = format!("sendmmsg:{DNS},{OTHER},{}", f.pod(3));
    let out = f.steps("udp4", &[&to, "recvmmsg:3"]);
    assert_sent(&out[0], &out);
    let got: BTreeSet<(String, String)> = out[1..]
        .iter()
        .map(|o| (backend(o).to_owned(), o.peer.clone().unwrap_or_default()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("pod1".to_owned(), DNS.to_owned()),
        ("pod2".to_owned(), OTHER.to_owned()),
        ("pod3".to_owned(), f.pod(3)),
    ]
    .into();
    assert_eq!(got, want, "{out:?}");
}

#[test]
fn recvfrom_recvmsg_recvmmsg_show_the_service() {
    let f = start();
    let out = f.steps(
        "udp4",
        &[
            "sendto:10.96.0.21:53",
            "recvfrom",
            "sendto:10.96.0.21:53",
            "recvmsg",
            "sendto:10.96.0.21:53",
            "sendto:10.96.0.21:53",
            "recvmmsg:2",
        ],
    );
    let first = backend(&out[1]).to_owned();
    for i in [1, 3, 6, 7] {
        assert_answer(&out[i], Some(&first), DNS3, &out);
    }
}

#[test]
fn getpeername_shows_the_service_for_every_connected_socket() {
    let f = start();
    let web_mapped = mapped(WEB);
    let dns_mapped = mapped(DNS3);
    let cases: [(&str, String, String); 6] = [
        ("tcp4", WEB.to_owned(), WEB.to_owned()),
        ("tcp6", web_mapped.clone(), web_mapped),
        ("mptcp4", WEB.to_owned(), WEB.to_owned()),
        ("udp4", DNS3.to_owned(), DNS3.to_owned()),
        ("udp6", dns_mapped.clone(), dns_mapped),
        // Not a Service: the pod itself.
        ("tcp4", f.pod(2), f.pod(2)),
    ];
    for (socket, to, peer) in cases {
        let out = f.steps(socket, &[&format!("connect:{to}"), "getpeername"]);
        assert_sent(&out[0], &out);
        assert_eq!(
            out[1].peer.as_deref(),
            Some(peer.as_str()),
            "{socket} to {to}: {out:?}"
        );
    }
}

#[test]
fn tcp_fast_open_is_translated_and_shows_the_service() {
    // sendto(MSG_FASTOPEN) connects inside sendmsg: the connect hook runs there too. With
    // TCP_FASTOPEN_CONNECT, connect() returns at once and the SYN leaves with the first write.
    let f = start();
    let out = f.steps(
        "tcp4",
        &["fastopen:10.96.0.10:80", "readline", "getpeername"],
    );
    assert_sent(&out[0], &out);
    assert_answer(&out[1], None, WEB, &out);
    assert_eq!(out[2].peer.as_deref(), Some(WEB), "{out:?}");
    let out = f.steps(
        "tcp4",
        &[
            "fastopen-connect:10.96.0.11:80",
            "send",
            "readline",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1"), WEB1, &out);
    assert_eq!(out[3].peer.as_deref(), Some(WEB1), "{out:?}");
    let out = f.steps("tcp6", &[&format!("fastopen:{}", mapped(WEB1)), "readline"]);
    assert_answer(&out[1], Some("pod1"), &mapped(WEB1), &out);
}

#[test]
fn mptcp_getpeername_shows_the_service() {
    // The connect hook runs on the MPTCP socket's first subflow; getpeername on the MPTCP
    // socket. Against an MPTCP server (a real MPTCP connection) and a TCP one (fallback).
    let f = start_with(true);
    let out = f.steps(
        "mptcp4",
        &[
            "connect:10.96.0.12:80",
            "send",
            "readline",
            "getpeername",
            "mptcp",
        ],
    );
    assert_answer(&out[2], Some("pod1m"), WEBM, &out);
    assert_eq!(out[3].peer.as_deref(), Some(WEBM), "{out:?}");
    assert_eq!(
        out[4].backend.as_deref(),
        Some("mptcp"),
        "MPTCP end to end: {out:?}"
    );
    let out = f.steps(
        "mptcp4",
        &["connect:10.96.0.10:80", "send", "readline", "getpeername"],
    );
    assert_answer(&out[2], None, WEB, &out);
    assert_eq!(out[3].peer.as_deref(), Some(WEB), "{out:?}");
    let webm = mapped(WEBM);
    let out = f.steps(
        "mptcp6",
        &[
            &format!("connect:{webm}"),
            "send",
            "readline",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1m"), &webm, &out);
    assert_eq!(out[3].peer.as_deref(), Some(webm.as_str()), "{out:?}");
}

/// Waits (up to 10 s) until `LB_REVERSE` holds an active entry `backend` -> `service` (both
/// `ip:port`, IPv4): from then on a Service connect to that backend writes no socket storage.
fn wait_for_active_reverse_entry(f: &Fixture, backend: &str, service: &str) {
    const ACTIVE: u32 = 2;
    let map = f.agent.pin_path.join("maps/LB_REVERSE");
    let addr_port = |b: &[u8]| {
        format!(
            "{}:{}",
            std::net::Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            u16::from_be_bytes([b[16], b[17]])
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let entries = lb_tests::pinned::try_dump(&map).unwrap_or_default();
        let found = entries.iter().any(|e| {
            e.key.len() >= 18
                && e.value.len() >= 28
                && addr_port(&e.key) == backend
                && addr_port(&e.value) == service
                && u32::from_ne_bytes([e.value[24], e.value[25], e.value[26], e.value[27]])
                    == ACTIVE
        });
        if found {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no active LB_REVERSE entry {backend} -> {service}: {entries:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_mptcp_subflow_added_later_keeps_the_service_in_getpeername() {
    // The client's path manager adds a second subflow from another address of the client
    // (`__mptcp_subflow_connect`: a kernel connect to the connection's peer, the backend, in
    // the connection's cgroup). The connect hook sees a direct connect to a backend that has a
    // reverse entry; it must leave the connection's translation alone.
    let f = start_with(true);
    let pod1 = &f.node.pods[0];
    f.node
        .client
        .ip(&["addr", "add", "10.200.0.9/24", "dev", "br0"]);
    f.node
        .client
        .ip(&["mptcp", "limits", "set", "subflow", "2"]);
    f.node.client.ip(&[
        "mptcp",
        "endpoint",
        "add",
        "10.200.0.9",
        "dev",
        "br0",
        "subflow",
    ]);
    pod1.netns.ip(&[
        "mptcp",
        "limits",
        "set",
        "subflow",
        "2",
        "add_addr_accepted",
        "2",
    ]);
    // The reverse entry of pod1's MPTCP port is active once a Service connect writes no
    // storage; connects before then still get storage, and the test would not test the case.
    wait_for_active_reverse_entry(&f, &format!("{}:{MPTCP_PORT}", pod1.ip4), WEBM);
    let out = f.steps(
        "mptcp4",
        &[
            &format!("connect:{WEBM}"),
            "send",
            "readline",
            "sleep:500",
            "getpeername",
            "mptcp",
            "send",
            "readline",
        ],
    );
    assert_answer(&out[2], Some("pod1m"), WEBM, &out);
    assert_eq!(out[4].peer.as_deref(), Some(WEBM), "{out:?}");
    assert_eq!(out[5].backend.as_deref(), Some("mptcp"), "{out:?}");
    assert_answer(&out[7], Some("pod1m"), WEBM, &out);
    let mib = lb_tests::sh(&[
        "nsenter",
        &format!("--net={}", f.node.client.path().display()),
        "nstat",
        "-az",
        "MPTcpExtMPJoinSynAckRx",
    ]);
    let joined: u64 = mib
        .lines()
        .find_map(|l| l.strip_prefix("MPTcpExtMPJoinSynAckRx"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(joined >= 1, "the path manager added no subflow: {mib}");
}

#[test]
fn v4_mapped_addresses_on_dual_stack_sockets() {
    // An AF_INET6 socket reaches a v4 Service by its mapped address, or by an AF_INET address
    // (the kernel runs the v4 hooks for it): answers show the mapped Service address.
    let f = start();
    let dns3 = mapped(DNS3);
    let out = f.steps(
        "udp6",
        &[
            &format!("sendto:{dns3}"),
            "recvfrom",
            "sendto:10.96.0.21:53",
            "recvfrom",
            &format!("sendto:{}", f.pod_mapped(1)),
            "recvfrom",
        ],
    );
    let first = backend(&out[1]).to_owned();
    assert_answer(&out[1], None, &dns3, &out);
    assert_answer(&out[3], Some(&first), &dns3, &out);
    assert_answer(&out[5], Some("pod1"), &f.pod_mapped(1), &out);
    let out = f.steps(
        "udp6",
        &[
            &format!("connect:{dns3}"),
            "send",
            "recvfrom",
            "getpeername",
        ],
    );
    assert_answer(&out[2], None, &dns3, &out);
    assert_eq!(out[3].peer.as_deref(), Some(dns3.as_str()), "{out:?}");
    let web = mapped(WEB);
    let out = f.steps("tcp6", &[&format!("connect:{web}"), "send", "readline"]);
    assert_answer(&out[2], None, &web, &out);
}

#[test]
fn services_sharing_a_pod_each_show_their_own_address() {
    // DNS and ALT both send to pod1:8080; one socket asks each in turn (as a resolver with
    // two nameservers does) and every answer shows the Service it asked.
    let f = start();
    let out = f.steps(
        "udp4",
        &[
            "sendto:10.96.0.20:53",
            "recvfrom",
            "sendto:10.96.0.22:53",
            "recvfrom",
            "sendto:10.96.0.20:53",
            "recvfrom",
            "sendmsg:10.96.0.22:53",
            "recvmsg",
        ],
    );
    for (i, vip) in [(1, DNS), (3, ALT), (5, DNS), (7, ALT)] {
        assert_answer(&out[i], Some("pod1"), vip, &out);
    }
    for vip in [WEB1, WEB] {
        let out = f.steps("tcp4", &[&format!("connect:{vip}"), "send", "readline"]);
        assert_answer(&out[2], None, vip, &out);
    }
}

#[test]
fn a_pod_reached_directly_and_through_a_service_from_one_socket() {
    let f = start();
    // Unconnected: what each answer shows follows what its datagram was sent to.
    let pod1 = f.pod(1);
    let direct = format!("sendto:{pod1}");
    let out = f.steps(
        "udp4",
        &[
            &direct,
            "recvfrom",
            "sendto:10.96.0.20:53",
            "recvfrom",
            &direct,
            "recvfrom",
            "sendto:10.96.0.20:53",
            "recvfrom",
        ],
    );
    assert_answer(&out[1], Some("pod1"), &pod1, &out);
    assert_answer(&out[3], Some("pod1"), DNS, &out);
    assert_answer(&out[5], Some("pod1"), &pod1, &out);
    assert_answer(&out[7], Some("pod1"), DNS, &out);
    // Whichever pod the Service chose, each pod reached directly shows itself, and the
    // Service flow keeps its backend.
    let mut steps = vec!["sendto:10.96.0.21:53".to_owned(), "recvfrom".to_owned()];
    for n in 1..=3 {
        steps.extend([format!("sendto:{}", f.pod(n)), "recvfrom".to_owned()]);
    }
    steps.extend(["sendto:10.96.0.21:53".to_owned(), "recvfrom".to_owned()]);
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = f.steps("udp4", &steps);
    let first = backend(&out[1]).to_owned();
    assert_answer(&out[1], None, DNS3, &out);
    for n in 1..=3 {
        assert_answer(&out[2 * n + 1], Some(&format!("pod{n}")), &f.pod(n), &out);
    }
    assert_answer(&out[9], Some(&first), DNS3, &out);
    // Connected, then connected again straight to the pod: the pod is the peer.
    let out = f.steps(
        "udp4",
        &[
            "connect:10.96.0.20:53",
            "send",
            "recvfrom",
            &format!("connect:{pod1}"),
            "send",
            "recvfrom",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1"), DNS, &out);
    assert_answer(&out[5], Some("pod1"), &pod1, &out);
    assert_eq!(out[6].peer.as_deref(), Some(pod1.as_str()), "{out:?}");
    // Unconnected through the Service, then connected straight to the pod.
    let out = f.steps(
        "udp4",
        &[
            "sendto:10.96.0.20:53",
            "recvfrom",
            &format!("connect:{pod1}"),
            "send",
            "recvfrom",
            "getpeername",
        ],
    );
    assert_answer(&out[1], Some("pod1"), DNS, &out);
    assert_answer(&out[4], Some("pod1"), &pod1, &out);
    assert_eq!(out[5].peer.as_deref(), Some(pod1.as_str()), "{out:?}");
    // A direct send or connect dropped a reverse entry three times: the second direct
    // sendto of the first script, the one to the chosen pod in the second, the connect in
    // the last (the connected-only socket of the third never had one).
    f.assert_events("revnat_cleared_direct", 3);
}

#[test]
fn sendto_then_connect_to_the_same_service_keeps_the_backend() {
    // kube-proxy: the connected socket's datagrams have the 5-tuple of its earlier sendto()s,
    // so the same conntrack entry and backend.
    let f = start();
    for _ in 0..6 {
        let out = f.steps(
            "udp4",
            &[
                "sendto:10.96.0.21:53",
                "recvfrom",
                "connect:10.96.0.21:53",
                "send",
                "recvfrom",
                "getpeername",
            ],
        );
        let first = backend(&out[1]).to_owned();
        assert_answer(&out[4], Some(&first), DNS3, &out);
        assert_eq!(out[5].peer.as_deref(), Some(DNS3), "{out:?}");
    }
}

#[test]
fn ipv6_services_direct_and_connected_patterns() {
    let f = start();
    let pod1 = f.pod_v6(1);
    let out = f.steps(
        "udp6",
        &[
            "sendto:[fd00:96::20]:53",
            "recvfrom",
            &format!("sendto:{pod1}"),
            "recvfrom",
            "sendto:[fd00:96::20]:53",
            "recvfrom",
        ],
    );
    assert_answer(&out[1], Some("pod1"), DNS_V6, &out);
    assert_answer(&out[3], Some("pod1"), &pod1, &out);
    assert_answer(&out[5], Some("pod1"), DNS_V6, &out);
    for _ in 0..4 {
        let out = f.steps(
            "udp6",
            &[
                "connect:[fd00:96::21]:53",
                "send",
                "recv",
                "sendto:[fd00:96::21]:53",
                "recvfrom",
                "getpeername",
            ],
        );
        let first = backend(&out[2]).to_owned();
        assert_answer(&out[4], Some(&first), DNS3_V6, &out);
        assert_eq!(out[5].peer.as_deref(), Some(DNS3_V6), "{out:?}");
    }
}

#[test]
fn one_socket_sending_to_more_services_than_its_storage_keeps() {
    // A socket keeps its first four Services' flows in its own storage and further ones in
    // the LRU maps: every answer still shows the Service asked, including ALT, which shares
    // pod1 with DNS (the last datagram to a backend decides, in both places).
    let f = start();
    let order = [DNS3, OTHER, FIFTH, DNS, ALT, DNS, ALT, DNS3, FIFTH];
    let mut steps = Vec::new();
    for vip in order {
        steps.extend([format!("sendto:{vip}"), "recvfrom".to_owned()]);
    }
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = f.steps("udp4", &steps);
    let dns3 = backend(&out[1]).to_owned();
    let pods = [
        Some(dns3.as_str()),
        Some("pod2"),
        Some("pod3"),
        Some("pod1"),
        Some("pod1"),
        Some("pod1"),
        Some("pod1"),
        Some(dns3.as_str()),
        Some("pod3"),
    ];
    for (i, (vip, pod)) in order.iter().zip(pods).enumerate() {
        assert_answer(&out[2 * i + 1], pod, vip, &out);
    }
}

#[test]
fn a_udp_socket_whose_slot_is_held_keeps_its_state_in_storage() {
    // Two open sockets whose cookies pick the same LB_UDP_SOCKS slot: the first holds it,
    // the second's state goes to socket storage, and both see the Service on their answers.
    let f = start();
    let counter = |name: &str| event_count(&f.agent, name);
    let taken = counter("udp_socks_taken");
    let bits = lb_common::maps::SOCK_SLOTS.trailing_zeros().to_string();
    let same_slot = format!("same-slot:{bits}");
    let sendto = format!("sendto:{DNS3}");
    let out = f.steps(
        "udp4",
        &[
            &sendto, "recvfrom", &same_slot, &sendto, "recvfrom", &sendto, "recvfrom", "back",
            &sendto, "recvfrom",
        ],
    );
    assert_answer(&out[1], None, DNS3, &out);
    assert!(out[2].error.is_none(), "{out:?}");
    assert_answer(&out[4], None, DNS3, &out);
    // Its flow stays: the same backend again, from storage.
    assert_answer(&out[6], out[4].backend.as_deref(), DNS3, &out);
    // And the first socket, in the slot, keeps its own flow beside it.
    assert!(out[7].error.is_none(), "{out:?}");
    assert_answer(&out[9], out[1].backend.as_deref(), DNS3, &out);
    assert_eq!(
        counter("udp_socks_taken"),
        taken + 1,
        "one socket fell back"
    );
}

#[test]
fn a_tcp_socket_whose_slot_is_held_keeps_its_state_in_storage() {
    // WEB1's connects to pod1 need state (WEB, the lower Service, owns pod1's reverse entry).
    // Two open sockets whose cookies pick the same LB_TCP_SOCKS slot: the first holds it, the
    // second's state goes to socket storage, and both show the Service they connected to.
    let f = start();
    let counter = |name: &str| event_count(&f.agent, name);
    let (claimed, taken) = (counter("tcp_socks_claimed"), counter("tcp_socks_taken"));
    let bits = lb_common::maps::SOCK_SLOTS.trailing_zeros().to_string();
    let same_slot = format!("same-slot:{bits}");
    let connect = format!("connect:{WEB1}");
    let out = f.steps(
        "tcp4",
        &[
            &connect,
            "send",
            "readline",
            &same_slot,
            &connect,
            "send",
            "readline",
            "back",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1"), WEB1, &out);
    assert!(out[3].error.is_none(), "{out:?}");
    assert_answer(&out[6], Some("pod1"), WEB1, &out);
    assert!(out[7].error.is_none(), "{out:?}");
    assert_eq!(out[8].peer.as_deref(), Some(WEB1), "{out:?}");
    assert_eq!(
        counter("tcp_socks_claimed"),
        claimed + 1,
        "the first claimed"
    );
    assert_eq!(
        counter("tcp_socks_taken"),
        taken + 1,
        "the second fell back"
    );
}

/// Waits until `LB_REVERSE` holds an entry for each of the fixture's four TCP backends
/// (pod1..pod3:8080, pod1's MPTCP port): from then on a direct connect to one writes state
/// marked direct.
fn wait_reverse_entries(agent: &Agent) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while map_entries(agent, "LB_REVERSE") < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "LB_REVERSE entries: {}",
            map_entries(agent, "LB_REVERSE")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_tcp_slot_freed_by_a_closed_socket_carries_nothing_to_the_next() {
    // A socket connected through WEB1 (state in its slot) closes; a new socket gets the slot
    // and connects to the same pod directly (an address with a reverse entry: it writes
    // state too, marked direct): it shows the pod.
    let f = start();
    wait_reverse_entries(&f.agent);
    let pod1 = f.pod(1);
    let counter = |name: &str| event_count(&f.agent, name);
    let (claimed, released, taken) = (
        counter("tcp_socks_claimed"),
        counter("tcp_socks_released"),
        counter("tcp_socks_taken"),
    );
    let bits = lb_common::maps::SOCK_SLOTS.trailing_zeros();
    let reused = format!("reused-slot:{bits}");
    let out = f.steps(
        "tcp4",
        &[
            &format!("connect:{WEB1}"),
            "send",
            "readline",
            &reused,
            &format!("connect:{pod1}"),
            "send",
            "readline",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1"), WEB1, &out);
    assert!(out[3].error.is_none(), "{out:?}");
    assert_answer(&out[6], Some("pod1"), &pod1, &out);
    assert_eq!(out[7].peer.as_deref(), Some(pod1.as_str()), "{out:?}");
    assert!(
        counter("tcp_socks_released") > released,
        "the close freed the slot"
    );
    assert_eq!(
        counter("tcp_socks_claimed"),
        claimed + 2,
        "both connects claimed it"
    );
    assert_eq!(counter("tcp_socks_taken"), taken, "no socket fell back");
}

#[test]
fn a_tcp_socket_reconnected_shows_its_last_peer() {
    // One socket, connect() after connect() (AF_UNSPEC in between): its state (in its slot)
    // follows the last connect. Through WEB1 then straight to pod2 (an address with a reverse
    // entry): the pod. Straight to pod2 then through WEB1: the Service.
    let f = start();
    wait_reverse_entries(&f.agent);
    let pod2 = f.pod(2);
    let claimed = event_count(&f.agent, "tcp_socks_claimed");
    let via = format!("connect:{WEB1}");
    let direct = format!("connect:{pod2}");
    let out = f.steps(
        "tcp4",
        &[
            &via,
            "send",
            "readline",
            "getpeername",
            "disconnect",
            &direct,
            "send",
            "readline",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod1"), WEB1, &out);
    assert_eq!(out[3].peer.as_deref(), Some(WEB1), "{out:?}");
    assert!(out[4].error.is_none(), "{out:?}");
    assert_answer(&out[7], Some("pod2"), &pod2, &out);
    assert_eq!(out[8].peer.as_deref(), Some(pod2.as_str()), "{out:?}");
    let out = f.steps(
        "tcp4",
        &[
            &direct,
            "send",
            "readline",
            "getpeername",
            "disconnect",
            &via,
            "send",
            "readline",
            "getpeername",
        ],
    );
    assert_answer(&out[2], Some("pod2"), &pod2, &out);
    assert_eq!(out[3].peer.as_deref(), Some(pod2.as_str()), "{out:?}");
    assert_answer(&out[7], Some("pod1"), WEB1, &out);
    assert_eq!(out[8].peer.as_deref(), Some(WEB1), "{out:?}");
    // One slot per socket: the second connect of each rewrote the first's state.
    assert_eq!(event_count(&f.agent, "tcp_socks_claimed"), claimed + 2);
}

/// Entries of a pinned map of the agent.
fn map_entries(agent: &Agent, map: &str) -> usize {
    lb_tests::pinned::dump(&agent.pin_path.join("maps").join(map)).len()
}

#[test]
fn a_udp_slot_freed_by_a_closed_socket_carries_nothing_to_the_next() {
    // A socket with a flow to a Service closes; a new socket gets its slot. What the closed
    // one sent through the Service says nothing about the new one, and the slot is free for
    // the new one's own first datagram through a Service.
    let f = start();
    let pod1 = f.pod(1);
    let taken = event_count(&f.agent, "udp_socks_taken");
    let bits = lb_common::maps::SOCK_SLOTS.trailing_zeros();
    let reused = format!("reused-slot:{bits}");
    let direct = format!("sendto:{pod1}");
    let via = format!("sendto:{DNS}");
    let out = f.steps(
        "udp4",
        &[
            &via, "recvfrom", &reused, &direct, "recvfrom", &via, "recvfrom",
        ],
    );
    assert_answer(&out[1], Some("pod1"), DNS, &out);
    assert!(out[2].error.is_none(), "{out:?}");
    assert_answer(&out[4], Some("pod1"), &pod1, &out);
    assert_answer(&out[6], Some("pod1"), DNS, &out);
    // The closed socket's release freed the slot: the new one claimed it.
    assert_eq!(event_count(&f.agent, "udp_socks_taken"), taken, "slot free");
}

/// The agent's event counter `name` (`lb stats --json`).
fn event_count(agent: &Agent, name: &str) -> u64 {
    let out = agent.lb(&["stats", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("lb stats json");
    json["events"][name].as_u64().expect(name)
}

/// The slots of owners array `owners` (`LB_UDP_OWNERS`, `LB_TCP_OWNERS`) held by a socket (an
/// array: every index is there, a held one is not 0).
fn held_slots(agent: &Agent, owners: &str) -> usize {
    lb_tests::pinned::dump(&agent.pin_path.join("maps").join(owners))
        .iter()
        .filter(|e| e.value.iter().any(|&b| b != 0))
        .count()
}

#[test]
fn unconnected_udp_sockets_leave_no_entries_behind() {
    // 10 000 new sockets, each one datagram to a Service and its answer: their flows live
    // in their LB_UDP_SOCKS slot, which the socket's close frees, so the slots held and the
    // LRU maps are what they were before.
    let f = start();
    let counter = |name: &str| event_count(&f.agent, name);
    let claimed = counter("udp_socks_claimed");
    let held = held_slots(&f.agent, "LB_UDP_OWNERS");
    let before: Vec<usize> = ["LB_REVNAT", "LB_UDP_FLOWS"]
        .iter()
        .map(|m| map_entries(&f.agent, m))
        .collect();
    let count = 10_000;
    let out = std::process::Command::new(testpod_bin())
        .arg("--cgroup")
        .arg(&f.node.cgroup.path)
        .arg("--netns")
        .arg(f.node.client.path())
        .args(["rr-udp", DNS3, "--count", &count.to_string()])
        .output()
        .expect("lb-testpod rr-udp");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rr-udp json");
    assert_eq!(report["completed"], count, "{report}");
    let after: Vec<usize> = ["LB_REVNAT", "LB_UDP_FLOWS"]
        .iter()
        .map(|m| map_entries(&f.agent, m))
        .collect();
    assert_eq!(after, before, "LB_REVNAT and LB_UDP_FLOWS entries");
    assert_eq!(
        held_slots(&f.agent, "LB_UDP_OWNERS"),
        held,
        "LB_UDP_OWNERS slots held"
    );
    // Each socket had a slot (none fell back to socket storage), and each freed it.
    assert!(
        counter("udp_socks_claimed") >= claimed + count,
        "slots claimed"
    );
    assert_eq!(counter("udp_socks_taken"), 0);
    // And such a socket still sees the Service on its answers.
    let out = f.steps("udp4", &["sendto:10.96.0.21:53", "recvfrom"]);
    assert_answer(&out[1], None, DNS3, &out);
}

#[test]
fn tcp_sockets_that_need_state_leave_no_slots_behind() {
    // 2 000 connections through WEB1, whose connects to pod1 need state (WEB owns pod1's
    // reverse entry): each claims its LB_TCP_SOCKS slot and its close frees it, so the slots
    // held are what they were before, and no socket fell back to storage.
    let f = start();
    let counter = |name: &str| event_count(&f.agent, name);
    let claimed = counter("tcp_socks_claimed");
    let held = held_slots(&f.agent, "LB_TCP_OWNERS");
    let count = 2_000;
    let out = f.node.client(&["tcp", WEB1, "--count", &count.to_string()]);
    assert_eq!(out.len(), count, "one outcome per connection");
    for o in &out {
        assert_answer(o, Some("pod1"), WEB1, &out[..1]);
    }
    assert_eq!(
        held_slots(&f.agent, "LB_TCP_OWNERS"),
        held,
        "LB_TCP_OWNERS slots held"
    );
    assert!(
        counter("tcp_socks_claimed") >= claimed + count as u64,
        "slots claimed"
    );
    assert_eq!(counter("tcp_socks_taken"), 0);
}
