//! The smoltcp side of the stack: the `Device` a poll reads guest packets from and writes
//! the stack's packets to, and the interface that owns the gateway address.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::MAX_EGRESS_BYTES;
use crate::frame::PACKET_HEADROOM;

/// One guest connection's device: the packets the guest sent on it, and the packets the
/// stack makes (for every connection) on the way out.
pub(super) struct SlotDevice<'a> {
    pub(super) inbox: &'a mut VecDeque<Vec<u8>>,
    pub(super) out: &'a mut Vec<Vec<u8>>,
    /// Bytes in `out`.
    pub(super) out_bytes: &'a mut usize,
    pub(super) mtu: usize,
}

/// A received packet as a smoltcp RX token (also used by the simulated guest's stack).
pub struct Rx(pub Vec<u8>);
pub(super) struct Tx<'a>(&'a mut Vec<Vec<u8>>, &'a mut usize);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    /// The packet is built behind PACKET_HEADROOM, where the data path writes the
    /// virtio-net and Ethernet headers without copying the packet.
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; PACKET_HEADROOM + len];
        let r = f(&mut buf[PACKET_HEADROOM..]);
        *self.1 += buf.len();
        self.0.push(buf);
        r
    }
}

impl Device for SlotDevice<'_> {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let packet = self.inbox.pop_front()?;
        // Answers to a received packet (ACKs, RSTs) always go: at most one per packet.
        Some((Rx(packet), Tx(self.out, self.out_bytes)))
    }

    fn transmit(&mut self, _now: SmolInstant) -> Option<Tx<'_>> {
        if *self.out_bytes >= MAX_EGRESS_BYTES {
            return None; // the socket keeps its data until the packets are taken
        }
        Some(Tx(self.out, self.out_bytes))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The data path already checked the IPv4 header (frame::parse) and the TCP sum (or
        // computed a guest's partial one) of every packet it hands over: compute sums on
        // the way out, do not verify them a second time on the way in.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

/// The interface: the gateway's address, any-IP (it answers for every destination the
/// data path hands it), a default route.
pub(super) fn interface(mtu: usize, gateway: Ipv4Addr, prefix_len: u8) -> Interface {
    let (mut inbox, mut out, mut out_bytes) = (VecDeque::new(), Vec::new(), 0);
    let mut device = SlotDevice {
        inbox: &mut inbox,
        out: &mut out,
        out_bytes: &mut out_bytes,
        mtu,
    };
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ip),
        &mut device,
        SmolInstant::ZERO,
    );
    iface.update_ip_addrs(|addrs| {
        let cidr = IpCidr::new(IpAddress::Ipv4(gateway), prefix_len);
        // One address: cannot overflow the fixed-size list.
        let _ = addrs.push(cidr);
    });
    let _ = iface.routes_mut().add_default_ipv4_route(gateway);
    iface.set_any_ip(true);
    iface
}
