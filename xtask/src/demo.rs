//! `cargo xtask demo`: lb on the seed's Services, with network-namespace "pods" that answer
//! with their name and the client address they saw, on two "nodes" that each run an lb agent
//! (the north-south topology of `lb_tests::north_south`):
//!
//! ```text
//! ext 10.250.1.2 -- router --+-- node-a 10.250.2.2 (lb, XDP on n0) -- crane-1, crane-2, external-1..2
//!                            +-- node-b 10.250.2.3 (lb, XDP on m0) -- crane-3
//! ```
//!
//! Inside view: curl from node-a's client namespace (no default route) in lb's cgroup, through
//! the socket programs. Outside view: curl from the external client through the router to the
//! NodePort on each node and to crane-http's LoadBalancer IP, through XDP/tc. Everything it
//! creates is removed at the end, also on failure (guards on drop; on a signal, the harness's
//! handler).

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    Netns, TempDir,
    north_south::{EXT4, NODE_B4, NODE4, NodeAgent, TwoNodes},
};

use crate::cmd;

const MANIFESTS: &str = include_str!("../demo/seed-services.yaml");

/// crane-http's LoadBalancer ingress IP (in the manifests' status).
const LB_IP: &str = "203.0.113.10";
/// crane-3's endpoint line in the manifests (removed to show a pod going away).
const CRANE_3: &str = "- {addresses: [10.201.0.2], nodeName: node-b}\n";

/// curl `url` in network namespace `netns`; inside `cgroup` if given (lb's socket programs
/// apply there). The answer, or curl's error.
fn curl_in(netns: &Netns, cgroup: Option<&std::path::Path>, url: &str, max_time: u32) -> String {
    curl_with(netns, cgroup, url, max_time, "")
}

/// [`curl_in`] with `extra` curl arguments (shell words).
fn curl_with(
    netns: &Netns,
    cgroup: Option<&std::path::Path>,
    url: &str,
    max_time: u32,
    extra: &str,
) -> String {
    let join = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display()))
        .unwrap_or_default();
    let script = format!(
        "{join}exec nsenter --net={} curl -sS --max-time {max_time} {extra} {url}",
        netns.path().display()
    );
    match Command::new("sh").args(["-c", &script]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        Err(e) => format!("cannot run curl: {e}"),
    }
}

/// What an answer "POD ADDR:PORT" means in this topology: which node the pod is on and
/// whose address it saw. `outside`: the request came from the external client (through
/// XDP); else from node-a's own namespace (through the socket programs, which translate the
/// destination only, so the pod sees whichever address node-a's route picked).
fn annotate(answer: &str, outside: bool) -> String {
    let Some((pod, seen)) = answer.split_once(' ') else {
        return answer.to_owned();
    };
    let node = match pod {
        "crane-3" => "node-b",
        _ => "node-a",
    };
    let seen_ip = seen.rsplit_once(':').map_or(seen, |(ip, _)| ip);
    let who = match (seen_ip, outside) {
        (EXT4, _) => "the client's own address",
        (NODE4, true) => "node-a's address (SNAT)",
        (NODE_B4, true) => "node-b's address (SNAT)",
        (NODE4, false) => "the client's own address (node-a's uplink: its route to node-b)",
        (lb_tests::CLIENT_IP4, false) => "the client's own address (node-a's bridge)",
        _ => "",
    };
    format!("{answer:<28} <- {pod} on {node}, saw {who}")
}

/// The demo's topology, agents and printing. Fields drop in order: the agents (`lb cleanup`
/// inside their node's namespace) before the manifests and the namespaces.
struct Demo {
    agent_a: NodeAgent,
    agent_b: NodeAgent,
    dir: TempDir,
    topo: TwoNodes,
}

impl Demo {
    /// curl from node-a's client namespace, in lb's cgroup (the socket programs).
    fn inside(&self, title: &str, url: &str, times: usize) -> anyhow::Result<()> {
        println!("\n== {title}");
        for _ in 0..times {
            let answer = curl_in(
                &self.topo.node_a.client,
                Some(&self.topo.node_a.cgroup.path),
                url,
                3,
            );
            if answer.starts_with("curl:") {
                bail!("node-a$ curl -s {url}: {answer}");
            }
            println!("node-a$ curl -s {url}\n{}", annotate(&answer, false));
        }
        Ok(())
    }

    /// curl from the external client, `times` times; returns the pods that answered.
    fn outside(&self, url: &str, times: usize) -> anyhow::Result<BTreeSet<String>> {
        let mut pods = BTreeSet::new();
        for _ in 0..times {
            let answer = curl_in(&self.topo.ext, None, url, 3);
            if answer.starts_with("curl:") {
                bail!("ext$ curl -s {url}: {answer}");
            }
            println!("ext$ curl -s {url}\n{}", annotate(&answer, true));
            if let Some((pod, _)) = answer.split_once(' ') {
                pods.insert(pod.to_owned());
            }
        }
        Ok(pods)
    }

    /// curl from outside until every one of `want` answered (at most `max` times).
    fn outside_until(&self, url: &str, want: &[&str], max: usize) -> anyhow::Result<()> {
        let mut seen = BTreeSet::new();
        for _ in 0..max {
            seen.extend(self.outside(url, 1)?);
            if want.iter().all(|p| seen.contains(*p)) {
                return Ok(());
            }
        }
        bail!("{url}: {want:?} did not all answer in {max} requests (saw {seen:?})")
    }

    /// `router$ ip route replace LB_IP via NODE`: the cloud load balancer's choice.
    fn route_lb_ip_to(&self, node: &str, name: &str) {
        println!("router$ ip route replace {LB_IP} via {node}   # the load balancer picks {name}");
        self.topo
            .router
            .ip(&["route", "replace", LB_IP, "via", node]);
    }
}

fn frontends_programmed(agent: &NodeAgent, frontends: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = agent.lb(&["list"]);
        if frontends.iter().all(|f| list.contains(f)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "frontends {frontends:?} not programmed: {list}\nagent log:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Builds the topology and starts one agent per node.
fn setup() -> anyhow::Result<Demo> {
    let mut topo = TwoNodes::with_pod_b("crane-3", &[8080, 8443], &[]);
    topo.add_pod_a(1, "crane-1", &[8080, 8443], &[]);
    topo.add_pod_a(2, "crane-2", &[8080, 8443], &[]);
    topo.node_a.add_pod(4, "external-1", &[80], &[]);
    topo.node_a.add_pod(5, "external-2", &[80], &[]);
    topo.ext.ip(&["route", "add", LB_IP, "via", "10.250.1.1"]);
    let dir = TempDir::new("lb-demo");
    let file = dir.write("seed-services.yaml", MANIFESTS);
    let left = format!("ext {EXT4} -- router --");
    println!(
        "{left}+-- node-a {NODE4}: crane-1, crane-2 (10.200.0.11-12), external-1..2 (10.200.0.14-15)\n\
         {:w$}+-- node-b {NODE_B4}: crane-3 (10.201.0.2)",
        "",
        w = left.len()
    );
    println!(
        "(network namespaces {}, {}, {}, ...; the pods answer with their name and the client address they saw)",
        topo.ext.name, topo.node_a.client.name, topo.node_b.name
    );
    println!(
        "node-a$ lb run --manifests {} --xdp-iface n0 --node-ip {NODE4} --node-name node-a --cgroup {}",
        file.display(),
        topo.node_a.cgroup.path.display()
    );
    println!(
        "node-b$ lb run --manifests {} --xdp-iface m0 --node-ip {NODE_B4} --node-name node-b --cgroup {}",
        file.display(),
        topo.cgroup_b.path.display()
    );
    let agent_a = topo.agent_a(&dir.0, &["--node-ip", NODE4]);
    let agent_b = topo.agent_b(&dir.0, &["--node-ip", NODE_B4]);
    frontends_programmed(
        &agent_a,
        &[
            "10.96.49.78:80/TCP",
            "10.250.2.2:30123/TCP",
            "203.0.113.10:8080/TCP",
            "10.250.2.2:30124/TCP",
        ],
    )?;
    frontends_programmed(&agent_b, &["10.250.2.3:30123/TCP", "10.250.2.3:30124/TCP"])?;
    Ok(Demo {
        agent_a,
        agent_b,
        dir,
        topo,
    })
}

fn inside_view(demo: &Demo) -> anyhow::Result<()> {
    println!(
        "\n######## Inside the cluster: node-a's client namespace, in lb's cgroup (socket programs)"
    );
    demo.inside(
        "crane-http, ClusterIP 10.96.49.75: each curl is a new connection to a random pod",
        "http://10.96.49.75:8080/crane",
        6,
    )?;
    demo.inside(
        "crane-sticky, sessionAffinity: ClientIP: one client, one pod",
        "http://10.96.49.76:8080/",
        4,
    )?;
    demo.inside(
        "crane-multi, port http 80 -> the pods' port named \"http\" (8080)",
        "http://10.96.49.77:80/",
        2,
    )?;
    demo.inside(
        "crane-multi, port https 443 -> 8443",
        "http://10.96.49.77:443/",
        2,
    )?;
    demo.inside(
        "crane-nodeport through its ClusterIP (the seed's `kubectl exec ... curl`)",
        "http://10.103.149.113:8080/",
        2,
    )?;
    demo.inside(
        "external-service: no selector, hand-written Endpoints",
        "http://10.96.49.78/",
        4,
    )?;
    println!("\n== outside lb's cgroup, the ClusterIP is just an unroutable address");
    let url = "http://10.96.49.75:8080/";
    println!(
        "node-a$ curl -s {url}\n{}",
        curl_in(&demo.topo.node_a.client, None, url, 3)
    );
    Ok(())
}

fn outside_view(demo: &Demo) -> anyhow::Result<()> {
    println!(
        "\n######## Outside the cluster: the external client {EXT4}, behind a router (XDP/tc on each node)"
    );
    println!(
        "\n== crane-nodeport, NodePort 30123 on node-a (externalTrafficPolicy: Cluster): any pod;\n\
         \x20  crane-3 on node-b is one hop further and sees node-a's address, not the client's"
    );
    demo.outside_until(
        &format!("http://{NODE4}:30123/"),
        &["crane-1", "crane-2", "crane-3"],
        15,
    )?;
    println!("\n== the same NodePort on node-b: now crane-1 and crane-2 are the far ones");
    demo.outside_until(
        &format!("http://{NODE_B4}:30123/"),
        &["crane-1", "crane-2", "crane-3"],
        15,
    )?;
    println!(
        "\n== crane-http, type LoadBalancer: its ingress IP {LB_IP} (status.loadBalancer), sent by the load balancer to a node"
    );
    demo.route_lb_ip_to(NODE4, "node-a");
    demo.outside(&format!("http://{LB_IP}:8080/"), 3)?;
    demo.route_lb_ip_to(NODE_B4, "node-b");
    demo.outside(&format!("http://{LB_IP}:8080/"), 3)?;
    println!(
        "\n== crane-local, externalTrafficPolicy: Local (NodePort 30124): only the receiving node's\n\
         \x20  pods, no extra hop, and every pod sees the client's own address"
    );
    demo.outside(&format!("http://{NODE4}:30124/"), 3)?;
    demo.outside(&format!("http://{NODE_B4}:30124/"), 2)?;
    println!(
        "\n== its healthCheckNodePort 32124 tells the load balancer which nodes have a local pod"
    );
    for node in [NODE4, NODE_B4] {
        health_check(demo, node);
    }
    Ok(())
}

/// GET / on `node`'s health check port 32124 from outside, with the status code.
fn health_check(demo: &Demo, node: &str) {
    let url = format!("http://{node}:32124/");
    let code = "-w ' -> HTTP %{http_code}'";
    println!(
        "ext$ curl -s {code} {url}\n{}",
        curl_with(&demo.topo.ext, None, &url, 3, code)
    );
}

/// The seed's drawback of `externalTrafficPolicy: Local`: a node without a local pod drops.
fn pod_goes_away(demo: &Demo) -> anyhow::Result<()> {
    println!(
        "\n== crane-3 is deleted (its endpoint leaves the EndpointSlices): node-b has no crane-local pod"
    );
    demo.dir
        .write("seed-services.yaml", &MANIFESTS.replace(CRANE_3, ""));
    let deadline = Instant::now() + Duration::from_secs(5);
    while demo.agent_b.lb(&["list"]).contains("10.201.0.2") {
        if Instant::now() > deadline {
            bail!(
                "crane-3 still listed on node-b:\n{}",
                demo.agent_b.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    health_check(demo, NODE_B4);
    let dropped = demo.agent_b.stat("xdp_drop_no_local_endpoint");
    let url = format!("http://{NODE_B4}:30124/");
    println!(
        "ext$ curl -s --max-time 1 {url}\n{}",
        curl_in(&demo.topo.ext, None, &url, 1)
    );
    println!(
        "node-b$ lb stats: xdp_drop_no_local_endpoint {dropped} -> {} (dropped, as kube-proxy: never a hop to node-a)",
        demo.agent_b.stat("xdp_drop_no_local_endpoint")
    );
    println!("\n== crane-nodeport (Cluster) on node-b still answers, from node-a's pods");
    demo.outside(&format!("http://{NODE_B4}:30123/"), 2)?;
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    cmd::prepare_privileged("the demo", crate::setup::For::Demo)?;
    let started = Instant::now();
    let demo = setup().context("setting up the demo's namespaces and agents")?;
    inside_view(&demo)?;
    outside_view(&demo)?;
    for (node, ip, agent) in [
        ("node-a", NODE4, &demo.agent_a),
        ("node-b", NODE_B4, &demo.agent_b),
    ] {
        println!("\n== {node}$ lb explain {ip}:30124   (read from the pinned maps)");
        print!("{}", agent.lb(&["explain", &format!("{ip}:30124")]));
    }
    pod_goes_away(&demo)?;
    println!("\ncleaning up: lb cleanup on both nodes, namespaces, cgroups");
    drop(demo);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
