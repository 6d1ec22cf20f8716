//! One queue pair: its RX and TX queues, its own data path (stack, flow table), its own
//! event loop thread. With `--queues 1` this is the whole device.
//!
//! TX: drain every available chain (one copy each into a moat-owned buffer), one verdict per
//! frame, one used-ring update and at most one notification per batch; answers and flow
//! output go out on this pair's RX queue in the same pass. A frame of a flow another pair
//! owns is handed to that pair's [`Inbox`].

use std::collections::VecDeque;
use std::io;
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
use crate::frame::virtio_hdr::{Offloads, OutHdr};
use crate::policy::Policy;
use crate::telemetry::{DropReason, Traffic};

use super::config::{self, RX_QUEUE, TX_QUEUE};
use super::pacer::SharedPacer;
use super::queues::{read_tx_chain, ChainError, RxQueue};

/// Frames handed to a pair and not taken yet, at most (then they are dropped, counted).
const MAX_HANDOFF: usize = 4096;

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
    frames: Mutex<VecDeque<Vec<u8>>>,
    pub wake: EventFd,
}

impl Inbox {
    pub fn new() -> io::Result<Inbox> {
        Ok(Inbox {
            frames: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queue a frame; false (nothing queued) when the inbox is full.
    fn push(&self, frame: Vec<u8>) -> bool {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if frames.len() >= MAX_HANDOFF {
            return false;
        }
        frames.push_back(frame);
        true
    }

    fn take(&self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()))
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
    /// Reused TX copy buffer: no allocation per frame.
    tx_buf: Vec<u8>,
    /// Wakes the event loop when the stack's timers are due.
    pub(super) timer: Option<TimerFd>,
    /// `limits.egress_bps`: paces the TX queue (guest -> moat), shared by the VM's pairs.
    egress: Option<SharedPacer>,
    /// TX descriptors wait for the egress bucket.
    tx_paused: bool,
    /// After a batch, look for more TX buffers this long before sleeping (0: never).
    busy_poll: Duration,
    /// Every pair's inbox (this pair's is `inboxes[index]`).
    inboxes: Arc<[Inbox]>,
    /// Pairs handed frames in the current batch (woken once each at its end).
    handed: u64,
    tokens: Tokens,
    /// Every log line of this pair carries the VM's name.
    span: tracing::Span,
}

/// How a queue pair is set up (the same for every pair of a device).
pub struct PairSetup {
    pub index: usize,
    pub tokens: Tokens,
    pub busy_poll: Duration,
    pub inboxes: Arc<[Inbox]>,
    pub egress: Option<SharedPacer>,
    pub ingress: Option<SharedPacer>,
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
            tx_buf: Vec::with_capacity(2048),
            timer: None,
            egress: setup.egress,
            tx_paused: false,
            busy_poll: setup.busy_poll,
            inboxes: setup.inboxes,
            handed: 0,
            tokens: setup.tokens,
            span: tracing::info_span!("vm", vm = %policy.vm.name, pair = setup.index),
        }
    }

    /// New bandwidth limits (a reload changed them): from a full bucket.
    pub fn set_pacers(&mut self, egress: Option<SharedPacer>, ingress: Option<SharedPacer>) {
        self.egress = egress;
        self.rx.set_pacer(ingress);
    }

    /// Wake the loop at once (a reload or new forwards: resets must reach the guest).
    pub fn wake_soon(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.reset(Duration::from_micros(100), None);
        }
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
        let Some(mem) = self.mem.clone() else {
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
            token => self.datapath.flows().host_event(u64::from(token), evset),
        }
        self.deliver(rx_vring, &mem)
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
        self.arm_timer();
        let mrg = config::has_feature(self.acked_features, VIRTIO_NET_F_MRG_RXBUF);
        self.rx.flush(rx_vring, mem, mrg, &counters)
    }

    /// Wake up when the stack next needs attention (retransmits, handshake deadlines).
    fn arm_timer(&mut self) {
        let mut delay = self.datapath.flows().poll_delay();
        let egress = self
            .egress
            .as_ref()
            .filter(|_| self.tx_paused)
            .map(SharedPacer::wait);
        for wait in [egress, self.rx.pacing_delay()].into_iter().flatten() {
            delay = Some(delay.map_or(wait, |d| d.min(wait)));
        }
        if let Some(timer) = self.timer.as_mut() {
            let _ = match delay {
                // A zero duration would disarm the timer: wake as soon as possible instead.
                Some(d) => timer.reset(d.max(Duration::from_micros(100)), None),
                None => timer.clear(),
            };
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
            if self.poll_tx(tx_vring, mem) {
                continue;
            }
            if !tx_vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Spin up to `busy_poll` for the guest to make more TX buffers available: a busy guest
    /// then never has to kick, and this thread never sleeps between its batches.
    fn poll_tx(&self, vring: &VringRwLock, mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> bool {
        if self.busy_poll.is_zero() {
            return false;
        }
        let mem = mem.memory();
        let deadline = Instant::now() + self.busy_poll;
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
        let mem = mem.memory();
        let max = self.datapath.max_tx_len();
        let mut used = 0u32;
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
            let head = chain.head_index();
            let read = read_tx_chain(chain, &mem, &mut self.tx_buf, max);
            if let Some(pacer) = self.egress.as_ref() {
                pacer.spend(self.tx_buf.len());
            }
            match read {
                Ok(_) => match self.datapath.handle(&mut self.tx_buf, Origin::Queue) {
                    Outcome::Consumed => {}
                    Outcome::Answer(answer) => {
                        self.rx
                            .push_copy(&answer, OutHdr::Plain, self.datapath.counters())
                    }
                    Outcome::Handoff(pair) => self.hand_off(pair),
                },
                Err(ChainError::Bad) => self
                    .datapath
                    .reject(DropReason::BadDescriptor, self.tx_buf.len()),
                Err(ChainError::TooLong) => self
                    .datapath
                    .reject(DropReason::Oversized, self.tx_buf.len()),
            }
            if state.add_used(head, 0).is_err() {
                self.datapath.reject(DropReason::BadDescriptor, 0);
            }
            used += 1;
        }
        if used > 0 && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
            self.datapath.counters().add(Traffic::Notifications, 1);
        }
        drop(state);
        self.wake_handed();
        Ok(())
    }

    /// Give the frame in `tx_buf` to the pair that owns its flow.
    fn hand_off(&mut self, pair: usize) {
        let Some(inbox) = self.inboxes.get(pair) else {
            return;
        };
        if inbox.push(self.tx_buf.clone()) {
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
        let inbox = &self.inboxes[self.index];
        let _ = inbox.wake.read();
        for mut frame in inbox.take() {
            if let Outcome::Answer(answer) = self.datapath.handle(&mut frame, Origin::Handoff) {
                self.rx
                    .push_copy(&answer, OutHdr::Plain, self.datapath.counters());
            }
        }
    }
}
