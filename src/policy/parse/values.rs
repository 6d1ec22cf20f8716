//! Value forms shared by several sections: socket addresses, ports, CIDRs and DNS names.

use std::net::SocketAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::super::model::NamePattern;
use super::super::Located;
use super::diagnostics::Ctx;

/// An address moat connects to (a proxy, the DNS upstream), or listens on when `listen`.
pub(super) fn socket_addr(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    key: &str,
    listen: bool,
) -> Result<SocketAddr, Located> {
    let text = raw.get_ref();
    let example = if listen {
        "127.0.0.1:8080"
    } else {
        "127.0.0.1:3128"
    };
    let addr: SocketAddr = text.parse().map_err(|_| {
        ctx.at(
            raw,
            key,
            format!(
                "{text:?} is not an IP address and port; write it like {example} (no host names)"
            ),
        )
    })?;
    if addr.port() == 0 {
        let what = if listen {
            "would listen on a random port"
        } else {
            "cannot be connected to"
        };
        return Err(ctx.at(
            raw,
            key,
            format!("port 0 {what}; give a port, like {example}"),
        ));
    }
    if !listen && addr.ip().is_unspecified() {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "{} is not an address to connect to; use the proxy's address, like {example}",
                addr.ip()
            ),
        ));
    }
    Ok(addr)
}

pub(super) fn port(ctx: &Ctx<'_>, raw: &Spanned<i64>, key: &str) -> Result<u16, Located> {
    match u16::try_from(*raw.get_ref()) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ctx.at(
            raw,
            key,
            format!("{} is not a port; use 1..=65535", raw.get_ref()),
        )),
    }
}

/// A DNS name pattern: labels of letters, digits, '-' and '_', optionally `*.` in front.
/// Lowercased, trailing dot removed.
pub(super) fn name_pattern(s: &str) -> Option<NamePattern> {
    let lower = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, lower),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // Digits and dots only is an IP literal, not a name.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    valid.then_some(if wild {
        NamePattern::Wildcard(name)
    } else {
        NamePattern::Exact(name)
    })
}

/// A CIDR as written, refusing host bits (`10.1.2.3/8` is a typo for something).
pub(super) fn cidr(ctx: &Ctx<'_>, raw: &Spanned<String>, key: &str) -> Result<IpNet, Located> {
    let text = raw.get_ref();
    let net: IpNet = text.parse().map_err(|_| {
        ctx.at(
            raw,
            key,
            format!("{text:?} is not a valid CIDR; write it like 203.0.113.0/24"),
        )
    })?;
    if net.trunc() != net {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "{text:?} has host bits set; write {} for the network or {}/{} for one address",
                net.trunc(),
                net.addr(),
                net.max_prefix_len()
            ),
        ));
    }
    Ok(net)
}
