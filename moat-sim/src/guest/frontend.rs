//! The vhost-user side of the simulated guest: reaching the backend, and the message
//! sequence QEMU sends to bring up a virtio-net device (features, memory table, vrings).

use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HASH_REPORT,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;
use super::ring::SplitRing;
use super::{GuestError, GuestOptions};

/// What the two sides agreed on.
pub struct Negotiated {
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
}

/// Connect to a backend listening on `socket`, retrying while the socket does not exist or
/// nobody accepts yet, for at most `patience`.
pub fn dial(socket: &Path, patience: Duration) -> Result<UnixStream, GuestError> {
    let deadline = Instant::now() + patience;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                return Err(GuestError::Connect {
                    path: socket.display().to_string(),
                    source,
                })
            }
        }
    }
}

/// Accept one backend that dials in, waiting at most `patience`.
pub fn answer(listener: &UnixListener, patience: Duration) -> Result<UnixStream, GuestError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_else(|| "listener".into());
    let ms = patience.as_millis().min(i32::MAX as u128) as i32;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    if ready <= 0 {
        let source = if ready < 0 {
            std::io::Error::last_os_error()
        } else {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no backend connected")
        };
        return Err(GuestError::Connect { path, source });
    }
    let (stream, _) = listener
        .accept()
        .map_err(|source| GuestError::Connect { path, source })?;
    // The listener may be non-blocking; the vhost-user conversation is not.
    stream.set_nonblocking(false).map_err(GuestError::Socket)?;
    Ok(stream)
}

/// Bounds how long requests to the backend may take, by shutting the socket down when they
/// take longer: the blocked call then fails (the vhost crate's endpoint retries EAGAIN
/// forever, so a socket read timeout cannot bound a call).
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<bool>>,
}

impl Watchdog {
    /// Start watching `socket`; a zero `timeout` watches nothing.
    pub fn arm(socket: &UnixStream, timeout: Duration) -> Result<Watchdog, GuestError> {
        if timeout.is_zero() {
            return Ok(Watchdog {
                done: None,
                thread: None,
            });
        }
        let socket = socket.try_clone().map_err(GuestError::Socket)?;
        let (done, finished) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("guest-watchdog".into())
            .spawn(move || match finished.recv_timeout(timeout) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = socket.shutdown(Shutdown::Both);
                    true
                }
                _ => false,
            })
            .map_err(GuestError::Socket)?;
        Ok(Watchdog {
            done: Some(done),
            thread: Some(thread),
        })
    }

    /// Stop watching; whether the time ran out (and the socket was shut down).
    pub fn disarm(mut self) -> bool {
        drop(self.done.take());
        self.thread
            .take()
            .is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread, which then ends without firing.
        drop(self.done.take());
    }
}

/// The virtio features the driver asks for, from what the backend offers.
fn wanted_features(offered: u64, opts: &GuestOptions) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut wanted = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if opts.ack_all_offered {
        // Everything, as QEMU passes a backend's offloads on to a guest that takes them,
        // except what would change the ring or header layout this driver speaks, or needs
        // messages it does not send.
        let cannot = bit(VIRTIO_F_RING_PACKED)
            | bit(VIRTIO_F_ACCESS_PLATFORM)
            | bit(VIRTIO_F_IN_ORDER)
            | bit(VIRTIO_F_NOTIFICATION_DATA)
            | bit(VIRTIO_NET_F_HASH_REPORT)
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        wanted |= !cannot;
    }
    if opts.offloads {
        wanted |= bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO4);
    }
    wanted &= !(bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX));
    if opts.mrg_rxbuf {
        wanted |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if opts.event_idx {
        wanted |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if opts.queue_pairs > 1 {
        wanted |= bit(VIRTIO_NET_F_MQ);
    }
    offered & wanted
}

/// The vhost-user protocol features this frontend can use.
fn supported_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// SET_OWNER, feature and protocol-feature negotiation, SET_FEATURES, SET_MEM_TABLE.
/// With `opts.queue_pairs` above 1 the backend must offer VIRTIO_NET_F_MQ and the MQ
/// protocol feature, and GET_QUEUE_NUM must report at least two queues per pair.
pub fn negotiate(
    frontend: &mut Frontend,
    mem: &GuestMemory,
    opts: &GuestOptions,
) -> Result<Negotiated, GuestError> {
    frontend.set_owner()?;
    let offered = frontend.get_features()?;
    let features = wanted_features(offered, opts);
    if features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(GuestError::Unsupported(
            "the backend does not offer VIRTIO_F_VERSION_1",
        ));
    }
    let mut protocol_features = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        protocol_features = frontend.get_protocol_features()? & supported_protocol_features();
        frontend.set_protocol_features(protocol_features)?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // From here on every request without a reply of its own is acknowledged, so a
            // request the backend refuses fails here rather than later.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let queues = frontend.get_queue_num()?;
            if queues < num_queues(opts) {
                return Err(GuestError::Unsupported(if opts.queue_pairs > 1 {
                    "the backend has fewer queues than 2 x queue_pairs"
                } else {
                    "the backend has fewer than 2 queues"
                }));
            }
        }
    }
    if opts.queue_pairs > 1 {
        if features & (1 << VIRTIO_NET_F_MQ) == 0 {
            return Err(GuestError::Unsupported(
                "queue_pairs > 1 but the backend does not offer VIRTIO_NET_F_MQ",
            ));
        }
        if !protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            return Err(GuestError::Unsupported(
                "queue_pairs > 1 but the backend does not offer the MQ protocol feature",
            ));
        }
    }
    frontend.set_features(features)?;
    frontend.set_mem_table(&mem.regions())?;
    Ok(Negotiated {
        features,
        protocol_features,
    })
}

/// SET_VRING_NUM/ADDR/BASE/CALL/KICK for one queue; vring addresses are the frontend's own
/// virtual addresses, which the backend translates through the memory table's user_addr.
pub fn setup_vring(
    frontend: &mut Frontend,
    mem: &GuestMemory,
    index: usize,
    ring: &SplitRing,
    call: &EventFd,
    kick: &EventFd,
) -> Result<(), GuestError> {
    frontend.set_vring_num(index, ring.size)?;
    frontend.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: mem.va(ring.desc),
            used_ring_addr: mem.va(ring.used),
            avail_ring_addr: mem.va(ring.avail),
            log_addr: None,
        },
    )?;
    frontend.set_vring_base(index, 0)?;
    frontend.set_vring_call(index, call)?;
    frontend.set_vring_kick(index, kick)?;
    Ok(())
}

/// Number of virtqueues: an RX/TX pair per `opts.queue_pairs` (no control queue: QEMU
/// keeps that one to itself).
pub fn num_queues(opts: &GuestOptions) -> u64 {
    2 * u64::from(opts.queue_pairs)
}

/// SET_VRING_ENABLE for each of the `queues` queues (only exists with
/// VHOST_USER_F_PROTOCOL_FEATURES; without it rings start as soon as they are kicked).
pub fn enable_vrings(
    frontend: &mut Frontend,
    features: u64,
    queues: usize,
) -> Result<(), GuestError> {
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        for q in 0..queues {
            frontend.set_vring_enable(q, true)?;
        }
    }
    Ok(())
}
