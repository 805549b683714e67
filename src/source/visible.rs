//! Waiting until a transaction read from the stream is visible to queries.
//!
//! What must hold: walhook reads table state about a transaction it has just read from the
//! stream (an endpoint's current URL and secrets) only once a new snapshot sees that
//! transaction committed. PostgreSQL flushes a commit record, and a walsender may stream
//! it, before the committing backend leaves the proc array, and with synchronous
//! replication only after the standby answers: until then every new snapshot still sees the
//! transaction in progress. Read too early, a newly created endpoint looks deleted and
//! silently gets nothing. A wait that outlasts its bound ends the session, which reads the
//! transaction again; it is never skipped. A wait that lasts is reported (`/readyz` after
//! 30 s, through [`ReplicationStatus`]) and ends at shutdown.

use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::ops::status::ReplicationStatus;
use crate::pg::db::DbError;

/// Why a transaction could not be seen.
#[derive(Debug, thiserror::Error)]
pub enum VisibleError {
    /// The check failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The transaction stayed in progress to new snapshots for the whole bound.
    #[error(
        "transaction {xid} was read from the stream but queries still see it in progress after {waited:?} \
         (a synchronous standby not answering?); it is read again"
    )]
    NotYet {
        /// The transaction (the stream's 32-bit xid).
        xid: u32,
        /// How long walhook waited.
        waited: Duration,
    },
    /// Shutdown came first (the transaction is read again at the next start).
    #[error("shutting down while waiting for transaction {0} to become visible")]
    ShuttingDown(u32),
}

/// First pause between checks; each pause doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// Longest pause between checks.
const MAX_PAUSE: Duration = Duration::from_millis(50);
/// After this long a wait is logged (once).
const LOG_AFTER: Duration = Duration::from_secs(1);

/// Whether a new snapshot still sees `$1` in progress: listed in it, or at or past its
/// `xmax` (a transaction that has not left the proc array may be both the newest assigned
/// and not yet complete, so `xmax` is not past it). The stream gives 32-bit xids; the
/// snapshot's are 64-bit, so `$1` is placed within 2^31 of `xmax`, where an xid just
/// streamed must be.
const IN_PROGRESS: &str = "SELECT NOT pg_visible_in_snapshot( \
       (m.xmax + (($1 - (m.xmax & 4294967295) + 6442450944) % 4294967296) - 2147483648)::text::xid8, m.snap) \
     FROM (SELECT s.snap, pg_snapshot_xmax(s.snap)::text::int8 AS xmax \
           FROM (SELECT pg_current_snapshot() AS snap) s) m";

/// Returns once transaction `xid`, whose commit was read from the stream, is visible to new
/// snapshots; [`VisibleError::NotYet`] after `within`. `status` learns how long it waits.
pub async fn wait(
    client: &impl GenericClient,
    xid: u32,
    within: Duration,
    status: &ReplicationStatus,
    shutdown: &CancellationToken,
) -> Result<(), VisibleError> {
    let started = tokio::time::Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut logged = false;
    loop {
        let in_progress: bool = client.query_one(IN_PROGRESS, &[&i64::from(xid)]).await.map_err(DbError::from)?.get(0);
        if !in_progress {
            status.visible(xid);
            if logged {
                tracing::info!(xid, waited = ?started.elapsed(), "transaction read from the stream is visible now");
            }
            return Ok(());
        }
        let waited = started.elapsed();
        status.waiting_for_visibility(xid);
        if waited >= within {
            return Err(VisibleError::NotYet { xid, waited });
        }
        if waited >= LOG_AFTER && !logged {
            logged = true;
            tracing::warn!(xid, waited = ?waited, "waiting for a transaction read from the stream to become visible to queries (synchronous replication waiting for a standby?)");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(VisibleError::ShuttingDown(xid)),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
