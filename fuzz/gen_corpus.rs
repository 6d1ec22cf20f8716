//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus`
//! (from the repository root). Valid inputs for every target, built with moat's own crafters.
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use dhcproto::v4::MessageType;
use moat::egress::socks5;
use moat::firewall::gate::Target;
use moat::frame::{MacAddr, GATEWAY_MAC};
use moat_sim::craft;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn hdr(frame: Vec<u8>) -> Vec<u8> {
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&frame);
    buf
}

fn dns_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

fn main() {
    let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let me = Ipv4Addr::new(10, 0, 0, 2);
    let gw = Ipv4Addr::new(10, 0, 0, 1);

    // frame: virtio-net header + frame
    put(
        "frame",
        "arp_request",
        &hdr(craft::arp_request(mac, me, gw)),
    );
    put(
        "frame",
        "icmp_echo",
        &hdr(craft::icmp_echo(mac, GATEWAY_MAC, me, gw, 1, 1, b"ping")),
    );
    put(
        "frame",
        "tcp_syn_443",
        &hdr(craft::tcp_syn(
            mac,
            GATEWAY_MAC,
            (me, 40000),
            (Ipv4Addr::new(203, 0, 113, 5), 443),
        )),
    );
    put(
        "frame",
        "tcp_syn_80",
        &hdr(craft::tcp_syn(
            mac,
            GATEWAY_MAC,
            (me, 40001),
            (Ipv4Addr::new(198, 18, 0, 1), 80),
        )),
    );
    put(
        "frame",
        "dns_udp",
        &hdr(craft::udp(
            mac,
            GATEWAY_MAC,
            (me, 5353),
            (gw, 53),
            &dns_query("example.com", 1),
        )),
    );
    put(
        "frame",
        "udp_other",
        &hdr(craft::udp(
            mac,
            GATEWAY_MAC,
            (me, 5353),
            (Ipv4Addr::new(203, 0, 113, 5), 123),
            b"ntp?",
        )),
    );
    for (i, kind) in [
        MessageType::Discover,
        MessageType::Request,
        MessageType::Release,
        MessageType::Inform,
    ]
    .into_iter()
    .enumerate()
    {
        let req = if kind == MessageType::Request {
            Some(me)
        } else {
            None
        };
        let f = craft::dhcp(
            mac,
            kind,
            0x1000 + i as u32,
            Ipv4Addr::UNSPECIFIED,
            req,
            Some(gw),
            GATEWAY_MAC,
        );
        put("frame", &format!("dhcp_{i}"), &hdr(f.clone()));
        // dhcp target: the DHCP payload after Ethernet (14) + IPv4 (20) + UDP (8)
        put("dhcp", &format!("dhcp_{i}"), &f[42..]);
    }
    let renew = craft::dhcp(
        mac,
        MessageType::Request,
        7,
        me,
        None,
        Some(gw),
        GATEWAY_MAC,
    );
    put("frame", "dhcp_renew", &hdr(renew.clone()));
    put("dhcp", "dhcp_renew", &renew[42..]);

    // dns
    put("dns", "a_example", &dns_query("example.com", 1));
    put("dns", "aaaa_example", &dns_query("www.example.com", 28));
    put("dns", "a_denied", &dns_query("evil.test", 1));
    put("dns", "mx", &dns_query("example.com", 15));
    put("dns", "ptr", &dns_query("1.0.18.198.in-addr.arpa", 12));

    // policy
    for entry in fs::read_dir("policy").unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            put(
                "policy",
                p.file_name().unwrap().to_str().unwrap(),
                &fs::read(&p).unwrap(),
            );
        }
    }
    put(
        "policy",
        "minimal.toml",
        b"[vm]\nname = \"a\"\nmac = \"52:54:00:00:00:01\"\naddress = \"10.0.0.2/30\"\n",
    );

    // proxy replies
    put(
        "proxy_reply",
        "connect_200",
        b"HTTP/1.1 200 Connection established\r\n\r\n",
    );
    put(
        "proxy_reply",
        "connect_403",
        b"HTTP/1.0 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
    );
    put("proxy_reply", "socks_method", &[5, 0]);
    put(
        "proxy_reply",
        "socks_reply_v4",
        &[5, 0, 0, 1, 127, 0, 0, 1, 0x1f, 0x90],
    );
    put(
        "proxy_reply",
        "socks_reply_name",
        &[5, 0, 0, 3, 4, b'a', b'.', b'i', b'o', 1, 187],
    );
    put(
        "proxy_reply",
        "socks_reply_v6",
        &[
            5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 53,
        ],
    );
    put("proxy_reply", "socks_fail", &[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
    let mut dgram = socks5::udp_header(&Target::Name("dns.example".into()), 53).unwrap();
    dgram.extend_from_slice(&dns_query("example.com", 1));
    put("proxy_reply", "socks_udp", &dgram);
    put(
        "proxy_reply",
        "socks_assoc",
        &socks5::udp_associate_request(SocketAddrV4::new(me, 9)),
    );

    // sniff
    put(
        "sniff",
        "tls_hello",
        &craft::tls_client_hello("example.com"),
    );
    put(
        "sniff",
        "http_get",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: x\r\n\r\n",
    );
    put(
        "sniff",
        "http_connect",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    );
    put("sniff", "ssh", b"SSH-2.0-OpenSSH_9.6\r\n");

    // frame: scripts for the egress harness (fuzz_targets/frame.rs lists the ops). The old
    // single-buffer seeds become op 0 (a raw TX buffer).
    let raw = |buf: &[u8]| {
        let mut s = vec![0u8];
        s.extend_from_slice(&(buf.len() as u16).to_le_bytes());
        s.extend_from_slice(buf);
        s
    };
    let data = |op: u8, c: u8, bytes: &[u8]| {
        assert!(bytes.len() < 128);
        let mut s = vec![op, c, bytes.len() as u8];
        s.extend_from_slice(bytes);
        s
    };
    let frames_dir = Path::new("fuzz/corpus/frame");
    let mut singles: Vec<(String, Vec<u8>)> = fs::read_dir(frames_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("script_")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    singles.sort();
    for (name, buf) in singles {
        fs::remove_file(frames_dir.join(&name)).unwrap();
        put("frame", &format!("script_raw_{name}"), &raw(&buf));
    }
    let get = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
    let scripts: Vec<(&str, Vec<u8>)> = vec![
        // SYN to an allowed literal, the proxy accepts, bytes both ways, both close.
        ("script_splice", [vec![1, 0, 6, 0], data(2, 0, get), data(8, 0, b"HTTP/1.1 204 No Content\r\n\r\n"), vec![3, 0, 9, 0]].concat()),
        // A literal only a name allows: sniffed from the Host header, then spliced.
        ("script_sniff", [vec![1, 2], data(2, 0, get), vec![6, 0], data(8, 0, b"ok")].concat()),
        // The explicit-proxy port: CONNECT, then absolute form.
        ("script_explicit_connect", [vec![1, 4], data(2, 0, b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n\r\n"), vec![6, 0], data(2, 0, b"ping"), data(8, 0, b"pong")].concat()),
        ("script_explicit_absolute", [vec![1, 4], data(2, 0, b"GET http://www.example.com/x HTTP/1.1\r\nHost: www.example.com\r\nProxy-Connection: keep-alive\r\n\r\n"), vec![6, 0], data(8, 0, b"HTTP/1.1 200 OK\r\n\r\n")].concat()),
        ("script_explicit_refused", [vec![1, 4], data(2, 0, b"CONNECT 127.1:22 HTTP/1.1\r\n\r\n")].concat()),
        // SOCKS5: greeting answered, CONNECT answered, bytes.
        ("script_socks", [vec![1, 3, 6, 0, 6, 0], data(2, 0, b"hello"), data(8, 0, b"world")].concat()),
        // Partial checksums and 64 KiB segments both ways.
        ("script_tso", [vec![11, 1, 0, 6, 0], data(2, 0, b"0123456789abcdef"), vec![2, 0, 0x90], b"0123456789abcdef".to_vec(), vec![8, 0, 0x90], b"fedcba9876543210".to_vec()].concat()),
        // A name from moat's DNS.
        ("script_synthetic", [vec![1, 7, 6, 0], data(2, 0, b"x"), data(8, 0, b"y")].concat()),
        // A reserved range opened by its own CIDR.
        ("script_reserved_cidr", [vec![1, 6, 6, 0], data(2, 0, b"SSH-2.0-x\r\n")].concat()),
        // The proxy refuses, or answers nonsense, or resets.
        ("script_refused", [vec![1, 0], data(7, 0, b"HTTP/1.1 403 Forbidden\r\n\r\n")].concat()),
        ("script_garbage", [vec![1, 1], data(7, 0, b"SSH-2.0-OpenSSH\r\n\r\n")].concat()),
        ("script_proxy_reset", [vec![1, 0, 6, 0], data(2, 0, b"abc"), vec![10, 0]].concat()),
        ("script_guest_reset", [vec![1, 0, 6, 0], data(2, 0, b"abc"), vec![4, 0]].concat()),
        ("script_mutated", [vec![1, 0, 6, 0], data(5, 0, b"abcdefgh"), vec![40, 0x20]].concat()),
        // UDP through SOCKS5, and DNS over TCP.
        ("script_udp", [vec![12, 9], b"ntp?-ntp?".to_vec(), vec![6, 0, 6, 0]].concat()),
        ("script_dns_tcp", [vec![1, 5], data(2, 0, &[&[0, 29][..], &dns_query("example.com", 1)].concat())].concat()),
    ];
    for (name, script) in scripts {
        put("frame", name, &script);
    }

    // dns_tcp: [op, conn, args...] (fuzz_targets/dns_tcp.rs); op 2 builds a whole query.
    let q = dns_query("www.example.com", 1);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let two = [framed.clone(), framed.clone()].concat();
    put(
        "dns_tcp",
        "one_query",
        &[0, 0, 2, 0, 1, 0, 0x12, 0x34, 3, 0],
    );
    put(
        "dns_tcp",
        "pipelined",
        &[
            &[0u8, 0, 2, 0, 0, 0, 1, 2, 2, 0, 3, 1, 3, 4, 2, 0, 2, 0, 5, 6][..],
            &[1, 0, two.len() as u8],
            &two,
        ]
        .concat(),
    );
    put(
        "dns_tcp",
        "split",
        &[
            &[0u8, 0, 1, 0, 5][..],
            &framed[..5],
            &[1, 0, (framed.len() - 5) as u8],
            &framed[5..],
            &[3, 0],
        ]
        .concat(),
    );
    put(
        "dns_tcp",
        "short_message",
        &[0, 0, 1, 0, 5, 0, 3, 1, 2, 3, 2, 0, 1, 0, 0, 0],
    );
    put(
        "dns_tcp",
        "two_conns",
        &[
            0, 0, 0, 0, 2, 0, 0, 0, 9, 9, 2, 1, 3, 1, 7, 7, 4, 0, 2, 1, 1, 1, 1, 1,
        ],
    );
    put("dns_tcp", "offload", &[0, 0, 6, 0, 2, 0, 1, 0, 0, 1, 3, 0]);

    // gate: [policy | protocol | form, port, text or address (+ name)]
    let gate = |ctl: u8, port: u16, rest: &[u8]| [&[ctl][..], &port.to_be_bytes(), rest].concat();
    for (i, text) in [
        "www.example.com",
        "example.com.",
        "127.1",
        "0x7f000001",
        "2130706433",
        "0177.0.0.1",
        "localhost",
        "db.localhost.",
        "169.254.169.254",
        "10.9.0.1",
        "203.0.113.5",
        "[::1]",
        "Example.COM",
        "0xg.example",
        "a_b.example.com",
    ]
    .iter()
    .enumerate()
    {
        for policy in 0..3u8 {
            put(
                "gate",
                &format!("text_{i}_{policy}"),
                &gate(
                    policy | (((i % 3) as u8) << 5),
                    [443, 22, 80, 8080][i % 4],
                    text.as_bytes(),
                ),
            );
        }
    }
    for (i, ip) in [
        [127, 0, 0, 1],
        [10, 9, 1, 1],
        [169, 254, 169, 254],
        [203, 0, 113, 5],
        [172, 16, 0, 1],
        [172, 1, 0, 1],
        [198, 18, 0, 1],
        [224, 0, 0, 1],
        [192, 168, 1, 1],
        [8, 8, 8, 8],
    ]
    .iter()
    .enumerate()
    {
        put(
            "gate",
            &format!("addr_{i}"),
            &gate(2 | (2 << 3), [22, 80, 8080, 443][i % 4], ip),
        );
        put(
            "gate",
            &format!("addr_udp_{i}"),
            &gate(2 | 4 | (2 << 3), 53, ip),
        );
        put(
            "gate",
            &format!("dns_name_{i}"),
            &gate(1 | (3 << 3), 443, &[&ip[..], b"localhost"].concat()),
        );
    }

    // explicit_head
    put(
        "explicit_head",
        "connect",
        b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n\r\nhello",
    );
    put(
        "explicit_head",
        "connect_literal",
        b"CONNECT 0x7f000001:22 HTTP/1.1\r\n\r\n",
    );
    put("explicit_head", "absolute", b"GET http://Example.com:8080/a/b?c=d HTTP/1.1\r\nHost: evil.test\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nUser-Agent: t\r\n\r\n");
    put(
        "explicit_head",
        "absolute_10",
        b"POST http://example.com HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
    );
    put(
        "explicit_head",
        "absolute_addr",
        b"GET http://2130706433:2375/version HTTP/1.1\r\n\r\n",
    );
    put(
        "explicit_head",
        "https",
        b"GET https://example.com/ HTTP/1.1\r\n\r\n",
    );
    put("explicit_head", "partial", b"CONNECT example.com:443 HT");

    // dns_upstream: [id (2), guest query length, guest query, resolver reply]
    let upstream_reply = |id: u16, name: &str, addrs: &[[u8; 4]], cname: bool| {
        let mut r = dns_query(name, 1);
        r[0..2].copy_from_slice(&id.to_be_bytes());
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&((addrs.len() + cname as usize) as u16).to_be_bytes());
        if cname {
            r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        }
        for a in addrs {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
            r.extend_from_slice(a);
        }
        r
    };
    for (i, (name, addrs, cname, id)) in [
        ("www.example.com", vec![[203, 0, 113, 7]], false, 0xbeefu16),
        (
            "www.example.com",
            vec![[127, 0, 0, 1], [203, 0, 113, 8]],
            false,
            0xbeef,
        ),
        ("example.com", vec![[10, 20, 1, 1], [10, 0, 0, 9]], true, 7),
        ("www.example.com", vec![[203, 0, 113, 7]], false, 0xdead), // another id
        ("www.example.com", vec![], false, 0xbeef),
    ]
    .into_iter()
    .enumerate()
    {
        let guest = dns_query(name, 1);
        let reply = upstream_reply(id, name, &addrs, cname);
        let asked = if i == 3 { 0xbeefu16 } else { id };
        put(
            "dns_upstream",
            &format!("reply_{i}"),
            &[
                &asked.to_be_bytes()[..],
                &[guest.len() as u8],
                &guest,
                &reply,
            ]
            .concat(),
        );
    }

    // queues: [mode (bit 0: RX, bit 1: MRG_RXBUF), then for TX: max, 8-byte descriptors
    // (addr (3), len (2), flags, fill, spare); for RX: frame shape, 4-byte descriptors
    // (len (2), flags, spare)]
    let desc = |addr: u32, len: u16, flags: u8, fill: u8| {
        let a = addr.to_le_bytes();
        let l = len.to_le_bytes();
        [a[0], a[1], a[2], l[0], l[1], flags, fill, 0]
    };
    put(
        "queues",
        "one",
        &[&[0u8, 5][..], &desc(0x100, 1514, 2, 0xaa)].concat(),
    );
    put(
        "queues",
        "header_then_frame",
        &[
            &[0u8, 5][..],
            &desc(0x100, 12, 0, 1),
            &desc(0x2000, 1502, 2, 2),
        ]
        .concat(),
    );
    put(
        "queues",
        "across_regions",
        &[
            &[0u8, 250][..],
            &desc(0xe000, 0x2000, 0, 3),
            &desc(0x1f000, 0x100, 2, 4),
        ]
        .concat(),
    );
    put(
        "queues",
        "write_only",
        &[
            &[0u8, 5][..],
            &desc(0x100, 12, 1, 1),
            &desc(0x200, 100, 2, 2),
            &desc(0x300, 100, 2, 2),
        ]
        .concat(),
    );
    put(
        "queues",
        "too_long",
        &[
            &[0u8, 0][..],
            &desc(0x100, 60000, 0, 1),
            &desc(0x20000, 60000, 2, 2),
        ]
        .concat(),
    );
    put(
        "queues",
        "in_the_hole",
        &[&[0u8, 5][..], &desc(0x10000, 64, 2, 1)].concat(),
    );
    let rxd = |len: u16, flags: u8| {
        let l = len.to_le_bytes();
        [l[0], l[1], flags, 0]
    };
    put(
        "queues",
        "rx_one",
        &[&[1u8, 0b0100][..], &rxd(2048, 2)].concat(),
    );
    put(
        "queues",
        "rx_mrg",
        &[
            &[3u8, 0b0001_0101][..],
            &rxd(1526, 2),
            &rxd(1526, 2),
            &rxd(4096, 2),
            &rxd(4096, 0),
            &rxd(512, 2),
        ]
        .concat(),
    );
    put(
        "queues",
        "rx_too_small",
        &[&[1u8, 0b0101][..], &rxd(100, 2), &rxd(2048, 2)].concat(),
    );
    put(
        "queues",
        "rx_readable",
        &[&[3u8, 0b0001][..], &rxd(2048, 3), &rxd(2048, 2)].concat(),
    );
    put(
        "queues",
        "rx_outside",
        &[
            &[3u8, 0b0100][..],
            &rxd(1000, 0),
            &rxd(1000, 6),
            &rxd(2048, 2),
        ]
        .concat(),
    );
    // MRG_RXBUF, one chain posted, too little room for the frame: flush spun for ever before
    // the nostall merge (enable_notification said "more" for the chain it had put back).
    // Found by this target; the frame must now wait.
    put(
        "queues",
        "rx_mrg_spin",
        &[
            0x23, 0x04, 0x00, 0x01, 0x08, 0x08, 0x00, 0x04, 0x00, 0x02, 0x00,
        ],
    );
    put(
        "queues",
        "rx_no_buffers",
        &[&[3u8, 0b1111_0011][..], &rxd(1526, 2)].concat(),
    );
}
