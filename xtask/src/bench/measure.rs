//! One measurement each: request/response latency from the client pod, iperf3 throughput,
//! and what the lb agent reports about itself.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{services::Proto, topology::Topology};

/// lb-testpod's latency summary (nanoseconds).
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
}

/// lb-testpod's report of one request/response run.
#[derive(Clone, Debug, Deserialize)]
pub struct Rr {
    pub connect_ns: Option<Latency>,
    pub transaction_ns: Option<Latency>,
    pub per_second: f64,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// `count` request/responses from the client pod (in its cgroup) to `addr`.
pub fn rr(topo: &Topology, proto: Proto, addr: SocketAddr, count: usize) -> anyhow::Result<Rr> {
    rr_with(topo, proto, &[addr], count, true, false)
}

/// [`rr`] over several addresses: the i-th transaction to the (i mod n)-th (`addrs` is not
/// empty; a direct client spreading over the pods as a Service does).
pub fn rr_spread(
    topo: &Topology,
    proto: Proto,
    addrs: &[SocketAddr],
    count: usize,
) -> anyhow::Result<Rr> {
    rr_with(topo, proto, addrs, count, true, false)
}

/// [`rr`] whose TCP client also calls getpeername() once per connection (for the
/// program-cost pass; its latency figures include that call).
pub fn rr_getpeername(
    topo: &Topology,
    proto: Proto,
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<Rr> {
    rr_with(topo, proto, &[addr], count, true, proto == Proto::Tcp)
}

/// [`rr`] from the client's namespace outside lb's cgroup: a client outside the cluster.
pub fn rr_outside(
    topo: &Topology,
    proto: Proto,
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<Rr> {
    rr_with(topo, proto, &[addr], count, false, false)
}

fn rr_with(
    topo: &Topology,
    proto: Proto,
    addrs: &[SocketAddr],
    count: usize,
    in_cgroup: bool,
    getpeername: bool,
) -> anyhow::Result<Rr> {
    let sub = match proto {
        Proto::Tcp => "rr-tcp",
        Proto::Udp => "rr-udp",
    };
    let bin = crate::cmd::testpod_bin();
    let (&addr, more) = addrs.split_first().context("no address")?;
    let mut args = vec![
        sub.to_owned(),
        addr.to_string(),
        "--count".into(),
        count.to_string(),
    ];
    for other in more {
        args.extend(["--spread".into(), other.to_string()]);
    }
    if getpeername {
        args.push("--getpeername".into());
    }
    if proto == Proto::Udp {
        // A lost datagram costs this much of the run's wall time.
        args.extend(["--timeout-ms".into(), "200".into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = bin.to_str().context("utf-8 path")?;
    let out = if in_cgroup {
        topo.in_client(bin, &args)?
    } else {
        topo.in_client_outside(bin, &args)?
    };
    let report: Rr =
        serde_json::from_str(out.trim()).with_context(|| format!("parsing {out:?}"))?;
    // Lost datagrams are counted and reported (the NAT peers lose some under load); more
    // than 10% means the path is broken.
    if report.errors * 10 > count {
        bail!(
            "{sub} {addr}: {} of {count} failed, first: {:?}",
            report.errors,
            report.first_error
        );
    }
    Ok(report)
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        let median = if values.len().is_multiple_of(2) {
            f64::midpoint(values[mid - 1], values[mid])
        } else {
            values[mid]
        };
        Some(Self {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }
}

/// iperf3 from the client pod to `addr` for `seconds`: received Gbit/s.
pub fn iperf(topo: &Topology, addr: SocketAddr, seconds: u64) -> anyhow::Result<f64> {
    let out = topo.in_client(
        "iperf3",
        &[
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received")?;
    Ok(bps / 1e9)
}

/// Prometheus text: `name` (with labels, exactly as written) -> value.
pub fn metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Kernel memory of the BPF maps a process holds, in MiB (sum of `memlock` over its map
/// descriptors, each map once).
pub fn bpf_map_mib(pid: u32) -> Option<f64> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && let Ok(bytes) = memlock.parse::<f64>()
        {
            seen.insert(id.to_owned(), bytes);
        }
    }
    (!seen.is_empty()).then(|| seen.values().sum::<f64>() / (1024.0 * 1024.0))
}

/// Writes `text` to `dir/name` atomically (write + rename), as a deploy tool would.
pub fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Polls `/metrics` until `lb_syncs_total{result="ok"}` exceeds `after`; returns the new
/// metrics and how long it took.
pub fn wait_for_sync(
    agent: &lb_tests::Agent,
    after: f64,
    within: Duration,
) -> anyhow::Result<(BTreeMap<String, f64>, Duration)> {
    let started = std::time::Instant::now();
    loop {
        let m = metrics(&agent.metrics_text());
        if m.get(SYNCS_OK).copied().unwrap_or(0.0) > after {
            return Ok((m, started.elapsed()));
        }
        if started.elapsed() > within {
            bail!("lb did not sync within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub const SYNCS_OK: &str = "lb_syncs_total{result=\"ok\"}";
pub const SYNC_SECONDS_SUM: &str = "lb_sync_duration_seconds_sum";
pub const SYNC_SECONDS_COUNT: &str = "lb_sync_duration_seconds_count";
pub const LOAD_SECONDS: &str = "lb_manifest_load_seconds";
