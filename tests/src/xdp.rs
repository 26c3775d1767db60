//! Helpers of the north-south tests that more than one test file needs: an agent running in
//! a node's network namespace with `--xdp-iface`, crafted frames, and `BPF_PROG_TEST_RUN` on
//! the programs behind the agent's pinned links.
//!
//! (`tests/tests/north_south.rs` keeps its own copies of some of these; new tests use these.)

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{Netns, Proc, die_with_parent, lb_bin, unique};

/// XDP verdicts (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Runs `f` on a thread of its own inside network namespace `ns` (the test's other threads
/// stay where they are).
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: a valid namespace descriptor; only this thread moves.
        let ret =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// `sysctl -w` each of `settings` in `ns`.
pub fn sysctl(ns: &Netns, settings: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", &ns.name, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    crate::sh(&args);
}

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
        let stats = self.lb(&["stats"]);
        stats
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no counter {name} in:\n{stats}"))
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

/// One `bpf(2)` call on a zeroed attribute buffer with `fields` (byte offset, value, length)
/// set.
fn bpf(cmd: i64, fields: &[(usize, u64, usize)]) -> (i64, [u8; 128]) {
    let mut attr = [0u8; 128];
    for &(off, value, len) in fields {
        attr[off..off + len].copy_from_slice(&value.to_ne_bytes()[..len]);
    }
    // SAFETY: a 128-byte attribute (the kernel zero-fills the rest of union bpf_attr); the
    // pointers in it point at live buffers of the stated sizes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    (ret, attr)
}

const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;

/// The program behind a pinned link, as a descriptor.
fn prog_of_link(path: &Path) -> i32 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let (link, _) = bpf(BPF_OBJ_GET, &[(0, c.as_ptr() as u64, 8)]);
    assert!(
        link >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // struct bpf_link_info: type, id, prog_id, ...
    let mut info = [0u8; 256];
    let (ret, _) = bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &[
            (0, link as u64, 4),
            (4, info.len() as u64, 4),
            (8, info.as_mut_ptr() as u64, 8),
        ],
    );
    assert_eq!(ret, 0, "link info: {}", std::io::Error::last_os_error());
    let prog_id = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    let (prog, _) = bpf(BPF_PROG_GET_FD_BY_ID, &[(0, u64::from(prog_id), 4)]);
    assert!(prog >= 0, "prog fd: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(link as i32) };
    prog as i32
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
    let mut out = vec![0u8; packet.len() + 256];
    let (ret, attr) = bpf(
        BPF_PROG_TEST_RUN,
        &[
            (0, prog.0 as u64, 4),
            (8, packet.len() as u64, 4),
            (12, out.len() as u64, 4),
            (16, packet.as_ptr() as u64, 8),
            (24, out.as_mut_ptr() as u64, 8),
            (32, 1, 4),
        ],
    );
    assert_eq!(ret, 0, "test run: {}", std::io::Error::last_os_error());
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_ne_bytes(attr[12..16].try_into().expect("4 bytes")) as usize;
    let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
    out.truncate(size);
    (retval, out, duration)
}

/// The Internet checksum of the concatenated `chunks` (RFC 1071).
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP SYN (or UDP) frame from `src:sport` to `dst:dport`, every
/// checksum computed in full.
pub fn ipv4_frame(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> Vec<u8> {
    let src: std::net::Ipv4Addr = src.parse().expect("src");
    let dst: std::net::Ipv4Addr = dst.parse().expect("dst");
    let payload = b"hello, lb";
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, proto],
        &(l4.len() as u16).to_be_bytes(),
    ]
    .concat();
    let check_at = if proto == TCP { 16 } else { 6 };
    let c = checksum(&[&pseudo, &l4]);
    l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + l4.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
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
