//! Counters for everything the data path does, and above all for everything it drops.
//!
//! Every drop has a [`DropReason`] and a counter. The first drops of each reason are logged,
//! then only every power of two, so a flooding guest cannot flood the log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

pub mod metrics;

/// How many drops of one reason are logged before logging thins out to powers of two.
const LOG_FIRST: u64 = 5;

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// Why a frame (or an answer to the guest) was dropped. One counter each.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DropReason { $( $(#[$doc])* $variant, )* }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// The stable snake_case name used in logs, tables and metrics.
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

reasons! {
    /// A descriptor chain that could not be read: outside guest memory, wrong direction,
    /// indirect inside indirect, too long, or the queue itself is malformed.
    BadDescriptor => "bad_descriptor",
    /// Shorter than the virtio-net header plus an Ethernet header.
    Truncated => "truncated",
    /// Longer than the MTU allows.
    Oversized => "oversized",
    /// A virtio-net header asking for offloads that were not negotiated.
    BadVirtioHeader => "bad_virtio_header",
    /// Source MAC is not the VM's.
    SpoofedSrcMac => "spoofed_src_mac",
    /// Unicast to a MAC other than the gateway's: nothing is bridged.
    DstMacNotGateway => "dst_mac_not_gateway",
    /// Multicast Ethernet destination.
    Multicast => "multicast",
    /// 802.1Q / QinQ tagged frame.
    Vlan => "vlan",
    /// IPv6 of any kind (unsupported until it keeps the same invariants).
    Ipv6 => "ipv6",
    /// An ethertype other than IPv4 and ARP.
    UnsupportedEthertype => "unsupported_ethertype",
    /// An ARP packet that is not Ethernet/IPv4 or is cut short.
    ArpMalformed => "arp_malformed",
    /// ARP whose sender MAC or IP is not the VM's.
    ArpSpoofed => "arp_spoofed",
    /// ARP request for an address other than the gateway.
    ArpNotForGateway => "arp_not_for_gateway",
    /// ARP replies and gratuitous ARP from the guest.
    ArpUnsolicited => "arp_unsolicited",
    /// IPv4 header that does not parse or whose lengths disagree with the frame.
    Ipv4Malformed => "ipv4_malformed",
    /// IPv4 header checksum is wrong.
    Ipv4BadChecksum => "ipv4_bad_checksum",
    /// IPv4 header carries options.
    Ipv4Options => "ipv4_options",
    /// IPv4 fragment (more-fragments set or a non-zero offset).
    Ipv4Fragment => "ipv4_fragment",
    /// TTL of zero.
    TtlExpired => "ttl_expired",
    /// IPv4 source is not the VM's address.
    SpoofedSrcIp => "spoofed_src_ip",
    /// Broadcast (limited or directed) that is not DHCP.
    Broadcast => "broadcast",
    /// TCP/UDP/ICMP header cut short or inconsistent.
    L4Malformed => "l4_malformed",
    /// A TCP/UDP/ICMP checksum that is wrong (checked where moat answers).
    L4BadChecksum => "l4_bad_checksum",
    /// An IP protocol other than TCP, UDP and ICMP.
    UnsupportedProtocol => "unsupported_protocol",
    /// To the gateway, on a port or protocol it does not serve.
    GatewayPortClosed => "gateway_port_closed",
    /// ICMP to the gateway that is not an echo request.
    IcmpNotEcho => "icmp_not_echo",
    /// To an address the policy does not allow.
    NotAllowed => "not_allowed",
    /// DHCP message that does not parse.
    DhcpMalformed => "dhcp_malformed",
    /// DHCP whose client hardware address is not the VM's MAC.
    DhcpWrongClient => "dhcp_wrong_client",
    /// DNS message without even a header to answer.
    DnsMalformed => "dns_malformed",
    /// DHCP message type the server does not act on (OFFER/ACK from the guest, DECLINE, ...).
    DhcpIgnored => "dhcp_ignored",
    /// A TCP segment (not a SYN) for a connection moat does not know.
    TcpNoFlow => "tcp_no_flow",
    /// A SYN with FIN or RST set.
    TcpBadFlags => "tcp_bad_flags",
    /// `limits.max_flows` reached: new connections are refused (a SYN gets a RST).
    FlowLimit => "flow_limit",
    /// The descriptor budget is spent (RLIMIT_NOFILE less moat's own and the operator's
    /// reserve): new connections are refused (a SYN gets a RST).
    FdBudget => "fd_budget",
    /// To a 198.18.0.0/15 address moat never gave out in DNS.
    UnknownSyntheticAddress => "unknown_synthetic_address",
    /// To a reserved range (loopback, private, link-local, metadata, ...) no rule names,
    /// however the guest spelled it (IP literal, `127.1`, `0x7f000001`, `localhost`, ...).
    ReservedDestination => "reserved_destination",
    /// A destination name from the guest's bytes (SNI, Host, explicit-proxy request) that
    /// is neither a DNS name nor an IPv4 address: an IPv6 literal, stray characters, ...
    BadDestination => "bad_destination",
    /// An upstream resolver's A record in a reserved range no rule names (DNS rebinding):
    /// left out of the guest's answer.
    DnsAnswerReserved => "dns_answer_reserved",
    /// A datagram on the upstream resolver socket that is not the resolver's response to a
    /// question moat asked (wrong source, unknown id, another question): not relayed.
    DnsUpstreamMismatch => "dns_upstream_mismatch",
    /// A request on the explicit-proxy port that is not `CONNECT host:port` or an
    /// absolute-form `http://` request: answered 400.
    ExplicitProxyMalformed => "explicit_proxy_malformed",
    /// The rule's proxy kind is not supported yet.
    EgressUnsupported => "egress_unsupported",
    /// No socket could be opened to the proxy.
    ProxyUnreachable => "proxy_unreachable",
    /// The stack's inbound queue is full.
    StackQueueFull => "stack_queue_full",
    /// A frame of a flow owned by another queue pair could not be handed to it (its inbox
    /// was full, or the flow moved again meanwhile).
    HandoffFailed => "handoff_failed",
    /// An answer for the guest found no RX buffer and the pending queue was full.
    RxQueueFull => "rx_queue_full",
    /// An answer for the guest did not fit the RX buffers it posted.
    RxBufferTooSmall => "rx_buffer_too_small",
    /// A frame for the guest larger than a whole RX ring of the buffers it posted (with
    /// mergeable RX buffers): it can never be delivered; the buffers go back to the guest.
    RxRingTooSmall => "rx_ring_too_small",
}

/// What a DNS query got, for counters and logs (a label here; `crate::dns` decides it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsOutcome {
    /// A record from the synthetic pool.
    Synthetic,
    /// A static record from `dns.records`.
    Static,
    /// Allowed name, but no record of that type (AAAA, MX, ...): empty NOERROR.
    NoData,
    /// Not allowlisted.
    NxDomain,
    /// Malformed query: FORMERR.
    FormErr,
    /// `mode = "upstream"` over TCP: not forwarded (upstream forwarding is UDP only).
    NotImplemented,
    /// `mode = "upstream"`: forwarded to the upstream resolver and relayed back.
    Forwarded,
}

impl DnsOutcome {
    pub const ALL: &'static [DnsOutcome] = &[
        DnsOutcome::Synthetic,
        DnsOutcome::Static,
        DnsOutcome::NoData,
        DnsOutcome::NxDomain,
        DnsOutcome::FormErr,
        DnsOutcome::NotImplemented,
        DnsOutcome::Forwarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DnsOutcome::Synthetic => "synthetic",
            DnsOutcome::Static => "static",
            DnsOutcome::NoData => "nodata",
            DnsOutcome::NxDomain => "nxdomain",
            DnsOutcome::FormErr => "formerr",
            DnsOutcome::NotImplemented => "notimp",
            DnsOutcome::Forwarded => "forwarded",
        }
    }
}

/// Which of the gateway's own services answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Arp,
    Dhcp,
    IcmpEcho,
    Dns,
}

impl Service {
    pub const ALL: &'static [Service] =
        &[Service::Arp, Service::Dhcp, Service::IcmpEcho, Service::Dns];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Arp => "arp",
            Service::Dhcp => "dhcp",
            Service::IcmpEcho => "icmp_echo",
            Service::Dns => "dns",
        }
    }
}

/// What happened to flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowEvent {
    Opened,
    Closed,
    Reset,
    ProxyFailed,
    /// A host peer of a `[[forward]]` was turned away (not in `from`, or the flow limit).
    ForwardRefused,
}

impl FlowEvent {
    pub const ALL: &'static [FlowEvent] = &[
        FlowEvent::Opened,
        FlowEvent::Closed,
        FlowEvent::Reset,
        FlowEvent::ProxyFailed,
        FlowEvent::ForwardRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowEvent::Opened => "opened",
            FlowEvent::Closed => "closed",
            FlowEvent::Reset => "reset",
            FlowEvent::ProxyFailed => "proxy_failed",
            FlowEvent::ForwardRefused => "forward_refused",
        }
    }
}

/// Traffic counters other than drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Frames the guest sent (TX queue).
    TxFrames,
    TxBytes,
    /// Frames moat put in the guest's RX queue.
    RxFrames,
    RxBytes,
    /// Kicks received from the guest, per queue direction.
    TxKicks,
    RxKicks,
    /// Interrupts (used-buffer notifications) sent to the guest.
    Notifications,
    /// Frames read on one queue pair and handed to the pair that owns their flow.
    HandedOff,
}

impl Traffic {
    pub const ALL: &'static [Traffic] = &[
        Traffic::TxFrames,
        Traffic::TxBytes,
        Traffic::RxFrames,
        Traffic::RxBytes,
        Traffic::TxKicks,
        Traffic::RxKicks,
        Traffic::Notifications,
        Traffic::HandedOff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::TxFrames => "tx_frames",
            Traffic::TxBytes => "tx_bytes",
            Traffic::RxFrames => "rx_frames",
            Traffic::RxBytes => "rx_bytes",
            Traffic::TxKicks => "tx_kicks",
            Traffic::RxKicks => "rx_kicks",
            Traffic::Notifications => "notifications",
            Traffic::HandedOff => "handed_off",
        }
    }
}

/// All counters of one VM. Shared (behind an `Arc`) by the queue worker and whoever reads them.
#[derive(Debug)]
pub struct Counters {
    drops: Vec<AtomicU64>,
    answers: Vec<AtomicU64>,
    traffic: Vec<AtomicU64>,
    dns: Vec<AtomicU64>,
    flows: Vec<AtomicU64>,
    /// Flows open right now (TCP flows, DNS-over-TCP, UDP associations), set by the loop.
    pub flows_open: AtomicU64,
    /// Policy reloads that took effect, and the generation now in force (1 = as started).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub policy_generation: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Counters {
            drops: zeros(DropReason::ALL.len()),
            answers: zeros(Service::ALL.len()),
            traffic: zeros(Traffic::ALL.len()),
            dns: zeros(DnsOutcome::ALL.len()),
            flows: zeros(FlowEvent::ALL.len()),
            flows_open: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            policy_generation: AtomicU64::new(1),
        }
    }
}

impl Counters {
    /// Count a drop and log it (lazily formatted `detail`) if this reason is not yet thinned out.
    pub fn drop_frame(&self, reason: DropReason, detail: fmt::Arguments<'_>) {
        let n = self.drops[reason as usize].fetch_add(1, Ordering::Relaxed) + 1;
        if n <= LOG_FIRST || n.is_power_of_two() {
            tracing::info!(reason = reason.as_str(), count = n, "drop: {detail}");
        }
    }

    pub fn answered(&self, service: Service) {
        self.answers[service as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, what: Traffic, n: u64) {
        self.traffic[what as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn dns_answered(&self, outcome: DnsOutcome) {
        self.dns[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn flow(&self, event: FlowEvent) {
        self.flows[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn flows(&self, event: FlowEvent) -> u64 {
        self.flows[event as usize].load(Ordering::Relaxed)
    }

    pub fn dns(&self, outcome: DnsOutcome) -> u64 {
        self.dns[outcome as usize].load(Ordering::Relaxed)
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    pub fn total_drops(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.drops(*r)).sum()
    }

    pub fn answers(&self, service: Service) -> u64 {
        self.answers[service as usize].load(Ordering::Relaxed)
    }

    pub fn traffic(&self, what: Traffic) -> u64 {
        self.traffic[what as usize].load(Ordering::Relaxed)
    }

    /// A snapshot as (group, name, value) rows, every counter included (zeros too).
    pub fn rows(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut rows = Vec::new();
        for t in Traffic::ALL {
            rows.push(("traffic", t.as_str(), self.traffic(*t)));
        }
        for s in Service::ALL {
            rows.push(("answered", s.as_str(), self.answers(*s)));
        }
        for e in FlowEvent::ALL {
            rows.push(("flows", e.as_str(), self.flows(*e)));
        }
        for o in DnsOutcome::ALL {
            rows.push(("dns", o.as_str(), self.dns(*o)));
        }
        for r in DropReason::ALL {
            rows.push(("drop", r.as_str(), self.drops(*r)));
        }
        rows
    }

    /// A table for a person: non-zero counters only (drops always get a total line).
    pub fn table(&self) -> String {
        let rows: Vec<_> = self.rows().into_iter().filter(|(_, _, v)| *v > 0).collect();
        let width = rows
            .iter()
            .map(|(_, n, _)| n.len())
            .max()
            .unwrap_or(0)
            .max("total_drops".len());
        let mut out = format!("{:<9} {:<width$} {:>12}\n", "group", "counter", "value");
        for (group, name, value) in rows {
            out.push_str(&format!("{group:<9} {name:<width$} {value:>12}\n"));
        }
        out.push_str(&format!(
            "{:<9} {:<width$} {:>12}\n",
            "drop",
            "total_drops",
            self.total_drops()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in DropReason::ALL {
            assert!(seen.insert(r.as_str()), "duplicate {}", r.as_str());
            assert!(r
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
        }
    }

    #[test]
    fn every_counter_enum_lists_all_variants_in_order() {
        // Counters index their arrays by `variant as usize`: ALL must be complete and ordered.
        assert!(DropReason::ALL
            .iter()
            .enumerate()
            .all(|(i, r)| *r as usize == i));
        assert!(Service::ALL
            .iter()
            .enumerate()
            .all(|(i, s)| *s as usize == i));
        assert!(Traffic::ALL
            .iter()
            .enumerate()
            .all(|(i, t)| *t as usize == i));
        assert!(FlowEvent::ALL
            .iter()
            .enumerate()
            .all(|(i, e)| *e as usize == i));
        assert!(DnsOutcome::ALL
            .iter()
            .enumerate()
            .all(|(i, o)| *o as usize == i));
        assert_eq!(FlowEvent::ALL.last(), Some(&FlowEvent::ForwardRefused));
        assert_eq!(Service::ALL.last(), Some(&Service::Dns));
        assert_eq!(DnsOutcome::ALL.last(), Some(&DnsOutcome::Forwarded));
        assert_eq!(Traffic::ALL.last(), Some(&Traffic::HandedOff));
    }

    #[test]
    fn drops_count_per_reason_and_show_in_table() {
        let c = Counters::default();
        c.drop_frame(DropReason::Ipv6, format_args!("test"));
        c.drop_frame(DropReason::Ipv6, format_args!("test"));
        c.drop_frame(DropReason::Vlan, format_args!("test"));
        assert_eq!(c.drops(DropReason::Ipv6), 2);
        assert_eq!(c.drops(DropReason::Vlan), 1);
        assert_eq!(c.total_drops(), 3);
        let table = c.table();
        assert!(table.contains("ipv6"), "{table}");
        assert!(
            !table.contains("spoofed_src_mac"),
            "zero rows are left out: {table}"
        );
        assert!(table
            .lines()
            .any(|l| l.contains("total_drops") && l.trim_end().ends_with('3')));
    }
}
