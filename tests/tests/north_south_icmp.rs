//! ICMP and ICMPv6 errors about translated north-south flows: translated back so that their
//! receiver recognises its own packet in the quote (`lb-ebpf/src/nodeport/icmp.rs`).
//!
//! Crafted errors run through the attached programs with `BPF_PROG_TEST_RUN` and are compared
//! byte for byte with frames built here with every checksum computed in full; and in the
//! namespace topology a pod's port unreachable reaches a connected UDP client as
//! ECONNREFUSED, and a router's Fragmentation Needed / Packet Too Big reaches the pod so that
//! a large TCP reply gets through a link with a small MTU.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use lb_tests::{
    TempDir,
    north_south::{
        EXT4, EXT6, FAR_SERVICE, NODE4, NODE6, NodeAgent, Pkt, TC_ACT_OK, TCP, Topology, TwoNodes,
        UDP, XDP_PASS, XDP_REDIRECT, checksum, in_netns, mac, prog_of_link, test_run,
    },
};

/// A dual-stack NodePort Service, eTP Local, with its endpoint pod1 on this node (node-a):
/// TCP and UDP on nodePort 30080 (pod1 serves 8080), UDP on 30085 to port 9999 where nothing
/// listens, TCP on 30086 to port 8086 (the bulk server of the PMTU test).
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
  - {name: closed, port: 85, targetPort: 9999, protocol: UDP, nodePort: 30085}
  - {name: bulk, port: 86, targetPort: 8086, nodePort: 30086}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: tcp, port: 8080}
- {name: udp, port: 8080, protocol: UDP}
- {name: closed, port: 9999, protocol: UDP}
- {name: bulk, port: 8086}
endpoints:
- {addresses: [10.200.0.11], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
- {name: tcp, port: 8080}
- {name: udp, port: 8080, protocol: UDP}
- {name: closed, port: 9999, protocol: UDP}
- {name: bulk, port: 8086}
endpoints:
- {addresses: ['fd00:200::11'], nodeName: node-a}
";

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// The quote of `p` in an error: its IP packet (no Ethernet header), cut after `l4` bytes of
/// its TCP/UDP header (all of it when `None`).
fn quote(p: &Pkt, l4: Option<usize>) -> Vec<u8> {
    let ip = p.bytes()[14..].to_vec();
    let hlen = if ip[0] >> 4 == 4 {
        usize::from(ip[0] & 0x0f) * 4
    } else {
        40 + if p.hop_by_hop { 8 } else { 0 }
    };
    match l4 {
        Some(n) => ip[..hlen + n].to_vec(),
        None => ip,
    }
}

/// An ICMP (IPv4 addresses) or ICMPv6 error frame from `src` to `dst`: `kind`, `code`, the
/// four type-specific bytes `rest`, then `quote`; every checksum computed in full here.
fn icmp_error(src: &str, dst: &str, kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let src: std::net::IpAddr = src.parse().expect("src");
    let dst: std::net::IpAddr = dst.parse().expect("dst");
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(quote);
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let c = checksum(&[&msg]);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0xc0];
            ip.extend_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0x56, 0x78, 0, 0, 64, ICMP, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let len = msg.len() as u32;
            let c = checksum(&[
                &s.octets(),
                &d.octets(),
                &len.to_be_bytes(),
                &[0, 0, 0, ICMPV6],
                &msg,
            ]);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            frame.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[ICMPV6, 64]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    frame.extend_from_slice(&msg);
    frame
}

/// Destination unreachable (fragmentation needed / packet too big with an MTU of 1280, or
/// port unreachable) in the family of `v6`: (type, code, rest).
fn frag_needed(v6: bool) -> (u8, u8, [u8; 4]) {
    if v6 {
        (2, 0, 1280u32.to_be_bytes())
    } else {
        (3, 4, [0, 0, 0x05, 0x00])
    }
}

fn port_unreachable(v6: bool) -> (u8, u8, [u8; 4]) {
    if v6 { (1, 4, [0; 4]) } else { (3, 3, [0; 4]) }
}

/// The one-node topology serving [`SERVICES`], its agent once `frontends` are programmed,
/// and the descriptors of the agent's attached XDP and tc programs (for test-run). Bound in
/// this order, the agent goes before its manifests and its topology.
fn start_for_test_run(name: &str, frontends: &[&str]) -> (Topology, TempDir, NodeAgent, i32, i32) {
    let topo = Topology::new();
    let dir = TempDir::new(name);
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    agent.wait_for(frontends);
    let xdp = prog_of_link(&agent.pin_path.join("links/xdp@n0"));
    let tc = prog_of_link(&agent.pin_path.join("links/tc@n0"));
    (topo, dir, agent, xdp, tc)
}

#[test]
fn icmp_errors_through_test_run() {
    let (_topo, _dir, agent, xdp, tc) =
        start_for_test_run("ni", &["10.250.2.2:30080/TCP", "[fd00:250:2::2]:30080/UDP"]);
    let client4 = "192.0.2.77";
    let client6 = "2001:db8::77";
    for (client, node, pod, router) in [
        (client4, NODE4, "10.200.0.11", "10.250.2.1"),
        (client6, NODE6, "fd00:200::11", "fd00:250:2::1"),
    ] {
        let v6 = node == NODE6;
        for (proto, cport) in [(TCP, 41_000), (UDP, 41_001)] {
            let what = format!("{node} proto {proto}");
            // A new flow: DNAT to pod1.
            let first = Pkt::new(client, node, proto, cport, 30080);
            let (verdict, out) = test_run(xdp, &first.bytes());
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(out, first.to(pod, 8080).bytes(), "{what}: DNAT");
            // (a) A router on the way to the client cannot forward a reply (node:30080 ->
            // client): its error goes to the pod, quoting what the pod sent.
            let reply = Pkt::new(node, client, proto, 30080, cport);
            let pod_reply = Pkt::new(pod, client, proto, 8080, cport);
            let (kind, code, rest) = frag_needed(v6);
            for (cut, label) in [(None, "whole quote"), (Some(8), "8-byte quote")] {
                let input = icmp_error(router, node, kind, code, rest, &quote(&reply, cut));
                let want = icmp_error(router, pod, kind, code, rest, &quote(&pod_reply, cut));
                let before = agent.stat("xdp_icmp_xlated");
                let (verdict, out) = test_run(xdp, &input);
                assert_eq!(verdict, XDP_PASS, "{what} {label}");
                assert_eq!(out, want, "{what} {label}: error to the pod, byte for byte");
                assert_eq!(agent.stat("xdp_icmp_xlated"), before + 1);
            }
            // (c) The pod's own error about the client's packet (client -> pod after DNAT)
            // leaves through tc with the NodePort in its quote and as its source.
            let (kind, code, rest) = port_unreachable(v6);
            let seen_by_pod = Pkt::new(client, pod, proto, cport, 8080);
            let input = icmp_error(pod, client, kind, code, rest, &quote(&seen_by_pod, None));
            let want = icmp_error(node, client, kind, code, rest, &quote(&first, None));
            let (verdict, out) = test_run(tc, &input);
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(out, want, "{what}: the pod's error, byte for byte");
        }
        // A quote with IPv4 options or an IPv6 hop-by-hop header.
        let mut options = Pkt::new(node, client, UDP, 30080, 41_001);
        let mut pod_options = Pkt::new(pod, client, UDP, 8080, 41_001);
        if v6 {
            options.hop_by_hop = true;
            pod_options.hop_by_hop = true;
        } else {
            options.ip_options = vec![1, 1, 1, 0];
            pod_options.ip_options = vec![1, 1, 1, 0];
        }
        let (kind, code, rest) = frag_needed(v6);
        let input = icmp_error(router, node, kind, code, rest, &quote(&options, None));
        let want = icmp_error(router, pod, kind, code, rest, &quote(&pod_options, None));
        let (verdict, out) = test_run(xdp, &input);
        assert_eq!(
            (verdict, out),
            (XDP_PASS, want),
            "{node}: quote with options"
        );
        // Errors about no flow pass untouched (and are counted).
        let no_flow = agent.stat("xdp_icmp_no_flow");
        let stranger = Pkt::new(node, client, TCP, 30080, 49_999);
        let input = icmp_error(router, node, kind, code, rest, &quote(&stranger, None));
        let (verdict, out) = test_run(xdp, &input);
        assert_eq!((verdict, out), (XDP_PASS, input.clone()), "{node}: no flow");
        assert_eq!(agent.stat("xdp_icmp_no_flow"), no_flow + 1);
        let (verdict, out) = test_run(tc, &input);
        assert_eq!((verdict, out), (TC_ACT_OK, input), "{node}: no flow at tc");
        // A truncated quote passes untouched (and is counted).
        let malformed = agent.stat("xdp_icmp_malformed");
        let cut = quote(&Pkt::new(node, client, TCP, 30080, 41_000), Some(2));
        let input = icmp_error(router, node, kind, code, rest, &cut);
        let (verdict, out) = test_run(xdp, &input);
        assert_eq!((verdict, out), (XDP_PASS, input), "{node}: truncated quote");
        assert_eq!(agent.stat("xdp_icmp_malformed"), malformed + 1);
        // Not an error (an echo request to the node): untouched.
        let echo = if v6 { 128 } else { 8 };
        let input = icmp_error(router, node, echo, 0, [0, 1, 0, 1], b"ping");
        let (verdict, out) = test_run(xdp, &input);
        assert_eq!((verdict, out), (XDP_PASS, input), "{node}: echo request");
    }
    // SAFETY: our own descriptors, closed once.
    unsafe {
        libc::close(xdp);
        libc::close(tc);
    }
}

#[test]
fn icmp_errors_of_snat_flows_through_test_run() {
    let topo = TwoNodes::new();
    let dir = TempDir::new("ni");
    dir.write("services.yaml", FAR_SERVICE);
    let agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    agent.wait_for(&["10.250.2.2:30090/TCP", "[fd00:250:2::2]:30090/UDP"]);
    let xdp = prog_of_link(&agent.pin_path.join("links/xdp@n0"));
    let n0 = mac(&topo.node_a.client, "n0");
    let m0 = mac(&topo.node_b, "m0");
    let rb = mac(&topo.router, "rb");
    let with_macs = |mut b: Vec<u8>, dst: [u8; 6], src: [u8; 6]| {
        b[..6].copy_from_slice(&dst);
        b[6..12].copy_from_slice(&src);
        b
    };
    // The FIB lookups happen in the namespace of the caller of test-run: node-a's.
    let run = |packet: Vec<u8>| in_netns(&topo.node_a.client, move || test_run(xdp, &packet));
    for (client, node, pod, router, proto, cport) in [
        (EXT4, NODE4, "10.201.0.2", "10.250.2.1", UDP, 41_100),
        (EXT4, NODE4, "10.201.0.2", "10.250.2.1", TCP, 41_101),
        (EXT6, NODE6, "fd00:201::2", "fd00:250:2::1", UDP, 41_102),
        (EXT6, NODE6, "fd00:201::2", "fd00:250:2::1", TCP, 41_103),
    ] {
        let v6 = node == NODE6;
        let what = format!("{node} proto {proto}");
        let at = if v6 { 54 } else { 34 };
        let (verdict, out) = run(Pkt::new(client, node, proto, cport, 30090).bytes());
        assert_eq!(verdict, XDP_REDIRECT, "{what}: {}", agent.lb(&["stats"]));
        let port = u16::from_be_bytes([out[at], out[at + 1]]);
        // (b) podb cannot take node-a's packet (node:port -> podb): the client gets the error
        // from the NodePort, quoting its own packet.
        let (kind, code, rest) = port_unreachable(v6);
        let sent = Pkt::new(node, pod, proto, port, 8080);
        let input = icmp_error(pod, node, kind, code, rest, &quote(&sent, None));
        let client_sent = Pkt::new(client, node, proto, cport, 30090);
        let want = icmp_error(node, client, kind, code, rest, &quote(&client_sent, None));
        let (verdict, out) = run(input);
        assert_eq!(verdict, XDP_REDIRECT, "{what}: {}", agent.lb(&["stats"]));
        assert_eq!(
            out,
            with_macs(want, rb, n0),
            "{what}: backend's error to the client, byte for byte"
        );
        // (a) A router cannot forward a reply to the client (node:30090 -> client): the error
        // goes to podb from node-a, quoting what podb sent (podb -> node:port).
        let (kind, code, rest) = frag_needed(v6);
        let reply = Pkt::new(node, client, proto, 30090, cport);
        let input = icmp_error(router, node, kind, code, rest, &quote(&reply, Some(8)));
        let pod_sent = Pkt::new(pod, node, proto, 8080, port);
        let want = icmp_error(node, pod, kind, code, rest, &quote(&pod_sent, Some(8)));
        let (verdict, out) = run(input);
        assert_eq!(verdict, XDP_REDIRECT, "{what}: {}", agent.lb(&["stats"]));
        assert_eq!(
            out,
            with_macs(want, m0, n0),
            "{what}: client-side error to podb, byte for byte"
        );
    }
    assert_eq!(agent.stat("xdp_icmp_reply_xlated"), 4);
    assert_eq!(agent.stat("xdp_icmp_xlated"), 4);
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(xdp) };
}

#[test]
fn port_unreachable_from_a_local_pod_reaches_the_client_as_econnrefused() {
    let topo = Topology::new();
    let dir = TempDir::new("ni");
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    agent.wait_for(&["10.250.2.2:30085/UDP", "[fd00:250:2::2]:30085/UDP"]);
    for service in [format!("{NODE4}:30085"), format!("[{NODE6}]:30085")] {
        let outcomes = topo.client(&["udp", &service, "--count", "2", "--connected"]);
        assert!(!outcomes.is_empty());
        for o in &outcomes {
            assert_eq!(
                o.errno,
                Some(libc::ECONNREFUSED),
                "{service}: the pod's port unreachable, translated: {o:?}\n{}",
                agent.lb(&["stats"])
            );
        }
    }
    assert!(
        agent.stat("tc_icmp_xlated") >= 2,
        "{}",
        agent.lb(&["stats"])
    );
}

/// Bytes the bulk server sends per connection: many full-sized segments.
const BULK: usize = 200_000;

#[test]
fn fragmentation_needed_from_a_router_reaches_the_pod() {
    let topo = Topology::new();
    // The router's link to the client has a small MTU; the client still offers a 1460-byte
    // MSS, so the pod's full-sized segments need path MTU discovery through lb.
    topo.router.ip(&["link", "set", "r0", "mtu", "1280"]);
    let dir = TempDir::new("ni");
    dir.write("services.yaml", SERVICES);
    let agent = NodeAgent::start(&topo, &dir.0);
    agent.wait_for(&["10.250.2.2:30086/TCP", "[fd00:250:2::2]:30086/TCP"]);
    // pod1's bulk server (dual-stack), on a thread that ends with the test process.
    let listener = in_netns(&topo.node.pods[0].netns, || {
        TcpListener::bind("[::]:8086").expect("bind bulk server")
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let _sent = stream.write_all(&vec![7u8; BULK]);
        }
    });
    for service in [format!("{NODE4}:30086"), format!("[{NODE6}]:30086")] {
        let addr: SocketAddr = service.parse().expect("addr");
        let got = in_netns(&topo.ext, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = Vec::new();
            let r = s.read_to_end(&mut buf);
            (buf.len(), r.err().map(|e| e.to_string()))
        });
        assert_eq!(
            got,
            (BULK, None),
            "{service}: the whole reply through the small MTU\n{}",
            agent.lb(&["stats"])
        );
    }
    assert!(
        agent.stat("xdp_icmp_xlated") >= 2,
        "{}",
        agent.lb(&["stats"])
    );
}

#[test]
fn a_fib_failure_is_logged_by_the_agent() {
    let topo = TwoNodes::new();
    let dir = TempDir::new("ni");
    dir.write("services.yaml", FAR_SERVICE);
    let mut agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    agent.wait_for(&["10.250.2.2:30090/UDP"]);
    // A restarted agent adopts the pinned links by swapping its programs in: the programs
    // that run then write to its own log buffer.
    agent.restart();
    wait_for_log(&agent, "xdp=Adopted");
    let xdp = prog_of_link(&agent.pin_path.join("links/xdp@n0"));
    // node-a loses its route to podb: a new SNAT flow finds no source address by FIB lookup.
    topo.node_a
        .client
        .ip(&["route", "del", "10.201.0.0/24", "via", "10.250.2.3"]);
    let failed = agent.stat("xdp_err_fib");
    let packet = Pkt::new(EXT4, NODE4, UDP, 41_300, 30090).bytes();
    let (verdict, out) = in_netns(&topo.node_a.client, move || test_run(xdp, &packet));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, Pkt::new(EXT4, NODE4, UDP, 41_300, 30090).bytes());
    assert_eq!(agent.stat("xdp_err_fib"), failed + 1);
    // The program's aya-log record reaches the agent's log.
    wait_for_log(&agent, "xdp: FIB lookup failed");
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(xdp) };
}

/// Waits until the agent's log holds `text`.
fn wait_for_log(agent: &NodeAgent, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        if log.contains(text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in the agent log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
/// `CtKey`: 40 bytes, `dir` at 37 (1 forward, 2 reply, 3 client), source port at 32.
const CT_KEY: usize = 40;
/// `CtEntry`: 56 bytes, `seen` (u64, native order) at 48.
const CT_VALUE: usize = 56;
/// `lb_common::nat::CT_DIR_IN`, `CT_DIR_REPLY`, `CT_DIR_CLIENT`.
const CT_DIR_IN: u8 = 1;
const CT_DIR_REPLY: u8 = 2;
const CT_DIR_CLIENT: u8 = 3;

/// `CtKey4`: 8 bytes (the IPv4 client address, its port, the protocol, a zero byte).
const CT4_KEY: usize = 8;

/// The pinned conntrack maps of `agent`, as descriptors: `LB_CT`, and `LB_CT4`, which holds
/// the client entries of IPv4 flows under 8-byte keys. The helpers below take and give every
/// key in `CtKey`'s 40-byte form and route it to the map that holds it, as the programs do
/// (`CtKey::client4`).
#[derive(Clone, Copy)]
struct Ct {
    all: i32,
    client4: i32,
}

impl Ct {
    /// Closes both descriptors.
    fn close(self) {
        // SAFETY: our own descriptors, closed once.
        unsafe {
            libc::close(self.all);
            libc::close(self.client4);
        }
    }

    /// The map that holds `key` and the key in that map's form, as `CtKey::client4` decides
    /// for the programs.
    fn route(self, key: &[u8; CT_KEY]) -> (i32, Vec<u8>) {
        let octets = |at: usize| -> [u8; 16] { key[at..at + 16].try_into().expect("16 bytes") };
        let port = |at: usize| u16::from_ne_bytes([key[at], key[at + 1]]);
        let ct_key = lb_common::nat::CtKey {
            src: lb_common::Addr::from_v6_octets(octets(0)),
            dst: lb_common::Addr::from_v6_octets(octets(16)),
            sport: port(32),
            dport: port(34),
            proto: key[36],
            dir: key[37],
            _pad: [0; 2],
        };
        if let Some(k4) = ct_key.client4() {
            let mut k = vec![0u8; CT4_KEY];
            k[..4].copy_from_slice(&k4.addr.to_ne_bytes());
            k[4..6].copy_from_slice(&k4.port.to_ne_bytes());
            k[6] = k4.proto;
            (self.client4, k)
        } else {
            (self.all, key.to_vec())
        }
    }
}

/// The pinned map `name` of `agent`, as a descriptor.
fn pinned_map(agent: &NodeAgent, name: &str) -> i32 {
    let path = agent.pin_path.join("maps").join(name);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let (fd, _) = lb_tests::north_south::bpf(7, &[(0, c.as_ptr() as u64, 8)]);
    assert!(fd >= 0, "{name}: {}", std::io::Error::last_os_error());
    fd as i32
}

/// The pinned conntrack maps of `agent`.
fn ct_map(agent: &NodeAgent) -> Ct {
    Ct {
        all: pinned_map(agent, "LB_CT"),
        client4: pinned_map(agent, "LB_CT4"),
    }
}

/// Every (key, value) of the map `fd` whose keys are `key_len` bytes long.
fn map_entries(fd: i32, key_len: usize) -> Vec<(Vec<u8>, [u8; CT_VALUE])> {
    let mut out = Vec::new();
    let mut key = vec![0u8; key_len];
    let mut first = true;
    loop {
        let mut next = vec![0u8; key_len];
        let key_ptr = if first { 0 } else { key.as_ptr() as u64 };
        let (ret, _) = lb_tests::north_south::bpf(
            BPF_MAP_GET_NEXT_KEY,
            &[
                (0, fd as u64, 4),
                (8, key_ptr, 8),
                (16, next.as_mut_ptr() as u64, 8),
            ],
        );
        if ret != 0 {
            return out;
        }
        first = false;
        key = next;
        let mut value = [0u8; CT_VALUE];
        let (ret, _) = lb_tests::north_south::bpf(
            BPF_MAP_LOOKUP_ELEM,
            &[
                (0, fd as u64, 4),
                (8, key.as_ptr() as u64, 8),
                (16, value.as_mut_ptr() as u64, 8),
            ],
        );
        if ret == 0 {
            out.push((key.clone(), value));
        }
    }
}

/// Every conntrack entry of both maps, keys in `CtKey`'s form: (key, value).
fn ct_entries(ct: Ct) -> Vec<([u8; CT_KEY], [u8; CT_VALUE])> {
    let mut out: Vec<_> = map_entries(ct.all, CT_KEY)
        .into_iter()
        .map(|(k, v)| (k.try_into().expect("40 bytes"), v))
        .collect();
    for (k4, v) in map_entries(ct.client4, CT4_KEY) {
        let mut key = [0u8; CT_KEY];
        key[10..12].copy_from_slice(&[0xff, 0xff]);
        key[12..16].copy_from_slice(&k4[..4]);
        key[32..34].copy_from_slice(&k4[4..6]);
        key[36] = k4[6];
        key[37] = CT_DIR_CLIENT;
        out.push((key, v));
    }
    out
}

/// The entry of direction `dir` whose key has source port `sport`: (key, `seen`).
fn ct_entry(ct: Ct, dir: u8, sport: u16) -> ([u8; CT_KEY], u64) {
    let (key, value) = ct_entries(ct)
        .into_iter()
        .find(|(k, _)| k[37] == dir && k[32..34] == sport.to_be_bytes())
        .unwrap_or_else(|| panic!("no conntrack entry dir {dir} sport {sport}"));
    let seen = u64::from_ne_bytes(value[48..56].try_into().expect("8 bytes"));
    (key, seen)
}

/// Stores `value` under `key` in the conntrack map that holds it.
fn ct_put(ct: Ct, key: &[u8; CT_KEY], value: &[u8; CT_VALUE]) {
    let (fd, key) = ct.route(key);
    let (ret, _) = lb_tests::north_south::bpf(
        BPF_MAP_UPDATE_ELEM,
        &[
            (0, fd as u64, 4),
            (8, key.as_ptr() as u64, 8),
            (16, value.as_ptr() as u64, 8),
        ],
    );
    assert_eq!(ret, 0, "update: {}", std::io::Error::last_os_error());
}

/// Deletes the entry under `key`.
fn ct_delete(ct: Ct, key: &[u8; CT_KEY]) {
    let (fd, key) = ct.route(key);
    let (ret, _) = lb_tests::north_south::bpf(
        BPF_MAP_DELETE_ELEM,
        &[(0, fd as u64, 4), (8, key.as_ptr() as u64, 8)],
    );
    assert_eq!(ret, 0, "delete: {}", std::io::Error::last_os_error());
}

/// Sets the `LB_CT_FWD` bucket of IPv4 frontend `addr`:`port` (protocol `proto`) to 1, as the
/// agent leaves every bucket after an upgrade from layout 4 (whose flows all have forward
/// entries): XDP then looks such a flow's forward key up.
fn mark_forward(agent: &NodeAgent, addr: &str, port: u16, proto: u8) {
    let path = agent.pin_path.join("maps/LB_CT_FWD");
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let (fd, _) = lb_tests::north_south::bpf(7, &[(0, c.as_ptr() as u64, 8)]);
    assert!(fd >= 0, "LB_CT_FWD: {}", std::io::Error::last_os_error());
    let ip = addr.parse::<std::net::Ipv4Addr>().expect("IPv4");
    let bucket = lb_common::nat::ct_forward_bucket(
        &lb_common::Addr::from_v4_octets(ip.octets()),
        port.to_be(),
        proto,
    );
    let one = 1u32;
    let (ret, _) = lb_tests::north_south::bpf(
        BPF_MAP_UPDATE_ELEM,
        &[
            (0, fd as u64, 4),
            (8, std::ptr::from_ref(&bucket) as u64, 8),
            (16, std::ptr::from_ref(&one) as u64, 8),
        ],
    );
    assert_eq!(ret, 0, "update: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd as i32) };
}

/// A conntrack key (`CtKey`) of IPv4 addresses.
fn ct_key(src: &str, dst: &str, sport: u16, dport: u16, proto: u8, dir: u8) -> [u8; CT_KEY] {
    let addr = |a: &str| {
        a.parse::<std::net::Ipv4Addr>()
            .expect("IPv4")
            .to_ipv6_mapped()
            .octets()
    };
    let mut k = [0u8; CT_KEY];
    k[..16].copy_from_slice(&addr(src));
    k[16..32].copy_from_slice(&addr(dst));
    k[32..34].copy_from_slice(&sport.to_be_bytes());
    k[34..36].copy_from_slice(&dport.to_be_bytes());
    k[36] = proto;
    k[37] = dir;
    k
}

/// Sets `seen` of the entry under `key`.
fn set_seen(ct: Ct, key: &[u8; CT_KEY], seen: u64) {
    let (fd, map_key) = ct.route(key);
    let mut value = [0u8; CT_VALUE];
    let (ret, _) = lb_tests::north_south::bpf(
        BPF_MAP_LOOKUP_ELEM,
        &[
            (0, fd as u64, 4),
            (8, map_key.as_ptr() as u64, 8),
            (16, value.as_mut_ptr() as u64, 8),
        ],
    );
    assert_eq!(ret, 0, "lookup: {}", std::io::Error::last_os_error());
    value[48..56].copy_from_slice(&seen.to_ne_bytes());
    ct_put(ct, key, &value);
}

/// `bpf_ktime_get_coarse_ns()`'s clock, now.
fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(ret, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn replies_through_tc_keep_the_flow_alive_and_expired_entries_are_absent_at_tc_and_xdp() {
    let (_topo, _dir, agent, xdp, tc) = start_for_test_run("ni", &["10.250.2.2:30080/UDP"]);
    let ct = ct_map(&agent);
    let client = "192.0.2.88";
    let first = Pkt::new(client, NODE4, UDP, 41_400, 30080);
    let (verdict, _) = test_run(xdp, &first.bytes());
    assert_eq!(verdict, XDP_PASS);
    let reply = Pkt::new("10.200.0.11", client, UDP, 8080, 41_400);
    let translated = Pkt::new(NODE4, client, UDP, 30080, 41_400);
    // A flow to a pod on this node has one entry, keyed by the client (direction 3).
    let flow_entries = ct_entries(ct)
        .into_iter()
        .filter(|(k, _)| k[32..34] == 41_400u16.to_be_bytes() || k[32..34] == 8080u16.to_be_bytes())
        .count();
    assert_eq!(flow_entries, 1, "one conntrack entry per DNAT'd flow");
    // An IPv4 client entry lives in LB_CT4, under its 8-byte key.
    let in_client4 = map_entries(ct.client4, CT4_KEY)
        .into_iter()
        .filter(|(k, _)| k[4..6] == 41_400u16.to_be_bytes())
        .count();
    assert_eq!(in_client4, 1, "the client entry is in LB_CT4");
    // A flow whose client has been quiet for 50 s (of UDP's 60): a reply refreshes it.
    let (key, _) = ct_entry(ct, CT_DIR_CLIENT, 41_400);
    let now = coarse_now();
    set_seen(ct, &key, now - 50_000_000_000);
    let (verdict, out) = test_run(tc, &reply.bytes());
    assert_eq!((verdict, out), (TC_ACT_OK, translated.bytes()));
    let (_, seen) = ct_entry(ct, CT_DIR_CLIENT, 41_400);
    assert!(seen >= now, "the flow's entry was refreshed by the reply");
    // An expired entry is absent: the reply leaves untranslated, counted.
    let expired = agent.stat("tc_ct_expired");
    set_seen(ct, &key, coarse_now() - 61_000_000_000);
    let (verdict, out) = test_run(tc, &reply.bytes());
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, reply.bytes()),
        "expired: untouched"
    );
    assert_eq!(agent.stat("tc_ct_expired"), expired + 1);
    // A UDP flow idle past its 60 s at XDP: the entry counts as absent and the client's next
    // datagram starts a new flow (to the one local pod again), with a fresh entry.
    let expired = agent.stat("xdp_ct_expired");
    let new_flows = agent.stat("xdp_new_flow");
    set_seen(ct, &key, coarse_now() - 61_000_000_000);
    let (verdict, out) = test_run(xdp, &first.bytes());
    assert_eq!(
        (verdict, out),
        (XDP_PASS, first.to("10.200.0.11", 8080).bytes()),
        "an idle UDP flow starts afresh"
    );
    assert_eq!(agent.stat("xdp_ct_expired"), expired + 1);
    assert_eq!(agent.stat("xdp_new_flow"), new_flows + 1);
    let (_, seen) = ct_entry(ct, CT_DIR_CLIENT, 41_400);
    assert!(seen + 61_000_000_000 > coarse_now(), "fresh entry");
    ct.close();
    // SAFETY: our own descriptors, closed once.
    unsafe {
        libc::close(xdp);
        libc::close(tc);
    }
}

/// A second flow of one client address and port (to another frontend) cannot share the
/// first's client entry and gets a forward and a reply entry, as every flow of layout 4 has;
/// both kinds are translated in both directions and kept alive by replies, so that flows made
/// by programs of layout 4 survive an upgrade to these programs.
#[test]
fn second_flows_of_a_client_port_and_flows_of_layout_4_keep_two_entries() {
    let (_topo, _dir, agent, xdp, tc) =
        start_for_test_run("n2", &["10.250.2.2:30080/UDP", "10.250.2.2:30085/UDP"]);
    let ct = ct_map(&agent);
    let pod = "10.200.0.11";
    let client = "192.0.2.90";
    // One client port, two frontends: the first flow takes the client entry, the second
    // gets two entries.
    let first = Pkt::new(client, NODE4, UDP, 41_500, 30080);
    let second = Pkt::new(client, NODE4, UDP, 41_500, 30085);
    assert_eq!(
        test_run(xdp, &first.bytes()),
        (XDP_PASS, first.to(pod, 8080).bytes())
    );
    assert_eq!(
        test_run(xdp, &second.bytes()),
        (XDP_PASS, second.to(pod, 9999).bytes())
    );
    let _ = ct_entry(ct, CT_DIR_CLIENT, 41_500);
    let (fwd_key, _) = ct_entry(ct, CT_DIR_IN, 41_500);
    let (reply_key, _) = ct_entry(ct, CT_DIR_REPLY, 9999);
    // Each flow's next packet is tracked (not a new flow), to its own pod port.
    let (tracked, new_flows) = (agent.stat("xdp_tracked"), agent.stat("xdp_new_flow"));
    for (p, port) in [(&first, 8080), (&second, 9999)] {
        assert_eq!(
            test_run(xdp, &p.bytes()),
            (XDP_PASS, p.to(pod, port).bytes())
        );
    }
    assert_eq!(agent.stat("xdp_tracked"), tracked + 2);
    assert_eq!(agent.stat("xdp_new_flow"), new_flows);
    // Storing the second flow's forward entry marked its frontend in LB_CT_FWD: with the
    // client entry gone (the first flow ended), its next packet still finds its forward
    // entry and stays on its pod port, rather than starting a new flow.
    let (client_key, client_value) = ct_entries(ct)
        .into_iter()
        .find(|(k, _)| k[37] == CT_DIR_CLIENT && k[32..34] == 41_500u16.to_be_bytes())
        .expect("the first flow's client entry");
    ct_delete(ct, &client_key);
    let tracked = agent.stat("xdp_tracked");
    assert_eq!(
        test_run(xdp, &second.bytes()),
        (XDP_PASS, second.to(pod, 9999).bytes()),
        "the second flow without the first's client entry"
    );
    assert_eq!(agent.stat("xdp_tracked"), tracked + 1);
    assert_eq!(agent.stat("xdp_new_flow"), new_flows);
    ct_put(ct, &client_key, &client_value);
    // Each reply gets its own frontend back.
    for (port, node_port) in [(8080, 30080), (9999, 30085)] {
        let reply = Pkt::new(pod, client, UDP, port, 41_500);
        assert_eq!(
            test_run(tc, &reply.bytes()),
            (
                TC_ACT_OK,
                Pkt::new(NODE4, client, UDP, node_port, 41_500).bytes()
            ),
            "reply from pod port {port}"
        );
    }
    // A reply keeps the second flow alive: its reply entry and its forward entry.
    let now = coarse_now();
    set_seen(ct, &fwd_key, now - 50_000_000_000);
    set_seen(ct, &reply_key, now - 2_000_000_000);
    let reply = Pkt::new(pod, client, UDP, 9999, 41_500);
    assert_eq!(test_run(tc, &reply.bytes()).0, TC_ACT_OK);
    assert!(
        ct_entry(ct, CT_DIR_REPLY, 9999).1 >= now,
        "reply entry refreshed"
    );
    assert!(
        ct_entry(ct, CT_DIR_IN, 41_500).1 >= now,
        "forward entry refreshed"
    );

    // A flow as layout 4's programs stored it (forward and reply entry, no client entry),
    // with the frontend id and member epoch of a live flow to the same frontend.
    let (_, live) = ct_entries(ct)
        .into_iter()
        .find(|(k, _)| k[37] == CT_DIR_CLIENT && k[32..34] == 41_500u16.to_be_bytes())
        .expect("the first flow's client entry");
    // An upgrade sets every frontend's LB_CT_FWD bucket: such flows exist for any of them.
    mark_forward(&agent, NODE4, 30080, UDP);
    let old_client = "192.0.2.91";
    let mut fwd = live;
    fwd[24..44].fill(0);
    fwd[48..56].copy_from_slice(&coarse_now().to_ne_bytes());
    let mut back = fwd;
    back[..16].copy_from_slice(&ct_key(NODE4, NODE4, 0, 0, 0, 0)[..16]);
    back[16..18].copy_from_slice(&30080u16.to_be_bytes());
    back[44..48].fill(0);
    ct_put(
        ct,
        &ct_key(old_client, NODE4, 41_600, 30080, UDP, CT_DIR_IN),
        &fwd,
    );
    ct_put(
        ct,
        &ct_key(pod, old_client, 8080, 41_600, UDP, CT_DIR_REPLY),
        &back,
    );
    let (tracked, new_flows) = (agent.stat("xdp_tracked"), agent.stat("xdp_new_flow"));
    let old = Pkt::new(old_client, NODE4, UDP, 41_600, 30080);
    assert_eq!(
        test_run(xdp, &old.bytes()),
        (XDP_PASS, old.to(pod, 8080).bytes())
    );
    assert_eq!(
        agent.stat("xdp_tracked"),
        tracked + 1,
        "a layout-4 flow is tracked"
    );
    assert_eq!(agent.stat("xdp_new_flow"), new_flows);
    let reply = Pkt::new(pod, old_client, UDP, 8080, 41_600);
    assert_eq!(
        test_run(tc, &reply.bytes()),
        (
            TC_ACT_OK,
            Pkt::new(NODE4, old_client, UDP, 30080, 41_600).bytes()
        )
    );
    assert!(
        !ct_entries(ct)
            .iter()
            .any(|(k, _)| k[37] == CT_DIR_CLIENT && k[32..34] == 41_600u16.to_be_bytes()),
        "no client entry made for a layout-4 flow"
    );
    ct.close();
    // SAFETY: our own descriptors, closed once.
    unsafe {
        libc::close(xdp);
        libc::close(tc);
    }
}

/// `CtEntry::flags` (`lb_common::nat`), at byte 18 of the value: `CT_CLOSING`,
/// `CT_FIN_CLIENT`, `CT_FIN_BACKEND`.
const CT_CLOSING: u8 = 2;
const CT_FIN_CLIENT: u8 = 4;
const CT_FIN_BACKEND: u8 = 8;
/// TCP flags: FIN, RST, PSH, ACK.
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// The flags of the client entry of client port `sport`.
fn ct_flags(ct: Ct, sport: u16) -> u8 {
    ct_entries(ct)
        .into_iter()
        .find(|(k, _)| k[37] == CT_DIR_CLIENT && k[32..34] == sport.to_be_bytes())
        .map_or_else(
            || panic!("no client entry for port {sport}"),
            |(_, v)| v[18],
        )
}

/// A TCP flow to a pod on this node has one conntrack entry for both directions, so a FIN
/// closes only its own side (`CT_FIN_CLIENT` from XDP, `CT_FIN_BACKEND` from tc): a backend
/// answering a half-closed request after the 10 s closing timeout is still translated, and
/// the flow closes (10 s) once both sides sent their FIN, or at once after an RST from either;
/// a SYN on the ports of a closing flow opens a new one. Byte for byte through test-run.
#[test]
fn a_half_closed_tcp_flow_keeps_its_translation_until_both_sides_close() {
    let (_topo, _dir, agent, xdp, tc) = start_for_test_run("nh", &["10.250.2.2:30080/TCP"]);
    let ct = ct_map(&agent);
    let pod = "10.200.0.11";
    let client = "192.0.2.92";
    let with = |p: &Pkt, flags: u8| {
        let mut p = p.clone();
        p.tcp_flags = flags;
        p
    };
    // The client opens, sends its request and half-closes.
    let syn = Pkt::new(client, NODE4, TCP, 41_600, 30080);
    assert_eq!(
        test_run(xdp, &syn.bytes()),
        (XDP_PASS, syn.to(pod, 8080).bytes())
    );
    let fin = with(&syn, FIN | ACK);
    assert_eq!(
        test_run(xdp, &fin.bytes()),
        (XDP_PASS, fin.to(pod, 8080).bytes()),
        "the client's FIN"
    );
    assert_eq!(ct_flags(ct, 41_600), CT_FIN_CLIENT, "half-closed");
    // The server works for 11 s (past the closing timeout), then answers.
    let (key, _) = ct_entry(ct, CT_DIR_CLIENT, 41_600);
    set_seen(ct, &key, coarse_now() - 11_000_000_000);
    let expired = agent.stat("tc_ct_expired");
    let data = with(&Pkt::new(pod, client, TCP, 8080, 41_600), PSH | ACK);
    assert_eq!(
        test_run(tc, &data.bytes()),
        (TC_ACT_OK, data.from(NODE4, 30080).bytes()),
        "the late reply of a half-closed flow leaves from the frontend"
    );
    assert_eq!(agent.stat("tc_ct_expired"), expired);
    // The server's FIN closes the flow: still translated, then the closing timeout applies.
    let server_fin = with(&data, FIN | ACK);
    assert_eq!(
        test_run(tc, &server_fin.bytes()),
        (TC_ACT_OK, server_fin.from(NODE4, 30080).bytes())
    );
    assert_eq!(ct_flags(ct, 41_600), CT_FIN_CLIENT | CT_FIN_BACKEND);
    set_seen(ct, &key, coarse_now() - 11_000_000_000);
    assert_eq!(
        test_run(tc, &server_fin.bytes()),
        (TC_ACT_OK, server_fin.bytes()),
        "closed by both sides and idle past 10 s: gone"
    );
    assert_eq!(agent.stat("tc_ct_expired"), expired + 1);

    // An RST from the server closes a flow at once (no FIN from the client needed).
    let syn = Pkt::new(client, NODE4, TCP, 41_601, 30080);
    assert_eq!(test_run(xdp, &syn.bytes()).0, XDP_PASS);
    let rst = with(&Pkt::new(pod, client, TCP, 8080, 41_601), RST | ACK);
    assert_eq!(
        test_run(tc, &rst.bytes()),
        (TC_ACT_OK, rst.from(NODE4, 30080).bytes())
    );
    assert_eq!(ct_flags(ct, 41_601), CT_CLOSING);
    let (key, _) = ct_entry(ct, CT_DIR_CLIENT, 41_601);
    set_seen(ct, &key, coarse_now() - 11_000_000_000);
    let expired = agent.stat("tc_ct_expired");
    assert_eq!(test_run(tc, &rst.bytes()), (TC_ACT_OK, rst.bytes()));
    assert_eq!(agent.stat("tc_ct_expired"), expired + 1);

    // A flow half-closed by the server: a client's SYN on its ports is a new flow (the old
    // entry is replaced), not a retransmission.
    let syn = Pkt::new(client, NODE4, TCP, 41_602, 30080);
    assert_eq!(test_run(xdp, &syn.bytes()).0, XDP_PASS);
    let server_fin = with(&Pkt::new(pod, client, TCP, 8080, 41_602), FIN | ACK);
    assert_eq!(test_run(tc, &server_fin.bytes()).0, TC_ACT_OK);
    assert_eq!(ct_flags(ct, 41_602), CT_FIN_BACKEND);
    let (expired, new_flows) = (agent.stat("xdp_ct_expired"), agent.stat("xdp_new_flow"));
    assert_eq!(
        test_run(xdp, &syn.bytes()),
        (XDP_PASS, syn.to(pod, 8080).bytes())
    );
    assert_eq!(agent.stat("xdp_ct_expired"), expired + 1);
    assert_eq!(agent.stat("xdp_new_flow"), new_flows + 1);
    assert_eq!(ct_flags(ct, 41_602), 0, "a fresh entry");

    // A flow of two entries (here: as layout 4 stored it) closes per entry as before: the
    // client's FIN marks the forward entry closing, the reply entry keeps the established
    // timeout, so a late reply is translated and touches the forward entry.
    mark_forward(&agent, NODE4, 30080, TCP);
    let old_client = "192.0.2.93";
    let (_, live) = ct_entries(ct)
        .into_iter()
        .find(|(k, _)| k[37] == CT_DIR_CLIENT && k[32..34] == 41_602u16.to_be_bytes())
        .expect("a live client entry");
    let mut fwd = live;
    fwd[24..44].fill(0);
    fwd[48..56].copy_from_slice(&coarse_now().to_ne_bytes());
    let mut back = fwd;
    back[..16].copy_from_slice(&ct_key(NODE4, NODE4, 0, 0, 0, 0)[..16]);
    back[16..18].copy_from_slice(&30080u16.to_be_bytes());
    back[44..48].fill(0);
    let fwd_key = ct_key(old_client, NODE4, 41_603, 30080, TCP, CT_DIR_IN);
    ct_put(ct, &fwd_key, &fwd);
    ct_put(
        ct,
        &ct_key(pod, old_client, 8080, 41_603, TCP, CT_DIR_REPLY),
        &back,
    );
    let fin = with(&Pkt::new(old_client, NODE4, TCP, 41_603, 30080), FIN | ACK);
    assert_eq!(
        test_run(xdp, &fin.bytes()),
        (XDP_PASS, fin.to(pod, 8080).bytes())
    );
    let fwd_flags = ct_entries(ct)
        .into_iter()
        .find(|(k, _)| *k == fwd_key)
        .map(|(_, v)| v[18]);
    assert_eq!(fwd_flags, Some(CT_CLOSING), "the forward entry closes");
    set_seen(ct, &fwd_key, coarse_now() - 11_000_000_000);
    let data = with(&Pkt::new(pod, old_client, TCP, 8080, 41_603), PSH | ACK);
    assert_eq!(
        test_run(tc, &data.bytes()),
        (TC_ACT_OK, data.from(NODE4, 30080).bytes()),
        "the late reply of a two-entry flow"
    );
    ct.close();
    // SAFETY: our own descriptors, closed once.
    unsafe {
        libc::close(xdp);
        libc::close(tc);
    }
}
