//! Writing a batch whatever the database answers.
//!
//! What must hold: a transient failure (connection lost, restart, lock timeout, anything that
//! is not a refusal of the data) retries the same ops with backoff, never dropping one; a
//! refusal of the data (SQLSTATE classes 22, 23, 54) splits the batch, halves in op order, to
//! find the op at fault, and everything else commits; the op at fault is stored again
//! without its free texts, then (a new delivery) as failed without payload or attempt, with
//! the reason. A new delivery refused even then is *parked* ([`Parked`]): one ERROR names it,
//! `walhook_store_pinned_records` counts it and `/readyz` says it holds the slot (its ticket,
//! unsettled, keeps the slot from moving past it: nothing not durable is confirmed), and it is
//! tried again, every form in turn, with backoff, so the slot catches up once the cause is gone,
//! without a restart. At shutdown what is still parked is dropped, its ticket with it (its
//! transaction replays after a restart). Any other op refused in every form is skipped with an
//! ERROR (a completion left alone is claimed again once its lease ends). A write that does not
//! commit for the stall limit is reported ([`stall`]).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{stall, write, Record, Status, StoreOp, DISABLED_GONE};
use crate::ops::metrics::Metrics;
use crate::ops::status::{StallOf, StoreHealth};
use crate::pg::db::{Db, DbError};

/// Backoff between retries of a failing write: first, and at most.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// What a batch is written with.
pub(super) struct Ctx<'a> {
    pub db: &'a Db,
    pub health: &'a StoreHealth,
    pub metrics: &'a Metrics,
    pub stall_after: Duration,
    /// Every event's payload is stored (`retention.payloads`).
    pub archive: bool,
}

impl Ctx<'_> {
    /// What a write of this context is watched with for stalls.
    pub fn watch(&self) -> stall::Watch<'_> {
        stall::Watch { db: self.db, health: self.health, stall_after: self.stall_after, of: StallOf::Store }
    }
}

/// Parked tries: first again after this, doubling up to the most.
const PARKED_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// New deliveries the database refused in every form, each with its ticket: tried again until
/// stored (see the module's documentation).
#[derive(Debug)]
pub(super) struct Parked {
    records: Vec<Record>,
    next_try: Instant,
    backoff: Duration,
}

impl Default for Parked {
    fn default() -> Self {
        Parked { records: Vec::new(), next_try: Instant::now(), backoff: PARKED_RETRY.0 }
    }
}

impl Parked {
    /// Whether nothing is parked.
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// When the parked records are tried next.
    pub(super) fn due(&self) -> Instant {
        self.next_try
    }

    fn park(&mut self, ctx: &Ctx<'_>, record: Record, why: String) {
        ctx.health.pin(record.id, why);
        self.records.push(record);
        self.backoff = PARKED_RETRY.0;
        self.next_try = Instant::now() + self.backoff;
    }

    /// Tries every parked record again, each in every form; settles those stored.
    pub(super) async fn retry(&mut self, ctx: &Ctx<'_>) {
        let mut still = Vec::new();
        for record in std::mem::take(&mut self.records) {
            let original = record.duplicate();
            let mut op = StoreOp::Insert(record);
            match store_in_some_form(ctx, &mut op).await {
                Ok(form) => {
                    let StoreOp::Insert(mut stored) = op else { unreachable!("an insert stays one") };
                    tracing::info!(delivery = %stored.id, form, "a parked delivery record was stored at last; the slot moves on");
                    ctx.health.unpin(stored.id);
                    if let Some(t) = stored.ticket.take() {
                        t.settle();
                    }
                }
                Err(e) => {
                    let StoreOp::Insert(mut tried) = op else { unreachable!("an insert stays one") };
                    tracing::debug!(delivery = %tried.id, error = %e, "a parked delivery record is still refused");
                    let mut again = original;
                    again.ticket = tried.ticket.take();
                    ctx.health.pin(again.id, e.to_string());
                    still.push(again);
                }
            }
        }
        self.records = still;
        self.backoff = (self.backoff * 2).min(PARKED_RETRY.1);
        self.next_try = Instant::now() + self.backoff;
    }
}

/// Writes `ops` in order; returns once each is committed, set aside or parked.
pub(super) async fn write(ctx: &Ctx<'_>, ops: &mut [StoreOp], parked: &mut Parked) {
    let started = Instant::now();
    let mut todo = VecDeque::from([(0, ops.len())]);
    while let Some((from, to)) = todo.pop_front() {
        match write_retrying(ctx, &ops[from..to], started).await {
            Ok(()) => {}
            Err(e) if to - from == 1 => set_aside(ctx, &mut ops[from], e, started, parked).await,
            Err(e) => {
                tracing::debug!(error = %e, ops = to - from, "the database refused a store batch; splitting it");
                let mid = from + (to - from) / 2;
                todo.push_front((mid, to));
                todo.push_front((from, mid));
            }
        }
    }
}

/// Whether the database refused the data itself (retrying the same ops cannot succeed).
pub(crate) fn is_refusal(e: &DbError) -> bool {
    matches!(sqlstate(e).get(..2), Some("22" | "23" | "54"))
}

fn sqlstate(e: &DbError) -> &str {
    match e {
        DbError::Postgres(e) => e.code().map_or("", |c| c.code()),
        _ => "",
    }
}

/// Writes `ops`, retrying anything but a refusal of the data; `Err` is such a refusal.
async fn write_retrying(ctx: &Ctx<'_>, ops: &[StoreOp], started: Instant) -> Result<(), DbError> {
    let mut backoff = BACKOFF.0;
    loop {
        match stall::watched(ctx.watch(), write::write_batch(ctx.db, ops, ctx.archive), started).await {
            Ok(disabled) => {
                ctx.health.progress();
                report_disabled(ctx.metrics, disabled);
                return Ok(());
            }
            // The database answers: the split that follows makes progress.
            Err(e) if is_refusal(&e) => {
                ctx.health.progress();
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, ops = ops.len(), retry_in = ?backoff, "store write failed; retrying");
                ctx.health.note_error(e.to_string());
                if started.elapsed() >= ctx.stall_after {
                    ctx.health
                        .stall(StallOf::Store, format!("store writes have failed for {:?}: {e}", started.elapsed()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// Reports the endpoints a committed write disabled: once each, however many 410 answers or
/// maintenance passes asked for it (the DISABLE statement returns only rows it changed).
fn report_disabled(metrics: &Metrics, disabled: Vec<(uuid::Uuid, String)>) {
    for (endpoint, reason) in disabled {
        let why = if reason == DISABLED_GONE {
            "it answered 410 Gone"
        } else {
            "every delivery to it has failed for dispatch.disable_after"
        };
        tracing::warn!(endpoint = %endpoint, reason = %reason, "endpoint disabled: {why}; its pending deliveries fail");
        metrics.endpoints_disabled.with_label_values(&[&reason]).inc();
    }
}

/// The op the database refused, alone: stored in a reduced form if it can be, else parked (a
/// new delivery) or skipped.
async fn set_aside(ctx: &Ctx<'_>, op: &mut StoreOp, refusal: DbError, started: Instant, parked: &mut Parked) {
    let code = sqlstate(&refusal).to_owned();
    let id = op_id(op);
    let original = match op {
        StoreOp::Insert(r) => Some(r.duplicate()),
        _ => None,
    };
    let cause = match reduced_forms(ctx, op, refusal, started).await {
        Ok(form) => {
            if form == "failed" {
                tracing::error!(delivery = %id, sqlstate = %code, "the database refused this delivery; stored it as failed, without its payload");
            } else {
                tracing::warn!(delivery = %id, sqlstate = %code, "the database refused this delivery's texts; stored it without them");
            }
            ctx.metrics.store_set_aside.with_label_values(&[form]).inc();
            return;
        }
        Err(cause) => cause,
    };
    ctx.metrics.store_set_aside.with_label_values(&["rejected"]).inc();
    match (op, original) {
        (StoreOp::Insert(r), Some(mut original)) => {
            tracing::error!(delivery = %id, sqlstate = %sqlstate(&cause), error = %cause, "the database refused this delivery's record in every form; it holds the replication slot until it is stored, and walhook tries it again (see /readyz and walhook_store_pinned_records)");
            original.ticket = r.ticket.take();
            parked.park(ctx, original, cause.to_string());
        }
        _ => {
            tracing::error!(delivery = %id, sqlstate = %sqlstate(&cause), error = %cause, "the database refused this store write in every form; skipped it (an attempt's outcome is claimed again once its lease ends)");
        }
    }
}

/// Stores `op` as it is, or else in a reduced form; which form (`as_is`, `without_texts`,
/// `failed`), or the last refusal.
async fn store_in_some_form(ctx: &Ctx<'_>, op: &mut StoreOp) -> Result<&'static str, DbError> {
    let started = Instant::now();
    match write_retrying(ctx, std::slice::from_mut(op), started).await {
        Ok(()) => Ok("as_is"),
        Err(refusal) => reduced_forms(ctx, op, refusal, started).await,
    }
}

/// After `refusal`: `op` without its texts, then as failed; the form stored, or the last refusal.
async fn reduced_forms(
    ctx: &Ctx<'_>,
    op: &mut StoreOp,
    refusal: DbError,
    started: Instant,
) -> Result<&'static str, DbError> {
    let code = sqlstate(&refusal).to_owned();
    let mut cause = refusal;
    if without_texts(op, &code) {
        match write_retrying(ctx, std::slice::from_mut(op), started).await {
            Ok(()) => return Ok("without_texts"),
            Err(e) => cause = e,
        }
    }
    if as_failed(op, &code) {
        match write_retrying(ctx, std::slice::from_mut(op), started).await {
            Ok(()) => return Ok("failed"),
            Err(e) => cause = e,
        }
    }
    Err(cause)
}

fn op_id(op: &StoreOp) -> uuid::Uuid {
    match op {
        StoreOp::Insert(r) => r.id,
        StoreOp::Complete(c) => c.id,
        StoreOp::Release(r) => r.id,
        StoreOp::Probe(p) => p.endpoint_id,
        StoreOp::Disable { endpoint_id, .. }
        | StoreOp::FailPending { endpoint_id }
        | StoreOp::ReleaseHeld { endpoint_id, .. } => *endpoint_id,
    }
}

fn note(code: &str, what: &str) -> String {
    format!("walhook could not store this delivery{what} (SQLSTATE {code})")
}

/// Drops the op's free texts (attempt error and snippet; a fixed note replaces the last
/// error); false when it has none to drop.
fn without_texts(op: &mut StoreOp, code: &str) -> bool {
    let (last_error, attempt) = match op {
        StoreOp::Insert(r) => (&mut r.last_error, r.attempt.as_mut()),
        StoreOp::Complete(c) => (&mut c.last_error, Some(&mut c.attempt)),
        _ => return false,
    };
    let had =
        last_error.is_some() || attempt.as_ref().is_some_and(|a| a.error.is_some() || !a.response_snippet.is_empty());
    if last_error.is_some() {
        *last_error = Some(note(code, "'s error text"));
    }
    if let Some(a) = attempt {
        a.error = None;
        a.response_snippet.clear();
    }
    had
}

/// Makes a new delivery's row failed, without payload or attempt record, with the reason;
/// false for any other op (a completion left alone is claimed again once its lease ends).
fn as_failed(op: &mut StoreOp, code: &str) -> bool {
    let StoreOp::Insert(r) = op else { return false };
    if r.status == Status::Pending {
        r.status = Status::Failed;
        r.next_attempt_at = None;
        r.lease = None;
        r.completed_at = Some(chrono::Utc::now());
    }
    r.attempt = None;
    r.last_error = Some(note(code, ""));
    true
}
