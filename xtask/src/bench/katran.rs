//! The Katran peer (`../shared/peers/katran/`: Meta's XDP L4 load balancer under
//! `BPF_PROG_TEST_RUN`), run between lb's XDP rounds so both see the same machine. The peer's
//! directory lives outside this repository: `--katran-peer DIR`, or `KATRAN_PEER`; it needs
//! `KATRAN_MIRROR` (a git directory of github.com/facebookincubator/katran) for its build.
//! Without both, Katran is not measured and the report says so.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, ensure};

use super::{measure::Spread, xdp::XdpRow};

/// The peer, built.
pub struct Peer {
    dir: PathBuf,
    build: PathBuf,
    info: String,
}

impl Peer {
    /// Builds Katran with the peer's build.sh (which installs clang/llvm/bpftool if missing);
    /// `None` with the reason when the peer or the mirror is not there.
    pub fn prepare(dir: Option<&Path>) -> anyhow::Result<Result<Self, String>> {
        let Some(dir) = dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("KATRAN_PEER").map(PathBuf::from))
        else {
            return Ok(Err(
                "not measured: no --katran-peer DIR (or KATRAN_PEER) given".into(),
            ));
        };
        if std::env::var_os("KATRAN_MIRROR").is_none() {
            return Ok(Err("not measured: KATRAN_MIRROR unset".into()));
        }
        let build = std::env::temp_dir().join("lb-bench-katran");
        eprintln!(
            "bench: building Katran with {}",
            dir.join("build.sh").display()
        );
        let out = Command::new(dir.join("build.sh"))
            .env("KATRAN_BUILD", &build)
            .output()
            .context("running the Katran peer's build.sh")?;
        ensure!(
            out.status.success(),
            "Katran build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = std::fs::read_to_string(build.join("build-info.txt"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("katran_commit=") || l.starts_with("clang="))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Ok(Self { dir, build, info }))
    }

    pub fn describe(&self) -> String {
        format!("Katran peer {} ({})", self.dir.display(), self.info)
    }

    /// One measure.py invocation of `runs` runs per row, pinned to `cpu`: its results.json.
    pub fn measure(
        &self,
        runs: usize,
        plan: &super::xdp::XdpPlan,
        cpu: usize,
    ) -> anyhow::Result<serde_json::Value> {
        let json = self.build.join("results-lb-bench.json");
        let out = Command::new("python3")
            .arg(self.dir.join("measure.py"))
            .env("KATRAN_BUILD", &self.build)
            .args(["--runs", &runs.to_string()])
            .args(["--repeat", &plan.repeat.to_string()])
            .args(["--syn-repeat", &plan.syn_repeat.to_string()])
            .args(["--single", &plan.single.to_string()])
            .args(["--cpu", &cpu.to_string()])
            // The bench itself is the other benchmark measure.py would wait for.
            .arg("--no-wait")
            .arg("--json")
            .arg(&json)
            .output()
            .context("running the Katran peer's measure.py")?;
        ensure!(
            out.status.success(),
            "Katran measure.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_str(&std::fs::read_to_string(&json)?)?)
    }
}

/// Katran's rows over several measure.py invocations: each row's run values pooled, floors
/// subtracted as the peer does; and the median background CPU of the invocations.
pub fn merge(invocations: &[serde_json::Value]) -> anyhow::Result<(Vec<XdpRow>, Option<f64>)> {
    let mut values: BTreeMap<String, (String, String, Vec<f64>)> = BTreeMap::new();
    for inv in invocations {
        let results = inv["results"]
            .as_object()
            .context("Katran results.json: no results")?;
        for (name, r) in results {
            let entry = values.entry(name.clone()).or_insert_with(|| {
                (
                    r["label"].as_str().unwrap_or_default().to_owned(),
                    r["verdicts"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join("/")
                        })
                        .unwrap_or_default(),
                    Vec::new(),
                )
            });
            if let Some(vs) = r["values"].as_array() {
                entry
                    .2
                    .extend(vs.iter().filter_map(serde_json::Value::as_f64));
            }
        }
    }
    let median = |name: &str| {
        values
            .get(name)
            .and_then(|(_, _, v)| Spread::of(v.clone()))
            .map(|s| s.median)
    };
    let (fs, fd, fh) = (
        median("floor.single"),
        median("floor.direct"),
        median("floor.harness"),
    );
    let mut rows = Vec::new();
    for (name, (what, verdict, vals)) in &values {
        let Some(ns) = Spread::of(vals.clone()) else {
            continue;
        };
        let floor = if name.starts_with("floor.") {
            None
        } else if name.ends_with(".single") {
            fs
        } else if name.ends_with(".steady") {
            fh
        } else {
            fd
        };
        rows.push(XdpRow {
            peer: "katran".into(),
            family: "ipv4".into(),
            name: name.clone(),
            what: what.clone(),
            verdict: verdict.clone(),
            ns,
            net_of_floor: floor.map(|f| ns.median - f),
            counters: BTreeMap::new(),
        });
    }
    let background = Spread::of(
        invocations
            .iter()
            .filter_map(|i| i["meta"]["background_cpu_pct"].as_f64())
            .collect(),
    )
    .map(|s| s.median);
    Ok((rows, background))
}

/// CPU time (clock ticks) all CPUs spent busy, and this process's own.
pub struct Busy {
    all: u64,
    own: u64,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "a small constant")]
    let t = t.max(1) as f64;
    t
}

pub fn cpu_busy() -> anyhow::Result<Busy> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .context("/proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let all = cpu.iter().take(8).sum::<u64>()
        - cpu.get(3).copied().unwrap_or(0)
        - cpu.get(4).copied().unwrap_or(0);
    let own_stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = own_stat.rsplit_once(')').context("/proc/self/stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Counted from the state field (3): utime and stime are fields 14 and 15.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let own = field(11) + field(12);
    Ok(Busy { all, own })
}

/// CPU that processes other than this one used since `before`, % of all CPUs.
pub fn background_pct(before: &Busy, elapsed: Duration) -> anyhow::Result<f64> {
    let now = cpu_busy()?;
    // Every online CPU (not this thread's affinity: the measuring thread is pinned to one).
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "tick counts far below 2^52")]
    let other =
        (now.all.saturating_sub(before.all) as f64) - (now.own.saturating_sub(before.own) as f64);
    #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
    let capacity = elapsed.as_secs_f64() * ticks_per_second() * cpus as f64;
    Ok((other / capacity.max(1e-9) * 100.0).max(0.0))
}
