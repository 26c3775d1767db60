//! Flows through the north-south datapath over time: an established flow from the external
//! client through a NodePort keeps its backend while the Service's other endpoints change and
//! while the agent restarts (pinned links adopted, the conntrack map kept), for a backend on
//! this node and one on another node (SNAT); and when its own backend leaves the Service, the
//! flow ends (the client sees a reset or a timeout), never answered by another pod.
//!
//! A half-closed flow (the client sends its request, then its FIN) to a backend on this node
//! gets its late reply translated: one side's FIN does not close the flow's one entry.
//!
//! Topologies: `lb_tests::north_south` (`Topology`: pod1 and pod2 on the agent's node;
//! `TwoNodes`: podb behind node-b).

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    TempDir,
    north_south::{EXT4, FlowClient, NODE4, NodeAgent, Topology, TwoNodes, in_netns},
};

/// A NodePort Service (eTP Cluster), TCP and UDP on 30100, with endpoints `endpoints`
/// (address, node) on port 8080.
fn service(endpoints: &[(&str, &str)]) -> String {
    let mut yaml = "apiVersion: v1
kind: Service
metadata: {name: flows}
spec:
  type: NodePort
  clusterIP: 10.96.70.1
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30100}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30100}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: flows-1, labels: {kubernetes.io/service-name: flows}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
"
    .to_owned();
    for (addr, node) in endpoints {
        yaml.push_str(&format!("- {{addresses: [{addr}], nodeName: {node}}}\n"));
    }
    yaml
}

/// Writes the Service with `endpoints` and waits until the agent's external backends of the
/// TCP NodePort are exactly those (`lb list`, read from the maps).
fn set_endpoints(agent: &NodeAgent, dir: &TempDir, endpoints: &[(&str, &str)]) {
    dir.write("services.yaml", &service(endpoints));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut want: Vec<String> = endpoints
        .iter()
        .map(|(addr, node)| {
            let place = if *node == "node-a" { "local" } else { "remote" };
            format!("{addr}:8080 ({place})")
        })
        .collect();
    want.sort();
    loop {
        let list = agent.lb(&["list", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
        let got: Option<Vec<String>> = rows.as_array().and_then(|rows| {
            rows.iter()
                .find(|r| r["frontend"] == format!("{NODE4}:30100/TCP"))
                .and_then(|r| r["external_backends"].as_array())
                .map(|b| {
                    let mut b: Vec<String> = b
                        .iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect();
                    b.sort();
                    b
                })
        });
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "external backends stay {got:?}, want {want:?}\nagent log:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pod name in an answer ("NAME CLIENT-ADDR:PORT").
fn pod_of(answer: &Result<String, String>, what: &str) -> String {
    let answer = answer
        .as_ref()
        .unwrap_or_else(|e| panic!("{what}: the flow failed: {e}"));
    answer
        .split_once(' ')
        .map_or(answer.as_str(), |(pod, _)| pod)
        .to_owned()
}

/// The local half: pod1 and pod2 on the agent's node, one flow per protocol.
fn local_flow_survives_then_ends(udp: bool) {
    let topo = Topology::new();
    let dir = TempDir::new("nsf");
    let both = [("10.200.0.11", "node-a"), ("10.200.0.12", "node-a")];
    dir.write("services.yaml", &service(&both));
    let mut agent = NodeAgent::start(&topo, &dir.0);
    set_endpoints(&agent, &dir, &both);
    let target = format!("{NODE4}:30100");
    let flow = if udp {
        FlowClient::udp(&topo.ext, None, &target)
    } else {
        FlowClient::tcp(&topo.ext, None, &target)
    }
    .unwrap_or_else(|e| panic!("connect {target}: {e}"));
    let pod = pod_of(&flow.ask(), "first request");
    let (mine, other) = if pod == "pod1" {
        (both[0], both[1])
    } else {
        (both[1], both[0])
    };
    // (a) The other endpoints change: one more, then the other pod gone, then back.
    for endpoints in [
        vec![mine, other, ("10.200.0.13", "node-a")],
        vec![mine, ("10.200.0.13", "node-a")],
        vec![mine, other],
    ] {
        set_endpoints(&agent, &dir, &endpoints);
        assert_eq!(
            pod_of(&flow.ask(), &format!("after endpoints {endpoints:?}")),
            pod,
            "the flow keeps its backend"
        );
    }
    // (b) The agent stops (the flow goes on without it), and a new one adopts the links and
    // keeps the conntrack map.
    assert_eq!(agent.stop(), Some(0), "SIGTERM exits 0");
    assert_eq!(pod_of(&flow.ask(), "while the agent is down"), pod);
    agent.start_again();
    set_endpoints(&agent, &dir, &[mine, other]);
    assert_eq!(pod_of(&flow.ask(), "after a restart"), pod);
    // (c) Its own backend leaves: the flow ends, no other pod answers it.
    let gone_before = agent.stat("xdp_drop_backend_gone");
    set_endpoints(&agent, &dir, &[other]);
    let after = flow.ask();
    eprintln!("after its backend left, the flow got: {after:?}");
    assert!(
        after.is_err(),
        "the flow's backend left: the flow must end, got {after:?}"
    );
    assert!(
        agent.stat("xdp_drop_backend_gone") > gone_before,
        "{}",
        agent.lb(&["stats"])
    );
    if udp {
        // kube-proxy clears the conntrack entries of a removed UDP endpoint, so that the
        // client's next datagrams reach a live one (a new flow); lb likewise: the datagram
        // that found the flow's backend gone was dropped, the next one starts afresh.
        let next = flow.ask();
        assert_eq!(
            pod_of(&next, "a new datagram after the flow ended"),
            if pod == "pod1" { "pod2" } else { "pod1" }
        );
    } else {
        // The connection is over for good (reset by the stack, or still timing out).
        let again = flow.ask();
        assert!(again.is_err(), "{again:?}");
    }
}

#[test]
fn local_tcp_flow_survives_endpoint_changes_and_restart_and_ends_with_its_backend() {
    local_flow_survives_then_ends(false);
}

#[test]
fn local_udp_flow_survives_endpoint_changes_and_restart_and_ends_with_its_backend() {
    local_flow_survives_then_ends(true);
}

/// The SNAT half: podb behind node-b, reached from node-a with SNAT.
fn snat_flow_survives_then_ends(udp: bool) {
    let topo = TwoNodes::new();
    let dir = TempDir::new("nsf");
    let podb = ("10.201.0.2", "node-b");
    // Another endpoint on node-b that nobody serves: a flow that moved there would time out.
    let other = ("10.201.0.7", "node-b");
    dir.write("services.yaml", &service(&[podb]));
    let mut agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    set_endpoints(&agent, &dir, &[podb]);
    let target = format!("{NODE4}:30100");
    let flow = if udp {
        FlowClient::udp(&topo.ext, None, &target)
    } else {
        FlowClient::tcp(&topo.ext, None, &target)
    }
    .unwrap_or_else(|e| panic!("connect {target}: {e}"));
    let first = flow.ask();
    assert_eq!(pod_of(&first, "first request"), "podb");
    // The SNAT'd source (node-a and the allocated port) stays the same through it all.
    let seen = first.expect("answer");
    for endpoints in [vec![podb, other], vec![podb]] {
        set_endpoints(&agent, &dir, &endpoints);
        assert_eq!(
            flow.ask().as_ref(),
            Ok(&seen),
            "after endpoints {endpoints:?}"
        );
    }
    assert_eq!(agent.stop(), Some(0), "SIGTERM exits 0");
    assert_eq!(flow.ask().as_ref(), Ok(&seen), "while the agent is down");
    agent.start_again();
    set_endpoints(&agent, &dir, &[podb]);
    assert_eq!(flow.ask().as_ref(), Ok(&seen), "after a restart");
    let gone_before = agent.stat("xdp_drop_backend_gone");
    set_endpoints(&agent, &dir, &[other]);
    let after = flow.ask();
    eprintln!("after its backend left, the flow got: {after:?}");
    assert!(
        after.is_err(),
        "the flow's backend left: the flow must end, got {after:?}"
    );
    assert!(
        agent.stat("xdp_drop_backend_gone") > gone_before,
        "{}",
        agent.lb(&["stats"])
    );
    // Nothing else answers it: the only other endpoint is not served.
    let again = flow.ask();
    assert!(again.is_err(), "{again:?}");
}

#[test]
fn snat_tcp_flow_survives_endpoint_changes_and_restart_and_ends_with_its_backend() {
    snat_flow_survives_then_ends(false);
}

#[test]
fn snat_udp_flow_survives_endpoint_changes_and_restart_and_ends_with_its_backend() {
    snat_flow_survives_then_ends(true);
}

/// The closing timeout of a flow's conntrack entry (`lb_common::nat::CT_TIMEOUT_CLOSING_NS`).
const CLOSING_TIMEOUT: Duration = Duration::from_secs(10);

/// The external client (in `ext`) connects to `target`, sends a request and half-closes
/// (`shutdown(SHUT_WR)`, as `nc -N` or an HTTP/1.0 client does); the server answers after
/// `delay`. Returns the answer (or the read's error), how long it took after the FIN, and the
/// socket's peer right after connecting.
fn half_closed_request(
    ext: &lb_tests::Netns,
    target: SocketAddr,
    delay: Duration,
) -> (Result<String, String>, Duration, Option<SocketAddr>) {
    let ms = delay.as_millis();
    in_netns(ext, move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {target}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream
            .write_all(format!("after-eof {ms}\n").as_bytes())
            .expect("request");
        // Read now: once both sides have closed, getpeername fails (ENOTCONN).
        let peer = stream.peer_addr().ok();
        stream.shutdown(Shutdown::Write).expect("half-close");
        let start = Instant::now();
        let mut answer = String::new();
        let read = stream
            .read_to_string(&mut answer)
            .map_err(|e| e.to_string());
        (read.map(|_| answer), start.elapsed(), peer)
    })
}

/// From `ext`, a request to the NodePort (`NODE4`:30100) half-closed at once, answered after
/// the closing timeout: the answer must arrive, start with `prefix` (`who` says which pod and
/// which source it saw), come from the frontend, and move `agent`'s counter `xlated`.
fn assert_late_reply_from_the_frontend(
    agent: &NodeAgent,
    ext: &lb_tests::Netns,
    prefix: &str,
    who: &str,
    xlated: &str,
) {
    let before = agent.stat(xlated);
    let target: SocketAddr = format!("{NODE4}:30100").parse().expect("address");
    let (answer, waited, peer) =
        half_closed_request(ext, target, CLOSING_TIMEOUT + Duration::from_secs(2));
    let answer = answer.unwrap_or_else(|e| {
        panic!(
            "the half-closed flow's late reply did not arrive: {e}\n{}",
            agent.lb(&["stats"])
        )
    });
    eprintln!("after {waited:?} the client got {answer:?} from {peer:?}");
    assert!(
        answer.starts_with(prefix),
        "the reply of {who}, got {answer:?}"
    );
    assert!(waited > CLOSING_TIMEOUT, "answered after {waited:?}");
    assert_eq!(peer, Some(target), "the socket's peer is the frontend");
    assert!(agent.stat(xlated) > before, "{}", agent.lb(&["stats"]));
}

/// The external client connects to a NodePort whose backend is on this node, sends a request
/// and half-closes; the server answers 12 s later, after the closing timeout. The reply must
/// still leave with the frontend as its source: the client's socket accepts data only from
/// the address and port it connected to (a reply with the pod's address would be answered
/// with a reset), so receiving the answer on it is the proof.
#[test]
fn half_closed_local_tcp_flow_gets_its_late_reply_from_the_frontend() {
    let topo = Topology::new();
    let dir = TempDir::new("nsf");
    let pod1 = [("10.200.0.11", "node-a")];
    dir.write("services.yaml", &service(&pod1));
    let agent = NodeAgent::start(&topo, &dir.0);
    set_endpoints(&agent, &dir, &pod1);
    let expired = agent.stat("tc_ct_expired");
    assert_late_reply_from_the_frontend(
        &agent,
        &topo.ext,
        &format!("pod1 {EXT4}:"),
        "pod1 (which saw the client's own address)",
        "tc_reply_xlated",
    );
    assert_eq!(
        agent.stat("tc_ct_expired"),
        expired,
        "no reply found its flow expired\n{}",
        agent.lb(&["stats"])
    );
}

/// The same through SNAT to podb on node-b (two entries per flow: the client's FIN closes the
/// forward entry, the reply entry keeps the established timeout), as before the per-side FIN
/// bits of one-entry flows.
#[test]
fn half_closed_snat_tcp_flow_gets_its_late_reply_from_the_frontend() {
    let topo = TwoNodes::new();
    let dir = TempDir::new("nsf");
    let podb = [("10.201.0.2", "node-b")];
    dir.write("services.yaml", &service(&podb));
    let agent = NodeAgent::start_on(&topo.node_a, &dir.0);
    set_endpoints(&agent, &dir, &podb);
    assert_late_reply_from_the_frontend(
        &agent,
        &topo.ext,
        &format!("podb {NODE4}:"),
        "podb (which saw node-a's address)",
        "xdp_reply_xlated",
    );
}
