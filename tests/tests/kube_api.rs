//! lb watching the Kubernetes API: a stand-in API server speaking the real wire protocol,
//! the real agent and kernel, connections from a client namespace in the agent's cgroup.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use lb_tests::{
    Agent, Node, TempDir, backends,
    fake_api::{FakeApi, Resource},
    http_get,
};
use serde_json::{Value, json};

/// How soon a change in the API must be in the kernel.
const WITHIN: Duration = Duration::from_secs(1);

fn service(name: &str, ip: &str, extra: Value) -> Value {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}
    });
    merge(&mut svc, extra);
    svc
}

/// An EndpointSlice of `service` with (address, ready, serving, terminating, node) endpoints.
fn slice(name: &str, service: &str, endpoints: &[(&str, bool, bool, bool, &str)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(ip, ready, serving, terminating, node)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "nodeName": node,
        })).collect::<Vec<_>>()
    })
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

const READY: bool = true;

/// A node with `n` pods, a fake API and lb watching it.
struct Fixture {
    agent: Agent,
    api: FakeApi,
    _dir: TempDir,
    node: Node,
}

fn start(pods: u8, extra: &[&str]) -> Fixture {
    start_with(pods, extra, |_| {})
}

fn start_with(pods: u8, extra: &[&str], before: impl FnOnce(&FakeApi)) -> Fixture {
    let mut node = Node::new();
    for i in 1..=pods {
        node.add_pod(i, &format!("pod{i}"), &[8080], &[]);
    }
    let api = FakeApi::start();
    before(&api);
    let dir = TempDir::new("kube");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let agent = Agent::start_kube(&node.cgroup.path, &kubeconfig, extra);
    Fixture {
        agent,
        api,
        _dir: dir,
        node,
    }
}

impl Fixture {
    fn ip(&self, pod: usize) -> String {
        self.node.pods[pod - 1].ip4.to_string()
    }

    fn backend(&self, pod: usize) -> String {
        format!("{}:8080", self.ip(pod))
    }

    fn seen(&self, vip: &str, count: &str) -> BTreeSet<String> {
        backends(&self.node.client(&["tcp", vip, "--count", count]))
            .into_iter()
            .collect()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.agent
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }
}

fn names(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|&p| p.to_owned()).collect()
}

#[test]
fn services_and_endpoints_follow_the_api() {
    let f = start(3, &[]);
    let (b1, b2) = (f.backend(1), f.backend(2));
    // Create.
    f.api.apply(service("web", "10.96.1.10", json!({})));
    f.api.apply(slice(
        "web-a",
        "web",
        &[(&f.ip(1), READY, true, false, "node-b")],
    ));
    f.agent.wait_for("10.96.1.10:80/TCP", Some(&[&b1]), WITHIN);
    assert_eq!(f.seen("10.96.1.10:80", "5"), names(&["pod1"]));
    // Scale up: a second slice and a second endpoint.
    f.api.apply(slice(
        "web-b",
        "web",
        &[(&f.ip(2), READY, true, false, "node-b")],
    ));
    f.agent
        .wait_for("10.96.1.10:80/TCP", Some(&[&b1, &b2]), WITHIN);
    assert_eq!(f.seen("10.96.1.10:80", "40"), names(&["pod1", "pod2"]));
    // Scale down.
    f.api.delete(slice("web-a", "web", &[]));
    f.agent.wait_for("10.96.1.10:80/TCP", Some(&[&b2]), WITHIN);
    // Delete the Service: no longer translated.
    f.api.delete(service("web", "10.96.1.10", json!({})));
    f.agent.wait_for("10.96.1.10:80/TCP", None, WITHIN);
    assert_eq!(
        f.node.client(&["tcp", "10.96.1.10:80"])[0].errno,
        Some(libc::ENETUNREACH)
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let f = start(2, &[]);
    f.api.apply(service("drain", "10.96.1.20", json!({})));
    // Both terminating, one still serving: it takes the traffic.
    f.api.apply(slice(
        "drain-a",
        "drain",
        &[
            (&f.ip(1), false, true, true, "n"),
            (&f.ip(2), false, false, true, "n"),
        ],
    ));
    f.agent
        .wait_for("10.96.1.20:80/TCP", Some(&[&f.backend(1)]), WITHIN);
    assert_eq!(f.seen("10.96.1.20:80", "5"), names(&["pod1"]));
    // A ready endpoint appears: only it is used.
    f.api.apply(slice(
        "drain-a",
        "drain",
        &[
            (&f.ip(1), false, true, true, "n"),
            (&f.ip(2), READY, true, false, "n"),
        ],
    ));
    f.agent
        .wait_for("10.96.1.20:80/TCP", Some(&[&f.backend(2)]), WITHIN);
    // None serving at all: refused.
    f.api.apply(slice(
        "drain-a",
        "drain",
        &[(&f.ip(1), false, false, true, "n")],
    ));
    f.agent.wait_for("10.96.1.20:80/TCP", Some(&[]), WITHIN);
    assert_eq!(
        f.node.client(&["tcp", "10.96.1.20:80"])[0].errno,
        Some(libc::ECONNREFUSED)
    );
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    // The agent runs as node-a (the harness passes --node-name node-a).
    let f = start(2, &[]);
    f.api.apply(service(
        "local",
        "10.96.1.30",
        json!({"spec": {"internalTrafficPolicy": "Local"}}),
    ));
    f.api.apply(slice(
        "local-a",
        "local",
        &[
            (&f.ip(1), READY, true, false, "node-a"),
            (&f.ip(2), READY, true, false, "node-b"),
        ],
    ));
    f.agent
        .wait_for("10.96.1.30:80/TCP", Some(&[&f.backend(1)]), WITHIN);
    assert_eq!(f.seen("10.96.1.30:80", "20"), names(&["pod1"]));
    // No local endpoint: no fallback to the other node's.
    f.api.apply(slice(
        "local-a",
        "local",
        &[(&f.ip(2), READY, true, false, "node-b")],
    ));
    f.agent.wait_for("10.96.1.30:80/TCP", Some(&[]), WITHIN);
}

#[test]
fn relist_after_410_changes_only_what_changed() {
    let f = start(3, &[]);
    f.api.apply(service("keep", "10.96.1.40", json!({})));
    f.api.apply(slice(
        "keep-a",
        "keep",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.api.apply(service("gone", "10.96.1.41", json!({})));
    f.api.apply(slice(
        "gone-a",
        "gone",
        &[(&f.ip(2), READY, true, false, "n")],
    ));
    f.agent
        .wait_for("10.96.1.41:80/TCP", Some(&[&f.backend(2)]), WITHIN);
    let ids_before: Vec<(String, u32)> = f
        .agent
        .list()
        .into_iter()
        .map(|l| (l.frontend, l.id))
        .collect();
    let writes = |f: &Fixture| f.metric("lb_map_writes_total").unwrap_or(-1.0);
    let writes_before = writes(&f);
    let (lists_before, _) = f.api.requests(Resource::Services);
    // While the agent's watches are cut off, "gone" is deleted and the history compacted:
    // resuming its watch, the agent gets 410 Gone and must list again.
    f.api.set_down(true);
    f.api.delete(service("gone", "10.96.1.41", json!({})));
    f.api.delete(slice("gone-a", "gone", &[]));
    f.api.compact();
    f.api.set_down(false);
    f.agent
        .wait_for("10.96.1.41:80/TCP", None, Duration::from_secs(15));
    let (lists_after, _) = f.api.requests(Resource::Services);
    assert!(lists_after > lists_before, "the agent listed again");
    // "keep" was not touched: same id (not removed and re-added), and only the writes that
    // removed "gone": frontend, slot, member (and, when the slices were listed before the
    // Services, the frontend's count going to 0 first).
    let ids_after: Vec<(String, u32)> = f
        .agent
        .list()
        .into_iter()
        .map(|l| (l.frontend, l.id))
        .collect();
    assert_eq!(
        ids_after,
        ids_before
            .iter()
            .filter(|(fe, _)| fe.starts_with("10.96.1.40"))
            .cloned()
            .collect::<Vec<_>>()
    );
    let delta = writes(&f) - writes_before;
    assert!(
        (3.0..=4.0).contains(&delta),
        "{delta} writes:\n{}",
        f.agent.log_text()
    );
    assert_eq!(f.seen("10.96.1.40:80", "5"), names(&["pod1"]));
}

#[test]
fn dropped_watches_resume_without_a_relist() {
    let f = start(2, &[]);
    f.api.apply(service("web", "10.96.1.50", json!({})));
    f.api.apply(slice(
        "web-a",
        "web",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.agent
        .wait_for("10.96.1.50:80/TCP", Some(&[&f.backend(1)]), WITHIN);
    let (lists_before, watches_before) = f.api.requests(Resource::EndpointSlices);
    f.api.drop_watches();
    f.api.apply(slice(
        "web-a",
        "web",
        &[
            (&f.ip(1), READY, true, false, "n"),
            (&f.ip(2), READY, true, false, "n"),
        ],
    ));
    f.agent.wait_for(
        "10.96.1.50:80/TCP",
        Some(&[&f.backend(1), &f.backend(2)]),
        Duration::from_secs(5),
    );
    // The change may have come through the old watch just before it was cut; the new one
    // follows at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.api.requests(Resource::EndpointSlices).1 <= watches_before {
        assert!(Instant::now() < deadline, "the agent did not watch again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (lists_after, _) = f.api.requests(Resource::EndpointSlices);
    assert_eq!(
        lists_after, lists_before,
        "resumed from the last version, no list"
    );
}

#[test]
fn an_api_outage_keeps_serving_and_shows_in_healthz_and_metrics() {
    let f = start(1, &["--api-stale-after", "2"]);
    f.api.apply(service("web", "10.96.1.60", json!({})));
    f.api.apply(slice(
        "web-a",
        "web",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.agent
        .wait_for("10.96.1.60:80/TCP", Some(&[&f.backend(1)]), WITHIN);
    f.api.set_down(true);
    // Connections keep working from the last known state.
    assert_eq!(f.seen("10.96.1.60:80", "10"), names(&["pod1"]));
    // /healthz turns 503 once the API has failed for --api-stale-after; /livez stays 200.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(f.agent.healthz, "/healthz").is_some_and(|(code, _)| code == 200) {
        assert!(
            Instant::now() < deadline,
            "healthz still 200 during the outage:\n{}\n{}",
            f.agent.log_text(),
            f.agent.metrics_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        http_get(f.agent.healthz, "/livez").map(|(code, _)| code),
        Some(200)
    );
    assert_eq!(f.metric("lb_source_up"), Some(0.0));
    let errors: f64 = ["services", "endpointslices", "nodes"]
        .iter()
        .filter_map(|r| f.metric(&format!("lb_source_errors_total{{resource=\"{r}\"}}")))
        .sum();
    assert!(errors >= 1.0, "{}", f.agent.metrics_text());
    assert!(
        f.agent
            .log_text()
            .contains("watching the Kubernetes API failed"),
        "{}",
        f.agent.log_text()
    );
    assert_eq!(f.seen("10.96.1.60:80", "10"), names(&["pod1"]));
    // Back: healthy again, and changes flow.
    f.api.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(f.agent.healthz, "/healthz").is_none_or(|(code, _)| code != 200) {
        assert!(
            Instant::now() < deadline,
            "healthz not back after the outage:\n{}",
            f.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(f.metric("lb_source_up"), Some(1.0));
    f.api.apply(service("api", "10.96.1.61", json!({})));
    f.api.apply(slice(
        "api-a",
        "api",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.agent.wait_for(
        "10.96.1.61:80/TCP",
        Some(&[&f.backend(1)]),
        Duration::from_secs(10),
    );
}

#[test]
fn other_proxies_and_headless_services_are_not_programmed() {
    let f = start(1, &[]);
    let other = json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "someone-else"}}});
    f.api.apply(service("theirs", "10.96.1.70", other));
    f.api.apply(service("headless", "None", json!({})));
    f.api.apply(slice(
        "headless-a",
        "headless",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.api.apply(service("ours", "10.96.1.71", json!({})));
    f.agent.wait_for("10.96.1.71:80/TCP", Some(&[]), WITHIN);
    let listed: Vec<String> = f.agent.list().into_iter().map(|l| l.frontend).collect();
    assert_eq!(listed, ["10.96.1.71:80/TCP"]);
}

#[test]
fn objects_lb_cannot_use_are_logged_and_skipped() {
    let f = start(1, &[]);
    // The stand-in serves what a real API server would not validate; lb must not crash.
    f.api.apply(service(
        "bad",
        "10.96.1.80",
        json!({"spec": {"ports": [{"port": 70000}]}}),
    ));
    f.api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "weird", "namespace": "default", "labels": {"kubernetes.io/service-name": "x"}},
                       "addressType": "IPv4", "endpoints": [{"addresses": ["not-an-ip"]}]}));
    f.api.apply(service("good", "10.96.1.81", json!({})));
    f.api.apply(slice(
        "good-a",
        "good",
        &[(&f.ip(1), READY, true, false, "n")],
    ));
    f.agent
        .wait_for("10.96.1.81:80/TCP", Some(&[&f.backend(1)]), WITHIN);
    let log = f.agent.log_text();
    assert!(
        log.contains("Service default/bad: spec.ports[0].port: 70000 is out of range"),
        "{log}"
    );
    assert!(
        log.contains("EndpointSlice default/weird: endpoints[0].addresses[0]"),
        "{log}"
    );
    assert_eq!(f.metric("lb_config_errors"), Some(2.0));
    let mut agent = f.agent;
    assert!(agent.running());
}

#[test]
fn the_agent_waits_for_complete_lists_before_programming() {
    // Objects that exist before the agent starts are programmed in its first sync, all at
    // once (a restart never programs a half-seen world).
    let f = start_with(2, &[], |api| {
        for i in 0..50u8 {
            api.apply(service(
                &format!("s{i}"),
                &format!("10.96.2.{i}"),
                json!({}),
            ));
            api.apply(slice(
                &format!("s{i}-a"),
                &format!("s{i}"),
                &[("10.200.0.11", READY, true, false, "n")],
            ));
        }
    });
    assert_eq!(f.agent.list().len(), 50);
    assert_eq!(
        f.metric("lb_syncs_total{result=\"ok\"}"),
        Some(1.0),
        "{}",
        f.agent.log_text()
    );
}

#[test]
fn topology_hints_prefer_this_nodes_zone() {
    let f = start_with(3, &[], |api| {
        api.apply(json!({"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}}}));
    });
    f.api.apply(service(
        "near",
        "10.96.1.90",
        json!({"spec": {"trafficDistribution": "PreferClose"}}),
    ));
    let hinted = |ip: &str, zone: &str| json!({"addresses": [ip], "conditions": {"ready": true}, "zone": zone, "hints": {"forZones": [{"name": zone}]}});
    let mut near = slice("near-a", "near", &[]);
    near["endpoints"] = json!([
        hinted(&f.ip(1), "zone-1"),
        hinted(&f.ip(2), "zone-2"),
        hinted(&f.ip(3), "zone-1")
    ]);
    f.api.apply(near.clone());
    f.agent.wait_for(
        "10.96.1.90:80/TCP",
        Some(&[&f.backend(1), &f.backend(3)]),
        WITHIN,
    );
    assert_eq!(f.seen("10.96.1.90:80", "30"), names(&["pod1", "pod3"]));
    // One ready endpoint without hints: kube-proxy ignores hints altogether.
    near["endpoints"][1] = json!({"addresses": [f.ip(2)], "conditions": {"ready": true}});
    f.api.apply(near);
    f.agent.wait_for(
        "10.96.1.90:80/TCP",
        Some(&[&f.backend(1), &f.backend(2), &f.backend(3)]),
        WITHIN,
    );
    // The node moves to zone-2 (relabelled): everything is recomputed for the new zone.
    f.api.apply(json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-2"}}}));
    let mut near = slice("near-a", "near", &[]);
    near["endpoints"] = json!([hinted(&f.ip(1), "zone-1"), hinted(&f.ip(2), "zone-2")]);
    f.api.apply(near);
    f.agent
        .wait_for("10.96.1.90:80/TCP", Some(&[&f.backend(2)]), WITHIN);
}
