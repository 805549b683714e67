//! The admin API on `api.listen`: the documented `POST /api/webhooks-*` operations and
//! `GET /api/openapi.json`, in the `{ "ok": true, "result": … }` envelope.
//!
//! What must hold (docs/architecture.md, invariants 3 and 7): every operation authenticates first and is scoped to
//! the caller's account; another account's endpoint is `webhooks.not_found`; the signing
//! secret appears once, in the create response; request bodies, tokens and secrets are never
//! logged.

pub mod auth;
pub mod error;
pub mod requests;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::endpoints::{
    Caller, DeliveryCursor, EndpointPatch, Endpoints, HistoryQuery, ListCursor, NewEndpoint,
};
use crate::admin::probe::{ProbeError, Prober};
use crate::ops::metrics::Metrics;
use auth::{Authenticator, RateLimiter};
use error::ApiError;
use requests::{
    parse, time_field, uuid_field, AttemptsRequest, CreateRequest, DeliveriesRequest, IdRequest, ListRequest,
    RecoverRequest, RedeliverRequest, ReplayRequest, UpdateRequest,
};

/// The OpenAPI 3.1 document of this API (also committed as `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// The operations, as routed (`POST /api/<name>`).
pub const OPERATIONS: [&str; 11] = [
    "webhooks-create",
    "webhooks-list",
    "webhooks-get",
    "webhooks-update",
    "webhooks-delete",
    "webhooks-deliveries",
    "webhooks-attempts",
    "webhooks-test",
    "webhooks-recover",
    "webhooks-redeliver",
    "webhooks-replay",
];

/// Default and bounds of `webhooks-deliveries`' `limit`.
const DELIVERIES_LIMIT: (i64, i64, i64) = (50, 1, 100);
/// Default and bounds of `webhooks-attempts`' `limit`.
const ATTEMPTS_LIMIT: (i64, i64, i64) = (50, 1, 100);
/// Default and bounds of `webhooks-list`' `limit` (the default is the default endpoint quota,
/// so an account within it gets every endpoint in one answer, as before paging).
const LIST_LIMIT: (i64, i64, i64) = (100, 1, 100);

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    endpoints: Endpoints,
    auth: Arc<Authenticator>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    max_body: usize,
    /// Sends `webhooks-test` requests (set by `app` once dispatch's client exists).
    prober: Option<Prober>,
}

impl ApiState {
    /// State for the API.
    pub fn new(
        endpoints: Endpoints,
        auth: Authenticator,
        limiter: RateLimiter,
        metrics: Arc<Metrics>,
        max_body: usize,
    ) -> Self {
        ApiState { endpoints, auth: Arc::new(auth), limiter: Arc::new(limiter), metrics, max_body, prober: None }
    }

    /// `webhooks-test` sends through `prober` (without one it answers `webhooks.internal`).
    pub fn with_prober(mut self, prober: Prober) -> Self {
        self.prober = Some(prober);
        self
    }
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/webhooks-create", post(create))
        .route("/api/webhooks-list", post(list))
        .route("/api/webhooks-get", post(get_one))
        .route("/api/webhooks-update", post(update))
        .route("/api/webhooks-delete", post(delete))
        .route("/api/webhooks-deliveries", post(deliveries))
        .route("/api/webhooks-attempts", post(attempts))
        .route("/api/webhooks-test", post(test_endpoint))
        .route("/api/webhooks-recover", post(recover))
        .route("/api/webhooks-redeliver", post(redeliver))
        .route("/api/webhooks-replay", post(replay))
        .route("/api/openapi.json", get(openapi))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Serves the API until `shutdown`, within `limits` (`api.max_connections`, timeouts).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    limits: crate::security::listener::ListenerLimits,
    shutdown: CancellationToken,
) {
    crate::security::listener::serve(listener, router(state), limits, "api", shutdown).await;
}

/// Counts and times every request by route and status; logs without bodies or headers.
async fn observe(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let secs = started.elapsed().as_secs_f64();
    state.metrics.api_requests.with_label_values(&[&route, &status]).inc();
    state.metrics.api_duration.with_label_values(&[&route]).observe(secs);
    tracing::debug!(route, status, ms = secs * 1000.0, "admin API request");
    resp
}

fn ok(result: Value) -> Response {
    Json(json!({ "ok": true, "result": result })).into_response()
}

/// Authenticates, applies the account's rate, and reads the body.
async fn prologue(state: &ApiState, headers: &HeaderMap, body: Body) -> Result<(Caller, Bytes), ApiError> {
    let caller = state.auth.authenticate(headers)?;
    state.limiter.check(caller.account_id)?;
    let bytes = axum::body::to_bytes(body, state.max_body).await.map_err(|_| ApiError::TooLarge(state.max_body))?;
    Ok((caller, bytes))
}

async fn create(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: CreateRequest = parse(&body)?;
    let (endpoint, secret) =
        s.endpoints.create(caller, NewEndpoint { url: r.url, description: r.description, events: r.events }).await?;
    tracing::info!(endpoint = %endpoint.id, account = %caller.account_id, "webhook endpoint created");
    Ok(ok(json!({ "endpoint": endpoint, "signing_secret": secret.expose() })))
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

async fn get_one(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: IdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    Ok(ok(json!({ "endpoint": s.endpoints.get(caller, id).await? })))
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

async fn attempts(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: AttemptsRequest = parse(&body)?;
    let delivery_id = uuid_field("delivery_id", r.delivery_id.as_deref())?;
    let limit = limit_field(r.limit, ATTEMPTS_LIMIT)?;
    Ok(ok(json!({ "attempts": s.endpoints.attempts(caller, delivery_id, limit).await? })))
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

async fn recover(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: RecoverRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let (since, until) = window(r.since.as_deref(), r.until.as_deref())?;
    let recovered = s.endpoints.recover(caller, id, since, until).await?;
    tracing::info!(endpoint = %id, account = %caller.account_id, recovered, "failed deliveries recovered");
    Ok(ok(json!({ "recovered": recovered })))
}

async fn redeliver(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: RedeliverRequest = parse(&body)?;
    let id = uuid_field("delivery_id", r.delivery_id.as_deref())?;
    let delivery = s.endpoints.redeliver(caller, id).await?;
    tracing::info!(delivery = %id, account = %caller.account_id, "delivery queued to be sent again");
    Ok(ok(json!({ "delivery": delivery })))
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
fn window(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>), ApiError> {
    let since = time_field("since", since)?.ok_or_else(|| ApiError::InvalidRequest("since is required".into()))?;
    Ok((since, time_field("until", until)?.unwrap_or_else(chrono::Utc::now)))
}

/// A `limit` field: its default when absent, refused outside its bounds.
fn limit_field(limit: Option<i64>, (default, min, max): (i64, i64, i64)) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(min..=max).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!("limit must be between {min} and {max}")));
    }
    Ok(limit)
}

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document's pattern for stored text refuses exactly what walhook refuses: control
    /// characters and `security::invisible`'s ranges.
    #[test]
    fn the_documented_text_pattern_is_the_one_enforced() {
        let mut class = String::from("\u{0}-\u{1f}\u{7f}-\u{9f}");
        for &(lo, hi) in crate::security::invisible::RANGES {
            let (lo, hi) = (char::from_u32(lo).unwrap(), char::from_u32(hi).unwrap());
            class.push(lo);
            if hi != lo {
                class.push('-');
                class.push(hi);
            }
        }
        let expected = format!("^[^{class}]*$");
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        for op in ["webhooks-create", "webhooks-update"] {
            let props = &doc["paths"][format!("/api/{op}")]["post"]["requestBody"]["content"]["application/json"]
                ["schema"]["properties"];
            assert_eq!(props["description"]["pattern"], json!(expected), "{op}");
        }
    }
}
