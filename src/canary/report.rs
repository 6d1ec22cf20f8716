//! Alert events an on-call tool can route: one JSON object per failed attempt, with the VM,
//! the policy file state that was tested, a time, a severity and what was expected and seen;
//! a `resolved` event when a failing canary passes again; a `round` summary per run.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Expect, Outcome};

/// Which policy file state a round tested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub path: String,
    /// `sha256:` and the hex digest of the bytes tested.
    pub hash: String,
    /// The running moat's policy generation (`--control`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    /// A forbidden attempt got through.
    P1,
    /// A control failed, or the canary could not run (an attempt or the whole round).
    P2,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "P1" => Some(Severity::P1),
            "P2" => Some(Severity::P2),
            _ => None,
        }
    }
}

/// One alert or recovery.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `alert` or `resolved`.
    pub event: &'static str,
    pub vm: String,
    pub policy: PolicyRef,
    pub time: String,
    /// For `resolved`: the worst severity that was open.
    pub severity: Severity,
    pub attempt: String,
    pub expected: String,
    pub observed: String,
    pub detail: String,
    /// For `resolved`: the attempts that were failing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resolves: Vec<String>,
}

impl Event {
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default() + "\n"
    }
}

/// The severity of a failed outcome, `None` if it passed.
pub fn severity(o: &Outcome) -> Option<Severity> {
    if o.passed() {
        None
    } else if o.expected == Expect::Blocked && o.got_through && !o.unable {
        Some(Severity::P1)
    } else {
        Some(Severity::P2)
    }
}

fn observed(o: &Outcome) -> &'static str {
    if o.unable {
        "could not run"
    } else if o.got_through {
        "through"
    } else {
        "blocked"
    }
}

fn expected(e: Expect) -> &'static str {
    match e {
        Expect::Blocked => "blocked",
        Expect::Works => "through",
    }
}

/// What one round produced, before it is turned into events.
pub enum RoundResult {
    Ran(Vec<Outcome>),
    /// The canary could not run at all (bad policy file, moat would not start, ...).
    Failed(String),
}

/// Failing attempts carried from round to round (and across runs through the heartbeat
/// file), so that a recovery is announced once.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    pub failing: BTreeMap<String, Severity>,
}

/// The attempt name of a round that could not run.
pub const RUN_ATTEMPT: &str = "canary run";

impl Tracker {
    /// The events of one round (alerts for each failure, or one `resolved`), and the
    /// tracker updated.
    pub fn round(
        &mut self,
        vm: &str,
        policy: &PolicyRef,
        time: &str,
        result: &RoundResult,
    ) -> Vec<Event> {
        let event = |event, severity, attempt: &str, exp: &str, obs: &str, detail: &str| Event {
            event,
            vm: vm.to_string(),
            policy: policy.clone(),
            time: time.to_string(),
            severity,
            attempt: attempt.to_string(),
            expected: exp.to_string(),
            observed: obs.to_string(),
            detail: detail.to_string(),
            resolves: Vec::new(),
        };
        let mut events = Vec::new();
        let mut now_failing = BTreeMap::new();
        match result {
            RoundResult::Failed(why) => {
                events.push(event(
                    "alert",
                    Severity::P2,
                    RUN_ATTEMPT,
                    "the canary runs",
                    "could not run",
                    why,
                ));
                now_failing.insert(RUN_ATTEMPT.to_string(), Severity::P2);
            }
            RoundResult::Ran(outcomes) => {
                for o in outcomes {
                    if let Some(sev) = severity(o) {
                        events.push(event(
                            "alert",
                            sev,
                            &o.attempt,
                            expected(o.expected),
                            observed(o),
                            &o.detail,
                        ));
                        now_failing.insert(o.attempt.clone(), sev);
                    }
                }
            }
        }
        if now_failing.is_empty() && !self.failing.is_empty() {
            let worst = self.failing.values().min().copied().unwrap_or(Severity::P2);
            let mut e = event(
                "resolved",
                worst,
                "all",
                "every attempt as expected",
                "every attempt as expected",
                "the canary passes again",
            );
            e.resolves = self.failing.keys().cloned().collect();
            events.push(e);
        }
        self.failing = now_failing;
        events
    }
}

/// The per-round summary line of `--json` (not sent to `--alert-cmd`).
pub fn summary(vm: &str, policy: &PolicyRef, time: &str, result: &RoundResult) -> String {
    let (verdict, attempts, failed) = match result {
        RoundResult::Ran(o) => {
            let failed = o.iter().filter(|o| !o.passed()).count();
            (if failed == 0 { "pass" } else { "fail" }, o.len(), failed)
        }
        RoundResult::Failed(_) => ("error", 0, 0),
    };
    serde_json::json!({
        "event": "round",
        "vm": vm,
        "policy": policy,
        "time": time,
        "result": verdict,
        "attempts": attempts,
        "failed": failed,
    })
    .to_string()
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(attempt: &str, expected: Expect, got_through: bool) -> Outcome {
        Outcome {
            attempt: attempt.into(),
            expected,
            got_through,
            unable: false,
            detail: String::new(),
        }
    }

    #[test]
    fn one_alert_per_failure_then_one_resolved() {
        let p = PolicyRef {
            path: "/etc/moat/vm.toml".into(),
            hash: "sha256:00".into(),
            generation: None,
        };
        let mut t = Tracker::default();
        let bad = RoundResult::Ran(vec![
            o("leak", Expect::Blocked, true),
            o("control", Expect::Works, false),
            o("fine", Expect::Blocked, false),
        ]);
        let e = t.round("vm", &p, "t", &bad);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].severity, e[0].event), (Severity::P1, "alert"));
        assert_eq!(e[1].severity, Severity::P2);
        let good = RoundResult::Ran(vec![o("leak", Expect::Blocked, false)]);
        let e = t.round("vm", &p, "t", &good);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].event, e[0].severity), ("resolved", Severity::P1));
        assert_eq!(e[0].resolves, vec!["control".to_string(), "leak".into()]);
        assert!(t.round("vm", &p, "t", &good).is_empty(), "resolved once");
    }
}
