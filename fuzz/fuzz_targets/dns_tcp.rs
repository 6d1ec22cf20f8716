#![no_main]
//! DNS over TCP at the gateway (`dns::tcp`), driven the way a guest does it: TCP
//! connections to gateway:53 through the Datapath, the minimal guest TCP of harness.rs
//! following moat's sequence numbers, `pump` after each step. (`DnsConn::step` needs the
//! stack's socket, so the Datapath is the entry point.)
//!
//! Input: a script of steps: 0 open a connection (at most 3); 1 stream bytes (length byte +
//! bytes, any framing: split and pipelined messages, bad lengths); 2 one well-formed
//! length-prefixed query (name from a small list, type, id); 3 FIN; 4 RST; 5 bytes with one
//! flipped; 6 toggle partial checksums / TSO for the guest's segments.
//!
//! Oracle: moat's stream back is length-prefixed DNS messages, the k-th the answer to the
//! guest's k-th message (answers in order: proxy-mode DNS answers at once), each checked
//! like a UDP answer (the query's id and question; A records only for allowed names, from the
//! pool or the name's record); never an answer to a message the guest has not finished.
use libfuzzer_sys::fuzz_target;
mod common;
mod harness;
use harness::{Harness, GW};

fn frames(stream: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(len) = stream.get(at..at + 2) {
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(m) = stream.get(at + 2..at + 2 + len) else {
            break;
        };
        out.push(m);
        at += 2 + len;
    }
    (out, at)
}

fn check(h: &Harness) {
    for c in &h.conns {
        if c.tainted {
            continue;
        }
        let (queries, _) = frames(&c.sent);
        let (answers, used) = frames(&c.received);
        assert!(
            answers.len() <= queries.len(),
            "{} answers to {} queries",
            answers.len(),
            queries.len()
        );
        for (q, a) in queries.iter().zip(&answers) {
            common::check_dns_answer(&h.policy.dns, q, a);
        }
        // Nothing but whole answers (a partial one only while more is on its way).
        assert!(c.received.len() - used < 2 + 65535);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new(harness::egress_policy());
    let mut input = data;
    let mut next = || -> Option<u8> {
        let (b, rest) = input.split_first()?;
        input = rest;
        Some(*b)
    };
    let mut steps = 0;
    while let Some(op) = next() {
        steps += 1;
        if steps > 48 {
            break;
        }
        let c = match next() {
            Some(b) if !h.conns.is_empty() => usize::from(b) % h.conns.len(),
            _ if h.conns.is_empty() => {
                h.connect(GW, 53);
                continue;
            }
            _ => 0,
        };
        match op % 7 {
            0 => {
                if h.conns.len() < 3 {
                    h.connect(GW, 53);
                }
            }
            1 | 5 => {
                let len = usize::from(next().unwrap_or(0));
                let bytes: Vec<u8> = (0..len).map_while(|_| next()).collect();
                let mutate = (op % 7 == 5)
                    .then(|| (usize::from(next().unwrap_or(0)), next().unwrap_or(1) | 1));
                h.data(c, &bytes, mutate);
            }
            2 => {
                let names = [
                    "example.com",
                    "www.example.com",
                    "api.internal",
                    "evil.test",
                    "a.b.example.com",
                ];
                let name = names[usize::from(next().unwrap_or(0)) % names.len()];
                let qtype = [1u16, 28, 15, 255][usize::from(next().unwrap_or(0)) % 4];
                let id = [next().unwrap_or(0), next().unwrap_or(0)];
                let mut q = vec![id[0], id[1], 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
                for l in name.split('.') {
                    q.push(l.len() as u8);
                    q.extend_from_slice(l.as_bytes());
                }
                q.push(0);
                q.extend_from_slice(&qtype.to_be_bytes());
                q.extend_from_slice(&[0, 1]);
                let mut msg = (q.len() as u16).to_be_bytes().to_vec();
                msg.extend_from_slice(&q);
                h.data(c, &msg, None);
            }
            3 => h.fin(c),
            4 => h.rst(c),
            _ => h.offload = !h.offload,
        }
        check(&h);
    }
    h.settle();
    check(&h);
    harness::trace(&h);
});
