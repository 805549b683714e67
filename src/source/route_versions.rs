//! Routing versions: the endpoint set as replication saw it, per slot and position, so a
//! replay routes with the endpoints of the change, not with today's.
//!
//! What must hold:
//! - Every endpoint change read from the stream is stored (`walhook.endpoint_versions`, the
//!   full merged routing state, valid from the end LSN of its commit) before that commit can
//!   be confirmed; a failed write ends the session unconfirmed.
//! - A session starts from the latest version of each endpoint valid at the slot's confirmed
//!   position (the leader alone moves it), so the changes it reads next are routed with the
//!   set the first pass had. Only routing is versioned (account, events, active, why
//!   disabled): no URL and no secret; sending uses the endpoint's current row, and an
//!   endpoint whose row is gone is skipped (its delete replays).
//! - A slot without versions is seeded from the current rows at position 0 once; a slot
//!   created anew (or reset) is seeded again, so versions of an older slot never apply.
//! - Superseded versions at or below the confirmed position are compacted at session start.

use std::collections::HashMap;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::source::route::{RouteError, Router, Routing};

/// The router for a new session of `slot`: the endpoint set valid at the slot's confirmed
/// position. Seeds the slot's versions first if it has none; compacts what is superseded.
pub(crate) async fn load(db: &Db, slot: &str, secrets: SecretBox) -> Result<Router, RouteError> {
    let mut client = db.get().await?;
    let confirmed: i64 = client
        .query_opt(
            "SELECT COALESCE((confirmed_flush_lsn - '0/0')::int8, 0) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(DbError::from)?
        .map(|r| r.get(0))
        .unwrap_or(0);
    {
        let tx = client.transaction().await.map_err(DbError::from)?;
        seed_if_new(&tx, slot).await?;
        tx.commit().await.map_err(DbError::from)?;
    }
    compact(&**client, slot, confirmed).await?;
    let rows = client
        .query(
            "SELECT v.endpoint_id, v.account_id, v.events, v.is_active, v.disabled_reason, e.url, e.secret \
             FROM (SELECT DISTINCT ON (endpoint_id) * FROM walhook.endpoint_versions \
                   WHERE slot = $1 AND valid_from <= $2 ORDER BY endpoint_id, valid_from DESC) v \
             LEFT JOIN walhook.endpoints e ON e.id = v.endpoint_id \
             WHERE NOT v.deleted",
            &[&slot, &confirmed],
        )
        .await
        .map_err(DbError::from)?;
    let mut router = Router::new(secrets);
    for r in &rows {
        let routing =
            Routing { account_id: r.get(1), events: r.get(2), is_active: r.get(3), disabled_reason: r.get(4) };
        let (url, secret): (Option<String>, Option<String>) = (r.get(5), r.get(6));
        router.set(r.get(0), routing, url.as_deref(), secret.as_deref())?;
    }
    tracing::debug!(slot, confirmed, endpoints = rows.len(), "routing versions loaded");
    Ok(router)
}

/// Forgets every routing version of `slot` and seeds it again from the current endpoint
/// rows at position 0, inside the caller's transaction: `walhook slot-reset` replaces the
/// slot, records the gap and starts the routing versions over at once, because what an
/// older slot saw does not apply to the new one.
pub(crate) async fn reset_in(tx: &tokio_postgres::Transaction<'_>, slot: &str) -> Result<(), DbError> {
    tx.execute("DELETE FROM walhook.endpoint_versions WHERE slot = $1", &[&slot]).await?;
    tx.execute("DELETE FROM walhook.routing_slots WHERE slot = $1", &[&slot]).await?;
    seed_if_new(tx, slot).await?;
    tracing::info!(slot, "routing versions reset to the current endpoints");
    Ok(())
}

/// Stores the routing state each endpoint in `changes` has from `valid_from` on (`None`:
/// deleted), and returns the current URL and stored secret of those that still exist.
pub(crate) async fn record(
    db: &Db,
    slot: &str,
    valid_from: u64,
    changes: &[(Uuid, Option<Routing>)],
) -> Result<HashMap<Uuid, (String, String)>, DbError> {
    let valid_from = valid_from as i64;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    for (id, routing) in changes {
        let r = routing.as_ref();
        tx.execute(
            "INSERT INTO walhook.endpoint_versions \
                 (slot, endpoint_id, valid_from, deleted, account_id, events, is_active, disabled_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (slot, endpoint_id, valid_from) DO UPDATE SET deleted = EXCLUDED.deleted, \
                 account_id = EXCLUDED.account_id, events = EXCLUDED.events, is_active = EXCLUDED.is_active, \
                 disabled_reason = EXCLUDED.disabled_reason",
            &[
                &slot,
                id,
                &valid_from,
                &r.is_none(),
                &r.map(|r| r.account_id),
                &r.map(|r| r.events.clone()),
                &r.map(|r| r.is_active),
                &r.and_then(|r| r.disabled_reason.clone()),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    let alive: Vec<Uuid> = changes.iter().filter(|(_, r)| r.is_some()).map(|(id, _)| *id).collect();
    let rows = client.query("SELECT id, url, secret FROM walhook.endpoints WHERE id = ANY($1)", &[&alive]).await?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// Seeds `slot` from the current endpoint rows at position 0 unless it was seeded before.
async fn seed_if_new(tx: &tokio_postgres::Transaction<'_>, slot: &str) -> Result<(), DbError> {
    let new =
        tx.execute("INSERT INTO walhook.routing_slots (slot) VALUES ($1) ON CONFLICT DO NOTHING", &[&slot]).await?;
    if new == 1 {
        let n = tx
            .execute(
                "INSERT INTO walhook.endpoint_versions \
                     (slot, endpoint_id, valid_from, deleted, account_id, events, is_active, disabled_reason) \
                 SELECT $1, id, 0, false, account_id, events, is_active, disabled_reason FROM walhook.endpoints",
                &[&slot],
            )
            .await?;
        tracing::info!(slot, endpoints = n, "routing versions seeded from the current endpoints");
    }
    Ok(())
}

/// Deletes versions superseded at or below `confirmed`, and endpoints deleted by then.
async fn compact(client: &impl GenericClient, slot: &str, confirmed: i64) -> Result<(), DbError> {
    let superseded = client
        .execute(
            "DELETE FROM walhook.endpoint_versions v WHERE v.slot = $1 AND v.valid_from < \
                 (SELECT max(w.valid_from) FROM walhook.endpoint_versions w \
                  WHERE w.slot = $1 AND w.endpoint_id = v.endpoint_id AND w.valid_from <= $2)",
            &[&slot, &confirmed],
        )
        .await?;
    let deleted = client
        .execute(
            "DELETE FROM walhook.endpoint_versions WHERE slot = $1 AND deleted AND valid_from <= $2",
            &[&slot, &confirmed],
        )
        .await?;
    if superseded + deleted > 0 {
        tracing::debug!(slot, superseded, deleted, "routing versions compacted");
    }
    Ok(())
}
