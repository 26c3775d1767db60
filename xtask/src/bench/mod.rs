//! `cargo xtask bench`: lb against direct pod access and kube-proxy-style iptables and
//! nftables rules, measured in one run on this machine, written to `bench/results/<name>.json`,
//! `.md` and `.png`. Every comparison is a ratio within the run; each figure is the median of
//! repeated runs with their spread.

mod bpf;
mod churn;
mod katran;
mod measure;
mod nodeport;
mod plot;
mod pps;
mod prog_cost;
mod report;
mod services;
mod topology;
mod xdp;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{Agent, TempDir};

use self::{
    measure::{Spread, metrics, rr},
    report::{
        ChangeRow, LatencyRow, Machine, MemoryRow, Params, ProgCostRow, Results, SyncRow,
        ThroughputRow,
    },
    services::{Proto, ServiceSet},
    topology::{Servers, Topology},
};
use crate::cmd;

/// Endpoints per Service.
const ENDPOINTS: usize = 10;
/// Services per manifest file given to lb.
const PER_FILE: usize = 1000;
/// An endpoint address added and removed again to measure one change.
const EXTRA_ENDPOINT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 201, 0, 250);
/// An address of the backend pod that no Service has as an endpoint: lb's connect "miss".
const NON_BACKEND: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 201, 0, 251);
/// The most new TCP connections of the churn check: the client closes first, so each leaves
/// a TIME_WAIT socket on its port for 60 s, and one destination has 28 232 ephemeral ports.
const TCP_CHURN_MAX: usize = 20_000;

/// How big and how long.
struct Plan {
    services: Vec<usize>,
    transactions: usize,
    repeats: usize,
    iperf_seconds: u64,
    iperf_repeats: usize,
    change_services: usize,
    change_repeats: usize,
    /// Longest a peer may take to load its rules before that point is skipped.
    load_budget: Duration,
    /// Scales at which lb is also fed by the (stand-in) Kubernetes API.
    api_services: Vec<usize>,
    /// New sockets of the churn checks: UDP (at the first scale), TCP (at the last, up to
    /// [`TCP_CHURN_MAX`]).
    churn_sockets: usize,
    /// Scales of the NodePort comparison (lb's XDP vs iptables NodePort rules).
    nodeport_services: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: vec![1, 1000],
                transactions: 300,
                repeats: 5,
                iperf_seconds: 1,
                iperf_repeats: 2,
                change_services: 1000,
                change_repeats: 2,
                load_budget: Duration::from_secs(30),
                api_services: vec![1000],
                churn_sockets: 10_000,
                nodeport_services: vec![1],
            }
        } else {
            Self {
                services: vec![1, 1000, 10_000, 100_000],
                transactions: 1500,
                repeats: 15,
                iperf_seconds: 3,
                iperf_repeats: 5,
                change_services: 10_000,
                change_repeats: 5,
                load_budget: Duration::from_secs(240),
                api_services: vec![1000, 10_000],
                churn_sockets: 1_000_000,
                nodeport_services: vec![1, 1000, 10_000],
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Lb,
    Iptables,
    Nftables,
}

impl Mode {
    const ALL: [Self; 4] = [Self::Direct, Self::Lb, Self::Iptables, Self::Nftables];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Lb => "lb",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// How a rule-based peer (kube-proxy's iptables or nftables mode) loads rules: the
    /// command, fed the rules on stdin; `incremental` keeps what is loaded. `None` for the
    /// others.
    fn loader(self, incremental: bool) -> Option<Vec<&'static str>> {
        match self {
            Self::Iptables if incremental => Some(vec![iptables_restore(), "--noflush"]),
            Self::Iptables => Some(vec![iptables_restore()]),
            Self::Nftables => Some(vec!["nft", "-f", "-"]),
            Self::Direct | Self::Lb => None,
        }
    }

    /// What a rule-based peer's rules are called.
    fn rules_name(self) -> &'static str {
        if self == Self::Nftables {
            "the ruleset"
        } else {
            "the rules"
        }
    }

    /// A rule-based peer's rules for all of `set`.
    fn rules(self, set: &ServiceSet) -> String {
        match self {
            Self::Iptables => set.iptables(),
            Self::Nftables => set.nft(),
            Self::Direct | Self::Lb => String::new(),
        }
    }

    /// A rule-based peer's rules for Service `svc`'s endpoints going from `before` to
    /// `after` (loaded with `loader(true)`).
    fn rules_change(
        self,
        set: &ServiceSet,
        svc: usize,
        before: &[std::net::Ipv4Addr],
        after: &[std::net::Ipv4Addr],
    ) -> String {
        match self {
            Self::Iptables => set.iptables_change(svc, before, after),
            Self::Nftables => set.nft_change(svc, before, after),
            Self::Direct | Self::Lb => String::new(),
        }
    }
}

/// A mode set up on its own topology.
struct Setup {
    mode: Mode,
    set: ServiceSet,
    /// Dropped before the topology (field order): the agent goes before its cgroup.
    programmed: Programmed,
    topo: Topology,
}

/// A mode made ready on a topology: what must stay alive while measuring.
struct Programmed {
    agent: Option<Agent>,
    _manifests: Option<TempDir>,
}

/// The iptables-restore binary: the legacy backend (kube-proxy's classic iptables mode,
/// linear chains) when the kernel has it, else the nft backend.
fn iptables_restore() -> &'static str {
    static CHOICE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| {
        let legacy_works = std::process::Command::new("iptables-legacy")
            .args(["-t", "nat", "-L", "-n"])
            .output()
            .is_ok_and(|o| o.status.success());
        if legacy_works {
            "iptables-legacy-restore"
        } else {
            "iptables-nft-restore"
        }
    })
}

pub struct Bench {
    plan: Plan,
    results: Results,
    /// Peers and scales whose rules could not be loaded.
    gave_up: Vec<(Mode, usize)>,
}

/// Parts of the bench `--only` can pick.
pub const PARTS: [&str; 3] = ["clusterip", "xdp", "nodeport"];

/// What to run: `only` (default: every part of [`PARTS`]); `katran_peer`: the Katran peer's
/// directory (see `katran.rs`).
pub struct Options {
    pub quick: bool,
    pub name: Option<String>,
    pub only: Vec<String>,
    pub katran_peer: Option<std::path::PathBuf>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let Options {
        quick,
        name,
        only,
        katran_peer,
    } = options;
    for part in &only {
        anyhow::ensure!(
            PARTS.contains(&part.as_str()),
            "--only {part}: not one of {PARTS:?}"
        );
    }
    let wants = |part: &str| only.is_empty() || only.iter().any(|p| p == part);
    cmd::prepare_privileged("the bench", crate::setup::For::All)?;
    let date = cmd::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?
        .trim()
        .to_owned();
    let name = name.unwrap_or_else(|| {
        format!(
            "{}{}",
            date.replace([':', '-'], "")
                .trim_end_matches('Z')
                .replace('T', "-"),
            if quick { "-quick" } else { "" }
        )
    });
    let plan = Plan::new(quick);
    let machine = Machine {
        kernel: cmd::output(std::process::Command::new("uname").arg("-r"))?
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        commit: cmd::output(cmd::command("git").args(["rev-parse", "--short", "HEAD"]))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    };
    let results = Results {
        name: name.clone(),
        date,
        machine,
        quick,
        params: Params {
            endpoints: ENDPOINTS,
            services: plan.services.clone(),
            transactions: plan.transactions,
            repeats: plan.repeats,
            iperf_seconds: plan.iperf_seconds,
            iptables: iptables_restore().to_owned(),
            change_services: plan.change_services,
        },
        latency: Vec::new(),
        throughput: Vec::new(),
        full_sync: Vec::new(),
        endpoint_change: Vec::new(),
        memory: Vec::new(),
        api: Vec::new(),
        prog_cost: Vec::new(),
        socket_churn: Vec::new(),
        xdp: None,
        nodeport: Vec::new(),
        nodeport_pps: Vec::new(),
        skipped: Vec::new(),
    };
    let mut bench = Bench {
        plan,
        results,
        gave_up: Vec::new(),
    };
    let started = Instant::now();
    if wants("clusterip") {
        for n in bench.plan.services.clone() {
            eprintln!(
                "bench: {n} Services ({:.0} s so far)",
                started.elapsed().as_secs_f64()
            );
            bench.scale_point(n)?;
        }
        bench.throughput()?;
        for n in bench.plan.api_services.clone() {
            eprintln!("bench: lb on the API with {n} Services");
            bench.api_source(n)?;
        }
    } else {
        bench.results.params.services.clear();
    }
    if wants("xdp") {
        eprintln!(
            "bench: XDP per packet ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
        bench.xdp(katran_peer.as_deref())?;
    }
    if wants("nodeport") {
        for n in bench.plan.nodeport_services.clone() {
            eprintln!(
                "bench: NodePort with {n} Services ({:.0} s so far)",
                started.elapsed().as_secs_f64()
            );
            // A scale that cannot be measured is reported, not fatal, in a full run (the
            // other results stay); the quick run (CI) fails on it.
            if let Err(e) = bench.nodeport_point(n) {
                if quick {
                    return Err(e);
                }
                bench.skip(format!("NodePort with {n} Services: {e:#}"));
            }
        }
    }
    let dir = cmd::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(&bench.results)?)?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, bench.results.markdown())?;
    plot::write(&bench.results, &dir)?;
    println!("{}", bench.results.markdown());
    eprintln!(
        "bench: wrote {}, {} and plots in {:.0} s",
        json.display(),
        md.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `0..len`, starting at `round % len`: the order a round measures its points in.
fn rotated(len: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |k| (k + round) % len.max(1))
}

fn to_f64(n: usize) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "Service counts are far below 2^52"
    )]
    let n = n as f64;
    n
}

/// `cargo xtask gen-services`: the bench's Service set as manifests in `out`.
pub fn generate(n: usize, endpoints: usize, out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let backends = (0..endpoints).map(services::backend_ip).collect();
    for (file, text) in ServiceSet::new(n, backends).manifests(PER_FILE, &[]) {
        std::fs::write(out.join(file), text)?;
    }
    Ok(())
}

impl Bench {
    /// Whether loading `n` Services into a peer would exceed the budget, extrapolating
    /// linearly (at best) from its largest measured load.
    fn too_slow(&self, mode: Mode, n: usize) -> bool {
        // A smaller set already could not be loaded: a bigger one cannot either.
        if self
            .gave_up
            .iter()
            .any(|&(m, smaller)| m == mode && smaller < n)
        {
            return true;
        }
        self.results
            .full_sync
            .iter()
            .filter(|r| r.mode == mode.name() && r.services < n)
            .max_by_key(|r| r.services)
            .and_then(|r| Some(r.seconds? * to_f64(n) / to_f64(r.services)))
            .is_some_and(|predicted| predicted > self.plan.load_budget.as_secs_f64())
    }

    fn skip(&mut self, what: String) {
        eprintln!("bench: skipped: {what}");
        self.results.skipped.push(what);
    }

    /// Programs `mode` with `set` on `topo`. `None`: the mode could not take it (recorded).
    fn program(
        &mut self,
        mode: Mode,
        topo: &Topology,
        set: &ServiceSet,
        timing: bool,
    ) -> anyhow::Result<Option<Programmed>> {
        let n = set.n;
        let mut programmed = Programmed {
            agent: None,
            _manifests: None,
        };
        match mode {
            Mode::Direct => {}
            Mode::Lb => {
                let dir = TempDir::new("lb-bench");
                for (file, text) in set.manifests(PER_FILE, &[]) {
                    std::fs::write(dir.0.join(file), text)?;
                }
                let t0 = Instant::now();
                // Maps big enough for the largest set (2 frontends and 2 x E slots a Service).
                let frontends = (2 * n).max(1 << 16).next_power_of_two().to_string();
                let backends = (2 * n * set.backends.len())
                    .max(1 << 19)
                    .next_power_of_two()
                    .to_string();
                let agent = Agent::start_manifests_with(
                    &topo.cgroup.path,
                    &dir.0,
                    &["--max-frontends", &frontends, "--max-backends", &backends],
                    self.plan.load_budget + Duration::from_secs(60),
                );
                let end_to_end = t0.elapsed().as_secs_f64();
                if timing {
                    let m = metrics(&agent.metrics_text());
                    self.results.full_sync.push(SyncRow {
                        mode: "lb".into(),
                        services: n,
                        seconds: m.get(measure::SYNC_SECONDS_SUM).copied(),
                        end_to_end_seconds: Some(end_to_end),
                        manifest_load_seconds: m.get(measure::LOAD_SECONDS).copied(),
                    });
                    let pid = agent.pid().context("agent pid")?;
                    self.results.memory.push(MemoryRow {
                        services: n,
                        agent_rss_mib: measure::rss_mib(pid),
                        bpf_map_mib: measure::bpf_map_mib(pid),
                    });
                }
                programmed.agent = Some(agent);
                programmed._manifests = Some(dir);
            }
            Mode::Iptables | Mode::Nftables if self.too_slow(mode, n) => {
                self.skip(format!(
                    "{} with {n} Services: loading {} would take longer than {:?} (extrapolated from the smaller sets)",
                    mode.name(),
                    mode.rules_name(),
                    self.plan.load_budget
                ));
                return Ok(None);
            }
            Mode::Iptables | Mode::Nftables => {
                let args = mode.loader(false).context("a rule-based peer")?;
                let text = mode.rules(set);
                let loaded = match topo.in_node_timed(&args, &text, self.plan.load_budget) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        // e.g. killed by the OOM killer: the peer cannot take this many.
                        self.gave_up.push((mode, n));
                        self.skip(format!(
                            "{} with {n} Services: loading the rules failed: {e:#}",
                            mode.name()
                        ));
                        return Ok(None);
                    }
                };
                match loaded {
                    Some(took) => {
                        if timing {
                            self.results.full_sync.push(SyncRow {
                                mode: mode.name().into(),
                                services: n,
                                seconds: Some(took.as_secs_f64()),
                                end_to_end_seconds: None,
                                manifest_load_seconds: None,
                            });
                        }
                    }
                    None => {
                        self.gave_up.push((mode, n));
                        self.skip(format!(
                            "{} with {n} Services: loading the rules took longer than {:?}",
                            mode.name(),
                            self.plan.load_budget
                        ));
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(programmed))
    }

    /// Sets up every mode for `n` Services (one topology each), then measures them in
    /// interleaved rounds, so drift of the machine hits all modes alike.
    fn scale_point(&mut self, n: usize) -> anyhow::Result<()> {
        let mut setups: Vec<Setup> = Vec::new();
        for mode in Mode::ALL {
            eprintln!("bench: programming {} with {n} Services", mode.name());
            // The backend pod holds the common endpoints and the last Service's own.
            let topo = Topology::new(2 * ENDPOINTS, &Servers::Echo)?;
            let (common, own) = topo.backends.split_at(ENDPOINTS);
            let set = ServiceSet::new(n, common.to_vec()).with_own_last(own.to_vec());
            if let Some(programmed) = self.program(mode, &topo, &set, n > 1)? {
                setups.push(Setup {
                    mode,
                    topo,
                    set,
                    programmed,
                });
            }
        }
        for setup in &setups {
            // The backend pod answers on every address of its namespace.
            setup
                .topo
                .backend
                .ip(&["addr", "add", &format!("{NON_BACKEND}/16"), "dev", "b0"]);
        }
        // Every (mode, proto, target) measured once per round.
        let mut points: Vec<(usize, Proto, &'static str, SocketAddr)> = Vec::new();
        for (i, setup) in setups.iter().enumerate() {
            for proto in Proto::BOTH {
                let (port, target_port) = proto.ports();
                if setup.mode == Mode::Lb && proto == Proto::Tcp {
                    // The backend pod on an address no Service uses, with lb's programs
                    // attached: what lb costs a connect() that is not to a Service (the
                    // "miss"); and a backend directly: a connect to an address with a reverse
                    // entry (layout 5, TCP only: it gets state marked direct, in its slot).
                    points.push((
                        i,
                        proto,
                        "pod",
                        SocketAddrV4::new(NON_BACKEND, target_port).into(),
                    ));
                    points.push((
                        i,
                        proto,
                        "backend",
                        SocketAddrV4::new(setup.topo.backends[0], target_port).into(),
                    ));
                } else if setup.mode == Mode::Lb {
                    // UDP has no reverse entries: a backend directly is a miss (the echo
                    // server's UDP sockets are bound to the backend addresses only).
                    points.push((
                        i,
                        proto,
                        "pod",
                        SocketAddrV4::new(setup.topo.backends[0], target_port).into(),
                    ));
                }
                if setup.mode == Mode::Direct {
                    // Each transaction to the next pod: the same spread over the pods as a
                    // Service's random pick, so the pods' caches and sockets are as warm
                    // either way and the difference is what the path costs.
                    points.push((
                        i,
                        proto,
                        "pods",
                        SocketAddrV4::new(setup.topo.backends[0], target_port).into(),
                    ));
                } else {
                    points.push((
                        i,
                        proto,
                        "first",
                        SocketAddrV4::new(ServiceSet::vip(0), port).into(),
                    ));
                    points.push((
                        i,
                        proto,
                        "last",
                        SocketAddrV4::new(ServiceSet::vip(n - 1), port).into(),
                    ));
                    if setup.mode == Mode::Lb && proto == Proto::Tcp && n > 2 {
                        // A Service whose endpoints other Services share (the first, which
                        // sorts first, owns their reverse entries): its connects write
                        // per-socket state (a slot).
                        points.push((
                            i,
                            proto,
                            "shared",
                            SocketAddrV4::new(ServiceSet::vip(1), port).into(),
                        ));
                    }
                }
            }
        }
        // A point's run: a direct point goes to every pod (of the common endpoints) in turn.
        let run = |i: usize, proto: Proto, addr: SocketAddr, count: usize| {
            let topo = &setups[i].topo;
            if setups[i].mode == Mode::Direct {
                let pods: Vec<SocketAddr> = setups[i]
                    .set
                    .backends
                    .iter()
                    .map(|pod| SocketAddrV4::new(*pod, addr.port()).into())
                    .collect();
                measure::rr_spread(topo, proto, &pods, count)
            } else {
                rr(topo, proto, addr, count)
            }
        };
        for &(i, proto, _, addr) in &points {
            // Warm up: neighbour tables, caches, conntrack.
            run(i, proto, addr, 50)?;
        }
        let mut runs: Vec<Vec<measure::Rr>> = vec![Vec::new(); points.len()];
        for round in 0..self.plan.repeats {
            eprintln!(
                "bench: {n} Services, round {}/{}",
                round + 1,
                self.plan.repeats
            );
            // Each round starts at another point, so no mode is always measured first.
            for k in rotated(points.len(), round) {
                let (i, proto, _, addr) = points[k];
                runs[k].push(run(i, proto, addr, self.plan.transactions)?);
            }
        }
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds to microseconds")]
        let to_us = |ns: u64| ns as f64 / 1e3;
        // The headline p50 of a run: connect() for TCP, the transaction for UDP.
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
            self.results.latency.push(LatencyRow {
                mode: setups[i].mode.name().into(),
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
        let lb_points: Vec<_> = points
            .iter()
            .filter(|p| setups[p.0].mode == Mode::Lb)
            .filter_map(|&(i, proto, target, addr)| {
                let agent = setups[i].programmed.agent.as_ref()?;
                Some((
                    &setups[i].topo,
                    agent.pin_path.as_path(),
                    proto,
                    target,
                    addr,
                ))
            })
            .collect();
        self.prog_cost(n, &lb_points)?;
        if Some(&n) == self.plan.services.first() {
            self.socket_churn(n, &setups, Proto::Udp)?;
        }
        if n == self.plan.change_services {
            for setup in &setups {
                if setup.mode != Mode::Direct {
                    eprintln!(
                        "bench: {} endpoint changes with {n} Services",
                        setup.mode.name()
                    );
                    self.endpoint_change(
                        setup.mode,
                        &setup.topo,
                        &setup.set,
                        setup.programmed.agent.as_ref(),
                    )?;
                }
            }
        }
        if Some(&n) == self.plan.services.last() {
            // Last: the connections' TIME_WAIT sockets would slow later connects to that pod.
            self.socket_churn(n, &setups, Proto::Tcp)?;
        }
        Ok(())
    }

    /// lb's programs' run time per call at each of lb's points (the programs of the agent
    /// pinned at the point's pin path), over `repeats` runs.
    fn prog_cost(
        &mut self,
        n: usize,
        points: &[(&Topology, &std::path::Path, Proto, &'static str, SocketAddr)],
    ) -> anyhow::Result<()> {
        let _enabled = prog_cost::Enabled::new()?;
        for &(topo, pin_path, proto, target, addr) in points {
            // Only this agent's programs: another lb on the machine must not skew the figures.
            let ids = prog_cost::agent_programs(pin_path)?;
            // Warm up outside the measured window: the first point of the pass would
            // otherwise pay cold caches that the others do not.
            measure::rr_getpeername(topo, proto, addr, 50)?;
            let mut per_call: BTreeMap<String, (Vec<f64>, u64)> = BTreeMap::new();
            for _ in 0..self.plan.repeats {
                let before = prog_cost::read(&ids)?;
                // With a getpeername() per TCP connection: its program's cost on each kind
                // of socket (the miss: "pod", an untranslated socket).
                measure::rr_getpeername(topo, proto, addr, self.plan.transactions)?;
                for (program, ns, calls) in prog_cost::delta(&before, &prog_cost::read(&ids)?) {
                    let (runs, total) = per_call.entry(program).or_default();
                    runs.push(ns);
                    *total += calls;
                }
            }
            for (program, (runs, calls)) in per_call {
                if let Some(ns_per_call) = Spread::of(runs) {
                    self.results.prog_cost.push(ProgCostRow {
                        services: n,
                        proto: proto.lower().into(),
                        target: target.into(),
                        program,
                        ns_per_call,
                        calls_per_transaction: to_f64(usize::try_from(calls)?)
                            / to_f64(self.plan.transactions * self.plan.repeats),
                    });
                }
            }
        }
        Ok(())
    }

    /// A churn check ([`churn`]) against lb's setup: new UDP sockets to Service 0's UDP port,
    /// or new TCP connections to the first backend directly (an address with a reverse entry:
    /// each connect writes state, marked direct), at most [`TCP_CHURN_MAX`].
    fn socket_churn(&mut self, n: usize, setups: &[Setup], proto: Proto) -> anyhow::Result<()> {
        let Some((setup, agent)) = setups
            .iter()
            .find_map(|s| Some((s, s.programmed.agent.as_ref()?)))
        else {
            return Ok(());
        };
        let (addr, sockets, maps) = match proto {
            Proto::Udp => (
                SocketAddrV4::new(ServiceSet::vip(0), proto.ports().0),
                self.plan.churn_sockets,
                churn::UDP_MAPS,
            ),
            Proto::Tcp => (
                SocketAddrV4::new(setup.topo.backends[0], proto.ports().1),
                self.plan.churn_sockets.min(TCP_CHURN_MAX),
                churn::TCP_MAPS,
            ),
        };
        eprintln!(
            "bench: {sockets} new {} sockets to {addr} (per-socket entries around them)",
            proto.lower()
        );
        let row = churn::run(
            &setup.topo,
            &agent.pin_path,
            n,
            (proto, addr.into()),
            sockets,
            maps,
        )?;
        self.results.socket_churn.push(row);
        Ok(())
    }

    /// One endpoint added to Service 0 and removed again, `change_repeats` times.
    fn endpoint_change(
        &mut self,
        mode: Mode,
        topo: &Topology,
        set: &ServiceSet,
        agent: Option<&Agent>,
    ) -> anyhow::Result<()> {
        let base = set.backends.clone();
        let mut more = base.clone();
        more.push(EXTRA_ENDPOINT);
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut e2e: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..self.plan.change_repeats {
            for (k, (before, after)) in [(&base, &more), (&more, &base)].into_iter().enumerate() {
                match mode {
                    Mode::Lb => {
                        let agent = agent.context("lb mode without an agent")?;
                        let m0 = metrics(&agent.metrics_text());
                        let file = ServiceSet::file_of(0, PER_FILE);
                        let extra: &[std::net::Ipv4Addr] = if after.len() > base.len() {
                            &[EXTRA_ENDPOINT]
                        } else {
                            &[]
                        };
                        let text = set.manifest_file(0..PER_FILE.min(set.n), extra);
                        let t0 = Instant::now();
                        measure::write_atomic(&agent.manifests, &file, &text)?;
                        let (m1, _) = measure::wait_for_sync(
                            agent,
                            m0.get(measure::SYNCS_OK).copied().unwrap_or(0.0),
                            Duration::from_secs(30),
                        )?;
                        let waited = t0.elapsed();
                        let delta = |key: &str| {
                            m1.get(key).copied().unwrap_or(0.0)
                                - m0.get(key).copied().unwrap_or(0.0)
                        };
                        let syncs = delta(measure::SYNC_SECONDS_COUNT).max(1.0);
                        times[k].push(delta(measure::SYNC_SECONDS_SUM) / syncs * 1e3);
                        e2e[k].push(waited.as_secs_f64() * 1e3);
                    }
                    Mode::Iptables | Mode::Nftables => {
                        let loader = mode.loader(true).context("a rule-based peer")?;
                        let text = mode.rules_change(set, 0, before, after);
                        let took = topo
                            .in_node_timed(&loader, &text, Duration::from_secs(60))?
                            .with_context(|| format!("{} hung", loader[0]))?;
                        times[k].push(took.as_secs_f64() * 1e3);
                    }
                    Mode::Direct => {}
                }
            }
        }
        for (k, op) in ["add", "remove"].into_iter().enumerate() {
            if let Some(ms) = Spread::of(std::mem::take(&mut times[k])) {
                self.results.endpoint_change.push(ChangeRow {
                    mode: mode.name().into(),
                    services: set.n,
                    op: op.into(),
                    ms,
                    end_to_end_ms: Spread::of(std::mem::take(&mut e2e[k])),
                });
            }
        }
        Ok(())
    }

    /// lb on the Kubernetes API: the stand-in server holds `n` Services and their slices;
    /// time from `lb run` to healthy, the sync, memory, and one endpoint changed through the
    /// API (noticed to kernel, and API write to sync reported).
    fn api_source(&mut self, n: usize) -> anyhow::Result<()> {
        let topo = Topology::new(ENDPOINTS, &Servers::Echo)?;
        let set = ServiceSet::new(n, topo.backends.clone());
        let api = lb_tests::fake_api::FakeApi::start();
        let objects = |extra: &[std::net::Ipv4Addr]| -> anyhow::Result<Vec<serde_json::Value>> {
            let list: serde_json::Value = serde_json::from_str(&set.manifest_file(0..n, extra))?;
            Ok(list["items"].as_array().cloned().unwrap_or_default())
        };
        for object in objects(&[])? {
            api.apply(object);
        }
        let dir = TempDir::new("lb-bench-api");
        let kubeconfig = dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let t0 = Instant::now();
        let agent =
            Agent::start_kube_within(&topo.cgroup.path, &kubeconfig, &[], self.plan.load_budget);
        let end_to_end = t0.elapsed().as_secs_f64();
        let m = metrics(&agent.metrics_text());
        let pid = agent.pid().context("agent pid")?;
        self.results.api.push(report::ApiRow {
            services: n,
            end_to_end_seconds: end_to_end,
            sync_seconds: m.get(measure::SYNC_SECONDS_SUM).copied(),
            agent_rss_mib: measure::rss_mib(pid),
            bpf_map_mib: measure::bpf_map_mib(pid),
        });
        // The EndpointSlice of Service 0, with and without the extra endpoint.
        let slice_of_service_0 =
            |extra: &[std::net::Ipv4Addr]| -> anyhow::Result<serde_json::Value> {
                objects(extra)?
                    .into_iter()
                    .nth(1)
                    .context("the first EndpointSlice")
            };
        let (with_extra, without) = (
            slice_of_service_0(&[EXTRA_ENDPOINT])?,
            slice_of_service_0(&[])?,
        );
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut e2e: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..self.plan.change_repeats {
            for (k, slice) in [&with_extra, &without].into_iter().enumerate() {
                let m0 = metrics(&agent.metrics_text());
                let t0 = Instant::now();
                api.apply(slice.clone());
                let (m1, _) = measure::wait_for_sync(
                    &agent,
                    m0.get(measure::SYNCS_OK).copied().unwrap_or(0.0),
                    Duration::from_secs(30),
                )?;
                e2e[k].push(t0.elapsed().as_secs_f64() * 1e3);
                let delta = |key: &str| {
                    m1.get(key).copied().unwrap_or(0.0) - m0.get(key).copied().unwrap_or(0.0)
                };
                times[k].push(
                    delta(measure::SYNC_SECONDS_SUM) / delta(measure::SYNC_SECONDS_COUNT).max(1.0)
                        * 1e3,
                );
            }
        }
        for (k, op) in ["add", "remove"].into_iter().enumerate() {
            if let Some(ms) = Spread::of(std::mem::take(&mut times[k])) {
                self.results.endpoint_change.push(ChangeRow {
                    mode: "lb-api".into(),
                    services: n,
                    op: op.into(),
                    ms,
                    end_to_end_ms: Spread::of(std::mem::take(&mut e2e[k])),
                });
            }
        }
        drop(agent);
        Ok(())
    }

    /// Bulk TCP through every mode, interleaved: a one-endpoint Service in front of iperf3.
    fn throughput(&mut self) -> anyhow::Result<()> {
        let mut setups: Vec<(Setup, SocketAddr)> = Vec::new();
        for mode in Mode::ALL {
            let topo = Topology::new(1, &Servers::Iperf)?;
            let set = ServiceSet::new(1, topo.backends.clone());
            let Some(programmed) = self.program(mode, &topo, &set, false)? else {
                continue;
            };
            let addr: SocketAddr = if mode == Mode::Direct {
                SocketAddrV4::new(topo.backends[0], services::TCP_TARGET).into()
            } else {
                SocketAddrV4::new(ServiceSet::vip(0), services::TCP_PORT).into()
            };
            setups.push((
                Setup {
                    mode,
                    set,
                    programmed,
                    topo,
                },
                addr,
            ));
        }
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
        for round in 0..self.plan.iperf_repeats {
            eprintln!(
                "bench: throughput, round {}/{}",
                round + 1,
                self.plan.iperf_repeats
            );
            for k in rotated(setups.len(), round) {
                let (setup, addr) = &setups[k];
                runs[k].push(measure::iperf(&setup.topo, *addr, self.plan.iperf_seconds)?);
            }
        }
        let direct = setups.iter().position(|(s, _)| s.mode == Mode::Direct);
        for (k, (setup, _)) in setups.iter().enumerate() {
            // Paired with direct's run of the same round, so the machine's drift cancels.
            let vs_direct = direct.filter(|_| setup.mode != Mode::Direct).and_then(|d| {
                Spread::of(
                    runs[k]
                        .iter()
                        .zip(&runs[d])
                        .map(|(mine, direct)| mine / direct)
                        .collect(),
                )
            });
            if let Some(gbps) = Spread::of(runs[k].clone()) {
                self.results.throughput.push(ThroughputRow {
                    mode: setup.mode.name().into(),
                    gbps,
                    vs_direct,
                });
            }
        }
        Ok(())
    }
}
