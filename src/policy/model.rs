//! The validated policy model.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Text that is not six two-digit hex bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseMacError;

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (six hex bytes such as 52:54:00:12:34:56)")
    }
}

impl std::error::Error for ParseMacError {}

impl FromStr for MacAddr {
    type Err = ParseMacError;
    /// Six two-digit hex groups separated by `:` (or all by `-`).
    fn from_str(s: &str) -> Result<MacAddr, ParseMacError> {
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut out {
            let part = parts.next().ok_or(ParseMacError)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseMacError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError)?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError);
        }
        Ok(MacAddr(out))
    }
}

/// The whole policy of one VM.
#[derive(Clone, Debug)]
pub struct Policy {
    pub source: PathBuf,
    pub vm: Vm,
    pub proxy: Proxy,
    pub outbound: Vec<OutboundRule>,
    pub dns: Dns,
    pub forward: Vec<Forward>,
    pub limits: Limits,
}

/// The VM's identity and addressing.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u16,
}

impl Vm {
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new(self.address, self.prefix_len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| Ipv4Net::from(self.address))
    }

    pub fn netmask(&self) -> Ipv4Addr {
        self.subnet().netmask()
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        self.subnet().broadcast()
    }
}

/// The host proxies.
#[derive(Clone, Debug, Default)]
pub struct Proxy {
    pub http: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    pub explicit_port: Option<u16>,
}

/// One `[[outbound]]` rule: which flows may leave, and through which proxy.
#[derive(Clone, Debug)]
pub struct OutboundRule {
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    /// `None`: any name (but no IP literal).
    pub to: Option<Vec<Destination>>,
    pub via: Via,
}

impl OutboundRule {
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.iter().any(|r| r.contains(port))
    }

    /// Whether a flow named `name` may go (any name when `to` is absent).
    pub fn allows_name(&self, name: &str) -> bool {
        match &self.to {
            None => true,
            Some(to) => to
                .iter()
                .any(|d| matches!(d, Destination::Name(p) if p.matches(name))),
        }
    }

    /// Whether a flow to the IP literal `ip` may go: only through a CIDR in `to`.
    pub fn allows_ip(&self, ip: Ipv4Addr) -> bool {
        self.to.as_ref().is_some_and(|to| {
            to.iter()
                .any(|d| matches!(d, Destination::Cidr(net) if net.contains(&ip)))
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An inclusive port range (a single port has `lo == hi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// An entry of `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Name(NamePattern),
    Cidr(Ipv4Net),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Name(p) => write!(f, "{p}"),
            Destination::Cidr(n) => write!(f, "{n}"),
        }
    }
}

/// A DNS name, or `*.suffix` for every name strictly below `suffix`. Lowercase, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    Wildcard(String),
}

impl NamePattern {
    /// Case-insensitive; a trailing dot on `name` is ignored.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        match self {
            NamePattern::Exact(n) => name == *n,
            NamePattern::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Http,
    Socks5,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::Http => "http",
            Via::Socks5 => "socks5",
        })
    }
}

/// `[dns]`: what the guest may resolve, and how.
#[derive(Clone, Debug, Default)]
pub struct Dns {
    pub allow: Vec<NamePattern>,
    pub records: BTreeMap<String, Ipv4Addr>,
    pub mode: DnsMode,
    pub upstream: Option<SocketAddr>,
}

impl Dns {
    /// Whether `name` may be resolved: allowlisted or a static record.
    pub fn allows(&self, name: &str) -> bool {
        let lower = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.records.contains_key(&lower) || self.allow.iter().any(|p| p.matches(name))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DnsMode {
    /// Allowlisted names get synthetic addresses; flows to them go to the proxy by name.
    #[default]
    Proxy,
    /// Allowlisted queries are forwarded to `Dns::upstream`.
    Upstream,
}

impl fmt::Display for DnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsMode::Proxy => "proxy",
            DnsMode::Upstream => "upstream",
        })
    }
}

/// `[[forward]]`: a host listener spliced to a guest port.
#[derive(Clone, Debug)]
pub struct Forward {
    pub listen: SocketAddr,
    pub guest_port: u16,
    pub from: Vec<IpNet>,
}

/// `[limits]`.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_flows: usize,
    pub egress_bps: u64,
    pub ingress_bps: u64,
    /// Token-bucket depth of both limits, bytes; 0 = 50 ms at the rate, at least 64 KiB.
    pub burst_bytes: u64,
}

pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// The largest `limits.max_flows` accepted.
pub const MAX_FLOWS_LIMIT: usize = 1_000_000;
/// `vm.mtu` when absent.
pub const DEFAULT_MTU: u16 = 1500;
/// The `vm.mtu` values accepted: IPv4's minimum up to common jumbo frames.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=9000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: DEFAULT_MAX_FLOWS,
            egress_bps: 0,
            ingress_bps: 0,
            burst_bytes: 0,
        }
    }
}
