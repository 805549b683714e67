//! Operational happenings of the delivery path, each logged and counted in one place.
//!
//! What must hold: a happening's log line and its metric are written together by
//! [`Happening::record`], so the fast path and the outbox report the same thing the same way.

use std::time::Duration;

use uuid::Uuid;

use crate::ops::metrics::Metrics;

/// Something an operator may want to see in the logs or the metrics.
#[derive(Debug)]
pub enum Happening {
    /// An HTTP attempt finished, of outcome class `class` (see `Attempt::class`).
    AttemptMade {
        /// Outcome class.
        class: &'static str,
        /// How long it took.
        duration: Duration,
    },
    /// An attempt failed for a local reason; it is retried without being counted.
    LocalFailure {
        /// The delivery.
        delivery: Uuid,
        /// Its endpoint.
        endpoint: Uuid,
        /// What failed (`local: …`).
        error: String,
    },
    /// The endpoint answered `410 Gone`; it is being disabled (the store writer reports
    /// the disable once it is written).
    EndpointGone {
        /// The endpoint.
        endpoint: Uuid,
    },
    /// A delivery reached its receiver, `lag_seconds` after its change committed.
    Delivered {
        /// From commit to the 2xx, in seconds.
        lag_seconds: f64,
    },
    /// A delivery failed for good.
    DeliveryFailed,
    /// A delivery was created: sent directly (`true`) or stored in the outbox.
    Created {
        /// Sent directly from memory.
        direct: bool,
    },
}

impl Happening {
    /// Logs and counts it.
    pub fn record(&self, metrics: &Metrics) {
        match self {
            Happening::AttemptMade { class, duration } => {
                metrics.attempt(class).inc();
                metrics.request_duration.observe(duration.as_secs_f64());
            }
            Happening::LocalFailure { delivery, endpoint, error } => {
                tracing::warn!(delivery = %delivery, endpoint = %endpoint, error, "attempt failed for a local reason; retrying without counting it");
            }
            Happening::EndpointGone { endpoint } => {
                tracing::debug!(endpoint = %endpoint, "endpoint answered 410 Gone; disabling it");
            }
            Happening::Delivered { lag_seconds } => metrics.commit_to_delivered.observe(*lag_seconds),
            Happening::DeliveryFailed => metrics.failed.inc(),
            Happening::Created { direct } => metrics.delivery(*direct).inc(),
        }
    }
}
