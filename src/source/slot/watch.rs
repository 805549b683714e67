//! While walhook runs: record the slot's confirmed position, re-check the prerequisites.
//!
//! What must hold:
//! - The replica that holds the slot (not a standby) records the slot's confirmed position in
//!   `walhook.slot_state` every few seconds, off the hot path, so that a lost slot's gap starts
//!   at a known position (never later than the real one), with a time no change after that
//!   position precedes (so the gap is never shorter than the loss in time either): the time of
//!   an earlier look at which the WAL had not yet passed the position, moved back to the start
//!   of the oldest transaction then running when walhook may see it ([`Marks`]). A position
//!   with no such look keeps the recorded time, which is earlier still.
//! - Every `replication.recheck_interval` it re-checks the catalog prerequisites (CRM tables,
//!   replica identity keeping `account_id`, publication membership) and the slot's
//!   `wal_status`. A check that stops holding logs one ERROR naming the fix, makes `/readyz`
//!   503 with the reason, sets `walhook_replication_prerequisite_failing{check}` and opens a
//!   gap row from the last time the check passed; when it passes again the row is closed.
//! - Streaming goes on for the other tables meanwhile. pgoutput decodes each change with the
//!   catalog as of that change, so the changes a table makes while it is out of the
//!   publication are not in the stream whether walhook waits or not; waiting would only hold
//!   back the tables that still work. The gap row is what says which window to repair.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::{declare_lost, Lost, LostHow};
use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::ops::status::ReplicationStatus;
use crate::pg::db::{Db, DbError};
use crate::pg::preflight::{self, Check};
use crate::store::slot_state::utc_text;

/// How often the confirmed position is recorded (sooner with a shorter recheck interval).
const RECORD_EVERY: Duration = Duration::from_secs(5);
/// Looks remembered for [`Marks`] (an hour at the default pace).
const MARKS_KEPT: usize = 720;
/// The server's current WAL position, also on a standby.
const CURRENT_LSN: &str =
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";
/// At one look: the slot's confirmed position (text and bytes), its `wal_status`, the WAL
/// insert position, and a time no transaction committing after that position started before:
/// `now()`, or the start of the oldest transaction running in this database when it is earlier
/// (visible to walhook's role only with `pg_read_all_stats`; invisible ones read as NULL).
const LOOK: &str = concat!(
    "SELECT s.confirmed_flush_lsn::text, (s.confirmed_flush_lsn - '0/0')::int8, s.wal_status, \
            ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END) \
              - '0/0')::int8, ",
    utc_text!("least(now(), (SELECT min(xact_start) FROM pg_stat_activity WHERE datname = current_database()))"),
    " FROM pg_replication_slots s WHERE s.slot_name = $1"
);

/// Earlier looks: where the WAL was (bytes since 0/0), and a time no commit past it precedes.
#[derive(Debug, Default)]
struct Marks(std::collections::VecDeque<(i64, String)>);

impl Marks {
    fn push(&mut self, wal: i64, at: String) {
        if self.0.len() == MARKS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((wal, at));
    }

    /// The time to record with confirmed position `confirmed`: that of the latest look at which
    /// the WAL had not passed it (every change past `confirmed` came after that look), if any.
    fn time_for(&self, confirmed: i64) -> Option<&str> {
        self.0.iter().rev().find(|(wal, _)| *wal <= confirmed).map(|(_, at)| at.as_str())
    }
}

/// Where and when a check last passed.
#[derive(Debug, Clone)]
struct Mark {
    lsn: String,
    at: String,
}

/// Per-check memory of the watch.
#[derive(Default)]
struct Checks {
    /// `Some(true)` failing, `Some(false)` passing, `None` not looked at yet.
    failing: HashMap<Check, bool>,
    /// The last problems logged per check, so one ERROR is written per change.
    logged: HashMap<Check, String>,
    last_pass: HashMap<Check, Mark>,
    /// The slot was `unreserved` at the last look (a WARN was logged).
    unreserved: bool,
    /// Earlier looks at the WAL, for the recorded position's time.
    marks: Marks,
}

/// Runs until `shutdown`.
pub async fn watch(
    db: Db,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    status: Arc<ReplicationStatus>,
    shutdown: CancellationToken,
) {
    let recheck = cfg.replication.recheck_interval.get();
    let mut tick = tokio::time::interval(recheck.min(RECORD_EVERY));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checks = Checks::default();
    // `walhook run` starts after preflight passed every check: that is their last pass until
    // the first re-check.
    match current_mark(&db).await {
        Ok(mark) => checks.last_pass.extend(Check::ALL.map(|c| (c, mark.clone()))),
        Err(e) => tracing::warn!(error = %e, "reading the current WAL position failed"),
    }
    let mut last_check: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            // 1. Shutdown.
            _ = shutdown.cancelled() => return,
            // 2. The next look.
            _ = tick.tick() => {}
        }
        if status.standby.load(Ordering::Relaxed) {
            // Leadership moved on: what this replica saw of the slot is the new holder's to
            // report now, so it must not keep this one unready.
            if status.health.forget() {
                metrics.slot_lost.set(0);
                for c in Check::ALL {
                    metrics.prerequisite_failing.with_label_values(&[c.label()]).set(0);
                }
                tracing::info!("standing by: the replica holding the slot reports its state now");
            }
            continue;
        }
        let result = async {
            let client = db.get().await?;
            if status.streaming.load(Ordering::Relaxed) {
                look_at_slot(&**client, &cfg, &metrics, &status, &mut checks).await?;
            }
            if last_check.is_none_or(|t| t.elapsed() >= recheck) {
                last_check = Some(Instant::now());
                recheck_prerequisites(&**client, &cfg, &metrics, &status, &mut checks).await?;
            }
            Ok::<_, DbError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "re-checking the replication prerequisites failed; trying again");
        }
    }
}

/// Records the slot's confirmed position; reports a slot that is being or was invalidated.
async fn look_at_slot(
    client: &impl GenericClient,
    cfg: &Config,
    metrics: &Metrics,
    status: &ReplicationStatus,
    checks: &mut Checks,
) -> Result<(), DbError> {
    let slot = cfg.replication.slot.as_str();
    let Some(look) = client.query_opt(LOOK, &[&slot]).await? else { return Ok(()) };
    let (confirmed_text, confirmed, wal_status, wal, at): (Option<String>, Option<i64>, Option<String>, i64, String) =
        (look.get(0), look.get(1), look.get(2), look.get(3), look.get(4));
    if let (Some(text), Some(confirmed), false) = (&confirmed_text, confirmed, wal_status.as_deref() == Some("lost")) {
        // Written only when the position moved: a time is never refreshed without it.
        let time = checks.marks.time_for(confirmed);
        crate::store::slot_state::follow_confirmed(client, slot, text, time).await?;
    }
    checks.marks.push(wal, at);
    match wal_status.as_deref() {
        Some("lost") => {
            // The walsender is terminated with it; the session then waits for slot-reset.
            let (row, state) = super::inspect(client, slot).await?;
            let how = LostHow::Invalidated { cause: row.as_ref().and_then(|r| r.invalidation.clone()) };
            declare_lost(&status.health, metrics, &Lost::new(slot, how, row.as_ref(), state));
        }
        Some("unreserved") if !checks.unreserved => {
            checks.unreserved = true;
            tracing::warn!(
                slot,
                "replication slot {slot} holds WAL beyond max_slot_wal_keep_size (wal_status = unreserved): \
                 PostgreSQL invalidates it at the next checkpoint unless walhook catches up"
            );
        }
        Some("unreserved") => {}
        _ => checks.unreserved = false,
    }
    Ok(())
}

/// Runs the catalog checks; handles each check's change between passing and failing.
async fn recheck_prerequisites(
    client: &impl GenericClient,
    cfg: &Config,
    metrics: &Metrics,
    status: &ReplicationStatus,
    checks: &mut Checks,
) -> Result<(), DbError> {
    let slot = cfg.replication.slot.as_str();
    let problems = preflight::catalog_problems(client, cfg).await?;
    let now = mark(client).await?;
    for check in Check::ALL {
        let failing: Vec<&str> = problems.iter().filter(|p| p.check == check).map(|p| p.message.as_str()).collect();
        let gauge = metrics.prerequisite_failing.with_label_values(&[check.label()]);
        if failing.is_empty() {
            gauge.set(0);
            if checks.failing.insert(check, false) != Some(false) {
                close_gaps(client, slot, check, &now).await?;
            }
            if status.health.set_failing(check, None) {
                tracing::info!(check = check.label(), "replication prerequisite holds again");
            }
            checks.logged.remove(&check);
            checks.last_pass.insert(check, now.clone());
            continue;
        }
        let text = failing.join("; ");
        gauge.set(1);
        if checks.failing.insert(check, true) != Some(true) {
            open_gap(client, slot, check, &text, checks.last_pass.get(&check)).await?;
        }
        status.health.set_failing(check, Some(text.clone()));
        if checks.logged.get(&check) != Some(&text) {
            tracing::error!(
                check = check.label(),
                since = checks.last_pass.get(&check).map(|m| m.at.as_str()).unwrap_or("before this process started"),
                "a replication prerequisite stopped holding while walhook runs; the affected changes are not \
                 delivered until it is fixed (the window is recorded in walhook.replication_gaps): {text}"
            );
            checks.logged.insert(check, text);
        }
    }
    Ok(())
}

/// The server's current position and time.
async fn mark(client: &impl GenericClient) -> Result<Mark, DbError> {
    let r = client.query_one(&format!("SELECT {CURRENT_LSN}, {}", utc_text!("now()")), &[]).await?;
    Ok(Mark { lsn: r.get(0), at: r.get(1) })
}

async fn current_mark(db: &Db) -> Result<Mark, DbError> {
    mark(&**db.get().await?).await
}

/// Opens a gap row for `check` unless one is open already (left by an earlier process).
async fn open_gap(
    client: &impl GenericClient,
    slot: &str,
    check: Check,
    reason: &str,
    since: Option<&Mark>,
) -> Result<(), DbError> {
    let from = (since.map(|m| m.lsn.as_str()), since.map(|m| m.at.as_str()));
    crate::store::slot_state::open_gap(client, slot, check.label(), reason, from).await
}

/// Closes the open gap rows of `check`: it holds again as of `now`.
async fn close_gaps(client: &impl GenericClient, slot: &str, check: Check, now: &Mark) -> Result<(), DbError> {
    let to = (now.lsn.as_str(), now.at.as_str());
    let closed = crate::store::slot_state::close_gaps(client, slot, check.label(), to).await?;
    if closed > 0 {
        tracing::warn!(
            slot,
            check = check.label(),
            to_lsn = %now.lsn,
            to_time = %now.at,
            "closed the recorded replication gap of a prerequisite that holds again; see walhook.replication_gaps"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmed_position_gets_the_time_of_the_last_look_before_the_wal_passed_it() {
        let mut m = Marks::default();
        assert_eq!(m.time_for(100), None, "no look yet: the recorded time stays");
        m.push(100, "t1".into());
        m.push(250, "t2".into());
        m.push(400, "t3".into());
        assert_eq!(m.time_for(99), None);
        assert_eq!(m.time_for(100), Some("t1"));
        assert_eq!(m.time_for(300), Some("t2"), "t3 is too late: the WAL was past 300 by then");
        assert_eq!(m.time_for(400), Some("t3"));
        for i in 0..MARKS_KEPT as i64 {
            m.push(1000 + i, format!("u{i}"));
        }
        assert_eq!(m.0.len(), MARKS_KEPT, "bounded");
        assert_eq!(m.time_for(1000), Some("u0"));
    }
}
