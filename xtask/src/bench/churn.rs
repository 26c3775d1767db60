//! Socket churn: many new sockets, each used once and closed, and the entry counts of lb's
//! per-socket maps before and after. Unconnected UDP: one datagram each to a Service and its
//! answer; the LRU maps and the `LB_UDP_OWNERS` slots held. TCP: one connection each that
//! needs state (to a backend with a reverse entry, directly); the `LB_TCP_OWNERS` slots held.
//! A socket's state lives in its slot, which its close frees, so the counts should return to
//! where they were (issue 11: no per-socket entry outlives its socket). Reported, not
//! asserted.

use std::net::SocketAddr;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{measure, services::Proto, topology::Topology};
use crate::cmd;

/// The maps a UDP socket's flows could leave entries in (`lb_common::maps::REVNAT`,
/// `UDP_FLOWS`), and the slots of `LB_UDP_SOCKS` held (`UDP_OWNERS`).
pub const UDP_MAPS: &[&str] = &["LB_REVNAT", "LB_UDP_FLOWS", "LB_UDP_OWNERS"];
/// The slots of `LB_TCP_SOCKS` held (`lb_common::maps::TCP_OWNERS`).
pub const TCP_MAPS: &[&str] = &["LB_TCP_OWNERS"];

/// One churn run.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChurnRow {
    pub services: usize,
    /// "udp" or "tcp" (absent in reports before TCP churn: UDP).
    #[serde(default = "udp")]
    pub proto: String,
    /// New sockets opened, used once and closed.
    pub sockets: usize,
    /// `(map, entries before, entries after)`.
    pub entries: Vec<(String, usize, usize)>,
    /// Slots claimed during the churn (`{proto}_socks_claimed`): about one per socket,
    /// so the slots held before and after mean something.
    #[serde(default)]
    pub claimed: u64,
    /// Sockets whose slot another held, their state in socket storage (`{proto}_socks_taken`).
    #[serde(default)]
    pub taken: u64,
    /// Transactions that got no answer.
    pub lost: usize,
    pub seconds: f64,
}

fn udp() -> String {
    "udp".to_owned()
}

/// Entries of pinned map `name` under `pin_path` (of an owners array, `*_OWNERS`: those that
/// are not 0, the slots held).
fn entries(pin_path: &std::path::Path, name: &str) -> anyhow::Result<usize> {
    let path = pin_path.join("maps").join(name);
    let out = cmd::output(
        cmd::command("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(&path),
    )?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("bpftool map dump {name}"))?;
    if !name.ends_with("_OWNERS") {
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

/// `sockets` new `proto` sockets from the client pod to `addr`, with the entry counts of
/// `maps` ([`UDP_MAPS`], [`TCP_MAPS`]) around them.
pub fn run(
    topo: &Topology,
    pin_path: &std::path::Path,
    services: usize,
    (proto, addr): (Proto, SocketAddr),
    sockets: usize,
    maps: &[&str],
) -> anyhow::Result<ChurnRow> {
    let before: Vec<usize> = maps
        .iter()
        .map(|m| entries(pin_path, m))
        .collect::<anyhow::Result<_>>()?;
    // This protocol's slot counters (claimed, taken), one read of LB_STATS.
    let slot_counters = || -> anyhow::Result<(u64, u64)> {
        let counters = super::xdp::lb_counters(pin_path)?;
        let get = |what: &str| {
            let name = format!("{}_socks_{what}", proto.lower());
            counters.get(&name).copied().unwrap_or(0)
        };
        Ok((get("claimed"), get("taken")))
    };
    let counted = slot_counters()?;
    let started = std::time::Instant::now();
    let report = measure::rr(topo, proto, addr, sockets)?;
    let seconds = started.elapsed().as_secs_f64();
    let now = slot_counters()?;
    let (claimed, taken) = (
        now.0.saturating_sub(counted.0),
        now.1.saturating_sub(counted.1),
    );
    let mut rows = Vec::new();
    for (map, before) in maps.iter().zip(before) {
        rows.push(((*map).to_owned(), before, entries(pin_path, map)?));
    }
    Ok(ChurnRow {
        services,
        proto: proto.lower().into(),
        sockets,
        entries: rows,
        claimed,
        taken,
        lost: report.errors,
        seconds,
    })
}
