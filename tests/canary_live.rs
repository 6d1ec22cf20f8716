//! `moat canary --live` against a real squid, configured from contrib/squid-moat.conf (the
//! README's "Configure your proxy") and without its destination ACLs; a policy edited
//! between rounds; a failing canary that recovers, with its heartbeat.
//!
//! Network safety: squid listens on loopback and is told `never_direct allow all` with one
//! `cache_peer` parent on loopback (a recording stand-in in this process), and resolves
//! names only from its own hosts file (`dns_nameservers 127.0.0.1`). So even the squid
//! without ACLs, asked for 169.254.169.254 or 10.0.0.1, connects only to that parent: no
//! attempt of these tests leaves the machine.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{moat_bin, peers::available, Reaped};

const SHIPPED: &str = include_str!("../contrib/squid-moat.conf");

/// The recording parent: answers every CONNECT with 200 and then behaves as an HTTP origin
/// (HEAD/GET get `200 OK`) or echoes. It never connects anywhere.
struct Parent {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Parent {
    fn start() -> Parent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = Arc::clone(&log);
                std::thread::spawn(move || parent_conn(conn, &log));
            }
        });
        Parent { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn parent_conn(conn: TcpStream, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    // squid probes its parent with bare connections: only requests count.
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
    }
    log.lock().unwrap().push(
        line.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    );
    let mut conn = conn;
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let mut buf = reader.buffer().to_vec();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.starts_with(b"HEAD ") || buf.starts_with(b"GET ") {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                buf.clear();
            }
        } else if !buf.is_empty() {
            let _ = conn.write_all(&buf);
            buf.clear();
        }
        match reader.get_mut().read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// squid on 127.0.0.1 in a temp dir; killed (and the dir removed) on drop, panics included.
struct Squid {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
    /// squid's service name (`-n`): it names the shared-memory segments, so squids started
    /// at once (tests run in parallel) or after one was killed do not share them.
    service: String,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Killed, squid leaves its segments behind.
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}-", self.service))
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Squid {
    /// `acls`: the shipped configuration as is; without: its `http_access deny` lines
    /// removed (a proxy that lets names and addresses lead anywhere).
    fn start(parent: SocketAddr, acls: bool) -> Squid {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display().to_string();
        let mut conf: String = SHIPPED
            .lines()
            .filter(|l| acls || !l.starts_with("http_access deny moat_forbidden"))
            .map(|l| {
                if l == "http_port 127.0.0.1:3128" {
                    format!("http_port 127.0.0.1:{port}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(
            conf.contains(&format!("http_port 127.0.0.1:{port}")),
            "the shipped config must listen on 127.0.0.1:3128"
        );
        conf.push_str(&format!(
            "pid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
             coredump_dir {d}\nshutdown_lifetime 1 seconds\nhosts_file {d}/hosts\n\
             dns_nameservers 127.0.0.1\n\
             cache_peer 127.0.0.1 parent {} 0 no-query default\nnever_direct allow all\n",
            parent.port()
        ));
        std::fs::write(dir.path().join("squid.conf"), conf).unwrap();
        // Names as the proxy's host resolves them: two public-looking names for the
        // controls, and a name that "rebinds" to a private address.
        std::fs::write(
            dir.path().join("hosts"),
            "127.0.0.1 localhost\n203.0.113.10 allowed.test warmup.test\n203.0.113.11 web.test\n10.0.0.1 rebind.test\n",
        )
        .unwrap();
        // Started as root, squid runs as `proxy`: it must be able to use its directory.
        let out = Command::new("chown")
            .args(["-R", "proxy:proxy"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "chown proxy: {out:?}");
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let service = format!(
            "moattest{}x{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let child = Command::new("squid")
            .arg("-N")
            .args(["-n", &service])
            .arg("-f")
            .arg(dir.path().join("squid.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start squid");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // From here a panic drops the guard, which kills squid.
        let mut squid = Squid {
            addr,
            child,
            dir,
            service,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = squid.child.try_wait() {
                panic!(
                    "squid exited ({status}): {}",
                    std::fs::read_to_string(squid.dir.path().join("cache.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "squid did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // squid answers its very first forwarded CONNECT with 500 (no path through the
        // parent yet); warm it up so the canary's first control is not that one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !tunnel_opens(addr, "warmup.test:443") {
            assert!(
                Instant::now() < deadline,
                "squid never opened a tunnel via its parent"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        squid
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// Whether `CONNECT target` through the proxy at `addr` gets a 2xx.
fn tunnel_opens(addr: SocketAddr, target: &str) -> bool {
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(conn, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 2")
}

fn squid_here() -> bool {
    available("squid", "squid")
}

/// Two rules, each with a control destination: allowed.test:443 (from the rule) and
/// web.test:80 (from --control-url, an HTTP request).
fn policy(proxy: SocketAddr, extra: &str) -> String {
    format!(
        "[vm]\nname = \"canary-live\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n\
         [proxy]\nhttp = \"{proxy}\"\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"allowed.test\"]\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"web.test\"]\n\
         {extra}\
         [dns]\nallow = [\"allowed.test\", \"web.test\"]\n"
    )
}

/// A rule that exposes the metadata address: moat's own gate then lets the guest's flow out.
const LEAK: &str =
    "[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"169.254.169.254/32\"]\n";

fn canary(file: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(moat_bin());
    cmd.args(["canary", "--live", "--json", "--policy"])
        .arg(file)
        .args(["--control-url", "http://web.test/health"])
        .args(["--rebind-name", "rebind.test"])
        .args(extra);
    cmd
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn alerts(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| v["event"] == "alert").collect()
}

#[test]
fn live_passes_against_squid_configured_as_the_readme_says() {
    if !squid_here() {
        return;
    }
    let parent = Parent::start();
    let squid = Squid::start(parent.addr, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    let text = policy(squid.addr, "");
    std::fs::write(&file, &text).unwrap();
    let out = canary(&file, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = json_lines(&stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}\nsquid: {}",
        String::from_utf8_lossy(&out.stderr),
        squid.access_log()
    );
    assert!(alerts(&lines).is_empty(), "{stdout}");
    let round = lines.last().expect("a round summary");
    assert_eq!(round["event"], "round");
    assert_eq!(round["result"], "pass");
    assert_eq!(round["vm"], "canary-live");
    assert_eq!(round["policy"]["path"], file.display().to_string());
    assert_eq!(
        round["policy"]["hash"],
        format!(
            "sha256:{}",
            moat::canary::digest::sha256_hex(text.as_bytes())
        )
    );
    // The controls went through moat and squid for real; nothing forbidden did.
    let seen: Vec<String> = parent
        .seen()
        .into_iter()
        .filter(|s| s != "warmup.test:443")
        .collect();
    for control in ["allowed.test:443", "web.test:80"] {
        assert!(seen.iter().any(|s| s == control), "{control}: {seen:?}");
    }
    assert_eq!(
        seen.len(),
        2,
        "only the controls reached the parent: {seen:?}"
    );
    // squid's own witness of each refusal.
    let log = squid.access_log();
    for refused in [
        "127.0.0.1:22",
        "localhost:22",
        "169.254.169.254:80",
        "10.0.0.1:80",
        "192.168.0.1:80",
        "100.64.0.1:80",
        "rebind.test:80",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("TCP_DENIED/403") && l.ends_with_text(refused)),
            "{refused} not refused by squid:\n{log}"
        );
    }
}

trait EndsWithText {
    fn ends_with_text(&self, target: &str) -> bool;
}

impl EndsWithText for &str {
    /// `... CONNECT target - HIER_NONE/- text/html`: the CONNECT target field.
    fn ends_with_text(&self, target: &str) -> bool {
        self.split_whitespace()
            .skip_while(|w| *w != "CONNECT")
            .nth(1)
            == Some(target)
    }
}

#[test]
fn a_proxy_without_the_acls_fails_the_run_with_p1_naming_the_destination() {
    if !squid_here() {
        return;
    }
    let parent = Parent::start();
    let squid = Squid::start(parent.addr, false);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    std::fs::write(&file, policy(squid.addr, "")).unwrap();
    let out = canary(&file, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines = json_lines(&stdout);
    let alerts = alerts(&lines);
    for (attempt, acl) in [
        ("proxy http 127.0.0.1:22", "dst 127.0.0.0/8"),
        ("proxy http localhost:22", "dst 127.0.0.0/8"),
        ("proxy http 169.254.169.254:80", "dst 169.254.0.0/16"),
        ("proxy http 10.0.0.1:80", "dst 10.0.0.0/8"),
        ("proxy http 192.168.0.1:80", "dst 192.168.0.0/16"),
        ("proxy http 100.64.0.1:80", "dst 100.64.0.0/10"),
        ("proxy http rebind.test:80", "rebind.test"),
    ] {
        let a = alerts
            .iter()
            .find(|v| v["attempt"] == attempt)
            .unwrap_or_else(|| panic!("no alert for {attempt}: {stdout}"));
        assert_eq!(a["severity"], "P1", "{a}");
        assert_eq!(a["vm"], "canary-live");
        assert_eq!(
            (a["expected"].as_str(), a["observed"].as_str()),
            (Some("blocked"), Some("through"))
        );
        let detail = a["detail"].as_str().unwrap();
        assert!(
            detail.contains("lacks the ACL") && detail.contains(acl),
            "{detail}"
        );
        assert!(a["time"].as_str().unwrap().ends_with('Z'), "{a}");
    }
    assert_eq!(alerts.len(), 7, "only the proxy attempts: {stdout}");
    // They really reached squid's upstream (the loopback parent, nothing else).
    let seen = parent.seen();
    assert!(seen.iter().any(|s| s == "127.0.0.1:22"), "{seen:?}");
}

/// Lines of a running `--every` canary, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events up to and including the next round summary.
fn next_round(rx: &mpsc::Receiver<Value>) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("a round within 3 minutes");
        if v["event"] == "round" {
            return (events, v);
        }
        events.push(v);
    }
}

fn scrape(addr: &str) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn a_policy_edited_between_rounds_is_tested_as_edited() {
    if !squid_here() {
        return;
    }
    let parent = Parent::start();
    let squid = Squid::start(parent.addr, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    let before = policy(squid.addr, "");
    let after = policy(squid.addr, LEAK);
    std::fs::write(&file, &before).unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = Reaped::spawn(
        canary(&file, &["--every", "1s", "--metrics", &metrics]).stdout(Stdio::piped()),
    );
    let rx = lines_of(&mut child);
    let (events, first) = next_round(&rx);
    assert_eq!(first["result"], "pass", "{events:?}");
    let hash = |t: &str| format!("sha256:{}", moat::canary::digest::sha256_hex(t.as_bytes()));
    assert_eq!(first["policy"]["hash"], hash(&before));
    let text = scrape(&metrics);
    let success = metric(
        &text,
        "moat_canary_last_success_timestamp_seconds{vm=\"canary-live\"}",
    )
    .expect("a success timestamp after a passing round");
    // Written as an editor does (a new file renamed over the old): a round never reads a
    // half-written file.
    let tmp = dir.path().join("vm.toml.new");
    std::fs::write(&tmp, &after).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // The round running while we wrote may still have read the old file; the one after
    // must test the new one.
    let (mut events, mut round) = next_round(&rx);
    if round["policy"]["hash"] == hash(&before) {
        (events, round) = next_round(&rx);
    }
    assert_eq!(round["policy"]["hash"], hash(&after));
    assert_eq!(round["result"], "fail");
    let alerts: Vec<_> = events.iter().filter(|v| v["event"] == "alert").collect();
    assert_eq!(alerts.len(), 1, "{events:?}");
    assert_eq!(alerts[0]["attempt"], "tcp to cloud metadata :80");
    assert_eq!(alerts[0]["severity"], "P1");
    assert_eq!(alerts[0]["policy"]["hash"], hash(&after));
    // The metrics follow the round's events. A round that passed on the old file while we
    // wrote may have moved the heartbeat legitimately, so compare across failing rounds:
    // once the first failure is counted, the heartbeat must stay put through the next one.
    let fails = |text: &str| {
        metric(
            text,
            "moat_canary_runs_total{vm=\"canary-live\",result=\"fail\"}",
        )
        .unwrap_or(0)
    };
    let heartbeat = |text: &str| {
        metric(
            text,
            "moat_canary_last_success_timestamp_seconds{vm=\"canary-live\"}",
        )
    };
    let wait_fails = |at_least: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut text = scrape(&metrics);
        while fails(&text) < at_least && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            text = scrape(&metrics);
        }
        assert!(
            fails(&text) >= at_least,
            "{at_least} failed rounds counted:\n{text}"
        );
        text
    };
    let first_fail = wait_fails(1);
    let before_next = heartbeat(&first_fail);
    assert!(
        before_next.is_some_and(|t| t >= success),
        "the heartbeat only ever moves forward:\n{first_fail}"
    );
    let counted = fails(&first_fail);
    // The next round, on the same leaky file, fails too.
    let (_, next) = next_round(&rx);
    assert_eq!(next["result"], "fail", "{next}");
    let next_fail = wait_fails(counted + 1);
    assert_eq!(
        heartbeat(&next_fail),
        before_next,
        "a failed round does not move the heartbeat:\n{next_fail}"
    );
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_failing_canary_that_passes_again_sends_one_p1_then_one_resolved() {
    if !squid_here() {
        return;
    }
    let parent = Parent::start();
    let squid = Squid::start(parent.addr, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    let prom = dir.path().join("canary.prom");
    let alerts = dir.path().join("alerts.jsonl");
    let alert_cmd = format!("cat >> {}", alerts.display());
    let args = [
        "--metrics",
        prom.to_str().unwrap(),
        "--alert-cmd",
        alert_cmd.as_str(),
    ];
    // As the timer runs it: one process per round, state in the textfile.
    std::fs::write(&file, policy(squid.addr, LEAK)).unwrap();
    let out = canary(&file, &args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let heartbeat = read(&prom);
    assert_eq!(
        metric(
            &heartbeat,
            "moat_canary_runs_total{vm=\"canary-live\",result=\"fail\"}"
        ),
        Some(1),
        "{heartbeat}"
    );
    assert_eq!(
        metric(
            &heartbeat,
            "moat_canary_last_success_timestamp_seconds{vm=\"canary-live\"}"
        ),
        Some(0),
        "no success yet:\n{heartbeat}"
    );

    std::fs::write(&file, policy(squid.addr, "")).unwrap();
    let out = canary(&file, &args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let heartbeat = read(&prom);
    assert!(
        metric(
            &heartbeat,
            "moat_canary_last_success_timestamp_seconds{vm=\"canary-live\"}"
        )
        .is_some_and(|t| t > 0),
        "{heartbeat}"
    );
    assert_eq!(
        metric(
            &heartbeat,
            "moat_canary_runs_total{vm=\"canary-live\",result=\"pass\"}"
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &heartbeat,
            "moat_canary_attempt_failures_total{vm=\"canary-live\",attempt=\"tcp to cloud metadata :80\"}"
        ),
        Some(1)
    );

    // A third, passing run: nothing more to say.
    let out = canary(&file, &args).output().unwrap();
    assert_eq!(out.status.code(), Some(0));

    let sent = json_lines(&read(&alerts));
    assert_eq!(sent.len(), 2, "one P1, one resolved: {sent:?}");
    assert_eq!(
        (sent[0]["event"].as_str(), sent[0]["severity"].as_str()),
        (Some("alert"), Some("P1"))
    );
    assert_eq!(sent[0]["attempt"], "tcp to cloud metadata :80");
    assert_eq!(sent[1]["event"], "resolved");
    assert_eq!(
        sent[1]["resolves"],
        serde_json::json!(["tcp to cloud metadata :80"])
    );
    assert_ne!(sent[0]["policy"]["hash"], sent[1]["policy"]["hash"]);
}

#[test]
fn a_socks5_proxy_that_relays_to_loopback_is_caught() {
    // The tests' dante relays to 127.0.0.0/8 only and blocks every other destination: the
    // canary's SOCKS5 attempts must flag exactly the loopback ones (dante tries them: a
    // refused connection is still an attempt no ACL stopped).
    if !squid_here() || !available("danted", "dante-server") {
        return;
    }
    let parent = Parent::start();
    let squid = Squid::start(parent.addr, true);
    let dante = support::peers::dante();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    let text = policy(squid.addr, "").replace(
        &format!("http = \"{}\"\n", squid.addr),
        &format!("http = \"{}\"\nsocks5 = \"{}\"\n", squid.addr, dante.addr),
    );
    std::fs::write(&file, &text).unwrap();
    // No --rebind-name here: dante would resolve it through the host's resolver.
    let out = Command::new(moat_bin())
        .args(["canary", "--live", "--json", "--policy"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}\n{stdout}");
    let lines = json_lines(&stdout);
    let mut flagged: Vec<&str> = alerts(&lines)
        .iter()
        .map(|v| v["attempt"].as_str().unwrap())
        .collect();
    flagged.sort_unstable();
    assert_eq!(
        flagged,
        ["proxy socks5 127.0.0.1:22", "proxy socks5 localhost:22"],
        "{stdout}"
    );
    for a in alerts(&lines) {
        assert_eq!(a["severity"], "P1");
        assert!(
            a["detail"].as_str().unwrap().contains("dst 127.0.0.0/8"),
            "{a}"
        );
    }
}

/// A proxy on loopback that refuses everything with 403 (and connects nowhere).
fn refusing_proxy() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

#[test]
fn all_blocked_because_nothing_works_fails_unless_controls_are_off() {
    let proxy = refusing_proxy();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.toml");
    std::fs::write(&file, policy(proxy, "")).unwrap();
    let out = canary(&file, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines = json_lines(&stdout);
    let mut failed: Vec<(&str, &str)> = alerts(&lines)
        .iter()
        .map(|v| {
            (
                v["attempt"].as_str().unwrap(),
                v["severity"].as_str().unwrap(),
            )
        })
        .collect();
    failed.sort_unstable();
    assert_eq!(
        failed,
        [
            ("control: rule 1 allowed.test:443", "P2"),
            ("control: rule 2 web.test:80", "P2")
        ],
        "{stdout}"
    );

    // --no-controls: no real request, and the forbidden attempts alone pass.
    let out = canary(&file, &["--no-controls"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("control: rule"), "{stdout}");
}
