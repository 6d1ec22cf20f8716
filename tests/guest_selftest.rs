//! Self-test of the simulated guest (`moat_sim::guest`) against a tiny echo backend built here
//! with vhost-user-backend: every frame the guest sends on TX comes back on RX, header and
//! all (`num_buffers` rewritten). This proves the frontend and the split-ring driver on
//! their own, without moat's device: send/recv, MRG_RXBUF, EVENT_IDX (and its absence),
//! ring index wrap-around, multi-region memory, scatter-gather and multi-descriptor TX,
//! reconnect, client mode, feature negotiation, and that malformed chains and silent
//! backends do not hang the guest.

use std::collections::VecDeque;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moat_sim::backend::{read_tx_chain, rx_capacity};
use moat_sim::fixtures::wait_for;
use moat_sim::guest::{
    GuestError, GuestOptions, RawDesc, SimGuest, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

const T: Duration = Duration::from_secs(3);
const HDR: usize = 12;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const RX_Q: u16 = 0;
const TX_Q: u16 = 1;

// ---------------------------------------------------------------------------------------
// The echo backend
// ---------------------------------------------------------------------------------------

fn bit(b: u32) -> u64 {
    1 << b
}

/// What the echo device offers by default: what moat offers.
fn default_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// What the echo device saw, shared with the test.
#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    tx_chains: AtomicU64,
    bad_chains: AtomicU64,
    echoed: AtomicU64,
    rx_dropped: AtomicU64,
    max_buffers: AtomicU64,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    regions: AtomicU64,
}

impl Stats {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

struct Echo {
    features: u64,
    stats: Arc<Stats>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mrg_rxbuf: bool,
    /// Header + frame, waiting for RX buffers.
    pending: VecDeque<Vec<u8>>,
}

fn io_err(e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

impl Echo {
    fn drain_tx(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let mem = self.mem.memory();
        loop {
            vring.disable_notification().map_err(io_err)?;
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                self.stats.tx_chains.fetch_add(1, Ordering::SeqCst);
                match read_tx_chain(chain, &mem) {
                    Some(frame) => self.pending.push_back(frame),
                    None => {
                        self.stats.bad_chains.fetch_add(1, Ordering::SeqCst);
                    }
                }
                vring.add_used(head, 0).map_err(io_err)?;
            }
            if !vring.enable_notification().map_err(io_err)? {
                break;
            }
        }
        if vring.needs_notification().map_err(io_err)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn flush_rx(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let mem = self.mem.memory();
        let mut delivered = false;
        while let Some(need) = self.pending.front().map(Vec::len) {
            let mut chains = Vec::new();
            let mut capacity = 0;
            {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                while capacity < need {
                    let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
                        for _ in 0..chains.len() {
                            queue.go_to_previous_position();
                        }
                        chains.clear();
                        break;
                    };
                    capacity += rx_capacity(&chain);
                    chains.push(chain);
                    if !self.mrg_rxbuf {
                        break;
                    }
                }
            }
            if chains.is_empty() {
                // Ask for a kick when buffers come; if some came meanwhile, go on.
                if vring.enable_notification().map_err(io_err)? {
                    continue;
                }
                break;
            }
            let Some(mut frame) = self.pending.pop_front() else {
                break;
            };
            delivered = true;
            if capacity < frame.len() {
                self.stats.rx_dropped.fetch_add(1, Ordering::SeqCst);
                for c in &chains {
                    vring.add_used(c.head_index(), 0).map_err(io_err)?;
                }
                continue;
            }
            let buffers = chains.len() as u16;
            frame[10..12].copy_from_slice(&buffers.to_le_bytes());
            let mut off = 0;
            for chain in chains {
                let head = chain.head_index();
                let mut written = 0u32;
                for desc in chain.filter(|d| d.is_write_only()) {
                    let n = (desc.len() as usize).min(frame.len() - off);
                    mem.write_slice(&frame[off..off + n], desc.addr())
                        .map_err(io_err)?;
                    off += n;
                    written += n as u32;
                }
                vring.add_used(head, written).map_err(io_err)?;
            }
            self.stats.echoed.fetch_add(1, Ordering::SeqCst);
            self.stats
                .max_buffers
                .fetch_max(u64::from(buffers), Ordering::SeqCst);
        }
        if delivered && vring.needs_notification().map_err(io_err)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for Echo {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&mut self, features: u64) {
        self.mrg_rxbuf = features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.stats.acked_features.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK is added by vhost-user-backend itself.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.stats.event_idx.store(enabled, Ordering::SeqCst);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = MAC.to_vec();
        space.extend_from_slice(&1u16.to_le_bytes()); // status: LINK_UP
        space.extend_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        space.extend_from_slice(&1500u16.to_le_bytes()); // mtu
        let mut out = vec![0u8; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            *b = space.get(offset as usize + i).copied().unwrap_or(0);
        }
        out
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        let regions = mem.memory().num_regions() as u64;
        self.stats.regions.store(regions, Ordering::SeqCst);
        self.mem = mem;
        Ok(())
    }

    /// Without an exit event the daemon's drop waits forever for its vring worker.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        match device_event {
            TX_Q => {
                self.drain_tx(&vrings[usize::from(TX_Q)])?;
                self.flush_rx(&vrings[usize::from(RX_Q)])
            }
            RX_Q => self.flush_rx(&vrings[usize::from(RX_Q)]),
            _ => Ok(()),
        }
    }
}

type Daemon = VhostUserDaemon<Arc<Mutex<Echo>>>;

/// A fresh echo device and daemon: one per connection (vhost-user-backend's workers end
/// with their connection).
fn daemon(features: u64, stats: &Arc<Stats>) -> Daemon {
    let echo = Echo {
        features,
        stats: Arc::clone(stats),
        mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        mrg_rxbuf: false,
        pending: VecDeque::new(),
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    VhostUserDaemon::new("echo".into(), Arc::new(Mutex::new(echo)), mem).expect("echo daemon")
}

/// Serve one connection to its end; a frontend hanging up is a clean end.
fn run_connection(mut daemon: Daemon, stats: &Stats) -> Result<(), String> {
    let res = daemon.wait();
    stats.connections.fetch_add(1, Ordering::SeqCst);
    match res {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// An echo backend listening on a socket in a temp dir, for `connections` frontends in turn.
struct EchoServer {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stats: Arc<Stats>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl EchoServer {
    fn start(connections: usize) -> EchoServer {
        EchoServer::start_with(default_features(), connections, Duration::ZERO)
    }

    /// Offer `features`; bind the socket only after `bind_after`.
    fn start_with(features: u64, connections: usize, bind_after: Duration) -> EchoServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("echo.sock");
        let stats = Arc::new(Stats::default());
        let (path, st) = (socket.clone(), Arc::clone(&stats));
        let thread = std::thread::spawn(move || {
            std::thread::sleep(bind_after);
            let mut listener = Listener::new(&path, true).map_err(|e| e.to_string())?;
            for _ in 0..connections {
                let mut d = daemon(features, &st);
                d.start(&mut listener).map_err(|e| e.to_string())?;
                run_connection(d, &st)?;
            }
            Ok(())
        });
        EchoServer {
            _dir: dir,
            socket,
            stats,
            thread: Some(thread),
        }
    }

    fn guest(&self, opts: GuestOptions) -> SimGuest {
        SimGuest::connect(&self.socket, opts).expect("guest attaches to the echo backend")
    }

    /// Wait for the serving thread to finish its connections.
    fn join(&mut self) {
        let thread = self.thread.take().expect("joined once");
        let deadline = Instant::now() + T;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "echo server did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
        thread
            .join()
            .expect("echo thread")
            .expect("echo served cleanly");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A recognisable Ethernet frame of `len` bytes (at least 60).
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(60);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f
}

fn echo(guest: &mut SimGuest, f: &[u8]) {
    guest.send_frame(f).expect("send");
    let got = guest.recv_frame(T).expect("recv").expect("echo arrives");
    assert_eq!(got.len(), f.len());
    assert!(got == f, "echoed frame differs ({} bytes)", f.len());
}

/// The kit's wait, with this suite's shorter deadline (the echo backend answers at once).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, T, || cond().then_some(()))
}

fn num_buffers(hdr: &[u8; HDR]) -> u16 {
    u16::from_le_bytes([hdr[10], hdr[11]])
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn negotiation_config_and_echo_of_every_frame_size() {
    let mut server = EchoServer::start(1);
    let mut guest = server.guest(GuestOptions::default());

    let want = default_features();
    assert_eq!(guest.negotiated_features(), want, "all of moat's set acked");
    assert_eq!(Stats::get(&server.stats.acked_features), want);
    assert!(server.stats.event_idx.load(Ordering::SeqCst));
    let pf = guest.protocol_features();
    assert!(pf.contains(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    let config = guest.config().expect("GET_CONFIG");
    assert_eq!(config.mac, MAC);
    assert_eq!(config.status, 1);
    assert_eq!(config.max_virtqueue_pairs, 1);
    assert_eq!(config.mtu, 1500);

    let mut sent = 0;
    for (seq, len) in (60..=1514).step_by(7).chain([1514]).enumerate() {
        echo(&mut guest, &frame(seq as u32, len));
        sent += 1;
    }
    eventually("every TX chain returned", || guest.tx_completed() == sent);
    assert_eq!(Stats::get(&server.stats.echoed), sent);
    assert_eq!(Stats::get(&server.stats.bad_chains), 0);

    // Nothing more is coming: a timeout, not an error, and not early.
    let start = Instant::now();
    assert!(guest
        .recv_frame(Duration::from_millis(100))
        .unwrap()
        .is_none());
    assert!(start.elapsed() >= Duration::from_millis(100));
    guest.disconnect();
    server.join();
}

#[test]
fn virtio_net_header_round_trips() {
    let mut server = EchoServer::start(1);
    let mut guest = server.guest(GuestOptions::default());
    // NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16.
    let mut hdr = [0u8; HDR];
    hdr[0] = 1;
    hdr[1] = 1;
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    let f = frame(7, 300);
    guest.send_frame_with_hdr(&hdr, &f).unwrap();
    let (got_hdr, got) = guest.recv_frame_with_hdr(T).unwrap().expect("echo");
    assert_eq!(got_hdr[..10], hdr[..10]);
    assert_eq!(num_buffers(&got_hdr), 1);
    assert_eq!(got, f);
    guest.disconnect();
    server.join();
}

#[test]
fn mrg_rxbuf_frames_span_many_rx_buffers_and_large_frames_many_tx_descriptors() {
    let mut server = EchoServer::start(1);
    let opts = GuestOptions {
        rx_buffer_size: 256,
        ..GuestOptions::default()
    };
    let mut guest = server.guest(opts);
    // 12 + 1514 bytes in 256-byte buffers: 6 of them.
    let f = frame(1, 1514);
    guest.send_frame(&f).unwrap();
    let (hdr, got) = guest.recv_frame_with_hdr(T).unwrap().expect("echo");
    assert_eq!(num_buffers(&hdr), 6);
    assert_eq!(got, f);
    // 40000 bytes: three 16 KiB TX descriptors out, 157 RX buffers back.
    let big = frame(2, 40_000);
    guest.send_frame(&big).unwrap();
    let (hdr, got) = guest.recv_frame_with_hdr(T).unwrap().expect("echo");
    assert_eq!(num_buffers(&hdr), (40_000 + HDR).div_ceil(256) as u16);
    assert!(got == big, "40000-byte frame differs");
    assert_eq!(Stats::get(&server.stats.max_buffers), 157);
    // A frame longer than the whole TX queue is refused up front.
    let huge = vec![0u8; 256 * moat_sim::guest::TX_SLOT];
    assert!(matches!(
        guest.send_frame(&huge),
        Err(GuestError::FrameTooLong(_))
    ));
    // Still working.
    echo(&mut guest, &frame(3, 100));
    guest.disconnect();
    server.join();
}

#[test]
fn scatter_gather_chains_are_read_in_order() {
    let mut server = EchoServer::start(1);
    let mut guest = server.guest(GuestOptions::default());
    let f = frame(9, 1400);
    let segments: Vec<&[u8]> = vec![&f[..14], &f[14..34], &f[34..54], &f[54..]];
    guest.send_frame_sg(&[0u8; HDR], &segments).unwrap();
    assert_eq!(guest.recv_frame(T).unwrap().expect("echo"), f);
    // 64 segments of 20 bytes: a 65-descriptor chain.
    let f = frame(10, 64 * 20);
    let segments: Vec<&[u8]> = f.chunks(20).collect();
    guest.send_frame_sg(&[0u8; HDR], &segments).unwrap();
    assert_eq!(guest.recv_frame(T).unwrap().expect("echo"), f);
    guest.disconnect();
    server.join();
}

/// Small queues and 70 000 frames: both rings' 16-bit indices wrap around, with EVENT_IDX
/// deciding every kick and interrupt. A wrong kick or a lost used element stalls this.
#[test]
fn ring_indices_wrap_around_with_event_idx() {
    let mut server = EchoServer::start(1);
    let opts = GuestOptions {
        queue_size: 8,
        ..GuestOptions::default()
    };
    let mut guest = server.guest(opts);
    let mut seq = 0u32;
    while seq < 70_000 {
        let burst: Vec<Vec<u8>> = (0..6).map(|i| frame(seq + i, 60)).collect();
        for f in &burst {
            guest.send_frame(f).unwrap();
        }
        for f in &burst {
            let got = guest.recv_frame(T).unwrap();
            assert_eq!(got.as_ref(), Some(f), "frame {seq} of a burst");
        }
        seq += 6;
    }
    eventually("all TX returned", || guest.tx_completed() == u64::from(seq));
    guest.disconnect();
    server.join();
}

#[test]
fn without_event_idx_and_mrg_rxbuf() {
    let mut server = EchoServer::start(1);
    let opts = GuestOptions {
        event_idx: false,
        mrg_rxbuf: false,
        queue_size: 16,
        ..GuestOptions::default()
    };
    let mut guest = server.guest(opts);
    let acked = guest.negotiated_features();
    assert_eq!(acked & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    assert_eq!(acked & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    assert!(!server.stats.event_idx.load(Ordering::SeqCst));
    for (seq, len) in (60..=1514).step_by(13).enumerate() {
        let f = frame(seq as u32, len);
        guest.send_frame(&f).unwrap();
        let (hdr, got) = guest.recv_frame_with_hdr(T).unwrap().expect("echo");
        assert_eq!(num_buffers(&hdr), 1);
        assert_eq!(got, f);
    }
    // Wrap the 16-entry rings' indices too, notifications decided by the flags words.
    for seq in 0..66_000u32 / 4 {
        let burst: Vec<Vec<u8>> = (0..4).map(|i| frame(seq * 4 + i, 60)).collect();
        for f in &burst {
            guest.send_frame(f).unwrap();
        }
        for f in &burst {
            assert_eq!(guest.recv_frame(T).unwrap().as_ref(), Some(f));
        }
    }
    guest.disconnect();
    server.join();
}

/// More frames than RX buffers: the device waits for the guest to post buffers again, and
/// the guest's refill kicks (EVENT_IDX avail_event) wake it.
#[test]
fn a_backlog_larger_than_the_rx_queue_drains_in_order() {
    for event_idx in [true, false] {
        let mut server = EchoServer::start(1);
        let opts = GuestOptions {
            queue_size: 16,
            event_idx,
            ..GuestOptions::default()
        };
        let mut guest = server.guest(opts);
        let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(i, 200 + i as usize)).collect();
        for f in &frames {
            guest.send_frame(f).unwrap();
        }
        eventually("all 64 sent frames consumed", || {
            Stats::get(&server.stats.tx_chains) == 64
        });
        for f in &frames {
            assert_eq!(guest.recv_frame(T).unwrap().as_ref(), Some(f));
        }
        assert!(guest
            .recv_frame(Duration::from_millis(50))
            .unwrap()
            .is_none());
        guest.disconnect();
        server.join();
    }
}

#[test]
fn frames_cross_memory_region_boundaries() {
    let mut server = EchoServer::start(1);
    let opts = GuestOptions {
        regions: 4,
        mem_size: 16 << 20,
        ..GuestOptions::default()
    };
    let mut guest = server.guest(opts);
    let layout = guest.guest_mem_layout();
    assert_eq!(layout.len(), 4);
    assert_eq!(Stats::get(&server.stats.regions), 4);
    for pair in layout.windows(2) {
        assert_eq!(
            pair[0].0 + pair[0].1 as u64,
            pair[1].0,
            "contiguous regions"
        );
    }
    // The ordinary data path works across regions (buffers and rings in region 0..1).
    echo(&mut guest, &frame(1, 1514));

    // Two boundaries inside the scratch area.
    let scratch = guest.scratch_gpa();
    let boundaries: Vec<u64> = layout
        .iter()
        .skip(1)
        .map(|r| r.0)
        .filter(|&b| b > scratch + 4096)
        .collect();
    assert!(
        boundaries.len() >= 2,
        "layout {layout:x?}, scratch {scratch:#x}"
    );

    // One descriptor straddling a boundary.
    let f = frame(2, 1000);
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(&f);
    let start = boundaries[0] - 100;
    guest.write_guest_mem(start, &bytes);
    guest
        .send_raw_chain(&[RawDesc {
            addr: start,
            len: bytes.len() as u32,
            flags: 0,
            next: 0,
        }])
        .unwrap();
    assert_eq!(guest.recv_frame(T).unwrap().expect("echo"), f);

    // Three descriptors, each straddling a boundary or in another region.
    let f = frame(3, 1400);
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(&f);
    let parts = [&bytes[..500], &bytes[500..900], &bytes[900..]];
    let addrs = [boundaries[0] - 250, boundaries[1] - 7, boundaries[1] + 8192];
    for (a, p) in addrs.iter().zip(parts) {
        guest.write_guest_mem(*a, p);
    }
    let chain: Vec<RawDesc> = (0..3)
        .map(|i| RawDesc {
            addr: addrs[i],
            len: parts[i].len() as u32,
            flags: if i < 2 { VIRTQ_DESC_F_NEXT } else { 0 },
            next: if i < 2 { i as u16 + 1 } else { 0 },
        })
        .collect();
    guest.send_raw_chain(&chain).unwrap();
    assert_eq!(guest.recv_frame(T).unwrap().expect("echo"), f);
    guest.disconnect();
    server.join();
}

#[test]
fn reconnect_gets_a_fresh_device_each_time() {
    let mut server = EchoServer::start(3);
    for round in 0..3u32 {
        let mut guest = server.guest(GuestOptions::default());
        for i in 0..20 {
            echo(&mut guest, &frame(round * 100 + i, 60 + 50 * i as usize));
        }
        guest.disconnect();
        eventually("the daemon saw the disconnect", || {
            Stats::get(&server.stats.connections) == u64::from(round) + 1
        });
    }
    assert_eq!(Stats::get(&server.stats.echoed), 60);
    server.join();
}

/// `moat serve --client`: the test listens, the backend dials in.
#[test]
fn accept_a_backend_that_dials_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stats = Arc::new(Stats::default());
    let st = Arc::clone(&stats);
    let dial_path = path.to_string_lossy().into_owned();
    let backend = std::thread::spawn(move || {
        let mut d = daemon(default_features(), &st);
        d.start_client(&dial_path).map_err(|e| e.to_string())?;
        run_connection(d, &st)
    });
    let mut guest = SimGuest::accept(&listener, GuestOptions::default()).expect("accept");
    assert_eq!(guest.config().unwrap().mac, MAC);
    for i in 0..10 {
        echo(&mut guest, &frame(i, 1000));
    }
    guest.disconnect();
    eventually("backend finished", || backend.is_finished());
    backend.join().unwrap().expect("backend served cleanly");

    // Nobody dials: accept gives up instead of waiting forever.
    let opts = GuestOptions {
        connect_timeout: Duration::from_millis(200),
        ..GuestOptions::default()
    };
    let start = Instant::now();
    assert!(matches!(
        SimGuest::accept(&listener, opts),
        Err(GuestError::Connect { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn connect_waits_for_the_socket_to_appear_and_gives_up_in_time() {
    let mut server = EchoServer::start_with(default_features(), 1, Duration::from_millis(500));
    let mut guest = server.guest(GuestOptions::default());
    echo(&mut guest, &frame(1, 100));
    guest.disconnect();
    server.join();

    let opts = GuestOptions {
        connect_timeout: Duration::from_millis(200),
        ..GuestOptions::default()
    };
    let start = Instant::now();
    let res = SimGuest::connect(Path::new("/nonexistent/moat.sock"), opts);
    assert!(matches!(res, Err(GuestError::Connect { .. })));
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A backend that accepts and never answers: the handshake fails after `reply_timeout`.
#[test]
fn a_silent_backend_fails_the_handshake_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // The backend holds the connection open, silent, until the guest has given up (or a
    // minute passes: then the guest hung, and the assert below says so).
    let (gave_up, wait) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let _ = wait.recv_timeout(Duration::from_secs(60));
        drop(stream);
    });
    let reply_timeout = Duration::from_millis(300);
    let opts = GuestOptions {
        reply_timeout,
        ..GuestOptions::default()
    };
    let start = Instant::now();
    let res = SimGuest::connect(&path, opts);
    let took = start.elapsed();
    let _ = gave_up.send(());
    // A Timeout (not a closed connection) while the backend still held the line: the
    // guest's own watchdog ended the wait, not the peer; and not before reply_timeout.
    assert!(
        matches!(res, Err(GuestError::Timeout(t)) if t == reply_timeout),
        "{:?}",
        res.err()
    );
    assert!(took >= reply_timeout, "gave up after {took:?}");
    assert!(
        took < Duration::from_secs(60),
        "took {took:?}: the guest waited for the peer to hang up"
    );
    holder.join().unwrap();

    // And a peer that hangs up at once: an error too.
    let path2 = dir.path().join("hangup.sock");
    let listener = UnixListener::bind(&path2).unwrap();
    let closer = std::thread::spawn(move || drop(listener.accept()));
    assert!(SimGuest::connect(&path2, GuestOptions::default()).is_err());
    closer.join().unwrap();
}

#[test]
fn ack_all_offered_takes_offloads_but_not_what_the_driver_cannot_speak() {
    let offloads = bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_CTRL_VQ);
    let cannot = bit(VIRTIO_F_RING_PACKED) | bit(VIRTIO_F_IN_ORDER);
    let offered = default_features() | offloads | cannot;

    let mut server = EchoServer::start_with(offered, 3, Duration::ZERO);
    let plain = server.guest(GuestOptions::default());
    assert_eq!(plain.negotiated_features(), default_features());
    plain.disconnect();

    let opts = GuestOptions {
        ack_all_offered: true,
        ..GuestOptions::default()
    };
    let mut all = server.guest(opts.clone());
    assert_eq!(all.negotiated_features(), default_features() | offloads);
    assert_eq!(
        Stats::get(&server.stats.acked_features),
        all.negotiated_features()
    );
    echo(&mut all, &frame(1, 1514));
    all.disconnect();

    // event_idx / mrg_rxbuf still decide their own bits.
    let opts = GuestOptions {
        event_idx: false,
        mrg_rxbuf: false,
        ..opts
    };
    let mut some = server.guest(opts);
    let acked = some.negotiated_features();
    assert_eq!(
        acked & (bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MRG_RXBUF)),
        0
    );
    assert_eq!(acked & offloads, offloads);
    echo(&mut some, &frame(2, 1514));
    some.disconnect();
    server.join();
}

/// Malformed chains of every kind: the device returns them (or not), the guest never
/// hangs, reclaims what comes back, refuses what cannot be posted, and keeps working.
#[test]
fn malformed_raw_chains_do_not_hang_the_guest() {
    let mut server = EchoServer::start(1);
    let mut guest = server.guest(GuestOptions::default());
    let layout = guest.guest_mem_layout();
    let end = layout[0].0 + layout[0].1 as u64;
    let buf = guest.scratch_gpa();
    guest.write_guest_mem(buf, &[0u8; 256]);
    let d = |addr: u64, len: u32, flags: u16, next: u16| RawDesc {
        addr,
        len,
        flags,
        next,
    };
    // An indirect table whose only entry is itself indirect.
    let nested = buf + 4096;
    guest.write_guest_mem(
        nested,
        &d(nested + 64, 16, VIRTQ_DESC_F_INDIRECT, 0).to_bytes(),
    );
    // An indirect table of 1024 entries (more than the queue) chained into a loop.
    let big_table = buf + 8192;
    for i in 0..1024u16 {
        let e = d(buf, 64, VIRTQ_DESC_F_NEXT, (i + 1) % 1024);
        guest.write_guest_mem(big_table + 16 * u64::from(i), &e.to_bytes());
    }
    let mut bad: Vec<Vec<RawDesc>> = vec![
        vec![d(end + 0x10000, 64, 0, 0)],        // outside guest memory
        vec![d(end - 8, 64, 0, 0)],              // straddling the end
        vec![d(buf, 64, VIRTQ_DESC_F_WRITE, 0)], // device-writable on TX
        vec![d(buf, 0, 0, 0)],                   // zero length
        vec![d(buf, u32::MAX, 0, 0)],            // absurd length
        vec![d(0, 64, 0, 0)],                    // below guest memory
        vec![d(buf, 64, VIRTQ_DESC_F_NEXT, 0)],  // points at itself
        vec![
            d(buf, 32, VIRTQ_DESC_F_NEXT, 1),
            d(buf, 32, VIRTQ_DESC_F_NEXT, 0),
        ], // A->B->A
        vec![d(buf, 64, VIRTQ_DESC_F_NEXT, 1000)], // next beyond the queue
        vec![d(nested, 16, VIRTQ_DESC_F_INDIRECT, 0)], // indirect in indirect
        vec![d(buf, 24, VIRTQ_DESC_F_INDIRECT, 0)], // table length not a multiple of 16
        vec![d(big_table, 16 * 1024, VIRTQ_DESC_F_INDIRECT, 0)], // table longer than queue
    ];
    // A loop through every descriptor of the queue.
    bad.push(
        (0..256u16)
            .map(|i| d(buf, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 256))
            .collect(),
    );
    let start = Instant::now();
    for chain in &bad {
        guest.send_raw_chain(chain).expect("post the chain");
    }
    // What cannot be posted at all is refused at once.
    assert!(matches!(
        guest.send_raw_chain(&vec![d(buf, 1, 0, 0); 257]),
        Err(GuestError::ChainLength { len: 257, .. })
    ));
    assert!(matches!(
        guest.send_raw_chain(&[]),
        Err(GuestError::ChainLength { len: 0, .. })
    ));
    let n = bad.len() as u64;
    eventually("every bad chain returned used", || {
        guest.tx_completed() == n
    });
    assert_eq!(Stats::get(&server.stats.bad_chains), n);
    // The descriptors came back: the whole queue is usable again, and nothing bad echoed.
    for i in 0..300 {
        echo(&mut guest, &frame(i, 60 + i as usize));
    }
    assert_eq!(guest.tx_in_flight(), 0);
    assert!(start.elapsed() < Duration::from_secs(10));
    guest.disconnect();
    server.join();
}
