//! The endpoint operations, each in one place: its name, the fields its body may carry, its
//! request body and its handler (`webhooks-create`, `-list`, `-get`, `-update`, `-delete`,
//! `-test`). The OpenAPI document (`docs/openapi.json`) describes the same fields; a test
//! checks that they agree.
//!
//! What must hold: see the module above (authentication first, the caller's account only,
//! the signing secret shown once, in the create response).

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
use crate::admin::endpoints::{EndpointPatch, ListCursor, NewEndpoint};
use crate::admin::probe::ProbeError;

/// Default and bounds of `webhooks-list`' `limit` (the default is the default endpoint quota,
/// so an account within it gets every endpoint in one answer, as before paging).
const LIST_LIMIT: (i64, i64, i64) = (100, 1, 100);

/// The endpoint operations.
pub const OPERATIONS: [Operation; 6] = [
    Operation { name: "webhooks-create", fields: &["url", "description", "events"], route: || post(create) },
    Operation { name: "webhooks-list", fields: &["limit", "cursor"], route: || post(list) },
    Operation { name: "webhooks-get", fields: &["id"], route: || post(get_one) },
    Operation {
        name: "webhooks-update",
        fields: &["id", "url", "description", "events", "is_active"],
        route: || post(update),
    },
    Operation { name: "webhooks-delete", fields: &["id"], route: || post(delete) },
    Operation { name: "webhooks-test", fields: &["id"], route: || post(test_endpoint) },
];

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
}

async fn create(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: CreateRequest = parse(&body)?;
    let (endpoint, secret) =
        s.endpoints.create(caller, NewEndpoint { url: r.url, description: r.description, events: r.events }).await?;
    tracing::info!(endpoint = %endpoint.id, account = %caller.account_id, "webhook endpoint created");
    Ok(ok(json!({ "endpoint": endpoint, "signing_secret": secret.expose() })))
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
}

async fn update(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: UpdateRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let patch = EndpointPatch { url: r.url, description: r.description, events: r.events, is_active: r.is_active };
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
        e @ ProbeError::Secret(_) => ApiError::Internal(e.to_string()),
    })?;
    Ok(ok(json!(outcome)))
}
