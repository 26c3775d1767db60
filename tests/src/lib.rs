//! The harness of lb's integration tests: network namespaces, cgroups, test pods, clients and
//! an `lb` agent, each owned by a guard that removes it on drop (also when a test panics).
//!
//! Every test gets its own names (a per-process counter), so tests run in parallel. Traffic
//! stays inside namespaces the test made: the client namespace has no default route, so a
//! connect that lb does not translate fails with ENETUNREACH instead of leaving the machine.
//! Missing privileges or tools are test failures, never skips.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;

pub mod container;
pub mod fake_api;
pub mod north_south;
pub mod pinned;
pub mod xdp;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process and call: `lt<pid%100000>x<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The part of [`unique`] names that identifies this process.
fn process_tag() -> String {
    format!("{}x", std::process::id() % 100_000)
}

/// Makes `cmd`'s process die with this one (`PR_SET_PDEATHSIG`), so an interrupted test or
/// benchmark leaves no agent or server running.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// Removes what this process created (network namespaces, cgroups, lb pins, podman
/// containers and images) by name, for an
/// interrupted run whose guards cannot run. Everything matched carries this process's tag.
pub fn remove_leftovers() {
    let tag = process_tag();
    let ours = |name: &str| {
        name.trim_start_matches(|c: char| c.is_ascii_lowercase())
            .starts_with(&tag)
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                drop(Netns { name });
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if ours(&entry.file_name().to_string_lossy()) {
                let _cleaned = Command::new(lb_bin())
                    .arg("cleanup")
                    .arg("--pin-path")
                    .arg(entry.path())
                    .output();
            }
        }
    }
    // Containers and images of the container test (lbctr<tag>..., localhost/lbimg<tag>...).
    let podman_list = |args: &[&str]| -> Vec<String> {
        Command::new("podman")
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in podman_list(&["ps", "--all", "--format", "{{.Names}}"]) {
        if ours(&name) {
            drop(container::Container { name });
        }
    }
    for image in podman_list(&["images", "--format", "{{.Repository}}:{{.Tag}}"]) {
        if image.strip_prefix("localhost/").is_some_and(ours) {
            drop(container::Image {
                tag: image,
                files: Vec::new(),
            });
        }
    }
    if let Ok(entries) = std::fs::read_dir(cgroup2_root()) {
        for entry in entries.flatten() {
            if entry.path().is_dir() && ours(&entry.file_name().to_string_lossy()) {
                drop(Cgroup { path: entry.path() });
            }
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: [`remove_leftovers`], then exit 130. Call it before any
/// other thread starts, so they all inherit the blocked signals.
pub fn cleanup_on_signal() {
    // SAFETY: plain signal-mask calls on a local, initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&raw mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the set blocked above.
        unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        eprintln!("interrupted (signal {sig}): removing namespaces, cgroups and pins");
        remove_leftovers();
        std::process::exit(130);
    });
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (is it installed? `cargo xtask setup` installs what tests need)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks, once per process, that this is root on a machine with what the tests need.
pub fn require_privileges() {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "lb's integration tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF)"
        );
        for tool in ["ip", "nsenter", "bpftool"] {
            assert!(
                Command::new(tool)
                    .arg("help")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok(),
                "{tool} is missing: run `cargo xtask setup`"
            );
        }
        assert!(cgroup2_root().is_dir(), "no cgroup2 mount");
        assert!(
            lb_bin().is_file(),
            "{} does not exist: build it with `cargo build --release` (cargo xtask test does)",
            lb_bin().display()
        );
        assert!(
            testpod_bin().is_file(),
            "{} does not exist: build it with `cargo build -p lb-tests`",
            testpod_bin().display()
        );
    });
}

/// The `lb` binary under test: `$LB_BIN`, else the workspace's `target/release/lb`.
pub fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map_or_else(|| workspace_root().join("target/release/lb"), PathBuf::from)
}

/// The `lb` of the previous layout's release, which the upgrade test starts first:
/// `$LB_PREVIOUS_BIN`, else `target/layout-4/lb`. `cargo xtask test` builds it (and `cargo
/// xtask previous-release` alone); its absence fails the test, never skips it.
pub fn previous_lb_bin() -> PathBuf {
    let bin = std::env::var_os("LB_PREVIOUS_BIN").map_or_else(
        || workspace_root().join("target/layout-4/lb"),
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "{} does not exist: build the previous release's lb with `cargo xtask previous-release` \
         (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// The test pod binary, built with this crate: `$LB_TESTPOD`, else next to the running
/// test's `deps/` directory (where cargo puts the crate's binaries).
pub fn testpod_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_TESTPOD") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    profile_dir.join("lb-testpod")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 file system mounted")
}

/// A network namespace, deleted on drop (with every process still in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill of a process inside our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _gone = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child cgroup of the cgroup2 root, emptied (killed) and removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _killed = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _gone = self.0.kill();
        let _reaped = self.0.wait();
    }
}

/// A pod: its own namespace with a veth into the node bridge, addresses, and a test server.
pub struct Pod {
    pub name: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
    _server: Option<Proc>,
    pub netns: Netns,
}

/// One "node": a client namespace holding a bridge that pods hang off, a cgroup the client
/// processes join, and the pods. The client namespace has no default route.
pub struct Node {
    pub id: String,
    pub client: Netns,
    pub cgroup: Cgroup,
    pub pods: Vec<Pod>,
}

/// The client namespace's own addresses on the bridge.
pub const CLIENT_IP4: &str = "10.200.0.1";
pub const CLIENT_IP6: &str = "fd00:200::1";

impl Node {
    pub fn new() -> Self {
        require_privileges();
        let id = unique("lt");
        let client = Netns::new(format!("{id}c"));
        client.ip(&["link", "add", "br0", "type", "bridge"]);
        client.ip(&["link", "set", "br0", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP4}/24"), "dev", "br0"]);
        client.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        let cgroup = Cgroup::new(&id);
        Self {
            id,
            client,
            cgroup,
            pods: Vec::new(),
        }
    }

    /// Adds pod number `n` (1..=200) at 10.200.0.(10+n) and fd00:200::(10+n), serving TCP and
    /// UDP on `tcp_ports`/`udp_ports` and answering with `name`.
    pub fn add_pod(&mut self, n: u8, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> &Pod {
        let netns = Netns::new(format!("{}p{n}", self.id));
        let host_side = format!("vh{n}");
        self.client.ip(&[
            "link",
            "add",
            &host_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ]);
        self.client
            .ip(&["link", "set", &host_side, "master", "br0", "up"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        let ip4: IpAddr = format!("10.200.0.{}", 10 + u16::from(n))
            .parse()
            .expect("ipv4");
        let ip6: IpAddr = format!("fd00:200::{}", 10 + u16::from(n))
            .parse()
            .expect("ipv6");
        netns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let server = (!tcp_ports.is_empty() || !udp_ports.is_empty())
            .then(|| serve(&netns, name, tcp_ports, udp_ports));
        self.pods.push(Pod {
            name: name.to_owned(),
            ip4,
            ip6,
            _server: server,
            netns,
        });
        self.pods.last().expect("just pushed")
    }

    /// Runs the test client in the node's cgroup and client namespace.
    pub fn client(&self, args: &[&str]) -> Vec<Outcome> {
        run_client(Some(&self.cgroup.path), &self.client.path(), args)
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts `lb-testpod serve` in `netns` and waits until it listens.
fn serve(netns: &Netns, name: &str, tcp: &[u16], udp: &[u16]) -> Proc {
    let mut cmd = Command::new(testpod_bin());
    die_with_parent(&mut cmd)
        .arg("--netns")
        .arg(netns.path())
        .args(["serve", "--name", name]);
    for p in tcp {
        cmd.args(["--tcp", &p.to_string()]);
    }
    for p in udp {
        cmd.args(["--udp", &p.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lb-testpod serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    assert_eq!(line.trim(), "ready", "test pod {name} did not start");
    Proc(child)
}

/// One request's outcome, as lb-testpod reports it.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub backend: Option<String>,
    pub peer: Option<String>,
    pub errno: Option<i32>,
    pub error: Option<String>,
}

/// Runs lb-testpod as a client, optionally in a cgroup, inside `netns`.
pub fn run_client(cgroup: Option<&Path>, netns: &Path, args: &[&str]) -> Vec<Outcome> {
    let mut cmd = Command::new(testpod_bin());
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    cmd.arg("--netns").arg(netns).args(args);
    let out = cmd.output().expect("run lb-testpod client");
    assert!(
        out.status.success(),
        "client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The backends that answered, in order; panics on any failed request.
pub fn backends(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| {
            o.backend
                .clone()
                .unwrap_or_else(|| panic!("request failed: {o:?} (all: {outcomes:?})"))
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (for the agent's health and metrics servers).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).expect("mkdir temp");
        Self(dir)
    }

    /// Writes a file atomically (write + rename, as editors and ConfigMaps do).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, &path).expect("rename manifest");
        path
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).expect("remove manifest");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _gone = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `lb run`, with its own pin path; on drop it is killed and `lb cleanup` removes
/// what it put in the kernel.
pub struct Agent {
    pub pin_path: PathBuf,
    pub cgroup: PathBuf,
    /// The manifests directory (manifest agents; empty for API agents).
    pub manifests: PathBuf,
    /// `--manifests DIR` or `--kubeconfig FILE`, and any further flags.
    args: Vec<std::ffi::OsString>,
    pub healthz: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
    startup_timeout: Duration,
}

impl Agent {
    /// Starts lb on `manifests` for `cgroup` and waits (up to 20 s) for a healthy first sync.
    pub fn start(cgroup: &Path, manifests: &Path) -> Self {
        Self::start_within(cgroup, manifests, Duration::from_secs(20))
    }

    /// [`Agent::start`], waiting up to `within` (large benchmark sets load for a while).
    pub fn start_within(cgroup: &Path, manifests: &Path, within: Duration) -> Self {
        Self::start_manifests_with(cgroup, manifests, &[], within)
    }

    /// [`Agent::start`] with `extra` flags, waiting up to `within`.
    pub fn start_manifests_with(
        cgroup: &Path,
        manifests: &Path,
        extra: &[&str],
        within: Duration,
    ) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec!["--manifests".into(), manifests.into()];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        Self::start_with_args(cgroup, manifests.to_owned(), args, within)
    }

    /// Starts lb on the Kubernetes API described by `kubeconfig`, with `extra` flags.
    pub fn start_kube(cgroup: &Path, kubeconfig: &Path, extra: &[&str]) -> Self {
        Self::start_kube_within(cgroup, kubeconfig, extra, Duration::from_secs(20))
    }

    /// [`Agent::start_kube`], waiting up to `within` for the first sync.
    pub fn start_kube_within(
        cgroup: &Path,
        kubeconfig: &Path,
        extra: &[&str],
        within: Duration,
    ) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec!["--kubeconfig".into(), kubeconfig.into()];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        Self::start_with_args(cgroup, PathBuf::new(), args, within)
    }

    fn start_with_args(
        cgroup: &Path,
        manifests: PathBuf,
        args: Vec<std::ffi::OsString>,
        within: Duration,
    ) -> Self {
        let pin_path = PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
        let mut agent = Self {
            pin_path,
            cgroup: cgroup.to_owned(),
            manifests,
            args,
            healthz: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
            log: std::env::temp_dir().join(format!("{}.log", unique("lb-agent"))),
            child: None,
            startup_timeout: within,
        };
        agent.restart();
        agent
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the agent process (again), with the same pins, and waits until healthy.
    pub fn restart(&mut self) {
        // A port that free_port() found free may be taken before lb binds it (by another test
        // or process): then lb exits at once saying so, and gets other ports.
        for _ in 0..3 {
            let logged = self.log_text().len();
            self.spawn();
            if self.wait_healthy_or_exit() {
                return;
            }
            let new = self.log_text().get(logged..).unwrap_or_default().to_owned();
            if !new.contains("in use") {
                break;
            }
            self.child = None;
            self.healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
            self.metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
        panic!(
            "lb run exited before becoming healthy:\n{}",
            self.log_text()
        );
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let child = die_with_parent(&mut Command::new(lb_bin()))
            .arg("run")
            .args(&self.args)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(["--node-name", "node-a"])
            .arg("--healthz-bind-address")
            .arg(self.healthz.to_string())
            .arg("--metrics-bind-address")
            .arg(self.metrics.to_string())
            .env(
                "RUST_LOG",
                std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn lb run");
        self.child = Some(child);
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until healthy (true) or until the process exits (false).
    fn wait_healthy_or_exit(&mut self) -> bool {
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_status)) = child.try_wait()
            {
                return false;
            }
            if http_get(self.healthz, "/healthz").is_some_and(|(code, _)| code == 200) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "lb run not healthy after {:?}:\n{}",
                self.startup_timeout,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _gone = child.kill();
                let _reaped = child.wait();
                panic!(
                    "lb run did not exit within 10 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `/metrics` text.
    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The value of one unlabelled metric (e.g. `lb_manifest_loads_total`), if exported.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until `name` exceeds `before` (a reload or sync happened): a test that then
    /// asserts that nothing changed cannot pass before the agent even looked.
    pub fn wait_metric_above(&self, name: &str, before: f64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.metric(name).unwrap_or(0.0) <= before {
            assert!(
                Instant::now() < deadline,
                "{name} still {before} after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `lb ARGS... --pin-path PIN`.
    pub fn lb(&self, args: &[&str]) -> std::process::Output {
        Command::new(lb_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run lb")
    }

    /// `lb list --json`: frontend -> backends, read from the kernel.
    pub fn list(&self) -> Vec<ListedFrontend> {
        let out = self.lb(&["list", "--json"]);
        assert!(
            out.status.success(),
            "lb list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("lb list json")
    }

    /// Waits until `lb list` shows `frontend` with exactly `backends` (any order); returns
    /// how long that took.
    pub fn wait_for(
        &self,
        frontend: &str,
        backends: Option<&[&str]>,
        within: Duration,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let list = self.list();
            let found = list.iter().find(|f| f.frontend == frontend);
            let matches = match (found, backends) {
                (None, None) => true,
                (Some(f), Some(want)) => {
                    let mut got: Vec<&str> = f.backends.iter().map(String::as_str).collect();
                    let mut want = want.to_vec();
                    got.sort_unstable();
                    want.sort_unstable();
                    got == want
                }
                _ => false,
            };
            if matches {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{frontend} is not {backends:?} after {within:?}: {list:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _gone = child.kill();
            let _reaped = child.wait();
        }
        let _cleaned = Command::new(lb_bin())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .output();
        let _gone = std::fs::remove_file(&self.log);
    }
}

/// One row of `lb list --json`.
#[derive(Debug, Deserialize)]
pub struct ListedFrontend {
    pub frontend: String,
    pub id: u32,
    pub affinity_timeout_seconds: u32,
    pub backends: Vec<String>,
}

/// A Service on `ip:port` -> `target`/`proto` with one EndpointSlice holding `pods` (their
/// addresses, all of `ip`'s family), as manifest YAML.
pub fn service_manifest(
    name: &str,
    ip: &str,
    port: u16,
    target: u16,
    proto: &str,
    pods: &[String],
) -> String {
    let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
    let endpoints = if pods.is_empty() {
        "endpoints: []".to_owned()
    } else {
        let list: Vec<String> = pods
            .iter()
            .map(|ip| format!("  - addresses: ['{ip}']"))
            .collect();
        format!("endpoints:\n{}", list.join("\n"))
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: '{ip}'
  ports: [{{port: {port}, targetPort: {target}, protocol: {proto}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: {family}
ports: [{{port: {target}, protocol: {proto}}}]
{endpoints}
"
    )
}

/// A minimal HTTP/1.0 GET over loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The cgroup-attached programs on `cgroup`, as bpftool reports them: (attach type, name).
pub fn attached_programs(cgroup: &Path) -> Vec<(String, String)> {
    let out = sh(&[
        "bpftool",
        "-j",
        "cgroup",
        "show",
        cgroup.to_str().expect("utf-8 path"),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Array(Vec::new()));
    json.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
