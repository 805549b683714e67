//! Dispatch under memory pressure: what waits in memory gives way so the budget frees.
//!
//! What must hold: while anyone waits for memory budget (routing, so the replication stream,
//! or an outbox attempt), every endpoint with payloads waiting is spilled to the outbox, each
//! tick, so those payloads are released once the store has them; dispatch never sits on
//! waiting payloads while routing waits for budget (no deadlock). An endpoint's waiting
//! payloads may take at most a quarter of the budget. Capacity left in idle collections after
//! a burst is given back.

use super::Dispatcher;

/// The share of the budget one endpoint's waiting payloads may take (1/n).
const ENDPOINT_SHARE: u64 = 4;
/// Collections are shrunk only past this capacity (small ones cost nothing to keep).
const KEEP_CAPACITY: usize = 64;

impl Dispatcher {
    /// Payload bytes one endpoint may have waiting before it spills.
    pub(super) fn endpoint_share(&self) -> usize {
        (self.settings.budget.limit() / ENDPOINT_SHARE) as usize
    }

    /// Spills every endpoint with payloads waiting while someone waits for budget. (One at a
    /// time is not enough: the endpoints of one account often wait for the same bodies, which
    /// are released only once none of them holds them.)
    pub(super) async fn relieve_pressure(&mut self) {
        if !self.settings.budget.under_pressure() {
            return;
        }
        let waiting: Vec<(uuid::Uuid, usize)> = (self.endpoints.iter())
            .filter(|(_, s)| !s.spilled() && s.waiting_bytes() > 0)
            .map(|(id, s)| (*id, s.waiting_bytes()))
            .collect();
        if waiting.is_empty() {
            return;
        }
        let bytes: usize = waiting.iter().map(|(_, b)| b).sum();
        tracing::info!(
            endpoints = waiting.len(),
            waiting_bytes = bytes,
            held = self.settings.budget.held(),
            "dispatch.memory_limit reached; spilling the endpoints with payloads waiting to the outbox"
        );
        for (id, _) in waiting {
            self.spill_endpoint(id).await;
        }
    }

    /// Gives back the capacity a burst left in collections that are now (nearly) empty.
    pub(super) fn release_idle_capacity(&mut self) {
        fn sparse(len: usize, capacity: usize) -> bool {
            capacity > KEEP_CAPACITY && len < capacity / 4
        }
        for s in self.endpoints.values_mut() {
            s.shrink(sparse);
        }
        if sparse(self.aborts.len(), self.aborts.capacity()) {
            self.aborts.shrink_to_fit();
        }
        if sparse(self.endpoints.len(), self.endpoints.capacity()) {
            self.endpoints.shrink_to_fit();
        }
    }
}
