//! The gate: the one decision that lets a connection out of the guest (docs/DESIGN.md, invariants 3
//! and 7). Every rule of "what may leave" is in this file.
//!
//! A guest names where it wants to go in several ways: packets to an IPv4 address (a literal,
//! or an address moat's own DNS handed out for a name), a name in its first bytes (TLS SNI,
//! HTTP Host), a request on the explicit-proxy port. Each of them comes here as a
//! [`Requested`], is normalised (a name that a resolver or URL parser would read as an
//! address *is* that address; `localhost` is loopback), and is judged by one rule set. What
//! passes is an [`Admitted`]: only this module can make one, and the code that opens proxy
//! connections takes nothing else, so no path can reach a proxy without passing here.
//!
//! What the gate cannot know is where a *name* leads on the proxy's side (a public name may
//! resolve to 127.0.0.1 there); the proxy's own destination ACLs cover that (README,
//! "Configure your proxy"), and the canary checks them.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use crate::policy::{Destination, OutboundRule, Policy, Protocol, Via, SYNTHETIC_NET};
use crate::telemetry::DropReason;

/// What the proxy is asked to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Name(String),
    Ip(Ipv4Addr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Where in the guest's bytes a name was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameSource {
    /// The server name of a TLS ClientHello.
    Sni,
    /// The Host header of an HTTP request.
    HttpHost,
    /// A `CONNECT host:port` or absolute-form request on the explicit-proxy port.
    ExplicitProxy,
}

impl NameSource {
    pub fn as_str(self) -> &'static str {
        match self {
            NameSource::Sni => "sni",
            NameSource::HttpHost => "http_host",
            NameSource::ExplicitProxy => "explicit_proxy",
        }
    }
}

/// How the guest said where it wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    /// Packets to this address. `dns_name`: the name moat's DNS answered with it (a
    /// synthetic address, or an upstream answer moat remembered), if any.
    Address {
        ip: Ipv4Addr,
        dns_name: Option<String>,
    },
    /// Host text from the guest's own bytes, exactly as sent (port already split off).
    Text { text: String, source: NameSource },
}

impl fmt::Display for Requested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requested::Address { ip, dns_name: None } => write!(f, "{ip}"),
            Requested::Address {
                ip,
                dns_name: Some(n),
            } => write!(f, "{n} ({ip})"),
            Requested::Text { text, source } => write!(f, "{text:?} from {}", source.as_str()),
        }
    }
}

/// A destination the gate let out: the only thing proxy connectors accept. The fields are
/// private and there is no constructor outside this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    target: Target,
    port: u16,
    protocol: Protocol,
    via: Via,
    proxy: SocketAddr,
    rule: usize,
    requested: Requested,
}

impl Admitted {
    /// What the proxy is asked for.
    pub fn target(&self) -> &Target {
        &self.target
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
    /// Which proxy protocol carries it.
    pub fn via(&self) -> Via {
        self.via
    }
    /// The host proxy to connect to.
    pub fn proxy(&self) -> SocketAddr {
        self.proxy
    }
    /// Index of the `[[outbound]]` rule that allowed it.
    pub fn rule(&self) -> usize {
        self.rule
    }
    /// How the guest asked for it (to judge it again after a reload).
    pub fn requested(&self) -> &Requested {
        &self.requested
    }
}

/// A host after normalisation: an IPv4 address, or a plain lowercase DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(Ipv4Addr),
    Name(String),
}

const fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("valid prefix"),
    }
}

/// Destinations refused unless a rule names them by a CIDR inside the range (invariant 3).
pub const RESERVED: [Ipv4Net; 10] = [
    net(0, 0, 0, 0, 8),
    net(10, 0, 0, 0, 8),
    net(100, 64, 0, 0, 10),
    net(127, 0, 0, 0, 8),
    net(169, 254, 0, 0, 16),
    net(172, 16, 0, 0, 12),
    net(192, 168, 0, 0, 16),
    net(224, 0, 0, 0, 4),
    net(240, 0, 0, 0, 4),
    net(255, 255, 255, 255, 32),
];

/// The reserved range `ip` is in, if any.
pub fn reserved_range(ip: Ipv4Addr) -> Option<Ipv4Net> {
    RESERVED.iter().copied().find(|n| n.contains(&ip))
}

/// The one admission decision: may a `protocol` connection to `requested:port` leave, and
/// through which proxy?
pub fn admit(
    policy: &Policy,
    protocol: Protocol,
    requested: Requested,
    port: u16,
) -> Result<Admitted, DropReason> {
    let host = match &requested {
        Requested::Address { ip, dns_name: None } => {
            if SYNTHETIC_NET.contains(ip) {
                return Err(DropReason::UnknownSyntheticAddress);
            }
            Host::Ip(*ip)
        }
        // A name moat's DNS handed out: judged by name, but normalised like any other (an
        // allowlist entry that reads as an address, or `localhost`, is that address).
        Requested::Address {
            dns_name: Some(name),
            ..
        } => normalize(name)?,
        Requested::Text { text, .. } => normalize(text)?,
    };
    let (rule, target) = match host {
        Host::Ip(ip) => {
            let reserved = reserved_range(ip);
            let found = rules(policy, protocol, port).find(|(_, r)| names_ip(r, ip, reserved));
            match (found, reserved) {
                (Some((i, _)), _) => (i, Target::Ip(ip)),
                (None, Some(_)) => return Err(DropReason::ReservedDestination),
                (None, None) => return Err(DropReason::NotAllowed),
            }
        }
        Host::Name(name) => {
            let (i, _) = rules(policy, protocol, port)
                .find(|(_, r)| r.allows_name(&name))
                .ok_or(DropReason::NotAllowed)?;
            (i, Target::Name(name))
        }
    };
    let via = policy.outbound[rule].via;
    let proxy = match via {
        Via::Http => policy.proxy.http,
        Via::Socks5 => policy.proxy.socks5,
    }
    .ok_or(DropReason::NotAllowed)?;
    Ok(Admitted {
        target,
        port,
        protocol,
        via,
        proxy,
        rule,
        requested,
    })
}

/// Judge an admitted flow again under a (reloaded) policy.
pub fn readmit(policy: &Policy, admitted: &Admitted) -> Result<Admitted, DropReason> {
    admit(
        policy,
        admitted.protocol,
        admitted.requested.clone(),
        admitted.port,
    )
}

/// Whether a TCP flow to the IP literal `dst:port`, refused as a literal, may wait for its
/// first bytes to name it (SNI, Host): only outside the reserved ranges and the synthetic
/// pool, and only if some rule for the port allows names at all. The name it then shows is
/// admitted like any other, with [`admit`].
pub fn may_name_later(policy: &Policy, dst: Ipv4Addr, port: u16) -> bool {
    !SYNTHETIC_NET.contains(&dst)
        && reserved_range(dst).is_none()
        && rules(policy, Protocol::Tcp, port).any(|(_, r)| {
            r.to.as_ref()
                .is_none_or(|to| to.iter().any(|d| matches!(d, Destination::Name(_))))
        })
}

/// Whether an upstream resolver's A record `addr` for an allowed name may be given to the
/// guest (DNS rebinding): an address in a reserved range only if some rule names it by a
/// CIDR inside that range.
pub fn admit_resolved(policy: &Policy, addr: Ipv4Addr) -> Result<(), DropReason> {
    let Some(reserved) = reserved_range(addr) else {
        return Ok(());
    };
    let named = policy
        .outbound
        .iter()
        .any(|r| names_ip(r, addr, Some(reserved)));
    if named {
        Ok(())
    } else {
        Err(DropReason::DnsAnswerReserved)
    }
}

/// Read host text the way resolvers and URL parsers do (WHATWG URL host parsing, inet_aton):
/// a trailing dot is dropped and case folded; a name whose last label is numeric (`127.1`,
/// `0x7f000001`, `2130706433`, `0177.0.0.1`) is an IPv4 address or nothing; `localhost` and
/// every name below it are loopback (RFC 6761); IPv6 literals and anything that is not a
/// plain DNS name are refused.
pub fn normalize(raw: &str) -> Result<Host, DropReason> {
    if raw.contains([':', '[', ']']) {
        return Err(DropReason::BadDestination); // IPv6 literal (or a stray port): no IPv6
    }
    let lower = raw.to_ascii_lowercase();
    let host = lower.strip_suffix('.').unwrap_or(&lower);
    if host.is_empty() || host.len() > 253 {
        return Err(DropReason::BadDestination);
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return Err(DropReason::BadDestination);
    }
    let last = labels.last().copied().unwrap_or_default();
    if ends_in_a_number(last) {
        return ipv4_number_form(&labels)
            .map(Host::Ip)
            .ok_or(DropReason::BadDestination);
    }
    let plain = labels.iter().all(|l| {
        l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !plain {
        return Err(DropReason::BadDestination);
    }
    if host == "localhost" || host.ends_with(".localhost") {
        return Ok(Host::Ip(Ipv4Addr::LOCALHOST));
    }
    Ok(Host::Name(host.to_string()))
}

/// WHATWG's "ends in a number": all decimal digits, or a `0x` hex number (of any length:
/// one too long for an address is an invalid address, not a name).
fn ends_in_a_number(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || label.bytes().all(|b| b.is_ascii_digit())
}

/// One part of an IPv4 number form: decimal, `0x` hex (possibly empty: `0x` is 0), or octal
/// with a leading 0.
fn parse_ipv4_part(part: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        return (radix == 16).then_some(0);
    }
    if !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    // Leading zeros cannot overflow the check below: strip them, then bound the length.
    let digits = digits.trim_start_matches('0');
    if digits.len() > 16 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

/// `a`, `a.b`, `a.b.c`, `a.b.c.d` with inet_aton's rules: every part but the last is one
/// byte, the last fills the remaining bytes.
fn ipv4_number_form(labels: &[&str]) -> Option<Ipv4Addr> {
    if labels.is_empty() || labels.len() > 4 {
        return None;
    }
    let parts: Vec<u64> = labels
        .iter()
        .map(|l| parse_ipv4_part(l))
        .collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.iter().any(|p| *p > 255) {
        return None;
    }
    let room = 8 * (5 - parts.len() as u32);
    if *last >= 1u64 << room {
        return None;
    }
    let mut addr = *last;
    for (i, p) in head.iter().enumerate() {
        addr |= p << (24 - 8 * i as u32);
    }
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}

fn rules(
    policy: &Policy,
    protocol: Protocol,
    port: u16,
) -> impl Iterator<Item = (usize, &OutboundRule)> {
    policy
        .outbound
        .iter()
        .enumerate()
        .filter(move |(_, r)| r.protocol == protocol && r.allows_port(port))
}

/// Whether a rule allows the address `ip`: through a CIDR in `to`, which for a reserved
/// address must lie inside its reserved range (0.0.0.0/0 does not name 127.0.0.1).
fn names_ip(rule: &OutboundRule, ip: Ipv4Addr, reserved: Option<Ipv4Net>) -> bool {
    rule.to.as_ref().is_some_and(|to| {
        to.iter().any(|d| match d {
            Destination::Cidr(c) => c.contains(&ip) && reserved.is_none_or(|r| r.contains(c)),
            Destination::Name(_) => false,
        })
    })
}

#[cfg(test)]
mod tests;
