//! The north-south topologies: an external client namespace behind a router namespace, node
//! namespaces on the router's L2 segment with pods behind them, and `lb run` started inside a
//! node's namespace (`nsenter --net=...`, as a DaemonSet pod with hostNetwork would) with
//! XDP/tc on the node's uplink. Shared by `tests/tests/north_south*.rs` and `cargo xtask demo`.
//!
//! ```text
//! (IPv6 alike: fd00:250:1::/64, fd00:250:2::/64, node-a's pods fd00:200::/64, podb fd00:201::2)
//! ext (10.250.1.2, .3) -- router (10.250.1.1 | rb 10.250.2.1) --+-- n0 (10.250.2.2) node-a -- br0 (10.200.0.1) -- pods 10.200.0.1x
//!                                                    bridge rb  +-- m0 (10.250.2.3) node-b -- p0 (10.201.0.1) -- q0 (10.201.0.2) podb
//! ```
//!
//! Everything is removed on drop (namespaces delete their veths, guards their processes).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Cgroup, Netns, Node, Proc, die_with_parent, lb_bin, testpod_bin, unique};

/// The external client's addresses.
pub const EXT4: &str = "10.250.1.2";
pub const EXT6: &str = "fd00:250:1::2";
/// The second external client (an address of its own on the same namespace).
pub const EXT4_2: &str = "10.250.1.3";
/// node-a's uplink addresses.
pub const NODE4: &str = "10.250.2.2";
pub const NODE6: &str = "fd00:250:2::2";
/// node-b's uplink addresses.
pub const NODE_B4: &str = "10.250.2.3";
pub const NODE_B6: &str = "fd00:250:2::3";
/// The router's addresses towards the client and towards the nodes.
pub const ROUTER_EXT4: &str = "10.250.1.1";
pub const ROUTER_NODES4: &str = "10.250.2.1";
/// podb, the pod behind node-b.
pub const POD_B4: &str = "10.201.0.2";
pub const POD_B6: &str = "fd00:201::2";

/// `sysctl -w` each of `settings` in `ns`.
pub fn sysctl(ns: &Netns, settings: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", &ns.name, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    crate::sh(&args);
}

/// Starts a test server that answers "NAME CLIENT-ADDR" in pod namespace `netns`, on TCP and
/// UDP `port`.
pub fn serve_showing_client(netns: &Netns, name: &str, port: u16) -> Proc {
    serve_showing_client_on(netns, name, &[port], &[port])
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

/// `lb run` inside a node's namespace with `--xdp-iface`; stopped and cleaned up on drop.
pub struct NodeAgent {
    pub pin_path: PathBuf,
    pub netns: PathBuf,
    /// The arguments after `lb run` and before `--pin-path`.
    args: Vec<std::ffi::OsString>,
    child: Option<Proc>,
    pub log: PathBuf,
}

impl NodeAgent {
    /// `lb run` in node `node`'s namespace (node-a, `--xdp-iface n0`).
    pub fn start_on(node: &Node, manifests: &Path) -> Self {
        Self::start_in(
            &node.client,
            &node.cgroup.path,
            manifests,
            &["--node-name", "node-a", "--xdp-iface", "n0"],
        )
    }

    /// `lb run --manifests MANIFESTS --cgroup CGROUP EXTRA...` inside `netns`, with a pin
    /// path of its own and without healthz and metrics servers.
    pub fn start_in(netns: &Netns, cgroup: &Path, manifests: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--manifests".into(),
            manifests.into(),
            "--cgroup".into(),
            cgroup.into(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let mut agent = Self {
            pin_path: PathBuf::from("/sys/fs/bpf").join(unique("lbt")),
            netns: netns.path(),
            args,
            child: None,
            log: std::env::temp_dir().join(format!("{}.log", unique("lb-agent"))),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = die_with_parent(&mut Command::new("nsenter"))
            .arg(format!("--net={}", self.netns.display()))
            .arg(lb_bin())
            .arg("run")
            .args(&self.args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn lb run");
        self.child = Some(Proc(child));
    }

    /// Stops the agent with SIGTERM (it leaves the datapath serving); its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = i32::try_from(child.0.id()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        child.0.wait().expect("wait for lb run").code()
    }

    /// [`NodeAgent::stop`], then starts the agent again on the same pins; returns the
    /// stopped agent's exit code.
    pub fn restart(&mut self) -> Option<i32> {
        let code = self.stop();
        self.spawn();
        code
    }

    /// `lb ARGS... --pin-path PIN`'s standard output.
    pub fn lb(&self, args: &[&str]) -> String {
        let out = Command::new(lb_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run lb");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A datapath counter from `lb stats`.
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.lb(&["stats"]);
        stats
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no counter {name} in:\n{stats}"))
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

/// Waits until no address of `ns` is tentative any more: IPv6 link-local addresses stay
/// tentative (duplicate address detection) for a second or two after a link comes up, and
/// neighbour discovery across the router fails meanwhile.
pub fn wait_addresses_settled(ns: &Netns, deadline: Instant) {
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

/// Makes `from` resolve the link-layer addresses of `targets` (XDP redirects only to resolved
/// neighbours). The bridge's ports take a moment to forward; a datagram to the discard port
/// makes the kernel resolve the neighbour.
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

/// The two-node topology (see the module's picture); everything is removed on drop.
///
/// node-b's namespace is a plain one (node-a's pod subnet must not exist there, or it could
/// not reach node-a's pods), with a cgroup of its own for an agent: [`TwoNodes::agent_b`].
/// node-a's pods are added with [`TwoNodes::add_pod_a`].
pub struct TwoNodes {
    pub ext: Netns,
    pub router: Netns,
    pub node_a: Node,
    pub node_b: Netns,
    /// The cgroup an agent on node-b attaches its socket programs to.
    pub cgroup_b: Cgroup,
    pub pod_b: Netns,
    /// The pods' servers.
    pub servers: Vec<Proc>,
}

impl TwoNodes {
    /// The topology with podb answering "podb CLIENT-ADDR" on TCP and UDP 8080.
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
        // Only routes to the test's own namespaces.
        for (ns, args) in [
            (&ext, ["route", "add", "10.250.2.0/24", "via", "10.250.1.1"]),
            (
                &node_a.client,
                ["route", "add", "10.250.1.0/24", "via", "10.250.2.1"],
            ),
            (
                &node_a.client,
                ["route", "add", "10.201.0.0/24", "via", NODE_B4],
            ),
            (
                &node_b,
                ["route", "add", "10.250.1.0/24", "via", "10.250.2.1"],
            ),
            (&node_b, ["route", "add", "10.200.0.0/24", "via", NODE4]),
            (&pod_b, ["route", "add", "default", "via", "10.201.0.1"]),
        ] {
            ns.ip(&args);
        }
        for (ns, args) in [
            (
                &ext,
                ["route", "add", "fd00:250:2::/64", "via", "fd00:250:1::1"],
            ),
            (
                &node_a.client,
                ["route", "add", "fd00:250:1::/64", "via", "fd00:250:2::1"],
            ),
            (
                &node_a.client,
                ["route", "add", "fd00:201::/64", "via", NODE_B6],
            ),
            (
                &node_b,
                ["route", "add", "fd00:250:1::/64", "via", "fd00:250:2::1"],
            ),
            (&node_b, ["route", "add", "fd00:200::/64", "via", NODE6]),
            (&pod_b, ["route", "add", "default", "via", "fd00:201::1"]),
        ] {
            let mut v6 = vec!["-6"];
            v6.extend_from_slice(&args);
            ns.ip(&v6);
        }
        // The second client.
        ext.ip(&["addr", "add", "10.250.1.3/24", "dev", "e0"]);
        for ns in [&router, &node_a.client, &node_b] {
            sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for ns in [&ext, &router, &node_a.client, &node_b, &pod_b] {
            wait_addresses_settled(ns, deadline);
        }
        // XDP on n0 (m0) sends both directions back out of n0 (m0): its peer needs NAPI.
        ethtool_set(&router, "r1", ETHTOOL_SGRO, 1);
        ethtool_set(&router, "r2", ETHTOOL_SGRO, 1);
        ethtool_set(&ext, "e0", ETHTOOL_STXCSUM, 0);
        ethtool_set(&pod_b, "q0", ETHTOOL_STXCSUM, 0);
        let server = serve_showing_client_on(&pod_b, name, tcp, udp);
        // Resolve each node's neighbours on the segment (XDP redirects only to resolved ones).
        resolve_neighbours(
            &node_a.client,
            &[ROUTER_NODES4, NODE_B4, "fd00:250:2::1", NODE_B6],
        );
        resolve_neighbours(&node_b, &[ROUTER_NODES4, NODE4, "fd00:250:2::1", NODE6]);
        Self {
            ext,
            router,
            node_a,
            node_b,
            cgroup_b,
            pod_b,
            servers: vec![server],
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

    /// `lb run` on node-b (`--node-name node-b --xdp-iface m0`, then `extra`).
    pub fn agent_b(&self, manifests: &Path, extra: &[&str]) -> NodeAgent {
        let mut args = vec!["--node-name", "node-b", "--xdp-iface", "m0"];
        args.extend_from_slice(extra);
        NodeAgent::start_in(&self.node_b, &self.cgroup_b.path, manifests, &args)
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
}

impl Default for TwoNodes {
    fn default() -> Self {
        Self::new()
    }
}
