//! dpdk-testpmd as a virtio-user frontend (txonly) against the real `moat serve` with the
//! deny-all policy: it connects and sends, moat stays up, and counts and drops every frame.
//!
//! testpmd runs without hugepages (`--no-huge -m 1024 --no-shconf --file-prefix UNIQUE`),
//! with two lcores on one CPU, and `--stats-period 1` (without it, testpmd waits on stdin and
//! exits at once when stdin is not a terminal). DPDK's virtio-user never reads the config
//! space, so the MAC is passed in its devargs. SIGINT stops it cleanly with its accumulated
//! statistics; moat prints its counter table to stderr when it gets SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_sim::process::{wait_exit, Reaped};

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

/// The number right after `key` on a line, e.g. `TX-packets: 1214  TX-errors: 0`.
fn value_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A counter row of moat's exit table, parsed loosely: the line that has `name` as a word,
/// and its last number (today the rows read `group  counter  value`).
fn counter(table: &str, name: &str) -> Option<u64> {
    table
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name))
        .and_then(|l| l.split_whitespace().rev().find_map(|w| w.parse().ok()))
}

/// Every line of moat's output that mentions drops and carries a number above zero.
fn drop_lines(table: &str) -> Vec<&str> {
    table
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("drop"))
        .filter(|l| {
            l.split_whitespace()
                .any(|w| w.parse::<u64>().is_ok_and(|n| n > 0))
        })
        .collect()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn testpmd_txonly_frames_are_all_counted_and_dropped() {
    if !testpmd_available() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("moat.sock");
    let moat_log = dir.path().join("moat.log");
    let read_moat_log = || std::fs::read_to_string(&moat_log).unwrap_or_default();
    // stderr to a file, not a pipe: moat must be able to print its table whatever happens here.
    let mut moat = Reaped::spawn(
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--socket"])
            .arg(&sock)
            .arg("--policy")
            .arg(repo.join("policy/deny-all.toml"))
            .env("MOAT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&moat_log).unwrap()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(status)) = moat.try_wait() {
            panic!(
                "moat exited ({status}) before creating its socket\n{}",
                read_moat_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "moat did not create its socket\n{}",
            read_moat_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let testpmd_err = dir.path().join("testpmd.err");
    let mut testpmd = Reaped::spawn(
        Command::new("dpdk-testpmd")
            .args(["--no-huge", "-m", "1024", "--no-shconf"])
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
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&testpmd_err).unwrap()),
    );
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let output = Arc::clone(&output);
        let stdout = testpmd.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut out = output.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        })
    };
    let tp_output = || {
        format!(
            "{}\n--- stderr ---\n{}",
            output.lock().unwrap(),
            std::fs::read_to_string(&testpmd_err).unwrap_or_default()
        )
    };

    // EAL start-up (1 GiB of plain memory) can take a while on a loaded machine: wait for the
    // periodic statistics to show frames going out, then let it send for two more seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sending = output
            .lock()
            .unwrap()
            .lines()
            .any(|l| value_after(l, "TX-packets:").is_some_and(|n| n > 0));
        if sending {
            break;
        }
        if let Ok(Some(status)) = testpmd.try_wait() {
            panic!("testpmd exited ({status}) before sending\n{}", tp_output());
        }
        assert!(
            Instant::now() < deadline,
            "testpmd sent nothing within 60 s\n{}\n--- moat ---\n{}",
            tp_output(),
            read_moat_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    signal(&testpmd, libc::SIGINT);
    let status = wait_exit(&mut testpmd, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("testpmd ignored SIGINT\n{}", tp_output()));
    reader.join().unwrap();
    let tp = tp_output();
    assert!(status.success(), "testpmd exit {status}\n{tp}");
    // The accumulated statistics at exit: "TX-packets: N  TX-dropped: M  TX-total: T".
    let sent = tp
        .lines()
        .rev()
        .filter(|l| l.contains("TX-total:"))
        .find_map(|l| value_after(l, "TX-packets:"))
        .unwrap_or_else(|| panic!("no accumulated TX statistics from testpmd\n{tp}"));
    assert!(sent > 0, "testpmd sent nothing\n{tp}");

    // moat outlived its frontend, and stops cleanly on SIGTERM with its counters.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = moat.try_wait() {
        panic!(
            "moat did not survive testpmd ({status})\n{}",
            read_moat_log()
        );
    }
    signal(&moat, libc::SIGTERM);
    let status = wait_exit(&mut moat, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("moat ignored SIGTERM\n{}", read_moat_log()));
    let table = read_moat_log();
    assert!(status.success(), "moat exit {status}\n{table}");

    let drops = drop_lines(&table);
    assert!(
        !drops.is_empty(),
        "no drop counter above zero in moat's output\n{table}"
    );
    // The exact accounting, from moat's table (`group counter value`): deny-all and a
    // destination MAC that is not the gateway's, so every frame is dropped. A table without
    // these rows fails here (the `drop` lines above would be satisfied by any drop counter).
    let row = |name: &str| {
        counter(&table, name).unwrap_or_else(|| panic!("no {name} row in moat's table\n{table}"))
    };
    let (seen, dropped) = (row("tx_frames"), row("total_drops"));
    // testpmd counts a burst as sent once it is in the ring; the last burst may still be
    // unprocessed when testpmd disconnects. At most one ring's worth.
    assert!(
        seen > 0 && seen <= sent && sent - seen <= 256,
        "moat saw {seen} of {sent} frames\n{table}"
    );
    assert_eq!(dropped, seen, "every frame dropped\n{table}");
    assert_eq!(
        row("dst_mac_not_gateway"),
        seen,
        "dropped as not for the gateway\n{table}"
    );
    eprintln!(
        "testpmd sent {sent} frames; moat's drop lines:\n{}",
        drops.join("\n")
    );
}
