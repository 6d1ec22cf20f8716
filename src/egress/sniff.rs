//! Naming a flow from its first bytes, for IP-literal destinations that only a name rule can
//! allow: the TLS ClientHello's server name (tls-parser) or the HTTP Host header (httparse).
//! What is found here is only *text the guest sent*: the gate normalises and judges it
//! (`127.1`, `0x7f000001` and `localhost` are addresses there, not names).

use crate::firewall::gate::NameSource;

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
};

/// Read at most this much of a flow before deciding.
pub const MAX_SNIFF: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The host text the guest sent (port split off), and where it was found.
    Name(String, NameSource),
    /// Not enough bytes yet.
    NeedMore,
    /// Neither a ClientHello with SNI nor an HTTP request with Host.
    NoName,
}

const TLS_HANDSHAKE: u8 = 0x16;
const SNI_HOST_NAME: u8 = 0;

pub fn sniff(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::NeedMore;
    }
    let found = if first[0] == TLS_HANDSHAKE {
        tls_server_name(first)
    } else {
        http_host(first)
    };
    match found {
        Sniffed::NeedMore if first.len() >= MAX_SNIFF => Sniffed::NoName,
        Sniffed::Name(n, source) => {
            host_part(&n).map_or(Sniffed::NoName, |h| Sniffed::Name(h, source))
        }
        other => other,
    }
}

fn tls_server_name(first: &[u8]) -> Sniffed {
    let record = match parse_tls_plaintext(first) {
        Ok((_, record)) => record,
        Err(tls_parser::nom::Err::Incomplete(_)) => return Sniffed::NeedMore,
        Err(_) => return Sniffed::NoName,
    };
    for msg in &record.msg {
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg else {
            continue;
        };
        let Some(ext) = hello.ext else {
            return Sniffed::NoName;
        };
        let Ok((_, extensions)) = parse_tls_extensions(ext) else {
            return Sniffed::NoName;
        };
        for e in extensions {
            if let TlsExtension::SNI(names) = e {
                for (kind, name) in names {
                    if kind.0 == SNI_HOST_NAME {
                        return std::str::from_utf8(name).map_or(Sniffed::NoName, |n| {
                            Sniffed::Name(n.to_string(), NameSource::Sni)
                        });
                    }
                }
            }
        }
    }
    Sniffed::NoName
}

fn http_host(first: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(first) {
        Ok(httparse::Status::Complete(_)) => req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map_or(Sniffed::NoName, |v| {
                Sniffed::Name(v.to_string(), NameSource::HttpHost)
            }),
        Ok(httparse::Status::Partial) => Sniffed::NeedMore,
        Err(_) => Sniffed::NoName,
    }
}

/// `Example.COM:8080` -> `Example.COM`: the host part, port split off. Whether it is a
/// name, an address or nothing at all is the gate's to decide.
fn host_part(raw: &str) -> Option<String> {
    let host = raw.trim();
    let host = match host.rsplit_once(':') {
        // `[v6]:port` or `name:port`; a bare IPv6 literal keeps its colons (and is refused).
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_from_a_client_hello() {
        let hello = moat_sim::craft::tls_client_hello("API.Example.com");
        assert_eq!(
            sniff(&hello),
            Sniffed::Name("API.Example.com".into(), NameSource::Sni)
        );
        assert_eq!(sniff(&hello[..20]), Sniffed::NeedMore);
        let mut bad = hello.clone();
        bad[5] = 2; // ServerHello
        assert_eq!(sniff(&bad), Sniffed::NoName);
    }

    #[test]
    fn host_from_an_http_request() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: www.Example.com:8080\r\n\r\n"),
            Sniffed::Name("www.Example.com".into(), NameSource::HttpHost)
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHo"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::NoName);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::NoName);
        // Smuggled hosts come out as sent; the gate refuses them (tests in firewall/gate).
        for (host, text) in [
            ("127.0.0.1:80", "127.0.0.1"),
            ("0x7f000001", "0x7f000001"),
            ("[::1]:80", "[::1]"),
            ("localhost.", "localhost."),
            ("evil.com/x", "evil.com/x"),
        ] {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(
                sniff(req.as_bytes()),
                Sniffed::Name(text.into(), NameSource::HttpHost)
            );
        }
        let endless = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_SNIFF]].concat();
        assert_eq!(sniff(&endless), Sniffed::NoName);
    }
}
