//! Proxy defence in depth: the canary asks the host proxy directly, as moat would (HTTP
//! CONNECT to `proxy.http`, SOCKS5 CONNECT to `proxy.socks5`), for destinations moat's gate
//! never sends. A proxy that accepts one — or that tries to reach it — is missing a
//! destination ACL: a bug in moat's gate would then become a breach.
//!
//! The canary only ever opens a socket to the configured proxy; where the proxy itself
//! connects is the proxy's decision, which is exactly what is being tested.
//!
//! To add an attempt, add a row to [`TARGETS`] (or build one in [`targets`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{Expect, Outcome};

/// How long the proxy has to answer one request. A proxy that says nothing for this long
/// is probably trying to connect (no ACL refused it at once).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// One destination the proxy must refuse, and the ACL that refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// The destination ACL that is missing if the proxy accepts it (README, "Configure
    /// your proxy").
    pub acl: String,
}

/// The fixed destinations (`--rebind-name` adds one more).
pub const TARGETS: &[(&str, u16, &str)] = &[
    ("127.0.0.1", 22, "loopback: dst 127.0.0.0/8"),
    (
        "localhost",
        22,
        "loopback by name: dst 127.0.0.0/8 (the proxy resolves localhost)",
    ),
    (
        "169.254.169.254",
        80,
        "link-local / cloud metadata: dst 169.254.0.0/16",
    ),
    ("10.0.0.1", 80, "private: dst 10.0.0.0/8"),
    ("192.168.0.1", 80, "private: dst 192.168.0.0/16"),
    ("100.64.0.1", 80, "CGNAT: dst 100.64.0.0/10"),
];

/// Every destination of one run.
pub fn targets(rebind_name: Option<&str>) -> Vec<Target> {
    let mut out: Vec<Target> = TARGETS
        .iter()
        .map(|(host, port, acl)| Target {
            host: (*host).to_string(),
            port: *port,
            acl: (*acl).to_string(),
        })
        .collect();
    if let Some(name) = rebind_name {
        out.push(Target {
            host: name.to_string(),
            port: 80,
            acl: format!(
                "private/loopback after resolution: dst ACLs that also match what {name} resolves to"
            ),
        });
    }
    out
}

/// What the proxy did with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx / SOCKS success: the tunnel is open.
    Accepted(String),
    /// The proxy tried to reach the destination and failed (5xx, SOCKS network/host
    /// unreachable or connection refused, or no answer in time): no ACL stopped it.
    Tried(String),
    /// Refused by the proxy's rules (4xx, SOCKS "not allowed by ruleset").
    Refused(String),
    /// The canary could not ask (the proxy is down): the attempt proves nothing.
    Unreachable(String),
}

/// `CONNECT host:port` to an HTTP proxy.
pub fn http_connect(proxy: SocketAddr, host: &str, port: u16) -> Answer {
    let mut conn = match open(proxy) {
        Ok(c) => c,
        Err(e) => return Answer::Unreachable(e),
    };
    let authority = authority(host, port);
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    if let Err(e) = conn.write_all(req.as_bytes()) {
        return Answer::Unreachable(format!("cannot send to the proxy {proxy}: {e}"));
    }
    let deadline = Instant::now() + ANSWER_WITHIN;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut reply = httparse::Response::new(&mut headers);
        match reply.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = reply.code.unwrap_or(0);
                let line = format!("HTTP {code} {}", reply.reason.unwrap_or(""));
                return match code {
                    200..=299 => Answer::Accepted(line),
                    400..=499 => Answer::Refused(line),
                    _ => Answer::Tried(line),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            _ => return Answer::Tried(format!("not an HTTP answer: {:?}", preview(&buf))),
        }
        if Instant::now() >= deadline {
            return Answer::Tried(format!(
                "no answer within {}s (the proxy is trying to connect?)",
                ANSWER_WITHIN.as_secs()
            ));
        }
        match conn.read(&mut chunk) {
            Ok(0) => {
                return if buf.is_empty() {
                    Answer::Refused("closed without an answer".into())
                } else {
                    Answer::Tried(format!("incomplete answer: {:?}", preview(&buf)))
                }
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => {}
            Err(e) => return Answer::Refused(format!("connection ended: {e}")),
        }
    }
}

/// SOCKS5 CONNECT (no authentication) to a SOCKS5 proxy; names go as domain names, as
/// moat sends them.
pub fn socks5_connect(proxy: SocketAddr, host: &str, port: u16) -> Answer {
    let mut conn = match open(proxy) {
        Ok(c) => c,
        Err(e) => return Answer::Unreachable(e),
    };
    let mut req = vec![5u8, 1, 0];
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            req.push(1);
            req.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            let Ok(len) = u8::try_from(host.len()) else {
                return Answer::Unreachable(format!("name too long for SOCKS5: {host}"));
            };
            req.push(3);
            req.push(len);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    let mut method = [0u8; 2];
    let greeted = conn
        .write_all(&[5, 1, 0])
        .and_then(|_| conn.read_exact(&mut method));
    match greeted {
        Ok(()) if method == [5, 0] => {}
        Ok(()) => return Answer::Refused(format!("method refused: {method:?}")),
        Err(e) if timed_out(&e) => {
            return Answer::Unreachable(format!("no SOCKS5 greeting answer from {proxy}"))
        }
        Err(e) => return Answer::Unreachable(format!("SOCKS5 greeting to {proxy}: {e}")),
    }
    let mut head = [0u8; 2];
    match conn
        .write_all(&req)
        .and_then(|_| conn.read_exact(&mut head))
    {
        Ok(()) => match head[1] {
            0 => Answer::Accepted("SOCKS5 succeeded".into()),
            2 => Answer::Refused("SOCKS5 2: not allowed by ruleset".into()),
            7 | 8 => Answer::Refused(format!("SOCKS5 {}: unsupported", head[1])),
            code => Answer::Tried(format!("SOCKS5 {code}: {}", socks_reason(code))),
        },
        Err(e) if timed_out(&e) => Answer::Tried(format!(
            "no answer within {}s (the proxy is trying to connect?)",
            ANSWER_WITHIN.as_secs()
        )),
        Err(e) => Answer::Refused(format!("connection ended: {e}")),
    }
}

fn socks_reason(code: u8) -> &'static str {
    match code {
        1 => "general failure",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        _ => "unknown reply",
    }
}

fn open(proxy: SocketAddr) -> Result<TcpStream, String> {
    let conn = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the proxy {proxy}: {e}"))?;
    let _ = conn.set_read_timeout(Some(Duration::from_millis(250)));
    let _ = conn.set_write_timeout(Some(ANSWER_WITHIN));
    Ok(conn)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn authority(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

fn preview(buf: &[u8]) -> String {
    String::from_utf8_lossy(&buf[..buf.len().min(60)]).into_owned()
}

/// How one kind of proxy is asked.
type Ask = fn(SocketAddr, &str, u16) -> Answer;

/// Ask every configured proxy for every target. One outcome per (proxy, target).
pub fn run(
    http: Option<SocketAddr>,
    socks5: Option<SocketAddr>,
    rebind_name: Option<&str>,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let kinds: [(&str, Option<SocketAddr>, Ask); 2] = [
        ("http", http, http_connect),
        ("socks5", socks5, socks5_connect),
    ];
    for (kind, proxy, ask) in kinds {
        let Some(proxy) = proxy else { continue };
        for t in targets(rebind_name) {
            let answer = ask(proxy, &t.host, t.port);
            out.push(outcome(kind, proxy, &t, answer));
        }
    }
    out
}

fn outcome(kind: &str, proxy: SocketAddr, t: &Target, answer: Answer) -> Outcome {
    let attempt = format!("proxy {kind} {}:{}", t.host, t.port);
    let (got_through, unable, detail) = match answer {
        Answer::Accepted(a) => (
            true,
            false,
            format!("{proxy} accepted ({a}): the proxy lacks the ACL {}", t.acl),
        ),
        Answer::Tried(a) => (
            true,
            false,
            format!(
                "{proxy} tried to reach it ({a}): no ACL refused it; the proxy lacks the ACL {}",
                t.acl
            ),
        ),
        Answer::Refused(a) => (false, false, format!("{proxy} refused ({a})")),
        Answer::Unreachable(e) => (false, true, e),
    };
    Outcome {
        attempt,
        expected: Expect::Blocked,
        got_through,
        unable,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot proxy on loopback that reads a request and answers `reply`.
    fn answering(reply: &'static [u8], socks: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 512];
                if socks {
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(&[5, 0]);
                }
                let _ = c.read(&mut buf);
                let _ = c.write_all(reply);
            }
        });
        addr
    }

    #[test]
    fn http_answers_are_classified() {
        let ok = answering(b"HTTP/1.1 200 Connection established\r\n\r\n", false);
        assert!(matches!(
            http_connect(ok, "127.0.0.1", 22),
            Answer::Accepted(_)
        ));
        let denied = answering(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(matches!(
            http_connect(denied, "127.0.0.1", 22),
            Answer::Refused(_)
        ));
        let tried = answering(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", false);
        assert!(matches!(
            http_connect(tried, "127.0.0.1", 22),
            Answer::Tried(_)
        ));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        assert!(matches!(
            http_connect(addr, "127.0.0.1", 22),
            Answer::Unreachable(_)
        ));
    }

    #[test]
    fn socks_answers_are_classified() {
        let ok = answering(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 22], true);
        assert!(matches!(
            socks5_connect(ok, "localhost", 22),
            Answer::Accepted(_)
        ));
        let denied = answering(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0], true);
        assert!(matches!(
            socks5_connect(denied, "10.0.0.1", 80),
            Answer::Refused(_)
        ));
        let tried = answering(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0], true);
        assert!(matches!(
            socks5_connect(tried, "10.0.0.1", 80),
            Answer::Tried(_)
        ));
    }

    #[test]
    fn an_accepting_proxy_fails_naming_the_acl() {
        let ok = answering(b"HTTP/1.1 200 OK\r\n\r\n", false);
        let out = run(Some(ok), None, Some("rebind.test"));
        assert_eq!(out.len(), TARGETS.len() + 1);
        let first = &out[0];
        assert!(!first.passed());
        assert_eq!(first.attempt, "proxy http 127.0.0.1:22");
        assert!(first.detail.contains("dst 127.0.0.0/8"), "{}", first.detail);
        assert!(out.last().unwrap().attempt.contains("rebind.test:80"));
    }
}
