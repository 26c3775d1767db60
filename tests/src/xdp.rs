//! Helpers of the north-south tests that more than one test file needs: an agent running in
//! a node's network namespace with `--xdp-iface`, crafted frames, and `BPF_PROG_TEST_RUN` on
//! the programs behind the agent's pinned links.
//!
//! The `bpf(2)` layer, the frames and the namespace helpers are `crate::north_south`'s,
//! re-exported here.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{Netns, Proc, die_with_parent, lb_bin, unique};

use crate::north_south::{Pkt, counter_in, prog_of_link, test_run_timed as run_timed};
pub use crate::north_south::{TCP, UDP, XDP_DROP, XDP_PASS, XDP_REDIRECT, in_netns, sysctl};

/// `lb run` inside a node's network namespace (as a hostNetwork DaemonSet pod would be),
/// with its own pin path; stopped and cleaned up (`lb cleanup`) on drop.
pub struct NsAgent {
    pub pin_path: PathBuf,
    netns: PathBuf,
    child: Option<Proc>,
    pub log: PathBuf,
}

impl NsAgent {
    /// Starts `lb run --manifests MANIFESTS --cgroup CGROUP` in `netns` with `extra` flags
    /// (`--node-name`, `--xdp-iface`, ...).
    pub fn start(netns: &Netns, cgroup: &Path, manifests: &Path, extra: &[&str]) -> Self {
        let pin_path = PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
        let log = std::env::temp_dir().join(format!("{}.log", unique("lb-agent")));
        let log_file = std::fs::File::create(&log).expect("log");
        let child = die_with_parent(&mut Command::new("nsenter"))
            .arg(format!("--net={}", netns.path().display()))
            .arg(lb_bin())
            .arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--pin-path")
            .arg(&pin_path)
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn lb run");
        Self {
            pin_path,
            netns: netns.path(),
            child: Some(Proc(child)),
            log,
        }
    }

    /// `lb ARGS... --pin-path PIN`, its standard output.
    pub fn lb(&self, args: &[&str]) -> String {
        let out = Command::new(lb_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run lb");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `lb list` shows every one of `frontends`, each with `backends` backends
    /// (a substring of its line, e.g. "10.201.0.11:8080").
    pub fn wait_for(&self, frontends: &[&str], backends: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = self.lb(&["list"]);
            if frontends.iter().all(|f| list.contains(f))
                && backends.iter().all(|b| list.contains(b))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "frontends {frontends:?} with {backends:?} not programmed: {list}\nagent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A datapath counter from `lb stats`.
    pub fn stat(&self, name: &str) -> u64 {
        counter_in(&self.lb(&["stats"]), name)
    }

    /// A descriptor of the program behind the pinned link `links/NAME` (`xdp@IF`, `tc@IF`).
    pub fn prog(&self, link: &str) -> ProgFd {
        ProgFd(prog_of_link(&self.pin_path.join("links").join(link)))
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        drop(self.child.take());
        let _cleaned = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(lb_bin())
            .args(["cleanup", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        let _gone = std::fs::remove_file(&self.log);
    }
}

/// A program descriptor, closed on drop.
pub struct ProgFd(pub i32);

impl Drop for ProgFd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Runs `packet` once through program `prog` (one fresh packet per call: `repeat` does not
/// restore it); returns the verdict and the packet after. FIB lookups see the namespace of
/// the calling thread (see [`in_netns`]).
pub fn test_run(prog: &ProgFd, packet: &[u8]) -> (u32, Vec<u8>) {
    let (verdict, out, _) = test_run_timed(prog, packet);
    (verdict, out)
}

/// [`test_run`], also returning the kernel's measured run time of the program (ns; one run,
/// so timer granularity included: average many).
pub fn test_run_timed(prog: &ProgFd, packet: &[u8]) -> (u32, Vec<u8>, u32) {
    run_timed(prog.0, packet)
}

/// An Ethernet + IPv4 + TCP SYN (or UDP) frame from `src:sport` to `dst:dport`, every
/// checksum computed in full.
pub fn ipv4_frame(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> Vec<u8> {
    Pkt::new(src, dst, proto, sport, dport).bytes()
}

/// The destination address and port of an Ethernet + IPv4 frame, as "ADDR:PORT".
pub fn ipv4_destination(frame: &[u8]) -> String {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let port = u16::from_be_bytes([frame[14 + ihl + 2], frame[14 + ihl + 3]]);
    format!(
        "{}.{}.{}.{}:{port}",
        frame[30], frame[31], frame[32], frame[33]
    )
}
