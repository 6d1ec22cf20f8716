//! Shared helpers for integration tests: a moat device served in-process (so tests read its
//! counters directly) or as the real binary, and the simulated guest attached to it.

#![allow(dead_code)]

pub mod peers;
pub mod proxy;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moat::device::server::{self, ServeOptions};
use moat::device::Tuning;
use moat::frame::{MacAddr, GATEWAY_MAC};
use moat::guest::{GuestOptions, SimGuest};
use moat::policy::Policy;
use moat::telemetry::Counters;

pub const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const GW_MAC: MacAddr = GATEWAY_MAC;
/// How long to wait for something that must NOT arrive.
pub const QUIET: Duration = Duration::from_millis(300);

pub const POLICY: &str = r#"
[vm]
name = "it"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
"#;

/// A moat device served on a socket in a temp dir, in this process.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub counters: Arc<Counters>,
    pub policy: Arc<Policy>,
    /// The running VM (policy file `dir/vm.toml`: rewrite it and call `vm.reload()`).
    pub vm: Arc<moat::control::VmState>,
    pub thread: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl Served {
    /// Serve `policy_text` until the first frontend disconnects (`once`) or forever.
    pub fn start(policy_text: &str, once: bool) -> Served {
        Served::start_tuned(policy_text, once, Tuning::default())
    }

    /// `start` with queue pairs and polling set.
    pub fn start_tuned(policy_text: &str, once: bool, tuning: Tuning) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("moat.sock");
        let policy =
            Arc::new(Policy::parse(policy_text, Path::new("test.toml")).expect("valid policy"));
        let counters = Arc::new(Counters::default());
        let listener = server::bind(&socket).expect("bind");
        let opts = ServeOptions {
            socket: socket.clone(),
            client: false,
            once,
            tuning,
        };
        let file = dir.path().join("vm.toml");
        std::fs::write(&file, policy_text).expect("write the policy");
        let vm = Arc::new(moat::control::VmState::new(
            file,
            (*policy).clone(),
            Arc::clone(&counters),
        ));
        let served_vm = Arc::clone(&vm);
        let thread = std::thread::spawn(move || server::serve(served_vm, &opts, Some(listener)));
        Served {
            dir,
            socket,
            counters,
            policy,
            vm,
            thread: Some(thread),
        }
    }

    pub fn guest(&self) -> SimGuest {
        SimGuest::connect(&self.socket, GuestOptions::default()).expect("guest connects")
    }

    /// Wait for the serving thread to return (with `once`).
    pub fn join(&mut self, within: Duration) -> Result<(), server::ServeError> {
        let thread = self.thread.take().expect("joined once");
        let deadline = Instant::now() + within;
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "moat did not stop within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        thread.join().expect("serve thread panicked")
    }
}

/// How long a test waits for something that must happen: generous, because a loaded 2-CPU
/// machine may be slow; waiting stops as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Wait until `probe` gives a value (checked every 10 ms), or panic naming `what` after
/// `within`. Tests wait for the condition they then check, never for a fixed time.
pub fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until `cond` holds (counters are updated by moat's worker thread), up to DEADLINE.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, DEADLINE, || cond().then_some(()))
}

/// Receive frames until one satisfies `pred`, or fail after DEADLINE.
pub fn recv_matching(guest: &mut SimGuest, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no frame: {what}");
        if let Some(frame) = guest.recv_frame(left).expect("recv") {
            if pred(&frame) {
                return frame;
            }
        }
    }
}

/// Assert nothing at all arrives for a while.
pub fn assert_silent(guest: &mut SimGuest, what: &str) {
    if let Some(frame) = guest.recv_frame(QUIET).expect("recv") {
        panic!(
            "expected no answer to {what}, got {} bytes: {:02x?}",
            frame.len(),
            &frame[..frame.len().min(42)]
        );
    }
}

pub fn moat_bin() -> &'static str {
    env!("CARGO_BIN_EXE_moat")
}

/// `moat stats --json` of the moat serving `control`, if it answers.
pub fn stats_json(control: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(moat_bin())
        .args(["stats", "--json", "--control"])
        .arg(control)
        .output()
        .ok()?;
    out.status.success().then_some(())?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the running moat's counter `name` (as `moat stats --json` names it, e.g.
/// `drop.arp_not_for_gateway`) reads `value`.
pub fn wait_counter(control: &Path, name: &str, value: u64) {
    let mut last = None;
    wait_for(&format!("{name} = {value} in moat stats"), DEADLINE, || {
        last = stats_json(control).and_then(|v| v["counters"][name].as_u64());
        (last == Some(value)).then_some(())
    });
}

/// A spawned process that is killed (SIGKILL) and reaped when dropped, also when the test
/// panics. It leads its own process group, and the whole group goes with it (peers that
/// fork workers). Derefs to the `Child` for everything else.
pub struct Reaped(std::process::Child);

impl Reaped {
    pub fn spawn(cmd: &mut std::process::Command) -> Reaped {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Reaped(child)
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Not reaped yet (else the test already waited for it): the id still names our
        // child and the group it leads.
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on the process group our own, unreaped child leads.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// The moat binary serving `vm.toml` in a temp dir, with `moat.sock` and `control.sock`
/// there too; killed when dropped (before the directory goes).
pub struct MoatProcess {
    pub child: Reaped,
    pub dir: tempfile::TempDir,
}

impl MoatProcess {
    /// Write `policy` as vm.toml, start `moat serve` with `extra` arguments, and wait for
    /// its control socket.
    pub fn start(policy: &str, extra: &[&str], stderr: std::process::Stdio) -> MoatProcess {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.toml"), policy).unwrap();
        let child = Reaped::spawn(
            std::process::Command::new(moat_bin())
                .arg("serve")
                .arg("--socket")
                .arg(dir.path().join("moat.sock"))
                .arg("--policy")
                .arg(dir.path().join("vm.toml"))
                .arg("--control")
                .arg(dir.path().join("control.sock"))
                .args(extra)
                .stderr(stderr),
        );
        let m = MoatProcess { child, dir };
        eventually("control socket", || m.path("control.sock").exists());
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A VM whose TCP to example.com (and 203.0.113.0/24, 127.0.0.1) ports 80 and 443 goes
/// through the HTTP CONNECT proxy at `proxy`.
pub fn proxied_policy(proxy: std::net::SocketAddr, max_flows: usize) -> String {
    format!(
        r#"
[vm]
name = "egress"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{proxy}"
[[outbound]]
protocol = "tcp"
ports = [80, 443]
to = ["example.com", "*.example.com", "203.0.113.0/24", "127.0.0.1/32"]
[dns]
allow = ["example.com", "*.example.com", "evil.test"]
[limits]
max_flows = {max_flows}
"#
    )
}

/// Connect and wait for the handshake; returns the socket once established.
pub fn established(
    net: &mut moat::guest::GuestNet,
    dst: Ipv4Addr,
    port: u16,
) -> smoltcp::iface::SocketHandle {
    net.tcp_established(dst, port, Duration::from_secs(10))
        .unwrap()
        .unwrap_or_else(|| panic!("connection to {dst}:{port} not established"))
}

/// A VM in `dns.mode = "upstream"` asking `resolver`, whose TCP to `*.example.com:443` goes
/// through the HTTP proxy at `proxy`.
pub fn upstream_policy(resolver: std::net::SocketAddr, proxy: std::net::SocketAddr) -> String {
    format!(
        r#"
[vm]
name = "dns-upstream"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{proxy}"
[[outbound]]
protocol = "tcp"
ports = [443]
to = ["*.example.com"]
[dns]
allow = ["*.example.com"]
mode = "upstream"
upstream = "{resolver}"
"#
    )
}

/// The simulated guest's network stack (the policies' usual address and gateway, /24).
pub fn guest_net(served: &Served) -> moat::guest::GuestNet {
    moat::guest::GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500)
}
