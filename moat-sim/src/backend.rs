//! The device's side of a descriptor chain, for stand-in vhost-user backends in tests (the
//! guest's self-test echoes frames with these): reading a TX chain whole, or refusing it,
//! and measuring an RX chain's room. moat's own device has its own, stricter reader; these
//! only need to tell a well-formed chain from a malformed one.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::guest::VIRTIO_NET_HDR_LEN;

/// The largest TX chain read: a 64 KiB GSO frame behind its header.
const MAX_TX: usize = 65536 + VIRTIO_NET_HDR_LEN;

/// A TX chain's bytes (header and frame), or `None` if it is malformed: a device-writable
/// descriptor, an address outside guest memory, longer than 64 KiB plus the header, a chain cut short
/// (bad `next`, a loop, a bad indirect table: the last descriptor read still says NEXT),
/// or too short to be a frame (header plus an Ethernet header).
pub fn read_tx_chain<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Option<Vec<u8>>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut out = Vec::new();
    let mut cut = false;
    for desc in chain {
        if desc.is_write_only() || out.len() + desc.len() as usize > MAX_TX {
            return None;
        }
        let start = out.len();
        out.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut out[start..], desc.addr()).ok()?;
        cut = desc.has_next();
    }
    (!cut && out.len() >= VIRTIO_NET_HDR_LEN + 14).then_some(out)
}

/// Bytes the device may write into an RX chain: the sum of its device-writable descriptors
/// (readable ones are skipped).
pub fn rx_capacity<M>(chain: &DescriptorChain<M>) -> usize
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .sum()
}
