//! Reads of `walhook.deliveries` outside the writer: an endpoint's delivery history (paged
//! and filtered), a delivery's attempts, the outbox gauges (with the endpoint counts), and what replication's replay
//! may skip.
//!
//! What must hold: these only read; every write of a delivery row goes through the store
//! writer ([`crate::store::StoreWriter`]) or the outbox's claim ([`crate::store::outbox`]).
//! The replay filter answers from committed rows only: a delivery counts as recorded once
//! its row (delivered, failed or pending) is there, so a replay never sends it twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::ops::health::{GaugesFuture, OutboxGauges};
use crate::pg::db::DbError;

/// A delivery as `webhooks-deliveries` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeliveryView {
    /// Delivery id (also the `webhook-id` header).
    pub id: Uuid,
    /// e.g. `contact.created`.
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Last HTTP status received.
    pub http_status_code: Option<i32>,
    /// Attempts made.
    pub attempt_count: i32,
    /// When it was delivered or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When the change was committed.
    pub created_at: DateTime<Utc>,
}

/// Which deliveries of an endpoint a history page shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryFilter<'a> {
    /// Only this status (`pending`, `delivered`, `failed`).
    pub status: Option<&'a str>,
    /// Only this event type.
    pub event_type: Option<&'a str>,
    /// Only deliveries before this one in history order (`(commit_lsn, seq)`, exclusive).
    pub before: Option<(i64, i32)>,
}

/// Up to `limit` deliveries of `endpoint` matching `filter`, newest commit first, each with
/// its place in that order (the caller checks the endpoint belongs to its account). The order
/// is the commit order, so deliveries recorded later never shift a page already read.
pub async fn history_of_endpoint(
    client: &impl GenericClient,
    endpoint: Uuid,
    filter: HistoryFilter<'_>,
    limit: i64,
) -> Result<Vec<(DeliveryView, (i64, i32))>, DbError> {
    let (lsn, seq) = filter.before.unwrap_or((i64::MAX, i32::MAX));
    let rows = client
        .query(
            "SELECT id, event_type, status, http_status_code, attempt_count, completed_at, created_at, commit_lsn, seq \
             FROM walhook.deliveries \
             WHERE endpoint_id = $1 AND (commit_lsn, seq) < ($2, $3) \
               AND ($4::text IS NULL OR status = $4) AND ($5::text IS NULL OR event_type = $5) \
             ORDER BY commit_lsn DESC, seq DESC LIMIT $6",
            &[&endpoint, &lsn, &seq, &filter.status, &filter.event_type, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let view = DeliveryView {
                id: r.get(0),
                event_type: r.get(1),
                status: r.get(2),
                http_status_code: r.get(3),
                attempt_count: r.get(4),
                completed_at: r.get(5),
                created_at: r.get(6),
            };
            (view, (r.get(7), r.get(8)))
        })
        .collect())
}

/// Delivery `id` and its endpoint, or `None` when no endpoint of `account` has it.
pub async fn delivery_in_account(
    client: &impl GenericClient,
    account: Uuid,
    id: Uuid,
) -> Result<Option<(Uuid, DeliveryView)>, DbError> {
    let row = client
        .query_opt(
            "SELECT d.endpoint_id, d.id, d.event_type, d.status, d.http_status_code, d.attempt_count,                     d.completed_at, d.created_at              FROM walhook.deliveries d JOIN walhook.endpoints e ON e.id = d.endpoint_id              WHERE d.id = $1 AND e.account_id = $2",
            &[&id, &account],
        )
        .await?;
    Ok(row.map(|r| {
        let view = DeliveryView {
            id: r.get(1),
            event_type: r.get(2),
            status: r.get(3),
            http_status_code: r.get(4),
            attempt_count: r.get(5),
            completed_at: r.get(6),
            created_at: r.get(7),
        };
        (r.get(0), view)
    }))
}

/// One attempt as the attempt history shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i32,
    /// The status received, if any.
    pub http_status_code: Option<i32>,
    /// How it failed (`status`, `timeout`, `network`, `refused`, `payload`); `None` on 2xx.
    pub error_kind: Option<String>,
    /// What failed, in words.
    pub error: Option<String>,
    /// The first 1 KiB of the answer.
    pub response_snippet: Option<String>,
}

/// The newest `limit` attempts of delivery `id`, newest first, or `None` when no endpoint of
/// `account` has that delivery.
pub async fn attempts_in_account(
    client: &impl GenericClient,
    account: Uuid,
    id: Uuid,
    limit: i64,
) -> Result<Option<Vec<AttemptRecord>>, DbError> {
    let owned = client
        .query_opt(
            "SELECT 1 FROM walhook.deliveries d JOIN walhook.endpoints e ON e.id = d.endpoint_id \
             WHERE d.id = $1 AND e.account_id = $2",
            &[&id, &account],
        )
        .await?;
    if owned.is_none() {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT attempt, started_at, duration_ms, http_status_code, error_kind, error, response_snippet \
             FROM walhook.attempt_log WHERE delivery_id = $1 ORDER BY attempt DESC LIMIT $2",
            &[&id, &limit],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| AttemptRecord {
                attempt: r.get(0),
                started_at: r.get(1),
                duration_ms: r.get(2),
                http_status_code: r.get(3),
                error_kind: r.get(4),
                error: r.get(5),
                response_snippet: r.get(6),
            })
            .collect(),
    ))
}

/// The outbox and endpoint gauges (`ops::health`'s monitor reads them with this).
pub fn outbox_gauges(client: &tokio_postgres::Client) -> GaugesFuture<'_> {
    Box::pin(async move {
        let (pending, oldest_pending_age) = pending_gauges(client).await?;
        let (active_endpoints, disabled_endpoints) = crate::store::endpoints::counts(client).await?;
        Ok(OutboxGauges { pending, oldest_pending_age, active_endpoints, disabled_endpoints })
    })
}

/// Pending deliveries, and the age in seconds of the oldest one whose endpoint is active (0
/// when there is none): those of an endpoint paused by hand or deleted wait on purpose.
pub async fn pending_gauges(client: &impl GenericClient) -> Result<(i64, f64), DbError> {
    let r = client
        .query_one(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(d.created_at) FILTER (WHERE e.is_active))::float8, 0) \
             FROM walhook.deliveries d LEFT JOIN walhook.endpoints e ON e.id = d.endpoint_id \
             WHERE d.status = 'pending'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// The highest commit position (LSN as a number) any delivery was recorded at, 0 when none:
/// changes committed up to it may have been delivered already, so a replay checks them.
pub async fn last_recorded_commit(client: &impl GenericClient) -> Result<u64, DbError> {
    let row = client.query_one("SELECT COALESCE(max(commit_lsn), 0) FROM walhook.deliveries", &[]).await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The endpoints with a delivery waiting in the outbox.
pub async fn endpoints_with_pending(client: &impl GenericClient) -> Result<Vec<Uuid>, DbError> {
    let rows =
        client.query("SELECT DISTINCT endpoint_id FROM walhook.deliveries WHERE status = 'pending'", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Which of `ids` are recorded (a row exists, whatever its status): the replay filter.
pub async fn recorded_among(client: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<Uuid>, DbError> {
    let rows = client.query("SELECT id FROM walhook.deliveries WHERE id = ANY($1)", &[&ids]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
