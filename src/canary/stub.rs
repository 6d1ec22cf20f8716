//! The canary's stand-in proxies, confined to loopback: they accept what a real proxy would
//! (HTTP CONNECT, SOCKS5 CONNECT) and then echo the bytes back instead of connecting
//! anywhere, so a control flow proves the whole path without any traffic leaving the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Start a stub on 127.0.0.1; it serves until the process exits.
pub fn start(socks5: bool) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("canary-proxy".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = if socks5 {
                        socks5_then_echo(conn)
                    } else {
                        connect_then_echo(conn)
                    };
                });
            }
        })?;
    Ok(addr)
}

fn connect_then_echo(conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    // The request line and headers, up to the empty line.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut conn = conn;
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let early = reader.buffer().to_vec();
    conn.write_all(&early)?;
    echo(conn)
}

fn socks5_then_echo(mut conn: TcpStream) -> std::io::Result<()> {
    let mut greeting = [0u8; 2];
    conn.read_exact(&mut greeting)?;
    let mut methods = vec![0u8; usize::from(greeting[1])];
    conn.read_exact(&mut methods)?;
    conn.write_all(&[5, 0])?;
    let mut head = [0u8; 4];
    conn.read_exact(&mut head)?;
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut n = [0u8; 1];
            conn.read_exact(&mut n)?;
            usize::from(n[0])
        }
        _ => return Ok(()),
    };
    let mut rest = vec![0u8; addr_len + 2];
    conn.read_exact(&mut rest)?;
    conn.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0])?;
    echo(conn)
}

fn echo(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}
