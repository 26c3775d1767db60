//! `hold`: TCP sockets kept open while the test changes lb around them, and what they show.
//!
//! Reads commands from stdin, one per line, and answers each with one JSON line: the peer
//! (getpeername) and the answering pod of every socket held so far, in opening order.
//! `open ADDR` connects a new socket to ADDR first; `open-in NETNS ADDR` does so from inside
//! the network namespace at path NETNS (the socket lives there; the process returns to its
//! own namespace); `stash I` puts socket I (0-based) in flight: sent to this process over a
//! Unix socket with `SCM_RIGHTS` and every descriptor of it closed, so that no process holds
//! it (reported with an error until `unstash I` receives it back); `churn I` moves socket
//! I's only descriptor to another number every 100 µs (`dup`, then `close` of the old one,
//! as after `dup2` or a fork whose parent closes its copy) until `unchurn I`; `show` only
//! reports. EOF ends it.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use serde::Serialize;

/// One held socket as it is now.
#[derive(Serialize)]
struct Held {
    /// What the socket was connected to.
    to: String,
    /// getpeername, or the error.
    peer: Option<String>,
    /// The pod's answer to a request on the socket.
    backend: Option<String>,
    error: Option<String>,
}

struct Conn {
    to: SocketAddr,
    live: Option<Live>,
    /// While stashed: the receiving end of the Unix socket the TCP socket is in flight on.
    flight: Option<OwnedFd>,
    /// While churning: the stop flag of the thread moving the descriptor, and the thread
    /// (it returns the descriptor's last number).
    churn: Option<(Arc<AtomicBool>, JoinHandle<i32>)>,
}

struct Live {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Live {
    fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }
}

impl Conn {
    fn open(to: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        Ok(Self {
            to,
            live: Some(Live::new(stream)?),
            flight: None,
            churn: None,
        })
    }

    /// Connects from inside the namespace at `netns`, then returns to this thread's own.
    fn open_in(netns: &str, to: SocketAddr) -> anyhow::Result<Self> {
        let home = File::open("/proc/thread-self/ns/net")?;
        let there = File::open(netns).with_context(|| format!("open {netns}"))?;
        setns(&there)?;
        let conn = Self::open(to);
        setns(&home)?;
        Ok(conn?)
    }

    /// Sends the socket to ourselves with SCM_RIGHTS and closes every descriptor of it.
    fn stash(&mut self) -> anyhow::Result<()> {
        let live = self.live.take().context("already stashed")?;
        let (tx, rx) = socketpair()?;
        send_fd(&tx, live.stream.as_raw_fd())?;
        drop(live);
        self.flight = Some(rx);
        Ok(())
    }

    fn unstash(&mut self) -> anyhow::Result<()> {
        let rx = self.flight.take().context("not stashed")?;
        let fd = recv_fd(&rx)?;
        // SAFETY: a descriptor the kernel just installed for us, a TCP socket.
        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        self.live = Some(Live::new(stream)?);
        Ok(())
    }

    /// Keeps moving the socket's only descriptor (the reader's copy is closed).
    fn churn(&mut self) -> anyhow::Result<()> {
        let Live { stream, reader } = self.live.take().context("not live")?;
        drop(reader);
        let mut fd = stream.into_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let theirs = stop.clone();
        let thread = std::thread::spawn(move || {
            while !theirs.load(Ordering::Relaxed) {
                // SAFETY: dup of a descriptor this thread alone uses, then close of the old
                // number; the socket always has one.
                let new = unsafe { libc::dup(fd) };
                if new >= 0 {
                    // SAFETY: as above.
                    unsafe { libc::close(fd) };
                    fd = new;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            fd
        });
        self.churn = Some((stop, thread));
        Ok(())
    }

    fn unchurn(&mut self) -> anyhow::Result<()> {
        let (stop, thread) = self.churn.take().context("not churning")?;
        stop.store(true, Ordering::Relaxed);
        let fd = thread
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))?;
        // SAFETY: the socket's only descriptor, handed back by the thread that owned it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        self.live = Some(Live::new(stream)?);
        Ok(())
    }

    fn show(&mut self) -> Held {
        let Some(live) = &mut self.live else {
            return Held {
                to: self.to.to_string(),
                peer: None,
                backend: None,
                error: Some(
                    if self.churn.is_some() {
                        "churning"
                    } else {
                        "in flight"
                    }
                    .to_owned(),
                ),
            };
        };
        let peer = live.stream.peer_addr();
        let answer = live.stream.write_all(b"who\n").and_then(|()| {
            let mut line = String::new();
            live.reader
                .read_line(&mut line)
                .map(|_| line.trim().to_owned())
        });
        Held {
            to: self.to.to_string(),
            peer: peer.as_ref().ok().map(ToString::to_string),
            backend: answer.as_ref().ok().cloned(),
            error: peer.err().or_else(|| answer.err()).map(|e| e.to_string()),
        }
    }
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor we hold; only this (the only) thread moves.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two new descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one `SCM_RIGHTS` control message with one descriptor.
const CMSG_ROOM: usize = 64;

fn send_fd(tx: &OwnedFd, fd: i32) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u8; CMSG_ROOM];
    // SAFETY: a zeroed msghdr pointing at live buffers; the CMSG macros stay within
    // `control`, which has room for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(tx.as_raw_fd(), &raw const msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fd(rx: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u8; CMSG_ROOM];
    // SAFETY: as in send_fd; the received descriptor is owned below.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_ROOM as _;
        if libc::recvmsg(rx.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        anyhow::ensure!(
            !cmsg.is_null()
                && (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SCM_RIGHTS,
            "no descriptor received"
        );
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub fn run() -> anyhow::Result<()> {
    let mut conns: Vec<Conn> = Vec::new();
    let mut opened: Option<String> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("open ") {
            let to: SocketAddr = addr.parse()?;
            match Conn::open(to) {
                Ok(conn) => conns.push(conn),
                Err(e) => opened = Some(format!("connect {to}: {e}")),
            }
        } else if let Some(rest) = line.strip_prefix("open-in ") {
            let (netns, addr) = rest.split_once(' ').context("open-in NETNS ADDR")?;
            let to: SocketAddr = addr.parse()?;
            match Conn::open_in(netns, to) {
                Ok(conn) => conns.push(conn),
                Err(e) => opened = Some(format!("connect {to} in {netns}: {e:#}")),
            }
        } else if let Some((verb, i)) = line
            .split_once(' ')
            .filter(|(verb, _)| ["stash", "unstash", "churn", "unchurn"].contains(verb))
        {
            let conn = conns
                .get_mut(i.parse::<usize>()?)
                .context("no such socket")?;
            let done = match verb {
                "stash" => conn.stash(),
                "unstash" => conn.unstash(),
                "churn" => conn.churn(),
                _ => conn.unchurn(),
            };
            if let Err(e) = done {
                opened = Some(format!("{verb} {i}: {e:#}"));
            }
        }
        let held: Vec<Held> = conns.iter_mut().map(Conn::show).collect();
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({ "held": held, "error": opened.take() }),
        )?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}
