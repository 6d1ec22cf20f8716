//! Moving frames between the split virtqueues and moat-owned buffers.
//!
//! TX: every available chain is read once into a moat-owned buffer (the guest may rewrite
//! its memory afterwards; moat only ever looks at its copy), then returned as used.
//! RX: a frame is written across as many chains as it needs (MRG_RXBUF) with `num_buffers`
//! in its header; if the guest has not posted enough buffers, the frame waits.

use std::collections::VecDeque;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use crate::frame::virtio_hdr::{OutHdr, VIRTIO_NET_HDR_LEN};
use crate::telemetry::{Counters, DropReason, Traffic};

use super::pacer::SharedPacer;

type Mem = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Frames waiting for RX buffers, at most this many (then new answers are dropped).
pub const MAX_PENDING_RX: usize = 1024;

/// Why a TX chain could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor is device-writable, or its address is outside guest memory.
    Bad,
    /// Longer than the largest frame moat accepts.
    TooLong,
}

/// Reads guest memory, remembering the region of the last read: a guest's buffers nearly
/// always sit in one region, so most descriptors skip vm-memory's region search and
/// per-region iteration (a third of the drop path's time in a profile before this).
pub struct GuestReader<'m> {
    mem: &'m GuestMemoryMmap,
    last: Option<&'m GuestRegionMmap>,
}

impl<'m> GuestReader<'m> {
    pub fn new(mem: &'m GuestMemoryMmap) -> GuestReader<'m> {
        GuestReader { mem, last: None }
    }

    /// Fill `out` from guest memory at `addr`; Err if any of it is outside guest memory.
    pub fn read(&mut self, addr: GuestAddress, out: &mut [u8]) -> Result<(), ChainError> {
        let region = match self.last {
            Some(r) if addr.0.wrapping_sub(r.start_addr().0) < r.len() => r,
            _ => {
                let r = self.mem.find_region(addr).ok_or(ChainError::Bad)?;
                self.last = Some(r);
                r
            }
        };
        let offset = MemoryRegionAddress(addr.0 - region.start_addr().0);
        match region.get_slice(offset, out.len()) {
            Ok(slice) => {
                slice.copy_to(out);
                Ok(())
            }
            // Runs past the region's end: the general path reads across regions (or fails).
            Err(_) => self.mem.read_slice(out, addr).map_err(|_| ChainError::Bad),
        }
    }
}

/// Read every descriptor of a TX chain into the start of `buf`, at most `max` bytes (and
/// never more than `buf` holds). Returns how many bytes were read; with an error, how many
/// were read before it.
pub fn read_tx_chain<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    chain: DescriptorChain<M>,
    mem: &mut GuestReader<'_>,
    buf: &mut [u8],
    max: usize,
) -> Result<usize, (ChainError, usize)> {
    let max = max.min(buf.len());
    let mut read = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err((ChainError::Bad, read));
        }
        let len = desc.len() as usize;
        if len > max - read {
            return Err((ChainError::TooLong, read));
        }
        mem.read(desc.addr(), &mut buf[read..read + len])
            .map_err(|e| (e, read))?;
        read += len;
    }
    Ok(read)
}

/// Total device-writable capacity of an RX chain; `None` if it has a readable descriptor.
fn rx_capacity(chain: &DescriptorChain<Mem>) -> Option<usize> {
    let mut total = 0usize;
    for desc in chain.clone() {
        if !desc.is_write_only() {
            return None;
        }
        total = total.saturating_add(desc.len() as usize);
    }
    Some(total)
}

/// Write `parts` (concatenated) into the chain's writable descriptors.
fn write_chain(
    chain: DescriptorChain<Mem>,
    mem: &GuestMemoryMmap,
    data: &[u8],
) -> Result<usize, ()> {
    let mut off = 0;
    for desc in chain {
        if off == data.len() {
            break;
        }
        let n = (desc.len() as usize).min(data.len() - off);
        mem.write_slice(&data[off..off + n], desc.addr())
            .map_err(|_| ())?;
        off += n;
    }
    Ok(off)
}

/// The RX side of one queue pair: answers waiting for guest buffers.
#[derive(Debug, Default)]
pub struct RxQueue {
    /// Each frame behind room for its virtio-net header, written in place when delivered.
    pending: VecDeque<(Vec<u8>, OutHdr)>,
    /// Bytes of `pending` (at most [`MAX_PENDING_RX_BYTES`]).
    pending_bytes: usize,
    /// `limits.ingress_bps`: frames wait for the bucket instead of being dropped.
    pacer: Option<SharedPacer>,
    paced: bool,
    /// The guest's avail index when the frame in front last found too little room: nothing
    /// is tried again until the guest posts more (a kick, or any later event, sees it move).
    stalled_at: Option<u16>,
    /// The guest kept posting while a flush kept retrying: try again soon rather than
    /// spend more of this event on it.
    retry_soon: bool,
}

/// Frames waiting for RX buffers, at most this many bytes (then new ones are dropped):
/// 64 frames of 64 KiB, 2 700 of 1 514 bytes.
pub const MAX_PENDING_RX_BYTES: usize = 4 << 20;

/// Immediate retries of one flush while the guest posts buffers under it (after that, the
/// pair's timer brings the next try).
const MAX_FLUSH_RETRIES: usize = 8;

impl RxQueue {
    pub fn set_pacer(&mut self, pacer: Option<SharedPacer>) {
        self.pacer = pacer;
    }

    pub fn paced(pacer: Option<SharedPacer>) -> RxQueue {
        RxQueue {
            pacer,
            ..RxQueue::default()
        }
    }

    /// How long until paced frames may go (None: not waiting on the bucket).
    pub fn pacing_delay(&mut self) -> Option<std::time::Duration> {
        if !self.paced {
            return None;
        }
        self.pacer.as_ref().map(SharedPacer::wait)
    }

    /// Whether a flush stopped retrying while the guest was still posting buffers (the
    /// pair then wakes itself shortly, in case the guest's kick was suppressed).
    pub fn retry_soon(&self) -> bool {
        self.retry_soon
    }

    /// Queue a frame built without room for the header (the gateway's answers): copied once
    /// behind the room.
    pub fn push_copy(&mut self, frame: &[u8], hdr: OutHdr, counters: &Counters) {
        let mut buf = Vec::with_capacity(VIRTIO_NET_HDR_LEN + frame.len());
        buf.extend_from_slice(&[0u8; VIRTIO_NET_HDR_LEN]);
        buf.extend_from_slice(frame);
        self.push(buf, hdr, counters);
    }

    /// Queue a frame whose first VIRTIO_NET_HDR_LEN bytes are room for its header; drops
    /// (counted) when too many frames or bytes are already waiting.
    pub fn push(&mut self, frame: Vec<u8>, hdr: OutHdr, counters: &Counters) {
        if self.pending.len() >= MAX_PENDING_RX
            || self.pending_bytes + frame.len() > MAX_PENDING_RX_BYTES
        {
            counters.drop_frame(
                DropReason::RxQueueFull,
                format_args!(
                    "{} frames ({} bytes) already wait for rx buffers",
                    self.pending.len(),
                    self.pending_bytes
                ),
            );
            return;
        }
        self.pending_bytes += frame.len();
        self.pending.push_back((frame, hdr));
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.stalled_at = None;
        self.retry_soon = false;
    }

    fn pop_front(&mut self) {
        if let Some((buf, _)) = self.pending.pop_front() {
            self.pending_bytes -= buf.len();
        }
    }

    /// Put as many pending frames as fit into the RX queue; notify the guest once.
    ///
    /// A frame that finds too little room waits, and is tried again only once the guest's
    /// avail index has moved (it posted buffers): a guest that posts buffers too small to
    /// hold it (zero-length ones included) costs one try per batch of buffers it posts,
    /// never a spin. A frame larger than a whole ring of the guest's buffers is dropped.
    pub fn flush(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        mrg_rxbuf: bool,
        counters: &Counters,
    ) -> std::io::Result<()> {
        self.retry_soon = false;
        // A queue the driver disabled (fewer queue pairs in use) is not written: its frames
        // wait until it is enabled again.
        if self.pending.is_empty() || !vring.get_ref().is_enabled() {
            return Ok(());
        }
        let mem = mem.memory();
        if let Some(seen) = self.stalled_at {
            let avail = vring
                .get_ref()
                .get_queue()
                .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire);
            match avail {
                Ok(idx) if idx.0 != seen => self.stalled_at = None,
                // Nothing posted since the last try: wait for the guest's kick.
                _ => return Ok(()),
            }
        }
        let mut delivered = false;
        let mut retries = 0;
        self.paced = false;
        while let Some((buf, hdr)) = self.pending.front_mut() {
            let len = buf.len() - VIRTIO_NET_HDR_LEN;
            if let Some(pacer) = self.pacer.as_ref() {
                if !pacer.ready() {
                    self.paced = true;
                    break;
                }
            }
            match place_frame(vring, &mem, buf, *hdr, mrg_rxbuf) {
                Placed::Done => {
                    if let Some(pacer) = self.pacer.as_ref() {
                        pacer.spend(len);
                    }
                    counters.add(Traffic::RxFrames, 1);
                    counters.add(Traffic::RxBytes, len as u64);
                    delivered = true;
                    self.pop_front();
                }
                Placed::Dropped(reason) => {
                    delivered = true;
                    counters.drop_frame(reason, format_args!("rx frame of {len} bytes"));
                    self.pop_front();
                }
                Placed::NoBuffers { seen, moved } => {
                    // Posted meanwhile: go on at once (a few times; then the timer).
                    if moved && retries < MAX_FLUSH_RETRIES {
                        retries += 1;
                        continue;
                    }
                    self.retry_soon = moved;
                    self.stalled_at = Some(seen);
                    break;
                }
            }
        }
        if delivered && vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
            counters.add(Traffic::Notifications, 1);
        }
        Ok(())
    }
}

enum Placed {
    Done,
    /// The frame cannot be delivered into what the guest posted; the chains used are returned.
    Dropped(DropReason),
    /// Not enough buffers yet; nothing was consumed. `seen`: the guest's avail index this
    /// try went up to; `moved`: it has moved since (notifications are enabled from `seen`).
    NoBuffers {
        seen: u16,
        moved: bool,
    },
}

/// Write one header+frame into as many RX chains as it needs.
fn place_frame(
    vring: &VringRwLock,
    mem: &Mem,
    data: &mut [u8],
    hdr: OutHdr,
    mrg_rxbuf: bool,
) -> Placed {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    while capacity < data.len() {
        let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
            if mrg_rxbuf && chains.len() >= usize::from(queue.size()) {
                // A whole ring of the guest's buffers cannot hold the frame, and the guest
                // cannot post more until some are used: it never fits. Give the buffers back.
                for (c, _) in chains {
                    let c: DescriptorChain<Mem> = c;
                    let _ = queue.add_used(&**mem, c.head_index(), 0);
                }
                return Placed::Dropped(DropReason::RxRingTooSmall);
            }
            return no_buffers(queue, mem, chains.len());
        };
        let Some(cap) = rx_capacity(&chain) else {
            // A readable descriptor in an RX chain: return the chain unused, drop the frame.
            let _ = queue.add_used(&**mem, chain.head_index(), 0);
            for (c, _) in chains.drain(..) {
                let c: DescriptorChain<Mem> = c;
                let _ = queue.add_used(&**mem, c.head_index(), 0);
            }
            return Placed::Dropped(DropReason::BadDescriptor);
        };
        capacity += cap;
        chains.push((chain, cap));
        if !mrg_rxbuf {
            break;
        }
    }
    if capacity < data.len() {
        for (c, _) in chains {
            let _ = queue.add_used(&**mem, c.head_index(), 0);
        }
        return Placed::Dropped(DropReason::RxBufferTooSmall);
    }
    let num_buffers = chains.len() as u16;
    data[..VIRTIO_NET_HDR_LEN].copy_from_slice(&hdr.bytes(num_buffers));
    let mut off = 0;
    let mut failed = false;
    for (chain, cap) in chains {
        let head = chain.head_index();
        let end = (off + cap).min(data.len());
        let written = if failed {
            0
        } else {
            match write_chain(chain, mem, &data[off..end]) {
                Ok(n) => n,
                Err(()) => {
                    failed = true;
                    0
                }
            }
        };
        off = end;
        let _ = queue.add_used(&**mem, head, written as u32);
    }
    if failed {
        Placed::Dropped(DropReason::BadDescriptor)
    } else {
        Placed::Done
    }
}

/// The guest posted too little room: put the `popped` chains back, and ask to be notified
/// when it posts past what this try saw. (`enable_notification` sets the notification point
/// at `next_avail`, which the rewind moved back: a guest whose next buffers lie past it
/// would not kick. So it is set at the index seen, then the rewind is restored.)
fn no_buffers(queue: &mut virtio_queue::Queue, mem: &Mem, popped: usize) -> Placed {
    let at_none = queue.next_avail();
    let avail = queue
        .avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
        .map_or(at_none, |w| w.0);
    // An avail index more than a ring ahead of us is the guest's error (the queue refuses
    // to pop): wait until it changes.
    let seen = if avail.wrapping_sub(at_none) > queue.size() {
        avail
    } else {
        at_none
    };
    let rewound = at_none.wrapping_sub(popped as u16);
    queue.set_next_avail(seen);
    let moved = queue.enable_notification(&**mem).unwrap_or(false);
    queue.set_next_avail(rewound);
    Placed::NoBuffers { seen, moved }
}

#[cfg(test)]
mod chain_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames for a guest that posts no RX buffers wait within a byte bound (by count
    /// alone, 1024 x 64 KiB), the rest dropped and counted.
    #[test]
    fn rx_pending_is_bounded_in_bytes() {
        let counters = Counters::default();
        let mut rx = RxQueue::default();
        for _ in 0..1024 {
            rx.push(vec![0u8; 65_550], OutHdr::Plain, &counters);
            assert!(rx.pending_bytes <= MAX_PENDING_RX_BYTES);
        }
        assert_eq!(rx.pending(), MAX_PENDING_RX_BYTES / 65_550);
        assert_eq!(
            counters.drops(DropReason::RxQueueFull),
            (1024 - MAX_PENDING_RX_BYTES / 65_550) as u64
        );
        rx.clear();
        rx.push(vec![0u8; 100], OutHdr::Plain, &counters);
        assert_eq!(rx.pending_bytes, 100);
    }

    #[test]
    fn guest_reader_reads_within_across_and_outside_regions() {
        // Two adjacent 4 KiB regions, then a hole, then one more.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
            (GuestAddress(0x8000), 0x1000),
        ])
        .unwrap();
        let pattern: Vec<u8> = (0..0x2000u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(0x8000)).unwrap();
        let mut reader = GuestReader::new(&mem);
        let mut out = [0u8; 64];
        reader.read(GuestAddress(0x1010), &mut out).unwrap();
        assert_eq!(out[..], pattern[0x10..0x50]);
        // Across the boundary of the first two regions: the general path.
        reader.read(GuestAddress(0x1fe0), &mut out).unwrap();
        assert_eq!(out[..], pattern[0xfe0..0x1020]);
        // Another region than the one remembered.
        let mut small = [0u8; 16];
        reader.read(GuestAddress(0x8000), &mut small).unwrap();
        assert_eq!(small, [7u8; 16]);
        // Into the hole, past the end, and at an address that wraps: refused.
        assert!(reader.read(GuestAddress(0x2ff0), &mut out).is_err());
        assert!(reader.read(GuestAddress(0x8ff0), &mut out).is_err());
        assert!(reader.read(GuestAddress(u64::MAX - 8), &mut out).is_err());
        assert!(reader.read(GuestAddress(0x0), &mut out).is_err());
    }
}
