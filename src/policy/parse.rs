//! From TOML text to a validated [`Policy`]: serde reads the raw shape (unknown keys are
//! errors), then each field is checked with its span so every error points at its place.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use toml::Spanned;

use super::model::*;
use super::{PolicyError, GATEWAY_MAC};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    vm: RawVm,
    proxy: Option<RawProxy>,
    #[serde(default)]
    outbound: Vec<Spanned<RawOutbound>>,
    dns: Option<RawDns>,
    #[serde(default)]
    forward: Vec<Spanned<RawForward>>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    mac: Spanned<String>,
    address: Spanned<String>,
    gateway: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    http: Option<Spanned<String>>,
    socks5: Option<Spanned<String>>,
    explicit_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    protocol: Spanned<String>,
    ports: Spanned<Vec<Spanned<RawPort>>>,
    to: Option<Vec<Spanned<String>>>,
    via: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Range(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    records: BTreeMap<Spanned<String>, Spanned<String>>,
    mode: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: Spanned<String>,
    guest_port: Spanned<i64>,
    from: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_flows: Option<Spanned<i64>>,
    egress_bps: Option<Spanned<i64>>,
    ingress_bps: Option<Spanned<i64>>,
}

/// Turns spans into `file:line:col: key: reason` errors.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> PolicyError {
        let (line, col) = line_col(self.text, span.start);
        PolicyError::Invalid {
            file: self.file.to_path_buf(),
            line,
            col,
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> PolicyError {
        self.err(value.span(), key, reason)
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The dotted key at a byte offset, from the nearest table header and the key on that line:
/// serde's own errors (unknown key, wrong type) carry a span but no path.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let mut table = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in text[..line_start]
        .lines()
        .chain(line.starts_with('[').then_some(line))
    {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|s| s.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|s| s.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    if line.starts_with('[') {
        return table;
    }
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

pub fn parse(text: &str, file: &Path) -> Result<Policy, PolicyError> {
    let ctx = Ctx { text, file };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim().to_string();
        let mut key = key_at(text, span.start);
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            key = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
            if message.contains("vm") || key == "vm" {
                key = format!("vm.{field}");
            }
        }
        let key = if key.is_empty() {
            "(file)".to_string()
        } else {
            key
        };
        ctx.err(span, key, fix_hint(&message))
    })?;

    let vm = vm(&ctx, &raw.vm)?;
    let proxy = proxy(&ctx, raw.proxy.as_ref())?;
    let outbound = raw
        .outbound
        .iter()
        .enumerate()
        .map(|(i, rule)| outbound(&ctx, i, rule, &proxy))
        .collect::<Result<Vec<_>, _>>()?;
    let dns = dns(&ctx, raw.dns.as_ref())?;
    let forward = forwards(&ctx, &raw.forward)?;
    let limits = limits(&ctx, raw.limits.as_ref())?;
    Ok(Policy {
        source: file.to_path_buf(),
        vm,
        proxy,
        outbound,
        dns,
        forward,
        limits,
    })
}

/// serde's messages, with what to do added.
fn fix_hint(message: &str) -> String {
    if message.starts_with("unknown field") {
        format!("{message}; remove it or fix its spelling (see policy/example.toml)")
    } else if message.starts_with("missing field") {
        format!("{message}; add it (see policy/example.toml)")
    } else {
        format!("{message}; see policy/example.toml for the expected form")
    }
}

fn vm(ctx: &Ctx<'_>, raw: &RawVm) -> Result<Vm, PolicyError> {
    let name = raw.name.get_ref();
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(ctx.at(
            &raw.name,
            "vm.name",
            format!("{name:?} is not a valid VM name; use 1-63 characters of a-z, 0-9 and '-'"),
        ));
    }

    let mac: MacAddr = raw.mac.get_ref().parse().map_err(|()| {
        ctx.at(
            &raw.mac,
            "vm.mac",
            format!(
                "{:?} is not a MAC address; write six hex bytes such as 52:54:00:12:34:56",
                raw.mac.get_ref()
            ),
        )
    })?;
    if mac.is_multicast() {
        return Err(ctx.at(
            &raw.mac,
            "vm.mac",
            format!(
                "{:?} is a multicast MAC; use a unicast address such as 52:54:00:12:34:56",
                raw.mac.get_ref()
            ),
        ));
    }
    if mac.0 == [0; 6] {
        return Err(ctx.at(&raw.mac, "vm.mac", "00:00:00:00:00:00 is not a usable MAC; use a unicast address such as 52:54:00:12:34:56"));
    }
    if mac == GATEWAY_MAC {
        return Err(ctx.at(
            &raw.mac,
            "vm.mac",
            format!("{mac} is moat's own gateway MAC; choose another"),
        ));
    }

    let net: Ipv4Net = raw.address.get_ref().parse().map_err(|_| {
        ctx.at(
            &raw.address,
            "vm.address",
            format!(
                "{:?} is not an IPv4 address with a prefix; write it like 10.0.0.2/30",
                raw.address.get_ref()
            ),
        )
    })?;
    if net.prefix_len() > 30 {
        return Err(ctx.at(
            &raw.address,
            "vm.address",
            format!(
                "/{} leaves no room for the guest and its gateway; use /30 or a shorter prefix",
                net.prefix_len()
            ),
        ));
    }
    let subnet = net.trunc();
    let address = net.addr();
    if address == subnet.network() || address == subnet.broadcast() {
        return Err(ctx.at(
            &raw.address,
            "vm.address",
            format!(
                "{address} is the network or broadcast address of {subnet}; use a host address"
            ),
        ));
    }

    let gateway = match &raw.gateway {
        Some(g) => {
            let gw: Ipv4Addr = g.get_ref().parse().map_err(|_| {
                ctx.at(
                    g,
                    "vm.gateway",
                    format!(
                        "{:?} is not an IPv4 address; write it like 10.0.0.1",
                        g.get_ref()
                    ),
                )
            })?;
            if !subnet.contains(&gw) {
                return Err(ctx.at(
                    g,
                    "vm.gateway",
                    format!("{gw} is outside the VM's subnet {subnet}; pick an address inside it"),
                ));
            }
            if gw == address {
                return Err(ctx.at(
                    g,
                    "vm.gateway",
                    format!("{gw} is the guest's own address; pick another address in {subnet}"),
                ));
            }
            if gw == subnet.network() || gw == subnet.broadcast() {
                return Err(ctx.at(
                    g,
                    "vm.gateway",
                    format!(
                        "{gw} is the network or broadcast address of {subnet}; use a host address"
                    ),
                ));
            }
            gw
        }
        None if subnet.prefix_len() == 30 => {
            subnet.hosts().find(|h| *h != address).ok_or_else(|| {
                ctx.at(
                    &raw.address,
                    "vm.gateway",
                    "no host address left for the gateway",
                )
            })?
        }
        None => {
            return Err(ctx.at(&raw.address, "vm.gateway", format!("required for a /{} subnet (only a /30 has an obvious gateway); add gateway = \"...\" in [vm]", subnet.prefix_len())));
        }
    };

    let mtu = match &raw.mtu {
        None => 1500,
        Some(m) => match u16::try_from(*m.get_ref()) {
            Ok(v) if (68..=9000).contains(&v) => v,
            _ => {
                return Err(ctx.at(
                    m,
                    "vm.mtu",
                    format!(
                        "{} is outside 68..=9000; use 1500 unless the guest needs jumbo frames",
                        m.get_ref()
                    ),
                ))
            }
        },
    };

    Ok(Vm {
        name: name.clone(),
        mac,
        address,
        prefix_len: subnet.prefix_len(),
        gateway,
        mtu,
    })
}

fn socket_addr(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<SocketAddr, PolicyError> {
    value.get_ref().parse().map_err(|_| {
        ctx.at(
            value,
            key,
            format!(
                "{:?} is not an address:port; write it like 127.0.0.1:3128",
                value.get_ref()
            ),
        )
    })
}

fn port(ctx: &Ctx<'_>, value: &Spanned<i64>, key: &str) -> Result<u16, PolicyError> {
    match u16::try_from(*value.get_ref()) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ctx.at(
            value,
            key,
            format!("{} is not a port; use 1..=65535", value.get_ref()),
        )),
    }
}

fn proxy(ctx: &Ctx<'_>, raw: Option<&RawProxy>) -> Result<Proxy, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Proxy::default());
    };
    let http = raw
        .http
        .as_ref()
        .map(|v| socket_addr(ctx, v, "proxy.http"))
        .transpose()?;
    let socks5 = raw
        .socks5
        .as_ref()
        .map(|v| socket_addr(ctx, v, "proxy.socks5"))
        .transpose()?;
    let explicit_port = raw
        .explicit_port
        .as_ref()
        .map(|v| port(ctx, v, "proxy.explicit_port"))
        .transpose()?;
    if let (Some(p), None) = (&raw.explicit_port, http) {
        return Err(ctx.at(
            p,
            "proxy.explicit_port",
            "needs proxy.http, where the spliced connections go; add http = \"127.0.0.1:3128\"",
        ));
    }
    Ok(Proxy {
        http,
        socks5,
        explicit_port,
    })
}

fn outbound(
    ctx: &Ctx<'_>,
    i: usize,
    raw: &Spanned<RawOutbound>,
    proxy: &Proxy,
) -> Result<OutboundRule, PolicyError> {
    let key = |k: &str| format!("outbound[{i}].{k}");
    let rule = raw.get_ref();
    let protocol = match rule.protocol.get_ref().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return Err(ctx.at(
                &rule.protocol,
                key("protocol"),
                format!("{other:?} is not a protocol; use \"tcp\" or \"udp\""),
            ))
        }
    };
    if rule.ports.get_ref().is_empty() {
        return Err(ctx.at(&rule.ports, key("ports"), "is empty, so the rule allows nothing; list ports such as [80, 443] or ranges such as [\"8000-8100\"]"));
    }
    let ports = rule
        .ports
        .get_ref()
        .iter()
        .map(|p| port_range(ctx, p, &key("ports")))
        .collect::<Result<Vec<_>, _>>()?;
    let to = rule
        .to
        .as_ref()
        .map(|to| {
            to.iter()
                .map(|d| destination(ctx, d, &key("to")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let via = match rule.via.as_ref().map(|v| v.get_ref().as_str()) {
        None => match protocol {
            Protocol::Tcp => Via::Http,
            Protocol::Udp => Via::Socks5,
        },
        Some("http") => Via::Http,
        Some("socks5") => Via::Socks5,
        Some(other) => {
            let v = rule.via.as_ref().expect("matched Some");
            return Err(ctx.at(
                v,
                key("via"),
                format!("{other:?} is not a proxy kind; use \"http\" or \"socks5\""),
            ));
        }
    };
    let via_span = rule.via.as_ref().map_or(rule.protocol.span(), |v| v.span());
    if protocol == Protocol::Udp && via == Via::Http {
        return Err(ctx.err(
            via_span,
            key("via"),
            "udp cannot go through an HTTP CONNECT proxy; use via = \"socks5\"",
        ));
    }
    if via == Via::Http && proxy.http.is_none() {
        return Err(ctx.err(via_span, key("via"), "this rule goes through the HTTP proxy but [proxy] has no http address; add http = \"127.0.0.1:3128\""));
    }
    if via == Via::Socks5 && proxy.socks5.is_none() {
        return Err(ctx.err(via_span, key("via"), "this rule goes through the SOCKS5 proxy but [proxy] has no socks5 address; add socks5 = \"127.0.0.1:1080\""));
    }
    Ok(OutboundRule {
        protocol,
        ports,
        to,
        via,
    })
}

fn port_range(ctx: &Ctx<'_>, raw: &Spanned<RawPort>, key: &str) -> Result<PortRange, PolicyError> {
    let bad = |what: String| ctx.at(raw, key, what);
    let one = |n: i64| -> Option<u16> { u16::try_from(n).ok().filter(|p| *p > 0) };
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
                    "range {lo}-{hi} runs backwards; write it as {hi}-{lo}"
                ))),
                None => Err(bad(format!(
                    "{s:?} is not a port range; write \"lo-hi\" with ports in 1..=65535"
                ))),
            }
        }
    }
}

/// A DNS name pattern: labels of letters, digits, '-' and '_', optionally `*.` in front.
fn name_pattern(s: &str) -> Option<NamePattern> {
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
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // A name of digits and dots only is an IP literal, not a name.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    valid.then_some(if wild {
        NamePattern::Wildcard(name)
    } else {
        NamePattern::Exact(name)
    })
}

fn destination(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    key: &str,
) -> Result<Destination, PolicyError> {
    let s = raw.get_ref();
    if s.contains('/') {
        if let Ok(net) = s.parse::<Ipv4Net>() {
            return Ok(Destination::Cidr(net.trunc()));
        }
        if s.parse::<IpNet>().is_ok() {
            return Err(ctx.at(
                raw,
                key,
                format!("{s:?}: IPv6 is not supported (moat drops IPv6); use an IPv4 CIDR"),
            ));
        }
        return Err(ctx.at(
            raw,
            key,
            format!("{s:?} is not a valid CIDR; write it like 203.0.113.0/24"),
        ));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(ctx.at(
            raw,
            key,
            format!("{s:?} is a bare IP address; write it as a CIDR such as {s}/32"),
        ));
    }
    name_pattern(s).map(Destination::Name).ok_or_else(|| {
        ctx.at(
            raw,
            key,
            format!(
                "{s:?} is neither a DNS name (\"example.com\", \"*.example.com\") nor an IPv4 CIDR"
            ),
        )
    })
}

fn dns(ctx: &Ctx<'_>, raw: Option<&RawDns>) -> Result<Dns, PolicyError> {
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
                    format!("{:?} is not a DNS name or \"*.\" pattern", a.get_ref()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut records = BTreeMap::new();
    for (name, addr) in &raw.records {
        let key = format!("dns.records.{}", name.get_ref());
        let Some(NamePattern::Exact(n)) = name_pattern(name.get_ref()) else {
            return Err(ctx.at(
                name,
                key,
                format!(
                    "{:?} is not a DNS name (no wildcards in records)",
                    name.get_ref()
                ),
            ));
        };
        let ip: Ipv4Addr = addr.get_ref().parse().map_err(|_| {
            ctx.at(
                addr,
                key.clone(),
                format!(
                    "{:?} is not an IPv4 address; static records are A records",
                    addr.get_ref()
                ),
            )
        })?;
        records.insert(n, ip);
    }
    let mode = match raw.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("proxy") => DnsMode::Proxy,
        Some("upstream") => DnsMode::Upstream,
        Some(other) => {
            let m = raw.mode.as_ref().expect("matched Some");
            return Err(ctx.at(
                m,
                "dns.mode",
                format!("{other:?} is not a DNS mode; use \"proxy\" or \"upstream\""),
            ));
        }
    };
    let upstream = raw
        .upstream
        .as_ref()
        .map(|u| socket_addr(ctx, u, "dns.upstream"))
        .transpose()?;
    if mode == DnsMode::Upstream && upstream.is_none() {
        let m = raw.mode.as_ref().expect("upstream mode is explicit");
        return Err(ctx.at(
            m,
            "dns.upstream",
            "mode = \"upstream\" needs an upstream resolver; add upstream = \"127.0.0.1:53\"",
        ));
    }
    Ok(Dns {
        allow,
        records,
        mode,
        upstream,
    })
}

fn forwards(ctx: &Ctx<'_>, raw: &[Spanned<RawForward>]) -> Result<Vec<Forward>, PolicyError> {
    let mut out: Vec<Forward> = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        let key = |k: &str| format!("forward[{i}].{k}");
        let r = f.get_ref();
        let listen = socket_addr(ctx, &r.listen, &key("listen"))?;
        let guest_port = port(ctx, &r.guest_port, &key("guest_port"))?;
        let from = match &r.from {
            None => vec![
                IpNet::V4(Ipv4Net::new(Ipv4Addr::LOCALHOST, 8).expect("valid prefix")),
                IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            ],
            Some(list) => list
                .iter()
                .map(|c| {
                    c.get_ref()
                        .parse::<IpNet>()
                        .map(|n| n.trunc())
                        .map_err(|_| {
                            ctx.at(
                                c,
                                key("from"),
                                format!(
                                    "{:?} is not a CIDR; write it like 127.0.0.0/8",
                                    c.get_ref()
                                ),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if let Some((j, _)) = out
            .iter()
            .enumerate()
            .find(|(_, o)| overlaps(o.listen, listen))
        {
            return Err(ctx.at(
                &r.listen,
                key("listen"),
                format!(
                    "{listen} overlaps forward[{j}].listen ({}); each forward needs its own port",
                    out[j].listen
                ),
            ));
        }
        out.push(Forward {
            listen,
            guest_port,
            from,
        });
    }
    Ok(out)
}

/// Two listen addresses collide: same port, and same IP or either unspecified.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn limits(ctx: &Ctx<'_>, raw: Option<&RawLimits>) -> Result<Limits, PolicyError> {
    let Some(raw) = raw else {
        return Ok(Limits::default());
    };
    let max_flows = match &raw.max_flows {
        None => DEFAULT_MAX_FLOWS,
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if (1..=1_000_000).contains(&n) => n,
            _ => {
                return Err(ctx.at(
                    v,
                    "limits.max_flows",
                    format!("{} is outside 1..=1000000", v.get_ref()),
                ))
            }
        },
    };
    let bps = |v: &Option<Spanned<i64>>, key: &str| -> Result<u64, PolicyError> {
        match v {
            None => Ok(0),
            Some(v) => u64::try_from(*v.get_ref()).map_err(|_| {
                ctx.at(
                    v,
                    key,
                    format!(
                        "{} is negative; use 0 for unlimited or a rate in bits per second",
                        v.get_ref()
                    ),
                )
            }),
        }
    };
    Ok(Limits {
        max_flows,
        egress_bps: bps(&raw.egress_bps, "limits.egress_bps")?,
        ingress_bps: bps(&raw.ingress_bps, "limits.ingress_bps")?,
    })
}
