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
