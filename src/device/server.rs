//! One frontend connection after another: listen (or connect), serve until the frontend
//! goes away, reset, repeat. A fresh daemon and device per connection: vhost-user-backend's
//! worker threads end with their connection, and a reconnecting VMM expects a reset device.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{self, NetDevice, Tuning, VmState};
use crate::dns::NamePool;

/// How long `--client` waits between attempts to reach the VMM's socket.
const CLIENT_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot set up the vhost-user device: {0}")]
    Daemon(String),
    #[error("vhost-user connection on {path} failed: {reason}")]
    Connection { path: PathBuf, reason: String },
}

/// How to meet the frontend.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub socket: PathBuf,
    /// Connect to a socket the VMM listens on instead of listening.
    pub client: bool,
    /// Return after the first frontend disconnects.
    pub once: bool,
    /// Queue pairs and polling.
    pub tuning: Tuning,
}

/// Where the socket is bound, so a signal handler can remove it.
pub fn bind(socket: &Path) -> Result<Listener, ServeError> {
    Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: socket.to_path_buf(),
        source,
    })
}

/// Serve frontends until `--once` says stop (or forever).
pub fn serve(
    vm: Arc<VmState>,
    opts: &ServeOptions,
    mut listener: Option<Listener>,
) -> Result<(), ServeError> {
    // Synthetic DNS names outlive connections: a VMM that reconnects keeps the VM's names.
    let names = Arc::new(Mutex::new(NamePool::default()));
    loop {
        // Each connection starts from the policy in force (reloads included).
        let policy = vm.policy();
        let device = NetDevice::new(
            Arc::clone(&policy),
            Arc::clone(&names),
            Arc::clone(&vm.counters),
            opts.tuning,
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let device = Arc::new(device);
        device.set_runtime_forwards(vm.runtime_forwards());
        vm.set_device(&device);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(format!("moat-{}", policy.vm.name), Arc::clone(&device), mem)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        // One event loop per queue pair: each vring worker also watches its pair's proxy
        // sockets, timer and handed frames.
        device::attach(&device, daemon.get_epoll_handlers())
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let started = match listener.as_mut() {
            Some(listener) => {
                tracing::info!(socket = %opts.socket.display(), "waiting for a vhost-user frontend");
                daemon.start(listener)
            }
            None => connect(&mut daemon, &opts.socket),
        };
        if let Err(e) = started {
            return Err(ServeError::Connection {
                path: opts.socket.clone(),
                reason: e.to_string(),
            });
        }
        tracing::info!(vm = %policy.vm.name, queue_pairs = device.queue_pairs(), "frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(vm = %policy.vm.name, "frontend disconnected"),
            Err(e) => {
                tracing::warn!(vm = %policy.vm.name, error = %e, "frontend connection ended with an error")
            }
        }
        // Dropping the daemon stops its vring workers; the next connection gets a new device.
        device::detach(&device);
        drop(daemon);
        if opts.once {
            return Ok(());
        }
        tracing::info!("device reset; waiting for the next connection");
    }
}

fn connect(
    daemon: &mut VhostUserDaemon<Arc<NetDevice>>,
    socket: &Path,
) -> vhost_user_backend::Result<()> {
    let path = socket.to_string_lossy().into_owned();
    let mut logged = false;
    loop {
        match daemon.start_client(&path) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if !logged {
                    tracing::info!(socket = %path, error = %e, "waiting for the VMM's socket");
                    logged = true;
                }
                std::thread::sleep(CLIENT_RETRY);
            }
        }
    }
}
