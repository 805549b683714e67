//! Each account's share of the memory budget for its attempts: the payload bytes its requests
//! in flight hold, on the fast path and from the outbox alike.
//!
//! What must hold (docs/architecture.md, invariant 16, in bytes): an account's attempts hold at
//! most its share of `dispatch.memory_limit` (at least one payload, whatever its size), so one
//! account's large rows behind endpoints that never answer leave the rest of the budget to
//! routing and to every other account. A body several attempts share (the fast path's fan-out
//! of one event) counts once. Nobody waits in line for a share: a pin is taken or refused at
//! once, and a release wakes whoever waits to try again, so a large request never holds back a
//! smaller one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

/// The bytes each account's attempts hold.
#[derive(Debug)]
pub struct ShareBook {
    /// Bytes one account's attempts may hold (more only for its first payload).
    per_account: u64,
    accounts: Mutex<HashMap<Uuid, Account>>,
    /// Notified whenever bytes are released (shared with the memory budget's charges).
    freed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Account {
    bytes: u64,
    /// Pinned bodies: references and size.
    bodies: HashMap<Uuid, (u32, u64)>,
}

/// One attempt's hold on its body within its account's share; released on drop.
#[derive(Debug)]
pub struct SharePin {
    book: Arc<ShareBook>,
    account: Uuid,
    body: Uuid,
}

impl ShareBook {
    /// A book giving each account `per_account` bytes, telling `freed` about releases.
    pub fn new(per_account: u64, freed: Arc<Notify>) -> Self {
        ShareBook { per_account, accounts: Mutex::new(HashMap::new()), freed }
    }

    /// Pins `bytes` of body `body` (an event's id on the fast path, a delivery's from the
    /// outbox) for `account`, now, or `None` when the account's share has no room for it.
    pub fn try_pin(self: &Arc<Self>, account: Uuid, body: Uuid, bytes: usize) -> Option<SharePin> {
        let mut accounts = self.accounts.lock().expect("shares lock");
        let a = accounts.entry(account).or_default();
        match a.bodies.get_mut(&body) {
            Some((refs, _)) => *refs += 1,
            None => {
                let bytes = bytes as u64;
                if a.bytes > 0 && a.bytes + bytes > self.per_account {
                    return None;
                }
                a.bytes += bytes;
                a.bodies.insert(body, (1, bytes));
            }
        }
        Some(SharePin { book: self.clone(), account, body })
    }

    /// Bytes `account`'s attempts hold now.
    #[cfg(test)]
    fn held_by(&self, account: Uuid) -> u64 {
        self.accounts.lock().expect("shares lock").get(&account).map_or(0, |a| a.bytes)
    }
}

impl Drop for SharePin {
    fn drop(&mut self) {
        let mut accounts = self.book.accounts.lock().expect("shares lock");
        let Some(a) = accounts.get_mut(&self.account) else { return };
        if let Some((refs, bytes)) = a.bodies.get_mut(&self.body) {
            *refs -= 1;
            if *refs == 0 {
                a.bytes -= *bytes;
                a.bodies.remove(&self.body);
            }
        }
        if a.bodies.is_empty() {
            accounts.remove(&self.account);
        }
        drop(accounts);
        self.book.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(per_account: u64) -> Arc<ShareBook> {
        Arc::new(ShareBook::new(per_account, Arc::new(Notify::new())))
    }

    #[test]
    fn an_account_holds_at_most_its_share_but_always_one_body() {
        let b = book(100);
        let (a, other) = (Uuid::new_v4(), Uuid::new_v4());
        let big = b.try_pin(a, Uuid::new_v4(), 500).expect("the first body fits whatever its size");
        assert!(b.try_pin(a, Uuid::new_v4(), 1).is_none(), "nothing more while it holds more than its share");
        let theirs = b.try_pin(other, Uuid::new_v4(), 60).expect("another account has its own share");
        let more = b.try_pin(other, Uuid::new_v4(), 40).expect("up to its share");
        assert!(b.try_pin(other, Uuid::new_v4(), 1).is_none());
        drop(big);
        assert_eq!(b.held_by(a), 0);
        assert!(b.try_pin(a, Uuid::new_v4(), 100).is_some());
        drop((theirs, more));
    }

    #[test]
    fn a_body_shared_by_several_attempts_counts_once() {
        let b = book(100);
        let (a, event) = (Uuid::new_v4(), Uuid::new_v4());
        let pins: Vec<SharePin> = (0..40).map(|_| b.try_pin(a, event, 80).expect("the same body")).collect();
        assert_eq!(b.held_by(a), 80);
        assert!(b.try_pin(a, Uuid::new_v4(), 30).is_none());
        drop(pins);
        assert_eq!(b.held_by(a), 0);
    }
}
