//! `cargo xtask demo`: lb on the seed's Services, with network-namespace "pods" that answer
//! with their name, and curl from a client namespace (no default route) in lb's cgroup.
//! Everything it creates is removed at the end, also on failure.

use std::process::Command;

use anyhow::{Context as _, bail};
use lb_tests::{Agent, Node, TempDir};

use crate::cmd;

const MANIFESTS: &str = include_str!("../demo/seed-services.yaml");

/// curl from the client namespace, inside the cgroup lb is attached to.
fn curl(node: &Node, url: &str) -> anyhow::Result<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net={} curl -sS --max-time 3 {url}",
        node.cgroup.path.display(),
        node.client.path().display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn show(node: &Node, title: &str, url: &str, times: usize) -> anyhow::Result<()> {
    println!("\n== {title}");
    for _ in 0..times {
        println!("$ curl -s {url}\n{}", curl(node, url)?);
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    cmd::prepare_privileged("the demo", crate::setup::For::Demo)?;

    let mut node = Node::new();
    for (n, name) in [(1, "crane-1"), (2, "crane-2"), (3, "crane-3")] {
        node.add_pod(n, name, &[8080, 8443], &[]);
    }
    node.add_pod(4, "external-1", &[80], &[]);
    node.add_pod(5, "external-2", &[80], &[]);
    let dir = TempDir::new("lb-demo");
    let file = dir.write("seed-services.yaml", MANIFESTS);
    println!("pods: crane-1..3 (10.200.0.11-13), external-1..2 (10.200.0.14-15)");
    println!(
        "client: network namespace {} (no default route), cgroup {}",
        node.client.name,
        node.cgroup.path.display()
    );
    println!(
        "lb run --manifests {} --cgroup {} ...",
        file.display(),
        node.cgroup.path.display()
    );
    let agent = Agent::start(&node.cgroup.path, &dir.0);

    show(
        &node,
        "crane-http, ClusterIP 10.96.49.75: each curl is a new connection to a random pod",
        "http://10.96.49.75:8080/crane",
        6,
    )?;
    show(
        &node,
        "crane-sticky, sessionAffinity: ClientIP: one client, one pod",
        "http://10.96.49.76:8080/",
        4,
    )?;
    show(
        &node,
        "crane-multi, port http 80 -> the pods' port named \"http\" (8080)",
        "http://10.96.49.77:80/",
        2,
    )?;
    show(
        &node,
        "crane-multi, port https 443 -> 8443",
        "http://10.96.49.77:443/",
        2,
    )?;
    show(
        &node,
        "crane-nodeport through its ClusterIP (the seed's `kubectl exec ... curl`)",
        "http://10.103.149.113:8080/",
        2,
    )?;
    show(
        &node,
        "external-service: no selector, hand-written Endpoints",
        "http://10.96.49.78/",
        4,
    )?;

    println!("\n== lb list (read from the pinned maps)");
    let list = agent.lb(&["list"]);
    print!("{}", String::from_utf8_lossy(&list.stdout));
    println!("\n== outside lb's cgroup, the ClusterIP is just an unroutable address");
    let outside = Command::new("nsenter")
        .arg(format!("--net={}", node.client.path().display()))
        .args(["curl", "-sS", "--max-time", "3", "http://10.96.49.75:8080/"])
        .output()?;
    println!(
        "$ curl -s http://10.96.49.75:8080/\n{}",
        String::from_utf8_lossy(&outside.stderr).trim()
    );
    println!("\ncleaning up: lb cleanup, namespaces, cgroup");
    drop(agent);
    drop(node);
    println!("done");
    Ok(())
}
