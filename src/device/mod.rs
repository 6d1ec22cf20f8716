//! The vhost-user-net device: a thin `VhostUserBackendMut` over the data path.
//!
//! The transport (vhost-user messages, memory table, vring setup, epoll worker) is
//! rust-vmm's vhost-user-backend; this module only says what the device offers and moves
//! frames between the queues and [`Datapath`].

pub mod config;
pub mod pacer;
pub mod queues;
pub mod server;

use crate::frame::virtio_hdr::{Offloads, OutHdr};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::datapath::Datapath;
use crate::egress::Registrar;
use crate::policy::Policy;
use crate::services::dns::NamePool;
use crate::telemetry::{Counters, DropReason, Traffic};
use config::{RX_QUEUE, TX_QUEUE};
use queues::{read_tx_chain, ChainError, RxQueue};

/// The device state of one frontend connection. A new one is made for every connection,
/// so a reconnecting VMM always starts from a reset device.
pub struct NetDevice {
    config_space: [u8; 12],
    datapath: Datapath,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    acked_features: u64,
    event_idx: bool,
    rx: RxQueue,
    /// Reused TX copy buffer: no allocation per frame.
    tx_buf: Vec<u8>,
    /// Wakes the event loop when the stack's timers are due.
    timer: Option<TimerFd>,
    /// `limits.egress_bps`: paces the TX queue (guest -> moat).
    egress: Option<pacer::Pacer>,
    /// TX descriptors wait for the egress bucket.
    tx_paused: bool,
    /// Every log line of this device carries the VM's name.
    span: tracing::Span,
}

/// Registers proxy sockets with the vring worker's epoll: one loop for kicks, sockets, timer.
struct EpollRegistrar(Arc<VringEpollHandler<Arc<Mutex<NetDevice>>>>);

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

/// Event id of the stack's timer (ids up to NUM_QUEUES belong to the vring worker itself).
pub const TIMER_EVENT: u16 = 3;

/// Hook the device into its connection's event loop (proxy sockets, timer).
pub fn attach(
    device: &Arc<Mutex<NetDevice>>,
    handler: Arc<VringEpollHandler<Arc<Mutex<NetDevice>>>>,
) -> io::Result<()> {
    let timer = TimerFd::new()?;
    // Non-blocking: re-arming clears a pending expiry, so a read after epoll said "ready"
    // may find nothing; a blocking read would then stall the whole queue until the next
    // expiry (seen: 1 s stalls on connection setup).
    // SAFETY: fcntl on a descriptor we own, with flags that only change blocking mode.
    let set = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    handler.register_listener(timer.as_raw_fd(), EventSet::IN, u64::from(TIMER_EVENT))?;
    let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
    dev.timer = Some(timer);
    dev.datapath
        .flows()
        .attach(Box::new(EpollRegistrar(handler)));
    Ok(())
}

/// Undo [`attach`] when the connection ends (breaks the device <-> loop reference cycle).
pub fn detach(device: &Arc<Mutex<NetDevice>>) {
    let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
    dev.datapath.flows().detach();
    dev.timer = None;
}

impl NetDevice {
    pub fn new(
        policy: Arc<Policy>,
        names: Arc<Mutex<NamePool>>,
        counters: Arc<Counters>,
    ) -> NetDevice {
        NetDevice {
            config_space: config::config_space(&policy.vm),
            egress: pacer::Pacer::new(policy.limits.egress_bps, policy.limits.burst_bytes),
            rx: RxQueue::paced(pacer::Pacer::new(
                policy.limits.ingress_bps,
                policy.limits.burst_bytes,
            )),
            span: tracing::info_span!("vm", vm = %policy.vm.name),
            datapath: Datapath::new(policy, names, counters),
            timer: None,
            tx_paused: false,
            mem: None,
            acked_features: 0,
            event_idx: false,
            tx_buf: Vec::with_capacity(2048),
        }
    }

    /// Swap in a reloaded policy (same VM identity); returns how many flows were reset.
    pub fn reload(&mut self, policy: Arc<Policy>) -> usize {
        let (old, new) = (&self.datapath.flows().policy().limits, &policy.limits);
        if (old.egress_bps, old.ingress_bps, old.burst_bytes)
            != (new.egress_bps, new.ingress_bps, new.burst_bytes)
        {
            // New limits apply at once, from a full bucket.
            self.egress = pacer::Pacer::new(new.egress_bps, new.burst_bytes);
            self.rx
                .set_pacer(pacer::Pacer::new(new.ingress_bps, new.burst_bytes));
        }
        let reset = self.datapath.reload(policy);
        // Wake the queue's loop at once so the resets reach the guest and the proxies.
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.reset(Duration::from_micros(100), None);
        }
        reset
    }

    /// Forwards added at run time, on top of the policy's.
    pub fn set_runtime_forwards(&mut self, forwards: Vec<crate::policy::Forward>) {
        self.datapath.flows().set_runtime_forwards(forwards);
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.reset(Duration::from_micros(100), None);
        }
    }

    /// The flows of this connection, for `moat stats`.
    pub fn flow_table(&mut self) -> Vec<crate::control::FlowRow> {
        self.datapath.flows().table()
    }

    /// Wake up when the stack next needs attention (retransmits, handshake deadlines).
    fn arm_timer(&mut self) {
        let mut delay = self.datapath.flows().poll_delay();
        for wait in [
            self.egress
                .as_mut()
                .filter(|_| self.tx_paused)
                .map(|p| p.wait()),
            self.rx.pacing_delay(),
        ]
        .into_iter()
        .flatten()
        {
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

    fn mrg_rxbuf(&self) -> bool {
        config::has_feature(self.acked_features, VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Drain the TX queue: one copy per chain, one verdict per frame, one used-ring
    /// notification per batch.
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
            if let Some(pacer) = self.egress.as_mut() {
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
            if let Some(pacer) = self.egress.as_mut() {
                pacer.spend(self.tx_buf.len());
            }
            match read {
                Ok(_) => {
                    if let Some(answer) = self.datapath.guest_frame(&mut self.tx_buf) {
                        self.rx
                            .push_copy(&answer, OutHdr::Plain, self.datapath.counters());
                    }
                }
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
        Ok(())
    }

    /// Run `work` until the queue has nothing new, re-enabling notifications with EVENT_IDX
    /// the way the virtio spec asks (disable, drain, enable, re-check).
    fn drain<F>(&mut self, vring: &VringRwLock, mut work: F) -> io::Result<()>
    where
        F: FnMut(&mut Self) -> io::Result<()>,
    {
        if !self.event_idx {
            return work(self);
        }
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            work(self)?;
            if self.tx_paused {
                // Paced: the timer resumes; no kick is needed meanwhile.
                return Ok(());
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackendMut for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        config::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        config::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::virtio_features()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked_features = features;
        self.datapath
            .set_offloads(Offloads::from_features(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn reset_device(&mut self) {
        self.rx.clear();
        self.acked_features = 0;
        self.datapath.set_offloads(Offloads::default());
        self.event_idx = false;
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::read_config(&self.config_space, offset, size)
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let [rx_vring, tx_vring] = vrings else {
            return Err(io::Error::other("expected exactly one rx and one tx queue"));
        };
        let counters = Arc::clone(self.datapath.counters());
        let span = self.span.clone();
        let _in_vm = span.enter();
        tracing::trace!(device_event, ?evset, "event");
        match device_event {
            RX_QUEUE => counters.add(Traffic::RxKicks, 1),
            TX_QUEUE => {
                counters.add(Traffic::TxKicks, 1);
                let m = mem.clone();
                self.drain(tx_vring, |dev| dev.process_tx(tx_vring, &m))?;
            }
            TIMER_EVENT => {
                if let Some(timer) = self.timer.as_mut() {
                    let _ = timer.wait();
                }
                if self.tx_paused {
                    // The egress bucket has refilled: carry on draining TX.
                    let m = mem.clone();
                    self.drain(tx_vring, |dev| dev.process_tx(tx_vring, &m))?;
                }
            }
            token => self.datapath.flows().host_event(u64::from(token), evset),
        }
        let rx = &mut self.rx;
        self.datapath
            .pump(|frame, hdr| rx.push(frame, hdr, &counters));
        self.arm_timer();
        let mrg = self.mrg_rxbuf();
        self.rx.flush(rx_vring, &mem, mrg, &counters)
    }
}
