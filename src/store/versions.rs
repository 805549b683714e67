//! `walhook.endpoint_versions` and `walhook.routing_slots`: the routing state of each endpoint
//! per slot and position (`crate::source::route_versions` says what must hold of them).
//!
//! What must hold here: functions taking a transaction write only inside it (slot-reset
//! replaces the slot, records the gap and starts the versions over in one transaction); a
//! slot is seeded from the current endpoint rows once, when its `routing_slots` row is new.

use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use crate::model::columns::UpdateColumns;
use crate::model::delivery::{Routing, Sending};
use crate::pg::db::DbError;

/// One endpoint's routing state from a position on (what is versioned: no URL, no secret).
#[derive(Debug, Clone, Copy)]
pub struct State<'a> {
    /// Owning account.
    pub account_id: Uuid,
    /// Subscribed event names.
    pub events: &'a [String],
    /// Enabled?
    pub is_active: bool,
    /// Why walhook disabled it itself.
    pub disabled_reason: Option<&'a str>,
    /// Changed-column filters of updates.
    pub update_columns: Option<&'a UpdateColumns>,
}

impl<'a> State<'a> {
    /// The versioned part of `routing`.
    pub fn of(routing: &'a Routing) -> Self {
        State {
            account_id: routing.account_id,
            events: &routing.events,
            is_active: routing.is_active,
            disabled_reason: routing.disabled_reason.as_deref(),
            update_columns: routing.update_columns.as_ref(),
        }
    }
}

/// The latest version of an endpoint valid at a position, with how its requests are made now
/// (`None` when its row is gone).
#[derive(Debug)]
pub struct Valid {
    /// The endpoint.
    pub endpoint_id: Uuid,
    /// Its routing state then.
    pub routing: Routing,
    /// Its current URL and stored secrets.
    pub sending: Option<Sending>,
}

/// The latest version of each endpoint of `slot` valid at `position`, endpoints deleted by
/// then left out.
pub async fn valid_at(client: &impl GenericClient, slot: &str, position: i64) -> Result<Vec<Valid>, DbError> {
    let rows = client
        .query(
            "SELECT v.endpoint_id, v.account_id, v.events, v.is_active, v.disabled_reason, v.update_columns, \
                    e.url, e.secret, e.previous_secret, e.previous_secret_expires_at \
             FROM (SELECT DISTINCT ON (endpoint_id) * FROM walhook.endpoint_versions \
                   WHERE slot = $1 AND valid_from <= $2 ORDER BY endpoint_id, valid_from DESC) v \
             LEFT JOIN walhook.endpoints e ON e.id = v.endpoint_id \
             WHERE NOT v.deleted",
            &[&slot, &position],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Valid {
            endpoint_id: r.get(0),
            routing: Routing {
                account_id: r.get(1),
                events: r.get(2),
                is_active: r.get(3),
                disabled_reason: r.get(4),
                update_columns: r.get::<_, Option<Json<UpdateColumns>>>(5).map(|j| j.0),
            },
            sending: match (r.get::<_, Option<String>>(6), r.get::<_, Option<String>>(7)) {
                (Some(url), Some(secret)) => {
                    Some(Sending { url, secret, previous_secret: r.get(8), previous_expires_at: r.get(9) })
                }
                _ => None,
            },
        })
        .collect())
}

/// Forgets every version of `slot` and its seeded mark, inside `tx`.
pub async fn forget(tx: &Transaction<'_>, slot: &str) -> Result<(), DbError> {
    tx.execute("DELETE FROM walhook.endpoint_versions WHERE slot = $1", &[&slot]).await?;
    tx.execute("DELETE FROM walhook.routing_slots WHERE slot = $1", &[&slot]).await?;
    Ok(())
}

/// Stores endpoint `id`'s routing state from `valid_from` on (`None`: deleted), inside `tx`.
pub async fn put(
    tx: &Transaction<'_>,
    slot: &str,
    id: Uuid,
    valid_from: i64,
    state: Option<State<'_>>,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO walhook.endpoint_versions \
             (slot, endpoint_id, valid_from, deleted, account_id, events, is_active, disabled_reason, update_columns) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (slot, endpoint_id, valid_from) DO UPDATE SET deleted = EXCLUDED.deleted, \
             account_id = EXCLUDED.account_id, events = EXCLUDED.events, is_active = EXCLUDED.is_active, \
             disabled_reason = EXCLUDED.disabled_reason, update_columns = EXCLUDED.update_columns",
        &[
            &slot,
            &id,
            &valid_from,
            &state.is_none(),
            &state.map(|s| s.account_id),
            &state.map(|s| s.events),
            &state.map(|s| s.is_active),
            &state.and_then(|s| s.disabled_reason),
            &state.and_then(|s| s.update_columns).map(Json),
        ],
    )
    .await?;
    Ok(())
}

/// Seeds `slot` from the current endpoint rows at position 0 unless it was seeded before,
/// inside `tx`; how many versions it seeded (`None`: seeded before).
pub async fn seed_if_new(tx: &Transaction<'_>, slot: &str) -> Result<Option<u64>, DbError> {
    let new =
        tx.execute("INSERT INTO walhook.routing_slots (slot) VALUES ($1) ON CONFLICT DO NOTHING", &[&slot]).await?;
    if new != 1 {
        return Ok(None);
    }
    let n = tx
        .execute(
            "INSERT INTO walhook.endpoint_versions \
                 (slot, endpoint_id, valid_from, deleted, account_id, events, is_active, disabled_reason, update_columns) \
             SELECT $1, id, 0, false, account_id, events, is_active, disabled_reason, update_columns \
             FROM walhook.endpoints",
            &[&slot],
        )
        .await?;
    Ok(Some(n))
}

/// Deletes versions of `slot` superseded at or below `confirmed`, and those of endpoints
/// deleted by then; how many of each.
pub async fn compact(client: &impl GenericClient, slot: &str, confirmed: i64) -> Result<(u64, u64), DbError> {
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
    Ok((superseded, deleted))
}
