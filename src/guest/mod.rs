//! The simulated guest: a vhost-user frontend with a minimal virtio-net driver.
//!
//! It connects to moat's real socket (or accepts moat's connection in `--client` mode),
//! hands over memfd-backed guest memory, drives the RX and TX split virtqueues as a guest
//! kernel would (EVENT_IDX and MRG_RXBUF aware), and exposes `send_frame` / `recv_frame`.
//! It can also post malformed descriptor chains, for the security tests. It lives in the
//! library because integration tests, the canary and the benchmarks all drive moat with it.

mod memory;
mod net;
mod ring;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::frame::virtio_hdr::VIRTIO_NET_HDR_LEN;
use memory::{GuestMemory, GPA_BASE};
pub use net::GuestNet;
use ring::SplitRing;
pub use ring::{RawDesc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

const RX: usize = 0;
const TX: usize = 1;
/// Bytes reserved per TX slot (header + frame).
const TX_SLOT: u64 = 16 * 1024;
/// How long `connect` keeps trying while moat's socket does not exist yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("vhost-user: {0}")]
    Protocol(#[from] vhost::Error),
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("frame of {0} bytes does not fit a TX slot")]
    FrameTooLong(usize),
    #[error("no free TX descriptor: the device is not returning them")]
    TxStalled,
}

/// How the simulated guest sets itself up.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    pub queue_size: u16,
    pub mem_size: usize,
    /// Split guest memory into this many regions of the memory table.
    pub regions: usize,
    pub event_idx: bool,
    pub mrg_rxbuf: bool,
    pub rx_buffer_size: u32,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            queue_size: 256,
            mem_size: 8 << 20,
            regions: 1,
            event_idx: true,
            mrg_rxbuf: true,
            rx_buffer_size: 2048,
        }
    }
}

/// A received frame with its virtio-net header.
pub type RxFrame = ([u8; VIRTIO_NET_HDR_LEN], Vec<u8>);

/// What the device's config space says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

/// A guest attached to a vhost-user-net backend.
pub struct SimGuest {
    frontend: Frontend,
    mem: GuestMemory,
    rings: [SplitRing; 2],
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    rx_base: u64,
    rx_buffer_size: u32,
    tx_base: u64,
    tx_free: Vec<u16>,
    /// Head -> descriptors of chains the device still holds.
    tx_inflight: HashMap<u16, Vec<u16>>,
    tx_completed: u64,
}

impl SimGuest {
    /// Connect to a backend listening on `socket` (`moat serve`), waiting for it to appear.
    pub fn connect(socket: &Path, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(GuestError::Connect {
                        path: socket.display().to_string(),
                        source,
                    })
                }
            }
        };
        SimGuest::attach(stream, opts)
    }

    /// Accept a backend that dials in (`moat serve --client`).
    pub fn accept(listener: &UnixListener, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let (stream, _) = listener.accept().map_err(|source| GuestError::Connect {
            path: "listener".into(),
            source,
        })?;
        SimGuest::attach(stream, opts)
    }

    fn attach(stream: UnixStream, opts: GuestOptions) -> Result<SimGuest, GuestError> {
        let mut frontend = Frontend::from_stream(stream, 2);
        let qsize = opts.queue_size;
        let ring_bytes = SplitRing::footprint(qsize);
        let rx_base = GPA_BASE + 2 * ring_bytes;
        let tx_base = rx_base + u64::from(qsize) * u64::from(opts.rx_buffer_size);
        let needed = (tx_base + u64::from(qsize) * TX_SLOT - GPA_BASE) as usize;
        let mem = GuestMemory::new(opts.mem_size.max(needed), opts.regions)?;

        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut wanted = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.mrg_rxbuf {
            wanted |= 1 << VIRTIO_NET_F_MRG_RXBUF;
        }
        if opts.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & wanted;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = frontend.get_protocol_features()?;
            protocol_features =
                pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
            frontend.set_protocol_features(protocol_features)?;
        }
        frontend.set_features(features)?;
        frontend.set_mem_table(&mem.regions())?;

        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let rings = [
            SplitRing::new(GPA_BASE, qsize, event_idx),
            SplitRing::new(GPA_BASE + ring_bytes, qsize, event_idx),
        ];
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(GuestError::EventFd);
        let kicks = [eventfd()?, eventfd()?];
        let calls = [eventfd()?, eventfd()?];
        let mut guest = SimGuest {
            frontend,
            mem,
            rings,
            kicks,
            calls,
            features,
            protocol_features,
            rx_base,
            rx_buffer_size: opts.rx_buffer_size,
            tx_base,
            tx_free: (0..qsize).rev().collect(),
            tx_inflight: HashMap::new(),
            tx_completed: 0,
        };
        // Post every RX buffer before the device starts, as a driver does at probe time.
        for i in 0..qsize {
            guest.post_rx(i);
        }
        for q in [RX, TX] {
            let ring = &guest.rings[q];
            guest.frontend.set_vring_num(q, qsize)?;
            guest.frontend.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: qsize,
                    queue_size: qsize,
                    flags: 0,
                    desc_table_addr: guest.mem.va(ring.desc),
                    used_ring_addr: guest.mem.va(ring.used),
                    avail_ring_addr: guest.mem.va(ring.avail),
                    log_addr: None,
                },
            )?;
            guest.frontend.set_vring_base(q, 0)?;
            guest.frontend.set_vring_call(q, &guest.calls[q])?;
            guest.frontend.set_vring_kick(q, &guest.kicks[q])?;
        }
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for q in [RX, TX] {
                guest.frontend.set_vring_enable(q, true)?;
            }
        }
        guest.kick(RX);
        Ok(guest)
    }

    /// The device's config space (needs the CONFIG protocol feature).
    pub fn config(&mut self) -> Result<NetConfig, GuestError> {
        let (_, bytes) =
            self.frontend
                .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])?;
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

    pub fn negotiated_features(&self) -> u64 {
        self.features
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    fn kick(&self, q: usize) {
        let _ = self.kicks[q].write(1);
    }

    fn post_rx(&mut self, i: u16) -> bool {
        let desc = RawDesc {
            addr: self.rx_base + u64::from(i) * u64::from(self.rx_buffer_size),
            len: self.rx_buffer_size,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        };
        self.rings[RX].write_desc(&self.mem, i, desc);
        self.rings[RX].publish(&self.mem, i)
    }

    /// Send a frame with an all-zero virtio-net header.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), GuestError> {
        self.send_frame_with_hdr(&[0u8; VIRTIO_NET_HDR_LEN], frame)
    }

    /// Send a frame behind the given virtio-net header, in one descriptor.
    pub fn send_frame_with_hdr(
        &mut self,
        hdr: &[u8; VIRTIO_NET_HDR_LEN],
        frame: &[u8],
    ) -> Result<(), GuestError> {
        let total = VIRTIO_NET_HDR_LEN + frame.len();
        if total as u64 > TX_SLOT {
            return Err(GuestError::FrameTooLong(frame.len()));
        }
        let id = self.take_tx_descs(1)?[0];
        let addr = self.tx_base + u64::from(id) * TX_SLOT;
        self.mem.write(addr, hdr);
        self.mem.write(addr + VIRTIO_NET_HDR_LEN as u64, frame);
        self.rings[TX].write_desc(
            &self.mem,
            id,
            RawDesc {
                addr,
                len: total as u32,
                flags: 0,
                next: 0,
            },
        );
        self.tx_inflight.insert(id, vec![id]);
        if self.rings[TX].publish(&self.mem, id) {
            self.kick(TX);
        }
        Ok(())
    }

    /// Post an arbitrary (possibly malformed) chain on TX. Descriptors go into free slots in
    /// order; a `next` below the chain's length names a descriptor of this chain (relative),
    /// anything else is written verbatim (out of range, or a loop on purpose).
    pub fn send_raw_chain(&mut self, chain: &[RawDesc]) -> Result<(), GuestError> {
        let ids = self.take_tx_descs(chain.len().max(1))?;
        for (i, d) in chain.iter().enumerate() {
            let next = ids.get(usize::from(d.next)).copied().unwrap_or(d.next);
            self.rings[TX].write_desc(&self.mem, ids[i], RawDesc { next, ..*d });
        }
        let head = ids[0];
        self.tx_inflight.insert(head, ids);
        self.rings[TX].publish(&self.mem, head);
        self.kick(TX);
        Ok(())
    }

    /// Take `n` free TX descriptors, reclaiming used ones (and waiting a little) if needed.
    fn take_tx_descs(&mut self, n: usize) -> Result<Vec<u16>, GuestError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            self.reclaim_tx();
            if self.tx_free.len() >= n {
                let at = self.tx_free.len() - n;
                let mut ids = self.tx_free.split_off(at);
                ids.reverse();
                return Ok(ids);
            }
            if Instant::now() > deadline {
                return Err(GuestError::TxStalled);
            }
            self.kick(TX);
            let _ = wait_readable(&self.calls[TX], Duration::from_millis(10));
        }
    }

    fn reclaim_tx(&mut self) {
        let _ = self.calls[TX].read();
        while let Some((head, _)) = self.rings[TX].pop_used(&self.mem) {
            if let Some(ids) = self.tx_inflight.remove(&head) {
                self.tx_free.extend(ids);
            }
            self.tx_completed += 1;
        }
    }

    /// TX chains the device has returned so far.
    pub fn tx_completed(&mut self) -> u64 {
        self.reclaim_tx();
        self.tx_completed
    }

    /// Receive one frame (virtio-net header stripped), waiting up to `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, GuestError> {
        Ok(self.recv_frame_with_hdr(timeout)?.map(|(_, f)| f))
    }

    /// Receive one frame and its virtio-net header, assembling MRG_RXBUF buffers.
    pub fn recv_frame_with_hdr(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<RxFrame>, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(first) = self.rings[RX].pop_used(&self.mem) {
                let mut data = self.read_rx(first);
                let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
                let n = data.len().min(VIRTIO_NET_HDR_LEN);
                hdr[..n].copy_from_slice(&data[..n]);
                let mrg = self.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
                let buffers = if mrg {
                    u16::from_le_bytes([hdr[10], hdr[11]]).max(1)
                } else {
                    1
                };
                for _ in 1..buffers {
                    let more = loop {
                        if let Some(u) = self.rings[RX].pop_used(&self.mem) {
                            break u;
                        }
                        if Instant::now() > deadline {
                            return Ok(None);
                        }
                        wait_readable(&self.calls[RX], Duration::from_millis(5));
                    };
                    data.extend(self.read_rx(more));
                }
                let frame = data.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default().to_vec();
                return Ok(Some((hdr, frame)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            wait_readable(&self.calls[RX], left.min(Duration::from_millis(50)));
            let _ = self.calls[RX].read();
        }
    }

    /// Copy one used RX buffer out and give it back to the device.
    fn read_rx(&mut self, (id, len): (u16, u32)) -> Vec<u8> {
        let len = len.min(self.rx_buffer_size) as usize;
        let mut buf = vec![0u8; len];
        self.mem.read(
            self.rx_base + u64::from(id) * u64::from(self.rx_buffer_size),
            &mut buf,
        );
        if self.post_rx(id) {
            self.kick(RX);
        }
        buf
    }

    /// Write into guest memory (to build raw chains or indirect tables).
    pub fn write_guest_mem(&mut self, gpa: u64, data: &[u8]) {
        self.mem.write(gpa, data);
    }

    /// (guest-physical address, length) of each memory region.
    pub fn guest_mem_layout(&self) -> Vec<(u64, usize)> {
        self.mem.layout()
    }

    /// A scratch area of guest memory that the rings and buffers do not use.
    pub fn scratch_gpa(&self) -> u64 {
        let used_end = self.tx_base + u64::from(self.rings[TX].size) * TX_SLOT;
        assert!(
            used_end < GPA_BASE + self.mem.len() as u64,
            "no scratch space left"
        );
        used_end
    }

    /// Close the connection, as a VMM that goes away.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// Wait until the eventfd is readable or the timeout passes.
fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}
