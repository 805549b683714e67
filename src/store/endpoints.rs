//! `walhook.endpoints`: every query on it, and the one decoding of its rows.
//!
//! What must hold: an endpoint row is read into [`StoredEndpoint`] by [`decode`] only, from
//! the columns of [`COLUMNS`] (the admin API, routing's start-up load, routing versions and
//! the outbox's claim all read it so); the queries of one account (`*_in_account`) are scoped
//! to it by their `WHERE`; functions taking a transaction run inside the caller's, so its
//! boundaries stay where the caller draws them (create's quota check and insert are one).

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::pg::db::DbError;

/// The columns [`decode`] reads, in its order (prefix each with `e.` via [`columns_of`]).
pub const COLUMNS: &str = "id, account_id, created_by, url, description, secret, secret_prefix, events, is_active, \
                           disabled_reason, created_at, updated_at";
/// How many columns [`COLUMNS`] has.
pub const COLUMN_COUNT: usize = 12;

/// An endpoint row as stored.
#[derive(Clone, PartialEq)]
pub struct StoredEndpoint {
    /// Unique identifier.
    pub id: Uuid,
    /// Owning account.
    pub account_id: Uuid,
    /// User who created it.
    pub created_by: Uuid,
    /// Target URL, as stored (normalised).
    pub url: String,
    /// Description.
    pub description: String,
    /// The signing secret as stored (sealed, or plain before a key was configured); never
    /// shown by `Debug`.
    pub secret: String,
    /// First characters of the secret, for display.
    pub secret_prefix: String,
    /// Subscribed event names.
    pub events: Vec<String>,
    /// Enabled?
    pub is_active: bool,
    /// Why walhook disabled it itself (`None`: enabled, or disabled by hand).
    pub disabled_reason: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last update time.
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredEndpoint")
            .field("id", &self.id)
            .field("account_id", &self.account_id)
            .field("url", &self.url)
            .field("secret_prefix", &self.secret_prefix)
            .field("events", &self.events)
            .field("is_active", &self.is_active)
            .field("disabled_reason", &self.disabled_reason)
            .finish_non_exhaustive()
    }
}

/// [`COLUMNS`] with each column qualified by `alias` (`e` gives `e.id, e.account_id, …`).
pub fn columns_of(alias: &str) -> String {
    COLUMNS.split(", ").map(|c| format!("{alias}.{}", c.trim())).collect::<Vec<_>>().join(", ")
}

/// The endpoint in `row`'s columns `first..first + COLUMN_COUNT`, selected as [`COLUMNS`].
pub fn decode(row: &Row, first: usize) -> StoredEndpoint {
    let c = |i: usize| first + i;
    StoredEndpoint {
        id: row.get(c(0)),
        account_id: row.get(c(1)),
        created_by: row.get(c(2)),
        url: row.get(c(3)),
        description: row.get(c(4)),
        secret: row.get(c(5)),
        secret_prefix: row.get(c(6)),
        events: row.get(c(7)),
        is_active: row.get(c(8)),
        disabled_reason: row.get(c(9)),
        created_at: row.get(c(10)),
        updated_at: row.get(c(11)),
    }
}

/// Every endpoint.
pub async fn all(client: &impl GenericClient) -> Result<Vec<StoredEndpoint>, DbError> {
    let rows = client.query(&format!("SELECT {COLUMNS} FROM walhook.endpoints"), &[]).await?;
    Ok(rows.iter().map(|r| decode(r, 0)).collect())
}

/// The endpoints among `ids` that exist.
pub async fn by_ids(client: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<StoredEndpoint>, DbError> {
    let rows = client.query(&format!("SELECT {COLUMNS} FROM walhook.endpoints WHERE id = ANY($1)"), &[&ids]).await?;
    Ok(rows.iter().map(|r| decode(r, 0)).collect())
}

/// Whether endpoint `id` still exists and is active (an outbox attempt that waited long for its
/// connection or its bytes looks again before it sends).
pub async fn is_active(client: &impl GenericClient, id: Uuid) -> Result<bool, DbError> {
    let row = client.query_opt("SELECT is_active FROM walhook.endpoints WHERE id = $1", &[&id]).await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// How many endpoints `account` has.
pub async fn count_in_account(client: &impl GenericClient, account: Uuid) -> Result<i64, DbError> {
    Ok(client.query_one("SELECT count(*) FROM walhook.endpoints WHERE account_id = $1", &[&account]).await?.get(0))
}

/// The fields of a new endpoint row.
#[derive(Debug)]
pub struct Insert<'a> {
    /// New id.
    pub id: Uuid,
    /// Owning account.
    pub account_id: Uuid,
    /// Creating user.
    pub created_by: Uuid,
    /// Validated URL.
    pub url: &'a str,
    /// Validated description.
    pub description: &'a str,
    /// The secret as stored.
    pub secret: &'a str,
    /// Its display prefix.
    pub secret_prefix: &'a str,
    /// Validated event names.
    pub events: &'a [String],
}

/// Inserts an endpoint; returns the stored row.
pub async fn insert(client: &impl GenericClient, new: &Insert<'_>) -> Result<StoredEndpoint, DbError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO walhook.endpoints (id, account_id, created_by, url, description, secret, secret_prefix, events) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
            ),
            &[
                &new.id,
                &new.account_id,
                &new.created_by,
                &new.url,
                &new.description,
                &new.secret,
                &new.secret_prefix,
                &new.events,
            ],
        )
        .await?;
    Ok(decode(&row, 0))
}

/// Up to `limit` endpoints of `account`, newest first, after (`created_at`, `id`) `after`.
pub async fn page_in_account(
    client: &impl GenericClient,
    account: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<StoredEndpoint>, DbError> {
    let (at, id) = (after.map(|a| a.0), after.map(|a| a.1));
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM walhook.endpoints WHERE account_id = $1 \
                   AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
                 ORDER BY created_at DESC, id DESC LIMIT $4"
            ),
            &[&account, &at, &id, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| decode(r, 0)).collect())
}

/// Endpoint `id` of `account`.
pub async fn get_in_account(
    client: &impl GenericClient,
    account: Uuid,
    id: Uuid,
) -> Result<Option<StoredEndpoint>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM walhook.endpoints WHERE id = $1 AND account_id = $2"),
            &[&id, &account],
        )
        .await?;
    Ok(row.map(|r| decode(&r, 0)))
}

/// Changes to an endpoint row; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct Update<'a> {
    /// New URL (validated).
    pub url: Option<&'a str>,
    /// New description (validated).
    pub description: Option<&'a str>,
    /// New event names (validated).
    pub events: Option<&'a [String]>,
    /// Enable or disable; enabling a disabled endpoint clears its disable reason and failure
    /// streak.
    pub is_active: Option<bool>,
}

/// Updates endpoint `id` of `account`; `updated_at` moves. `None`: no such endpoint there.
pub async fn update_in_account(
    client: &impl GenericClient,
    account: Uuid,
    id: Uuid,
    change: &Update<'_>,
) -> Result<Option<StoredEndpoint>, DbError> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE walhook.endpoints SET url = COALESCE($3, url), description = COALESCE($4, description), \
                   events = COALESCE($5, events), is_active = COALESCE($6, is_active), \
                   disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END, \
                   failing_since = CASE WHEN $6 AND NOT is_active THEN NULL ELSE failing_since END, \
                   updated_at = greatest(now(), updated_at + interval '1 microsecond') \
                 WHERE id = $1 AND account_id = $2 RETURNING {COLUMNS}"
            ),
            &[&id, &account, &change.url, &change.description, &change.events, &change.is_active],
        )
        .await?;
    Ok(row.map(|r| decode(&r, 0)))
}

/// Deletes endpoint `id` of `account`; whether it was there.
pub async fn delete_in_account(client: &impl GenericClient, account: Uuid, id: Uuid) -> Result<bool, DbError> {
    let n = client.execute("DELETE FROM walhook.endpoints WHERE id = $1 AND account_id = $2", &[&id, &account]).await?;
    Ok(n > 0)
}

/// Endpoints (active, disabled) for the gauges.
pub async fn counts(client: &impl GenericClient) -> Result<(i64, i64), DbError> {
    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE is_active), count(*) FILTER (WHERE NOT is_active) FROM walhook.endpoints",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_counted_and_qualified() {
        assert_eq!(COLUMNS.split(", ").count(), COLUMN_COUNT);
        assert!(columns_of("e").starts_with("e.id, e.account_id, e.created_by, "));
        assert!(columns_of("e").ends_with(", e.updated_at"));
    }
}
