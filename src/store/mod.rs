//! The store writer: every write of the delivery path, batched, in arrival order.
//!
//! What must hold: a delivery's ticket is settled only after the batch holding its
//! record (delivered) or its outbox row (pending, with the payload) has committed; rows have
//! deterministic ids and inserts are `ON CONFLICT DO NOTHING`, so a replay inserts nothing
//! twice; ops are applied in the order they were sent (a spilled row's later deliveries
//! never commit before it); a write that fails for a transient reason is retried, never
//! dropped, and one the database refuses is split so that only the op at fault is set aside
//! (`resilient`); probes are answered after every op sent before them has committed and before
//! any op sent after them does; batches are bounded in ops and bytes (`batch`).
//!
//! The store owns walhook's tables (those the migrations in `sql/` create): every query on
//! them is here, one file per table or group, and the other stages call its named functions
//! (`endpoints`, `deliveries`, `outbox`, `versions`, `slot_state`, `secrets`, `maintenance`,
//! and the writer). An endpoint row is decoded in one place (`endpoints::decode`). Functions
//! that take a client or transaction run on the caller's, so the caller keeps its
//! transaction boundaries. Not here, by design: the DDL of `sql/`, run by `pg::migrate`
//! (with its `schema_migrations` bookkeeping, whose version `pg::preflight` reads), the
//! role's privileges (`pg::grants`), and PostgreSQL's own catalogs and views
//! (`pg_replication_slots`, `pg_publication`, …), which are not walhook's tables. The unit
//! test `layers::only_the_store_queries_walhooks_tables` checks this.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::model::attempt::Attempt;
use crate::model::delivery::{Delivery, Event};
use crate::model::progress::Ticket;
use crate::ops::metrics::Metrics;
use crate::ops::status::StoreHealth;
use crate::pg::db::{Db, DbError};

pub(crate) mod backfills;
mod batch;
pub(crate) mod deliveries;
pub(crate) mod endpoints;
pub mod maintenance;
pub mod outbox;
pub(crate) mod recover;
mod resilient;
mod stall;
pub(crate) use resilient::is_refusal;
pub use stall::{watched, watched_alone, Watch};
pub(crate) mod secrets;
pub(crate) mod slot_state;
pub(crate) mod versions;
mod write;

/// Default of `database.write_stall_after`.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting in the outbox.
    Pending,
    /// Receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
        }
    }
}

/// A new delivery row.
#[derive(Debug)]
pub struct Record {
    /// Delivery id.
    pub id: Uuid,
    /// Target endpoint.
    pub endpoint_id: Uuid,
    /// The event (its payload is stored when the row is pending).
    pub event: Arc<Event>,
    /// Row status.
    pub status: Status,
    /// Attempts made so far.
    pub attempt_count: i32,
    /// Last HTTP status.
    pub http_status: Option<u16>,
    /// When a pending row becomes due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// A lease held on a pending row whose attempt is still in flight.
    pub lease: Option<(Uuid, DateTime<Utc>)>,
    /// Last failure, for operators.
    pub last_error: Option<String>,
    /// When it was delivered or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// The attempt this record reports, if one was made.
    pub attempt: Option<Attempt>,
    /// Settled once this row commits.
    pub ticket: Option<Ticket>,
}

impl Record {
    /// The same row, without the ticket (which stays with `self`).
    pub(crate) fn duplicate(&self) -> Record {
        Record {
            id: self.id,
            endpoint_id: self.endpoint_id,
            event: self.event.clone(),
            status: self.status,
            attempt_count: self.attempt_count,
            http_status: self.http_status,
            next_attempt_at: self.next_attempt_at,
            lease: self.lease,
            last_error: self.last_error.clone(),
            completed_at: self.completed_at,
            attempt: self.attempt.clone(),
            ticket: None,
        }
    }

    /// Whether this row records a delivery that succeeded on its first attempt: that attempt
    /// is kept on the row itself (`first_*`), not in `walhook.attempts` (one tuple per event).
    pub(crate) fn is_first_attempt_success(&self) -> bool {
        self.status == Status::Delivered
            && self.attempt_count == 1
            && self.attempt.as_ref().is_some_and(Attempt::succeeded)
    }

    /// A row of delivery `d` with `status`, taking its ticket: no attempt made or reported,
    /// not due, no lease, no error. Callers set what differs.
    pub fn new(d: &mut Delivery, status: Status) -> Record {
        Record {
            id: d.id,
            endpoint_id: d.endpoint.id,
            event: d.event.clone(),
            status,
            attempt_count: 0,
            http_status: None,
            next_attempt_at: None,
            lease: None,
            last_error: None,
            completed_at: None,
            attempt: None,
            ticket: d.ticket.take(),
        }
    }
}

/// The outcome of an attempt on a leased pending row.
#[derive(Debug)]
pub struct Completion {
    /// Delivery id.
    pub id: Uuid,
    /// Its endpoint.
    pub endpoint_id: Uuid,
    /// The lease the attempt was made under; a row leased by someone else is left alone.
    pub lease: Uuid,
    /// New status.
    pub status: Status,
    /// HTTP status, if any.
    pub http_status: Option<u16>,
    /// Next attempt time while still pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Set when delivered or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// Number of the attempt reported.
    pub attempt_no: i32,
    /// The attempt.
    pub attempt: Attempt,
}

/// A leased row given back without counting its attempt: the attempt failed for a local
/// reason (no descriptor, no memory) before reaching the receiver, so no attempt is recorded
/// and `attempt_count` goes back down by the one its claim added.
#[derive(Debug)]
pub struct Release {
    /// Delivery id.
    pub id: Uuid,
    /// The lease the attempt was made under; a row leased by someone else is left alone.
    pub lease: Uuid,
    /// When to try again.
    pub next_attempt_at: DateTime<Utc>,
    /// What went wrong, for operators.
    pub last_error: String,
}

/// A question about the outbox, answered after everything sent before it has committed.
#[derive(Debug)]
pub struct Probe {
    /// The endpoint asked about.
    pub endpoint_id: Uuid,
    /// Delivery ids to check: which are still pending?
    pub ids: Vec<Uuid>,
    /// Also ask whether the endpoint has any pending delivery outside `known_rows`.
    pub whole_endpoint: bool,
    /// Rows (`entity_key`) whose pending deliveries the asker already accounts for.
    pub known_rows: Vec<String>,
    /// Where the answer goes.
    pub reply: mpsc::Sender<ProbeAnswer>,
}

/// The answer to a [`Probe`].
#[derive(Debug)]
pub struct ProbeAnswer {
    /// The endpoint asked about.
    pub endpoint_id: Uuid,
    /// Ids asked about that are no longer pending (delivered, failed or deleted).
    pub settled: Vec<Uuid>,
    /// With `whole_endpoint`: whether any delivery of the endpoint outside `known_rows` is
    /// pending (among those sent before the probe: a probe ends its batch).
    pub endpoint_pending: Option<bool>,
}

/// Whether endpoint `$1` has a pending delivery of a row outside `$2`. It walks the distinct
/// pending rows in key order (one index probe each, via `deliveries_entity_order`) and stops
/// at the first unknown one, so a million pending deliveries of a few known rows cost a few
/// probes, not a scan.
const PENDING_OUTSIDE_KNOWN_ROWS: &str = "WITH RECURSIVE k(key) AS ( \
       (SELECT entity_key FROM walhook.deliveries WHERE endpoint_id = $1 AND status = 'pending' \
        ORDER BY entity_key LIMIT 1) \
     UNION ALL \
       SELECT (SELECT d.entity_key FROM walhook.deliveries d \
               WHERE d.endpoint_id = $1 AND d.status = 'pending' AND d.entity_key > k.key \
               ORDER BY d.entity_key LIMIT 1) \
       FROM k WHERE k.key = ANY($2)) \
     SELECT EXISTS (SELECT 1 FROM k WHERE k.key IS NOT NULL AND NOT (k.key = ANY($2)))";

/// Why walhook disables an endpoint itself (`walhook.endpoints.disabled_reason`).
pub const DISABLED_GONE: &str = "gone";
/// See [`DISABLED_GONE`].
pub const DISABLED_FAILING: &str = "failing";

/// One write of the delivery path.
#[derive(Debug)]
pub enum StoreOp {
    /// Insert a delivery row (delivered record or outbox row).
    Insert(Record),
    /// Record the outcome of an attempt on a leased row.
    Complete(Completion),
    /// Ask about pending rows.
    Probe(Probe),
    /// Give a leased row back without counting its attempt.
    Release(Release),
    /// Disable an endpoint (`reason` is [`DISABLED_GONE`] or [`DISABLED_FAILING`]) and fail
    /// what waits for it.
    Disable {
        /// The endpoint.
        endpoint_id: Uuid,
        /// Why.
        reason: &'static str,
    },
    /// Fail whatever still waits for an endpoint that walhook disabled (rows stored after
    /// the disable, before its replicated change reached dispatch).
    FailPending {
        /// The endpoint.
        endpoint_id: Uuid,
    },
    /// Release the held deliveries of one requeue (`store::recover`) to the outbox, after
    /// every op sent before this one, to queue in their rows at `at`; `ticket` (the requeue's
    /// transaction) is settled once the release commits, so the slot is not confirmed past a
    /// requeue whose deliveries are still held.
    ReleaseHeld {
        /// The endpoint.
        endpoint_id: Uuid,
        /// The requeue's commit LSN, as the stream read it.
        at: u64,
        /// The requeue's tag: the endpoint's `requeue_tag`, as the stream read it.
        tag: i64,
        /// The requeue's transaction.
        ticket: Option<Ticket>,
    },
}

/// What the store writer shares with the rest of the process, and how it writes. Required:
/// a writer whose stalls reach no `/readyz` would break invariant 14 silently.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Where stalls and pinned records are reported (read by `/readyz`).
    pub health: Arc<StoreHealth>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// No commit for this long while ops wait is a stall (`database.write_stall_after`).
    pub stall_after: Duration,
    /// Store every event's payload once, not only those of pending deliveries (the payload
    /// archive, `retention.payloads`).
    pub archive: bool,
}

/// Applies [`StoreOp`]s in batches.
pub struct StoreWriter {
    db: Db,
    rx: mpsc::Receiver<StoreOp>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    stall_after: Duration,
    archive: bool,
}

impl StoreWriter {
    /// A writer and the channel feeding it (`capacity` ops), reporting stalls (no commit for
    /// `stall_after` while ops wait) to `settings.health` and counting in `settings.metrics`.
    pub fn new(db: Db, capacity: usize, settings: WriterSettings) -> (StoreWriter, mpsc::Sender<StoreOp>) {
        let (tx, rx) = mpsc::channel(capacity);
        let WriterSettings { health, metrics, stall_after, archive } = settings;
        for form in ["without_texts", "failed", "rejected"] {
            metrics.store_set_aside.with_label_values(&[form]);
        }
        // Disables are counted where one actually happens (see `resilient`); both reasons
        // are there at 0 from the start.
        for reason in [DISABLED_GONE, DISABLED_FAILING] {
            metrics.endpoints_disabled.with_label_values(&[reason]);
        }
        (StoreWriter { db, rx, health, metrics, stall_after, archive }, tx)
    }

    /// Runs until every sender is gone and everything sent is written.
    pub async fn run(mut self) {
        let mut carry = None;
        let ctx = resilient::Ctx {
            db: &self.db,
            health: &self.health,
            metrics: &self.metrics,
            stall_after: self.stall_after,
            archive: self.archive,
        };
        let mut parked = resilient::Parked::default();
        loop {
            let next = tokio::select! {
                biased;
                // 1. The next batch.
                next = batch::next(&mut self.rx, &mut carry, self.archive) => next,
                // 2. Records the database refused in every form, tried again with backoff.
                _ = tokio::time::sleep_until(parked.due()), if !parked.is_empty() => {
                    parked.retry(&ctx).await;
                    continue;
                }
            };
            let Some(mut batch) = next else { break };
            let started = std::time::Instant::now();
            resilient::write(&ctx, &mut batch, &mut parked).await;
            tracing::trace!(ops = batch.len(), took = ?started.elapsed(), "store batch written");
            let probes = settle(&mut batch);
            for probe in probes {
                // A probe waits on walhook's tables like a write does: a lock there is a stall.
                stall::watched(ctx.watch(), answer_probe(&self.db, probe), tokio::time::Instant::now()).await;
                ctx.health.progress();
            }
        }
        // Every sender is gone: one last try; what is still refused is dropped with its ticket
        // (its transaction is read again after a restart).
        if !parked.is_empty() {
            parked.retry(&ctx).await;
        }
    }
}

/// Settles the tickets of a committed batch; returns its probes.
fn settle(batch: &mut Vec<StoreOp>) -> Vec<Probe> {
    let mut probes = Vec::new();
    for op in batch.drain(..) {
        match op {
            StoreOp::Insert(mut r) => {
                if let Some(t) = r.ticket.take() {
                    t.settle();
                }
            }
            StoreOp::ReleaseHeld { ticket: Some(t), .. } => t.settle(),
            StoreOp::ReleaseHeld { ticket: None, .. } => {}
            StoreOp::Complete(_) | StoreOp::Release(_) | StoreOp::Disable { .. } | StoreOp::FailPending { .. } => {}
            StoreOp::Probe(p) => probes.push(p),
        }
    }
    probes
}

async fn answer_probe(db: &Db, p: Probe) {
    let mut backoff = Duration::from_millis(100);
    let answer = loop {
        let result: Result<ProbeAnswer, DbError> = async {
            let client = db.get().await?;
            let settled = if p.ids.is_empty() {
                Vec::new()
            } else {
                let pending: Vec<Uuid> = client
                    .query("SELECT id FROM walhook.deliveries WHERE id = ANY($1) AND status = 'pending'", &[&p.ids])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                p.ids.iter().filter(|id| !pending.contains(id)).copied().collect()
            };
            let endpoint_pending = if p.whole_endpoint {
                let row = client.query_one(PENDING_OUTSIDE_KNOWN_ROWS, &[&p.endpoint_id, &p.known_rows]).await?;
                Some(row.get(0))
            } else {
                None
            };
            Ok(ProbeAnswer { endpoint_id: p.endpoint_id, settled, endpoint_pending })
        }
        .await;
        match result {
            Ok(a) => break a,
            Err(e) => {
                tracing::warn!(error = %e, "outbox probe failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    let _ = p.reply.send(answer).await;
}
