//! One guest frame through moat: virtio-net header -> frame -> verdict -> answer | flow | drop.
//!
//! The device hands every TX buffer (one moat-owned copy of it) to [`Datapath::guest_frame`];
//! answers come straight back, flows go to [`Flows`], whose output [`Datapath::pump`] frames
//! for the guest. Every drop is counted here, with its reason.

use std::sync::{Arc, Mutex};

use crate::dns::udp::UdpDns;
use crate::dns::NamePool;
use crate::egress::steering::Steering;
use crate::egress::{Carried, FlowSnapshot, Flows, Registrar};
use crate::firewall::{Firewall, Verdict};
use crate::frame::offload::{self, RxRefused, TxFrame};
use crate::frame::virtio_hdr::{Offloads, OutHdr};
use crate::frame::{self, Frame, MacAddr, Network, Transport, ETH_HDR_LEN, GATEWAY_MAC};
use crate::policy::{Forward, Policy};
use crate::services::Gateway;
use crate::telemetry::{Counters, DropReason, Service, Traffic};

/// Where a TX buffer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from this pair's TX queue.
    Queue,
    /// Read by another pair, whose flow table said the flow is this pair's.
    Handoff,
}

/// What became of a TX buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Dropped (counted), or carried into a flow.
    Consumed,
    /// The gateway's answer, for this pair's RX queue.
    Answer(Vec<u8>),
    /// A frame of a flow another queue pair owns: hand the buffer to that pair.
    Handoff(usize),
}

/// The guest-facing data path of one queue pair of a VM.
#[derive(Debug)]
pub struct Datapath {
    firewall: Firewall,
    gateway: Gateway,
    dns: UdpDns,
    flows: Flows,
    counters: Arc<Counters>,
    max_frame_len: usize,
    guest_mac: MacAddr,
    /// What the driver acked: partial checksums and 64 KiB TCP segments each way.
    offloads: Offloads,
}

impl Datapath {
    pub fn new(
        policy: Arc<Policy>,
        names: Arc<Mutex<NamePool>>,
        counters: Arc<Counters>,
    ) -> Datapath {
        Datapath {
            firewall: Firewall::new(&policy),
            gateway: Gateway::new(&policy),
            dns: UdpDns::new(&policy, Arc::clone(&names), Arc::clone(&counters)),
            max_frame_len: ETH_HDR_LEN + usize::from(policy.vm.mtu),
            guest_mac: policy.vm.mac,
            offloads: Offloads::default(),
            flows: Flows::new(policy, names, Arc::clone(&counters)),
            counters,
        }
    }

    /// Apply a reloaded policy: new frames and flows follow it; flows it no longer allows
    /// are reset. Returns how many were.
    pub fn reload(&mut self, policy: Arc<Policy>) -> usize {
        self.firewall = Firewall::new(&policy);
        self.dns.reload(&policy);
        self.flows.reload(policy)
    }

    /// Where this pair's flow table sits: the first event token it may hand out (those
    /// below belong to its event loop), its part in steering, its slot in the descriptor
    /// budget.
    pub fn place(&mut self, first_token: u64, steering: Steering, fd_slot: usize) {
        self.flows.place(first_token, steering);
        self.flows.set_fd_slot(fd_slot);
    }

    /// Hook the flows into the event loop that watches their host sockets (and open the
    /// `[[forward]]` listeners).
    pub fn attach(&mut self, registrar: Box<dyn Registrar>) {
        self.flows.attach(registrar);
    }

    /// The event loop is gone (its connection ended): close every flow.
    pub fn detach(&mut self) {
        self.flows.detach();
    }

    /// Forwards added at run time, on top of the policy's.
    pub fn set_forwards(&mut self, forwards: Vec<Forward>) {
        self.flows.set_runtime_forwards(forwards);
    }

    /// The flow table as it is now, for `moat stats`.
    pub fn snapshot(&self) -> Vec<FlowSnapshot> {
        self.flows.table()
    }

    /// A host socket of a flow (by its event token) is ready.
    pub fn host_event(&mut self, token: u64, events: vmm_sys_util::epoll::EventSet) {
        self.flows.host_event(token, events);
    }

    /// When the flows next need a pump of their own (see `Flows::poll_delay`).
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        self.flows.poll_delay()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        self.flows.policy()
    }

    /// The driver acked its features: from now on, frames may use these offloads.
    pub fn set_offloads(&mut self, offloads: Offloads) {
        self.offloads = offloads;
        self.flows
            .set_large_segments(offloads.host_tso4, offloads.guest_tso4);
    }

    /// Run the flows; every IP packet they have for the guest (each behind PACKET_HEADROOM)
    /// becomes a frame for `out`: its Ethernet header written in place, behind room for its
    /// virtio-net header, with what that header must say.
    pub fn pump(&mut self, mut out: impl FnMut(Vec<u8>, OutHdr)) {
        let mtu = self.max_frame_len - ETH_HDR_LEN;
        for mut frame in self.flows.pump() {
            match offload::to_guest(&mut frame, self.guest_mac, mtu, self.offloads) {
                Ok(hdr) => out(frame, hdr),
                Err(RxRefused::NoHeadroom) => {}
                Err(RxRefused::Oversized { len }) => {
                    self.counters.drop_frame(
                        DropReason::Oversized,
                        format_args!("stack packet of {len} bytes"),
                    );
                }
            }
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The largest TX buffer (header + frame) worth reading; anything longer is dropped
    /// as oversized without being copied.
    pub fn max_tx_len(&self) -> usize {
        self.offloads.max_tx_len(self.max_frame_len)
    }

    /// Count the drop of a TX buffer that never made it to parsing (bad descriptors, too
    /// long). Its TX traffic is counted by the caller, with the rest of its batch.
    pub fn reject(&self, reason: DropReason, len: usize) {
        self.counters
            .drop_frame(reason, format_args!("tx buffer of {len} bytes"));
    }

    /// Handle one TX buffer: the virtio-net header followed by the frame.
    /// Returns the frame to send back to the guest, if any (one queue pair: no handoffs).
    pub fn guest_frame(&mut self, buf: &mut [u8]) -> Option<Vec<u8>> {
        self.counters.add(Traffic::TxFrames, 1);
        self.counters.add(Traffic::TxBytes, buf.len() as u64);
        match self.handle(buf, Origin::Queue) {
            Outcome::Answer(answer) => Some(answer),
            Outcome::Consumed | Outcome::Handoff(_) => None,
        }
    }

    /// Handle one TX buffer read from this pair's queue, or handed over by another pair.
    /// The caller counts TX traffic (per batch: one atomic add, not two per frame).
    pub fn handle(&mut self, buf: &mut [u8], origin: Origin) -> Outcome {
        match self.decide(buf) {
            Ok(Outcome::Handoff(_)) if origin == Origin::Handoff => {
                // The flow moved again while the frame was on its way: give up on it (the
                // guest's TCP retransmits).
                self.counters.drop_frame(
                    DropReason::HandoffFailed,
                    format_args!("{} bytes handed over twice", buf.len()),
                );
                Outcome::Consumed
            }
            Ok(outcome) => outcome,
            Err((reason, summary)) => {
                self.counters.drop_frame(reason, format_args!("{summary}"));
                Outcome::Consumed
            }
        }
    }

    fn decide(&mut self, buf: &mut [u8]) -> Result<Outcome, (DropReason, Summary)> {
        let len = buf.len();
        let no_summary = |reason| (reason, Summary::Bytes(len));
        let tx = TxFrame::read(buf, self.offloads, self.max_frame_len).map_err(no_summary)?;
        // The link rules first, so a frame to another MAC costs no IPv4 parse. Only for what
        // moat parses further (IPv4, ARP): other ethertypes keep their own drop reason, and
        // `frame::parse` refuses them, so every parsed frame passed the link rules here.
        let eth = frame::parse_ethernet(tx.bytes()).map_err(no_summary)?;
        if eth.is_ipv4_or_arp() {
            self.firewall.link(&eth).map_err(|reason| {
                let summary = Summary::Eth {
                    src: eth.src,
                    dst: eth.dst,
                    ethertype: eth.ethertype,
                };
                (reason, summary)
            })?;
        }
        let frame = tx.parse().map_err(no_summary)?;
        match self.firewall.verdict_after_link(&frame) {
            Verdict::Drop(reason) => Err((reason, summarize(&frame))),
            Verdict::Flow => {
                let Network::Ipv4(ip) = &frame.net else {
                    return Err((DropReason::NotAllowed, summarize(&frame)));
                };
                let carried = match &ip.transport {
                    // The stack trusts what reaches it, and a UDP association relays the
                    // payload as it is: a packet with a wrong sum goes no further.
                    Transport::Tcp(tcp) if !tcp.checksum().ok() => Err(DropReason::L4BadChecksum),
                    Transport::Udp(udp) if !udp.checksum().ok() => Err(DropReason::L4BadChecksum),
                    Transport::Tcp(tcp) => self.flows.guest_tcp(ip, tcp),
                    Transport::Udp(udp) => self.flows.guest_udp(ip, udp),
                    Transport::Icmp(_) => Err(DropReason::NotAllowed),
                };
                match carried {
                    Ok(Carried::Here) => Ok(Outcome::Consumed),
                    Ok(Carried::Elsewhere(pair)) => Ok(Outcome::Handoff(pair)),
                    Err(reason @ (DropReason::FlowLimit | DropReason::FdBudget)) => {
                        // Refused for want of room: the guest hears it at once (a RST), not
                        // after its SYN retries time out.
                        self.counters
                            .drop_frame(reason, format_args!("{}", summarize(&frame)));
                        Ok(refusal(&frame).map_or(Outcome::Consumed, Outcome::Answer))
                    }
                    Err(reason) => Err((reason, summarize(&frame))),
                }
            }
            Verdict::Answer(Service::Dns) => match self.dns.upstream_query(&frame) {
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
    ) -> Result<Outcome, (DropReason, Summary)> {
        let Network::Ipv4(ip) = &frame.net else {
            return Err((DropReason::DnsMalformed, summarize(frame)));
        };
        let Transport::Udp(udp) = &ip.transport else {
            return Err((DropReason::DnsMalformed, summarize(frame)));
        };
        self.counters.answered(Service::Dns);
        self.flows
            .forward_dns(udp.src_port, udp.payload, name)
            .map(|()| Outcome::Consumed)
            .map_err(|reason| (reason, summarize(frame)))
    }

    fn answer(
        &mut self,
        service: Service,
        frame: &Frame<'_>,
    ) -> Result<Outcome, (DropReason, Summary)> {
        let answered = match service {
            Service::Dns => self.dns.answer(frame).map(Some),
            _ => self.gateway.answer(service, frame),
        };
        match answered {
            Ok(answer) => {
                self.counters.answered(service);
                Ok(answer.map_or(Outcome::Consumed, Outcome::Answer))
            }
            Err(reason) => Err((reason, summarize(frame))),
        }
    }
}

/// The RST (with ACK) that refuses a guest's TCP SYN, as if from its destination.
fn refusal(frame: &Frame<'_>) -> Option<Vec<u8>> {
    let Network::Ipv4(ip) = &frame.net else {
        return None;
    };
    let Transport::Tcp(tcp) = &ip.transport else {
        return None;
    };
    if !tcp.flags.syn || tcp.flags.ack || tcp.flags.rst {
        return None;
    }
    let acked = tcp
        .seq
        .wrapping_add(1)
        .wrapping_add(tcp.payload.len() as u32);
    let builder = etherparse::PacketBuilder::ethernet2(GATEWAY_MAC.0, frame.eth.src.0)
        .ipv4(ip.dst.octets(), ip.src.octets(), 64)
        .tcp(tcp.dst_port, tcp.src_port, 0, 0)
        .rst()
        .ack(acked);
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

/// What a drop log line says about a frame: built without allocating (drops are the hot
/// path of a flooding guest) and formatted only when the line is actually logged.
#[derive(Clone, Copy, Debug)]
pub enum Summary {
    /// Not parsed that far: just its size.
    Bytes(usize),
    /// Dropped on its Ethernet header.
    Eth {
        src: MacAddr,
        dst: MacAddr,
        ethertype: u16,
    },
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
            Summary::Eth {
                src,
                dst,
                ethertype,
            } => write!(f, "ethertype {ethertype:#06x} {src} -> {dst}"),
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
