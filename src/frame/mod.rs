//! Every byte of a frame moat reads or edits is read or edited here, and nowhere else.
//!
//! A guest frame is parsed once into a typed view: everything the firewall, the services
//! and the flows look at comes from [`parse`] (a guest TX buffer from
//! [`offload::TxFrame`]), with the state of its L4 checksum ([`L4Checksum`]) found on the
//! way. Parsing is strict: whatever is not a well-formed Ethernet II frame carrying ARP or an
//! unfragmented, option-less IPv4 packet with TCP, UDP or ICMP is rejected here with the
//! [`DropReason`] that says why.
//!
//! One protocol a module, each with its view (and its tests where it has logic of its own):
//! `ethernet`, `arp`, `ipv4`, `tcp`, `udp`, `icmp`; `mac` for addresses, [`checksum`] for
//! the sums, [`virtio_hdr`] and [`offload`] for the virtio-net header and its offloads. The
//! wire formats come from etherparse and `smoltcp::wire`; only the checks moat needs on top
//! of them (checksums, lengths, fragments, offload offsets) are written here.

mod arp;
pub mod checksum;
mod ethernet;
mod icmp;
mod ipv4;
mod mac;
pub mod offload;
pub mod tcp;
mod udp;
pub mod virtio_hdr;

use etherparse::EtherType;

use crate::telemetry::DropReason;

pub use arp::{Arp, ArpOp};
pub use checksum::{internet_checksum, udp_checksum_ok, L4Checksum};
pub use ethernet::{parse_ethernet, Ethernet, ETH_HDR_LEN};
pub use icmp::{Icmp, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};
pub use ipv4::{Ipv4, Transport};
pub use mac::{MacAddr, ParseMacError, GATEWAY_MAC};
pub use tcp::{Tcp, TcpFlags};
pub use udp::{udp_packet, Udp};
pub use virtio_hdr::VirtioNetHdr;

/// A parsed frame: the Ethernet header and what it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub eth: Ethernet,
    pub net: Network<'a>,
}

/// The network layer of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network<'a> {
    Arp(Arp),
    Ipv4(Ipv4<'a>),
}

/// IP packets for the guest (from the stack, UDP associations, the upstream resolver) are
/// built behind this much room: the virtio-net header and the Ethernet header are then
/// written in front of each in place, with no copy per delivered packet.
pub const PACKET_HEADROOM: usize = virtio_hdr::VIRTIO_NET_HDR_LEN + ETH_HDR_LEN;

/// Parse one Ethernet frame (without the virtio-net header). Its TCP/UDP/ICMP checksum is
/// summed when the transport's `checksum()` is asked (a wrong one is not an error here:
/// whoever would use the packet asks and drops it, after the firewall had its say). A guest's TX
/// buffer goes through [`offload::TxFrame`] instead, which completes partial sums first.
pub fn parse(bytes: &[u8]) -> Result<Frame<'_>, DropReason> {
    parse_completed(bytes, false)
}

/// Parse a frame whose TCP/UDP checksum moat has just `completed` (a guest's NEEDS_CSUM):
/// its state is then [`L4Checksum::Completed`], without summing the packet a second time.
fn parse_completed(bytes: &[u8], completed: bool) -> Result<Frame<'_>, DropReason> {
    let eth_view = parse_ethernet(bytes)?;
    let payload = &bytes[ETH_HDR_LEN..];
    let net = match EtherType(eth_view.ethertype) {
        EtherType::ARP => Network::Arp(arp::parse(payload)?),
        EtherType::IPV4 => Network::Ipv4(ipv4::parse(payload, completed)?),
        EtherType::IPV6 => return Err(DropReason::Ipv6),
        t if ethernet::ETHERTYPE_VLAN_TAGS.contains(&t.0) => return Err(DropReason::Vlan),
        _ => return Err(DropReason::UnsupportedEthertype),
    };
    Ok(Frame { eth: eth_view, net })
}

#[cfg(test)]
mod tests;
