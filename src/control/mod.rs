//! The running VM as operators see it: the policy in force (reloadable), the counters, the
//! device of the current connection, and the control socket that serves `moat stats`,
//! `moat reload` and `moat forward`.

pub mod socket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use thiserror::Error;

pub use crate::device::VmState;
use crate::egress::FlowSnapshot;
use crate::policy::{Forward, Policy, PolicyError};

#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] PolicyError),
    #[error("{0}")]
    Forward(String),
    #[error("{file}: the sandbox lets moat connect only to TCP ports {pinned:?}, fixed at start, and the new policy needs {port}: restart moat to change proxy or upstream ports (or serve with --no-sandbox)")]
    SandboxPort {
        file: PathBuf,
        port: u16,
        pinned: Vec<u16>,
    },
    #[error("{file}: vm.{key} changed ({old} -> {new}); a VM's identity cannot change on reload: restart moat for it")]
    Identity {
        file: PathBuf,
        key: &'static str,
        old: String,
        new: String,
    },
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    /// Flows the new policy no longer allows, reset.
    pub flows_reset: usize,
    /// Queue pairs too busy to apply it within a second: they do before their next frame,
    /// and their resets are not counted in `flows_reset`.
    pub pairs_pending: usize,
}

// `VmState` is defined in `device` (whose server needs the policy in force and hands it
// each new device); what operators do with it (reload, forwards, stats) is here.
impl VmState {
    /// Re-read the policy file. A bad file, or one that changes the VM's identity, changes
    /// nothing. A good one is swapped in: new flows follow it at once, and existing flows it
    /// no longer allows are reset.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(r) => {
                tracing::info!(generation = r.generation, flows_reset = r.flows_reset, pairs_pending = r.pairs_pending, file = %self.path.display(), "policy reloaded")
            }
            Err(e) => {
                self.counters
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "policy reload refused; the running policy stays");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = Policy::load(&self.path)?;
        crate::egress::fd_budget::clamp_max_flows(&mut new);
        let old = self.policy();
        let identity: [(&'static str, String, String); 5] = [
            ("name", old.vm.name.clone(), new.vm.name.clone()),
            ("mac", old.vm.mac.to_string(), new.vm.mac.to_string()),
            (
                "address",
                format!("{}/{}", old.vm.address, old.vm.prefix_len),
                format!("{}/{}", new.vm.address, new.vm.prefix_len),
            ),
            (
                "gateway",
                old.vm.gateway.to_string(),
                new.vm.gateway.to_string(),
            ),
            ("mtu", old.vm.mtu.to_string(), new.vm.mtu.to_string()),
        ];
        if let Some((key, old, new)) = identity.into_iter().find(|(_, o, n)| o != n) {
            return Err(ReloadError::Identity {
                file: self.path.clone(),
                key,
                old,
                new,
            });
        }
        if let Some(pinned) = self
            .connect_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if let Some(port) = new
                .connect_ports()
                .into_iter()
                .find(|p| !pinned.contains(p))
            {
                return Err(ReloadError::SandboxPort {
                    file: self.path.clone(),
                    port,
                    pinned: pinned.clone(),
                });
            }
        }
        let new = Arc::new(new);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&new);
        let applied = match self.device() {
            Some(device) => device.reload(new),
            None => crate::device::Applied::default(),
        };
        self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        let generation = self
            .counters
            .policy_generation
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        Ok(Reloaded {
            generation,
            flows_reset: applied.flows_reset,
            pairs_pending: applied.pairs_pending,
        })
    }

    /// `moat forward add LISTEN GUEST_PORT`: like a `[[forward]]` with the default `from`
    /// (loopback), until removed or moat restarts.
    pub fn add_forward(&self, listen: &str, guest_port: &str) -> Result<String, ReloadError> {
        let listen: SocketAddr = listen.parse().map_err(|_| {
            ReloadError::Forward(format!("{listen:?} is not IP:PORT, e.g. 127.0.0.1:8080"))
        })?;
        let guest_port: u16 = guest_port.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            ReloadError::Forward(format!("{guest_port:?} is not a port (1..=65535)"))
        })?;
        if listen.port() == 0 {
            return Err(ReloadError::Forward(
                "listen port 0: give a fixed port".into(),
            ));
        }
        let policy = self.policy();
        let mut forwards = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        let clash = |a: SocketAddr| {
            a.port() == listen.port()
                && (a.ip() == listen.ip()
                    || a.ip().is_unspecified()
                    || listen.ip().is_unspecified())
        };
        if policy
            .forward
            .iter()
            .chain(forwards.iter())
            .any(|f| clash(f.listen))
        {
            return Err(ReloadError::Forward(format!(
                "{listen} overlaps a forward that exists; remove it first"
            )));
        }
        // Probe the address now so the caller hears about a busy port.
        drop(
            std::net::TcpListener::bind(listen)
                .map_err(|e| ReloadError::Forward(format!("cannot listen on {listen}: {e}")))?,
        );
        forwards.push(Forward {
            listen,
            guest_port,
            from: vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
        });
        self.apply_forwards(forwards.clone());
        Ok(format!("forward {listen} -> guest port {guest_port}\n"))
    }

    /// `moat forward remove LISTEN`.
    pub fn remove_forward(&self, listen: &str) -> Result<String, ReloadError> {
        let mut forwards = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        let before = forwards.len();
        forwards.retain(|f| f.listen.to_string() != listen);
        if forwards.len() == before {
            return Err(ReloadError::Forward(format!(
                "no run-time forward listens on {listen} (see moat forward list)"
            )));
        }
        self.apply_forwards(forwards.clone());
        Ok(format!("removed {listen}\n"))
    }

    /// `moat forward list`: the policy's forwards and the run-time ones.
    pub fn list_forwards(&self) -> String {
        let policy = self.policy();
        let mut out = format!("{:<24} {:>10} {}\n", "listen", "guest_port", "origin");
        for f in &policy.forward {
            out.push_str(&format!(
                "{:<24} {:>10} policy\n",
                f.listen.to_string(),
                f.guest_port
            ));
        }
        for f in self.runtime_forwards() {
            out.push_str(&format!(
                "{:<24} {:>10} runtime\n",
                f.listen.to_string(),
                f.guest_port
            ));
        }
        out
    }

    fn apply_forwards(&self, forwards: Vec<Forward>) {
        if let Some(device) = self.device() {
            device.set_runtime_forwards(forwards);
        }
    }

    /// Counters and the flow table, as a table or as JSON.
    pub fn stats(&self, json: bool) -> String {
        let (flows, stale) = self.device().map(|d| d.flow_table()).unwrap_or_default();
        if json {
            let counters: serde_json::Map<String, serde_json::Value> = self
                .counters
                .rows()
                .into_iter()
                .map(|(g, n, v)| (format!("{g}.{n}"), v.into()))
                .collect();
            let flows: Vec<serde_json::Value> = flows.iter().map(flow_json).collect();
            let policy = self.policy();
            serde_json::json!({
                "vm": policy.vm.name,
                "policy_generation": self.counters.policy_generation.load(Ordering::Relaxed),
                "counters": counters,
                "flows": flows,
                "flow_tables_stale": stale,
            })
            .to_string()
                + "\n"
        } else {
            let mut out = self.counters.table();
            out.push_str(&format!(
                "\n{:<34} {:<28} {:<10} {:>12} {:>12} {}\n",
                "flow", "target", "state", "up", "down", "unit"
            ));
            for f in &flows {
                out.push_str(&format!(
                    "{:<34} {:<28} {:<10} {:>12} {:>12} {}\n",
                    f.flow, f.target, f.state, f.up, f.down, f.unit
                ));
            }
            if stale > 0 {
                out.push_str(&format!(
                    "({stale} busy queue pair(s): their flows as last copied)\n"
                ));
            }
            out
        }
    }
}

/// A row of the flow table in `stats --json`: `bytes_up`/`bytes_down` for a TCP flow,
/// `datagrams_up`/`datagrams_down` for a UDP association (named for what they count).
pub fn flow_json(row: &FlowSnapshot) -> serde_json::Value {
    let mut json = serde_json::json!({"flow": row.flow, "target": row.target, "state": row.state});
    json[format!("{}_up", row.unit)] = row.up.into();
    json[format!("{}_down", row.unit)] = row.down.into();
    json
}

#[cfg(test)]
mod flow_row_tests {
    use super::{flow_json, FlowSnapshot};

    fn row(flow: &str, unit: &'static str) -> FlowSnapshot {
        FlowSnapshot {
            flow: flow.into(),
            target: "example.com:443".into(),
            state: "open".into(),
            up: 7,
            down: 3,
            unit,
        }
    }

    /// A UDP association's counts are datagrams and are named so; no "bytes" field claims
    /// them (the UDP bench once read datagrams out of a field called bytes_up).
    #[test]
    fn udp_rows_name_datagrams_and_tcp_rows_bytes() {
        let udp = row("udp 10.0.0.2:40000 -> 127.0.0.1:9999", "datagrams");
        let udp = flow_json(&udp);
        assert_eq!(udp["datagrams_up"], 7);
        assert_eq!(udp["datagrams_down"], 3);
        assert!(udp.get("bytes_up").is_none() && udp.get("bytes_down").is_none());
        let tcp = row("tcp 10.0.0.2:40001 -> 203.0.113.7:443", "bytes");
        let tcp = flow_json(&tcp);
        assert_eq!(tcp["bytes_up"], 7);
        assert_eq!(tcp["bytes_down"], 3);
        assert!(tcp.get("datagrams_up").is_none());
    }
}
