//! The replication slot's lifecycle: created once, by `walhook migrate`, never silently
//! replaced.
//!
//! What must hold:
//! - `walhook migrate` creates the slot ([`prepare()`]) when walhook has no record of it and
//!   it does not exist, after the publication: from the moment migrate returns, every
//!   committed change of a published table is in the slot. A slot that exists without a
//!   record (created by hand before walhook was installed) is adopted there. `walhook run`
//!   never creates a slot: without a record it stops and says to run migrate.
//! - A slot walhook streamed from (a `walhook.slot_state` row) that is missing (dropped, or
//!   not carried over by a failover: PostgreSQL before 17 does not copy logical slots to a
//!   standby), invalidated (`wal_status = 'lost'`, past `max_slot_wal_keep_size`) or
//!   *replaced* (its confirmed position is past walhook's confirm ceiling: it was dropped and
//!   created again by someone else, or advanced by hand) is *lost*. The streaming stage then
//!   waits, re-checking every few seconds without exiting (the API and the outbox keep
//!   working); `/readyz` answers 503 with the reason; `walhook_replication_slot_lost` is 1;
//!   one ERROR per state change names the slot and the last confirmed position and time.
//!   Only `walhook slot-reset` ([`reset()`]) ends it, recording the gap in
//!   `walhook.replication_gaps` in the same transaction that creates or adopts the new slot.
//! - The confirm ceiling ([`ceiling`]): walhook never confirms past it, and raises it (to the
//!   WAL position of the moment) only while the slot's confirmed position is still at or below
//!   it. A slot created anew starts past every earlier WAL position, so a replaced slot is
//!   always past the ceiling, at start-up and at the next raise alike.
//! - On PostgreSQL 17 and later (on a primary) the slot is created with `failover = true`,
//!   so that a standby with `sync_replication_slots = on` carries it over a failover; a slot
//!   without it is altered before a session streams ([`failover`]).
//! - The confirmed position is recorded every few seconds off the hot path ([`watch()`]), with
//!   a time no commit after it precedes, and the prerequisites are re-checked while walhook
//!   runs.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::ops::status::SlotHealth;
use crate::pg::db::{Db, DbError};
use crate::store::slot_state::SlotRecord;

pub mod ceiling;
pub mod failover;
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
    /// `walhook run` found neither the slot nor walhook's record of it.
    #[error(
        "replication slot {slot} does not exist and walhook has no record of it: run `walhook migrate --config FILE` \
         first (it creates the slot, so that nothing committed from then on can be missed)"
    )]
    NotPrepared {
        /// The slot.
        slot: String,
    },
    /// `walhook migrate` may not create the slot.
    #[error(
        "replication slot {slot}: walhook migrate creates it, which needs the REPLICATION attribute, and role {role} \
         has none{hint}"
    )]
    CannotCreate {
        /// The slot.
        slot: String,
        /// The role migrating.
        role: String,
        /// What to do.
        hint: String,
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
    /// `confirmed_lsn` in bytes since 0/0.
    confirmed: Option<i64>,
    /// `invalidation_reason` (PostgreSQL 17+).
    invalidation: Option<String>,
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

    /// Past walhook's confirm ceiling: not the slot walhook streamed from.
    fn past(&self, ceiling: Option<i64>) -> bool {
        matches!((self.confirmed, ceiling), (Some(c), Some(ceiling)) if c > ceiling)
    }
}

/// Reads the slot and walhook's record of it.
async fn inspect(client: &impl GenericClient, slot: &str) -> Result<(Option<SlotRow>, Option<SlotRecord>), DbError> {
    let row = client
        .query_opt(
            "SELECT s.plugin::text, s.slot_type, s.database::text, current_database()::text, s.active, \
                    COALESCE(s.active_pid, 0), COALESCE(a.application_name, ''), s.wal_status, \
                    s.confirmed_flush_lsn::text, (s.confirmed_flush_lsn - '0/0')::int8, \
                    to_jsonb(s) ->> 'invalidation_reason' \
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
            confirmed: r.get(9),
            invalidation: r.get(10),
        });
    let record = crate::store::slot_state::record(client, slot).await?;
    Ok((row, record))
}

/// How a slot walhook streamed from was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LostHow {
    /// It no longer exists.
    Missing,
    /// PostgreSQL invalidated it (`invalidation_reason`, PostgreSQL 17+).
    Invalidated {
        /// Why, as PostgreSQL names it.
        cause: Option<String>,
    },
    /// A slot of that name exists, confirmed past anything walhook confirmed (at this
    /// position): someone else created it, or advanced it.
    Replaced {
        /// Its confirmed position.
        at: String,
    },
}

/// A lost slot and walhook's last record of it.
struct Lost {
    slot: String,
    how: LostHow,
    confirmed_lsn: Option<String>,
    confirmed_at: Option<String>,
}

impl Lost {
    fn new(slot: &str, how: LostHow, row: Option<&SlotRow>, record: Option<SlotRecord>) -> Lost {
        let (confirmed_lsn, confirmed_at) = match record {
            Some(r) => (Some(r.confirmed_lsn), Some(r.confirmed_at)),
            None => (row.and_then(|r| r.confirmed_lsn.clone()), None),
        };
        Lost { slot: slot.to_owned(), how, confirmed_lsn, confirmed_at }
    }

    /// The `/readyz` reason and the ERROR line.
    fn reason(&self) -> String {
        let what = match &self.how {
            LostHow::Missing => {
                "it no longer exists (dropped, or not carried over by a PostgreSQL failover)".to_owned()
            }
            LostHow::Invalidated { cause } => {
                format!("PostgreSQL invalidated it ({})", invalidated_why(cause.as_deref()))
            }
            LostHow::Replaced { at } => format!(
                "the slot of that name is not the one walhook streamed from: it is confirmed up to {at}, past \
                 anything walhook confirmed (it was dropped and created again by someone else, such as failover \
                 tooling or a cleanup script, or advanced by hand)"
            ),
        };
        let command = match self.how {
            LostHow::Replaced { .. } => "record the gap and adopt the slot",
            _ => "record the gap and create a new slot",
        };
        format!(
            "replication slot {} lost: {what}; walhook streamed from it up to {} (confirmed at {}), changes after \
             that are not delivered. walhook does not stream from a slot it did not create by itself: run \
             `walhook slot-reset --config FILE` to {command} (runbook: WalhookReplicationSlotLost)",
            self.slot,
            self.confirmed_lsn.as_deref().unwrap_or("an unknown position"),
            self.confirmed_at.as_deref().unwrap_or("an unknown time"),
        )
    }
}

/// Why PostgreSQL invalidated a slot, in words (from `invalidation_reason`).
fn invalidated_why(cause: Option<&str>) -> String {
    match cause {
        None | Some("wal_removed") => "wal_status = lost: it held more WAL than max_slot_wal_keep_size".to_owned(),
        Some("idle_timeout") => {
            "idle_timeout: walhook was stopped longer than idle_replication_slot_timeout (PostgreSQL 18)".to_owned()
        }
        Some("wal_level_insufficient") => "wal_level_insufficient: wal_level was lowered below logical".to_owned(),
        Some("rows_removed") => {
            "rows_removed: catalog rows it needed were vacuumed away (hot_standby_feedback off on a standby)".to_owned()
        }
        Some(other) => other.to_owned(),
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

/// What `walhook migrate` did about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Created at this position (with `failover = true` on PostgreSQL 17+).
    Created {
        /// Its consistent point: every change committed after it is in the slot.
        lsn: String,
        /// Created as a failover slot.
        failover: bool,
    },
    /// It existed without a record (made by hand before walhook): adopted at this position.
    Adopted {
        /// Its confirmed position.
        lsn: String,
    },
    /// walhook streams from it already (`walhook run` checks whether it is still the same).
    Recorded,
}

/// `walhook migrate`'s part: creates the slot (or adopts one made by hand) unless walhook has
/// a record of it, so that nothing committed after migrate returns can be missed.
pub async fn prepare(db: &Db, cfg: &Config) -> Result<Prepared, SlotError> {
    let slot = cfg.replication.slot.as_str();
    let mut client = db.connect().await?;
    let (row, record) = inspect(&client, slot).await?;
    if record.is_some() {
        return Ok(Prepared::Recorded);
    }
    if let Some(row) = row {
        row.validate(slot)?;
        let lsn = row.confirmed_lsn.unwrap_or_else(|| "0/0".into());
        record_and_seed(&mut client, slot, &lsn).await?;
        tracing::info!(slot, confirmed_lsn = %lsn, "adopted the existing replication slot");
        return Ok(Prepared::Adopted { lsn });
    }
    let wal_level: String = client.query_one("SELECT current_setting('wal_level')", &[]).await?.get(0);
    if wal_level != "logical" {
        let why = format!(
            "wal_level is '{wal_level}', so it cannot be created: set wal_level = logical in postgresql.conf (or the \
             provider's parameter group), restart PostgreSQL, and run walhook migrate again"
        );
        return Err(SlotError::Unusable { slot: slot.to_owned(), why });
    }
    let failover = failover_supported(&client).await?;
    let as_role = creating_role(&client, slot, cfg.database.runtime_role.as_ref().map(|r| r.as_str())).await?;
    if let Some(role) = &as_role {
        // An identifier of a-z, 0-9 and _ (config::Identifier): safe to write as it is.
        client.batch_execute(&format!("SET ROLE {role}")).await?;
    }
    let created = create(&client, slot, failover).await;
    if as_role.is_some() {
        client.batch_execute("RESET ROLE").await?;
    }
    let lsn = created?;
    if let Err(e) = record_and_seed(&mut client, slot, &lsn).await {
        // Unrecorded, the slot would look like someone else's: take it back.
        let _ = client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
        return Err(e);
    }
    Ok(Prepared::Created { lsn, failover })
}

/// Records the slot as walhook's from `lsn`, and starts its routing versions from the endpoints
/// of this moment (not those of the first `walhook run`, which may come much later: endpoints
/// made in between are in the stream).
async fn record_and_seed(client: &mut tokio_postgres::Client, slot: &str, lsn: &str) -> Result<(), SlotError> {
    let tx = client.transaction().await?;
    record_start(&tx, slot, lsn).await?;
    crate::source::route_versions::reset_in(&tx, slot).await?;
    tx.commit().await?;
    Ok(())
}

/// The role to create the slot as: `None` for the role migrating (it may replicate), else
/// the runtime role, when the migrating role is a member of it.
async fn creating_role(
    client: &impl GenericClient,
    slot: &str,
    runtime_role: Option<&str>,
) -> Result<Option<String>, SlotError> {
    let r = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication, \
                    $1::text IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) \
                        AND pg_has_role($1::text, 'MEMBER') \
                        AND (SELECT rolreplication FROM pg_roles WHERE rolname = $1) \
             FROM pg_roles WHERE rolname = current_user",
            &[&runtime_role],
        )
        .await?;
    let (role, may, via_runtime): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
    if may {
        return Ok(None);
    }
    if via_runtime {
        return Ok(runtime_role.map(str::to_owned));
    }
    let hint = match runtime_role {
        Some(rt) => format!(
            ": let migrate create it as {rt} (GRANT {rt} TO {role}, as a superuser), or run migrate as a role with \
             REPLICATION"
        ),
        None => ": run migrate as a role with REPLICATION (or a superuser), or set database.runtime_role to the \
                  role walhook runs as and GRANT that role to this one"
            .to_owned(),
    };
    Err(SlotError::CannotCreate { slot: slot.to_owned(), role, hint })
}

/// Looks at the slot once.
async fn examine(db: &Db, slot: &str) -> Result<Found, SlotError> {
    let client = db.get().await?;
    let (row, record) = inspect(&**client, slot).await?;
    let Some(record) = record else {
        return Err(SlotError::NotPrepared { slot: slot.to_owned() });
    };
    let Some(row) = row else {
        return Ok(Found::Lost(Lost::new(slot, LostHow::Missing, None, Some(record))));
    };
    row.validate(slot)?;
    if row.invalidated() {
        let how = LostHow::Invalidated { cause: row.invalidation.clone() };
        return Ok(Found::Lost(Lost::new(slot, how, Some(&row), Some(record))));
    }
    if row.active {
        // Someone streams it now: that is the news (whether it is walhook's is told once free).
        return Ok(Found::Busy { pid: row.pid, application: row.application });
    }
    if row.past(record.ceiling) {
        let at = row.confirmed_lsn.clone().unwrap_or_default();
        return Ok(Found::Lost(Lost::new(slot, LostHow::Replaced { at }, Some(&row), Some(record))));
    }
    if record.ceiling.is_none() {
        // Recorded before ceilings existed: its position now is the best there is.
        if let Some(lsn) = &row.confirmed_lsn {
            crate::store::slot_state::set_missing_ceiling(&**client, slot, lsn).await?;
        }
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
        tracing::info!(slot, "the replication slot walhook recorded is there again (slot-reset); streaming resumes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_reason_names_slot_position_time_and_the_command() {
        let lost = Lost {
            slot: "walhook".into(),
            how: LostHow::Invalidated { cause: None },
            confirmed_lsn: Some("0/1A2B3C8".into()),
            confirmed_at: Some("2026-06-15T14:30:00.123456Z".into()),
        };
        let r = lost.reason();
        for needle in [
            "replication slot walhook lost",
            "invalidated",
            "max_slot_wal_keep_size",
            "0/1A2B3C8",
            "2026-06-15T14:30:00.123456Z",
            "walhook slot-reset",
        ] {
            assert!(r.contains(needle), "{needle} missing from {r}");
        }
        let idle = Lost { how: LostHow::Invalidated { cause: Some("idle_timeout".into()) }, ..lost };
        assert!(idle.reason().contains("idle_replication_slot_timeout"), "{}", idle.reason());
    }
}
