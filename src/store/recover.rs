//! `webhooks-recover`'s write: an endpoint's failed deliveries of a window become pending
//! again.
//!
//! What must hold: one transaction does all of it, or nothing: the deliveries keep their ids
//! (their `webhook-id`), are due now with a fresh retry schedule (`retry_base`: their attempt
//! records keep counting), and the endpoint row's `requeued_at` moves. That row is published,
//! so the streaming replica reads the change at this commit and queues the endpoint's later
//! changes behind the requeued deliveries, whichever replica served the call; within a row,
//! the outbox sends the oldest pending first (docs/architecture.md, invariant 4). Only failed
//! deliveries whose payload is still stored are requeued (one without could never be sent).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::pg::db::DbError;

/// Requeues the failed deliveries of `endpoint` committed in `[since, until)`; returns how
/// many.
pub async fn requeue_failed(
    client: &mut tokio_postgres::Client,
    endpoint: Uuid,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE walhook.deliveries d SET status = 'pending', next_attempt_at = now(), completed_at = NULL, \
                    last_error = NULL, lease_until = NULL, leased_by = NULL, retry_base = d.attempt_count \
             WHERE d.endpoint_id = $1 AND d.status = 'failed' AND d.created_at >= $2 AND d.created_at < $3 \
               AND EXISTS (SELECT 1 FROM walhook.events e WHERE e.id = d.event_id)",
            &[&endpoint, &since, &until],
        )
        .await?;
    if n > 0 {
        tx.execute("UPDATE walhook.endpoints SET requeued_at = clock_timestamp() WHERE id = $1", &[&endpoint]).await?;
    }
    tx.commit().await?;
    Ok(n)
}
