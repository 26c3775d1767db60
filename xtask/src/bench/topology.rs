//! The benchmark's network: a client "pod" (in a cgroup lb can attach to), a "node" that
//! routes between pods (where kube-proxy-style rules go: PREROUTING sees pod traffic, as on a
//! real node), and a backend "pod" holding the E endpoint addresses.
//!
//! ```text
//! client 10.200.0.2 ── node 10.200.0.1 | 10.201.0.1 ── backend 10.201.0.10 ...
//! ```
//!
//! The client has routes to the backend range and the Service range (10.96.0.0/12) through
//! the node, and no default route. Every mode measures over this same path; lb translates at
//! connect() in the client, the peers DNAT in the node.

use std::{net::Ipv4Addr, process::Command};

use anyhow::Context as _;
use lb_tests::{Cgroup, Netns, Proc, unique};

pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    /// The backend pod's namespace (the packets/s sink counts there).
    pub backend: Netns,
    pub cgroup: Cgroup,
    pub backends: Vec<Ipv4Addr>,
    _servers: Vec<Proc>,
}

/// The client's address.
pub const CLIENT_IP: &str = "10.200.0.2";

/// What the backend pod runs.
pub enum Servers {
    /// lb-testpod's echo servers on TCP 8080 and UDP 8053.
    Echo,
    /// iperf3 on TCP 8080.
    Iperf,
}

fn nsenter(ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
    crate::cmd::run_quiet(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(args),
    )
}

impl Topology {
    pub fn new(endpoints: usize, servers: &Servers) -> anyhow::Result<Self> {
        let id = unique("lb");
        let client = Netns::new(format!("{id}c"));
        let node = Netns::new(format!("{id}n"));
        let backend = Netns::new(format!("{id}b"));
        node.ip(&[
            "link",
            "add",
            "n0",
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client.name,
        ]);
        node.ip(&[
            "link",
            "add",
            "n1",
            "type",
            "veth",
            "peer",
            "name",
            "b0",
            "netns",
            &backend.name,
        ]);
        node.ip(&["addr", "add", "10.200.0.1/24", "dev", "n0"]);
        node.ip(&["addr", "add", "10.201.0.1/16", "dev", "n1"]);
        node.ip(&["link", "set", "n0", "up"]);
        node.ip(&["link", "set", "n1", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"]);
        client.ip(&["link", "set", "c0", "up"]);
        client.ip(&["route", "add", "10.201.0.0/16", "via", "10.200.0.1"]);
        client.ip(&["route", "add", "10.96.0.0/12", "via", "10.200.0.1"]);
        let backends: Vec<Ipv4Addr> = (0..endpoints).map(super::services::backend_ip).collect();
        for ip in &backends {
            backend.ip(&["addr", "add", &format!("{ip}/16"), "dev", "b0"]);
        }
        backend.ip(&["link", "set", "b0", "up"]);
        backend.ip(&["route", "add", "10.200.0.0/24", "via", "10.201.0.1"]);
        nsenter(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Many short connections from one client: reuse TIME_WAIT ports, use the whole range.
        nsenter(
            &client,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"],
        )?;
        nsenter(&client, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        let cgroup = Cgroup::new(&id);
        let server = match servers {
            Servers::Echo => {
                // One UDP socket per address: a reply leaves from the address its request
                // came to, which conntrack (iptables, nftables) and lb's reply translation
                // match on (a wildcard socket would answer from the first address).
                let udp_addrs: Vec<String> = backends
                    .iter()
                    .flat_map(|ip| ["--udp-addr".to_owned(), ip.to_string()])
                    .collect();
                lb_tests::die_with_parent(&mut Command::new(crate::cmd::testpod_bin()))
                    .arg("--netns")
                    .arg(backend.path())
                    .args([
                        "serve", "--name", "backend", "--bench", "--tcp", "8080", "--udp", "8053",
                    ])
                    .args(&udp_addrs)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .context("starting the echo server")?
            }
            Servers::Iperf => lb_tests::die_with_parent(&mut Command::new("nsenter"))
                .arg(format!("--net={}", backend.path().display()))
                .args(["iperf3", "-s", "-p", "8080"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?,
        };
        let mut server = Proc(server);
        if let Some(stdout) = server.0.stdout.take() {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        } else {
            // iperf3 prints nothing useful before a client; give it a moment to listen.
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        Ok(Self {
            client,
            node,
            backend,
            cgroup,
            backends,
            _servers: vec![server],
        })
    }

    /// Runs `program args` in the client pod, inside the cgroup; returns stdout.
    pub fn in_client(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} \"$@\"",
            self.cgroup.path.display(),
            self.client.path().display()
        );
        crate::cmd::output(
            Command::new("sh")
                .args(["-c", &script, "sh", program])
                .args(args),
        )
    }

    /// Runs `program args` in the client's namespace, outside lb's cgroup; returns stdout.
    pub fn in_client_outside(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        crate::cmd::output(
            Command::new("nsenter")
                .arg(format!("--net={}", self.client.path().display()))
                .arg(program)
                .args(args),
        )
    }

    /// Runs a command in the node's network namespace with `input` on stdin; returns how long
    /// it took, or None if it did not finish within `budget` (then it is killed).
    pub fn in_node_timed(
        &self,
        args: &[&str],
        input: &str,
        budget: std::time::Duration,
    ) -> anyhow::Result<Option<std::time::Duration>> {
        crate::cmd::timed_with_input(
            Command::new("nsenter")
                .arg(format!("--net={}", self.node.path().display()))
                .args(args),
            input,
            budget,
        )
    }
}
