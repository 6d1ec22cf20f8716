//! `moat check`'s human summary of a valid policy.

use std::fmt::{Display, Write};
use std::net::SocketAddr;

use super::model::*;

/// Left column: the section name, padded so the values line up.
const SECTION: usize = 10;

impl Policy {
    /// A short summary: identity, proxies, rules as a table, DNS, forwards, limits. Several
    /// lines, each ending in '\n'.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut s);
        s
    }

    fn write_summary(&self, s: &mut String) -> std::fmt::Result {
        let vm = &self.vm;
        writeln!(s, "{}: valid", self.source.display())?;
        writeln!(
            s,
            "  {:SECTION$}{}  mac {}  address {}/{}  gateway {}  mtu {}",
            "vm", vm.name, vm.mac, vm.address, vm.prefix_len, vm.gateway, vm.mtu
        )?;

        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        write!(
            s,
            "  {:SECTION$}http {}  socks5 {}",
            "proxy",
            addr(self.proxy.http),
            addr(self.proxy.socks5)
        )?;
        if let Some(port) = self.proxy.explicit_port {
            write!(s, "  explicit port {port} (guest -> {}:{port})", vm.gateway)?;
        }
        writeln!(s)?;

        if self.outbound.is_empty() {
            writeln!(s, "  {:SECTION$}none: nothing leaves the VM", "outbound")?;
        } else {
            let rows: Vec<[String; 5]> = self
                .outbound
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let to = r.to.as_ref().map_or_else(
                        || "any name (no IP literals)".to_string(),
                        |to| join(to, ", "),
                    );
                    [
                        i.to_string(),
                        r.protocol.to_string(),
                        join(&r.ports, ","),
                        r.via.to_string(),
                        to,
                    ]
                })
                .collect();
            let header = ["#", "proto", "ports", "via", "to"].map(String::from);
            let mut widths = [0; 5];
            for row in std::iter::once(&header).chain(&rows) {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.len());
                }
            }
            for (n, row) in std::iter::once(&header).chain(&rows).enumerate() {
                let section = if n == 0 { "outbound" } else { "" };
                write!(s, "  {section:SECTION$}")?;
                for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                    if i + 1 == row.len() {
                        writeln!(s, "{cell}")?;
                    } else {
                        write!(s, "{cell:w$}  ")?;
                    }
                }
            }
        }

        let dns = &self.dns;
        if dns.allow.is_empty() && dns.records.is_empty() {
            writeln!(s, "  {:SECTION$}every name is NXDOMAIN", "dns")?;
        } else {
            write!(s, "  {:SECTION$}mode {}", "dns", dns.mode)?;
            if let Some(up) = dns.upstream {
                write!(s, " via {up}")?;
            }
            if dns.allow.is_empty() {
                writeln!(s, "; allow only the static records")?;
            } else {
                writeln!(s, "; allow {}", join(&dns.allow, ", "))?;
            }
            for (name, ip) in &dns.records {
                writeln!(s, "  {:SECTION$}{name} -> {ip}", "")?;
            }
        }

        if self.forward.is_empty() {
            writeln!(s, "  {:SECTION$}none", "forward")?;
        }
        for (i, f) in self.forward.iter().enumerate() {
            let section = if i == 0 { "forward" } else { "" };
            writeln!(
                s,
                "  {section:SECTION$}{} -> guest port {}, from {}",
                f.listen,
                f.guest_port,
                join(&f.from, ", ")
            )?;
        }

        let rate = |bps: u64| {
            if bps == 0 {
                "unlimited".to_string()
            } else {
                format!("{bps} bit/s")
            }
        };
        writeln!(
            s,
            "  {:SECTION$}max_flows {}  egress {}  ingress {}{}",
            "limits",
            self.limits.max_flows,
            rate(self.limits.egress_bps),
            rate(self.limits.ingress_bps),
            match self.limits.burst_bytes {
                0 => String::new(),
                b => format!("  burst {b} B"),
            }
        )
    }
}

fn join<T: Display>(items: &[T], sep: &str) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

impl Policy {
    /// What is valid but deserves a person's attention, one line each (without the file
    /// name): `moat check` prints them after the summary, `moat serve` logs them.
    pub fn warnings(&self) -> Vec<String> {
        self.outbound
            .iter()
            .enumerate()
            .filter_map(|(i, r)| outbound_warning(i, r))
            .collect()
    }
}

/// The warning for rule `i`, if it deserves one: a rule for any name.
pub(super) fn outbound_warning(i: usize, r: &OutboundRule) -> Option<String> {
    if r.to.is_some() {
        return None;
    }
    let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
    Some(format!(
        "outbound[{i}] ({} ports {}) allows any name: where a name leads is then the proxy's decision alone; give the proxy destination ACLs for loopback, private, link-local and CGNAT ranges (README, \"Configure your proxy\") or list the names in `to`",
        r.protocol,
        ports.join(",")
    ))
}
