//! Concurrency limits shared by the fast path and the outbox workers: a global cap on
//! requests in flight, a cap per endpoint, and a cap per account (its fair share).
//!
//! What must hold: a permit is held for the whole attempt and released on drop; releasing
//! one wakes the fast path so waiting deliveries start without polling; an endpoint that
//! hangs can hold at most its own cap of the global permits, and an account whose endpoints
//! all hang at most the account cap, so other accounts keep the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// The right to make one request to one endpoint.
#[derive(Debug)]
pub struct Permit {
    _global: OwnedSemaphorePermit,
    _account: OwnedSemaphorePermit,
    _endpoint: OwnedSemaphorePermit,
    released: Arc<Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.released.notify_one();
    }
}

/// The semaphores one endpoint's requests take besides the global one: its own and its
/// account's.
#[derive(Debug, Clone)]
pub struct Gate {
    endpoint: Arc<Semaphore>,
    account: Arc<Semaphore>,
}

/// Global, per-account and per-endpoint request limits.
#[derive(Debug)]
pub struct Limits {
    global: Arc<Semaphore>,
    per_endpoint: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
    per_account: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
    endpoint_limit: usize,
    account_limit: usize,
    released: Arc<Notify>,
}

impl Limits {
    /// `global` requests in flight in all, `per_account` to one account's endpoints,
    /// `per_endpoint` to one endpoint.
    pub fn new(global: usize, per_endpoint: usize, per_account: usize) -> Self {
        Limits {
            global: Arc::new(Semaphore::new(global)),
            per_endpoint: Mutex::new(HashMap::new()),
            per_account: Mutex::new(HashMap::new()),
            endpoint_limit: per_endpoint,
            account_limit: per_account,
            released: Arc::new(Notify::new()),
        }
    }

    fn semaphore(map: &Mutex<HashMap<Uuid, Arc<Semaphore>>>, id: Uuid, limit: usize) -> Arc<Semaphore> {
        let mut map = map.lock().expect("limits lock");
        map.entry(id).or_insert_with(|| Arc::new(Semaphore::new(limit))).clone()
    }

    /// The semaphores of `endpoint` (of `account`), for callers that keep them.
    pub fn gate(&self, endpoint: Uuid, account: Uuid) -> Gate {
        Gate {
            endpoint: Self::semaphore(&self.per_endpoint, endpoint, self.endpoint_limit),
            account: Self::semaphore(&self.per_account, account, self.account_limit),
        }
    }

    /// A permit now through `gate` (from [`Limits::gate`]), or `None` when any limit is
    /// reached.
    pub fn try_acquire(&self, gate: &Gate) -> Option<Permit> {
        let endpoint = gate.endpoint.clone().try_acquire_owned().ok()?;
        let account = gate.account.clone().try_acquire_owned().ok()?;
        let global = self.global.clone().try_acquire_owned().ok()?;
        Some(Permit { _global: global, _account: account, _endpoint: endpoint, released: self.released.clone() })
    }

    /// A permit for `endpoint` of `account`, waiting for one.
    pub async fn acquire(&self, endpoint: Uuid, account: Uuid) -> Permit {
        let gate = self.gate(endpoint, account);
        let endpoint = gate.endpoint.acquire_owned().await.expect("semaphore never closed");
        let account = gate.account.acquire_owned().await.expect("semaphore never closed");
        let global = self.global.clone().acquire_owned().await.expect("semaphore never closed");
        Permit { _global: global, _account: account, _endpoint: endpoint, released: self.released.clone() }
    }

    /// Global permits free right now.
    pub fn global_available(&self) -> usize {
        self.global.available_permits()
    }

    /// The per-endpoint cap.
    pub fn endpoint_limit(&self) -> usize {
        self.endpoint_limit
    }

    /// Signalled whenever a permit is released.
    pub fn released(&self) -> Arc<Notify> {
        self.released.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_account_takes_at_most_its_share() {
        let limits = Limits::new(4, 2, 2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let gates: Vec<Gate> = (0..3).map(|_| limits.gate(Uuid::new_v4(), a)).collect();
        let held: Vec<Permit> = gates.iter().filter_map(|g| limits.try_acquire(g)).collect();
        assert_eq!(held.len(), 2, "account a is capped at 2 across its endpoints");
        assert!(limits.try_acquire(&gates[2]).is_none());
        let other = limits.gate(Uuid::new_v4(), b);
        let theirs = limits.try_acquire(&other).expect("account b still gets a permit");
        assert_eq!(limits.global_available(), 1);
        drop(held);
        assert!(limits.try_acquire(&gates[2]).is_some(), "released permits return to the account");
        drop(theirs);
    }

    #[tokio::test]
    async fn a_refused_try_keeps_no_permit() {
        let limits = Limits::new(1, 1, 1);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = limits.try_acquire(&limits.gate(Uuid::new_v4(), a)).unwrap();
        // b's endpoint and account permits are taken and given back when the global one fails.
        let gate_b = limits.gate(Uuid::new_v4(), b);
        assert!(limits.try_acquire(&gate_b).is_none());
        drop(first);
        assert!(limits.try_acquire(&gate_b).is_some());
        let _ = limits.acquire(Uuid::new_v4(), a).await;
    }
}
