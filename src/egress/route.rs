//! Which proxy a guest flow goes to, under which name, or why it may not go at all.
//!
//! A destination in the synthetic pool is the name moat itself answered in DNS; any other
//! destination is an IP literal, allowed only through a CIDR in a rule's `to`. Reserved
//! ranges (DESIGN invariant 3) need a CIDR that names them: one inside the reserved range,
//! not a catch-all like 0.0.0.0/0.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use crate::policy::{Destination, OutboundRule, Policy, Protocol, Via};
use crate::services::dns::pool::SYNTHETIC_NET;
use crate::services::dns::NamePool;
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

/// An allowed flow's way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub target: Target,
    pub port: u16,
    pub via: Via,
    pub proxy: SocketAddr,
    /// Index of the `[[outbound]]` rule that allowed it.
    pub rule: usize,
}

const fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("valid prefix"),
    }
}

/// Destinations refused unless a rule names them by CIDR (DESIGN invariant 3).
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

fn reserved_range(ip: Ipv4Addr) -> Option<Ipv4Net> {
    RESERVED.iter().copied().find(|n| n.contains(&ip))
}

/// Guest TCP to `gateway:explicit_port`: spliced byte for byte to the HTTP proxy (the guest
/// speaks the proxy protocol itself, `http_proxy=http://GATEWAY:PORT`).
pub fn explicit_proxy(policy: &Policy, dst: Ipv4Addr, port: u16) -> Option<Route> {
    let explicit = policy.proxy.explicit_port?;
    (dst == policy.vm.gateway && port == explicit).then_some(Route {
        target: Target::Ip(dst),
        port,
        via: Via::Http,
        proxy: policy.proxy.http?,
        rule: usize::MAX,
    })
}

/// Decide the route of a TCP flow to `dst:port`.
pub fn route_tcp(
    policy: &Policy,
    names: &NamePool,
    dst: Ipv4Addr,
    port: u16,
) -> Result<Route, DropReason> {
    route(policy, names, Protocol::Tcp, dst, port)
}

/// Decide the route of a UDP flow to `dst:port` (UDP rules go through SOCKS5).
pub fn route_udp(
    policy: &Policy,
    names: &NamePool,
    dst: Ipv4Addr,
    port: u16,
) -> Result<Route, DropReason> {
    route(policy, names, Protocol::Udp, dst, port)
}

fn route(
    policy: &Policy,
    names: &NamePool,
    protocol: Protocol,
    dst: Ipv4Addr,
    port: u16,
) -> Result<Route, DropReason> {
    // A synthetic address, or one the upstream resolver gave for an allowed name: by name.
    let known = names.lookup(dst);
    if SYNTHETIC_NET.contains(&dst) || known.is_some() {
        let name = known.ok_or(DropReason::UnknownSyntheticAddress)?;
        let (index, rule) = rules(policy, protocol, port)
            .find(|(_, r)| r.allows_name(name))
            .ok_or(DropReason::NotAllowed)?;
        return finish(policy, index, rule, Target::Name(name.to_string()), port);
    }
    let reserved = reserved_range(dst);
    let (index, rule) = rules(policy, protocol, port)
        .find(|(_, r)| names_ip(r, dst, reserved))
        .ok_or(if reserved.is_some() {
            DropReason::ReservedDestination
        } else {
            DropReason::NotAllowed
        })?;
    finish(policy, index, rule, Target::Ip(dst), port)
}

/// The route for a flow known by `name` (from moat's DNS, or sniffed from its first bytes).
pub fn route_name(policy: &Policy, name: &str, port: u16) -> Result<Route, DropReason> {
    let (index, rule) = rules(policy, Protocol::Tcp, port)
        .find(|(_, r)| r.allows_name(name))
        .ok_or(DropReason::NotAllowed)?;
    finish(policy, index, rule, Target::Name(name.to_string()), port)
}

/// Whether a flow to the IP literal `dst:port` may be named from its first bytes (TLS SNI,
/// HTTP Host): only outside the reserved ranges, and only if some rule for the port allows
/// names at all.
pub fn may_sniff(policy: &Policy, dst: Ipv4Addr, port: u16) -> bool {
    !SYNTHETIC_NET.contains(&dst)
        && reserved_range(dst).is_none()
        && rules(policy, Protocol::Tcp, port).any(|(_, r)| {
            r.to.as_ref()
                .is_none_or(|to| to.iter().any(|d| matches!(d, Destination::Name(_))))
        })
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

fn finish(
    policy: &Policy,
    index: usize,
    rule: &OutboundRule,
    target: Target,
    port: u16,
) -> Result<Route, DropReason> {
    let proxy = match rule.via {
        Via::Http => policy.proxy.http,
        Via::Socks5 => policy.proxy.socks5,
    }
    .ok_or(DropReason::NotAllowed)?;
    Ok(Route {
        target,
        port,
        via: rule.via,
        proxy,
        rule: index,
    })
}

/// Whether a rule allows the IP literal `ip`: through a CIDR in `to`, which for a reserved
/// address must lie inside its reserved range.
fn names_ip(rule: &OutboundRule, ip: Ipv4Addr, reserved: Option<Ipv4Net>) -> bool {
    rule.to.as_ref().is_some_and(|to| {
        to.iter().any(|d| match d {
            Destination::Cidr(c) => c.contains(&ip) && reserved.is_none_or(|r| r.contains(c)),
            Destination::Name(_) => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(rules: &str) -> Policy {
        let text = format!(
            "[vm]\nname = \"r\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n[proxy]\nhttp = \"127.0.0.1:3128\"\nsocks5 = \"127.0.0.1:1080\"\n{rules}"
        );
        Policy::parse(&text, Path::new("r.toml")).unwrap()
    }

    #[test]
    fn names_from_the_pool_route_by_name() {
        let p =
            policy("[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"*.example.com\"]\n");
        let mut names = NamePool::default();
        let ok = names.assign("www.example.com");
        let other = names.assign("evil.test");
        let r = route_tcp(&p, &names, ok, 443).unwrap();
        assert_eq!(
            (r.target, r.via, r.rule),
            (Target::Name("www.example.com".into()), Via::Http, 0)
        );
        assert_eq!(
            route_tcp(&p, &names, ok, 80),
            Err(DropReason::NotAllowed),
            "port"
        );
        assert_eq!(
            route_tcp(&p, &names, other, 443),
            Err(DropReason::NotAllowed),
            "name"
        );
        assert_eq!(
            route_tcp(&p, &names, Ipv4Addr::new(198, 18, 200, 1), 443),
            Err(DropReason::UnknownSyntheticAddress)
        );
    }

    #[test]
    fn ip_literals_need_a_cidr_and_reserved_ranges_need_their_own() {
        let p = policy("[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"203.0.113.0/24\", \"0.0.0.0/0\", \"127.0.0.1/32\"]\n");
        let names = NamePool::default();
        assert!(route_tcp(&p, &names, Ipv4Addr::new(203, 0, 113, 5), 80).is_ok());
        assert!(
            route_tcp(&p, &names, Ipv4Addr::new(198, 51, 100, 5), 80).is_ok(),
            "0.0.0.0/0 covers public space"
        );
        for reserved in [
            [169, 254, 169, 254],
            [10, 0, 0, 3],
            [192, 168, 1, 1],
            [172, 16, 0, 1],
            [100, 64, 0, 1],
            [0, 1, 2, 3],
            [127, 0, 0, 2],
            [224, 0, 0, 1],
        ] {
            assert_eq!(
                route_tcp(&p, &names, Ipv4Addr::from(reserved), 80),
                Err(DropReason::ReservedDestination),
                "{reserved:?}: a catch-all CIDR does not name a reserved range"
            );
        }
        assert!(
            route_tcp(&p, &names, Ipv4Addr::new(127, 0, 0, 1), 80).is_ok(),
            "named by 127.0.0.1/32"
        );
        let no_cidr = policy("[[outbound]]\nprotocol = \"tcp\"\nports = [80]\n");
        assert_eq!(
            route_tcp(&no_cidr, &names, Ipv4Addr::new(203, 0, 113, 5), 80),
            Err(DropReason::NotAllowed)
        );
    }
}
