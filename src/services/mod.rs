//! The gateway's own answers: ARP for the gateway address, DHCP for the VM, ICMP echo, DNS.
//!
//! Each service takes a frame the firewall already handed to it and returns the frame to put
//! in the guest's RX queue (Ethernet onwards; the device adds the virtio-net header), or the
//! reason it will not answer.

pub mod arp;
pub mod dhcp;
pub mod dns;
pub mod icmp;

use std::sync::{Arc, Mutex};

use etherparse::PacketBuilder;

use crate::frame::{Frame, Network, Transport, GATEWAY_MAC};
use crate::policy::{Policy, Vm};
use crate::telemetry::{Counters, DropReason, Service};
use dns::NamePool;

/// The gateway as the guest sees it: the VM's addressing and DNS view from the policy.
#[derive(Debug)]
pub struct Gateway {
    vm: Vm,
    dns: crate::policy::Dns,
    names: Arc<Mutex<NamePool>>,
    counters: Arc<Counters>,
}

impl Gateway {
    pub fn new(policy: &Policy, names: Arc<Mutex<NamePool>>, counters: Arc<Counters>) -> Gateway {
        Gateway {
            vm: policy.vm.clone(),
            dns: policy.dns.clone(),
            names,
            counters,
        }
    }

    /// Take the DNS view of a reloaded policy (the VM's addressing cannot change on reload).
    pub fn reload(&mut self, policy: &Policy) {
        self.dns = policy.dns.clone();
    }

    /// Answer `frame` with `service`. `Ok(None)` means handled with nothing to send back
    /// (a DHCP RELEASE).
    pub fn answer(
        &mut self,
        service: Service,
        frame: &Frame<'_>,
    ) -> Result<Option<Vec<u8>>, DropReason> {
        match service {
            Service::Arp => arp::answer(&self.vm, frame).map(Some),
            Service::Dhcp => dhcp::answer(&self.vm, frame),
            Service::IcmpEcho => icmp::answer(&self.vm, frame).map(Some),
            Service::Dns => self.dns_over_udp(frame).map(Some),
        }
    }

    /// With `mode = "upstream"`: the name a DNS query in `frame` is for, when it should be
    /// forwarded rather than answered here.
    pub fn upstream_query(&self, frame: &Frame<'_>) -> Option<String> {
        if self.dns.mode != crate::policy::DnsMode::Upstream {
            return None;
        }
        let Network::Ipv4(ip) = &frame.net else {
            return None;
        };
        let Transport::Udp(udp) = &ip.transport else {
            return None;
        };
        if !udp.checksum.ok() {
            return None;
        }
        dns::upstream_name(&self.dns, udp.payload)
    }

    fn dns_over_udp(&mut self, frame: &Frame<'_>) -> Result<Vec<u8>, DropReason> {
        let Network::Ipv4(ip) = &frame.net else {
            return Err(DropReason::L4Malformed);
        };
        let Transport::Udp(udp) = &ip.transport else {
            return Err(DropReason::L4Malformed);
        };
        if !udp.checksum.ok() {
            return Err(DropReason::L4BadChecksum);
        }
        let (reply, outcome) = {
            // A poisoned lock only means another connection's worker panicked mid-assign;
            // the pool itself is still consistent.
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            dns::answer(&self.dns, &mut names, udp.payload).ok_or(DropReason::DnsMalformed)?
        };
        self.counters.dns_answered(outcome);
        let builder = PacketBuilder::ethernet2(GATEWAY_MAC.0, self.vm.mac.0)
            .ipv4(self.vm.gateway.octets(), ip.src.octets(), icmp::GATEWAY_TTL)
            .udp(udp.dst_port, udp.src_port);
        let mut out = Vec::with_capacity(builder.size(reply.len()));
        builder
            .write(&mut out, &reply)
            .map_err(|_| DropReason::DnsMalformed)?;
        Ok(out)
    }
}
