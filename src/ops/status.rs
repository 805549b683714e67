//! The status stages publish and `/readyz` reads: replication's (streaming, standing by, last
//! error), the slot's (lost, failing prerequisites) and the store writer's (stalled).
//!
//! What must hold: a replica is ready only while it streams or stands by, its slot is not
//! lost, its prerequisites hold and its store writer makes progress; every reason it is not
//! ready reaches `/readyz` as text an operator can act on. A store stall (no successful write
//! for `database.write_stall_after` while ops wait) is logged at ERROR once with its cause,
//! sets `walhook_store_stalled` to 1 and makes `/readyz` answer 503 with the cause; the first
//! successful write after it clears all three.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Mutex;

use prometheus::IntGauge;

use crate::pg::preflight::Check;

/// Replication state others look at (`/readyz`, metrics).
#[derive(Debug, Default)]
pub struct ReplicationStatus {
    /// The stream is open.
    pub streaming: AtomicBool,
    /// Another process holds the slot; this one stands by.
    pub standby: AtomicBool,
    /// Unix microseconds of the last commit read (0: none yet).
    pub last_commit_us: AtomicI64,
    /// A lost slot or failing prerequisites (see `slot`).
    pub health: crate::ops::status::SlotHealth,
    /// Why the last session ended or could not start (shown by `/readyz` while not streaming).
    last_error: std::sync::Mutex<Option<String>>,
}

impl ReplicationStatus {
    /// Records why replication is not streaming.
    pub(crate) fn set_last_error(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// The last reason replication stopped streaming, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What makes this replica not ready besides the stream itself: a lost slot or failing
/// prerequisites. Shared with `/readyz`.
#[derive(Debug, Default)]
pub struct SlotHealth {
    lost: Mutex<Option<String>>,
    failing: Mutex<BTreeMap<Check, String>>,
}

impl SlotHealth {
    /// Why this replica is not ready, if the slot is lost or a prerequisite fails.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(lost) = self.lost.lock().expect("not poisoned").clone() {
            return Some(lost);
        }
        let failing = self.failing.lock().expect("not poisoned");
        if failing.is_empty() {
            return None;
        }
        Some(format!("prerequisite failed: {}", failing.values().cloned().collect::<Vec<_>>().join("; ")))
    }

    /// Forgets what this replica reported (it stands by: the one holding the slot reports
    /// it now); true when there was something to forget.
    pub(crate) fn forget(&self) -> bool {
        let had_lost = self.lost.lock().expect("not poisoned").take().is_some();
        let mut failing = self.failing.lock().expect("not poisoned");
        let had_failing = !failing.is_empty();
        failing.clear();
        had_lost || had_failing
    }

    /// Sets or clears the lost reason; true when the slot changed between lost and not lost.
    pub(crate) fn set_lost(&self, reason: Option<String>) -> bool {
        let mut lost = self.lost.lock().expect("not poisoned");
        let changed = lost.is_some() != reason.is_some();
        *lost = reason;
        changed
    }

    /// Sets or clears the failure of one check; true when its text changed.
    pub(crate) fn set_failing(&self, check: Check, problem: Option<String>) -> bool {
        let mut failing = self.failing.lock().expect("not poisoned");
        match problem {
            Some(p) => failing.insert(check, p.clone()).as_ref() != Some(&p),
            None => failing.remove(&check).is_some(),
        }
    }
}

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
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.lock().expect("lock").is_some()
    }

    /// The writer has not committed for too long; `why` says what it waits on.
    pub(crate) fn stall(&self, why: String) {
        let mut stalled = self.stalled.lock().expect("lock");
        if stalled.is_none() {
            tracing::error!(cause = %why, "the store writer cannot make progress: deliveries are not recorded and the slot does not move");
            self.set_gauge(1);
            *stalled = Some(why);
        }
    }

    /// A write committed (or the database answered with a refusal the writer handles).
    pub(crate) fn progress(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_slot_is_the_reason_before_failing_prerequisites_and_changes_are_reported_once() {
        let h = SlotHealth::default();
        assert_eq!(h.not_ready_reason(), None);
        assert!(h.set_failing(Check::Publication, Some("publication p does not include t".into())));
        assert!(!h.set_failing(Check::Publication, Some("publication p does not include t".into())));
        assert_eq!(h.not_ready_reason().as_deref(), Some("prerequisite failed: publication p does not include t"));
        assert!(h.set_lost(Some("replication slot s lost: gone".into())));
        assert!(!h.set_lost(Some("replication slot s lost: invalidated".into())), "still lost: no new ERROR");
        assert_eq!(h.not_ready_reason().as_deref(), Some("replication slot s lost: invalidated"));
        assert!(h.set_lost(None));
        assert!(h.set_failing(Check::Publication, None));
        assert_eq!(h.not_ready_reason(), None);
    }
}
