//! Operating lb: the metrics a kube-proxy operator watches, map fill, the inspection commands
//! (`lb list`, `lb stats`, `lb explain`) against a real agent and the pinned maps, log
//! formats, and the Prometheus alerting rules evaluated by a real Prometheus.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Agent, Cgroup, TempDir, die_with_parent, lb_bin, unique};

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

/// `lb cleanup` of `pins` and `cgroup` when dropped.
struct CleanUp<'a> {
    pins: std::path::PathBuf,
    cgroup: &'a std::path::Path,
}

impl Drop for CleanUp<'_> {
    fn drop(&mut self) {
        let _cleaned = Command::new(lb_bin())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(&self.pins)
            .arg("--cgroup")
            .arg(self.cgroup)
            .output();
    }
}

/// SIGTERM while the agent still loads its programs (a kubelet stopping a pod that is
/// starting): the agent finishes starting and exits 0, not killed between two kernel steps.
#[test]
fn sigterm_during_start_up_ends_the_agent_cleanly() {
    let cgroup = Cgroup::new(&unique("sig"));
    let dir = TempDir::new("sig");
    write_services(&dir, 1);
    let cleanup = CleanUp {
        pins: std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt")),
        cgroup: &cgroup.path,
    };
    let log = std::env::temp_dir().join(format!("{}.log", unique("lb-agent")));
    let log_file = std::fs::File::create(&log).expect("log");
    let mut child = die_with_parent(&mut Command::new(lb_bin()))
        .arg("run")
        .arg("--manifests")
        .arg(&dir.0)
        .arg("--cgroup")
        .arg(&cgroup.path)
        .arg("--pin-path")
        .arg(&cleanup.pins)
        .args(["--node-name", "node-a"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .expect("spawn lb run");
    // The pin directory appears when the maps are created, before the programs load and
    // attach: the signal lands in the middle of start-up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cleanup.pins.exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "lb run exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "no pins");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _gone = child.kill();
            panic!("lb run did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _gone = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(0), "{status}: {text}");
    assert!(text.contains("datapath ready"), "{text}");
    assert!(
        text.contains("stopping; the datapath stays attached"),
        "{text}"
    );
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

/// A Prometheus started by a test on loopback, with its own config and data directory;
/// killed (and the directory removed) on drop, also when the test fails.
struct Prometheus {
    child: Option<std::process::Child>,
    addr: std::net::SocketAddr,
    /// Dropped after the process: holds the config, rules and TSDB.
    dir: TempDir,
}

impl Prometheus {
    /// Scrapes `target` and evaluates `rules` every second.
    fn start(target: std::net::SocketAddr, rules: &str) -> Self {
        let dir = TempDir::new("prom");
        dir.write("rules.yaml", rules);
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: lb\n    static_configs: [{{targets: ['{target}']}}]\n",
            rules = dir.0.join("rules.yaml").display()
        );
        let config_path = dir.write("prometheus.yml", &config);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], lb_tests::free_port()));
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log file");
        let child = lb_tests::die_with_parent(&mut Command::new("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect(
                "start prometheus (Debian's prometheus package: cargo xtask setup installs it)",
            );
        let prometheus = Self {
            child: Some(child),
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while lb_tests::http_get(addr, "/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` of the HTTP API, as JSON.
    fn api(&self, path: &str) -> serde_json::Value {
        let (code, body) = lb_tests::http_get(self.addr, path)
            .unwrap_or_else(|| panic!("GET {path}: no answer\n{}", self.log()));
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// The alerts in `state` (`pending`, `firing`): (alertname, labels).
    fn alerts(&self, state: &str) -> Vec<(String, serde_json::Value)> {
        self.api("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["state"] == state)
            .map(|a| {
                (
                    a["labels"]["alertname"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _gone = child.kill();
            let _reaped = child.wait();
        }
    }
}

/// Percent-encodes a query parameter.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs promtool with `args` in `dir`; panics with its output on failure.
fn promtool(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool (Debian's prometheus package: cargo xtask setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The `lb_*` metric names an expression uses.
fn lb_metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("lb_") {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn prometheus_rules_parse_and_a_full_map_fires_its_alert_in_a_real_prometheus() {
    let deploy = lb_tests::workspace_root().join("deploy");
    let rules_dir = deploy.join("prometheus");
    // The rules parse, and each alert fires on series that provoke it (promtool's unit tests).
    let checked = promtool(&rules_dir, &["check", "rules", "lb-rules.yaml"]);
    let alerts = std::fs::read_to_string(rules_dir.join("lb-rules.yaml"))
        .expect("read rules")
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(alerts, 8, "alert rules in lb-rules.yaml");
    assert!(
        checked.contains(&format!("SUCCESS: {alerts} rules found")),
        "{checked}"
    );
    promtool(&rules_dir, &["test", "rules", "lb-rules-test.yaml"]);

    // A real lb with a full frontend map (4 Services in a map of 4).
    let cgroup = Cgroup::new(&unique("lt"));
    let dir = TempDir::new("m");
    write_services(&dir, 4);
    let agent = Agent::start_manifests_with(
        &cgroup.path,
        &dir.0,
        &["--max-frontends", "4"],
        Duration::from_secs(20),
    );
    // Every lb metric the rules and the dashboard use exists in a real scrape.
    let scraped = agent.metrics_text();
    let rules_text = std::fs::read_to_string(rules_dir.join("lb-rules.yaml")).expect("read rules");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/lb-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panel_exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(panel_exprs.len() >= 10, "{panel_exprs:?}");
    for name in lb_metric_names(&rules_text)
        .into_iter()
        .chain(panel_exprs.iter().flat_map(|e| lb_metric_names(e)))
    {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            scraped.contains(&format!("# TYPE {family} ")),
            "{name} is not among lb's metrics:\n{scraped}"
        );
    }

    // Prometheus scraping it with the rules (durations cut to a second to keep this quick;
    // the expressions are the deployed ones).
    let quick_rules: String = rules_text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let prometheus = Prometheus::start(agent.metrics, &quick_rules);
    let deadline = Instant::now() + Duration::from_secs(60);
    let firing = loop {
        let firing = prometheus.alerts("firing");
        if !firing.is_empty() {
            break firing;
        }
        assert!(
            Instant::now() < deadline,
            "no alert fired within 60 s; pending: {:?}\n{}",
            prometheus.alerts("pending"),
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let names: Vec<&str> = firing.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["LbMapNearlyFull"], "only the full map: {firing:?}");
    assert_eq!(firing[0].1["map"], "LB_FRONTENDS");
    assert_eq!(firing[0].1["severity"], "warning");

    // Every dashboard query runs in that Prometheus.
    for expr in &panel_exprs {
        let expr = expr.replace("$instance", ".*");
        let answer = prometheus.api(&format!("/api/v1/query?query={}", url_encode(&expr)));
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
    }
}
