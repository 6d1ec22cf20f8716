//! A real Linux guest under QEMU (TCG) behind the real `moat serve`: DHCP gives it the policy
//! address, it pings its gateway, and every other attempt fails (scripts/qemu-e2e.sh).

mod support;

use std::path::Path;
use std::process::Command;

fn required(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    if found && kernel {
        return true;
    }
    let why = format!("{tool} or /boot/vmlinuz-* missing (apt-get install qemu-system-x86 linux-image-amd64 busybox-static)");
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("CI must run the QEMU end-to-end test: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

#[test]
fn real_guest_gets_dhcp_pings_gateway_and_reaches_nothing_else() {
    if !required("qemu-system-x86_64") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workdir = tempfile::tempdir().unwrap();
    let out = Command::new(repo.join("scripts/qemu-e2e.sh"))
        .arg("--moat")
        .arg(env!("CARGO_BIN_EXE_moat"))
        .arg("--policy")
        .arg(repo.join("policy/example.toml"))
        .arg("--workdir")
        .arg(workdir.path())
        .output()
        .expect("run scripts/qemu-e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-e2e failed\n{stdout}\n{stderr}");
    let expected = [
        ("dhcp-address", "pass"),
        ("ping-gateway", "pass"),
        ("arp-gateway", "pass"),
        ("ping-other-vm", "fail"),
        ("tcp-other-vm-22", "fail"),
        ("ping-internet", "fail"),
        ("tcp-internet-22", "fail"),
        ("http-internet", "fail"),
        ("tcp-gateway-22", "fail"),
        ("arp-other-vm", "fail"),
    ];
    for (check, want) in expected {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(check))
            .unwrap_or_else(|| panic!("no {check} line in\n{stdout}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((cols[1], cols[3]), (want, "PASS"), "{line}\n{stdout}");
    }
    // moat saw the forbidden attempts and dropped them for the right reasons.
    let counter = |name: &str| -> u64 {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        counter("dhcp") >= 2,
        "DISCOVER and REQUEST answered\n{stdout}"
    );
    assert!(counter("icmp_echo") >= 1, "{stdout}");
    assert!(
        counter("not_allowed") >= 3,
        "pings and SYNs to other hosts dropped\n{stdout}"
    );
    assert!(
        counter("gateway_port_closed") >= 2,
        "SYNs to gateway:22/2375 dropped\n{stdout}"
    );
    assert!(counter("arp_not_for_gateway") >= 1, "{stdout}");
}

/// The same real guest with egress allowed: it resolves an allowed name and not another,
/// fetches a page through moat transparently and through the explicit proxy port (both to
/// tinyproxy on loopback), cannot fetch by IP literal, and the host fetches a page from a
/// busybox httpd in the guest through a `[[forward]]`.
#[test]
fn real_guest_egress_through_tinyproxy_and_a_forward() {
    if !required("qemu-system-x86_64") || !support::peers::available("tinyproxy", "tinyproxy") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let origin = support::proxy::origin();
    let proxy = support::peers::tinyproxy();
    let forward = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let workdir = tempfile::tempdir().unwrap();
    let policy = workdir.path().join("egress.toml");
    std::fs::write(
        &policy,
        format!(
            "[vm]\nname = \"e2e-egress\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n\
             [proxy]\nhttp = \"{}\"\nexplicit_port = 3128\n\
             [[outbound]]\nprotocol = \"tcp\"\nports = [{}]\nto = [\"localhost\"]\n\
             [dns]\nallow = [\"localhost\"]\n\
             [[forward]]\nlisten = \"{forward}\"\nguest_port = 3000\n",
            proxy.addr,
            origin.port()
        ),
    )
    .unwrap();
    let out = Command::new(repo.join("scripts/qemu-e2e.sh"))
        .arg("--moat")
        .arg(env!("CARGO_BIN_EXE_moat"))
        .arg("--policy")
        .arg(&policy)
        .arg("--workdir")
        .arg(workdir.path())
        .arg("--egress-port")
        .arg(origin.port().to_string())
        .arg("--forward")
        .arg(forward.to_string())
        .output()
        .expect("run scripts/qemu-e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-e2e failed\n{stdout}\n{stderr}");
    for (check, want) in [
        ("dhcp-address", "pass"),
        ("dns-allowed", "pass"),
        ("dns-denied", "fail"),
        ("wget-transparent", "pass"),
        ("wget-explicit-proxy", "pass"),
        ("wget-ip-literal", "fail"),
        ("http-internet", "fail"),
        ("forward-httpd", "pass"),
        ("host-fetch-forward", "pass"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(check))
            .unwrap_or_else(|| panic!("no {check} line in\n{stdout}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((cols[1], cols[3]), (want, "PASS"), "{line}\n{stdout}");
    }
}
