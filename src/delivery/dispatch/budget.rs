//! The memory budget: event payload bytes held in memory, bounded by `dispatch.memory_limit`.
//!
//! What must hold:
//! - A payload is charged before walhook holds it for dispatch (routing charges each event's
//!   body before handing it on; an outbox attempt charges its body before reading it), and the
//!   charge is released when the last copy of the body is dropped: delivered and recorded,
//!   stored in the outbox and the store batch dropped, or the attempt finished. The charge
//!   travels inside the body's `Bytes`, so no copy outlives it unnoticed.
//! - Routing's charge waits while the budget is spent: backpressure reaches the replication
//!   stream (the WAL waits in the slot), not memory. It is the only waiter in line.
//! - An attempt (from the outbox) takes its body's bytes within its account's share
//!   ([`shares`](super::shares)) and the budget only when both have room *now*, trying again
//!   when something is released, until its deadline: it never waits in line, so it never holds
//!   back routing or a smaller request of another account (invariant 16, in bytes).
//! - A payload larger than the whole budget is charged the whole budget: it waits until
//!   everything else is released and then is held alone. It never waits forever.
//! - Someone waiting for budget is *pressure*: dispatch then spills waiting deliveries to the
//!   outbox so their payloads are released (see `Dispatcher::relieve_pressure`).
//! - The gauge shows the bytes charged (accounting is in KiB, rounded up, so the bytes held
//!   never exceed the limit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::shares::{ShareBook, SharePin};

/// The share of the budget one account's attempts may hold (1/n).
const ACCOUNT_SHARE: u64 = 4;

/// Payload bytes walhook may hold in memory, shared by routing, dispatch and the outbox.
#[derive(Debug)]
pub struct MemoryBudget {
    /// One permit per KiB.
    kib: Arc<Semaphore>,
    limit_kib: usize,
    limit: u64,
    /// Callers waiting in [`MemoryBudget::reserve`] or [`MemoryBudget::reserve_for_attempt`].
    waiting: AtomicUsize,
    gauge: IntGauge,
    /// Notified whenever a charge or a share pin is released.
    freed: Arc<Notify>,
    /// Each account's attempts' bytes.
    shares: Arc<ShareBook>,
}

/// A share of the budget; released on drop.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    gauge: IntGauge,
    freed: Arc<Notify>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes as i64);
        // (The permit is released after this body runs; a woken waiter that finds no room yet
        // is woken again by the next release, or tries again at its deadline.)
        self.freed.notify_waiters();
    }
}

/// A body and its charge: the owner of a charged `Bytes`.
struct Charged {
    body: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes (at least 1 KiB) reported on `gauge`.
    pub fn new(limit: u64, gauge: IntGauge) -> Self {
        let limit_kib = (limit / 1024).max(1) as usize;
        let freed = Arc::new(Notify::new());
        let limit = limit_kib as u64 * 1024;
        MemoryBudget {
            kib: Arc::new(Semaphore::new(limit_kib)),
            limit_kib,
            limit,
            waiting: AtomicUsize::new(0),
            gauge,
            shares: Arc::new(ShareBook::new(limit / ACCOUNT_SHARE, freed.clone())),
            freed,
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now (in whole KiB).
    pub fn held(&self) -> u64 {
        (self.limit_kib - self.kib.available_permits()) as u64 * 1024
    }

    /// Whether someone waits for budget.
    pub fn under_pressure(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    fn permits(&self, bytes: usize) -> u32 {
        bytes.div_ceil(1024).min(self.limit_kib) as u32
    }

    fn charge(&self, permit: OwnedSemaphorePermit, bytes: usize) -> Charge {
        let bytes = (bytes as u64).min(self.limit);
        self.gauge.add(bytes as i64);
        Charge { _permit: permit, bytes, gauge: self.gauge.clone(), freed: self.freed.clone() }
    }

    /// Pins body `body` (`bytes` long) within `account`'s share for an attempt now, or `None`
    /// when the share has no room (the body's bytes are charged elsewhere: routing's charge on
    /// the fast path).
    pub fn try_pin(&self, account: Uuid, body: Uuid, bytes: usize) -> Option<SharePin> {
        self.shares.try_pin(account, body, bytes)
    }

    /// For an outbox attempt of `account`: body `body`'s `bytes`, pinned within the account's
    /// share and charged to the budget, once both have room; never in line (see the module's
    /// documentation). `None` when `give_up` resolves first.
    pub async fn reserve_for_attempt(
        &self,
        account: Uuid,
        body: Uuid,
        bytes: usize,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Option<(SharePin, Charge)> {
        tokio::pin!(give_up);
        let mut counted = None;
        // Once pinned, the pin is kept while the budget has no room: it holds back only this
        // account's other attempts, and giving it back would wake this very waiter again.
        let mut pin = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if pin.is_none() {
                pin = self.shares.try_pin(account, body, bytes);
            }
            if pin.is_some() {
                if let Some(charge) = self.try_reserve(bytes) {
                    return pin.map(|pin| (pin, charge));
                }
            }
            // Waiting for bytes is pressure: dispatch spills what waits in memory.
            if counted.is_none() {
                self.waiting.fetch_add(1, Ordering::AcqRel);
                counted = Some(Waiting(&self.waiting));
            }
            tokio::select! {
                biased;
                () = &mut give_up => return None,
                () = freed => {}
            }
        }
    }

    /// A charge of `bytes` now, or `None` when the budget does not have it.
    pub fn try_reserve(&self, bytes: usize) -> Option<Charge> {
        let permit = self.kib.clone().try_acquire_many_owned(self.permits(bytes)).ok()?;
        Some(self.charge(permit, bytes))
    }

    /// A charge of `bytes`, waiting in line until the budget has it (routing's charge: the
    /// only one that waits in line).
    pub async fn reserve(&self, bytes: usize) -> Charge {
        if let Some(c) = self.try_reserve(bytes) {
            return c;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        let permit = self.kib.clone().acquire_many_owned(self.permits(bytes)).await;
        self.charge(permit.expect("the budget's semaphore is never closed"), bytes)
    }

    /// `body`, now carrying `charge`: the charge is released when the last copy is dropped.
    pub fn attach(body: Bytes, charge: Charge) -> Bytes {
        Bytes::from_owner(Charged { body, _charge: charge })
    }

    /// `body` charged now, or `body` back when the budget does not have it.
    pub fn try_charge(&self, body: Bytes) -> Result<Bytes, Bytes> {
        match self.try_reserve(body.len()) {
            Some(charge) => Ok(Self::attach(body, charge)),
            None => Err(body),
        }
    }

    /// `body` charged, waiting until the budget has it.
    pub async fn charge_body(&self, body: Bytes) -> Bytes {
        let charge = self.reserve(body.len()).await;
        Self::attach(body, charge)
    }
}

/// Counts a waiter for as long as it waits (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(kib: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(kib * 1024, IntGauge::new("g", "g").unwrap()))
    }

    fn body(kib: usize) -> Bytes {
        Bytes::from(vec![7u8; kib * 1024])
    }

    #[test]
    fn the_charge_is_released_when_the_last_copy_is_dropped() {
        let b = budget(100);
        let charged = b.try_charge(body(30)).unwrap();
        let copy = charged.clone();
        let slice = charged.slice(10..20);
        assert_eq!((b.held(), b.gauge.get()), (30 * 1024, 30 * 1024));
        assert_eq!(&charged[..], &body(30)[..], "the bytes are the body's");
        drop(charged);
        drop(copy);
        assert_eq!(b.held(), 30 * 1024, "a slice still holds the payload");
        drop(slice);
        assert_eq!((b.held(), b.gauge.get()), (0, 0));
    }

    #[test]
    fn charging_past_the_limit_is_refused_and_bytes_round_up_to_kib() {
        let b = budget(10);
        let held = b.try_charge(Bytes::from(vec![0u8; 9 * 1024 + 1])).unwrap();
        assert_eq!(b.held(), 10 * 1024, "9 KiB and a byte take 10 KiB");
        assert!(b.try_charge(Bytes::from_static(b"x")).is_err());
        drop(held);
        assert!(b.try_charge(Bytes::from_static(b"x")).is_ok());
    }

    #[tokio::test]
    async fn an_oversize_payload_takes_the_whole_budget_once_the_rest_is_released() {
        let b = budget(64);
        let small = b.try_charge(body(16)).unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.charge_body(body(200)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "it waits while anything else is held");
        assert!(b.under_pressure());
        drop(small);
        let big = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("never waits forever").unwrap();
        assert_eq!(big.len(), 200 * 1024);
        assert_eq!(b.held(), 64 * 1024, "it holds the whole budget");
        assert_eq!(b.gauge.get(), 64 * 1024, "the gauge never shows more than the limit");
        assert!(!b.under_pressure());
        assert!(b.try_charge(Bytes::from_static(b"x")).is_err());
        drop(big);
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn waiters_are_woken_in_order_as_charges_are_released() {
        let b = budget(8);
        let first = b.try_charge(body(8)).unwrap();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let b = b.clone();
            waiters.push(tokio::spawn(async move {
                let held = b.charge_body(body(8)).await;
                (i, held)
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        for (expected, w) in waiters.into_iter().enumerate() {
            let (i, held) = tokio::time::timeout(Duration::from_secs(5), w).await.expect("no deadlock").unwrap();
            assert_eq!(i, expected);
            drop(held);
        }
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn an_attempt_waiting_for_a_large_body_holds_back_no_smaller_one_of_another_account() {
        let b = budget(64);
        let held = b.try_charge(body(40)).unwrap();
        let (a, other) = (Uuid::new_v4(), Uuid::new_v4());
        let large = {
            let b = b.clone();
            tokio::spawn(
                async move { b.reserve_for_attempt(a, Uuid::new_v4(), 40 * 1024, std::future::pending()).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!large.is_finished(), "no room for it yet");
        assert!(b.under_pressure(), "an attempt waiting for bytes is pressure");
        let small = tokio::time::timeout(
            Duration::from_secs(1),
            b.reserve_for_attempt(other, Uuid::new_v4(), 8 * 1024, std::future::pending()),
        )
        .await
        .expect("a smaller one of another account is not held back")
        .expect("not given up");
        drop(small);
        drop(held);
        let (pin, charge) = tokio::time::timeout(Duration::from_secs(5), large).await.unwrap().unwrap().unwrap();
        assert_eq!(b.held(), 40 * 1024);
        drop((pin, charge));
        let gave_up = b.reserve_for_attempt(a, Uuid::new_v4(), 1, std::future::ready(())).await;
        assert!(gave_up.is_some(), "room now: taken at once, before giving up");
        drop(gave_up);
        let _full = b.try_charge(body(64)).unwrap();
        let gave_up = b.reserve_for_attempt(a, Uuid::new_v4(), 1024, std::future::ready(())).await;
        assert!(gave_up.is_none(), "no room: gives up when told");
        assert!(!b.under_pressure());
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_no_longer_pressure() {
        let b = budget(4);
        let _held = b.try_charge(body(4)).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(20), b.reserve(1024)).await;
        assert!(r.is_err());
        assert!(!b.under_pressure());
    }
}
