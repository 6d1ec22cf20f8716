//! SOCKS5 CONNECT (RFC 1928), no authentication: greeting, request, reply.
//!
//! Written here because the SOCKS5 crates are async (tokio) clients that own the socket;
//! moat needs the two messages as bytes for its own non-blocking event loop. The protocol
//! is small and tested against dante-server.

use crate::firewall::gate::Target;

pub const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const CMD_CONNECT: u8 = 1;
const CMD_UDP_ASSOCIATE: u8 = 3;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// The client greeting: version 5, one method, "no authentication".
pub fn greeting() -> Vec<u8> {
    vec![VERSION, 1, NO_AUTH]
}

/// The CONNECT request, with the domain-name address type when a name is known.
pub fn connect_request(target: &Target, port: u16) -> Option<Vec<u8>> {
    let mut req = vec![VERSION, CMD_CONNECT, 0];
    match target {
        Target::Ip(ip) => {
            req.push(ATYP_IPV4);
            req.extend_from_slice(&ip.octets());
        }
        Target::Name(name) => {
            let len = u8::try_from(name.len()).ok()?;
            req.push(ATYP_DOMAIN);
            req.push(len);
            req.extend_from_slice(name.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    Some(req)
}

/// The UDP ASSOCIATE request: the address our datagrams will come from.
pub fn udp_associate_request(from: std::net::SocketAddrV4) -> Vec<u8> {
    let mut req = vec![VERSION, CMD_UDP_ASSOCIATE, 0, ATYP_IPV4];
    req.extend_from_slice(&from.ip().octets());
    req.extend_from_slice(&from.port().to_be_bytes());
    req
}

/// The bound address in a successful reply (for UDP ASSOCIATE: where to send datagrams).
pub fn reply_address(buf: &[u8]) -> Option<std::net::SocketAddr> {
    match *buf.get(3)? {
        ATYP_IPV4 => {
            let ip: [u8; 4] = buf.get(4..8)?.try_into().ok()?;
            let port = u16::from_be_bytes(buf.get(8..10)?.try_into().ok()?);
            Some(std::net::SocketAddr::from((ip, port)))
        }
        ATYP_IPV6 => {
            let ip: [u8; 16] = buf.get(4..20)?.try_into().ok()?;
            let port = u16::from_be_bytes(buf.get(20..22)?.try_into().ok()?);
            Some(std::net::SocketAddr::from((ip, port)))
        }
        _ => None,
    }
}

/// The header of a datagram sent through the relay (RFC 1928 section 7), no fragmentation.
pub fn udp_header(target: &Target, port: u16) -> Option<Vec<u8>> {
    let mut h = vec![0, 0, 0];
    match target {
        Target::Ip(ip) => {
            h.push(ATYP_IPV4);
            h.extend_from_slice(&ip.octets());
        }
        Target::Name(name) => {
            h.push(ATYP_DOMAIN);
            h.push(u8::try_from(name.len()).ok()?);
            h.extend_from_slice(name.as_bytes());
        }
    }
    h.extend_from_slice(&port.to_be_bytes());
    Some(h)
}

/// The payload of a datagram from the relay: skips the header; `None` for fragments or
/// malformed headers.
pub fn udp_payload(datagram: &[u8]) -> Option<&[u8]> {
    if datagram.len() < 4 || datagram[2] != 0 {
        return None;
    }
    let addr_len = match datagram[3] {
        ATYP_IPV4 => 4,
        ATYP_IPV6 => 16,
        ATYP_DOMAIN => 1 + usize::from(*datagram.get(4)?),
        _ => return None,
    };
    datagram.get(4 + addr_len + 2..)
}

/// What a reply buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Incomplete,
    /// Success; the reply took this many bytes.
    Done(usize),
    /// The server said no (method refused: 0xff; request: the REP code).
    Refused(u8),
    Malformed,
}

/// The method-selection reply to the greeting.
pub fn parse_method(buf: &[u8]) -> Reply {
    match buf {
        [] | [_] => Reply::Incomplete,
        [VERSION, NO_AUTH, ..] => Reply::Done(2),
        [VERSION, method, ..] => Reply::Refused(*method),
        _ => Reply::Malformed,
    }
}

/// The reply to CONNECT: VER REP RSV ATYP BND.ADDR BND.PORT.
pub fn parse_connect_reply(buf: &[u8]) -> Reply {
    if buf.len() < 5 {
        return Reply::Incomplete;
    }
    if buf[0] != VERSION || buf[2] != 0 {
        return Reply::Malformed;
    }
    if buf[1] != 0 {
        return Reply::Refused(buf[1]);
    }
    let addr_len = match buf[3] {
        ATYP_IPV4 => 4,
        ATYP_IPV6 => 16,
        ATYP_DOMAIN => 1 + usize::from(buf[4]),
        _ => return Reply::Malformed,
    };
    let total = 4 + addr_len + 2;
    if buf.len() < total {
        Reply::Incomplete
    } else {
        Reply::Done(total)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn requests() {
        assert_eq!(greeting(), [5, 1, 0]);
        assert_eq!(
            connect_request(&Target::Name("a.io".into()), 443).unwrap(),
            [5, 1, 0, 3, 4, b'a', b'.', b'i', b'o', 1, 187]
        );
        assert_eq!(
            connect_request(&Target::Ip(Ipv4Addr::new(203, 0, 113, 1)), 80).unwrap(),
            [5, 1, 0, 1, 203, 0, 113, 1, 0, 80]
        );
        assert!(connect_request(&Target::Name("x".repeat(300)), 1).is_none());
    }

    #[test]
    fn replies() {
        assert_eq!(parse_method(&[5]), Reply::Incomplete);
        assert_eq!(parse_method(&[5, 0]), Reply::Done(2));
        assert_eq!(parse_method(&[5, 0xff]), Reply::Refused(0xff));
        assert_eq!(parse_method(&[4, 0]), Reply::Malformed);
        assert_eq!(
            parse_connect_reply(&[5, 0, 0, 1, 127, 0, 0, 1, 0]),
            Reply::Incomplete
        );
        assert_eq!(
            parse_connect_reply(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 80, 9]),
            Reply::Done(10)
        );
        assert_eq!(
            parse_connect_reply(&[5, 0, 0, 3, 1, b'x', 0, 80]),
            Reply::Done(8)
        );
        assert_eq!(
            parse_connect_reply(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]),
            Reply::Refused(2)
        );
        assert_eq!(parse_connect_reply(&[5, 0, 0, 9, 0, 0]), Reply::Malformed);
        assert_eq!(
            reply_address(&[5, 0, 0, 1, 127, 0, 0, 1, 0x1f, 0x90]),
            Some("127.0.0.1:8080".parse().unwrap())
        );
    }

    #[test]
    fn udp_framing() {
        let h = udp_header(&Target::Name("a.io".into()), 53).unwrap();
        assert_eq!(h, [0, 0, 0, 3, 4, b'a', b'.', b'i', b'o', 0, 53]);
        let mut d = h.clone();
        d.extend_from_slice(b"payload");
        assert_eq!(udp_payload(&d), Some(&b"payload"[..]));
        let mut frag = d.clone();
        frag[2] = 1;
        assert_eq!(udp_payload(&frag), None);
        assert_eq!(udp_payload(&[0, 0, 0, 1, 1, 2]), None);
        assert_eq!(
            udp_associate_request("127.0.0.1:4000".parse().unwrap()),
            [5, 3, 0, 1, 127, 0, 0, 1, 0x0f, 0xa0]
        );
    }
}
