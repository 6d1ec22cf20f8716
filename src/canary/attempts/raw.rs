//! Frames built by hand and read straight off the RX queue: the gateway's own services as
//! controls, then what a guest on a shared L2 would try (other VMs, spoofing, IPv6, DNS and
//! UDP elsewhere). Nothing here goes through the guest's TCP/IP stack.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::MessageType;
use etherparse::{ArpOperation, PacketBuilder};

use super::{closed_port, internet_address, neighbour, outcome, QUIET};
use crate::canary::{Expect, Outcome, Witness};
use crate::frame::{self, MacAddr, Network, Transport, GATEWAY_MAC};
use crate::policy::{Policy, Protocol};
use crate::telemetry::DropReason;
use moat_sim::craft;
use moat_sim::guest::SimGuest;

/// A source MAC that is not the VM's.
const STRANGER_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xde, 0xad, 0x01]);

pub(super) fn raw(sim: &mut SimGuest, policy: &Policy, counters: &dyn Witness) -> Vec<Outcome> {
    let vm = &policy.vm;
    let (me, mac, gw) = (vm.address, vm.mac, vm.gateway);
    let near = neighbour(policy);
    let other_subnet = if vm.subnet().contains(&Ipv4Addr::new(10, 99, 0, 1)) {
        Ipv4Addr::new(10, 98, 0, 1)
    } else {
        Ipv4Addr::new(10, 99, 0, 1)
    };
    let mut out = Vec::new();
    let send = |sim: &mut SimGuest, f: &[u8]| {
        let _ = sim.send_frame(f);
    };
    let echo_reply_from = |src: Ipv4Addr| move |f: &frame::Frame<'_>| matches!(&f.net, Network::Ipv4(ip) if ip.src == src && matches!(&ip.transport, Transport::Icmp(i) if i.icmp_type == frame::ICMP_ECHO_REPLY));

    // Controls first: the gateway must answer at all, or every "blocked" below means nothing.
    send(
        sim,
        &craft::dhcp(
            mac,
            MessageType::Discover,
            0xca11,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GATEWAY_MAC,
        ),
    );
    let offered = reply(
        sim,
        QUIET * 2,
        |f| matches!(&f.net, Network::Ipv4(ip) if matches!(&ip.transport, Transport::Udp(u) if u.src_port == 67)),
    );
    out.push(outcome(
        "control: dhcp offer",
        Expect::Works,
        offered,
        format!("DISCOVER from {mac}"),
    ));
    send(
        sim,
        &craft::icmp_echo(mac, GATEWAY_MAC, me, gw, 7, 1, b"moat-canary"),
    );
    out.push(outcome(
        "control: ping gateway",
        Expect::Works,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("{me} -> {gw}"),
    ));

    // Other VMs, by ARP and by IP.
    send(sim, &craft::arp_request(mac, me, near));
    let arp_answered = reply(
        sim,
        QUIET,
        |f| matches!(&f.net, Network::Arp(a) if a.sender_ip == near),
    );
    out.push(outcome(
        "arp for another address",
        Expect::Blocked,
        arp_answered,
        format!("who-has {near}"),
    ));
    for (name, dst) in [
        ("ping another vm (same /24)", near),
        ("ping another 10/8 subnet", other_subnet),
    ] {
        send(
            sim,
            &craft::icmp_echo(mac, GATEWAY_MAC, me, dst, 7, 2, b"moat-canary"),
        );
        out.push(outcome(
            name,
            Expect::Blocked,
            reply(sim, QUIET, echo_reply_from(dst)),
            format!("{me} -> {dst}"),
        ));
    }

    // Spoofing.
    let spoofs =
        counters.drops(DropReason::ArpSpoofed) + counters.drops(DropReason::ArpUnsolicited);
    send(
        sim,
        &craft::arp(
            ArpOperation::REPLY,
            craft::BROADCAST_MAC,
            mac,
            gw,
            craft::BROADCAST_MAC,
            gw,
        ),
    );
    send(sim, &craft::arp_request(mac, me, gw));
    let gateway_mac_intact = reply(
        sim,
        QUIET,
        |f| matches!(&f.net, Network::Arp(a) if a.sender_ip == gw && a.sender_mac == GATEWAY_MAC),
    );
    let spoof_dropped = counters.drops(DropReason::ArpSpoofed)
        + counters.drops(DropReason::ArpUnsolicited)
        > spoofs;
    out.push(outcome(
        "arp spoofing of the gateway",
        Expect::Blocked,
        !(gateway_mac_intact && spoof_dropped),
        format!("gratuitous reply claiming {gw}"),
    ));
    send(
        sim,
        &craft::icmp_echo(STRANGER_MAC, GATEWAY_MAC, me, gw, 7, 3, b"moat-canary"),
    );
    out.push(outcome(
        "spoofed source mac",
        Expect::Blocked,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("from {STRANGER_MAC}"),
    ));
    send(
        sim,
        &craft::icmp_echo(mac, GATEWAY_MAC, near, gw, 7, 4, b"moat-canary"),
    );
    out.push(outcome(
        "spoofed source ip",
        Expect::Blocked,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("from {near}"),
    ));

    // IPv6 of any kind: nothing answers.
    let link_local = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
    ];
    let all_routers = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let solicited_gw = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
    let v6 = |dst_mac: [u8; 6], dst: [u8; 16], kind: etherparse::Icmpv6Type| {
        let mut f = Vec::new();
        let _ = PacketBuilder::ethernet2(mac.0, dst_mac)
            .ipv6(link_local, dst, 255)
            .icmpv6(kind)
            .write(&mut f, &[0u8; 16]);
        f
    };
    let ipv6_reply = |f: &frame::Frame<'_>| f.eth.ethertype == 0x86dd;
    send(
        sim,
        &v6(
            [0x33, 0x33, 0, 0, 0, 2],
            all_routers,
            etherparse::Icmpv6Type::RouterSolicitation,
        ),
    );
    out.push(outcome(
        "ipv6 router solicitation",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "expect no RA",
    ));
    send(
        sim,
        &v6(
            [0x33, 0x33, 0xff, 0, 0, 1],
            solicited_gw,
            etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
        ),
    );
    out.push(outcome(
        "ipv6 neighbour solicitation",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "expect no NA",
    ));
    let mut syn6 = Vec::new();
    let _ = PacketBuilder::ethernet2(mac.0, GATEWAY_MAC.0)
        .ipv6(
            link_local,
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .tcp(40000, 443, 1, 64240)
        .syn()
        .write(&mut syn6, &[]);
    send(sim, &syn6);
    out.push(outcome(
        "ipv6 tcp syn",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "to 2001:db8::1:443",
    ));

    // DNS elsewhere, UDP to the internet.
    let query = dns_query("example.com.");
    let dns_reply = |src: Ipv4Addr| move |f: &frame::Frame<'_>| matches!(&f.net, Network::Ipv4(ip) if ip.src == src);
    let resolver = Ipv4Addr::new(198, 51, 100, 53);
    send(
        sim,
        &craft::udp(mac, GATEWAY_MAC, (me, 53000), (resolver, 53), &query),
    );
    out.push(outcome(
        "dns to another resolver",
        Expect::Blocked,
        reply(sim, QUIET, dns_reply(resolver)),
        format!("{resolver}:53"),
    ));
    let internet = internet_address(policy);
    let udp_port = closed_port(policy, Protocol::Udp);
    send(
        sim,
        &craft::udp(
            mac,
            GATEWAY_MAC,
            (me, 53001),
            (internet, udp_port),
            b"moat-canary",
        ),
    );
    out.push(outcome(
        "udp to the internet (ip literal)",
        Expect::Blocked,
        reply(sim, QUIET, dns_reply(internet)),
        format!("{internet}:{udp_port}"),
    ));
    out
}

/// Whether any frame matching `pred` arrives within `wait`.
fn reply(sim: &mut SimGuest, wait: Duration, pred: impl Fn(&frame::Frame<'_>) -> bool) -> bool {
    sim.recv_until(wait, |bytes| frame::parse(bytes).is_ok_and(|f| pred(&f)))
        .is_ok_and(|got| got.is_some())
}

fn dns_query(name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.metadata.id = 0xca11;
    if let Ok(n) = Name::from_ascii(name) {
        m.add_query(Query::query(n, RecordType::A));
    }
    m.to_vec().unwrap_or_default()
}
