//! `walhook slot-reset`: the operator's explicit word that a lost slot may be replaced.
//!
//! What must hold: a healthy slot is never touched (refused, saying what to do); an
//! invalidated one is dropped; the new slot, the gap row (from the last confirmed position and
//! time to the new slot's start) and the reset `walhook.slot_state` row commit together, so a
//! waiting walhook that sees the new slot also finds the gap recorded; if that transaction
//! fails, the new slot is dropped again. A *replaced* slot (one of that name walhook did not
//! create: confirmed past its ceiling) is not dropped, since whoever made it may manage it: it
//! is adopted, the gap running to its confirmed position, recorded in the same transaction.
//! Deliveries held by calls to send them again (`store::recover`) are released in the same
//! transaction: those calls may lie before the new slot's start, where no session reads them.

use tokio_postgres::GenericClient;

use super::{create, failover_supported, inspect, record_start, LostHow, SlotError};
use crate::config::Config;
use crate::pg::db::Db;

/// The window recorded in `walhook.replication_gaps`.
#[derive(Debug, Clone)]
pub struct Gap {
    /// Row id.
    pub id: i64,
    /// Last confirmed position of the lost slot.
    pub from_lsn: String,
    /// When walhook last saw it there (RFC 3339 UTC); unknown for a slot walhook never recorded.
    pub from_time: Option<String>,
    /// The new slot's start position.
    pub to_lsn: String,
    /// When the new slot was created (RFC 3339 UTC).
    pub to_time: String,
}

/// What `slot-reset` did, for the CLI to print.
#[derive(Debug, Clone)]
pub struct ResetReport {
    /// The slot.
    pub slot: String,
    /// Whether an invalidated slot was dropped first.
    pub dropped_invalidated: bool,
    /// Whether a slot walhook did not create was adopted instead of creating one.
    pub adopted: bool,
    /// The new slot's start position.
    pub start_lsn: String,
    /// Whether the slot was created with `failover = true` (PostgreSQL 17+).
    pub failover: bool,
    /// The recorded gap; `None` when walhook had never streamed from the slot.
    pub gap: Option<Gap>,
    /// Deliveries sent again by calls no session will read (held), released to the outbox.
    pub released_held: u64,
}

/// Replaces a missing or invalidated slot and records the gap.
pub async fn reset(db: &Db, cfg: &Config) -> Result<ResetReport, SlotError> {
    let slot = cfg.replication.slot.as_str();
    let mut client = db.connect().await?;
    let (row, record) = inspect(&client, slot).await?;
    let how = match &row {
        None => LostHow::Missing,
        Some(r) => {
            r.validate(slot)?;
            if r.invalidated() {
                client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await?;
                tracing::warn!(slot, "dropped the invalidated replication slot");
                LostHow::Invalidated { cause: r.invalidation.clone() }
            } else if record.is_some() && r.past(record.as_ref().and_then(|s| s.ceiling)) {
                if r.active {
                    return Err(SlotError::Busy {
                        slot: slot.to_owned(),
                        pid: r.pid,
                        application: r.application.clone(),
                    });
                }
                LostHow::Replaced { at: r.confirmed_lsn.clone().unwrap_or_default() }
            } else {
                let detail = format!(
                    "wal_status {}, confirmed up to {}, {}",
                    r.wal_status.as_deref().unwrap_or("unknown"),
                    r.confirmed_lsn.as_deref().unwrap_or("nothing yet"),
                    if r.active { "streamed right now" } else { "not streamed right now" }
                );
                return Err(SlotError::Healthy { slot: slot.to_owned(), detail });
            }
        }
    };
    let adopting = matches!(how, LostHow::Replaced { .. });
    let lost = super::Lost::new(slot, how, row.as_ref(), record);
    let failover = failover_supported(&client).await?;

    let mut created = None;
    let outcome = async {
        let tx = client.transaction().await?;
        // The slot first: creating a logical slot is refused after a write in the transaction.
        let start_lsn = match &lost.how {
            LostHow::Replaced { at } => at.clone(),
            _ => {
                let lsn = create(&tx, slot, failover).await?;
                created = Some(lsn.clone());
                lsn
            }
        };
        let gap = match &lost.confirmed_lsn {
            Some(from_lsn) => Some(record_gap(&tx, &lost, from_lsn, &start_lsn).await?),
            None => None,
        };
        reset_routing_versions(&tx, slot).await?;
        record_start(&tx, slot, &start_lsn).await?;
        // Calls to send deliveries again made while the slot was lost committed before the new
        // slot starts: no session reads them, so their held deliveries are released now.
        let released = crate::store::recover::release_all_held(&tx).await?;
        tx.commit().await?;
        Ok::<_, SlotError>((start_lsn, gap, released))
    }
    .await;
    let (start_lsn, gap, released_held) = match outcome {
        Ok(done) => done,
        Err(e) => {
            if created.is_some() {
                // Nothing was recorded: the new slot must not be streamed as if it were the old one.
                let _ = client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
            }
            return Err(e);
        }
    };
    if adopting {
        tracing::warn!(slot, start_lsn = %start_lsn, "adopted replication slot {slot}, which walhook did not create, at its confirmed position {start_lsn}");
    }
    if let Some(g) = &gap {
        tracing::warn!(
            slot,
            gap_id = g.id,
            from_lsn = %g.from_lsn,
            from_time = g.from_time.as_deref().unwrap_or("unknown"),
            to_lsn = %g.to_lsn,
            to_time = %g.to_time,
            "recorded replication gap {} ({}) to {} ({}): changes in between were not delivered",
            g.from_lsn,
            g.from_time.as_deref().unwrap_or("unknown time"),
            g.to_lsn,
            g.to_time
        );
    }
    Ok(ResetReport {
        slot: slot.to_owned(),
        dropped_invalidated: matches!(lost.how, LostHow::Invalidated { .. }),
        adopted: adopting,
        start_lsn,
        failover,
        gap,
        released_held,
    })
}

async fn record_gap(
    client: &impl GenericClient,
    lost: &super::Lost,
    from_lsn: &str,
    to_lsn: &str,
) -> Result<Gap, SlotError> {
    let reason = match &lost.how {
        LostHow::Missing => format!("replication slot {} was missing; replaced by walhook slot-reset", lost.slot),
        LostHow::Invalidated { cause } => format!(
            "replication slot {} was invalidated by PostgreSQL (wal_status = lost{}); replaced by walhook slot-reset",
            lost.slot,
            cause.as_deref().map(|c| format!(", invalidation_reason = {c}")).unwrap_or_default()
        ),
        LostHow::Replaced { at } => format!(
            "replication slot {} was replaced by one walhook did not create (confirmed up to {at}); adopted by \
             walhook slot-reset",
            lost.slot
        ),
    };
    let from = (from_lsn, lost.confirmed_at.as_deref());
    let (id, to_time) =
        crate::store::slot_state::record_slot_lost_gap(client, &lost.slot, &reason, from, to_lsn).await?;
    Ok(Gap {
        id,
        from_lsn: from_lsn.to_owned(),
        from_time: lost.confirmed_at.clone(),
        to_lsn: to_lsn.to_owned(),
        to_time,
    })
}

/// The slot's routing state starts over with the slot: the endpoint set kept for replays
/// belongs to the old slot's positions. Runs in slot-reset's transaction.
async fn reset_routing_versions(tx: &tokio_postgres::Transaction<'_>, slot: &str) -> Result<(), SlotError> {
    Ok(crate::source::route_versions::reset_in(tx, slot).await?)
}
