//! `walhook.backfills`: every query on it, and the one decoding of its rows.
//!
//! What must hold: a backfill is read and changed only within its account (`*_in_account`,
//! scoped by their `WHERE`), except by the streaming replica's backfill runner, which moves
//! running backfills on; one endpoint has at most one running backfill (the unique index
//! `backfills_one_running`, so two concurrent calls cannot both start one); progress only
//! moves while the backfill is running, and only forward, so a chunk settling after a cancel,
//! or late in a process that lost the lead, changes nothing.

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::pg::db::DbError;

/// The columns [`decode`] reads, in its order.
const COLUMNS: &str = "id, endpoint_id, account_id, tables, status, reason, rows_sent, rows_total_estimate, \
                       chunks, table_index, last_key, started_at, finished_at";

/// A backfill row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBackfill {
    /// Its id.
    pub id: Uuid,
    /// The endpoint it sends to.
    pub endpoint_id: Uuid,
    /// The endpoint's account (the only rows it reads).
    pub account_id: Uuid,
    /// CRM table names, read in this order.
    pub tables: Vec<String>,
    /// `running`, `finished`, `cancelled` or `failed`.
    pub status: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Rows handed to dispatch in settled chunks.
    pub rows_sent: i64,
    /// Rows of the account in its tables when it started (`None` until counted).
    pub rows_total_estimate: Option<i64>,
    /// Settled chunks.
    pub chunks: i64,
    /// The table being read: `tables[table_index]`.
    pub table_index: i32,
    /// The last key of that table whose chunk settled.
    pub last_key: Option<Uuid>,
    /// When it was asked for.
    pub started_at: DateTime<Utc>,
    /// When it finished, was cancelled or failed.
    pub finished_at: Option<DateTime<Utc>>,
}

fn decode(r: &Row) -> StoredBackfill {
    StoredBackfill {
        id: r.get(0),
        endpoint_id: r.get(1),
        account_id: r.get(2),
        tables: r.get(3),
        status: r.get(4),
        reason: r.get(5),
        rows_sent: r.get(6),
        rows_total_estimate: r.get(7),
        chunks: r.get(8),
        table_index: r.get(9),
        last_key: r.get(10),
        started_at: r.get(11),
        finished_at: r.get(12),
    }
}

/// Why a backfill could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The endpoint has a running backfill.
    #[error("backfill {0} of this endpoint is still running")]
    Running(Uuid),
    /// A query failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Starts a backfill of `tables` for the caller's endpoint `endpoint_id` (checked by the
/// caller in the same transaction); refused while one runs.
pub async fn start(
    client: &impl GenericClient,
    account_id: Uuid,
    endpoint_id: Uuid,
    tables: &[String],
) -> Result<StoredBackfill, StartError> {
    let id = Uuid::new_v4();
    let inserted = client
        .query_opt(
            &format!(
                "INSERT INTO walhook.backfills (id, endpoint_id, account_id, tables) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (endpoint_id) WHERE status = 'running' DO NOTHING RETURNING {COLUMNS}"
            ),
            &[&id, &endpoint_id, &account_id, &tables],
        )
        .await
        .map_err(DbError::from)?;
    if let Some(row) = inserted {
        return Ok(decode(&row));
    }
    let running = client
        .query_opt("SELECT id FROM walhook.backfills WHERE endpoint_id = $1 AND status = 'running'", &[&endpoint_id])
        .await
        .map_err(DbError::from)?;
    // (Finished between the two statements: the caller may simply call again.)
    Err(StartError::Running(running.map(|r| r.get(0)).unwrap_or_default()))
}

/// The caller's backfill `id`.
pub async fn get_in_account(
    client: &impl GenericClient,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<StoredBackfill>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM walhook.backfills WHERE id = $1 AND account_id = $2"),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(decode))
}

/// Cancels the caller's backfill `id` if it is running; the backfill as it is afterwards.
pub async fn cancel_in_account(
    client: &impl GenericClient,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<StoredBackfill>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE walhook.backfills SET status = 'cancelled', finished_at = now() \
                 WHERE id = $1 AND account_id = $2 AND status = 'running' RETURNING {COLUMNS}"
            ),
            &[&id, &account_id],
        )
        .await?;
    match row {
        Some(row) => Ok(Some(decode(&row))),
        None => get_in_account(client, account_id, id).await,
    }
}

/// Every running backfill, oldest first (the runner's work list).
pub async fn running(client: &impl GenericClient) -> Result<Vec<StoredBackfill>, DbError> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM walhook.backfills WHERE status = 'running' ORDER BY started_at, id"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(decode).collect())
}

/// Whether backfill `id` is still running.
pub async fn is_running(client: &impl GenericClient, id: Uuid) -> Result<bool, DbError> {
    let row = client.query_opt("SELECT 1 FROM walhook.backfills WHERE id = $1 AND status = 'running'", &[&id]).await?;
    Ok(row.is_some())
}

/// Records the row count found at the start.
pub async fn set_estimate(client: &impl GenericClient, id: Uuid, rows: i64) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE walhook.backfills SET rows_total_estimate = $2 WHERE id = $1 AND status = 'running'",
            &[&id, &rows],
        )
        .await?;
    Ok(())
}

/// A settled chunk: `rows` more sent, reading goes on after `last_key` of table `table_index`
/// (`None`: that table starts from its first key). Progress only moves forward (a process
/// that lost the lead and settles an older chunk late moves nothing). Whether it moved.
pub async fn advance(
    client: &impl GenericClient,
    id: Uuid,
    rows: i64,
    table_index: i32,
    last_key: Option<Uuid>,
) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE walhook.backfills SET rows_sent = rows_sent + $2, chunks = chunks + 1, table_index = $3, \
             last_key = $4 WHERE id = $1 AND status = 'running' \
             AND (table_index, coalesce(last_key, '00000000-0000-0000-0000-000000000000')) \
                 < ($3, coalesce($4::uuid, '00000000-0000-0000-0000-000000000000'))",
            &[&id, &rows, &table_index, &last_key],
        )
        .await?;
    Ok(n == 1)
}

/// Ends a running backfill as `finished`, or as `failed` with `reason`.
pub async fn end(client: &impl GenericClient, id: Uuid, failed: Option<&str>) -> Result<bool, DbError> {
    let status = if failed.is_some() { "failed" } else { "finished" };
    let n = client
        .execute(
            "UPDATE walhook.backfills SET status = $2, reason = $3, finished_at = now() \
             WHERE id = $1 AND status = 'running'",
            &[&id, &status, &failed],
        )
        .await?;
    Ok(n == 1)
}
