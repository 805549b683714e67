//! The delivery operations, each in one place: its name, the fields its body may carry, its
//! request body and its handler (`webhooks-deliveries`, `-attempts`, `-recover`,
//! `-redeliver`, `-replay`). The OpenAPI document (`docs/openapi.json`) describes the same
//! fields; a test checks that they agree.
//!
//! What must hold: a delivery is reached only through an endpoint of the caller's account
//! (another account's looks missing); a refused call changes nothing.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::requests::{integer, parse, time_field, uuid_field};
use super::{limit_field, ok, prologue, ApiState, Operation};
use crate::admin::deliveries::{DeliveryCursor, HistoryQuery};

/// Default and bounds of `webhooks-deliveries`' `limit`.
const DELIVERIES_LIMIT: (i64, i64, i64) = (50, 1, 100);
/// Default and bounds of `webhooks-attempts`' `limit`.
const ATTEMPTS_LIMIT: (i64, i64, i64) = (50, 1, 100);

/// The delivery operations.
pub const OPERATIONS: [Operation; 5] = [
    Operation {
        name: "webhooks-deliveries",
        fields: &["endpoint_id", "limit", "status", "event_type", "cursor"],
        route: || post(deliveries),
    },
    Operation { name: "webhooks-attempts", fields: &["delivery_id", "limit"], route: || post(attempts) },
    Operation { name: "webhooks-recover", fields: &["id", "since", "until"], route: || post(recover) },
    Operation { name: "webhooks-redeliver", fields: &["delivery_id"], route: || post(redeliver) },
    Operation { name: "webhooks-replay", fields: &["id", "since", "until", "events"], route: || post(replay) },
];

/// `webhooks-deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveriesRequest {
    /// Endpoint id.
    pub(super) endpoint_id: Option<String>,
    /// 1–100, default 50.
    #[serde(default, deserialize_with = "integer")]
    pub(super) limit: Option<i64>,
    /// Only deliveries of this status (`pending`, `delivered`, `failed`).
    pub(super) status: Option<String>,
    /// Only deliveries of this event type.
    pub(super) event_type: Option<String>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
}

async fn deliveries(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: DeliveriesRequest = parse(&body)?;
    let endpoint_id = uuid_field("endpoint_id", r.endpoint_id.as_deref())?;
    let limit = limit_field(r.limit, DELIVERIES_LIMIT)?;
    let after = r.cursor.as_deref().map(DeliveryCursor::decode).transpose()?;
    let query = HistoryQuery { status: r.status, event_type: r.event_type, after };
    let (deliveries, next) = s.endpoints.deliveries(caller, endpoint_id, query, limit).await?;
    Ok(ok(json!({ "deliveries": deliveries, "next_cursor": next.map(|c| c.encode()) })))
}

/// `webhooks-attempts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AttemptsRequest {
    /// Delivery id.
    pub(super) delivery_id: Option<String>,
    /// 1–100, default 50.
    #[serde(default, deserialize_with = "integer")]
    pub(super) limit: Option<i64>,
}

async fn attempts(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: AttemptsRequest = parse(&body)?;
    let delivery_id = uuid_field("delivery_id", r.delivery_id.as_deref())?;
    let limit = limit_field(r.limit, ATTEMPTS_LIMIT)?;
    Ok(ok(json!({ "attempts": s.endpoints.attempts(caller, delivery_id, limit).await? })))
}

/// `webhooks-recover`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecoverRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
    /// Start of the window (RFC 3339, inclusive).
    pub(super) since: Option<String>,
    /// End of the window (RFC 3339, exclusive); now when absent.
    pub(super) until: Option<String>,
}

async fn recover(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: RecoverRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let (since, until) = window(r.since.as_deref(), r.until.as_deref())?;
    let recovered = s.endpoints.recover(caller, id, since, until).await?;
    tracing::info!(endpoint = %id, account = %caller.account_id, recovered, "failed deliveries recovered");
    Ok(ok(json!({ "recovered": recovered })))
}

/// `webhooks-redeliver`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedeliverRequest {
    /// Delivery id.
    pub(super) delivery_id: Option<String>,
}

async fn redeliver(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: RedeliverRequest = parse(&body)?;
    let id = uuid_field("delivery_id", r.delivery_id.as_deref())?;
    let delivery = s.endpoints.redeliver(caller, id).await?;
    tracing::info!(delivery = %id, account = %caller.account_id, "delivery queued to be sent again");
    Ok(ok(json!({ "delivery": delivery })))
}

/// `webhooks-replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
    /// Start of the window (RFC 3339, inclusive).
    pub(super) since: Option<String>,
    /// End of the window (RFC 3339, exclusive); now when absent.
    pub(super) until: Option<String>,
    /// Only deliveries of these event types.
    pub(super) events: Option<Vec<String>>,
}

async fn replay(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: ReplayRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let window = window(r.since.as_deref(), r.until.as_deref())?;
    let done = s.endpoints.replay(caller, id, window, r.events.as_deref()).await?;
    tracing::info!(endpoint = %id, account = %caller.account_id, replayed = done.requeued, "deliveries replayed");
    Ok(ok(json!({ "replayed": done.requeued, "payload_unavailable": done.unavailable })))
}

/// `since` (required) and `until` (now when absent), RFC 3339.
fn window(since: Option<&str>, until: Option<&str>) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let since = time_field("since", since)?.ok_or_else(|| ApiError::InvalidRequest("since is required".into()))?;
    Ok((since, time_field("until", until)?.unwrap_or_else(Utc::now)))
}
