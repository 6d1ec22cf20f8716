//! The vhost-user-net device: a thin `VhostUserBackend` over the queue pairs' data paths.
//!
//! The transport (vhost-user messages, memory table, vring setup, epoll workers) is
//! rust-vmm's vhost-user-backend; this module only says what the device offers and gives
//! each queue pair ([`pair::QueuePair`], one worker thread each) its events.

pub mod config;
pub mod pacer;
pub mod pair;
pub mod published;
pub mod queues;
pub mod server;
pub mod vm;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::datapath::Datapath;
use crate::dns::NamePool;
use crate::egress::steering::{FlowOwners, Steering};
use crate::egress::{FlowSnapshot, Registrar};
use crate::policy::Policy;
use crate::telemetry::Counters;
use pacer::SharedPacer;
use pair::{Inbox, PairSetup, QueuePair, Tokens};
use published::{Control, Published, APPLY_WAIT, TABLE_WAIT};
pub use vm::VmState;

/// How the device is laid out and driven (`moat serve --queues`, `--busy-poll-us`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Queue pairs offered (VIRTIO_NET_F_MQ when more than one): one thread each.
    pub queue_pairs: usize,
    /// After draining TX, look for more buffers this long before sleeping.
    pub busy_poll: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            queue_pairs: 1,
            busy_poll: Duration::ZERO,
        }
    }
}

/// The most queue pairs moat offers (one thread each): the flow tables' limit.
pub use crate::egress::steering::MAX_QUEUE_PAIRS;

/// The device of one frontend connection: its queue pairs, each with its own data path and
/// thread. A new one is made for every connection, so a reconnecting VMM always starts from
/// a reset device.
pub struct NetDevice {
    config_space: [u8; 12],
    pairs: Vec<Mutex<QueuePair>>,
    inboxes: Arc<[Inbox]>,
    tokens: Tokens,
    /// Policy, limits and run-time forwards as the control plane last set them.
    published: Arc<Published>,
}

/// What a reload did to the device's flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Flows the new policy no longer allows, reset (by the pairs that answered).
    pub flows_reset: usize,
    /// Pairs busy past the wait: they apply the policy before reading another frame, and
    /// their resets are not in `flows_reset`.
    pub pairs_pending: usize,
}

/// Registers proxy sockets with one pair's vring worker: one loop for kicks, sockets, timer.
struct EpollRegistrar(Arc<VringEpollHandler<Arc<NetDevice>>>);

impl Registrar for EpollRegistrar {
    fn register(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.0.register_listener(fd, events, token)
    }

    fn unregister(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.0.unregister_listener(fd, events, token)
    }
}

/// Hook each pair into its own event loop (proxy sockets, timer, handed frames).
pub fn attach(
    device: &Arc<NetDevice>,
    handlers: Vec<Arc<VringEpollHandler<Arc<NetDevice>>>>,
) -> io::Result<()> {
    if handlers.len() != device.pairs.len() {
        return Err(io::Error::other(format!(
            "{} vring workers for {} queue pairs",
            handlers.len(),
            device.pairs.len()
        )));
    }
    for ((pair, handler), inbox) in device.pairs.iter().zip(handlers).zip(device.inboxes.iter()) {
        let timer = TimerFd::new()?;
        // Non-blocking: re-arming clears a pending expiry, so a read after epoll said "ready"
        // may find nothing; a blocking read would then stall the whole queue until the next
        // expiry (seen: 1 s stalls on connection setup).
        // SAFETY: `timer` owns the descriptor and outlives this borrow (TimerFd has no AsFd).
        let timer_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(timer.as_raw_fd()) };
        rustix::fs::fcntl_setfl(timer_fd, rustix::fs::OFlags::NONBLOCK)?;
        handler.register_listener(
            timer.as_raw_fd(),
            EventSet::IN,
            u64::from(device.tokens.timer),
        )?;
        handler.register_listener(
            inbox.wake.as_raw_fd(),
            EventSet::IN,
            u64::from(device.tokens.handoff),
        )?;
        let mut pair = lock(pair);
        pair.timer = Some(timer);
        pair.loop_fd = Some(handler.as_raw_fd());
        pair.datapath.attach(Box::new(EpollRegistrar(handler)));
    }
    Ok(())
}

/// Undo [`attach`] when the connection ends (breaks the device <-> loop reference cycle).
pub fn detach(device: &Arc<NetDevice>) {
    for pair in &device.pairs {
        let mut pair = lock(pair);
        pair.datapath.detach();
        pair.timer = None;
        pair.loop_fd = None;
    }
}

fn lock(pair: &Mutex<QueuePair>) -> std::sync::MutexGuard<'_, QueuePair> {
    pair.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetDevice {
    pub fn new(
        policy: Arc<Policy>,
        names: Arc<Mutex<NamePool>>,
        counters: Arc<Counters>,
        tuning: Tuning,
    ) -> io::Result<NetDevice> {
        let pairs = tuning.queue_pairs.clamp(1, MAX_QUEUE_PAIRS);
        let tokens = Tokens::for_pairs(pairs);
        let inboxes: Arc<[Inbox]> = (0..pairs)
            .map(|_| Inbox::new())
            .collect::<io::Result<Vec<_>>>()?
            .into();
        let owners = (pairs > 1).then(|| Arc::new(FlowOwners::default()));
        let egress = SharedPacer::new(policy.limits.egress_bps, policy.limits.burst_bytes);
        let ingress = SharedPacer::new(policy.limits.ingress_bps, policy.limits.burst_bytes);
        let published = Arc::new(Published::new(
            pairs,
            Control {
                generation: 0,
                policy: Arc::clone(&policy),
                policy_gen: 0,
                egress: egress.clone(),
                ingress: ingress.clone(),
                pacers_gen: 0,
                forwards: Vec::new(),
                forwards_gen: 0,
            },
        ));
        let pairs = (0..pairs)
            .map(|index| {
                let mut datapath = Datapath::new(
                    Arc::clone(&policy),
                    Arc::clone(&names),
                    Arc::clone(&counters),
                );
                let steering = owners
                    .as_ref()
                    .map_or_else(Steering::default, |o| Steering::pair(Arc::clone(o), index));
                datapath.place(tokens.first_flow, steering, index);
                let setup = PairSetup {
                    index,
                    tokens,
                    busy_poll: tuning.busy_poll,
                    inboxes: Arc::clone(&inboxes),
                    egress: egress.clone(),
                    ingress: ingress.clone(),
                    published: Arc::clone(&published),
                };
                Mutex::new(QueuePair::new(datapath, &policy, setup))
            })
            .collect::<Vec<_>>();
        Ok(NetDevice {
            config_space: config::config_space(&policy.vm, pairs.len() as u16),
            pairs,
            inboxes,
            tokens,
            published,
        })
    }

    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Swap in a reloaded policy (same VM identity). Never waits on a busy pair's lock:
    /// idle pairs apply it here, busy ones at their next event (and before their next
    /// frame); this waits up to [`APPLY_WAIT`] for their count of reset flows.
    pub fn reload(&self, policy: Arc<Policy>) -> Applied {
        let old = self.published.current();
        let (old_limits, new) = (&old.policy.limits, &policy.limits);
        let limits_changed = (
            old_limits.egress_bps,
            old_limits.ingress_bps,
            old_limits.burst_bytes,
        ) != (new.egress_bps, new.ingress_bps, new.burst_bytes);
        let mut policy_gen = 0;
        let generation = self.published.publish(|c| {
            c.policy = policy;
            c.policy_gen = c.generation;
            policy_gen = c.generation;
            if limits_changed {
                // New limits apply at once, from a full bucket (one bucket for all pairs).
                let limits = &c.policy.limits;
                c.egress = SharedPacer::new(limits.egress_bps, limits.burst_bytes);
                c.ingress = SharedPacer::new(limits.ingress_bps, limits.burst_bytes);
                c.pacers_gen = c.generation;
            }
        });
        self.apply(generation, policy_gen)
    }

    /// Forwards added at run time, on top of the policy's (listened for by pair 0).
    pub fn set_runtime_forwards(&self, forwards: Vec<crate::policy::Forward>) {
        let generation = self.published.publish(|c| {
            c.forwards = forwards;
            c.forwards_gen = c.generation;
        });
        self.apply(generation, u64::MAX);
    }

    /// Have every pair apply `generation`: idle ones here, busy ones woken.
    fn apply(&self, generation: u64, policy_gen: u64) -> Applied {
        for (index, pair) in self.pairs.iter().enumerate() {
            match pair.try_lock() {
                Ok(mut pair) => pair.sync(),
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().sync(),
                Err(std::sync::TryLockError::WouldBlock) => self.wake(index),
            }
        }
        let (flows_reset, pairs_pending) = self.published.wait_applied(
            generation,
            policy_gen,
            std::time::Instant::now() + APPLY_WAIT,
        );
        if pairs_pending > 0 {
            tracing::warn!(
                pairs_pending,
                "reload: busy queue pairs apply it at their next event"
            );
        }
        Applied {
            flows_reset,
            pairs_pending,
        }
    }

    /// Make pair `index`'s loop run an event soon (its handed-frames eventfd).
    fn wake(&self, index: usize) {
        if let Some(inbox) = self.inboxes.get(index) {
            let _ = inbox.wake.write(1);
        }
    }

    /// The flows of this connection (every pair's), for `moat stats`, and how many pairs
    /// were too busy to copy theirs in time (their last copy is shown). Never waits on a
    /// pair's lock.
    pub fn flow_table(&self) -> (Vec<FlowSnapshot>, usize) {
        let mut rows = Vec::new();
        let mut asked = Vec::new();
        for (index, pair) in self.pairs.iter().enumerate() {
            match pair.try_lock() {
                Ok(pair) => rows.extend(pair.datapath.snapshot()),
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    rows.extend(e.into_inner().datapath.snapshot())
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    asked.push((index, self.published.want_table(index)));
                    self.wake(index);
                }
            }
        }
        let deadline = std::time::Instant::now() + TABLE_WAIT;
        let mut stale = 0;
        for (index, seq) in asked {
            let (table, old) = self.published.table(index, seq, deadline);
            rows.extend(table);
            stale += usize::from(old);
        }
        rows.sort_by(|a, b| a.flow.cmp(&b.flow));
        (rows, stale)
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        config::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::virtio_features(self.pairs.len())
    }

    fn acked_features(&self, features: u64) {
        for pair in &self.pairs {
            lock(pair).set_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features(self.pairs.len())
    }

    fn reset_device(&self) {
        for pair in &self.pairs {
            lock(pair).reset();
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        for pair in &self.pairs {
            lock(pair).set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.config_space, offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        for pair in &self.pairs {
            lock(pair).set_memory(mem.clone());
        }
        Ok(())
    }

    /// One worker thread per queue pair: queues 2i (RX) and 2i+1 (TX) go to thread i.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len()).map(|i| 0b11u64 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(pair) = self.pairs.get(thread_id) else {
            return Err(io::Error::other(format!("no queue pair {thread_id}")));
        };
        lock(pair).handle_event(device_event, evset, vrings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn policy(extra: &str) -> Arc<Policy> {
        let text = format!(
            "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n{extra}"
        );
        Arc::new(Policy::parse(&text, std::path::Path::new("t.toml")).expect("valid policy"))
    }

    fn device(pairs: usize) -> Arc<NetDevice> {
        let tuning = Tuning {
            queue_pairs: pairs,
            ..Tuning::default()
        };
        let names = Arc::new(Mutex::new(NamePool::default()));
        let device = NetDevice::new(policy(""), names, Arc::new(Counters::default()), tuning);
        Arc::new(device.expect("device"))
    }

    /// A pair busy with an event (its lock held, as by a pair thread that never returns):
    /// reload and stats still answer, within their bounded waits, and say which pair is
    /// behind; the pair applies the reload as soon as it runs again.
    #[test]
    fn reload_and_stats_never_wait_on_a_busy_pair() {
        let device = device(2);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel::<()>();
        let busy = Arc::clone(&device);
        let holder = std::thread::spawn(move || {
            let _guard = lock(&busy.pairs[0]);
            locked.send(()).expect("test alive");
            let _ = held.recv();
        });
        is_locked.recv().expect("pair 0 locked");

        let started = Instant::now();
        let applied = device.reload(policy("[limits]\nmax_flows = 7\n"));
        let took = started.elapsed();
        assert_eq!(
            applied.pairs_pending, 1,
            "pair 0 is busy, pair 1 applied it"
        );
        assert!(took < APPLY_WAIT + Duration::from_secs(5), "{took:?}");
        let started = Instant::now();
        let (rows, stale) = device.flow_table();
        assert!(rows.is_empty());
        assert_eq!(stale, 1, "pair 0's table is its last copy");
        assert!(started.elapsed() < TABLE_WAIT + Duration::from_secs(5));
        assert_eq!(lock(&device.pairs[1]).datapath.policy().limits.max_flows, 7);

        release.send(()).expect("holder alive");
        holder.join().expect("holder");
        // Its next event (here: the control plane finding it idle) applies the reload.
        let mut pair = lock(&device.pairs[0]);
        assert_ne!(pair.datapath.policy().limits.max_flows, 7);
        pair.sync();
        assert_eq!(pair.datapath.policy().limits.max_flows, 7);
    }
}
