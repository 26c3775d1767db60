//! `spec.loadBalancerSourceRanges` through the north-south datapath: XDP admits new flows to
//! a LoadBalancer IP only from the listed ranges (kube-proxy's firewall), the Service's
//! NodePort takes every source, the drops are counted, a change of the ranges is in the
//! kernel at the next sync, and `lb check` rejects a bad range naming the object and field.
//!
//! Topology: `lb_tests::north_south::Topology`; the LoadBalancer IP 10.250.2.100 is routed to
//! the node by the router (as an upstream load balancer or BGP would), the node does not own it.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    TempDir, lb_bin,
    north_south::{EXT4, EXT6, FlowClient, NODE4, NODE6, NodeAgent, Topology},
};

const LB_IP: &str = "10.250.2.100";
const LB_IP6: &str = "fd00:250:2::100";
/// The second external client address (on the same interface as EXT4).
const EXT4_B: &str = "10.250.1.3";
const EXT6_B: &str = "fd00:250:1::3";

fn service(ranges: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: guarded}}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.80.1, 'fd00:96::80:1']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  loadBalancerSourceRanges: {ranges}
  ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30110}}]
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}, {{ip: '{LB_IP6}'}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: guarded-1, labels: {{kubernetes.io/service-name: guarded}}}}
addressType: IPv4
ports: [{{name: tcp, port: 8080}}]
endpoints:
- {{addresses: [10.200.0.11], nodeName: node-a}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: guarded-2, labels: {{kubernetes.io/service-name: guarded}}}}
addressType: IPv6
ports: [{{name: tcp, port: 8080}}]
endpoints:
- {{addresses: ['fd00:200::11'], nodeName: node-a}}
"
    )
}

/// Waits until `lb list` shows `text` on the line of `frontend`.
fn wait_for_line(agent: &NodeAgent, frontend: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = agent.lb(&["list"]);
        if list
            .lines()
            .any(|l| l.starts_with(&format!("{frontend} ")) && l.contains(text))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} on {frontend} in:\n{list}\nagent log:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request on a new TCP connection from `src` to `dst`: the answering pod, or the error.
fn request(topo: &Topology, src: &str, dst: &str) -> Result<String, String> {
    let flow = FlowClient::tcp(&topo.ext, Some(src), dst)?;
    flow.ask()
}

#[test]
fn source_ranges_admit_listed_clients_to_the_load_balancer_ip_only() {
    let topo = Topology::new();
    topo.ext.ip(&["addr", "add", "10.250.1.3/24", "dev", "e0"]);
    topo.ext.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:250:1::3/64",
        "dev",
        "e0",
        "nodad",
    ]);
    topo.router
        .ip(&["route", "add", &format!("{LB_IP}/32"), "via", NODE4]);
    topo.router
        .ip(&["-6", "route", "add", &format!("{LB_IP6}/128"), "via", NODE6]);
    let dir = TempDir::new("nsr");
    dir.write(
        "services.yaml",
        &service("[' 10.250.1.3/32 ', 'fd00:250:1::3/128']"),
    );
    let agent = NodeAgent::start(&topo, &dir.0);
    let lb4 = format!("{LB_IP}:80/TCP");
    let lb6 = format!("[{LB_IP6}]:80/TCP");
    wait_for_line(&agent, &lb4, "sources: 10.250.1.3/32");
    // Each family's LoadBalancer IP gets the ranges of its family only.
    wait_for_line(&agent, &lb6, "sources: fd00:250:1::3/128");
    assert!(
        !agent
            .lb(&["list"])
            .lines()
            .any(|l| l.starts_with(&lb6) && l.contains("10.250"))
    );
    let lb = format!("{LB_IP}:80");
    // A listed client reaches the pod, with its own address.
    let ok = request(&topo, EXT4_B, &lb);
    assert!(
        ok.as_deref()
            .is_ok_and(|a| a.starts_with("pod1 10.250.1.3:")),
        "{ok:?}\n{}",
        agent.lb(&["stats"])
    );
    // Another one is dropped (a timeout, no reset), and counted.
    let before = agent.stat("xdp_drop_source_range");
    let refused = request(&topo, EXT4, &lb);
    assert_eq!(refused, Err("timed out".to_owned()), "dropped, not reset");
    assert!(agent.stat("xdp_drop_source_range") > before);
    // lb explain names the rule, for the refused client and for the admitted one.
    for (client, want) in [
        (EXT4, "dropped: 10.250.1.2 is outside"),
        (EXT4_B, "10.250.1.3 is inside"),
    ] {
        let explained = agent.lb(&["explain", &lb, "--client", client, "--json"]);
        let e: serde_json::Value = serde_json::from_str(&explained).expect(&explained);
        assert!(
            e["external"]["verdict"]
                .as_str()
                .is_some_and(|v| v.starts_with(want)),
            "{e:#}"
        );
        assert_eq!(e["external"]["source_ranges"][0], "10.250.1.3/32", "{e:#}");
    }
    // The NodePort of the same Service takes every source (kube-proxy filters LB IPs only).
    let nodeport = request(&topo, EXT4, &format!("{NODE4}:30110"));
    assert!(
        nodeport.as_deref().is_ok_and(|a| a.starts_with("pod1 ")),
        "{nodeport:?}"
    );
    // IPv6: the same, with a /128 behind the trie's id (no IPv4 mapping in the prefix).
    let lb6_addr = format!("[{LB_IP6}]:80");
    let ok6 = request(&topo, EXT6_B, &lb6_addr);
    assert!(
        ok6.as_deref()
            .is_ok_and(|a| a.starts_with("pod1 [fd00:250:1::3]:")),
        "{ok6:?}"
    );
    assert_eq!(
        request(&topo, EXT6, &lb6_addr),
        Err("timed out".to_owned()),
        "dropped, not reset"
    );
    // An established flow outlives a change of the ranges that would refuse it (kube-proxy's
    // firewall matches new connections only); the new ranges apply to new flows.
    let held = FlowClient::tcp(&topo.ext, Some(EXT4_B), &lb).expect("connect");
    assert!(held.ask().is_ok());
    dir.write("services.yaml", &service("[10.250.1.2/32]"));
    wait_for_line(&agent, &lb4, "sources: 10.250.1.2/32");
    assert!(held.ask().is_ok(), "an established flow stays");
    assert!(request(&topo, EXT4, &lb).is_ok());
    assert_eq!(request(&topo, EXT4_B, &lb), Err("timed out".to_owned()));
    // No ranges: everyone again.
    dir.write("services.yaml", &service("[]"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.lb(&["list"]).contains("sources:") {
        assert!(Instant::now() < deadline, "the ranges stay");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(request(&topo, EXT4_B, &lb).is_ok());
    let stats = agent.lb(&["stats"]);
    assert!(stats.contains("LB_SRC_RANGES"), "{stats}");
    assert!(stats.contains("LB_CT"), "{stats}");
}

#[test]
fn lb_check_names_a_bad_source_range() {
    let dir = TempDir::new("nsr");
    dir.write("bad.yaml", &service("[10.250.1.0/24, 10.250.1.300/32]"));
    let out = Command::new(lb_bin())
        .arg("check")
        .arg("--manifests")
        .arg(&dir.0)
        .output()
        .expect("lb check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("default/guarded")
            && stderr.contains("spec.loadBalancerSourceRanges[1]")
            && stderr.contains("10.250.1.300/32"),
        "{stderr}"
    );
}
