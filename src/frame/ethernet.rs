//! Ethernet II: the header of every frame, read (the firewall's link rules need no more)
//! and written (in front of each IP packet moat sends to the guest).

use etherparse::{EtherType, Ethernet2Header, Ethernet2HeaderSlice};

use super::MacAddr;
use crate::telemetry::DropReason;

/// Ethernet II header length.
pub const ETH_HDR_LEN: usize = 14;

/// The tags of 802.1Q and its relatives: a VLAN-tagged frame has its own drop reason.
pub(super) const ETHERTYPE_VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// The Ethernet header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ethernet {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
}

impl Ethernet {
    /// Whether the frame carries what moat parses further (IPv4, ARP); [`super::parse`]
    /// refuses every other ethertype.
    pub fn is_ipv4_or_arp(&self) -> bool {
        matches!(EtherType(self.ethertype), EtherType::IPV4 | EtherType::ARP)
    }

    /// The header as it goes on the wire.
    pub fn to_bytes(&self) -> [u8; ETH_HDR_LEN] {
        Ethernet2Header {
            source: self.src.0,
            destination: self.dst.0,
            ether_type: EtherType(self.ethertype),
        }
        .to_bytes()
    }
}

/// Just the Ethernet header (the firewall's link checks need no more).
pub fn parse_ethernet(bytes: &[u8]) -> Result<Ethernet, DropReason> {
    let eth = Ethernet2HeaderSlice::from_slice(bytes).map_err(|_| DropReason::Truncated)?;
    Ok(Ethernet {
        dst: MacAddr(eth.destination()),
        src: MacAddr(eth.source()),
        ethertype: eth.ether_type().0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::GATEWAY_MAC;

    #[test]
    fn a_header_reads_back_as_written() {
        let eth = Ethernet {
            dst: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            src: GATEWAY_MAC,
            ethertype: EtherType::IPV4.0,
        };
        assert_eq!(parse_ethernet(&eth.to_bytes()), Ok(eth));
        assert!(eth.is_ipv4_or_arp());
        assert_eq!(
            parse_ethernet(&eth.to_bytes()[..13]),
            Err(DropReason::Truncated)
        );
        let vlan = Ethernet {
            ethertype: 0x8100,
            ..eth
        };
        assert!(!vlan.is_ipv4_or_arp());
    }
}
