//! `[limits]`: the flow table size and the rate limits.

use toml::Spanned;

use super::super::model::*;
use super::super::Located;
use super::diagnostics::Ctx;
use super::raw::RawLimits;

pub(super) const RATE_HINT: &str = "0 for unlimited or a rate in bits per second";

pub(super) fn limits(ctx: &Ctx<'_>, raw: Option<&RawLimits>) -> Result<Limits, Located> {
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
    let amount = |v: &Option<Spanned<i64>>, key: &str, hint: &str| -> Result<u64, Located> {
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
