//! The explicit-proxy front (`proxy.explicit_port`): the guest talks to `gateway:PORT` as to
//! an HTTP proxy (`http_proxy=http://GATEWAY:PORT`). moat is that proxy's front, not a
//! splice: it reads the request head (httparse), takes the target from `CONNECT host:port`
//! or from an absolute-form `http://` URI (WHATWG parsing, the `url` crate), has the gate
//! admit it like any other flow, and only then opens the tunnel itself (CONNECT to
//! `proxy.http`, or SOCKS5 if the admitting rule says so). A refused request gets a 403
//! with a one-line reason and nothing reaches the proxy.
//!
//! One request per connection: after the first head, the connection is a tunnel to the
//! admitted destination only. An absolute-form request is sent to the origin rewritten to
//! origin-form with `Connection: close`, so a client that would reuse the connection for
//! another host sees it close and opens a new one (which is admitted in turn).

/// The largest request head read before deciding.
pub const MAX_HEAD: usize = 16 * 1024;

/// What a flow of the front does once its tunnel is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Front {
    /// Bytes of the guest's stream that were the request head (for moat, not the origin).
    pub head_len: usize,
    /// Sent to the guest when the tunnel opens (`200 Connection established` for CONNECT).
    pub to_guest: Vec<u8>,
    /// Sent into the tunnel before the guest's own bytes (the rewritten absolute-form head).
    pub to_origin: Vec<u8>,
}

/// A request head read from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// Not a whole head yet.
    NeedMore,
    /// A request for `host:port` (host exactly as the client wrote it, for the gate).
    Request {
        host: String,
        port: u16,
        front: Front,
    },
    /// Not a request moat carries: answered 400 with this reason.
    Malformed(&'static str),
}

/// Hop-by-hop and proxy headers that are not passed to the origin.
const DROPPED_HEADERS: [&str; 5] = [
    "proxy-connection",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "host",
];

/// Read the request head at the start of `buf`.
pub fn read_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Head::NeedMore,
        Ok(httparse::Status::Partial) => return Head::Malformed("request head too large"),
        Err(_) => return Head::Malformed("not an HTTP request"),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Head::Malformed("not an HTTP request");
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = target.rsplit_once(':').filter(|(h, _)| !h.is_empty()) else {
            return Head::Malformed("CONNECT needs host:port");
        };
        let Some(port) = port.parse::<u16>().ok().filter(|p| *p != 0) else {
            return Head::Malformed("CONNECT needs a port from 1 to 65535");
        };
        return Head::Request {
            host: host.to_string(),
            port,
            front: Front {
                head_len,
                to_guest: b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
                to_origin: Vec::new(),
            },
        };
    }
    let Ok(url) = url::Url::parse(target) else {
        return Head::Malformed("not a CONNECT or an absolute http:// request");
    };
    if url.scheme() != "http" {
        return Head::Malformed("only http:// in absolute form (use CONNECT for https)");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Head::Malformed("credentials in the URL");
    }
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Head::Malformed("no host in the URL");
    };
    if port == 0 {
        return Head::Malformed("the URL needs a port from 1 to 65535");
    }
    let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let path = if path.is_empty() { "/" } else { path };
    let version = if req.version == Some(0) { "1.0" } else { "1.1" };
    let mut head = format!("{method} {path} HTTP/{version}\r\n").into_bytes();
    match url.port() {
        Some(p) => head.extend_from_slice(format!("Host: {host}:{p}\r\n").as_bytes()),
        None => head.extend_from_slice(format!("Host: {host}\r\n").as_bytes()),
    }
    for h in req.headers.iter() {
        if DROPPED_HEADERS
            .iter()
            .any(|d| h.name.eq_ignore_ascii_case(d))
        {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Head::Request {
        host: host.to_string(),
        port,
        front: Front {
            head_len,
            to_guest: Vec::new(),
            to_origin: head,
        },
    }
}

/// A short plain-text HTTP error for the guest's client, then the connection closes.
pub fn error_response(code: u16, reason: &str) -> Vec<u8> {
    let phrase = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("moat: {reason}\n");
    format!(
        "HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests() {
        let head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nhello";
        let Head::Request { host, port, front } = read_head(head) else {
            panic!("{:?}", read_head(head));
        };
        assert_eq!((host.as_str(), port), ("example.com", 443));
        assert_eq!(front.head_len, head.len() - 5);
        assert!(front.to_guest.starts_with(b"HTTP/1.1 200"));
        assert!(front.to_origin.is_empty());
        // The host text goes to the gate as written: it normalises and judges it.
        assert!(matches!(
            read_head(b"CONNECT 0x7f000001:22 HTTP/1.1\r\n\r\n"),
            Head::Request { host, port: 22, .. } if host == "0x7f000001"
        ));
        assert!(matches!(
            read_head(b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n"),
            Head::Request { host, .. } if host == "[::1]"
        ));
    }

    #[test]
    fn absolute_form_is_rewritten_for_the_origin() {
        let head = b"GET http://Example.com:8080/a/b?c=d HTTP/1.1\r\nHost: evil.test\r\nProxy-Connection: keep-alive\r\nUser-Agent: t\r\n\r\n";
        let Head::Request { host, port, front } = read_head(head) else {
            panic!()
        };
        assert_eq!((host.as_str(), port), ("example.com", 8080));
        assert_eq!(
            String::from_utf8(front.to_origin).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: t\r\nConnection: close\r\n\r\n"
        );
        assert!(front.to_guest.is_empty());
        // The URL parser reads address forms as addresses: the gate sees the address.
        assert!(matches!(
            read_head(b"GET http://2130706433:2375/version HTTP/1.1\r\n\r\n"),
            Head::Request { host, port: 2375, .. } if host == "127.0.0.1"
        ));
        assert!(matches!(
            read_head(b"GET http://example.com HTTP/1.0\r\n\r\n"),
            Head::Request { port: 80, front, .. } if front.to_origin.starts_with(b"GET / HTTP/1.0\r\n")
        ));
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let cases: [&[u8]; 10] = [
            // Port 0 in absolute form, like CONNECT's (found by the same target).
            b"GET http:0X:0/8/ HTTP/1.1\r\n\r\n",
            b"CONNECT example.com HTTP/1.1\r\n\r\n",
            // No host at all (found by the `explicit_head` fuzz target): a bad request,
            // not an empty host for the gate.
            b"CONNECT :443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n",
            b"GET /relative HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"GET https://example.com/ HTTP/1.1\r\n\r\n",
            b"GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00binary",
            b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert!(
                matches!(read_head(case), Head::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        assert_eq!(read_head(b"CONNECT example.com:443 HT"), Head::NeedMore);
        let endless = [
            b"GET http://a/ HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD],
        ]
        .concat();
        assert!(matches!(read_head(&endless), Head::Malformed(_)));
    }

    #[test]
    fn error_responses_are_http() {
        let r = String::from_utf8(error_response(403, "reserved_destination")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nmoat: reserved_destination\n"));
    }
}
