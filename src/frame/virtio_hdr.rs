//! The virtio-net header that precedes every frame on the queues (VIRTIO_F_VERSION_1 layout,
//! 12 bytes, `num_buffers` always present).

use crate::telemetry::DropReason;

/// Length of the header with VIRTIO_F_VERSION_1 (or MRG_RXBUF).
pub const VIRTIO_NET_HDR_LEN: usize = 12;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// The fields of a virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Read a header from the start of a TX buffer.
    pub fn parse(bytes: &[u8]) -> Result<VirtioNetHdr, DropReason> {
        let b: &[u8; VIRTIO_NET_HDR_LEN] = bytes
            .get(..VIRTIO_NET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(DropReason::Truncated)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    /// Check a TX header against what was negotiated. No offloads are negotiated yet, so a
    /// guest asking for checksum completion or segmentation is misbehaving.
    pub fn check_tx(&self) -> Result<(), DropReason> {
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || self.gso_type != VIRTIO_NET_HDR_GSO_NONE
        {
            return Err(DropReason::BadVirtioHeader);
        }
        Ok(())
    }

    /// The header bytes for an RX frame that uses `num_buffers` descriptor chains.
    pub fn rx_bytes(num_buffers: u16) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        b
    }
}
