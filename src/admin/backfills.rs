//! Backfills through the admin API (`webhooks-backfill`, `-backfill-get`, `-backfill-cancel`):
//! checking what is asked, starting, showing and cancelling. The streaming replica's
//! `source::backfill` does the reading and sending.
//!
//! What must hold (docs/architecture.md, invariants 3 and 9): only the caller's endpoint is
//! backfilled and only its account's rows are read; only tables whose events the endpoint
//! subscribes to are backfilled (naming one it does not is refused, naming the table); an
//! inactive endpoint is refused (nothing would be sent); one backfill runs per endpoint; a
//! refused call changes nothing; a backfill of another account looks missing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::admin::endpoints::{invalid, Caller, EndpointError, Endpoints};
use crate::model::event::{EventType, Table};
use crate::store;
use crate::store::backfills::{StartError, StoredBackfill};

/// The backfill object of the API.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackfillView {
    /// Its id (for `webhooks-backfill-get` and `-cancel`).
    pub id: Uuid,
    /// The endpoint it sends to.
    pub endpoint_id: Uuid,
    /// The tables it reads, in order.
    pub tables: Vec<String>,
    /// `running`, `finished`, `cancelled` or `failed`.
    pub status: String,
    /// Why it failed (`null` otherwise).
    pub reason: Option<String>,
    /// Rows sent so far (in chunks that are delivered or stored for retry).
    pub rows_sent: i64,
    /// The account's rows in those tables when it started (`null` until counted).
    pub rows_total_estimate: Option<i64>,
    /// When it was asked for.
    pub started_at: DateTime<Utc>,
    /// When it finished, was cancelled or failed (`null` while running).
    pub finished_at: Option<DateTime<Utc>>,
}

fn view(b: StoredBackfill) -> BackfillView {
    BackfillView {
        id: b.id,
        endpoint_id: b.endpoint_id,
        tables: b.tables,
        status: b.status,
        reason: b.reason,
        rows_sent: b.rows_sent,
        rows_total_estimate: b.rows_total_estimate,
        started_at: b.started_at,
        finished_at: b.finished_at,
    }
}

/// The tables of `subscribed` events, in [`Table::ALL`] order.
fn subscribed_tables(events: &[String]) -> Vec<Table> {
    Table::ALL
        .into_iter()
        .filter(|t| events.iter().filter_map(|e| EventType::parse(e)).any(|e| e.table == *t))
        .collect()
}

/// `tables` as asked (absent: every subscribed table), checked against the endpoint's
/// subscriptions; in [`Table::ALL`] order, each once.
pub fn tables_to_backfill(asked: Option<&[String]>, events: &[String]) -> Result<Vec<Table>, EndpointError> {
    let subscribed = subscribed_tables(events);
    let Some(asked) = asked else { return Ok(subscribed) };
    if asked.is_empty() {
        return Err(invalid("tables must list at least one table (or be left out: every subscribed table)"));
    }
    let mut unknown = Vec::new();
    let mut unsubscribed = Vec::new();
    for name in asked {
        match Table::from_name(name) {
            None => unknown.push(format!("{:?}", name.chars().take(64).collect::<String>())),
            Some(t) if !subscribed.contains(&t) => unsubscribed.push(name.clone()),
            Some(_) => {}
        }
    }
    if !unknown.is_empty() {
        return Err(invalid(format!(
            "tables: unknown table {} (the tables are contacts, companies, activities and projects)",
            unknown.join(", ")
        )));
    }
    if !unsubscribed.is_empty() {
        return Err(invalid(format!(
            "tables: the endpoint subscribes to no event of {}; subscribe to one (webhooks-update) or leave the \
             table out",
            unsubscribed.join(", ")
        )));
    }
    Ok(subscribed.into_iter().filter(|t| asked.iter().any(|n| n == t.name())).collect())
}

impl Endpoints {
    /// Starts a backfill of the caller's endpoint `id`.
    pub async fn backfill(
        &self,
        caller: Caller,
        id: Uuid,
        tables: Option<&[String]>,
    ) -> Result<BackfillView, EndpointError> {
        let client = self.db().get().await?;
        let endpoint =
            store::endpoints::get_in_account(&**client, caller.account_id, id).await?.ok_or(EndpointError::NotFound)?;
        let tables = tables_to_backfill(tables, &endpoint.events)?;
        if tables.is_empty() {
            return Err(invalid("the endpoint subscribes to no event of any table, so there is nothing to backfill"));
        }
        if !endpoint.is_active {
            return Err(invalid(
                "the endpoint is inactive, so backfilled rows would not be sent: enable it first (webhooks-update \
                 with is_active true)",
            ));
        }
        let names: Vec<String> = tables.iter().map(|t| t.name().to_owned()).collect();
        match store::backfills::start(&**client, caller.account_id, id, &names).await {
            Ok(b) => {
                tracing::info!(backfill = %b.id, endpoint = %id, account = %caller.account_id, tables = ?names, "backfill started");
                Ok(view(b))
            }
            Err(StartError::Running(running)) => Err(EndpointError::BackfillRunning(running)),
            Err(StartError::Db(e)) => Err(e.into()),
        }
    }

    /// The caller's backfill `id`.
    pub async fn backfill_get(&self, caller: Caller, id: Uuid) -> Result<BackfillView, EndpointError> {
        let client = self.db().get().await?;
        let found = store::backfills::get_in_account(&**client, caller.account_id, id).await?;
        found.map(view).ok_or(EndpointError::BackfillNotFound)
    }

    /// Cancels the caller's backfill `id` (one that has ended is answered as it is).
    pub async fn backfill_cancel(&self, caller: Caller, id: Uuid) -> Result<BackfillView, EndpointError> {
        let client = self.db().get().await?;
        let found = store::backfills::cancel_in_account(&**client, caller.account_id, id).await?;
        let b = found.ok_or(EndpointError::BackfillNotFound)?;
        if b.status == "cancelled" {
            tracing::info!(backfill = %b.id, endpoint = %b.endpoint_id, account = %caller.account_id, rows_sent = b.rows_sent, "backfill cancelled");
        }
        Ok(view(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tables: Vec<Table>) -> Vec<&'static str> {
        tables.into_iter().map(Table::name).collect()
    }

    #[test]
    fn tables_default_to_the_subscribed_ones_and_refuse_others_by_name() {
        let events: Vec<String> = ["project.deleted", "contact.updated"].map(String::from).to_vec();
        assert_eq!(names(tables_to_backfill(None, &events).unwrap()), ["contacts", "projects"]);
        let asked: Vec<String> = ["projects", "contacts", "projects"].map(String::from).to_vec();
        assert_eq!(names(tables_to_backfill(Some(&asked), &events).unwrap()), ["contacts", "projects"]);
        let e = tables_to_backfill(Some(&["companies".into()]), &events).unwrap_err().to_string();
        assert!(e.contains("tables") && e.contains("companies"), "{e}");
        let e = tables_to_backfill(Some(&["deals".into(), "contact".into()]), &events).unwrap_err().to_string();
        assert!(e.contains("\"deals\"") && e.contains("\"contact\""), "{e}");
        assert!(tables_to_backfill(Some(&[]), &events).is_err());
    }
}
