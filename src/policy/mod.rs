//! The per-VM policy: the TOML contract of docs/DESIGN.md, parsed with serde and validated into a
//! typed model. Every error names the file, line, column and key, and says what to do.

mod error;
mod model;
mod parse;
mod summary;

pub use error::{ErrorKind, Located, Location, PolicyError};
pub use model::*;

use std::path::Path;

/// The gateway answers DNS on this port (UDP and TCP): the explicit proxy cannot have it.
pub const DNS_PORT: u16 = 53;

/// Where proxy-mode DNS answers come from (DESIGN "Flow naming"): the benchmarking range of
/// RFC 2544, never routed, so safe as a private naming space. Part of the policy contract:
/// a VM's subnet may not overlap it.
pub const SYNTHETIC_NET: ipnet::Ipv4Net =
    match ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(198, 18, 0, 0), 15) {
        Ok(net) => net,
        Err(_) => panic!("valid prefix"),
    };

/// What `moat check` says about a policy file.
#[derive(Debug)]
pub struct Checked {
    /// The policy, or every error of the file.
    pub result: Result<Policy, PolicyErrors>,
    /// [`Policy::warnings`] of the parts that are valid (of the whole policy when it is).
    pub warnings: Vec<String>,
}

/// Every error of a policy file. `first` is the one [`Policy::load`] returns (a syntax
/// error, else the first key of the wrong shape, else the first wrong value in the order
/// of the contract's tables); `others` follow in file order.
#[derive(Debug)]
pub struct PolicyErrors {
    pub first: PolicyError,
    pub others: Vec<PolicyError>,
}

impl PolicyErrors {
    /// `first`, then `others`.
    pub fn iter(&self) -> impl Iterator<Item = &PolicyError> {
        std::iter::once(&self.first).chain(&self.others)
    }
}

impl Policy {
    /// Read, parse and validate a policy file; the first error if it is invalid.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Policy::check(path).result.map_err(|e| e.first)
    }

    /// Parse and validate policy text; `source` is used in messages only.
    pub fn parse(text: &str, source: &Path) -> Result<Policy, PolicyError> {
        Policy::check_text(text, source).result.map_err(|e| e.first)
    }

    /// Read and check a policy file, finding every error rather than the first.
    pub fn check(path: &Path) -> Checked {
        match std::fs::read_to_string(path) {
            Ok(text) => Policy::check_text(&text, path),
            Err(source) => Checked {
                result: Err(PolicyErrors {
                    first: PolicyError::Io {
                        file: path.to_path_buf(),
                        source,
                    },
                    others: Vec::new(),
                }),
                warnings: Vec::new(),
            },
        }
    }

    /// [`Policy::check`] for policy text; `source` is used in messages only.
    pub fn check_text(text: &str, source: &Path) -> Checked {
        let report = parse::check(text, source);
        Checked {
            result: report.result.map_err(|(first, others)| PolicyErrors {
                first: first.into(),
                others: others.into_iter().map(PolicyError::from).collect(),
            }),
            warnings: report.warnings,
        }
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
