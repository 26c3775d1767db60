//! What lb's programs cost per call, from the kernel's own BPF statistics
//! (`kernel.bpf_stats_enabled`: run time and run count per program). Unlike end-to-end
//! latency this hardly moves with the machine's noise, so it says how much of lb's overhead
//! is the programs themselves. Measured in a pass of its own: the statistics add two clock
//! reads to every program run, which the latency rounds must not pay.

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::cmd;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the statistics on while it lives, then back to what they were.
pub struct Enabled {
    previous: String,
}

impl Enabled {
    pub fn new() -> anyhow::Result<Self> {
        let previous =
            std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::write(SYSCTL, "1").with_context(|| format!("writing 1 to {SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for Enabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.previous) {
            eprintln!("bench: restoring {SYSCTL} to {}: {e}", self.previous);
        }
    }
}

/// Run time (ns) and run count of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// lb's programs (named `lb_*`) now, summed by name.
pub fn read() -> anyhow::Result<BTreeMap<String, Counters>> {
    let out = cmd::output(cmd::command("bpftool").args(["--json", "prog", "show"]))?;
    parse(&out)
}

fn parse(json: &str) -> anyhow::Result<BTreeMap<String, Counters>> {
    let progs: Vec<serde_json::Value> =
        serde_json::from_str(json).context("parsing `bpftool --json prog show`")?;
    let mut by_name: BTreeMap<String, Counters> = BTreeMap::new();
    for prog in &progs {
        let Some(name) = prog["name"].as_str().filter(|n| n.starts_with("lb_")) else {
            continue;
        };
        let c = by_name.entry(name.to_owned()).or_default();
        c.run_time_ns += prog["run_time_ns"].as_u64().unwrap_or(0);
        c.run_cnt += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(by_name)
}

/// What each program did between two readings: `(name, ns per call, calls)` for those
/// that ran.
pub fn delta(
    before: &BTreeMap<String, Counters>,
    after: &BTreeMap<String, Counters>,
) -> Vec<(String, f64, u64)> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            let calls = a.run_cnt.checked_sub(b.run_cnt)?;
            let ns = a.run_time_ns.checked_sub(b.run_time_ns)?;
            #[expect(clippy::cast_precision_loss, reason = "nanosecond sums")]
            (calls > 0).then(|| (name.clone(), ns as f64 / calls as f64, calls))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_lb_programs_by_name_and_takes_deltas() {
        let before = parse(
            r#"[{"id":1,"name":"lb_connect4","run_time_ns":1000,"run_cnt":2},
                {"id":2,"name":"other","run_time_ns":5,"run_cnt":1},
                {"id":3,"name":"lb_recvmsg4"}]"#,
        )
        .unwrap();
        assert_eq!(before.len(), 2);
        let after = parse(
            r#"[{"id":1,"name":"lb_connect4","run_time_ns":5000,"run_cnt":6},
                {"id":3,"name":"lb_recvmsg4"}]"#,
        )
        .unwrap();
        assert_eq!(
            delta(&before, &after),
            vec![("lb_connect4".to_owned(), 1000.0, 4)]
        );
    }
}
