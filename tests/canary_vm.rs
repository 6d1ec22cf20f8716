//! scripts/canary-vm.sh: the canary VM. Its judgement of the guest's rows (a leak is P1, an
//! aborted canary fails instead of passing with rows missing) on a recorded serial log, and
//! one real boot under QEMU (TCG) behind a fresh `moat serve`.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::moat_bin;

const POLICY: &str = "[vm]\nname = \"canary-vm\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
    [proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"example.com\"]\n\
    [dns]\nallow = [\"example.com\"]\n";

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/canary-vm.sh")
}

fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn judge(serial: &str) -> (Option<i32>, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm.toml"), POLICY).unwrap();
    std::fs::write(dir.path().join("serial.log"), serial).unwrap();
    let out = Command::new(script())
        .arg("--moat")
        .arg(moat_bin())
        .arg("--serial")
        .arg(dir.path().join("serial.log"))
        .arg(dir.path().join("vm.toml"))
        .output()
        .unwrap();
    (out.status.code(), events(&out.stdout))
}

#[test]
fn a_leak_is_p1_and_an_aborted_guest_canary_fails() {
    // A full run with one forbidden attempt that got through.
    let (code, ev) = judge(
        "MOAT-CHECK canary-control-ping-gateway pass ok tx+1 -\r\n\
         MOAT-CHECK canary-tcp-metadata fail ok tx+3 connected\r\n\
         MOAT-CHECK canary-tcp-gateway-22 fail blocked tx+2 -\r\n\
         MOAT-CHECK canary-finished pass ok 2 passed, 1 failed\r\n",
    );
    assert_eq!(code, Some(1), "{ev:?}");
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(
        (ev[0]["severity"].as_str(), ev[0]["attempt"].as_str()),
        (Some("P1"), Some("tcp-metadata"))
    );
    assert_eq!(ev[0]["vm"], "canary-vm");
    assert!(ev[0]["policy"]["hash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(ev[1]["event"], "round");
    assert_eq!(ev[1]["result"], "fail");

    // Rows that all passed, but the canary never finished: not a pass.
    let (code, ev) = judge("MOAT-CHECK canary-control-ping-gateway pass ok tx+1 -\n");
    assert_eq!(code, Some(1), "{ev:?}");
    assert_eq!(
        (ev[0]["severity"].as_str(), ev[0]["attempt"].as_str()),
        (Some("P2"), Some("canary run"))
    );
    // Nothing at all (the guest never booted): not a pass either.
    let (code, _) = judge("");
    assert_eq!(code, Some(1));
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_canary_vm_boots_a_real_guest_and_passes() {
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    let missing: Vec<&str> = ["qemu-system-x86_64", "busybox", "cpio", "python3"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !kernel || !missing.is_empty() {
        let why = format!("{missing:?} or /boot/vmlinuz-* missing (apt-get install qemu-system-x86 linux-image-amd64 busybox-static cpio)");
        assert!(
            std::env::var("CI").map_or(true, |v| v.is_empty()),
            "CI must run the canary VM: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let work = dir.path().join("work");
    let out = Command::new(script())
        .arg("--moat")
        .arg(moat_bin())
        .arg("--guest-dir")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
        .arg("--workdir")
        .arg(&work)
        .arg(&policy)
        .output()
        .unwrap();
    let serial = std::fs::read_to_string(work.join("serial.log")).unwrap_or_default();
    let ev = events(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{ev:?}\n{}\n--- serial ---\n{serial}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round = ev.last().expect("a round summary");
    assert_eq!(round["event"], "round");
    assert_eq!(round["result"], "pass");
    assert_eq!(round["vm"], "canary-vm");
    assert!(
        round["attempts"].as_u64().unwrap() >= 20,
        "every attempt of canary-guest.sh ran: {round}"
    );
    assert!(
        serial.contains("MOAT-CHECK canary-tcp-metadata fail blocked"),
        "{serial}"
    );
}
