//! DNS over UDP at the gateway: a guest's query to port 53, answered in a frame of its own
//! (or, with `mode = "upstream"`, handed to the upstream resolver by the flow table).

use std::sync::{Arc, Mutex};

use etherparse::PacketBuilder;

use super::answer::answer;
use super::pool::NamePool;
use super::upstream::upstream_name;
use crate::frame::{Frame, Network, Transport, GATEWAY_MAC};
use crate::policy::{Dns, DnsMode, Policy, Vm};
use crate::services::icmp::GATEWAY_TTL;
use crate::telemetry::{Counters, DropReason};

/// The gateway's DNS over UDP: the VM's addressing and DNS view from the policy.
#[derive(Debug)]
pub struct UdpDns {
    vm: Vm,
    dns: Dns,
    names: Arc<Mutex<NamePool>>,
    counters: Arc<Counters>,
}

impl UdpDns {
    pub fn new(policy: &Policy, names: Arc<Mutex<NamePool>>, counters: Arc<Counters>) -> UdpDns {
        UdpDns {
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

    /// With `mode = "upstream"`: the name a DNS query in `frame` is for, when it should be
    /// forwarded rather than answered here.
    pub fn upstream_query(&self, frame: &Frame<'_>) -> Option<String> {
        if self.dns.mode != DnsMode::Upstream {
            return None;
        }
        let Network::Ipv4(ip) = &frame.net else {
            return None;
        };
        let Transport::Udp(udp) = &ip.transport else {
            return None;
        };
        if !udp.checksum().ok() {
            return None;
        }
        upstream_name(&self.dns, udp.payload)
    }

    /// The frame answering the DNS query in `frame`.
    pub fn answer(&mut self, frame: &Frame<'_>) -> Result<Vec<u8>, DropReason> {
        let Network::Ipv4(ip) = &frame.net else {
            return Err(DropReason::L4Malformed);
        };
        let Transport::Udp(udp) = &ip.transport else {
            return Err(DropReason::L4Malformed);
        };
        if !udp.checksum().ok() {
            return Err(DropReason::L4BadChecksum);
        }
        let (reply, outcome) = {
            // A poisoned lock only means another connection's worker panicked mid-assign;
            // the pool itself is still consistent.
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            answer(&self.dns, &mut names, udp.payload).ok_or(DropReason::DnsMalformed)?
        };
        self.counters.dns_answered(outcome);
        let builder = PacketBuilder::ethernet2(GATEWAY_MAC.0, self.vm.mac.0)
            .ipv4(self.vm.gateway.octets(), ip.src.octets(), GATEWAY_TTL)
            .udp(udp.dst_port, udp.src_port);
        let mut out = Vec::with_capacity(builder.size(reply.len()));
        builder
            .write(&mut out, &reply)
            .map_err(|_| DropReason::DnsMalformed)?;
        Ok(out)
    }
}
