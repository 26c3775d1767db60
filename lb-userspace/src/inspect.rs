//! `lb list`, `lb stats` and `lb check`: reading what the kernel holds (from the pinned maps,
//! never the agent's memory) and validating manifests.

use std::{collections::BTreeSet, io::Write as _};

use anyhow::Context as _;

use crate::{
    cli::{CheckArgs, InspectArgs},
    desired::{self, ShowAddrPort, ShowFrontend},
    kernel::{PinLayout, maps::Maps},
    model::Node,
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
    affinity_timeout_seconds: u32,
    backends: Vec<String>,
}

/// `lb list`.
pub fn list(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = open(args)?;
    let state = maps.read_state()?;
    let mut frontends: Vec<_> = state.frontends().iter().collect();
    frontends.sort_by_key(|(key, _)| **key);
    let rows: Vec<FrontendJson> = frontends
        .into_iter()
        .map(|(key, f)| FrontendJson {
            frontend: ShowFrontend(key).to_string(),
            id: f.id,
            affinity_timeout_seconds: f.affinity_timeout_s,
            backends: state
                .slots(f.id)
                .filter(|(slot, _)| *slot < f.count)
                .map(|(_, b)| ShowAddrPort(&b.addr, b.port).to_string())
                .collect(),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<44} {:>6} {:>9}  BACKENDS",
        "FRONTEND", "ID", "AFFINITY"
    )?;
    for row in rows {
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
        writeln!(
            out,
            "{:<44} {:>6} {:>9}  {backends}",
            row.frontend, row.id, affinity
        )?;
    }
    Ok(())
}

/// `lb stats`.
pub fn stats(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = open(args)?;
    let counters = maps.stats()?;
    let sizes = maps.conn_table_sizes();
    let mut out = std::io::stdout().lock();
    if args.json {
        let events: serde_json::Map<String, serde_json::Value> = lb_common::stats::NAMES
            .iter()
            .zip(&counters)
            .map(|(n, v)| ((*n).to_owned(), (*v).into()))
            .collect();
        let json = serde_json::json!({
            "events": events,
            "tables": { "revnat": sizes.revnat, "affinity": sizes.affinity, "udp_flows": sizes.udp_flows },
        });
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
        return Ok(());
    }
    for (name, value) in lb_common::stats::NAMES.iter().zip(&counters) {
        writeln!(out, "{name:<24} {value}")?;
    }
    writeln!(out, "{:<24} {}", "table_revnat", sizes.revnat)?;
    writeln!(out, "{:<24} {}", "table_affinity", sizes.affinity)?;
    writeln!(out, "{:<24} {}", "table_udp_flows", sizes.udp_flows)?;
    Ok(())
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
