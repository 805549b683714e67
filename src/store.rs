//! The store writer: every write of the delivery path, batched, in arrival order.
//!
//! What must hold: a delivery's ticket is settled only after the transaction holding its
//! record (delivered) or its outbox row (pending, with the payload) has committed; rows have
//! deterministic ids and inserts are `ON CONFLICT DO NOTHING`, so a replay inserts nothing
//! twice; ops are applied in the order they were sent (a spilled row's later deliveries
//! never commit before it); a failed write is retried, never dropped; probes run after
//! every op sent before them has committed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::db::{Db, DbError};
use crate::dispatch::http::Attempt;
use crate::progress::Ticket;
use crate::route::Event;

/// Ops written per transaction at most.
const MAX_BATCH: usize = 1024;

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

/// A question about the outbox, answered after everything sent before it has committed.
#[derive(Debug)]
pub struct Probe {
    /// The endpoint asked about.
    pub endpoint_id: Uuid,
    /// Delivery ids to check: which are still pending?
    pub ids: Vec<Uuid>,
    /// Also ask whether the endpoint has any pending delivery at all.
    pub whole_endpoint: bool,
    /// Echoed back so the asker can tell stale answers from fresh ones.
    pub generation: u64,
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
    /// With `whole_endpoint`: whether any delivery of the endpoint is pending.
    pub endpoint_pending: Option<bool>,
    /// The probe's generation.
    pub generation: u64,
}

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
}

/// Applies [`StoreOp`]s in batches.
pub struct StoreWriter {
    db: Db,
    rx: mpsc::Receiver<StoreOp>,
}

impl StoreWriter {
    /// A writer and the channel feeding it (`capacity` ops).
    pub fn new(db: Db, capacity: usize) -> (StoreWriter, mpsc::Sender<StoreOp>) {
        let (tx, rx) = mpsc::channel(capacity);
        (StoreWriter { db, rx }, tx)
    }

    /// Runs until every sender is gone and everything sent is written.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(op) = self.rx.recv().await {
            batch.push(op);
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut backoff = Duration::from_millis(100);
            let started = std::time::Instant::now();
            loop {
                match write_batch(&self.db, &batch).await {
                    Ok(()) => {
                        tracing::trace!(ops = batch.len(), took = ?started.elapsed(), "store batch written");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ops = batch.len(), retry_in = ?backoff, "store write failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            let probes = settle(&mut batch);
            for probe in probes {
                answer_probe(&self.db, probe).await;
            }
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
            StoreOp::Complete(_) | StoreOp::Disable { .. } | StoreOp::FailPending { .. } => {}
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
                    .query(
                        "SELECT id FROM walhook.deliveries WHERE id = ANY($1) AND status = 'pending'",
                        &[&p.ids],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                p.ids.iter().filter(|id| !pending.contains(id)).copied().collect()
            };
            let endpoint_pending = if p.whole_endpoint {
                let row = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM walhook.deliveries WHERE endpoint_id = $1 AND status = 'pending')",
                        &[&p.endpoint_id],
                    )
                    .await?;
                Some(row.get(0))
            } else {
                None
            };
            Ok(ProbeAnswer { endpoint_id: p.endpoint_id, settled, endpoint_pending, generation: p.generation })
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

fn micros_to_time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

#[derive(Default)]
struct AttemptRows {
    delivery: Vec<Uuid>,
    number: Vec<i32>,
    started: Vec<DateTime<Utc>>,
    duration_ms: Vec<i32>,
    status: Vec<Option<i32>>,
    kind: Vec<Option<&'static str>>,
    error: Vec<Option<String>>,
    snippet: Vec<Option<String>>,
}

impl AttemptRows {
    fn push(&mut self, id: Uuid, number: i32, a: &Attempt) {
        use crate::dispatch::http::FailureKind;
        self.delivery.push(id);
        self.number.push(number);
        self.started.push(a.started_at);
        self.duration_ms.push(a.duration.as_millis().min(i32::MAX as u128) as i32);
        self.status.push(a.status.map(i32::from));
        self.kind.push(a.failure.map(|k| match k {
            FailureKind::Status => "status",
            FailureKind::Timeout => "timeout",
            FailureKind::Network => "network",
            FailureKind::Refused => "refused",
        }));
        self.error.push(a.error.clone());
        self.snippet.push((!a.response_snippet.is_empty()).then(|| a.response_snippet.clone()));
    }
}

async fn write_batch(db: &Db, batch: &[StoreOp]) -> Result<(), DbError> {
    // Column arrays for the three statements.
    let (mut e_id, mut e_acct, mut e_type, mut e_lsn, mut e_seq, mut e_body, mut e_at) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut d_id, mut d_ep, mut d_ev, mut d_type, mut d_key, mut d_lsn, mut d_seq, mut d_status) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut d_http, mut d_count, mut d_next, mut d_lease_until, mut d_lease_by, mut d_err, mut d_created, mut d_done) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut c_id, mut c_lease, mut c_status, mut c_http, mut c_next, mut c_err, mut c_done) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut attempts = AttemptRows::default();
    // Endpoints whose attempts succeeded / failed in this batch (failure streak tracking).
    let (mut ep_ok, mut ep_failed): (Vec<Uuid>, Vec<Uuid>) = (Vec::new(), Vec::new());
    let mut note = |ep: Uuid, a: &Attempt| {
        let list = if a.succeeded() { &mut ep_ok } else { &mut ep_failed };
        if !list.contains(&ep) {
            list.push(ep);
        }
    };
    let (mut disable_ids, mut disable_reasons, mut fail_pending) = (Vec::new(), Vec::new(), Vec::new());
    for op in batch {
        match op {
            StoreOp::Insert(r) => {
                let ev = &r.event;
                if r.status == Status::Pending && !e_id.contains(&ev.id) {
                    e_id.push(ev.id);
                    e_acct.push(ev.account_id);
                    e_type.push(ev.event_type);
                    e_lsn.push(ev.commit_lsn as i64);
                    e_seq.push(ev.seq as i32);
                    e_body.push(ev.body.as_ref());
                    e_at.push(micros_to_time(ev.committed_at_us));
                }
                d_id.push(r.id);
                d_ep.push(r.endpoint_id);
                d_ev.push(ev.id);
                d_type.push(ev.event_type);
                d_key.push(ev.entity_key.as_str());
                d_lsn.push(ev.commit_lsn as i64);
                d_seq.push(ev.seq as i32);
                d_status.push(r.status.as_str());
                d_http.push(r.http_status.map(i32::from));
                d_count.push(r.attempt_count);
                d_next.push(r.next_attempt_at);
                d_lease_until.push(r.lease.map(|l| l.1));
                d_lease_by.push(r.lease.map(|l| l.0));
                d_err.push(r.last_error.as_deref());
                d_created.push(micros_to_time(ev.committed_at_us));
                d_done.push(r.completed_at);
                if let Some(a) = &r.attempt {
                    attempts.push(r.id, r.attempt_count, a);
                    note(r.endpoint_id, a);
                }
            }
            StoreOp::Complete(c) => {
                c_id.push(c.id);
                c_lease.push(c.lease);
                c_status.push(c.status.as_str());
                c_http.push(c.http_status.map(i32::from));
                c_next.push(c.next_attempt_at);
                c_err.push(c.last_error.as_deref());
                c_done.push(c.completed_at);
                attempts.push(c.id, c.attempt_no, &c.attempt);
                note(c.endpoint_id, &c.attempt);
            }
            StoreOp::Probe(_) => {}
            StoreOp::Disable { endpoint_id, reason } => {
                disable_ids.push(*endpoint_id);
                disable_reasons.push(*reason);
                fail_pending.push(*endpoint_id);
            }
            StoreOp::FailPending { endpoint_id } => fail_pending.push(*endpoint_id),
        }
    }
    if d_id.is_empty() && c_id.is_empty() && fail_pending.is_empty() {
        return Ok(());
    }
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    if !e_id.is_empty() {
        let st = tx
            .prepare_cached(
                "INSERT INTO walhook.events (id, account_id, event_type, commit_lsn, seq, body, created_at) \
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::int4[], $6::bytea[], $7::timestamptz[]) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        tx.execute(&st, &[&e_id, &e_acct, &e_type, &e_lsn, &e_seq, &e_body, &e_at]).await?;
    }
    if !d_id.is_empty() {
        let st = tx
            .prepare_cached(
                "INSERT INTO walhook.deliveries (id, endpoint_id, event_id, event_type, entity_key, commit_lsn, seq, \
                   status, http_status_code, attempt_count, next_attempt_at, lease_until, leased_by, last_error, \
                   created_at, completed_at) \
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int8[], \
                   $7::int4[], $8::text[], $9::int4[], $10::int4[], $11::timestamptz[], $12::timestamptz[], \
                   $13::uuid[], $14::text[], $15::timestamptz[], $16::timestamptz[]) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        tx.execute(
            &st,
            &[
                &d_id,
                &d_ep,
                &d_ev,
                &d_type,
                &d_key,
                &d_lsn,
                &d_seq,
                &d_status,
                &d_http,
                &d_count,
                &d_next,
                &d_lease_until,
                &d_lease_by,
                &d_err,
                &d_created,
                &d_done,
            ],
        )
        .await?;
    }
    if !c_id.is_empty() {
        let st = tx
            .prepare_cached(
                "UPDATE walhook.deliveries d SET status = u.status, \
                   http_status_code = COALESCE(u.http, d.http_status_code), next_attempt_at = u.next_at, \
                   lease_until = NULL, leased_by = NULL, last_error = u.err, completed_at = u.done \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::timestamptz[], $6::text[], \
                   $7::timestamptz[]) AS u(id, lease, status, http, next_at, err, done) \
                 WHERE d.id = u.id AND d.leased_by = u.lease AND d.status = 'pending'",
            )
            .await?;
        tx.execute(&st, &[&c_id, &c_lease, &c_status, &c_http, &c_next, &c_err, &c_done]).await?;
    }
    if !attempts.delivery.is_empty() {
        let a = &attempts;
        let st = tx
            .prepare_cached(
                "INSERT INTO walhook.attempts (delivery_id, attempt, started_at, duration_ms, http_status_code, \
                   error_kind, error, response_snippet) \
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[], $4::int4[], $5::int4[], \
                   $6::text[], $7::text[], $8::text[]) \
                 ON CONFLICT (delivery_id, attempt) DO NOTHING",
            )
            .await?;
        tx.execute(
            &st,
            &[&a.delivery, &a.number, &a.started, &a.duration_ms, &a.status, &a.kind, &a.error, &a.snippet],
        )
        .await?;
    }
    if !ep_ok.is_empty() {
        // Only rows that change are written (and replicated).
        let st = tx
            .prepare_cached(
                "UPDATE walhook.endpoints SET failing_since = NULL WHERE id = ANY($1) AND failing_since IS NOT NULL",
            )
            .await?;
        tx.execute(&st, &[&ep_ok]).await?;
    }
    if !ep_failed.is_empty() {
        let st = tx
            .prepare_cached(
                "UPDATE walhook.endpoints SET failing_since = now() \
                 WHERE id = ANY($1) AND failing_since IS NULL AND NOT (id = ANY($2))",
            )
            .await?;
        tx.execute(&st, &[&ep_failed, &ep_ok]).await?;
    }
    if !disable_ids.is_empty() {
        let st = tx
            .prepare_cached(
                "UPDATE walhook.endpoints e SET is_active = false, disabled_reason = u.reason, updated_at = now() \
                 FROM unnest($1::uuid[], $2::text[]) AS u(id, reason) WHERE e.id = u.id AND e.is_active",
            )
            .await?;
        tx.execute(&st, &[&disable_ids, &disable_reasons]).await?;
    }
    if !fail_pending.is_empty() {
        let st = tx
            .prepare_cached(
                "UPDATE walhook.deliveries d SET status = 'failed', completed_at = now(), lease_until = NULL, \
                   leased_by = NULL, last_error = 'endpoint disabled: ' || e.disabled_reason \
                 FROM walhook.endpoints e \
                 WHERE d.endpoint_id = ANY($1) AND d.status = 'pending' AND e.id = d.endpoint_id \
                   AND NOT e.is_active AND e.disabled_reason IS NOT NULL",
            )
            .await?;
        tx.execute(&st, &[&fail_pending]).await?;
    }
    tx.commit().await?;
    Ok(())
}
