//! `moat canary --live`: the attempts against the deployment, not a copy. Each round
//!
//! 1. re-reads and re-validates the policy file (its SHA-256 names the state tested);
//! 2. starts the real `moat serve` binary for those exact bytes, with the VM's real
//!    `[proxy]` addresses, upstream resolver, forwards, sandbox and the `--queues` /
//!    `--busy-poll-us` of the deployment, on a private socket;
//! 3. attaches the simulated guest and makes the forbidden attempts and the controls
//!    (moat's own counters, read through its control socket, witness what got through);
//! 4. asks the proxies directly for what moat's gate never sends ([`super::probe`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::report::{PolicyRef, RoundResult};
use super::{attempts, digest, probe, CanaryError, ControlUrl, Mode, Witness};
use crate::policy::Policy;
use crate::telemetry::DropReason;
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};

/// How `--live` runs.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The moat binary whose `serve` is tested (normally this one).
    pub moat: PathBuf,
    pub policy_path: PathBuf,
    pub queues: u16,
    pub busy_poll_us: u64,
    pub sandbox: bool,
    pub rebind_name: Option<String>,
    pub control_urls: Vec<ControlUrl>,
    pub controls: bool,
    /// The running moat's control socket: its policy generation is reported.
    pub control: Option<PathBuf>,
}

/// One round's result and the file state it tested.
pub struct Round {
    pub vm: Option<String>,
    pub policy: PolicyRef,
    pub result: RoundResult,
    /// The policy file did not load (exit 2 on a one-shot run).
    pub invalid_policy: bool,
}

/// The running moat's policy generation, from `stats json` on its control socket.
pub fn running_generation(control: &Path) -> Option<u64> {
    let (ok, body) = crate::control::socket::request(control, "stats json").ok()?;
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok().filter(|_| ok)?;
    v["policy_generation"].as_u64()
}

pub fn round(opts: &LiveOptions) -> Round {
    let path = opts.policy_path.display().to_string();
    let generation = opts.control.as_deref().and_then(running_generation);
    let bytes = match std::fs::read(&opts.policy_path) {
        Ok(b) => b,
        Err(e) => {
            return Round {
                vm: None,
                policy: PolicyRef {
                    path,
                    hash: "unreadable".into(),
                    generation,
                },
                result: RoundResult::Failed(format!(
                    "cannot read the policy {}: {e}",
                    opts.policy_path.display()
                )),
                invalid_policy: true,
            }
        }
    };
    let policy_ref = PolicyRef {
        path,
        hash: format!("sha256:{}", digest::sha256_hex(&bytes)),
        generation,
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let policy = match Policy::parse(&text, &opts.policy_path) {
        Ok(p) => p,
        Err(e) => {
            return Round {
                vm: None,
                policy: policy_ref,
                result: RoundResult::Failed(format!("the policy file is invalid: {e}")),
                invalid_policy: true,
            }
        }
    };
    let result = match run(&policy, &bytes, opts) {
        Ok(outcomes) => RoundResult::Ran(outcomes),
        Err(e) => RoundResult::Failed(e.to_string()),
    };
    Round {
        vm: Some(policy.vm.name.clone()),
        policy: policy_ref,
        result,
        invalid_policy: false,
    }
}

/// The `moat serve` under test; killed and its directory removed on drop.
struct Served {
    child: Child,
    /// Dropped after `Drop::drop` has stopped the child, so the directory goes last.
    dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        // `--once`: it exits when the guest leaves; do not wait for long.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn log_tail(&self) -> String {
        let mut log = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("serve.log")) {
            let _ = f.read_to_string(&mut log);
        }
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

/// moat's counters through its control socket.
struct ControlWitness(PathBuf);

impl ControlWitness {
    fn counter(&self, key: &str) -> u64 {
        crate::control::socket::request(&self.0, "stats json")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body.trim()).ok())
            .and_then(|v| v["counters"][key].as_u64())
            .unwrap_or(0)
    }
}

impl Witness for ControlWitness {
    fn drops(&self, reason: DropReason) -> u64 {
        self.counter(&format!("drop.{}", reason.as_str()))
    }
    fn proxy_flows(&self) -> u64 {
        self.counter("flows.opened")
    }
}

fn run(
    policy: &Policy,
    bytes: &[u8],
    opts: &LiveOptions,
) -> Result<Vec<super::Outcome>, CanaryError> {
    let dir = super::scratch_dir()?;
    let file = dir.path().join("policy.toml");
    let socket = dir.path().join("canary.sock");
    let control = dir.path().join("control.sock");
    let log = dir.path().join("serve.log");
    let prepared = std::fs::write(&file, bytes).and_then(|_| std::fs::File::create(&log));
    let log_file = match prepared {
        Ok(f) => f,
        Err(e) => {
            return Err(CanaryError::Setup(format!(
                "cannot write {}: {e}",
                dir.path().display()
            )));
        }
    };
    let mut cmd = Command::new(&opts.moat);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--policy")
        .arg(&file)
        .arg("--control")
        .arg(&control)
        .arg("--once")
        .arg("--queues")
        .arg(opts.queues.to_string())
        .arg("--busy-poll-us")
        .arg(opts.busy_poll_us.to_string())
        .args(["--log-format", "json"]);
    if !opts.sandbox {
        cmd.arg("--no-sandbox");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            return Err(CanaryError::Setup(format!(
                "cannot start {} serve: {e}",
                opts.moat.display()
            )));
        }
    };
    let mut served = Served { child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(socket.exists() && control.exists()) {
        if let Ok(Some(status)) = served.child.try_wait() {
            return Err(CanaryError::Setup(format!(
                "moat serve exited ({status}) before serving: {}",
                served.log_tail()
            )));
        }
        if Instant::now() > deadline {
            return Err(CanaryError::Setup(format!(
                "moat serve did not listen within 20 s: {}",
                served.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let guest_opts = GuestOptions {
        queue_pairs: opts.queues,
        ..GuestOptions::default()
    };
    let sim = SimGuest::connect(&socket, guest_opts).map_err(|e| {
        CanaryError::Setup(format!(
            "the simulated guest could not attach: {e}: {}",
            served.log_tail()
        ))
    })?;
    let mut net = GuestNet::new(
        sim,
        policy.vm.mac.0,
        policy.vm.address,
        policy.vm.prefix_len,
        policy.vm.gateway,
        policy.vm.mtu,
    );
    let witness = ControlWitness(control);
    let mode = Mode::Live {
        controls: opts.controls,
        control_urls: opts.control_urls.clone(),
    };
    let mut outcomes = attempts::all(&mut net, policy, &witness, &mode);
    drop(net);
    drop(served);
    outcomes.extend(probe::run(
        policy.proxy.http,
        policy.proxy.socks5,
        opts.rebind_name.as_deref(),
    ));
    Ok(outcomes)
}
