//! The backfill operations, each in one place: its name, the fields its body may carry, its
//! request body and its handler (`webhooks-backfill`, `-backfill-get`, `-backfill-cancel`).
//! The OpenAPI document (`docs/openapi.json`) describes the same fields; a test checks that
//! they agree.
//!
//! What must hold: a backfill is reached only through the caller's account (another
//! account's endpoint or backfill looks missing); a refused call changes nothing.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::requests::{parse, uuid_field};
use super::{ok, prologue, ApiState, Operation};

/// The backfill operations.
pub const OPERATIONS: [Operation; 3] = [
    Operation { name: "webhooks-backfill", fields: &["id", "tables"], route: || post(backfill) },
    Operation { name: "webhooks-backfill-get", fields: &["id"], route: || post(backfill_get) },
    Operation { name: "webhooks-backfill-cancel", fields: &["id"], route: || post(backfill_cancel) },
];

/// `webhooks-backfill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackfillRequest {
    /// Endpoint id.
    pub(super) id: Option<String>,
    /// CRM table names; absent: every table the endpoint subscribes to.
    pub(super) tables: Option<Vec<String>>,
}

async fn backfill(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: BackfillRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    let backfill = s.endpoints.backfill(caller, id, r.tables.as_deref()).await?;
    Ok(ok(json!({ "backfill": backfill })))
}

/// `webhooks-backfill-get` and `-backfill-cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackfillIdRequest {
    /// Backfill id.
    pub(super) id: Option<String>,
}

async fn backfill_get(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: BackfillIdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    Ok(ok(json!({ "backfill": s.endpoints.backfill_get(caller, id).await? })))
}

async fn backfill_cancel(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (caller, body) = prologue(&s, &headers, body).await?;
    let r: BackfillIdRequest = parse(&body)?;
    let id = uuid_field("id", r.id.as_deref())?;
    Ok(ok(json!({ "backfill": s.endpoints.backfill_cancel(caller, id).await? })))
}
