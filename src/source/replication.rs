//! The replication session: holds the leadership lock, reads the slot, keeps the stream
//! alive, and confirms. Each event goes through the transaction step ([`crate::source::step`],
//! pure) and what it means goes to the emitter ([`crate::source::emit`], deliveries to
//! dispatch); the only I/O the step needs (column types) is done here.
//!
//! What must hold:
//! - The confirmed LSN only moves to the end of a transaction whose deliveries (and every
//!   earlier transaction's) are settled (docs/architecture.md, invariant 1), or to a keepalive / heartbeat
//!   position while nothing read is unsettled (invariant 6: an idle slot does not hoard WAL).
//! - A lost connection or a restarted server is survived: the session is rebuilt with
//!   backoff and resumes from the slot once what was in flight has settled. So is a stuck one:
//!   a stream silent for half of `replication.stream_timeout` is sent a message it must bring
//!   back, and one silent for all of it is rebuilt (a frozen walsender, a half-open connection).
//! - The dispatcher gone (its channel closed) is not a lost connection: it is fatal at once,
//!   never retried, and nothing more is confirmed (what it held never settles).
//! - Every session routes with the endpoint set valid at the slot's confirmed position
//!   ([`crate::source::route_versions`]; the emitter stores later changes before their commit
//!   can be confirmed), and treats commits at or below the newest recorded delivery as replays.
//! - Before a session routes anything, dispatch learns which endpoints have deliveries
//!   waiting in the outbox (after a start, a reconnect or a takeover alike), so rows keep
//!   their order behind them.
//! - Leadership lost while this process lives: dispatch is fenced (drops what the session
//!   routed, cancels its attempts) before the replication connection closes, because another
//!   replica can stream only once this walsender is gone. The fence and the memory budget are
//!   required at construction ([`ReplicationHandles`]), never defaulted.
//! - A process that took the lock over waits for the previous leader's walsender to end; a
//!   slot busy at plain start-up (another consumer) fails loudly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::delivery::dispatch::budget::MemoryBudget;
use crate::delivery::dispatch::{DispatchMsg, Fence};
use crate::model::event::Op;
use crate::model::tenure::Tenure;
use crate::ops::metrics::Metrics;
use crate::ops::status::{ReplicationStatus, StallOf, StoreHealth};
use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::source::backfill::{
    self,
    window::{Hub, Windows},
};
use crate::source::emit::{Emitter, EmitterHandles};
use crate::source::error::ReplicationError;
use crate::source::leader::{self, Leadership};
use crate::source::pgoutput;
use crate::source::route::Router;
use crate::source::route_versions;
use crate::source::slot::ceiling::Ceiling;
use crate::source::slot::SlotError;
use crate::source::step::{Step, TxStep};
use crate::source::visible::VisibleError;
use crate::store;

/// Messages the replication client reads ahead of decoding. They are not charged to the
/// memory budget (a wide row is one message), and the client bounds them by count only, so
/// the read-ahead is kept short: with rows of R bytes, at most 8 R waits here uncharged (64
/// messages of 400 kB rows could hold 25 MiB). The drain measured with 8 (21–24k events/s)
/// was within the noise of the runs with 64 (20–22k; BENCHMARKS.md, issue 22).
const STREAM_BUFFER: usize = 8;
/// Session settings that make decoded text values independent of server defaults.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3";

/// What replication shares with the rest of the process: required, so no safety handle
/// can be left at a default by a forgotten call.
pub struct ReplicationHandles {
    /// Counts what the stream does.
    pub metrics: Arc<Metrics>,
    /// What `/readyz` and the slot watch read.
    pub status: Arc<ReplicationStatus>,
    /// Event payload bytes in memory (the one dispatch and the outbox share, invariant 11).
    pub budget: Arc<MemoryBudget>,
    /// Makes dispatch drop what a session routed when leadership is lost, and holds the
    /// tenure dispatch sends within (invariant 10).
    pub fence: Fence,
    /// Where backfill chunks wait for their high watermark (the runner's, invariant 9).
    pub backfill: Arc<Hub>,
    /// Where a write of walhook's that does not commit is reported (the store writer's): a
    /// raise of the confirm ceiling is one.
    pub store_health: Arc<StoreHealth>,
}

/// Reads the slot and feeds dispatch.
pub struct Replication {
    cfg: Arc<Config>,
    db: Db,
    secrets: SecretBox,
    metrics: Arc<Metrics>,
    status: Arc<ReplicationStatus>,
    /// Routes, charges and hands deliveries to dispatch; keeps the transactions' tickets.
    emitter: Emitter,
    /// Backfill chunks waiting for their high watermark.
    hub: Arc<Hub>,
    /// The session's open backfill windows (between a chunk's watermarks).
    windows: Windows,
    /// Makes dispatch drop what a session routed when leadership is lost.
    fence: Fence,
    /// Renewed while this process holds the lock; dispatch sends only within it.
    tenure: Arc<Tenure>,
    /// How far the session may confirm (loaded at each session start).
    ceiling: Option<Ceiling>,
    /// Where a raise of the ceiling that does not commit is reported.
    store_health: Arc<StoreHealth>,
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
        handles: ReplicationHandles,
    ) -> Self {
        let ReplicationHandles { metrics, status, budget, fence, backfill, store_health } = handles;
        let emitter = Emitter::new(
            db.clone(),
            cfg.replication.slot.as_str(),
            Router::new(secrets.clone()),
            dispatch,
            EmitterHandles { metrics: metrics.clone(), budget, status: status.clone() },
        );
        Replication {
            tenure: fence.tenure(),
            fence,
            cfg,
            db,
            secrets,
            metrics,
            status,
            emitter,
            hub: backfill,
            windows: Windows::default(),
            ceiling: None,
            store_health,
            sessions_streamed: 0,
            failover_warned: false,
        }
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
            // A wait for a commit to become visible carries over only into the session that
            // reads that commit again.
            if !matches!(result, Err(ReplicationError::NotVisible(VisibleError::NotYet { .. }))) {
                self.status.visibility_wait_over();
            }
            self.metrics.streaming.set(0);
            self.emitter.abandon();
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
                // Shutdown ended the session (nothing to reconnect for).
                Err(e) if shutdown.is_cancelled() => {
                    tracing::debug!(error = %e, "replication stopped by shutdown");
                    return Ok(());
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
        self.fence.raise().await;
    }

    /// After a session ended with an error: lets what it routed settle, for up to a minute,
    /// so the next session's replay check sees it. The lock is held meanwhile (no other
    /// replica streams while this dispatcher still sends); losing it fences dispatch, and
    /// after a fence nothing of the session will settle. Whether the lock is still held
    /// (`fenced`: it was lost already); `None` on shutdown.
    async fn settle_session(&mut self, lead: &Leadership, fenced: bool, shutdown: &CancellationToken) -> Option<bool> {
        let settle_until = tokio::time::Instant::now() + Duration::from_secs(60);
        let notify = self.emitter.tracker().notify();
        let mut leading = !fenced;
        while leading && !self.emitter.tracker().is_settled() && tokio::time::Instant::now() < settle_until {
            self.emitter.tracker().confirmable();
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
        self.emitter.reset_tracker();
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
        self.emitter.set_router(route_versions::load(&self.db, &slot, self.secrets.clone()).await?);
        let (replay_until, pending_endpoints): (u64, Vec<Uuid>) = {
            let client = self.db.get().await?;
            let replay_until = store::deliveries::last_recorded_commit(&**client).await?;
            (replay_until, store::deliveries::endpoints_with_pending(&**client).await?)
        };
        // Before anything of this session is routed: endpoints with rows waiting in the outbox
        // (left by this process, a dead one, or the leader this one took over from) start
        // spilled, so their rows queue behind what waits there.
        self.emitter.send(DispatchMsg::SessionStart { pending_endpoints }, shutdown).await?;
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
        let mut step = TxStep::new(self.cfg.database.crm_schema.as_str(), replay_until);
        // A window opened in an earlier session never closes: its chunk is read again.
        self.windows.new_session();
        let notify = self.emitter.tracker().notify();
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
                    // (A raise that does not commit, a synchronous standby not answering say, is
                    // reported as the store's stall: nothing is confirmed meanwhile.)
                    let watch = store::Watch {
                        db: &self.db,
                        health: &self.store_health,
                        stall_after: self.cfg.database.write_stall_after.get(),
                        of: StallOf::Ceiling,
                    };
                    let raise = self.ceiling.as_mut().expect("loaded at session start").raise(&self.db);
                    store::watched_alone(watch, raise, tokio::time::Instant::now()).await?;
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
                        self.handle(event, &mut step, stream, shutdown).await?
                    }
                    None => return Err(ReplicationError::Closed),
                },
            }
        }
    }

    /// Confirms the end of every settled transaction at the front (up to the ceiling).
    fn confirm(&mut self, stream: &ReplicationClient) {
        if let Some(lsn) = self.emitter.tracker().confirmable() {
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

    /// Acts on what `event` means: types looked up, rows and endpoint changes to the emitter,
    /// commits and idle positions confirmed.
    async fn handle(
        &mut self,
        event: ReplicationEvent,
        step: &mut TxStep,
        stream: &ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        for out in step.apply(event)? {
            match out {
                Step::Begin(tx) => {
                    self.windows.transaction(&self.hub, tx.xid);
                    self.emitter.begin(tx.commit_us, tx.replay, Some(tx.xid))
                }
                Step::NeedTypes { relation, oids } => {
                    let client = self.db.get().await?;
                    step.decoder_mut().resolve_types(&**client, oids).await?;
                    step.add_relation(relation);
                }
                Step::Row(change, position) => {
                    if !self.windows.is_empty() {
                        let targets = self.emitter.target_ids(&change);
                        let whole = change.whole || change.event_type.op == Op::Deleted;
                        let row = (change.event_type.table, change.entity_key.as_str(), whole);
                        self.windows.routed(row, targets.iter().copied());
                    }
                    self.emitter.row(change, position, shutdown).await?
                }
                // Routing changes at once; stored and told to dispatch at the commit.
                Step::EndpointUpsert(row) => self.emitter.upsert_endpoint(row),
                Step::EndpointDelete(id) => self.emitter.delete_endpoint(id),
                Step::Truncate(tables) => {
                    for t in tables {
                        tracing::warn!(table = %t, "TRUNCATE replicated; no webhook events are sent for truncates");
                        self.metrics.truncates.with_label_values(&[&t]).inc();
                    }
                }
                Step::Commit { end_lsn, commit_us } => {
                    tracing::trace!(end_lsn = %Lsn::from_u64(end_lsn), "commit");
                    self.emitter.commit(end_lsn, shutdown).await?;
                    if let Some(commit_us) = commit_us {
                        self.status.last_commit_us.store(commit_us, Ordering::Relaxed);
                    }
                    self.confirm(stream);
                }
                Step::KeepAlive { wal_end } => self.confirm_idle(stream, wal_end),
                // A non-transactional message (a heartbeat, a backfill's watermark) is read at
                // once: its position is an idle one, unless a backfill chunk is handed on
                // there. A transactional one is read at its transaction's commit.
                Step::Message { transactional: false, lsn, prefix, content } => {
                    if let Some(at) = self.windows.message(&self.hub, &prefix, &content) {
                        backfill::hand_on(&mut self.emitter, at, lsn, shutdown).await?;
                    }
                    self.confirm_idle(stream, lsn)
                }
                Step::Message { transactional: true, .. } => {}
            }
        }
        Ok(())
    }

    /// With nothing unsettled and no transaction open, everything up to `lsn` is done.
    fn confirm_idle(&mut self, stream: &ReplicationClient, lsn: u64) {
        if let Some(settled) = self.emitter.tracker().confirmable() {
            self.ceiling_mut().want(settled, false);
        }
        let tracker = self.emitter.tracker();
        if !tracker.in_transaction() && tracker.is_settled() && lsn != 0 {
            self.ceiling_mut().want(lsn, true);
        }
        self.send_confirm(stream);
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

    /// Shutdown: wait for what was read to settle, confirm it, and close the stream.
    async fn finish(&mut self, stream: &mut ReplicationClient) {
        self.emitter.abandon();
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown.grace.get() + Duration::from_secs(5);
        let notify = self.emitter.tracker().notify();
        let mut confirmed = None;
        loop {
            if let Some(lsn) = self.emitter.tracker().confirmable() {
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
            if self.emitter.tracker().is_settled() || self.emitter.tracker().stuck() {
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
