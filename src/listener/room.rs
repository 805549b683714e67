//! The open connections of one listener, oldest first: the ones a full listener may close to
//! make room for a new connection.
//!
//! What must hold: a connection is closed to make room only while it is not handling a
//! request it has read completely (it sends nothing, waits for more of its request's
//! headers or body, or idles between keep-alive requests) and its task has looked at its
//! socket; the oldest such one goes first, so a connection whose request has been read is
//! never closed for a newcomer, and a newcomer outlives every older client that is merely
//! holding a place. The list holds weak references only and is pruned, so it stays bounded
//! by a small multiple of the listener's cap.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use tokio_util::sync::CancellationToken;

use super::io::Activity;
use super::phase::Phase;

/// One open connection, as the listener sees it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) activity: Activity,
    pub(super) phase: Phase,
    /// Cancelled to close the connection to make room.
    pub(super) evict: CancellationToken,
}

impl Conn {
    pub(super) fn new() -> Arc<Conn> {
        Arc::new(Conn { activity: Activity::new(), phase: Phase::new(), evict: CancellationToken::new() })
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

    /// Closes the oldest connection that may be closed to make room; `false` when there is
    /// none.
    pub(super) fn evict_oldest(&self) -> bool {
        let mut q = self.queue.lock().expect("connection list lock");
        q.retain(|w| w.upgrade().is_some_and(|c| !c.evict.is_cancelled()));
        let Some(i) = q.iter().position(|w| w.upgrade().is_some_and(|c| c.phase.evictable())) else {
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
        let conns: Vec<Arc<Conn>> = (0..5).map(|_| Conn::new()).collect();
        for c in &conns {
            room.push(c);
        }
        assert!(!room.evict_oldest(), "no task has looked at its socket yet");
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
        assert!(room.evict_oldest());
        assert_eq!(evicted(), [false, true, false, false, false], "the oldest not handling, though it sent bytes");
        assert!(room.evict_oldest() && room.evict_oldest() && room.evict_oldest());
        assert_eq!(evicted(), [false, true, true, true, true]);
        assert!(!room.evict_oldest(), "only a connection handling a read request is left");
        conns[0].phase.response_done();
        assert!(room.evict_oldest(), "once answered, it idles and may go");
    }

    #[test]
    fn closed_connections_are_pruned() {
        let room = Room::new(4);
        for _ in 0..100 {
            room.push(&Conn::new()); // dropped at once
        }
        assert!(room.queue.lock().unwrap().len() <= 16);
        assert!(!room.evict_oldest());
    }
}
