//! Frame parse + verdict, ns per frame, for each class of frame a guest sends.
//!
//! Three measurements per class, all in this run:
//! - `verdict`: `frame::parse` + `Firewall::verdict` (+ the gate's admission for TCP
//!   SYNs beyond the gateway, which is where "allowed" and "denied" part ways);
//! - `datapath`: the whole `Datapath::guest_frame` (virtio-net header, parse, verdict, answer
//!   or drop, counters), for the classes that do not open a flow;
//! - `peer`: etherparse's `SlicedPacket::from_ethernet` on the same bytes (a bare header
//!   parse with no decision): the ratio moat/peer says what the firewall costs on top of
//!   merely reading the headers.
//!
//! The ratio compares like with like only where both read the same headers: for classes
//! where moat decides before it reads what etherparse parses (IPv6, dropped on its ethertype
//! after 14 bytes, against etherparse's full IPv6 + UDP parse), the row is printed but marked
//! and left out of the headline ratio; so is the truncated frame, where both give up at the
//! same short header and the ratio would compare error paths. None of these classes is a
//! data segment of an established TCP flow: a SYN's verdict (with the gate's admission) is
//! not the per-frame cost of bulk TCP data, which goes through the flow table instead and is
//! not measured here.
//!
//! Run: `cargo bench --bench verdict`. Prints a table and writes the raw numbers to
//! target/bench/verdict.txt (criterion's own files go to target/criterion).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use dhcproto::v4::MessageType;
use etherparse::{PacketBuilder, SlicedPacket};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use moat::datapath::Datapath;
use moat::dns::pool::NamePool;
use moat::firewall::gate::{self, Requested};
use moat::firewall::{Firewall, Verdict};
use moat::frame::virtio_hdr::VIRTIO_NET_HDR_LEN;
use moat::frame::{self, MacAddr, Network, Transport, GATEWAY_MAC};
use moat::policy::Policy;
use moat::policy::Protocol;
use moat::telemetry::{Counters, DropReason};
use moat_sim::craft;

const POLICY: &str = r#"
[vm]
name = "bench"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "127.0.0.1:9"
[[outbound]]
protocol = "tcp"
ports = [443]
to = ["example.com", "203.0.113.0/24"]
[dns]
allow = ["example.com"]
"#;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const DENIED: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 5);

struct Class {
    name: &'static str,
    frame: Vec<u8>,
    /// Whether the whole datapath can take it repeatedly without opening a flow.
    stateless: bool,
    /// Why moat's verdict and etherparse's parse do different work on this frame (the row
    /// is then left out of the headline ratio), or None when both read the same headers.
    unlike: Option<&'static str>,
}

fn dns_query(name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn ipv6_frame() -> Vec<u8> {
    let guest6 = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
    ];
    let mut dst6 = [0u8; 16];
    dst6[..2].copy_from_slice(&[0x20, 0x01]);
    dst6[15] = 1;
    let builder = PacketBuilder::ethernet2(GUEST_MAC.0, GATEWAY_MAC.0)
        .ipv6(guest6, dst6, 64)
        .udp(40000, 53);
    let payload = dns_query("example.com");
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, &payload).unwrap();
    out
}

fn classes() -> Vec<Class> {
    let syn_allowed = craft::tcp_syn(GUEST_MAC, GATEWAY_MAC, (GUEST, 40001), (ALLOWED, 443));
    let syn_denied = craft::tcp_syn(GUEST_MAC, GATEWAY_MAC, (GUEST, 40002), (DENIED, 443));
    // A TCP SYN cut off in the middle of its IPv4 header.
    let truncated = syn_denied[..frame::ETH_HDR_LEN + 10].to_vec();
    vec![
        Class {
            name: "arp_request_gateway",
            frame: craft::arp_request(GUEST_MAC, GUEST, GW),
            stateless: true,
            unlike: None,
        },
        Class {
            name: "dhcp_discover",
            frame: craft::dhcp(
                GUEST_MAC,
                MessageType::Discover,
                0x1234,
                Ipv4Addr::UNSPECIFIED,
                None,
                None,
                GATEWAY_MAC,
            ),
            stateless: true,
            unlike: None,
        },
        Class {
            name: "icmp_echo_gateway",
            frame: craft::icmp_echo(GUEST_MAC, GATEWAY_MAC, GUEST, GW, 1, 1, &[0xa5; 56]),
            stateless: true,
            unlike: None,
        },
        Class {
            name: "tcp_syn_allowed",
            frame: syn_allowed,
            stateless: false,
            unlike: None,
        },
        Class {
            name: "tcp_syn_denied",
            frame: syn_denied,
            stateless: true,
            unlike: None,
        },
        Class {
            name: "udp_dns_query",
            frame: craft::udp(
                GUEST_MAC,
                GATEWAY_MAC,
                (GUEST, 40000),
                (GW, 53),
                &dns_query("example.com"),
            ),
            stateless: true,
            unlike: None,
        },
        Class {
            name: "ipv6_dropped",
            frame: ipv6_frame(),
            stateless: true,
            unlike: Some("moat drops on the ethertype, etherparse parses IPv6+UDP"),
        },
        Class {
            name: "truncated",
            frame: truncated,
            stateless: true,
            unlike: Some(
                "both stop at the short IPv4 header: the ratio is the two error paths, not a parse",
            ),
        },
    ]
}

/// What moat decides for one frame: the firewall's verdict and, for a new TCP connection
/// beyond the gateway, the gate's admission (allowed by a rule, or dropped with a reason).
fn decide(fw: &Firewall, policy: &Policy, names: &NamePool, bytes: &[u8]) -> Verdict {
    let frame = match frame::parse(bytes) {
        Ok(frame) => frame,
        Err(reason) => return Verdict::Drop(reason),
    };
    match fw.verdict(&frame) {
        Verdict::Flow => {
            if let Network::Ipv4(ip) = &frame.net {
                if let Transport::Tcp(tcp) = &ip.transport {
                    let requested = Requested::Address {
                        ip: ip.dst,
                        dns_name: names.lookup(ip.dst).map(str::to_string),
                    };
                    if let Err(reason) = gate::admit(policy, Protocol::Tcp, requested, tcp.dst_port)
                    {
                        return Verdict::Drop(reason);
                    }
                }
            }
            Verdict::Flow
        }
        v => v,
    }
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target")
}

/// Criterion's mean estimate (ns) of `group/id`, from its estimates.json.
fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let path = out_dir()
        .join("criterion")
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (warm, measure) = if quick {
        (Duration::from_millis(200), Duration::from_millis(300))
    } else {
        (Duration::from_millis(500), Duration::from_secs(1))
    };
    let mut c = Criterion::default()
        .output_directory(&out_dir().join("criterion"))
        .warm_up_time(warm)
        .measurement_time(measure)
        .sample_size(if quick { 20 } else { 50 })
        .without_plots()
        .configure_from_args();

    let policy = Arc::new(Policy::parse(POLICY, Path::new("bench.toml")).expect("bench policy"));
    let fw = Firewall::new(&policy);
    let names = NamePool::new(1024);
    let classes = classes();

    // Sanity: each class gets the verdict its name says.
    let mut expected = Vec::new();
    for class in &classes {
        let v = decide(&fw, &policy, &names, &class.frame);
        let ok = match class.name {
            "arp_request_gateway" | "dhcp_discover" | "icmp_echo_gateway" | "udp_dns_query" => {
                matches!(v, Verdict::Answer(_))
            }
            "tcp_syn_allowed" => v == Verdict::Flow,
            "tcp_syn_denied" => matches!(v, Verdict::Drop(DropReason::ReservedDestination)),
            "ipv6_dropped" => v == Verdict::Drop(DropReason::Ipv6),
            "truncated" => matches!(v, Verdict::Drop(_)),
            _ => false,
        };
        assert!(ok, "{}: unexpected verdict {v:?}", class.name);
        expected.push(format!("{v:?}"));
    }

    {
        let mut g = c.benchmark_group("verdict");
        for class in &classes {
            g.bench_function(class.name, |b| {
                b.iter(|| decide(&fw, &policy, &names, black_box(&class.frame)))
            });
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("peer");
        for class in &classes {
            g.bench_function(class.name, |b| {
                b.iter(|| SlicedPacket::from_ethernet(black_box(&class.frame)).is_ok())
            });
        }
        g.finish();
    }
    {
        let mut dp = Datapath::new(
            Arc::clone(&policy),
            Arc::new(Mutex::new(NamePool::new(1024))),
            Arc::new(Counters::default()),
        );
        let mut g = c.benchmark_group("datapath");
        for class in classes.iter().filter(|c| c.stateless) {
            let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
            buf.extend_from_slice(&class.frame);
            // A fresh copy each time (made outside the timing): the datapath may rewrite the
            // buffer in place, and the next iteration must see the same frame again.
            g.bench_function(class.name, |b| {
                b.iter_batched_ref(
                    || buf.clone(),
                    |buf| dp.guest_frame(black_box(buf)).map(|a| a.len()),
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
    c.final_summary();

    let mut table = format!(
        "{:<22} {:>8} {:>10} {:>10} {:>12} {:>11} {:>5}  {}\n",
        "frame class",
        "bytes",
        "verdict ns",
        "peer ns",
        "moat/peer",
        "datapath ns",
        "like",
        "verdict"
    );
    let mut headline = Vec::new();
    for (class, verdict) in classes.iter().zip(&expected) {
        let v = mean_ns("verdict", class.name);
        let p = mean_ns("peer", class.name);
        let d = mean_ns("datapath", class.name);
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
        let ratio = match (v, p) {
            (Some(v), Some(p)) if p > 0.0 => {
                if class.unlike.is_none() {
                    headline.push(v / p);
                }
                format!("{:.2}", v / p)
            }
            _ => "-".into(),
        };
        table.push_str(&format!(
            "{:<22} {:>8} {:>10} {:>10} {:>12} {:>11} {:>5}  {}\n",
            class.name,
            class.frame.len(),
            f(v),
            f(p),
            ratio,
            f(d),
            if class.unlike.is_none() { "yes" } else { "no" },
            verdict
        ));
    }
    println!();
    print!("{table}");
    if let (Some(lo), Some(hi)) = (
        headline.iter().copied().reduce(f64::min),
        headline.iter().copied().reduce(f64::max),
    ) {
        let geo = (headline.iter().map(|r| r.ln()).sum::<f64>() / headline.len() as f64).exp();
        println!(
            "headline moat/peer over the {} like-for-like rows: {lo:.2} - {hi:.2} (geometric mean {geo:.2})",
            headline.len()
        );
    }
    for class in &classes {
        if let Some(why) = class.unlike {
            println!(
                "like = no: {}: {why}; shown, not in the headline ratio",
                class.name
            );
        }
    }
    println!(
        "(verdict = frame::parse + Firewall::verdict (+ the gate for new TCP); peer = \
         etherparse SlicedPacket::from_ethernet on the same bytes; datapath = \
         Datapath::guest_frame incl. answer/drop counting, not run for tcp_syn_allowed, which \
         would open a flow; no row is a data segment of an established TCP flow, so none is \
         the per-frame cost of bulk TCP)"
    );
    let dir = out_dir().join("bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("verdict.txt"), &table);
}
