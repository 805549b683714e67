//! What an attempt means, decided once for the fast path and the outbox.
//!
//! What must hold:
//! - One function ([`decide`]) maps an attempt, the number of attempts made with it and the
//!   retry schedule to what happens to the delivery; neither path decides on its own.
//! - An attempt that failed for a local reason (`FailureKind::Local`) never reached the
//!   receiver: it is retried soon and spends none of the delivery's scheduled attempts.
//! - A `410 Gone` fails the delivery and disables its endpoint, whatever the schedule says.
//! - A delivery whose payload is gone (`FailureKind::Payload`) fails at once: no retry can
//!   bring the payload back.
//! - Every attempt is made holding a connection permit and is counted as in flight while it
//!   runs, also when it is aborted ([`send_one`]).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::happening::Happening;
use super::http::{Sender, LOCAL_RETRY};
use super::limits::Permit;
use super::policy::RetryPolicy;
use crate::model::attempt::{Attempt, FailureKind};
use crate::model::delivery::Endpoint;
use crate::ops::metrics::Metrics;
use crate::store::Status;

/// What an attempt means for its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Failed; try again at this time (by the schedule, or as `Retry-After` asked).
    RetryAt(DateTime<Utc>),
    /// Failed for good: the schedule is spent, or the payload is gone.
    Failed,
    /// The endpoint answered `410 Gone`: the delivery fails and the endpoint is disabled.
    EndpointGone,
    /// walhook ran out of a resource before reaching the receiver: try again at this time
    /// without counting the attempt.
    LocalRetry(DateTime<Utc>),
}

/// What `attempt`, the `attempts_made`-th of its delivery, means under `retry` at `now`.
pub fn decide(attempt: &Attempt, attempts_made: usize, retry: &RetryPolicy, now: DateTime<Utc>) -> Outcome {
    match attempt.failure {
        None => Outcome::Delivered,
        Some(FailureKind::Local) => Outcome::LocalRetry(now + LOCAL_RETRY),
        Some(_) if attempt.status == Some(410) => Outcome::EndpointGone,
        Some(FailureKind::Payload) => Outcome::Failed,
        Some(_) => match retry.next_delay(attempts_made, attempt.retry_after) {
            Some(delay) => Outcome::RetryAt(now + delay),
            None => Outcome::Failed,
        },
    }
}

impl Outcome {
    /// The outcome for an endpoint walhook has disabled meanwhile: nothing is retried.
    pub fn given_disabled(self, disabled: bool) -> Outcome {
        match self {
            Outcome::RetryAt(_) if disabled => Outcome::Failed,
            other => other,
        }
    }

    /// The delivery's status afterwards and, while pending, when it is due.
    pub fn status(self) -> (Status, Option<DateTime<Utc>>) {
        match self {
            Outcome::Delivered => (Status::Delivered, None),
            Outcome::RetryAt(at) | Outcome::LocalRetry(at) => (Status::Pending, Some(at)),
            Outcome::Failed | Outcome::EndpointGone => (Status::Failed, None),
        }
    }
}

/// Makes one attempt of delivery `delivery_id` holding `permit` (given back when the request
/// is over), counting it in flight meanwhile and recording its class and duration.
pub async fn send_one(
    sender: &Sender,
    metrics: &Metrics,
    endpoint: &Endpoint,
    delivery_id: Uuid,
    body: bytes::Bytes,
    permit: Permit,
) -> Attempt {
    metrics.in_flight.inc();
    let counted = InFlight(metrics);
    let attempt = sender.attempt(endpoint, &delivery_id.to_string(), body).await;
    drop(counted);
    drop(permit);
    Happening::AttemptMade { class: attempt.class(), duration: attempt.duration }.record(metrics);
    attempt
}

/// Counts an attempt in flight until dropped (also when the attempt is aborted).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn retry() -> RetryPolicy {
        RetryPolicy::fixed(vec![Duration::from_secs(5), Duration::from_secs(300)])
    }

    fn attempt(status: Option<u16>, failure: Option<FailureKind>) -> Attempt {
        Attempt {
            status,
            failure,
            retry_after: None,
            error: None,
            started_at: Utc::now(),
            duration: Duration::ZERO,
            response_snippet: String::new(),
        }
    }

    #[test]
    fn every_kind_of_attempt_has_one_meaning() {
        let (p, now) = (retry(), Utc::now());
        let first = p.next_delay(1, None).expect("the default schedule retries");
        let last = p.max_attempts();
        assert_eq!(decide(&attempt(Some(200), None), 1, &p, now), Outcome::Delivered);
        assert_eq!(decide(&attempt(Some(500), Some(FailureKind::Status)), 1, &p, now), Outcome::RetryAt(now + first));
        assert_eq!(decide(&attempt(None, Some(FailureKind::Timeout)), last, &p, now), Outcome::Failed);
        assert_eq!(decide(&attempt(Some(410), Some(FailureKind::Status)), 1, &p, now), Outcome::EndpointGone);
        assert_eq!(decide(&attempt(None, Some(FailureKind::Payload)), 1, &p, now), Outcome::Failed);
        assert_eq!(
            decide(&attempt(None, Some(FailureKind::Local)), last, &p, now),
            Outcome::LocalRetry(now + LOCAL_RETRY)
        );
    }

    #[test]
    fn a_disabled_endpoint_retries_nothing() {
        let now = Utc::now();
        assert_eq!(Outcome::RetryAt(now).given_disabled(true), Outcome::Failed);
        assert_eq!(Outcome::RetryAt(now).given_disabled(false), Outcome::RetryAt(now));
        assert_eq!(Outcome::Delivered.given_disabled(true), Outcome::Delivered);
        assert_eq!(Outcome::EndpointGone.status(), (Status::Failed, None));
    }
}
