//! `[[outbound]]`: the flows that may leave, their ports, destinations and proxy.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::super::model::*;
use super::super::Located;
use super::diagnostics::Ctx;
use super::raw::{RawOutbound, RawPort, RawProxy};
use super::values::{cidr, name_pattern};

/// Which proxies `[proxy]` names (rightly or not: a wrong address is its own error), for the
/// rules that need one.
#[derive(Clone, Copy)]
pub(super) struct Proxies {
    http: bool,
    socks5: bool,
}

impl Proxies {
    /// No `[proxy]` table.
    pub(super) const NONE: Proxies = Proxies {
        http: false,
        socks5: false,
    };

    pub(super) fn named_in(raw: &RawProxy) -> Proxies {
        Proxies {
            http: raw.http.is_some(),
            socks5: raw.socks5.is_some(),
        }
    }
}

/// Rule `i`. `proxies` is `None` when `[proxy]` is malformed: then a rule is not blamed for
/// lacking one.
pub(super) fn outbound(
    ctx: &Ctx<'_>,
    i: usize,
    rule: &RawOutbound,
    proxies: Option<Proxies>,
) -> Option<OutboundRule> {
    let key = |k: &str| format!("outbound[{i}].{k}");
    let protocol = ctx.keep(match rule.protocol.get_ref().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => Err(ctx.at(
            &rule.protocol,
            key("protocol"),
            format!("{other:?} is not a protocol; use \"tcp\" or \"udp\""),
        )),
    });
    let ports = if rule.ports.get_ref().is_empty() {
        ctx.report(ctx.at(
            &rule.ports,
            key("ports"),
            "is empty, so the rule allows nothing; list ports such as [80, 443] or ranges such as [\"8000-8100\"]",
        ));
        None
    } else {
        ctx.all(
            rule.ports
                .get_ref()
                .iter()
                .map(|p| port_range(ctx, p, &key("ports"))),
        )
    };
    let to = match &rule.to {
        None => Some(None),
        Some(list) if list.get_ref().is_empty() => {
            ctx.report(ctx.at(
                list,
                key("to"),
                "is empty, so the rule allows nothing; remove `to` to allow any name, or list names and CIDRs",
            ));
            None
        }
        Some(list) => ctx
            .all(
                list.get_ref()
                    .iter()
                    .map(|d| destination(ctx, d, &key("to"))),
            )
            .map(Some),
    };
    let via = match rule.via.as_ref() {
        None => protocol.map(|protocol| match protocol {
            Protocol::Tcp => Via::Http,
            Protocol::Udp => Via::Socks5,
        }),
        Some(v) => ctx.keep(match v.get_ref().as_str() {
            "http" => Ok(Via::Http),
            "socks5" => Ok(Via::Socks5),
            other => Err(ctx.at(
                v,
                key("via"),
                format!("{other:?} is not a proxy kind; use \"http\" or \"socks5\""),
            )),
        }),
    };
    let (protocol, via) = (protocol?, via?);
    ctx.keep(proxy_for(ctx, rule, &key("via"), protocol, via, proxies))?;
    Some(OutboundRule {
        protocol,
        ports: ports?,
        to: to?,
        via,
    })
}

/// The rule's proxy suits its protocol and `[proxy]` has it.
fn proxy_for(
    ctx: &Ctx<'_>,
    rule: &RawOutbound,
    key: &str,
    protocol: Protocol,
    via: Via,
    proxies: Option<Proxies>,
) -> Result<(), Located> {
    // A defaulted `via` is blamed on `protocol`, the key that chose it.
    let via_span = rule
        .via
        .as_ref()
        .map_or_else(|| rule.protocol.span(), |v| v.span());
    if protocol == Protocol::Udp && via == Via::Http {
        return Err(ctx.err(
            via_span,
            key,
            "udp cannot go through an HTTP CONNECT proxy; use via = \"socks5\"",
        ));
    }
    let Some(proxies) = proxies else {
        return Ok(());
    };
    let missing = match via {
        Via::Http if !proxies.http => Some(("HTTP", "http = \"127.0.0.1:3128\"")),
        Via::Socks5 if !proxies.socks5 => Some(("SOCKS5", "socks5 = \"127.0.0.1:1080\"")),
        _ => None,
    };
    if let Some((kind, example)) = missing {
        let defaulted = if rule.via.is_none() {
            format!(" (the default for {protocol})")
        } else {
            String::new()
        };
        return Err(ctx.err(
            via_span,
            key,
            format!(
                "this rule goes through the {kind} proxy{defaulted} but [proxy] has no {via} address; add {example} to [proxy]"
            ),
        ));
    }
    Ok(())
}

fn port_range(ctx: &Ctx<'_>, raw: &Spanned<RawPort>, key: &str) -> Result<PortRange, Located> {
    let bad = |what: String| ctx.at(raw, key, what);
    let one = |n: i64| u16::try_from(n).ok().filter(|p| *p > 0);
    match raw.get_ref() {
        RawPort::Number(n) => {
            let p = one(*n).ok_or_else(|| bad(format!("{n} is not a port; use 1..=65535")))?;
            Ok(PortRange { lo: p, hi: p })
        }
        RawPort::Range(s) => {
            let parsed = s.split_once('-').and_then(|(lo, hi)| {
                let lo = one(lo.trim().parse().ok()?)?;
                let hi = one(hi.trim().parse().ok()?)?;
                Some((lo, hi))
            });
            match parsed {
                Some((lo, hi)) if lo <= hi => Ok(PortRange { lo, hi }),
                Some((lo, hi)) => Err(bad(format!(
                    "range {lo}-{hi} runs backwards; write it as \"{hi}-{lo}\""
                ))),
                None => Err(bad(format!(
                    "{s:?} is not a port range; write \"lo-hi\" with ports in 1..=65535, or a number for one port"
                ))),
            }
        }
    }
}

fn destination(ctx: &Ctx<'_>, raw: &Spanned<String>, key: &str) -> Result<Destination, Located> {
    let s = raw.get_ref();
    let ipv6 = || {
        ctx.at(
            raw,
            key,
            format!("{s:?}: IPv6 is not supported (moat drops IPv6); use an IPv4 CIDR"),
        )
    };
    if s.contains('/') {
        return match cidr(ctx, raw, key)? {
            IpNet::V4(net) => Ok(Destination::Cidr(net)),
            IpNet::V6(_) => Err(ipv6()),
        };
    }
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => {
            return Err(ctx.at(
                raw,
                key,
                format!("{s:?} is a bare IP address; write it as a CIDR, like \"{s}/32\""),
            ))
        }
        Ok(IpAddr::V6(_)) => return Err(ipv6()),
        Err(_) => {}
    }
    name_pattern(s).map(Destination::Name).ok_or_else(|| {
        ctx.at(
            raw,
            key,
            format!(
                "{s:?} is neither a DNS name (\"example.com\", \"*.example.com\") nor an IPv4 CIDR (\"203.0.113.0/24\")"
            ),
        )
    })
}
