//! The attempts: raw frames first (read straight off the RX queue), then TCP and DNS through
//! the guest-side stack, then the controls. One file per kind, so that adding an attempt
//! means reading only the file of its kind:
//! - [`raw`]: frames built by hand (ARP, ICMP, spoofed sources, IPv6, UDP and DNS elsewhere),
//!   judged by what comes back on the RX queue;
//! - [`stack`]: TCP and DNS through the simulated guest's stack, judged by moat's own witness
//!   (a proxy connection opened) or by bytes echoed;
//! - [`smuggling`]: forbidden TCP attempts whose first bytes name the destination (Host,
//!   SNI, explicit-proxy requests);
//! - [`controls`]: the allowed flows that must work, so "all blocked" proves something.

mod controls;
mod raw;
mod smuggling;
mod stack;

pub use controls::ControlUrl;

use std::net::Ipv4Addr;
use std::time::Duration;

use super::{Expect, Outcome, Witness};
use crate::policy::{NamePattern, Policy, Protocol};
use moat_sim::guest::GuestNet;

/// How long to wait for an answer that must not come (or, times 2-4, for one that must).
const QUIET: Duration = Duration::from_millis(600);
/// How long a TCP handshake or echo through the stand-in may take.
const TCP_WAIT: Duration = Duration::from_millis(1500);

/// One row of the report: never "unable" (the attempt was made).
fn outcome(
    attempt: impl Into<String>,
    expected: Expect,
    got_through: bool,
    detail: impl Into<String>,
) -> Outcome {
    Outcome {
        attempt: attempt.into(),
        expected,
        got_through,
        unable: false,
        detail: detail.into(),
    }
}

/// Another address in the guest's /24 that is neither the guest, the gateway nor broadcast.
pub(super) fn neighbour(policy: &Policy) -> Ipv4Addr {
    let base = u32::from(policy.vm.address) & 0xffff_ff00;
    (0x42..0xfe)
        .map(|h| Ipv4Addr::from(base | h))
        .find(|a| *a != policy.vm.address && *a != policy.vm.gateway && *a != policy.vm.broadcast())
        .unwrap_or(Ipv4Addr::new(10, 0, 0, 66))
}

/// Which moat the attempts run against.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The in-process copy with echoing stand-in proxies: the control must echo.
    Stub,
    /// The deployment's own proxies: forbidden flows are judged by moat's own witness (a
    /// proxy connection opened), and each TCP rule gets a control through the real path
    /// (unless `controls` is off).
    Live {
        controls: bool,
        control_urls: Vec<ControlUrl>,
    },
}

/// Every attempt of the mode, in report order.
pub fn all(
    net: &mut GuestNet,
    policy: &Policy,
    witness: &dyn Witness,
    mode: &Mode,
) -> Vec<Outcome> {
    let mut out = raw::raw(net.sim(), policy, witness);
    out.extend(stack::through_the_stack(net, policy, witness, mode));
    match mode {
        Mode::Stub => out.extend(controls::stub_control(net, policy)),
        Mode::Live {
            controls: true,
            control_urls,
        } => out.extend(controls::live_controls(net, policy, control_urls)),
        Mode::Live {
            controls: false, ..
        } => {}
    }
    out
}

/// A documentation-range address no rule's CIDR covers (so it is an IP literal to moat).
pub(super) fn internet_address(policy: &Policy) -> Ipv4Addr {
    let covered = |ip: Ipv4Addr| policy.outbound.iter().any(|r| r.allows_ip(ip));
    [
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(198, 51, 100, 10),
        Ipv4Addr::new(192, 0, 2, 10),
    ]
    .into_iter()
    .find(|ip| !covered(*ip))
    .unwrap_or(Ipv4Addr::new(192, 0, 2, 10))
}

/// A port no rule of `protocol` allows.
pub(super) fn closed_port(policy: &Policy, protocol: Protocol) -> u16 {
    [9u16, 7, 19, 65000, 31337]
        .into_iter()
        .find(|p| {
            !policy
                .outbound
                .iter()
                .any(|r| r.protocol == protocol && r.allows_port(*p))
        })
        .unwrap_or(9)
}

/// A name the policy lets the guest resolve, if any.
pub(super) fn resolvable(policy: &Policy) -> Option<String> {
    policy.dns.records.keys().next().cloned().or_else(|| {
        policy.dns.allow.first().map(|p| match p {
            NamePattern::Exact(n) => n.clone(),
            NamePattern::Wildcard(s) => format!("canary.{s}"),
        })
    })
}
