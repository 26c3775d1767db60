//! NodePort packets/s: a UDP flood from the external client to a NodePort, counted at the
//! pod, for lb's XDP, iptables NodePort rules and the pod directly (same topologies as
//! `nodeport.rs`).
//!
//! The sender is a raw IPv4 socket (`IPPROTO_RAW`, so the headers are ours) in the client's
//! namespace, on a thread of this process pinned to the last CPU, sending 46-byte datagrams
//! (18 bytes of payload: a 60-byte Ethernet frame, the minimum) with `sendmmsg` in batches
//! as fast as it can for a fixed time. Two kinds of traffic:
//! - one flow: every datagram from `10.200.0.2:40000`: the established path (lb's flow
//!   table hit, iptables' conntrack entry hit);
//! - new flows: every datagram from a different source (address in 10.200.0.10-250, port
//!   1024-65535; 15.5 million flows, none reused within a run or across the rounds of a
//!   point): the new-flow path (lb's flow-table insert, conntrack's insert and NAT setup).
//!
//! The pod counts: a `raw` PREROUTING rule in the backend pod's namespace matches the flood's
//! datagrams (UDP to 8053, IP length 46; the request/response runs send 29) and drops them,
//! so its packet counter is "delivered to the pod" and no server spends CPU on them.
//! Offered = datagrams `sendmmsg` accepted; the difference is what the path dropped (veth
//! rings, backlog, conntrack). On veth the receiving side's softirq runs on the sending CPU,
//! so the rate is what one CPU does with sender plus datapath: direct is the floor.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{measure::Spread, topology::Topology};

/// IPv4 header + UDP header + payload.
pub const PACKET_LEN: usize = 46;
/// Payload bytes of a flood datagram.
const PAYLOAD: &[u8; 18] = b"lb-bench-pps-flood";
/// Datagrams per `sendmmsg`.
const BATCH: usize = 64;
/// The one flow's source.
const ONE_FLOW: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 200, 0, 2), 40_000);
/// New flows' source addresses: 10.200.0.FIRST_HOST.. (in the client's /24: the node routes
/// and filters them as its own subnet).
const FIRST_HOST: u8 = 10;
const HOSTS: u64 = 241;
const FIRST_PORT: u16 = 1024;
const PORTS: u64 = 65_536 - 1024;
/// How many distinct new flows there are before they repeat.
pub const NEW_FLOWS: u64 = HOSTS * PORTS;

/// Which traffic a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    One,
    New,
}

impl Flows {
    pub const BOTH: [Self; 2] = [Self::One, Self::New];

    pub fn name(self) -> &'static str {
        match self {
            Self::One => "one",
            Self::New => "new",
        }
    }
}

/// Source address and port of new flow `i` (`i` modulo [`NEW_FLOWS`]): the port varies
/// fastest.
pub fn new_flow(i: u64) -> (Ipv4Addr, u16) {
    let i = i % NEW_FLOWS;
    let host = FIRST_HOST + u8::try_from(i / PORTS).unwrap_or(0);
    let port = FIRST_PORT + u16::try_from(i % PORTS).unwrap_or(0);
    (Ipv4Addr::new(10, 200, 0, host), port)
}

/// RFC 1071 one's complement sum of `bytes` (big-endian 16-bit words) added to `sum`.
fn ones_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for w in chunks.by_ref() {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0)
}

/// Writes the flood datagram from `src` to `dst` into `buf`: IPv4 header (no options; the
/// kernel fills in the ID and the header checksum of an `IPPROTO_RAW` send), UDP header with
/// its checksum over the pseudo-header (RFC 768), payload.
pub fn stamp(buf: &mut [u8; PACKET_LEN], src: (Ipv4Addr, u16), dst: SocketAddrV4) {
    let total = u16::try_from(PACKET_LEN).unwrap_or(0);
    let udp_len = total - 20;
    buf[0] = 0x45;
    buf[1] = 0;
    buf[2..4].copy_from_slice(&total.to_be_bytes());
    buf[4..8].fill(0);
    buf[8] = 64;
    buf[9] = 17;
    buf[10..12].fill(0);
    buf[12..16].copy_from_slice(&src.0.octets());
    buf[16..20].copy_from_slice(&dst.ip().octets());
    buf[20..22].copy_from_slice(&src.1.to_be_bytes());
    buf[22..24].copy_from_slice(&dst.port().to_be_bytes());
    buf[24..26].copy_from_slice(&udp_len.to_be_bytes());
    buf[26..28].fill(0);
    buf[28..].copy_from_slice(PAYLOAD);
    // Pseudo-header: addresses, zero + protocol, UDP length; then the UDP header and data.
    let pseudo = ones_sum(0, &buf[12..20]) + 17 + u32::from(udp_len);
    let sum = !fold(ones_sum(pseudo, &buf[20..]));
    // 0 means "no checksum" in UDP over IPv4: a computed 0 is sent as all ones.
    let sum = if sum == 0 { 0xffff } else { sum };
    buf[26..28].copy_from_slice(&sum.to_be_bytes());
}

/// What one sender run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sent {
    /// Datagrams `sendmmsg` accepted.
    pub datagrams: u64,
    pub seconds: f64,
}

/// Offered and delivered datagrams per second and the share dropped on the way (0..1) of a
/// run that sent `sent` and had `delivered` counted at the pod.
pub fn rates(sent: Sent, delivered: u64) -> (f64, f64, f64) {
    #[expect(clippy::cast_precision_loss, reason = "packet counts, far below 2^52")]
    let (s, d) = (sent.datagrams as f64, delivered as f64);
    let seconds = sent.seconds.max(1e-9);
    let dropped = if s > 0.0 { ((s - d) / s).max(0.0) } else { 0.0 };
    (s / seconds, d / seconds, dropped)
}

/// Sends flood datagrams to `dst` for `duration` from the calling thread's namespace:
/// `flows` decides the sources; new flows start at index `first` (returned `datagrams`
/// later, the next run continues there).
pub fn send(
    dst: SocketAddrV4,
    flows: Flows,
    first: u64,
    duration: Duration,
) -> anyhow::Result<Sent> {
    struct Fd(i32);
    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(self.0) };
        }
    }
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is a local value.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let fd = Fd(fd);
    // SAFETY: a zeroed sockaddr_in with family, port and address set.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
    // SAFETY: as above; the length is the sockaddr's.
    if unsafe {
        libc::connect(
            fd.0,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } != 0
    {
        bail!("connect {dst}: {}", std::io::Error::last_os_error());
    }
    let mut bufs = vec![[0u8; PACKET_LEN]; BATCH];
    for buf in &mut bufs {
        stamp(buf, ONE_FLOW, dst);
    }
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: PACKET_LEN,
        })
        .collect();
    // SAFETY: a zeroed mmsghdr is valid (no name, no control); each points at its iovec.
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut next = first;
    let mut sent = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        if flows == Flows::New {
            for buf in &mut bufs {
                stamp(buf, new_flow(next), dst);
                next += 1;
            }
        }
        // SAFETY: `msgs` holds BATCH headers pointing at live buffers of PACKET_LEN bytes.
        let n = unsafe {
            libc::sendmmsg(
                fd.0,
                msgs.as_mut_ptr(),
                u32::try_from(BATCH).unwrap_or(1),
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full device queue: the datagrams were not offered; try again.
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
            {
                continue;
            }
            bail!("sendmmsg to {dst}: {e}");
        }
        sent += u64::try_from(n).unwrap_or(0);
    }
    // Keep the buffers the headers point into alive until here.
    drop(msgs);
    drop(iovs);
    Ok(Sent {
        datagrams: sent,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The packet counter of the first rule in `iptables-save -c` output whose line contains
/// `--length 46` (the sink's rule): `[packets:bytes] -A ...`.
pub fn sink_count(save: &str) -> Option<u64> {
    let line = save
        .lines()
        .find(|l| l.contains(" -A PREROUTING") && l.contains(&format!("--length {PACKET_LEN}")))?;
    let counters = line.strip_prefix('[')?.split(']').next()?;
    counters.split(':').next()?.parse().ok()
}

/// One point of the packets/s comparison: medians of interleaved rounds.
#[derive(Debug, Serialize, Deserialize)]
pub struct PpsRow {
    /// "direct", "direct+xdp-pass" (direct with an XDP program that passes everything on the
    /// node's client-facing veth), "lb-xdp" or "iptables".
    pub mode: String,
    pub services: usize,
    /// "one" (established path) or "new" (every datagram a new flow).
    pub flows: String,
    /// Datagrams per second the sender handed to the kernel.
    pub offered_pps: Spread,
    /// Datagrams per second counted at the pod.
    pub delivered_pps: Spread,
    /// Share of the offered datagrams that did not reach the pod, in percent.
    pub dropped_percent: Spread,
    /// Delivered over direct's delivered in the same round; absent for direct.
    pub delivered_vs_direct: Option<Spread>,
    /// Seconds each run sent for.
    pub seconds: f64,
    /// Datagrams counted at the pod over the timed runs.
    #[serde(default)]
    pub delivered_total: u64,
    /// lb-xdp: what lb's XDP program counted over the same runs (`lb stats`, the `xdp_*`
    /// events that moved): whether the datagrams were translated in XDP or passed on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xdp_events: BTreeMap<String, u64>,
}

/// Duration and rounds.
pub struct PpsPlan {
    pub seconds: f64,
    pub repeats: usize,
}

impl PpsPlan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                seconds: 0.6,
                repeats: 3,
            }
        } else {
            Self {
                seconds: 2.0,
                repeats: 5,
            }
        }
    }
}

/// The iptables command of the family the peers use (legacy or nft), for the sink's rule.
fn iptables(save: bool) -> String {
    let restore = super::iptables_restore();
    let base = restore.trim_end_matches("-restore");
    if save {
        format!("{base}-save")
    } else {
        base.to_owned()
    }
}

fn sink_rule(topo: &Topology) -> anyhow::Result<()> {
    crate::cmd::output(
        Command::new("nsenter")
            .arg(format!("--net={}", topo.backend.path().display()))
            .arg(iptables(false))
            .args([
                "-w",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-p",
                "udp",
                "--dport",
                "8053",
            ])
            .args([
                "-m",
                "length",
                "--length",
                &PACKET_LEN.to_string(),
                "-j",
                "DROP",
            ]),
    )
    .map(drop)
}

fn sink_read(topo: &Topology) -> anyhow::Result<u64> {
    let out = crate::cmd::output(
        Command::new("nsenter")
            .arg(format!("--net={}", topo.backend.path().display()))
            .arg(iptables(true))
            .args(["-c", "-t", "raw"]),
    )?;
    sink_count(&out).with_context(|| format!("no sink rule in {out:?}"))
}

/// One flood point: a mode's topology and the address it floods.
pub struct Target<'a> {
    /// The row's mode: "direct", "direct+xdp-pass", "lb-xdp", "iptables".
    pub name: &'static str,
    pub topo: &'a Topology,
    pub dst: SocketAddrV4,
    /// lb's pin path (lb-xdp), to read its XDP counters.
    pub pin_path: Option<&'a Path>,
    /// Attach an XDP program that passes everything to the node's `n0` for each run: what
    /// any XDP program costs on veth (the frame is made into an XDP buffer and back).
    pub xdp_pass: bool,
}

/// The mode name of direct access, the baseline of "vs direct".
pub const DIRECT: &str = "direct";

/// An XDP program that passes every packet: `r0 = XDP_PASS; exit`.
fn xdp_pass_prog() -> anyhow::Result<OwnedFd> {
    let mut asm = super::bpf::Asm::default();
    asm.raw(0xb7, 0, 0, 0, 2).raw(0x95, 0, 0, 0, 0);
    super::bpf::prog_load("lb_pass", &asm.finish()?)
}

/// Attaches `prog` to `n0` in the node's namespace of `topo`.
fn attach_pass(topo: &Topology, prog: &OwnedFd) -> anyhow::Result<OwnedFd> {
    super::nodeport::on_pinned_thread_in(&topo.node, None, || {
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"n0".as_ptr()) };
        if ifindex == 0 {
            bail!("n0: {}", std::io::Error::last_os_error());
        }
        super::bpf::xdp_link(prog, ifindex)
    })
}

/// `lb stats --json`'s `events`.
fn lb_events(pin_path: &Path) -> anyhow::Result<serde_json::Value> {
    let out = crate::cmd::output(
        Command::new(crate::cmd::lb_bin())
            .args(["stats", "--json", "--pin-path"])
            .arg(pin_path),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("lb stats --json")?;
    Ok(json["events"].clone())
}

/// The `xdp_*` events that grew from `before` to `after` (`lb stats --json` `events`), added
/// to `into`.
pub fn add_xdp_deltas(
    before: &serde_json::Value,
    after: &serde_json::Value,
    into: &mut BTreeMap<String, u64>,
) {
    let Some(after) = after.as_object() else {
        return;
    };
    for (name, value) in after {
        let was = before
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let delta = value.as_u64().unwrap_or(0).saturating_sub(was);
        if name.starts_with("xdp_") && delta > 0 {
            *into.entry(name.clone()).or_default() += delta;
        }
    }
}

/// Floods every target with both kinds of traffic, `plan.repeats` interleaved rounds, and
/// returns a row for each (mode, flows) at `services`.
pub fn measure(
    targets: &[Target<'_>],
    services: usize,
    plan: &PpsPlan,
) -> anyhow::Result<Vec<PpsRow>> {
    for t in targets {
        sink_rule(t.topo)?;
    }
    let cpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1;
    let points: Vec<(usize, Flows)> = (0..targets.len())
        .flat_map(|i| Flows::BOTH.map(|f| (i, f)))
        .collect();
    let duration = Duration::from_secs_f64(plan.seconds);
    let mut next = vec![0u64; points.len()];
    let pass_prog = if targets.iter().any(|t| t.xdp_pass) {
        Some(xdp_pass_prog()?)
    } else {
        None
    };
    let mut events: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); points.len()];
    let mut run = |k: usize, duration: Duration, timed: bool| -> anyhow::Result<(Sent, u64)> {
        let (i, flows) = points[k];
        let t = &targets[i];
        let lb_before = match t.pin_path {
            Some(pin) if timed => Some(lb_events(pin)?),
            _ => None,
        };
        let link = match &pass_prog {
            Some(prog) if t.xdp_pass => Some(attach_pass(t.topo, prog)?),
            _ => None,
        };
        let before = sink_read(t.topo)?;
        let first = next[k];
        let sent = super::nodeport::on_pinned_thread_in(&t.topo.client, Some(cpu), || {
            send(t.dst, flows, first, duration)
        })?;
        // What is still queued (backlog, rings) arrives within this.
        std::thread::sleep(Duration::from_millis(30));
        let delivered = sink_read(t.topo)? - before;
        drop(link);
        if let (Some(pin), Some(lb_before)) = (t.pin_path, lb_before) {
            add_xdp_deltas(&lb_before, &lb_events(pin)?, &mut events[k]);
        }
        next[k] += sent.datagrams + u64::try_from(BATCH).unwrap_or(0);
        Ok((sent, delivered))
    };
    // Warm-up: neighbour entries, the one flow's state, the path's caches.
    for (k, &(i, flows)) in points.iter().enumerate() {
        let (_, delivered) = run(k, Duration::from_millis(100), false)?;
        if delivered == 0 {
            bail!(
                "packets/s warm-up: nothing reached the pod ({}, {} flow(s), {})",
                targets[i].name,
                flows.name(),
                targets[i].dst
            );
        }
    }
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); points.len()];
    let mut delivered_total = vec![0u64; points.len()];
    for round in 0..plan.repeats {
        eprintln!(
            "bench: NodePort packets/s, {services} Services, round {}/{}",
            round + 1,
            plan.repeats
        );
        for k in super::rotated(points.len(), round) {
            let (sent, delivered) = run(k, duration, true)?;
            delivered_total[k] += delivered;
            runs[k].push(rates(sent, delivered));
        }
    }
    let mut rows = Vec::new();
    for (k, &(i, flows)) in points.iter().enumerate() {
        let name = targets[i].name;
        let direct = points
            .iter()
            .position(|&(j, f)| targets[j].name == DIRECT && f == flows);
        let vs_direct = direct.filter(|_| name != DIRECT).and_then(|d| {
            Spread::of(
                runs[k]
                    .iter()
                    .zip(&runs[d])
                    .filter(|(_, direct)| direct.1 > 0.0)
                    .map(|(mine, direct)| mine.1 / direct.1)
                    .collect(),
            )
        });
        let spread = |f: fn(&(f64, f64, f64)) -> f64| {
            Spread::of(runs[k].iter().map(f).collect()).unwrap_or_default()
        };
        rows.push(PpsRow {
            mode: name.into(),
            services,
            flows: flows.name().into(),
            offered_pps: spread(|r| r.0),
            delivered_pps: spread(|r| r.1),
            dropped_percent: spread(|r| r.2 * 100.0),
            delivered_vs_direct: vs_direct,
            seconds: plan.seconds,
            delivered_total: delivered_total[k],
            xdp_events: std::mem::take(&mut events[k]),
        });
    }
    Ok(rows)
}

/// The Markdown table of the packets/s rows (after the NodePort latency table).
pub fn markdown(rows: &[PpsRow], md: &mut String) {
    if rows.is_empty() {
        return;
    }
    let seconds = rows.first().map_or(0.0, |r| r.seconds);
    push_line!(
        md,
        "\n### NodePort packets/s (UDP flood from outside, counted at the pod)\n\n\
         The client floods `10.200.0.1:nodePort` of the last Service (direct: the pod) with 46-byte UDP datagrams \
         (60-byte frames) from a raw socket with `sendmmsg`, as fast as it can for {seconds} s per run, on a thread \
         pinned to the last CPU (`sched_setaffinity`); nothing else is pinned, and on veth the datapath's softirq \
         runs on the sending CPU, so a rate is what one CPU does with sender plus datapath (direct is the floor). \
         one flow: every datagram from one source (established path: lb's flow-table hit, conntrack hit); new \
         flows: every datagram from a new source address:port (lb's flow insert, conntrack insert and NAT). \
         Delivered: counted by a drop rule in the pod's namespace (raw PREROUTING). Offered: accepted by \
         `sendmmsg`; dropped = not delivered (on veth the sender's CPU runs the path to the pod inline, so the \
         path slows the sender rather than dropping). direct+xdp-pass: direct with an XDP program that only \
         returns XDP_PASS on the node's veth `n0` (lb-xdp's attachment point): what XDP on veth costs before any \
         work (veth makes the frame an XDP buffer and back). lb's XDP rewrites DNAT-only flows (local endpoints) \
         and passes them to the stack, which forwards them. Medians of interleaved rounds [min-max].\n\n\
         | Services | flows | mode | offered (kpps) | delivered (kpps) | dropped | delivered vs direct |\n\
         |---:|---|---|---:|---:|---:|---:|"
    );
    for r in rows {
        let vs = r.delivered_vs_direct.map_or_else(
            || "-".to_owned(),
            |v| format!("{:+.1}%", (v.median - 1.0) * 100.0),
        );
        push_line!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} [{:.0}-{:.0}] | {:.1}% | {vs} |",
            r.services,
            r.flows,
            r.mode,
            r.offered_pps.median / 1e3,
            r.delivered_pps.median / 1e3,
            r.delivered_pps.min / 1e3,
            r.delivered_pps.max / 1e3,
            r.dropped_percent.median,
        );
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.xdp_events.is_empty())
        .map(|r| {
            let events: Vec<String> = r
                .xdp_events
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            format!(
                "- N = {}, {} flow(s): {} delivered; {}",
                r.services,
                r.flows,
                r.delivered_total,
                events.join(", ")
            )
        })
        .collect();
    if !notes.is_empty() {
        push_line!(
            md,
            "\nlb's XDP counters over the timed runs (`lb stats`; DNAT-only flows are rewritten in XDP and passed to the stack, `xdp_redirect` counts only SNAT'd and reply packets):\n"
        );
        for note in notes {
            push_line!(md, "{note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify_udp(buf: &[u8; PACKET_LEN]) -> u16 {
        let udp_len = u16::from_be_bytes([buf[24], buf[25]]);
        let pseudo = ones_sum(0, &buf[12..20]) + 17 + u32::from(udp_len);
        fold(ones_sum(pseudo, &buf[20..]))
    }

    #[test]
    fn a_stamped_datagram_has_its_addresses_and_a_valid_udp_checksum() {
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 20_000);
        let mut buf = [0u8; PACKET_LEN];
        for i in [0, 1, 64_511, 64_512, NEW_FLOWS - 1, 123_456_789] {
            let src = new_flow(i);
            stamp(&mut buf, src, dst);
            assert_eq!(buf[0], 0x45);
            assert_eq!(buf[9], 17);
            assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 46);
            assert_eq!(&buf[12..16], &src.0.octets());
            assert_eq!(&buf[16..20], &[10, 200, 0, 1]);
            assert_eq!(u16::from_be_bytes([buf[20], buf[21]]), src.1);
            assert_eq!(u16::from_be_bytes([buf[22], buf[23]]), 20_000);
            assert_eq!(u16::from_be_bytes([buf[24], buf[25]]), 26);
            assert_ne!(u16::from_be_bytes([buf[26], buf[27]]), 0);
            // The one's complement sum over pseudo-header and datagram, checksum included,
            // is all ones (RFC 1071).
            assert_eq!(verify_udp(&buf), 0xffff, "flow {i}");
        }
    }

    #[test]
    fn the_checksum_matches_a_known_datagram() {
        // 10.200.0.2:40000 -> 10.201.0.10:8053, computed by hand: pseudo-header
        // 0a c8 00 02 0a c9 00 0a 00 11 00 1a, header 9c 40 1f 75 00 1a.
        let mut buf = [0u8; PACKET_LEN];
        stamp(
            &mut buf,
            ONE_FLOW,
            SocketAddrV4::new(Ipv4Addr::new(10, 201, 0, 10), 8053),
        );
        let mut sum = 0x0ac8 + 0x0002 + 0x0ac9 + 0x000a + 0x0011 + 0x001a;
        sum += 0x9c40 + 0x1f75 + 0x001a;
        for w in PAYLOAD.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        let expected = !fold(sum);
        assert_eq!(u16::from_be_bytes([buf[26], buf[27]]), expected);
    }

    #[test]
    fn new_flows_are_distinct_and_stay_in_the_client_subnet() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..200_000 {
            let (ip, port) = new_flow(i);
            assert!(seen.insert((ip, port)), "flow {i} repeats");
            let o = ip.octets();
            assert_eq!(o[..3], [10, 200, 0]);
            assert!((10..=250).contains(&o[3]));
            assert!(port >= 1024);
        }
        assert_eq!(
            new_flow(NEW_FLOWS - 1),
            (Ipv4Addr::new(10, 200, 0, 250), 65_535)
        );
        assert_eq!(new_flow(NEW_FLOWS), new_flow(0));
    }

    #[test]
    fn rates_are_per_second_with_the_dropped_share() {
        let sent = Sent {
            datagrams: 1_000_000,
            seconds: 2.0,
        };
        let (offered, delivered, dropped) = rates(sent, 750_000);
        assert!((offered - 500_000.0).abs() < 1e-6);
        assert!((delivered - 375_000.0).abs() < 1e-6);
        assert!((dropped - 0.25).abs() < 1e-12);
        // More counted than sent (a late datagram of an earlier run): no negative drops.
        assert!(rates(sent, 1_000_001).2.abs() < 1e-12);
        assert_eq!(rates(Sent::default(), 0), (0.0, 0.0, 0.0));
    }

    #[test]
    fn xdp_deltas_keep_the_xdp_events_that_grew() {
        let before = serde_json::json!({"xdp_redirect": 10, "xdp_tracked": 5, "sock_connect": 1});
        let after = serde_json::json!({"xdp_redirect": 110, "xdp_tracked": 5, "xdp_new_flow": 3, "sock_connect": 9});
        let mut into = BTreeMap::from([("xdp_redirect".to_owned(), 1)]);
        add_xdp_deltas(&before, &after, &mut into);
        assert_eq!(
            into,
            BTreeMap::from([
                ("xdp_new_flow".to_owned(), 3),
                ("xdp_redirect".to_owned(), 101)
            ])
        );
    }

    #[test]
    fn the_sink_counter_is_read_from_iptables_save() {
        let save = "# Generated by iptables-save v1.8.10 (legacy) on Mon Nov 30 03:00:00 2026\n\
                    *raw\n:PREROUTING ACCEPT [1234:56789]\n:OUTPUT ACCEPT [0:0]\n\
                    [987654:45432084] -A PREROUTING -p udp -m udp --dport 8053 -m length --length 46 -j DROP\n\
                    COMMIT\n";
        assert_eq!(sink_count(save), Some(987_654));
        assert_eq!(sink_count("*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
    }
}
