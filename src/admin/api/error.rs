//! The admin API's error envelope: `{ "ok": false, "error": { "code", "message" } }` with the
//! HTTP status that matches the code.
//!
//! What must hold: messages name the offending field and never carry secrets, tokens or
//! database details; an internal error is logged in full and answered with a generic
//! message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::admin::endpoints::EndpointError;

/// Every error code the API answers with: the public page's six, `auth.unauthorized`,
/// `webhooks.rate_limited` (only when `api.rate_limit_per_second` is set, and for
/// `webhooks-test`), `webhooks.payload_unavailable` (redelivery without a payload) and
/// `webhooks.backfill_running` (a second backfill of one endpoint).
pub const ERROR_CODES: [&str; 10] = [
    "webhooks.invalid_request",
    "webhooks.invalid_id",
    "webhooks.not_found",
    "webhooks.url_required",
    "webhooks.invalid_url",
    "webhooks.internal",
    "webhooks.rate_limited",
    "webhooks.payload_unavailable",
    "webhooks.backfill_running",
    "auth.unauthorized",
];

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// Malformed body, wrong types, unknown fields, bad values (400).
    InvalidRequest(String),
    /// A field that must be a UUID is not (400).
    InvalidId(String),
    /// No such endpoint in the caller's account (404).
    NotFound,
    /// No such delivery of the caller's account (404, `webhooks.not_found`).
    DeliveryNotFound,
    /// No such backfill of the caller's account (404, `webhooks.not_found`).
    BackfillNotFound,
    /// `url` missing (400).
    UrlRequired,
    /// `url` unacceptable (400).
    InvalidUrl(String),
    /// Body over `api.max_body_bytes` (413, code `webhooks.invalid_request`).
    TooLarge(usize),
    /// The delivery's payload is no longer stored (409), with how to keep payloads.
    PayloadUnavailable(String),
    /// The endpoint has a backfill running (409), with what to do.
    BackfillRunning(String),
    /// Over the account's request rate (429), with seconds to wait.
    RateLimited(u64),
    /// Missing or invalid credentials (401).
    Unauthorized(&'static str),
    /// Anything else (500); the detail is logged, not returned.
    Internal(String),
}

impl ApiError {
    /// The error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::TooLarge(_) => "webhooks.invalid_request",
            ApiError::InvalidId(_) => "webhooks.invalid_id",
            ApiError::NotFound | ApiError::DeliveryNotFound | ApiError::BackfillNotFound => "webhooks.not_found",
            ApiError::UrlRequired => "webhooks.url_required",
            ApiError::InvalidUrl(_) => "webhooks.invalid_url",
            ApiError::RateLimited(_) => "webhooks.rate_limited",
            ApiError::PayloadUnavailable(_) => "webhooks.payload_unavailable",
            ApiError::BackfillRunning(_) => "webhooks.backfill_running",
            ApiError::Unauthorized(_) => "auth.unauthorized",
            ApiError::Internal(_) => "webhooks.internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::InvalidId(_) | ApiError::UrlRequired | ApiError::InvalidUrl(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::NotFound | ApiError::DeliveryNotFound | ApiError::BackfillNotFound => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::PayloadUnavailable(_) | ApiError::BackfillRunning(_) => StatusCode::CONFLICT,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(m)
            | ApiError::InvalidId(m)
            | ApiError::PayloadUnavailable(m)
            | ApiError::BackfillRunning(m) => m.clone(),
            ApiError::InvalidUrl(m) => format!("url {m}"),
            ApiError::NotFound => "webhook endpoint not found".into(),
            ApiError::DeliveryNotFound => "delivery not found".into(),
            ApiError::BackfillNotFound => "backfill not found".into(),
            ApiError::UrlRequired => "url is required".into(),
            ApiError::TooLarge(limit) => format!("request body is larger than {limit} bytes"),
            ApiError::RateLimited(_) => "too many requests for this account; retry later".into(),
            ApiError::Unauthorized(why) => (*why).into(),
            ApiError::Internal(_) => "internal error".into(),
        }
    }
}

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::InvalidRequest(m) => ApiError::InvalidRequest(m),
            EndpointError::UrlRequired => ApiError::UrlRequired,
            EndpointError::InvalidUrl(m) => ApiError::InvalidUrl(m),
            EndpointError::NotFound => ApiError::NotFound,
            EndpointError::DeliveryNotFound => ApiError::DeliveryNotFound,
            e @ EndpointError::PayloadUnavailable => ApiError::PayloadUnavailable(e.to_string()),
            e @ EndpointError::BackfillRunning(_) => ApiError::BackfillRunning(e.to_string()),
            EndpointError::BackfillNotFound => ApiError::BackfillNotFound,
            e @ EndpointError::QuotaReached(_) => ApiError::InvalidRequest(e.to_string()),
            EndpointError::Db(e) => ApiError::Internal(e.to_string()),
            EndpointError::Reseal(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "admin API request failed");
        }
        let body = json!({ "ok": false, "error": { "code": self.code(), "message": self.message() } });
        let mut resp = (self.status(), Json(body)).into_response();
        match self {
            ApiError::Unauthorized(_) => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited(secs) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        resp
    }
}
