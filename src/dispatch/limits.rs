//! Concurrency limits shared by the fast path and the outbox workers: a global cap on
//! requests in flight and a cap per endpoint.
//!
//! What must hold: a permit is held for the whole attempt and released on drop; releasing
//! one wakes the fast path so waiting deliveries start without polling; an endpoint that
//! hangs can hold at most its own cap of the global permits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// The right to make one request to one endpoint.
#[derive(Debug)]
pub struct Permit {
    _global: OwnedSemaphorePermit,
    _endpoint: OwnedSemaphorePermit,
    released: Arc<Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.released.notify_one();
    }
}

/// Global and per-endpoint request limits.
#[derive(Debug)]
pub struct Limits {
    global: Arc<Semaphore>,
    per_endpoint: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
    endpoint_limit: usize,
    released: Arc<Notify>,
}

impl Limits {
    /// `global` requests in flight in all, `per_endpoint` to one endpoint.
    pub fn new(global: usize, per_endpoint: usize) -> Self {
        Limits {
            global: Arc::new(Semaphore::new(global)),
            per_endpoint: Mutex::new(HashMap::new()),
            endpoint_limit: per_endpoint,
            released: Arc::new(Notify::new()),
        }
    }

    fn endpoint(&self, id: Uuid) -> Arc<Semaphore> {
        let mut map = self.per_endpoint.lock().expect("limits lock");
        map.entry(id).or_insert_with(|| Arc::new(Semaphore::new(self.endpoint_limit))).clone()
    }

    /// The per-endpoint semaphore of `endpoint`, for callers that keep it.
    pub fn gate(&self, endpoint: Uuid) -> Arc<Semaphore> {
        self.endpoint(endpoint)
    }

    /// A permit now through `gate` (from [`Limits::gate`]), or `None` when either limit is
    /// reached.
    pub fn try_acquire(&self, gate: &Arc<Semaphore>) -> Option<Permit> {
        let ep = gate.clone().try_acquire_owned().ok()?;
        let global = self.global.clone().try_acquire_owned().ok()?;
        Some(Permit { _global: global, _endpoint: ep, released: self.released.clone() })
    }

    /// A permit, waiting for one.
    pub async fn acquire(&self, endpoint: Uuid) -> Permit {
        let ep = self.endpoint(endpoint).acquire_owned().await.expect("semaphore never closed");
        let global = self.global.clone().acquire_owned().await.expect("semaphore never closed");
        Permit { _global: global, _endpoint: ep, released: self.released.clone() }
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
