//! contrib/moat@.service: the command lines in the unit are ones moat accepts. The test
//! runs ExecStartPre and ExecStart as written (paths moved into a temporary directory,
//! %i = the VM name), attaches a guest, reloads as ExecReload does (SIGHUP), and stops
//! moat as systemd does (SIGTERM).

mod support;

use std::process::{Command, Stdio};

use moat_sim::guest::{GuestOptions, SimGuest};
use support::*;

const UNIT: &str = include_str!("../contrib/moat@.service");

/// The value of `key=` in the unit, continuation lines joined.
fn directive(key: &str) -> String {
    let joined = UNIT.replace("\\\n", " ");
    joined
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing from the unit"))
        .to_string()
}

/// A unit command line made runnable here: %i, /etc/moat and /run/moat and the binary
/// path replaced.
fn argv(line: &str, root: &std::path::Path) -> Vec<String> {
    line.replace("%i", "vm1")
        .replace("/etc/moat", &root.join("etc").display().to_string())
        .replace("/run/moat", &root.join("run").display().to_string())
        .split_whitespace()
        .map(|w| {
            if w == "/usr/local/bin/moat" {
                moat_bin().to_string()
            } else {
                w.to_string()
            }
        })
        .collect()
}

#[test]
fn the_units_command_lines_serve_reload_and_stop() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::create_dir_all(root.path().join("run")).unwrap();
    let policy = std::fs::read_to_string("policy/example.toml").unwrap();
    std::fs::write(root.path().join("etc/vm1.toml"), &policy).unwrap();

    let pre = argv(&directive("ExecStartPre"), root.path());
    let status = Command::new(&pre[0]).args(&pre[1..]).output().unwrap();
    assert!(status.status.success(), "ExecStartPre: {status:?}");

    let start = argv(&directive("ExecStart"), root.path());
    let mut child = Reaped::spawn(
        Command::new(&start[0])
            .args(&start[1..])
            .stderr(Stdio::piped()),
    );
    let socket = root.path().join("run/vm1.sock");
    eventually("the vhost-user socket", || socket.exists());
    eventually("the control socket", || {
        root.path().join("run/vm1.control").exists()
    });
    eventually("the metrics socket", || {
        root.path().join("run/vm1.metrics").exists()
    });
    let guest = SimGuest::connect(&socket, GuestOptions::default()).unwrap();

    assert_eq!(directive("ExecReload"), "/bin/kill -HUP $MAINPID");
    let pid = child.id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let control = root.path().join("run/vm1.control");
    eventually("the reload", || {
        moat::control::socket::request(&control, "stats json")
            .map(|(_, s)| s.contains("\"policy_generation\":2"))
            .unwrap_or(false)
    });

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM: {status:?}");
    assert!(
        log.lines().any(|l| l.starts_with('{')),
        "--log-format json: {log}"
    );
    drop(guest);
}
