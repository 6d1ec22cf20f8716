//! The sandbox of `moat serve` (seccomp allow-list + Landlock), proved from outside with the
//! debug-build probes of the control socket (`debug exec|read PATH|connect IP:PORT`):
//! with the sandbox a forbidden syscall kills moat, files outside its own directories and
//! TCP ports other than its proxies' are refused; with `--no-sandbox` the same probes go
//! through. Normal operation under the filter: every other test that runs the binary
//! (lifecycle, operations, qemu_e2e, dpdk_smoke, unprivileged) runs it sandboxed.

mod support;

use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_sim::guest::{GuestOptions, SimGuest};
use support::*;

/// The control-socket probes and the exit watch these tests use on a running moat.
trait Probe {
    fn ask(&self, request: &str) -> (bool, String);
    fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus>;
}

impl Probe for MoatProcess {
    fn ask(&self, request: &str) -> (bool, String) {
        moat::control::socket::request(&self.path("control.sock"), request)
            .unwrap_or((false, "no answer".into()))
    }

    /// Wait for moat to exit; its status.
    fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn policy(proxy_port: u16) -> String {
    format!(
        "[vm]\nname = \"sbx\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nhttp = \"127.0.0.1:{proxy_port}\"\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"example.com\"]\n"
    )
}

fn start(extra: &[&str], proxy_port: u16) -> MoatProcess {
    let m = MoatProcess::start(&policy(proxy_port), extra, Stdio::null());
    std::fs::write(m.path("notes.txt"), "beside the policy").unwrap();
    eventually("vhost-user socket", || m.path("moat.sock").exists());
    m
}

/// A file outside every directory moat was given.
fn outside_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "host secret").unwrap();
    (dir, file.display().to_string())
}

/// A loopback listener standing for a host service moat must not reach (docker's 2375, a
/// kubelet...), and one standing for the proxy.
fn listeners() -> (TcpListener, TcpListener) {
    (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// moat still serves a guest: it attaches and ARP for the gateway is answered.
fn serves_a_guest(socket: &Path) {
    let mut guest = SimGuest::connect(socket, GuestOptions::default()).unwrap();
    guest
        .send_frame(&moat_sim::craft::arp_request(GUEST_MAC, GUEST, GW))
        .unwrap();
    recv_matching(&mut guest, "ARP reply under the sandbox", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06]
    });
}

#[test]
fn a_forbidden_syscall_kills_the_sandboxed_moat() {
    let (service, proxy) = listeners();
    let mut m = start(&[], port(&proxy));
    serves_a_guest(&m.path("moat.sock"));
    let (_, answer) = m.ask("debug exec");
    let status = m.exit_within(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("moat survived execve ({answer})"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "killed by seccomp (SIGSYS), got {status:?}"
    );
    drop(service);
}

#[test]
fn landlock_confines_files_and_tcp_connects() {
    let (service, proxy) = listeners();
    let m = start(&[], port(&proxy));
    let (secret_dir, secret) = outside_file();
    let (ok, answer) = m.ask(&format!("debug read {secret}"));
    assert!(
        !ok && answer.contains("ermission denied"),
        "read {secret}: {answer}"
    );
    let (ok, answer) = m.ask("debug read /etc/passwd");
    assert!(!ok, "read /etc/passwd: {answer}");
    let beside = m.path("notes.txt").display().to_string();
    let (ok, answer) = m.ask(&format!("debug read {beside}"));
    assert!(
        ok,
        "the policy's directory stays readable (reloads): {answer}"
    );
    let (ok, answer) = m.ask(&format!("debug connect 127.0.0.1:{}", port(&service)));
    assert!(
        !ok && answer.contains("ermission denied"),
        "TCP to a host service: {answer}"
    );
    let (ok, answer) = m.ask(&format!("debug connect 127.0.0.1:{}", port(&proxy)));
    assert!(ok, "TCP to the proxy port: {answer}");
    serves_a_guest(&m.path("moat.sock"));
    drop(secret_dir);
}

#[test]
fn no_sandbox_lets_the_same_probes_through() {
    let (service, proxy) = listeners();
    let mut m = start(&["--no-sandbox"], port(&proxy));
    let (secret_dir, secret) = outside_file();
    let (ok, answer) = m.ask(&format!("debug read {secret}"));
    assert!(ok, "read without the sandbox: {answer}");
    let (ok, answer) = m.ask(&format!("debug connect 127.0.0.1:{}", port(&service)));
    assert!(ok, "connect without the sandbox: {answer}");
    let (_, answer) = m.ask("debug exec");
    assert!(
        answer.contains("No such file"),
        "execve fails with ENOENT: {answer}"
    );
    assert!(
        m.exit_within(Duration::from_millis(300)).is_none(),
        "moat lives on"
    );
    let (ok, _) = m.ask("stats");
    assert!(ok);
    serves_a_guest(&m.path("moat.sock"));
    drop(secret_dir);
}

#[test]
fn a_reload_that_needs_another_proxy_port_is_refused_under_the_sandbox() {
    let (_service, proxy) = listeners();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    for (extra, refused) in [(&[][..], true), (&["--no-sandbox"][..], false)] {
        let m = start(extra, port(&proxy));
        std::fs::write(m.path("vm.toml"), policy(port(&other))).unwrap();
        let (ok, answer) = m.ask("reload");
        assert_eq!(ok, !refused, "sandbox {}: {answer}", extra.is_empty());
        if refused {
            assert!(answer.contains("restart moat"), "{answer}");
        }
        // Same proxy port, other rules: fine either way.
        let tighter = policy(port(&proxy)).replace("ports = [443]", "ports = [8443]");
        std::fs::write(m.path("vm.toml"), tighter).unwrap();
        let (ok, answer) = m.ask("reload");
        assert!(ok, "{answer}");
    }
}

#[test]
fn the_sandbox_listing_names_every_call_and_why() {
    let out = Command::new(moat_bin()).arg("sandbox").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for call in ["epoll_wait", "recvmsg", "mmap", "socket", "clone"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(call) && l.len() > call.len() + 5),
            "{call} missing from:\n{text}"
        );
    }
    assert!(!text.contains("execve"));
}

/// An editor saves by writing a new file and renaming it over the old one (a new inode):
/// under Landlock, moat still reads the policy's directory, so the reload takes the new file.
#[test]
fn a_reload_after_an_editors_write_and_rename_works_under_the_sandbox() {
    let (_service, proxy) = listeners();
    let m = start(&[], port(&proxy));
    let tighter = policy(port(&proxy)).replace("ports = [443]", "ports = [8443]");
    let tmp = m.path(".vm.toml.swp");
    std::fs::write(&tmp, &tighter).unwrap();
    std::fs::rename(&tmp, m.path("vm.toml")).unwrap();
    let (ok, answer) = m.ask("reload");
    assert!(ok, "reload after write-and-rename: {answer}");
    let (ok, stats) = m.ask("stats json");
    assert!(ok, "{stats}");
    assert!(stats.contains("\"policy_generation\":2"), "{stats}");
    // And again, through SIGHUP, with a file that was never there before.
    let back = policy(port(&proxy));
    std::fs::write(&tmp, back).unwrap();
    std::fs::rename(&tmp, m.path("vm.toml")).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGHUP) };
    eventually("generation 3 after SIGHUP", || {
        m.ask("stats json").1.contains("\"policy_generation\":3")
    });
    serves_a_guest(&m.path("moat.sock"));
}

/// The control socket exists before the sandbox is in place (it is bound during set-up, so a
/// bad path fails at once), but a request sent the moment it appears still runs under the
/// sandbox: it waits in the backlog until seccomp is installed. (CI once caught a raw socket
/// opened by a request that came in between.)
#[test]
fn a_control_request_at_start_up_waits_for_the_sandbox() {
    let (_service, proxy) = listeners();
    for round in 0..5 {
        let mut m = MoatProcess::start(&policy(port(&proxy)), &[], Stdio::null());
        let (_, answer) = m.ask("debug socket raw");
        let status = m
            .exit_within(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("round {round}: a raw socket at start-up ({answer})"));
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "round {round}: {status:?}"
        );
    }
}

/// seccomp allows sockets of the unix, TCP and UDP kinds only: a raw IP, a packet or a
/// netlink socket kills the sandboxed moat (SIGSYS); a UDP one is fine. Without the sandbox
/// the same calls go through (moat runs as root here) and moat lives on.
#[test]
fn raw_packet_and_netlink_sockets_are_refused_by_seccomp() {
    let (_service, proxy) = listeners();
    for family in ["raw", "packet", "netlink"] {
        let mut m = start(&[], port(&proxy));
        let (ok, answer) = m.ask("debug socket udp");
        assert!(ok, "a UDP socket under the sandbox: {answer}");
        let (_, answer) = m.ask(&format!("debug socket {family}"));
        let status = m
            .exit_within(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("moat survived a {family} socket ({answer})"));
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{family}: killed by seccomp, got {status:?}"
        );
    }
    let mut m = start(&["--no-sandbox"], port(&proxy));
    for family in ["raw", "packet", "netlink"] {
        let (ok, answer) = m.ask(&format!("debug socket {family}"));
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            ok || !root,
            "{family} without the sandbox, as root: {answer}"
        );
    }
    assert!(
        m.exit_within(Duration::from_millis(300)).is_none(),
        "moat lives on"
    );
}
