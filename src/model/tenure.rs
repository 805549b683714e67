//! Leadership's tenure: until when this process may start webhook attempts of what it
//! streamed.
//!
//! What must hold: a tenure is counted from when the check that proved the lock was sent,
//! never from when its answer arrived, and a revoked tenure is never valid again until a
//! new check renews it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long one successful check of the lock keeps this process's tenure valid.
pub const TENURE: Duration = Duration::from_millis(1000);

/// Until when this process may start webhook attempts of what it streamed: renewed by each
/// successful check of the lock, revoked when it is lost.
#[derive(Debug)]
pub struct Tenure {
    base: Instant,
    /// Milliseconds after `base`; `u64::MAX` while no leadership governs it (tests, benches).
    valid_until_ms: AtomicU64,
}

impl Default for Tenure {
    fn default() -> Self {
        Tenure { base: Instant::now(), valid_until_ms: AtomicU64::new(u64::MAX) }
    }
}

impl Tenure {
    /// Valid until `TENURE` after `checked_at`: when the check that proved the lock was
    /// sent, not when its answer was read (a process frozen in between must not come back
    /// with a fresh tenure).
    pub fn renew_from(&self, checked_at: Instant) {
        let until = (checked_at + TENURE).saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.store(until, Ordering::Release);
    }

    /// No longer valid.
    pub fn revoke(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
    }

    /// Whether an attempt may start now.
    pub fn is_valid(&self) -> bool {
        (self.base.elapsed().as_millis() as u64) < self.valid_until_ms.load(Ordering::Acquire)
    }
}
