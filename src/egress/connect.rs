//! HTTP CONNECT (RFC 9110 9.3.6) to the host proxy: the request, and the reply parsed with
//! httparse. Only the status matters: 2xx opens the tunnel, anything else refuses it.

use crate::firewall::gate::Target;

/// The largest reply header accepted from a proxy.
pub const MAX_REPLY: usize = 8 * 1024;

/// `CONNECT target:port HTTP/1.1` with its Host header.
pub fn request(target: &Target, port: u16) -> Vec<u8> {
    format!("CONNECT {target}:{port} HTTP/1.1\r\nHost: {target}:{port}\r\n\r\n").into_bytes()
}

/// What the proxy has said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Not a whole header yet.
    Incomplete,
    /// 2xx: the tunnel is open; bytes after `header_len` already belong to the stream.
    Accepted { header_len: usize },
    /// Any other status.
    Refused(u16),
    /// Not HTTP, or a header larger than [`MAX_REPLY`].
    Malformed,
}

pub fn parse_reply(buf: &[u8]) -> Reply {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut reply = httparse::Response::new(&mut headers);
    match reply.parse(buf) {
        Ok(httparse::Status::Complete(header_len)) => match reply.code {
            Some(code) if (200..300).contains(&code) => Reply::Accepted { header_len },
            Some(code) => Reply::Refused(code),
            None => Reply::Malformed,
        },
        Ok(httparse::Status::Partial) if buf.len() < MAX_REPLY => Reply::Incomplete,
        _ => Reply::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_the_target() {
        let r = request(&Target::Name("example.com".into()), 443);
        assert_eq!(
            r,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 Connection established\r\n\r\nxyz"),
            Reply::Accepted { header_len: 39 }
        );
        assert_eq!(
            parse_reply(b"HTTP/1.0 200 OK\r\nProxy-agent: t\r\n\r\n"),
            Reply::Accepted { header_len: 35 }
        );
        assert_eq!(
            parse_reply(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            Reply::Refused(403)
        );
        assert_eq!(parse_reply(b"HTTP/1.1 200 Conn"), Reply::Incomplete);
        assert_eq!(parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"), Reply::Malformed);
        let huge = [b"HTTP/1.1 200 OK\r\n".as_slice(), &vec![b'a'; MAX_REPLY]].concat();
        assert_eq!(parse_reply(&huge), Reply::Malformed);
    }
}
