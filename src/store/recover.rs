//! The writes of the recovery operations: `webhooks-recover` (an endpoint's failed deliveries
//! of a window), `webhooks-redeliver` (one delivery, whatever its status) and
//! `webhooks-replay` (an endpoint's finished deliveries of a window) make deliveries pending
//! again; the streaming replica then releases them (`StoreOp::ReleaseHeld`, through the
//! store writer).
//!
//! What must hold: one transaction does each call, or nothing of it. A requeued delivery keeps
//! its id (its `webhook-id`), is due now with a fresh retry schedule (`retry_base`: its attempt
//! records keep counting), and is *held*, tagged with the call (`held_by`, its transaction
//! id): the outbox does not send it yet. Its endpoint row's `requeue_tag` takes the tag in the
//! same transaction (and `requeued_at` the time); that row is published, so the streaming
//! replica reads the change at this commit, whichever replica served the call, and then
//! releases the deliveries of that tag with their place in each row's queue set to that
//! commit: behind everything of the row committed before it (stored or sent first, in flight
//! included), ahead of everything committed after (docs/architecture.md, invariant 4). Among
//! the deliveries one call requeues, a row keeps commit order. Only deliveries whose payload
//! is still stored are requeued (one without could never be sent), and the payload is locked
//! (`FOR KEY SHARE`) until the call commits, so retention cannot delete it meanwhile. A
//! pending delivery is made due now with a fresh schedule, keeping its place; one being
//! attempted at that moment is left to its attempt. A call that requeues nothing changes
//! nothing. `walhook slot-reset` releases whatever is held ([`release_all_held`]).

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::pg::db::DbError;

/// What the requeue of finished deliveries sets (`$held` is the call's tag): pending, due
/// now, a fresh schedule, held.
const REQUEUE: &str = "status = 'pending', next_attempt_at = now(), completed_at = NULL, last_error = NULL, \
     lease_until = NULL, leased_by = NULL, retry_base = d.attempt_count, held_by = $held, \
     queue_lsn = (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint";
/// The payload is still stored; locked until the call commits, so retention (which skips
/// locked payloads) cannot delete it under a delivery being requeued.
const HAS_PAYLOAD: &str = "EXISTS (SELECT 1 FROM walhook.events e WHERE e.id = d.event_id FOR KEY SHARE)";

/// Requeues the failed deliveries of `endpoint` committed in `[since, until)`; returns how
/// many.
pub async fn requeue_failed(
    client: &mut deadpool_postgres::Client,
    endpoint: Uuid,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let Some(tag) = mark_requeued(&tx, endpoint).await? else { return Ok(0) };
    let n = tx
        .execute(
            &format!(
                "UPDATE walhook.deliveries d SET {} \
                 WHERE d.endpoint_id = $1 AND d.status = 'failed' AND d.created_at >= $2 AND d.created_at < $3 \
                   AND {HAS_PAYLOAD}",
                REQUEUE.replace("$held", "$4")
            ),
            &[&endpoint, &since, &until, &tag],
        )
        .await?;
    if n > 0 {
        tx.commit().await?;
    }
    Ok(n)
}

/// What [`requeue_finished`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Deliveries requeued.
    pub requeued: u64,
    /// Finished deliveries of the window whose payload is no longer stored.
    pub unavailable: u64,
}

/// Requeues every finished (delivered or failed) delivery of `endpoint` committed in
/// `[since, until)`, of one of `event_types` when given.
pub async fn requeue_finished(
    client: &mut deadpool_postgres::Client,
    endpoint: Uuid,
    (since, until): (DateTime<Utc>, DateTime<Utc>),
    event_types: Option<&[String]>,
) -> Result<Replayed, DbError> {
    let tx = client.transaction().await?;
    let Some(tag) = mark_requeued(&tx, endpoint).await? else { return Ok(Replayed::default()) };
    let window = "d.endpoint_id = $1 AND d.status <> 'pending' AND d.created_at >= $2 AND d.created_at < $3 \
                  AND ($4::text[] IS NULL OR d.event_type = ANY($4))";
    let requeued = tx
        .execute(
            &format!(
                "UPDATE walhook.deliveries d SET {} WHERE {window} AND {HAS_PAYLOAD}",
                REQUEUE.replace("$held", "$5")
            ),
            &[&endpoint, &since, &until, &event_types, &tag],
        )
        .await?;
    // What is left unsent in the window has no payload.
    let unavailable: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM walhook.deliveries d WHERE {window}"),
            &[&endpoint, &since, &until, &event_types],
        )
        .await?
        .get(0);
    if requeued > 0 {
        tx.commit().await?;
    }
    Ok(Replayed { requeued, unavailable: unavailable as u64 })
}

/// What [`redeliver`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Requeued (it was delivered or failed), or made due now (it was pending).
    Queued,
    /// Its payload is no longer stored.
    PayloadUnavailable,
    /// No such delivery of that endpoint.
    NotFound,
}

/// Sends delivery `id` of `endpoint` again: a finished one is requeued; a pending one is made
/// due now with a fresh schedule, keeping its place (one being attempted is left to its
/// attempt).
pub async fn redeliver(
    client: &mut deadpool_postgres::Client,
    endpoint: Uuid,
    id: Uuid,
) -> Result<Redelivery, DbError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT d.status, {HAS_PAYLOAD} FROM walhook.deliveries d WHERE d.id = $1 AND d.endpoint_id = $2 \
                 FOR UPDATE OF d"
            ),
            &[&id, &endpoint],
        )
        .await?;
    let Some(row) = row else { return Ok(Redelivery::NotFound) };
    let (status, has_payload): (String, bool) = (row.get(0), row.get(1));
    if !has_payload {
        return Ok(Redelivery::PayloadUnavailable);
    }
    if status == "pending" {
        tx.execute(
            "UPDATE walhook.deliveries d SET next_attempt_at = now(), retry_base = d.attempt_count \
             WHERE d.id = $1 AND (d.lease_until IS NULL OR d.lease_until < now())",
            &[&id],
        )
        .await?;
    } else {
        let Some(tag) = mark_requeued(&tx, endpoint).await? else { return Ok(Redelivery::NotFound) };
        let sql = format!("UPDATE walhook.deliveries d SET {} WHERE d.id = $1", REQUEUE.replace("$held", "$2"));
        tx.execute(&sql, &[&id, &tag]).await?;
    }
    tx.commit().await?;
    Ok(Redelivery::Queued)
}

/// Moves the endpoint row's `requeued_at` and `requeue_tag` (the call's transaction id: the
/// stream reads it; it tags the call's held deliveries) and returns the tag; `None` when the endpoint is gone. (The endpoint row is
/// locked before any delivery row, so two calls on one endpoint queue one behind the other.)
async fn mark_requeued(tx: &deadpool_postgres::Transaction<'_>, endpoint: Uuid) -> Result<Option<i64>, DbError> {
    let row = tx
        .query_opt(
            "UPDATE walhook.endpoints SET requeued_at = clock_timestamp(), requeue_tag = txid_current() \
             WHERE id = $1 RETURNING requeue_tag",
            &[&endpoint],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Releases every held delivery, in the transaction of `walhook slot-reset`: the requeues that
/// held them may lie before the new slot's start, where no session will read them, and the
/// order across a recorded gap is not kept anyway. Returns how many.
pub async fn release_all_held(client: &impl GenericClient) -> Result<u64, DbError> {
    Ok(client
        .execute("UPDATE walhook.deliveries SET held_by = NULL WHERE held_by IS NOT NULL AND status = 'pending'", &[])
        .await?)
}
