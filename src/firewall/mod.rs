//! The verdict for each guest frame: drop it (with a reason), answer it from one of the
//! gateway's own services, or (with the egress work) carry it as a flow.
//!
//! The rules are the isolation invariants of docs/DESIGN.md: the guest speaks only as itself
//! (its MAC, its address), reaches nothing but the gateway, and the gateway answers only
//! ARP for itself, DHCP, ICMP echo and DNS. Nothing is bridged.

pub mod gate;

use std::net::Ipv4Addr;

use crate::frame::{ArpOp, Ethernet, Frame, Network, Transport, ICMP_ECHO_REQUEST};
use crate::frame::{MacAddr, GATEWAY_MAC};
use crate::policy::{Policy, DNS_PORT};
use crate::telemetry::{DropReason, Service};

/// What happens to one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop(DropReason),
    Answer(Service),
    /// TCP or UDP to an address beyond the gateway (or a connection moat carries): the
    /// egress policy decides.
    Flow,
}

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const BROADCAST_MAC: MacAddr = MacAddr([0xff; 6]);

/// The addresses the firewall decides by (taken from the policy's `[vm]`).
#[derive(Clone, Debug)]
pub struct Firewall {
    guest_mac: MacAddr,
    guest_ip: Ipv4Addr,
    gateway_ip: Ipv4Addr,
    directed_broadcast: Ipv4Addr,
    explicit_port: Option<u16>,
}

impl Firewall {
    pub fn new(policy: &Policy) -> Firewall {
        let vm = &policy.vm;
        Firewall {
            guest_mac: vm.mac,
            guest_ip: vm.address,
            gateway_ip: vm.gateway,
            directed_broadcast: vm.broadcast(),
            explicit_port: policy.proxy.explicit_port,
        }
    }

    /// Decide what to do with a parsed guest frame.
    pub fn verdict(&self, frame: &Frame<'_>) -> Verdict {
        match self.link(&frame.eth).and_then(|()| self.check(frame)) {
            Ok(verdict) => verdict,
            Err(reason) => Verdict::Drop(reason),
        }
    }

    /// `verdict` for a frame whose Ethernet header already passed [`Firewall::link`].
    pub fn verdict_after_link(&self, frame: &Frame<'_>) -> Verdict {
        match self.check(frame) {
            Ok(verdict) => verdict,
            Err(reason) => Verdict::Drop(reason),
        }
    }

    /// The link-layer rules alone: the guest's own source MAC, to the gateway or broadcast.
    /// The data path applies them before parsing further, so a frame for another MAC costs
    /// no IPv4 parse.
    pub fn link(&self, eth: &Ethernet) -> Result<(), DropReason> {
        if eth.src != self.guest_mac {
            return Err(DropReason::SpoofedSrcMac);
        }
        let dst = eth.dst;
        let broadcast = dst == BROADCAST_MAC;
        if !broadcast && dst.0[0] & 1 == 1 {
            return Err(DropReason::Multicast);
        }
        if !broadcast && dst != GATEWAY_MAC {
            return Err(DropReason::DstMacNotGateway);
        }
        Ok(())
    }

    /// The rules past the link layer.
    fn check(&self, frame: &Frame<'_>) -> Result<Verdict, DropReason> {
        let broadcast = frame.eth.dst == BROADCAST_MAC;
        match &frame.net {
            Network::Arp(arp) => {
                let sender_is_guest =
                    arp.sender_ip == self.guest_ip || arp.sender_ip == Ipv4Addr::UNSPECIFIED;
                if arp.sender_mac != self.guest_mac || !sender_is_guest {
                    return Err(DropReason::ArpSpoofed);
                }
                match arp.op {
                    ArpOp::Request if arp.sender_ip == arp.target_ip => {
                        Err(DropReason::ArpUnsolicited)
                    }
                    ArpOp::Request if arp.target_ip == self.gateway_ip => {
                        Ok(Verdict::Answer(Service::Arp))
                    }
                    ArpOp::Request => Err(DropReason::ArpNotForGateway),
                    ArpOp::Reply | ArpOp::Other(_) => Err(DropReason::ArpUnsolicited),
                }
            }
            Network::Ipv4(ip) => {
                if let Transport::Udp(udp) = &ip.transport {
                    let dhcp = udp.src_port == DHCP_CLIENT_PORT && udp.dst_port == DHCP_SERVER_PORT;
                    let from_guest = ip.src == self.guest_ip || ip.src == Ipv4Addr::UNSPECIFIED;
                    let to_server = ip.dst == Ipv4Addr::BROADCAST || ip.dst == self.gateway_ip;
                    if dhcp && from_guest && to_server {
                        return Ok(Verdict::Answer(Service::Dhcp));
                    }
                }
                if ip.src != self.guest_ip {
                    return Err(DropReason::SpoofedSrcIp);
                }
                if broadcast || ip.dst == Ipv4Addr::BROADCAST || ip.dst == self.directed_broadcast {
                    return Err(DropReason::Broadcast);
                }
                if ip.dst.is_multicast() {
                    return Err(DropReason::Multicast);
                }
                if ip.dst != self.gateway_ip {
                    return match &ip.transport {
                        Transport::Tcp(_) | Transport::Udp(_) => Ok(Verdict::Flow),
                        Transport::Icmp(_) => Err(DropReason::NotAllowed),
                    };
                }
                match &ip.transport {
                    Transport::Icmp(icmp) if icmp.icmp_type == ICMP_ECHO_REQUEST => {
                        Ok(Verdict::Answer(Service::IcmpEcho))
                    }
                    Transport::Icmp(_) => Err(DropReason::IcmpNotEcho),
                    Transport::Udp(udp) if udp.dst_port == DNS_PORT => {
                        Ok(Verdict::Answer(Service::Dns))
                    }
                    Transport::Tcp(tcp)
                        if Some(tcp.dst_port) == self.explicit_port || tcp.dst_port == DNS_PORT =>
                    {
                        Ok(Verdict::Flow)
                    }
                    // Not a new connection: only a flow moat opened (a `[[forward]]`) takes
                    // it; the flow table drops anything else as `tcp_no_flow`.
                    Transport::Tcp(tcp) if !tcp.flags.syn || tcp.flags.ack => Ok(Verdict::Flow),
                    Transport::Udp(_) | Transport::Tcp(_) => Err(DropReason::GatewayPortClosed),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
