//! Connections that have not sent a byte yet, oldest first: the ones a full listener closes
//! to make room for a new connection.
//!
//! What must hold: only a connection that has sent nothing, and has been open for a moment,
//! is ever closed to make room, the oldest such one first; the list holds weak references only and is pruned, so it stays
//! bounded by a small multiple of the listener's cap.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::io::Activity;

/// One open connection, as the listener sees it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) activity: Activity,
    /// Cancelled to close the connection to make room.
    pub(super) evict: CancellationToken,
}

/// The connections that may still be silent, in accept order.
#[derive(Debug)]
pub(super) struct Silent {
    queue: Mutex<VecDeque<Weak<Conn>>>,
    /// Prune once the queue is this long.
    prune_at: usize,
}

impl Silent {
    pub(super) fn new(cap: usize) -> Self {
        Silent { queue: Mutex::new(VecDeque::new()), prune_at: cap.saturating_mul(2).max(16) }
    }

    /// Registers a newly accepted connection.
    pub(super) fn push(&self, conn: &Arc<Conn>) {
        let mut q = self.queue.lock().expect("silent list lock");
        if q.len() >= self.prune_at {
            q.retain(|w| w.upgrade().is_some_and(|c| !c.activity.heard()));
        }
        q.push_back(Arc::downgrade(conn));
    }

    /// Closes the oldest connection that has sent nothing for at least `min_age` (younger
    /// ones may have a request waiting that their task has not read yet); `false` when there
    /// is none.
    pub(super) fn evict_oldest(&self, min_age: Duration) -> bool {
        let mut q = self.queue.lock().expect("silent list lock");
        while let Some(w) = q.front() {
            let Some(c) = w.upgrade().filter(|c| !c.activity.heard() && !c.evict.is_cancelled()) else {
                q.pop_front();
                continue;
            };
            if c.activity.age() < min_age {
                return false; // the rest are younger still
            }
            q.pop_front();
            c.evict.cancel();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Arc<Conn> {
        Arc::new(Conn { activity: Activity::new(), evict: CancellationToken::new() })
    }

    #[test]
    fn the_oldest_silent_connection_old_enough_is_evicted_and_no_other() {
        let silent = Silent::new(4);
        let conns: Vec<Arc<Conn>> = (0..4).map(|_| conn()).collect();
        for c in &conns {
            silent.push(c);
        }
        conns[0].activity.hear();
        assert!(!silent.evict_oldest(Duration::from_secs(3600)), "none is an hour old");
        assert!(silent.evict_oldest(Duration::ZERO));
        let evicted: Vec<bool> = conns.iter().map(|c| c.evict.is_cancelled()).collect();
        assert_eq!(evicted, [false, true, false, false], "the oldest silent one, not the one heard from");
        assert!(silent.evict_oldest(Duration::ZERO) && silent.evict_oldest(Duration::ZERO));
        assert!(!silent.evict_oldest(Duration::ZERO), "only connections that sent something are left");
        assert!(!conns[0].evict.is_cancelled());
    }

    #[test]
    fn closed_connections_are_pruned() {
        let silent = Silent::new(4);
        for _ in 0..100 {
            silent.push(&conn()); // dropped at once
        }
        assert!(silent.queue.lock().unwrap().len() <= 16);
        assert!(!silent.evict_oldest(Duration::ZERO));
    }
}
