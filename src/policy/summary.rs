//! `moat check`'s human summary of a valid policy.

use std::fmt::Write;

use super::model::*;

impl Policy {
    /// A short summary: identity, proxies, rules as a table, DNS, forwards, limits.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let vm = &self.vm;
        let _ = writeln!(s, "{}: valid", self.source.display());
        let _ = writeln!(
            s,
            "  vm        {} mac {} address {}/{} gateway {} mtu {}",
            vm.name, vm.mac, vm.address, vm.prefix_len, vm.gateway, vm.mtu
        );
        let show = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(
            s,
            "  proxy     http {} socks5 {} explicit_port {}",
            show(self.proxy.http),
            show(self.proxy.socks5),
            self.proxy
                .explicit_port
                .map_or("-".to_string(), |p| p.to_string())
        );
        if self.outbound.is_empty() {
            let _ = writeln!(s, "  outbound  none: nothing leaves the VM");
        } else {
            let _ = writeln!(
                s,
                "  outbound  {:<3} {:<6} {:<7} {:<20} to",
                "#", "proto", "via", "ports"
            );
            for (i, r) in self.outbound.iter().enumerate() {
                let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
                let to =
                    r.to.as_ref()
                        .map_or("any name (no IP literals)".to_string(), |to| {
                            to.iter()
                                .map(|d| d.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        });
                let _ = writeln!(
                    s,
                    "            {:<3} {:<6} {:<7} {:<20} {}",
                    i,
                    r.protocol.to_string(),
                    r.via.to_string(),
                    ports.join(","),
                    to
                );
            }
        }
        let allow: Vec<String> = self.dns.allow.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(
            s,
            "  dns       mode {:?} allow [{}] records {}",
            self.dns.mode,
            allow.join(", "),
            self.dns.records.len()
        );
        for f in &self.forward {
            let from: Vec<String> = f.from.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(
                s,
                "  forward   {} -> guest:{} from [{}]",
                f.listen,
                f.guest_port,
                from.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  limits    max_flows {} egress_bps {} ingress_bps {}",
            self.limits.max_flows, self.limits.egress_bps, self.limits.ingress_bps
        );
        s
    }
}
