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
    /// What the primary shows about failover safety (shown by `/readyz`, never a reason to be
    /// not ready).
    failover: Mutex<Option<crate::pg::failover::FailoverView>>,
    /// Since when the primary has held back changes for a standby nothing streams from.
    held_back_since: Mutex<Option<std::time::Instant>>,
    /// Since when, and for which transaction, replication has waited for a transaction it
    /// read to become visible to queries (kept across the sessions that read it again).
    invisible_since: Mutex<Option<(std::time::Instant, u32)>>,
}

impl ReplicationStatus {
    /// Records why replication is not streaming.
    pub(crate) fn set_last_error(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Keeps the latest failover view; one WARN when the primary starts holding back changes
    /// for a standby nothing streams from (from the replica that streams), one INFO when it
    /// stops.
    pub(crate) fn set_failover(&self, view: crate::pg::failover::FailoverView) {
        let held = view.held_back_by().join(", ");
        {
            let mut since = self.held_back_since.lock().unwrap_or_else(|p| p.into_inner());
            let streaming = self.streaming.load(std::sync::atomic::Ordering::Relaxed);
            match (since.is_some(), held.is_empty()) {
                (false, false) => {
                    *since = Some(std::time::Instant::now());
                    if streaming {
                        tracing::warn!(
                            standby_slots = %held,
                            "the primary holds back every change from walhook: synchronized_standby_slots names {held}, \
                             which no standby streams from (see /readyz's failover member and the runbook \
                             WalhookHeldBackByStandby)"
                        );
                    }
                }
                (true, true) => {
                    *since = None;
                    if streaming {
                        tracing::info!("the primary no longer holds back changes for a standby");
                    }
                }
                _ => {}
            }
        }
        *self.failover.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
    }

    /// The standby slots the primary has held back changes for since at least `at_least`
    /// ago, if it has.
    pub fn held_back(&self, at_least: std::time::Duration) -> Option<String> {
        let since = (*self.held_back_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        if since.elapsed() < at_least {
            return None;
        }
        let view = self.failover()?;
        Some(view.held_back_by().join(", ")).filter(|h| !h.is_empty())
    }

    /// Replication waits for transaction `xid`, which it read, to become visible to queries.
    /// The first call for an xid starts the clock; a session reading it again keeps it.
    pub(crate) fn waiting_for_visibility(&self, xid: u32) {
        let mut waiting = self.invisible_since.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.map(|(_, x)| x) != Some(xid) {
            *waiting = Some((std::time::Instant::now(), xid));
        }
    }

    /// Transaction `xid` is visible to queries: a wait for it is over. A wait for another
    /// one is not (a session reading a commit again first reads the earlier ones it has not
    /// confirmed, which are visible at once).
    pub(crate) fn visible(&self, xid: u32) {
        let mut waiting = self.invisible_since.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.is_some_and(|(_, x)| x == xid) {
            *waiting = None;
        }
    }

    /// Replication no longer waits: the session ended for another reason than a wait (a
    /// replica that lost the lock waits for nothing).
    pub(crate) fn visibility_wait_over(&self) {
        *self.invisible_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The transaction this replica, while it streams, has waited at least `at_least` to see,
    /// and how long.
    pub fn invisible_for(&self, at_least: std::time::Duration) -> Option<(u32, std::time::Duration)> {
        if !self.streaming.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let (since, xid) = (*self.invisible_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some((xid, since.elapsed())).filter(|(_, waited)| *waited >= at_least)
    }

    /// The latest failover view, if one was read.
    pub fn failover(&self) -> Option<crate::pg::failover::FailoverView> {
        self.failover.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

/// Whether the database answers, as a check on a connection of its own keeps it (so that
/// `/readyz` never waits on the database, nor on the pool the deliveries need).
#[derive(Debug, Default)]
pub struct Reachability {
    state: Mutex<(Option<std::time::Instant>, Option<String>)>,
}

impl Reachability {
    /// The database answered a check now.
    pub(crate) fn answered(&self) {
        *self.state.lock().expect("lock") = (Some(std::time::Instant::now()), None);
    }

    /// A check failed (`why`).
    pub(crate) fn failed(&self, why: String) {
        self.state.lock().expect("lock").1 = Some(why);
    }

    /// Why the database counts as unreachable: no check answered within `fresh` (never, or
    /// not lately), with the last failure if there was one.
    pub fn problem(&self, fresh: std::time::Duration) -> Option<String> {
        let (last_ok, error) = self.state.lock().expect("lock").clone();
        if last_ok.is_some_and(|t| t.elapsed() <= fresh) {
            return None;
        }
        let since = match last_ok {
            Some(t) => format!("no answer for {} s", t.elapsed().as_secs()),
            None => "no answer yet".to_owned(),
        };
        Some(match error {
            Some(e) => format!("database unreachable: {since}; last error: {e}"),
            None => format!("database unreachable: {since}"),
        })
    }
}

/// Whose write does not commit: each clears only its own report, so one that commits never
/// hides another still stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallOf {
    /// The store writer (batches, outbox probes): cleared by its next commit.
    Store = 0,
    /// The replication session's raise of its confirm ceiling: cleared when it commits.
    Ceiling = 1,
}

/// The store writer's health, shared with the operations listener.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Each stalled writer's report ([`StallOf`]).
    stalled: Mutex<[Option<String>; 2]>,
    /// The database's last error while ops wait (cleared by a commit).
    last_error: Mutex<Option<String>>,
    /// Delivery records the database refuses in every form, each holding the slot: why.
    pinned: Mutex<BTreeMap<uuid::Uuid, String>>,
    /// `walhook_store_stalled` and `walhook_store_pinned_records`.
    gauges: Option<(IntGauge, IntGauge)>,
}

impl StoreHealth {
    /// A healthy store whose stalls are also shown by `stalled` and whose pinned records are
    /// counted by `pinned`.
    pub fn new(stalled: IntGauge, pinned: IntGauge) -> Self {
        StoreHealth { gauges: Some((stalled, pinned)), ..Default::default() }
    }

    /// Why the store cannot make progress, while it cannot: a stall, or records that hold
    /// the slot.
    pub fn problem(&self) -> Option<String> {
        if let Some(stalled) = self.stalled.lock().expect("lock").iter().flatten().next() {
            return Some(stalled.clone());
        }
        let pinned = self.pinned.lock().expect("lock");
        let (id, why) = pinned.iter().next()?;
        Some(format!(
            "{} delivery record(s) the database refuses in every form hold the replication slot (it cannot be \
             confirmed past them until they are stored; walhook keeps trying), e.g. delivery {id}: {why}",
            pinned.len()
        ))
    }

    /// `of`'s write has not committed for too long; `why` says what it waits on now (a stall
    /// already reported takes the new cause, logged once per change).
    pub(crate) fn stall(&self, of: StallOf, why: String) {
        let mut stalled = self.stalled.lock().expect("lock");
        match stalled[of as usize].as_deref() {
            None => {
                tracing::error!(cause = %why, "the store writer cannot make progress: deliveries are not recorded and the slot does not move");
                self.set_gauge(|g| &g.0, 1);
            }
            Some(was) if was != why => {
                tracing::warn!(cause = %why, was, "the store writer still cannot make progress, for another cause now");
            }
            Some(_) => return,
        }
        stalled[of as usize] = Some(why);
    }

    /// `of`'s write committed: its stall, if it reported one, is over (another's is not).
    pub(crate) fn unstall(&self, of: StallOf) {
        let mut stalled = self.stalled.lock().expect("lock");
        if stalled[of as usize].take().is_some() {
            match of {
                StallOf::Store => tracing::info!("the store writer makes progress again"),
                StallOf::Ceiling => {
                    tracing::info!("the confirm ceiling's raise committed; the slot is confirmed again")
                }
            }
            if stalled.iter().all(Option::is_none) {
                self.set_gauge(|g| &g.0, 0);
            }
        }
    }

    /// A write failed with `error`: a stall reported later names it as its cause.
    pub(crate) fn note_error(&self, error: String) {
        *self.last_error.lock().expect("lock") = Some(error);
    }

    /// The database's last error since the last commit, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("lock").clone()
    }

    /// A write of the store writer committed (or the database answered with a refusal the
    /// writer handles).
    pub(crate) fn progress(&self) {
        self.last_error.lock().expect("lock").take();
        self.unstall(StallOf::Store);
    }

    /// Delivery `id`'s record is refused in every form (`why`) and holds the slot.
    pub(crate) fn pin(&self, id: uuid::Uuid, why: String) {
        let mut pinned = self.pinned.lock().expect("lock");
        pinned.insert(id, why);
        self.set_gauge(|g| &g.1, pinned.len() as i64);
    }

    /// Delivery `id`'s record is stored at last.
    pub(crate) fn unpin(&self, id: uuid::Uuid) {
        let mut pinned = self.pinned.lock().expect("lock");
        pinned.remove(&id);
        self.set_gauge(|g| &g.1, pinned.len() as i64);
    }

    fn set_gauge(&self, which: impl Fn(&(IntGauge, IntGauge)) -> &IntGauge, v: i64) {
        if let Some(g) = self.gauges.as_ref() {
            which(g).set(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_a_commit_is_reported_only_while_streaming_and_keeps_its_clock_for_one_xid() {
        let s = ReplicationStatus::default();
        let zero = std::time::Duration::ZERO;
        s.waiting_for_visibility(747);
        assert_eq!(s.invisible_for(zero), None, "a replica that does not stream waits for nothing");
        s.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
        let (xid, first) = s.invisible_for(zero).unwrap();
        assert_eq!(xid, 747);
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.waiting_for_visibility(747);
        let kept = s.invisible_for(zero).unwrap().1;
        assert!(kept > first, "the same xid read again keeps its clock");
        assert_eq!(s.invisible_for(std::time::Duration::from_secs(30)), None);
        s.waiting_for_visibility(752);
        assert!(s.invisible_for(zero).unwrap().1 < kept, "another xid starts over");
        s.visibility_wait_over();
        assert_eq!(s.invisible_for(zero), None);
    }

    #[test]
    fn one_writer_committing_never_clears_another_writers_stall() {
        let h = StoreHealth::default();
        h.stall(StallOf::Ceiling, "raise waits".into());
        h.progress();
        assert_eq!(h.problem().as_deref(), Some("raise waits"), "a store commit does not clear a stuck raise");
        h.stall(StallOf::Store, "write waits".into());
        h.unstall(StallOf::Ceiling);
        assert_eq!(h.problem().as_deref(), Some("write waits"), "a raise that commits does not clear a stuck write");
        h.stall(StallOf::Store, "write waits elsewhere".into());
        assert_eq!(h.problem().as_deref(), Some("write waits elsewhere"), "the cause as it is now");
        h.progress();
        assert_eq!(h.problem(), None);
    }

    #[test]
    fn earlier_commits_seen_again_and_visible_do_not_restart_the_clock_of_the_one_waited_for() {
        let s = ReplicationStatus::default();
        let zero = std::time::Duration::ZERO;
        s.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
        s.waiting_for_visibility(747);
        let first = s.invisible_for(zero).unwrap().1;
        // The session that reads 747 again first reads earlier endpoint changes, not yet
        // confirmed, which are visible at once.
        s.visible(745);
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.waiting_for_visibility(747);
        let (xid, kept) = s.invisible_for(zero).expect("still waiting for 747");
        assert_eq!(xid, 747);
        assert!(kept > first, "747 keeps the clock it started in the first session");
        s.visible(747);
        assert_eq!(s.invisible_for(zero), None, "747 is visible: no more wait");
    }

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
