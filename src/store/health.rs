//! Whether the store writer makes progress, for `/readyz`, a gauge and the log.
//!
//! What must hold: a stall (no successful write for `database.write_stall_after` while ops
//! wait) is logged at ERROR once with its cause, sets `walhook_store_stalled` to 1 and makes
//! `/readyz` answer 503 with the cause; the first successful write after it clears all three.

use std::sync::Mutex;

use prometheus::IntGauge;

/// The store writer's health, shared with the operations listener.
#[derive(Debug, Default)]
pub struct StoreHealth {
    stalled: Mutex<Option<String>>,
    gauge: Mutex<Option<IntGauge>>,
}

impl StoreHealth {
    /// A healthy store whose stalls are also shown by `gauge`.
    pub fn new(gauge: IntGauge) -> Self {
        StoreHealth { stalled: Mutex::new(None), gauge: Mutex::new(Some(gauge)) }
    }

    /// Why the store cannot make progress, while it cannot.
    pub fn problem(&self) -> Option<String> {
        self.stalled.lock().expect("lock").clone()
    }

    /// Whether a stall is being reported.
    pub(super) fn is_stalled(&self) -> bool {
        self.stalled.lock().expect("lock").is_some()
    }

    /// The writer has not committed for too long; `why` says what it waits on.
    pub(super) fn stall(&self, why: String) {
        let mut stalled = self.stalled.lock().expect("lock");
        if stalled.is_none() {
            tracing::error!(cause = %why, "the store writer cannot make progress: deliveries are not recorded and the slot does not move");
            self.set_gauge(1);
            *stalled = Some(why);
        }
    }

    /// A write committed (or the database answered with a refusal the writer handles).
    pub(super) fn progress(&self) {
        let mut stalled = self.stalled.lock().expect("lock");
        if stalled.take().is_some() {
            tracing::info!("the store writer makes progress again");
            self.set_gauge(0);
        }
    }

    fn set_gauge(&self, v: i64) {
        if let Some(g) = self.gauge.lock().expect("lock").as_ref() {
            g.set(v);
        }
    }
}
