//! moat needs no root and no capabilities: as user nobody with every capability dropped, it
//! serves a guest (DHCP, ARP, ping) like it does as root.

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use dhcproto::v4::MessageType;
use moat_sim::craft;
use moat_sim::guest::{GuestOptions, SimGuest};
use support::*;

#[test]
fn serves_as_nobody_without_capabilities() {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("sh")
        .args(["-c", "command -v setpriv"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !setpriv {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("CI must run this test as root with setpriv (util-linux)");
        }
        eprintln!("skipped: needs root (to drop to nobody) and setpriv");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = dir.path().join("moat.sock");
    // Run a copy from the temp dir: the checkout may sit below a directory nobody cannot enter.
    let bin = dir.path().join("moat");
    std::fs::copy(moat_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Reaped::spawn(
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
            ])
            .arg(&bin)
            .args(["serve", "--once", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .stderr(Stdio::null()),
    );
    let mut guest =
        SimGuest::connect(&socket, GuestOptions::default()).expect("moat (as nobody) listens");
    // The process really is unprivileged.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        field("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == "65534"),
        "{}",
        field("Uid:")
    );
    assert!(
        field("CapEff:").ends_with("0000000000000000"),
        "{}",
        field("CapEff:")
    );
    guest
        .send_frame(&craft::dhcp(
            GUEST_MAC,
            MessageType::Discover,
            9,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GW_MAC,
        ))
        .unwrap();
    recv_matching(&mut guest, "dhcp offer", |_| true);
    guest
        .send_frame(&craft::icmp_echo(
            GUEST_MAC, GW_MAC, GUEST, GW, 1, 1, b"nobody",
        ))
        .unwrap();
    recv_matching(&mut guest, "echo reply", |_| true);
    guest.disconnect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "moat did not exit after --once"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
}
