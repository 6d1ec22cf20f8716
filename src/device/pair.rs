//! One queue pair: its RX and TX queues, its own data path (stack, flow table), its own
//! event loop thread. With `--queues 1` this is the whole device.
//!
//! TX: drain every available chain (one copy each into a moat-owned buffer), one verdict per
//! frame, one used-ring update and at most one notification per batch; answers and flow
//! output go out on this pair's RX queue in the same pass. A frame of a flow another pair
//! owns is handed to that pair's [`Inbox`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::datapath::{Datapath, Origin, Outcome};
use crate::frame::virtio_hdr::{Offloads, OutHdr, MAX_GSO_FRAME, VIRTIO_NET_HDR_LEN};
use crate::policy::Policy;
use crate::telemetry::{DropReason, Traffic};

use super::config::{self, RX_QUEUE, TX_QUEUE};
use super::pacer::SharedPacer;
use super::published::Published;
use super::queues::{read_tx_chain, ChainError, GuestReader, RxQueue};

/// Frames handed to a pair and not taken yet, at most (then they are dropped, counted).
const MAX_HANDOFF: usize = 4096;
/// Bytes of frames handed to a pair and not taken yet, at most (32 segments of 64 KiB).
pub const MAX_HANDOFF_BYTES: usize = 2 << 20;

/// Event ids of a pair's loop. vhost-user-backend keeps 0..=2N (N pairs) for itself: the
/// pair's two queue kicks are 0 (RX) and 1 (TX), 2N its exit event. Ours come after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub timer: u16,
    pub handoff: u16,
    /// The first token the flow table may give a host socket.
    pub first_flow: u64,
}

impl Tokens {
    pub fn for_pairs(pairs: usize) -> Tokens {
        let reserved = 2 * pairs as u16;
        Tokens {
            timer: reserved + 1,
            handoff: reserved + 2,
            first_flow: u64::from(reserved) + 3,
        }
    }
}

/// Frames other pairs read for this pair's flows, and the eventfd that wakes its loop.
pub struct Inbox {
    /// The frames, and their bytes.
    frames: Mutex<(VecDeque<Vec<u8>>, usize)>,
    pub wake: EventFd,
}

impl Inbox {
    pub fn new() -> io::Result<Inbox> {
        Ok(Inbox {
            frames: Mutex::new((VecDeque::new(), 0)),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queue a frame; false (nothing queued) when the inbox is full.
    fn push(&self, frame: Vec<u8>) -> bool {
        let mut guard = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        let (frames, bytes) = &mut *guard;
        if frames.len() >= MAX_HANDOFF || *bytes + frame.len() > MAX_HANDOFF_BYTES {
            return false;
        }
        *bytes += frame.len();
        frames.push_back(frame);
        true
    }

    fn take(&self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner())).0
    }
}

/// The state of one queue pair of one frontend connection.
pub struct QueuePair {
    index: usize,
    pub(super) datapath: Datapath,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    acked_features: u64,
    event_idx: bool,
    rx: RxQueue,
    /// Reused TX copy buffer, as large as the largest frame: no allocation (and no zeroing)
    /// per frame.
    tx_buf: Box<[u8]>,
    /// Wakes the event loop when the stack's timers are due.
    pub(super) timer: Option<TimerFd>,
    /// When the timer is set to fire (an earlier wake set stays; the loop re-arms then).
    armed: Option<Instant>,
    /// `limits.egress_bps`: paces the TX queue (guest -> moat), shared by the VM's pairs.
    egress: Option<SharedPacer>,
    /// TX descriptors wait for the egress bucket.
    tx_paused: bool,
    /// After an event, stay awake this long for more TX buffers or another event before
    /// going back to sleep in epoll (0: sleep at once).
    busy_poll: Duration,
    /// The pair's event loop (its epoll set): readable when another event is pending.
    pub(super) loop_fd: Option<RawFd>,
    /// Every pair's inbox (this pair's is `inboxes[index]`).
    inboxes: Arc<[Inbox]>,
    /// Pairs handed frames in the current batch (woken once each at its end).
    handed: u64,
    tokens: Tokens,
    /// Every log line of this pair carries the VM's name.
    span: tracing::Span,
    /// The control plane's policy, limits and forwards, and which of them this pair applied
    /// (generation of the whole, then of each part).
    published: Arc<Published>,
    applied: u64,
    policy_gen: u64,
    pacers_gen: u64,
    forwards_gen: u64,
}

/// How a queue pair is set up (the same for every pair of a device).
pub struct PairSetup {
    pub index: usize,
    pub tokens: Tokens,
    pub busy_poll: Duration,
    pub inboxes: Arc<[Inbox]>,
    pub egress: Option<SharedPacer>,
    pub ingress: Option<SharedPacer>,
    pub published: Arc<Published>,
}

impl QueuePair {
    pub fn new(datapath: Datapath, policy: &Policy, setup: PairSetup) -> QueuePair {
        QueuePair {
            index: setup.index,
            datapath,
            mem: None,
            acked_features: 0,
            event_idx: false,
            rx: RxQueue::paced(setup.ingress),
            tx_buf: vec![0; VIRTIO_NET_HDR_LEN + MAX_GSO_FRAME].into_boxed_slice(),
            timer: None,
            armed: None,
            egress: setup.egress,
            tx_paused: false,
            busy_poll: setup.busy_poll,
            loop_fd: None,
            inboxes: setup.inboxes,
            handed: 0,
            tokens: setup.tokens,
            span: tracing::info_span!("vm", vm = %policy.vm.name, pair = setup.index),
            published: setup.published,
            applied: 0,
            policy_gen: 0,
            pacers_gen: 0,
            forwards_gen: 0,
        }
    }

    /// Follow the control plane: apply what it published since the last look, and copy
    /// the flow table if `moat stats` asked for it.
    pub fn sync(&mut self) {
        self.sync_policy();
        if self.published.table_wanted(self.index) {
            let rows = self.datapath.snapshot();
            self.published.put_table(self.index, rows);
        }
    }

    /// Apply a newer policy, limits or forwards, if any (one atomic load when none: called
    /// before every frame, so no frame is judged by a policy older than the last reload).
    fn sync_policy(&mut self) {
        if self.published.generation() == self.applied {
            return;
        }
        let control = self.published.current();
        let mut policy_change = None;
        if control.policy_gen != self.policy_gen {
            let reset = self.datapath.reload(Arc::clone(&control.policy));
            self.policy_gen = control.policy_gen;
            policy_change = Some((control.policy_gen, reset));
        }
        if control.pacers_gen != self.pacers_gen {
            self.set_pacers(control.egress.clone(), control.ingress.clone());
            self.pacers_gen = control.pacers_gen;
        }
        if control.forwards_gen != self.forwards_gen {
            self.datapath.set_forwards(control.forwards.clone());
            self.forwards_gen = control.forwards_gen;
        }
        self.applied = control.generation;
        // Wake the loop at once so resets reach the guest and the proxies.
        self.wake_soon();
        self.published
            .ack(self.index, control.generation, policy_change);
    }

    /// New bandwidth limits (a reload changed them): from a full bucket.
    pub fn set_pacers(&mut self, egress: Option<SharedPacer>, ingress: Option<SharedPacer>) {
        self.egress = egress;
        self.rx.set_pacer(ingress);
    }

    /// Wake the loop at once (a reload or new forwards: resets must reach the guest).
    pub fn wake_soon(&mut self) {
        self.set_timer(Some(Duration::ZERO));
    }

    pub fn set_features(&mut self, features: u64) {
        self.acked_features = features;
        self.datapath
            .set_offloads(Offloads::from_features(features));
    }

    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = Some(mem);
    }

    pub fn reset(&mut self) {
        self.rx.clear();
        self.inboxes[self.index].take();
        self.set_features(0);
        self.event_idx = false;
    }

    /// One event of this pair's loop: a queue kick, the timer, handed frames, a host socket.
    pub fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
    ) -> io::Result<()> {
        self.sync();
        let Some(mem) = self.mem.clone() else {
            if device_event == self.tokens.handoff {
                self.take_handoffs();
            }
            return Ok(());
        };
        let [rx_vring, tx_vring] = vrings else {
            return Err(io::Error::other(
                "expected one rx and one tx queue per pair",
            ));
        };
        let span = self.span.clone();
        let _in_vm = span.enter();
        tracing::trace!(device_event, ?evset, "event");
        let counters = Arc::clone(self.datapath.counters());
        match device_event {
            RX_QUEUE => counters.add(Traffic::RxKicks, 1),
            TX_QUEUE => {
                counters.add(Traffic::TxKicks, 1);
                // Drains TX and delivers what it produced.
                return self.drain(rx_vring, tx_vring, &mem);
            }
            t if t == self.tokens.timer => {
                if let Some(timer) = self.timer.as_mut() {
                    let _ = timer.wait();
                }
                if self.tx_paused {
                    // The egress bucket has refilled: carry on draining TX.
                    return self.drain(rx_vring, tx_vring, &mem);
                }
            }
            t if t == self.tokens.handoff => self.take_handoffs(),
            token => self.datapath.host_event(u64::from(token), evset),
        }
        self.deliver(rx_vring, &mem)?;
        if self.linger(tx_vring, &mem) {
            return self.drain(rx_vring, tx_vring, &mem);
        }
        Ok(())
    }

    /// Run the flows and put what waits for the guest into the RX queue.
    fn deliver(
        &mut self,
        rx_vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<()> {
        let counters = Arc::clone(self.datapath.counters());
        let rx = &mut self.rx;
        self.datapath
            .pump(|frame, hdr| rx.push(frame, hdr, &counters));
        let mrg = config::has_feature(self.acked_features, VIRTIO_NET_F_MRG_RXBUF);
        let flushed = self.rx.flush(rx_vring, mem, mrg, &counters);
        self.arm_timer();
        flushed
    }

    /// Wake up when the stack next needs attention (retransmits, handshake deadlines).
    fn arm_timer(&mut self) {
        let mut delay = self.datapath.poll_delay();
        let egress = self
            .egress
            .as_ref()
            .filter(|_| self.tx_paused)
            .map(SharedPacer::wait);
        // The guest was still posting RX buffers when a flush stopped retrying.
        let rx_retry = self.rx.retry_soon().then_some(Duration::from_millis(1));
        for wait in [egress, self.rx.pacing_delay(), rx_retry]
            .into_iter()
            .flatten()
        {
            delay = Some(delay.map_or(wait, |d| d.min(wait)));
        }
        self.set_timer(delay);
    }

    /// Wake the loop after `delay` (None: no wake needed). Called after every batch, so the
    /// timer is only re-armed when the wake must come earlier than the one already set: a
    /// wake that comes early finds nothing due and re-arms. With nothing due an armed timer
    /// is left be: its wake is the only cost, where disarming cost a system call after
    /// nearly every short flow.
    fn set_timer(&mut self, delay: Option<Duration>) {
        let (Some(timer), Some(d)) = (self.timer.as_mut(), delay) else {
            return;
        };
        let now = Instant::now();
        // A zero duration would disarm the timer: wake as soon as possible instead.
        let d = d.max(Duration::from_micros(100));
        if self.armed.is_some_and(|at| at > now && at <= now + d) {
            return;
        }
        if timer.reset(d, None).is_ok() {
            self.armed = Some(now + d);
        }
    }

    /// Drain TX and deliver, until the queue has nothing new; with EVENT_IDX, re-enable
    /// notifications the way the virtio spec asks (disable, drain, enable, re-check), after
    /// looking for more for up to `busy_poll` first.
    fn drain(
        &mut self,
        rx_vring: &VringRwLock,
        tx_vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<()> {
        loop {
            if self.event_idx {
                tx_vring.disable_notification().map_err(io::Error::other)?;
            }
            self.process_tx(tx_vring, mem)?;
            self.deliver(rx_vring, mem)?;
            if !self.event_idx || self.tx_paused {
                // Paced: the timer resumes; no kick is needed meanwhile.
                return Ok(());
            }
            if self.linger(tx_vring, mem) {
                continue;
            }
            if !tx_vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Busy polling: spin up to `busy_poll` until the guest makes TX buffers available
    /// (true: drain them here, without a kick) or another event is pending (false: the loop
    /// then finds it without sleeping). A thread that never sleeps between a guest's frames,
    /// or between a request and its reply, saves the wake-up each time.
    fn linger(&self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> bool {
        if self.busy_poll.is_zero() {
            return false;
        }
        let mem = mem.memory();
        let deadline = Instant::now() + self.busy_poll;
        // SAFETY: `loop_fd` is the worker's epoll descriptor, kept open by the handler the
        // flows hold (see `attach`) until `detach` clears both; `detach` needs this pair,
        // which `&self` holds for the whole borrow.
        let epoll = self
            .loop_fd
            .map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
        let mut pollfd = epoll.map(|fd| {
            [rustix::event::PollFd::from_borrowed_fd(
                fd,
                rustix::event::PollFlags::IN,
            )]
        });
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                match queue.avail_idx(&*mem, Ordering::Acquire) {
                    Ok(avail) if avail.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if let Some(p) = pollfd.as_mut() {
                // Zero timeout: only asks whether the epoll set has a ready event (without
                // taking it, unlike epoll_wait).
                let zero = rustix::event::Timespec::default();
                if rustix::event::poll(p, Some(&zero)).is_ok_and(|n| n > 0) {
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Read every available TX chain: one copy per chain, one verdict per frame, one
    /// used-ring notification per batch.
    fn process_tx(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<()> {
        if !vring.get_ref().is_enabled() {
            return Ok(()); // a disabled queue is not read (a poll may still find buffers)
        }
        let mem = mem.memory();
        let mut reader = GuestReader::new(&mem);
        let max = self.datapath.max_tx_len();
        let (mut used, mut bytes) = (0u32, 0u64);
        self.tx_paused = false;
        // One lock of the TX vring for the whole batch, not two per frame.
        let mut state = vring.get_mut();
        loop {
            if let Some(pacer) = self.egress.as_ref() {
                if !pacer.ready() {
                    // Leave the rest in the ring: the guest's queue backs up, nothing drops.
                    self.tx_paused = true;
                    break;
                }
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                break;
            };
            self.sync_policy();
            let head = chain.head_index();
            let read = read_tx_chain(chain, &mut reader, &mut self.tx_buf, max);
            let len = match read {
                Ok(n) | Err((_, n)) => n,
            };
            bytes += len as u64;
            if let Some(pacer) = self.egress.as_ref() {
                pacer.spend(len);
            }
            match read {
                Ok(_) => match self.datapath.handle(&mut self.tx_buf[..len], Origin::Queue) {
                    Outcome::Consumed => {}
                    Outcome::Answer(answer) => {
                        self.rx
                            .push_copy(&answer, OutHdr::Plain, self.datapath.counters())
                    }
                    Outcome::Handoff(pair) => self.hand_off(pair, len),
                },
                Err((ChainError::Bad, _)) => self.datapath.reject(DropReason::BadDescriptor, len),
                Err((ChainError::TooLong, _)) => self.datapath.reject(DropReason::Oversized, len),
            }
            if state.add_used(head, 0).is_err() {
                self.datapath.reject(DropReason::BadDescriptor, 0);
            }
            used += 1;
        }
        let counters = self.datapath.counters();
        counters.add(Traffic::TxFrames, u64::from(used));
        counters.add(Traffic::TxBytes, bytes);
        if used > 0 && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
            self.datapath.counters().add(Traffic::Notifications, 1);
        }
        drop(state);
        self.wake_handed();
        Ok(())
    }

    /// Give the frame in `tx_buf[..len]` to the pair that owns its flow.
    fn hand_off(&mut self, pair: usize, len: usize) {
        let frame = &self.tx_buf[..len];
        if self
            .inboxes
            .get(pair)
            .is_some_and(|inbox| inbox.push(frame.to_vec()))
        {
            self.handed |= 1 << pair;
            self.datapath.counters().add(Traffic::HandedOff, 1);
        } else {
            self.datapath.counters().drop_frame(
                DropReason::HandoffFailed,
                format_args!("pair {pair}'s inbox is full"),
            );
        }
    }

    /// Wake the pairs handed frames in this batch, once each.
    fn wake_handed(&mut self) {
        while self.handed != 0 {
            let pair = self.handed.trailing_zeros() as usize;
            self.handed &= !(1 << pair);
            if let Some(inbox) = self.inboxes.get(pair) {
                let _ = inbox.wake.write(1);
            }
        }
    }

    /// Frames other pairs read for this pair's flows.
    fn take_handoffs(&mut self) {
        let frames = {
            let inbox = &self.inboxes[self.index];
            let _ = inbox.wake.read();
            inbox.take()
        };
        for mut frame in frames {
            self.sync_policy();
            if let Outcome::Answer(answer) = self.datapath.handle(&mut frame, Origin::Handoff) {
                self.rx
                    .push_copy(&answer, OutHdr::Plain, self.datapath.counters());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames handed between pairs wait within a byte bound (by count alone, 4096 x 64 KiB).
    #[test]
    fn handoff_inbox_is_bounded_in_bytes() {
        let inbox = Inbox::new().expect("eventfd");
        let taken = (0..MAX_HANDOFF)
            .filter(|_| inbox.push(vec![0u8; 65_550]))
            .count();
        assert_eq!(taken, MAX_HANDOFF_BYTES / 65_550);
        assert!(inbox.push(vec![0u8; MAX_HANDOFF_BYTES % 65_550]));
        assert!(!inbox.push(vec![0u8; 1]));
        assert_eq!(inbox.take().len(), taken + 1);
        assert!(
            inbox.push(vec![0u8; 65_550]),
            "taking the frames frees their room"
        );
    }
}
