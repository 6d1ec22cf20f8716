//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus`
//! (from the repository root). Valid inputs for every target, built with moat's own crafters.
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use dhcproto::v4::MessageType;
use moat::firewall::gate::Target;
use moat::egress::socks5;
use moat::frame::craft;
use moat::policy::{MacAddr, GATEWAY_MAC};

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
    put("frame", "arp_request", &hdr(craft::arp_request(mac, me, gw)));
    put("frame", "icmp_echo", &hdr(craft::icmp_echo(mac, GATEWAY_MAC, me, gw, 1, 1, b"ping")));
    put("frame", "tcp_syn_443", &hdr(craft::tcp_syn(mac, GATEWAY_MAC, (me, 40000), (Ipv4Addr::new(203, 0, 113, 5), 443))));
    put("frame", "tcp_syn_80", &hdr(craft::tcp_syn(mac, GATEWAY_MAC, (me, 40001), (Ipv4Addr::new(198, 18, 0, 1), 80))));
    put("frame", "dns_udp", &hdr(craft::udp(mac, GATEWAY_MAC, (me, 5353), (gw, 53), &dns_query("example.com", 1))));
    put("frame", "udp_other", &hdr(craft::udp(mac, GATEWAY_MAC, (me, 5353), (Ipv4Addr::new(203, 0, 113, 5), 123), b"ntp?")));
    for (i, kind) in [MessageType::Discover, MessageType::Request, MessageType::Release, MessageType::Inform].into_iter().enumerate() {
        let req = if kind == MessageType::Request { Some(me) } else { None };
        let f = craft::dhcp(mac, kind, 0x1000 + i as u32, Ipv4Addr::UNSPECIFIED, req, Some(gw), GATEWAY_MAC);
        put("frame", &format!("dhcp_{i}"), &hdr(f.clone()));
        // dhcp target: the DHCP payload after Ethernet (14) + IPv4 (20) + UDP (8)
        put("dhcp", &format!("dhcp_{i}"), &f[42..]);
    }
    let renew = craft::dhcp(mac, MessageType::Request, 7, me, None, Some(gw), GATEWAY_MAC);
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
            put("policy", p.file_name().unwrap().to_str().unwrap(), &fs::read(&p).unwrap());
        }
    }
    put("policy", "minimal.toml", b"[vm]\nname = \"a\"\nmac = \"52:54:00:00:00:01\"\naddress = \"10.0.0.2/30\"\n");

    // proxy replies
    put("proxy_reply", "connect_200", b"HTTP/1.1 200 Connection established\r\n\r\n");
    put("proxy_reply", "connect_403", b"HTTP/1.0 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    put("proxy_reply", "socks_method", &[5, 0]);
    put("proxy_reply", "socks_reply_v4", &[5, 0, 0, 1, 127, 0, 0, 1, 0x1f, 0x90]);
    put("proxy_reply", "socks_reply_name", &[5, 0, 0, 3, 4, b'a', b'.', b'i', b'o', 1, 187]);
    put("proxy_reply", "socks_reply_v6", &[5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 53]);
    put("proxy_reply", "socks_fail", &[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
    let mut dgram = socks5::udp_header(&Target::Name("dns.example".into()), 53).unwrap();
    dgram.extend_from_slice(&dns_query("example.com", 1));
    put("proxy_reply", "socks_udp", &dgram);
    put("proxy_reply", "socks_assoc", &socks5::udp_associate_request(SocketAddrV4::new(me, 9)));

    // sniff
    put("sniff", "tls_hello", &craft::tls_client_hello("example.com"));
    put("sniff", "http_get", b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: x\r\n\r\n");
    put("sniff", "http_connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
    put("sniff", "ssh", b"SSH-2.0-OpenSSH_9.6\r\n");
}
