//! Unconnected-UDP socket churn: many new sockets, one datagram each to a Service and its
//! answer, and the entry counts of lb's per-socket maps before and after: the LRU maps, and
//! the `LB_UDP_OWNERS` slots held (a socket's state lives in its slot, which its close frees).
//! The counts should return to where they were (issue 11: no per-socket entry outlives its
//! socket). Reported, not asserted.

use std::net::SocketAddr;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{measure, services::Proto, topology::Topology};
use crate::cmd;

/// The maps a socket's flows could leave entries in (`lb_common::maps::REVNAT`, `UDP_FLOWS`).
/// And the slots of `LB_UDP_SOCKS` held ([`OWNERS`]).
const MAPS: [&str; 3] = ["LB_REVNAT", "LB_UDP_FLOWS", OWNERS];

/// One churn run.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChurnRow {
    pub services: usize,
    /// New sockets opened, used once and closed.
    pub sockets: usize,
    /// `(map, entries before, entries after)`.
    pub entries: Vec<(String, usize, usize)>,
    /// Transactions that got no answer.
    pub lost: usize,
    pub seconds: f64,
}

/// The array whose entries that are not 0 count (the slots held).
const OWNERS: &str = "LB_UDP_OWNERS";

/// Entries of pinned map `name` under `pin_path` (of an array: those that are not 0).
fn entries(pin_path: &std::path::Path, name: &str) -> anyhow::Result<usize> {
    let path = pin_path.join("maps").join(name);
    let out = cmd::output(
        cmd::command("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(&path),
    )?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("bpftool map dump {name}"))?;
    if name != OWNERS {
        return Ok(list.len());
    }
    Ok(list
        .iter()
        .filter(|e| {
            e["value"]
                .as_array()
                .is_some_and(|bytes| bytes.iter().any(|b| b != "0x00"))
        })
        .count())
}

/// `sockets` new UDP sockets from the client pod to `addr`, with entry counts around them.
pub fn run(
    topo: &Topology,
    pin_path: &std::path::Path,
    services: usize,
    addr: SocketAddr,
    sockets: usize,
) -> anyhow::Result<ChurnRow> {
    let before: Vec<usize> = MAPS
        .iter()
        .map(|m| entries(pin_path, m))
        .collect::<anyhow::Result<_>>()?;
    let started = std::time::Instant::now();
    let report = measure::rr(topo, Proto::Udp, addr, sockets)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (map, before) in MAPS.iter().zip(before) {
        rows.push(((*map).to_owned(), before, entries(pin_path, map)?));
    }
    Ok(ChurnRow {
        services,
        sockets,
        entries: rows,
        lost: report.errors,
        seconds,
    })
}
