//! North-south: lb's XDP datapath on the node's interface facing the client (`lb run
//! --xdp-iface n0`, the agent inside the node's namespace as a hostNetwork DaemonSet pod
//! runs), against kube-proxy-style iptables NodePort rules in the same topology; and the
//! XDP cost rows (`xdp.rs`), which need the same agent.
//!
//! ```text
//! client 10.200.0.2 ── n0 10.200.0.1 node (XDP on n0 | iptables) ── backend pod 10.201.0.10...
//! ```
//!
//! The client is outside lb's cgroup: it is "outside the cluster", so only XDP (or the
//! iptables rules) translate its packets to `10.200.0.1:nodePort`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{Netns, Proc, TempDir, die_with_parent, unique};

use super::{
    Bench, ENDPOINTS, Mode, PER_FILE,
    measure::{self, Spread},
    pps,
    report::LatencyRow,
    services::{NODEPORT_BASE, Proto, ServiceSet},
    topology::{Servers, Topology},
    xdp,
};
use crate::cmd;

/// The node's address on the client's side: NodePorts are reached on it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// `--node-name` of the bench's agents; the endpoints' `nodeName` (all on this node).
pub const NODE_NAME: &str = "bench-node";

/// `lb run --xdp-iface n0` inside the node's namespace; stopped and cleaned up on drop.
pub struct XdpAgent {
    pub pin_path: PathBuf,
    netns: PathBuf,
    child: Option<Proc>,
    log: PathBuf,
}

impl XdpAgent {
    pub fn start(topo: &Topology, manifests: &std::path::Path, extra: &[&str]) -> Self {
        let pin_path = PathBuf::from("/sys/fs/bpf").join(unique("lbb"));
        let log = std::env::temp_dir().join(format!("{}.log", unique("lb-bench-agent")));
        let child = std::fs::File::create(&log).and_then(|log_file| {
            die_with_parent(&mut Command::new("nsenter"))
                .arg(format!("--net={}", topo.node.path().display()))
                .arg(cmd::lb_bin())
                .arg("run")
                .arg("--manifests")
                .arg(manifests)
                .arg("--cgroup")
                .arg(&topo.cgroup.path)
                .arg("--pin-path")
                .arg(&pin_path)
                .args(["--node-name", NODE_NAME, "--xdp-iface", "n0"])
                .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
                .args(extra)
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
        });
        Self {
            pin_path,
            netns: topo.node.path(),
            child: child.ok().map(Proc),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `lb list` shows every one of `frontends`.
    pub fn wait_for(&mut self, frontends: &[String], within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.child.is_none()
                || self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.0.try_wait(), Ok(Some(_))))
            {
                bail!("lb run exited:\n{}", self.log_text());
            }
            let out = Command::new(cmd::lb_bin())
                .args(["list", "--pin-path"])
                .arg(&self.pin_path)
                .output()?;
            let list = String::from_utf8_lossy(&out.stdout);
            if frontends.iter().all(|f| list.contains(f.as_str())) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "frontends {frontends:?} not programmed after {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for XdpAgent {
    fn drop(&mut self) {
        drop(self.child.take());
        let _cleaned = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(cmd::lb_bin())
            .args(["cleanup", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        let _gone = std::fs::remove_file(&self.log);
    }
}

/// The XDP rows' Services: Katran's VIP 10.0.0.10 (and an IPv6 one) as externalIPs on TCP 80
/// and UDP 53 to 10 endpoints on this node (DNAT, no SNAT, as Katran's 10 reals); and
/// 10.0.0.11:80 whose one endpoint (10.201.0.10, reachable by the node's FIB) is on another
/// node (SNAT).
fn xdp_manifests(backends4: &[Ipv4Addr], backends6: &[Ipv6Addr]) -> String {
    let eps = |ips: Vec<String>, node: &str| -> serde_json::Value {
        ips.iter()
            .map(|ip| serde_json::json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}))
            .collect()
    };
    let ports = serde_json::json!([
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 8053, "protocol": "UDP"},
    ]);
    let slice_ports = serde_json::json!([
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 8053, "protocol": "UDP"},
    ]);
    let items = serde_json::json!([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "xdp-bench", "namespace": "default"},
         "spec": {"clusterIPs": ["10.96.0.1", "fd00:96::1"], "ipFamilies": ["IPv4", "IPv6"],
                  "ipFamilyPolicy": "RequireDualStack",
                  "externalIPs": [xdp::VIP4.to_string(), xdp::VIP6.to_string()], "ports": ports}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "xdp-bench-4", "namespace": "default", "labels": {"kubernetes.io/service-name": "xdp-bench"}},
         "addressType": "IPv4", "ports": slice_ports,
         "endpoints": eps(backends4.iter().map(ToString::to_string).collect(), NODE_NAME)},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "xdp-bench-6", "namespace": "default", "labels": {"kubernetes.io/service-name": "xdp-bench"}},
         "addressType": "IPv6", "ports": slice_ports,
         "endpoints": eps(backends6.iter().map(ToString::to_string).collect(), NODE_NAME)},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "xdp-snat", "namespace": "default"},
         "spec": {"clusterIP": "10.96.0.2", "externalIPs": [xdp::VIP4_SNAT.to_string()],
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "xdp-snat-4", "namespace": "default", "labels": {"kubernetes.io/service-name": "xdp-snat"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": eps(vec![backends4[0].to_string()], "other-node")},
    ]);
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Runs `f` on a thread of its own inside `netns` (the FIB lookups of test-run happen in the
/// caller's namespace) and pinned to `cpu`.
pub(super) fn on_pinned_thread_in<T: Send>(
    netns: &Netns,
    cpu: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let ns = std::fs::File::open(netns.path())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an open namespace file.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            if let Some(cpu) = cpu {
                // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                unsafe { libc::CPU_SET(cpu, &mut set) };
                // SAFETY: this thread's affinity, with a set of the size passed.
                if unsafe {
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
                } != 0
                {
                    bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
                }
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))?
    })
}

/// Transmit checksum offload off on `dev` in `netns` (legacy `SIOCETHTOOL`
/// `ETHTOOL_STXCSUM`): a veth otherwise hands locally made packets on with only the
/// pseudo-header sum in the checksum field, which packets from a wire never have and which
/// XDP's incremental checksum update cannot finish (see README, north-south).
fn tx_checksum_off(netns: &Netns, dev: &str) -> anyhow::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    on_pinned_thread_in(netns, None, || {
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        // SAFETY: a zeroed ifreq with the name and the data pointer set; the socket is ours
        // and closed once.
        unsafe {
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s.cast_signed();
            }
            ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let ret = libc::ioctl(fd, SIOCETHTOOL, &raw mut ifr);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if ret != 0 {
                bail!("SIOCETHTOOL on {dev}: {err}");
            }
        }
        Ok(())
    })
}

impl Bench {
    /// The XDP rows (and Katran's between their rounds).
    pub fn xdp(&mut self, katran_peer: Option<&std::path::Path>) -> anyhow::Result<()> {
        let plan = xdp::XdpPlan::new(self.results.quick);
        let topo = Topology::new(ENDPOINTS, &Servers::Echo)?;
        let backends4 = topo.backends.clone();
        let backends6: Vec<Ipv6Addr> = (0..ENDPOINTS)
            .map(|k| {
                Ipv6Addr::new(
                    0xfd00,
                    0x201,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0x10 + u16::try_from(k).unwrap_or(0),
                )
            })
            .collect();
        let dir = TempDir::new("lb-bench-xdp");
        dir.write("services.json", &xdp_manifests(&backends4, &backends6));
        let ct_entries = xdp::BENCH_CT_ENTRIES.to_string();
        let mut agent = XdpAgent::start(&topo, &dir.0, &["--max-ct-entries", &ct_entries]);
        agent.wait_for(
            &[
                format!("{}:80/TCP", xdp::VIP4),
                format!("[{}]:53/UDP", xdp::VIP6),
                format!("{}:80/TCP", xdp::VIP4_SNAT),
            ],
            Duration::from_secs(30),
        )?;
        // The SNAT endpoint's neighbour entry, so that XDP can redirect (it never invents a
        // MAC).
        // One UDP request from the node to the endpoint's echo server resolves it. The
        // frames' clients (198.18.0.0/15) are routed through the client namespace, whose
        // neighbour entry a request to it resolves (nothing answers it: the answer does not
        // matter).
        cmd::run_quiet(
            Command::new("nsenter")
                .arg(format!("--net={}", topo.node.path().display()))
                .arg(cmd::testpod_bin())
                .args(["rr-udp", &format!("{}:8053", backends4[0]), "--count", "1"]),
        )?;
        topo.node.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            super::topology::CLIENT_IP,
        ]);
        let _resolved = Command::new("nsenter")
            .arg(format!("--net={}", topo.node.path().display()))
            .arg(cmd::testpod_bin())
            .args(["rr-udp", &format!("{}:9", super::topology::CLIENT_IP)])
            .args(["--count", "1", "--timeout-ms", "100"])
            .output();
        let target = xdp::LbTarget {
            xdp: super::bpf::prog_of_link(&agent.pin_path.join("links/xdp@n0"))?,
            tc: super::bpf::prog_of_link(&agent.pin_path.join("links/tc@n0"))?,
            pin_path: &agent.pin_path,
            backends4: backends4.clone(),
            backends6,
            snat: Some((backends4[0], Ipv4Addr::new(10, 201, 0, 1))),
        };
        let katran = match super::katran::Peer::prepare(katran_peer)? {
            Ok(peer) => Some(peer),
            Err(why) => {
                eprintln!("bench: Katran {why}");
                self.results.skipped.push(format!("Katran XDP peer {why}"));
                None
            }
        };
        // The last CPU, as the Katran peer pins itself.
        let cpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1;
        let results = on_pinned_thread_in(&topo.node, Some(cpu), || {
            xdp::measure(&target, &plan, cpu, katran.as_ref())
        })?;
        self.results.xdp = Some(results);
        drop(target);
        drop(agent);
        Ok(())
    }

    /// NodePort from outside: lb's XDP against iptables NodePort rules (and the pod directly)
    /// at `n` Services, interleaved rounds.
    pub fn nodeport_point(&mut self, n: usize) -> anyhow::Result<()> {
        struct NpSetup {
            mode: Mode,
            agent: Option<XdpAgent>,
            _manifests: Option<TempDir>,
            topo: Topology,
        }
        let mut setups: Vec<NpSetup> = Vec::new();
        for mode in [Mode::Direct, Mode::Lb, Mode::Iptables] {
            eprintln!("bench: NodePort, {} with {n} Services", mode.name());
            let topo = Topology::new(ENDPOINTS, &Servers::Echo)?;
            tx_checksum_off(&topo.client, "c0")?;
            let set = ServiceSet::new(n, topo.backends.clone()).with_nodeports(NODE_NAME);
            let (agent, manifests) = match mode {
                Mode::Lb => {
                    let dir = TempDir::new("lb-bench-np");
                    for (file, text) in set.manifests(PER_FILE, &[]) {
                        std::fs::write(dir.0.join(file), text)?;
                    }
                    let frontends = (8 * n).max(1 << 16).next_power_of_two().to_string();
                    // About 60 slots a NodePort Service (ClusterIP and external ranges of
                    // both ports, on each node address).
                    let backends = (8 * n * set.backends.len())
                        .max(1 << 19)
                        .next_power_of_two()
                        .to_string();
                    let mut agent = XdpAgent::start(
                        &topo,
                        &dir.0,
                        &[
                            "--nodeport-range",
                            "20000-32767",
                            "--max-frontends",
                            &frontends,
                            "--max-backends",
                            &backends,
                        ],
                    );
                    let last = n - 1;
                    agent.wait_for(
                        &[
                            format!("{NODE_IP}:{}/TCP", NODEPORT_BASE),
                            format!("{NODE_IP}:{}/UDP", ServiceSet::nodeport(last)),
                        ],
                        self.plan.load_budget + Duration::from_secs(60),
                    )?;
                    (Some(agent), Some(dir))
                }
                Mode::Iptables => {
                    if self.too_slow(mode, n) {
                        self.skip(format!(
                            "NodePort iptables with {n} Services: loading would take longer than {:?}",
                            self.plan.load_budget
                        ));
                        continue;
                    }
                    let args = mode.loader(false).context("iptables loader")?;
                    match topo.in_node_timed(&args, &set.iptables(), self.plan.load_budget)? {
                        Some(_) => {}
                        None => {
                            self.skip(format!(
                                "NodePort iptables with {n} Services: loading took longer than {:?}",
                                self.plan.load_budget
                            ));
                            continue;
                        }
                    }
                    (None, None)
                }
                _ => (None, None),
            };
            setups.push(NpSetup {
                mode,
                agent,
                _manifests: manifests,
                topo,
            });
        }
        let mut points: Vec<(usize, Proto, &'static str, SocketAddr)> = Vec::new();
        for (i, s) in setups.iter().enumerate() {
            for proto in Proto::BOTH {
                let (_, target_port) = proto.ports();
                if s.mode == Mode::Direct {
                    points.push((
                        i,
                        proto,
                        "pod",
                        SocketAddrV4::new(s.topo.backends[0], target_port).into(),
                    ));
                } else {
                    for (target, svc) in [("first", 0), ("last", n - 1)] {
                        points.push((
                            i,
                            proto,
                            target,
                            SocketAddrV4::new(NODE_IP, ServiceSet::nodeport(svc)).into(),
                        ));
                    }
                }
            }
        }
        for &(i, proto, _, addr) in &points {
            measure::rr_outside(&setups[i].topo, proto, addr, 50)
                .with_context(|| format!("NodePort warm-up, {}", setups[i].mode.name()))?;
        }
        let mut runs: Vec<Vec<measure::Rr>> = vec![Vec::new(); points.len()];
        for round in 0..self.plan.repeats {
            eprintln!(
                "bench: NodePort {n} Services, round {}/{}",
                round + 1,
                self.plan.repeats
            );
            for k in super::rotated(points.len(), round) {
                let (i, proto, _, addr) = points[k];
                runs[k].push(measure::rr_outside(
                    &setups[i].topo,
                    proto,
                    addr,
                    self.plan.transactions,
                )?);
            }
        }
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds to microseconds")]
        let to_us = |ns: u64| ns as f64 / 1e3;
        let p50 = |r: &measure::Rr| r.connect_ns.or(r.transaction_ns).map(|l| to_us(l.p50));
        for (k, &(i, proto, target, _)) in points.iter().enumerate() {
            let direct = points
                .iter()
                .position(|&(j, p, _, _)| setups[j].mode == Mode::Direct && p == proto);
            let p50_vs_direct = direct
                .filter(|_| setups[i].mode != Mode::Direct)
                .and_then(|d| {
                    Spread::of(
                        runs[k]
                            .iter()
                            .zip(&runs[d])
                            .filter_map(|(mine, direct)| Some(p50(mine)? / p50(direct)?))
                            .collect(),
                    )
                });
            let runs = &runs[k];
            let spread = |f: &dyn Fn(&measure::Rr) -> Option<f64>| {
                Spread::of(runs.iter().filter_map(f).collect())
            };
            self.results.nodeport.push(LatencyRow {
                mode: match setups[i].mode {
                    Mode::Lb => "lb-xdp".into(),
                    m => m.name().into(),
                },
                services: n,
                proto: proto.lower().into(),
                target: target.into(),
                connect_p50_us: spread(&|r| r.connect_ns.map(|l| to_us(l.p50))),
                connect_p99_us: spread(&|r| r.connect_ns.map(|l| to_us(l.p99))),
                transaction_p50_us: spread(&|r| r.transaction_ns.map(|l| to_us(l.p50)))
                    .unwrap_or_default(),
                transaction_p99_us: spread(&|r| r.transaction_ns.map(|l| to_us(l.p99)))
                    .unwrap_or_default(),
                per_second: spread(&|r| Some(r.per_second)).unwrap_or_default(),
                p50_vs_direct,
                lost: runs.iter().map(|r| r.errors).sum(),
            });
        }
        // Packets/s on the same topologies (see pps.rs): the last Service's NodePort, the
        // pod for direct.
        let mut targets: Vec<pps::Target<'_>> = Vec::new();
        for s in &setups {
            let target = |name, xdp_pass| pps::Target {
                name,
                topo: &s.topo,
                dst: if s.mode == Mode::Direct {
                    SocketAddrV4::new(s.topo.backends[0], Proto::Udp.ports().1)
                } else {
                    SocketAddrV4::new(NODE_IP, ServiceSet::nodeport(n - 1))
                },
                pin_path: s.agent.as_ref().map(|a| a.pin_path.as_path()),
                xdp_pass,
            };
            match s.mode {
                Mode::Direct => {
                    targets.push(target(pps::DIRECT, false));
                    targets.push(target("direct+xdp-pass", true));
                }
                Mode::Lb => targets.push(target("lb-xdp", false)),
                m => targets.push(target(m.name(), false)),
            }
        }
        match pps::measure(&targets, n, &pps::PpsPlan::new(self.results.quick)) {
            Ok(rows) => self.results.nodeport_pps.extend(rows),
            // As a scale that cannot be measured: reported in a full run, fatal in CI's.
            Err(e) if !self.results.quick => {
                self.skip(format!("NodePort packets/s with {n} Services: {e:#}"));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
