//! dpdk-testpmd as a virtio-user frontend (txonly) against the real `moat serve` with the
//! deny-all policy: it connects, sends, and moat counts and drops every frame it sent.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn testpmd_available() -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v dpdk-testpmd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("CI must run the dpdk-testpmd smoke test: dpdk-testpmd missing (apt-get install dpdk-dev)");
    }
    eprintln!("skipped: dpdk-testpmd missing (apt-get install dpdk-dev)");
    false
}

/// The value of a counter row (`group counter value`) in moat's exit table.
fn counter(table: &str, name: &str) -> Option<u64> {
    table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
}

#[test]
fn testpmd_txonly_frames_are_all_counted_and_dropped() {
    if !testpmd_available() {
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("moat.sock");
    let moat = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--policy")
        .arg(repo.join("policy/deny-all.toml"))
        .env("MOAT_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "moat did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // testpmd waits on stdin without --stats-period; SIGINT after a few seconds stops it.
    let testpmd = Command::new("timeout")
        .args([
            "-s",
            "INT",
            "5",
            "dpdk-testpmd",
            "--no-huge",
            "-m",
            "1024",
            "--no-shconf",
        ])
        .arg(format!("--file-prefix=moat-smoke-{}", std::process::id()))
        .args(["--lcores", "0@1,1@1", "--no-pci", "--vdev"])
        .arg(format!(
            "net_virtio_user0,path={},mac=52:54:00:12:34:56",
            sock.display()
        ))
        .args([
            "--",
            "--forward-mode=txonly",
            "--total-num-mbufs=16384",
            "--stats-period",
            "1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run dpdk-testpmd");
    let tp = String::from_utf8_lossy(&testpmd.stdout);
    // "TX-packets: N  TX-dropped: M  TX-total: T" in the accumulated statistics.
    let sent: u64 = tp
        .lines()
        .rev()
        .filter(|l| l.contains("TX-packets:") && l.contains("TX-total:"))
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no TX statistics from testpmd:\n{tp}\n{}",
                String::from_utf8_lossy(&testpmd.stderr)
            )
        });
    assert!(sent > 1000, "testpmd sent only {sent} frames:\n{tp}");

    // Let moat drain, then stop it: it prints its counters on the way out.
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(moat.id() as i32, libc::SIGTERM) };
    let out = moat.wait_with_output().unwrap();
    assert!(out.status.success(), "moat exit {:?}", out.status);
    let table = String::from_utf8_lossy(&out.stderr);
    let seen = counter(&table, "tx_frames").unwrap_or_else(|| panic!("no tx_frames in\n{table}"));
    let dropped = counter(&table, "total_drops").unwrap_or(0);
    // testpmd counts a burst as sent once it is in the ring; the last burst may still be
    // unprocessed when testpmd is interrupted and disconnects. At most one ring's worth.
    assert!(
        seen <= sent && sent - seen <= 256,
        "moat saw {seen} of {sent} frames\n{table}"
    );
    assert_eq!(
        dropped, seen,
        "every frame was dropped (deny-all, no gateway MAC)\n{table}"
    );
    assert_eq!(
        counter(&table, "dst_mac_not_gateway"),
        Some(seen),
        "{table}"
    );
}
