//! The running VM as operators see it: the policy in force (reloadable), the counters, the
//! device of the current connection, and the control socket that serves `moat stats`,
//! `moat reload` and `moat forward`.

pub mod socket;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};

use thiserror::Error;

use crate::device::NetDevice;
use crate::policy::{Policy, PolicyError};
use crate::telemetry::Counters;

#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] PolicyError),
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
}

/// Process-wide state of the one VM this moat serves.
pub struct VmState {
    pub path: PathBuf,
    policy: RwLock<Arc<Policy>>,
    pub counters: Arc<Counters>,
    device: Mutex<Weak<Mutex<NetDevice>>>,
}

impl VmState {
    pub fn new(path: PathBuf, policy: Policy, counters: Arc<Counters>) -> VmState {
        VmState {
            path,
            policy: RwLock::new(Arc::new(policy)),
            counters,
            device: Mutex::new(Weak::new()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The device of the frontend connection now being served (reloads reach its flows).
    pub fn set_device(&self, device: &Arc<Mutex<NetDevice>>) {
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(device);
    }

    pub fn device(&self) -> Option<Arc<Mutex<NetDevice>>> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    /// Re-read the policy file. A bad file, or one that changes the VM's identity, changes
    /// nothing. A good one is swapped in: new flows follow it at once, and existing flows it
    /// no longer allows are reset.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(r) => {
                tracing::info!(generation = r.generation, flows_reset = r.flows_reset, file = %self.path.display(), "policy reloaded")
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
        let new = Policy::load(&self.path)?;
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
        let new = Arc::new(new);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&new);
        let flows_reset = match self.device() {
            Some(device) => device.lock().unwrap_or_else(|e| e.into_inner()).reload(new),
            None => 0,
        };
        self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        let generation = self
            .counters
            .policy_generation
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        Ok(Reloaded {
            generation,
            flows_reset,
        })
    }

    /// Counters and the flow table, as a table or as JSON.
    pub fn stats(&self, json: bool) -> String {
        let flows = self
            .device()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).flow_table())
            .unwrap_or_default();
        if json {
            let counters: serde_json::Map<String, serde_json::Value> = self
                .counters
                .rows()
                .into_iter()
                .map(|(g, n, v)| (format!("{g}.{n}"), v.into()))
                .collect();
            let flows: Vec<serde_json::Value> = flows
                .iter()
                .map(|f| serde_json::json!({"flow": f.flow, "target": f.target, "state": f.state, "bytes_up": f.bytes_up, "bytes_down": f.bytes_down}))
                .collect();
            let policy = self.policy();
            serde_json::json!({
                "vm": policy.vm.name,
                "policy_generation": self.counters.policy_generation.load(Ordering::Relaxed),
                "counters": counters,
                "flows": flows,
            })
            .to_string()
                + "\n"
        } else {
            let mut out = self.counters.table();
            out.push_str(&format!(
                "\n{:<34} {:<28} {:<10} {:>12} {:>12}\n",
                "flow", "target", "state", "bytes_up", "bytes_down"
            ));
            for f in &flows {
                out.push_str(&format!(
                    "{:<34} {:<28} {:<10} {:>12} {:>12}\n",
                    f.flow, f.target, f.state, f.bytes_up, f.bytes_down
                ));
            }
            out
        }
    }
}

/// One row of the flow table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRow {
    pub flow: String,
    pub target: String,
    pub state: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}
