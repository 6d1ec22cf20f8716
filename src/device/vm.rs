//! The one VM this moat serves, process-wide: the policy in force, the counters, the
//! run-time forwards and the device of the current frontend connection. The server hands
//! each new device the policy and forwards in force; the control plane (`crate::control`)
//! reloads, adds forwards and reads stats through it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::NetDevice;
use crate::policy::{Forward, Policy};
use crate::telemetry::Counters;

/// Process-wide state of the one VM this moat serves.
pub struct VmState {
    pub path: PathBuf,
    pub(crate) policy: RwLock<Arc<Policy>>,
    pub counters: Arc<Counters>,
    device: Mutex<Weak<NetDevice>>,
    pub(crate) forwards: Mutex<Vec<Forward>>,
    /// TCP ports the sandbox still lets moat connect to (None: no sandbox).
    pub(crate) connect_ports: Mutex<Option<Vec<u16>>>,
    /// One reload at a time (SIGHUP and `moat reload` may come together).
    pub(crate) reloading: Mutex<()>,
}

impl VmState {
    pub fn new(path: PathBuf, policy: Policy, counters: Arc<Counters>) -> VmState {
        VmState {
            path,
            policy: RwLock::new(Arc::new(policy)),
            counters,
            device: Mutex::new(Weak::new()),
            forwards: Mutex::new(Vec::new()),
            connect_ports: Mutex::new(None),
            reloading: Mutex::new(()),
        }
    }

    /// The sandbox now allows TCP connects only to these ports: reloads that need others
    /// are refused rather than left to fail flow by flow.
    pub fn pin_connect_ports(&self, ports: Vec<u16>) {
        *self.connect_ports.lock().unwrap_or_else(|e| e.into_inner()) = Some(ports);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The device of the frontend connection now being served (reloads reach its flows).
    pub fn set_device(&self, device: &Arc<NetDevice>) {
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(device);
    }

    pub fn device(&self) -> Option<Arc<NetDevice>> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    /// Forwards added at run time (`moat forward add`).
    pub fn runtime_forwards(&self) -> Vec<Forward> {
        self.forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
