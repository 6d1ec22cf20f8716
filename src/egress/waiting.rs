//! Guest connections moat accepted (handshake done) and reads before it can admit them: an
//! IP literal that only a name rule can allow waits for its SNI or Host ([`super::sniff`]),
//! a client of the explicit-proxy port for its request head ([`super::explicit`]). What
//! their first bytes decide goes through the gate like any other flow.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::State;

use super::explicit::{self, Front};
use super::key::FlowKey;
use super::shared::{Shared, SocketOwner};
use super::sniff;
use super::steering::{SteerKey, Steering};
use crate::firewall::gate::{self, Admitted, NameSource, Requested};
use crate::policy::Protocol;
use crate::stack::SocketHandle;
use crate::telemetry::DropReason;

/// How long a flow to an IP literal may take to show its name, and an explicit-proxy client
/// its request head.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused explicit-proxy client gets to read its HTTP error before a reset.
const ANSWER_LINGER: Duration = Duration::from_secs(5);

/// A guest connection moat accepted (handshake done) and reads before it can be admitted.
#[derive(Clone, Copy, Debug)]
pub(super) struct Waiting {
    pub handle: SocketHandle,
    since: Instant,
    kind: WaitKind,
    /// Bytes already looked at: the first bytes are parsed again only when they grew.
    seen: usize,
}

/// What a waiting connection's first bytes decided: admitted (with the explicit-proxy
/// front's work, if it came from there), or refused with the HTTP status an explicit-proxy
/// client gets (0: a reset).
pub(super) type FirstBytes = Result<(Admitted, Option<Front>), (DropReason, u16)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WaitKind {
    /// An IP literal that only a name rule can allow: its SNI or Host decides.
    Sniff,
    /// A client of the explicit-proxy port: its request head decides.
    Front,
    /// A refused explicit-proxy client reading its HTTP error; closed, then forgotten.
    Answered,
}

/// The waiting connections of one flow table, by key.
#[derive(Debug, Default)]
pub(super) struct WaitingConns {
    waiting: HashMap<FlowKey, Waiting>,
}

impl WaitingConns {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.waiting.contains_key(key)
    }

    /// Accept a guest connection whose first bytes decide where (if anywhere) it goes.
    pub fn wait(
        &mut self,
        sh: &mut Shared,
        key: FlowKey,
        kind: WaitKind,
    ) -> Result<(), DropReason> {
        let handle = sh
            .stack
            .listen(key.dst, key.dst_port, key.guest_port, false)
            .ok_or(DropReason::TcpNoFlow)?;
        self.waiting.insert(
            key,
            Waiting {
                handle,
                since: Instant::now(),
                kind,
                seen: 0,
            },
        );
        sh.by_socket.insert(handle, SocketOwner::Waiting(key));
        sh.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// What `key`'s first bytes decide now, if anything (a refused client done reading its
    /// answer is forgotten here).
    pub fn decide(&mut self, sh: &mut Shared, key: FlowKey) -> Option<(Waiting, FirstBytes)> {
        let w = self.waiting.get(&key).copied()?;
        let socket = sh.stack.socket(w.handle);
        let state = socket.state();
        if w.kind == WaitKind::Answered {
            let over = matches!(state, State::Closed | State::TimeWait)
                || w.since.elapsed() > ANSWER_LINGER;
            if over {
                self.forget(sh, key, w.handle);
            }
            return None;
        }
        let decided = match state {
            State::Listen | State::Closed => Err((DropReason::NotAllowed, 0)),
            _ if w.since.elapsed() > SNIFF_TIMEOUT => Err((DropReason::NotAllowed, 0)),
            // A client may send its request and half-close at once (`printf | nc`): its
            // bytes are read in CloseWait too, and there they are all it will send.
            State::Established | State::CloseWait => {
                let finished = state == State::CloseWait;
                let queued = socket.recv_queue();
                if queued <= w.seen && !finished {
                    return None;
                }
                if let Some(w) = self.waiting.get_mut(&key) {
                    w.seen = queued;
                }
                let first = match sh.stack.socket(w.handle).peek(explicit::MAX_HEAD) {
                    Ok(first) => first.to_vec(),
                    Err(_) => Vec::new(),
                };
                match judge_first_bytes(sh, &key, w.kind, &first) {
                    None if finished => Err(match w.kind {
                        WaitKind::Front => (DropReason::ExplicitProxyMalformed, 400),
                        _ => (DropReason::NotAllowed, 0),
                    }),
                    None => return None,
                    Some(decided) => decided,
                }
            }
            _ => return None,
        };
        Some((w, decided))
    }

    /// `key` was admitted: it is a flow now, no longer waiting (its socket goes on).
    pub fn admitted(&mut self, sh: &mut Shared, key: FlowKey, handle: SocketHandle) {
        self.waiting.remove(&key);
        sh.by_socket.remove(&handle);
        sh.steering.release(SteerKey::Tcp(key));
    }

    /// `key` was refused: an explicit-proxy client (`status` not 0) gets an HTTP answer
    /// saying why, then its connection closes; anything else is reset.
    pub fn refuse(
        &mut self,
        sh: &mut Shared,
        key: FlowKey,
        w: Waiting,
        reason: DropReason,
        status: u16,
    ) {
        if status != 0 {
            let socket = sh.stack.socket(w.handle);
            let _ = socket.send_slice(&explicit::error_response(status, reason.as_str()));
            socket.close();
            self.waiting.insert(
                key,
                Waiting {
                    kind: WaitKind::Answered,
                    since: Instant::now(),
                    ..w
                },
            );
            sh.by_socket.insert(w.handle, SocketOwner::Waiting(key));
            sh.steering.claim(SteerKey::Tcp(key));
        } else {
            sh.stack.socket(w.handle).abort();
            self.forget(sh, key, w.handle);
        }
    }

    fn forget(&mut self, sh: &mut Shared, key: FlowKey, handle: SocketHandle) {
        self.waiting.remove(&key);
        sh.steering.release(SteerKey::Tcp(key));
        sh.drop_socket(handle);
    }

    /// Explicit-proxy clients still sending their request are gone with the port, if the
    /// policy in force closed it. Returns how many were reset.
    pub fn reload(&mut self, sh: &mut Shared) -> usize {
        let explicit_port = sh.policy.proxy.explicit_port;
        let gone: Vec<(FlowKey, SocketHandle)> = self
            .waiting
            .iter()
            .filter(|(key, w)| w.kind == WaitKind::Front && explicit_port != Some(key.dst_port))
            .map(|(key, w)| (*key, w.handle))
            .collect();
        for &(key, handle) in &gone {
            sh.stack.socket(handle).abort();
            self.forget(sh, key, handle);
        }
        gone.len()
    }

    /// The connections whose wait is over (sniffing timeout, answer read or not).
    pub fn due(&self, now: Instant) -> impl Iterator<Item = FlowKey> + '_ {
        self.waiting
            .iter()
            .filter(move |(_, w)| {
                let limit = match w.kind {
                    WaitKind::Answered => ANSWER_LINGER,
                    WaitKind::Sniff | WaitKind::Front => SNIFF_TIMEOUT,
                };
                now.duration_since(w.since) > limit
            })
            .map(|(k, _)| *k)
    }

    /// The event loop is gone: forget every waiting connection.
    pub fn detach(&mut self, steering: &Steering) {
        for key in self.waiting.keys() {
            steering.release(SteerKey::Tcp(*key));
        }
        self.waiting.clear();
    }
}

/// What a waiting connection's first bytes decide: `None` to wait for more; an error
/// carries the HTTP status an explicit-proxy client gets (0: a reset).
fn judge_first_bytes(
    sh: &Shared,
    key: &FlowKey,
    kind: WaitKind,
    first: &[u8],
) -> Option<FirstBytes> {
    let policy = &sh.policy;
    match kind {
        WaitKind::Sniff => match sniff::sniff(first) {
            sniff::Sniffed::NeedMore => None,
            sniff::Sniffed::NoName => Some(Err((DropReason::NotAllowed, 0))),
            sniff::Sniffed::Name(text, source) => {
                let requested = Requested::Text { text, source };
                Some(
                    gate::admit(policy, Protocol::Tcp, requested, key.dst_port)
                        .map(|a| (a, None))
                        .map_err(|r| (r, 0)),
                )
            }
        },
        WaitKind::Front => match explicit::read_head(first) {
            explicit::Head::NeedMore => None,
            explicit::Head::Malformed(why) => {
                tracing::debug!(flow = %key, why, "explicit proxy: bad request");
                Some(Err((DropReason::ExplicitProxyMalformed, 400)))
            }
            explicit::Head::Request { host, port, front } => {
                let requested = Requested::Text {
                    text: host,
                    source: NameSource::ExplicitProxy,
                };
                Some(
                    gate::admit(policy, Protocol::Tcp, requested, port)
                        .map(|a| (a, Some(front)))
                        .map_err(|r| (r, 403)),
                )
            }
        },
        WaitKind::Answered => None,
    }
}
