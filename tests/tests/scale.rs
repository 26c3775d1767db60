//! Scale and churn: 20 000 Services programmed, removed and programmed again, several times;
//! the agent's memory stays flat across the cycles (no leak in the desired state, the
//! tracker, the map mirror or the manifest cache) and every cycle reaches the kernel.

use std::time::Duration;

use lb_tests::{Agent, Cgroup, TempDir, unique};

const SERVICES: usize = 20_000;

/// `n` Services (one TCP port, two endpoints each) as one JSON `v1 List`.
fn services(n: usize) -> String {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
        items.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s{i}"), "namespace": "scale"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]},
        }));
        items.push(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{i}-1"), "namespace": "scale",
                         "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.1"]}, {"addresses": ["10.244.0.2"]}],
        }));
    }
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The agent's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn twenty_thousand_services_programmed_and_churned_with_flat_memory() {
    let cgroup = Cgroup::new(&unique("scale"));
    let dir = TempDir::new("m");
    let text = services(SERVICES);
    dir.write("services.json", &text);
    let agent = Agent::start_within(&cgroup.path, &dir.0, Duration::from_secs(60));
    let pid = agent.pid().expect("running");
    let frontends = || agent.metric("lb_frontends").unwrap_or(-1.0);
    assert_eq!(frontends(), SERVICES as f64);
    let wait_frontends = |want: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while frontends() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "lb_frontends is {} not {want}:\n{}",
                frontends(),
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut rss = Vec::new();
    for _ in 0..4 {
        dir.remove("services.json");
        wait_frontends(0.0);
        dir.write("services.json", &text);
        wait_frontends(SERVICES as f64);
        rss.push(rss_kib(pid));
    }
    // The first cycle may still grow caches; later ones must not keep growing.
    let (first, last) = (rss[1], rss[rss.len() - 1]);
    assert!(
        last <= first + first / 5,
        "RSS grows across add/delete cycles: {rss:?} KiB"
    );
    // Every Service is in the kernel and lb list agrees.
    assert_eq!(agent.list().len(), SERVICES);
}
