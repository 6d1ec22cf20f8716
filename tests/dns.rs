//! DNS at the gateway through the real socket: allowlisted names resolve (to a synthetic
//! address, or a static record), everything else is NXDOMAIN, DNS elsewhere is dropped.

mod support;

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use moat::dns::{decode, pool::SYNTHETIC_NET};
use moat::frame::{self, Network, Transport};
use moat::telemetry::DnsOutcome;
use moat::telemetry::DropReason;
use moat_sim::craft;
use moat_sim::guest::tcp_drain;
use support::*;

const DNS_POLICY: &str = r#"
[vm]
name = "dns"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[dns]
allow = ["example.com", "*.example.com"]
records = { "api.internal" = "10.0.0.1" }
"#;

fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn resolve(
    guest: &mut moat_sim::guest::SimGuest,
    id: u16,
    name: &str,
    qtype: RecordType,
) -> Message {
    guest
        .send_frame(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 40000 + id),
            (GW, 53),
            &query(id, name, qtype),
        ))
        .unwrap();
    let reply = recv_matching(
        guest,
        "dns reply",
        |f| matches!(frame::parse(f), Ok(p) if matches!(&p.net, Network::Ipv4(ip) if matches!(&ip.transport, Transport::Udp(u) if u.src_port == 53))),
    );
    let parsed = frame::parse(&reply).unwrap();
    let Network::Ipv4(ip) = parsed.net else {
        unreachable!()
    };
    let Transport::Udp(udp) = ip.transport else {
        unreachable!()
    };
    assert_eq!((ip.src, ip.dst, udp.dst_port), (GW, GUEST, 40000 + id));
    assert!(frame::udp_checksum_ok(ip.src, ip.dst, udp.datagram));
    let m = decode(udp.payload).expect("dns reply decodes");
    assert_eq!(m.id, id);
    m
}

fn a_of(m: &Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[test]
fn allowlisted_names_resolve_and_others_are_nxdomain() {
    let served = Served::start(DNS_POLICY, true);
    let mut guest = served.guest();

    let m = resolve(&mut guest, 1, "www.example.com.", RecordType::A);
    assert_eq!(m.response_code, ResponseCode::NoError);
    let synthetic = a_of(&m).expect("an A record");
    assert!(SYNTHETIC_NET.contains(&synthetic), "{synthetic}");
    assert_eq!(
        a_of(&resolve(&mut guest, 2, "www.example.com.", RecordType::A)),
        Some(synthetic),
        "stable"
    );

    let m = resolve(&mut guest, 3, "api.internal.", RecordType::A);
    assert_eq!(a_of(&m), Some(Ipv4Addr::new(10, 0, 0, 1)));

    let m = resolve(&mut guest, 4, "www.example.com.", RecordType::AAAA);
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0),
        "AAAA: empty NOERROR"
    );

    for (id, name) in [
        (5, "evil.test."),
        (6, "example.com.evil.test."),
        (7, "metadata.google.internal."),
    ] {
        let m = resolve(&mut guest, id, name, RecordType::A);
        assert_eq!(m.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
    }
    assert_eq!(served.counters.dns(DnsOutcome::Synthetic), 2);
    assert_eq!(served.counters.dns(DnsOutcome::Static), 1);
    assert_eq!(served.counters.dns(DnsOutcome::NoData), 1);
    assert_eq!(served.counters.dns(DnsOutcome::NxDomain), 3);
}

#[test]
fn dns_to_any_other_address_is_dropped() {
    let served = Served::start(DNS_POLICY, true);
    let mut guest = served.guest();
    let q = query(9, "example.com.", RecordType::A);
    guest
        .send_frame(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 5353),
            (Ipv4Addr::new(198, 51, 100, 53), 53),
            &q,
        ))
        .unwrap();
    guest
        .send_frame(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 5353),
            (Ipv4Addr::new(10, 0, 0, 3), 53),
            &q,
        ))
        .unwrap();
    assert_silent(&mut guest, "dns to other resolvers");
    eventually("both dropped", || {
        served.counters.drops(DropReason::NotAllowed) == 1
            && served.counters.drops(DropReason::ReservedDestination) == 1
    });
}

#[test]
fn tunnelling_shapes_get_formerr_or_nxdomain() {
    let served = Served::start(DNS_POLICY, true);
    let mut guest = served.guest();
    // A long label (the shape of DNS tunnelling) under a zone the policy does not name:
    // NXDOMAIN, and nothing leaves the host for it.
    let long = format!("{}.evil.test.", "a".repeat(63));
    let m = resolve(&mut guest, 11, &long, RecordType::TXT);
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    let m = resolve(&mut guest, 12, "example.com.", RecordType::NULL);
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    // Garbage: FORMERR keeps the id.
    let mut junk = query(13, "example.com.", RecordType::A);
    junk.truncate(14);
    guest
        .send_frame(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 40013),
            (GW, 53),
            &junk,
        ))
        .unwrap();
    let reply = recv_matching(&mut guest, "formerr", |_| true);
    let Network::Ipv4(ip) = frame::parse(&reply).unwrap().net else {
        unreachable!()
    };
    let Transport::Udp(udp) = ip.transport else {
        unreachable!()
    };
    let m = decode(udp.payload).unwrap();
    assert_eq!((m.id, m.response_code), (13, ResponseCode::FormErr));
}

#[test]
fn dns_over_tcp_answers_the_same_and_pipelines() {
    let served = Served::start(DNS_POLICY, true);
    let mut net = guest_net(&served);
    let h = net.tcp_connect(GW, 53);
    let t = std::time::Duration::from_secs(5);
    assert!(net
        .run_until(t, |n| n.tcp(h).state()
            == smoltcp::socket::tcp::State::Established)
        .unwrap());
    let mut stream = Vec::new();
    for (id, name) in [(21u16, "www.example.com."), (22, "evil.test.")] {
        let q = query(id, name, RecordType::A);
        stream.extend_from_slice(&(q.len() as u16).to_be_bytes());
        stream.extend_from_slice(&q);
    }
    net.tcp(h).send_slice(&stream).unwrap();
    let mut got = Vec::new();
    let mut replies = Vec::new();
    net.run_until(t, |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            got.extend_from_slice(d);
        });
        while got.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([got[0], got[1]]));
            if got.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = got.drain(..2 + len).skip(2).collect();
            replies.push(decode(&msg).expect("reply decodes"));
        }
        replies.len() == 2
    })
    .unwrap();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].id, 21);
    assert!(SYNTHETIC_NET.contains(&a_of(&replies[0]).unwrap()));
    assert_eq!(
        (replies[1].id, replies[1].response_code),
        (22, ResponseCode::NXDomain)
    );
    assert_eq!(served.counters.dns(DnsOutcome::Synthetic), 1);
}
