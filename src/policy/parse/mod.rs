//! From TOML text to a validated [`Policy`], in three steps, each with its own error kind:
//! the TOML parser (syntax), serde into raw structs that refuse unknown keys (shape), then
//! validation of each field with its span (meaning). Every error points at its place.
//!
//! A syntax error stops everything (past it the parser only guesses, and one unclosed bracket
//! would be reported a dozen times). Otherwise every table, and every element of an array of
//! tables, is shaped on its own, and every field of the tables that have their shape is judged,
//! so one run finds every independent mistake. A check that depends on another field (the
//! gateway on the address, a rule's proxy on `[proxy]`) is skipped when that field is wrong,
//! so one mistake gives one line.

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

use serde::de::Error as _;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::model::*;
use super::summary::outbound_warning;
use super::Located;
use diagnostics::Ctx;
use outbound::Proxies;
use raw::{RawDns, RawForward, RawLimits, RawOutbound, RawProxy, RawVm};

/// What the checks found in one policy text.
pub(super) struct Report {
    /// The policy, or its errors: the one the step-by-step pipeline meets first (what
    /// `Policy::parse` returns), then the others in file order.
    pub(super) result: Result<Policy, (Located, Vec<Located>)>,
    /// [`Policy::warnings`] of the outbound rules that are valid.
    pub(super) warnings: Vec<String>,
}

/// The top-level tables, in the order serde's message lists them.
const SECTIONS: &[&str] = &["vm", "proxy", "outbound", "dns", "forward", "limits"];

/// An optional table after the shape step.
enum Table<T> {
    Absent,
    /// Its shape error is reported; its fields are not judged.
    Malformed,
    Present(T),
}

/// The document after the shape step: what could be shaped, the errors reported.
struct Shaped {
    vm: Option<RawVm>,
    proxy: Table<RawProxy>,
    /// One entry per element; `None` for an element whose shape error is reported.
    outbound: Vec<Option<RawOutbound>>,
    dns: Table<RawDns>,
    forward: Vec<Option<RawForward>>,
    limits: Table<RawLimits>,
}

pub(super) fn check(text: &str, file: &Path) -> Report {
    let ctx = Ctx::new(text, file);
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            return Report {
                result: Err((ctx.syntax(&e), Vec::new())),
                warnings: Vec::new(),
            }
        }
    };
    let raw = shape(&ctx, doc);

    let vm = raw.vm.as_ref().and_then(|v| vm::vm(&ctx, v));
    let (proxy, proxies) = match &raw.proxy {
        Table::Absent => (Some(Proxy::default()), Some(Proxies::NONE)),
        Table::Malformed => (None, None),
        Table::Present(p) => (proxy::proxy(&ctx, p), Some(Proxies::named_in(p))),
    };
    let outbound: Vec<Option<OutboundRule>> = raw
        .outbound
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            rule.as_ref()
                .and_then(|rule| outbound::outbound(&ctx, i, rule, proxies))
        })
        .collect();
    let dns = match &raw.dns {
        Table::Absent => Some(Dns::default()),
        Table::Malformed => None,
        Table::Present(d) => dns::dns(&ctx, d),
    };
    let forward = forward::forwards(&ctx, &raw.forward);
    let limits = match &raw.limits {
        Table::Absent => Some(Limits::default()),
        Table::Malformed => None,
        Table::Present(l) => limits::limits(&ctx, l),
    };

    let warnings = outbound
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| rule.as_ref().and_then(|r| outbound_warning(i, r)))
        .collect();
    let mut found = ctx.into_found().into_iter();
    let result = match found.next() {
        Some(first) => {
            let mut others: Vec<Located> = found.collect();
            // Stable: errors at one place keep the order their checks ran in.
            others.sort_by_key(|e| (e.line, e.col));
            Err((first, others))
        }
        None => {
            let policy = (|| {
                Some(Policy {
                    source: file.to_path_buf(),
                    vm: vm?,
                    proxy: proxy?,
                    outbound: outbound.into_iter().collect::<Option<_>>()?,
                    dns: dns?,
                    forward: forward?,
                    limits: limits?,
                })
            })();
            // Every check that gives no value reports why; this is for the one that forgets.
            policy.ok_or_else(|| {
                let error = Ctx::new(text, file).err(
                    0..0,
                    "(document)",
                    "refused without a reason (a bug in moat); please report it with the file",
                );
                (error, Vec::new())
            })
        }
    };
    Report { result, warnings }
}

/// serde over each table, and each element of an array of tables, on its own, in the order
/// serde visits a whole document (so the first error is the one it would give), then the
/// missing `[vm]`.
fn shape(ctx: &Ctx<'_>, doc: Spanned<DeTable<'_>>) -> Shaped {
    let doc_span = doc.span();
    let mut raw = Shaped {
        vm: None,
        proxy: Table::Absent,
        outbound: Vec::new(),
        dns: Table::Absent,
        forward: Vec::new(),
        limits: Table::Absent,
    };
    let mut has_vm = false;
    for (key, value) in doc.into_inner() {
        match key.get_ref().as_ref() {
            "vm" => {
                has_vm = true;
                raw.vm = one(ctx, value);
            }
            "proxy" => raw.proxy = table(ctx, value),
            "outbound" => raw.outbound = array(ctx, value),
            "dns" => raw.dns = table(ctx, value),
            "forward" => raw.forward = array(ctx, value),
            "limits" => raw.limits = table(ctx, value),
            other => {
                let e = toml::de::Error::unknown_field(other, SECTIONS);
                ctx.report(ctx.shape_at(e.message(), key.span()));
            }
        }
    }
    if !has_vm {
        let e = toml::de::Error::missing_field("vm");
        ctx.report(ctx.shape_at(e.message(), doc_span));
    }
    raw
}

fn one<'de, T: Deserialize<'de>>(ctx: &Ctx<'_>, value: Spanned<DeValue<'de>>) -> Option<T> {
    ctx.keep(T::deserialize(ValueDeserializer::from(value)).map_err(|e| ctx.shape(&e)))
}

fn table<'de, T: Deserialize<'de>>(ctx: &Ctx<'_>, value: Spanned<DeValue<'de>>) -> Table<T> {
    one(ctx, value).map_or(Table::Malformed, Table::Present)
}

/// An array of tables, element by element; anything else is refused as a whole.
fn array<'de, T: Deserialize<'de>>(ctx: &Ctx<'_>, value: Spanned<DeValue<'de>>) -> Vec<Option<T>> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items.into_iter().map(|item| one(ctx, item)).collect(),
        other => {
            // serde's own message about what it is instead.
            let _ = one::<Vec<T>>(ctx, Spanned::new(span, other));
            Vec::new()
        }
    }
}
