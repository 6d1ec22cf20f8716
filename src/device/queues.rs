//! Moving frames between the split virtqueues and moat-owned buffers.
//!
//! TX: every available chain is read once into a moat-owned buffer (the guest may rewrite
//! its memory afterwards; moat only ever looks at its copy), then returned as used.
//! RX: a frame is written across as many chains as it needs (MRG_RXBUF) with `num_buffers`
//! in its header; if the guest has not posted enough buffers, the frame waits.

use std::collections::VecDeque;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
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
    /// `limits.ingress_bps`: frames wait for the bucket instead of being dropped.
    pacer: Option<SharedPacer>,
    paced: bool,
}

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

    /// Queue a frame built without room for the header (the gateway's answers): copied once
    /// behind the room.
    pub fn push_copy(&mut self, frame: &[u8], hdr: OutHdr, counters: &Counters) {
        let mut buf = Vec::with_capacity(VIRTIO_NET_HDR_LEN + frame.len());
        buf.extend_from_slice(&[0u8; VIRTIO_NET_HDR_LEN]);
        buf.extend_from_slice(frame);
        self.push(buf, hdr, counters);
    }

    /// Queue a frame whose first VIRTIO_NET_HDR_LEN bytes are room for its header; drops
    /// (counted) when too many are already waiting.
    pub fn push(&mut self, frame: Vec<u8>, hdr: OutHdr, counters: &Counters) {
        if self.pending.len() >= MAX_PENDING_RX {
            counters.drop_frame(
                DropReason::RxQueueFull,
                format_args!("{} frames already wait for rx buffers", self.pending.len()),
            );
            return;
        }
        self.pending.push_back((frame, hdr));
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// Put as many pending frames as fit into the RX queue; notify the guest once.
    pub fn flush(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        mrg_rxbuf: bool,
        counters: &Counters,
    ) -> std::io::Result<()> {
        // A queue the driver disabled (fewer queue pairs in use) is not written: its frames
        // wait until it is enabled again.
        if self.pending.is_empty() || !vring.get_ref().is_enabled() {
            return Ok(());
        }
        let mem = mem.memory();
        let mut delivered = false;
        self.paced = false;
        while let Some((buf, hdr)) = self.pending.front_mut() {
            let len = buf.len() - VIRTIO_NET_HDR_LEN;
            if let Some(pacer) = self.pacer.as_ref() {
                if !pacer.ready() {
                    self.paced = true;
                    break;
                }
                pacer.spend(len);
            }
            match place_frame(vring, &mem, buf, *hdr, mrg_rxbuf) {
                Placed::Done => {
                    counters.add(Traffic::RxFrames, 1);
                    counters.add(Traffic::RxBytes, len as u64);
                    delivered = true;
                    self.pending.pop_front();
                }
                Placed::Dropped(reason) => {
                    delivered = true;
                    counters.drop_frame(reason, format_args!("rx frame of {len} bytes"));
                    self.pending.pop_front();
                }
                Placed::NoBuffers => {
                    // Ask to be kicked when the guest posts buffers (with EVENT_IDX this
                    // moves avail_event); if some arrived meanwhile, go on at once.
                    if vring.enable_notification().unwrap_or(false) {
                        continue;
                    }
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
    /// Not enough buffers yet; nothing was consumed.
    NoBuffers,
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
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            return Placed::NoBuffers;
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

#[cfg(test)]
mod tests {
    use super::*;

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
