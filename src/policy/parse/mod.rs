//! From TOML text to a validated [`Policy`], in three steps, each with its own error kind:
//! the TOML parser (syntax), serde into raw structs that refuse unknown keys (shape), then
//! validation of each field with its span (meaning). Every error points at its place.

mod diagnostics;
mod dns;
mod forward;
mod limits;
mod outbound;
mod proxy;
mod raw;
mod values;
mod vm;

use std::path::Path;

use serde::Deserialize;
use toml::de::DeTable;

use super::model::*;
use super::Located;
use diagnostics::Ctx;
use raw::RawPolicy;

pub fn parse(text: &str, file: &Path) -> Result<Policy, Located> {
    let ctx = Ctx { text, file };
    let doc = DeTable::parse(text).map_err(|e| ctx.syntax(&e))?;
    let raw =
        RawPolicy::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| ctx.shape(&e))?;

    let vm = vm::vm(&ctx, &raw.vm)?;
    let proxy = proxy::proxy(&ctx, raw.proxy.as_ref())?;
    let outbound = raw
        .outbound
        .iter()
        .enumerate()
        .map(|(i, rule)| outbound::outbound(&ctx, i, rule, &proxy))
        .collect::<Result<Vec<_>, _>>()?;
    let dns = dns::dns(&ctx, raw.dns.as_ref())?;
    let forward = forward::forwards(&ctx, &raw.forward)?;
    let limits = limits::limits(&ctx, raw.limits.as_ref())?;
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
