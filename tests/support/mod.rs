//! What integration tests share: the test kit (`moat-sim`: addresses, waiting, spawning the
//! moat binary, loopback peers) re-exported, plus what needs moat's library and so cannot
//! live in the kit (moat-sim does not depend on moat): a moat device served in-process (so
//! tests read its counters directly), and the test VM's MACs as moat's `MacAddr`.

// Each test binary uses its own part of the kit and of these helpers.
#![allow(dead_code, unused_imports)]

pub use moat_sim::fixtures::*;
pub use moat_sim::process::*;
pub use moat_sim::{peers, proxy};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moat::device::server::{self, ServeOptions};
use moat::device::Tuning;
use moat::frame::{MacAddr, GATEWAY_MAC};
use moat::policy::Policy;
use moat::telemetry::Counters;
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};

/// The test VM's MAC as moat's type (shadows the kit's plain octets, so tests compare it
/// with parsed frames).
pub const GUEST_MAC: MacAddr = MacAddr(moat_sim::fixtures::GUEST_MAC);
pub const GW_MAC: MacAddr = GATEWAY_MAC;

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

/// The simulated guest's network stack on `served` (the policies' usual address and
/// gateway, /24).
pub fn guest_net(served: &Served) -> GuestNet {
    vm_net(served.guest())
}
