//! The virtio-net header that precedes every frame on the queues (VIRTIO_F_VERSION_1 layout,
//! 12 bytes, `num_buffers` always present).

use crate::telemetry::DropReason;

/// Length of the header with VIRTIO_F_VERSION_1 (or MRG_RXBUF).
pub const VIRTIO_NET_HDR_LEN: usize = 12;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

/// The largest IPv4 packet, hence the largest TSO frame: Ethernet header + 64 KiB - 1.
pub const MAX_GSO_FRAME: usize = 14 + 65535;

/// The offloads the driver acked (virtio-net feature bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// VIRTIO_NET_F_CSUM: the guest may send partial checksums (NEEDS_CSUM).
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4: the guest may send TCPv4 segments of up to 64 KiB.
    pub host_tso4: bool,
    /// VIRTIO_NET_F_GUEST_CSUM: moat may send partial checksums and mark full ones valid.
    pub guest_csum: bool,
    /// VIRTIO_NET_F_GUEST_TSO4: moat may send TCPv4 segments of up to 64 KiB.
    pub guest_tso4: bool,
}

impl Offloads {
    pub fn from_features(features: u64) -> Offloads {
        use virtio_bindings::bindings::virtio_net::{
            VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO4,
        };
        let has = |bit: u32| features & (1 << bit) != 0;
        let csum = has(VIRTIO_NET_F_CSUM);
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        Offloads {
            csum,
            // Segmentation offloads need the checksum offload of the same direction.
            host_tso4: csum && has(VIRTIO_NET_F_HOST_TSO4),
            guest_csum,
            guest_tso4: guest_csum && has(VIRTIO_NET_F_GUEST_TSO4),
        }
    }
}

/// What a TX header asks of moat, once checked against the acked offloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOffload {
    /// A complete frame with complete checksums.
    None,
    /// The L4 checksum at `start + offset` is partial: moat computes it.
    Csum { start: u16, offset: u16 },
    /// A TCPv4 segment of up to 64 KiB (partial checksum too); `mss` is what the guest asked
    /// to cut it into, which moat does not need: it terminates TCP.
    Tso { start: u16, offset: u16, mss: u16 },
}

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

    /// Check a TX header against the acked offloads: a guest asking for an offload it did
    /// not negotiate (or for GSO without a partial checksum, or ECN, or UDP/IPv6 GSO, none
    /// of which moat offers) is misbehaving. The offsets are checked against the frame later.
    pub fn check_tx(&self, offloads: Offloads) -> Result<TxOffload, DropReason> {
        let needs_csum = self.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM;
        if self.flags != 0 && !needs_csum || needs_csum && !offloads.csum {
            return Err(DropReason::BadVirtioHeader);
        }
        let (start, offset) = (self.csum_start, self.csum_offset);
        match self.gso_type {
            VIRTIO_NET_HDR_GSO_NONE if needs_csum => Ok(TxOffload::Csum { start, offset }),
            VIRTIO_NET_HDR_GSO_NONE => Ok(TxOffload::None),
            VIRTIO_NET_HDR_GSO_TCPV4 if offloads.host_tso4 && needs_csum && self.gso_size > 0 => {
                Ok(TxOffload::Tso {
                    start,
                    offset,
                    mss: self.gso_size,
                })
            }
            _ => Err(DropReason::BadVirtioHeader),
        }
    }

    /// The header bytes for an RX frame that uses `num_buffers` descriptor chains.
    pub fn rx_bytes(num_buffers: u16) -> [u8; VIRTIO_NET_HDR_LEN] {
        OutHdr::Plain.bytes(num_buffers)
    }
}

/// What the sender of a frame tells the receiver in its virtio-net header: moat for the
/// frames it puts on the RX queue, the simulated guest for its TX frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutHdr {
    /// Nothing: a complete frame (the guest verifies checksums as it likes).
    #[default]
    Plain,
    /// The checksums are known good (GUEST_CSUM: the guest may skip verifying them).
    DataValid,
    /// A TCPv4 segment of up to 64 KiB with a partial checksum (GUEST_TSO4): the L4 header
    /// starts at `csum_start`, headers end at `hdr_len`, `mss` is the segment size.
    Tso {
        hdr_len: u16,
        mss: u16,
        csum_start: u16,
        csum_offset: u16,
    },
}

impl OutHdr {
    pub fn bytes(self, num_buffers: u16) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        match self {
            OutHdr::Plain => {}
            OutHdr::DataValid => b[0] = VIRTIO_NET_HDR_F_DATA_VALID,
            OutHdr::Tso {
                hdr_len,
                mss,
                csum_start,
                csum_offset,
            } => {
                b[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                b[1] = VIRTIO_NET_HDR_GSO_TCPV4;
                b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
                b[4..6].copy_from_slice(&mss.to_le_bytes());
                b[6..8].copy_from_slice(&csum_start.to_le_bytes());
                b[8..10].copy_from_slice(&csum_offset.to_le_bytes());
            }
        }
        b[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_header_offloads_only_as_negotiated() {
        let none = Offloads::default();
        let all = Offloads {
            csum: true,
            host_tso4: true,
            guest_csum: true,
            guest_tso4: true,
        };
        let check = |hdr: &[u8; 12], o| VirtioNetHdr::parse(hdr).unwrap().check_tx(o);
        let mut hdr = [0u8; 12];
        assert_eq!(check(&hdr, none), Ok(TxOffload::None));
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6] = 34; // csum_start
        hdr[8] = 16; // csum_offset
        assert_eq!(check(&hdr, none), Err(DropReason::BadVirtioHeader));
        assert_eq!(
            check(&hdr, all),
            Ok(TxOffload::Csum {
                start: 34,
                offset: 16
            })
        );
        hdr[1] = 1; // GSO_TCPV4
        assert_eq!(
            check(&hdr, all),
            Err(DropReason::BadVirtioHeader),
            "gso_size 0"
        );
        hdr[4] = 0xb4;
        hdr[5] = 0x05; // gso_size 1460
        assert_eq!(
            check(&hdr, all),
            Ok(TxOffload::Tso {
                start: 34,
                offset: 16,
                mss: 1460
            })
        );
        let csum_only = Offloads { csum: true, ..none };
        assert_eq!(check(&hdr, csum_only), Err(DropReason::BadVirtioHeader));
        hdr[1] = 0x81; // TCPV4 | ECN: not offered
        assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
        hdr[1] = 3; // UDP
        assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
        hdr[1] = 1;
        hdr[0] = 0; // GSO without NEEDS_CSUM
        assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
        hdr[0] = 2; // DATA_VALID is for RX only
        assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
        assert_eq!(VirtioNetHdr::parse(&hdr[..5]), Err(DropReason::Truncated));
    }
}
