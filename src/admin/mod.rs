//! Administration: the documented webhooks API (`POST /api/webhooks-<verb>`) and the
//! endpoint rules behind it (validation, tenant scoping, quotas).
//!
//! What must hold: every request is scoped to the caller's account; bad input is refused
//! with a `webhooks.*` code naming the field and changes nothing.

pub mod api;
pub mod backfills;
pub mod columns;
pub mod deliveries;
pub mod endpoints;
pub mod probe;
pub mod signing;
