//! The migration's access to the replication session: the link the replication driver
//! holds right now (the memory stream runs on it, in the same session as the disk), and
//! the migration messages that arrived on its Control class.
//!
//! The replication driver owns the session: it attaches each new link here, detaches it
//! when the session is lost, and hands over every Control payload that
//! [`super::wire::is_migration`] recognises. The migration side (source orchestration or
//! destination target) sends and waits through the port and never holds a link of its
//! own, so a session that resumes or is redialled is picked up without the migration
//! knowing how.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strait_net::session::tcp::{Link, LinkError};
use strait_net::{error_chain, StreamClass};
use thiserror::Error;

use super::wire::{MigrationMessage, MigrationWireError};

/// Migration messages waiting to be taken, at most. A conversation has at most two or
/// three messages in flight each way (an offer and an abort, a commit asked again per
/// session); 64 is far above any honest peer, and a peer that floods the Control class
/// with them fails its session instead of growing a queue.
pub const INBOX_MAX: usize = 64;

/// How long a migration message waits for room on the Control class: the class carries
/// only small replies, so room comes within an RTT unless the session is down, and a
/// session down past its resume window fails the send by itself.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong handing a message to the peer or taking one from it.
#[derive(Debug, Error)]
pub enum PortError {
    #[error("no replication session with the peer")]
    NoSession,
    #[error("sending to the peer failed: {0}")]
    Send(String),
    #[error(transparent)]
    Wire(#[from] MigrationWireError),
    #[error("the peer sent more than {INBOX_MAX} migration messages that nobody took")]
    InboxFull,
}

#[derive(Default)]
struct Inner {
    link: Option<Arc<Link>>,
    /// Counts the links attached so far: a new session is a new number.
    session: u64,
    inbox: VecDeque<MigrationMessage>,
}

/// Shared between the replication driver (which attaches links and delivers) and the
/// migration (which sends and receives).
#[derive(Default)]
pub struct Port {
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl Port {
    pub fn new() -> Arc<Port> {
        Arc::new(Port::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The driver has a new session with the peer.
    pub fn attach(&self, link: Arc<Link>) {
        let mut g = self.lock();
        g.link = Some(link);
        g.session += 1;
        drop(g);
        self.cond.notify_all();
    }

    /// The driver's session is gone.
    pub fn detach(&self) {
        self.lock().link = None;
        self.cond.notify_all();
    }

    /// The current session's link and its number, if there is one.
    pub fn link(&self) -> Option<(u64, Arc<Link>)> {
        let g = self.lock();
        g.link.clone().map(|l| (g.session, l))
    }

    /// The number of the last session attached (0: none yet), whether or not it is up.
    pub fn session(&self) -> u64 {
        self.lock().session
    }

    /// A Control payload the driver recognised as a migration message.
    pub fn deliver(&self, bytes: &[u8]) -> Result<(), PortError> {
        let message = MigrationMessage::decode(bytes)?;
        let mut g = self.lock();
        if g.inbox.len() >= INBOX_MAX {
            return Err(PortError::InboxFull);
        }
        g.inbox.push_back(message);
        drop(g);
        self.cond.notify_all();
        Ok(())
    }

    /// Sends `message` on the current session's Control class.
    pub fn send(&self, message: &MigrationMessage) -> Result<(), PortError> {
        let Some((_, link)) = self.link() else {
            return Err(PortError::NoSession);
        };
        link.send(StreamClass::Control, message.encode(), SEND_TIMEOUT)
            .map(|_| ())
            .map_err(|e: LinkError| PortError::Send(error_chain(&e)))
    }

    /// The oldest message that arrived, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<MigrationMessage> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if let Some(m) = g.inbox.pop_front() {
                return Some(m);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Waits up to `timeout` for a session other than `not`, or for any message.
    pub fn wait_change(&self, not: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while (g.session == not || g.link.is_none()) && g.inbox.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_recv_and_the_inbox_bound() {
        let port = Port::new();
        assert!(port.recv(Duration::ZERO).is_none());
        for id in 0..INBOX_MAX as u64 {
            port.deliver(&MigrationMessage::Commit { id }.encode())
                .expect("room");
        }
        assert!(matches!(
            port.deliver(&MigrationMessage::Commit { id: 99 }.encode()),
            Err(PortError::InboxFull)
        ));
        assert!(matches!(
            port.deliver(&[54, 1]),
            Err(PortError::Wire(MigrationWireError::Short { len: 2 }))
        ));
        assert_eq!(
            port.recv(Duration::ZERO),
            Some(MigrationMessage::Commit { id: 0 })
        );
        assert!(matches!(
            port.send(&MigrationMessage::Ready { id: 1 }),
            Err(PortError::NoSession)
        ));
        assert_eq!(port.session(), 0);
    }

    #[test]
    fn a_waiting_receiver_is_woken_by_a_delivery() {
        let port = Port::new();
        let p = port.clone();
        let t = std::thread::spawn(move || p.recv(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        port.deliver(&MigrationMessage::Ready { id: 3 }.encode())
            .expect("room");
        assert_eq!(
            t.join().expect("thread"),
            Some(MigrationMessage::Ready { id: 3 })
        );
    }
}
