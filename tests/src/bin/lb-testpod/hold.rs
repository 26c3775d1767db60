//! `hold`: TCP sockets kept open while the test changes lb around them, and what they show.
//!
//! Reads commands from stdin, one per line, and answers each with one JSON line: the peer
//! (getpeername) and the answering pod of every socket held so far, in opening order.
//! `open ADDR` connects a new socket to ADDR first; `show` only reports. EOF ends it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

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
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(to: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { to, stream, reader })
    }

    fn show(&mut self) -> Held {
        let peer = self.stream.peer_addr();
        let answer = self.stream.write_all(b"who\n").and_then(|()| {
            let mut line = String::new();
            self.reader
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
