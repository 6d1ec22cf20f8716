//! Real proxies from Debian, started per test with their own config in a temp dir and
//! confined to loopback: tinyproxy (HTTP CONNECT) and dante-server (SOCKS5).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Reaped;

/// A running peer with its config and log in a temp dir; on drop (also when the test
/// panics) its process group is killed, then the directory removed.
pub struct Peer {
    pub addr: SocketAddr,
    child: Reaped,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Peer {
    /// The peer's own log so far (its witness of what reached it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The peer's directory (config, log, pid file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Whether `tool` is on PATH; in CI its absence fails the test instead of skipping it.
pub fn available(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("CI must run this test: {tool} missing (apt-get install {package})");
        }
        eprintln!("skipped: {tool} missing (apt-get install {package})");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// tinyproxy on 127.0.0.1, accepting only loopback clients.
pub fn tinyproxy() -> Peer {
    tinyproxy_on(free_port())
}

/// tinyproxy on 127.0.0.1:`port` (e.g. the port of one that was stopped). Its log
/// (LogLevel Info) has a `Request (file descriptor N): CONNECT host:port` line per request.
/// It connects only to loopback: every other destination goes to an "upstream proxy" on a
/// loopback port nobody listens on (so a request moat should never have let through cannot
/// leave the host either).
pub fn tinyproxy_on(port: u16) -> Peer {
    tinyproxy_with(port, "")
}

/// tinyproxy on 127.0.0.1:`port` with `extra` config lines (e.g. `ConnectPort 443`: any
/// other CONNECT port is refused with 403).
pub fn tinyproxy_with(port: u16, extra: &str) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("tinyproxy.conf");
    let log = dir.path().join("tinyproxy.log");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nLogLevel Info\nLogFile \"{}\"\nAllow 127.0.0.1\nDisableViaHeader Yes\n\
             Upstream http 127.0.0.1:{}\nUpstream none \"localhost\"\nUpstream none \"127.0.0.0/8\"\n{extra}\n",
            log.display(),
            free_port()
        ),
    )
    .unwrap();
    let mut child = Reaped::spawn(
        Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, "tinyproxy", &log);
    Peer {
        addr,
        child,
        log,
        dir,
    }
}

/// dante's danted on 127.0.0.1, relaying only to loopback.
pub fn dante() -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("danted.conf");
    let log = dir.path().join("danted.log");
    std::fs::write(
        &conf,
        format!(
            "logoutput: {}\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\nsocksmethod: none\nclientmethod: none\n\
             user.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect }}\n\
             socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect udpassociate udpreply\n log: connect }}\n\
             socks block {{ from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect }}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child = Reaped::spawn(
        Command::new("danted")
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("danted.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, "danted", &log);
    Peer {
        addr,
        child,
        log,
        dir,
    }
}

/// What tinyproxy's log says reached it: the connections it accepted (`Connect (file
/// descriptor N): 127.0.0.1`, not counting the start-up probe) and each request line it
/// read (`Request (file descriptor N): CONNECT a:b HTTP/1.1` gives `CONNECT a:b HTTP/1.1`).
pub fn tinyproxy_seen(peer: &Peer) -> (usize, Vec<String>) {
    let log = peer.log();
    // Less the test's own probe whether it listens (it closes without a request).
    let probes = log
        .lines()
        .filter(|l| l.contains("closed socket before read"))
        .count()
        .min(1);
    let connects = log
        .lines()
        .filter(|l| l.contains("]: Connect (file descriptor"))
        .count()
        - probes;
    let requests = log
        .lines()
        .filter_map(|l| {
            l.split_once("]: Request (file descriptor ")?
                .1
                .split_once("): ")
        })
        .map(|(_, r)| r.to_string())
        .collect();
    (connects, requests)
}

/// dnsmasq on 127.0.0.1 answering A queries only from `records` (a name and its address,
/// or `None`: NXDOMAIN); anything else is REFUSED (no upstream servers, no hosts file).
/// Every query it gets is in its log (`--log-queries`).
pub fn dnsmasq(records: &[(&str, Option<std::net::Ipv4Addr>)]) -> Peer {
    dnsmasq_on(free_port(), records)
}

/// `dnsmasq` on 127.0.0.1:`port` (UDP and TCP), e.g. the port of one that was stopped.
pub fn dnsmasq_on(port: u16, records: &[(&str, Option<std::net::Ipv4Addr>)]) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dnsmasq.log");
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
    ])
    .args([
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--user=root",
    ])
    .arg(format!("--port={port}"))
    .arg("--log-queries")
    .arg(format!("--log-facility={}", log.display()))
    .arg(format!(
        "--pid-file={}",
        dir.path().join("dnsmasq.pid").display()
    ))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (name, addr) in records {
        cmd.arg(match addr {
            Some(a) => format!("--address=/{name}/{a}"),
            None => format!("--address=/{name}/"),
        });
    }
    let mut child = Reaped::spawn(&mut cmd);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, "dnsmasq", &log);
    Peer {
        addr,
        child,
        log,
        dir,
    }
}

/// The A queries dnsmasq's log shows, in order (`query[A] NAME from 127.0.0.1`).
pub fn dnsmasq_queries(peer: &Peer) -> Vec<String> {
    peer.log()
        .lines()
        .filter_map(|l| l.split_once(": query[A] ")?.1.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
