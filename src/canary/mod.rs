//! `moat canary`: continuous proof of isolation. An in-process moat serves the policy (its
//! proxies replaced by stand-ins on loopback that echo instead of connecting anywhere), the
//! simulated guest attaches and makes the forbidden attempts — which must all fail — and the
//! allowed ones, which must work, so that "everything blocked because nothing works" is
//! caught too.

mod attempts;
pub mod digest;
pub mod heartbeat;
pub mod live;
pub mod probe;
pub mod report;
pub mod stub;

pub use attempts::{ControlUrl, Mode};

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use crate::control::VmState;
use crate::device::server::{self, ServeOptions};
use crate::policy::{DnsMode, Policy};
use crate::telemetry::Counters;
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};

#[derive(Debug, Error)]
pub enum CanaryError {
    #[error("canary setup: {0}")]
    Setup(String),
}

/// What an attempt must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// A forbidden attempt: must fail.
    Blocked,
    /// A control: must work.
    Works,
}

/// One attempt and what happened.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub attempt: String,
    pub expected: Expect,
    /// Whether the attempt got through (a reply, a connection that carried bytes, an answer).
    pub got_through: bool,
    /// The canary could not make this attempt (a proxy down, a name that does not
    /// resolve): it proves nothing, so it fails (P2).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unable: bool,
    pub detail: String,
}

/// What the canary reads from the moat under test: its drop counters and how many proxy
/// connections it opened on the guest's behalf (the witness that a flow got through the gate).
pub trait Witness {
    fn drops(&self, reason: crate::telemetry::DropReason) -> u64;
    fn proxy_flows(&self) -> u64;
}

impl Witness for Counters {
    fn drops(&self, reason: crate::telemetry::DropReason) -> u64 {
        Counters::drops(self, reason)
    }
    fn proxy_flows(&self) -> u64 {
        self.flows(crate::telemetry::FlowEvent::Opened)
    }
}

impl Outcome {
    pub fn passed(&self) -> bool {
        if self.unable {
            return false;
        }
        match self.expected {
            Expect::Blocked => !self.got_through,
            Expect::Works => self.got_through,
        }
    }
}

/// The policy as the canary runs it: proxies are loopback stand-ins, no host listeners,
/// names answered by moat itself.
fn canary_policy(policy: &Policy) -> Result<Policy, CanaryError> {
    let mut p = policy.clone();
    let setup = |e: std::io::Error| {
        CanaryError::Setup(format!("cannot start a stand-in proxy on loopback: {e}"))
    };
    p.proxy.http = Some(stub::start(false).map_err(setup)?);
    p.proxy.socks5 = Some(stub::start(true).map_err(setup)?);
    p.forward.clear();
    if p.dns.mode == DnsMode::Upstream {
        // Never ask the real resolver from a canary: moat's own synthetic answers instead.
        p.dns.mode = DnsMode::Proxy;
        p.dns.upstream = None;
    }
    Ok(p)
}

/// Run every attempt once against a fresh in-process moat.
pub fn run(policy: &Policy) -> Result<Vec<Outcome>, CanaryError> {
    let policy = canary_policy(policy)?;
    let scratch = scratch_dir()?;
    let dir = scratch.path();
    let socket = dir.join("canary.sock");
    let listener = server::bind(&socket).map_err(|e| CanaryError::Setup(e.to_string()))?;
    let counters = Arc::new(Counters::default());
    let vm = Arc::new(VmState::new(
        dir.join("canary.toml"),
        policy.clone(),
        Arc::clone(&counters),
    ));
    let opts = ServeOptions {
        socket: socket.clone(),
        client: false,
        once: true,
        tuning: crate::device::Tuning::default(),
    };
    let serving = std::thread::spawn(move || server::serve(vm, &opts, Some(listener)));
    let sim = SimGuest::connect(&socket, GuestOptions::default())
        .map_err(|e| CanaryError::Setup(e.to_string()))?;
    let mut net = GuestNet::new(
        sim,
        policy.vm.mac.0,
        policy.vm.address,
        policy.vm.prefix_len,
        policy.vm.gateway,
        policy.vm.mtu,
    );
    let outcomes = attempts::all(&mut net, &policy, counters.as_ref(), &Mode::Stub);
    drop(net);
    let _ = serving.join();
    Ok(outcomes)
}

/// A fresh scratch directory for the moat under test's sockets and files (a unique name,
/// so canaries side by side never share one), removed when dropped.
pub(crate) fn scratch_dir() -> Result<tempfile::TempDir, CanaryError> {
    tempfile::Builder::new()
        .prefix("moat-canary-")
        .tempdir()
        .map_err(|e| CanaryError::Setup(format!("cannot create a scratch directory: {e}")))
}

/// The results as a table for a person.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<34} {:<9} {:<9} {:<7} {}\n",
        "attempt", "expected", "observed", "verdict", "detail"
    );
    for o in outcomes {
        let observed = if o.unable {
            "unable"
        } else if o.got_through {
            "through"
        } else {
            "blocked"
        };
        let expected = match o.expected {
            Expect::Blocked => "blocked",
            Expect::Works => "through",
        };
        let verdict = if o.passed() { "PASS" } else { "FAIL" };
        out.push_str(&format!(
            "{:<34} {:<9} {:<9} {:<7} {}\n",
            o.attempt, expected, observed, verdict, o.detail
        ));
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    out.push_str(&format!(
        "{} passed, {} failed\n",
        outcomes.len() - failed,
        failed
    ));
    out
}

/// JSON lines, one object per attempt.
pub fn json_lines(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .map(|o| {
            let mut v = serde_json::to_value(o).unwrap_or_default();
            v["verdict"] = if o.passed() { "pass" } else { "fail" }.into();
            v.to_string() + "\n"
        })
        .collect()
}

/// Whether a policy file exists and loads; for `moat canary` errors.
pub fn load(path: &Path) -> Result<Policy, crate::policy::PolicyError> {
    Policy::load(path)
}
