//! `walhook.slot_state` (the slot walhook streams from and how far it confirmed) and
//! `walhook.replication_gaps` (windows whose changes were not delivered).
//! `crate::source::slot` says what must hold of them.
//!
//! What must hold here: times are read and written as RFC 3339 UTC text ([`utc_text!`]), so
//! no client time zone or format setting changes them; the slot-lost gap is written on the
//! caller's connection or transaction (slot-reset records it in the transaction that creates
//! the new slot); a prerequisite's gap is opened at most once while it stays open.

use tokio_postgres::GenericClient;

use crate::pg::db::DbError;

/// `timestamptz` column `$c` as RFC 3339 UTC text, whatever the session's TimeZone.
macro_rules! utc_text {
    ($c:literal) => {
        concat!("to_char(", $c, " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    };
}
pub(crate) use utc_text;

/// walhook's record of a slot (`walhook.slot_state`).
#[derive(Debug, Clone)]
pub struct SlotRecord {
    /// The slot's confirmed position as last recorded.
    pub confirmed_lsn: String,
    /// No commit after `confirmed_lsn` happened before this time (RFC 3339 UTC).
    pub confirmed_at: String,
    /// The confirm ceiling (bytes since 0/0); `None` for a record from before it existed.
    pub ceiling: Option<i64>,
}

/// walhook's record of `slot`, if it has one.
pub async fn record(client: &impl GenericClient, slot: &str) -> Result<Option<SlotRecord>, DbError> {
    let row = client
        .query_opt(
            concat!(
                "SELECT confirmed_lsn::text, ",
                utc_text!("confirmed_at"),
                ", (confirm_ceiling - '0/0')::int8 FROM walhook.slot_state WHERE slot = $1"
            ),
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotRecord { confirmed_lsn: r.get(0), confirmed_at: r.get(1), ceiling: r.get(2) }))
}

/// Records that walhook streams from `slot`, starting at `lsn`: its confirmed position and
/// its confirm ceiling. (`now()` is no later than any commit after `lsn`: the slot's position
/// was read in this transaction or before it.)
pub async fn record_start(client: &impl GenericClient, slot: &str, lsn: &str) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO walhook.slot_state (slot, created_at, start_lsn, confirmed_lsn, confirmed_at, confirm_ceiling) \
             VALUES ($1, now(), $2::text::pg_lsn, $2::text::pg_lsn, now(), $2::text::pg_lsn) \
             ON CONFLICT (slot) DO UPDATE SET created_at = now(), start_lsn = EXCLUDED.start_lsn, \
                 confirmed_lsn = EXCLUDED.confirmed_lsn, confirmed_at = now(), \
                 confirm_ceiling = EXCLUDED.confirm_ceiling",
            &[&slot, &lsn],
        )
        .await?;
    Ok(())
}

/// Sets the confirm ceiling of a record from before ceilings existed to the slot's position.
pub async fn set_missing_ceiling(client: &impl GenericClient, slot: &str, lsn: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE walhook.slot_state SET confirm_ceiling = $2::text::pg_lsn WHERE slot = $1 AND confirm_ceiling IS NULL",
            &[&slot, &lsn],
        )
        .await?;
    Ok(())
}

/// A raised confirm ceiling: up to where walhook may confirm now, and where the WAL ended
/// after the raise itself (a later position is more than walhook's own write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The new ceiling (bytes since 0/0).
    pub ceiling: u64,
    /// The WAL insert position after the raise committed.
    pub after: u64,
}

/// Raises `slot`'s confirm ceiling to `to` (bytes since 0/0: a position walhook has handled
/// everything up to), only while the slot's confirmed position is still at or below the old
/// ceiling (so the slot is still the one walhook streamed from). `None` when it is not
/// (replaced, advanced by someone else, or gone).
pub async fn raise_ceiling(client: &impl GenericClient, slot: &str, to: u64) -> Result<Option<Raised>, DbError> {
    let to = format!("{:X}/{:X}", to >> 32, to & 0xFFFF_FFFF);
    let raised = client
        .query_opt(
            "UPDATE walhook.slot_state SET confirm_ceiling = GREATEST(confirm_ceiling, $2::text::pg_lsn) \
             WHERE slot = $1 AND confirm_ceiling IS NOT NULL \
               AND (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1) <= confirm_ceiling \
             RETURNING (confirm_ceiling - '0/0')::int8",
            &[&slot, &to],
        )
        .await?;
    let Some(row) = raised else { return Ok(None) };
    let after: i64 = client.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[]).await?.get(0);
    Ok(Some(Raised { ceiling: row.get::<_, i64>(0) as u64, after: after as u64 }))
}

/// Records `slot`'s confirmed position `lsn` when it moved past the recorded one, with `at`
/// (a time no commit after `lsn` precedes; when `None` the recorded time stays, which is
/// earlier and so still true). A lost slot's record is left as it was.
pub async fn follow_confirmed(
    client: &impl GenericClient,
    slot: &str,
    lsn: &str,
    at: Option<&str>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE walhook.slot_state SET confirmed_lsn = $2::text::pg_lsn, \
                 confirmed_at = COALESCE($3::text::timestamptz, confirmed_at) \
             WHERE slot = $1 AND $2::text::pg_lsn > confirmed_lsn",
            &[&slot, &lsn, &at],
        )
        .await?;
    Ok(())
}

/// Records the gap left by lost slot `slot`, from `from_lsn` (at `from_time`, if known) to
/// the new slot's `to_lsn` now; the gap's id and its end time (RFC 3339 UTC).
pub async fn record_slot_lost_gap(
    client: &impl GenericClient,
    slot: &str,
    reason: &str,
    from: (&str, Option<&str>),
    to_lsn: &str,
) -> Result<(i64, String), DbError> {
    let r = client
        .query_one(
            concat!(
                "INSERT INTO walhook.replication_gaps (slot, kind, reason, from_lsn, from_time, to_lsn, to_time) \
                 VALUES ($1, 'slot_lost', $2, $3::text::pg_lsn, $4::text::timestamptz, $5::text::pg_lsn, clock_timestamp()) \
                 RETURNING id, ",
                utc_text!("to_time")
            ),
            &[&slot, &reason, &from.0, &from.1, &to_lsn],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Opens a gap of `kind` for `slot` from (`lsn`, `at`) unless one is open already (left by
/// an earlier process).
pub async fn open_gap(
    client: &impl GenericClient,
    slot: &str,
    kind: &str,
    reason: &str,
    (lsn, at): (Option<&str>, Option<&str>),
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO walhook.replication_gaps (slot, kind, reason, from_lsn, from_time) \
             SELECT $1, $2, $3, $4::text::pg_lsn, $5::text::timestamptz \
             WHERE NOT EXISTS (SELECT 1 FROM walhook.replication_gaps \
                               WHERE slot = $1 AND kind = $2 AND to_time IS NULL)",
            &[&slot, &kind, &reason, &lsn, &at],
        )
        .await?;
    Ok(())
}

/// Closes the open gaps of `kind` for `slot` at (`lsn`, `at`); how many it closed.
pub async fn close_gaps(
    client: &impl GenericClient,
    slot: &str,
    kind: &str,
    (lsn, at): (&str, &str),
) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "UPDATE walhook.replication_gaps SET to_lsn = $3::text::pg_lsn, to_time = $4::text::timestamptz \
             WHERE slot = $1 AND kind = $2 AND to_time IS NULL",
            &[&slot, &kind, &lsn, &at],
        )
        .await?)
}
