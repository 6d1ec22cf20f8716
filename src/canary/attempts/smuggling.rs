//! Forbidden TCP attempts whose first bytes try to talk moat into a destination: Host and
//! SNI names for loopback and the metadata service, requests to the explicit-proxy port.

use std::net::Ipv4Addr;

use super::internet_address;
use crate::policy::{Policy, Protocol};

/// A forbidden TCP attempt that carries bytes (moat may take the handshake to read them):
/// it got through only if moat opened a proxy connection for it or the bytes came back.
pub struct PayloadAttempt {
    pub name: String,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub payload: Vec<u8>,
    pub detail: String,
}

/// The attempts whose first bytes try to talk moat into a destination. To add one (a
/// smuggled Host or SNI name, a request to the explicit proxy port), add a row here; it is
/// judged by moat's own witness (a proxy connection opened) in both modes.
pub fn payload_attempts(policy: &Policy) -> Vec<PayloadAttempt> {
    let internet = internet_address(policy);
    let open_port = policy
        .outbound
        .iter()
        .find(|r| r.protocol == Protocol::Tcp)
        .and_then(|r| r.ports.first())
        .map_or(443, |p| p.lo);
    let mut attempts = vec![PayloadAttempt {
        name: "tcp to the internet (ip literal)".into(),
        dst: internet,
        port: open_port,
        payload: b"moat-canary\n".to_vec(),
        detail: format!("{internet}:{open_port}, allowed port, no name"),
    }];
    // Names smuggled in the first bytes: loopback and the metadata service, as a resolver
    // or URL parser would read them. Skipped where a rule names that address by CIDR on the
    // port (the policy allows it then, by design).
    let named_by_cidr = |ip: Ipv4Addr| {
        policy
            .outbound
            .iter()
            .any(|r| r.protocol == Protocol::Tcp && r.allows_port(open_port) && r.allows_ip(ip))
    };
    let smuggled = [
        ("127.0.0.1", Ipv4Addr::LOCALHOST),
        ("0x7f000001", Ipv4Addr::LOCALHOST),
        ("2130706433", Ipv4Addr::LOCALHOST),
        ("localhost", Ipv4Addr::LOCALHOST),
        ("169.254.169.254", METADATA),
    ];
    for (text, _) in smuggled.into_iter().filter(|(_, ip)| !named_by_cidr(*ip)) {
        attempts.push(PayloadAttempt {
            name: format!("host header smuggling {text}"),
            dst: internet,
            port: open_port,
            payload: format!("GET / HTTP/1.1\r\nHost: {text}\r\n\r\n").into_bytes(),
            detail: format!("{internet}:{open_port}, Host: {text}"),
        });
        attempts.push(PayloadAttempt {
            name: format!("tls sni smuggling {text}"),
            dst: internet,
            port: open_port,
            payload: moat_sim::craft::tls_client_hello(text),
            detail: format!("{internet}:{open_port}, SNI {text}"),
        });
    }
    // The explicit-proxy port: moat's front must refuse these (403), not tunnel them.
    if let Some(port) = policy.proxy.explicit_port {
        let gw = policy.vm.gateway;
        for (request, ip) in [
            ("CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n", Ipv4Addr::LOCALHOST),
            ("CONNECT localhost:22 HTTP/1.1\r\n\r\n", Ipv4Addr::LOCALHOST),
            ("CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n", METADATA),
            (
                "GET http://2130706433:2375/version HTTP/1.1\r\n\r\n",
                Ipv4Addr::LOCALHOST,
            ),
        ] {
            let named = policy.outbound.iter().any(|r| r.allows_ip(ip));
            if named {
                continue;
            }
            let line = request.lines().next().unwrap_or_default();
            attempts.push(PayloadAttempt {
                name: format!("explicit proxy {line}"),
                dst: gw,
                port,
                payload: request.as_bytes().to_vec(),
                detail: format!("{gw}:{port}, {line}"),
            });
        }
    }
    attempts
}

/// The cloud metadata address.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
