//! Real proxies from Debian, started per test with their own config in a temp dir and
//! confined to loopback: tinyproxy (HTTP CONNECT) and dante-server (SOCKS5).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running peer; killed on drop.
pub struct Peer {
    pub addr: SocketAddr,
    child: Child,
    /// The peer's own log file (its witness of what reached it).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// The peer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn free_port() -> u16 {
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
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("tinyproxy.conf");
    let log = dir.path().join("tinyproxy.log");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nLogLevel Info\nLogFile \"{}\"\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tinyproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, "tinyproxy", &log);
    Peer {
        addr,
        child,
        log,
        _dir: dir,
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
             client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
             socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect udpassociate udpreply }}\n\
             socks block {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("danted")
        .arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path().join("danted.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start danted");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, "danted", &log);
    Peer {
        addr,
        child,
        log,
        _dir: dir,
    }
}
