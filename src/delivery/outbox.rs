//! Outbox workers: send what waits in `walhook.deliveries` with status `pending`.
//!
//! What must hold:
//! - A row is claimed with `FOR UPDATE SKIP LOCKED` and a lease (`lease_until`,
//!   `leased_by`), so two processes never make the same attempt, and a row whose claimer
//!   died is claimed again once its lease has run out. Each claim has its own lease token, so
//!   an outcome recorded after its lease ran out (a stalled store) cannot complete or clear
//!   a later claim of the same row, even by this worker, while that claim's attempt is in
//!   flight (the next row would be claimable early, out of order).
//! - Only the oldest pending delivery of a row (endpoint + `entity_key`) is claimable, so
//!   deliveries of one row arrive in commit order across the fast path, the outbox and
//!   restarts (docs/architecture.md, invariant 4).
//! - An endpoint gets at most `dispatch.endpoint_concurrency` claims at a time; a dead one
//!   cannot take the claims of a healthy one. A claim the database refuses (a constraint or
//!   trigger on `walhook.deliveries` refusing one row) is made again endpoint by endpoint, so
//!   only the endpoints whose rows it refuses wait, each named in one ERROR.
//! - Inactive or deleted endpoints are not sent to: not claimed for, and an attempt that waited
//!   a second or more for its connection or its bytes looks at its endpoint again first.
//! - No attempt outlives its claim's lease: a claimed row whose attempt cannot start (no
//!   connection slot of its endpoint or account, no memory budget) one attempt's length before
//!   the lease ends is given back unattempted, so a later claim never sends it a second time.
//! - Once shutdown is signalled no new attempt starts: only requests already in flight may
//!   finish (within `shutdown.grace`); claimed rows not yet attempted give their claim back
//!   (lease cleared, attempt count as before), so another replica retries them at once.
//! - Payloads held here are bounded in bytes: a claim carries only small bodies (at most
//!   `memory_limit / CLAIM_BATCH` each, and at most 16 KiB: a claim's together at most the
//!   budget); an attempt takes a connection slot first, then its body's bytes within its
//!   account's share of the budget and the budget (never waiting in line, so one account's
//!   large bodies hold back nobody else's: invariant 16), reads a larger body only then, and
//!   holds the bytes until the attempt is over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::dispatch::budget::MemoryBudget;
use crate::delivery::dispatch::happening::Happening;
use crate::delivery::dispatch::http::Sender;
use crate::delivery::dispatch::limits::Limits;
use crate::delivery::dispatch::outcome::{self, send_one};
use crate::delivery::dispatch::policy::RetryPolicy;
use crate::delivery::dispatch::settle::{settle, Context, Stored, Write};
use crate::model::attempt::{Attempt, FailureKind};
use crate::model::delivery::Endpoint;
use crate::ops::metrics::Metrics;
use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::store::{self, StoreOp, DISABLED_GONE};

/// An attempt that waited this long for its connection or its bytes checks that its endpoint
/// is still there and active before it sends.
const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// An endpoint whose due rows the database refuses to claim is left out this long.
const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// Endpoints claimed for one by one at most, after a refused claim.
const DUE_ENDPOINTS: i64 = 256;
/// Rows claimed per query at most.
const CLAIM_BATCH: i64 = 512;
/// Bodies up to this size come with the claim; larger ones are read per attempt.
const INLINE_BODY_MAX: u64 = 16 * 1024;
/// Claims per endpoint at once, in multiples of its concurrency: enough to keep its
/// connections busy while the next claim runs. An endpoint is claimed for again once fewer
/// than one multiple are outstanding, so at most `CLAIM_DEPTH + 1` multiples wait for it.
pub const CLAIM_DEPTH: usize = 2;

/// Settings of the outbox workers.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Poll interval when nothing wakes the worker.
    pub poll_interval: Duration,
    /// Lease taken on a claimed row.
    pub lease_for: Duration,
    /// The longest one attempt can take (`dispatch.connect_timeout` + `request_timeout`): a
    /// claimed row whose attempt cannot start that long before its lease ends is given back.
    pub attempt_max: Duration,
    /// The retry schedule.
    pub retry: RetryPolicy,
    /// Payload bytes held in memory (shared with routing and dispatch).
    pub budget: Arc<MemoryBudget>,
}

/// A claimed row, ready to send.
struct Claimed {
    id: Uuid,
    endpoint: Arc<Endpoint>,
    attempt_no: i32,
    /// The attempt's place in the retry schedule (since the delivery was last requeued).
    retry_no: i32,
    /// The body's size; `None` when the payload is gone.
    body_len: Option<i32>,
    /// The body, when it is small enough to come with the claim.
    body: Option<Bytes>,
    /// Commit time of the source change.
    committed_at: chrono::DateTime<Utc>,
}

/// Claims due rows and sends them.
pub struct OutboxWorker {
    db: Db,
    sender: Sender,
    limits: Arc<Limits>,
    store: mpsc::Sender<StoreOp>,
    secrets: SecretBox,
    settings: OutboxSettings,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// Claims in flight per endpoint; an endpoint with a full cap of them is not claimed for.
    busy: HashMap<Uuid, usize>,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
    /// Claimed rows never attempted (shutdown came first, or no slot was free in time), with
    /// their claim's lease token.
    released: Vec<(Uuid, Uuid)>,
    /// Endpoints whose due rows the database refuses to claim, until when they are left out.
    refused: HashMap<Uuid, std::time::Instant>,
}

/// A claim that ended: its endpoint, and the row and its lease token if it was given back
/// unattempted.
type Finished = (Uuid, Option<(Uuid, Uuid)>);

impl OutboxWorker {
    /// A worker; `wake` makes it look for due rows at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        sender: Sender,
        limits: Arc<Limits>,
        store: mpsc::Sender<StoreOp>,
        secrets: SecretBox,
        settings: OutboxSettings,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        let (finished_tx, finished_rx) = mpsc::channel(4096);
        OutboxWorker {
            db,
            sender,
            limits,
            store,
            secrets,
            settings,
            metrics,
            wake,
            busy: HashMap::new(),
            finished_tx,
            finished_rx,
            released: Vec::new(),
            refused: HashMap::new(),
        }
    }

    /// Runs until `shutdown`; attempts in flight then get `grace` to finish.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let lease_token = Uuid::new_v4();
            let started = std::time::Instant::now();
            let start_by = self.start_by(tokio::time::Instant::now());
            let claimed = if self.limits.global_available() > 0 {
                match self.claim(lease_token, None).await {
                    Ok(rows) => rows,
                    // The database refuses one endpoint's rows: claim around it.
                    Err(e) if store::is_refusal(&e) => self.claim_around_refusal(lease_token).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming due deliveries failed");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let full = claimed.len() as i64 == CLAIM_BATCH;
            if !claimed.is_empty() {
                tracing::debug!(claimed = claimed.len(), took = ?started.elapsed(), "claimed due deliveries");
            }
            for row in claimed {
                *self.busy.entry(row.endpoint.id).or_default() += 1;
                self.spawn(row, lease_token, start_by, shutdown.clone());
            }
            if full {
                continue;
            }
            tokio::select! {
                biased;
                // 1. Shutdown.
                _ = shutdown.cancelled() => break,
                // 2. A claim finished: its endpoint may be claimed again.
                Some(ep) = self.finished_rx.recv() => self.finished(ep),
                // 3. The fast path stored something due now.
                _ = self.wake.notified() => {}
                // 4. Retries come due with time.
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
            }
            while let Ok(ep) = self.finished_rx.try_recv() {
                self.finished(ep);
            }
            // Claims that waited too long for a slot go back to the pool at once.
            self.release(tokio::time::Instant::now()).await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !self.busy.is_empty() {
            match tokio::time::timeout_at(deadline, self.finished_rx.recv()).await {
                Ok(Some(ep)) => self.finished(ep),
                _ => break,
            }
            while let Ok(ep) = self.finished_rx.try_recv() {
                self.finished(ep);
            }
            // Claims given back return to the pool now, not after the requests in flight.
            self.release(deadline).await;
        }
        self.release(deadline).await;
    }

    /// The latest moment an attempt of a row claimed at `claimed_at` may start: one attempt
    /// and a second before its lease ends, so no attempt outlives the lease (after it,
    /// another claim may send the row too).
    fn start_by(&self, claimed_at: tokio::time::Instant) -> tokio::time::Instant {
        let room = self.settings.lease_for.saturating_sub(self.settings.attempt_max + Duration::from_secs(1));
        claimed_at + room
    }

    /// Gives back the claims of rows never attempted (lease cleared, the claim's attempt
    /// count undone); what cannot be given back before `deadline` (at least a second) waits
    /// for its lease to run out.
    async fn release(&mut self, deadline: tokio::time::Instant) {
        if self.released.is_empty() {
            return;
        }
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = std::mem::take(&mut self.released).into_iter().unzip();
        let until = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        let result = tokio::time::timeout_at(until, async {
            let client = self.db.get().await?;
            store::outbox::give_back(&**client, &ids, &tokens).await
        })
        .await;
        match result {
            Ok(Ok(n)) => tracing::debug!(released = n, "gave back claimed deliveries not yet attempted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not give back claims; their leases will expire"),
            Err(_) => tracing::warn!("giving back claims timed out; their leases will expire"),
        }
    }

    fn finished(&mut self, (endpoint, released): Finished) {
        self.released.extend(released);
        if let Some(n) = self.busy.get_mut(&endpoint) {
            *n -= 1;
            if *n == 0 {
                self.busy.remove(&endpoint);
            }
        }
    }

    /// One claim after the database refused the whole one: endpoint by endpoint, so only the
    /// endpoints whose rows it refuses wait (each named in one ERROR, tried again after
    /// [`REFUSED_RETRY`]), never every other endpoint and account.
    async fn claim_around_refusal(&mut self, lease_token: Uuid) -> Vec<Claimed> {
        let skip = self.not_now();
        let due = async { store::outbox::due_endpoints(&**self.db.get().await?, &skip, DUE_ENDPOINTS).await };
        let due = match due.await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "claiming due deliveries failed");
                return Vec::new();
            }
        };
        let mut claimed = Vec::new();
        for endpoint in due {
            match self.claim(lease_token, Some(endpoint)).await {
                Ok(rows) => claimed.extend(rows),
                Err(e) if store::is_refusal(&e) => {
                    let until = std::time::Instant::now() + REFUSED_RETRY;
                    if self.refused.insert(endpoint, until).is_none() {
                        tracing::error!(endpoint = %endpoint, error = %e, retry_in = ?REFUSED_RETRY, "the database refuses to claim this endpoint's due deliveries (a constraint or trigger on walhook.deliveries?); they wait, the other endpoints go on");
                    }
                }
                Err(e) => tracing::warn!(endpoint = %endpoint, error = %e, "claiming due deliveries failed"),
            }
        }
        claimed
    }

    /// Endpoints not to claim for now: enough claims outstanding, or refused lately.
    fn not_now(&mut self) -> Vec<Uuid> {
        let now = std::time::Instant::now();
        self.refused.retain(|_, until| *until > now);
        let cap = self.limits.endpoint_limit();
        let busy = self.busy.iter().filter(|(_, &n)| n >= cap).map(|(id, _)| *id);
        busy.chain(self.refused.keys().copied()).collect()
    }

    async fn claim(&mut self, lease_token: Uuid, only: Option<Uuid>) -> Result<Vec<Claimed>, DbError> {
        let busy = self.not_now();
        let mut client = self.db.get().await?;
        let cap = self.limits.endpoint_limit();
        let limit = CLAIM_BATCH.min(self.limits.global_available() as i64 * CLAIM_DEPTH as i64);
        let per_endpoint = (cap * CLAIM_DEPTH) as i64;
        let lease_secs = self.settings.lease_for.as_secs_f64();
        let tx = client.transaction().await?;
        let budget = &self.settings.budget;
        let inline_max = (budget.limit() / CLAIM_BATCH as u64).min(INLINE_BODY_MAX) as i32;
        let claim =
            store::outbox::Claim { limit, per_endpoint, busy: &busy, lease_secs, lease_token, inline_max, only };
        let rows = store::outbox::claim(&tx, &claim).await?;
        tx.commit().await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut endpoints: HashMap<Uuid, Option<Arc<Endpoint>>> = HashMap::new();
        for r in rows {
            let ep_id: Uuid = r.endpoint.id;
            let endpoint = endpoints
                .entry(ep_id)
                .or_insert_with(|| {
                    // (Claimed rows are of active endpoints only.)
                    let routing = r.endpoint.routing();
                    match Endpoint::open(ep_id, &routing, &r.endpoint.sending(), &self.secrets) {
                        Ok(endpoint) => Some(Arc::new(endpoint)),
                        Err(e) => {
                            tracing::error!(endpoint = %ep_id, error = %e, "cannot open endpoint");
                            None
                        }
                    }
                })
                .clone();
            let Some(endpoint) = endpoint else { continue };
            out.push(Claimed {
                id: r.id,
                attempt_no: r.attempt_no,
                retry_no: r.retry_no,
                endpoint,
                body: r.body.map(Bytes::from),
                committed_at: r.committed_at,
                body_len: r.body_len,
            });
        }
        Ok(out)
    }

    fn spawn(&self, mut row: Claimed, lease: Uuid, start_by: tokio::time::Instant, shutdown: CancellationToken) {
        let (db, budget) = (self.db.clone(), self.settings.budget.clone());
        let (sender, limits, store, metrics, retry, finished) = (
            self.sender.clone(),
            self.limits.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.settings.retry.clone(),
            self.finished_tx.clone(),
        );
        let claimed_at = std::time::Instant::now();
        tokio::spawn(async move {
            let give_back = |finished: mpsc::Sender<Finished>, ep: Uuid, id: Uuid| async move {
                let _ = finished.send((ep, Some((id, lease)))).await;
            };
            // Shutdown, or too late to start within the lease: the claim is given back,
            // unattempted (no attempt outlives its lease, none starts after shutdown).
            let too_late = || async {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(start_by) => {}
                }
            };
            // 1. A connection slot of the endpoint, its account and the process (the account's
            //    share of them, invariant 16).
            let permit = tokio::select! {
                biased;
                () = too_late() => None,
                p = limits.acquire(row.endpoint.id, row.endpoint.account_id) => Some(p),
            };
            let in_time = || !shutdown.is_cancelled() && tokio::time::Instant::now() < start_by;
            let Some(permit) = permit.filter(|_| in_time()) else {
                return give_back(finished, row.endpoint.id, row.id).await;
            };
            // 2. The body's bytes, within the account's share of the budget and the budget,
            //    never in line: a large body of one account holds back nobody else's.
            let held = match row.body_len {
                Some(len) => {
                    let (account, len) = (row.endpoint.account_id, len.max(0) as usize);
                    match budget.reserve_for_attempt(account, row.id, len, too_late()).await {
                        Some(held) if in_time() => Some(held),
                        _ => return give_back(finished, row.endpoint.id, row.id).await,
                    }
                }
                None => None,
            };
            // Waited long enough for the endpoint to have been deleted or disabled meanwhile:
            // look again (a deleted endpoint gets nothing more; its row is swept).
            if claimed_at.elapsed() >= RECHECK_AFTER {
                let still = async { store::endpoints::is_active(&**db.get().await?, row.endpoint.id).await };
                if !matches!(still.await, Ok(true)) {
                    return give_back(finished, row.endpoint.id, row.id).await;
                }
            }
            let body = match (held, row.body.take()) {
                (Some((pin, charge)), Some(body)) => Ok(Some((MemoryBudget::attach(body, charge), pin))),
                (Some((pin, charge)), None) => {
                    read_body(&db, row.id).await.map(|b| b.map(|b| (MemoryBudget::attach(b, charge), pin)))
                }
                (None, _) => Ok(None),
            };
            let attempt = match body {
                Ok(Some((body, pin))) => {
                    let attempt = send_one(&sender, &metrics, &row.endpoint, row.id, body, permit).await;
                    drop(pin);
                    attempt
                }
                Ok(None) => missing_payload(),
                Err(e) => unreadable_payload(e),
            };
            record(attempt, &row, lease, &retry, &store, &metrics).await;
            let _ = finished.send((row.endpoint.id, None)).await;
        });
    }
}

/// Records what the attempt on claimed `row` (made under `lease`) means for it.
async fn record(
    attempt: Attempt,
    row: &Claimed,
    lease: Uuid,
    retry: &RetryPolicy,
    store: &mpsc::Sender<StoreOp>,
    metrics: &Metrics,
) {
    let now = Utc::now();
    let outcome = outcome::decide(&attempt, row.retry_no.max(1) as usize, retry, now);
    let stored = Stored::Leased { lease, attempt_no: row.attempt_no };
    let cx = Context { delivery: row.id, endpoint: row.endpoint.id, committed_at: row.committed_at, now, stored };
    let settled = settle(outcome, attempt, &cx);
    for h in &settled.happenings {
        h.record(metrics);
    }
    if let Write::Leased(op) = settled.write {
        let _ = store.send(op).await;
    }
    if settled.disable_endpoint {
        Happening::EndpointGone { endpoint: row.endpoint.id }.record(metrics);
        let _ = store.send(StoreOp::Disable { endpoint_id: row.endpoint.id, reason: DISABLED_GONE }).await;
    }
}

/// The body of delivery `id`, read for its attempt (`None`: the payload is gone).
async fn read_body(db: &Db, id: Uuid) -> Result<Option<Bytes>, DbError> {
    let client = db.get().await?;
    let body = store::outbox::payload(&**client, id).await?;
    Ok(body.map(Bytes::from))
}

/// Reading the payload failed: the attempt is retried on the schedule.
fn unreadable_payload(e: DbError) -> Attempt {
    Attempt {
        status: None,
        failure: Some(FailureKind::Network),
        retry_after: None,
        error: Some(format!("reading the event payload failed: {e}")),
        started_at: Utc::now(),
        duration: Duration::ZERO,
        response_snippet: String::new(),
    }
}

/// The payload is gone: the delivery fails at once (no attempt can succeed).
fn missing_payload() -> Attempt {
    Attempt {
        status: None,
        failure: Some(FailureKind::Payload),
        retry_after: None,
        error: Some("the event payload is missing from walhook.events".into()),
        started_at: Utc::now(),
        duration: Duration::ZERO,
        response_snippet: String::new(),
    }
}
