//! The north-south test topologies (network namespaces for an external client, a router,
//! nodes and pods), and the agent that runs inside a node's namespace; shared by
//! `tests/north_south.rs` and `tests/north_south_flows.rs`.
//!
//! ```text
//! Topology:  ext (10.250.1.2) -- router (10.250.1.1 | 10.250.2.1) -- n0 (10.250.2.2) node -- br0 -- pods
//!
//! TwoNodes:  (IPv6 alike: fd00:250:1::/64, fd00:250:2::/64, podb fd00:201::2)
//!   ext (10.250.1.2, .3) -- router (10.250.1.1 | rb 10.250.2.1) --+-- n0 (10.250.2.2) node-a (agent)
//!                                                      bridge rb  +-- m0 (10.250.2.3) node-b
//!                                                                     -- q0 (10.201.0.2) podb
//! ```
//!
//! [`TwoNodes`] can also run an agent on node-b ([`TwoNodes::agent_b`]: node-b routes to
//! node-a's pods (10.200.0.0/24) and has a cgroup of its own) and have pods on node-a
//! ([`TwoNodes::add_pod_a`]); `tests/north_south_audit.rs` and `cargo xtask demo` do.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Cgroup, Netns, Node, Outcome, Proc, die_with_parent, lb_bin, run_client, testpod_bin, unique,
};

pub const EXT4: &str = "10.250.1.2";
pub const EXT6: &str = "fd00:250:1::2";
pub const NODE4: &str = "10.250.2.2";
pub const NODE6: &str = "fd00:250:2::2";

/// The topology; everything is removed on drop (namespaces delete their veths).
pub struct Topology {
    pub ext: Netns,
    pub router: Netns,
    pub node: Node,
    /// pod1's and pod2's servers, in that order.
    pub servers: Vec<Proc>,
}

/// Waits until no IPv6 address in `namespaces` is tentative. Link-local addresses stay
/// tentative (duplicate address detection) for a second or two after a link comes up, and
/// neighbour discovery across the router fails meanwhile.
pub fn wait_for_addresses(namespaces: &[&Netns]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for ns in namespaces {
        while !ns
            .ip(&["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "{}: addresses stay tentative",
                ns.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of counter `name` in `lb stats` output `stats`; panics naming it if absent.
pub fn counter_in(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no counter {name} in:\n{stats}"))
}

pub fn sysctl(ns: &Netns, settings: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", &ns.name, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    crate::sh(&args);
}

/// Starts a test server that answers "NAME CLIENT-ADDR" in pod namespace `netns`.
pub fn serve_showing_client(netns: &Netns, name: &str, port: u16) -> Proc {
    let mut child = die_with_parent(&mut Command::new(testpod_bin()))
        .arg("--netns")
        .arg(netns.path())
        .args(["serve", "--name", name, "--show-client"])
        .args(["--tcp", &port.to_string(), "--udp", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lb-testpod serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    Proc(child)
}

/// Starts a test server that answers "NAME CLIENT-ADDR" (an HTTP response with that body to
/// a `GET`) in pod namespace `netns`, on each of `tcp` and `udp`.
pub fn serve_showing_client_on(netns: &Netns, name: &str, tcp: &[u16], udp: &[u16]) -> Proc {
    let mut cmd = Command::new(testpod_bin());
    die_with_parent(&mut cmd)
        .arg("--netns")
        .arg(netns.path())
        .args(["serve", "--name", name, "--show-client"]);
    for port in tcp {
        cmd.args(["--tcp", &port.to_string()]);
    }
    for port in udp {
        cmd.args(["--udp", &port.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn lb-testpod serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    Proc(child)
}

impl Topology {
    #[expect(
        clippy::new_without_default,
        reason = "builds namespaces: not a value to default to"
    )]
    pub fn new() -> Self {
        let mut node = Node::new();
        let id = unique("ns");
        let ext = Netns::new(format!("{id}e"));
        let router = Netns::new(format!("{id}r"));
        let node_ns = node.client.name.clone();
        ext.ip(&[
            "link",
            "add",
            "e0",
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &router.name,
        ]);
        router.ip(&[
            "link", "add", "r1", "type", "veth", "peer", "name", "n0", "netns", &node_ns,
        ]);
        for (ns, dev, v4, v6) in [
            (&ext, "e0", "10.250.1.2/24", "fd00:250:1::2/64"),
            (&router, "r0", "10.250.1.1/24", "fd00:250:1::1/64"),
            (&router, "r1", "10.250.2.1/24", "fd00:250:2::1/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        node.client
            .ip(&["addr", "add", "10.250.2.2/24", "dev", "n0"]);
        node.client.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:250:2::2/64",
            "dev",
            "n0",
            "nodad",
        ]);
        node.client.ip(&["link", "set", "n0", "up"]);
        // Only routes to the test's own namespaces.
        ext.ip(&["route", "add", "10.250.2.0/24", "via", "10.250.1.1"]);
        ext.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:2::/64",
            "via",
            "fd00:250:1::1",
        ]);
        node.client
            .ip(&["route", "add", "10.250.1.0/24", "via", "10.250.2.1"]);
        node.client.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:1::/64",
            "via",
            "fd00:250:2::1",
        ]);
        for ns in [&router, &node.client] {
            sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
        }
        let mut servers = Vec::new();
        for (n, name) in [(1u8, "pod1"), (2, "pod2")] {
            let pod = node.add_pod(n, name, &[], &[]);
            pod.netns
                .ip(&["route", "add", "default", "via", "10.200.0.1"]);
            pod.netns
                .ip(&["-6", "route", "add", "default", "via", "fd00:200::1"]);
            servers.push(serve_showing_client(&pod.netns, name, 8080));
        }
        let topo = Self {
            ext,
            router,
            node,
            servers,
        };
        let mut all: Vec<&Netns> = vec![&topo.ext, &topo.router, &topo.node.client];
        all.extend(topo.node.pods.iter().map(|p| &p.netns));
        wait_for_addresses(&all);
        topo
    }

    /// The external client's requests.
    pub fn client(&self, args: &[&str]) -> Vec<Outcome> {
        run_client(None, &self.ext.path(), args)
    }
}

/// `lb run` inside the node namespace with `--xdp-iface n0`; stopped and cleaned up on drop.
pub struct NodeAgent {
    pub pin_path: PathBuf,
    pub netns: PathBuf,
    pub child: Option<Proc>,
    pub log: PathBuf,
    manifests: PathBuf,
    cgroup: PathBuf,
    /// The arguments after the cgroup: node name, `--xdp-iface`, anything else.
    extra: Vec<String>,
    /// The `lb` it runs ([`lb_bin`] unless [`NodeAgent::start_binary`] or
    /// [`NodeAgent::set_binary`] chose another, e.g. the previous release).
    bin: PathBuf,
}

impl NodeAgent {
    pub fn start(topo: &Topology, manifests: &std::path::Path) -> Self {
        Self::start_on(&topo.node, manifests)
    }

    /// `lb run` in node `node`'s namespace (node-a, `--xdp-iface n0`).
    pub fn start_on(node: &Node, manifests: &std::path::Path) -> Self {
        Self::start_binary(node, manifests, &lb_bin())
    }

    /// [`NodeAgent::start_on`] with the `lb` at `bin`.
    pub fn start_binary(node: &Node, manifests: &std::path::Path, bin: &Path) -> Self {
        let mut agent = Self {
            pin_path: PathBuf::from("/sys/fs/bpf").join(unique("lbt")),
            netns: node.client.path(),
            child: None,
            log: std::env::temp_dir().join(format!("{}.log", unique("lb-agent"))),
            manifests: manifests.to_owned(),
            cgroup: node.cgroup.path.clone(),
            extra: ["--node-name", "node-a", "--xdp-iface", "n0"]
                .map(str::to_owned)
                .to_vec(),
            bin: bin.to_owned(),
        };
        agent.spawn();
        agent
    }

    /// `lb run --manifests MANIFESTS --cgroup CGROUP EXTRA...` inside `netns` (EXTRA names the
    /// node and its `--xdp-iface`), with pins of its own and without healthz and metrics.
    pub fn start_in(netns: &Netns, cgroup: &Path, manifests: &Path, extra: &[&str]) -> Self {
        let mut agent = Self {
            pin_path: PathBuf::from("/sys/fs/bpf").join(unique("lbt")),
            netns: netns.path(),
            child: None,
            log: std::env::temp_dir().join(format!("{}.log", unique("lb-agent"))),
            manifests: manifests.to_owned(),
            cgroup: cgroup.to_owned(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            bin: lb_bin(),
        };
        agent.spawn();
        agent
    }

    /// Stops the agent with SIGTERM (it leaves the datapath serving); its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut proc = self.child.take()?;
        let pid = i32::try_from(proc.0.id()).expect("pid");
        // SAFETY: our own child (nsenter execs lb, so this is lb).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        proc.0.wait().expect("wait for lb run").code()
    }

    /// Starts a new agent on this one's pins after [`NodeAgent::stop`]; it adopts the
    /// pinned links and maps.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent is running");
        self.spawn();
    }

    /// The `lb` that [`NodeAgent::start_again`] runs and [`NodeAgent::lb`] asks from now on.
    pub fn set_binary(&mut self, bin: &Path) {
        bin.clone_into(&mut self.bin);
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `lb run` with this agent's pins, manifests and log (appended to).
    fn spawn(&mut self) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = die_with_parent(&mut Command::new("nsenter"))
            .arg(format!("--net={}", self.netns.display()))
            .arg(&self.bin)
            .arg("run")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(&self.extra)
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn lb run");
        self.child = Some(Proc(child));
    }

    /// Stops the agent with SIGTERM (it leaves the datapath serving: pinned links and maps)
    /// and starts a new one on the same pins, which adopts them.
    pub fn restart(&mut self) {
        let mut proc = self.child.take().expect("a running agent");
        let pid = i32::try_from(proc.0.id()).expect("pid");
        // SAFETY: our own child (nsenter execs lb, so this is lb).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = proc.0.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "lb run did not exit within 10 s of SIGTERM:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "lb run exited with {status}");
        self.spawn();
    }

    pub fn lb(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run lb");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `lb list` shows every one of `frontends`.
    pub fn wait_for(&self, frontends: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = self.lb(&["list"]);
            if frontends.iter().all(|f| list.contains(f)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "frontends {frontends:?} not programmed: {list}\nagent log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A datapath counter from `lb stats`.
    pub fn stat(&self, name: &str) -> u64 {
        counter_in(&self.lb(&["stats"]), name)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        drop(self.child.take());
        let _cleaned = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(lb_bin())
            .args(["cleanup", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        let _gone = std::fs::remove_file(&self.log);
    }
}

/// node-b's address in [`TwoNodes`].
/// A dual-stack NodePort Service (eTP Cluster, the default) whose only endpoint is podb on
/// node-b.
pub const FAR_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: far}
spec:
  type: NodePort
  clusterIPs: [10.96.60.1, 'fd00:96::60:1']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30090}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30090}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: far-1, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: [10.201.0.2], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: far-2, labels: {kubernetes.io/service-name: far}}
addressType: IPv6
ports: [{name: tcp, port: 8080}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
- {addresses: ['fd00:201::2'], nodeName: node-b}
";

pub const NODE_B4: &str = "10.250.2.3";
/// node-b's IPv6 address in [`TwoNodes`].
pub const NODE_B6: &str = "fd00:250:2::3";
/// The router's address towards the external client.
pub const ROUTER_EXT4: &str = "10.250.1.1";
/// podb's address in [`TwoNodes`].
pub const POD_B4: &str = "10.201.0.2";

/// Runs `f` on a thread of its own inside network namespace `ns` (the test's other threads
/// stay where they are).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: a valid namespace descriptor; only this thread moves.
        let ret =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// `ETHTOOL_SGRO`: set generic receive offload.
pub const ETHTOOL_SGRO: u32 = 0x2c;
/// `ETHTOOL_STXCSUM`: set transmit checksum offload.
pub const ETHTOOL_STXCSUM: u32 = 0x17;

/// `ethtool` on device `dev` in `ns` through a legacy `SIOCETHTOOL` set command (`cmd`,
/// `data`), without the ethtool tool.
///
/// The topology needs two: GRO on the veth peer of the XDP interface (a veth receives frames
/// that its peer's XDP program redirects or transmits only when it has NAPI, which GRO
/// enables), and transmit checksum offload off on the senders: a veth hands locally made
/// packets on with only the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL),
/// which an XDP redirect cannot carry, while frames from a wire always have full checksums.
pub fn ethtool_set(ns: &Netns, dev: &str, cmd: u32, data: u32) {
    let dev = dev.to_owned();
    in_netns(ns, move || {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        let mut value = EthtoolValue { cmd, data };
        // SAFETY: a zeroed ifreq with the name and the data pointer set; the socket is ours.
        unsafe {
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let ret = libc::ioctl(fd, SIOCETHTOOL, &raw mut ifr);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(ret, 0, "SIOCETHTOOL {cmd:#x} on {dev}: {err}");
        }
    });
}

/// The two-node topology; everything is removed on drop.
pub struct TwoNodes {
    pub ext: Netns,
    pub router: Netns,
    pub node_a: Node,
    pub node_b: Netns,
    pub pod_b: Netns,
    pub server: Proc,
    /// The cgroup of an agent on node-b ([`TwoNodes::agent_b`]).
    pub cgroup_b: Cgroup,
    /// The servers of node-a's pods ([`TwoNodes::add_pod_a`]).
    pub servers: Vec<Proc>,
}

impl TwoNodes {
    #[expect(
        clippy::new_without_default,
        reason = "builds namespaces: not a value to default to"
    )]
    pub fn new() -> Self {
        Self::with_pod_b("podb", &[8080], &[8080])
    }

    /// The topology with podb answering "`name` CLIENT-ADDR" on `tcp` and `udp`.
    pub fn with_pod_b(name: &str, tcp: &[u16], udp: &[u16]) -> Self {
        let node_a = Node::new();
        let id = unique("n2");
        let ext = Netns::new(format!("{id}e"));
        let router = Netns::new(format!("{id}r"));
        let node_b = Netns::new(format!("{id}b"));
        let pod_b = Netns::new(format!("{id}q"));
        let cgroup_b = Cgroup::new(&format!("{id}b"));
        let a_ns = node_a.client.name.clone();
        ext.ip(&[
            "link",
            "add",
            "e0",
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &router.name,
        ]);
        router.ip(&[
            "link", "add", "r1", "type", "veth", "peer", "name", "n0", "netns", &a_ns,
        ]);
        router.ip(&[
            "link",
            "add",
            "r2",
            "type",
            "veth",
            "peer",
            "name",
            "m0",
            "netns",
            &node_b.name,
        ]);
        node_b.ip(&[
            "link",
            "add",
            "p0",
            "type",
            "veth",
            "peer",
            "name",
            "q0",
            "netns",
            &pod_b.name,
        ]);
        router.ip(&["link", "add", "rb", "type", "bridge"]);
        for dev in ["r1", "r2"] {
            router.ip(&["link", "set", dev, "master", "rb"]);
            router.ip(&["link", "set", dev, "up"]);
        }
        for (ns, dev, v4) in [
            (&ext, "e0", "10.250.1.2/24"),
            (&router, "r0", "10.250.1.1/24"),
            (&router, "rb", "10.250.2.1/24"),
            (&node_a.client, "n0", "10.250.2.2/24"),
            (&node_b, "m0", "10.250.2.3/24"),
            (&node_b, "p0", "10.201.0.1/24"),
            (&pod_b, "q0", "10.201.0.2/24"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        for (ns, dev, v6) in [
            (&ext, "e0", "fd00:250:1::2/64"),
            (&router, "r0", "fd00:250:1::1/64"),
            (&router, "rb", "fd00:250:2::1/64"),
            (&node_a.client, "n0", "fd00:250:2::2/64"),
            (&node_b, "m0", "fd00:250:2::3/64"),
            (&node_b, "p0", "fd00:201::1/64"),
            (&pod_b, "q0", "fd00:201::2/64"),
        ] {
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
        }
        ext.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:2::/64",
            "via",
            "fd00:250:1::1",
        ]);
        node_a.client.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:1::/64",
            "via",
            "fd00:250:2::1",
        ]);
        node_a.client.ip(&[
            "-6",
            "route",
            "add",
            "fd00:201::/64",
            "via",
            "fd00:250:2::3",
        ]);
        pod_b.ip(&["-6", "route", "add", "default", "via", "fd00:201::1"]);
        // The second client.
        ext.ip(&["addr", "add", "10.250.1.3/24", "dev", "e0"]);
        pod_b.ip(&["link", "set", "lo", "up"]);
        // Only routes to the test's own namespaces.
        ext.ip(&["route", "add", "10.250.2.0/24", "via", "10.250.1.1"]);
        node_a
            .client
            .ip(&["route", "add", "10.250.1.0/24", "via", "10.250.2.1"]);
        node_a
            .client
            .ip(&["route", "add", "10.201.0.0/24", "via", NODE_B4]);
        pod_b.ip(&["route", "add", "default", "via", "10.201.0.1"]);
        // node-b's routes to the client and to node-a's pods (for an agent on node-b).
        node_b.ip(&["route", "add", "10.250.1.0/24", "via", "10.250.2.1"]);
        node_b.ip(&["route", "add", "10.200.0.0/24", "via", NODE4]);
        node_b.ip(&[
            "-6",
            "route",
            "add",
            "fd00:250:1::/64",
            "via",
            "fd00:250:2::1",
        ]);
        node_b.ip(&["-6", "route", "add", "fd00:200::/64", "via", NODE6]);
        for ns in [&router, &node_a.client, &node_b] {
            sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
        }
        wait_for_addresses(&[&ext, &router, &node_a.client, &node_b, &pod_b]);
        // XDP on n0 sends both directions back out of n0: its peer needs NAPI.
        ethtool_set(&router, "r1", ETHTOOL_SGRO, 1);
        // The same for m0, for an agent on node-b.
        ethtool_set(&router, "r2", ETHTOOL_SGRO, 1);
        ethtool_set(&ext, "e0", ETHTOOL_STXCSUM, 0);
        ethtool_set(&pod_b, "q0", ETHTOOL_STXCSUM, 0);
        let server = serve_showing_client_on(&pod_b, name, tcp, udp);
        // Resolve node-a's neighbours (XDP redirects only to resolved ones).
        // (The bridge's ports take a moment to forward; a datagram to the discard port makes
        // the kernel resolve the neighbour.)
        for target in ["10.250.2.1", NODE_B4, "fd00:250:2::1", "fd00:250:2::3"] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !node_a
                .client
                .ip(&["neigh", "show", target])
                .contains("lladdr")
            {
                let ip: std::net::IpAddr = target.parse().expect("addr");
                let to = std::net::SocketAddr::new(ip, 9);
                in_netns(&node_a.client, move || {
                    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
                    let socket = std::net::UdpSocket::bind(any).expect("udp");
                    let _sent = socket.send_to(b"resolve", to);
                });
                assert!(Instant::now() < deadline, "node-a cannot resolve {target}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        resolve_neighbours(&node_b, &["10.250.2.1", NODE4, "fd00:250:2::1", NODE6]);
        Self {
            ext,
            router,
            node_a,
            node_b,
            pod_b,
            server,
            cgroup_b,
            servers: Vec::new(),
        }
    }

    /// Adds pod number `n` to node-a (10.200.0.(10+n), see [`Node::add_pod`]) answering
    /// "`name` CLIENT-ADDR" on `tcp` and `udp`, with a default route through node-a and
    /// transmit checksum offload off (its replies may reach node-b's XDP through node-a).
    pub fn add_pod_a(&mut self, n: u8, name: &str, tcp: &[u16], udp: &[u16]) {
        let pod = self.node_a.add_pod(n, name, &[], &[]);
        pod.netns
            .ip(&["route", "add", "default", "via", crate::CLIENT_IP4]);
        pod.netns
            .ip(&["-6", "route", "add", "default", "via", crate::CLIENT_IP6]);
        ethtool_set(&pod.netns, "eth0", ETHTOOL_STXCSUM, 0);
        let server = serve_showing_client_on(&pod.netns, name, tcp, udp);
        self.servers.push(server);
    }

    /// `lb run` on node-a (`--node-name node-a --xdp-iface n0`, then `extra`).
    pub fn agent_a(&self, manifests: &Path, extra: &[&str]) -> NodeAgent {
        let mut args = vec!["--node-name", "node-a", "--xdp-iface", "n0"];
        args.extend_from_slice(extra);
        NodeAgent::start_in(
            &self.node_a.client,
            &self.node_a.cgroup.path,
            manifests,
            &args,
        )
    }

    /// `lb run` on node-b (`--node-name node-b --xdp-iface m0`, then `extra`).
    pub fn agent_b(&self, manifests: &Path, extra: &[&str]) -> NodeAgent {
        let mut args = vec!["--node-name", "node-b", "--xdp-iface", "m0"];
        args.extend_from_slice(extra);
        NodeAgent::start_in(&self.node_b, &self.cgroup_b.path, manifests, &args)
    }
}

/// Makes `from` resolve the link-layer addresses of `targets` (XDP redirects only to resolved
/// neighbours; a datagram to the discard port makes the kernel resolve one).
pub fn resolve_neighbours(from: &Netns, targets: &[&str]) {
    for target in targets {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !from.ip(&["neigh", "show", target]).contains("lladdr") {
            let ip: std::net::IpAddr = target.parse().expect("addr");
            let to = std::net::SocketAddr::new(ip, 9);
            in_netns(from, move || {
                let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
                let socket = std::net::UdpSocket::bind(any).expect("udp");
                let _sent = socket.send_to(b"resolve", to);
            });
            assert!(
                Instant::now() < deadline,
                "{} cannot resolve {target}",
                from.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One flow from a client namespace, held open on a thread of its own inside that namespace
/// (so the flow's 5-tuple stays the same across everything a test does meanwhile): a TCP
/// connection or a connected UDP socket, asked on demand.
pub struct FlowClient {
    ask: Option<std::sync::mpsc::Sender<()>>,
    answers: std::sync::mpsc::Receiver<Result<String, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long [`FlowClient::ask`] waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

impl FlowClient {
    /// A TCP connection from `ns` to `dst` (`ADDR:PORT`), from `src` (an address) if given.
    /// `Err` with the connect error (a timeout after 3 s: "timed out").
    pub fn tcp(ns: &Netns, src: Option<&str>, dst: &str) -> Result<Self, String> {
        Self::open(ns, src, dst, true)
    }

    /// A connected UDP socket from `ns` to `dst`, from `src` if given.
    pub fn udp(ns: &Netns, src: Option<&str>, dst: &str) -> Result<Self, String> {
        Self::open(ns, src, dst, false)
    }

    fn open(ns: &Netns, src: Option<&str>, dst: &str, tcp: bool) -> Result<Self, String> {
        use std::io::{Read as _, Write as _};
        let path = ns.path();
        let dst: std::net::SocketAddr = dst.parse().expect("ADDR:PORT");
        let src: Option<std::net::IpAddr> = src.map(|s| s.parse().expect("source address"));
        let (ask_tx, ask_rx) = std::sync::mpsc::channel::<()>();
        let (answer_tx, answers) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            // SAFETY: a valid namespace descriptor; only this thread moves.
            let ret =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            let bind = std::net::SocketAddr::new(
                src.unwrap_or(if dst.is_ipv6() {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                }),
                0,
            );
            let err = |e: std::io::Error| {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    "timed out".to_owned()
                } else {
                    e.to_string()
                }
            };
            // One request per ask: a line over TCP, a datagram over UDP; the answer's text.
            let mut request: Box<dyn FnMut() -> Result<String, String>> = if tcp {
                let stream = match connect_from(bind, dst) {
                    Ok(s) => s,
                    Err(e) => {
                        let _sent = answer_tx.send(Err(err(e)));
                        return;
                    }
                };
                stream
                    .set_read_timeout(Some(ANSWER_TIMEOUT))
                    .expect("timeout");
                let mut stream = stream;
                let mut pending = Vec::new();
                Box::new(move || {
                    stream.write_all(b"hello\n").map_err(err)?;
                    let mut buf = [0u8; 256];
                    loop {
                        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            return Ok(String::from_utf8_lossy(&line).trim().to_owned());
                        }
                        match stream.read(&mut buf) {
                            Ok(0) => return Err("closed".to_owned()),
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                            Err(e) => return Err(err(e)),
                        }
                    }
                })
            } else {
                let socket = std::net::UdpSocket::bind(bind).expect("bind");
                socket.connect(dst).expect("connect");
                socket
                    .set_read_timeout(Some(ANSWER_TIMEOUT))
                    .expect("timeout");
                Box::new(move || {
                    socket.send(b"hello").map_err(err)?;
                    let mut buf = [0u8; 256];
                    let n = socket.recv(&mut buf).map_err(err)?;
                    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
                })
            };
            let _ready = answer_tx.send(Ok(String::new()));
            while ask_rx.recv().is_ok() {
                if answer_tx.send(request()).is_err() {
                    return;
                }
            }
        });
        let client = Self {
            ask: Some(ask_tx),
            answers,
            thread: Some(thread),
        };
        match client.answers.recv() {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("flow client thread failed"),
        }
    }

    /// One request on the flow: the answer ("NAME CLIENT-ADDR:PORT" from the test servers), or
    /// what went wrong ("timed out", "closed", or the error's text).
    pub fn ask(&self) -> Result<String, String> {
        self.ask
            .as_ref()
            .expect("open")
            .send(())
            .expect("flow client thread");
        self.answers.recv().expect("flow client thread")
    }
}

impl Drop for FlowClient {
    fn drop(&mut self) {
        drop(self.ask.take());
        if let Some(thread) = self.thread.take() {
            let _joined = thread.join();
        }
    }
}

/// A TCP connection from `src` to `dst` (bound first, so the source address is the given
/// one), given up after 3 s.
fn connect_from(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    let family = if dst.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: a fresh socket, owned by the TcpStream at once (closed on every path).
    let stream = unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::net::TcpStream::from_raw_fd(fd)
    };
    let (addr, len) = sockaddr(src);
    // SAFETY: a valid sockaddr of `len` bytes for this socket's family.
    if unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            addr.as_ptr().cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SO_SNDTIMEO bounds a blocking connect() (it fails with EINPROGRESS on expiry).
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    let (addr, len) = sockaddr(dst);
    // SAFETY: as for bind.
    if unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            addr.as_ptr().cast(),
            len,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) {
            std::io::Error::from(std::io::ErrorKind::TimedOut)
        } else {
            e
        });
    }
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// `addr` as a `sockaddr_in`/`sockaddr_in6` in a byte buffer, and its length.
fn sockaddr(addr: std::net::SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut buf = [0u8; 28];
    match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is 16 plain bytes.
            let bytes: [u8; 16] = unsafe { std::mem::transmute(sin) };
            buf[..16].copy_from_slice(&bytes);
            (buf, 16)
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 is 28 plain bytes.
            let bytes: [u8; 28] = unsafe { std::mem::transmute(sin6) };
            buf.copy_from_slice(&bytes);
            (buf, 28)
        }
    }
}

// ---- BPF_PROG_TEST_RUN: crafted packets through the programs the agent attached ----

/// One `bpf(2)` call on a zeroed attribute buffer with `fields` (byte offset, value) set.
pub fn bpf(cmd: i64, fields: &[(usize, u64, usize)]) -> (i64, [u8; 128]) {
    let mut attr = [0u8; 128];
    for &(off, value, len) in fields {
        attr[off..off + len].copy_from_slice(&value.to_ne_bytes()[..len]);
    }
    // SAFETY: a 128-byte attribute (the kernel zero-fills the rest of union bpf_attr); the
    // pointers in it point at live buffers of the stated sizes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    (ret, attr)
}

pub const BPF_PROG_TEST_RUN: i64 = 10;
pub const BPF_OBJ_GET: i64 = 7;
pub const BPF_PROG_GET_FD_BY_ID: i64 = 13;
pub const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;

/// The program behind a pinned link, as a descriptor.
pub fn prog_of_link(path: &std::path::Path) -> i32 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let (link, _) = bpf(BPF_OBJ_GET, &[(0, c.as_ptr() as u64, 8)]);
    assert!(
        link >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // struct bpf_link_info: type, id, prog_id, ...
    let mut info = [0u8; 256];
    let (ret, _) = bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &[
            (0, link as u64, 4),
            (4, info.len() as u64, 4),
            (8, info.as_mut_ptr() as u64, 8),
        ],
    );
    assert_eq!(ret, 0, "link info: {}", std::io::Error::last_os_error());
    let prog_id = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    let (prog, _) = bpf(BPF_PROG_GET_FD_BY_ID, &[(0, u64::from(prog_id), 4)]);
    assert!(prog >= 0, "prog fd: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(link as i32) };
    prog as i32
}

/// Runs `packet` once through program `prog`; returns the verdict and the packet after.
pub fn test_run(prog: i32, packet: &[u8]) -> (u32, Vec<u8>) {
    let (verdict, out, _) = test_run_timed(prog, packet);
    (verdict, out)
}

/// [`test_run`], also returning the kernel's measured run time of the program (ns; one run,
/// so timer granularity included: average many).
pub fn test_run_timed(prog: i32, packet: &[u8]) -> (u32, Vec<u8>, u32) {
    let mut out = vec![0u8; packet.len() + 256];
    let (ret, attr) = bpf(
        BPF_PROG_TEST_RUN,
        &[
            (0, prog as u64, 4),
            (8, packet.len() as u64, 4),
            (12, out.len() as u64, 4),
            (16, packet.as_ptr() as u64, 8),
            (24, out.as_mut_ptr() as u64, 8),
            (32, 1, 4),
        ],
    );
    assert_eq!(ret, 0, "test run: {}", std::io::Error::last_os_error());
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_ne_bytes(attr[12..16].try_into().expect("4 bytes")) as usize;
    let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
    out.truncate(size);
    (retval, out, duration)
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// The Internet checksum of `data` (RFC 1071), computed here independently of lb's code.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A crafted packet, built from fields with every checksum computed in full.
#[derive(Clone)]
pub struct Pkt {
    pub vlan: Option<u16>,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset (host order).
    pub frag: u16,
    /// An IPv6 hop-by-hop options header before the L4 header.
    pub hop_by_hop: bool,
    /// This many IPv6 destination-options headers (8 bytes each) after it.
    pub dest_opts: u8,
    /// Leave a UDP checksum at 0 (IPv4: "no checksum").
    pub udp_no_checksum: bool,
    /// TCP flags (SYN unless set).
    pub tcp_flags: u8,
}

impl Pkt {
    pub fn new(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Self {
            vlan: None,
            src: src.parse().expect("src"),
            dst: dst.parse().expect("dst"),
            sport,
            dport,
            proto,
            ip_options: Vec::new(),
            frag: 0x4000,
            hop_by_hop: false,
            dest_opts: 0,
            udp_no_checksum: false,
            tcp_flags: 0x02,
        }
    }

    pub fn to(&self, dst: &str, dport: u16) -> Self {
        Self {
            dst: dst.parse().expect("dst"),
            dport,
            ..self.clone()
        }
    }

    pub fn from(&self, src: &str, sport: u16) -> Self {
        Self {
            src: src.parse().expect("src"),
            sport,
            ..self.clone()
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let payload = b"hello, lb";
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, self.tcp_flags]);
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(payload);
        let check_at = if self.proto == TCP { 16 } else { 6 };
        let (src, dst) = match (self.src, self.dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                (s.octets().to_vec(), d.octets().to_vec())
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                (s.octets().to_vec(), d.octets().to_vec())
            }
            _ => panic!("mixed families"),
        };
        let v6 = src.len() == 16;
        let l4_len = l4.len() as u32;
        let pseudo: Vec<u8> = if v6 {
            [
                &src[..],
                &dst[..],
                &l4_len.to_be_bytes(),
                &[0, 0, 0, self.proto],
            ]
            .concat()
        } else {
            [
                &src[..],
                &dst[..],
                &[0, self.proto],
                &(l4_len as u16).to_be_bytes(),
            ]
            .concat()
        };
        if !(self.udp_no_checksum && self.proto == UDP) {
            let mut c = checksum(&[&pseudo, &l4]);
            if c == 0 && self.proto == UDP {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if let Some(tag) = self.vlan {
            frame.extend_from_slice(&[0x81, 0x00]);
            frame.extend_from_slice(&tag.to_be_bytes());
        }
        if v6 {
            frame.extend_from_slice(&[0x86, 0xdd]);
            // Built from the L4 header back: each header names the one after it.
            let mut ext = Vec::new();
            let mut next = self.proto;
            for _ in 0..self.dest_opts {
                // Destination options (60): next header, length 0 (8 bytes), a PadN of 4.
                let mut header = vec![next, 0, 1, 4, 0, 0, 0, 0];
                header.extend_from_slice(&ext);
                ext = header;
                next = 60;
            }
            if self.hop_by_hop {
                // Hop-by-hop (0): the same layout.
                let mut header = vec![next, 0, 1, 4, 0, 0, 0, 0];
                header.extend_from_slice(&ext);
                ext = header;
                next = 0;
            }
            let plen = (ext.len() + l4.len()) as u16;
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&plen.to_be_bytes());
            frame.extend_from_slice(&[next, 64]);
            frame.extend_from_slice(&src);
            frame.extend_from_slice(&dst);
            frame.extend_from_slice(&ext);
        } else {
            frame.extend_from_slice(&[0x08, 0x00]);
            let ihl = 5 + self.ip_options.len() / 4;
            let total = (ihl * 4 + l4.len()) as u16;
            let mut ip = vec![0x40 | ihl as u8, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34]);
            ip.extend_from_slice(&self.frag.to_be_bytes());
            ip.extend_from_slice(&[64, self.proto, 0, 0]);
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            ip.extend_from_slice(&self.ip_options);
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["link", "show", "dev", dev]);
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev}: {out}"));
    let mut mac = [0u8; 6];
    for (b, hex) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(hex, 16).expect("hex");
    }
    mac
}

pub const XDP_REDIRECT: u32 = 4;
