//! The device's life: reconnects reset it, `--once` exits, `--client` dials the VMM,
//! signals stop it cleanly, malformed descriptor chains never take it down.

mod support;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use moat::telemetry::{DropReason, Service};
use moat_sim::craft;
use moat_sim::guest::{GuestOptions, RawDesc, SimGuest};
use support::*;

fn ping_ok(guest: &mut SimGuest, seq: u16) {
    guest
        .send_frame(&craft::icmp_echo(
            GUEST_MAC, GW_MAC, GUEST, GW, 1, seq, b"x",
        ))
        .unwrap();
    recv_matching(guest, "echo reply", |_| true);
}

#[test]
fn a_reconnecting_frontend_gets_a_fresh_working_device() {
    let served = Served::start(POLICY, false);
    for round in 0..3u16 {
        let mut guest = served.guest();
        ping_ok(&mut guest, round);
        guest.disconnect();
    }
    eventually("3 echo answers", || {
        served.counters.answers(Service::IcmpEcho) == 3
    });
}

#[test]
fn once_returns_after_the_first_frontend() {
    let mut served = Served::start(POLICY, true);
    let mut guest = served.guest();
    ping_ok(&mut guest, 1);
    guest.disconnect();
    served
        .join(Duration::from_secs(5))
        .expect("serve returns Ok");
}

#[test]
fn malformed_chains_are_rejected_and_moat_keeps_serving() {
    let served = Served::start(POLICY, true);
    let mut guest = served.guest();
    let (gpa, len) = guest.guest_mem_layout()[0];
    let end = gpa + len as u64;
    let bad_chains: Vec<Vec<RawDesc>> = vec![
        // Outside guest memory.
        vec![RawDesc {
            addr: end + 0x10000,
            len: 64,
            flags: 0,
            next: 0,
        }],
        // Straddling the end of guest memory.
        vec![RawDesc {
            addr: end - 8,
            len: 64,
            flags: 0,
            next: 0,
        }],
        // Device-writable descriptor on TX.
        vec![RawDesc {
            addr: gpa,
            len: 64,
            flags: 2,
            next: 0,
        }],
        // Zero length.
        vec![RawDesc {
            addr: gpa,
            len: 0,
            flags: 0,
            next: 0,
        }],
        // Absurd length.
        vec![RawDesc {
            addr: gpa,
            len: u32::MAX,
            flags: 0,
            next: 0,
        }],
    ];
    for chain in &bad_chains {
        guest.send_raw_chain(chain).unwrap();
    }
    eventually("every bad chain counted", || {
        served.counters.drops(DropReason::BadDescriptor)
            + served.counters.drops(DropReason::Truncated)
            + served.counters.drops(DropReason::Oversized)
            >= bad_chains.len() as u64
    });
    ping_ok(&mut guest, 1);
}

#[test]
fn the_binary_serves_prints_counters_and_exits_on_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let control = dir.path().join("control.sock");
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--once", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .arg("--control")
            .arg(&control)
            .stderr(Stdio::piped()),
    );
    let mut guest = SimGuest::connect(&socket, GuestOptions::default()).expect("connect to moat");
    ping_ok(&mut guest, 1);
    guest
        .send_frame(&craft::arp_request(
            GUEST_MAC,
            GUEST,
            std::net::Ipv4Addr::new(10, 0, 0, 9),
        ))
        .unwrap();
    // The drop is counted before the frontend goes away (then the table must show it).
    wait_counter(&control, "drop.arp_not_for_gateway", 1);
    guest.disconnect();
    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit status {status:?}\n{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("icmp_echo") && l.trim_end().ends_with('1')),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("arp_not_for_gateway") && l.trim_end().ends_with('1')),
        "{stderr}"
    );
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn the_binary_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .stderr(Stdio::piped()),
    );
    let mut guest = SimGuest::connect(&socket, GuestOptions::default()).expect("connect to moat");
    ping_ok(&mut guest, 1);
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn client_mode_dials_the_vmm_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmm.sock");
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--client", "--once", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .stderr(Stdio::null()),
    );
    let mut guest = SimGuest::accept(&listener, GuestOptions::default()).expect("moat dials in");
    ping_ok(&mut guest, 1);
    guest.disconnect();
    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_policy_exits_2_before_creating_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("bad.toml");
    std::fs::write(
        &policy,
        "[vm]\nname = \"x\"\nmac = \"01:00:5e:00:00:01\"\naddress = \"10.0.0.2/30\"\n",
    )
    .unwrap();
    let out = Command::new(moat_bin())
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:3") && stderr.contains("vm.mac"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!socket.exists());
}

fn wait_with_timeout(
    child: &mut std::process::Child,
    within: Duration,
) -> std::process::ExitStatus {
    wait_exit(child, within).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("moat did not exit within {within:?}");
    })
}

/// Descriptor-chain attacks beyond single bad descriptors: loops, chains longer than the
/// queue, indirect inside indirect. Each is rejected or cut short; moat keeps serving.
#[test]
fn looping_long_and_nested_indirect_chains_do_not_hang_or_crash_moat() {
    use moat_sim::guest::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
    let served = Served::start(POLICY, true);
    let mut guest = served.guest();
    let buf = guest.scratch_gpa();
    guest.write_guest_mem(buf, &[0u8; 64]);
    // A -> B -> A: a loop.
    guest
        .send_raw_chain(&[
            RawDesc {
                addr: buf,
                len: 32,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: buf,
                len: 32,
                flags: VIRTQ_DESC_F_NEXT,
                next: 0,
            },
        ])
        .unwrap();
    // 201 descriptors whose last one loops back to the first: endless unless the device
    // bounds a chain by the queue size.
    let long: Vec<RawDesc> = (0..200u16)
        .map(|i| RawDesc {
            addr: buf,
            len: 1,
            flags: VIRTQ_DESC_F_NEXT,
            next: i + 1,
        })
        .chain(std::iter::once(RawDesc {
            addr: buf,
            len: 1,
            flags: VIRTQ_DESC_F_NEXT,
            next: 0,
        }))
        .collect();
    guest.send_raw_chain(&long).unwrap();
    // An indirect table whose entry is itself indirect.
    let table = buf + 4096;
    let mut entry = Vec::new();
    entry.extend_from_slice(&(table + 64).to_le_bytes());
    entry.extend_from_slice(&16u32.to_le_bytes());
    entry.extend_from_slice(&VIRTQ_DESC_F_INDIRECT.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes());
    guest.write_guest_mem(table, &entry);
    guest
        .send_raw_chain(&[RawDesc {
            addr: table,
            len: 16,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        }])
        .unwrap();
    eventually("the three chains were consumed", || {
        served.counters.total_drops() >= 3
    });
    ping_ok(&mut guest, 7);
}

/// A frame whose bytes straddle two memory regions is read correctly (and answered).
#[test]
fn a_frame_across_a_memory_region_boundary_is_handled() {
    let served = Served::start(POLICY, true);
    let opts = GuestOptions {
        regions: 2,
        mem_size: 16 << 20,
        ..GuestOptions::default()
    };
    let mut guest = SimGuest::connect(&served.socket, opts).unwrap();
    let layout = guest.guest_mem_layout();
    assert_eq!(layout.len(), 2);
    let boundary = layout[1].0;
    let mut buf = vec![0u8; 12];
    buf.extend(craft::icmp_echo(
        GUEST_MAC,
        GW_MAC,
        GUEST,
        GW,
        3,
        3,
        b"across the boundary",
    ));
    let start = boundary - 20;
    guest.write_guest_mem(start, &buf);
    guest
        .send_raw_chain(&[RawDesc {
            addr: start,
            len: buf.len() as u32,
            flags: 0,
            next: 0,
        }])
        .unwrap();
    let reply = recv_matching(&mut guest, "echo reply", |_| true);
    assert!(reply.windows(19).any(|w| w == b"across the boundary"));
    assert_eq!(served.counters.answers(Service::IcmpEcho), 1);
}

/// An idle moat with a guest attached sleeps: no busy polling.
#[test]
fn an_idle_device_uses_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .stderr(Stdio::null()),
    );
    let mut guest = SimGuest::connect(&socket, GuestOptions::default()).unwrap();
    ping_ok(&mut guest, 1);
    let before = cpu_ns(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ns(child.id()) - before;
    let _ = child.kill();
    let _ = child.wait();
    // Measured from /proc/PID/task/*/schedstat (ns on CPU). A poller burns a whole CPU
    // (~2e9 ns), or whatever share a loaded machine gives it; an idle moat sleeps (a few ms
    // here, unloaded). A tenth of a CPU is far from both: robust to load, still a poller's
    // failure. The exact idle cost is the footprint bench's (benches/footprint.rs).
    assert!(used < 200_000_000, "idle moat used {used} ns of CPU in 2 s");
}

/// Nanoseconds on CPU of every thread of `pid` (the first field of schedstat).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Regression: with stderr a pipe whose reader is gone, printing the exit table panicked the
/// signal thread and SIGTERM no longer stopped moat.
#[test]
fn sigterm_stops_moat_even_when_stderr_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("vm.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .stderr(Stdio::piped()),
    );
    eventually("socket", || socket.exists());
    drop(child.stderr.take());
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}
