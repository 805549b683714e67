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
//!   disabled, changed-column filters): no URL and no secret; sending uses the endpoint's current row, and an
//!   endpoint whose row is gone is skipped (its delete replays).
//! - A slot without versions is seeded from the current rows at position 0 once; a slot
//!   created anew (or reset) is seeded again, so versions of an older slot never apply.
//! - Superseded versions at or below the confirmed position are compacted at session start.

use std::collections::HashMap;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::model::delivery::{Routing, Sending};
use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::source::route::{RouteError, Router};
use crate::store::versions;

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
    let rows = versions::valid_at(&**client, slot, confirmed).await?;
    let endpoints = rows.len();
    let mut router = Router::new(secrets);
    for v in rows {
        router.set(v.endpoint_id, v.routing, v.sending)?;
    }
    tracing::debug!(slot, confirmed, endpoints, "routing versions loaded");
    Ok(router)
}

/// Forgets every routing version of `slot` and seeds it again from the current endpoint
/// rows at position 0, inside the caller's transaction: `walhook slot-reset` replaces the
/// slot, records the gap and starts the routing versions over at once, because what an
/// older slot saw does not apply to the new one.
pub(crate) async fn reset_in(tx: &tokio_postgres::Transaction<'_>, slot: &str) -> Result<(), DbError> {
    versions::forget(tx, slot).await?;
    seed_if_new(tx, slot).await?;
    tracing::info!(slot, "routing versions reset to the current endpoints");
    Ok(())
}

/// Stores the routing state each endpoint in `changes` has from `valid_from` on (`None`:
/// deleted), and returns how requests of those that still exist are made now (URL, secrets).
pub(crate) async fn record(
    db: &Db,
    slot: &str,
    valid_from: u64,
    changes: &[(Uuid, Option<Routing>)],
) -> Result<HashMap<Uuid, Sending>, DbError> {
    let valid_from = valid_from as i64;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    for (id, routing) in changes {
        let state = routing.as_ref().map(versions::State::of);
        versions::put(&tx, slot, *id, valid_from, state).await?;
    }
    tx.commit().await?;
    let alive: Vec<Uuid> = changes.iter().filter(|(_, r)| r.is_some()).map(|(id, _)| *id).collect();
    let rows = crate::store::endpoints::by_ids(&**client, &alive).await?;
    Ok(rows.into_iter().map(|e| (e.id, e.sending())).collect())
}

/// Seeds `slot` from the current endpoint rows at position 0 unless it was seeded before.
async fn seed_if_new(tx: &tokio_postgres::Transaction<'_>, slot: &str) -> Result<(), DbError> {
    if let Some(n) = versions::seed_if_new(tx, slot).await? {
        tracing::info!(slot, endpoints = n, "routing versions seeded from the current endpoints");
    }
    Ok(())
}

/// Deletes versions superseded at or below `confirmed`, and endpoints deleted by then.
async fn compact(client: &impl GenericClient, slot: &str, confirmed: i64) -> Result<(), DbError> {
    let (superseded, deleted) = versions::compact(client, slot, confirmed).await?;
    if superseded + deleted > 0 {
        tracing::debug!(slot, superseded, deleted, "routing versions compacted");
    }
    Ok(())
}
