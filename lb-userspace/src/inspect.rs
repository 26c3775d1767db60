//! `lb list`, `lb stats` and `lb check`: reading what the kernel holds (from the pinned maps,
//! never the agent's memory) and validating manifests.

use std::{collections::BTreeSet, io::Write as _};

use anyhow::Context as _;

use crate::{
    cli::{CheckArgs, InspectArgs, ListArgs},
    desired::{self, ShowAddrPort, ShowFrontend},
    kernel::{
        PinLayout,
        maps::{Fill, Maps},
        names::{Names, ServiceName},
    },
    model::{Node, ObjectKey},
    source::manifests::Manifests,
};

fn open(args: &InspectArgs) -> anyhow::Result<Maps> {
    Maps::open(&PinLayout::new(&args.pin_path)).with_context(|| {
        format!(
            "no lb maps under {} (is lb running with this --pin-path?)",
            args.pin_path.display()
        )
    })
}

#[derive(serde::Serialize)]
struct FrontendJson {
    frontend: String,
    id: u32,
    /// `ClusterIP`, ... (none when the pins hold no names).
    kind: Option<String>,
    /// The Service's traffic policies that are `Local`: `iTP=Local`, `eTP=Local`, or `-`.
    policy: Option<String>,
    /// `namespace/name` of the Service (none when the pins hold no names).
    service: Option<String>,
    port_name: Option<String>,
    affinity_timeout_seconds: u32,
    backends: Vec<String>,
    /// For an external frontend (NodePort, externalIP, LoadBalancer IP), the backends of
    /// traffic from outside the node (the XDP datapath), each `ADDR:PORT (local)` or
    /// `ADDR:PORT (remote)` (reached with SNAT); none for a ClusterIP.
    #[serde(skip_serializing_if = "Option::is_none")]
    external_backends: Option<Vec<String>>,
    /// `loadBalancerSourceRanges` XDP admits new flows from (LoadBalancer IPs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    source_ranges: Vec<String>,
}

/// The external backends of frontend `f` as `lb list` shows them, or `None` for a frontend
/// the XDP datapath does not serve.
fn external_backends(
    state: &crate::kernel::state::KernelState,
    f: &lb_common::maps::Frontend,
) -> Option<Vec<String>> {
    use lb_common::nat::{EXT_SLOT_BASE, FRONTEND_EXTERNAL};
    if f.flags & FRONTEND_EXTERNAL == 0 {
        return None;
    }
    let end = EXT_SLOT_BASE.saturating_add(f.ext_count);
    let local_end = EXT_SLOT_BASE.saturating_add(f.ext_local);
    Some(
        state
            .slots(f.id)
            .filter(|(slot, _)| (EXT_SLOT_BASE..end).contains(slot))
            .map(|(slot, b)| {
                let place = if slot < local_end { "local" } else { "remote" };
                format!("{} ({place})", ShowAddrPort(&b.addr, b.port))
            })
            .collect(),
    )
}

/// The source ranges of frontend `id` as CIDRs.
fn source_ranges(state: &crate::kernel::state::KernelState, id: u32) -> Vec<String> {
    state
        .ranges(id)
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect()
}

/// `NS/NAME`, or `NAME` in the default namespace, as kubectl reads it.
fn parse_service(text: &str) -> anyhow::Result<ObjectKey> {
    let key = match text.split_once('/') {
        Some((ns, name)) => ObjectKey::new(ns, name),
        None => ObjectKey::new("default", text),
    };
    anyhow::ensure!(
        !key.namespace.is_empty() && !key.name.is_empty() && !key.name.contains('/'),
        "--service {text:?}: expected NAMESPACE/NAME"
    );
    Ok(key)
}

/// The frontend names the agent left beside the maps (`LB_NAMES`); an empty map when there
/// are none (pins of an older lb).
fn read_names(
    args: &InspectArgs,
) -> anyhow::Result<Option<std::collections::BTreeMap<u32, ServiceName>>> {
    Ok(Names::open(&PinLayout::new(&args.pin_path))?.map(|n| n.read_all()))
}

/// `lb list`.
pub fn list(args: &ListArgs) -> anyhow::Result<()> {
    let maps = open(&args.inspect)?;
    let state = maps.read_state()?;
    let names = read_names(&args.inspect)?;
    let wanted = args.service.as_deref().map(parse_service).transpose()?;
    if wanted.is_some() && names.is_none() {
        anyhow::bail!(
            "--service: the pins under {} hold no Service names (LB_NAMES; written by lb run since this version)",
            args.inspect.pin_path.display()
        );
    }
    let mut frontends: Vec<_> = state.frontends().iter().collect();
    frontends.sort_by_key(|(key, _)| **key);
    let rows: Vec<FrontendJson> = frontends
        .into_iter()
        .filter_map(|(key, f)| {
            let name = names.as_ref().and_then(|n| n.get(&f.id));
            if let Some(wanted) = &wanted
                && name.is_none_or(|n| &n.service != wanted)
            {
                return None;
            }
            Some(FrontendJson {
                frontend: ShowFrontend(key).to_string(),
                id: f.id,
                kind: name.map(|n| n.kind.to_string()),
                policy: name.map(ServiceName::policy),
                service: name.map(|n| n.service.to_string()),
                port_name: name.map(|n| n.port_name.clone()),
                affinity_timeout_seconds: f.affinity_timeout_s,
                backends: state
                    .slots(f.id)
                    .filter(|(slot, _)| *slot < f.count)
                    .map(|(_, b)| ShowAddrPort(&b.addr, b.port).to_string())
                    .collect(),
                external_backends: external_backends(&state, f),
                source_ranges: source_ranges(&state, f.id),
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if args.inspect.json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<44} {:>6} {:<10} {:<32} {:<19} {:>9}  BACKENDS",
        "FRONTEND", "ID", "KIND", "SERVICE:PORT", "POLICY", "AFFINITY"
    )?;
    for row in rows {
        writeln!(out, "{}", show_row(&row))?;
    }
    Ok(())
}

/// One line of `lb list`.
fn show_row(row: &FrontendJson) -> String {
    let affinity = if row.affinity_timeout_seconds == 0 {
        "-".to_owned()
    } else {
        format!("{}s", row.affinity_timeout_seconds)
    };
    let backends = if row.backends.is_empty() {
        "(none: refused)".to_owned()
    } else {
        row.backends.join(" ")
    };
    let service = match (&row.service, &row.port_name) {
        (Some(s), Some(p)) if !p.is_empty() => format!("{s}:{p}"),
        (Some(s), _) => s.clone(),
        (None, _) => "-".to_owned(),
    };
    // Traffic from outside the node (XDP): its own backends, and the sources it admits.
    let mut external = String::new();
    if let Some(ext) = &row.external_backends {
        external.push_str("  external: ");
        if ext.is_empty() {
            external.push_str("(none)");
        } else {
            external.push_str(&ext.join(" "));
        }
    }
    if !row.source_ranges.is_empty() {
        external.push_str("  sources: ");
        external.push_str(&row.source_ranges.join(" "));
    }
    format!(
        "{:<44} {:>6} {:<10} {:<32} {:<19} {:>9}  {backends}{external}",
        row.frontend,
        row.id,
        row.kind.as_deref().unwrap_or("-"),
        service,
        row.policy.as_deref().unwrap_or("-"),
        affinity
    )
}

/// `lb stats`: the datapath counters, and each map's fill (entries / capacity).
pub fn stats(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = open(args)?;
    let counters = maps.stats()?;
    let fills = maps.fill();
    let mut out = std::io::stdout().lock();
    if args.json {
        let events: serde_json::Map<String, serde_json::Value> = lb_common::stats::NAMES
            .iter()
            .zip(&counters)
            .map(|(n, v)| ((*n).to_owned(), (*v).into()))
            .collect();
        let entries = |name| {
            fills
                .iter()
                .find(|f| f.map == name)
                .map_or(0, |f| f.entries)
        };
        let json = serde_json::json!({
            "events": events,
            "maps": fills,
            "tables": {
                "revnat": entries(lb_common::maps::REVNAT),
                "affinity": entries(lb_common::maps::AFFINITY),
                "udp_flows": entries(lb_common::maps::UDP_FLOWS),
                "udp_socks": entries(lb_common::maps::UDP_SOCKS),
                "tcp_socks": entries(lb_common::maps::TCP_SOCKS),
                "ct": entries(lb_common::nat::CT),
                "ct4": entries(lb_common::nat::CT4),
            },
        });
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
        return Ok(());
    }
    for (name, value) in lb_common::stats::NAMES.iter().zip(&counters) {
        writeln!(out, "{name:<24} {value}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:>10} {:>10} {:>7}",
        "MAP", "ENTRIES", "CAPACITY", "FILL"
    )?;
    for fill in &fills {
        writeln!(out, "{}", show_fill(fill))?;
    }
    Ok(())
}

/// One row of `lb stats`' map table: name, entries, capacity, fill in percent, and a mark
/// past [`crate::metrics::NEARLY_FULL`].
fn show_fill(fill: &Fill) -> String {
    let mark = if fill.ratio() > crate::metrics::NEARLY_FULL {
        "  nearly full"
    } else {
        ""
    };
    format!(
        "{:<16} {:>10} {:>10} {:>6.1}%{mark}",
        fill.map,
        fill.entries,
        fill.capacity,
        fill.ratio() * 100.0
    )
}

/// `lb check`: exit status 1 and one line per problem on stderr when anything is invalid.
pub fn check(args: &CheckArgs) -> anyhow::Result<bool> {
    let mut manifests =
        Manifests::new(args.manifests.clone()).with_node_port_range(args.nodeport_range);
    let (snapshot, errors) = manifests.load();
    let (desired, problems) = desired::build(
        &snapshot,
        &Node::default(),
        args.capacity.capacities().limits(),
    );
    let mut err = std::io::stderr().lock();
    for e in &errors {
        writeln!(err, "error: {e}")?;
    }
    for p in &problems {
        writeln!(err, "error: {}", p.describe(&snapshot))?;
    }
    let services: BTreeSet<_> = desired.frontends.values().map(|f| &f.service).collect();
    println!(
        "{}: {} Services ({} load-balanced), {} frontends, {} backends",
        if errors.is_empty() && problems.is_empty() {
            "ok"
        } else {
            "invalid"
        },
        snapshot.services.len(),
        services.len(),
        desired.frontends.len(),
        desired.backend_count(),
    );
    Ok(errors.is_empty() && problems.is_empty())
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::ns_and_name("shop/web", Some(("shop", "web")))]
    #[case::default_namespace("web", Some(("default", "web")))]
    #[case::empty_namespace("/web", None)]
    #[case::empty_name("shop/", None)]
    #[case::two_slashes("a/b/c", None)]
    fn service_flag(#[case] text: &str, #[case] want: Option<(&str, &str)>) {
        let got = parse_service(text).ok();
        assert_eq!(got, want.map(|(ns, n)| ObjectKey::new(ns, n)));
    }

    fn row(service: Option<(&str, &str)>, affinity: u32, backends: &[&str]) -> FrontendJson {
        FrontendJson {
            frontend: "10.96.0.10:80/TCP".to_owned(),
            id: 7,
            kind: service.map(|_| "ClusterIP".to_owned()),
            policy: service.map(|_| "-".to_owned()),
            service: service.map(|(s, _)| s.to_owned()),
            port_name: service.map(|(_, p)| p.to_owned()),
            affinity_timeout_seconds: affinity,
            backends: backends.iter().map(|b| (*b).to_owned()).collect(),
            external_backends: None,
            source_ranges: Vec::new(),
        }
    }

    /// An external frontend shows its XDP backends, where each is, and its source ranges.
    #[test]
    fn list_row_of_an_external_frontend() {
        let mut r = row(Some(("shop/web", "")), 0, &["10.1.0.1:8080"]);
        r.kind = Some("LoadBalancer IP".to_owned());
        r.external_backends = Some(vec![
            "10.1.0.1:8080 (local)".to_owned(),
            "10.2.0.1:8080 (remote)".to_owned(),
        ]);
        r.source_ranges = vec!["192.0.2.0/24".to_owned()];
        assert!(
            show_row(&r).ends_with(
                "10.1.0.1:8080  external: 10.1.0.1:8080 (local) 10.2.0.1:8080 (remote)  sources: 192.0.2.0/24"
            ),
            "{}",
            show_row(&r)
        );
    }

    #[rstest]
    #[case::named_port(
        row(Some(("shop/web", "http")), 0, &["10.1.0.1:8080", "10.1.0.2:8080"]),
        "10.96.0.10:80/TCP                                 7 ClusterIP  shop/web:http                    -                           -  10.1.0.1:8080 10.1.0.2:8080"
    )]
    #[case::unnamed_port_with_affinity(
        row(Some(("shop/web", "")), 10800, &["10.1.0.1:8080"]),
        "10.96.0.10:80/TCP                                 7 ClusterIP  shop/web                         -                      10800s  10.1.0.1:8080"
    )]
    #[case::no_names_no_backends(
        row(None, 0, &[]),
        "10.96.0.10:80/TCP                                 7 -          -                                -                           -  (none: refused)"
    )]
    fn list_rows(#[case] row: FrontendJson, #[case] want: &str) {
        assert_eq!(show_row(&row), want);
    }

    #[rstest]
    #[case::empty(0, 65536, "LB_FRONTENDS              0      65536    0.0%")]
    #[case::three_quarters(3, 4, "LB_FRONTENDS              3          4   75.0%")]
    #[case::nearly_full(4, 4, "LB_FRONTENDS              4          4  100.0%  nearly full")]
    fn fill_rows(#[case] entries: usize, #[case] capacity: u32, #[case] want: &str) {
        let fill = Fill {
            map: "LB_FRONTENDS",
            entries,
            capacity,
        };
        assert_eq!(show_fill(&fill), want);
    }
}
