//! What lb's programs cost per call, from the kernel's own BPF statistics (run time and run
//! count per program). Unlike end-to-end latency this hardly moves with the machine's noise,
//! so it says how much of lb's overhead is the programs themselves. Measured in a pass of its
//! own: the statistics add two clock reads to every program run, which the latency rounds
//! must not pay.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// `enum bpf_cmd`'s `BPF_ENABLE_STATS`.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `enum bpf_stats_type`'s `BPF_STATS_RUN_TIME`.
const BPF_STATS_RUN_TIME: u32 = 0;

/// The statistics, on while this lives. `BPF_ENABLE_STATS` keeps them on until its file
/// descriptor is closed, so they go off with the bench however it ends, and the
/// `kernel.bpf_stats_enabled` sysctl is left alone.
pub struct Enabled {
    _fd: OwnedFd,
}

impl Enabled {
    pub fn new() -> anyhow::Result<Self> {
        /// `union bpf_attr`'s `enable_stats` member.
        #[repr(C)]
        struct EnableStats {
            kind: u32,
        }
        let attr = EnableStats {
            kind: BPF_STATS_RUN_TIME,
        };
        // SAFETY: the attribute is a valid `enable_stats` of the size passed; the kernel
        // reads it and returns a new file descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &raw const attr,
                size_of::<EnableStats>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
        }
        let fd = i32::try_from(fd).context("bpf(BPF_ENABLE_STATS) returned no descriptor")?;
        // SAFETY: a descriptor the kernel just returned to us, owned by nothing else.
        Ok(Self {
            _fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

/// Run time (ns) and run count of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The ids of the programs of one agent: those in the links pinned under `pin_path/links`
/// (its cgroup hooks, XDP and tc), read with bpftool. Another lb on the machine (a test, a
/// second bench) runs programs of the same names, which must not count.
pub fn agent_programs(pin_path: &Path) -> anyhow::Result<BTreeSet<u64>> {
    let dir = pin_path.join("links");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let out = cmd::output(
            cmd::command("bpftool")
                .args(["--json", "link", "show", "pinned"])
                .arg(&path),
        )?;
        ids.insert(link_program(&out).with_context(|| format!("link {}", path.display()))?);
    }
    if ids.is_empty() {
        bail!("no pinned links under {}", dir.display());
    }
    Ok(ids)
}

/// The program id of `bpftool --json link show` output for one link.
fn link_program(json: &str) -> anyhow::Result<u64> {
    let link: serde_json::Value =
        serde_json::from_str(json).context("parsing `bpftool --json link show`")?;
    link["prog_id"].as_u64().context("no prog_id")
}

/// The programs `ids` (an agent's, [`agent_programs`]) now, summed by name.
pub fn read(ids: &BTreeSet<u64>) -> anyhow::Result<BTreeMap<String, Counters>> {
    let out = cmd::output(cmd::command("bpftool").args(["--json", "prog", "show"]))?;
    parse(&out, ids)
}

fn parse(json: &str, ids: &BTreeSet<u64>) -> anyhow::Result<BTreeMap<String, Counters>> {
    let progs: Vec<serde_json::Value> =
        serde_json::from_str(json).context("parsing `bpftool --json prog show`")?;
    let mut by_name: BTreeMap<String, Counters> = BTreeMap::new();
    for prog in &progs {
        if !prog["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            continue;
        }
        let Some(name) = prog["name"].as_str() else {
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
    fn sums_the_agents_programs_by_name_and_takes_deltas() {
        // Programs 1 and 3 are the agent's; 4 is another agent's lb_connect4.
        let ids = BTreeSet::from([1, 3]);
        let before = parse(
            r#"[{"id":1,"name":"lb_connect4","run_time_ns":1000,"run_cnt":2},
                {"id":2,"name":"other","run_time_ns":5,"run_cnt":1},
                {"id":3,"name":"lb_recvmsg4"},
                {"id":4,"name":"lb_connect4","run_time_ns":7000,"run_cnt":7}]"#,
            &ids,
        )
        .unwrap();
        assert_eq!(before.len(), 2);
        let after = parse(
            r#"[{"id":1,"name":"lb_connect4","run_time_ns":5000,"run_cnt":6},
                {"id":3,"name":"lb_recvmsg4"},
                {"id":4,"name":"lb_connect4","run_time_ns":99000,"run_cnt":8}]"#,
            &ids,
        )
        .unwrap();
        assert_eq!(
            delta(&before, &after),
            vec![("lb_connect4".to_owned(), 1000.0, 4)]
        );
    }

    #[test]
    fn a_links_program() {
        let json = r#"{"id":7,"type":"cgroup","prog_id":42,"cgroup_id":1,"attach_type":"cgroup_inet4_connect"}"#;
        assert_eq!(link_program(json).unwrap(), 42);
        assert!(link_program(r#"{"id":7}"#).is_err());
    }
}
