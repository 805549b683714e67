//! The emitter: rows and events in, deliveries to dispatch out. Every producer shares it: the
//! stream (through the session) routes rows, and a producer of its own events (a backfill)
//! hands one event to one endpoint at a time, inside a transaction it opens at an LSN it
//! chooses.
//!
//! What must hold:
//! - Every delivery carries a ticket of the open transaction (`model/progress.rs`), so its
//!   transaction is confirmed only once it is settled (invariant 1); nothing is handed on
//!   outside a transaction.
//! - A replayed transaction (commit LSN at or below the newest recorded delivery) does not
//!   send or store what is already recorded (invariant 2): its deliveries are checked against
//!   the database in batches, the recorded ones settled, the others sent.
//! - Routing waits when dispatch is full or the memory budget is spent (each event's body is
//!   charged before it is handed on): backpressure stays in the slot, not in memory
//!   (invariants 5 and 11). Replayed deliveries buffered for their check are sent on before
//!   routing waits for budget, so the buffer never holds the budget it waits for.
//! - An endpoint change is stored as a routing version before its commit can be confirmed,
//!   so a replay routes exactly as the first pass did (invariant 12,
//!   [`crate::source::route_versions`]); dispatch learns of it at the commit, once queries
//!   can see that commit ([`crate::source::visible`]): read earlier, a new endpoint's row is
//!   not there yet and the endpoint would be taken for deleted.
//! - An event goes only to active endpoints of its own account (invariant 3).
//! - The dispatcher gone (its channel closed) is [`ReplicationError::DispatchClosed`], never a
//!   lost connection (invariant 21).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::dispatch::budget::MemoryBudget;
use crate::delivery::dispatch::DispatchMsg;
use crate::model::delivery::{self, Delivery, Event};
use crate::model::event::{EventType, Op, Table};
use crate::model::position::Position;
use crate::model::progress::Tracker;
use crate::ops::metrics::Metrics;
use crate::ops::status::ReplicationStatus;
use crate::pg::db::Db;
use crate::source::decode::{EndpointRow, RowChange};
use crate::source::error::ReplicationError;
use crate::source::route::Router;
use crate::source::route_versions;
use crate::source::visible;
use crate::store;

/// Deliveries of a replayed transaction checked against the database at once.
const REPLAY_CHECK_BATCH: usize = 512;
/// How long a transaction that changed endpoints may stay invisible to queries after it was
/// read before the session ends and reads it again (within `wal_sender_timeout`'s default).
const VISIBLE_WITHIN: Duration = Duration::from_secs(20);
/// Routing waiting this long for memory budget logs a WARN.
const BUDGET_WAIT_WARN: Duration = Duration::from_secs(10);

/// What an emitter needs that is shared with the rest of the process.
#[derive(Debug, Clone)]
pub struct EmitterHandles {
    /// Counts changes, events and unroutable rows.
    pub metrics: Arc<Metrics>,
    /// Event payload bytes in memory (the one dispatch and the outbox share).
    pub budget: Arc<MemoryBudget>,
    /// Learns how long a commit read has waited to become visible (`/readyz`).
    pub status: Arc<ReplicationStatus>,
}

/// The transaction deliveries are handed on in.
#[derive(Debug)]
struct EmitTx {
    commit_us: i64,
    replay: bool,
    /// The transaction's xid, when it is one the stream read (not a backfill's).
    xid: Option<u32>,
    replay_buffer: Vec<Delivery>,
}

/// Hands events to dispatch, with tickets of the transaction open in its [`Tracker`].
pub struct Emitter {
    db: Db,
    /// The slot whose routing versions are recorded.
    slot: String,
    router: Router,
    dispatch: mpsc::Sender<DispatchMsg>,
    metrics: Arc<Metrics>,
    budget: Arc<MemoryBudget>,
    status: Arc<ReplicationStatus>,
    tracker: Tracker,
    tx: Option<EmitTx>,
}

impl Emitter {
    /// An emitter for `slot`, routing with `router` until [`Emitter::set_router`], handing
    /// deliveries to `dispatch`.
    pub fn new(
        db: Db,
        slot: &str,
        router: Router,
        dispatch: mpsc::Sender<DispatchMsg>,
        handles: EmitterHandles,
    ) -> Emitter {
        let EmitterHandles { metrics, budget, status } = handles;
        let tracker = Tracker::new();
        Emitter { db, slot: slot.to_owned(), router, dispatch, metrics, budget, status, tracker, tx: None }
    }

    /// Routes with `router` from now on (each session loads the set valid where it starts).
    pub fn set_router(&mut self, router: Router) {
        self.router = router;
    }

    /// The transactions handed on and not yet confirmed.
    pub fn tracker(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// Forgets every transaction handed on (after a session ended, once what it could settle
    /// has settled).
    pub fn reset_tracker(&mut self) {
        self.tracker = Tracker::new();
    }

    /// Opens a transaction committed at `commit_us` (Unix epoch µs); its deliveries carry the
    /// positions the caller gives them, and [`Emitter::commit`] says where it ends (a commit
    /// LSN, or a position the caller chooses, such as a logical message's). With `replay`, what
    /// it hands on is sent only if not recorded yet. `xid` is the stream's transaction id: its
    /// endpoint changes are acted on once queries can see it. One transaction is open at a time.
    pub fn begin(&mut self, commit_us: i64, replay: bool, xid: Option<u32>) {
        self.tracker.begin();
        self.router.clear_changed();
        self.tx = Some(EmitTx { commit_us, replay, xid, replay_buffer: Vec::new() });
    }

    /// Closes the open transaction, which ends at `end_lsn`: sends on its replayed
    /// deliveries not recorded yet, stores its endpoint changes, and lets it be confirmed at
    /// `end_lsn` once its deliveries settle.
    pub async fn commit(&mut self, end_lsn: u64, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        self.flush_replay(shutdown).await?;
        self.record_endpoint_changes(end_lsn, shutdown).await?;
        self.tx = None;
        self.tracker.commit(end_lsn);
        Ok(())
    }

    /// The stream broke: forget the open transaction (it will be read again whole).
    pub fn abandon(&mut self) {
        self.tracker.abandon_open();
        self.tx = None;
    }

    /// Applies an endpoint row read in the open transaction: routing changes at once, and is
    /// stored and told to dispatch at the commit.
    pub fn upsert_endpoint(&mut self, row: EndpointRow) {
        self.router.apply(row);
    }

    /// An endpoint deleted in the open transaction (see [`Emitter::upsert_endpoint`]).
    pub fn delete_endpoint(&mut self, id: Uuid) {
        self.router.remove(id);
    }

    /// Routes a row of the open transaction, at `position`, to every endpoint it matches.
    pub async fn row(
        &mut self,
        change: RowChange,
        position: Position,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        let table = change.event_type.table.name();
        self.metrics.change(change.event_type).inc();
        let Some(account_id) = change.account_id else {
            tracing::warn!(table, entity = %change.entity_key, "row image has no account_id; not routed");
            self.metrics.unroutable.with_label_values(&[table]).inc();
            return Ok(());
        };
        let targets: Vec<_> = self.router.targets(&change).cloned().collect();
        let Some(commit_us) = self.tx.as_ref().map(|tx| tx.commit_us) else { return Ok(()) };
        if targets.is_empty() {
            return Ok(());
        }
        let Some(body) = self.charge(change.body, shutdown).await? else { return Ok(()) };
        self.metrics.event(change.event_type).inc();
        tracing::debug!(event = change.event_type.name(), entity = %change.entity_key, endpoints = targets.len(), commit_lsn = position.commit_lsn, seq = position.seq, "routed");
        let event = Arc::new(Event {
            id: delivery::event_id(position),
            account_id,
            event_type: change.event_type,
            entity_key: change.entity_key,
            position,
            committed_at_us: commit_us,
            body,
        });
        for endpoint in targets {
            let d = Delivery {
                id: delivery::delivery_id(event.position, endpoint.id),
                endpoint,
                event: event.clone(),
                ticket: self.tracker.ticket(),
            };
            self.hand_on(d, shutdown).await?;
        }
        Ok(())
    }

    /// Whether endpoint `id` subscribes to some event of `table` now; `None` when it cannot
    /// be sent to (unknown, deleted, or its URL or secret unusable).
    pub fn subscribes_to(&self, id: Uuid, table: Table) -> Option<bool> {
        let endpoint = self.router.get(id)?;
        Some(Op::ALL.into_iter().any(|op| endpoint.events & EventType::new(table, op).bit() != 0))
    }

    /// The endpoints `change` would be routed to now (a backfill's window watches them).
    pub fn target_ids(&self, change: &RowChange) -> Vec<Uuid> {
        self.router.targets(change).map(|e| e.id).collect()
    }

    /// Hands `event` (built by the caller, ids included; its body not charged yet) to the
    /// one endpoint `endpoint_id` as delivery `delivery_id`, in the open transaction: the
    /// body is charged to the memory budget (waiting as routing does), the delivery takes a
    /// ticket of the transaction, and in a replayed transaction it is sent only if not
    /// recorded. `false` when nothing was handed on: no transaction is open, the router does
    /// not know the endpoint (or cannot send to it), it is inactive, it belongs to another
    /// account than the event, or shutdown came while waiting for budget.
    pub async fn emit_to(
        &mut self,
        endpoint_id: Uuid,
        event: Event,
        delivery_id: Uuid,
        shutdown: &CancellationToken,
    ) -> Result<bool, ReplicationError> {
        if self.tx.is_none() {
            return Ok(false);
        }
        let Some(endpoint) = self.router.get(endpoint_id) else { return Ok(false) };
        if !endpoint.is_active || endpoint.account_id != event.account_id {
            return Ok(false);
        }
        let Event { id, account_id, event_type, entity_key, position, committed_at_us, body } = event;
        let Some(body) = self.charge(body, shutdown).await? else { return Ok(false) };
        self.metrics.event(event_type).inc();
        tracing::debug!(event = event_type.name(), entity = %entity_key, endpoint = %endpoint_id, commit_lsn = position.commit_lsn, seq = position.seq, "emitted");
        let event = Arc::new(Event { id, account_id, event_type, entity_key, position, committed_at_us, body });
        let d = Delivery { id: delivery_id, endpoint, event, ticket: self.tracker.ticket() };
        self.hand_on(d, shutdown).await?;
        Ok(true)
    }

    /// Sends `d` to dispatch, or in a replayed transaction buffers it for the check.
    async fn hand_on(&mut self, d: Delivery, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        let Some(tx) = self.tx.as_mut() else { return Ok(()) };
        if !tx.replay {
            return self.send(DispatchMsg::Deliver(d), shutdown).await;
        }
        tx.replay_buffer.push(d);
        if tx.replay_buffer.len() >= REPLAY_CHECK_BATCH {
            self.flush_replay(shutdown).await?;
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
        let changes = self.router.take_changed();
        let requeued = self.router.take_requeued();
        if changes.is_empty() {
            return Ok(());
        }
        // The endpoints' current rows are read below: not before queries can see them.
        if let Some(xid) = self.tx.as_ref().and_then(|tx| tx.xid) {
            let client = self.db.get().await?;
            visible::wait(&**client, xid, VISIBLE_WITHIN, &self.status, shutdown).await?;
        }
        let current = route_versions::record(&self.db, &self.slot, end_lsn, &changes)
            .await
            .map_err(ReplicationError::RoutingVersions)?;
        for (id, routing) in changes {
            if routing.is_none() {
                self.send(DispatchMsg::EndpointRemoved(id), shutdown).await?;
                continue;
            }
            match current.get(&id) {
                Some(sending) => self.router.refresh(id, sending.clone()),
                // Deleted since: its delete follows in the stream.
                None => self.router.unroute(id),
            }
            if let Some(ep) = self.router.get(id) {
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

    /// Hands `msg` to dispatch, waiting while it is full; on shutdown it is dropped (what it
    /// carried stays in the slot).
    pub async fn send(&self, msg: DispatchMsg, shutdown: &CancellationToken) -> Result<(), ReplicationError> {
        tokio::select! {
            r = self.dispatch.send(msg) => r.map_err(|_| ReplicationError::DispatchClosed),
            // Shutdown while dispatch is full: the unsent delivery stays in the slot.
            _ = shutdown.cancelled() => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::event::EventType;
    use crate::security::secrets::SecretBox;

    const ENDPOINT: Uuid = Uuid::from_u128(7);
    const ACCOUNT: Uuid = Uuid::from_u128(1);

    /// An emitter routing to one active endpoint of `ACCOUNT` subscribed to contact.created;
    /// the database is never reached (no replay, no endpoint change).
    fn emitter() -> (Emitter, mpsc::Receiver<DispatchMsg>, Arc<MemoryBudget>) {
        let cfg = Config::from_toml("[database]\nurl = \"postgres://u@localhost/db\"\n").unwrap();
        let db = Db::new(&cfg.database).unwrap();
        let mut router = Router::new(SecretBox::new(None).unwrap());
        router.apply(EndpointRow {
            id: Some(ENDPOINT),
            account_id: Some(ACCOUNT),
            url: Some("https://example.com/hook".into()),
            secret: Some(format!("whsec_{}", "A".repeat(43) + "=")),
            events: Some(vec!["contact.created".into()]),
            is_active: Some(true),
            ..Default::default()
        });
        router.clear_changed();
        let metrics = Arc::new(Metrics::new());
        let budget = Arc::new(MemoryBudget::new(1 << 20, metrics.payload_memory.clone()));
        let (tx, rx) = mpsc::channel(16);
        let status = Arc::new(ReplicationStatus::default());
        let handles = EmitterHandles { metrics, budget: budget.clone(), status };
        (Emitter::new(db, "walhook", router, tx, handles), rx, budget)
    }

    fn event(account_id: Uuid, position: Position) -> Event {
        Event {
            id: Uuid::from_u128(0xe1),
            account_id,
            event_type: EventType::parse("contact.created").unwrap(),
            entity_key: "contacts:c1".into(),
            position,
            committed_at_us: 1_767_225_600_000_000,
            body: Bytes::from_static(b"{\"event\":\"contact.created\"}"),
        }
    }

    #[tokio::test]
    async fn a_transaction_opened_at_a_chosen_lsn_hands_one_event_to_one_endpoint_under_the_callers_ids() {
        let (mut emitter, mut rx, budget) = emitter();
        let shutdown = CancellationToken::new();
        let at = Position::new(0x900, 1);
        assert!(!emitter.emit_to(ENDPOINT, event(ACCOUNT, at), Uuid::from_u128(0xd1), &shutdown).await.unwrap());
        assert!(rx.try_recv().is_err(), "nothing is handed on outside a transaction");

        emitter.begin(1_767_225_600_000_000, false, None);
        assert!(emitter.tracker().in_transaction());
        let unknown = Uuid::from_u128(8);
        assert!(!emitter.emit_to(unknown, event(ACCOUNT, at), Uuid::from_u128(0xd0), &shutdown).await.unwrap());
        let other = Uuid::from_u128(2);
        assert!(!emitter.emit_to(ENDPOINT, event(other, at), Uuid::from_u128(0xd0), &shutdown).await.unwrap());
        assert!(emitter.emit_to(ENDPOINT, event(ACCOUNT, at), Uuid::from_u128(0xd1), &shutdown).await.unwrap());
        let Ok(DispatchMsg::Deliver(mut d)) = rx.try_recv() else { panic!("one delivery") };
        assert!(rx.try_recv().is_err(), "exactly one");
        assert_eq!(
            (d.id, d.event.id, d.endpoint.id, d.event.position),
            (Uuid::from_u128(0xd1), Uuid::from_u128(0xe1), ENDPOINT, at)
        );
        assert!(budget.held() > 0, "the body is charged");
        emitter.commit(0x930, &shutdown).await.unwrap();
        assert!(!emitter.tracker().in_transaction());
        assert_eq!(emitter.tracker().confirmable(), None, "its delivery is not settled yet");
        d.ticket.take().expect("a ticket of the transaction").settle();
        assert_eq!(emitter.tracker().confirmable(), Some(0x930));
        drop(d);
        assert_eq!(budget.held(), 0, "released with the last copy");
    }

    #[tokio::test]
    async fn a_row_goes_to_its_accounts_endpoints_with_ids_from_its_position() {
        let (mut emitter, mut rx, _) = emitter();
        let shutdown = CancellationToken::new();
        emitter.begin(1_767_225_600_000_000, false, None);
        let change = RowChange {
            event_type: EventType::parse("contact.created").unwrap(),
            account_id: Some(ACCOUNT),
            entity_key: "contacts:c1".into(),
            body: Bytes::from_static(b"{}"),
            changed: None,
            whole: true,
        };
        let at = Position::new(0x500, 3);
        emitter.row(change, at, &shutdown).await.unwrap();
        let Ok(DispatchMsg::Deliver(d)) = rx.try_recv() else { panic!("one delivery") };
        assert_eq!(d.event.id, delivery::event_id(at));
        assert_eq!(d.id, delivery::delivery_id(at, ENDPOINT));
        assert_eq!(d.event.committed_at_us, 1_767_225_600_000_000);
        assert!(d.ticket.is_some());
    }
}
