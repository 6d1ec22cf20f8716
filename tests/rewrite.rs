//! Hostile guest: it rewrites a frame in its TX buffer after posting it, while moat reads.
//!
//! moat copies each TX buffer out of guest memory once and decides on that copy, so what it
//! checked is what it answers. Here one thread posts ICMP echo requests to the gateway, all
//! pointing at the same buffer, while another keeps flipping that buffer between three
//! whole, valid frames: A and B (echo requests to the gateway with different payloads, each
//! with a correct checksum) and C (A's echo, to another VM's address: forbidden). A copy
//! taken mid-flip is a mix of them that fails a checksum (the versions are chosen so that
//! every mix does; checked below), so it must be dropped. Were moat to check one read of
//! guest memory and answer from another, a reply would carry a mixed payload.

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat::frame::virtio_hdr::VIRTIO_NET_HDR_LEN;
use moat::frame::{self, internet_checksum, Network, Transport};
use moat::telemetry::{DropReason, Service};
use moat_sim::craft;
use moat_sim::guest::{RawDesc, SimGuest};
use support::*;

/// Posts at least this many, and more until every outcome was seen (pure A, pure B, pure C
/// and a torn copy), up to MAX_POSTS: a run where the flipping thread never raced moat's
/// reads proves nothing, and fails.
const POSTS: u64 = 5000;
const MAX_POSTS: u64 = 200_000;
/// Posts between two drains of the RX queue (well below the 256 RX buffers).
const BATCH: u64 = 100;
const PAYLOAD_LEN: usize = 1400;
const ID: u16 = 0x4d54;
const SEQ: u16 = 7;
const OTHER_VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// Offset of the ICMP message in a frame (Ethernet + option-less IPv4).
const ICMP_AT: usize = 14 + 20;

/// What moat does with one copy of the buffer, as its parser, firewall and echo service
/// decide (a model, used only to check that the versions below cannot mix into a valid frame).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Answer(Vec<u8>),
    Drop(DropReason),
}

fn outcome(bytes: &[u8]) -> Outcome {
    let parsed = match frame::parse(bytes) {
        Ok(p) => p,
        Err(reason) => return Outcome::Drop(reason),
    };
    let Network::Ipv4(ip) = parsed.net else {
        panic!("not ipv4")
    };
    if ip.dst != GW {
        return Outcome::Drop(DropReason::NotAllowed);
    }
    let Transport::Icmp(icmp) = ip.transport else {
        panic!("not icmp")
    };
    if internet_checksum(icmp.message) != 0 {
        return Outcome::Drop(DropReason::L4BadChecksum);
    }
    Outcome::Answer(icmp.message[8..].to_vec())
}

/// The three versions of the frame: A, B (answered) and C (forbidden), all the same length.
fn versions() -> [Vec<u8>; 3] {
    let mut payload: Vec<u8> = (0..PAYLOAD_LEN).map(|i| (i * 7 + 3) as u8).collect();
    // Two tags, at the first and last even offsets of the payload (high bytes of their
    // 16-bit words), so a copy torn anywhere between them differs from both versions.
    let (first, last) = (0, PAYLOAD_LEN - 2);
    payload[first] = 0x10;
    payload[last] = 0x20;
    let a = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, ID, SEQ, &payload);
    // B raises (or lowers) the tags' words by 0x100 and 0x200, so its checksum's high byte
    // moves by 3 the other way without a carry: then a mix of the tags and the checksum
    // bytes from A and B only sums right when it is all A or all B.
    let checksum_hi = a[ICMP_AT + 2];
    let (t0, t1) = if checksum_hi >= 3 {
        (0x11, 0x22)
    } else {
        (0x0f, 0x1e)
    };
    payload[first] = t0;
    payload[last] = t1;
    let b = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, ID, SEQ, &payload);
    payload[first] = 0x10;
    payload[last] = 0x20;
    let c = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, OTHER_VM, ID, SEQ, &payload);
    [a, b, c]
}

/// Offsets where the versions differ: the only bytes the flipping thread writes.
fn differing(versions: &[Vec<u8>; 3]) -> Vec<usize> {
    (0..versions[0].len())
        .filter(|&i| versions.iter().any(|v| v[i] != versions[0][i]))
        .collect()
}

/// Every byte-wise mix of the versions (bytes are stored atomically, so a copy holds, at
/// each offset, the byte of one version or another): a mix moat would answer is exactly A
/// or exactly B. Returns the drop reasons mixes can get.
fn check_every_mix_fails_a_checksum(versions: &[Vec<u8>; 3], at: &[usize]) -> Vec<DropReason> {
    let choices: Vec<Vec<u8>> = at
        .iter()
        .map(|&i| {
            let mut c: Vec<u8> = versions.iter().map(|v| v[i]).collect();
            c.dedup();
            c.sort_unstable();
            c.dedup();
            c
        })
        .collect();
    let pure: Vec<Vec<u8>> = versions[..2]
        .iter()
        .map(|v| v[ICMP_AT + 8..].to_vec())
        .collect();
    let mut reasons = Vec::new();
    let mut mix = versions[0].clone();
    let mut digits = vec![0usize; at.len()];
    let mut mixes = 0u64;
    loop {
        for ((&i, &d), c) in at.iter().zip(&digits).zip(&choices) {
            mix[i] = c[d];
        }
        mixes += 1;
        match outcome(&mix) {
            Outcome::Answer(payload) => assert!(
                pure.contains(&payload),
                "test design: a mix of the versions passes every check: {:02x?}",
                at.iter().map(|&i| mix[i]).collect::<Vec<_>>()
            ),
            Outcome::Drop(reason) => {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
        // Next mix (odometer over the choices).
        let mut k = 0;
        loop {
            if k == digits.len() {
                assert!(mixes > 3, "versions barely differ");
                return reasons;
            }
            digits[k] += 1;
            if digits[k] < choices[k].len() {
                break;
            }
            digits[k] = 0;
            k += 1;
        }
    }
}

/// Echo payload of a reply from the gateway to the guest (everything else checked).
fn reply_payload(reply: &[u8]) -> Vec<u8> {
    let parsed = frame::parse(reply).expect("reply parses");
    let Network::Ipv4(ip) = parsed.net else {
        panic!("reply is not ipv4")
    };
    assert_eq!((ip.src, ip.dst), (GW, GUEST));
    let Transport::Icmp(icmp) = ip.transport else {
        panic!("reply is not icmp")
    };
    assert_eq!(icmp.icmp_type, frame::ICMP_ECHO_REPLY);
    assert_eq!(internet_checksum(icmp.message), 0, "reply checksum");
    assert_eq!(
        icmp.message[4..8],
        [ID.to_be_bytes(), SEQ.to_be_bytes()].concat()[..]
    );
    icmp.message[8..].to_vec()
}

/// Received echo replies, by version.
#[derive(Default)]
struct Replies {
    a: u64,
    b: u64,
}

impl Replies {
    fn total(&self) -> u64 {
        self.a + self.b
    }
}

/// Wait until moat accounted for every post (answered or dropped) and every answer arrived.
fn settle(
    guest: &mut SimGuest,
    served: &Served,
    posted: u64,
    payloads: &[Vec<u8>],
    replies: &mut Replies,
) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        while let Some(f) = guest.recv_frame(Duration::from_millis(5)).expect("recv") {
            let p = reply_payload(&f);
            if p == payloads[0] {
                replies.a += 1;
            } else if p == payloads[1] {
                replies.b += 1;
            } else {
                let tags = (p[0], p[PAYLOAD_LEN - 2]);
                panic!(
                    "moat answered a payload that is neither A nor B (tags {tags:02x?}): it \
                     acted on bytes it did not check"
                );
            }
        }
        let answers = served.counters.answers(Service::IcmpEcho);
        let accounted = answers + served.counters.total_drops();
        assert!(
            accounted <= posted && replies.total() <= answers,
            "more outcomes ({accounted}) than posts ({posted}), or more replies ({}) than \
             answers ({answers})",
            replies.total()
        );
        if accounted == posted && replies.total() == answers && guest.tx_in_flight() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "moat accounted for {accounted} of {posted} posts, {} of {answers} replies arrived",
            replies.total()
        );
    }
}

#[test]
fn a_buffer_rewritten_under_moat_is_checked_and_answered_as_one_copy() {
    let versions = versions();
    let at = differing(&versions);
    let mix_reasons = check_every_mix_fails_a_checksum(&versions, &at);
    let payloads: Vec<Vec<u8>> = versions[..2]
        .iter()
        .map(|v| v[ICMP_AT + 8..].to_vec())
        .collect();
    // Every mix lands on a checksum drop, or (C's header) the firewall's.
    for r in &mix_reasons {
        assert!(
            matches!(
                r,
                DropReason::Ipv4BadChecksum | DropReason::L4BadChecksum | DropReason::NotAllowed
            ),
            "unexpected drop reason for a mix: {r:?}"
        );
    }
    // Sanity: each version alone gets what it should.
    assert_eq!(outcome(&versions[0]), Outcome::Answer(payloads[0].clone()));
    assert_eq!(outcome(&versions[1]), Outcome::Answer(payloads[1].clone()));
    assert_eq!(outcome(&versions[2]), Outcome::Drop(DropReason::NotAllowed));

    let served = Served::start(POLICY, true);
    let mut guest = served.guest();
    // The buffer: a zero virtio-net header, then version A, in memory the rings do not use.
    let gpa = guest.scratch_gpa();
    let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
    buf.extend_from_slice(&versions[0]);
    guest.write_guest_mem(gpa, &buf);
    let desc = RawDesc {
        addr: gpa,
        len: buf.len() as u32,
        flags: 0,
        next: 0,
    };

    // The other vCPU: flips the buffer A -> B -> C -> A ... writing only the bytes that
    // differ, in alternating directions, with a varying pause so that moat sees pure
    // versions as well as copies torn at every point.
    let writer = guest.guest_mem_writer().expect("guest memory writer");
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let flipper = {
        let (stop, flips, versions, at) = (
            Arc::clone(&stop),
            Arc::clone(&flips),
            versions.clone(),
            at.clone(),
        );
        std::thread::spawn(move || {
            let frame_at = gpa + VIRTIO_NET_HDR_LEN as u64;
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let v = &versions[n % 3];
                let write = |&i: &usize| writer.write(frame_at + i as u64, &[v[i]]);
                if n.is_multiple_of(2) {
                    at.iter().for_each(write);
                } else {
                    at.iter().rev().for_each(write);
                }
                for _ in 0..(n * 7) % 300 {
                    std::hint::spin_loop();
                }
                n += 1;
            }
            flips.store(n as u64, Ordering::Relaxed);
        })
    };

    let mut replies = Replies::default();
    let mut posted = 0;
    let c = &served.counters;
    let torn = || c.drops(DropReason::Ipv4BadChecksum) + c.drops(DropReason::L4BadChecksum);
    let all_seen =
        |r: &Replies| r.a > 0 && r.b > 0 && c.drops(DropReason::NotAllowed) > 0 && torn() > 0;
    while posted < POSTS || (!all_seen(&replies) && posted < MAX_POSTS) {
        for _ in 0..BATCH {
            guest.send_raw_chain(&[desc]).expect("post");
            posted += 1;
        }
        settle(&mut guest, &served, posted, &payloads, &mut replies);
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().expect("flipper");

    let ip_sum = c.drops(DropReason::Ipv4BadChecksum);
    let l4_sum = c.drops(DropReason::L4BadChecksum);
    let not_allowed = c.drops(DropReason::NotAllowed);
    let answers = c.answers(Service::IcmpEcho);
    println!(
        "{posted} posts over {} flips ({} differing bytes, {} possible mixes checked): \
         {} replies A, {} replies B; drops: {not_allowed} not_allowed (C), {ip_sum} \
         ipv4_bad_checksum + {l4_sum} l4_bad_checksum (torn copies)",
        flips.load(Ordering::Relaxed),
        at.len(),
        at.iter()
            .map(|&i| {
                let mut v: Vec<u8> = versions.iter().map(|v| v[i]).collect();
                v.sort_unstable();
                v.dedup();
                v.len() as u64
            })
            .product::<u64>(),
        replies.a,
        replies.b,
    );
    // The race happened: moat saw both answerable versions, the forbidden one, and copies
    // torn mid-flip (only a mix fails a checksum: every pure version is valid).
    assert!(
        replies.a > 0 && replies.b > 0,
        "both versions answered ({} A, {} B) in {posted} posts",
        replies.a,
        replies.b
    );
    assert!(not_allowed > 0, "the forbidden version C seen and dropped");
    assert!(
        ip_sum + l4_sum > 0,
        "no torn copy in {posted} posts: the flipping thread never raced moat's reads"
    );
    assert_eq!(replies.total(), answers, "one reply per answer");
    assert_eq!(
        answers + ip_sum + l4_sum + not_allowed,
        posted,
        "every post answered or dropped exactly once"
    );
    assert_eq!(
        c.total_drops(),
        ip_sum + l4_sum + not_allowed,
        "no drop for another reason: {}",
        c.table()
    );
    assert_silent(&mut guest, "nothing after the last post");

    // And moat still answers a clean ping.
    guest
        .send_frame(&craft::icmp_echo(
            GUEST_MAC,
            GW_MAC,
            GUEST,
            GW,
            1,
            1,
            b"after the storm",
        ))
        .unwrap();
    recv_matching(&mut guest, "clean ping answered", |f| {
        f.ends_with(b"after the storm")
    });
    assert_eq!(c.answers(Service::IcmpEcho), answers + 1);
}
