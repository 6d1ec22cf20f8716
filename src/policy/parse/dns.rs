//! `[dns]`: the names the guest may resolve, static records, and how names are answered.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::super::model::*;
use super::diagnostics::{push_key, Ctx};
use super::raw::RawDns;
use super::values::{name_pattern, socket_addr};

pub(super) fn dns(ctx: &Ctx<'_>, raw: &RawDns) -> Option<Dns> {
    let allow = ctx.all(raw.allow.iter().map(|a| {
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
    }));
    let records = records(ctx, raw);
    let mode = ctx.keep(match raw.mode.as_ref() {
        None => Ok(DnsMode::Proxy),
        Some(m) => match m.get_ref().as_str() {
            "proxy" => Ok(DnsMode::Proxy),
            "upstream" => Ok(DnsMode::Upstream),
            other => Err(ctx.at(
                m,
                "dns.mode",
                format!("{other:?} is not a DNS mode; use \"proxy\" or \"upstream\""),
            )),
        },
    });
    let upstream = ctx.keep(
        raw.upstream
            .as_ref()
            .map(|u| socket_addr(ctx, u, "dns.upstream", false))
            .transpose(),
    );
    let (mode, upstream) = (mode?, upstream?);
    match (mode, &raw.mode, &raw.upstream) {
        (DnsMode::Upstream, Some(m), None) => ctx.report(ctx.at(
            m,
            "dns.upstream",
            "mode = \"upstream\" needs a resolver; add upstream = \"127.0.0.1:53\" to [dns]",
        )),
        (DnsMode::Proxy, _, Some(u)) => ctx.report(ctx.at(
            u,
            "dns.upstream",
            "is used only with mode = \"upstream\"; add that, or remove upstream",
        )),
        _ => {
            return Some(Dns {
                allow: allow?,
                records: records?,
                mode,
                upstream,
            })
        }
    }
    None
}

/// `dns.records`: full names to IPv4 addresses, one record a name.
fn records(ctx: &Ctx<'_>, raw: &RawDns) -> Option<BTreeMap<String, Ipv4Addr>> {
    // In file order, so a clash is reported at the second of the two.
    let mut entries: Vec<_> = raw.records.iter().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    let mut records = BTreeMap::new();
    let mut valid = true;
    for (name, addr) in entries {
        let key = push_key("dns.records".to_string(), name.get_ref());
        let n = match name_pattern(name.get_ref()) {
            Some(NamePattern::Exact(n)) => Some(n),
            _ => {
                ctx.report(ctx.at(
                    name,
                    key.clone(),
                    format!(
                        "{:?} is not a DNS name; static records need a full name such as \"api.internal\" (no wildcards)",
                        name.get_ref()
                    ),
                ));
                None
            }
        };
        let ip = addr.get_ref().parse::<Ipv4Addr>().ok();
        if ip.is_none() {
            ctx.report(ctx.at(
                addr,
                key.clone(),
                format!(
                    "{:?} is not an IPv4 address; static records are A records, like \"10.0.0.1\"",
                    addr.get_ref()
                ),
            ));
        }
        valid &= n.is_some() && ip.is_some();
        let Some(n) = n else { continue };
        match records.entry(n) {
            Entry::Vacant(slot) => {
                slot.insert(ip);
            }
            Entry::Occupied(taken) => {
                ctx.report(ctx.at(
                    name,
                    key,
                    format!(
                        "{:?} has a record already (names are case-insensitive); keep one",
                        taken.key()
                    ),
                ));
                valid = false;
            }
        }
    }
    valid.then(|| {
        records
            .into_iter()
            .filter_map(|(n, ip)| Some((n, ip?)))
            .collect()
    })
}
