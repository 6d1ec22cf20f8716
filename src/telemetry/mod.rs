//! Counters for everything the data path does, and above all for everything it drops.
//!
//! Every drop has a [`DropReason`] and a counter. The first drops of each reason are logged,
//! then only every power of two, so a flooding guest cannot flood the log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use strum::{IntoStaticStr, VariantArray};

pub mod metrics;

/// How many drops of one reason are logged before logging thins out to powers of two.
const LOG_FIRST: u64 = 5;

/// The names are metric labels and `stats` keys, so they are a contract: strum derives them
/// from the variant names (snake_case) and the variant list in declaration order, which is the
/// counters' order; `labels!` gives every counter enum the same `ALL` and `as_str`.
macro_rules! labels {
    ($($t:ty),* $(,)?) => {$(
        impl $t {
            /// Every variant, in counter order.
            pub const ALL: &'static [$t] = <$t as VariantArray>::VARIANTS;

            /// The stable snake_case name used in logs, tables and metrics.
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )*};
}

/// Why a frame (or an answer to the guest) was dropped. One counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum DropReason {
    /// A descriptor chain that could not be read: outside guest memory, wrong direction,
    /// indirect inside indirect, too long, or the queue itself is malformed.
    BadDescriptor,
    /// Shorter than the virtio-net header plus an Ethernet header.
    Truncated,
    /// Longer than the MTU allows.
    Oversized,
    /// A virtio-net header asking for offloads that were not negotiated.
    BadVirtioHeader,
    /// Source MAC is not the VM's.
    SpoofedSrcMac,
    /// Unicast to a MAC other than the gateway's: nothing is bridged.
    DstMacNotGateway,
    /// Multicast Ethernet destination.
    Multicast,
    /// 802.1Q / QinQ tagged frame.
    Vlan,
    /// IPv6 of any kind (unsupported until it keeps the same invariants).
    Ipv6,
    /// An ethertype other than IPv4 and ARP.
    UnsupportedEthertype,
    /// An ARP packet that is not Ethernet/IPv4 or is cut short.
    ArpMalformed,
    /// ARP whose sender MAC or IP is not the VM's.
    ArpSpoofed,
    /// ARP request for an address other than the gateway.
    ArpNotForGateway,
    /// ARP replies and gratuitous ARP from the guest.
    ArpUnsolicited,
    /// IPv4 header that does not parse or whose lengths disagree with the frame.
    Ipv4Malformed,
    /// IPv4 header checksum is wrong.
    Ipv4BadChecksum,
    /// IPv4 header carries options.
    Ipv4Options,
    /// IPv4 fragment (more-fragments set or a non-zero offset).
    Ipv4Fragment,
    /// TTL of zero.
    TtlExpired,
    /// IPv4 source is not the VM's address.
    SpoofedSrcIp,
    /// Broadcast (limited or directed) that is not DHCP.
    Broadcast,
    /// TCP/UDP/ICMP header cut short or inconsistent.
    L4Malformed,
    /// A TCP/UDP/ICMP checksum that is wrong (checked where moat answers).
    L4BadChecksum,
    /// An IP protocol other than TCP, UDP and ICMP.
    UnsupportedProtocol,
    /// To the gateway, on a port or protocol it does not serve.
    GatewayPortClosed,
    /// ICMP to the gateway that is not an echo request.
    IcmpNotEcho,
    /// To an address the policy does not allow.
    NotAllowed,
    /// DHCP message that does not parse.
    DhcpMalformed,
    /// DHCP whose client hardware address is not the VM's MAC.
    DhcpWrongClient,
    /// DNS message without even a header to answer.
    DnsMalformed,
    /// DHCP message type the server does not act on (OFFER/ACK from the guest, DECLINE, ...).
    DhcpIgnored,
    /// A TCP segment (not a SYN) for a connection moat does not know.
    TcpNoFlow,
    /// A SYN with FIN or RST set.
    TcpBadFlags,
    /// `limits.max_flows` reached: new connections are refused (a SYN gets a RST).
    FlowLimit,
    /// The descriptor budget is spent (RLIMIT_NOFILE less moat's own and the operator's
    /// reserve): new connections are refused (a SYN gets a RST).
    FdBudget,
    /// To a 198.18.0.0/15 address moat never gave out in DNS.
    UnknownSyntheticAddress,
    /// To a reserved range (loopback, private, link-local, metadata, ...) no rule names,
    /// however the guest spelled it (IP literal, `127.1`, `0x7f000001`, `localhost`, ...).
    ReservedDestination,
    /// A destination name from the guest's bytes (SNI, Host, explicit-proxy request) that
    /// is neither a DNS name nor an IPv4 address: an IPv6 literal, stray characters, ...
    BadDestination,
    /// An upstream resolver's A record in a reserved range no rule names (DNS rebinding):
    /// left out of the guest's answer.
    DnsAnswerReserved,
    /// A datagram on the upstream resolver socket that is not the resolver's response to a
    /// question moat asked (wrong source, unknown id, another question): not relayed.
    DnsUpstreamMismatch,
    /// A request on the explicit-proxy port that is not `CONNECT host:port` or an
    /// absolute-form `http://` request: answered 400.
    ExplicitProxyMalformed,
    /// The rule's proxy kind is not supported yet.
    EgressUnsupported,
    /// No socket could be opened to the proxy.
    ProxyUnreachable,
    /// The stack's inbound queue is full.
    StackQueueFull,
    /// A frame of a flow owned by another queue pair could not be handed to it (its inbox
    /// was full, or the flow moved again meanwhile).
    HandoffFailed,
    /// An answer for the guest found no RX buffer and the pending queue was full.
    RxQueueFull,
    /// An answer for the guest did not fit the RX buffers it posted.
    RxBufferTooSmall,
    /// A frame for the guest larger than a whole RX ring of the buffers it posted (with
    /// mergeable RX buffers): it can never be delivered; the buffers go back to the guest.
    RxRingTooSmall,
}

/// Which of the gateway's own services answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Service {
    Arp,
    Dhcp,
    IcmpEcho,
    Dns,
}

/// What happened to flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum FlowEvent {
    Opened,
    Closed,
    Reset,
    ProxyFailed,
    /// A host peer of a `[[forward]]` was turned away (not in `from`, or the flow limit).
    ForwardRefused,
}

/// Traffic counters other than drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
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

/// What a DNS query got, for counters and logs (a label here; `crate::dns` decides it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
pub enum DnsOutcome {
    /// A record from the synthetic pool.
    #[strum(serialize = "synthetic")]
    Synthetic,
    /// A static record from `dns.records`.
    #[strum(serialize = "static")]
    Static,
    /// Allowed name, but no record of that type (AAAA, MX, ...): empty NOERROR.
    #[strum(serialize = "nodata")]
    NoData,
    /// Not allowlisted.
    #[strum(serialize = "nxdomain")]
    NxDomain,
    /// Malformed query: FORMERR.
    #[strum(serialize = "formerr")]
    FormErr,
    /// `mode = "upstream"` over TCP: not forwarded (upstream forwarding is UDP only).
    #[strum(serialize = "notimp")]
    NotImplemented,
    /// `mode = "upstream"`: forwarded to the upstream resolver and relayed back.
    #[strum(serialize = "forwarded")]
    Forwarded,
}

labels!(DropReason, Service, FlowEvent, Traffic, DnsOutcome);

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
