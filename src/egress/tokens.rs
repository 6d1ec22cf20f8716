//! Event tokens: which flow a host socket's readiness belongs to.
//!
//! The event loop reports a ready socket by the token it was registered under. A token is
//! handed out only with its registration ([`Tokens::register`]) and given back only by
//! dropping the [`Registration`], which also takes the socket out of the loop: whatever path
//! a flow ends by (finished, refused half-way through its set-up, reset by a reload, the
//! whole table dropped), its tokens cannot leak.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use slab::Slab;

use super::key::FlowKey;
use crate::telemetry::DropReason;

/// Event ids reach the backend as u16, so that is the last token.
const LAST_TOKEN: u64 = u16::MAX as u64;

/// How the flow table asks the event loop to watch proxy sockets.
pub trait Registrar: Send + Sync {
    fn register(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
    fn unregister(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
}

/// What an event token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A TCP flow's proxy (or forwarded peer) connection.
    Flow(FlowKey),
    /// The `[[forward]]` listener of this index.
    Listener(usize),
    /// A UDP association's control connection or relay socket.
    Udp(FlowKey),
    /// The upstream resolver's socket (read on every pump).
    Upstream,
}

/// The tokens of one flow table: shared with its registrations, which give theirs back.
#[derive(Clone)]
pub struct Tokens(Arc<Mutex<Table>>);

struct Table {
    registrar: Option<Box<dyn Registrar>>,
    /// Owner of token `first + slot`.
    owners: Slab<Owner>,
    /// Tokens below this belong to the event loop (queues, its own events, timer).
    first: u64,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens(Arc::new(Mutex::new(Table {
            registrar: None,
            owners: Slab::new(),
            // Nothing is handed out before `place`.
            first: u64::MAX,
        })))
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("held", &self.held())
            .finish()
    }
}

impl Tokens {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Only this flow table's thread uses it; a panic mid-update leaves a usable table.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first token this table may hand out (those below belong to its event loop).
    pub fn place(&self, first: u64) {
        self.table().first = first;
    }

    /// Register sockets with this event loop from now on.
    pub fn attach(&self, registrar: Box<dyn Registrar>) {
        self.table().registrar = Some(registrar);
    }

    /// Forget the event loop (its connection ended): registrations dropped from now on only
    /// give their token back (their sockets close with them). Call [`Tokens::reset`] once
    /// they are all dropped.
    pub fn detach(&self) {
        self.table().registrar = None;
    }

    /// Start again from the first token (after [`Tokens::detach`] and every flow dropped).
    pub fn reset(&self) {
        self.table().owners.clear();
    }

    /// Whether an event loop watches this table's sockets.
    pub fn is_attached(&self) -> bool {
        self.table().registrar.is_some()
    }

    /// Tokens handed out: one registered socket each.
    pub fn held(&self) -> usize {
        self.table().owners.len()
    }

    /// Who `token` belongs to.
    pub fn owner(&self, token: u64) -> Option<Owner> {
        let table = self.table();
        let slot = usize::try_from(token.checked_sub(table.first)?).ok()?;
        table.owners.get(slot).copied()
    }

    /// Watch `fd` for `owner` under a new token. Err: no token left (`FlowLimit`), or the
    /// loop refused the socket or is gone (`ProxyUnreachable`); then nothing is held.
    pub fn register(&self, fd: RawFd, owner: Owner) -> Result<Registration, DropReason> {
        let mut table = self.table();
        let slot = table.owners.vacant_key();
        let token = table
            .first
            .checked_add(slot as u64)
            .filter(|t| *t <= LAST_TOKEN)
            .ok_or(DropReason::FlowLimit)?;
        let registered = table
            .registrar
            .as_ref()
            .is_some_and(|r| r.register(fd, token).is_ok());
        if !registered {
            return Err(DropReason::ProxyUnreachable);
        }
        table.owners.insert(owner);
        Ok(Registration {
            tokens: self.clone(),
            slot,
            token,
            fd,
            closes_with_socket: false,
        })
    }
}

/// A socket watched by the event loop under its token, until this is dropped. Declare it
/// before the socket it watches, so that it leaves the loop before the socket closes.
pub struct Registration {
    tokens: Tokens,
    slot: usize,
    token: u64,
    fd: RawFd,
    /// The socket closes right after this is dropped, which takes it out of the epoll set
    /// by itself: no EPOLL_CTL_DEL ([`Registration::closes_with_socket`]).
    closes_with_socket: bool,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("token", &self.token)
            .field("fd", &self.fd)
            .finish()
    }
}

impl Registration {
    pub fn token(&self) -> u64 {
        self.token
    }

    /// For an owner that holds the socket's only descriptor and closes it right after
    /// dropping this (a flow's proxy socket, declared after its registration): closing the
    /// last descriptor of a file takes it out of every epoll set, so dropping this only
    /// gives the token back. One system call less for every connection.
    pub fn closes_with_socket(mut self) -> Registration {
        self.closes_with_socket = true;
        self
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut table = self.tokens.table();
        if let Some(r) = table
            .registrar
            .as_ref()
            .filter(|_| !self.closes_with_socket)
        {
            let _ = r.unregister(self.fd, self.token);
        }
        table.owners.try_remove(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts registrations; refuses the fd 666.
    #[derive(Clone, Default)]
    struct Loop(Arc<AtomicUsize>);

    impl Registrar for Loop {
        fn register(&self, fd: RawFd, _: u64) -> std::io::Result<()> {
            if fd == 666 {
                return Err(std::io::Error::other("refused"));
            }
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn unregister(&self, _: RawFd, _: u64) -> std::io::Result<()> {
            self.0.fetch_sub(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn a_token_is_held_exactly_while_its_registration_lives() {
        let tokens = Tokens::default();
        tokens.place(10);
        let watched = Loop::default();
        assert_eq!(
            tokens.register(3, Owner::Upstream).err(),
            Some(DropReason::ProxyUnreachable),
            "no loop: nothing registered"
        );
        tokens.attach(Box::new(watched.clone()));
        let a = tokens.register(3, Owner::Listener(0)).expect("registered");
        assert_eq!(a.token(), 10);
        assert_eq!(tokens.owner(10), Some(Owner::Listener(0)));
        assert!(tokens.register(666, Owner::Upstream).is_err());
        assert_eq!(tokens.held(), 1, "a refused registration holds nothing");
        let b = tokens.register(4, Owner::Upstream).expect("registered");
        assert_eq!(b.token(), 11);
        drop(a);
        assert_eq!(tokens.owner(10), None);
        assert_eq!(watched.0.load(Ordering::Relaxed), 1, "unregistered on drop");
        let c = tokens.register(5, Owner::Upstream).expect("registered");
        assert_eq!(c.token(), 10, "a freed token is used again");
        tokens.detach();
        drop((b, c));
        assert_eq!(tokens.held(), 0);
        assert_eq!(
            watched.0.load(Ordering::Relaxed),
            2,
            "a gone loop is not called"
        );
    }

    #[test]
    fn a_registration_that_closes_with_its_socket_only_gives_its_token_back() {
        let tokens = Tokens::default();
        tokens.place(10);
        let watched = Loop::default();
        tokens.attach(Box::new(watched.clone()));
        let a = tokens
            .register(3, Owner::Upstream)
            .expect("registered")
            .closes_with_socket();
        assert_eq!(watched.0.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(tokens.held(), 0, "the token is back");
        assert_eq!(
            watched.0.load(Ordering::Relaxed),
            1,
            "no unregister call: the socket's close takes it out of the loop"
        );
    }

    #[test]
    fn tokens_end_at_u16_max() {
        let tokens = Tokens::default();
        tokens.place(LAST_TOKEN);
        tokens.attach(Box::new(Loop::default()));
        let last = tokens.register(3, Owner::Upstream).expect("the last token");
        assert_eq!(last.token(), LAST_TOKEN);
        assert_eq!(
            tokens.register(4, Owner::Upstream).err(),
            Some(DropReason::FlowLimit)
        );
    }
}
