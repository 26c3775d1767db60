//! lb's XDP (and tc) programs, cost per packet under `BPF_PROG_TEST_RUN`, measured the way
//! the Katran peer (`../shared/peers/katran/README.md`) measures Katran, on the same frames:
//!
//! - `single`: repeat=1 per call with a fresh frame; the median of the kernel-reported
//!   durations (Katran's own perf tester's method).
//! - `steady`: the bench's harness program (below) restores the frame before every
//!   iteration (and for new-flow rows stamps a new flow number into it), then tail-calls lb's
//!   program; repeat=R, the kernel's average; the harness's own floor (`floor.harness`,
//!   harness -> empty program) is measured in the same run and subtracted.
//! - `direct`: plain repeat=R, valid only where the program leaves the packet as it was: the
//!   miss. (Test-run without live frames never resets the packet between iterations, so a
//!   rewritten packet would measure the miss path from iteration 2 on.)
//!
//! Every row is checked before it counts: the verdict, the output bytes (the DNAT'd packet's
//! addresses, ports and checksums), and lb's own counters (`lb stats`) per iteration.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use super::{bpf, measure::Spread};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Katran's frames (measure.py `frame()`): destination MAC (the load balancer's NIC) and
/// source MAC (the upstream router).
const MAC_LB: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_ROUTER: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The frontend whose only endpoint is on another node: SNAT (IPv4 only).
pub const VIP4_SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Base of the single-shot new-flow sweep (kept apart from the fixed flows), as Katran's.
const CLIENT4_SINGLE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// RFC 5180's benchmarking range.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const CLIENT6_SINGLE: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
const MISS4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const MISS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x99);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// Source-address low 16 bits of the harness's new flows (measure.py `VARY_SRC_LO`).
const VARY_SRC_LO: u16 = 0x8000;
/// Single-shot SNAT new flows per run (each holds one of about 4500 SNAT ports for good).
const SNAT_CALLS: usize = 200;
/// The harness's return codes when it fails (+ the step: tail call, frame lookup, length,
/// adjust_head, store_bytes, bounds).
const HARNESS_FAILED: i32 = 100;
/// The harness's frame buffer.
const MAX_FRAME: usize = 256;
/// Where the harness's map value keeps the frame (after len, vary, n, src_lo).
const FRAME_DATA: usize = 16;

/// How big and how long.
pub struct XdpPlan {
    pub runs: usize,
    pub single: usize,
    pub repeat: u32,
    pub syn_repeat: u32,
}

impl XdpPlan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                runs: 2,
                single: 500,
                repeat: 100_000,
                syn_repeat: 20_000,
            }
        } else {
            // As the Katran peer's defaults.
            Self {
                runs: 9,
                single: 5000,
                repeat: 1_000_000,
                syn_repeat: 100_000,
            }
        }
    }
}

/// One row: lb's or Katran's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct XdpRow {
    /// "lb" or "katran".
    pub peer: String,
    /// "ipv4" or "ipv6".
    pub family: String,
    /// As the Katran peer names them: `a.syn_new.single`, `b.est.steady`, `c.miss.direct`...
    pub name: String,
    pub what: String,
    pub verdict: String,
    /// Nanoseconds per packet: median and spread over the runs.
    pub ns: Spread,
    /// Minus the floor of its kind measured in the same run (`single`: floor.single,
    /// `steady`: floor.harness, `direct`: floor.direct).
    pub net_of_floor: Option<f64>,
    /// lb's counters per iteration in the last run (name -> delta / iterations).
    #[serde(default)]
    pub counters: BTreeMap<String, f64>,
}

/// The XDP section of the results.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct XdpResults {
    pub rows: Vec<XdpRow>,
    /// The verdict checks, one line each (frame in, verdict, frame out).
    pub checks: Vec<String>,
    pub pinned_cpu: usize,
    /// CPU that other processes used while lb's rows were measured, % of all CPUs.
    pub background_cpu_pct: f64,
    /// Katran: measured, or why not.
    pub katran: String,
    pub katran_background_cpu_pct: Option<f64>,
    pub runs: usize,
    pub single: usize,
    pub repeat: u32,
    pub syn_repeat: u32,
    /// lb's connection-tracking capacity (entries; one per flow to a local backend).
    pub ct_capacity: u32,
    /// Conntrack entries the rows created (two per new flow), all on the pinned CPU: below
    /// `ct_capacity / cpus`, the per-CPU LRU never evicts during the run.
    #[serde(default)]
    pub ct_entries_made: u64,
}

/// `lb run --max-ct-entries` for the bench: 8 Mi entries in each of `LB_CT4` (IPv4 flows) and
/// `LB_CT` (IPv6), 4 Mi per CPU list on this 2-CPU machine: the per-CPU share of Katran's flow
/// table (`--lru-size 8000000` split over the CPUs, one LRU map of 4 M entries per CPU;
/// lb's hash table, which the CPUs share, has twice the buckets of one of Katran's). A full
/// bench creates about 3.8 Mi entries on its
/// CPU, over both maps, so nothing is evicted.
pub const BENCH_CT_ENTRIES: u32 = 1 << 23;

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// measure.py's `frame()`, and its IPv6 counterpart: Ethernet + IPv4 (DF, TTL 64) or IPv6
/// (hop limit 64) + TCP (no options: seq 1000, ack 0 for a SYN else 2000, window 64240) or
/// UDP (32 B payload, as measure.py's UDP frames); all checksums valid.
pub fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&1000u32.to_be_bytes());
        let ack: u32 = if flags & TCP_SYN != 0 { 0 } else { 2000 };
        l4.extend_from_slice(&ack.to_be_bytes());
        l4.extend_from_slice(&[5 << 4, flags]);
        l4.extend_from_slice(&64240u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&(8u16 + 32).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&[0x12, 0x34]);
        l4.extend_from_slice(&[0; 30]);
    }
    let (s, d) = (octets(src), octets(dst));
    let l4_len = u16::try_from(l4.len()).unwrap_or(0);
    let v6 = s.len() == 16;
    let pseudo = if v6 {
        [
            &s[..],
            &d[..],
            &u32::from(l4_len).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat()
    } else {
        [&s[..], &d[..], &[0, proto], &l4_len.to_be_bytes()].concat()
    };
    let mut c = csum(&[&pseudo[..], &l4[..]].concat());
    if c == 0 && proto == UDP {
        c = 0xffff;
    }
    let at = if proto == TCP { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = [&MAC_LB[..], &MAC_ROUTER[..]].concat();
    if v6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&l4_len.to_be_bytes());
        f.extend_from_slice(&[proto, 64]);
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(20 + l4_len).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        ip.extend_from_slice(&s);
        ip.extend_from_slice(&d);
        let c = csum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        return f;
    }
    f.extend_from_slice(&s);
    f.extend_from_slice(&d);
    f.extend_from_slice(&l4);
    f
}

/// Offsets of the L4 source port and of the source address's low 16 bits.
fn flow_offsets(v6: bool) -> (usize, usize) {
    if v6 { (54, 36) } else { (34, 28) }
}

/// measure.py's `with_flow`: flow number `n` stamped into `f` (sport 32768 + n % 32768, the
/// source's low 16 bits + n / 32768); checksums left stale, as the harness leaves them.
fn with_flow(f: &[u8], n: u32, v6: bool) -> Vec<u8> {
    let mut b = f.to_vec();
    let (sport_at, src_at) = flow_offsets(v6);
    let lo = u16::from_be_bytes([b[src_at], b[src_at + 1]]);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "n % 32768 and n / 32768 fit"
    )]
    let (sport, hi) = ((0x8000 | (n & 0x7fff)) as u16, (n >> 15) as u16);
    b[sport_at..sport_at + 2].copy_from_slice(&sport.to_be_bytes());
    b[src_at..src_at + 2].copy_from_slice(&lo.wrapping_add(hi).to_be_bytes());
    b
}

/// The harness: restores the frame kept in `frame` (adjust_head back to its length,
/// xdp_store_bytes), in vary mode stamps flow number n (1: IPv4 offsets, 2: IPv6), and
/// tail-calls slot 0 of `target`. Written here as BPF instructions so that the bench needs
/// no C compiler (CI installs only what `cargo xtask setup` does); the same steps as the
/// Katran peer's harness.bpf.c.
fn harness_insns(frame: &OwnedFd, target: &OwnedFd) -> anyhow::Result<Vec<[u8; 8]>> {
    const MOV_K: u8 = 0xb7;
    const MOV_X: u8 = 0xbf;
    const ADD_K: u8 = 0x07;
    const SUB_X: u8 = 0x1f;
    const AND_K: u8 = 0x57;
    const OR_K: u8 = 0x47;
    const RSH_K: u8 = 0x77;
    const ADD_X: u8 = 0x0f;
    const LDX_W: u8 = 0x61;
    const STX_W: u8 = 0x63;
    const STX_H: u8 = 0x6b;
    const JEQ_K: u8 = 0x15;
    const JNE_K: u8 = 0x55;
    const JGT_K: u8 = 0x25;
    const JLT_K: u8 = 0xa5;
    const JGT_X: u8 = 0x2d;
    const JA: u8 = 0x05;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const BE: u8 = 0xdc;
    const MAP_LOOKUP: i32 = 1;
    const TAIL_CALL: i32 = 12;
    const ADJUST_HEAD: i32 = 44;
    const GET_BUFF_LEN: i32 = 188;
    const STORE_BYTES: i32 = 190;
    let data = i32::try_from(FRAME_DATA)?;
    let mut a = bpf::Asm::default();
    a.raw(MOV_X, 6, 1, 0, 0)
        .raw(MOV_K, 1, 0, 0, 0)
        .raw(STX_W, 10, 1, -4, 0)
        .raw(MOV_X, 2, 10, 0, 0)
        .raw(ADD_K, 2, 0, 0, -4)
        .map_fd(1, frame)
        .raw(CALL, 0, 0, 0, MAP_LOOKUP)
        .jump(JEQ_K, 0, 0, 0, "no_frame")
        .raw(MOV_X, 7, 0, 0, 0)
        .raw(LDX_W, 8, 7, 0, 0)
        .jump(JLT_K, 8, 0, 42, "bad_len")
        .jump(JGT_K, 8, 0, i32::try_from(MAX_FRAME)?, "bad_len")
        .raw(MOV_X, 1, 6, 0, 0)
        .raw(CALL, 0, 0, 0, GET_BUFF_LEN)
        .raw(SUB_X, 0, 8, 0, 0)
        .jump(JEQ_K, 0, 0, 0, "store")
        .raw(MOV_X, 1, 6, 0, 0)
        .raw(MOV_X, 2, 0, 0, 0)
        .raw(CALL, 0, 0, 0, ADJUST_HEAD)
        .jump(JNE_K, 0, 0, 0, "no_adjust")
        .label("store")
        .raw(MOV_X, 1, 6, 0, 0)
        .raw(MOV_K, 2, 0, 0, 0)
        .raw(MOV_X, 3, 7, 0, 0)
        .raw(ADD_K, 3, 0, 0, data)
        .raw(MOV_X, 4, 8, 0, 0)
        .raw(CALL, 0, 0, 0, STORE_BYTES)
        .jump(JNE_K, 0, 0, 0, "no_store")
        .raw(LDX_W, 1, 7, 4, 0)
        .jump(JEQ_K, 1, 0, 0, "tail")
        .raw(LDX_W, 2, 6, 0, 0)
        .raw(LDX_W, 3, 6, 4, 0)
        .raw(LDX_W, 5, 7, 8, 0)
        .raw(MOV_X, 0, 5, 0, 0)
        .raw(ADD_K, 0, 0, 0, 1)
        .raw(STX_W, 7, 0, 8, 0)
        .raw(MOV_X, 9, 5, 0, 0)
        .raw(AND_K, 9, 0, 0, 0x7fff)
        .raw(OR_K, 9, 0, 0, 0x8000)
        .raw(BE, 9, 0, 0, 16)
        .raw(RSH_K, 5, 0, 0, 15)
        .raw(LDX_W, 0, 7, 12, 0)
        .raw(ADD_X, 5, 0, 0, 0)
        .raw(BE, 5, 0, 0, 16)
        .raw(MOV_X, 4, 2, 0, 0)
        .jump(JEQ_K, 1, 0, 2, "v6")
        .raw(ADD_K, 4, 0, 0, 36)
        .jump(JGT_X, 4, 3, 0, "short")
        .raw(STX_H, 2, 9, 34, 0)
        .raw(STX_H, 2, 5, 28, 0)
        .jump(JA, 0, 0, 0, "tail")
        .label("v6")
        .raw(ADD_K, 4, 0, 0, 56)
        .jump(JGT_X, 4, 3, 0, "short")
        .raw(STX_H, 2, 9, 54, 0)
        .raw(STX_H, 2, 5, 36, 0)
        .label("tail")
        .raw(MOV_X, 1, 6, 0, 0)
        .map_fd(2, target)
        .raw(MOV_K, 3, 0, 0, 0)
        .raw(CALL, 0, 0, 0, TAIL_CALL);
    // Each failure returns its own code (test-run reports any value): HARNESS_FAILED + k.
    for (k, label) in [
        "no_tail_call",
        "no_frame",
        "bad_len",
        "no_adjust",
        "no_store",
        "short",
    ]
    .into_iter()
    .enumerate()
    {
        if k > 0 {
            a.label(label);
        }
        a.raw(MOV_K, 0, 0, 0, HARNESS_FAILED + i32::try_from(k)?)
            .raw(EXIT, 0, 0, 0, 0);
    }
    a.finish()
}

/// The harness, its two maps and the empty floor program.
pub struct Harness {
    prog: OwnedFd,
    frame: OwnedFd,
    target: OwnedFd,
    pub empty: OwnedFd,
}

impl Harness {
    pub fn load() -> anyhow::Result<Self> {
        let value = u32::try_from(FRAME_DATA + MAX_FRAME)?;
        let frame = bpf::map_create(bpf::BPF_MAP_TYPE_ARRAY, 4, value, 1)?;
        let target = bpf::map_create(bpf::BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1)?;
        let prog = bpf::prog_load("lb_harness", &harness_insns(&frame, &target)?)?;
        let mut empty = bpf::Asm::default();
        empty.raw(0xb7, 0, 0, 0, 2).raw(0x95, 0, 0, 0, 0);
        let empty = bpf::prog_load("lb_empty", &empty.finish()?)?;
        Ok(Self {
            prog,
            frame,
            target,
            empty,
        })
    }

    /// `repeat` iterations of: restore `f` (stamping flow numbers from `n0` when `vary`:
    /// 1 for IPv4, 2 for IPv6), tail call into `prog`.
    pub fn run(
        &self,
        prog: &OwnedFd,
        f: &[u8],
        repeat: u32,
        vary: u32,
        n0: u32,
    ) -> anyhow::Result<bpf::Run> {
        ensure!(f.len() <= MAX_FRAME, "frame too long for the harness");
        bpf::map_update(&self.target, &0u32.to_ne_bytes(), &prog_fd_bytes(prog)?)?;
        let mut value = vec![0u8; FRAME_DATA + MAX_FRAME];
        value[0..4].copy_from_slice(&u32::try_from(f.len())?.to_ne_bytes());
        value[4..8].copy_from_slice(&vary.to_ne_bytes());
        value[8..12].copy_from_slice(&n0.to_ne_bytes());
        value[12..16].copy_from_slice(&u32::from(VARY_SRC_LO).to_ne_bytes());
        value[FRAME_DATA..FRAME_DATA + f.len()].copy_from_slice(f);
        bpf::map_update(&self.frame, &0u32.to_ne_bytes(), &value)?;
        let run = bpf::test_run(&self.prog, f, repeat)?;
        let failed = u32::try_from(HARNESS_FAILED)?;
        ensure!(
            !(failed..failed + 6).contains(&run.verdict),
            "the harness failed: step {} (0 tail call, 1 frame lookup, 2 length, 3 adjust_head, 4 store_bytes, 5 bounds)",
            run.verdict - failed
        );
        Ok(run)
    }
}

fn prog_fd_bytes(prog: &OwnedFd) -> anyhow::Result<[u8; 4]> {
    use std::os::fd::AsRawFd as _;
    Ok(u32::try_from(prog.as_raw_fd())?.to_ne_bytes())
}

pub fn verdict_name(v: u32) -> String {
    match v {
        XDP_ABORTED => "ABORTED".into(),
        XDP_DROP => "DROP".into(),
        XDP_PASS => "PASS".into(),
        XDP_TX => "TX".into(),
        XDP_REDIRECT => "REDIRECT".into(),
        other => format!("{other}"),
    }
}

/// A decoded frame: (src, dst, sport, dport), and whether its IP and L4 checksums hold.
fn decode(f: &[u8]) -> Option<(IpAddr, IpAddr, u16, u16, bool)> {
    let v6 = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) == 0x86dd;
    let (l3, l4, alen) = if v6 { (14, 54, 16) } else { (14, 34, 4) };
    let ip = |at: usize| -> Option<IpAddr> {
        let b = f.get(at..at + alen)?;
        Some(if v6 {
            IpAddr::from(<[u8; 16]>::try_from(b).ok()?)
        } else {
            IpAddr::from(<[u8; 4]>::try_from(b).ok()?)
        })
    };
    let (src, dst) = if v6 {
        (ip(l3 + 8)?, ip(l3 + 24)?)
    } else {
        (ip(l3 + 12)?, ip(l3 + 16)?)
    };
    let proto = if v6 { *f.get(l3 + 6)? } else { *f.get(l3 + 9)? };
    let seg = f.get(l4..)?;
    let sport = u16::from_be_bytes([*seg.first()?, *seg.get(1)?]);
    let dport = u16::from_be_bytes([*seg.get(2)?, *seg.get(3)?]);
    let seg_len = u16::try_from(seg.len()).ok()?;
    let (s, d) = (octets(src), octets(dst));
    let pseudo = if v6 {
        [
            &s[..],
            &d[..],
            &u32::from(seg_len).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat()
    } else {
        [&s[..], &d[..], &[0, proto], &seg_len.to_be_bytes()].concat()
    };
    let l4_ok = csum(&[&pseudo[..], seg].concat()) == 0;
    let ip_ok = v6 || csum(f.get(l3..l3 + 20)?) == 0;
    Some((src, dst, sport, dport, l4_ok && ip_ok))
}

fn show(f: &[u8]) -> String {
    decode(f).map_or_else(
        || format!("{} B, undecoded", f.len()),
        |(s, d, sp, dp, ok)| {
            format!(
                "{} B {s}:{sp} > {d}:{dp}{}",
                f.len(),
                if ok { "" } else { " (checksums stale)" }
            )
        },
    )
}

/// lb's programs and what the rows need from the running agent.
pub struct LbTarget<'a> {
    pub xdp: OwnedFd,
    pub tc: OwnedFd,
    pub pin_path: &'a Path,
    pub backends4: Vec<Ipv4Addr>,
    pub backends6: Vec<Ipv6Addr>,
    /// The endpoint of the SNAT frontend (on "another node") and this node's address
    /// towards it, if the SNAT rows are set up.
    pub snat: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// lb's datapath counters, named as `lb stats` names them, read from the pinned `LB_STATS`
/// directly: `lb stats` also counts every map's entries, which takes seconds once the bench
/// has filled the conntrack with millions of flows (and the established flows would idle
/// past their UDP timeout between rounds).
pub fn lb_counters(pin_path: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let map = bpf::map_of_pin(&pin_path.join("maps").join(lb_common::maps::STATS))?;
    lb_common::stats::NAMES
        .iter()
        .zip(0u32..)
        .map(|(name, i)| Ok(((*name).to_owned(), bpf::per_cpu_sum(&map, i)?)))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Single,
    Steady,
    Direct,
}

/// What a row sends and what must come out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Passed untouched; no lb counter moves.
    Miss,
    /// DNAT'd to a backend and passed; `new`: a new flow per packet, else a tracked flow.
    Dnat { new: bool },
    /// A pod's reply to a tracked flow, un-DNAT'd at tc egress.
    TcReply,
    /// DNAT + SNAT, redirected (new flow per packet).
    SnatNew,
    /// The reply to an SNAT'd flow, redirected back to the client.
    SnatReply,
    /// The floors: no lb program runs.
    Floor,
}

struct Row {
    name: &'static str,
    what: &'static str,
    v6: bool,
    kind: Kind,
    /// Which program: 0 empty, 1 lb's XDP, 2 lb's tc.
    prog: u8,
    frame: Vec<u8>,
    /// A new flow per packet (single: stamped here; steady: by the harness).
    new_flows: bool,
    expect: Expect,
}

/// Runs every lb row `plan.runs` times, interleaved by round, pinned to `cpu`; and Katran's
/// measure.py between lb's rounds when `katran` is given.
pub fn measure(
    target: &LbTarget<'_>,
    plan: &XdpPlan,
    cpu: usize,
    katran: Option<&super::katran::Peer>,
) -> anyhow::Result<XdpResults> {
    let harness = Harness::load()?;
    let mut results = XdpResults {
        pinned_cpu: cpu,
        runs: plan.runs,
        single: plan.single,
        repeat: plan.repeat,
        syn_repeat: plan.syn_repeat,
        ct_capacity: BENCH_CT_ENTRIES,
        ct_entries_made: 0,
        katran: "not measured: KATRAN_MIRROR unset (or --katran-peer not given)".into(),
        ..XdpResults::default()
    };
    let mut rows = rows(target);
    // Open the flows the established rows use (a SYN for TCP, the packet itself for UDP).
    for row in &rows {
        if matches!(row.expect, Expect::Dnat { new: false }) {
            let mut open = row.frame.clone();
            let (proto_at, flags_at) = if row.v6 { (20, 67) } else { (23, 47) };
            if open[proto_at] == TCP {
                open[flags_at] = TCP_SYN;
            }
            bpf::test_run(&target.xdp, &open, 1)?;
        }
    }
    // The replies: from the backend each established TCP flow went to.
    for v6 in [false, true] {
        let est = rows
            .iter()
            .find(|r| r.name == "b.est.single" && r.v6 == v6)
            .map(|r| r.frame.clone())
            .context("no established row")?;
        let run = bpf::test_run(&target.xdp, &est, 1)?;
        let (_, backend, _, bport, _) = decode(&run.out).context("established output")?;
        let (client, vip_port) = {
            let (c, _, sport, _, _) = decode(&est).context("established frame")?;
            (c, sport)
        };
        let mut reply = frame(backend, client, bport, vip_port, TCP, TCP_ACK);
        // An skb reply as it leaves the node: MACs as any.
        reply[..12].copy_from_slice(&[MAC_ROUTER, MAC_LB].concat());
        rows.push(Row {
            name: "e.reply.single",
            what: "a pod's reply (TCP ACK) to an established flow, un-DNAT at tc egress; repeat=1, fresh frame",
            v6,
            kind: Kind::Single,
            prog: 2,
            frame: reply,
            new_flows: false,
            expect: Expect::TcReply,
        });
    }
    if let Some((pod, node)) = target.snat {
        let open = frame(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(VIP4_SNAT),
            40010,
            TCP_PORT,
            TCP,
            TCP_SYN,
        );
        let run = bpf::test_run(&target.xdp, &open, 1)?;
        ensure!(
            run.verdict == XDP_REDIRECT,
            "SNAT flow: {} ({:?})",
            verdict_name(run.verdict),
            lb_counters(target.pin_path)?
        );
        let (src, _, port, _, _) = decode(&run.out).context("SNAT output")?;
        ensure!(src == IpAddr::V4(node), "SNAT source {src}, not {node}");
        let mut reply = frame(IpAddr::V4(pod), IpAddr::V4(node), 8080, port, TCP, TCP_ACK);
        reply[..12].copy_from_slice(&[MAC_ROUTER, MAC_LB].concat());
        rows.push(Row {
            name: "f.snat_reply.single",
            what: "the pod's reply to an SNAT'd flow: un-SNAT + un-DNAT, FIB, redirect; repeat=1, fresh frame",
            v6: false,
            kind: Kind::Single,
            prog: 1,
            frame: reply,
            new_flows: false,
            expect: Expect::SnatReply,
        });
    }
    let mut flows = FlowCounter::default();
    for row in &rows {
        let f = if row.new_flows {
            flows.next_single(row)
        } else {
            row.frame.clone()
        };
        let prog = prog_of(&harness, target, row.prog);
        let run = bpf::test_run(prog, &f, 1)?;
        check_output(row, &f, &run, target)
            .with_context(|| format!("{} ({})", row.name, family(row.v6)))?;
        results.checks.push(format!(
            "{:<22} {:<4} {:<9} {} -> {}",
            row.name,
            family(row.v6),
            if row.expect == Expect::TcReply {
                "TC_ACT_OK".into()
            } else {
                verdict_name(run.verdict)
            },
            show(&f),
            show(&run.out)
        ));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut counters: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); rows.len()];
    let katran_blocks = katran.map_or(0, |_| plan.runs.clamp(1, 3));
    let mut katran_runs: Vec<serde_json::Value> = Vec::new();
    let mut background = Vec::new();
    for round in 0..plan.runs {
        eprintln!("bench: XDP rows, round {}/{}", round + 1, plan.runs);
        let busy0 = super::katran::cpu_busy()?;
        let t0 = Instant::now();
        for (k, row) in rows.iter().enumerate() {
            let c0 = lb_counters(target.pin_path)?;
            let (ns, iterations, last) = measure_row(row, &harness, target, plan, &mut flows)?;
            let c1 = lb_counters(target.pin_path)?;
            let delta = per_iteration(&c0, &c1, iterations);
            check_counters(row, &delta).with_context(|| {
                format!("{} ({}) round {}", row.name, family(row.v6), round + 1)
            })?;
            if let Some((input, run)) = last {
                check_output(row, &input, &run, target)
                    .with_context(|| format!("{} ({}) last iteration", row.name, family(row.v6)))?;
            }
            samples[k].push(ns);
            counters[k] = delta;
        }
        background.push(super::katran::background_pct(&busy0, t0.elapsed())?);
        // Katran between lb's rounds, in blocks of runs, so drift hits both.
        if let Some(peer) = katran
            && katran_blocks > 0
            && (round + 1) * katran_blocks % plan.runs < katran_blocks
        {
            let runs = plan.runs.div_ceil(katran_blocks);
            eprintln!("bench: Katran, {runs} runs");
            katran_runs.push(peer.measure(runs, plan, cpu)?);
        }
    }
    results.background_cpu_pct = Spread::of(background).map_or(0.0, |s| s.median);
    // One client entry per flow to a local backend (`lb_common::nat::CT_DIR_CLIENT`).
    results.ct_entries_made = flows
        .single
        .values()
        .chain(flows.steady.values())
        .map(|&n| u64::from(n))
        .sum::<u64>();
    let floor = |name: &str| -> Option<f64> {
        let k = rows.iter().position(|r| r.name == name)?;
        Spread::of(samples[k].clone()).map(|s| s.median)
    };
    let floors = [
        (Kind::Single, floor("floor.single")),
        (Kind::Steady, floor("floor.harness")),
        (Kind::Direct, floor("floor.direct")),
    ];
    for (k, row) in rows.iter().enumerate() {
        let Some(ns) = Spread::of(samples[k].clone()) else {
            continue;
        };
        let net = if row.expect == Expect::Floor {
            None
        } else {
            floors
                .iter()
                .find(|(kind, _)| *kind == row.kind)
                .and_then(|(_, f)| *f)
                .map(|f| ns.median - f)
        };
        results.rows.push(XdpRow {
            peer: "lb".into(),
            family: family(row.v6).into(),
            name: row.name.into(),
            what: row.what.into(),
            verdict: if row.expect == Expect::TcReply {
                "TC_ACT_OK".into()
            } else {
                verdict_name(expected_verdict(row.expect))
            },
            ns,
            net_of_floor: net,
            counters: counters[k].clone(),
        });
    }
    if let Some(peer) = katran {
        let (rows, background) = super::katran::merge(&katran_runs)?;
        results.rows.extend(rows);
        results.katran_background_cpu_pct = background;
        results.katran = format!(
            "measured: {} ({} runs per row, between lb's rounds)",
            peer.describe(),
            plan.runs
        );
    }
    Ok(results)
}

fn family(v6: bool) -> &'static str {
    if v6 { "ipv6" } else { "ipv4" }
}

fn prog_of<'a>(harness: &'a Harness, target: &'a LbTarget<'_>, prog: u8) -> &'a OwnedFd {
    match prog {
        0 => &harness.empty,
        1 => &target.xdp,
        _ => &target.tc,
    }
}

/// Flow numbers for new-flow rows: single-shot and harness flows never repeat.
#[derive(Default)]
struct FlowCounter {
    single: BTreeMap<(&'static str, bool), u32>,
    steady: BTreeMap<(&'static str, bool), u32>,
}

impl FlowCounter {
    fn next_single(&mut self, row: &Row) -> Vec<u8> {
        let n = self.single.entry((row.name, row.v6)).or_default();
        let f = with_flow(&row.frame, *n, row.v6);
        *n += 1;
        f
    }
}

/// One run of one row: ns per packet, iterations, and the last (input, output) to check.
type RowRun = (f64, u64, Option<(Vec<u8>, bpf::Run)>);

/// Runs `row` once (see [`RowRun`]).
fn measure_row(
    row: &Row,
    harness: &Harness,
    target: &LbTarget<'_>,
    plan: &XdpPlan,
    flows: &mut FlowCounter,
) -> anyhow::Result<RowRun> {
    let prog = prog_of(harness, target, row.prog);
    match row.kind {
        Kind::Single => {
            let mut durations = Vec::with_capacity(plan.single);
            let mut last = None;
            let calls = if row.expect == Expect::SnatNew {
                plan.single.min(SNAT_CALLS)
            } else {
                plan.single
            };
            for _ in 0..calls {
                let f = if row.new_flows {
                    flows.next_single(row)
                } else {
                    row.frame.clone()
                };
                let run = bpf::test_run(prog, &f, 1)?;
                durations.push(f64::from(run.ns));
                last = Some((f, run));
            }
            let ns = Spread::of(durations).map_or(0.0, |s| s.median);
            Ok((ns, u64::try_from(calls)?, last))
        }
        Kind::Direct => {
            let run = bpf::test_run(prog, &row.frame, plan.repeat)?;
            Ok((f64::from(run.ns), u64::from(plan.repeat), None))
        }
        Kind::Steady => {
            let repeat = if row.new_flows {
                plan.syn_repeat
            } else {
                plan.repeat
            };
            let (vary, n0) = if row.new_flows {
                let n = flows.steady.entry((row.name, row.v6)).or_default();
                let n0 = *n;
                *n += repeat;
                (if row.v6 { 2 } else { 1 }, n0)
            } else {
                (0, 0)
            };
            let run = harness.run(prog, &row.frame, repeat, vary, n0)?;
            let last = if row.new_flows {
                with_flow_at(&row.frame, n0 + repeat - 1, row.v6)
            } else {
                row.frame.clone()
            };
            Ok((f64::from(run.ns), u64::from(repeat), Some((last, run))))
        }
    }
}

/// The harness's flow `n`: its source's low 16 bits start at `VARY_SRC_LO`.
fn with_flow_at(f: &[u8], n: u32, v6: bool) -> Vec<u8> {
    let mut b = f.to_vec();
    let (_, src_at) = flow_offsets(v6);
    b[src_at..src_at + 2].copy_from_slice(&VARY_SRC_LO.to_be_bytes());
    with_flow(&b, n, v6)
}

fn per_iteration(
    c0: &BTreeMap<String, u64>,
    c1: &BTreeMap<String, u64>,
    iterations: u64,
) -> BTreeMap<String, f64> {
    #[expect(clippy::cast_precision_loss, reason = "counter deltas far below 2^52")]
    let per = |d: u64| d as f64 / iterations.max(1) as f64;
    c1.iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(c0.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), per(d)))
        })
        .collect()
}

fn expected_verdict(e: Expect) -> u32 {
    match e {
        Expect::SnatNew | Expect::SnatReply => XDP_REDIRECT,
        // TC_ACT_OK is 0.
        Expect::TcReply => 0,
        _ => XDP_PASS,
    }
}

/// Counters per iteration: the row's own counter at 1, nothing else moving.
fn check_counters(row: &Row, delta: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    let want: &[&str] = match row.expect {
        Expect::Miss | Expect::Floor => &[],
        Expect::Dnat { new: true } => &["xdp_new_flow"],
        Expect::Dnat { new: false } => &["xdp_tracked"],
        Expect::TcReply => &["tc_reply_xlated"],
        Expect::SnatNew => &["xdp_new_flow_snat", "xdp_redirect"],
        Expect::SnatReply => &["xdp_reply_xlated", "xdp_redirect"],
    };
    for (name, per) in delta {
        let expected = if want.contains(&name.as_str()) {
            1.0
        } else if name == "xdp_ct_expired" {
            // An LRU-evicted flow is not expired; anything else is not the intended path.
            0.0
        } else {
            0.0
        };
        if (per - expected).abs() > 1e-9 {
            bail!("counter {name}: {per} per packet, expected {expected} (all: {delta:?})");
        }
    }
    for name in want {
        if !delta.contains_key(*name) {
            bail!("counter {name} did not move (all: {delta:?})");
        }
    }
    Ok(())
}

/// The verdict and the packet out: untouched for misses; for DNAT, the destination is one of
/// the backends on the target port, the rest as sent, checksums valid (unless the input's
/// were left stale by flow stamping).
fn check_output(
    row: &Row,
    input: &[u8],
    run: &bpf::Run,
    target: &LbTarget<'_>,
) -> anyhow::Result<()> {
    let want = expected_verdict(row.expect);
    ensure!(
        run.verdict == want,
        "verdict {}, expected {}",
        verdict_name(run.verdict),
        verdict_name(want)
    );
    let (isrc, idst, isport, idport, iok) = decode(input).context("input")?;
    let (osrc, odst, osport, odport, ook) = decode(&run.out).context("output")?;
    ensure!(iok == ook, "checksums: input {iok}, output {ook}");
    match row.expect {
        Expect::Miss | Expect::Floor => ensure!(run.out == input, "changed: {}", show(&run.out)),
        Expect::Dnat { .. } => {
            let backend = match odst {
                IpAddr::V4(a) => target.backends4.contains(&a),
                IpAddr::V6(a) => target.backends6.contains(&a),
            };
            let port = if idport == TCP_PORT { 8080 } else { 8053 };
            ensure!(
                backend && odport == port && osrc == isrc && osport == isport,
                "not DNAT to a backend: {} -> {}",
                show(input),
                show(&run.out)
            );
            ensure!(run.out[..14] == input[..14], "Ethernet header changed");
        }
        Expect::TcReply => {
            let vip = if isrc.is_ipv4() {
                IpAddr::V4(VIP4)
            } else {
                IpAddr::V6(VIP6)
            };
            ensure!(
                osrc == vip && osport == TCP_PORT && odst == idst && odport == idport,
                "not un-DNAT'd: {}",
                show(&run.out)
            );
        }
        Expect::SnatNew => {
            let (pod, node) = target.snat.context("SNAT row without SNAT setup")?;
            ensure!(
                osrc == IpAddr::V4(node) && odst == IpAddr::V4(pod) && odport == 8080,
                "not SNAT+DNAT: {}",
                show(&run.out)
            );
        }
        Expect::SnatReply => ensure!(
            osrc == IpAddr::V4(VIP4_SNAT)
                && osport == TCP_PORT
                && odst == IpAddr::V4(CLIENT4)
                && odport == 40010,
            "not un-SNAT'd: {}",
            show(&run.out)
        ),
    }
    Ok(())
}

fn rows(target: &LbTarget<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    let floor = frame(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(VIP4),
        40000,
        TCP_PORT,
        TCP,
        TCP_SYN,
    );
    for (name, what, kind) in [
        (
            "floor.single",
            "empty XDP program, repeat=1 per call",
            Kind::Single,
        ),
        ("floor.direct", "empty XDP program, repeat=R", Kind::Direct),
        (
            "floor.harness",
            "harness (restore 54 B frame, tail call) -> empty program",
            Kind::Steady,
        ),
    ] {
        rows.push(Row {
            name,
            what,
            v6: false,
            kind,
            prog: 0,
            frame: floor.clone(),
            new_flows: false,
            expect: Expect::Floor,
        });
    }
    for v6 in [false, true] {
        let (client, single, vip, miss) = if v6 {
            (
                IpAddr::V6(CLIENT6),
                IpAddr::V6(CLIENT6_SINGLE),
                IpAddr::V6(VIP6),
                IpAddr::V6(MISS6),
            )
        } else {
            (
                IpAddr::V4(CLIENT4),
                IpAddr::V4(CLIENT4_SINGLE),
                IpAddr::V4(VIP4),
                IpAddr::V4(MISS4),
            )
        };
        let syn = frame(client, vip, 40000, TCP_PORT, TCP, TCP_SYN);
        let syn_single = frame(single, vip, 40000, TCP_PORT, TCP, TCP_SYN);
        let ack = frame(client, vip, 40001, TCP_PORT, TCP, TCP_ACK);
        let missf = frame(client, miss, 40002, 443, TCP, TCP_ACK);
        let udp = frame(client, vip, 40003, UDP_PORT, UDP, 0);
        let udp_single = frame(single, vip, 40000, UDP_PORT, UDP, 0);
        let mut add = |name, what, kind, frame: &Vec<u8>, new_flows, expect| {
            rows.push(Row {
                name,
                what,
                v6,
                kind,
                prog: 1,
                frame: frame.clone(),
                new_flows,
                expect,
            });
        };
        let new = Expect::Dnat { new: true };
        let est = Expect::Dnat { new: false };
        add(
            "a.syn_new.single",
            "TCP SYN, new flow per packet: choose a backend, 1 conntrack insert, DNAT; first run (repeat=1, fresh frame)",
            Kind::Single,
            &syn_single,
            true,
            new,
        );
        add(
            "a.syn_new.steady",
            "TCP SYN, new flow every iteration (harness vary)",
            Kind::Steady,
            &syn,
            true,
            new,
        );
        add(
            "b.est.single",
            "established TCP (ACK, conntrack hit), DNAT; first run",
            Kind::Single,
            &ack,
            false,
            est,
        );
        add(
            "b.est.steady",
            "established TCP (ACK, conntrack hit), DNAT (harness)",
            Kind::Steady,
            &ack,
            false,
            est,
        );
        add(
            "c.miss.single",
            "TCP to a non-frontend address; first run",
            Kind::Single,
            &missf,
            false,
            Expect::Miss,
        );
        add(
            "c.miss.direct",
            "TCP to a non-frontend address, plain repeat=R (packet unchanged)",
            Kind::Direct,
            &missf,
            false,
            Expect::Miss,
        );
        add(
            "c.miss.steady",
            "TCP to a non-frontend address (harness)",
            Kind::Steady,
            &missf,
            false,
            Expect::Miss,
        );
        add(
            "d.udp_new.single",
            "UDP, new flow per packet; first run",
            Kind::Single,
            &udp_single,
            true,
            new,
        );
        add(
            "d.udp_new.steady",
            "UDP, new flow every iteration (harness vary)",
            Kind::Steady,
            &udp,
            true,
            new,
        );
        add(
            "d.udp_est.single",
            "UDP, known flow (conntrack hit); first run",
            Kind::Single,
            &udp,
            false,
            est,
        );
        add(
            "d.udp_est.steady",
            "UDP, known flow (conntrack hit) (harness)",
            Kind::Steady,
            &udp,
            false,
            est,
        );
    }
    if target.snat.is_some() {
        let single = frame(
            IpAddr::V4(Ipv4Addr::new(198, 19, 128, 1)),
            IpAddr::V4(VIP4_SNAT),
            40000,
            TCP_PORT,
            TCP,
            TCP_SYN,
        );
        // Single only, SNAT_CALLS per run: one client range to one pod has the SNAT port
        // range (about 4500 ports) for its live flows, and a harness run would fill it.
        rows.push(Row {
            name: "f.snat_new.single",
            what: "TCP SYN to a frontend whose endpoint is on another node: DNAT + SNAT (FIB source, port allocation), FIB, redirect; first run",
            v6: false,
            kind: Kind::Single,
            prog: 1,
            frame: single,
            new_flows: true,
            expect: Expect::SnatNew,
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums_and_katran_sizes() {
        let tcp = frame(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(VIP4),
            40000,
            80,
            TCP,
            TCP_SYN,
        );
        assert_eq!(tcp.len(), 54);
        let udp = frame(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), 40003, 53, UDP, 0);
        assert_eq!(udp.len(), 74);
        for f in [&tcp, &udp] {
            let (_, _, _, _, ok) = decode(f).expect("decodes");
            assert!(ok);
        }
        let v6 = frame(IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), 1, 80, TCP, TCP_SYN);
        assert_eq!(v6.len(), 74);
        assert!(decode(&v6).expect("decodes").4);
    }

    #[test]
    fn flow_stamping_matches_the_harness() {
        let f = frame(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), 40000, 80, TCP, 2);
        let g = with_flow_at(&f, 32768 + 5, false);
        let (src, _, sport, _, _) = decode(&g).expect("decodes");
        assert_eq!(sport, 0x8005);
        assert_eq!(src, IpAddr::V4(Ipv4Addr::new(198, 18, 0x80, 1)));
    }

    #[test]
    fn harness_assembles() {
        // Map descriptors are only placed in the instructions; any open descriptor will do.
        let f = std::fs::File::open("/dev/null").expect("open");
        let fd = OwnedFd::from(f);
        let insns = harness_insns(&fd, &fd).expect("assembles");
        assert!(insns.len() > 40);
    }
}
