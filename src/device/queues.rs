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
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
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

/// Read every descriptor of a TX chain into `buf` (cleared first), at most `max` bytes.
pub fn read_tx_chain<M: std::ops::Deref<Target = GuestMemoryMmap>>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<usize, ChainError> {
    buf.clear();
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::Bad);
        }
        let len = desc.len() as usize;
        let start = buf.len();
        if start + len > max {
            return Err(ChainError::TooLong);
        }
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], desc.addr())
            .map_err(|_| ChainError::Bad)?;
    }
    Ok(buf.len())
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

    /// Queue a frame for the guest; drops (counted) when too many are already waiting.
    /// Queue a frame built without room for the header (the gateway's answers): copied once
    /// behind the room.
    pub fn push_copy(&mut self, frame: &[u8], hdr: OutHdr, counters: &Counters) {
        let mut buf = Vec::with_capacity(VIRTIO_NET_HDR_LEN + frame.len());
        buf.extend_from_slice(&[0u8; VIRTIO_NET_HDR_LEN]);
        buf.extend_from_slice(frame);
        self.push(buf, hdr, counters);
    }

    /// Queue a frame whose first VIRTIO_NET_HDR_LEN bytes are room for its header.
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
        if self.pending.is_empty() {
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
