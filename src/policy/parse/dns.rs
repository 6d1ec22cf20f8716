//! `[dns]`: the names the guest may resolve, static records, and how names are answered.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::super::model::*;
use super::super::Located;
use super::diagnostics::{push_key, Ctx};
use super::raw::RawDns;
use super::values::{name_pattern, socket_addr};

pub(super) fn dns(ctx: &Ctx<'_>, raw: Option<&RawDns>) -> Result<Dns, Located> {
    let Some(raw) = raw else {
        return Ok(Dns::default());
    };
    let allow = raw
        .allow
        .iter()
        .map(|a| {
            name_pattern(a.get_ref()).ok_or_else(|| {
                ctx.at(
                    a,
                    "dns.allow",
                    format!(
                        "{:?} is not a DNS name; write names like \"example.com\" or \"*.example.com\"",
                        a.get_ref()
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // In file order, so a clash is reported at the second of the two.
    let mut entries: Vec<_> = raw.records.iter().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    let mut records = BTreeMap::new();
    for (name, addr) in entries {
        let key = push_key("dns.records".to_string(), name.get_ref());
        let Some(NamePattern::Exact(n)) = name_pattern(name.get_ref()) else {
            return Err(ctx.at(
                name,
                key,
                format!(
                    "{:?} is not a DNS name; static records need a full name such as \"api.internal\" (no wildcards)",
                    name.get_ref()
                ),
            ));
        };
        let ip: Ipv4Addr = addr.get_ref().parse().map_err(|_| {
            ctx.at(
                addr,
                key.clone(),
                format!(
                    "{:?} is not an IPv4 address; static records are A records, like \"10.0.0.1\"",
                    addr.get_ref()
                ),
            )
        })?;
        if records.insert(n.clone(), ip).is_some() {
            return Err(ctx.at(
                name,
                key,
                format!("{n:?} has a record already (names are case-insensitive); keep one"),
            ));
        }
    }

    let mode = match raw.mode.as_ref() {
        None => DnsMode::Proxy,
        Some(m) => match m.get_ref().as_str() {
            "proxy" => DnsMode::Proxy,
            "upstream" => DnsMode::Upstream,
            other => {
                return Err(ctx.at(
                    m,
                    "dns.mode",
                    format!("{other:?} is not a DNS mode; use \"proxy\" or \"upstream\""),
                ))
            }
        },
    };
    let upstream = raw
        .upstream
        .as_ref()
        .map(|u| socket_addr(ctx, u, "dns.upstream", false))
        .transpose()?;
    match (mode, &raw.mode, &raw.upstream) {
        (DnsMode::Upstream, Some(m), None) => {
            return Err(ctx.at(
                m,
                "dns.upstream",
                "mode = \"upstream\" needs a resolver; add upstream = \"127.0.0.1:53\" to [dns]",
            ))
        }
        (DnsMode::Proxy, _, Some(u)) => {
            return Err(ctx.at(
                u,
                "dns.upstream",
                "is used only with mode = \"upstream\"; add that, or remove upstream",
            ))
        }
        _ => {}
    }
    Ok(Dns {
        allow,
        records,
        mode,
        upstream,
    })
}
