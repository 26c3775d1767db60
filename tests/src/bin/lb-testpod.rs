//! A test "pod": answers TCP and UDP with its name; and a test client that connects from
//! inside a given cgroup and network namespace and reports, as JSON, which backend answered,
//! what getpeername/recvfrom showed, or which errno it got.
//!
//! Servers speak a line protocol: every line received is answered with the pod's name and a
//! newline, so one connection can carry many requests (keep-alive). A first line starting
//! with `GET ` gets an HTTP/1.1 response with the name as body, for curl. A line
//! `after-eof MS` is answered only after the client half-closed (its FIN: `shutdown(SHUT_WR)`)
//! and `MS` milliseconds more; then the server closes too (tests/tests/north_south_flows.rs).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

// Socket patterns: its own file (src/bin would make a binary of any file beside this one).
#[path = "lb-testpod/patterns.rs"]
mod patterns;
// Held TCP sockets for the reverse-map tests (tests/tests/reverse_map.rs).
#[path = "lb-testpod/hold.rs"]
mod hold;

#[derive(Parser)]
struct Cli {
    /// Join this cgroup v2 directory first (the process moves; threads follow).
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    /// Then enter this network namespace (a /run/netns path).
    #[arg(long, global = true)]
    netns: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TCP and UDP on [::] (dual-stack) until killed.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "tcp")]
        tcp: Vec<u16>,
        #[arg(long = "udp")]
        udp: Vec<u16>,
        /// Benchmark server: echo single bytes, one TCP connection at a time (no thread per
        /// connection to blur the client's timings).
        #[arg(long)]
        bench: bool,
        /// Bind UDP to each of these addresses instead of [::], so replies leave from the
        /// address the request went to (a wildcard socket answers from the route's source
        /// address, which NAT on the way back would not recognise).
        #[arg(long = "udp-addr")]
        udp_addrs: Vec<std::net::IpAddr>,
        /// Answer "NAME CLIENT-ADDR:PORT": the source address the request arrived from (the
        /// north-south tests check that the client's address was preserved or not).
        #[arg(long)]
        show_client: bool,
    },
    /// Benchmark: `count` TCP transactions (connect, 1-byte request/response, close), one at
    /// a time; prints latency percentiles as JSON.
    RrTcp {
        addr: SocketAddr,
        /// More addresses: transaction i goes to the (i mod n)-th of ADDR and these (a
        /// direct client spreading over the pods as a Service does).
        #[arg(long)]
        spread: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Also call getpeername() once on each connected socket (the bench's program-cost
        /// pass: what `lb_getpeername*` costs on each kind of socket; it adds to the
        /// transaction's time).
        #[arg(long)]
        getpeername: bool,
    },
    /// Benchmark: `count` UDP 1-byte request/responses, each from a new socket.
    RrUdp {
        addr: SocketAddr,
        /// More addresses, as for `rr-tcp`.
        #[arg(long)]
        spread: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// How long to wait for each response before counting it lost (milliseconds).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// TCP: `count` connections with one request each, or one connection with `count`
    /// requests (`--keepalive`).
    Tcp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        keepalive: bool,
        /// Connect with an AF_INET6 socket to the IPv4-mapped address.
        #[arg(long)]
        mapped: bool,
        /// Pause between connections (milliseconds).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// UDP: `count` request/response pairs; a new socket for each unless `--same-socket`.
    Udp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// connect() the socket and use send/recv instead of sendto/recvfrom.
        #[arg(long)]
        connected: bool,
        #[arg(long)]
        same_socket: bool,
    },
    // ---- stale-socket tests (tests/tests/stale_sockets.rs); see `stream` below ----
    /// Long-running client: one socket sends a request every `interval_ms` for `duration_ms`
    /// and prints one JSON line per event (a reply, or an error with the socket's pending
    /// error), flushed at once. After an error other than a receive timeout the socket is
    /// closed and a new one connected, as an application would.
    Stream {
        addr: SocketAddr,
        /// One TCP connection (keep-alive) instead of a connected UDP socket.
        #[arg(long)]
        tcp: bool,
        /// UDP without connect(): sendto/recvfrom on one socket.
        #[arg(long)]
        unconnected: bool,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
    },
    // --- Socket patterns (tests/tests/socket_patterns.rs; code in lb-testpod/patterns.rs) ---
    /// One socket runs a script of steps, one outcome each: `connect:ADDR`,
    /// `fastopen-connect:ADDR`, `disconnect` (connect with AF_UNSPEC), `send`, `sendto:ADDR`, `fastopen:ADDR` (sendto with
    /// MSG_FASTOPEN), `sendmsg:ADDR`, `sendmmsg:ADDR,ADDR,..`, `recv`, `recvfrom`, `recvmsg`,
    /// `recvmmsg:N` (one outcome per datagram), `quiet:MS` (recvfrom expecting nothing),
    /// `readline` (TCP), `getpeername`, `mptcp` (is the connection MPTCP end to end),
    /// `same-slot:BITS`, `reused-slot:BITS`, `back` (lb's socket slots: see patterns.rs), `pause`
    /// ("paused" on stderr, then wait for a line on stdin: the socket stays open meanwhile).
    Steps {
        #[arg(long, value_enum)]
        socket: patterns::Kind,
        /// Receive timeout (milliseconds).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        steps: Vec<String>,
    },
    /// Hold TCP sockets opened on command (`open ADDR` lines on stdin) and report their
    /// getpeername and answering pod after each command line, as JSON lines.
    Hold,
    /// Serve the line protocol over MPTCP (dual-stack) on `port` until killed.
    ServeMptcp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    // --- end of socket patterns ---
}

/// One request's outcome.
#[derive(Serialize, Default)]
struct Outcome {
    /// The name of the pod that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    /// getpeername() (TCP, connected UDP) or recvfrom()'s source (unconnected UDP).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    /// The errno, when the request failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Outcome {
    fn failed(e: &std::io::Error) -> Self {
        Self {
            errno: e.raw_os_error(),
            error: Some(e.to_string()),
            ..Self::default()
        }
    }
}

fn join(cgroup: Option<&PathBuf>, netns: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), "0")
            .with_context(|| format!("joining {}", cgroup.display()))?;
    }
    if let Some(netns) = netns {
        let file =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        // SAFETY: setns on a namespace fd we own; affects only this (still single) thread,
        // before any other thread exists.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn serve_tcp(listener: TcpListener, name: String, show_client: bool) {
    for stream in listener.incoming().flatten() {
        let name = match stream.peer_addr() {
            Ok(peer) if show_client => format!("{name} {}", unmapped(peer)),
            _ => name.clone(),
        };
        std::thread::spawn(move || {
            let Ok(read) = stream.try_clone() else { return };
            let mut write = stream;
            let mut lines = BufReader::new(read).lines();
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("GET ") {
                    // Drain the request headers, answer, close.
                    for header in lines.by_ref() {
                        if header.map_or(true, |h| h.is_empty()) {
                            break;
                        }
                    }
                    let body = format!("{name}\n");
                    let _closing = write.write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
                    );
                    return;
                }
                if let Some(ms) = line
                    .strip_prefix("after-eof ")
                    .and_then(|ms| ms.trim().parse::<u64>().ok())
                {
                    // A half-closed request: read to the client's FIN, wait, answer, close.
                    while let Some(Ok(_)) = lines.next() {}
                    std::thread::sleep(Duration::from_millis(ms));
                    let _closing = write.write_all(format!("{name}\n").as_bytes());
                    return;
                }
                if write.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

/// The benchmark server: one connection at a time, each byte echoed.
fn serve_tcp_echo(listener: TcpListener) {
    use std::io::Read as _;
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let _nodelay = stream.set_nodelay(true);
        let mut byte = [0u8; 1];
        while let Ok(1) = stream.read(&mut byte) {
            if stream.write_all(&byte).is_err() {
                break;
            }
        }
    }
}

fn serve_udp_echo(socket: UdpSocket) {
    let mut buf = [0u8; 64];
    loop {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _lost = socket.send_to(&buf[..n], from);
        }
    }
}

fn serve_udp(socket: UdpSocket, name: String, show_client: bool) {
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let answer = if show_client {
                format!("{name} {}", unmapped(from))
            } else {
                name.clone()
            };
            let _lost = socket.send_to(answer.as_bytes(), from);
        }
    }
}

/// An IPv4 client of a dual-stack socket shows as itself, not as `::ffff:a.b.c.d`.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn dual_stack(port: u16, udp: bool) -> anyhow::Result<i32> {
    // std binds [::] with IPV6_V6ONLY as the sysctl says; set it off explicitly.
    let ty = if udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is a valid local value.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let off: libc::c_int = 0;
        let on: libc::c_int = 1;
        let len = size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            len,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const on).cast(),
            len,
        );
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        if libc::bind(
            fd,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            bail!("bind [::]:{port}: {}", std::io::Error::last_os_error());
        }
        if !udp && libc::listen(fd, 1024) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn serve(
    name: &str,
    tcp: &[u16],
    udp: &[u16],
    bench: bool,
    udp_addrs: &[std::net::IpAddr],
    show_client: bool,
) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd as _;
    let mut threads = Vec::new();
    for &port in tcp {
        // SAFETY: a fresh descriptor from dual_stack, owned by the listener from here on.
        let listener = unsafe { TcpListener::from_raw_fd(dual_stack(port, false)?) };
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            if bench {
                serve_tcp_echo(listener);
            } else {
                serve_tcp(listener, name, show_client);
            }
        }));
    }
    for &port in udp {
        let sockets: Vec<UdpSocket> = if udp_addrs.is_empty() {
            // SAFETY: as above.
            vec![unsafe { UdpSocket::from_raw_fd(dual_stack(port, true)?) }]
        } else {
            udp_addrs
                .iter()
                .map(|ip| UdpSocket::bind((*ip, port)))
                .collect::<Result<_, _>>()?
        };
        for socket in sockets {
            let name = name.to_owned();
            threads.push(std::thread::spawn(move || {
                if bench {
                    serve_udp_echo(socket);
                } else {
                    serve_udp(socket, name, show_client);
                }
            }));
        }
    }
    // Ready: the parent waits for this line.
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ended = t.join();
    }
    Ok(())
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

fn tcp_request(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> Outcome {
    if let Err(e) = stream.write_all(b"who\n") {
        return Outcome::failed(&e);
    }
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Outcome {
            error: Some("closed".into()),
            ..Outcome::default()
        },
        Ok(_) => Outcome {
            backend: Some(line.trim().to_owned()),
            peer: stream.peer_addr().ok().map(|a| a.to_string()),
            ..Outcome::default()
        },
        Err(e) => Outcome::failed(&e),
    }
}

fn tcp_connect(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

fn tcp(addr: SocketAddr, count: usize, keepalive: bool, pause: Duration) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(count);
    if keepalive {
        match tcp_connect(addr) {
            Ok((mut stream, mut reader)) => {
                for _ in 0..count {
                    out.push(tcp_request(&mut stream, &mut reader));
                }
            }
            Err(e) => out.push(Outcome::failed(&e)),
        }
        return out;
    }
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(pause);
        }
        out.push(match tcp_connect(addr) {
            Ok((mut stream, mut reader)) => tcp_request(&mut stream, &mut reader),
            Err(e) => Outcome::failed(&e),
        });
    }
    out
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(addr)
    } else {
        "[::]:0".parse().unwrap_or(addr)
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

fn udp_request(socket: &UdpSocket, addr: SocketAddr, connected: bool) -> Outcome {
    let mut buf = [0u8; 1500];
    if connected {
        if let Err(e) = socket.connect(addr).and_then(|()| socket.send(b"who")) {
            return Outcome::failed(&e);
        }
        return match socket.recv(&mut buf) {
            Ok(n) => Outcome {
                backend: Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                peer: socket.peer_addr().ok().map(|a| a.to_string()),
                ..Outcome::default()
            },
            Err(e) => Outcome::failed(&e),
        };
    }
    if let Err(e) = socket.send_to(b"who", addr) {
        return Outcome::failed(&e);
    }
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => Outcome {
            backend: Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            peer: Some(from.to_string()),
            ..Outcome::default()
        },
        Err(e) => Outcome::failed(&e),
    }
}

fn udp(addr: SocketAddr, count: usize, connected: bool, same_socket: bool) -> Vec<Outcome> {
    let mut shared = None;
    (0..count)
        .map(|_| {
            let fresh;
            let socket = if same_socket {
                shared.get_or_insert_with(|| udp_socket(addr))
            } else {
                fresh = udp_socket(addr);
                &fresh
            };
            match socket {
                Ok(s) => udp_request(s, addr, connected),
                Err(e) => Outcome::failed(e),
            }
        })
        .collect()
}

/// Latency summary of a benchmark run, in nanoseconds.
#[derive(Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    mean: u64,
}

impl Latency {
    fn of(samples: &mut [u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into a non-empty slice"
            )]
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[i]
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            mean: u64::try_from(sum / samples.len() as u128).unwrap_or(u64::MAX),
        })
    }
}

/// What a benchmark client reports.
#[derive(Serialize)]
struct RrReport {
    /// connect() alone (TCP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_ns: Option<Latency>,
    /// The whole transaction: connect (or new socket), request, response, close.
    transaction_ns: Option<Latency>,
    /// Completed transactions per second over the whole run.
    per_second: f64,
    completed: usize,
    errors: usize,
    /// The first error seen, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `count` TCP transactions, the i-th to `addrs[i % addrs.len()]` (`addrs` is not empty).
fn rr_tcp(addrs: &[SocketAddr], count: usize, getpeername: bool) -> RrReport {
    use std::io::Read as _;
    let mut connects = Vec::with_capacity(count);
    let mut transactions = Vec::with_capacity(count);
    let mut first_error = None;
    let started = std::time::Instant::now();
    for addr in addrs.iter().cycle().take(count) {
        let t0 = std::time::Instant::now();
        let result = TcpStream::connect(addr).and_then(|mut s| {
            let connected = t0.elapsed();
            s.set_nodelay(true)?;
            if getpeername {
                s.peer_addr()?;
            }
            s.write_all(b"x")?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)?;
            Ok(connected)
        });
        match result {
            Ok(connected) => {
                transactions.push(nanos(t0.elapsed()));
                connects.push(nanos(connected));
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(
        Some(&mut connects),
        &mut transactions,
        count,
        elapsed,
        first_error,
    )
}

/// `count` UDP transactions, each from a new socket, the i-th to `addrs[i % addrs.len()]`.
fn rr_udp(addrs: &[SocketAddr], count: usize, timeout: Duration) -> RrReport {
    let mut transactions = Vec::with_capacity(count);
    let mut first_error = None;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    for &addr in addrs.iter().cycle().take(count) {
        let t0 = std::time::Instant::now();
        let result = udp_socket(addr).and_then(|s| {
            s.set_read_timeout(Some(timeout))?;
            s.send_to(b"x", addr)?;
            s.recv_from(&mut buf)
        });
        match result {
            Ok(_) => transactions.push(nanos(t0.elapsed())),
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(None, &mut transactions, count, elapsed, first_error)
}

fn report(
    connects: Option<&mut Vec<u64>>,
    transactions: &mut [u64],
    count: usize,
    elapsed: f64,
    first_error: Option<String>,
) -> RrReport {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let per_second = transactions.len() as f64 / elapsed.max(1e-9);
    RrReport {
        connect_ns: connects.and_then(|c| Latency::of(c)),
        completed: transactions.len(),
        errors: count - transactions.len(),
        transaction_ns: Latency::of(transactions),
        per_second,
        first_error,
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    join(cli.cgroup.as_ref(), cli.netns.as_ref())?;
    let outcomes = match cli.command {
        Command::Serve {
            name,
            tcp,
            udp,
            bench,
            udp_addrs,
            show_client,
        } => return serve(&name, &tcp, &udp, bench, &udp_addrs, show_client),
        Command::RrTcp {
            addr,
            spread,
            count,
            getpeername,
        } => {
            let addrs: Vec<SocketAddr> = std::iter::once(addr).chain(spread).collect();
            return print_json(&rr_tcp(&addrs, count, getpeername));
        }
        Command::RrUdp {
            addr,
            spread,
            count,
            timeout_ms,
        } => {
            let addrs: Vec<SocketAddr> = std::iter::once(addr).chain(spread).collect();
            return print_json(&rr_udp(&addrs, count, Duration::from_millis(timeout_ms)));
        }
        Command::Tcp {
            addr,
            count,
            keepalive,
            mapped: use_mapped,
            pause_ms,
        } => tcp(
            if use_mapped { mapped(addr) } else { addr },
            count,
            keepalive,
            Duration::from_millis(pause_ms),
        ),
        Command::Udp {
            addr,
            count,
            connected,
            same_socket,
        } => udp(addr, count, connected, same_socket),
        Command::Stream {
            addr,
            tcp,
            unconnected,
            interval_ms,
            duration_ms,
        } => {
            stream::run(
                addr,
                stream::Kind::of(tcp, unconnected),
                Duration::from_millis(interval_ms),
                Duration::from_millis(duration_ms),
            );
            return Ok(());
        }
        // --- Socket patterns ---
        Command::Steps {
            socket,
            timeout_ms,
            steps,
        } => patterns::run(socket, Duration::from_millis(timeout_ms), &steps)?,
        Command::ServeMptcp { name, port } => return patterns::serve_mptcp(&name, port),
        Command::Hold => return hold::run(),
        // --- end of socket patterns ---
    };
    print_json(&outcomes)
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(std::io::stdout().lock(), value)?;
    println!();
    Ok(())
}

// ---- stale-socket tests: the long-running client (`stream`) ----

mod stream {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{SocketAddr, TcpStream, UdpSocket},
        time::{Duration, Instant, SystemTime},
    };

    use serde::Serialize;

    /// How long a reply may take before the request counts as lost (the socket stays).
    const REPLY_TIMEOUT: Duration = Duration::from_millis(500);

    #[derive(Clone, Copy)]
    pub enum Kind {
        ConnectedUdp,
        UnconnectedUdp,
        Tcp,
    }

    impl Kind {
        pub fn of(tcp: bool, unconnected: bool) -> Self {
            match (tcp, unconnected) {
                (true, _) => Self::Tcp,
                (false, true) => Self::UnconnectedUdp,
                (false, false) => Self::ConnectedUdp,
            }
        }
    }

    /// One line of output.
    #[derive(Serialize, Default)]
    struct Event {
        /// Wall clock, milliseconds since the Unix epoch (the test compares it with its own).
        t_ms: u64,
        /// The pod that answered.
        #[serde(skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        /// The call that failed: connect, send or recv.
        #[serde(skip_serializing_if = "Option::is_none")]
        op: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        errno: Option<i32>,
        /// SO_ERROR after the failure (a destroyed UDP socket reports ECONNABORTED here when
        /// the failing call was a send).
        #[serde(skip_serializing_if = "Option::is_none")]
        so_error: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    enum Conn {
        Udp(UdpSocket, bool),
        Tcp(TcpStream, BufReader<TcpStream>),
    }

    struct Failure {
        op: &'static str,
        error: std::io::Error,
        so_error: Option<i32>,
    }

    impl Conn {
        fn open(addr: SocketAddr, kind: Kind) -> std::io::Result<Self> {
            match kind {
                Kind::Tcp => {
                    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    let reader = BufReader::new(stream.try_clone()?);
                    Ok(Self::Tcp(stream, reader))
                }
                Kind::ConnectedUdp | Kind::UnconnectedUdp => {
                    let local = if addr.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    };
                    let socket = UdpSocket::bind(local)?;
                    socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    let connected = matches!(kind, Kind::ConnectedUdp);
                    if connected {
                        socket.connect(addr)?;
                    }
                    Ok(Self::Udp(socket, connected))
                }
            }
        }

        fn so_error(&self) -> Option<i32> {
            let error = match self {
                Self::Udp(s, _) => s.take_error(),
                Self::Tcp(s, _) => s.take_error(),
            };
            error.ok().flatten().and_then(|e| e.raw_os_error())
        }

        fn request(&mut self, addr: SocketAddr) -> Result<String, Failure> {
            let fail = |conn: &Self, op, error| Failure {
                op,
                error,
                so_error: conn.so_error(),
            };
            let mut buf = [0u8; 1500];
            let result = match self {
                Self::Udp(socket, true) => socket
                    .send(b"who")
                    .map_err(|e| ("send", e))
                    .and_then(|_| socket.recv(&mut buf).map_err(|e| ("recv", e)))
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()),
                Self::Udp(socket, false) => socket
                    .send_to(b"who", addr)
                    .map_err(|e| ("send", e))
                    .and_then(|_| socket.recv_from(&mut buf).map_err(|e| ("recv", e)))
                    .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned()),
                Self::Tcp(stream, reader) => stream
                    .write_all(b"who\n")
                    .map_err(|e| ("send", e))
                    .and_then(|()| {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) => Err((
                                "recv",
                                std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "closed by the peer",
                                ),
                            )),
                            Ok(_) => Ok(line.trim().to_owned()),
                            Err(e) => Err(("recv", e)),
                        }
                    }),
            };
            result.map_err(|(op, error)| fail(self, op, error))
        }
    }

    fn emit(event: &Event) {
        let mut out = std::io::stdout().lock();
        if serde_json::to_writer(&mut out, event).is_ok() {
            let _printed = writeln!(out).and_then(|()| out.flush());
        }
    }

    fn failed(op: &'static str, error: &std::io::Error, so_error: Option<i32>) -> Event {
        Event {
            t_ms: now_ms(),
            op: Some(op),
            errno: error.raw_os_error(),
            so_error,
            error: Some(error.to_string()),
            ..Event::default()
        }
    }

    pub fn run(addr: SocketAddr, kind: Kind, interval: Duration, duration: Duration) {
        let end = Instant::now() + duration;
        let mut conn: Option<Conn> = None;
        while Instant::now() < end {
            let current = match conn.take() {
                Some(c) => Some(c),
                None => match Conn::open(addr, kind) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        emit(&failed("connect", &e, None));
                        None
                    }
                },
            };
            if let Some(mut c) = current {
                match c.request(addr) {
                    Ok(backend) => {
                        emit(&Event {
                            t_ms: now_ms(),
                            backend: Some(backend),
                            ..Event::default()
                        });
                        conn = Some(c);
                    }
                    Err(f) => {
                        emit(&failed(f.op, &f.error, f.so_error));
                        let timeout = matches!(
                            f.error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        );
                        // A lost reply keeps the socket; anything else reconnects.
                        if timeout {
                            conn = Some(c);
                        }
                    }
                }
            }
            std::thread::sleep(interval);
        }
    }
}
