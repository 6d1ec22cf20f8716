//! `[limits]`: the flow table size and the rate limits.

use toml::Spanned;

use super::super::model::*;
use super::diagnostics::Ctx;
use super::raw::RawLimits;

const RATE_HINT: &str = "0 for unlimited or a rate in bits per second";

pub(super) fn limits(ctx: &Ctx<'_>, raw: &RawLimits) -> Option<Limits> {
    let max_flows = ctx.keep(match &raw.max_flows {
        None => Ok(DEFAULT_MAX_FLOWS),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX_FLOWS_LIMIT).contains(&n) => Ok(n),
            _ => Err(ctx.at(
                v,
                "limits.max_flows",
                format!(
                    "{} is outside 1..={MAX_FLOWS_LIMIT}; the default is {DEFAULT_MAX_FLOWS}",
                    v.get_ref()
                ),
            )),
        },
    });
    let amount = |v: &Option<Spanned<i64>>, key: &str, hint: &str| {
        ctx.keep(match v {
            None => Ok(0),
            Some(v) => u64::try_from(*v.get_ref())
                .map_err(|_| ctx.at(v, key, format!("{} is negative; use {hint}", v.get_ref()))),
        })
    };
    let egress_bps = amount(&raw.egress_bps, "limits.egress_bps", RATE_HINT);
    let ingress_bps = amount(&raw.ingress_bps, "limits.ingress_bps", RATE_HINT);
    let burst_bytes = amount(
        &raw.burst_bytes,
        "limits.burst_bytes",
        "0 for the default depth (50 ms at the rate) or a size in bytes",
    );
    Some(Limits {
        max_flows: max_flows?,
        egress_bps: egress_bps?,
        ingress_bps: ingress_bps?,
        burst_bytes: burst_bytes?,
    })
}
