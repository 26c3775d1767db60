//! Hostile input never stops the agent from applying changes: a manifest that breaks a parse
//! bound (100 000 nested flow mappings, a FIFO) is one error naming the file and the bound,
//! while every other file keeps being applied and `/healthz` stays truthful; `lb check` on
//! such a directory finishes promptly.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Agent, Cgroup, TempDir, http_get, lb_bin, unique};

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{clusterIP: {ip}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [10.244.9.9]}}]
"
    )
}

/// `{a: {a: ... 1 ... }}` nested 100 000 deep under a Service's `spec:` (about 600 KB).
fn hostile() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}1{}\n",
        "{a: ".repeat(100_000),
        "}".repeat(100_000)
    )
}

/// Runs `lb check --manifests DIR`, failing the test if it takes longer than 30 s.
fn check(dir: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(lb_bin())
        .arg("check")
        .arg("--manifests")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lb check");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _gone = child.kill();
            panic!("lb check did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_hostile_manifest_does_not_stall_the_agent() {
    let cgroup = Cgroup::new(&unique("hostile"));
    let dir = TempDir::new("m");
    dir.write("a.yaml", &service("a", "10.96.7.1"));
    let agent = Agent::start(&cgroup.path, &dir.0);
    agent.wait_for(
        "10.96.7.1:80/TCP",
        Some(&["10.244.9.9:8080"]),
        Duration::from_secs(5),
    );

    // The hostile file arrives, then a new Service in another file.
    let loads = agent.metric("lb_manifest_loads_total").unwrap_or(0.0);
    let deep = dir.write("deep.yaml", &hostile());
    agent.wait_metric_above("lb_manifest_loads_total", loads, Duration::from_secs(5));
    dir.write("b.yaml", &service("b", "10.96.7.2"));
    agent.wait_for(
        "10.96.7.2:80/TCP",
        Some(&["10.244.9.9:8080"]),
        Duration::from_secs(5),
    );
    let (code, body) = http_get(agent.healthz, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");

    // One error, naming the file and the bound, logged once.
    let log = agent.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&deep.display().to_string()))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("nesting deeper than lb's bound of 64 levels"),
        "{log}"
    );

    // A change to the first file still goes through.
    dir.write("a.yaml", &service("a", "10.96.7.3"));
    agent.wait_for(
        "10.96.7.3:80/TCP",
        Some(&["10.244.9.9:8080"]),
        Duration::from_secs(5),
    );
    agent.wait_for("10.96.7.1:80/TCP", None, Duration::from_secs(5));
    assert!(
        agent
            .metrics_text()
            .contains("lb_source_stalled{source=\"manifests\"} 0"),
        "{}",
        agent.metrics_text()
    );
}

#[test]
fn lb_check_on_a_hostile_directory_finishes_and_names_the_file_and_bound() {
    let dir = TempDir::new("m");
    dir.write("a.yaml", &service("a", "10.96.7.1"));
    let deep = dir.write("deep.yaml", &hostile());
    dir.write(
        "deep.json",
        &format!("{}1{}", "{\"a\": ".repeat(100_000), "}".repeat(100_000)),
    );
    // A FIFO named directly would block a plain read forever.
    let fifo = dir.0.join("pipe.yaml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid C string; mkfifo only creates a directory entry.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (ok, stderr) = check(&dir.0);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: nesting deeper than lb's bound of 64 levels",
            deep.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("deep.json"), "{stderr}");

    let mut child = Command::new(lb_bin())
        .args(["check", "--manifests"])
        .arg(&fifo)
        .output()
        .expect("lb check on a FIFO");
    assert!(!child.status.success());
    let stderr = String::from_utf8_lossy(&std::mem::take(&mut child.stderr)).into_owned();
    assert!(
        stderr.contains("a FIFO; lb reads regular files only"),
        "{stderr}"
    );
}
