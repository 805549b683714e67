//! Writing a batch whatever the database answers.
//!
//! What must hold: a transient failure (connection lost, restart, lock timeout, anything that
//! is not a refusal of the data) retries the same ops with backoff, never dropping one; a
//! refusal of the data (SQLSTATE classes 22, 23, 54) splits the batch, halves in op order, to
//! find the op at fault, and everything else commits; the op at fault is stored again
//! without its free texts, then (a new delivery) as failed without payload or attempt, with
//! the reason; an op refused even then is skipped with an ERROR naming it, and its ticket is
//! dropped unsettled (nothing not durable is confirmed: its transaction replays after a
//! restart). A write that does not commit for the stall limit is reported ([`StoreHealth`]).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{write, Status, StoreOp, DISABLED_GONE};
use crate::ops::metrics::Metrics;
use crate::ops::status::StoreHealth;
use crate::pg::db::{Db, DbError};

/// Backoff between retries of a failing write: first, and at most.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// What a batch is written with.
pub(super) struct Ctx<'a> {
    pub db: &'a Db,
    pub health: &'a StoreHealth,
    pub metrics: &'a Metrics,
    pub stall_after: Duration,
}

/// Writes `ops` in order; returns once each is committed or set aside.
pub(super) async fn write(ctx: &Ctx<'_>, ops: &mut [StoreOp]) {
    let started = Instant::now();
    let mut todo = VecDeque::from([(0, ops.len())]);
    while let Some((from, to)) = todo.pop_front() {
        match write_retrying(ctx, &ops[from..to], started).await {
            Ok(()) => {}
            Err(e) if to - from == 1 => set_aside(ctx, &mut ops[from], e, started).await,
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
fn is_refusal(e: &DbError) -> bool {
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
        match watched(ctx, write::write_batch(ctx.db, ops), started).await {
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
                if started.elapsed() >= ctx.stall_after {
                    ctx.health.stall(format!("store writes have failed for {:?}: {e}", started.elapsed()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// Awaits `write` (a batch, or a probe's queries), reporting a stall if it has not finished
/// `stall_after` after `started`.
pub(super) async fn watched<T>(ctx: &Ctx<'_>, write: impl std::future::Future<Output = T>, started: Instant) -> T {
    tokio::pin!(write);
    tokio::select! {
        biased;
        // 1. The write finished.
        r = &mut write => return r,
        // 2. It takes too long: say so, and keep waiting.
        _ = tokio::time::sleep_until(started + ctx.stall_after), if !ctx.health.is_stalled() => {
            ctx.health.stall(format!(
                "a store write has not committed for {:?} (a lock on walhook's tables, or an overloaded database?)",
                ctx.stall_after
            ));
        }
    }
    write.await
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

/// The op the database refused, alone: stored in a reduced form if it can be, else skipped.
async fn set_aside(ctx: &Ctx<'_>, op: &mut StoreOp, refusal: DbError, started: Instant) {
    let code = sqlstate(&refusal).to_owned();
    let id = op_id(op);
    let mut cause = refusal;
    if without_texts(op, &code) {
        match write_retrying(ctx, std::slice::from_mut(op), started).await {
            Ok(()) => {
                tracing::warn!(delivery = %id, sqlstate = %code, error = %cause, "the database refused this delivery's texts; stored it without them");
                ctx.metrics.store_set_aside.with_label_values(&["without_texts"]).inc();
                return;
            }
            Err(e) => cause = e,
        }
    }
    if as_failed(op, &code) {
        match write_retrying(ctx, std::slice::from_mut(op), started).await {
            Ok(()) => {
                tracing::error!(delivery = %id, sqlstate = %code, error = %cause, "the database refused this delivery; stored it as failed, without its payload");
                ctx.metrics.store_set_aside.with_label_values(&["failed"]).inc();
                return;
            }
            Err(e) => cause = e,
        }
    }
    tracing::error!(delivery = %id, sqlstate = %sqlstate(&cause), error = %cause, "the database refused this store write in every form; skipped it (a new delivery's change stays unconfirmed and is read again after a restart)");
    ctx.metrics.store_set_aside.with_label_values(&["rejected"]).inc();
    if let StoreOp::Insert(r) = op {
        drop(r.ticket.take());
    }
}

fn op_id(op: &StoreOp) -> uuid::Uuid {
    match op {
        StoreOp::Insert(r) => r.id,
        StoreOp::Complete(c) => c.id,
        StoreOp::Release(r) => r.id,
        StoreOp::Probe(p) => p.endpoint_id,
        StoreOp::Disable { endpoint_id, .. } | StoreOp::FailPending { endpoint_id } => *endpoint_id,
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
