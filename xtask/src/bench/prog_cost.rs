//! What lb's programs cost per call, from the kernel's own BPF statistics (run time and run
//! count per program). Unlike end-to-end latency this hardly moves with the machine's noise,
//! so it says how much of lb's overhead is the programs themselves. Measured in a pass of its
//! own: the statistics add two clock reads to every program run, which the latency rounds
//! must not pay.

use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;

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
