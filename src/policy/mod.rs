//! The per-VM policy: the TOML contract of docs/DESIGN.md, parsed with serde and validated into a
//! typed model. Every error names the file, line, column and key, and says what to do.

mod error;
mod model;
mod parse;
mod summary;

pub use error::{Location, PolicyError};
pub use model::*;

use std::path::Path;

/// moat's own MAC address, the gateway's, as the guest sees it (locally administered).
pub const GATEWAY_MAC: MacAddr = MacAddr([0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01]);

/// Where proxy-mode DNS answers come from (DESIGN "Flow naming"): the benchmarking range of
/// RFC 2544, never routed, so safe as a private naming space. Part of the policy contract:
/// a VM's subnet may not overlap it.
pub const SYNTHETIC_NET: ipnet::Ipv4Net =
    match ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(198, 18, 0, 0), 15) {
        Ok(net) => net,
        Err(_) => panic!("valid prefix"),
    };

impl Policy {
    /// Read, parse and validate a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text, path)
    }

    /// Parse and validate policy text; `source` is used in messages only.
    pub fn parse(text: &str, source: &Path) -> Result<Policy, PolicyError> {
        parse::parse(text, source)
    }

    /// The TCP ports moat connects to on the host for this policy: the proxies and the DNS
    /// upstream (which it also uses over TCP). Sorted, without duplicates.
    pub fn connect_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = [self.proxy.http, self.proxy.socks5, self.dns.upstream]
            .into_iter()
            .flatten()
            .map(|a| a.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

#[cfg(test)]
mod tests;
