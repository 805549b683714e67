//! The admin API on `api.listen`: the documented `POST /api/webhooks-*` operations and
//! `GET /api/openapi.json`, in the `{ "ok": true, "result": … }` envelope.
//!
//! What must hold (docs/architecture.md, invariants 3 and 7): every operation authenticates first and is scoped to
//! the caller's account; another account's endpoint is `webhooks.not_found`; the signing
//! secret appears once, in the create response; request bodies, tokens and secrets are never
//! logged.

pub mod auth;
mod backfill_ops;
mod delivery_ops;
mod endpoint_ops;
pub mod error;
pub mod requests;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::endpoints::{Caller, Endpoints};
use crate::admin::probe::Prober;
use crate::ops::metrics::Metrics;
use auth::{Authenticator, RateLimiter};
use error::ApiError;

/// The OpenAPI 3.1 document of this API (also committed as `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// One operation, in one place: routed as `POST /api/<name>`, its body's fields, its handler.
#[derive(Clone, Copy)]
pub struct Operation {
    /// e.g. `webhooks-create`.
    pub name: &'static str,
    /// The fields its body may carry (the OpenAPI document lists the same; a test checks).
    pub fields: &'static [&'static str],
    /// Its route.
    route: fn() -> MethodRouter<ApiState>,
}

/// Every operation: the endpoints', the deliveries', then the backfills'.
pub fn operations() -> impl Iterator<Item = Operation> {
    endpoint_ops::OPERATIONS.into_iter().chain(delivery_ops::OPERATIONS).chain(backfill_ops::OPERATIONS)
}

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
    let routed = operations().fold(Router::new(), |r, op| r.route(&format!("/api/{}", op.name), (op.route)()));
    routed
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
