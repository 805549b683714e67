//! When a connection last read or wrote a byte: the clock of the idle timeout. The socket
//! wrapper (`io`) moves it, the room of open connections (`room`) holds one per connection.
//!
//! What must hold: the time only moves forward, and only when told a byte moved.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a connection last read or wrote a byte.
#[derive(Debug)]
pub(super) struct Activity {
    opened: Instant,
    /// Milliseconds after `opened`.
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity { opened: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// A byte moved now.
    pub(super) fn touch(&self) {
        let ms = self.opened.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `limit`.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
