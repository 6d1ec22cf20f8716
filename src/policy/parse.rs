//! From TOML text to a validated [`Policy`], in three steps, each with its own error kind:
//! the TOML parser (syntax), serde into raw structs that refuse unknown keys (shape), then
//! validation of each field with its span (meaning). Every error points at its place.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::model::*;
use super::SYNTHETIC_NET;
use super::{PolicyError, GATEWAY_MAC};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    vm: RawVm,
    proxy: Option<RawProxy>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
    dns: Option<RawDns>,
    #[serde(default)]
    forward: Vec<RawForward>,
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
    to: Option<Spanned<Vec<Spanned<String>>>>,
    via: Option<Spanned<String>>,
}

/// A port (`443`) or a range (`"8000-8100"`).
enum RawPort {
    Number(i64),
    Range(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawPort, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port such as 443 or a range such as \"8000-8100\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Range(v.to_owned()))
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
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
    from: Option<Spanned<Vec<Spanned<String>>>>,
}

const RATE_HINT: &str = "0 for unlimited or a rate in bits per second";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_flows: Option<Spanned<i64>>,
    egress_bps: Option<Spanned<i64>>,
    ingress_bps: Option<Spanned<i64>>,
    burst_bytes: Option<Spanned<i64>>,
}

/// The gateway answers DNS on this port (UDP and TCP): the explicit proxy cannot have it.
const DNS_PORT: u16 = 53;

/// Which step refused the policy.
#[derive(Clone, Copy)]
enum Kind {
    Syntax,
    UnknownKey,
    MissingKey,
    Invalid,
}

/// Turns spans into `file:line:col: key: reason` errors.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Ctx<'_> {
    fn error(&self, kind: Kind, span: Range<usize>, key: String, reason: String) -> PolicyError {
        let (line, col) = line_col(self.text, span.start);
        let file = self.file.to_path_buf();
        match kind {
            Kind::Syntax => PolicyError::Syntax {
                file,
                line,
                col,
                key,
                reason,
            },
            Kind::UnknownKey => PolicyError::UnknownKey {
                file,
                line,
                col,
                key,
                reason,
            },
            Kind::MissingKey => PolicyError::MissingKey {
                file,
                line,
                col,
                key,
                reason,
            },
            Kind::Invalid => PolicyError::Invalid {
                file,
                line,
                col,
                key,
                reason,
            },
        }
    }

    /// A validation error at `span`.
    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> PolicyError {
        self.error(Kind::Invalid, span, key.into(), reason.into())
    }

    /// A validation error at a value.
    fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> PolicyError {
        self.err(value.span(), key, reason)
    }

    /// The TOML parser refused the text.
    fn syntax(&self, e: &toml::de::Error) -> PolicyError {
        let span = e.span().unwrap_or(0..0);
        let message = one_line(e.message());
        let reason = if message.starts_with("duplicate key") {
            format!("{message}; a key may appear once in a table, keep one")
        } else {
            format!("{message}; fix the TOML syntax")
        };
        self.error(
            Kind::Syntax,
            span.clone(),
            syntax_key(self.text, span.start),
            reason,
        )
    }

    /// serde refused the shape: an unknown or missing key, or a value of the wrong type.
    fn shape(&self, e: &toml::de::Error) -> PolicyError {
        let span = e.span().unwrap_or(0..0);
        let message = one_line(e.message());
        let path = DeTable::parse(self.text)
            .map(|doc| path_at(&doc, &span))
            .unwrap_or_default();
        if let Some(field) = backticked(&message, "unknown field `") {
            // The span is the key itself, so the path normally ends with it already.
            let own = push_key(String::new(), field);
            let key = if path == own || path.ends_with(&format!(".{own}")) {
                path
            } else {
                push_key(path, field)
            };
            let expected = message.split_once(", expected ").map(|(_, e)| e);
            let reason = match expected.and_then(|e| closest(field, e)) {
                Some(near) => format!("unknown key `{field}`; did you mean `{near}`?"),
                None => match expected {
                    Some(e) => format!(
                        "unknown key `{field}`; remove it (allowed here: {})",
                        e.strip_prefix("one of ").unwrap_or(e)
                    ),
                    None => format!("unknown key `{field}`; remove it (see policy/example.toml)"),
                },
            };
            self.error(Kind::UnknownKey, span, key, reason)
        } else if let Some(field) = backticked(&message, "missing field `") {
            let key = push_key(path, field);
            let reason = match example_for(field) {
                Some(example) => format!("required key is missing; add {example}"),
                None => format!("required key is missing; add {field} (see policy/example.toml)"),
            };
            self.error(Kind::MissingKey, span, key, reason)
        } else {
            let key = if path.is_empty() {
                "(document)".to_string()
            } else {
                path
            };
            let reason = format!(
                "{}; see policy/example.toml for the expected form",
                humanize(&message)
            );
            self.error(Kind::Invalid, span, key, reason)
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A parser message on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// serde's type names in the words of a policy author.
fn humanize(message: &str) -> String {
    message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a map", "expected a table")
}

/// The name in `` prefix`name` ``.
fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// What to write for a required key.
fn example_for(field: &str) -> Option<&'static str> {
    Some(match field {
        "vm" => "a [vm] table with name, mac and address",
        "name" => "name = \"sandbox-17\"",
        "mac" => "mac = \"52:54:00:12:34:56\"",
        "address" => "address = \"10.0.0.2/30\"",
        "protocol" => "protocol = \"tcp\"",
        "ports" => "ports = [443]",
        "listen" => "listen = \"127.0.0.1:8080\"",
        "guest_port" => "guest_port = 3000",
        _ => return None,
    })
}

/// The expected key nearest to a misspelt one, from serde's "`a`, `b` or `c`" / "one of
/// `a`, `b`" list: one edit away, or two for keys of six characters or more.
fn closest<'e>(field: &str, expected: &'e str) -> Option<&'e str> {
    let most = if field.chars().count() >= 6 { 2 } else { 1 };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(field, k), k))
        .filter(|(d, _)| *d <= most)
        .min()
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours (`nmae` is one step from `name`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// `path.key`, quoting the key when it is not a bare TOML key (`dns.records."api.internal"`).
fn push_key(mut path: String, key: &str) -> String {
    if !path.is_empty() {
        path.push('.');
    }
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        path.push_str(key);
    } else {
        path.push_str(&format!("{key:?}"));
    }
    path
}

/// The dotted path of the deepest key or value whose span covers `span`: `vm.mac`,
/// `outbound[1].ports`. Arrays of tables get an index; elements of other arrays do not.
/// An empty span at the start of the document (serde's place for a missing top-level key)
/// is the document itself.
fn path_at(doc: &Spanned<DeTable<'_>>, span: &Range<usize>) -> String {
    let mut path = String::new();
    if *span != doc.span() && !(span.is_empty() && span.start == 0) {
        locate(doc.get_ref(), span, &mut path);
    }
    path
}

fn covers(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start < outer.end && outer.start <= inner.start && inner.end <= outer.end
}

fn locate(table: &DeTable<'_>, span: &Range<usize>, path: &mut String) -> bool {
    for (key, value) in table.iter() {
        let mut child = push_key(path.clone(), key.get_ref());
        if descend(value, span, &mut child)
            || covers(key.span(), span)
            || covers(value.span(), span)
        {
            *path = child;
            return true;
        }
    }
    false
}

fn descend(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => locate(table, span, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let DeValue::Table(table) = item.get_ref() else {
                return false;
            };
            let mut element = format!("{path}[{i}]");
            let hit = locate(table, span, &mut element) || covers(item.span(), span);
            if hit {
                *path = element;
            }
            hit
        }),
        _ => false,
    }
}

/// For a syntax error there is no tree to search: the table whose header comes last before
/// `offset` (with `[[array]]` indices), and the key on the error's line if it has one.
fn syntax_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let mut table = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let header_lines = text[..line_start]
        .lines()
        .chain(line.starts_with('[').then_some(line));
    for l in header_lines.map(str::trim) {
        if let Some(name) = l.strip_prefix("[[").and_then(|s| s.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|s| s.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let key = if line.starts_with('[') {
        ""
    } else {
        line.split_once('=').map_or("", |(k, _)| k.trim())
    };
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.\"'".contains(&b));
    match (table.is_empty(), key_ok) {
        (true, false) => "(document)".to_string(),
        (true, true) => key.to_string(),
        (false, false) => table,
        (false, true) => format!("{table}.{key}"),
    }
}

pub fn parse(text: &str, file: &Path) -> Result<Policy, PolicyError> {
    let ctx = Ctx { text, file };
    let doc = DeTable::parse(text).map_err(|e| ctx.syntax(&e))?;
    let raw =
        RawPolicy::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| ctx.shape(&e))?;

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

    let text = raw.mac.get_ref();
    let mac: MacAddr = text.parse().map_err(|_| {
        ctx.at(
            &raw.mac,
            "vm.mac",
            format!("{text:?} is not a MAC address; write six hex bytes such as 52:54:00:12:34:56"),
        )
    })?;
    let unusable = if mac.is_multicast() {
        Some("a multicast MAC")
    } else if mac.0 == [0; 6] {
        Some("the all-zero MAC")
    } else if mac == GATEWAY_MAC {
        Some("moat's own gateway MAC")
    } else {
        None
    };
    if let Some(what) = unusable {
        return Err(ctx.at(
            &raw.mac,
            "vm.mac",
            format!("{text:?} is {what}; use a unicast address such as 52:54:00:12:34:56"),
        ));
    }

    let (address, subnet) = vm_address(ctx, &raw.address)?;
    let gateway = match &raw.gateway {
        Some(g) => vm_gateway(ctx, g, address, subnet)?,
        None if subnet.prefix_len() == 30 => subnet
            .hosts()
            .find(|h| *h != address)
            .expect("a /30 has two host addresses"),
        None => {
            return Err(ctx.at(
                &raw.address,
                "vm.gateway",
                format!(
                    "required for a /{} subnet (only a /30 has an obvious gateway); add gateway = \"{}\" to [vm]",
                    subnet.prefix_len(),
                    subnet.hosts().find(|h| *h != address).expect("/29 or wider")
                ),
            ));
        }
    };

    let mtu = match &raw.mtu {
        None => DEFAULT_MTU,
        Some(m) => match u16::try_from(*m.get_ref()) {
            Ok(v) if MTU_RANGE.contains(&v) => v,
            _ => {
                return Err(ctx.at(
                    m,
                    "vm.mtu",
                    format!(
                        "{} is outside {}..={}; use 1500 unless the guest needs jumbo frames",
                        m.get_ref(),
                        MTU_RANGE.start(),
                        MTU_RANGE.end()
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

/// `vm.address`: a host address with a prefix that leaves room for the gateway.
fn vm_address(ctx: &Ctx<'_>, raw: &Spanned<String>) -> Result<(Ipv4Addr, Ipv4Net), PolicyError> {
    let key = "vm.address";
    let text = raw.get_ref();
    let net: Ipv4Net = text.parse().map_err(|_| {
        let hint = if text.parse::<Ipv4Addr>().is_ok() {
            format!("{text:?} has no prefix; write it like {text}/30")
        } else {
            format!("{text:?} is not an IPv4 address with a prefix; write it like 10.0.0.2/30")
        };
        ctx.at(raw, key, hint)
    })?;
    if net.prefix_len() > 30 {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "/{} leaves no room for the guest and its gateway; use /30 or a shorter prefix",
                net.prefix_len()
            ),
        ));
    }
    let address = net.addr();
    let subnet = net.trunc();
    let octet = address.octets()[0];
    let special = if address.is_loopback() {
        Some("a loopback address")
    } else if octet == 0 {
        Some("in 0.0.0.0/8, which is not a host address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if octet >= 240 {
        Some("in the reserved range 240.0.0.0/4")
    } else {
        None
    };
    if let Some(what) = special {
        return Err(ctx.at(
            raw,
            key,
            format!("{address} is {what}; use a private address such as 10.0.0.2/30"),
        ));
    }
    if subnet.contains(&SYNTHETIC_NET.network()) || SYNTHETIC_NET.contains(&subnet.network()) {
        return Err(ctx.at(
            raw,
            key,
            format!(
                "{subnet} overlaps {SYNTHETIC_NET}, the pool DNS answers come from; use another subnet such as 10.0.0.0/30"
            ),
        ));
    }
    if address == subnet.network() || address == subnet.broadcast() {
        let which = if address == subnet.network() {
            "network"
        } else {
            "broadcast"
        };
        return Err(ctx.at(
            raw,
            key,
            format!("{address} is the {which} address of {subnet}; use a host address inside it"),
        ));
    }
    Ok((address, subnet))
}

fn vm_gateway(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    address: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<Ipv4Addr, PolicyError> {
    let key = "vm.gateway";
    let gw: Ipv4Addr = raw.get_ref().parse().map_err(|_| {
        ctx.at(
            raw,
            key,
            format!(
                "{:?} is not an IPv4 address; write it like 10.0.0.1 (no prefix)",
                raw.get_ref()
            ),
        )
    })?;
    let problem = if !subnet.contains(&gw) {
        format!("{gw} is outside the VM's subnet {subnet}; pick a host address inside it")
    } else if gw == address {
        format!("{gw} is the guest's own address; pick another host address in {subnet}")
    } else if gw == subnet.network() {
        format!("{gw} is the network address of {subnet}; pick a host address inside it")
    } else if gw == subnet.broadcast() {
        format!("{gw} is the broadcast address of {subnet}; pick a host address inside it")
    } else {
        return Ok(gw);
    };
    Err(ctx.at(raw, key, problem))
}

/// An address moat connects to (a proxy, the DNS upstream), or listens on when `listen`.
fn socket_addr(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    key: &str,
    listen: bool,
) -> Result<SocketAddr, PolicyError> {
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

fn port(ctx: &Ctx<'_>, raw: &Spanned<i64>, key: &str) -> Result<u16, PolicyError> {
    match u16::try_from(*raw.get_ref()) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ctx.at(
            raw,
            key,
            format!("{} is not a port; use 1..=65535", raw.get_ref()),
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
        .map(|v| socket_addr(ctx, v, "proxy.http", false))
        .transpose()?;
    let socks5 = raw
        .socks5
        .as_ref()
        .map(|v| socket_addr(ctx, v, "proxy.socks5", false))
        .transpose()?;
    let explicit_port = match &raw.explicit_port {
        None => None,
        Some(p) => {
            let key = "proxy.explicit_port";
            let port = port(ctx, p, key)?;
            if port == DNS_PORT {
                return Err(ctx.at(
                    p,
                    key,
                    "53 is the gateway's DNS port; choose another, such as 3128",
                ));
            }
            if http.is_none() {
                return Err(ctx.at(
                    p,
                    key,
                    "needs proxy.http, where the spliced connections go; add http = \"127.0.0.1:3128\" to [proxy]",
                ));
            }
            Some(port)
        }
    };
    Ok(Proxy {
        http,
        socks5,
        explicit_port,
    })
}

fn outbound(
    ctx: &Ctx<'_>,
    i: usize,
    rule: &RawOutbound,
    proxy: &Proxy,
) -> Result<OutboundRule, PolicyError> {
    let key = |k: &str| format!("outbound[{i}].{k}");
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
        return Err(ctx.at(
            &rule.ports,
            key("ports"),
            "is empty, so the rule allows nothing; list ports such as [80, 443] or ranges such as [\"8000-8100\"]",
        ));
    }
    let ports = rule
        .ports
        .get_ref()
        .iter()
        .map(|p| port_range(ctx, p, &key("ports")))
        .collect::<Result<Vec<_>, _>>()?;
    let to = match &rule.to {
        None => None,
        Some(list) if list.get_ref().is_empty() => {
            return Err(ctx.at(
                list,
                key("to"),
                "is empty, so the rule allows nothing; remove `to` to allow any name, or list names and CIDRs",
            ));
        }
        Some(list) => Some(
            list.get_ref()
                .iter()
                .map(|d| destination(ctx, d, &key("to")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let via = match rule.via.as_ref() {
        None => match protocol {
            Protocol::Tcp => Via::Http,
            Protocol::Udp => Via::Socks5,
        },
        Some(v) => match v.get_ref().as_str() {
            "http" => Via::Http,
            "socks5" => Via::Socks5,
            other => {
                return Err(ctx.at(
                    v,
                    key("via"),
                    format!("{other:?} is not a proxy kind; use \"http\" or \"socks5\""),
                ))
            }
        },
    };
    // A defaulted `via` is blamed on `protocol`, the key that chose it.
    let via_span = rule
        .via
        .as_ref()
        .map_or_else(|| rule.protocol.span(), |v| v.span());
    if protocol == Protocol::Udp && via == Via::Http {
        return Err(ctx.err(
            via_span,
            key("via"),
            "udp cannot go through an HTTP CONNECT proxy; use via = \"socks5\"",
        ));
    }
    let missing = match via {
        Via::Http if proxy.http.is_none() => Some(("HTTP", "http = \"127.0.0.1:3128\"")),
        Via::Socks5 if proxy.socks5.is_none() => Some(("SOCKS5", "socks5 = \"127.0.0.1:1080\"")),
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
            key("via"),
            format!(
                "this rule goes through the {kind} proxy{defaulted} but [proxy] has no {via} address; add {example} to [proxy]"
            ),
        ));
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

/// A DNS name pattern: labels of letters, digits, '-' and '_', optionally `*.` in front.
/// Lowercased, trailing dot removed.
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
fn cidr(ctx: &Ctx<'_>, raw: &Spanned<String>, key: &str) -> Result<IpNet, PolicyError> {
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

fn destination(
    ctx: &Ctx<'_>,
    raw: &Spanned<String>,
    key: &str,
) -> Result<Destination, PolicyError> {
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

fn forwards(ctx: &Ctx<'_>, raw: &[RawForward]) -> Result<Vec<Forward>, PolicyError> {
    let mut out: Vec<Forward> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("forward[{i}].{k}");
        let listen = socket_addr(ctx, &r.listen, &key("listen"), true)?;
        let guest_port = port(ctx, &r.guest_port, &key("guest_port"))?;
        let from = match &r.from {
            None => vec![
                IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid prefix")),
                IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
            Some(list) if list.get_ref().is_empty() => {
                return Err(ctx.at(
                    list,
                    key("from"),
                    "is empty, so no peer may connect; remove `from` for loopback only, or list CIDRs like \"127.0.0.0/8\"",
                ))
            }
            Some(list) => list
                .get_ref()
                .iter()
                .map(|c| cidr(ctx, c, &key("from")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if let Some((j, other)) = out
            .iter()
            .enumerate()
            .find(|(_, o)| overlaps(o.listen, listen))
        {
            return Err(ctx.at(
                &r.listen,
                key("listen"),
                format!(
                    "{listen} overlaps forward[{j}].listen ({}); give each forward its own port",
                    other.listen
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

/// Two listen addresses collide: same port, and the same IP or either one unspecified.
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
            Ok(n) if (1..=MAX_FLOWS_LIMIT).contains(&n) => n,
            _ => {
                return Err(ctx.at(
                    v,
                    "limits.max_flows",
                    format!(
                        "{} is outside 1..={MAX_FLOWS_LIMIT}; the default is {DEFAULT_MAX_FLOWS}",
                        v.get_ref()
                    ),
                ))
            }
        },
    };
    let amount = |v: &Option<Spanned<i64>>, key: &str, hint: &str| -> Result<u64, PolicyError> {
        match v {
            None => Ok(0),
            Some(v) => u64::try_from(*v.get_ref())
                .map_err(|_| ctx.at(v, key, format!("{} is negative; use {hint}", v.get_ref()))),
        }
    };
    Ok(Limits {
        max_flows,
        egress_bps: amount(&raw.egress_bps, "limits.egress_bps", RATE_HINT)?,
        ingress_bps: amount(&raw.ingress_bps, "limits.ingress_bps", RATE_HINT)?,
        burst_bytes: amount(
            &raw.burst_bytes,
            "limits.burst_bytes",
            "0 for the default depth (50 ms at the rate) or a size in bytes",
        )?,
    })
}
