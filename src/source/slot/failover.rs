//! A slot made with `failover = false` (before an upgrade to PostgreSQL 17, or by hand) is
//! turned into a failover slot, so that a synchronising standby carries it.
//!
//! What must hold: it happens only on a primary of PostgreSQL 17 or later, only between
//! sessions (the slot is not streamed: `ALTER_REPLICATION_SLOT` must acquire it), with one
//! INFO line when done; when it cannot be done, one WARN says how to do it by hand, and
//! streaming goes on (a slot without failover still streams; only a failover loses it).

use pgwire_replication::ReplicationClient;

use crate::pg::db::Db;

/// Alters the slot to `failover = true` where that is needed and possible; `true` when it did.
pub async fn ensure(db: &Db, slot: &str, publication: &str, warned: &mut bool) -> bool {
    let view = match db.get().await {
        Ok(client) => crate::pg::failover::inspect(&**client, slot).await,
        Err(e) => Err(e),
    };
    let Ok(view) = view else { return false };
    if !view.supported() || view.slot_failover != Some(false) {
        return false;
    }
    match alter(db, slot, publication).await {
        Ok(()) => {
            tracing::info!(
                slot,
                "replication slot altered to failover = true (PostgreSQL 17+): a standby with sync_replication_slots \
                 = on now carries it over a failover"
            );
            true
        }
        Err(e) => {
            if !std::mem::replace(warned, true) {
                tracing::warn!(
                    slot,
                    error = %e,
                    "replication slot has failover = false and could not be altered, so no standby carries it: as a \
                     role with REPLICATION, while walhook is stopped, run psql \"dbname=... replication=database\" -c \
                     'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)'"
                );
            }
            false
        }
    }
}

/// `ALTER_REPLICATION_SLOT` on a replication connection of its own.
async fn alter(db: &Db, slot: &str, publication: &str) -> Result<(), String> {
    let cfg = db.replication_config(slot, publication).map_err(|e| e.to_string())?.with_application_name("walhook");
    let mut client = ReplicationClient::connect_gated(cfg).await.map_err(|e| e.to_string())?;
    // Slot names are a-z, 0-9 and _ (PostgreSQL refuses others): quoting cannot be escaped.
    let done = client.simple_query(&format!("ALTER_REPLICATION_SLOT \"{slot}\" ( FAILOVER true )")).await;
    client.abort();
    done.map(|_| ()).map_err(|e| e.to_string())
}
