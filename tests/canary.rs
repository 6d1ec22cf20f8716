//! `moat canary`: every forbidden attempt fails and every control works for the shipped
//! policy; a policy that exposes the metadata address is caught; JSON lines and alerts.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::moat_bin;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_example_policy_passes_every_attempt() {
    let out = Command::new(moat_bin())
        .args(["canary", "--policy"])
        .arg(repo("policy/example.toml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!table.contains("FAIL"), "{table}");
    for attempt in [
        "tcp to cloud metadata :80",
        "arp spoofing of the gateway",
        "ipv6 tcp syn",
        "dns for a non-allowlisted name",
        "control: allowed flow via proxy",
        "host header smuggling 127.0.0.1",
        "host header smuggling 0x7f000001",
        "tls sni smuggling localhost",
        "host header smuggling 169.254.169.254",
        "explicit proxy CONNECT 127.0.0.1:22 HTTP/1.1",
        "explicit proxy GET http://2130706433:2375/version HTTP/1.1",
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(attempt) && l.contains("PASS")),
            "{attempt}:\n{table}"
        );
    }
    assert!(
        table.lines().any(|l| l.ends_with("passed, 0 failed")),
        "{table}"
    );
}

const EXPOSED: &str = "[vm]\nname = \"leaky\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n\
    [proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"169.254.169.254/32\"]\n";

#[test]
fn a_policy_that_exposes_the_metadata_address_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leaky.toml");
    std::fs::write(&file, EXPOSED).unwrap();
    let out = Command::new(moat_bin())
        .args(["canary", "--json", "--policy"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let metadata = lines
        .iter()
        .find(|v| v["attempt"] == "tcp to cloud metadata :80")
        .expect("metadata attempt");
    assert_eq!(
        (
            metadata["verdict"].as_str(),
            metadata["got_through"].as_bool()
        ),
        (Some("fail"), Some(true))
    );
    assert_eq!(
        lines.iter().filter(|v| v["verdict"] == "fail").count(),
        1,
        "only that one: {lines:?}"
    );
}

#[test]
fn every_runs_again_and_alerts_with_the_failures() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leaky.toml");
    let alerts = dir.path().join("alerts.jsonl");
    std::fs::write(&file, EXPOSED).unwrap();
    let mut child = Command::new(moat_bin())
        .args(["canary", "--every", "1s", "--alert-cmd"])
        .arg(format!("cat >> {}", alerts.display()))
        .arg("--policy")
        .arg(&file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut runs = 0;
    while Instant::now() < deadline {
        runs = std::fs::read_to_string(&alerts)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if runs >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(runs >= 2, "two runs, each alerting once");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&alerts)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["attempt"], "tcp to cloud metadata :80");
}

/// A policy that lets any name out on port 80 and has an explicit-proxy port: the canary
/// tries names smuggled in Host and SNI and forbidden explicit-proxy requests, and each must
/// be refused by moat's gate (a moat whose gate reads `localhost` as a plain name fails it).
#[test]
fn smuggled_names_and_explicit_proxy_requests_are_attempted_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("any-name.toml");
    std::fs::write(
        &file,
        "[vm]\nname = \"any-name\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n\
         [proxy]\nhttp = \"127.0.0.1:3128\"\nexplicit_port = 3128\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [80]\n",
    )
    .unwrap();
    let out = Command::new(moat_bin())
        .args(["canary", "--json", "--policy"])
        .arg(&file)
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let failed: Vec<&serde_json::Value> = lines.iter().filter(|v| v["verdict"] == "fail").collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(out.status.code(), Some(0), "{lines:?}");
    let tried = |prefix: &str| {
        lines
            .iter()
            .filter(|v| v["attempt"].as_str().is_some_and(|a| a.starts_with(prefix)))
            .count()
    };
    assert_eq!(tried("host header smuggling "), 5, "{lines:?}");
    assert_eq!(tried("tls sni smuggling "), 5, "{lines:?}");
    assert_eq!(tried("explicit proxy "), 4, "{lines:?}");
}
