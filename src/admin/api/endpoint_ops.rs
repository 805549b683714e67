//! The endpoint operations, each in one place: its name, the fields its body may carry, its
//! request body and its handler (`webhooks-create`, `-list`, `-get`, `-update`, `-delete`,
//! `-test`, `-rotate-secret`). The OpenAPI document (`docs/openapi.json`) describes the same fields; a test
//! checks that they agree.
//!
//! What must hold: see the module above (authentication first, the caller's account only,
//! the signing secret shown once, in the create or rotate response; for `v1a` only the public
//! key is ever shown).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::requests::{integer, parse, uuid_field};
use super::{limit_field, ok, prologue, ApiState, Operation};
use crate::admin::endpoints::{EndpointPatch, EndpointView, ListCursor, NewEndpoint};
use crate::admin::probe::ProbeError;
use crate::admin::signing::grace_period;
use crate::security::secrets::{Scheme, SigningSecret};

/// Default and bounds of `webhooks-list`' `limit` (the default is the default endpoint quota,
/// so an account within it gets every endpoint in one answer, as before paging).
const LIST_LIMIT: (i64, i64, i64) = (100, 1, 100);

/// The endpoint operations.
pub const OPERATIONS: [Operation; 7] = [
    Operation {
        name: "webhooks-create",
        fields: &["url", "description", "events", "signature_scheme", "update_columns"],
        route: || post(create),
    },
    Operation { name: "webhooks-list", fields: &["limit", "cursor"], route: || post(list) },
    Operation { name: "webhooks-get", fields: &["id"], route: || post(get_one) },
    Operation {
        name: "webhooks-update",
        fields: &["id", "url", "description", "events", "is_active", "update_columns"],
        route: || post(update),
    },
    Operation { name: "webhooks-delete", fields: &["id"], route: || post(delete) },
    Operation { name: "webhooks-test", fields: &["id"], route: || post(test_endpoint) },
    Operation { name: "webhooks-rotate-secret", fields: &["id", "grace_period"], route: || post(rotate_secret) },
];

/// A field whose `null` means something (remove), kept apart from an absent field.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The answer of create and rotate: the new secret once, or for `v1a` the public key.
fn with_secret(endpoint: &EndpointView, secret: &SigningSecret) -> serde_json::Value {
    match secret.scheme() {
        Scheme::V1 => json!({ "endpoint": endpoint, "signing_secret": secret.expose() }),
        Scheme::V1a => json!({ "endpoint": endpoint, "public_key": endpoint.public_key }),
    }
}

/// `webhooks-create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRequest {
    /// Required HTTPS URL.
    pub(super) url: Option<String>,
    /// Optional description.
    pub(super) description: Option<String>,
    /// Required, non-empty.
    pub(super) events: Option<Vec<String>>,
    /// `v1` (default) or `v1a`.
    pub(super) signature_scheme: Option<String>,
    /// `{table: [columns]}`, or null.
    pub(super) update_columns: Option<serde_json::Value>,
}

async fn create(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: CreateRequest = parse(&body)?;
    let new = NewEndpoint {
        url: r.url,
        description: r.description,
        events: r.events,
        signature_scheme: r.signature_scheme,
        update_columns: r.update_columns,
    };
    let (endpoint, secret) = s.endpoints.create(caller, new).await?;
    tracing::info!(endpoint = %endpoint.id, account = %caller.account_id, scheme = %endpoint.signature_scheme, "webhook endpoint created");
    Ok(ok(with_secret(&endpoint, &secret)))
}

/// `webhooks-list`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListRequest {
    /// 1–100, default 100.
    #[serde(default, deserialize_with = "integer")]
    pub(super) limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub(super) cursor: Option<String>,
}

async fn list(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: ListRequest = parse(&body)?;
    let limit = limit_field(r.limit, LIST_LIMIT)?;
    let after = r.cursor.as_deref().map(ListCursor::decode).transpose()?;
    let (endpoints, next) = s.endpoints.list(caller, limit, after).await?;
    let mut result = json!({ "endpoints": endpoints });
    if let Some(next) = next {
        result["next_cursor"] = next.encode().into();
    }
    Ok(ok(result))
}

/// `webhooks-get`, `webhooks-delete` and `webhooks-test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
}

async fn get_one(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: IdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    Ok(ok(json!({ "endpoint": s.endpoints.get(caller, id).await? })))
}

/// `webhooks-update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
    /// New URL.
    pub(super) url: Option<String>,
    /// New description.
    pub(super) description: Option<String>,
    /// New subscriptions.
    pub(super) events: Option<Vec<String>>,
    /// Enable or disable.
    pub(super) is_active: Option<bool>,
    /// `{table: [columns]}`; `null` or `{}` removes the filter.
    #[serde(default, deserialize_with = "present")]
    pub(super) update_columns: Option<serde_json::Value>,
}

async fn update(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: UpdateRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let patch = EndpointPatch {
        url: r.url,
        description: r.description,
        events: r.events,
        is_active: r.is_active,
        update_columns: r.update_columns,
    };
    let endpoint = s.endpoints.update(caller, id, patch).await?;
    tracing::info!(endpoint = %id, account = %caller.account_id, "webhook endpoint updated");
    Ok(ok(json!({ "endpoint": endpoint })))
}

async fn delete(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: IdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    s.endpoints.delete(caller, id).await?;
    tracing::info!(endpoint = %id, account = %caller.account_id, "webhook endpoint deleted");
    Ok(ok(json!({ "id": id, "deleted": true })))
}

async fn test_endpoint(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: IdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let prober = s.prober.as_ref().ok_or_else(|| ApiError::Internal("webhooks-test has no prober".into()))?;
    let outcome = prober.test(caller, id).await.map_err(|e| match e {
        ProbeError::Endpoint(e) => ApiError::from(e),
        ProbeError::Busy => ApiError::RateLimited(1),
        e @ ProbeError::Open(_) => ApiError::Internal(e.to_string()),
    })?;
    Ok(ok(json!(outcome)))
}

/// `webhooks-rotate-secret`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
    /// How long the replaced secret keeps signing (default `24h`, at most `7d`).
    pub(super) grace_period: Option<String>,
}

async fn rotate_secret(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: RotateRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let grace = grace_period(r.grace_period.as_deref())?;
    let (endpoint, secret) = s.endpoints.rotate_secret(caller, id, grace).await?;
    tracing::info!(
        endpoint = %id,
        account = %caller.account_id,
        grace_period = %humantime::format_duration(grace),
        "webhook endpoint signing secret rotated"
    );
    let mut answer = with_secret(&endpoint, &secret);
    answer["previous_secret_expires_at"] = json!(endpoint.previous_secret_expires_at);
    Ok(ok(answer))
}
