//! `walhook.endpoints`: every query on it, and the one decoding of its rows.
//!
//! What must hold: an endpoint row is read into [`StoredEndpoint`] by [`decode`] only, from
//! the columns of [`COLUMNS`] (the admin API, routing's start-up load, routing versions and
//! the outbox's claim all read it so); the queries of one account (`*_in_account`) are scoped
//! to it by their `WHERE`; functions taking a transaction run inside the caller's, so its
//! boundaries stay where the caller draws them (create's quota check and insert are one).

use chrono::{DateTime, Utc};
use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::model::columns::UpdateColumns;
use crate::model::delivery::{Routing, Sending};
use crate::pg::db::DbError;

/// The columns [`decode`] reads, in its order (prefix each with `e.` via [`columns_of`]).
pub const COLUMNS: &str = "id, account_id, created_by, url, description, secret, secret_prefix, events, is_active, \
                           disabled_reason, created_at, updated_at, signature_scheme, public_key, previous_secret, \
                           previous_secret_expires_at, update_columns";
/// How many columns [`COLUMNS`] has.
pub const COLUMN_COUNT: usize = 17;

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
    /// `v1` or `v1a`.
    pub signature_scheme: String,
    /// The `whpk_` public key of a `v1a` endpoint.
    pub public_key: Option<String>,
    /// The secret a rotation replaced, as stored (never shown by `Debug`).
    pub previous_secret: Option<String>,
    /// When the replaced secret stops signing.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Changed-column filters of updates.
    pub update_columns: Option<UpdateColumns>,
}

impl StoredEndpoint {
    /// Its routing state.
    pub fn routing(&self) -> Routing {
        Routing {
            account_id: self.account_id,
            events: self.events.clone(),
            is_active: self.is_active,
            disabled_reason: self.disabled_reason.clone(),
            update_columns: self.update_columns.clone(),
        }
    }

    /// How its requests are made.
    pub fn sending(&self) -> Sending {
        Sending {
            url: self.url.clone(),
            secret: self.secret.clone(),
            previous_secret: self.previous_secret.clone(),
            previous_expires_at: self.previous_secret_expires_at,
        }
    }
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
            .field("signature_scheme", &self.signature_scheme)
            .field("previous_secret_expires_at", &self.previous_secret_expires_at)
            .field("update_columns", &self.update_columns)
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
        signature_scheme: row.get(c(12)),
        public_key: row.get(c(13)),
        previous_secret: row.get(c(14)),
        previous_secret_expires_at: row.get(c(15)),
        update_columns: row.get::<_, Option<Json<UpdateColumns>>>(c(16)).map(|j| j.0),
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
    /// `v1` or `v1a`.
    pub signature_scheme: &'a str,
    /// The `whpk_` public key of a `v1a` endpoint.
    pub public_key: Option<&'a str>,
    /// Validated changed-column filters.
    pub update_columns: Option<&'a UpdateColumns>,
}

/// Inserts an endpoint; returns the stored row.
pub async fn insert(client: &impl GenericClient, new: &Insert<'_>) -> Result<StoredEndpoint, DbError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO walhook.endpoints (id, account_id, created_by, url, description, secret, secret_prefix, events, \
                   signature_scheme, public_key, update_columns) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
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
                &new.signature_scheme,
                &new.public_key,
                &new.update_columns.map(Json),
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
    /// New changed-column filters (`Some(None)`: remove the filter).
    pub update_columns: Option<Option<&'a UpdateColumns>>,
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
                   update_columns = CASE WHEN $7 THEN $8 ELSE update_columns END, \
                   updated_at = greatest(now(), updated_at + interval '1 microsecond') \
                 WHERE id = $1 AND account_id = $2 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &account,
                &change.url,
                &change.description,
                &change.events,
                &change.is_active,
                &change.update_columns.is_some(),
                &change.update_columns.flatten().map(Json),
            ],
        )
        .await?;
    Ok(row.map(|r| decode(&r, 0)))
}

/// A new secret for endpoint `id` of `account` (all as stored): the current one is kept as
/// the previous one until `grace` from now (the database's clock) has passed, dropped at once
/// for a zero `grace`; a previous one still kept is dropped. `updated_at` moves. `None`: no
/// such endpoint there.
pub async fn rotate_in_account(
    client: &impl GenericClient,
    account: Uuid,
    id: Uuid,
    new: (&str, &str, Option<&str>),
    grace: std::time::Duration,
) -> Result<Option<StoredEndpoint>, DbError> {
    let (secret, prefix, public_key) = new;
    let row = client
        .query_opt(
            &format!(
                "UPDATE walhook.endpoints SET \
                   previous_secret = CASE WHEN $6::float8 > 0 THEN secret END, \
                   previous_secret_expires_at = CASE WHEN $6::float8 > 0 THEN now() + make_interval(secs => $6) END, \
                   secret = $3, secret_prefix = $4, public_key = $5, \
                   updated_at = greatest(now(), updated_at + interval '1 microsecond') \
                 WHERE id = $1 AND account_id = $2 RETURNING {COLUMNS}"
            ),
            &[&id, &account, &secret, &prefix, &public_key, &grace.as_secs_f64()],
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
        assert!(columns_of("e").ends_with(", e.previous_secret_expires_at, e.update_columns"));
    }
}
