//! The generated Service set every mode serves: N Services, each with a TCP port (80 ->
//! 8080) and a UDP port (53 -> 8053) and E endpoints (the same E for all, or the last
//! Service's own: [`ServiceSet::with_own_last`]), as lb manifests, kube-proxy-style
//! iptables-restore input and kube-proxy-style nftables input.

use std::net::Ipv4Addr;

/// Target ports on the backends.
pub const TCP_TARGET: u16 = 8080;
pub const UDP_TARGET: u16 = 8053;
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// Service `i`'s nodePort (TCP and UDP alike) in NodePort sets: 20000 onwards, so that
/// 10 000 Services fit (lb runs with `--nodeport-range 20000-32767`).
pub const NODEPORT_BASE: u16 = 20000;
/// The pod CIDR (clients and backends live in it): traffic from it is not masqueraded.
pub const CLUSTER_CIDR: &str = "10.200.0.0/14";

/// Endpoint `k`'s address: 10.201.0.10 onwards, as the backend pod holds them.
pub fn backend_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        201,
        u8::try_from(k / 200).unwrap_or(0),
        u8::try_from(10 + k % 200).unwrap_or(10),
    )
}

/// N Services over E backends.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub n: usize,
    /// Every Service's endpoints (but the last's, when it has its own).
    pub backends: Vec<Ipv4Addr>,
    /// The last Service's own endpoints (with N > 1), which no other Service shares.
    pub last_backends: Option<Vec<Ipv4Addr>>,
    /// `type: NodePort` Services whose endpoints are on this node (`nodeName`), when set.
    pub nodeport_node: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const BOTH: [Self; 2] = [Self::Tcp, Self::Udp];

    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn ports(self) -> (u16, u16) {
        match self {
            Self::Tcp => (TCP_PORT, TCP_TARGET),
            Self::Udp => (UDP_PORT, UDP_TARGET),
        }
    }

    fn port_name(self) -> &'static str {
        match self {
            Self::Tcp => "http",
            Self::Udp => "dns",
        }
    }
}

/// A short stable hash for chain names, like kube-proxy's base32 of sha256 (any stable,
/// collision-free-enough function serves: FNV-1a, 64 bits).
fn chain_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

impl ServiceSet {
    pub fn new(n: usize, backends: Vec<Ipv4Addr>) -> Self {
        Self {
            n,
            backends,
            last_backends: None,
            nodeport_node: None,
        }
    }

    /// The last Service (of N > 1) gets endpoints of its own, `backends`, as most Services
    /// of a cluster have (lb's reverse map then answers for its connects); the others share
    /// the common ones.
    pub fn with_own_last(mut self, backends: Vec<Ipv4Addr>) -> Self {
        self.last_backends = Some(backends);
        self
    }

    /// Service `i`'s endpoints.
    pub fn endpoints(&self, i: usize) -> &[Ipv4Addr] {
        match &self.last_backends {
            Some(own) if self.n > 1 && i == self.n - 1 => own,
            _ => &self.backends,
        }
    }

    /// The same set as `type: NodePort` Services (eTP Cluster), endpoints on node `node`.
    pub fn with_nodeports(mut self, node: &str) -> Self {
        self.nodeport_node = Some(node.to_owned());
        self
    }

    /// Service `i`'s nodePort.
    pub fn nodeport(i: usize) -> u16 {
        NODEPORT_BASE.saturating_add(u16::try_from(i).unwrap_or(u16::MAX))
    }

    /// Service `i`'s ClusterIP: 10.96.0.1 onwards (the /12 holds a million).
    pub fn vip(i: usize) -> Ipv4Addr {
        let base = u32::from(Ipv4Addr::new(10, 96, 0, 1));
        Ipv4Addr::from(base + u32::try_from(i).unwrap_or(u32::MAX))
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i:06}")
    }

    /// lb manifests: v1 Lists of `per_file` Services with their EndpointSlices, as
    /// (file name, JSON). `extra` adds endpoints to Service 0 (for change measurements).
    pub fn manifests(&self, per_file: usize, extra: &[Ipv4Addr]) -> Vec<(String, String)> {
        let mut files = Vec::new();
        let per_file = per_file.max(1);
        for start in (0..self.n).step_by(per_file) {
            let end = (start + per_file).min(self.n);
            files.push((
                format!("services-{start:06}.json"),
                self.manifest_file(start..end, extra),
            ));
        }
        files
    }

    /// The file that holds Service `i`.
    pub fn file_of(i: usize, per_file: usize) -> String {
        format!("services-{:06}.json", i / per_file.max(1) * per_file.max(1))
    }

    pub fn manifest_file(&self, range: std::ops::Range<usize>, extra: &[Ipv4Addr]) -> String {
        let mut items = Vec::with_capacity(range.len() * 2);
        for i in range {
            let name = Self::name(i);
            items.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "clusterIP": Self::vip(i).to_string(),
                    "ports": Proto::BOTH.iter().map(|p| {
                        let (port, target) = p.ports();
                        let mut port = serde_json::json!({"name": p.port_name(), "port": port, "targetPort": target, "protocol": p.lower().to_uppercase()});
                        if self.nodeport_node.is_some() {
                            port["nodePort"] = Self::nodeport(i).into();
                        }
                        port
                    }).collect::<Vec<_>>(),
                },
            }));
            if self.nodeport_node.is_some()
                && let Some(service) = items.last_mut()
            {
                service["spec"]["type"] = "NodePort".into();
            }
            let mut endpoints: Vec<Ipv4Addr> = self.endpoints(i).to_vec();
            if i == 0 {
                endpoints.extend_from_slice(extra);
            }
            items.push(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": Proto::BOTH.iter().map(|p| serde_json::json!({"name": p.port_name(), "port": p.ports().1, "protocol": p.lower().to_uppercase()})).collect::<Vec<_>>(),
                "endpoints": endpoints.iter().map(|ip| {
                    let mut ep = serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": true}});
                    if let Some(node) = &self.nodeport_node {
                        ep["nodeName"] = node.clone().into();
                    }
                    ep
                }).collect::<Vec<_>>(),
            }));
        }
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }

    fn svc_chain(i: usize, proto: Proto) -> String {
        format!(
            "KUBE-SVC-{}",
            chain_hash(&format!("default/{}:{}", Self::name(i), proto.port_name()))
        )
    }

    fn sep_chain(i: usize, proto: Proto, ip: Ipv4Addr) -> String {
        format!(
            "KUBE-SEP-{}",
            chain_hash(&format!(
                "default/{}:{}:{ip}",
                Self::name(i),
                proto.port_name()
            ))
        )
    }

    /// The KUBE-SVC chain body and KUBE-SEP chains of one Service port, as kube-proxy's
    /// iptables mode writes them.
    fn iptables_service(out: &mut String, i: usize, proto: Proto, endpoints: &[Ipv4Addr]) {
        let svc = Self::svc_chain(i, proto);
        let vip = Self::vip(i);
        let (port, target) = proto.ports();
        let p = proto.lower();
        let comment = format!("default/{}:{}", Self::name(i), proto.port_name());
        push_line!(
            out,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {p} -m comment --comment \"{comment} cluster IP\" -m {p} --dport {port} -j KUBE-MARK-MASQ"
        );
        for (k, ip) in endpoints.iter().enumerate() {
            let sep = Self::sep_chain(i, proto, *ip);
            let left = endpoints.len() - k;
            if left > 1 {
                #[expect(clippy::cast_precision_loss, reason = "a probability")]
                let probability = 1.0 / left as f64;
                push_line!(
                    out,
                    "-A {svc} -m comment --comment \"{comment} -> {ip}:{target}\" -m statistic --mode random --probability {probability:.11} -j {sep}"
                );
            } else {
                push_line!(
                    out,
                    "-A {svc} -m comment --comment \"{comment} -> {ip}:{target}\" -j {sep}"
                );
            }
        }
        for ip in endpoints {
            let sep = Self::sep_chain(i, proto, *ip);
            push_line!(
                out,
                "-A {sep} -s {ip}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ"
            );
            push_line!(
                out,
                "-A {sep} -p {p} -m comment --comment \"{comment}\" -m {p} -j DNAT --to-destination {ip}:{target}"
            );
        }
    }

    /// The whole nat table, for `iptables-restore` (kube-proxy's full sync).
    pub fn iptables(&self) -> String {
        let mut chains = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
        );
        let mut rules = String::from(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
        );
        for i in 0..self.n {
            for proto in Proto::BOTH {
                push_line!(chains, ":{} - [0:0]", Self::svc_chain(i, proto));
                for ip in self.endpoints(i) {
                    push_line!(chains, ":{} - [0:0]", Self::sep_chain(i, proto, *ip));
                }
                let (port, _) = proto.ports();
                let p = proto.lower();
                push_line!(
                    rules,
                    "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"default/{}:{} cluster IP\" -m {p} --dport {port} -j {}",
                    Self::vip(i),
                    Self::name(i),
                    proto.port_name(),
                    Self::svc_chain(i, proto)
                );
                Self::iptables_service(&mut rules, i, proto, self.endpoints(i));
            }
        }
        if self.nodeport_node.is_some() {
            self.iptables_nodeports(&mut chains, &mut rules);
        }
        chains + &rules + "COMMIT\n"
    }

    fn ext_chain(i: usize, proto: Proto) -> String {
        format!(
            "KUBE-EXT-{}",
            chain_hash(&format!(
                "ext default/{}:{}",
                Self::name(i),
                proto.port_name()
            ))
        )
    }

    /// NodePorts as kube-proxy's iptables proxier writes them (pkg/proxy/iptables/proxier.go):
    /// KUBE-SERVICES ends with the jump to KUBE-NODEPORTS for local destinations
    /// (`-m addrtype --dst-type LOCAL`); each nodePort jumps to its KUBE-EXT chain, which
    /// marks the packet for masquerade (eTP Cluster) and goes on to the Service's KUBE-SVC
    /// chain; KUBE-POSTROUTING masquerades what is marked.
    fn iptables_nodeports(&self, chains: &mut String, rules: &mut String) {
        chains.push_str(":KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
        push_line!(
            rules,
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
        );
        push_line!(
            rules,
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
        );
        push_line!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
        push_line!(
            rules,
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        );
        for i in 0..self.n {
            for proto in Proto::BOTH {
                let ext = Self::ext_chain(i, proto);
                let p = proto.lower();
                let comment = format!("default/{}:{}", Self::name(i), proto.port_name());
                push_line!(chains, ":{ext} - [0:0]");
                push_line!(
                    rules,
                    "-A KUBE-NODEPORTS -m comment --comment \"{comment}\" -m {p} -p {p} --dport {} -j {ext}",
                    Self::nodeport(i)
                );
                push_line!(
                    rules,
                    "-A {ext} -m comment --comment \"masquerade traffic for {comment} external destinations\" -j KUBE-MARK-MASQ"
                );
                push_line!(rules, "-A {ext} -j {}", Self::svc_chain(i, proto));
            }
        }
        push_line!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        );
    }

    /// `iptables-restore --noflush` input that gives Service `i`'s TCP port `endpoints`: the
    /// changed chains only, as kube-proxy's partial syncs write them.
    pub fn iptables_change(&self, i: usize, before: &[Ipv4Addr], endpoints: &[Ipv4Addr]) -> String {
        let mut out = String::from("*nat\n");
        push_line!(out, ":{} - [0:0]", Self::svc_chain(i, Proto::Tcp));
        // Declaring a chain flushes it: the kept and new ones are refilled below, the gone
        // ones must be empty before `-X`.
        for ip in endpoints
            .iter()
            .chain(before.iter().filter(|ip| !endpoints.contains(ip)))
        {
            push_line!(out, ":{} - [0:0]", Self::sep_chain(i, Proto::Tcp, *ip));
        }
        Self::iptables_service(&mut out, i, Proto::Tcp, endpoints);
        for ip in before.iter().filter(|ip| !endpoints.contains(ip)) {
            push_line!(out, "-X {}", Self::sep_chain(i, Proto::Tcp, *ip));
        }
        out + "COMMIT\n"
    }

    fn nft_svc_chain(i: usize, proto: Proto) -> String {
        format!(
            "service-{}-default/{}/{}/{}",
            &chain_hash(&Self::name(i))[..8],
            Self::name(i),
            proto.lower(),
            proto.port_name()
        )
    }

    fn nft_ep_chain(i: usize, proto: Proto, ip: Ipv4Addr) -> String {
        let (_, target) = proto.ports();
        format!(
            "endpoint-{}-default/{}/{}/{}__{ip}/{target}",
            &chain_hash(&format!("{}{ip}", Self::name(i)))[..8],
            Self::name(i),
            proto.lower(),
            proto.port_name()
        )
    }

    /// One endpoint chain (hairpin masquerade mark, DNAT), as kube-proxy's nftables mode
    /// writes it.
    fn nft_endpoint(out: &mut String, i: usize, proto: Proto, ip: Ipv4Addr) {
        let ep = Self::nft_ep_chain(i, proto, ip);
        let (_, target) = proto.ports();
        push_line!(out, "add chain ip kube-proxy {ep}");
        push_line!(
            out,
            "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade"
        );
        push_line!(
            out,
            "add rule ip kube-proxy {ep} meta l4proto {} dnat to {ip}:{target}",
            proto.lower()
        );
    }

    /// The service chain's dispatch rule and the endpoint chains, as kube-proxy's nftables
    /// mode writes them.
    fn nft_service(
        out: &mut String,
        i: usize,
        proto: Proto,
        endpoints: &[Ipv4Addr],
        define_endpoints: bool,
    ) {
        let svc = Self::nft_svc_chain(i, proto);
        let (port, _) = proto.ports();
        let p = proto.lower();
        push_line!(out, "add chain ip kube-proxy {svc}");
        push_line!(
            out,
            "add rule ip kube-proxy {svc} ip daddr {} {p} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            Self::vip(i)
        );
        let vmap: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(k, ip)| format!("{k} : goto {}", Self::nft_ep_chain(i, proto, *ip)))
            .collect();
        if define_endpoints {
            for ip in endpoints {
                Self::nft_endpoint(out, i, proto, *ip);
            }
        }
        push_line!(
            out,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
            endpoints.len(),
            vmap.join(", ")
        );
    }

    /// A whole `nft -f` ruleset (kube-proxy's nftables mode, IPv4 table).
    pub fn nft(&self) -> String {
        let mut out = String::from(
            "add table ip kube-proxy\n\
             add chain ip kube-proxy mark-for-masquerade\n\
             add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
             add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
             add chain ip kube-proxy services\n\
             add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n\
             add rule ip kube-proxy nat-prerouting jump services\n\
             add chain ip kube-proxy nat-output { type nat hook output priority -100 ; policy accept ; }\n\
             add rule ip kube-proxy nat-output jump services\n",
        );
        let mut elements = Vec::with_capacity(self.n * 2);
        for i in 0..self.n {
            for proto in Proto::BOTH {
                Self::nft_service(&mut out, i, proto, self.endpoints(i), true);
                let (port, _) = proto.ports();
                elements.push(format!(
                    "{} . {} . {port} : goto {}",
                    Self::vip(i),
                    proto.lower(),
                    Self::nft_svc_chain(i, proto)
                ));
            }
        }
        for chunk in elements.chunks(1000) {
            push_line!(
                out,
                "add element ip kube-proxy service-ips {{ {} }}",
                chunk.join(", ")
            );
        }
        out
    }

    /// `nft -f` input that gives Service `i`'s TCP port `endpoints` (from `before`), as one
    /// transaction: new endpoint chains, the service chain rewritten, gone chains deleted.
    pub fn nft_change(&self, i: usize, before: &[Ipv4Addr], endpoints: &[Ipv4Addr]) -> String {
        let mut out = String::new();
        for ip in endpoints.iter().filter(|ip| !before.contains(ip)) {
            Self::nft_endpoint(&mut out, i, Proto::Tcp, *ip);
        }
        push_line!(
            out,
            "flush chain ip kube-proxy {}",
            Self::nft_svc_chain(i, Proto::Tcp)
        );
        Self::nft_service(&mut out, i, Proto::Tcp, endpoints, false);
        for ip in before.iter().filter(|ip| !endpoints.contains(ip)) {
            push_line!(
                out,
                "delete chain ip kube-proxy {}",
                Self::nft_ep_chain(i, Proto::Tcp, *ip)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_rules_follow_kube_proxy() {
        let set = ServiceSet::new(2, vec![backend_ip(0), backend_ip(1)]).with_nodeports("n");
        let rules = set.iptables();
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        // The ClusterIP rules first, the jump to KUBE-NODEPORTS for local addresses last.
        assert_eq!(services.len(), 5);
        assert!(services[4].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        let nodeports: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert_eq!(nodeports.len(), 4);
        assert!(nodeports[0].contains("--dport 20000 -j KUBE-EXT-"));
        assert!(nodeports[3].contains("-p udp --dport 20001"));
        assert!(rules.contains("-j MASQUERADE --random-fully"));
        let ext = nodeports[0].rsplit(' ').next().expect("chain");
        assert!(rules.contains(&format!("-A {ext} -m comment")));
        assert!(rules.contains(&format!("-A {ext} -j KUBE-SVC-")));
        // lb's manifests: type NodePort, the nodePort, endpoints on the node.
        let list: serde_json::Value =
            serde_json::from_str(&set.manifest_file(0..2, &[])).expect("json");
        let service = &list["items"][2];
        assert_eq!(service["spec"]["type"], "NodePort");
        assert_eq!(service["spec"]["ports"][1]["nodePort"], 20001);
        assert_eq!(list["items"][1]["endpoints"][0]["nodeName"], "n");
        // Without nodePorts: the ClusterIP set as before.
        let plain = ServiceSet::new(1, vec![backend_ip(0)]);
        assert!(!plain.iptables().contains("KUBE-NODEPORTS"));
    }
}
