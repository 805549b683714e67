//! What follows an attempt, decided once for the fast path and the outbox: a pure function
//! from the attempt's [`Outcome`] and where its delivery stands in the store to the write
//! that records it and the happenings to report.
//!
//! What must hold:
//! - Both senders settle through [`settle`]; neither writes an outcome on its own.
//! - A row stored under a lease (an outbox claim, or a fast-path row stored while its first
//!   attempt was in flight) is completed under that lease, or given back uncounted when the
//!   attempt never reached the receiver (`Outcome::LocalRetry`).
//! - A fast-path delivery not stored yet is inserted with its outcome: delivered, failed, or
//!   pending in the outbox (with no attempt spent when it never reached the receiver).
//! - A delivery whose endpoint was deleted meanwhile writes nothing.
//! - `410 Gone` asks for the endpoint to be disabled; the caller does it (the dispatcher also
//!   fails what waits for it in memory).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::happening::Happening;
use super::outcome::Outcome;
use crate::model::attempt::Attempt;
use crate::store::{Completion, Release, Status, StoreOp};

/// Where the attempted delivery stands in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Its row is stored, leased under `lease`; `attempt_no` is this attempt's number.
    Leased {
        /// The lease the attempt was made under.
        lease: Uuid,
        /// The attempt's number.
        attempt_no: i32,
    },
    /// Not stored yet (a fast-path first attempt).
    New,
    /// Its endpoint was deleted: nothing is recorded.
    Dropped,
}

/// The attempt's context.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The delivery.
    pub delivery: Uuid,
    /// Its endpoint.
    pub endpoint: Uuid,
    /// When its change committed (for the commit-to-delivered lag).
    pub committed_at: DateTime<Utc>,
    /// Now.
    pub now: DateTime<Utc>,
    /// Where it stands.
    pub stored: Stored,
}

/// A new row's fields (the caller, who holds the delivery and its ticket, builds the record).
#[derive(Debug)]
pub struct NewRow {
    /// Its status.
    pub status: Status,
    /// Attempts spent (0 when the attempt never reached the receiver).
    pub attempt_count: i32,
    /// When due, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Set when delivered or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// The attempt to record with it.
    pub attempt: Option<Attempt>,
}

/// What settling writes.
#[derive(Debug)]
pub enum Write {
    /// An op on the leased row (`Complete` or `Release`).
    Leased(StoreOp),
    /// Insert the delivery's row.
    Insert(NewRow),
    /// Nothing (the endpoint was deleted).
    Nothing,
}

/// What an attempt leads to.
#[derive(Debug)]
pub struct Settlement {
    /// The write that records it.
    pub write: Write,
    /// The endpoint answered `410 Gone`: disable it.
    pub disable_endpoint: bool,
    /// What to log and count.
    pub happenings: Vec<Happening>,
}

impl Settlement {
    /// The status the delivery is left in (`None` when nothing is recorded).
    pub fn status(&self) -> Option<Status> {
        match &self.write {
            Write::Leased(StoreOp::Complete(c)) => Some(c.status),
            Write::Leased(_) => Some(Status::Pending),
            Write::Insert(row) => Some(row.status),
            Write::Nothing => None,
        }
    }
}

/// What `attempt`, whose meaning is `outcome`, leads to in `cx`.
pub fn settle(outcome: Outcome, attempt: Attempt, cx: &Context) -> Settlement {
    if let Outcome::LocalRetry(next_attempt_at) = outcome {
        // The receiver was never reached: nothing is spent, it is retried soon.
        let last_error = format!("local: {}", attempt.error.unwrap_or_default());
        let mut happenings =
            vec![Happening::LocalFailure { delivery: cx.delivery, endpoint: cx.endpoint, error: last_error.clone() }];
        let write = match cx.stored {
            Stored::Leased { lease, .. } => {
                Write::Leased(StoreOp::Release(Release { id: cx.delivery, lease, next_attempt_at, last_error }))
            }
            Stored::New => {
                happenings.push(Happening::Created { direct: false });
                Write::Insert(NewRow {
                    status: Status::Pending,
                    attempt_count: 0,
                    next_attempt_at: Some(next_attempt_at),
                    last_error: Some(last_error),
                    completed_at: None,
                    attempt: None,
                })
            }
            Stored::Dropped => Write::Nothing,
        };
        return Settlement { write, disable_endpoint: false, happenings };
    }
    let mut happenings = Vec::new();
    if outcome == Outcome::Delivered {
        let lag_seconds = (cx.now - cx.committed_at).as_seconds_f64().max(0.0);
        happenings.push(Happening::Delivered { lag_seconds });
    }
    let (status, next_attempt_at) = outcome.status();
    if status == Status::Failed {
        happenings.push(Happening::DeliveryFailed);
    }
    let completed_at = (status != Status::Pending).then_some(cx.now);
    let write = match cx.stored {
        Stored::Leased { lease, attempt_no } => Write::Leased(StoreOp::Complete(Completion {
            id: cx.delivery,
            endpoint_id: cx.endpoint,
            lease,
            status,
            http_status: attempt.status,
            next_attempt_at,
            last_error: attempt.error.clone(),
            completed_at,
            attempt_no,
            attempt,
        })),
        Stored::New => {
            happenings.push(Happening::Created { direct: status == Status::Delivered });
            Write::Insert(NewRow {
                status,
                attempt_count: 1,
                next_attempt_at,
                last_error: attempt.error.clone(),
                completed_at,
                attempt: Some(attempt),
            })
        }
        Stored::Dropped => Write::Nothing,
    };
    Settlement { write, disable_endpoint: outcome == Outcome::EndpointGone, happenings }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::attempt::FailureKind;

    fn attempt(status: Option<u16>, failure: Option<FailureKind>) -> Attempt {
        Attempt {
            status,
            failure,
            retry_after: None,
            error: failure.map(|_| "it failed".to_owned()),
            started_at: Utc::now(),
            duration: Duration::ZERO,
            response_snippet: String::new(),
        }
    }

    fn cx(stored: Stored) -> Context {
        let now = Utc::now();
        Context { delivery: Uuid::from_u128(1), endpoint: Uuid::from_u128(2), committed_at: now, now, stored }
    }

    const LEASED: Stored = Stored::Leased { lease: Uuid::from_u128(3), attempt_no: 2 };

    #[test]
    fn a_leased_row_is_completed_or_given_back_under_its_lease() {
        let c = cx(LEASED);
        let s = settle(Outcome::Delivered, attempt(Some(200), None), &c);
        let Write::Leased(StoreOp::Complete(done)) = &s.write else { panic!("{s:?}") };
        assert_eq!(
            (done.status, done.lease, done.attempt_no, done.completed_at),
            (Status::Delivered, Uuid::from_u128(3), 2, Some(c.now))
        );
        assert!(matches!(s.happenings[..], [Happening::Delivered { .. }]));

        let at = c.now + chrono::Duration::seconds(5);
        let s = settle(Outcome::LocalRetry(at), attempt(None, Some(FailureKind::Local)), &c);
        let Write::Leased(StoreOp::Release(r)) = &s.write else { panic!("{s:?}") };
        assert_eq!((r.next_attempt_at, r.last_error.as_str()), (at, "local: it failed"));
        assert_eq!(s.status(), Some(Status::Pending));

        let s = settle(Outcome::EndpointGone, attempt(Some(410), Some(FailureKind::Status)), &c);
        assert!(s.disable_endpoint);
        assert_eq!(s.status(), Some(Status::Failed));
        assert!(matches!(s.happenings[..], [Happening::DeliveryFailed]));
    }

    #[test]
    fn a_new_row_is_inserted_with_its_outcome_and_counted_once() {
        let c = cx(Stored::New);
        let s = settle(Outcome::Delivered, attempt(Some(200), None), &c);
        let Write::Insert(row) = &s.write else { panic!("{s:?}") };
        assert_eq!((row.status, row.attempt_count, row.completed_at), (Status::Delivered, 1, Some(c.now)));
        assert!(matches!(s.happenings[..], [Happening::Delivered { .. }, Happening::Created { direct: true }]));

        let at = c.now + chrono::Duration::seconds(5);
        let s = settle(Outcome::RetryAt(at), attempt(Some(503), Some(FailureKind::Status)), &c);
        let Write::Insert(row) = &s.write else { panic!("{s:?}") };
        assert_eq!((row.status, row.next_attempt_at, row.completed_at), (Status::Pending, Some(at), None));
        assert!(matches!(s.happenings[..], [Happening::Created { direct: false }]));

        let s = settle(Outcome::LocalRetry(at), attempt(None, Some(FailureKind::Local)), &c);
        let Write::Insert(row) = &s.write else { panic!("{s:?}") };
        assert_eq!((row.attempt_count, row.attempt.is_none()), (0, true), "no attempt spent or recorded");
    }

    #[test]
    fn a_dropped_delivery_writes_nothing_but_is_still_reported() {
        let s = settle(Outcome::Failed, attempt(Some(500), Some(FailureKind::Status)), &cx(Stored::Dropped));
        assert!(matches!(s.write, Write::Nothing));
        assert!(matches!(s.happenings[..], [Happening::DeliveryFailed]));
    }
}
