//! A real Linux guest under QEMU (TCG) behind the real `moat serve`: DHCP gives it the policy
//! address, it pings its gateway, and every other attempt fails (scripts/qemu-e2e.sh).

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// QEMU boots one guest at a time: two TCG guests on two shared cores make the guest-side
/// timeouts (2-3 s) flaky, and both tests build the same cached guest image.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn one_guest() -> MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the peers for a real guest are here. Missing: with `CI` set (non-empty) the test
/// fails, otherwise it says "skipped" and passes.
fn required(tool: &str) -> bool {
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    let mut missing: Vec<&str> = [tool, "busybox", "cpio"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !kernel {
        missing.push("/boot/vmlinuz-*");
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} missing (apt-get install qemu-system-x86 linux-image-amd64 busybox-static cpio xz-utils)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
        panic!("CI must run the QEMU end-to-end test: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// The row of `check` in the table qemu-e2e.sh prints: (expected, observed, verdict).
fn row<'a>(table: &'a str, check: &str) -> (&'a str, &'a str, &'a str) {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(check))
        .unwrap_or_else(|| panic!("no {check} line in\n{table}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert!(cols.len() >= 4, "short row {line:?}\n{table}");
    (cols[1], cols[2], cols[3])
}

/// A counter from moat's table at the end of qemu-e2e.sh's output (`group counter value`,
/// non-zero rows only: a missing row is 0).
fn counter(stdout: &str, name: &str) -> u64 {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("--- moat counters ---"))
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(0)
}

fn assert_rows(table: &str, expected: &[(&str, &str)]) {
    for &(check, want) in expected {
        let observed = if want == "pass" { "ok" } else { "blocked" };
        assert_eq!(
            row(table, check),
            (want, observed, "PASS"),
            "{check}\n{table}"
        );
    }
}

/// How much moat's RSS may grow while the real guest pipelines up to 100 MB of DNS-over-TCP
/// queries and never reads an answer: one connection's worst case (README, limits: 280 KiB)
/// plus the allocator's slack. Before the bound: +418 MiB for 290 MB of queries.
const DNS_FLOOD_RSS_BOUND_KB: u64 = 16 * 1024;

/// The guest's DNS-over-TCP flood (scripts/guest/dnsflood.c) left moat's memory bounded.
fn dns_flood_kept_moat_bounded(stdout: &str) {
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.parse().ok())
    };
    let Some(flood) = stdout.lines().find(|l| l.starts_with("dns-flood:")) else {
        panic!("no dns-flood line\n{stdout}");
    };
    let sent = field(flood, "sent=").unwrap_or_else(|| {
        panic!("the guest's dnsflood did not run (is gcc here to build it?)\n{stdout}")
    });
    let rss = stdout
        .lines()
        .find(|l| l.starts_with("moat-rss-kb"))
        .unwrap_or_else(|| panic!("no moat-rss-kb line\n{stdout}"));
    let (base, peak) = (
        field(rss, "baseline=").unwrap_or(0),
        field(rss, "peak=").unwrap_or(0),
    );
    eprintln!("{flood}; {rss}");
    assert!(sent > 0 && base > 0, "{flood}; {rss}");
    assert!(
        peak.saturating_sub(base) < DNS_FLOOD_RSS_BOUND_KB,
        "moat's RSS grew from {base} to {peak} kB while the guest sent {sent} bytes of unread DNS-over-TCP queries (bound +{DNS_FLOOD_RSS_BOUND_KB} kB)"
    );
}

#[test]
fn real_guest_gets_dhcp_pings_gateway_and_reaches_nothing_else() {
    if !required("qemu-system-x86_64") {
        return;
    }
    let _one = one_guest();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workdir = tempfile::tempdir().unwrap();
    let out = Command::new(repo.join("scripts/qemu-e2e.sh"))
        .arg("--moat")
        .arg(env!("CARGO_BIN_EXE_moat"))
        .arg("--policy")
        .arg(repo.join("policy/example.toml"))
        .arg("--workdir")
        .arg(workdir.path())
        .arg("--dns-flood")
        .arg("100000000")
        .output()
        .expect("run scripts/qemu-e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-e2e failed\n{stdout}\n{stderr}");
    dns_flood_kept_moat_bounded(&stdout);
    assert_rows(
        &stdout,
        &[
            ("dhcp", "pass"),
            ("dhcp-address", "pass"),
            ("dhcp-router", "pass"),
            ("ping-gateway", "pass"),
            ("arp-gateway", "pass"),
            ("ping-other-vm", "fail"),
            ("ping-other-vm-24", "fail"),
            ("tcp-other-vm-22", "fail"),
            ("l2-ping-other-vm", "fail"),
            ("l2-tcp-other-vm-22", "fail"),
            ("arp-other-vm", "fail"),
            ("ping-internet", "fail"),
            ("tcp-internet-22", "fail"),
            ("http-internet", "fail"),
            ("tcp-gateway-22", "fail"),
            ("tcp-gateway-2375", "fail"),
        ],
    );
    // moat saw the forbidden attempts and dropped them for the right reasons.
    let counter = |name: &str| counter(&stdout, name);
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
    assert!(
        counter("dst_mac_not_gateway") >= 2,
        "frames addressed to another VM's MAC dropped\n{stdout}"
    );
    assert!(counter("arp_not_for_gateway") >= 1, "{stdout}");
}

/// The same real guest with egress allowed: it resolves an allowed name and not another,
/// fetches a page through moat transparently and through the explicit proxy port (both to
/// tinyproxy on loopback), cannot fetch by IP literal, and the host fetches a page from a
/// busybox httpd in the guest through a `[[forward]]`.
#[test]
fn real_guest_egress_through_tinyproxy_and_a_forward() {
    egress_and_forward(1);
}

/// The same with `moat serve --queues 2` and a 2-vCPU guest: Linux's virtio-net drives both
/// queue pairs (VIRTIO_NET_F_MQ) and every check holds.
#[test]
fn real_guest_with_two_queue_pairs_egress_through_tinyproxy_and_a_forward() {
    egress_and_forward(2);
}

fn egress_and_forward(queues: u16) {
    if !required("qemu-system-x86_64") || !support::peers::available("tinyproxy", "tinyproxy") {
        return;
    }
    let _one = one_guest();
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
             [[outbound]]\nprotocol = \"tcp\"\nports = [{}]\nto = [\"localhost\", \"127.0.0.1/32\"]\n\
             [[outbound]]\nprotocol = \"tcp\"\nports = [80]\n\
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
        .arg("--queues")
        .arg(queues.to_string())
        .output()
        .expect("run scripts/qemu-e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-e2e failed\n{stdout}\n{stderr}");
    assert_rows(
        &stdout,
        &[
            ("dhcp-address", "pass"),
            ("dns-allowed", "pass"),
            ("dns-denied", "fail"),
            ("wget-transparent", "pass"),
            ("wget-64k-body", "pass"),
            ("wget-explicit-proxy", "pass"),
            ("wget-ip-literal", "fail"),
            ("smuggle-host-127.0.0.1", "fail"),
            ("smuggle-host-0x7f000001", "fail"),
            ("smuggle-host-localhost", "fail"),
            ("smuggle-host-metadata", "fail"),
            ("explicit-metadata", "fail"),
            ("explicit-loopback-decimal", "fail"),
            ("explicit-connect-ssh", "fail"),
            ("explicit-connect-refused-403", "pass"),
            ("http-internet", "fail"),
            ("forward-httpd", "pass"),
            ("host-fetch-forward", "pass"),
        ],
    );
    // moat's side of the same run: the flows it carried, the 64 KiB it delivered, the
    // names it refused, the attempts it dropped.
    let c = |name: &str| counter(&stdout, name);
    assert!(c("opened") >= 3, "transparent, 64 KiB, explicit\n{stdout}");
    assert!(
        c("rx_bytes") >= 65536,
        "the 64 KiB body reached the guest\n{stdout}"
    );
    assert!(c("nxdomain") >= 1, "evil.test refused\n{stdout}");
    assert!(
        c("not_allowed") + c("reserved_destination") >= 4,
        "the IP literal and the smuggled Host headers dropped\n{stdout}"
    );
    assert!(
        c("forward_refused") == 0,
        "the forward's peer was allowed\n{stdout}"
    );
    // tinyproxy's own log is the witness that the refused attempts never reached it, while
    // the allowed ones did.
    let log = proxy.log();
    assert!(
        log.contains(&format!("127.0.0.1:{}", origin.port())),
        "the allowed requests reached tinyproxy:\n{log}"
    );
    for never in [
        "169.254.169.254",
        "2130706433",
        "0x7f000001",
        "127.0.0.1:22",
        "127.0.0.1:80 ",
    ] {
        assert!(!log.contains(never), "{never} reached tinyproxy:\n{log}");
    }
}

/// moat is SIGKILLed while the guest runs with QEMU's reconnecting chardev, then restarted on
/// the same socket: the guest's network comes back without a reboot.
#[test]
fn a_killed_and_restarted_moat_gets_the_running_guest_back() {
    if !required("qemu-system-x86_64") {
        return;
    }
    let _one = one_guest();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workdir = tempfile::tempdir().unwrap();
    let out = Command::new(repo.join("scripts/qemu-e2e.sh"))
        .arg("--moat")
        .arg(env!("CARGO_BIN_EXE_moat"))
        .arg("--policy")
        .arg(repo.join("policy/deny-all.toml"))
        .arg("--workdir")
        .arg(workdir.path())
        .arg("--kill-moat")
        .output()
        .expect("run scripts/qemu-e2e.sh --kill-moat");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-e2e --kill-moat failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["ping-before-kill", "outage-seen", "ping-after-restart"] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(check))
            .unwrap_or_else(|| panic!("no {check} line in\n{stdout}"));
        assert!(line.contains("PASS"), "{line}\n{stdout}");
    }
}
