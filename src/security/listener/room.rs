//! The open connections of one listener, oldest first: the ones a full listener may close to
//! make room for a new connection.
//!
//! What must hold: a connection is closed to make room only while it is not handling a
//! request it has read completely (it sends nothing, waits for more of its request's
//! headers or body, or idles between keep-alive requests), its task has looked at its
//! socket, no byte waits unread in its socket (a request that arrived but is not read yet),
//! and, if it never sent a byte, it has been open for the grace given (its first request may
//! be on its way); or, whatever its phase, while the client has not taken its answer for
//! [`WRITE_BLOCK_GRACE`] (a write blocked on a full socket: a client that never reads holds
//! a place as surely as one that never sends). The oldest such one goes first, so a
//! connection whose request has been read and whose answer flows is never closed for a
//! newcomer, and a newcomer outlives every older client that is merely holding a place. The list holds weak references only and is pruned, so it stays bounded
//! by a small multiple of the listener's cap.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use super::phase::Phase;

/// A connection whose answer has not been taken for this long may be closed to make room.
pub(super) const WRITE_BLOCK_GRACE: Duration = Duration::from_millis(250);

/// One open connection, as the listener sees it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) activity: Activity,
    pub(super) phase: Phase,
    /// Cancelled to close the connection to make room.
    pub(super) evict: CancellationToken,
    /// Its socket, to look for bytes not read yet (-1: none).
    fd: RawFd,
}

impl Conn {
    pub(super) fn new(fd: RawFd) -> Arc<Conn> {
        Arc::new(Conn { activity: Activity::new(), phase: Phase::new(), evict: CancellationToken::new(), fd })
    }

    fn evictable(&self, grace: Duration) -> bool {
        if self.phase.write_blocked_for().is_some_and(|blocked| blocked >= WRITE_BLOCK_GRACE) {
            return true;
        }
        self.phase.evictable() && (self.phase.heard() || self.phase.age() >= grace) && !self.unread_bytes()
    }

    /// Whether bytes wait in the socket that its task has not read yet. (The socket may have
    /// closed, its number even reused, while we look: the answer is then wrong for one
    /// look, which at worst skips a connection or closes one already ending.)
    fn unread_bytes(&self) -> bool {
        if self.fd < 0 {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: recv writes at most one byte into `byte`; MSG_PEEK consumes nothing and
        // MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(self.fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        n > 0
    }
}

/// The open connections, in accept order.
#[derive(Debug)]
pub(super) struct Room {
    queue: Mutex<VecDeque<Weak<Conn>>>,
    /// Prune once the queue is this long.
    prune_at: usize,
}

impl Room {
    pub(super) fn new(cap: usize) -> Self {
        Room { queue: Mutex::new(VecDeque::new()), prune_at: cap.saturating_mul(2).max(16) }
    }

    /// Registers a newly accepted connection.
    pub(super) fn push(&self, conn: &Arc<Conn>) {
        let mut q = self.queue.lock().expect("connection list lock");
        if q.len() >= self.prune_at {
            q.retain(|w| w.upgrade().is_some_and(|c| !c.evict.is_cancelled()));
        }
        q.push_back(Arc::downgrade(conn));
    }

    /// Closes the oldest connection that may be closed to make room (one that never sent a
    /// byte only once open for `grace`); `false` when there is none.
    pub(super) fn evict_oldest(&self, grace: Duration) -> bool {
        let mut q = self.queue.lock().expect("connection list lock");
        q.retain(|w| w.upgrade().is_some_and(|c| !c.evict.is_cancelled()));
        let Some(i) = q.iter().position(|w| w.upgrade().is_some_and(|c| c.evictable(grace))) else {
            return false;
        };
        if let Some(c) = q.remove(i).and_then(|w| w.upgrade()) {
            c.evict.cancel();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_connection_not_handling_a_read_request_is_evicted_and_no_other() {
        let room = Room::new(4);
        let conns: Vec<Arc<Conn>> = (0..5).map(|_| Conn::new(-1)).collect();
        for c in &conns {
            room.push(c);
        }
        assert!(!room.evict_oldest(Duration::ZERO), "no task has looked at its socket yet");
        for c in &conns {
            c.phase.nothing_to_read();
        }
        // 0 handles a request it has read; 1 has sent part of one; 2 idles after a response.
        conns[0].phase.bytes_read();
        conns[0].phase.request_read();
        conns[1].phase.bytes_read();
        conns[2].phase.bytes_read();
        conns[2].phase.request_read();
        conns[2].phase.response_done();
        let evicted = || conns.iter().map(|c| c.evict.is_cancelled()).collect::<Vec<bool>>();
        assert!(room.evict_oldest(Duration::ZERO));
        assert_eq!(evicted(), [false, true, false, false, false], "the oldest not handling, though it sent bytes");
        assert!(
            room.evict_oldest(Duration::ZERO) && room.evict_oldest(Duration::ZERO) && room.evict_oldest(Duration::ZERO)
        );
        assert_eq!(evicted(), [false, true, true, true, true]);
        assert!(!room.evict_oldest(Duration::ZERO), "only a connection handling a read request is left");
        conns[0].phase.response_done();
        assert!(room.evict_oldest(Duration::ZERO), "once answered, it idles and may go");
    }

    #[test]
    fn a_connection_with_bytes_waiting_unread_or_silent_within_its_grace_is_kept() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let (mut ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let room = Room::new(4);
        let silent = Conn::new(-1);
        let waiting = Conn::new(ours.as_raw_fd());
        room.push(&silent);
        room.push(&waiting);
        for c in [&silent, &waiting] {
            c.phase.nothing_to_read();
        }
        waiting.phase.bytes_read(); // it sent something before
        theirs.write_all(b"GET /").unwrap(); // and its next request waits unread
        assert!(!room.evict_oldest(Duration::from_secs(3600)), "silent within its grace; the other has bytes waiting");
        ours.read_exact(&mut [0u8; 5]).unwrap();
        assert!(room.evict_oldest(Duration::from_secs(3600)));
        assert!(waiting.evict.is_cancelled() && !silent.evict.is_cancelled());
    }

    #[test]
    fn a_connection_whose_answer_is_not_taken_may_go_whatever_it_handles() {
        let room = Room::new(4);
        let stuck = Conn::new(-1);
        room.push(&stuck);
        stuck.phase.nothing_to_read();
        stuck.phase.bytes_read();
        stuck.phase.request_read(); // answering a request it read: protected...
        assert!(!room.evict_oldest(Duration::ZERO));
        stuck.phase.write_blocked(); // ...unless the client does not take the answer
        assert!(!room.evict_oldest(Duration::ZERO), "not before the grace");
        std::thread::sleep(WRITE_BLOCK_GRACE);
        assert!(room.evict_oldest(Duration::ZERO));
        assert!(stuck.evict.is_cancelled());
    }

    #[test]
    fn closed_connections_are_pruned() {
        let room = Room::new(4);
        for _ in 0..100 {
            room.push(&Conn::new(-1)); // dropped at once
        }
        assert!(room.queue.lock().unwrap().len() <= 16);
        assert!(!room.evict_oldest(Duration::ZERO));
    }
}
