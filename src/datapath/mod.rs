//! One guest frame through moat: virtio-net header -> frame -> verdict -> answer | flow | drop.
//!
//! The device hands every TX buffer (one moat-owned copy of it) to [`Datapath::guest_frame`];
//! answers come straight back, flows go to [`Flows`], whose output [`Datapath::pump`] frames
//! for the guest. Every drop is counted here, with its reason.

use std::sync::{Arc, Mutex};

use crate::egress::Flows;
use crate::firewall::{Firewall, Verdict};
use crate::frame::virtio_hdr::VIRTIO_NET_HDR_LEN;
use crate::frame::{self, Frame, Network, Transport, VirtioNetHdr, ETH_HDR_LEN};
use crate::policy::{MacAddr, Policy, GATEWAY_MAC};
use crate::services::dns::NamePool;
use crate::services::Gateway;
use crate::telemetry::{Counters, DropReason, Service, Traffic};

/// The guest-facing data path of one VM.
#[derive(Debug)]
pub struct Datapath {
    firewall: Firewall,
    gateway: Gateway,
    flows: Flows,
    counters: Arc<Counters>,
    max_frame_len: usize,
    guest_mac: MacAddr,
}

impl Datapath {
    pub fn new(
        policy: Arc<Policy>,
        names: Arc<Mutex<NamePool>>,
        counters: Arc<Counters>,
    ) -> Datapath {
        Datapath {
            firewall: Firewall::new(&policy),
            gateway: Gateway::new(&policy, Arc::clone(&names), Arc::clone(&counters)),
            max_frame_len: ETH_HDR_LEN + usize::from(policy.vm.mtu),
            guest_mac: policy.vm.mac,
            flows: Flows::new(policy, names, Arc::clone(&counters)),
            counters,
        }
    }

    /// Apply a reloaded policy: new frames and flows follow it; flows it no longer allows
    /// are reset. Returns how many were.
    pub fn reload(&mut self, policy: Arc<Policy>) -> usize {
        self.firewall = Firewall::new(&policy);
        self.gateway.reload(&policy);
        self.flows.reload(policy)
    }

    pub fn flows(&mut self) -> &mut Flows {
        &mut self.flows
    }

    /// Run the flows; every IP packet they have for the guest becomes a frame for `out`.
    pub fn pump(&mut self, mut out: impl FnMut(Vec<u8>)) {
        for packet in self.flows.pump() {
            let mut frame = Vec::with_capacity(ETH_HDR_LEN + packet.len());
            frame.extend_from_slice(&self.guest_mac.0);
            frame.extend_from_slice(&GATEWAY_MAC.0);
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            frame.extend_from_slice(&packet);
            out(frame);
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The largest TX buffer (header + frame) worth reading; anything longer is dropped
    /// as oversized without being copied.
    pub fn max_tx_len(&self) -> usize {
        VIRTIO_NET_HDR_LEN + self.max_frame_len
    }

    /// Count a TX buffer that never made it to parsing (bad descriptors, too long).
    pub fn reject(&self, reason: DropReason, len: usize) {
        self.counters.add(Traffic::TxFrames, 1);
        self.counters.add(Traffic::TxBytes, len as u64);
        self.counters
            .drop_frame(reason, format_args!("tx buffer of {len} bytes"));
    }

    /// Handle one TX buffer: the virtio-net header followed by the frame.
    /// Returns the frame to send back to the guest, if any.
    pub fn guest_frame(&mut self, buf: &[u8]) -> Option<Vec<u8>> {
        self.counters.add(Traffic::TxFrames, 1);
        self.counters.add(Traffic::TxBytes, buf.len() as u64);
        match self.decide(buf) {
            Ok(answer) => answer,
            Err((reason, summary)) => {
                self.counters.drop_frame(reason, format_args!("{summary}"));
                None
            }
        }
    }

    fn decide(&mut self, buf: &[u8]) -> Result<Option<Vec<u8>>, (DropReason, Summary)> {
        let no_summary = |reason| (reason, Summary::Bytes(buf.len()));
        let hdr = VirtioNetHdr::parse(buf).map_err(no_summary)?;
        hdr.check_tx().map_err(no_summary)?;
        let bytes = &buf[VIRTIO_NET_HDR_LEN..];
        if bytes.len() > self.max_frame_len {
            return Err(no_summary(DropReason::Oversized));
        }
        let frame = frame::parse(bytes).map_err(no_summary)?;
        match self.firewall.verdict(&frame) {
            Verdict::Drop(reason) => Err((reason, summarize(&frame))),
            Verdict::Flow => {
                let Network::Ipv4(ip) = &frame.net else {
                    return Err((DropReason::NotAllowed, summarize(&frame)));
                };
                let carried = match &ip.transport {
                    Transport::Tcp(tcp) => self.flows.guest_tcp(ip, tcp),
                    Transport::Udp(udp) => self.flows.guest_udp(ip, udp),
                    Transport::Icmp(_) => Err(DropReason::NotAllowed),
                };
                carried
                    .map(|()| None)
                    .map_err(|reason| (reason, summarize(&frame)))
            }
            Verdict::Answer(Service::Dns) => match self.gateway.upstream_query(&frame) {
                // mode = "upstream": allowed names are asked of the resolver, asynchronously.
                Some(name) => self.forward_dns(&frame, name),
                None => self.answer(Service::Dns, &frame),
            },
            Verdict::Answer(service) => self.answer(service, &frame),
        }
    }

    fn forward_dns(
        &mut self,
        frame: &Frame<'_>,
        name: String,
    ) -> Result<Option<Vec<u8>>, (DropReason, Summary)> {
        let Network::Ipv4(ip) = &frame.net else {
            return Err((DropReason::DnsMalformed, summarize(frame)));
        };
        let Transport::Udp(udp) = &ip.transport else {
            return Err((DropReason::DnsMalformed, summarize(frame)));
        };
        self.counters.answered(Service::Dns);
        self.flows
            .forward_dns(udp.src_port, udp.payload, name)
            .map(|()| None)
            .map_err(|reason| (reason, summarize(frame)))
    }

    fn answer(
        &mut self,
        service: Service,
        frame: &Frame<'_>,
    ) -> Result<Option<Vec<u8>>, (DropReason, Summary)> {
        match self.gateway.answer(service, frame) {
            Ok(answer) => {
                self.counters.answered(service);
                Ok(answer)
            }
            Err(reason) => Err((reason, summarize(frame))),
        }
    }
}

/// What a drop log line says about a frame: built without allocating (drops are the hot
/// path of a flooding guest) and formatted only when the line is actually logged.
#[derive(Clone, Copy, Debug)]
pub enum Summary {
    /// Not parsed that far: just its size.
    Bytes(usize),
    Arp {
        op: crate::frame::ArpOp,
        sender_ip: std::net::Ipv4Addr,
        target_ip: std::net::Ipv4Addr,
        src: MacAddr,
    },
    Ip {
        proto: &'static str,
        src: std::net::Ipv4Addr,
        sport: u16,
        dst: std::net::Ipv4Addr,
        dport: u16,
        mac: MacAddr,
    },
    Icmp {
        icmp_type: u8,
        src: std::net::Ipv4Addr,
        dst: std::net::Ipv4Addr,
        mac: MacAddr,
    },
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Summary::Bytes(n) => write!(f, "{n} bytes"),
            Summary::Arp {
                op,
                sender_ip,
                target_ip,
                src,
            } => write!(f, "arp {op:?} {sender_ip} -> {target_ip} (from {src})"),
            Summary::Ip {
                proto,
                src,
                sport,
                dst,
                dport,
                mac,
            } => write!(f, "{proto} {src}:{sport} -> {dst}:{dport} (from {mac})"),
            Summary::Icmp {
                icmp_type,
                src,
                dst,
                mac,
            } => write!(f, "icmp type {icmp_type} {src} -> {dst} (from {mac})"),
        }
    }
}

/// The drop-log description of a parsed frame: addresses, protocol, ports.
pub fn summarize(frame: &Frame<'_>) -> Summary {
    let mac = frame.eth.src;
    match &frame.net {
        Network::Arp(arp) => Summary::Arp {
            op: arp.op,
            sender_ip: arp.sender_ip,
            target_ip: arp.target_ip,
            src: mac,
        },
        Network::Ipv4(ip) => match &ip.transport {
            Transport::Tcp(t) => Summary::Ip {
                proto: "tcp",
                src: ip.src,
                sport: t.src_port,
                dst: ip.dst,
                dport: t.dst_port,
                mac,
            },
            Transport::Udp(u) => Summary::Ip {
                proto: "udp",
                src: ip.src,
                sport: u.src_port,
                dst: ip.dst,
                dport: u.dst_port,
                mac,
            },
            Transport::Icmp(i) => Summary::Icmp {
                icmp_type: i.icmp_type,
                src: ip.src,
                dst: ip.dst,
                mac,
            },
        },
    }
}

#[cfg(test)]
mod tests;
