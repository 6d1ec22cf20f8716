//! What the control plane hands the queue pairs without waiting for them.
//!
//! A reload (or a change of run-time forwards) publishes a new [`Control`] behind a
//! generation number; each pair compares that number at every event and before every frame
//! it reads, and applies what changed (flows the new policy no longer allows are reset
//! there). The operator's side never waits on a pair's lock: it applies the change itself
//! to the pairs that are idle (their lock is free), wakes the busy ones and waits a bounded
//! time for their answer. The flow table for `moat stats` is read the same way: a copy
//! taken from an idle pair, or asked of a busy one, else the last copy it made.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::egress::FlowSnapshot;
use crate::policy::{Forward, Policy};

use super::pacer::SharedPacer;

/// How long a reload waits for busy pairs to apply it (they do at their next event; a pair
/// that takes longer applies it all the same, before it reads another frame).
pub const APPLY_WAIT: Duration = Duration::from_secs(1);
/// How long `moat stats` waits for a busy pair's flow table before showing its last copy.
pub const TABLE_WAIT: Duration = Duration::from_millis(250);

/// The state every pair follows. Each part has its own generation, so a pair applies only
/// what changed.
#[derive(Clone)]
pub struct Control {
    pub generation: u64,
    pub policy: Arc<Policy>,
    pub policy_gen: u64,
    /// The VM's bandwidth buckets (one for all pairs), replaced when the limits change.
    pub egress: Option<SharedPacer>,
    pub ingress: Option<SharedPacer>,
    pub pacers_gen: u64,
    /// Forwards added at run time.
    pub forwards: Vec<Forward>,
    pub forwards_gen: u64,
}

/// What a pair reports back.
#[derive(Clone, Copy, Debug, Default)]
struct Ack {
    /// The last generation applied.
    generation: u64,
    /// The last policy change applied, and the flows it reset.
    policy_gen: u64,
    reset: usize,
}

#[derive(Default)]
struct Board {
    acks: Vec<Ack>,
    /// The last flow table each pair copied, and how many it has copied.
    tables: Vec<(u64, Vec<FlowSnapshot>)>,
}

/// Shared by the control plane and every pair of one device.
pub struct Published {
    generation: AtomicU64,
    current: Mutex<Arc<Control>>,
    board: Mutex<Board>,
    changed: Condvar,
    /// A pair is asked for a copy of its flow table.
    table_wanted: Vec<AtomicBool>,
}

impl Published {
    pub fn new(pairs: usize, control: Control) -> Published {
        Published {
            generation: AtomicU64::new(control.generation),
            current: Mutex::new(Arc::new(control)),
            board: Mutex::new(Board {
                acks: vec![Ack::default(); pairs],
                tables: vec![(0, Vec::new()); pairs],
            }),
            changed: Condvar::new(),
            table_wanted: (0..pairs).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The generation now published (one atomic load: checked before every frame).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Control> {
        Arc::clone(&self.current.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Publish a change of the current state (the closure sees the new generation in
    /// `generation`); returns that generation.
    pub fn publish(&self, change: impl FnOnce(&mut Control)) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**current).clone();
        next.generation += 1;
        change(&mut next);
        let generation = next.generation;
        *current = Arc::new(next);
        self.generation.store(generation, Ordering::Release);
        generation
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pair `index` applied `generation`, and with it the policy change `(policy_gen,
    /// flows reset)` if there was one.
    pub fn ack(&self, index: usize, generation: u64, policy_change: Option<(u64, usize)>) {
        let mut board = self.board();
        if let Some(ack) = board.acks.get_mut(index) {
            ack.generation = generation;
            if let Some((policy_gen, reset)) = policy_change {
                ack.policy_gen = policy_gen;
                ack.reset = reset;
            }
        }
        drop(board);
        self.changed.notify_all();
    }

    /// Wait until every pair has applied `generation`, at most until `deadline`. Returns the
    /// flows reset by the policy change `policy_gen` and how many pairs have not applied it.
    pub fn wait_applied(
        &self,
        generation: u64,
        policy_gen: u64,
        deadline: Instant,
    ) -> (usize, usize) {
        let mut board = self.board();
        loop {
            let late = board
                .acks
                .iter()
                .filter(|a| a.generation < generation)
                .count();
            let now = Instant::now();
            if late == 0 || now >= deadline {
                let reset = board
                    .acks
                    .iter()
                    .filter(|a| a.policy_gen == policy_gen)
                    .map(|a| a.reset)
                    .sum();
                return (reset, late);
            }
            board = self
                .changed
                .wait_timeout(board, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether someone asked pair `index` for its flow table (cleared by asking).
    pub fn table_wanted(&self, index: usize) -> bool {
        self.table_wanted
            .get(index)
            .is_some_and(|w| w.load(Ordering::Relaxed) && w.swap(false, Ordering::AcqRel))
    }

    /// Ask pair `index` for a copy of its flow table; returns how many it has made so far.
    pub fn want_table(&self, index: usize) -> u64 {
        let seq = self.board().tables.get(index).map_or(0, |t| t.0);
        if let Some(w) = self.table_wanted.get(index) {
            w.store(true, Ordering::Release);
        }
        seq
    }

    /// Pair `index`'s copy of its flow table.
    pub fn put_table(&self, index: usize, rows: Vec<FlowSnapshot>) {
        let mut board = self.board();
        if let Some(t) = board.tables.get_mut(index) {
            t.0 += 1;
            t.1 = rows;
        }
        drop(board);
        self.changed.notify_all();
    }

    /// Pair `index`'s flow table: a copy newer than `seq` if one comes by `deadline`, else
    /// the last one it made (then `true`: stale).
    pub fn table(&self, index: usize, seq: u64, deadline: Instant) -> (Vec<FlowSnapshot>, bool) {
        let mut board = self.board();
        loop {
            let Some((made, rows)) = board.tables.get(index) else {
                return (Vec::new(), true);
            };
            let now = Instant::now();
            if *made > seq || now >= deadline {
                return (rows.clone(), *made <= seq);
            }
            board = self
                .changed
                .wait_timeout(board, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
