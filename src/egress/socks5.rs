//! SOCKS5 CONNECT (RFC 1928), no authentication: greeting, request, reply.
//!
//! Written here because the SOCKS5 crates are async (tokio) clients that own the socket;
//! moat needs the two messages as bytes for its own non-blocking event loop. The protocol
//! is small and tested against dante-server.

use super::route::Target;

pub const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const CMD_CONNECT: u8 = 1;
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
    }
}
