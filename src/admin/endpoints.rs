//! Webhook endpoints as customers manage them: validation, creation (with its signing
//! secret), listing, update, deletion and delivery history. The admin API is a thin layer
//! over this; tests use it directly.
//!
//! What must hold (docs/architecture.md, invariants 3 and 7): every query is scoped to the caller's account, and
//! another account's endpoint is indistinguishable from a missing one (`NotFound`); the full
//! secret leaves this module only once, from `create`; a request that fails validation
//! writes nothing; no text field stores a control character, a format character (such as a
//! right-to-left override or a zero-width space) or a line or paragraph separator; a URL is at most
//! `MAX_URL_LEN` characters as sent (the OpenAPI document's `maxLength`) and at most
//! `MAX_STORED_URL_LEN` as stored (normalised: a space becomes `%20`); an account never holds more
//! endpoints than its quota, however its creates interleave (they are serialised per account).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use url::{Host, Url};
use uuid::Uuid;

use crate::model::columns::UpdateColumns;
use crate::model::event::EventType;
use crate::pg::db::{Db, DbError};
use crate::security::secrets::{Scheme, SecretBox, SigningSecret};
use crate::security::ssrf::AddressPolicy;
use crate::store;
use crate::store::endpoints::StoredEndpoint;

/// Longest accepted URL, in characters as sent.
pub const MAX_URL_LEN: usize = 2048;
/// Longest URL stored and sent, once normalised (percent-encoding lengthens some characters).
pub const MAX_STORED_URL_LEN: usize = 8192;
/// Longest accepted description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 500;
/// Class of the transaction-level advisory lock that serialises one account's creates (the
/// two-key form, apart from the leader lock's single key).
const CREATE_LOCK_CLASS: i32 = 0x7768_6b71; // "whkq"

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's account; every query is scoped to it.
    pub account_id: Uuid,
    /// The caller, recorded as `created_by`.
    pub user_id: Uuid,
}

/// Why an endpoint operation was refused. Messages name the field and never echo secrets.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A field is malformed or out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// `url` is missing or empty.
    #[error("url is required")]
    UrlRequired,
    /// `url` is not an acceptable HTTPS URL.
    #[error("url {0}")]
    InvalidUrl(String),
    /// No such endpoint in the caller's account.
    #[error("webhook endpoint not found")]
    NotFound,
    /// No such delivery of an endpoint of the caller's account.
    #[error("delivery not found")]
    DeliveryNotFound,
    /// The delivery's payload is no longer stored, so it cannot be sent again.
    #[error(
        "the payload of this delivery is no longer stored, so it cannot be sent again; to keep every \
         event's payload, set retention.payloads (for example \"72h\"): deliveries made within that \
         window can then be redelivered and replayed"
    )]
    PayloadUnavailable,
    /// The account already has as many endpoints as its quota allows.
    #[error(
        "endpoint quota reached: this account already has {0} webhook endpoints, the most it may have; \
         delete one before creating another"
    )]
    QuotaReached(u32),
    /// The endpoint has a backfill running.
    #[error(
        "backfill {0} of this endpoint is still running: wait for it to finish (webhooks-backfill-get) or cancel \
         it (webhooks-backfill-cancel) first"
    )]
    BackfillRunning(Uuid),
    /// No such backfill in the caller's account.
    #[error("backfill not found")]
    BackfillNotFound,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A secret stored plain could not be re-encrypted.
    #[error(transparent)]
    Reseal(#[from] crate::store::secrets::ResealError),
}

impl From<crate::admin::columns::ColumnsError> for EndpointError {
    fn from(e: crate::admin::columns::ColumnsError) -> Self {
        match e {
            crate::admin::columns::ColumnsError::Invalid(msg) => EndpointError::InvalidRequest(msg),
            crate::admin::columns::ColumnsError::Db(e) => EndpointError::Db(e),
        }
    }
}

impl From<tokio_postgres::Error> for EndpointError {
    fn from(e: tokio_postgres::Error) -> Self {
        EndpointError::Db(DbError::Postgres(e))
    }
}

/// The endpoint object of the public API page.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointView {
    /// Unique identifier.
    pub id: Uuid,
    /// Account this webhook belongs to.
    pub account_id: Uuid,
    /// User who created it.
    pub created_by: Uuid,
    /// HTTPS endpoint URL.
    pub url: String,
    /// Description.
    pub description: String,
    /// First characters of the signing secret (of the public key, for `v1a`).
    pub secret_prefix: String,
    /// Subscribed events.
    pub events: Vec<String>,
    /// Whether the webhook is enabled.
    pub is_active: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last update time.
    pub updated_at: DateTime<Utc>,
    /// `v1` (HMAC-SHA256, shared secret) or `v1a` (ed25519).
    pub signature_scheme: String,
    /// The `whpk_` public key receivers verify `v1a` signatures with (`null` for `v1`).
    pub public_key: Option<String>,
    /// Changed-column filters of updates (`null`: none).
    pub update_columns: Option<UpdateColumns>,
    /// While a rotated-out secret still signs beside the current one: when it stops.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

/// Fields of a new endpoint.
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    /// Target URL (required).
    pub url: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Events to subscribe to (required, non-empty).
    pub events: Option<Vec<String>>,
    /// `v1` (the default) or `v1a`.
    pub signature_scheme: Option<String>,
    /// Changed-column filters, as sent (`null` or absent: none).
    pub update_columns: Option<serde_json::Value>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    /// New URL.
    pub url: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New subscriptions.
    pub events: Option<Vec<String>>,
    /// Enable or disable.
    pub is_active: Option<bool>,
    /// New changed-column filters, as sent (`Some(null)` or `Some({})`: remove the filter).
    pub update_columns: Option<serde_json::Value>,
}

/// What the API shows of a stored endpoint (never its secret).
pub(crate) fn view(e: StoredEndpoint) -> EndpointView {
    let now = Utc::now();
    EndpointView {
        signature_scheme: e.signature_scheme,
        public_key: e.public_key,
        update_columns: e.update_columns,
        previous_secret_expires_at: e.previous_secret_expires_at.filter(|at| *at > now),
        id: e.id,
        account_id: e.account_id,
        created_by: e.created_by,
        url: e.url,
        description: e.description,
        secret_prefix: e.secret_prefix,
        events: e.events,
        is_active: e.is_active,
        created_at: e.created_at,
        updated_at: e.updated_at,
    }
}

/// 9999-12-31T23:59:59.999999Z in microseconds since the Unix epoch.
const MAX_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// Where a `webhooks-list` page ends: the last endpoint shown, in list order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    created_at: DateTime<Utc>,
    id: Uuid,
}

impl ListCursor {
    /// The text handed to the client: `<microseconds>_<id>`, the OpenAPI document's pattern.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_at.timestamp_micros(), self.id)
    }

    /// Reads a cursor this module produced (also the base64 form earlier versions handed out).
    pub fn decode(text: &str) -> Result<Self, EndpointError> {
        let bad = || invalid("cursor is not one webhooks-list returned");
        let (micros, id) = match text.split_once('_') {
            Some((micros, id)) if micros.bytes().all(|b| b.is_ascii_digit()) && id.len() == 36 => {
                (micros.to_owned(), id.to_owned())
            }
            _ => {
                let raw = String::from_utf8(B64URL.decode(text).map_err(|_| bad())?).map_err(|_| bad())?;
                let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
                (micros.to_owned(), id.to_owned())
            }
        };
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        // Endpoints are created after 1970 and before 10000: anything outside is forged (and
        // could be outside the database's range for a timestamp).
        if !(0..=MAX_CURSOR_MICROS).contains(&micros) {
            return Err(bad());
        }
        Ok(ListCursor {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: Uuid::parse_str(&id).map_err(|_| bad())?,
        })
    }
}

/// Endpoint management for one walhook process.
#[derive(Debug, Clone)]
pub struct Endpoints {
    db: Db,
    secrets: SecretBox,
    policy: AddressPolicy,
    crm_schema: String,
    max_per_account: Option<u32>,
}

impl Endpoints {
    /// Endpoint management storing secrets through `secrets`, judging literal-IP URLs with
    /// `policy` and changed-column filters against the CRM tables of `crm_schema`; no
    /// endpoint quota until [`Endpoints::with_quota`].
    pub fn new(db: Db, secrets: SecretBox, policy: AddressPolicy, crm_schema: &str) -> Self {
        Endpoints { db, secrets, policy, crm_schema: crm_schema.to_owned(), max_per_account: None }
    }

    /// The database (for the other admin modules).
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// How secrets are stored (for the other admin modules).
    pub(crate) fn secrets(&self) -> &SecretBox {
        &self.secrets
    }

    /// At most `max` endpoints per account (`api.max_endpoints_per_account`).
    pub fn with_quota(mut self, max: u32) -> Self {
        self.max_per_account = Some(max);
        self
    }

    /// Creates an endpoint; the returned secret is the only time it is shown in full (for
    /// `v1a` it is the private key, which is never shown: the view carries its public key).
    pub async fn create(
        &self,
        caller: Caller,
        new: NewEndpoint,
    ) -> Result<(EndpointView, SigningSecret), EndpointError> {
        let url = self.check_url(new.url.as_deref())?;
        let description = check_description(new.description.as_deref())?.unwrap_or_default();
        let events = check_events(new.events.as_deref().ok_or_else(|| invalid("events is required"))?)?;
        let scheme = match new.signature_scheme.as_deref() {
            None => Scheme::V1,
            Some(name) => Scheme::parse(name).ok_or_else(|| invalid("signature_scheme must be \"v1\" or \"v1a\""))?,
        };
        let secret = SigningSecret::generate_for(scheme);
        let public_key = secret.public_key();
        let mut client = self.db.get().await?;
        let update_columns = match &new.update_columns {
            Some(value) => crate::admin::columns::check(&**client, &self.crm_schema, value).await?,
            None => None,
        };
        let tx = client.transaction().await?;
        if let Some(max) = self.max_per_account {
            // Creates of one account wait for each other here, so the count cannot go stale.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&CREATE_LOCK_CLASS, &caller.account_id.to_string()],
            )
            .await?;
            let have = store::endpoints::count_in_account(&*tx, caller.account_id).await?;
            if have >= i64::from(max) {
                return Err(EndpointError::QuotaReached(max));
            }
        }
        let id = Uuid::new_v4();
        let new = store::endpoints::Insert {
            id,
            account_id: caller.account_id,
            created_by: caller.user_id,
            url: &url,
            description: &description,
            secret: &self.secrets.seal(&secret, id),
            secret_prefix: &secret.prefix(),
            events: &events,
            signature_scheme: scheme.name(),
            public_key: public_key.as_deref(),
            update_columns: update_columns.as_ref(),
        };
        let row = store::endpoints::insert(&*tx, &new).await?;
        tx.commit().await?;
        Ok((view(row), secret))
    }

    /// Up to `limit` of the caller's endpoints, newest first, after `after`; with the cursor
    /// of the next page when more remain.
    pub async fn list(
        &self,
        caller: Caller,
        limit: i64,
        after: Option<ListCursor>,
    ) -> Result<(Vec<EndpointView>, Option<ListCursor>), EndpointError> {
        let client = self.db.get().await?;
        let after = after.map(|c| (c.created_at, c.id));
        let mut rows = store::endpoints::page_in_account(&**client, caller.account_id, after, limit + 1).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit.max(0) as usize);
        let page: Vec<EndpointView> = rows.into_iter().map(view).collect();
        let next = page.last().filter(|_| more).map(|e| ListCursor { created_at: e.created_at, id: e.id });
        Ok((page, next))
    }

    /// One of the caller's endpoints.
    pub async fn get(&self, caller: Caller, id: Uuid) -> Result<EndpointView, EndpointError> {
        let client = self.db.get().await?;
        let row = store::endpoints::get_in_account(&**client, caller.account_id, id).await?;
        row.map(view).ok_or(EndpointError::NotFound)
    }

    /// Changes the given fields of one of the caller's endpoints; `updated_at` moves.
    /// Re-enabling a disabled endpoint starts it afresh: its disable reason and failure streak
    /// are cleared, so `dispatch.disable_after` counts again from its next failed attempt.
    pub async fn update(&self, caller: Caller, id: Uuid, patch: EndpointPatch) -> Result<EndpointView, EndpointError> {
        let url = match patch.url.as_deref() {
            Some(u) => Some(self.check_url(Some(u))?),
            None => None,
        };
        let description = check_description(patch.description.as_deref())?;
        let events = patch.events.as_deref().map(check_events).transpose()?;
        // Every field is checked before anything is written (the catalog on its own connection,
        // given back before the reseal takes one).
        let update_columns = match &patch.update_columns {
            Some(value) => {
                let client = self.db.get().await?;
                Some(crate::admin::columns::check(&**client, &self.crm_schema, value).await?)
            }
            None => None,
        };
        if self.secrets.encrypts() {
            // A secret stored plain (before the key, or by a replica without it) is sealed now.
            crate::store::secrets::reseal_plain(&self.db, &self.secrets, Some((id, caller.account_id))).await?;
        }
        let client = self.db.get().await?;
        let change = store::endpoints::Update {
            url: url.as_deref(),
            description: description.as_deref(),
            events: events.as_deref(),
            is_active: patch.is_active,
            update_columns: update_columns.as_ref().map(Option::as_ref),
        };
        let row = store::endpoints::update_in_account(&**client, caller.account_id, id, &change).await?;
        row.map(view).ok_or(EndpointError::NotFound)
    }

    /// Deletes one of the caller's endpoints. Nothing more is sent to it: routing drops it
    /// as the delete replicates, and its waiting outbox rows are never claimed again
    /// (retention removes them).
    pub async fn delete(&self, caller: Caller, id: Uuid) -> Result<(), EndpointError> {
        let client = self.db.get().await?;
        if !store::endpoints::delete_in_account(&**client, caller.account_id, id).await? {
            return Err(EndpointError::NotFound);
        }
        Ok(())
    }

    /// An absolute `https://` URL with a host, no credentials, at most 2,048 characters as sent
    /// (8,192 once normalised), and no literal address in a forbidden range.
    pub fn check_url(&self, url: Option<&str>) -> Result<String, EndpointError> {
        let raw = url.map(str::trim).filter(|u| !u.is_empty()).ok_or(EndpointError::UrlRequired)?;
        if raw.chars().count() > MAX_URL_LEN {
            return Err(EndpointError::InvalidUrl(format!("must be at most {MAX_URL_LEN} characters")));
        }
        if raw.chars().any(|c| c.is_control() || crate::security::invisible::is_invisible(c)) {
            return Err(EndpointError::InvalidUrl("must not contain control or invisible format characters".into()));
        }
        let parsed = Url::parse(raw).map_err(|_| EndpointError::InvalidUrl("must be a valid HTTPS URL".into()))?;
        // What is stored and sent is the normalised form (a space becomes `%20`): bound it too.
        if parsed.as_str().len() > MAX_STORED_URL_LEN {
            return Err(EndpointError::InvalidUrl(format!(
                "must be at most {MAX_STORED_URL_LEN} characters once percent-encoded (it is {})",
                parsed.as_str().len()
            )));
        }
        if parsed.scheme() != "https" {
            return Err(EndpointError::InvalidUrl("must be a valid HTTPS URL (https://…)".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(EndpointError::InvalidUrl("must not contain credentials".into()));
        }
        let ip = match parsed.host() {
            None => return Err(EndpointError::InvalidUrl("must have a host".into())),
            Some(Host::Domain("")) => return Err(EndpointError::InvalidUrl("must have a host".into())),
            Some(Host::Domain(_)) => None,
            Some(Host::Ipv4(v4)) => Some(std::net::IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => Some(std::net::IpAddr::V6(v6)),
        };
        if let Some(ip) = ip {
            self.policy
                .check(ip)
                .map_err(|reason| EndpointError::InvalidUrl(format!("must not target {ip} ({reason})")))?;
        }
        Ok(parsed.to_string())
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> EndpointError {
    EndpointError::InvalidRequest(msg.into())
}

fn check_description(d: Option<&str>) -> Result<Option<String>, EndpointError> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION_CHARS => {
            Err(invalid(format!("description must be at most {MAX_DESCRIPTION_CHARS} characters")))
        }
        Some(d) => check_text("description", d).map(|()| Some(d.to_owned())),
        None => Ok(None),
    }
}

/// Text stored as given must hold no control character (NUL cannot be stored at all; the
/// others corrupt logs and terminals of whoever reads it back), and no invisible format or
/// separator character (it makes the text display as something it is not).
fn check_text(field: &str, value: &str) -> Result<(), EndpointError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(invalid(format!("{field} must not contain control characters (found U+{:04X})", c as u32)));
    }
    match value.chars().find(|&c| crate::security::invisible::is_invisible(c)) {
        Some(c) => Err(invalid(format!(
            "{field} must not contain invisible format or separator characters (found U+{:04X})",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// Subscribed (or filtered) event types: at least one, each known; duplicates dropped.
pub(crate) fn check_events(events: &[String]) -> Result<Vec<String>, EndpointError> {
    if events.is_empty() {
        return Err(invalid("events must list at least one event"));
    }
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        if EventType::parse(e).is_none() {
            let shown: String = e.chars().take(64).collect();
            return Err(invalid(format!("events: unknown event {shown:?}")));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursors_read_both_forms_and_refuse_forged_ones() {
        let c = ListCursor {
            created_at: DateTime::from_timestamp_micros(1_764_590_000_123_456).unwrap(),
            id: Uuid::from_u128(0x880e_8400_e29b_41d4_a716_4466_5544_0000),
        };
        assert_eq!(c.encode(), "1764590000123456_880e8400-e29b-41d4-a716-446655440000");
        assert_eq!(ListCursor::decode(&c.encode()).unwrap(), c);
        let earlier_form = B64URL.encode(format!("{}:{}", c.created_at.timestamp_micros(), c.id));
        assert_eq!(ListCursor::decode(&earlier_form).unwrap(), c);
        let too_late = "99999999999999999999_880e8400-e29b-41d4-a716-446655440000";
        for forged in [too_late, "1_not-a-uuid-of-thirty-six-characters!", "", "_"] {
            assert!(ListCursor::decode(forged).is_err(), "{forged}");
        }
    }
}
