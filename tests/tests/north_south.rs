//! The north-south datapath (XDP on `--xdp-iface`, tc egress on the same interface) with
//! traffic from outside the node: an external client namespace behind a router namespace
//! reaches the node namespace, where the agent runs (`nsenter --net=...`, as a DaemonSet pod
//! with hostNetwork would) and pods hang off the node's bridge.
//!
//! ```text
//! ext (10.250.1.2) -- router (10.250.1.1 | 10.250.2.1) -- n0 (10.250.2.2) node -- br0 -- pods
//! ```

use std::time::Duration;

use lb_tests::{
    Netns, Outcome, TempDir,
    north_south::{
        EXT4, EXT6, FAR_SERVICE, NODE4, NODE6, NodeAgent, Pkt, TC_ACT_OK, TCP, Topology, TwoNodes,
        UDP, XDP_DROP, XDP_PASS, XDP_REDIRECT, in_netns, mac, prog_of_link, test_run,
    },
    run_client,
};

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
    // lb explain names the rule that drops it.
    let explained = agent.lb(&["explain", &format!("{NODE4}:30081"), "--json"]);
    let e: serde_json::Value = serde_json::from_str(&explained).expect(&explained);
    assert_eq!(e["external"]["policy"], "Local", "{e:#}");
    assert!(
        e["external"]["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("dropped: externalTrafficPolicy Local")),
        "{e:#}"
    );
}

// ---- externalTrafficPolicy: Cluster to a pod behind another node (SNAT) ----
//
// ```text
// (IPv6 alike: fd00:250:1::/64, fd00:250:2::/64, podb fd00:201::2)
// ext (10.250.1.2, .3) -- router (10.250.1.1 | rb 10.250.2.1) --+-- n0 (10.250.2.2) node-a (agent)
//                                                    bridge rb  +-- m0 (10.250.2.3) node-b
//                                                                   -- q0 (10.201.0.2) podb
// ```

/// One line over TCP from `src` (with source port `sport`) to `dst`, on a thread in `ns`;
/// the answer ("NAME CLIENT-ADDR:PORT") and the peer address.
fn tcp_from(ns: &Netns, src: &str, sport: u16, dst: &str) -> Vec<(String, String)> {
    let src: std::net::SocketAddr = format!("{src}:{sport}").parse().expect("src");
    let dst: std::net::SocketAddr = dst.parse().expect("dst");
    in_netns(ns, move || {
        use std::io::{Read as _, Write as _};
        use std::os::fd::FromRawFd as _;
        let sin = |a: std::net::SocketAddr| {
            let std::net::SocketAddr::V4(a) = a else {
                panic!("IPv4 only")
            };
            libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            }
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: a fresh socket, bound and connected with valid sockaddr_in values, then
        // owned by the TcpStream.
        let mut stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let s = sin(src);
            assert_eq!(
                libc::bind(fd, (&raw const s).cast(), len),
                0,
                "bind {src}: {}",
                std::io::Error::last_os_error()
            );
            let d = sin(dst);
            assert_eq!(
                libc::connect(fd, (&raw const d).cast(), len),
                0,
                "connect {src} -> {dst}: {}",
                std::io::Error::last_os_error()
            );
            std::net::TcpStream::from_raw_fd(fd)
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let peer = stream.peer_addr().expect("peer").to_string();
        let mut answers = Vec::new();
        for _ in 0..3 {
            stream.write_all(b"hello\n").expect("send");
            let mut buf = [0u8; 128];
            let n = stream.read(&mut buf).expect("answer");
            answers.push((
                String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                peer.clone(),
            ));
        }
        answers
    })
}

#[test]
fn etp_cluster_reaches_a_pod_behind_another_node_with_snat() {
    let topo = TwoNodes::new();
    let dir = TempDir::new("ns");
    dir.write("services.yaml", FAR_SERVICE);
    let agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    agent.wait_for(&[
        "10.250.2.2:30090/TCP",
        "10.250.2.2:30090/UDP",
        "[fd00:250:2::2]:30090/TCP",
        "[fd00:250:2::2]:30090/UDP",
    ]);
    let service = format!("{NODE4}:30090");
    let service6 = format!("[{NODE6}]:30090");
    let snat_port_of = |seen: &str, node: &str| -> u16 {
        let (pod, addr) = seen.split_once(' ').expect("NAME CLIENT");
        assert_eq!(pod, "podb");
        let addr: std::net::SocketAddr = addr.parse().expect("client address");
        assert_eq!(
            addr.ip().to_string(),
            node,
            "SNAT: the pod sees node-a's address"
        );
        assert!(
            (61_000..=65_535).contains(&addr.port()),
            "allocated port {addr}"
        );
        addr.port()
    };
    let snat_port = |seen: &str| snat_port_of(seen, NODE4);
    // Several connections through the stock client, TCP and UDP, IPv4 and IPv6.
    for (service, node) in [(&service, NODE4), (&service6, NODE6)] {
        for args in [
            vec!["tcp", service.as_str(), "--count", "4"],
            vec!["tcp", service.as_str(), "--count", "3", "--keepalive"],
            vec!["udp", service.as_str(), "--count", "3", "--connected"],
        ] {
            let outcomes = run_client(None, &topo.ext.path(), &args);
            assert!(!outcomes.is_empty());
            for o in &outcomes {
                let seen = o.backend.as_deref().unwrap_or_else(|| {
                    panic!(
                        "{args:?} failed: {o:?}\n{}\nagent log:\n{}",
                        agent.lb(&["stats"]),
                        std::fs::read_to_string(&agent.log).unwrap_or_default()
                    )
                });
                snat_port_of(seen, node);
                assert_eq!(
                    o.peer.as_deref(),
                    Some(service.as_str()),
                    "reply from the NodePort"
                );
            }
        }
    }
    // Two clients behind the router, the same source port, both connections open at once.
    let (a, b) = std::thread::scope(|scope| {
        let one = scope.spawn(|| tcp_from(&topo.ext, EXT4, 40_000, &service));
        let two = scope.spawn(|| tcp_from(&topo.ext, "10.250.1.3", 40_000, &service));
        (one.join().expect("client 1"), two.join().expect("client 2"))
    });
    let ports: Vec<u16> = [&a, &b]
        .iter()
        .map(|answers| {
            assert_eq!(answers.len(), 3);
            let port = snat_port(&answers[0].0);
            for (seen, peer) in answers.iter() {
                assert_eq!(snat_port(seen), port, "one flow keeps its port");
                assert_eq!(peer, &service, "reply from the NodePort");
            }
            port
        })
        .collect();
    assert_ne!(
        ports[0], ports[1],
        "two clients on one source port: two SNAT ports"
    );
    assert!(
        agent.stat("xdp_new_flow_snat") >= 18,
        "{}",
        agent.lb(&["stats"])
    );
    assert!(agent.stat("xdp_reply_xlated") > 0);
    assert!(agent.stat("xdp_redirect") > 0);
}

#[test]
fn crafted_packets_through_test_run() {
    let topo = Topology::new();
    let dir = TempDir::new("ns");
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    agent.wait_for(&[
        "10.250.2.2:30080/TCP",
        "[fd00:250:2::2]:30080/UDP",
        "10.250.2.2:30081/TCP",
    ]);
    let xdp = prog_of_link(&agent.pin_path.join("links/xdp@n0"));
    let tc = prog_of_link(&agent.pin_path.join("links/tc@n0"));
    let client = "192.0.2.77";
    let syn = Pkt::new(client, NODE4, TCP, 40001, 30080);
    let dnat = |p: &Pkt| p.to("10.200.0.11", 8080);
    let dnat6 = |p: &Pkt| p.to("fd00:200::11", 8080);
    let untouched = |p: &Pkt| p.clone();
    let mut vlan = syn.from(client, 40002);
    vlan.vlan = Some(100);
    let mut options = syn.from(client, 40003);
    options.ip_options = vec![1, 1, 1, 0, 0x94, 4, 0, 0]; // NOPs, EOL, Router Alert
    let mut first_fragment = syn.from(client, 40004);
    first_fragment.frag = 0x2000;
    let mut later_fragment = syn.from(client, 40005);
    later_fragment.frag = 0x0010;
    let udp = Pkt::new(client, NODE4, UDP, 40006, 30080);
    let mut udp_zero = udp.from(client, 40007);
    udp_zero.udp_no_checksum = true;
    let syn6 = Pkt::new("2001:db8::77", NODE6, TCP, 40008, 30080);
    let mut hop6 = syn6.from("2001:db8::77", 40009);
    hop6.hop_by_hop = true;
    let udp6 = Pkt::new("2001:db8::77", NODE6, UDP, 40010, 30080);
    // lb walks at most four IPv6 extension headers (`MAX_EXT_HEADERS`): four are translated,
    // a fifth leaves the packet untouched (counted `xdp_pass_malformed`).
    let mut four_ext6 = syn6.from("2001:db8::77", 40013);
    four_ext6.hop_by_hop = true;
    four_ext6.dest_opts = 3;
    let mut five_ext6 = syn6.from("2001:db8::77", 40014);
    five_ext6.hop_by_hop = true;
    five_ext6.dest_opts = 4;
    type Expect = Box<dyn Fn(&Pkt) -> Pkt>;
    let cases: Vec<(&str, Pkt, u32, Expect)> = vec![
        (
            "new TCP flow: DNAT to the local pod",
            syn.clone(),
            XDP_PASS,
            Box::new(dnat),
        ),
        (
            "same flow again: tracked, same pod",
            syn.clone(),
            XDP_PASS,
            Box::new(dnat),
        ),
        (
            "another port: miss, untouched",
            syn.to(NODE4, 30099),
            XDP_PASS,
            Box::new(untouched),
        ),
        (
            "ClusterIP from outside: untouched",
            syn.to("10.96.50.1", 80),
            XDP_PASS,
            Box::new(untouched),
        ),
        ("VLAN tag kept", vlan, XDP_PASS, Box::new(dnat)),
        ("IPv4 options", options, XDP_PASS, Box::new(dnat)),
        (
            "first fragment: passed untouched",
            first_fragment,
            XDP_PASS,
            Box::new(untouched),
        ),
        (
            "later fragment: passed untouched",
            later_fragment,
            XDP_PASS,
            Box::new(untouched),
        ),
        ("UDP", udp, XDP_PASS, Box::new(dnat)),
        (
            "UDP without checksum keeps none",
            udp_zero,
            XDP_PASS,
            Box::new(dnat),
        ),
        ("IPv6 TCP", syn6, XDP_PASS, Box::new(dnat6)),
        ("IPv6 hop-by-hop header", hop6, XDP_PASS, Box::new(dnat6)),
        ("IPv6 UDP", udp6, XDP_PASS, Box::new(dnat6)),
        (
            "IPv6 with four extension headers",
            four_ext6,
            XDP_PASS,
            Box::new(dnat6),
        ),
    ];
    for (what, input, verdict, expect) in &cases {
        let (got, out) = test_run(xdp, &input.bytes());
        assert_eq!(got, *verdict, "{what}");
        assert_eq!(out, expect(input).bytes(), "{what}");
    }
    let malformed = agent.stat("xdp_pass_malformed");
    let (got, out) = test_run(xdp, &five_ext6.bytes());
    assert_eq!(
        (got, out),
        (XDP_PASS, five_ext6.bytes()),
        "five extension headers"
    );
    assert_eq!(agent.stat("xdp_pass_malformed"), malformed + 1);
    // eTP Local without a local endpoint: dropped.
    let (got, _) = test_run(xdp, &Pkt::new(client, NODE4, TCP, 40011, 30081).bytes());
    assert_eq!(got, XDP_DROP);
    // Truncated and malformed headers pass untouched (test-run needs a whole Ethernet
    // header).
    let full = syn.from(client, 40012).bytes();
    for cut in [14, 20, 33, 40, 50] {
        let (got, out) = test_run(xdp, &full[..cut]);
        assert_eq!(
            (got, out.as_slice()),
            (XDP_PASS, &full[..cut]),
            "cut at {cut}"
        );
    }
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    let (got, out) = test_run(xdp, &bad_ihl);
    assert_eq!((got, out), (XDP_PASS, bad_ihl), "IHL below 5");
    // Replies leave through tc egress with the NodePort as their source.
    for (reply, want) in [
        (
            Pkt::new("10.200.0.11", client, TCP, 8080, 40001),
            Pkt::new(NODE4, client, TCP, 30080, 40001),
        ),
        (
            Pkt::new("10.200.0.11", client, UDP, 8080, 40006),
            Pkt::new(NODE4, client, UDP, 30080, 40006),
        ),
        (
            Pkt::new("fd00:200::11", "2001:db8::77", TCP, 8080, 40008),
            Pkt::new(NODE6, "2001:db8::77", TCP, 30080, 40008),
        ),
        (
            // Not a tracked flow: untouched.
            Pkt::new("10.200.0.11", client, TCP, 8080, 49999),
            Pkt::new("10.200.0.11", client, TCP, 8080, 49999),
        ),
    ] {
        let (got, out) = test_run(tc, &reply.bytes());
        assert_eq!(got, TC_ACT_OK);
        assert_eq!(out, want.bytes(), "reply {}:{}", reply.src, reply.sport);
    }
    // SAFETY: our own descriptors, closed once.
    unsafe {
        libc::close(xdp);
        libc::close(tc);
    }
}

#[test]
fn snat_and_reply_through_test_run() {
    let topo = TwoNodes::new();
    let dir = TempDir::new("ns");
    dir.write("services.yaml", FAR_SERVICE);
    let agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    agent.wait_for(&["10.250.2.2:30090/TCP", "10.250.2.2:30090/UDP"]);
    let xdp = prog_of_link(&agent.pin_path.join("links/xdp@n0"));
    let n0 = mac(&topo.node_a.client, "n0");
    let m0 = mac(&topo.node_b, "m0");
    let rb = mac(&topo.router, "rb");
    let with_macs = |p: &Pkt, dst: [u8; 6], src: [u8; 6]| {
        let mut b = p.bytes();
        b[..6].copy_from_slice(&dst);
        b[6..12].copy_from_slice(&src);
        b
    };
    for (client, node, pod, proto, cport) in [
        (EXT4, NODE4, "10.201.0.2", TCP, 40_100),
        (EXT4, NODE4, "10.201.0.2", UDP, 40_101),
        (EXT6, NODE6, "fd00:201::2", TCP, 40_104),
        (EXT6, NODE6, "fd00:201::2", UDP, 40_105),
    ] {
        // The source port's offset: Ethernet, then the IPv4 or IPv6 header.
        let at = if node == NODE4 { 34 } else { 54 };
        // The FIB lookups happen in the namespace of the caller of test-run: node-a's.
        let run = |packet: Vec<u8>| in_netns(&topo.node_a.client, move || test_run(xdp, &packet));
        // A new flow from outside: DNAT to podb, SNAT to node-a and a port of the SNAT range,
        // MACs from the FIB (node-a's n0 to node-b's m0), redirected.
        let (verdict, out) = run(Pkt::new(client, node, proto, cport, 30090).bytes());
        assert_eq!(
            verdict,
            XDP_REDIRECT,
            "{node} proto {proto}: {}",
            agent.lb(&["stats"])
        );
        let port = u16::from_be_bytes([out[at], out[at + 1]]);
        assert!((61_000..=65_535).contains(&port), "allocated port {port}");
        let expected = with_macs(&Pkt::new(node, pod, proto, port, 8080), m0, n0);
        assert_eq!(
            out, expected,
            "{node} proto {proto}: the SNAT'd packet, byte for byte"
        );
        // The same flow again: the same port.
        let (verdict, again) = run(Pkt::new(client, node, proto, cport, 30090).bytes());
        assert_eq!((verdict, &again), (XDP_REDIRECT, &expected), "tracked");
        // podb's reply to node-a's port: back to the client from the NodePort, to the
        // router's MAC.
        let (verdict, out) = run(Pkt::new(pod, node, proto, 8080, port).bytes());
        assert_eq!(verdict, XDP_REDIRECT);
        let expected = with_macs(&Pkt::new(node, client, proto, 30090, cport), rb, n0);
        assert_eq!(
            out, expected,
            "{node} proto {proto}: the reply, byte for byte"
        );
        // A packet to a port of the range that no flow holds: untouched.
        let stray = Pkt::new(pod, node, proto, 8080, port ^ 1).bytes();
        let (verdict, out) = run(stray.clone());
        assert_eq!((verdict, out), (XDP_PASS, stray), "no flow: untouched");
    }
    // Closed TCP: after a FIN, a SYN on the same 5-tuple is a new flow (the old entry is
    // treated as expired), with a port of its own.
    let run = |packet: Vec<u8>| in_netns(&topo.node_a.client, move || test_run(xdp, &packet));
    let syn = Pkt::new(EXT4, NODE4, TCP, 40_102, 30090);
    let (_, first) = run(syn.bytes());
    let mut fin = syn.clone();
    fin.tcp_flags = 0x11; // FIN, ACK
    let (verdict, out) = run(fin.bytes());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out[34..36], first[34..36], "the FIN belongs to the flow");
    let expired = agent.stat("xdp_ct_expired");
    let mut reopened = None;
    // A new port is drawn at random: it may be the old one again, rarely.
    for _ in 0..4 {
        let (verdict, _) = run(fin.bytes());
        assert_eq!(verdict, XDP_REDIRECT);
        let (_, again) = run(syn.bytes());
        if again[34..36] != first[34..36] {
            reopened = Some(again);
            break;
        }
    }
    assert!(reopened.is_some(), "a SYN after FIN starts a new flow");
    assert!(agent.stat("xdp_ct_expired") > expired);
    // No resolved neighbour for node-b: translated all the same, MACs left alone, passed
    // to the stack (XDP never invents a MAC).
    topo.node_a.client.ip(&["neigh", "flush", "dev", "n0"]);
    let no_neigh = agent.stat("xdp_pass_no_neigh");
    let (verdict, out) = run(Pkt::new(EXT4, NODE4, UDP, 40_103, 30090).bytes());
    assert_eq!(verdict, XDP_PASS, "{}", agent.lb(&["stats"]));
    let port = u16::from_be_bytes([out[34], out[35]]);
    let expected = Pkt::new(NODE4, "10.201.0.2", UDP, port, 8080).bytes();
    assert_eq!(out, expected, "translated, original MACs");
    assert!(agent.stat("xdp_pass_no_neigh") > no_neigh);
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(xdp) };
}
