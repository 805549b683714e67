//! Dispatch, fast path: deliveries are sent from memory as they are routed.
//!
//! What must hold:
//! - **Order per entity** (docs/architecture.md, invariant 4): per endpoint, a row (`entity_key`) has at most one
//!   delivery in flight; later ones wait behind it. When an attempt fails, the delivery goes
//!   to the outbox and every later delivery of that row to that endpoint follows it there
//!   (the row is *blocked*) until the outbox has settled the last of them. Other rows and
//!   other endpoints are not held back.
//! - **Bounded memory** (invariant 5): an endpoint whose queue is full, whose oldest waiting
//!   delivery waited longer than `dispatch.spill_after`, or that has too many blocked rows is
//!   *spilled*: its waiting deliveries go to the outbox, its in-flight ones are stored there
//!   under a lease, and its new deliveries go straight to the outbox, each row tracked as
//!   blocked, until a probe finds nothing of it pending outside those rows. Then the blocked
//!   rows keep waiting behind the outbox and the rest is sent directly again, even under
//!   steady traffic. The total waiting in memory is capped; past the cap, routing (and so
//!   the replication stream) waits.
//! - **Bounded bytes** (invariant 5): payloads are charged to the memory budget
//!   (`dispatch.memory_limit`, see `budget`) before routing hands them over, so what waits,
//!   what is in flight and what goes to the store is bounded in bytes; an endpoint whose
//!   waiting payloads pass a quarter of the budget is spilled (large rows spill early), and
//!   while anyone waits for budget the endpoint with the most waiting bytes is spilled so its
//!   payloads are released once the outbox holds them.
//! - **Nothing is lost** (invariant 1): every delivery's ticket is settled only by the store
//!   writer after its record or outbox row commits, or because its endpoint was deleted.
//! - **Fence**: when replication loses leadership, everything held for its session is
//!   dropped unsent and attempts in flight are cancelled, ahead of any other work, before
//!   another replica can stream (it replays whatever was not recorded). And no attempt
//!   starts outside leadership's tenure (renewed by each answered check of the lock), so a
//!   process that was frozen while its lock was taken sends nothing stale when it resumes.
//!
//! How: each endpoint's order, blocking, spill and probe bookkeeping is a synchronous state
//! machine ([`endpoint`], unit-tested there); this task feeds it what happens and carries out
//! the actions it answers with. What an attempt means (delivered, retry at, failed, endpoint
//! gone, local retry) is decided by [`outcome`], and what follows from it (the write, the
//! happenings, a disable) by [`settle`], both shared with the outbox workers; log lines and
//! counters of what happens go through [`happening`].

pub mod budget;
pub(crate) mod connect;
mod endpoint;
pub(crate) mod happening;
pub mod http;
pub mod limits;
pub(crate) mod outcome;
pub mod policy;
mod pressure;
pub(crate) mod settle;
pub mod shares;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::attempt::Attempt;
use crate::model::delivery::{Delivery, Endpoint};
use crate::model::tenure::Tenure;
use crate::ops::metrics::Metrics;
use crate::store::{Probe, ProbeAnswer, Record, Status, StoreOp, DISABLED_GONE};
use budget::MemoryBudget;
use endpoint::{Action, Bounds, EndpointState};
use happening::Happening;
use http::Sender;
use limits::{Limits, Permit};
use outcome::Outcome;
use policy::RetryPolicy;
use settle::{Context, NewRow, Stored, Write};
use shares::SharePin;

/// How often waiting times are checked and blocked rows probed.
const TICK: Duration = Duration::from_millis(200);
/// Longest a fence waits for the lost session's store writes to commit. Short: replication
/// holds its walsender meanwhile, and a database that is shutting down waits for it.
const FENCE_STORE_WAIT: Duration = Duration::from_secs(2);

/// What routing tells dispatch, in stream order.
#[derive(Debug)]
pub enum DispatchMsg {
    /// Send this.
    Deliver(Delivery),
    /// An endpoint changed (URL, events, secret or active flag).
    EndpointChanged(Arc<Endpoint>),
    /// An endpoint was deleted: nothing more may be sent to it.
    EndpointRemoved(Uuid),
    /// `webhooks-recover`, `-redeliver` or `-replay` put deliveries of this endpoint back in
    /// the outbox, held (read in the stream at the commit that did it): what of the endpoint
    /// is in flight or waiting is stored first, then those of `tag` are released to queue at
    /// `at`, and its later changes queue behind them.
    Requeued {
        /// The endpoint.
        endpoint_id: Uuid,
        /// The requeue's commit LSN.
        at: u64,
        /// The requeue's tag (the endpoint's `requeue_tag`, as read).
        tag: i64,
        /// The requeue's transaction: settled once the release has committed.
        ticket: Option<crate::model::progress::Ticket>,
    },
    /// A replication session starts (before anything it routes): these endpoints have
    /// deliveries waiting in the outbox, so they start spilled and their rows queue behind.
    SessionStart {
        /// Endpoints with `pending` deliveries.
        pending_endpoints: Vec<Uuid>,
    },
}

/// Makes the dispatcher drop what the replication session routed (leadership was lost).
#[derive(Debug, Clone)]
pub struct Fence(mpsc::Sender<tokio::sync::oneshot::Sender<()>>, Arc<Tenure>);

impl Fence {
    /// The tenure outside which the dispatcher starts no attempt (renewed by leadership).
    pub fn tenure(&self) -> Arc<Tenure> {
        self.1.clone()
    }

    /// Returns once the dispatcher has dropped every delivery it holds or was sent, and
    /// aborted its attempts in flight (or has ended).
    pub async fn raise(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.0.send(ack).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// Dispatch settings derived from `[dispatch]`.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Waiting deliveries per endpoint before it spills.
    pub endpoint_queue: usize,
    /// Waiting deliveries in all before routing waits.
    pub queue_capacity: usize,
    /// Longest wait in memory before the endpoint spills.
    pub spill_after: Duration,
    /// Lease on rows stored while their attempt is still in flight.
    pub lease_for: Duration,
    /// The retry schedule.
    pub retry: RetryPolicy,
    /// Payload bytes held in memory (charged by routing).
    pub budget: Arc<MemoryBudget>,
}

/// An attempt that finished.
#[derive(Debug)]
struct Done {
    endpoint_id: Uuid,
    delivery_id: Uuid,
    attempt: Attempt,
}

/// The fast-path dispatcher: one task owning every endpoint's in-memory state.
pub struct Dispatcher {
    settings: DispatchSettings,
    sender: Sender,
    limits: Arc<Limits>,
    store: mpsc::Sender<StoreOp>,
    outbox_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    endpoints: HashMap<Uuid, EndpointState>,
    /// Cancels the attempt of each delivery in flight (fence).
    aborts: HashMap<Uuid, tokio::task::AbortHandle>,
    /// Endpoints that had deliveries waiting in the outbox when the replication session
    /// started: they start spilled, so rows queue behind what waits there (order holds
    /// across restarts and takeovers).
    pending_at_start: std::collections::HashSet<Uuid>,
    fence_tx: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    /// Attempts start only while it is valid (a frozen process that lost its lock sends
    /// nothing when it resumes).
    tenure: Arc<Tenure>,
    fence_rx: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    /// Deliveries waiting in memory, all endpoints together (kept by `with_endpoint`).
    waiting: usize,
    lease_token: Uuid,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    probe_tx: mpsc::Sender<ProbeAnswer>,
    probe_rx: mpsc::Receiver<ProbeAnswer>,
}

impl Dispatcher {
    /// A dispatcher writing through `store` and waking the outbox workers with `outbox_wake`.
    pub fn new(
        settings: DispatchSettings,
        sender: Sender,
        limits: Arc<Limits>,
        store: mpsc::Sender<StoreOp>,
        outbox_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel(limits.global_available().max(1));
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let (fence_tx, fence_rx) = mpsc::channel(1);
        Dispatcher {
            settings,
            sender,
            limits,
            store,
            outbox_wake,
            metrics,
            endpoints: HashMap::new(),
            aborts: HashMap::new(),
            pending_at_start: Default::default(),
            waiting: 0,
            lease_token: Uuid::new_v4(),
            done_tx,
            done_rx,
            probe_tx,
            probe_rx,
            fence_tx,
            tenure: Default::default(),
            fence_rx,
        }
    }

    /// The handle replication raises when it loses leadership.
    pub fn fence(&self) -> Fence {
        Fence(self.fence_tx.clone(), self.tenure.clone())
    }

    /// Runs until `rx` closes (routing ended) or `shutdown`; then stores what waits in the
    /// outbox and lets in-flight attempts finish within `grace`.
    pub async fn run(mut self, mut rx: mpsc::Receiver<DispatchMsg>, shutdown: CancellationToken, grace: Duration) {
        let released = self.limits.released();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // 0. Fence: leadership lost; drop everything the session routed, send nothing more.
                Some(ack) = self.fence_rx.recv() => {
                    self.on_fence(&mut rx).await;
                    let _ = ack.send(());
                }
                // 1. Shutdown: stop taking deliveries.
                _ = shutdown.cancelled() => break,
                // 2. Finished attempts free a slot and may unblock the row behind them.
                Some(done) = self.done_rx.recv() => self.on_done(done).await,
                // 3. Outbox answers: rows and endpoints whose outbox work has drained.
                Some(answer) = self.probe_rx.recv() => self.on_probe(answer),
                // 4. A permit freed elsewhere (outbox workers): start what waits.
                _ = released.notified() => self.pump_all(),
                // 5. New deliveries, while memory allows; backpressure reaches replication.
                msg = rx.recv(), if self.waiting < self.settings.queue_capacity => match msg {
                    Some(msg) => self.on_msg(msg).await,
                    None => break,
                },
                // 6. Spill endpoints whose deliveries wait too long; probe blocked rows.
                _ = tick.tick() => self.on_tick().await,
            }
            self.metrics.queued.set(self.waiting as i64);
        }
        self.drain(grace).await;
    }

    /// Leadership lost: the new leader replays everything not recorded, so what is waiting
    /// here (or queued for us) is dropped unsent and attempts in flight are cancelled.
    /// Tickets are dropped unsettled; the session's tracker is discarded with them. Returns
    /// once what was already handed to the store has committed (at most
    /// `FENCE_STORE_WAIT`), so the next leader sees the outbox rows this session wrote when
    /// it reads which endpoints have rows pending.
    async fn on_fence(&mut self, rx: &mut mpsc::Receiver<DispatchMsg>) {
        let mut dropped = 0;
        while let Ok(msg) = rx.try_recv() {
            dropped += usize::from(matches!(msg, DispatchMsg::Deliver(_)));
        }
        let mut aborted = 0;
        for (_, state) in self.endpoints.drain() {
            dropped += state.waiting();
            aborted += state.in_flight();
        }
        self.aborts.drain().for_each(|(_, attempt)| attempt.abort());
        self.waiting = 0;
        self.pending_at_start.clear();
        tracing::warn!(
            dropped,
            aborted,
            "replication leadership lost: dropped the session's deliveries unsent; the next leader replays them"
        );
        // A probe is answered only after everything sent to the store before it committed.
        let (reply, mut answer) = mpsc::channel(1);
        let barrier =
            Probe { endpoint_id: Uuid::nil(), ids: Vec::new(), whole_endpoint: false, known_rows: Vec::new(), reply };
        let committed =
            async { self.store.send(StoreOp::Probe(barrier)).await.is_err() || answer.recv().await.is_some() };
        if tokio::time::timeout(FENCE_STORE_WAIT, committed).await.is_err() {
            tracing::warn!(waited = ?FENCE_STORE_WAIT, "store writes of the lost session not committed yet (database unreachable?); letting the stream go");
        }
    }

    async fn on_msg(&mut self, msg: DispatchMsg) {
        match msg {
            DispatchMsg::SessionStart { pending_endpoints } => {
                let mut pending: std::collections::HashSet<Uuid> = pending_endpoints.into_iter().collect();
                // States that outlived the last session (blocked rows, a spill) learn it too:
                // another process may have stored deliveries of their rows meanwhile, and a
                // row's next change must queue behind them, not go out directly.
                let known: Vec<Uuid> = pending.iter().filter(|id| self.endpoints.contains_key(id)).copied().collect();
                for id in known {
                    pending.remove(&id);
                    if !self.endpoints[&id].spilled() {
                        self.spill_endpoint(id).await;
                    }
                }
                self.pending_at_start = pending;
            }
            DispatchMsg::Requeued { endpoint_id: id, at, tag, ticket } => {
                if self.endpoints.contains_key(&id) {
                    // Spilled: what is in flight is stored under our lease, what waits is
                    // stored, both before the release below.
                    let actions = self.with_endpoint(id, EndpointState::requeued).unwrap_or_default();
                    self.execute(id, actions).await;
                } else {
                    // Its state, made at its next delivery, starts spilled.
                    self.pending_at_start.insert(id);
                }
                let _ = self.store.send(StoreOp::ReleaseHeld { endpoint_id: id, at, tag, ticket }).await;
            }
            DispatchMsg::Deliver(d) => self.accept(d).await,
            DispatchMsg::EndpointChanged(ep) => {
                let id = ep.id;
                let Some((actions, fail_pending)) = self.with_endpoint(id, |s| s.changed(ep)) else { return };
                self.execute(id, actions).await;
                if fail_pending {
                    // Rows this dispatcher stored after the disable committed fail too.
                    let _ = self.store.send(StoreOp::FailPending { endpoint_id: id }).await;
                }
            }
            DispatchMsg::EndpointRemoved(id) => {
                let Some(actions) = self.with_endpoint(id, EndpointState::removed) else { return };
                self.execute(id, actions).await;
                // Kept only while attempts in flight finish.
                if self.endpoints.get(&id).is_some_and(|s| s.in_flight() == 0) {
                    self.endpoints.remove(&id);
                }
            }
        }
    }

    async fn accept(&mut self, d: Delivery) {
        let id = d.endpoint.id;
        let bounds = Bounds { queue: self.settings.endpoint_queue, bytes: self.endpoint_share() };
        if !self.endpoints.contains_key(&id) {
            // Spilled until a probe finds its outbox empty.
            let spilled = self.pending_at_start.remove(&id);
            let gate = self.limits.gate(id, d.endpoint.account_id);
            self.endpoints.insert(id, EndpointState::new(d.endpoint.clone(), gate, spilled, Instant::now()));
        }
        let actions = self.with_endpoint(id, |s| s.arrive(d, Instant::now(), bounds)).unwrap_or_default();
        self.execute(id, actions).await;
    }

    /// Runs `f` on the state of endpoint `id` (if known), keeping the total waiting in step.
    fn with_endpoint<R>(&mut self, id: Uuid, f: impl FnOnce(&mut EndpointState) -> R) -> Option<R> {
        let state = self.endpoints.get_mut(&id)?;
        let before = state.waiting();
        let out = f(state);
        self.waiting = self.waiting - before + state.waiting();
        Some(out)
    }

    /// Carries out what the state of endpoint `id` asked for, in order.
    async fn execute(&mut self, id: Uuid, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spill(d) => self.store_spilled(d).await,
                Action::StoreLeased(d) => self.store_leased(d).await,
                Action::FailUnsent(d) => self.fail_unsent(d).await,
                Action::Drop(d) => {
                    if let Some(t) = d.ticket {
                        t.settle(); // deliberately dropped: the endpoint is gone
                    }
                }
                Action::Pump => self.pump(id),
            }
        }
    }

    /// Starts ready deliveries of endpoint `id` while permits allow.
    fn pump(&mut self, id: Uuid) {
        if !self.tenure.is_valid() {
            return; // the tick pumps again once leadership renews it
        }
        let Some(state) = self.endpoints.get_mut(&id) else { return };
        while let Some(next) = state.next_ready() {
            // The account's share of the budget first (bytes its attempts hold), then a
            // connection slot: a refused pin gives back no permit, so nothing loops on it.
            let (account, event, bytes) = (next.endpoint.account_id, next.event.id, next.event.body.len());
            let Some(pin) = self.settings.budget.try_pin(account, event, bytes) else { break };
            let Some(permit) = self.limits.try_acquire(state.gate()) else { break };
            // Signed with the endpoint's keys as they are now (a rotation since routing counts).
            let endpoint = state.endpoint().clone();
            let d = state.start_next().expect("checked ready");
            self.waiting -= 1;
            let abort = spawn_attempt(&self.sender, &self.metrics, &self.done_tx, (d, endpoint), (permit, pin));
            self.aborts.insert(d.id, abort);
        }
    }

    fn pump_all(&mut self) {
        let ids: Vec<Uuid> = self.endpoints.iter().filter(|(_, s)| s.has_ready()).map(|(id, _)| *id).collect();
        for id in ids {
            self.pump(id);
        }
    }

    async fn on_done(&mut self, done: Done) {
        self.aborts.remove(&done.delivery_id);
        let ep_id = done.endpoint_id;
        let Some(state) = self.endpoints.get_mut(&ep_id) else { return };
        let Some((flight, removed, disabled)) = state.finished(done.delivery_id, Instant::now()) else { return };
        let mut d = flight.delivery;
        let a = done.attempt;
        tracing::debug!(delivery = %d.id, endpoint = %ep_id, outcome = a.class(), error = ?a.error, "first attempt finished");
        let now = Utc::now();
        let outcome = outcome::decide(&a, 1, &self.settings.retry, now).given_disabled(disabled);
        if matches!(outcome, Outcome::LocalRetry(_)) && disabled && !flight.leased && !removed {
            // Never reached the receiver, and its endpoint is disabled: it fails unsent, like
            // everything else waiting for a disabled endpoint.
            let error = format!("local: {}", a.error.unwrap_or_default());
            Happening::LocalFailure { delivery: d.id, endpoint: ep_id, error }.record(&self.metrics);
            self.first_attempt_settled(&d, Status::Failed).await;
            self.fail_unsent(d).await;
            return self.pump(ep_id);
        }
        let stored = match (flight.leased, removed) {
            (true, _) => Stored::Leased { lease: self.lease_token, attempt_no: 1 },
            (false, true) => Stored::Dropped,
            (false, false) => Stored::New,
        };
        let committed_at = chrono::DateTime::from_timestamp_micros(d.event.committed_at_us).unwrap_or(now);
        let cx = Context { delivery: d.id, endpoint: ep_id, committed_at, now, stored };
        let settled = settle::settle(outcome, a, &cx);
        if settled.disable_endpoint && !disabled && !removed {
            self.disable(ep_id).await;
        }
        for h in &settled.happenings {
            h.record(&self.metrics);
        }
        let status = settled.status();
        match settled.write {
            Write::Leased(op) => {
                let _ = self.store.send(op).await;
            }
            Write::Insert(row) => {
                let NewRow { status, attempt_count, next_attempt_at, last_error, completed_at, attempt } = row;
                let record = Record {
                    attempt_count,
                    http_status: attempt.as_ref().and_then(|a| a.status),
                    next_attempt_at,
                    last_error,
                    completed_at,
                    attempt,
                    ..Record::new(&mut d, status)
                };
                let _ = self.store.send(StoreOp::Insert(record)).await;
                self.first_attempt_settled(&d, status).await;
            }
            Write::Nothing => {
                if let Some(t) = d.ticket.take() {
                    t.settle(); // the endpoint is gone: nothing to record
                }
            }
        }
        debug_assert!(status.is_some() || stored == Stored::Dropped);
        self.pump(ep_id);
    }

    /// Moves the row of `d` on after its first attempt was recorded with `status`.
    async fn first_attempt_settled(&mut self, d: &Delivery, status: Status) {
        let id = d.endpoint.id;
        let pending = status == Status::Pending;
        let actions = self.with_endpoint(id, |s| s.first_attempt_settled(d, pending)).unwrap_or_default();
        self.execute(id, actions).await;
    }

    fn on_probe(&mut self, answer: ProbeAnswer) {
        if let Some(state) = self.endpoints.get_mut(&answer.endpoint_id) {
            state.probe_answered(&answer);
        }
    }

    async fn on_tick(&mut self) {
        self.relieve_pressure().await;
        self.pump_all();
        let now = Instant::now();
        let spill_after = self.settings.spill_after;
        let ids: Vec<Uuid> = self.endpoints.keys().copied().collect();
        for id in ids {
            let actions = self.with_endpoint(id, |s| s.spill_if_stuck(now, spill_after)).unwrap_or_default();
            self.execute(id, actions).await;
        }
        let mut probes = Vec::new();
        for (id, s) in self.endpoints.iter_mut() {
            if let Some(q) = s.probe() {
                let (ids, whole_endpoint, known_rows) = (q.ids, q.whole_endpoint, q.known_rows);
                probes.push(Probe { endpoint_id: *id, ids, whole_endpoint, known_rows, reply: self.probe_tx.clone() });
            }
        }
        for p in probes {
            let _ = self.store.send(StoreOp::Probe(p)).await;
        }
        self.endpoints.retain(|_, s| !s.idle());
        self.release_idle_capacity();
    }

    /// The endpoint answered 410 Gone: disable it for good (in the database, which also fails
    /// what waits in the outbox) and fail what waits here.
    async fn disable(&mut self, id: Uuid) {
        Happening::EndpointGone { endpoint: id }.record(&self.metrics);
        let _ = self.store.send(StoreOp::Disable { endpoint_id: id, reason: DISABLED_GONE }).await;
        let actions = self.with_endpoint(id, EndpointState::disable).unwrap_or_default();
        self.execute(id, actions).await;
    }

    /// Moves everything of endpoint `id` to the outbox (see [`EndpointState::spill`]).
    async fn spill_endpoint(&mut self, id: Uuid) {
        let actions = self.with_endpoint(id, EndpointState::spill).unwrap_or_default();
        self.execute(id, actions).await;
    }

    /// Records a delivery as failed without an attempt (its endpoint was disabled).
    async fn fail_unsent(&mut self, mut d: Delivery) {
        Happening::DeliveryFailed.record(&self.metrics);
        let record = Record {
            last_error: Some("endpoint disabled".into()),
            completed_at: Some(Utc::now()),
            ..Record::new(&mut d, Status::Failed)
        };
        let _ = self.store.send(StoreOp::Insert(record)).await;
    }

    /// Sends a delivery to the outbox, due now (it waits behind older ones of its row).
    async fn store_spilled(&mut self, mut d: Delivery) {
        Happening::Created { direct: false }.record(&self.metrics);
        let record = Record { next_attempt_at: Some(Utc::now()), ..Record::new(&mut d, Status::Pending) };
        let _ = self.store.send(StoreOp::Insert(record)).await;
        self.outbox_wake.notify_one();
    }

    /// Stores a delivery whose first attempt is in flight under our lease.
    async fn store_leased(&mut self, mut d: Delivery) {
        let now = Utc::now();
        let lease = Some((self.lease_token, now + self.settings.lease_for));
        let record =
            Record { attempt_count: 1, next_attempt_at: Some(now), lease, ..Record::new(&mut d, Status::Pending) };
        Happening::Created { direct: false }.record(&self.metrics);
        let _ = self.store.send(StoreOp::Insert(record)).await;
    }

    /// Shutdown: store what waits, then give in-flight attempts until `grace` to finish.
    async fn drain(&mut self, grace: Duration) {
        let ids: Vec<Uuid> = self.endpoints.keys().copied().collect();
        for id in ids {
            if self.endpoints.get(&id).is_some_and(EndpointState::has_work) {
                self.spill_endpoint(id).await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.endpoints.values().any(|s| s.in_flight() > 0) {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => self.on_done(done).await,
                _ => break,
            }
        }
    }
}

/// Starts one attempt in its own task; its outcome comes back on `done`.
fn spawn_attempt(
    sender: &Sender,
    metrics: &Arc<Metrics>,
    done: &mpsc::Sender<Done>,
    (d, endpoint): (&Delivery, Arc<Endpoint>),
    (permit, pin): (Permit, SharePin),
) -> tokio::task::AbortHandle {
    let (sender, metrics, done) = (sender.clone(), metrics.clone(), done.clone());
    let body = d.event.body.clone();
    let delivery_id = d.id;
    let task = tokio::spawn(async move {
        let attempt = outcome::send_one(&sender, &metrics, &endpoint, delivery_id, body, permit).await;
        drop(pin);
        let _ = done.send(Done { endpoint_id: endpoint.id, delivery_id, attempt }).await;
    });
    task.abort_handle()
}
