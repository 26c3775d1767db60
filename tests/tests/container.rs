//! The container image, run as deploy/daemonset.yaml runs it: built from deploy/Containerfile
//! with buildah, run with podman in the host's network and PID namespaces with exactly the
//! manifest's capabilities and seccomp profile (not privileged), bpffs and cgroup2 mounted
//! from the host as the manifest's volumes say, the manifest's arguments. It serves a
//! Service to a client in a test namespace and child cgroup, keeps serving after the
//! container stops (pins on the host's bpffs), and `lb cleanup` in the same container
//! removes everything.
//!
//! Everything about how the container runs comes from the manifest (lb_tests::container);
//! the test only points the agent at its own child cgroup, pin directory, loopback ports
//! and a manifests directory, so that it never touches the node's root cgroup or pins.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_tests::{
    Node, TempDir, attached_programs, backends, cgroup2_root,
    container::{self, DaemonSet, Image, flag_value, with_flag},
    free_port, http_get, lb_bin, require_privileges, unique,
};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: '10.96.0.10'
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- addresses: ['10.200.0.11']
- addresses: ['10.200.0.12']
";

/// Where the test's manifests directory is mounted in the container.
const MANIFESTS_IN_CONTAINER: &str = "/etc/lb/manifests";

/// Host paths of the manifest's hostPath volumes on this machine: the node's cgroup2 tree
/// is at /sys/fs/cgroup on a cgroup v2 node, at /sys/fs/cgroup/unified on a hybrid one.
fn host_path(path: &str) -> PathBuf {
    if path == "/sys/fs/cgroup" {
        cgroup2_root()
    } else {
        PathBuf::from(path)
    }
}

/// The downward API's answers for this "node".
fn field_refs() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("spec.nodeName", "node-a".to_owned()),
        ("status.hostIP", "127.0.0.1".to_owned()),
    ])
}

/// Removes the pins and links if the test fails before the in-container cleanup (the
/// guards' order: this runs after the container is gone).
struct PinGuard {
    pin_path: PathBuf,
    cgroup: PathBuf,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _cleaned = std::process::Command::new(lb_bin())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .output();
    }
}

fn utf8(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_image_serves_a_service_as_the_daemonset_runs_it_and_cleans_up() {
    require_privileges();
    let ds = DaemonSet::load();
    let pod = ds.pod();
    let lb = pod.container("lb");
    let init = pod.container("mount-bpffs");
    // What the DaemonSet promises (README, the manifest's comments): the host's network and
    // PIDs, not privileged, every capability dropped but the ones it adds, no seccomp.
    assert!(pod.host_network, "the DaemonSet must use hostNetwork");
    assert!(pod.host_pid, "the DaemonSet must use hostPID");
    let sc = &lb.security_context;
    assert!(!sc.privileged, "the lb container must not be privileged");
    assert_eq!(sc.capabilities.drop, ["ALL"]);
    assert!(!sc.capabilities.add.is_empty());
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.kind.as_str()),
        Some("Unconfined")
    );

    let image = Image::build(&lb_bin());
    let mut files: Vec<String> = image
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    files.sort();
    eprintln!("image {}: {files:?}", image.tag);

    // The init container, as the manifest runs it (privileged, bpffs mounted Bidirectional):
    // bpffs is there already on this host, so it reports that and changes nothing.
    let out = container::run_once(
        &pod.podman_options(init, &host_path, &field_refs()),
        &image,
        &init.expanded_args(&field_refs()),
    );
    assert!(
        out.status.success(),
        "init container {:?}: {}{}",
        init.args,
        utf8(&out.stderr),
        utf8(&out.stdout)
    );
    assert!(
        utf8(&out.stdout).contains("bpffs already mounted at /sys/fs/bpf"),
        "{}",
        utf8(&out.stdout)
    );

    let mut node = Node::new();
    node.add_pod(1, "pod1", &[8080], &[]);
    node.add_pod(2, "pod2", &[8080], &[]);
    let dir = TempDir::new("m");
    dir.write("web.yaml", SERVICE);

    // The manifest's arguments, pointed at this test's own cgroup, pins and ports. The
    // cgroup and pin directories are the manifest's, plus a child: they must be what the
    // manifest's volumes mount.
    let args = lb.expanded_args(&field_refs());
    let cgroup_dir = flag_value(&args, "--cgroup").expect("--cgroup in the DaemonSet");
    let pin_dir = flag_value(&args, "--pin-path").expect("--pin-path in the DaemonSet");
    assert_eq!(
        host_path(pod.host_path_at(lb, cgroup_dir)),
        cgroup2_root(),
        "--cgroup={cgroup_dir} must be the host's cgroup2 root"
    );
    let bpffs_mount = Path::new(pin_dir)
        .parent()
        .expect("--pin-path has a parent")
        .to_str()
        .expect("utf-8");
    assert_eq!(pod.host_path_at(lb, bpffs_mount), "/sys/fs/bpf");
    let cgroup_name = node
        .cgroup
        .path
        .file_name()
        .expect("cgroup name")
        .to_str()
        .expect("utf-8");
    let cgroup_in_container = format!("{cgroup_dir}/{cgroup_name}");
    let pins = unique("lbt");
    let pin_in_container = format!("{bpffs_mount}/{pins}");
    let _pins = PinGuard {
        pin_path: Path::new("/sys/fs/bpf").join(&pins),
        cgroup: node.cgroup.path.clone(),
    };
    let healthz = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut args = with_flag(&args, "--cgroup", &cgroup_in_container);
    args = with_flag(&args, "--pin-path", &pin_in_container);
    args = with_flag(&args, "--healthz-bind-address", &healthz.to_string());
    args = with_flag(&args, "--metrics-bind-address", &metrics.to_string());
    args = with_flag(&args, "--manifests", MANIFESTS_IN_CONTAINER);
    let mut options = pod.podman_options(lb, &host_path, &field_refs());
    options.push(format!(
        "--volume={}:{MANIFESTS_IN_CONTAINER}:ro",
        dir.0.display()
    ));
    eprintln!("podman run {options:?} {} {args:?}", image.tag);
    let agent = container::start(&options, &image, &args);

    // Ready and live, on the manifest's probe paths.
    let probes: Vec<&str> = [&lb.readiness_probe, &lb.liveness_probe]
        .into_iter()
        .flatten()
        .filter_map(|p| p.http_get.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert_eq!(probes.len(), 2, "readiness and liveness probes");
    let deadline = Instant::now() + Duration::from_secs(30);
    for path in probes {
        while http_get(healthz, path).is_none_or(|(code, _)| code != 200) {
            assert!(
                agent.running() && Instant::now() < deadline,
                "{path} not 200 (running: {}):\n{}",
                agent.running(),
                agent.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Served through the container's programs, to both endpoints.
    let out = node.client(&["tcp", "10.96.0.10:80", "--count", "40"]);
    let mut seen = backends(&out);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["pod1", "pod2"], "{}", agent.logs());
    let programs = attached_programs(&node.cgroup.path);
    assert!(!programs.is_empty(), "nothing attached to the child cgroup");
    // Inspection inside the container reads the same pins.
    let list = agent.exec(&["/usr/local/bin/lb", "list", "--pin-path", &pin_in_container]);
    assert!(
        list.status.success() && utf8(&list.stdout).contains("10.96.0.10:80"),
        "lb list in the container: {}{}",
        utf8(&list.stderr),
        utf8(&list.stdout)
    );
    assert!(
        http_get(metrics, "/metrics").is_some_and(|(_, body)| body.contains("lb_syncs_total")),
        "metrics"
    );

    // SIGTERM within the grace period: exit 0, and the datapath stays (pins on the host).
    let grace = 30;
    assert_eq!(agent.stop(grace), Some(0), "{}", agent.logs());
    drop(agent);
    let out = node.client(&["tcp", "10.96.0.10:80", "--count", "4"]);
    assert_eq!(
        backends(&out).len(),
        4,
        "served after the container stopped"
    );

    // `lb cleanup` in the same image and security context.
    let cleanup_args: Vec<String> = [
        "cleanup",
        "--pin-path",
        &pin_in_container,
        "--cgroup",
        &cgroup_in_container,
    ]
    .map(String::from)
    .to_vec();
    let out = container::run_once(
        &pod.podman_options(lb, &host_path, &field_refs()),
        &image,
        &cleanup_args,
    );
    assert!(
        out.status.success(),
        "lb cleanup in the container: {}{}",
        utf8(&out.stderr),
        utf8(&out.stdout)
    );
    let said = utf8(&out.stdout);
    assert!(
        said.starts_with(&format!("removed {} links", programs.len())),
        "{said} (attached: {programs:?})"
    );
    assert!(attached_programs(&node.cgroup.path).is_empty());
    assert!(
        !Path::new("/sys/fs/bpf").join(&pins).exists(),
        "pins left after cleanup"
    );
    assert_eq!(
        node.client(&["tcp", "10.96.0.10:80"])[0].errno,
        Some(libc::ENETUNREACH)
    );
}
