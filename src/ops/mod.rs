//! Operations: Prometheus metrics, the status stages publish for `/readyz`, the metrics and
//! health listener, logging, and the file-descriptor budget checked at start.
//!
//! What must hold: metric names are constants in `metrics`; stages receive their metric and
//! status handles from `app` and never import one another through here.

pub(crate) mod descriptors;
pub(crate) mod health;
pub(crate) mod logging;
pub mod metrics;
pub(crate) mod status;

/// Built by whoever runs a store writer ([`crate::store::WriterSettings`]): `app`, or a test.
pub use status::StoreHealth;
