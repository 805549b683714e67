//! One endpoint's deliveries on the fast path, as a plain state machine.
//!
//! The dispatcher feeds it what happens (a delivery arrived, an attempt finished, a probe
//! answered, a tick, the endpoint changed, was disabled or removed, a spill was asked for) and
//! carries out the [`Action`]s it answers with, in order; it does no I/O and starts no task.
//!
//! What must hold (see the dispatcher's module documentation for why):
//! - **Order per row**: a row (`entity_key`) has at most one delivery ready or in flight;
//!   later ones wait behind it and become ready only once it has settled.
//! - **Blocking**: when a first attempt leaves its delivery pending in the outbox, every later
//!   delivery of that row follows it there and the row stays blocked (new ones of it too)
//!   until a probe finds the latest of them settled. Other rows are not held back.
//! - **Spill**: a spilled endpoint sends nothing new from memory: what waits goes to the outbox,
//!   what is in flight is stored under the dispatcher's lease, new deliveries go to the
//!   outbox with their rows blocked, until a probe finds nothing of the endpoint pending
//!   outside the blocked rows; then only the blocked rows keep waiting behind the outbox.
//! - Past `MAX_BLOCKED_ROWS` blocked rows the endpoint is spilled as a whole.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::limits::Gate;
use crate::model::delivery::{Delivery, Endpoint};
use crate::store::ProbeAnswer;

/// Blocked rows one endpoint may have before it is spilled as a whole.
pub const MAX_BLOCKED_ROWS: usize = 1000;

/// What the dispatcher does for the state machine, in the order given.
#[derive(Debug)]
pub enum Action {
    /// Store in the outbox, pending and due now (it waits behind older ones of its row).
    Spill(Delivery),
    /// Store this delivery, whose first attempt is in flight, pending under the dispatcher's
    /// lease (its outcome completes that row).
    StoreLeased(Delivery),
    /// Record as failed without an attempt: the endpoint was disabled.
    FailUnsent(Delivery),
    /// Settle its ticket with nothing recorded: the endpoint was deleted.
    Drop(Delivery),
    /// Start what is ready, as permits allow.
    Pump,
}

/// What a probe asks the store about one endpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct ProbeQuery {
    /// The latest outbox delivery of each blocked row: which are settled?
    pub ids: Vec<Uuid>,
    /// Also ask whether anything of the endpoint outside `known_rows` is pending.
    pub whole_endpoint: bool,
    /// The blocked rows (with `whole_endpoint`).
    pub known_rows: Vec<String>,
}

/// When an endpoint's waiting deliveries make it spill.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Waiting deliveries at most (`dispatch.endpoint_queue`).
    pub queue: usize,
    /// Waiting payload bytes at most (its share of `dispatch.memory_limit`).
    pub bytes: usize,
}

/// A delivery waiting in memory.
#[derive(Debug)]
struct Waiting {
    delivery: Delivery,
    since: Instant,
}

/// A delivery whose first attempt is in flight.
#[derive(Debug)]
pub struct Flight {
    /// The delivery (its ticket is gone once it is stored under the lease).
    pub delivery: Delivery,
    /// Stored in the outbox under the dispatcher's lease while in flight (it spilled).
    pub leased: bool,
}

/// One endpoint's deliveries in memory.
#[derive(Debug)]
pub struct EndpointState {
    endpoint: Arc<Endpoint>,
    /// Deliveries ready to start, oldest first (their rows have nothing ahead of them).
    ready: VecDeque<Waiting>,
    /// Rows with a delivery ready or in flight, and what waits behind it.
    behind: HashMap<String, VecDeque<Waiting>>,
    /// Deliveries waiting in `ready` and `behind`.
    waiting: usize,
    /// Payload bytes of those deliveries.
    waiting_bytes: usize,
    in_flight: HashMap<Uuid, Flight>,
    /// Rows whose latest delivery is in the outbox: row → that delivery's id.
    blocked: HashMap<String, Uuid>,
    /// Everything new goes to the outbox (and its row into `blocked`) until a probe finds
    /// nothing of the endpoint pending outside the blocked rows.
    spilled: bool,
    /// Deliveries sent to the outbox without being tracked in `blocked` (it was full).
    untracked_spills: u64,
    /// `untracked_spills` when the outstanding whole-endpoint probe went out.
    untracked_at_probe: u64,
    /// A probe is out.
    probing: bool,
    /// Deleted: drop whatever is left.
    removed: bool,
    /// Disabled by walhook (410 Gone, failing too long): whatever waits fails.
    disabled: bool,
    /// When an attempt of this endpoint last finished (or when it was first seen).
    last_progress: Instant,
    /// The endpoint's concurrency limit (shared with the outbox workers).
    gate: Gate,
}

impl EndpointState {
    /// A new endpoint's state; `spilled` when deliveries of it already wait in the outbox.
    pub fn new(endpoint: Arc<Endpoint>, gate: Gate, spilled: bool, now: Instant) -> Self {
        EndpointState {
            ready: VecDeque::new(),
            behind: HashMap::new(),
            waiting: 0,
            waiting_bytes: 0,
            in_flight: HashMap::new(),
            blocked: HashMap::new(),
            spilled,
            untracked_spills: 0,
            untracked_at_probe: 0,
            probing: false,
            removed: false,
            disabled: endpoint.auto_disabled,
            last_progress: now,
            gate,
            endpoint,
        }
    }

    /// Deliveries waiting (not in flight).
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Payload bytes of those.
    pub fn waiting_bytes(&self) -> usize {
        self.waiting_bytes
    }

    /// Whether new deliveries go to the outbox.
    pub fn spilled(&self) -> bool {
        self.spilled
    }

    /// Attempts in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a delivery is ready to start.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The endpoint's concurrency limit.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Nothing held, nothing asked: the state can be forgotten.
    pub fn idle(&self) -> bool {
        self.waiting == 0 && self.in_flight.is_empty() && self.blocked.is_empty() && !self.spilled && !self.probing
    }

    /// Whether anything waits or is in flight.
    pub fn has_work(&self) -> bool {
        self.waiting > 0 || !self.in_flight.is_empty()
    }

    /// Delivery `d` was routed to this endpoint.
    pub fn arrive(&mut self, d: Delivery, now: Instant, bounds: Bounds) -> Vec<Action> {
        if self.removed {
            return vec![Action::Drop(d)]; // routed before the delete reached us
        }
        if self.disabled {
            return vec![Action::FailUnsent(d)];
        }
        let key = d.event.entity_key.clone();
        if self.spilled || !self.endpoint.is_active {
            return vec![self.spill_one(d)];
        }
        if let Some(tail) = self.blocked.get_mut(&key) {
            *tail = d.id;
            return vec![self.spill_one(d)];
        }
        let len = d.event.body.len();
        let w = Waiting { delivery: d, since: now };
        match self.behind.get_mut(&key) {
            Some(q) => q.push_back(w),
            None => {
                self.behind.insert(key, VecDeque::new());
                self.ready.push_back(w);
            }
        }
        self.waiting += 1;
        self.waiting_bytes += len;
        if self.waiting > bounds.queue {
            return self.spill();
        }
        if self.waiting_bytes > bounds.bytes {
            tracing::info!(endpoint = %self.endpoint.id, waiting_bytes = self.waiting_bytes, "payloads waiting for the endpoint passed its share of dispatch.memory_limit; spilling endpoint to the outbox");
            return self.spill();
        }
        vec![Action::Pump]
    }

    /// The endpoint as its row is now (attempts sign with its current keys, whatever the
    /// delivery was routed with).
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The delivery [`EndpointState::start_next`] would start.
    pub fn next_ready(&self) -> Option<&Delivery> {
        self.ready.front().map(|w| &w.delivery)
    }

    /// Moves the oldest ready delivery in flight (the caller holds a permit for its attempt).
    pub fn start_next(&mut self) -> Option<&Delivery> {
        let w = self.ready.pop_front()?;
        self.waiting -= 1;
        self.waiting_bytes -= w.delivery.event.body.len();
        let id = w.delivery.id;
        let flight = self.in_flight.entry(id).or_insert(Flight { delivery: w.delivery, leased: false });
        Some(&flight.delivery)
    }

    /// The attempt of delivery `id` finished: its flight, and `(removed, disabled)`. `None`
    /// when it is not in flight here (dropped by a fence).
    pub fn finished(&mut self, id: Uuid, now: Instant) -> Option<(Flight, bool, bool)> {
        let flight = self.in_flight.remove(&id)?;
        self.last_progress = now;
        Some((flight, self.removed, self.disabled))
    }

    /// Moves the row of `d` on after its first attempt (recorded, not leased): the next
    /// delivery of the row becomes ready, or (`pending`: `d` now waits in the outbox) every
    /// later one follows it there and the row stays blocked until the outbox settles them.
    pub fn first_attempt_settled(&mut self, d: &Delivery, pending: bool) -> Vec<Action> {
        let key = &d.event.entity_key;
        if !pending {
            match self.behind.get_mut(key).and_then(VecDeque::pop_front) {
                Some(next) => self.ready.push_back(next),
                None => {
                    self.behind.remove(key);
                }
            }
            return Vec::new();
        }
        let behind = self.behind.remove(key).unwrap_or_default();
        self.waiting -= behind.len();
        self.waiting_bytes -= behind.iter().map(|w| w.delivery.event.body.len()).sum::<usize>();
        let tail = behind.back().map(|w| w.delivery.id).unwrap_or(d.id);
        self.blocked.insert(key.clone(), tail);
        let over = self.blocked.len() > MAX_BLOCKED_ROWS;
        let mut actions: Vec<Action> = behind.into_iter().map(|w| self.spill_one(w.delivery)).collect();
        if over {
            actions.extend(self.spill());
        }
        actions
    }

    /// `webhooks-recover`, `-redeliver` or `-replay` put deliveries of this endpoint back in
    /// the outbox: it spills (if it has not), and a probe already out cannot unspill it (its
    /// answer may predate them). No row counts as accounted for any more: a requeued delivery
    /// queues after its row's tracked tail, which may settle first, so the next probe asks
    /// about every pending delivery of the endpoint, and rows unblock only through it.
    pub fn requeued(&mut self) -> Vec<Action> {
        self.untracked_spills += 1;
        let actions = if self.spilled { Vec::new() } else { self.spill() };
        // Also the rows the spill just blocked behind what was in flight or waiting: all of
        // it was committed before the requeue, so their tails settle before it.
        self.blocked.clear();
        actions
    }

    /// A probe answered: settled rows unblock; a spilled endpoint with nothing pending
    /// outside its blocked rows (and nothing sent there untracked since) sends directly again.
    pub fn probe_answered(&mut self, answer: &ProbeAnswer) {
        self.probing = false;
        self.blocked.retain(|_, tail| !answer.settled.contains(tail));
        if self.spilled
            && answer.endpoint_pending == Some(false)
            && self.in_flight.is_empty()
            && self.untracked_spills == self.untracked_at_probe
        {
            tracing::info!(endpoint = %answer.endpoint_id, blocked_rows = self.blocked.len(), "endpoint's outbox caught up; sending directly again");
            self.spilled = false;
        }
    }

    /// An endpoint that has not finished an attempt for `spill_after` while a delivery waited
    /// that long is stuck: what waits goes to the outbox. One that keeps answering is only
    /// busy, and routing waits for it (backpressure).
    pub fn spill_if_stuck(&mut self, now: Instant, spill_after: Duration) -> Vec<Action> {
        let stuck = !self.spilled
            && self.waiting > 0
            && self.oldest_wait(now) > spill_after
            && now - self.last_progress > spill_after;
        if !stuck {
            return Vec::new();
        }
        tracing::info!(endpoint = %self.endpoint.id, "deliveries waited longer than dispatch.spill_after; spilling endpoint to the outbox");
        self.spill()
    }

    /// The probe to send now, if one is due (blocked rows or spilled, and none out).
    pub fn probe(&mut self) -> Option<ProbeQuery> {
        if self.probing || (self.blocked.is_empty() && !self.spilled) {
            return None;
        }
        self.probing = true;
        let whole_endpoint = self.spilled && self.in_flight.is_empty();
        self.untracked_at_probe = self.untracked_spills;
        // Pending deliveries of blocked rows are accounted for; any other pending one (an
        // untracked row, or one pending since before this process) keeps it spilled.
        let known_rows = if whole_endpoint { self.blocked.keys().cloned().collect() } else { Vec::new() };
        Some(ProbeQuery { ids: self.blocked.values().copied().collect(), whole_endpoint, known_rows })
    }

    /// The endpoint's row changed. `fail_pending` (the caller's to send) when walhook
    /// disabled it: rows stored after the disable committed fail too.
    pub fn changed(&mut self, endpoint: Arc<Endpoint>) -> (Vec<Action>, bool) {
        let (auto_disabled, active) = (endpoint.auto_disabled, endpoint.is_active);
        self.endpoint = endpoint;
        if auto_disabled {
            (self.disable(), true)
        } else if !active && !self.spilled {
            // Disabled by hand: keep what waits for when it is enabled again.
            (self.spill(), false)
        } else {
            if active {
                self.disabled = false;
            }
            (Vec::new(), false)
        }
    }

    /// The endpoint was deleted: what waits is dropped; attempts in flight may finish (their
    /// outcome is not recorded). Afterwards the state is needed only while `in_flight() > 0`.
    pub fn removed(&mut self) -> Vec<Action> {
        self.removed = true;
        self.take_waiting().into_iter().map(Action::Drop).collect()
    }

    /// Walhook disabled the endpoint: what waits fails, and so will what arrives.
    pub fn disable(&mut self) -> Vec<Action> {
        self.disabled = true;
        self.spilled = false;
        self.blocked.clear();
        self.take_waiting().into_iter().map(Action::FailUnsent).collect()
    }

    /// Moves everything to the outbox: in-flight attempts under the lease, waiting deliveries
    /// due now; the endpoint stays spilled until a probe finds its outbox caught up.
    pub fn spill(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        for flight in self.in_flight.values_mut().filter(|f| !f.leased) {
            flight.leased = true;
            let d = &mut flight.delivery;
            let stored =
                Delivery { id: d.id, endpoint: d.endpoint.clone(), event: d.event.clone(), ticket: d.ticket.take() };
            actions.push(Action::StoreLeased(stored));
        }
        let waiting = self.take_waiting();
        // Rows in flight under the lease may stay in the outbox: their rows are blocked too
        // (blocked rows stay blocked; what waits behind them follows via `spill_one`).
        let flights: Vec<(String, Uuid)> = (self.in_flight.values())
            .filter(|f| !self.blocked.contains_key(&f.delivery.event.entity_key))
            .map(|f| (f.delivery.event.entity_key.clone(), f.delivery.id))
            .collect();
        for (key, delivery) in flights {
            self.block_row(&key, delivery);
        }
        self.spilled = true;
        actions.extend(waiting.into_iter().map(|d| self.spill_one(d)));
        actions
    }

    /// Gives back capacity a burst left in collections that are now sparse.
    pub fn shrink(&mut self, sparse: impl Fn(usize, usize) -> bool) {
        if sparse(self.ready.len(), self.ready.capacity()) {
            self.ready.shrink_to_fit();
        }
        if sparse(self.behind.len(), self.behind.capacity()) {
            self.behind.shrink_to_fit();
        }
        if sparse(self.in_flight.len(), self.in_flight.capacity()) {
            self.in_flight.shrink_to_fit();
        }
        if sparse(self.blocked.len(), self.blocked.capacity()) {
            self.blocked.shrink_to_fit();
        }
    }

    /// Sends `d` to the outbox; while spilled its row is tracked as blocked behind it.
    fn spill_one(&mut self, d: Delivery) -> Action {
        if self.spilled {
            self.block_row(&d.event.entity_key, d.id);
        }
        Action::Spill(d)
    }

    /// Everything waiting, ready ones first; nothing waits afterwards.
    fn take_waiting(&mut self) -> Vec<Delivery> {
        let ready = self.ready.drain(..);
        let waiting: Vec<Delivery> =
            ready.chain(self.behind.drain().flat_map(|(_, q)| q)).map(|w| w.delivery).collect();
        self.waiting = 0;
        self.waiting_bytes = 0;
        waiting
    }

    fn oldest_wait(&self, now: Instant) -> Duration {
        let fronts = self.ready.front().into_iter().chain(self.behind.values().filter_map(|q| q.front()));
        fronts.map(|w| now - w.since).max().unwrap_or_default()
    }

    /// Marks `key` blocked behind outbox delivery `id` (its latest there); past
    /// `MAX_BLOCKED_ROWS` the row is counted as untracked instead.
    fn block_row(&mut self, key: &str, id: Uuid) {
        if let Some(tail) = self.blocked.get_mut(key) {
            *tail = id;
        } else if self.blocked.len() < MAX_BLOCKED_ROWS {
            self.blocked.insert(key.to_owned(), id);
        } else {
            self.untracked_spills += 1;
        }
    }
}

#[cfg(test)]
mod tests;
