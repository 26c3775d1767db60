//! `lb list`, `lb stats` and `lb check`: reading what the kernel holds (from the pinned maps,
//! never the agent's memory) and validating manifests.

use std::{collections::BTreeSet, io::Write as _};

use anyhow::Context as _;

use crate::{
    cli::{CheckArgs, InspectArgs},
    desired::{self, ShowAddrPort, ShowFrontend},
    kernel::{
        PinLayout,
        maps::{Fill, Maps},
    },
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
    let mut manifests = Manifests::new(args.manifests.clone());
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
