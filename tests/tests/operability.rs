//! Operating lb: the metrics a kube-proxy operator watches, map fill, the inspection commands
//! (`lb list`, `lb stats`, `lb explain`) against a real agent and the pinned maps, log
//! formats, and the Prometheus alerting rules evaluated by a real Prometheus.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Agent, Cgroup, TempDir, unique};

/// A Service on `cluster_ip:port/TCP` with one EndpointSlice of `backends` on `target`,
/// the slice annotated with `trigger` as its last-change-trigger-time when given.
fn service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target: u16,
    backends: &[&str],
    trigger: Option<&str>,
) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|ip| format!("  - addresses: ['{ip}']"))
        .collect();
    let endpoints = if endpoints.is_empty() {
        "endpoints: []".to_owned()
    } else {
        format!("endpoints:\n{}", endpoints.join("\n"))
    };
    let annotations = trigger.map_or_else(String::new, |t| {
        format!(", annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{t}'}}")
    });
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  clusterIP: '{cluster_ip}'
  ports: [{{name: http, port: {port}, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}{annotations}}}
addressType: IPv4
ports: [{{name: http, port: {target}}}]
{endpoints}
"
    )
}

/// Now as RFC 3339 with nanoseconds, as the EndpointSlice controller writes it.
fn rfc3339_now() -> String {
    lb_tests::sh(&["date", "-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .trim()
        .to_owned()
}

/// The value of the sample `name` (with exactly `labels`, e.g. `{map="LB_FRONTENDS"}`, or
/// "" for none) in Prometheus text.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `pred` holds for the agent's metrics; returns the text that satisfied it.
fn wait_metrics(agent: &Agent, within: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = agent.metrics_text();
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not get there within {within:?}:\n{text}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kube_proxy_metrics_count_changes_and_time_network_programming() {
    let cgroup = Cgroup::new(&unique("lt"));
    let dir = TempDir::new("m");
    // Changed long before the agent started: not a latency of this agent (kube-proxy's rule).
    dir.write(
        "web.yaml",
        &service(
            "web",
            "10.96.0.10",
            80,
            8080,
            &["10.1.0.1"],
            Some("2020-01-01T00:00:00Z"),
        ),
    );
    let agent = Agent::start(&cgroup.path, &dir.0);
    let text = agent.metrics_text();
    assert_eq!(sample(&text, "lb_service_changes_total", ""), Some(1.0));
    assert_eq!(sample(&text, "lb_endpoint_changes_total", ""), Some(1.0));
    assert_eq!(
        sample(&text, "lb_network_programming_duration_seconds_count", ""),
        Some(0.0),
        "a trigger time from before the start is not timed"
    );
    let first_sync = sample(&text, "lb_last_sync_timestamp_seconds", "").expect("last sync");

    // An endpoint change, triggered now: timed from the annotation to the map write.
    let triggered = Instant::now();
    dir.write(
        "web.yaml",
        &service(
            "web",
            "10.96.0.10",
            80,
            8080,
            &["10.1.0.1", "10.1.0.2"],
            Some(&rfc3339_now()),
        ),
    );
    let text = wait_metrics(&agent, Duration::from_secs(5), |t| {
        sample(t, "lb_network_programming_duration_seconds_count", "") == Some(1.0)
    });
    let took = sample(&text, "lb_network_programming_duration_seconds_sum", "").expect("sum");
    assert!(
        took > 0.0 && took <= triggered.elapsed().as_secs_f64() + 0.5,
        "latency {took} s, the test saw {:?}",
        triggered.elapsed()
    );
    assert_eq!(sample(&text, "lb_endpoint_changes_total", ""), Some(2.0));
    assert_eq!(
        sample(&text, "lb_service_changes_total", ""),
        Some(1.0),
        "the Service did not change"
    );
    let last_sync = sample(&text, "lb_last_sync_timestamp_seconds", "").expect("last sync");
    assert!(last_sync > first_sync, "{last_sync} after {first_sync}");
    assert!(
        sample(&text, "lb_sync_duration_seconds_count", "").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
}

/// `n` Services web0..web{n-1} on 10.96.1.x:80, one file each.
fn write_services(dir: &TempDir, n: u8) {
    for i in 0..n {
        dir.write(
            &format!("web{i}.yaml"),
            &service(
                &format!("web{i}"),
                &format!("10.96.1.{}", 10 + i),
                80,
                8080,
                &["10.1.0.1"],
                None,
            ),
        );
    }
}

#[test]
fn map_fill_is_a_metric_a_warning_and_a_stats_line() {
    let cgroup = Cgroup::new(&unique("lt"));
    let dir = TempDir::new("m");
    write_services(&dir, 3);
    let agent = Agent::start_manifests_with(
        &cgroup.path,
        &dir.0,
        &["--max-frontends", "4", "--max-backends", "64"],
        Duration::from_secs(20),
    );
    let frontends = r#"{map="LB_FRONTENDS"}"#;
    let text = agent.metrics_text();
    assert_eq!(sample(&text, "lb_map_entries", frontends), Some(3.0));
    assert_eq!(sample(&text, "lb_map_capacity", frontends), Some(4.0));
    assert_eq!(sample(&text, "lb_map_fill_ratio", frontends), Some(0.75));
    assert_eq!(sample(&text, "lb_map_nearly_full", frontends), Some(0.0));
    assert_eq!(
        sample(&text, "lb_map_capacity", r#"{map="LB_AFFINITY"}"#),
        Some(65536.0)
    );

    // The fourth Service fills the frontend map: past 90%.
    write_services(&dir, 4);
    wait_metrics(&agent, Duration::from_secs(5), |t| {
        sample(t, "lb_map_nearly_full", frontends) == Some(1.0)
    });
    let log = agent.log_text();
    assert!(
        log.contains("map nearly full") && log.contains("LB_FRONTENDS"),
        "{log}"
    );
    let out = agent.lb(&["stats"]);
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stdout);
    let row = stats
        .lines()
        .find(|l| l.starts_with("LB_FRONTENDS"))
        .unwrap_or_else(|| panic!("no LB_FRONTENDS row:\n{stats}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        fields,
        ["LB_FRONTENDS", "4", "4", "100.0%", "nearly", "full"],
        "{stats}"
    );
    let out = agent.lb(&["stats", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    let maps = json["maps"].as_array().expect("maps");
    let slots = maps
        .iter()
        .find(|m| m["map"] == "LB_SLOTS")
        .expect("LB_SLOTS");
    assert_eq!(
        (slots["entries"].as_u64(), slots["capacity"].as_u64()),
        (Some(4), Some(64))
    );

    // Back below: the metric clears and the log says so.
    for i in 1..4 {
        dir.remove(&format!("web{i}.yaml"));
    }
    wait_metrics(&agent, Duration::from_secs(5), |t| {
        sample(t, "lb_map_nearly_full", frontends) == Some(0.0)
    });
    assert!(agent.log_text().contains("map no longer nearly full"));
}

/// `lb list --json` rows, as JSON values.
fn list_json(agent: &Agent, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["list", "--json"];
    args.extend_from_slice(extra);
    let out = agent.lb(&args);
    assert!(
        out.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lb list json")
}

#[test]
fn list_names_services_and_filters_by_one_also_while_the_agent_is_down() {
    let cgroup = Cgroup::new(&unique("lt"));
    let dir = TempDir::new("m");
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.10", 80, 8080, &["10.1.0.1"], None),
    );
    dir.write(
        "db.yaml",
        &service("db", "10.96.0.11", 5432, 5432, &["10.1.0.2"], None),
    );
    let mut agent = Agent::start(&cgroup.path, &dir.0);
    let web = list_json(&agent, &["--service", "shop/web"]);
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(web[0]["frontend"], "10.96.0.10:80/TCP");
    assert_eq!(web[0]["service"], "shop/web");
    assert_eq!(web[0]["port_name"], "http");
    assert_eq!(web[0]["kind"], "ClusterIP");
    assert!(list_json(&agent, &["--service", "shop/nothing"]).is_empty());
    let out = agent.lb(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("shop/web:http") && table.contains("shop/db:http"),
        "{table}"
    );

    // A Service that goes takes its names along.
    dir.remove("db.yaml");
    agent.wait_for("10.96.0.11:5432/TCP", None, Duration::from_secs(5));
    let all = list_json(&agent, &[]);
    assert_eq!(all.len(), 1, "{all:?}");

    // A renamed port changes no frontend value, and still its name.
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.10", 80, 8080, &["10.1.0.1"], None)
            .replace("name: http", "name: www"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while list_json(&agent, &["--service", "shop/web"])[0]["port_name"] != "www" {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The agent down: the names are still beside the pins.
    assert_eq!(agent.stop(), Some(0));
    let web = list_json(&agent, &["--service", "shop/web"]);
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(web[0]["service"], "shop/web");
    assert_eq!(web[0]["port_name"], "www");
    let out = agent.lb(&["list", "--service", "a/b/c"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAMESPACE/NAME"));

    // A restart adopts the map, and renames reach it.
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.10", 80, 8080, &["10.1.0.1"], None)
            .replace("name: http", "name: www"),
    );
    agent.restart();
    let web = list_json(&agent, &["--service", "shop/web"]);
    assert_eq!(web[0]["port_name"], "www", "{web:?}");
}

/// `lb explain ARGS --json` against the agent's pins.
fn explain_json(agent: &Agent, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = agent.lb(&all);
    assert!(
        out.status.success(),
        "lb {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lb explain json")
}

#[test]
fn explain_names_the_frontend_backends_affinity_and_the_deciding_rule() {
    let mut node = lb_tests::Node::new();
    node.add_pod(1, "pod1", &[8080], &[]);
    node.add_pod(2, "pod2", &[8080], &[]);
    let ips: Vec<String> = node.pods.iter().map(|p| p.ip4.to_string()).collect();
    let dir = TempDir::new("m");
    dir.write(
        "sticky.yaml",
        &service("sticky", "10.96.0.20", 80, 8080, &[&ips[0], &ips[1]], None).replace(
            "  clusterIP: '10.96.0.20'",
            "  clusterIP: '10.96.0.20'\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
        ),
    );
    dir.write(
        "empty.yaml",
        &service("empty", "10.96.0.21", 80, 8080, &[], None),
    );
    let mut agent = Agent::start(&node.cgroup.path, &dir.0);

    let got = lb_tests::backends(&node.client(&["tcp", "10.96.0.20:80", "--count", "3"]));
    let pod = node
        .pods
        .iter()
        .find(|p| p.name == got[0])
        .expect("a pod answered");
    let sticky_backend = format!("{}:8080", pod.ip4);
    let client_netns = node.client.path();
    let client_netns = client_netns.to_str().expect("utf-8");

    // The client named by its namespace: its entry decides.
    let e = explain_json(&agent, &["10.96.0.20:80", "--client-netns", client_netns]);
    assert_eq!(e["frontend"], "10.96.0.20:80/TCP", "{e:#}");
    assert_eq!(e["rule"], "exact_frontend");
    assert_eq!(e["kind"], "ClusterIP");
    assert_eq!(e["service"], "shop/sticky");
    assert_eq!(e["port_name"], "http");
    assert_eq!(e["affinity_timeout_seconds"], 600);
    let backends: Vec<&str> = e["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["backend"].as_str().expect("backend"))
        .collect();
    assert_eq!(backends.len(), 2, "{e:#}");
    assert!(backends.contains(&sticky_backend.as_str()), "{e:#}");
    let affinity = e["affinity"].as_array().expect("affinity");
    assert_eq!(affinity.len(), 1, "{e:#}");
    assert_eq!(affinity[0]["backend"], sticky_backend.as_str());
    assert_eq!(affinity[0]["reused"], true);
    assert_eq!(e["verdict"]["outcome"], "translated");
    assert!(
        e["verdict"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains(&sticky_backend)),
        "{e:#}"
    );

    // The client named by its address: found in its namespace (other tests' client
    // namespaces may hold the same address: then each is listed, with a note).
    let e = explain_json(&agent, &["10.96.0.20:80", "--client", lb_tests::CLIENT_IP4]);
    let resolved = e["client"]["resolved"].as_array().expect("resolved");
    assert!(resolved.iter().any(|r| r["path"] == client_netns), "{e:#}");
    let affinity = e["affinity"].as_array().expect("affinity");
    assert_eq!(affinity.len(), 1, "{e:#}");
    assert_eq!(affinity[0]["backend"], sticky_backend.as_str());
    // An address no namespace here holds: said so, and every client's entry shown.
    let e = explain_json(&agent, &["10.96.0.20:80", "--client", "192.0.2.77"]);
    assert!(
        e["client"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("another node")),
        "{e:#}"
    );

    // No endpoints: refused, and by which rule.
    let e = explain_json(&agent, &["10.96.0.21:80/tcp"]);
    assert_eq!(e["verdict"]["outcome"], "refused", "{e:#}");
    assert_eq!(e["verdict"]["errno"], "ECONNREFUSED");
    assert_eq!(e["verdict"]["counter"], "refused_no_backend");
    // Not a frontend (another protocol of a Service address included).
    for target in ["10.96.0.99:80", "10.96.0.20:80/UDP"] {
        let e = explain_json(&agent, &[target]);
        assert_eq!(e["verdict"]["outcome"], "not_translated", "{e:#}");
        assert!(e["frontend"].is_null());
    }

    // The text form, with the agent down.
    assert_eq!(agent.stop(), Some(0));
    let out = agent.lb(&["explain", "10.96.0.21:80"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Service shop/empty, port http"), "{text}");
    assert!(
        text.contains("verdict   refused with ECONNREFUSED: no usable endpoint"),
        "{text}"
    );
    let out = agent.lb(&["explain", "web:80"]);
    assert!(!out.status.success());
}

#[test]
fn log_format_json_gives_one_object_per_line_with_the_fields() {
    let cgroup = Cgroup::new(&unique("lt"));
    let dir = TempDir::new("m");
    dir.write(
        "web.yaml",
        &service("web", "10.96.0.10", 80, 8080, &["10.1.0.1"], None),
    );
    // A manifest problem, logged with its fields.
    dir.write(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.30, ports: [{port: 70000}]}\n",
    );
    let agent = Agent::start_manifests_with(
        &cgroup.path,
        &dir.0,
        &["--log-format", "json"],
        Duration::from_secs(20),
    );
    let log = agent.log_text();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ready = events
        .iter()
        .find(|e| e["message"] == "datapath ready")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(ready["level"], "INFO");
    assert!(ready["pin_path"].is_string(), "{ready}");
    let problem = events
        .iter()
        .find(|e| e["message"] == "manifest problem")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(problem["level"], "ERROR");
    assert_eq!(problem["field"], "spec.ports[0].port", "{problem}");
    assert!(
        problem["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("bad.yaml")),
        "{problem}"
    );

    // Every subcommand takes the flag.
    for args in [
        &["list", "--log-format", "json"][..],
        &["stats", "--log-format", "text"],
        &["explain", "10.96.0.10:80", "--log-format", "json"],
    ] {
        let out = agent.lb(args);
        assert!(
            out.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(lb_tests::lb_bin())
        .args(["check", "--log-format", "json", "--manifests"])
        .arg(&dir.0)
        .output()
        .expect("lb check");
    assert_eq!(out.status.code(), Some(1), "the bad file is reported");
}
