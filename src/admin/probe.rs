//! `webhooks-test`: one signed test request to an endpoint, now, answered with what happened.
//!
//! What must hold: the request goes through the same HTTP client, address policy (SSRF
//! guard) and signing as real deliveries, under the account's and the endpoint's concurrency
//! limits (it waits briefly for a place, then is refused as rate limited), so it cannot be
//! used to flood a third party; it works for an inactive endpoint; it is never retried and
//! leaves no delivery record; the signing secret is never shown or logged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use uuid::Uuid;

use crate::admin::endpoints::{Caller, EndpointError};
use crate::delivery::dispatch::http::Sender;
use crate::delivery::dispatch::limits::Limits;
use crate::model::delivery::{Endpoint, OpenError};
use crate::pg::db::Db;
use crate::security::secrets::SecretBox;
use crate::store;

/// How long a test waits for a free place among the account's requests.
const PLACE_WAIT: Duration = Duration::from_secs(2);

/// The event type of a test request.
pub const TEST_EVENT: &str = "webhook.test";

/// What the test request got.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TestOutcome {
    /// The status received, if any.
    pub http_status_code: Option<u16>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `null` on 2xx; else as in `webhooks-attempts`.
    pub error: Option<String>,
    /// The first 1 KiB of the answer, as text.
    pub response_snippet: Option<String>,
}

/// Why a test could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The endpoint (not found, database).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Every place for the account's (or the endpoint's) requests stayed taken.
    #[error("the account's requests in flight are at their limit")]
    Busy,
    /// The stored secret could not be opened.
    #[error("the endpoint's signing secret cannot be opened: {0}")]
    Open(String),
}

/// Sends test requests.
#[derive(Clone)]
pub struct Prober {
    db: Db,
    secrets: SecretBox,
    sender: Sender,
    limits: Arc<Limits>,
}

impl Prober {
    /// A prober sending with `sender` within `limits` (the dispatcher's own).
    pub fn new(db: Db, secrets: SecretBox, sender: Sender, limits: Arc<Limits>) -> Self {
        Prober { db, secrets, sender, limits }
    }

    /// Sends the test request to one of the caller's endpoints.
    pub async fn test(&self, caller: Caller, id: Uuid) -> Result<TestOutcome, ProbeError> {
        let stored = {
            let client = self.db.get().await.map_err(EndpointError::from)?;
            store::endpoints::get_in_account(&**client, caller.account_id, id)
                .await
                .map_err(EndpointError::from)?
                .ok_or(EndpointError::NotFound)?
        };
        let endpoint =
            Endpoint::open(id, &stored.routing(), &stored.sending(), &self.secrets).map_err(|e| match e {
                OpenError::Url(e) => ProbeError::Endpoint(EndpointError::InvalidUrl(format!("is stored as {e}"))),
                e => ProbeError::Open(e.to_string()),
            })?;
        let _permit = tokio::time::timeout(PLACE_WAIT, self.limits.acquire(id, caller.account_id))
            .await
            .map_err(|_| ProbeError::Busy)?;
        let body = serde_json::json!({
            "event": TEST_EVENT,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "data": { "endpoint_id": id },
        });
        let body = Bytes::from(serde_json::to_vec(&body).expect("a JSON value serialises"));
        let attempt = self.sender.attempt(&endpoint, &Uuid::new_v4().to_string(), body).await;
        tracing::info!(endpoint = %id, account = %caller.account_id, outcome = attempt.class(), "test request sent");
        let kind = attempt.failure.map(|k| match k {
            crate::model::attempt::FailureKind::Local => "local",
            k => k.record_name(),
        });
        Ok(TestOutcome {
            http_status_code: attempt.status,
            duration_ms: attempt.duration.as_millis() as u64,
            error: crate::admin::deliveries::error_text(kind, attempt.status.map(i32::from), attempt.error.as_deref()),
            response_snippet: Some(attempt.response_snippet).filter(|s| !s.is_empty()),
        })
    }
}
