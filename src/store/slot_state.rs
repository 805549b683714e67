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

/// walhook's record of `slot`: the position it last confirmed and when (RFC 3339 UTC).
pub async fn confirmed(client: &impl GenericClient, slot: &str) -> Result<Option<(String, String)>, DbError> {
    let row = client
        .query_opt(
            concat!(
                "SELECT confirmed_lsn::text, ",
                utc_text!("confirmed_at"),
                " FROM walhook.slot_state WHERE slot = $1"
            ),
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Records that walhook streams from `slot`, starting at `lsn`.
pub async fn record_start(client: &impl GenericClient, slot: &str, lsn: &str) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO walhook.slot_state (slot, created_at, start_lsn, confirmed_lsn, confirmed_at) \
             VALUES ($1, now(), $2::text::pg_lsn, $2::text::pg_lsn, now()) \
             ON CONFLICT (slot) DO UPDATE SET created_at = now(), start_lsn = EXCLUDED.start_lsn, \
                 confirmed_lsn = EXCLUDED.confirmed_lsn, confirmed_at = now()",
            &[&slot, &lsn],
        )
        .await?;
    Ok(())
}

/// Copies the slot's confirmed position into its record when it moved, and once a minute
/// otherwise (so the time stays recent on an idle database without writing every few
/// seconds); a lost slot's record is left as it was.
pub async fn follow_confirmed(client: &impl GenericClient, slot: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE walhook.slot_state st SET confirmed_lsn = s.confirmed_flush_lsn, confirmed_at = now() \
             FROM pg_replication_slots s \
             WHERE st.slot = $1 AND s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL \
               AND s.wal_status IS DISTINCT FROM 'lost' \
               AND (s.confirmed_flush_lsn > st.confirmed_lsn OR st.confirmed_at < now() - interval '1 minute')",
            &[&slot],
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
