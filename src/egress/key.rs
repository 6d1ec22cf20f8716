//! Which guest flow a packet belongs to: the guest's port and the destination it sent to
//! (the guest's own address is the VM's, the same for every flow). TCP flows and UDP
//! associations use the same key; their tables, and steering, keep the protocols apart.

use std::fmt;
use std::net::Ipv4Addr;

/// Identifies a guest connection or association: guest port, destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest:{} -> {}:{}",
            self.guest_port, self.dst, self.dst_port
        )
    }
}

impl FlowKey {
    /// The key of a UDP association as logs and `moat stats` show it (`udp guest:...`).
    pub fn udp(&self) -> UdpLabel {
        UdpLabel(*self)
    }
}

/// A UDP association's key, displayed with its protocol.
#[derive(Clone, Copy, Debug)]
pub struct UdpLabel(FlowKey);

impl fmt::Display for UdpLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "udp {}", self.0)
    }
}
