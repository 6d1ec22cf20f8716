//! The simulated guest: a vhost-user frontend with a minimal virtio-net driver.
//!
//! It connects to a vhost-user-net backend (moat's socket, or accepts moat's connection in
//! `--client` mode), hands over memfd-backed guest memory, drives the RX and TX split
//! virtqueues as a guest kernel would (EVENT_IDX and MRG_RXBUF aware), and exposes
//! `send_frame` / `recv_frame` (and [`SimGuest::recv_until`], receiving until a frame
//! matches). It can also post malformed descriptor chains, for the security tests.
//! Integration tests, the canary and the benchmarks all drive moat with it, so it depends
//! on nothing dev-only.
//!
//! With [`GuestOptions::queue_pairs`] above 1 it negotiates VIRTIO_NET_F_MQ and drives one
//! RX/TX pair per queue pair (vring `2i` is RX of pair `i`, `2i + 1` its TX): sends go out on
//! the pair chosen with [`SimGuest::set_tx_pair`], receives take frames from every pair.
//!
//! Guest memory (guest-physical addresses from [`GPA_BASE`]), for `N` queue pairs:
//!
//! ```text
//! RX ring 0 | TX ring 0 | ... | RX ring N-1 | TX ring N-1
//!   | pair 0: RX buffers (queue_size x rx_buffer_size) | TX slots (queue_size x 16 KiB)
//!   | ...
//!   | pair N-1: RX buffers | TX slots
//!   | scratch
//! ```
//!
//! (With one pair: RX ring, TX ring, RX buffers, TX slots, scratch.) In each pair, RX
//! descriptor `i` always points at RX buffer `i`; TX descriptor `i` at TX slot `i`.

mod frontend;
mod memory;
mod net;
mod ring;
mod rx;
mod tx;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::wire::VIRTIO_NET_HDR_LEN;
use frontend::{Negotiated, Watchdog};
pub use memory::GuestMemWriter;
use memory::GuestMemory;
pub use memory::GPA_BASE;
pub use net::{tcp_drain, DnsReply, GuestNet, ResponseCode};
use ring::SplitRing;
pub use ring::{RawDesc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

const RX: usize = 0;
const TX: usize = 1;
/// Bytes behind each TX descriptor; a longer frame takes several chained descriptors.
pub const TX_SLOT: usize = 16 * 1024;
/// Guest memory kept free for tests after the rings and buffers (see [`SimGuest::scratch_gpa`]).
const MIN_SCRATCH: u64 = 64 * 1024;
/// Most queue pairs a guest may ask for (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
const MAX_QUEUE_PAIRS: u16 = 0x8000;
/// How long a send waits for the device to return TX descriptors when all are in flight.
const TX_PATIENCE: Duration = Duration::from_secs(2);
/// A frame being assembled is handed over once this long, whatever `num_buffers` claimed
/// (a GSO frame is at most 64 KiB plus header; this only bounds a confused device).
const MAX_RX_FRAME: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("vhost-user socket: {0}")]
    Socket(std::io::Error),
    #[error("vhost-user: {0}")]
    Protocol(#[from] vhost::Error),
    #[error("the backend did not answer within {0:?} (connection shut down)")]
    Timeout(Duration),
    #[error("backend unusable: {0}")]
    Unsupported(&'static str),
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("frame of {0} bytes needs more TX descriptors than the queue has")]
    FrameTooLong(usize),
    #[error("a chain of {len} descriptors cannot be posted on a queue of {queue_size}")]
    ChainLength { len: usize, queue_size: u16 },
    #[error("no free TX descriptor: the device is not returning them")]
    TxStalled,
    /// The gateway's DNS sent nothing back (neither an answer nor an error code).
    #[error("no DNS reply for {name} within {after:?}")]
    DnsTimeout { name: String, after: Duration },
    /// A query that cannot be built, or a reply that is not the answer to it (wrong ID,
    /// question, source or no DNS message at all).
    #[error("DNS: {0}")]
    Dns(String),
}

/// How the simulated guest sets itself up.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// Entries per virtqueue (every queue).
    pub queue_size: u16,
    /// RX/TX queue pairs. Above 1, VIRTIO_NET_F_MQ (and the MQ protocol feature) must be
    /// offered and GET_QUEUE_NUM must report at least `2 * queue_pairs` queues.
    pub queue_pairs: u16,
    /// Guest memory; grown if the rings and buffers need more (plus 64 KiB of scratch).
    pub mem_size: usize,
    /// Split guest memory into this many equal regions of the memory table (contiguous
    /// guest-physical addresses, separate mappings on the backend's side).
    pub regions: usize,
    /// Ask for VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Ask for VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Bytes per RX buffer (one descriptor each).
    pub rx_buffer_size: u32,
    /// Ack every virtio feature the backend offers (offloads included, as QEMU passes them
    /// to a guest that takes them), except those that change the ring or header layout this
    /// driver speaks (packed ring, IN_ORDER, NOTIFICATION_DATA, ACCESS_PLATFORM,
    /// HASH_REPORT, LOG_ALL). `event_idx` and `mrg_rxbuf` still decide those two bits.
    pub ack_all_offered: bool,
    /// Ack the checksum and TCPv4 segmentation offloads (CSUM, GUEST_CSUM, HOST_TSO4,
    /// GUEST_TSO4) when offered: `GuestNet` then sends and takes 64 KiB TCP segments.
    pub offloads: bool,
    /// How long `connect` retries while the socket is missing, and `accept` waits.
    pub connect_timeout: Duration,
    /// How long one vhost-user request waits for the backend's answer (a backend that
    /// stops answering fails the call instead of hanging the guest; zero waits forever).
    pub reply_timeout: Duration,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            queue_size: 256,
            queue_pairs: 1,
            mem_size: 8 << 20,
            regions: 1,
            event_idx: true,
            mrg_rxbuf: true,
            rx_buffer_size: 2048,
            ack_all_offered: false,
            offloads: false,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
        }
    }
}

/// A received frame with its virtio-net header.
pub type RxFrame = ([u8; VIRTIO_NET_HDR_LEN], Vec<u8>);

/// What the device's config space says (`struct virtio_net_config` up to `mtu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

/// A frame being assembled from several used RX buffers (MRG_RXBUF).
struct PartialRx {
    data: Vec<u8>,
    buffers_left: u16,
}

/// One RX/TX queue pair: its rings (indexed by [`RX`] and [`TX`]), eventfds, buffers and
/// the driver's bookkeeping for it.
struct QueuePair {
    rings: [SplitRing; 2],
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    /// First RX buffer (buffer `i` at `rx_base + i * rx_buffer_size`).
    rx_base: u64,
    rx_partial: Option<PartialRx>,
    /// Complete frames received on this pair's RX queue.
    rx_frames: u64,
    /// First TX slot (slot `i` at `tx_base + i * TX_SLOT`).
    tx_base: u64,
    tx_free: Vec<u16>,
    /// Head -> descriptors of chains the device still holds.
    tx_inflight: HashMap<u16, Vec<u16>>,
    tx_completed: u64,
    tx_posted: u64,
    /// Length each RX descriptor is posted with (at most the buffer's size; a hostile guest
    /// posts less, down to zero: [`SimGuest::set_rx_buffer_len`]).
    rx_post_len: u32,
}

impl QueuePair {
    fn kick(&self, q: usize) {
        // Only fails if the counter would overflow, and then the device is signalled anyway.
        let _ = self.kicks[q].write(1);
    }

    /// TX chains (used elements) the device has returned on this pair so far.
    fn tx_completed(&self, mem: &GuestMemory) -> u64 {
        self.tx_completed + u64::from(self.rings[TX].pending_used(mem))
    }
}

/// A guest attached to a vhost-user-net backend.
pub struct SimGuest {
    frontend: Frontend,
    /// The same connection, for the watchdog and for hanging up.
    socket: UnixStream,
    reply_timeout: Duration,
    mem: GuestMemory,
    negotiated: Negotiated,
    rx_buffer_size: u32,
    /// Queue pair `i` drives vrings `2i` (RX) and `2i + 1` (TX).
    pairs: Vec<QueuePair>,
    /// The pair every send goes out on.
    active_tx: usize,
    /// The pair whose RX queue is looked at first by the next receive (round-robin).
    rx_next: usize,
    /// Start of the memory no ring or buffer uses.
    scratch: u64,
    /// The longest frame received so far (without its virtio-net header).
    largest_rx: usize,
}

impl SimGuest {
    /// Connect to a backend listening on `socket` (`moat serve`), retrying for up to
    /// `opts.connect_timeout` while the socket does not exist yet.
    pub fn connect(socket: &Path, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let stream = frontend::dial(socket, opts.connect_timeout)?;
        SimGuest::attach(stream, opts)
    }

    /// Accept a backend that dials in (`moat serve --client`), waiting up to
    /// `opts.connect_timeout`.
    pub fn accept(listener: &UnixListener, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let stream = frontend::answer(listener, opts.connect_timeout)?;
        SimGuest::attach(stream, opts)
    }

    /// Bring the device up over a connected stream, within `opts.reply_timeout`.
    fn attach(stream: UnixStream, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let socket = stream.try_clone().map_err(GuestError::Socket)?;
        let watchdog = Watchdog::arm(&socket, opts.reply_timeout)?;
        let guest = SimGuest::bring_up(stream, socket, &opts);
        if watchdog.disarm() {
            return Err(GuestError::Timeout(opts.reply_timeout));
        }
        guest
    }

    /// The message sequence QEMU sends, then RX buffers posted and the device kicked.
    fn bring_up(
        stream: UnixStream,
        socket: UnixStream,
        opts: &GuestOptions,
    ) -> Result<SimGuest, GuestError> {
        let qsize = opts.queue_size;
        if qsize == 0 || !qsize.is_power_of_two() || qsize > 32768 {
            return Err(GuestError::Unsupported(
                "queue_size must be a power of two up to 32768",
            ));
        }
        if opts.rx_buffer_size == 0 {
            return Err(GuestError::Unsupported("rx_buffer_size must not be 0"));
        }
        if opts.queue_pairs == 0 || opts.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(GuestError::Unsupported(
                "queue_pairs must be between 1 and 32768",
            ));
        }
        let npairs = u64::from(opts.queue_pairs);
        let ring_bytes = SplitRing::footprint(qsize);
        let rx_bytes = u64::from(qsize) * u64::from(opts.rx_buffer_size);
        let tx_bytes = u64::from(qsize) * TX_SLOT as u64;
        let buffers = GPA_BASE + 2 * npairs * ring_bytes;
        let pair_bytes = rx_bytes + tx_bytes;
        let scratch = buffers + npairs * pair_bytes;
        let needed = usize::try_from(scratch + MIN_SCRATCH - GPA_BASE)
            .map_err(|_| GuestError::Unsupported("guest memory layout too large"))?;
        let mem = GuestMemory::new(opts.mem_size.max(needed), opts.regions)?;

        let num_queues = frontend::num_queues(opts);
        let mut frontend = Frontend::from_stream(stream, num_queues);
        let negotiated = frontend::negotiate(&mut frontend, &mem, opts)?;
        let event_idx = negotiated.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(GuestError::EventFd);
        let mut pairs = Vec::with_capacity(usize::from(opts.queue_pairs));
        for p in 0..npairs {
            let rings_at = GPA_BASE + 2 * p * ring_bytes;
            let rx_base = buffers + p * pair_bytes;
            pairs.push(QueuePair {
                rings: [
                    SplitRing::new(rings_at, qsize, event_idx),
                    SplitRing::new(rings_at + ring_bytes, qsize, event_idx),
                ],
                kicks: [eventfd()?, eventfd()?],
                calls: [eventfd()?, eventfd()?],
                rx_base,
                rx_partial: None,
                rx_frames: 0,
                tx_base: rx_base + rx_bytes,
                tx_free: (0..qsize).rev().collect(),
                tx_inflight: HashMap::new(),
                tx_completed: 0,
                tx_posted: 0,
                rx_post_len: opts.rx_buffer_size,
            });
        }
        let mut guest = SimGuest {
            frontend,
            socket,
            reply_timeout: opts.reply_timeout,
            mem,
            negotiated,
            rx_buffer_size: opts.rx_buffer_size,
            pairs,
            active_tx: 0,
            rx_next: 0,
            scratch,
            largest_rx: 0,
        };
        // Post every RX buffer before the device starts, as a driver does at probe time.
        for p in 0..guest.pairs.len() {
            for i in 0..qsize {
                guest.post_rx(p, i);
            }
        }
        for (p, pair) in guest.pairs.iter().enumerate() {
            for q in [RX, TX] {
                frontend::setup_vring(
                    &mut guest.frontend,
                    &guest.mem,
                    2 * p + q,
                    &pair.rings[q],
                    &pair.calls[q],
                    &pair.kicks[q],
                )?;
            }
        }
        frontend::enable_vrings(
            &mut guest.frontend,
            guest.negotiated.features,
            2 * guest.pairs.len(),
        )?;
        for pair in &guest.pairs {
            pair.kick(RX);
        }
        Ok(guest)
    }

    /// Number of RX/TX queue pairs this guest drives ([`GuestOptions::queue_pairs`]).
    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Send every later frame (and raw chain) on the TX queue of queue pair `pair`; the
    /// TX-side accessors (`scratch_gpa` aside) then speak of that pair too.
    ///
    /// # Panics
    /// If `pair` is not below [`SimGuest::queue_pairs`] (a bug in the caller).
    pub fn set_tx_pair(&mut self, pair: usize) {
        assert!(
            pair < self.pairs.len(),
            "TX pair {pair} out of range: the guest has {} queue pairs",
            self.pairs.len()
        );
        self.active_tx = pair;
    }

    /// Complete frames received so far on each queue pair's RX queue, by pair.
    pub fn rx_frames_per_pair(&self) -> Vec<u64> {
        self.pairs.iter().map(|p| p.rx_frames).collect()
    }

    /// The device's config space, read with GET_CONFIG (needs the CONFIG protocol feature).
    pub fn config(&self) -> Result<NetConfig, GuestError> {
        // `Frontend` is a shared handle (Arc<Mutex<..>>) whose requests take `&mut self`.
        let mut frontend = self.frontend.clone();
        let watchdog = Watchdog::arm(&self.socket, self.reply_timeout)?;
        let reply = frontend.get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12]);
        if watchdog.disarm() {
            return Err(GuestError::Timeout(self.reply_timeout));
        }
        let (_, bytes) = reply?;
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[..6]);
        Ok(NetConfig {
            mac,
            status: u16_at(6),
            max_virtqueue_pairs: u16_at(8),
            mtu: u16_at(10),
        })
    }

    /// The virtio feature bits acked with SET_FEATURES.
    pub fn negotiated_features(&self) -> u64 {
        self.negotiated.features
    }

    /// The vhost-user protocol features acked with SET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.negotiated.protocol_features
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.negotiated.features & (1 << bit) != 0
    }

    /// Write into guest memory (to build raw chains or indirect tables).
    ///
    /// # Panics
    /// If `[gpa, gpa + data.len())` is not inside guest memory (a bug in the caller).
    pub fn write_guest_mem(&mut self, gpa: u64, data: &[u8]) {
        self.mem.write(gpa, data);
    }

    /// Read guest memory.
    ///
    /// # Panics
    /// If `[gpa, gpa + out.len())` is not inside guest memory.
    pub fn read_guest_mem(&self, gpa: u64, out: &mut [u8]) {
        self.mem.read(gpa, out);
    }

    /// A writer over guest memory that another thread can use while this guest keeps
    /// running (its own mapping of the same memory): to rewrite a posted buffer under the
    /// device, as a hostile guest's other vCPU would.
    pub fn guest_mem_writer(&self) -> Result<GuestMemWriter, GuestError> {
        self.mem.writer()
    }

    /// (guest-physical address, length) of each memory region, in address order.
    pub fn guest_mem_layout(&self) -> Vec<(u64, usize)> {
        self.mem.layout()
    }

    /// The longest frame received so far, in bytes without the virtio-net header (every
    /// frame, also those a [`GuestNet`] took in).
    pub fn largest_rx_frame(&self) -> usize {
        self.largest_rx
    }

    /// Start of guest memory the rings and buffers (of every pair) do not use (at least
    /// 64 KiB, up to the end of guest memory), for raw chains and indirect tables.
    pub fn scratch_gpa(&self) -> u64 {
        self.scratch
    }

    /// Close the connection, as a VMM that goes away.
    pub fn disconnect(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        drop(self);
    }
}

/// Wait until one of the eventfds is readable or the timeout passes.
fn wait_any(fds: &[&EventFd], timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds.len()` valid pollfds, alive for the duration of the call.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) > 0 }
}
