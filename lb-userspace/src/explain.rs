//! `lb explain ADDR:PORT[/PROTO]`: what the datapath does with a connection to that address,
//! read from the pinned maps (the kernel's truth, also while the agent is down): the frontend
//! that matches and by which rule, the Service and port it belongs to (`LB_NAMES`), its
//! policies, the backends in their slots, the client's affinity entry, and the rule that
//! decides: translated, refused (and why), or not lb's.
//!
//! The affinity map is keyed by the client's network namespace cookie, not by its address
//! (at `connect()` the source address is not chosen yet, and a pod is its namespace). So
//! `--client IP` is resolved to the namespaces on this node that hold that address on an
//! interface (named ones under `/run/netns` and every process's); `--client-netns PATH` names
//! one directly. What cannot be resolved is said so: a client on another node (its affinity
//! lives in that node's maps), an address no namespace here holds, or one that several hold
//! (all host-network processes share the host's namespace, and so one affinity entry).

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::Context as _;
use lb_common::{
    maps::{Affinity, Backend, Frontend, FrontendKey},
    select::affinity_fresh,
};

use crate::{
    cli::ExplainArgs,
    desired::{ShowAddrPort, ShowFrontend, frontend_key},
    kernel::{PinLayout, maps::Maps, names::Names, netns},
    model::Protocol,
};

/// What `lb explain` was asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// `10.96.0.10:80`, `10.96.0.10:80/UDP`, `[fd00::10]:53/udp`; TCP when no protocol is given.
pub fn parse_target(text: &str) -> anyhow::Result<Target> {
    let (addr, proto) = match text.rsplit_once('/') {
        Some((addr, proto)) => {
            let proto = match proto.to_ascii_uppercase().as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => anyhow::bail!("{text:?}: unknown protocol {other:?} (TCP, UDP or SCTP)"),
            };
            (addr, proto)
        }
        None => (text, Protocol::Tcp),
    };
    let sa: SocketAddr = addr.parse().with_context(|| {
        format!("{text:?}: expected ADDR:PORT[/PROTO], e.g. 10.96.0.10:80/TCP or [fd00::10]:53/UDP")
    })?;
    anyhow::ensure!(sa.port() != 0, "{text:?}: port 0 is never a Service port");
    // A v4-mapped v6 address is the v4 frontend, as the programs see it.
    let addr = match sa.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    Ok(Target {
        addr,
        port: sa.port(),
        proto,
    })
}

/// Which rule matched the target to a frontend. Today every frontend is an exact (address,
/// port, protocol) key; the north-south kinds add their rules here (the NodePort wildcard on
/// any node address, source ranges), each with its own variant and its own lookup in
/// [`find`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// `LB_FRONTENDS` holds the exact (address, port, protocol).
    ExactFrontend,
}

/// The frontend that matched.
#[derive(Clone, Copy, Debug)]
struct Matched {
    rule: Rule,
    key: FrontendKey,
    frontend: Frontend,
}

/// The frontend for `target`, trying each rule in the order the programs do.
fn find(maps: &Maps, target: &Target) -> anyhow::Result<Option<Matched>> {
    let key = frontend_key(&target.addr, target.port, target.proto.ip_proto());
    Ok(maps.frontend(&key)?.map(|frontend| Matched {
        rule: Rule::ExactFrontend,
        key,
        frontend,
    }))
}

/// What a new connection to the target gets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Verdict {
    /// No frontend: lb leaves the connection alone (it goes to the address as it is).
    NotTranslated { rule: String },
    /// `connect()`/`sendmsg()` fail with `errno`.
    Refused {
        errno: &'static str,
        rule: String,
        counter: &'static str,
    },
    /// Sent to a backend.
    Translated { rule: String },
}

/// The decision, from the frontend (if any), how many of its slots exist, and whether the
/// client's affinity backend would be reused.
pub fn decide(frontend: Option<&Frontend>, slots_present: u32, sticky: Option<&str>) -> Verdict {
    let Some(f) = frontend else {
        return Verdict::NotTranslated {
            rule:
                "no frontend for this address, port and protocol: lb does not touch the connection"
                    .into(),
        };
    };
    if f.count == 0 {
        return Verdict::Refused {
            errno: "ECONNREFUSED",
            rule:
                "no usable endpoint: the frontend's backend count is 0 (kube-proxy's REJECT rule)"
                    .into(),
            counter: lb_common::stats::NAMES[lb_common::stats::REFUSED_NO_BACKEND as usize],
        };
    }
    if slots_present < f.count {
        return Verdict::Refused {
            errno: "ECONNREFUSED",
            rule: format!(
                "{} of the frontend's {} slots are missing: a connect that picks one is refused (the agent repairs this on its next resync)",
                f.count - slots_present,
                f.count
            ),
            counter: lb_common::stats::NAMES[lb_common::stats::ERR_SLOT_MISSING as usize],
        };
    }
    let rule = match (f.affinity_timeout_s, sticky) {
        (0, _) => format!("a uniformly random backend of {}", f.count),
        (t, Some(backend)) => format!(
            "ClientIP affinity ({t} s): this client's remembered backend {backend} (fresh and still a member)"
        ),
        (t, None) => format!(
            "ClientIP affinity ({t} s): a uniformly random backend of {}, remembered for the client",
            f.count
        ),
    };
    Verdict::Translated { rule }
}

#[derive(Debug, serde::Serialize)]
struct Slot {
    slot: u32,
    backend: String,
}

#[derive(Debug, serde::Serialize)]
struct AffinityEntry {
    client_netns_cookie: u64,
    backend: String,
    idle_seconds: f64,
    /// Not idle for the timeout yet.
    fresh: bool,
    /// The backend is still one of the frontend's members.
    member: bool,
    /// Reused by the client's next connect (fresh and a member).
    reused: bool,
}

#[derive(Debug, Default, serde::Serialize)]
struct ClientView {
    /// What was asked (`--client` address or `--client-netns` path).
    asked: Option<String>,
    /// The namespaces it resolved to.
    resolved: Vec<netns::Found>,
    /// What could not be resolved, and why.
    note: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Explanation {
    target: String,
    rule: Option<Rule>,
    frontend: Option<String>,
    id: Option<u32>,
    kind: Option<String>,
    service: Option<String>,
    port_name: Option<String>,
    /// The Service's traffic policies that are `Local` (`iTP=Local`, `eTP=Local`, `-`).
    traffic_policy: Option<String>,
    affinity_timeout_seconds: Option<u32>,
    backends: Vec<Slot>,
    client: ClientView,
    /// The frontend's affinity entries: the client's when one was given, else all.
    affinity: Vec<AffinityEntry>,
    verdict: Verdict,
    /// What a packet from outside the node gets at XDP (`--xdp-iface`), for an external
    /// frontend (NodePort, LoadBalancer IP, externalIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    external: Option<External>,
}

/// The north-south view of an external frontend: its `externalTrafficPolicy`, the backends
/// of its external range (this node's first) and the rule that decides a new flow.
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct External {
    pub policy: &'static str,
    /// Backends in the external range, with whether each is on this node.
    pub backends: Vec<ExternalSlot>,
    pub verdict: String,
    /// `loadBalancerSourceRanges` XDP admits new flows from (a LoadBalancer IP's only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExternalSlot {
    pub slot: u32,
    pub backend: String,
    pub local: bool,
}

/// The external view of `f` from its external backends (slot order: this node's first), or
/// `None` for a frontend that XDP does not serve (a ClusterIP).
pub fn external_view(f: &Frontend, backends: Vec<ExternalSlot>) -> Option<External> {
    use lb_common::nat::{FRONTEND_ETP_LOCAL, FRONTEND_EXTERNAL};
    if f.flags & FRONTEND_EXTERNAL == 0 {
        return None;
    }
    let local = f.flags & FRONTEND_ETP_LOCAL != 0;
    let verdict = match (local, f.ext_count, f.ext_local) {
        (true, _, 0) => format!(
            "dropped: externalTrafficPolicy Local and no endpoint on this node (counter {}), as kube-proxy",
            lb_common::stats::NAMES[lb_common::stats::XDP_DROP_NO_LOCAL as usize]
        ),
        (true, _, n) => {
            format!("a random one of this node's {n} endpoints, client address preserved (no SNAT)")
        }
        (false, 0, _) => format!(
            "passed to the node's stack untouched: no endpoint (counter {}); the stack answers with a reset or port unreachable",
            lb_common::stats::NAMES[lb_common::stats::XDP_PASS_NO_BACKEND as usize]
        ),
        (false, n, l) => format!(
            "a random one of {n} endpoints: to one of this node's {l} with DNAT only, to one of the {} on other nodes with SNAT to this node's address",
            n - l.min(n)
        ),
    };
    Some(External {
        policy: if local { "Local" } else { "Cluster" },
        backends,
        verdict,
        source_ranges: Vec::new(),
    })
}

/// `x` with the frontend's source ranges: a new flow from `client` (with whether a range
/// holds it, as XDP's trie lookup says) is dropped when none does; without a client the
/// verdict says that only the ranges are admitted.
pub fn with_sources(
    mut x: External,
    ranges: Vec<String>,
    client: Option<(IpAddr, bool)>,
) -> External {
    if ranges.is_empty() {
        return x;
    }
    x.verdict = match client {
        Some((ip, false)) => format!(
            "dropped: {ip} is outside the Service's loadBalancerSourceRanges (counter {}), as kube-proxy's firewall",
            lb_common::stats::NAMES[lb_common::stats::XDP_DROP_SOURCE_RANGE as usize]
        ),
        Some((ip, true)) => format!("{ip} is inside loadBalancerSourceRanges; {}", x.verdict),
        None => format!(
            "{} (new flows from loadBalancerSourceRanges only: {})",
            x.verdict,
            ranges.join(" ")
        ),
    };
    x.source_ranges = ranges;
    x
}

/// `CLOCK_MONOTONIC` in nanoseconds: `bpf_ktime_get_ns()`'s clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn resolve_client(args: &ExplainArgs) -> anyhow::Result<ClientView> {
    if let Some(path) = &args.client_netns {
        let ns = netns::Netns::open(path)
            .with_context(|| format!("--client-netns {}", path.display()))?;
        let cookie = netns::cookie(&ns)
            .with_context(|| format!("--client-netns {}: reading its cookie", path.display()))?;
        return Ok(ClientView {
            asked: Some(path.display().to_string()),
            resolved: vec![netns::Found {
                path: path.clone(),
                cookie,
            }],
            note: None,
        });
    }
    let Some(ip) = args.client else {
        return Ok(ClientView::default());
    };
    let resolved = netns::with_address(ip);
    let note = match resolved.len() {
        0 => Some(format!(
            "no network namespace on this node holds {ip}: lb keys affinity by the client's network namespace, so a client on another node has its entry in that node's maps; showing every client's entry"
        )),
        1 => None,
        n => Some(format!(
            "{n} network namespaces on this node hold {ip}; each has its own affinity entry"
        )),
    };
    Ok(ClientView {
        asked: Some(ip.to_string()),
        resolved,
        note,
    })
}

fn affinity_entries(maps: &Maps, matched: &Matched, clients: &ClientView) -> Vec<AffinityEntry> {
    let now = monotonic_ns();
    let timeout = matched.frontend.affinity_timeout_s;
    let id = matched.frontend.id;
    maps.affinity_of(id)
        .into_iter()
        .filter(|(cookie, _)| {
            clients.resolved.is_empty() || clients.resolved.iter().any(|c| c.cookie == *cookie)
        })
        .map(|(cookie, a): (u64, Affinity)| {
            let fresh = timeout != 0 && affinity_fresh(now, a.last_used_ns, timeout);
            let member = maps.is_member(id, a.backend);
            let idle_seconds = now.saturating_sub(a.last_used_ns) as f64 / 1e9;
            AffinityEntry {
                client_netns_cookie: cookie,
                backend: show_backend(&a.backend),
                idle_seconds,
                fresh,
                member,
                reused: fresh && member,
            }
        })
        .collect()
}

fn show_backend(b: &Backend) -> String {
    ShowAddrPort(&b.addr, b.port).to_string()
}

/// `lb explain`.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let target = parse_target(&args.target)?;
    let layout = PinLayout::new(&args.inspect.pin_path);
    let maps = Maps::open(&layout).with_context(|| {
        format!(
            "no lb maps under {} (is lb running with this --pin-path?)",
            args.inspect.pin_path.display()
        )
    })?;
    let names = Names::open(&layout)?;
    let clients = resolve_client(args)?;
    let matched = find(&maps, &target)?;
    let shown_target = ShowFrontend(&frontend_key(
        &target.addr,
        target.port,
        target.proto.ip_proto(),
    ))
    .to_string();
    let mut backends = Vec::new();
    let mut external = Vec::new();
    let mut affinity = Vec::new();
    let mut name = None;
    if let Some(m) = &matched {
        for slot in 0..m.frontend.count {
            if let Some(b) = maps.slot(m.frontend.id, slot)? {
                backends.push(Slot {
                    slot,
                    backend: show_backend(&b),
                });
            }
        }
        for i in 0..m.frontend.ext_count {
            if let Some(b) = maps.slot(m.frontend.id, lb_common::nat::EXT_SLOT_BASE + i)? {
                external.push(ExternalSlot {
                    slot: i,
                    backend: show_backend(&b),
                    local: i < m.frontend.ext_local,
                });
            }
        }
        affinity = affinity_entries(&maps, m, &clients);
        name = names
            .as_ref()
            .and_then(|n| n.read_all().remove(&m.frontend.id));
    }
    let sticky = match (&clients.resolved[..], &affinity[..]) {
        ([_], [entry]) if entry.reused => Some(entry.backend.as_str()),
        _ => None,
    };
    let slots_present = u32::try_from(backends.len()).unwrap_or(u32::MAX);
    let verdict = decide(matched.as_ref().map(|m| &m.frontend), slots_present, sticky);
    let explanation = Explanation {
        target: shown_target,
        rule: matched.map(|m| m.rule),
        frontend: matched.map(|m| ShowFrontend(&m.key).to_string()),
        id: matched.map(|m| m.frontend.id),
        // Without LB_NAMES the kind is not known (every kind shares the frontend map).
        kind: name.as_ref().map(|n| n.kind.to_string()),
        service: name.as_ref().map(|n| n.service.to_string()),
        port_name: name.as_ref().map(|n| n.port_name.clone()),
        traffic_policy: name.as_ref().map(crate::kernel::names::ServiceName::policy),
        affinity_timeout_seconds: matched.map(|m| m.frontend.affinity_timeout_s),
        backends,
        client: clients,
        affinity,
        verdict,
        external: matched.as_ref().and_then(|m| {
            let x = external_view(&m.frontend, external)?;
            if m.frontend.flags & lb_common::nat::FRONTEND_SRC_RANGES == 0 {
                return Some(x);
            }
            let admitted = args
                .client
                .map(|ip| (ip, maps.src_range_admits(m.frontend.id, &ip)));
            Some(with_sources(x, maps.src_ranges_of(m.frontend.id), admitted))
        }),
    };
    let mut out = std::io::stdout().lock();
    if args.inspect.json {
        serde_json::to_writer_pretty(&mut out, &explanation)?;
        writeln!(out)?;
    } else {
        out.write_all(render(&explanation)?.as_bytes())?;
    }
    Ok(())
}

/// The text form.
fn render(e: &Explanation) -> Result<String, std::fmt::Error> {
    let mut s = String::new();
    writeln!(s, "{}", e.target)?;
    match (&e.frontend, e.id) {
        (Some(frontend), Some(id)) => {
            let service = match (&e.service, &e.port_name) {
                (Some(svc), Some(port)) if !port.is_empty() => {
                    format!("Service {svc}, port {port}")
                }
                (Some(svc), _) => format!("Service {svc}"),
                _ => "Service unknown (no LB_NAMES beside the pins)".to_owned(),
            };
            writeln!(
                s,
                "  frontend  {frontend} (id {id}, {}, matched by its exact address, port and protocol)",
                e.kind.as_deref().unwrap_or("ClusterIP")
            )?;
            writeln!(s, "  service   {service}")?;
            let affinity = match e.affinity_timeout_seconds {
                Some(0) | None => "sessionAffinity None".to_owned(),
                Some(t) => format!("sessionAffinity ClientIP, timeout {t} s"),
            };
            let traffic = match e.traffic_policy.as_deref() {
                None => String::new(),
                Some("-") => ", traffic policies Cluster".to_owned(),
                Some(p) => format!(", {p}"),
            };
            writeln!(s, "  policy    {affinity}{traffic}")?;
            if e.backends.is_empty() {
                writeln!(s, "  backends  none")?;
            }
            for (i, b) in e.backends.iter().enumerate() {
                let label = if i == 0 { "backends" } else { "" };
                writeln!(s, "  {label:<8}  slot {}: {}", b.slot, b.backend)?;
            }
        }
        _ => {
            writeln!(s, "  frontend  none")?;
        }
    }
    if let Some(asked) = &e.client.asked {
        let resolved: Vec<String> = e
            .client
            .resolved
            .iter()
            .map(|f| format!("netns cookie {} ({})", f.cookie, f.path.display()))
            .collect();
        writeln!(
            s,
            "  client    {asked}: {}",
            if resolved.is_empty() {
                "not resolved".to_owned()
            } else {
                resolved.join(", ")
            }
        )?;
        if let Some(note) = &e.client.note {
            writeln!(s, "            {note}")?;
        }
    }
    if e.affinity_timeout_seconds.is_some_and(|t| t != 0) || !e.affinity.is_empty() {
        if e.affinity.is_empty() {
            writeln!(s, "  affinity  no entry")?;
        }
        for a in &e.affinity {
            let state = match (a.fresh, a.member) {
                (true, true) => "reused by the next connect",
                (false, _) => "expired: the next connect picks anew",
                (true, false) => "backend left the Service: the next connect picks anew",
            };
            writeln!(
                s,
                "  affinity  client netns cookie {} -> {}, idle {:.1} s, {state}",
                a.client_netns_cookie, a.backend, a.idle_seconds
            )?;
        }
    }
    let verdict = match &e.verdict {
        Verdict::NotTranslated { rule } => format!("not translated: {rule}"),
        Verdict::Refused {
            errno,
            rule,
            counter,
        } => format!("refused with {errno}: {rule} (counted as {counter})"),
        Verdict::Translated { rule } => format!("translated: {rule}"),
    };
    writeln!(s, "  verdict   {verdict} (from this node's processes)")?;
    if let Some(x) = &e.external {
        writeln!(s, "  external  externalTrafficPolicy {}", x.policy)?;
        for b in &x.backends {
            let at = if b.local { "this node" } else { "another node" };
            writeln!(s, "            slot {}: {} ({at})", b.slot, b.backend)?;
        }
        writeln!(s, "            from outside (XDP): {}", x.verdict)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn external(flags: u32, ext_count: u32, ext_local: u32) -> Frontend {
        Frontend {
            flags,
            ext_count,
            ext_local,
            ..frontend(1, 0)
        }
    }

    #[rstest]
    #[case::cluster_ip_is_not_external(external(0, 0, 0), None)]
    #[case::etp_local_without_local_endpoint(external(3, 2, 0), Some(("Local", "dropped")))]
    #[case::etp_local_with_local_endpoint(external(3, 2, 1), Some(("Local", "this node's 1")))]
    #[case::etp_cluster_without_endpoint(external(1, 0, 0), Some(("Cluster", "passed")))]
    #[case::etp_cluster_mixed(external(1, 3, 1), Some(("Cluster", "2 on other nodes with SNAT")))]
    fn external_verdicts(#[case] f: Frontend, #[case] want: Option<(&str, &str)>) {
        let got = external_view(&f, Vec::new());
        match (got, want) {
            (None, None) => {}
            (Some(x), Some((policy, needle))) => {
                assert_eq!(x.policy, policy);
                assert!(x.verdict.contains(needle), "{}", x.verdict);
            }
            (got, want) => panic!("{got:?} vs {want:?}"),
        }
    }

    #[test]
    fn source_ranges_decide_for_a_given_client() {
        let x = || external_view(&external(1, 1, 1), Vec::new()).unwrap();
        let ranges = || vec!["192.0.2.0/24".to_owned()];
        let ip = "198.51.100.1".parse().unwrap();
        let out = with_sources(x(), ranges(), Some((ip, false)));
        assert!(
            out.verdict.starts_with("dropped: 198.51.100.1 is outside"),
            "{}",
            out.verdict
        );
        assert!(out.verdict.contains("xdp_drop_source_range"));
        let ok = with_sources(x(), ranges(), Some((ip, true)));
        assert!(ok.verdict.contains("this node's 1"), "{}", ok.verdict);
        let any = with_sources(x(), ranges(), None);
        assert!(
            any.verdict.ends_with("only: 192.0.2.0/24)"),
            "{}",
            any.verdict
        );
        assert_eq!(with_sources(x(), Vec::new(), None), x());
    }

    #[rstest]
    #[case::v4_default_tcp("10.96.0.10:80", Some(("10.96.0.10", 80, Protocol::Tcp)))]
    #[case::v4_udp_lowercase("10.96.0.10:53/udp", Some(("10.96.0.10", 53, Protocol::Udp)))]
    #[case::v6_sctp("[fd00::10]:9/SCTP", Some(("fd00::10", 9, Protocol::Sctp)))]
    #[case::v4_mapped_is_v4("[::ffff:10.96.0.10]:80", Some(("10.96.0.10", 80, Protocol::Tcp)))]
    #[case::no_port("10.96.0.10", None)]
    #[case::port_zero("10.96.0.10:0", None)]
    #[case::unknown_protocol("10.96.0.10:80/ICMP", None)]
    #[case::name_not_address("web:80", None)]
    fn targets(#[case] text: &str, #[case] want: Option<(&str, u16, Protocol)>) {
        let got = parse_target(text).ok();
        let want = want.map(|(a, port, proto)| Target {
            addr: a.parse().unwrap(),
            port,
            proto,
        });
        assert_eq!(got, want);
    }

    fn frontend(count: u32, affinity: u32) -> Frontend {
        Frontend {
            id: 1,
            count,
            affinity_timeout_s: affinity,
            flags: 0,
            ext_count: 0,
            ext_local: 0,
        }
    }

    #[rstest]
    #[case::no_frontend(None, 0, None, "not_translated", None)]
    #[case::no_endpoints(Some(frontend(0, 0)), 0, None, "refused", Some("refused_no_backend"))]
    #[case::slot_missing(Some(frontend(3, 0)), 2, None, "refused", Some("err_slot_missing"))]
    #[case::random(Some(frontend(3, 0)), 3, None, "translated", None)]
    #[case::affinity_new(Some(frontend(3, 10800)), 3, None, "translated", None)]
    #[case::affinity_reused(Some(frontend(3, 10800)), 3, Some("10.1.0.1:8080"), "translated", None)]
    fn verdicts(
        #[case] f: Option<Frontend>,
        #[case] slots: u32,
        #[case] sticky: Option<&str>,
        #[case] outcome: &str,
        #[case] counter: Option<&str>,
    ) {
        let verdict = decide(f.as_ref(), slots, sticky);
        let json = serde_json::to_value(&verdict).unwrap();
        assert_eq!(json["outcome"], outcome, "{verdict:?}");
        assert_eq!(json["counter"].as_str(), counter);
        if let Some(sticky) = sticky {
            assert!(json["rule"].as_str().unwrap().contains(sticky));
        }
    }
}
