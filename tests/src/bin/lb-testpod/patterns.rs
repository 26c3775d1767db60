//! Socket patterns (tests/tests/socket_patterns.rs): one socket of a chosen kind runs a
//! script of steps (connect, sendto, sendmsg, sendmmsg, recvfrom, recvmsg, recvmmsg,
//! getpeername, TCP Fast Open, ...), each reported as one [`Outcome`], so a test can check
//! what every syscall showed. Plus an MPTCP server.
//!
//! Addresses are given as Rust writes them; a V4 address is sent as `sockaddr_in` and a V6
//! one as `sockaddr_in6` whatever the socket's family, so `[::ffff:10.96.0.1]:53` is the
//! v4-mapped form on an AF_INET6 socket and `10.96.0.1:53` an AF_INET address on it.

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::Outcome;

/// `SOL_MPTCP` and `MPTCP_INFO` (include/uapi/linux/mptcp.h); not in the libc crate.
const SOL_MPTCP: libc::c_int = 284;
const MPTCP_INFO: libc::c_int = 1;

/// What every request datagram or line carries (the servers answer with their name).
const REQUEST: &[u8] = b"who\n";

/// The kinds of socket a script can run on.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    Udp4,
    /// AF_INET6 UDP, dual-stack (`IPV6_V6ONLY` off).
    Udp6,
    Tcp4,
    /// AF_INET6 TCP, dual-stack.
    Tcp6,
    /// `socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)`.
    Mptcp4,
    /// AF_INET6 MPTCP, dual-stack.
    Mptcp6,
}

/// `ret`, or the errno as an error (kept raw, so the outcome reports it).
fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt with a pointer to a local int and its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret).map(|_| ())
}

/// A new socket of `kind`, with `timeout` on receives.
fn open(kind: Kind, timeout: Duration) -> std::io::Result<OwnedFd> {
    let (family, ty, proto) = match kind {
        Kind::Udp4 => (libc::AF_INET, libc::SOCK_DGRAM, 0),
        Kind::Udp6 => (libc::AF_INET6, libc::SOCK_DGRAM, 0),
        Kind::Tcp4 => (libc::AF_INET, libc::SOCK_STREAM, 0),
        Kind::Tcp6 => (libc::AF_INET6, libc::SOCK_STREAM, 0),
        Kind::Mptcp4 => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
        Kind::Mptcp6 => (libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
    };
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = check(unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: a fresh descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if family == libc::AF_INET6 {
        set_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    set_timeout(fd.as_raw_fd(), timeout)?;
    Ok(fd)
}

fn set_timeout(fd: RawFd, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: setsockopt with a pointer to a local timeval and its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    check(ret).map(|_| ())
}

/// `addr` as a sockaddr: `sockaddr_in` for V4, `sockaddr_in6` for V6.
fn to_raw(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_raw(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                sin.sin_addr.s_addr.to_ne_bytes().into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            )))
        }
        _ => None,
    }
}

fn peer_name(fd: RawFd) -> std::io::Result<Option<String>> {
    // SAFETY: all-zero is a valid sockaddr_storage; getpeername writes at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    check(unsafe { libc::getpeername(fd, (&raw mut ss).cast(), &raw mut len) })?;
    Ok(from_raw(&ss).map(|a| a.to_string()))
}

fn parse(arg: &str) -> anyhow::Result<SocketAddr> {
    arg.parse()
        .with_context(|| format!("{arg:?} is not an address:port"))
}

fn reply(buf: &[u8], from: Option<SocketAddr>) -> Outcome {
    Outcome {
        backend: Some(String::from_utf8_lossy(buf).trim().to_owned()),
        peer: from.map(|a| a.to_string()),
        ..Outcome::default()
    }
}

fn sent(result: std::io::Result<libc::c_int>) -> Outcome {
    match result {
        Ok(_) => Outcome::default(),
        Err(e) => Outcome::failed(&e),
    }
}

/// One message header for `sendmsg`/`sendmmsg` to `to`, pointing at `to_raw`'s storage and
/// the request.
fn header(
    name: &mut (libc::sockaddr_storage, libc::socklen_t),
    iov: &mut libc::iovec,
) -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr (no control data, no flags).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name.0).cast();
    msg.msg_namelen = name.1;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg
}

fn request_iov() -> libc::iovec {
    libc::iovec {
        iov_base: REQUEST.as_ptr().cast_mut().cast(),
        iov_len: REQUEST.len(),
    }
}

/// Runs one step; appends its outcome(s).
fn step(fd: RawFd, step: &str, timeout: Duration, out: &mut Vec<Outcome>) -> anyhow::Result<()> {
    let (verb, arg) = step.split_once(':').unwrap_or((step, ""));
    match verb {
        // connect(ADDR)
        "connect" => {
            let (ss, len) = to_raw(parse(arg)?);
            // SAFETY: connect with a valid sockaddr of `len` bytes.
            out.push(sent(check(unsafe {
                libc::connect(fd, (&raw const ss).cast(), len)
            })));
        }
        // setsockopt(TCP_FASTOPEN_CONNECT) and connect(ADDR): the SYN leaves with the first
        // write.
        "fastopen-connect" => {
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, 1)?;
            let (ss, len) = to_raw(parse(arg)?);
            // SAFETY: as for connect.
            out.push(sent(check(unsafe {
                libc::connect(fd, (&raw const ss).cast(), len)
            })));
        }
        // connect() with AF_UNSPEC: dissolves the association (a TCP socket goes back to
        // CLOSE and may connect again).
        "disconnect" => {
            // SAFETY: all-zero is a valid sockaddr_storage; only its family is read.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            ss.ss_family = libc::AF_UNSPEC as libc::sa_family_t;
            let len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: connect with a valid sockaddr of `len` bytes.
            out.push(sent(check(unsafe {
                libc::connect(fd, (&raw const ss).cast(), len)
            })));
        }
        // send() on a connected socket.
        "send" => {
            // SAFETY: send of a static buffer.
            out.push(sent(check(
                unsafe { libc::send(fd, REQUEST.as_ptr().cast(), REQUEST.len(), 0) } as libc::c_int,
            )));
        }
        // sendto(ADDR), and sendto(ADDR, MSG_FASTOPEN) on a TCP socket.
        "sendto" | "fastopen" => {
            let flags = if verb == "fastopen" {
                libc::MSG_FASTOPEN
            } else {
                0
            };
            let (ss, len) = to_raw(parse(arg)?);
            // SAFETY: sendto of a static buffer with a valid sockaddr.
            out.push(sent(check(unsafe {
                libc::sendto(
                    fd,
                    REQUEST.as_ptr().cast(),
                    REQUEST.len(),
                    flags,
                    (&raw const ss).cast(),
                    len,
                )
            } as libc::c_int)));
        }
        // sendmsg() with ADDR as msg_name.
        "sendmsg" => {
            let mut name = to_raw(parse(arg)?);
            let mut iov = request_iov();
            let msg = header(&mut name, &mut iov);
            // SAFETY: the header points at live locals.
            out.push(sent(check(
                unsafe { libc::sendmsg(fd, &raw const msg, 0) } as libc::c_int
            )));
        }
        // sendmmsg(): one datagram to each ADDR (comma-separated), in one call.
        "sendmmsg" => {
            let mut names = arg
                .split(',')
                .map(|a| parse(a).map(to_raw))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut iovs: Vec<libc::iovec> = names.iter().map(|_| request_iov()).collect();
            let mut msgs: Vec<libc::mmsghdr> = names
                .iter_mut()
                .zip(iovs.iter_mut())
                .map(|(name, iov)| libc::mmsghdr {
                    msg_hdr: header(name, iov),
                    msg_len: 0,
                })
                .collect();
            let vlen = libc::c_uint::try_from(msgs.len()).context("too many messages")?;
            // SAFETY: the headers point at the live vectors above.
            let ret = check(unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), vlen, 0) });
            match ret {
                Ok(n) if n as usize == msgs.len() => out.push(Outcome::default()),
                Ok(n) => out.push(Outcome {
                    error: Some(format!("sendmmsg sent {n} of {}", msgs.len())),
                    ..Outcome::default()
                }),
                Err(e) => out.push(Outcome::failed(&e)),
            }
        }
        // recv(): the answer, no address.
        "recv" => {
            let mut buf = [0u8; 1500];
            // SAFETY: recv into a local buffer of its size.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            out.push(match check(n as libc::c_int) {
                Ok(n) => reply(&buf[..n as usize], None),
                Err(e) => Outcome::failed(&e),
            });
        }
        // recvfrom(), also with a timeout of ARG milliseconds ("quiet:MS": expects nothing,
        // so the outcome is EAGAIN when all is well).
        "recvfrom" | "quiet" => {
            if verb == "quiet" {
                set_timeout(fd, Duration::from_millis(arg.parse().context("quiet:MS")?))?;
            }
            let mut buf = [0u8; 1500];
            // SAFETY: as for recv, plus a sockaddr_storage and its size.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: as above.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut ss).cast(),
                    &raw mut len,
                )
            };
            out.push(match check(n as libc::c_int) {
                Ok(n) => reply(&buf[..n as usize], from_raw(&ss)),
                Err(e) => Outcome::failed(&e),
            });
            if verb == "quiet" {
                set_timeout(fd, timeout)?;
            }
        }
        // recvmsg() with a msg_name.
        "recvmsg" => {
            let mut buf = [0u8; 1500];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut name = (unsafe { std::mem::zeroed() }, 0);
            name.1 = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let mut msg = header(&mut name, &mut iov);
            // SAFETY: the header points at live locals.
            let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
            out.push(match check(n as libc::c_int) {
                Ok(n) => reply(&buf[..n as usize], from_raw(&name.0)),
                Err(e) => Outcome::failed(&e),
            });
        }
        // recvmmsg(): N datagrams, received with as few calls as they arrive in (each call
        // takes up to N at once); one outcome per datagram.
        "recvmmsg" => {
            let want: usize = arg.parse().context("recvmmsg:N")?;
            // Let the answers arrive, so that one call receives several.
            std::thread::sleep(Duration::from_millis(200));
            let mut got = 0;
            while got < want {
                let n = recvmmsg(fd, want - got, out);
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        // TCP: read one answer line; the peer is getpeername().
        "readline" => {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            let outcome = loop {
                // SAFETY: read into a local byte.
                let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
                match check(n as libc::c_int) {
                    Ok(0) => {
                        break Outcome {
                            error: Some("closed".into()),
                            ..Outcome::default()
                        };
                    }
                    Ok(_) if byte[0] == b'\n' => {
                        let mut outcome = reply(&line, None);
                        match peer_name(fd) {
                            Ok(peer) => outcome.peer = peer,
                            Err(e) => outcome.error = Some(e.to_string()),
                        }
                        break outcome;
                    }
                    Ok(_) => line.push(byte[0]),
                    Err(e) => break Outcome::failed(&e),
                }
            };
            out.push(outcome);
        }
        // getpeername().
        "getpeername" => out.push(match peer_name(fd) {
            Ok(peer) => Outcome {
                peer,
                ..Outcome::default()
            },
            Err(e) => Outcome::failed(&e),
        }),
        // MPTCP: whether the connection is MPTCP end to end (not a fallback to TCP): the
        // outcome's backend is "mptcp", else the errno.
        "mptcp" => {
            let mut len: libc::socklen_t = 0;
            // SAFETY: a zero-length MPTCP_INFO query only reports whether MPTCP is in use.
            let ret = unsafe {
                libc::getsockopt(
                    fd,
                    SOL_MPTCP,
                    MPTCP_INFO,
                    std::ptr::null_mut(),
                    &raw mut len,
                )
            };
            out.push(match check(ret) {
                Ok(_) => Outcome {
                    backend: Some("mptcp".into()),
                    ..Outcome::default()
                },
                Err(e) => Outcome::failed(&e),
            });
        }
        // Holds the socket open for a while (e.g. for the MPTCP path manager to add a
        // subflow): "sleep:MS".
        "sleep" => {
            let ms: u64 = arg.parse().with_context(|| format!("step {step:?}"))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            out.push(Outcome::default());
        }
        // Holds the socket open until the driving test says go on: "paused" on stderr, then
        // one line read from stdin (tests/tests/upgrade.rs swaps the agent meanwhile).
        "pause" => {
            let mut err = std::io::stderr().lock();
            writeln!(err, "paused").and_then(|()| err.flush())?;
            drop(err);
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            out.push(Outcome::default());
        }
        _ => bail!("unknown step {step:?}"),
    }
    Ok(())
}

/// One recvmmsg() call for up to `max` datagrams; returns how many it received (0 on error,
/// which is reported).
fn recvmmsg(fd: RawFd, max: usize, out: &mut Vec<Outcome>) -> usize {
    let mut bufs = vec![[0u8; 1500]; max];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut names: Vec<(libc::sockaddr_storage, libc::socklen_t)> = (0..max)
        .map(|_| {
            (
                unsafe { std::mem::zeroed() },
                size_of::<libc::sockaddr_storage>() as libc::socklen_t,
            )
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = names
        .iter_mut()
        .zip(iovs.iter_mut())
        .map(|(name, iov)| libc::mmsghdr {
            msg_hdr: header(name, iov),
            msg_len: 0,
        })
        .collect();
    let vlen = libc::c_uint::try_from(max).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the headers point at the live vectors above; no timeout (SO_RCVTIMEO applies).
    let ret = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            vlen,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    match check(ret) {
        Ok(n) => {
            let n = n as usize;
            for (msg, buf) in msgs.iter().zip(&bufs).take(n) {
                // SAFETY: the kernel filled msg_name (a sockaddr_storage) for this message.
                let name: &libc::sockaddr_storage = unsafe { &*msg.msg_hdr.msg_name.cast() };
                out.push(reply(&buf[..msg.msg_len as usize], from_raw(name)));
            }
            n
        }
        Err(e) => {
            out.push(Outcome::failed(&e));
            0
        }
    }
}

/// Runs `steps` on one new socket of `kind`; one outcome per step (recvmmsg: per datagram).
/// `same-slot:BITS` keeps the socket open and goes on with a new socket of the same kind
/// whose cookie has the same low BITS bits (lb's `LB_TCP_SOCKS`/`LB_UDP_SOCKS` slot of the first): it opens
/// and closes sockets until one has (an error outcome if none did in 64 rounds of cookies).
/// `reused-slot:BITS` does the same but closes the socket first (the new one gets its slot
/// after it). `back` goes on with the socket `same-slot` kept last (the current one is kept
/// in its place).
pub fn run(kind: Kind, timeout: Duration, steps: &[String]) -> anyhow::Result<Vec<Outcome>> {
    let mut fd = open(kind, timeout).context("opening the socket")?;
    let mut held = Vec::new();
    let mut out = Vec::new();
    for s in steps {
        let (keep, bits) = match (s.strip_prefix("same-slot:"), s.strip_prefix("reused-slot:")) {
            (Some(bits), _) => (true, Some(bits)),
            (None, Some(bits)) => (false, Some(bits)),
            (None, None) => (true, None),
        };
        if let Some(bits) = bits {
            let bits: u32 = bits.parse().context("same-slot:BITS")?;
            let mask = (1u64 << bits) - 1;
            let want = cookie(fd.as_raw_fd())? & mask;
            let mut found = None;
            for _ in 0..(64u64 << bits) {
                let next = open(kind, timeout).context("opening a socket")?;
                if cookie(next.as_raw_fd())? & mask == want {
                    found = Some(next);
                    break;
                }
            }
            match found {
                Some(next) => {
                    let previous = std::mem::replace(&mut fd, next);
                    if keep {
                        held.push(previous);
                    }
                    out.push(Outcome::default());
                }
                None => out.push(Outcome {
                    error: Some("no socket with that slot".to_owned()),
                    ..Outcome::default()
                }),
            }
            continue;
        }
        if s == "back" {
            match held.pop() {
                Some(previous) => {
                    held.push(std::mem::replace(&mut fd, previous));
                    out.push(Outcome::default());
                }
                None => out.push(Outcome {
                    error: Some("no socket kept".to_owned()),
                    ..Outcome::default()
                }),
            }
            continue;
        }
        step(fd.as_raw_fd(), s, timeout, &mut out)?;
    }
    drop(held);
    Ok(out)
}

/// The socket's cookie (`SO_COOKIE`; the kernel gives it one on first use).
fn cookie(fd: RawFd) -> std::io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a local u64 and its size.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    })?;
    Ok(value)
}

/// Serves the line protocol over MPTCP on [::]:`port` (dual-stack; plain TCP clients are
/// accepted too) until killed.
pub fn serve_mptcp(name: &str, port: u16) -> anyhow::Result<()> {
    let fd = open(Kind::Mptcp6, Duration::ZERO).context("MPTCP socket")?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (ss, len) = to_raw(SocketAddr::new(
        std::net::Ipv6Addr::UNSPECIFIED.into(),
        port,
    ));
    // SAFETY: bind and listen on our own descriptor with a valid sockaddr.
    unsafe {
        check(libc::bind(fd.as_raw_fd(), (&raw const ss).cast(), len))?;
        check(libc::listen(fd.as_raw_fd(), 128))?;
    }
    let listener = TcpListener::from(fd);
    println!("ready");
    std::io::stdout().flush()?;
    super::serve_tcp(listener, name.to_owned(), false);
    Ok(())
}
