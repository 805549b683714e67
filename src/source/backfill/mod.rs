//! Backfill: sends an endpoint the rows that already exist, as `<entity>.backfilled`, never
//! older than the live stream (docs/architecture.md, invariant 9).
//!
//! The runner here reads chunks ([`read`]) between two watermarks and hands each to the
//! stream through the [`window::Hub`]; the stream ([`window::Windows`]) drops the rows it
//! changed between the watermarks and hands the rest to dispatch at the high watermark, like
//! any transaction, with tickets. The runner stores progress only once that chunk settled.
//!
//! What must hold:
//! - Only the process that streams runs chunks (another's watermarks find no chunk and are
//!   ignored); a chunk not lined up in time, or lined up by a session that then broke, is read
//!   again, so nothing is lost and at most that chunk is sent twice, under the same ids.
//! - Progress (table, last key) moves only after every delivery of the chunk is durable, and
//!   only while the backfill runs: after a crash or a takeover the next leader reads on from
//!   the last settled chunk.
//! - `backfill.rows_per_second` bounds all backfills together; each running backfill gets one
//!   chunk in turn.
//! - A runner error never stops the process: a database that cannot be reached is waited
//!   for; a backfill that cannot go on (its table is gone, its endpoint deleted or disabled)
//!   ends `failed` with the reason.

mod error;
pub mod read;
pub mod window;

pub use error::BackfillError;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::model::delivery::Event;
use crate::model::event::{EventType, Op, Table};
use crate::model::position::Position;
use crate::model::progress::TxWatch;
use crate::ops::metrics::Metrics;
use crate::ops::status::ReplicationStatus;
use crate::pg::db::{Db, DbError};
use crate::source::emit::Emitter;
use crate::source::error::ReplicationError;
use crate::store;
use crate::store::backfills::StoredBackfill;
use read::Reader;
use window::{AtHigh, Chunk, Hub, Intent, Lined, HIGH};

/// How often an idle runner looks for running backfills.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long a chunk may wait for the stream to line it up before it is read again.
const LINE_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Reads of one chunk that could not be lined up before the runner moves on to others.
const TRIES_PER_TURN: u32 = 5;
/// Pause before reading again a chunk the stream could not line up.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How often the runner looks whether a chunk's deliveries are durable.
const SETTLE_POLL: Duration = Duration::from_millis(10);

/// Id of row `entity_key`'s backfilled event in backfill `backfill`: the same on every read,
/// so a chunk sent again after a crash carries the same `webhook-id`s.
pub fn event_id(backfill: Uuid, entity_key: &str) -> Uuid {
    crate::model::delivery::keyed_id(b"walhook:backfill", backfill, entity_key.as_bytes(), None)
}

/// Id of that event's delivery to `endpoint`.
pub fn delivery_id(backfill: Uuid, entity_key: &str, endpoint: Uuid) -> Uuid {
    crate::model::delivery::keyed_id(b"walhook:backfill-delivery", backfill, entity_key.as_bytes(), Some(endpoint))
}

/// What one turn of a backfill did.
enum Turn {
    /// A chunk settled, or a table ended.
    Moved { rows_read: usize },
    /// It ended (finished, failed or cancelled).
    Ended,
    /// Its chunk could not be lined up this turn.
    NotYet,
}

/// Runs the running backfills while this process streams.
pub struct Backfiller {
    cfg: Arc<Config>,
    db: Db,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    status: Arc<ReplicationStatus>,
    reader: Reader,
}

impl Backfiller {
    /// A runner handing chunks to the stream through `hub` (the session's).
    pub fn new(cfg: Arc<Config>, db: Db, hub: Arc<Hub>, metrics: Arc<Metrics>, status: Arc<ReplicationStatus>) -> Self {
        let reader = Reader::new(cfg.database.crm_schema.as_str());
        Backfiller { cfg, db, hub, metrics, status, reader }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let rate = self.cfg.backfill.rows_per_second;
        let mut next_read = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if !self.status.streaming.load(Ordering::Relaxed) {
                self.metrics.backfills_running.set(0);
                sleep_or_stop(IDLE_POLL, &shutdown).await;
                continue;
            }
            let running = match self.running().await {
                Ok(running) => running,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the running backfills; retrying");
                    sleep_or_stop(IDLE_POLL, &shutdown).await;
                    continue;
                }
            };
            self.metrics.backfills_running.set(running.len() as i64);
            if running.is_empty() {
                sleep_or_stop(IDLE_POLL, &shutdown).await;
                continue;
            }
            for b in running {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next_read) => {}
                }
                let began = tokio::time::Instant::now();
                let turn = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    turn = self.turn(&b) => turn,
                };
                match turn {
                    // The pace counts from when the chunk was started, so the time it takes to
                    // line up and settle is part of it, not added to it.
                    Ok(Turn::Moved { rows_read }) if rate > 0 => {
                        next_read = began + Duration::from_secs_f64(rows_read as f64 / rate as f64);
                    }
                    Ok(_) => {}
                    Err(e) if e.is_transient() => {
                        tracing::warn!(backfill = %b.id, error = %e, "backfill chunk failed; it is read again");
                        sleep_or_stop(IDLE_POLL, &shutdown).await;
                    }
                    Err(e) => {
                        // The reason is shown to the customer: no database detail in it.
                        tracing::error!(backfill = %b.id, endpoint = %b.endpoint_id, error = %e, "backfill cannot go on");
                        let reason = match &e {
                            BackfillError::Table(why) => why.clone(),
                            _ => "reading the table failed; walhook's log names the cause".to_owned(),
                        };
                        self.end(&b, Some(&reason)).await
                    }
                }
            }
        }
    }

    async fn running(&self) -> Result<Vec<StoredBackfill>, DbError> {
        let client = self.db.get().await?;
        store::backfills::running(&**client).await
    }

    /// One chunk of backfill `b` (or the end of a table, or of the backfill).
    async fn turn(&mut self, b: &StoredBackfill) -> Result<Turn, BackfillError> {
        let tables: Vec<Table> = b.tables.iter().filter_map(|t| Table::from_name(t)).collect();
        if b.rows_total_estimate.is_none() {
            let n = self.reader.count(&self.db, &tables, b.account_id).await?;
            let client = self.db.get().await?;
            store::backfills::set_estimate(&**client, b.id, n).await?;
        }
        let index = usize::try_from(b.table_index).unwrap_or(0);
        let Some(&table) = tables.get(index) else {
            self.end(b, None).await;
            return Ok(Turn::Ended);
        };
        let (limit, cap) = (self.cfg.backfill.chunk_size, (self.cfg.dispatch.memory_limit.get() / 4) as usize);
        for _ in 0..TRIES_PER_TURN {
            let token = Uuid::new_v4();
            self.hub.intend(token, Intent { table, endpoint_id: b.endpoint_id });
            let read = self.reader.chunk(&self.db, (table, b.account_id, b.last_key), (limit, cap), token).await;
            let read = match read {
                Ok(read) => read,
                Err(e) => {
                    self.hub.forget(token);
                    return Err(e);
                }
            };
            let Some(last_key) = read.last_key else {
                // The table has no more rows: on to the next one.
                self.hub.forget(token);
                return self.next_table(b, index, tables.len()).await;
            };
            let rows_read = read.rows.len();
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.hub.ready(Chunk {
                token,
                backfill_id: b.id,
                intent: Intent { table, endpoint_id: b.endpoint_id },
                account_id: b.account_id,
                rows: read.rows,
                read_at_us: read.read_at_us,
                committed_unseen: read.committed_unseen,
                reply,
            });
            if let Err(e) = self.emit_high(token).await {
                self.hub.forget(token);
                return Err(e);
            }
            match self.lined_up(token, answer).await {
                Some(Lined::Sent { rows, watch }) => {
                    // Durable, every row of it, before progress moves past it.
                    if !settled(&watch).await {
                        tracing::debug!(backfill = %b.id, "backfill chunk abandoned by the stream; reading it again");
                        self.metrics.backfill_chunks.with_label_values(&["retried"]).inc();
                        return Ok(Turn::NotYet);
                    }
                    if !self.advance(b, rows as i64, index, Some(last_key)).await? {
                        return Ok(Turn::Ended); // cancelled, or moved on by another process
                    }
                    self.metrics.backfill_rows.inc_by(rows as u64);
                    self.metrics.backfill_chunks.with_label_values(&["sent"]).inc();
                    tracing::debug!(backfill = %b.id, table = table.name(), rows, read = rows_read, "backfill chunk sent");
                    return Ok(Turn::Moved { rows_read });
                }
                Some(Lined::Unsubscribed) => {
                    tracing::info!(backfill = %b.id, endpoint = %b.endpoint_id, table = table.name(), "the endpoint no longer subscribes to this table's events; the backfill skips the rest of it");
                    return self.next_table(b, index, tables.len()).await;
                }
                Some(Lined::EndpointGone) => {
                    self.end(b, Some("the endpoint was deleted, disabled, or cannot be sent to")).await;
                    return Ok(Turn::Ended);
                }
                Some(Lined::Retry(why)) => {
                    tracing::debug!(backfill = %b.id, why, "backfill chunk read again");
                    self.metrics.backfill_chunks.with_label_values(&["retried"]).inc();
                    // (A commit waiting for a synchronous standby becomes visible meanwhile.)
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                None => {
                    tracing::debug!(backfill = %b.id, "backfill chunk not lined up in time; reading it again");
                    self.metrics.backfill_chunks.with_label_values(&["retried"]).inc();
                    return Ok(Turn::NotYet);
                }
            }
            // Whether it was cancelled meanwhile.
            let client = self.db.get().await?;
            if !store::backfills::is_running(&**client, b.id).await? {
                return Ok(Turn::Ended);
            }
        }
        Ok(Turn::NotYet)
    }

    /// Table `index` of `tables` is done: on to the next, or the backfill is.
    async fn next_table(&self, b: &StoredBackfill, index: usize, tables: usize) -> Result<Turn, BackfillError> {
        if !self.advance(b, 0, index + 1, None).await? {
            return Ok(Turn::Ended); // cancelled, or moved on by another process
        }
        if index + 1 == tables {
            self.end(b, None).await;
            return Ok(Turn::Ended);
        }
        Ok(Turn::Moved { rows_read: 0 })
    }

    async fn emit_high(&self, token: Uuid) -> Result<(), BackfillError> {
        let client = self.db.get().await?;
        client
            .execute("SELECT pg_logical_emit_message(false, $1, $2)", &[&HIGH, &token.to_string()])
            .await
            .map_err(DbError::from)?;
        Ok(())
    }

    /// The stream's answer for `token`; `None` when it did not come in time (the chunk is
    /// taken back) or the session ended before answering.
    async fn lined_up(&self, token: Uuid, mut answer: tokio::sync::oneshot::Receiver<Lined>) -> Option<Lined> {
        match tokio::time::timeout(LINE_UP_TIMEOUT, &mut answer).await {
            Ok(answer) => answer.ok(),
            Err(_) if self.hub.forget(token) => None,
            // The stream took it just now: its answer follows.
            Err(_) => answer.await.ok(),
        }
    }

    async fn advance(
        &self,
        b: &StoredBackfill,
        rows: i64,
        index: usize,
        last_key: Option<Uuid>,
    ) -> Result<bool, BackfillError> {
        let client = self.db.get().await?;
        Ok(store::backfills::advance(&**client, b.id, rows, index as i32, last_key).await?)
    }

    /// Ends `b`, `finished` or failed with `reason`, and says so.
    async fn end(&self, b: &StoredBackfill, failed: Option<&str>) {
        let ended = async {
            let client = self.db.get().await?;
            store::backfills::end(&**client, b.id, failed).await
        }
        .await;
        match (ended, failed) {
            (Ok(true), None) => tracing::info!(backfill = %b.id, endpoint = %b.endpoint_id, "backfill finished"),
            (Ok(true), Some(reason)) => {
                tracing::warn!(backfill = %b.id, endpoint = %b.endpoint_id, reason, "backfill failed")
            }
            (Ok(false), _) => {}
            (Err(e), _) => tracing::warn!(backfill = %b.id, error = %e, "cannot record the end of a backfill"),
        }
    }
}

/// The stream's side at a high watermark at `lsn`: a chunk to read again is told so; one to
/// send is handed on, row by row, in a transaction opened at `lsn` (after everything the
/// stream read before the watermark, before everything after it), and the runner gets a watch
/// on it.
pub async fn hand_on(
    emitter: &mut Emitter,
    at: AtHigh,
    lsn: u64,
    shutdown: &CancellationToken,
) -> Result<(), ReplicationError> {
    let chunk = match at {
        AtHigh::Unknown => return Ok(()),
        AtHigh::Retry(chunk, why) => {
            let _ = chunk.reply.send(Lined::Retry(why));
            return Ok(());
        }
        AtHigh::Send(chunk) => chunk,
    };
    let Chunk { backfill_id, intent, account_id, rows, read_at_us, reply, .. } = chunk;
    // Its subscriptions as of this point of the stream: a table it no longer subscribes to
    // is not sent.
    match emitter.subscribes_to(intent.endpoint_id, intent.table) {
        None => {
            let _ = reply.send(Lined::EndpointGone);
            return Ok(());
        }
        Some(false) => {
            let _ = reply.send(Lined::Unsubscribed);
            return Ok(());
        }
        Some(true) => {}
    }
    emitter.begin(read_at_us, false, None);
    let watch = emitter.tracker().watch_open().expect("a transaction was just opened");
    let event_type = EventType::new(intent.table, Op::Backfilled);
    let (mut sent, mut refused) = (0usize, false);
    for (seq, row) in rows.into_iter().enumerate() {
        let event = Event {
            id: event_id(backfill_id, &row.entity_key),
            account_id,
            event_type,
            position: Position::new(lsn, u32::try_from(seq + 1).unwrap_or(u32::MAX)),
            committed_at_us: read_at_us,
            body: row.body,
            entity_key: row.entity_key,
        };
        let id = delivery_id(backfill_id, &event.entity_key, intent.endpoint_id);
        if !emitter.emit_to(intent.endpoint_id, event, id, shutdown).await? {
            refused = true;
            break;
        }
        sent += 1;
    }
    emitter.commit(lsn, shutdown).await?;
    let answer = match (refused, shutdown.is_cancelled()) {
        (false, _) => Lined::Sent { rows: sent, watch },
        (true, true) => Lined::Retry("walhook is shutting down"),
        (true, false) => Lined::EndpointGone,
    };
    let _ = reply.send(answer);
    Ok(())
}

/// Whether every delivery of the chunk `watch` watches is durable (`false`: one was dropped
/// unsettled, or the stream broke while handing it on).
async fn settled(watch: &TxWatch) -> bool {
    loop {
        if watch.settled() {
            return true;
        }
        if watch.abandoned() {
            return false;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
