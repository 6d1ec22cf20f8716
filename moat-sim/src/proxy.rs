//! Test peers on loopback: a minimal HTTP CONNECT proxy (to see what moat asks for and to
//! refuse on demand) and an origin server with echo, upload-hash and download modes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// FNV-1a over a byte stream: enough to prove byte-exactness in tests.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The deterministic test pattern: byte i is (i * 7 + i / 251) mod 256.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let j = offset + i;
            (j.wrapping_mul(7) + j / 251) as u8
        })
        .collect()
}

pub const DOWNLOAD_LEN: u64 = 16 << 20;

/// The origin's answer to `GET /big`: 4096 lines `moat-line-NNNNN` (65536 bytes), which a
/// busybox guest rebuilds with awk to compare (scripts/guest/checks.sh `fetch_big`).
pub fn big_body() -> Vec<u8> {
    (0..4096)
        .flat_map(|i| format!("moat-line-{i:05}\n").into_bytes())
        .collect()
}

/// Bytes the origin has written in 'B' mode and read in 'S' mode, for backpressure tests.
pub static BULK_WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// 'W' mode connections that started waiting (their mode byte arrived).
pub static PEER_WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// How 'W' mode connections ended, in order.
pub static PEER_END: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// 'S' mode waits until this is set before it reads anything.
pub static SLOW_RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An origin server: first byte 'E' echo, 'U' hash everything until EOF and answer
/// (length, hash), 'D' send DOWNLOAD_LEN pattern bytes and close, 'B' bulk (length first),
/// 'G' an HTTP request answered with "ok".
pub fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || serve_origin(conn));
        }
    });
    addr
}

/// Read `conn` to its end, then answer its length and FNV hash (8 + 8 bytes, big-endian),
/// so a test can check an upload byte-exact without the origin keeping it.
fn answer_length_and_hash(conn: &mut TcpStream, buf: &mut [u8]) {
    let (mut len, mut hash) = (0u64, Fnv::default());
    loop {
        match conn.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                len += n as u64;
                hash.update(&buf[..n]);
            }
            Err(_) => return,
        }
    }
    let mut reply = len.to_be_bytes().to_vec();
    reply.extend_from_slice(&hash.0.to_be_bytes());
    let _ = conn.write_all(&reply);
}

fn serve_origin(mut conn: TcpStream) {
    let mut mode = [0u8; 1];
    if conn.read_exact(&mut mode).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    match mode[0] {
        b'E' => loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        },
        b'U' => {
            answer_length_and_hash(&mut conn, &mut buf);
        }
        b'G' => {
            // An HTTP request: read to the end of its header, answer "ok".
            let mut head = vec![b'G'];
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if conn.read_exact(&mut b).is_err() {
                    return;
                }
                head.push(b[0]);
            }
            // `GET /big`: BIG_BODY (64 KiB a guest can check by itself); anything else "ok".
            let body = if head.starts_with(b"GET /big ") {
                big_body()
            } else {
                b"ok".to_vec()
            };
            let mut reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            reply.extend_from_slice(&body);
            let _ = conn.write_all(&reply);
        }
        b'R' => {
            // Read a little, then reset the connection (SO_LINGER 0) instead of closing it.
            let mut some = [0u8; 4];
            let _ = conn.read_exact(&mut some);
            let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
        b'W' => {
            // Wait for the peer: report how the connection ended ("eof" or "reset").
            PEER_WAITING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut rest = Vec::new();
            let end = match conn.read_to_end(&mut rest) {
                Ok(_) => "eof",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                Err(_) => "error",
            };
            PEER_END.lock().unwrap().push(end.to_string());
            return;
        }
        b'B' => {
            // Bulk download: an 8-byte big-endian length, then that many pattern bytes.
            let mut len = [0u8; 8];
            if conn.read_exact(&mut len).is_err() {
                return;
            }
            let total = u64::from_be_bytes(len);
            let block = pattern(0, 64 * 1024);
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(block.len() as u64) as usize;
                if conn.write_all(&block[..n]).is_err() {
                    return;
                }
                sent += n as u64;
                BULK_WRITTEN.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            }
        }
        b'S' => {
            // A slow reader: nothing until released, then hash like 'U'.
            while !SLOW_RELEASE.load(std::sync::atomic::Ordering::SeqCst) {
                thread::sleep(std::time::Duration::from_millis(10));
            }
            answer_length_and_hash(&mut conn, &mut buf);
        }
        b'D' => {
            let mut sent = 0u64;
            while sent < DOWNLOAD_LEN {
                let n = (DOWNLOAD_LEN - sent).min(64 * 1024) as usize;
                if conn.write_all(&pattern(sent, n)).is_err() {
                    return;
                }
                sent += n as u64;
            }
        }
        _ => {}
    }
    let _ = conn.shutdown(Shutdown::Both);
}

/// How the test proxy answers CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Accept,
    Refuse(u16),
}

/// A CONNECT proxy on loopback: every name it is asked for goes to `origin` (names in tests
/// resolve to loopback this way); IP literals are connected to as given.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// Every CONNECT target (`host:port`) asked for, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl TestProxy {
    pub fn start(mode: ProxyMode, origin: SocketAddr) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = Arc::clone(&log);
                thread::spawn(move || proxy_conn(conn, mode, origin, log));
            }
        });
        TestProxy { addr, requests }
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn proxy_conn(conn: TcpStream, mode: ProxyMode, origin: SocketAddr, log: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let target = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    log.lock().unwrap().push(target.clone());
    let mut client = conn;
    if let ProxyMode::Refuse(code) = mode {
        let _ = write!(
            client,
            "HTTP/1.1 {code} Refused\r\nContent-Length: 0\r\n\r\n"
        );
        return;
    }
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
    let upstream = match host.parse::<std::net::Ipv4Addr>() {
        Ok(_) => TcpStream::connect(&target),
        Err(_) => TcpStream::connect(origin),
    };
    let Ok(upstream) = upstream else {
        let _ = write!(client, "HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    let _ = write!(client, "HTTP/1.1 200 Connection established\r\n\r\n");
    // Bytes the BufReader already pulled past the header go first.
    let early = reader.buffer().to_vec();
    let mut up = upstream.try_clone().unwrap();
    if !early.is_empty() && up.write_all(&early).is_err() {
        return;
    }
    let mut down = upstream;
    let mut client_rd = client.try_clone().unwrap();
    // A reset on one side is passed on as a reset (SO_LINGER 0), an end of stream as a FIN.
    let t = thread::spawn(move || {
        if std::io::copy(&mut client_rd, &mut up).is_err() {
            // Wake the other direction; the last close of `up` then sends the RST.
            let _ = socket2::SockRef::from(&up).set_linger(Some(std::time::Duration::ZERO));
            let _ = up.shutdown(Shutdown::Read);
            return;
        }
        let _ = up.shutdown(Shutdown::Write);
    });
    if std::io::copy(&mut down, &mut client).is_err() {
        // Wake the other direction, then let the last close of the socket send the RST.
        let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
        let _ = client.shutdown(Shutdown::Read);
        let _ = t.join();
        drop(client);
        return;
    }
    let _ = client.shutdown(Shutdown::Write);
    let _ = t.join();
}
