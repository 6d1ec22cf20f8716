//! Which queue pair owns a flow (multiqueue, `moat serve --queues N`).
//!
//! Every queue pair runs its own stack and flow table on its own thread; a flow lives where
//! its first packet arrived. A guest may later send that flow's packets on another pair's
//! TX queue (Linux moves a socket's queue when it goes idle, or when the sending thread
//! changes CPU): the pair that receives such a frame finds the owner here and hands the frame
//! over, so a flow is never split between two stacks.
//!
//! Only flows a pair does not know locally are looked up, so frames of local flows (the
//! usual case) never take this lock.

use std::collections::HashMap;
use std::sync::Mutex;

use std::sync::Arc;

use super::key::FlowKey;

/// The most queue pairs a VM's flows are steered between (one flow table and one thread
/// each): what the device offers at most, and the slots of the descriptor budget.
pub const MAX_QUEUE_PAIRS: usize = 16;

/// A flow as the guest sees it: protocol and the guest-side 3-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SteerKey {
    Tcp(FlowKey),
    Udp(FlowKey),
}

/// The owner pair of every open flow of one VM, shared by its pairs.
#[derive(Debug, Default)]
pub struct FlowOwners {
    owners: Mutex<HashMap<SteerKey, usize>>,
}

impl FlowOwners {
    /// `pair` now owns `key` (a new flow, or a new flow on a reused key).
    pub fn claim(&self, key: SteerKey, pair: usize) {
        self.lock().insert(key, pair);
    }

    /// `pair` no longer has `key`; a newer claim by another pair stays.
    pub fn release(&self, key: SteerKey, pair: usize) {
        let mut owners = self.lock();
        if owners.get(&key) == Some(&pair) {
            owners.remove(&key);
        }
    }

    /// The pair that owns `key`, if any.
    pub fn owner(&self, key: SteerKey) -> Option<usize> {
        self.lock().get(&key).copied()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SteerKey, usize>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One flow table's part in steering: with several queue pairs, the VM's shared owners and
/// which pair this is; with one pair, nothing (every call is free and steers nowhere).
#[derive(Clone, Debug, Default)]
pub struct Steering(Option<(Arc<FlowOwners>, usize)>);

impl Steering {
    /// Pair `pair` of a device whose pairs share `owners`.
    pub fn pair(owners: Arc<FlowOwners>, pair: usize) -> Steering {
        Steering(Some((owners, pair)))
    }

    /// Whether other pairs exist that a flow could belong to.
    pub fn is_shared(&self) -> bool {
        self.0.is_some()
    }

    /// Whether this table listens for `[[forward]]`s (pair 0 does, and a lone table).
    pub fn owns_forwards(&self) -> bool {
        self.0.as_ref().is_none_or(|(_, pair)| *pair == 0)
    }

    /// This pair now owns `key`.
    pub fn claim(&self, key: SteerKey) {
        if let Some((owners, pair)) = &self.0 {
            owners.claim(key, *pair);
        }
    }

    /// This pair no longer has `key`.
    pub fn release(&self, key: SteerKey) {
        if let Some((owners, pair)) = &self.0 {
            owners.release(key, *pair);
        }
    }

    /// The other pair that owns `key` (None: nobody, or this pair).
    pub fn elsewhere(&self, key: SteerKey) -> Option<usize> {
        let (owners, pair) = self.0.as_ref()?;
        owners.owner(key).filter(|p| p != pair)
    }

    /// Flows open in the VM, what `limits.max_flows` caps: `local` (this table's count)
    /// alone, or every pair's.
    pub fn open_flows(&self, local: usize) -> usize {
        self.0.as_ref().map_or(local, |(owners, _)| owners.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(port: u16) -> SteerKey {
        SteerKey::Tcp(FlowKey {
            guest_port: port,
            dst: Ipv4Addr::new(192, 0, 2, 1),
            dst_port: 443,
        })
    }

    #[test]
    fn a_flow_is_owned_by_its_last_claimant_and_released_only_by_it() {
        let owners = Arc::new(FlowOwners::default());
        let p0 = Steering::pair(Arc::clone(&owners), 0);
        let p1 = Steering::pair(Arc::clone(&owners), 1);
        p0.claim(key(1000));
        assert_eq!(p1.elsewhere(key(1000)), Some(0));
        assert_eq!(
            p0.elsewhere(key(1000)),
            None,
            "its own flow is not elsewhere"
        );
        // The key is reused by a new connection on pair 1: pair 0's late release keeps it.
        p1.claim(key(1000));
        p0.release(key(1000));
        assert_eq!(p0.elsewhere(key(1000)), Some(1));
        p1.release(key(1000));
        assert!(owners.is_empty());
        assert_eq!(
            p0.elsewhere(SteerKey::Udp(FlowKey {
                guest_port: 1000,
                dst: Ipv4Addr::new(192, 0, 2, 1),
                dst_port: 443
            })),
            None,
            "UDP and TCP keys are distinct"
        );
    }
}
