//! Replication: read the slot, decode, route, hand deliveries to dispatch, confirm.
//!
//! What must hold:
//! - The confirmed LSN only moves to the end of a transaction whose deliveries (and every
//!   earlier transaction's) are settled (docs/architecture.md, invariant 1), or to a keepalive / heartbeat
//!   position while nothing read is unsettled (invariant 6: an idle slot does not hoard WAL).
//! - A replayed transaction (commit LSN at or below the newest recorded delivery) does not
//!   send or store what is already recorded (invariant 2).
//! - Routing waits when dispatch is full or the memory budget is spent (each event's body is
//!   charged before it is handed on): backpressure stays in the slot, not in memory. Replayed
//!   deliveries buffered for their check are sent on before routing waits for budget, so the
//!   buffer never holds the budget it waits for.
//! - A lost connection or a restarted server is survived: the session is rebuilt with
//!   backoff and resumes from the slot once what was in flight has settled. So is a stuck one:
//!   a stream silent for half of `replication.stream_timeout` is sent a message it must bring
//!   back, and one silent for all of it is rebuilt (a frozen walsender, a half-open connection).
//! - The dispatcher gone (its channel closed) is not a lost connection: it is fatal at once,
//!   never retried, and nothing more is confirmed (what it held never settles).
//! - Every session routes with the endpoint set valid at the slot's confirmed position, and
//!   an endpoint change is stored as a routing version before its commit can be confirmed,
//!   so a replay routes exactly as the first pass did ([`crate::source::route_versions`]).
//! - Before a session routes anything, dispatch learns which endpoints have deliveries
//!   waiting in the outbox (after a start, a reconnect or a takeover alike), so rows keep
//!   their order behind them.
//! - Leadership lost while this process lives: dispatch is fenced (drops what the session
//!   routed, cancels its attempts) before the replication connection closes, because another
//!   replica can stream only once this walsender is gone.
//! - A process that took the lock over waits for the previous leader's walsender to end; a
//!   slot busy at plain start-up (another consumer) fails loudly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::delivery::dispatch::budget::MemoryBudget;
use crate::delivery::dispatch::{DispatchMsg, Fence};
use crate::model::delivery::{self, Delivery, Event};
use crate::model::position::Position;
use crate::model::progress::Tracker;
use crate::model::tenure::Tenure;
use crate::ops::metrics::Metrics;
use crate::ops::status::ReplicationStatus;
use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::source::decode::{DecodeError, Decoded, Decoder, RowChange};
use crate::source::error::ReplicationError;
use crate::source::leader::{self, Leadership};
use crate::source::pgoutput::{self, Message};
use crate::source::route::Router;
use crate::source::route_versions;
use crate::source::slot::ceiling::Ceiling;
use crate::source::slot::SlotError;
use crate::store;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Deliveries of a replayed transaction checked against the database at once.
const REPLAY_CHECK_BATCH: usize = 512;
/// Messages the replication client reads ahead of decoding. They are not charged to the
/// memory budget (a wide row is one message), so the read-ahead is kept short.
const STREAM_BUFFER: usize = 64;
/// Routing waiting this long for memory budget logs a WARN.
const BUDGET_WAIT_WARN: Duration = Duration::from_secs(10);
/// Session settings that make decoded text values independent of server defaults.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3";

/// The transaction being read.
struct TxCtx {
    /// The commit LSN, and the place of the last CRM row decoded (0 before the first).
    position: Position,
    commit_us: i64,
    timestamp: String,
    replay: bool,
    replay_buffer: Vec<Delivery>,
}

/// Reads the slot and feeds dispatch.
pub struct Replication {
    cfg: Arc<Config>,
    db: Db,
    secrets: SecretBox,
    router: Option<Router>,
    dispatch: mpsc::Sender<DispatchMsg>,
    metrics: Arc<Metrics>,
    status: Arc<ReplicationStatus>,
    tracker: Tracker,
    tx: Option<TxCtx>,
    /// Commits at or below this LSN may already be recorded (replay after a restart).
    replay_until: u64,
    /// Makes dispatch drop what a session routed when leadership is lost.
    fence: Option<Fence>,
    /// Renewed while this process holds the lock; dispatch sends only within it.
    tenure: Arc<Tenure>,
    /// Event payload bytes in memory (shared with dispatch and the outbox).
    budget: Arc<MemoryBudget>,
    /// How far the session may confirm (loaded at each session start).
    ceiling: Option<Ceiling>,
    /// Sessions that reached streaming, for the reconnect backoff.
    sessions_streamed: u64,
    /// A slot without failover could not be altered, and that was said once.
    failover_warned: bool,
}

impl Replication {
    /// A replication loop routing into `dispatch`.
    pub fn new(
        cfg: Arc<Config>,
        db: Db,
        secrets: SecretBox,
        dispatch: mpsc::Sender<DispatchMsg>,
        metrics: Arc<Metrics>,
        status: Arc<ReplicationStatus>,
    ) -> Self {
        let budget = Arc::new(MemoryBudget::new(cfg.dispatch.memory_limit.get(), metrics.payload_memory.clone()));
        Replication {
            budget,
            cfg,
            db,
            secrets,
            router: None,
            dispatch,
            metrics,
            status,
            tracker: Tracker::new(),
            tx: None,
            replay_until: 0,
            fence: None,
            tenure: Default::default(),
            ceiling: None,
            sessions_streamed: 0,
            failover_warned: false,
        }
    }

    /// Fences `dispatch` with `fence` when leadership is lost, before the stream closes, and
    /// keeps the dispatcher's tenure renewed while leadership holds.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.tenure = fence.tenure();
        self.fence = Some(fence);
        self
    }

    /// Charges event payloads to `budget` (the one dispatch and the outbox share).
    pub fn with_memory_budget(mut self, budget: Arc<MemoryBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Streams until `shutdown`, reconnecting after transient failures. The first session's
    /// slot problems are returned (start-up must fail loudly); later ones are retried. The
    /// leadership lock is kept across reconnects: a blip of the replication connection does
    /// not hand the slot to another replica (whose outbox rows this one's endpoint states
    /// would not know about); only losing the lock's own connection does.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ReplicationError> {
        let slot = self.cfg.replication.slot.to_string();
        let mut backoff = Duration::from_secs(1);
        let mut started_once = false;
        // This process waited for the lock: the slot's walsender may still be the old leader's.
        let mut took_over = false;
        let mut held: Option<Leadership> = None;
        loop {
            let lead = match held.take() {
                Some(lead) if lead.still_held().await => lead,
                Some(_) | None => match leader::acquire(&self.db, &slot, &self.tenure, &self.status, &shutdown).await {
                    Ok(Some(lead)) => lead,
                    Ok(None) => return Ok(()),
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, "cannot reach the database to take the replication lock; retrying");
                        self.status
                            .set_last_error(format!("cannot reach the database to take the replication lock: {e}"));
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            took_over |= lead.took_over();
            let began = Instant::now();
            let streamed_before = self.sessions_streamed;
            let mut stream = None;
            let result = tokio::select! {
                r = self.session(&shutdown, &mut started_once, &mut stream) => r,
                _ = lead.lost() => Err(ReplicationError::LeadershipLost),
            };
            let lost = matches!(result, Err(ReplicationError::LeadershipLost));
            if lost {
                // Another replica may stream as soon as this walsender is gone: nothing this
                // session routed may be sent after that, so dispatch drops it first.
                self.fence().await;
            }
            drop(stream);
            self.status.streaming.store(false, Ordering::Relaxed);
            self.metrics.streaming.set(0);
            self.tracker.abandon_open();
            self.tx = None;
            match result {
                Ok(()) => return Ok(()),
                // A slot busy at plain start-up is another consumer's: fail loudly. After a
                // takeover it is the old leader's walsender winding down: wait for it.
                Err(e)
                    if !e.is_transient()
                        || (!started_once
                            && !took_over
                            && matches!(e, ReplicationError::Slot(SlotError::Busy { .. }))) =>
                {
                    self.status.set_last_error(format!("stopped: {e}"));
                    return Err(e);
                }
                Err(e) => {
                    self.status.set_last_error(format!("reconnecting after: {e}"));
                    // A session that streamed, or a lock lost to another replica, is no reason
                    // to wait longer and longer: blips are normal, and a replica that lost the
                    // lock should stand by at once.
                    if began.elapsed() > Duration::from_secs(60) || self.sessions_streamed > streamed_before || lost {
                        backoff = Duration::from_secs(1);
                    }
                    if let ReplicationError::Slot(SlotError::Busy { pid, application, .. }) = &e {
                        tracing::warn!(slot, pid, application, retry_in = ?backoff, "replication slot still streamed after taking over; waiting for the previous walsender to end");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "replication interrupted; reconnecting");
                    }
                    self.metrics.reconnects.inc();
                    match self.settle_session(&lead, lost, &shutdown).await {
                        None => return Ok(()),
                        // The lock is kept unless it was lost (its connection is not the stream's).
                        Some(true) => held = Some(lead),
                        Some(false) => drop(lead),
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Makes dispatch drop what the session routed (leadership lost).
    async fn fence(&self) {
        if let Some(fence) = &self.fence {
            fence.raise().await;
        }
    }

    /// After a session ended with an error: lets what it routed settle, for up to a minute,
    /// so the next session's replay check sees it. The lock is held meanwhile (no other
    /// replica streams while this dispatcher still sends); losing it fences dispatch, and
    /// after a fence nothing of the session will settle. Whether the lock is still held
    /// (`fenced`: it was lost already); `None` on shutdown.
    async fn settle_session(&mut self, lead: &Leadership, fenced: bool, shutdown: &CancellationToken) -> Option<bool> {
        let settle_until = tokio::time::Instant::now() + Duration::from_secs(60);
        let notify = self.tracker.notify();
        let mut leading = !fenced;
        while leading && !self.tracker.is_settled() && tokio::time::Instant::now() < settle_until {
            self.tracker.confirmable();
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = lead.lost() => {
                    self.fence().await;
                    leading = false;
                }
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        self.tracker = Tracker::new();
        Some(leading)
    }

    #[tracing::instrument(name = "replication", skip_all, fields(slot = %self.cfg.replication.slot))]
    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        started_once: &mut bool,
        stream: &mut Option<ReplicationClient>,
    ) -> Result<(), ReplicationError> {
        let slot = self.cfg.replication.slot.to_string();
        if !crate::source::slot::wait_usable(&self.db, &self.cfg, &self.status.health, &self.metrics, shutdown).await? {
            return Ok(());
        }
        // Not streamed now: a slot without failover (PostgreSQL 17+) can be altered.
        let publication = self.cfg.replication.publication.as_str();
        crate::source::slot::failover::ensure(&self.db, &slot, publication, &mut self.failover_warned).await;
        // Endpoints as they were at the slot's confirmed position; later changes replay in
        // LSN order with the rows.
        self.router = Some(route_versions::load(&self.db, &slot, self.secrets.clone()).await?);
        let pending_endpoints: Vec<Uuid> = {
            let client = self.db.get().await?;
            self.replay_until = store::deliveries::last_recorded_commit(&**client).await?;
            store::deliveries::endpoints_with_pending(&**client).await?
        };
        // Before anything of this session is routed: endpoints with rows waiting in the outbox
        // (left by this process, a dead one, or the leader this one took over from) start
        // spilled, so their rows queue behind what waits there.
        self.send(DispatchMsg::SessionStart { pending_endpoints }, shutdown).await?;
        let repl_cfg = self
            .db
            .replication_config(&slot, self.cfg.replication.publication.as_str())?
            .with_options(SESSION_OPTIONS)
            .with_status_interval(self.cfg.replication.status_interval.get())
            .with_wakeup_interval(Duration::from_secs(10))
            .with_buffer_size(STREAM_BUFFER)
            .with_application_name("walhook");
        self.ceiling = Some(Ceiling::load(&self.db, &slot).await?);
        let stream = stream.insert(ReplicationClient::connect(repl_cfg).await?);
        stream.wait_started().await?;
        *started_once = true;
        self.sessions_streamed += 1;
        self.status.streaming.store(true, Ordering::Relaxed);
        self.metrics.streaming.set(1);
        tracing::info!(slot = %slot, "replication streaming");
        let mut decoder = Decoder::new(self.cfg.database.crm_schema.as_str());
        let notify = self.tracker.notify();
        let heartbeat_every = self.cfg.replication.heartbeat_interval.get();
        let (mut heard, mut probed) = (tokio::time::Instant::now(), false);
        let silence = self.cfg.replication.stream_timeout.get();
        let mut heartbeat = tokio::time::interval(heartbeat_every.max(Duration::from_secs(1)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: stop reading, let what was read settle, confirm it.
                _ = shutdown.cancelled() => {
                    self.finish(stream).await;
                    return Ok(());
                }
                // 2. Deliveries settled: confirm the transactions they complete.
                _ = notify.notified() => self.confirm(stream),
                // 3. The confirm ceiling: raised (one write) when confirms wait for it.
                _ = tokio::time::sleep_until(self.ceiling().next_raise()), if self.ceiling().wants_raise() => {
                    self.ceiling.as_mut().expect("loaded at session start").raise(&self.db).await?;
                    self.send_confirm(stream);
                }
                // 4. Heartbeat: a WAL message so an idle publication still moves the slot.
                _ = heartbeat.tick(), if !heartbeat_every.is_zero() => self.heartbeat().await,
                // 5. The stream has been silent: write a message it must bring back (an idle
                //    walsender sends nothing while walhook keeps replying); silent twice as
                //    long, the walsender or the connection is stuck: reconnect.
                _ = tokio::time::sleep_until(heard + silence / 2), if !probed => {
                    probed = true;
                    tracing::debug!("the replication stream is silent; writing a message it must bring back");
                    self.heartbeat().await;
                }
                _ = tokio::time::sleep_until(heard + silence), if probed => {
                    return Err(ReplicationError::Silent(silence));
                }
                // 6. The stream itself.
                event = stream.recv() => match event? {
                    Some(event) => {
                        (heard, probed) = (tokio::time::Instant::now(), false);
                        tracing::trace!(event = %pgoutput::Summary(&event), "replication event");
                        self.handle(event, &mut decoder, stream, shutdown).await?
                    }
                    None => return Err(ReplicationError::Closed),
                },
            }
        }
    }

    /// Confirms the end of every settled transaction at the front (up to the ceiling).
    fn confirm(&mut self, stream: &ReplicationClient) {
        if let Some(lsn) = self.tracker.confirmable() {
            self.ceiling_mut().want(lsn, false);
        }
        self.send_confirm(stream);
    }

    /// Hands the server what may be confirmed now.
    fn send_confirm(&mut self, stream: &ReplicationClient) {
        if let Some(lsn) = self.ceiling_mut().take_sendable() {
            tracing::trace!(lsn = %Lsn::from_u64(lsn), "confirming");
            stream.update_applied_lsn(Lsn::from_u64(lsn));
        }
    }

    fn ceiling(&self) -> &Ceiling {
        self.ceiling.as_ref().expect("loaded at session start")
    }

    fn ceiling_mut(&mut self) -> &mut Ceiling {
        self.ceiling.as_mut().expect("loaded at session start")
    }

    async fn handle(
        &mut self,
        event: ReplicationEvent,
        decoder: &mut Decoder,
        stream: &ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        match event {
            ReplicationEvent::Begin { final_lsn, commit_time_micros, .. } => {
                self.tracker.begin();
                self.router_mut().clear_changed();
                let commit_us = commit_time_micros + PG_EPOCH_OFFSET_US;
                let timestamp = chrono::DateTime::from_timestamp_micros(commit_us)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                self.tx = Some(TxCtx {
                    position: Position::new(final_lsn.as_u64(), 0),
                    commit_us,
                    timestamp,
                    replay: final_lsn.as_u64() <= self.replay_until,
                    replay_buffer: Vec::new(),
                });
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::parse(data).map_err(DecodeError::from)? {
                Message::Relation(rel) => {
                    let unknown = decoder.unknown_types(&rel);
                    if !unknown.is_empty() {
                        let client = self.db.get().await?;
                        decoder.resolve_types(&**client, unknown).await?;
                    }
                    decoder.add_relation(rel);
                }
                msg => {
                    let timestamp = self.tx.as_ref().map(|t| t.timestamp.clone()).unwrap_or_default();
                    match decoder.decode(msg, &timestamp)? {
                        Decoded::Row(change) => {
                            if let Some(tx) = self.tx.as_mut() {
                                tx.position.seq += 1;
                            }
                            self.route(change, shutdown).await?;
                        }
                        // Two events, each with its own place: the row leaves, then joins.
                        Decoded::Moved { left, joined } => {
                            for change in [left, joined] {
                                if let Some(tx) = self.tx.as_mut() {
                                    tx.position.seq += 1;
                                }
                                self.route(change, shutdown).await?;
                            }
                        }
                        // Routing changes at once; stored and told to dispatch at the commit.
                        Decoded::EndpointUpsert(row) => self.router_mut().apply(row),
                        Decoded::EndpointDelete(id) => self.router_mut().remove(id),
                        Decoded::Truncate(tables) => {
                            for t in tables {
                                tracing::warn!(table = %t, "TRUNCATE replicated; no webhook events are sent for truncates");
                                self.metrics.truncates.with_label_values(&[&t]).inc();
                            }
                        }
                        Decoded::Nothing => {}
                    }
                }
            },
            ReplicationEvent::Commit { end_lsn, .. } => {
                tracing::trace!(end_lsn = %end_lsn, "commit");
                self.flush_replay(shutdown).await?;
                self.record_endpoint_changes(end_lsn.as_u64(), shutdown).await?;
                if let Some(tx) = self.tx.take() {
                    self.status.last_commit_us.store(tx.commit_us, Ordering::Relaxed);
                }
                self.tracker.commit(end_lsn.as_u64());
                self.confirm(stream);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => self.confirm_idle(stream, wal_end),
            ReplicationEvent::Message { transactional: false, lsn, .. } => self.confirm_idle(stream, lsn),
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// With nothing unsettled and no transaction open, everything up to `lsn` is done.
    fn confirm_idle(&mut self, stream: &ReplicationClient, lsn: Lsn) {
        if let Some(settled) = self.tracker.confirmable() {
            self.ceiling_mut().want(settled, false);
        }
        if !self.tracker.in_transaction() && self.tracker.is_settled() && !lsn.is_zero() {
            self.ceiling_mut().want(lsn.as_u64(), true);
        }
        self.send_confirm(stream);
    }

    async fn route(&mut self, change: RowChange, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        let table = change.event_type.table.name();
        self.metrics.change(change.event_type).inc();
        let Some(account_id) = change.account_id else {
            tracing::warn!(table, entity = %change.entity_key, "row image has no account_id; not routed");
            self.metrics.unroutable.with_label_values(&[table]).inc();
            return Ok(());
        };
        let targets: Vec<_> = self.router_mut().targets(&change).cloned().collect();
        if self.tx.is_none() || targets.is_empty() {
            return Ok(());
        }
        let Some(body) = self.charge(change.body, shutdown).await? else { return Ok(()) };
        let tx = self.tx.as_mut().expect("checked above");
        self.metrics.event(change.event_type).inc();
        tracing::debug!(event = change.event_type.name(), entity = %change.entity_key, endpoints = targets.len(), commit_lsn = tx.position.commit_lsn, seq = tx.position.seq, "routed");
        let event = Arc::new(Event {
            id: delivery::event_id(tx.position),
            account_id,
            event_type: change.event_type,
            entity_key: change.entity_key,
            position: tx.position,
            committed_at_us: tx.commit_us,
            body,
        });
        let replay = tx.replay;
        for endpoint in targets {
            let d = Delivery {
                id: delivery::delivery_id(event.position, endpoint.id),
                endpoint,
                event: event.clone(),
                ticket: self.tracker.ticket(),
            };
            if replay {
                let tx = self.tx.as_mut().expect("checked above");
                tx.replay_buffer.push(d);
                if tx.replay_buffer.len() >= REPLAY_CHECK_BATCH {
                    self.flush_replay(shutdown).await?;
                }
            } else {
                self.send(DispatchMsg::Deliver(d), shutdown).await?;
            }
        }
        Ok(())
    }

    /// `body` charged to the memory budget; when the budget is spent, the buffered replayed
    /// deliveries (which hold budget too) are sent on first, then it waits. `None` on shutdown.
    async fn charge(&mut self, body: Bytes, shutdown: &CancellationToken) -> Result<Option<Bytes>, ReplicationError> {
        let body = match self.budget.try_charge(body) {
            Ok(charged) => return Ok(Some(charged)),
            Err(body) => body,
        };
        self.flush_replay(shutdown).await?;
        let budget = self.budget.clone();
        let len = body.len();
        let charge = budget.charge_body(body);
        tokio::pin!(charge);
        let waited = Instant::now();
        let mut told = false;
        loop {
            tokio::select! {
                charged = &mut charge => {
                    if told {
                        tracing::info!(waited = ?waited.elapsed(), "routing has memory budget again; the stream moves on");
                    }
                    return Ok(Some(charged));
                }
                // Shutdown while the budget is spent: the change stays in the slot.
                _ = shutdown.cancelled() => return Ok(None),
                // A long wait is news: the stream (every account's changes) waits with it.
                _ = tokio::time::sleep(BUDGET_WAIT_WARN), if !told => {
                    told = true;
                    tracing::warn!(
                        waited = ?waited.elapsed(),
                        body_bytes = len,
                        held = budget.held(),
                        limit = budget.limit(),
                        "routing waits for dispatch.memory_limit: payloads in memory (waiting, in flight, or on their way to \
                         the outbox) hold it all; the stream waits meanwhile"
                    );
                }
            }
        }
    }

    /// Sends the replayed deliveries that are not recorded yet; settles the others.
    async fn flush_replay(&mut self, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        let Some(tx) = self.tx.as_mut() else { return Ok(()) };
        if tx.replay_buffer.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut tx.replay_buffer);
        let ids: Vec<Uuid> = batch.iter().map(|d| d.id).collect();
        let recorded: Vec<Uuid> = {
            let client = self.db.get().await?;
            store::deliveries::recorded_among(&**client, &ids).await?
        };
        tracing::debug!(checked = ids.len(), recorded = recorded.len(), "replayed deliveries checked");
        for mut d in batch {
            if recorded.contains(&d.id) {
                if let Some(t) = d.ticket.take() {
                    t.settle();
                }
            } else {
                self.send(DispatchMsg::Deliver(d), shutdown).await?;
            }
        }
        Ok(())
    }

    /// Stores the routing versions of the endpoints the transaction ending at `end_lsn`
    /// changed (before that commit can be confirmed), gives them their current URL and
    /// secret, and tells dispatch.
    async fn record_endpoint_changes(
        &mut self,
        end_lsn: u64,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        let changes = self.router_mut().take_changed();
        let requeued = self.router_mut().take_requeued();
        if changes.is_empty() {
            return Ok(());
        }
        let slot = self.cfg.replication.slot.as_str();
        let current = route_versions::record(&self.db, slot, end_lsn, &changes)
            .await
            .map_err(ReplicationError::RoutingVersions)?;
        for (id, routing) in changes {
            if routing.is_none() {
                self.send(DispatchMsg::EndpointRemoved(id), shutdown).await?;
                continue;
            }
            match current.get(&id) {
                Some(sending) => self.router_mut().refresh(id, sending.clone()),
                // Deleted since: its delete follows in the stream.
                None => self.router_mut().unroute(id),
            }
            if let Some(ep) = self.router_mut().get(id) {
                self.send(DispatchMsg::EndpointChanged(ep), shutdown).await?;
            }
        }
        // Before any later change: those of these endpoints queue behind the requeued ones.
        for (endpoint_id, tag) in requeued {
            let ticket = self.tracker.ticket();
            self.send(DispatchMsg::Requeued { endpoint_id, at: end_lsn, tag, ticket }, shutdown).await?;
        }
        Ok(())
    }

    async fn send(&self, msg: DispatchMsg, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        tokio::select! {
            r = self.dispatch.send(msg) => r.map_err(|_| ReplicationError::DispatchClosed),
            // Shutdown while dispatch is full: the unsent delivery stays in the slot.
            _ = shutdown.cancelled() => Ok(()),
        }
    }

    async fn heartbeat(&self) {
        let result = async {
            let client = self.db.get().await?;
            client
                .execute("SELECT pg_logical_emit_message(false, 'walhook.heartbeat', now()::text)", &[])
                .await
                .map_err(DbError::from)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }

    fn router_mut(&mut self) -> &mut Router {
        self.router.as_mut().expect("loaded at session start")
    }

    /// Shutdown: wait for what was read to settle, confirm it, and close the stream.
    async fn finish(&mut self, stream: &mut ReplicationClient) {
        self.tracker.abandon_open();
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown.grace.get() + Duration::from_secs(5);
        let notify = self.tracker.notify();
        let mut confirmed = None;
        loop {
            if let Some(lsn) = self.tracker.confirmable() {
                self.ceiling_mut().want(lsn, false);
                if self.ceiling().wants_raise() {
                    if let Err(e) = self.ceiling.as_mut().expect("loaded at session start").raise(&self.db).await {
                        tracing::warn!(error = %e, "could not raise the confirm ceiling at shutdown");
                    }
                }
                if let Some(lsn) = self.ceiling_mut().take_sendable() {
                    stream.update_applied_lsn(Lsn::from_u64(lsn));
                    confirmed = Some(lsn);
                }
            }
            if self.tracker.is_settled() || self.tracker.stuck() {
                break;
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Give the worker one status interval to report the final position.
        if let Some(lsn) = confirmed {
            let until = tokio::time::Instant::now() + self.cfg.replication.status_interval.get() * 2;
            while stream.metrics().last_applied_lsn().as_u64() < lsn && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
    }
}
