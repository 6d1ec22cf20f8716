//! The descriptor budget: flows may hold only the descriptors the process limit leaves after
//! moat's own and a reserve for the operator, so a guest that opens connections until the
//! limit never takes the descriptors `moat stats`, a metrics scrape or a reconnecting VMM
//! need.
//!
//! At start `moat serve` raises its soft `RLIMIT_NOFILE` to the hard limit and sets the
//! budget ([`plan`]). A flow costs one descriptor (its proxy connection; a forwarded
//! connection), a UDP association two (control connection and relay socket). If
//! `limits.max_flows` is more than the budget holds even at one descriptor a flow,
//! `max_flows` is clamped to that, with a warning; if it only fits when not all flows are
//! UDP, a warning says so. At run time each pair checks the budget before it opens a flow
//! ([`check`]): past it the flow is refused at once (a TCP SYN gets a RST) and counted as
//! `fd_budget`. (The clamp was once the all-UDP worst case, which refused TCP flows the
//! limit had room for: with the hard limit of 20 000 seen here, 9 950 of them.)

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::policy::Policy;
use crate::telemetry::DropReason;

use super::steering::MAX_QUEUE_PAIRS;

/// Descriptors kept free for the operator: control requests (up to 4 at once), metrics
/// scrapes, a reconnecting VMM and its eventfds and memory regions, log files.
pub const OPERATOR_RESERVE: usize = 64;
/// Descriptors moat holds besides flows, per process: standard streams, the vhost-user
/// listener and connection, control and metrics listeners, guest memory regions (up to
/// 8 memfds), slack.
const BASE: usize = 24;
/// Per queue pair: epoll, timer, handoff eventfd, exit eventfd, kick, call and error
/// eventfds of its two queues, the upstream resolver's socket.
const PER_PAIR: usize = 11;
/// Descriptors a UDP association costs (the most any flow costs).
pub const FDS_PER_UDP: usize = 2;

/// Descriptors flows may hold in all (usize::MAX: no budget, e.g. moat in a test process).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The largest max_flows the budget holds, at one descriptor a flow (usize::MAX: no clamp).
static MAX_FLOWS: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Descriptors each pair's flows held at its last look.
static HELD: [AtomicUsize; MAX_QUEUE_PAIRS] = [const { AtomicUsize::new(0) }; MAX_QUEUE_PAIRS];

/// What [`plan`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The soft RLIMIT_NOFILE now in force.
    pub nofile: usize,
    /// Descriptors flows may hold.
    pub flow_fds: usize,
    /// The largest `limits.max_flows` that fits at one descriptor a flow (TCP).
    pub max_flows: usize,
}

/// Descriptors moat needs besides flows: its own, the forwards' listeners and the reserve.
pub fn reserved(queue_pairs: usize, forwards: usize) -> usize {
    BASE + PER_PAIR * queue_pairs + forwards + OPERATOR_RESERVE
}

/// Raise the soft RLIMIT_NOFILE to the hard one, and set the budget for `queue_pairs`
/// and `forwards` listeners (the policy's, plus room for run-time ones).
pub fn plan(queue_pairs: usize, forwards: usize) -> std::io::Result<Plan> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let mut soft = lim.current.unwrap_or(u64::MAX);
    if soft < hard {
        // Raising the soft limit up to the hard one needs no privilege.
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = hard,
            Err(e) => {
                tracing::warn!(error = %std::io::Error::from(e), soft, hard, "cannot raise RLIMIT_NOFILE to its hard limit")
            }
        }
    }
    // RLIM_INFINITY, or a limit past what a usize holds: practically none.
    let nofile = usize::try_from(soft).unwrap_or(usize::MAX);
    let flow_fds = nofile.saturating_sub(reserved(queue_pairs, forwards));
    let plan = Plan {
        nofile,
        flow_fds,
        max_flows: flow_fds.max(1),
    };
    LIMIT.store(plan.flow_fds, Ordering::Relaxed);
    MAX_FLOWS.store(plan.max_flows, Ordering::Relaxed);
    Ok(plan)
}

/// Clamp `policy.limits.max_flows` to what the budget holds at one descriptor a flow (at
/// start and on every reload), and warn if the flows fit only when not all of them are UDP
/// associations; returns the value asked for if it was clamped.
pub fn clamp_max_flows(policy: &mut Policy) -> Option<usize> {
    let cap = MAX_FLOWS.load(Ordering::Relaxed);
    let asked = policy.limits.max_flows;
    if asked <= cap {
        if asked.saturating_mul(FDS_PER_UDP) > cap {
            tracing::warn!(
                max_flows = asked,
                flow_fds = cap,
                udp_associations_that_fit = cap / FDS_PER_UDP,
                "limits.max_flows TCP flows fit in RLIMIT_NOFILE, but not as many UDP associations (2 descriptors each): associations past the budget are refused (fd_budget); raise LimitNOFILE (or ulimit -n) to allow them"
            );
        }
        return None;
    }
    policy.limits.max_flows = cap;
    tracing::warn!(
        max_flows = asked,
        clamped_to = cap,
        "limits.max_flows needs more descriptors than RLIMIT_NOFILE leaves (1 per flow at least, 2 per UDP association, plus moat's own and a reserve for the operator): max_flows clamped; raise LimitNOFILE (or ulimit -n) to allow more"
    );
    Some(asked)
}

/// Before pair `pair` opens a flow needing `needed` descriptors, its flows holding `held`:
/// Ok if the VM's flows stay within the budget.
pub fn check(pair: usize, held: usize, needed: usize) -> Result<(), DropReason> {
    check_in(&HELD, LIMIT.load(Ordering::Relaxed), pair, held, needed)
}

fn check_in(
    slots: &[AtomicUsize],
    limit: usize,
    pair: usize,
    held: usize,
    needed: usize,
) -> Result<(), DropReason> {
    if limit == usize::MAX {
        return Ok(());
    }
    let Some(slot) = slots.get(pair) else {
        return Err(DropReason::FdBudget);
    };
    slot.store(held, Ordering::Relaxed);
    let total: usize = slots.iter().map(|h| h.load(Ordering::Relaxed)).sum();
    if total.saturating_add(needed) > limit {
        return Err(DropReason::FdBudget);
    }
    Ok(())
}

/// Pair `pair`'s flows now hold `held` descriptors (after an event; 0 when its connection
/// ends), so other pairs' checks see descriptors given back.
pub fn note(pair: usize, held: usize) {
    if let Some(slot) = HELD.get(pair) {
        slot.store(held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair's descriptors count against one budget; what a pair gives back is seen
    /// at its next look.
    #[test]
    fn the_budget_is_shared_by_the_pairs() {
        let slots = [AtomicUsize::new(0), AtomicUsize::new(0)];
        assert_eq!(check_in(&slots, 10, 0, 4, 2), Ok(()));
        assert_eq!(
            check_in(&slots, 10, 1, 4, 2),
            Ok(()),
            "8 held + 2 fit in 10"
        );
        assert_eq!(
            check_in(&slots, 10, 1, 5, 2),
            Err(DropReason::FdBudget),
            "9 held + a UDP association's 2 do not"
        );
        assert_eq!(check_in(&slots, 10, 1, 5, 1), Ok(()));
        slots[0].store(0, Ordering::Relaxed); // pair 0's flows closed (note)
        assert_eq!(check_in(&slots, 10, 1, 6, 2), Ok(()));
        assert_eq!(
            check_in(&slots, 10, 2, 0, 1),
            Err(DropReason::FdBudget),
            "no such pair"
        );
        assert_eq!(
            check_in(&slots, usize::MAX, 0, 1000, 2),
            Ok(()),
            "no budget"
        );
    }

    #[test]
    fn reserve_grows_with_pairs_and_forwards() {
        assert!(reserved(1, 0) >= OPERATOR_RESERVE + BASE);
        assert_eq!(reserved(2, 3) - reserved(1, 0), PER_PAIR + 3);
    }
}
