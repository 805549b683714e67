//! The replication slot's lifecycle: created once, adopted once, never silently replaced.
//!
//! What must hold:
//! - walhook creates a slot by itself only when it never streamed from one of that name (no
//!   `walhook.slot_state` row and no slot: the first start). A slot that exists without a
//!   row (it predates this table) is adopted: the row is written and streaming goes on.
//! - A slot walhook streamed from (a `walhook.slot_state` row) that is missing (dropped, or
//!   not carried over by a failover: PostgreSQL before 17 does not copy logical slots to a
//!   standby) or invalidated (`wal_status = 'lost'`, past `max_slot_wal_keep_size`) is
//!   *lost*. The streaming stage then waits, re-checking every few seconds without exiting
//!   (the API and the outbox keep working); `/readyz` answers 503 with the reason;
//!   `walhook_replication_slot_lost` is 1; one ERROR per state change names the slot and the
//!   last confirmed position and time. Only `walhook slot-reset` ([`reset()`]) creates the new
//!   slot, and it records the gap in `walhook.replication_gaps` in the same transaction.
//! - On PostgreSQL 17 and later (on a primary) the slot is created with `failover = true`,
//!   so that a standby with `sync_replication_slots = on` carries it over a failover.
//! - The confirmed position is recorded every few seconds off the hot path ([`watch()`]), which
//!   also re-checks the prerequisites while walhook runs.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::ops::status::SlotHealth;
use crate::pg::db::{Db, DbError};
use crate::source::replication::ReplicationError;

mod reset;
mod watch;

pub use reset::{reset, ResetReport};
pub use watch::watch;

/// A lost slot is looked at again at least this often (sooner with a shorter
/// `replication.recheck_interval`).
const LOST_POLL_MAX: Duration = Duration::from_secs(5);
/// How long a slot held by another process may take to be released before that is an error
/// (a previous session's walsender may still be winding down).
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Why the slot cannot be used or reset.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// A query failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Another process streams the slot.
    #[error(
        "replication slot {slot} is in use by another process (pid {pid}, application {application:?}): \
         stop that consumer or give walhook its own slot with replication.slot"
    )]
    Busy {
        /// The slot.
        slot: String,
        /// Server process streaming it.
        pid: i32,
        /// Its application_name.
        application: String,
    },
    /// The slot exists but is not walhook's kind.
    #[error("replication slot {slot}: {why}")]
    Unusable {
        /// The slot.
        slot: String,
        /// What is wrong.
        why: String,
    },
    /// `slot-reset` was asked to replace a slot that works.
    #[error(
        "replication slot {slot} is healthy ({detail}): nothing to reset. slot-reset only replaces a slot \
         that is missing or invalidated (wal_status = lost); a walhook that reports the slot lost says so in \
         /readyz and its log. To start over on purpose, stop walhook, run \
         SELECT pg_drop_replication_slot('{slot}') and then slot-reset"
    )]
    Healthy {
        /// The slot.
        slot: String,
        /// Its state, for the message.
        detail: String,
    },
}

impl From<tokio_postgres::Error> for SlotError {
    fn from(e: tokio_postgres::Error) -> Self {
        SlotError::Db(DbError::Postgres(e))
    }
}

impl From<SlotError> for ReplicationError {
    fn from(e: SlotError) -> Self {
        match e {
            SlotError::Db(e) => ReplicationError::Db(e),
            e => ReplicationError::Slot(e),
        }
    }
}

/// The slot as `pg_replication_slots` shows it.
struct SlotRow {
    plugin: Option<String>,
    kind: String,
    slot_db: Option<String>,
    this_db: String,
    active: bool,
    pid: i32,
    application: String,
    wal_status: Option<String>,
    confirmed_lsn: Option<String>,
}

impl SlotRow {
    /// Refuses a slot walhook cannot stream from at all.
    fn validate(&self, slot: &str) -> Result<(), SlotError> {
        let unusable = |why: String| SlotError::Unusable { slot: slot.to_owned(), why };
        if self.kind != "logical" || self.plugin.as_deref() != Some("pgoutput") {
            return Err(unusable(format!(
                "it is a {} slot with plugin {:?}; walhook needs a logical pgoutput slot: drop it or set replication.slot",
                self.kind, self.plugin
            )));
        }
        if self.slot_db.as_deref() != Some(self.this_db.as_str()) {
            return Err(unusable(format!(
                "it belongs to database {:?}, not {}: set replication.slot to a slot of this database",
                self.slot_db, self.this_db
            )));
        }
        Ok(())
    }

    fn invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// walhook's record of the slot (`walhook.slot_state`).
struct StateRow {
    confirmed_lsn: String,
    confirmed_at: String,
}

/// Reads the slot and walhook's record of it.
async fn inspect(client: &impl GenericClient, slot: &str) -> Result<(Option<SlotRow>, Option<StateRow>), DbError> {
    let row = client
        .query_opt(
            "SELECT s.plugin::text, s.slot_type, s.database::text, current_database()::text, s.active, \
                    COALESCE(s.active_pid, 0), COALESCE(a.application_name, ''), s.wal_status, \
                    s.confirmed_flush_lsn::text \
             FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| SlotRow {
            plugin: r.get(0),
            kind: r.get(1),
            slot_db: r.get(2),
            this_db: r.get(3),
            active: r.get(4),
            pid: r.get(5),
            application: r.get(6),
            wal_status: r.get(7),
            confirmed_lsn: r.get(8),
        });
    let state = crate::store::slot_state::confirmed(client, slot)
        .await?
        .map(|(confirmed_lsn, confirmed_at)| StateRow { confirmed_lsn, confirmed_at });
    Ok((row, state))
}

/// How a slot walhook streamed from was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LostHow {
    /// It no longer exists.
    Missing,
    /// PostgreSQL invalidated it.
    Invalidated,
}

/// A lost slot and walhook's last record of it.
struct Lost {
    slot: String,
    how: LostHow,
    confirmed_lsn: Option<String>,
    confirmed_at: Option<String>,
}

impl Lost {
    fn new(slot: &str, how: LostHow, row: Option<&SlotRow>, state: Option<StateRow>) -> Lost {
        let (confirmed_lsn, confirmed_at) = match state {
            Some(s) => (Some(s.confirmed_lsn), Some(s.confirmed_at)),
            None => (row.and_then(|r| r.confirmed_lsn.clone()), None),
        };
        Lost { slot: slot.to_owned(), how, confirmed_lsn, confirmed_at }
    }

    /// The `/readyz` reason and the ERROR line.
    fn reason(&self) -> String {
        let what = match self.how {
            LostHow::Missing => "it no longer exists (dropped, or not carried over by a PostgreSQL failover)",
            LostHow::Invalidated => {
                "PostgreSQL invalidated it (wal_status = lost: it held more WAL than max_slot_wal_keep_size)"
            }
        };
        format!(
            "replication slot {} lost: {what}; walhook streamed from it up to {} (confirmed at {}), changes after \
             that are not delivered. walhook does not create a new slot by itself: run `walhook slot-reset --config \
             FILE` to record the gap and create a new slot (runbook: WalhookReplicationSlotLost)",
            self.slot,
            self.confirmed_lsn.as_deref().unwrap_or("an unknown position"),
            self.confirmed_at.as_deref().unwrap_or("an unknown time"),
        )
    }
}

/// What the slot looks like to a session about to stream.
enum Found {
    Usable,
    Lost(Lost),
    Busy { pid: i32, application: String },
}

/// Whether a new slot is created with `failover = true` (PostgreSQL 17+, on a primary).
async fn failover_supported(client: &impl GenericClient) -> Result<bool, DbError> {
    let r = client
        .query_one("SELECT current_setting('server_version_num')::int >= 170000 AND NOT pg_is_in_recovery()", &[])
        .await?;
    Ok(r.get(0))
}

/// Creates the slot; returns its start position. Must be the first write of a transaction.
async fn create(client: &impl GenericClient, slot: &str, failover: bool) -> Result<String, DbError> {
    let sql = if failover {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let lsn: String = client.query_one(sql, &[&slot]).await?.get(0);
    tracing::info!(slot, start_lsn = %lsn, failover, "created replication slot");
    Ok(lsn)
}

/// Records that walhook streams from `slot`, starting at `lsn`.
async fn record_start(client: &impl GenericClient, slot: &str, lsn: &str) -> Result<(), DbError> {
    crate::store::slot_state::record_start(client, slot, lsn).await
}

/// Looks at the slot once: creates it on the first start, adopts one without a record.
async fn examine(db: &Db, slot: &str) -> Result<Found, SlotError> {
    let client = db.get().await?;
    let (row, state) = inspect(&**client, slot).await?;
    let Some(row) = row else {
        if state.is_some() {
            return Ok(Found::Lost(Lost::new(slot, LostHow::Missing, None, state)));
        }
        let failover = failover_supported(&**client).await?;
        let lsn = create(&**client, slot, failover).await?;
        record_start(&**client, slot, &lsn).await?;
        return Ok(Found::Usable);
    };
    row.validate(slot)?;
    if row.invalidated() {
        return Ok(Found::Lost(Lost::new(slot, LostHow::Invalidated, Some(&row), state)));
    }
    if state.is_none() {
        // A slot from before walhook kept a record: from now on it is walhook's.
        let lsn = row.confirmed_lsn.clone().unwrap_or_else(|| "0/0".into());
        record_start(&**client, slot, &lsn).await?;
        tracing::info!(slot, confirmed_lsn = %lsn, "adopted the existing replication slot");
    }
    if row.active {
        return Ok(Found::Busy { pid: row.pid, application: row.application });
    }
    Ok(Found::Usable)
}

/// Returns once the slot may be streamed (`true`), or on shutdown (`false`). A lost slot is
/// reported (ERROR once, `/readyz`, metric) and looked at again until `slot-reset` replaced it.
pub async fn wait_usable(
    db: &Db,
    cfg: &Config,
    health: &SlotHealth,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<bool, SlotError> {
    let slot = cfg.replication.slot.as_str();
    let poll = cfg.replication.recheck_interval.get().min(LOST_POLL_MAX);
    let mut busy_since: Option<Instant> = None;
    loop {
        let pause = match examine(db, slot).await? {
            Found::Usable => {
                slot_found(health, metrics, slot);
                return Ok(true);
            }
            Found::Lost(lost) => {
                busy_since = None;
                declare_lost(health, metrics, &lost);
                poll
            }
            Found::Busy { pid, application } => {
                if busy_since.get_or_insert_with(Instant::now).elapsed() > BUSY_WAIT {
                    return Err(SlotError::Busy { slot: slot.to_owned(), pid, application });
                }
                Duration::from_millis(250)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The slot is lost: not ready, metric, one ERROR when that is news.
fn declare_lost(health: &SlotHealth, metrics: &Metrics, lost: &Lost) {
    let reason = lost.reason();
    metrics.slot_lost.set(1);
    if health.set_lost(Some(reason.clone())) {
        tracing::error!(
            slot = %lost.slot,
            last_confirmed_lsn = lost.confirmed_lsn.as_deref().unwrap_or("unknown"),
            last_confirmed_at = lost.confirmed_at.as_deref().unwrap_or("unknown"),
            "{reason}"
        );
    }
}

/// The slot is usable (again).
fn slot_found(health: &SlotHealth, metrics: &Metrics, slot: &str) {
    metrics.slot_lost.set(0);
    if health.set_lost(None) {
        tracing::info!(slot, "replication slot replaced by slot-reset; streaming resumes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_reason_names_slot_position_time_and_the_command() {
        let lost = Lost {
            slot: "walhook".into(),
            how: LostHow::Invalidated,
            confirmed_lsn: Some("0/1A2B3C8".into()),
            confirmed_at: Some("2026-06-15T14:30:00.123456Z".into()),
        };
        let r = lost.reason();
        for needle in [
            "replication slot walhook lost",
            "invalidated",
            "0/1A2B3C8",
            "2026-06-15T14:30:00.123456Z",
            "walhook slot-reset",
        ] {
            assert!(r.contains(needle), "{needle} missing from {r}");
        }
    }
}
