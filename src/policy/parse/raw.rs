//! The policy's serde shapes: what each table may contain, before validation. Every struct
//! refuses unknown keys and keeps spans, so diagnostics can point at the place. The top level
//! (which tables there are) is shaped table by table in `mod.rs`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    pub(super) name: Spanned<String>,
    pub(super) mac: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) gateway: Option<Spanned<String>>,
    pub(super) mtu: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) http: Option<Spanned<String>>,
    pub(super) socks5: Option<Spanned<String>>,
    pub(super) explicit_port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbound {
    pub(super) protocol: Spanned<String>,
    pub(super) ports: Spanned<Vec<Spanned<RawPort>>>,
    pub(super) to: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) via: Option<Spanned<String>>,
}

/// A port (`443`) or a range (`"8000-8100"`).
pub(super) enum RawPort {
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
pub(super) struct RawDns {
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) records: BTreeMap<Spanned<String>, Spanned<String>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) upstream: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForward {
    pub(super) listen: Spanned<String>,
    pub(super) guest_port: Spanned<i64>,
    pub(super) from: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_flows: Option<Spanned<i64>>,
    pub(super) egress_bps: Option<Spanned<i64>>,
    pub(super) ingress_bps: Option<Spanned<i64>>,
    pub(super) burst_bytes: Option<Spanned<i64>>,
}
