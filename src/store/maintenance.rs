//! Background upkeep, every `retention.interval`: disabling endpoints that have failed for
//! `dispatch.disable_after`, forgetting rotated-out signing secrets whose grace period has
//! ended, and retention of finished deliveries, their attempts and events.
//!
//! What must hold: retention deletes in batches of `retention.batch_size` rows (short
//! statements, `SKIP LOCKED`, so several replicas can run it and no sweep holds long locks);
//! it removes delivered rows older than `retention.delivered`, failed ones older than
//! `retention.failed`, the pending rows of deleted endpoints, and events no pending or failed
//! delivery needs that are older than `retention.payloads` when the payload archive is on, else
//! `retention.delivered` — never anything still pending for an existing endpoint, nor the
//! payload of a failed delivery `webhooks-recover` may requeue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::pg::db::{Db, DbError};
use crate::store::{StoreOp, DISABLED_FAILING};

/// Runs the upkeep loop until `shutdown`.
pub async fn run(
    db: Db,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    store: mpsc::Sender<StoreOp>,
    shutdown: CancellationToken,
) {
    let every = cfg.retention.interval.get();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = disable_failing(&db, &cfg, &store).await {
            tracing::warn!(error = %e, "checking for failing endpoints failed");
        }
        if let Err(e) = forget_expired_secrets(&db).await {
            tracing::warn!(error = %e, "forgetting expired rotated-out secrets failed");
        }
        if let Err(e) = sweep(&db, &cfg, &metrics, &shutdown).await {
            tracing::warn!(error = %e, "retention sweep failed");
        }
    }
}

/// Drops the rotated-out secrets whose grace period has ended (they no longer sign, and a
/// secret not kept cannot leak); `updated_at` does not move (nothing the customer set changed).
async fn forget_expired_secrets(db: &Db) -> Result<(), DbError> {
    let client = db.get().await?;
    let n = client
        .execute(
            "UPDATE walhook.endpoints SET previous_secret = NULL, previous_secret_expires_at = NULL \
             WHERE previous_secret_expires_at <= now()",
            &[],
        )
        .await?;
    if n > 0 {
        tracing::info!(endpoints = n, "forgot rotated-out signing secrets whose grace period ended");
    }
    Ok(())
}

/// Disables endpoints whose every attempt has failed for `dispatch.disable_after`.
async fn disable_failing(db: &Db, cfg: &Config, store: &mpsc::Sender<StoreOp>) -> Result<(), DbError> {
    let client = db.get().await?;
    let secs = cfg.dispatch.disable_after.get().as_secs_f64();
    let rows = client
        .query(
            "SELECT id FROM walhook.endpoints WHERE is_active AND failing_since < now() - make_interval(secs => $1)",
            &[&secs],
        )
        .await?;
    for r in rows {
        let id: Uuid = r.get(0);
        // The store writer logs and counts the disable once it is written.
        tracing::debug!(endpoint = %id, after = ?cfg.dispatch.disable_after.get(), "endpoint failing for dispatch.disable_after; disabling it");
        let _ = store.send(StoreOp::Disable { endpoint_id: id, reason: DISABLED_FAILING }).await;
    }
    Ok(())
}

/// One retention pass, batch by batch.
pub async fn sweep(db: &Db, cfg: &Config, metrics: &Metrics, shutdown: &CancellationToken) -> Result<(), DbError> {
    let batch = cfg.retention.batch_size;
    let delivered = cfg.retention.delivered.get().as_secs_f64();
    let failed = cfg.retention.failed.get().as_secs_f64();
    // Payloads no unsent delivery needs: kept for `retention.payloads` when the archive is on
    // (every event's payload is stored then), else for `retention.delivered`.
    let payloads = match cfg.retention.payloads.get() {
        archive if !archive.is_zero() => archive.as_secs_f64(),
        _ => delivered,
    };
    let finished = |status: &'static str, age: f64| async move {
        let client = db.get().await?;
        let row = client
            .query_one(
                "WITH gone AS ( \
                   DELETE FROM walhook.deliveries WHERE id IN ( \
                     SELECT id FROM walhook.deliveries \
                     WHERE status = $1 AND completed_at < now() - make_interval(secs => $2) \
                     LIMIT $3 FOR UPDATE SKIP LOCKED) \
                   RETURNING id), \
                 att AS (DELETE FROM walhook.attempts a USING gone WHERE a.delivery_id = gone.id RETURNING 1) \
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM att)",
                &[&status, &age, &batch],
            )
            .await?;
        Ok::<_, DbError>((row.get::<_, i64>(0), row.get::<_, i64>(1)))
    };
    for (status, age) in [("delivered", delivered), ("failed", failed)] {
        loop {
            let (deliveries, attempts) = finished(status, age).await?;
            metrics.retention_deleted.with_label_values(&["deliveries"]).inc_by(deliveries as u64);
            metrics.retention_deleted.with_label_values(&["attempts"]).inc_by(attempts as u64);
            if deliveries < batch || shutdown.is_cancelled() {
                break;
            }
        }
    }
    // Pending rows of endpoints that were deleted: never claimed again, so remove them.
    let orphans: Vec<Uuid> = {
        let client = db.get().await?;
        client
            .query(
                "SELECT p.endpoint_id FROM (SELECT DISTINCT endpoint_id FROM walhook.deliveries WHERE status = 'pending') p \
                 WHERE NOT EXISTS (SELECT 1 FROM walhook.endpoints e WHERE e.id = p.endpoint_id)",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    for endpoint in orphans {
        loop {
            let client = db.get().await?;
            let row = client
                .query_one(
                    "WITH gone AS ( \
                       DELETE FROM walhook.deliveries WHERE id IN ( \
                         SELECT id FROM walhook.deliveries WHERE endpoint_id = $1 AND status = 'pending' \
                         LIMIT $2 FOR UPDATE SKIP LOCKED) \
                       RETURNING id), \
                     att AS (DELETE FROM walhook.attempts a USING gone WHERE a.delivery_id = gone.id RETURNING 1) \
                     SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM att)",
                    &[&endpoint, &batch],
                )
                .await?;
            let (deliveries, attempts): (i64, i64) = (row.get(0), row.get(1));
            metrics.retention_deleted.with_label_values(&["deliveries"]).inc_by(deliveries as u64);
            metrics.retention_deleted.with_label_values(&["attempts"]).inc_by(attempts as u64);
            if deliveries < batch || shutdown.is_cancelled() {
                break;
            }
        }
    }
    // Payloads nothing pending needs any more, nor a failed delivery that may be recovered
    // (failed ones are removed after retention.failed, and their payload with them).
    loop {
        let client = db.get().await?;
        let n = client
            .execute(
                "DELETE FROM walhook.events WHERE id IN ( \
                   SELECT e.id FROM walhook.events e \
                   WHERE e.created_at < now() - make_interval(secs => $1) \
                     AND NOT EXISTS (SELECT 1 FROM walhook.deliveries d WHERE d.event_id = e.id AND d.status <> 'delivered') \
                   LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&payloads, &batch],
            )
            .await?;
        metrics.retention_deleted.with_label_values(&["events"]).inc_by(n);
        if (n as i64) < batch || shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
