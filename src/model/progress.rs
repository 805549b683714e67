//! Which LSN the slot may confirm.
//!
//! What must hold (docs/architecture.md, invariant 1): the confirmed LSN moves past a transaction only once every
//! delivery it produced is settled (delivered and recorded, or committed in the outbox), and
//! only once every earlier transaction is settled too. A ticket settles one delivery; a
//! ticket dropped without `settle` never lets its transaction be confirmed, so a bug or a
//! crash errs towards replay, never towards loss.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
struct TxState {
    /// Unsettled deliveries, plus one while the transaction is still being read.
    remaining: AtomicUsize,
    /// End LSN of the commit; 0 until the commit is seen.
    end_lsn: AtomicU64,
    /// A ticket of it was dropped unsettled: it can never be confirmed in this session.
    abandoned: AtomicBool,
}

/// A claim on one delivery of a transaction; `settle` it once the delivery is durable.
#[derive(Debug)]
pub struct Ticket {
    tx: Arc<TxState>,
    notify: Arc<Notify>,
    settled: bool,
}

impl Ticket {
    /// Marks the delivery durable (recorded as delivered, or stored in the outbox).
    pub fn settle(mut self) {
        self.settled = true;
        if self.tx.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_one();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.tx.abandoned.store(true, Ordering::Release);
            self.notify.notify_one();
        }
    }
}

/// One transaction's progress seen from outside: a backfill chunk is done once every delivery
/// it produced is durable, whatever happens to the transactions around it.
#[derive(Debug, Clone)]
pub struct TxWatch(Arc<TxState>);

impl TxWatch {
    /// Committed, and every delivery settled.
    pub fn settled(&self) -> bool {
        self.0.end_lsn.load(Ordering::Acquire) != 0 && self.0.remaining.load(Ordering::Acquire) == 0
    }

    /// A delivery of it was dropped unsettled, or the stream broke while it was open: it
    /// will never settle.
    pub fn abandoned(&self) -> bool {
        self.0.abandoned.load(Ordering::Acquire)
    }
}

/// Transactions read from the stream and not yet confirmed, oldest first.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Arc<TxState>>,
    open: Option<Arc<TxState>>,
    notify: Arc<Notify>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transaction begins.
    pub fn begin(&mut self) {
        let tx = Arc::new(TxState {
            remaining: AtomicUsize::new(1),
            end_lsn: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
        });
        self.queue.push_back(tx.clone());
        self.open = Some(tx);
    }

    /// A ticket for one more delivery of the open transaction.
    pub fn ticket(&self) -> Option<Ticket> {
        let tx = self.open.as_ref()?;
        tx.remaining.fetch_add(1, Ordering::AcqRel);
        Some(Ticket { tx: tx.clone(), notify: self.notify.clone(), settled: false })
    }

    /// The open transaction committed; it ends at `end_lsn`.
    pub fn commit(&mut self, end_lsn: u64) {
        if let Some(tx) = self.open.take() {
            tx.end_lsn.store(end_lsn, Ordering::Release);
            Ticket { tx, notify: self.notify.clone(), settled: false }.settle();
        }
    }

    /// The stream broke inside a transaction: forget it (it will be replayed whole; a
    /// [`TxWatch`] of it reports it abandoned).
    pub fn abandon_open(&mut self) {
        if let Some(open) = self.open.take() {
            open.abandoned.store(true, Ordering::Release);
            self.queue.retain(|tx| !Arc::ptr_eq(tx, &open));
        }
    }

    /// A watch on the open transaction (a backfill chunk's, to learn when it is durable).
    pub fn watch_open(&self) -> Option<TxWatch> {
        self.open.clone().map(TxWatch)
    }

    /// Whether a transaction is being read.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Whether nothing read is unsettled (so a keepalive's position may be confirmed).
    pub fn is_settled(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether nothing more can be confirmed: the oldest unconfirmed transaction lost a
    /// ticket unsettled (its delivery was set aside or dropped), so waiting for it is useless.
    pub fn stuck(&self) -> bool {
        self.queue.front().is_some_and(|tx| tx.abandoned.load(Ordering::Acquire))
    }

    /// Pops settled transactions from the front; the end LSN of the last one popped.
    pub fn confirmable(&mut self) -> Option<u64> {
        let mut lsn = None;
        while let Some(front) = self.queue.front() {
            let end = front.end_lsn.load(Ordering::Acquire);
            if end == 0 || front.remaining.load(Ordering::Acquire) != 0 {
                break;
            }
            lsn = Some(end);
            self.queue.pop_front();
        }
        lsn
    }

    /// Resolves when some ticket may have completed a transaction.
    pub fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_transaction_never_confirms_past_an_unsettled_earlier_one() {
        let mut t = Tracker::new();
        t.begin();
        let a = t.ticket().unwrap();
        t.commit(100);
        t.begin();
        let b = t.ticket().unwrap();
        t.commit(200);
        b.settle();
        assert_eq!(t.confirmable(), None);
        a.settle();
        assert_eq!(t.confirmable(), Some(200));
        assert!(t.is_settled());
    }

    #[test]
    fn an_open_transaction_is_not_confirmable_and_a_dropped_ticket_holds_it() {
        let mut t = Tracker::new();
        t.begin();
        let a = t.ticket().unwrap();
        a.settle();
        assert_eq!(t.confirmable(), None, "not committed yet");
        t.commit(50);
        assert_eq!(t.confirmable(), Some(50));
        t.begin();
        assert!(!t.stuck());
        drop(t.ticket().unwrap());
        t.commit(60);
        assert_eq!(t.confirmable(), None);
        assert!(t.stuck(), "a dropped ticket: nothing more can be confirmed, so nobody waits for it");
    }

    #[test]
    fn a_watch_sees_its_transaction_settle_or_be_abandoned() {
        let mut t = Tracker::new();
        t.begin();
        let w = t.watch_open().unwrap();
        let a = t.ticket().unwrap();
        t.commit(70);
        assert!(!w.settled());
        a.settle();
        assert!(w.settled() && !w.abandoned());
        t.begin();
        let w = t.watch_open().unwrap();
        let _b = t.ticket().unwrap();
        t.abandon_open();
        assert!(w.abandoned() && !w.settled());
        t.begin();
        let w = t.watch_open().unwrap();
        drop(t.ticket().unwrap());
        t.commit(90);
        assert!(w.abandoned() && !w.settled());
    }
}
