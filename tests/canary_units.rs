//! contrib/moat-canary@.service and .timer: they pass `systemd-analyze verify`, and the
//! service's command line, run as written (paths moved into a temporary directory, %i =
//! vm1, the unit's Environment= defaults expanded as systemd does), tests a VM served by
//! `moat serve` as moat@.service runs it, writes the heartbeat textfile and reports the
//! running moat's policy generation.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};

use support::{eventually, moat_bin, peers::available};

const SERVICE: &str = include_str!("../contrib/moat-canary@.service");
const TIMER: &str = include_str!("../contrib/moat-canary@.timer");

/// The value of `key=` in a unit, continuation lines joined.
fn directive(unit: &str, key: &str) -> String {
    unit.replace("\\\n", " ")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing from the unit"))
        .to_string()
}

/// `Environment=A=1 B=` as a map.
fn environment(unit: &str) -> HashMap<String, String> {
    directive(unit, "Environment")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A unit command line made runnable here: %i, the directories and the binary replaced;
/// `${X}` is one argument, `$X` is split on white space (systemd.service(5)).
fn argv(line: &str, root: &Path, env: &HashMap<String, String>) -> Vec<String> {
    let line = line
        .replace("%i", "vm1")
        .replace("/etc/moat", &root.join("etc").display().to_string())
        .replace("/run/moat", &root.join("run").display().to_string())
        .replace(
            "/var/lib/moat-canary",
            &root.join("state").display().to_string(),
        );
    let mut out = Vec::new();
    for w in line.split_whitespace() {
        if let Some(var) = w.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            out.push(env.get(var).cloned().unwrap_or_default());
        } else if let Some(var) = w.strip_prefix('$') {
            let v = env.get(var).cloned().unwrap_or_default();
            out.extend(v.split_whitespace().map(str::to_string));
        } else if w == "/usr/local/bin/moat" {
            out.push(moat_bin().to_string());
        } else {
            out.push(w.to_string());
        }
    }
    out
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !available("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: the one under test.
    let service = SERVICE.replace("/usr/local/bin/moat", moat_bin());
    std::fs::write(dir.path().join("moat-canary@.service"), service).unwrap();
    std::fs::write(dir.path().join("moat-canary@.timer"), TIMER).unwrap();
    for (link, template) in [
        ("moat-canary@vm1.service", "moat-canary@.service"),
        ("moat-canary@vm1.timer", "moat-canary@.timer"),
    ] {
        std::os::unix::fs::symlink(template, dir.path().join(link)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("moat-canary@vm1.service"))
        .arg(dir.path().join("moat-canary@vm1.timer"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    for complaint in [
        "Unknown key",
        "Unknown section",
        "Failed to parse",
        "ignoring",
    ] {
        assert!(!stderr.contains(complaint), "{stderr}");
    }
    assert_eq!(directive(TIMER, "OnUnitActiveSec"), "5min");
    assert_eq!(directive(SERVICE, "User"), "moat-%i", "the VM's moat user");
}

/// A proxy on loopback configured as the README asks: it opens tunnels to allowed.test
/// only (and echoes instead of connecting anywhere); everything else gets 403.
fn careful_proxy() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let mut conn = conn;
                if line.starts_with("CONNECT allowed.test:") {
                    let _ = conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = reader.get_mut().read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                } else {
                    let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    addr
}

#[test]
fn the_services_command_line_runs_the_live_canary() {
    let root = tempfile::tempdir().unwrap();
    for d in ["etc", "run", "state"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    let proxy = careful_proxy();
    let policy = format!(
        "[vm]\nname = \"vm1\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n\
         [proxy]\nhttp = \"{proxy}\"\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"allowed.test\"]\n\
         [dns]\nallow = [\"allowed.test\"]\n"
    );
    std::fs::write(root.path().join("etc/vm1.toml"), &policy).unwrap();
    // The VM's own moat, as moat@vm1.service runs it (its control socket is what the
    // canary asks for the policy generation).
    let control = root.path().join("run/vm1.control");
    let mut serve = Command::new(moat_bin())
        .arg("serve")
        .arg("--socket")
        .arg(root.path().join("run/vm1.sock"))
        .arg("--policy")
        .arg(root.path().join("etc/vm1.toml"))
        .arg("--control")
        .arg(&control)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the control socket", || control.exists());

    let start = argv(
        &directive(SERVICE, "ExecStart"),
        root.path(),
        &environment(SERVICE),
    );
    let out = Command::new(&start[0]).args(&start[1..]).output();
    let _ = serve.kill();
    let _ = serve.wait();
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{start:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a round line")).unwrap();
    assert_eq!(round["event"], "round");
    assert_eq!(round["result"], "pass");
    assert_eq!(round["vm"], "vm1");
    assert_eq!(round["policy"]["generation"], 1, "{round}");
    let heartbeat = std::fs::read_to_string(root.path().join("state/vm1.prom")).unwrap();
    assert!(
        heartbeat.contains("moat_canary_runs_total{vm=\"vm1\",result=\"pass\"} 1"),
        "{heartbeat}"
    );
    assert!(
        heartbeat.contains("moat_canary_last_success_timestamp_seconds{vm=\"vm1\"} "),
        "{heartbeat}"
    );
}

#[test]
fn unit_command_line_expansion_matches_systemd() {
    let mut env = HashMap::new();
    env.insert("A".to_string(), String::new());
    env.insert("B".to_string(), "--x 1".to_string());
    let v = argv("moat --a ${A} $B $A", Path::new("/r"), &env);
    assert_eq!(v, ["moat", "--a", "", "--x", "1"]);
}
