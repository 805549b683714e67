//! Lining a backfill chunk up with the stream (docs/architecture.md, invariant 9: never older
//! than the stream). The runner writes a low watermark into the WAL, reads the chunk, writes a
//! high watermark; the stream reads both in WAL order, with the transactions committed between
//! them. This module is the stream's side, with no I/O.
//!
//! What must hold:
//! - A row the stream sent the chunk's endpoint between the watermarks is dropped from the
//!   chunk: its change (at or after the read) arrives in the stream instead. Every other row
//!   of the chunk is what the stream last said of it, so it is handed on at the high watermark,
//!   behind everything before it and ahead of everything after it.
//! - A transaction the read could not see but that had committed when the runner checked
//!   (`committed_unseen`: one waiting for a synchronous standby, say) must not be one the
//!   stream read before the low watermark: that would make the chunk older than the stream, so
//!   the chunk is read again. (One read between the watermarks is covered by the window; one
//!   the stream never shows, touching no published table, cannot make a row stale.) The
//!   stream remembers the last [`RECENT_XIDS`] transactions it read for this check.
//! - A row the stream sent without its whole image between the watermarks (columns
//!   `omitted`, under a replica identity other than FULL) can be neither dropped nor sent as
//!   read: the chunk is read again.
//! - A high watermark without its low one (the session reconnected between them, or a replay
//!   found the low one already confirmed) is never lined up: the chunk is read again.
//! - Windows belong to one session: a new session starts with none.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::model::event::Table;
use crate::model::progress::TxWatch;

/// Prefix of the low watermark's logical message; its content is the chunk's token.
pub const LOW: &str = "walhook.backfill.low";
/// Prefix of the high watermark's logical message; its content is the chunk's token.
pub const HIGH: &str = "walhook.backfill.high";

/// Transactions the stream remembers having read (for `committed_unseen`).
pub const RECENT_XIDS: usize = 1 << 16;

/// What the stream must watch between a chunk's watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    /// The table being read.
    pub table: Table,
    /// The endpoint the chunk goes to.
    pub endpoint_id: Uuid,
}

/// One row of a chunk, as read.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    /// `table:id`.
    pub entity_key: String,
    /// The webhook body (`<entity>.backfilled`).
    pub body: Bytes,
}

/// A chunk read by the runner, waiting for its high watermark.
#[derive(Debug)]
pub struct Chunk {
    /// Names its watermarks.
    pub token: Uuid,
    /// The backfill it belongs to (its rows' event ids derive from it).
    pub backfill_id: Uuid,
    /// Where it goes.
    pub intent: Intent,
    /// The account whose rows it holds.
    pub account_id: Uuid,
    /// The rows, in key order.
    pub rows: Vec<ChunkRow>,
    /// When it was read (microseconds since the Unix epoch).
    pub read_at_us: i64,
    /// Transactions the read could not see that had committed when checked (32-bit xids, as
    /// the stream names them).
    pub committed_unseen: Vec<u32>,
    /// Where the stream answers.
    pub reply: oneshot::Sender<Lined>,
}

/// The stream's answer for a chunk.
#[derive(Debug)]
pub enum Lined {
    /// Handed to dispatch at the high watermark: how many rows, and a watch that settles once
    /// each is delivered or stored.
    Sent {
        /// Rows handed on (the chunk's rows less those the stream changed).
        rows: usize,
        /// Settles with the last of them.
        watch: TxWatch,
    },
    /// Cannot be lined up; read it again.
    Retry(&'static str),
    /// The endpoint cannot receive it (deleted, disabled or unroutable); the backfill fails.
    EndpointGone,
    /// The endpoint no longer subscribes to any event of the table: nothing of it was sent,
    /// and the backfill moves on to its next table.
    Unsubscribed,
}

/// Chunks between the runner and the stream, by token.
#[derive(Debug, Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
}

#[derive(Debug, Default)]
struct HubInner {
    intents: HashMap<Uuid, Intent>,
    ready: HashMap<Uuid, Chunk>,
}

impl Hub {
    /// Before the low watermark is written: what the stream must watch for `token`.
    pub fn intend(&self, token: Uuid, intent: Intent) {
        self.lock().intents.insert(token, intent);
    }

    /// Before the high watermark is written: the chunk read.
    pub fn ready(&self, chunk: Chunk) {
        self.lock().ready.insert(chunk.token, chunk);
    }

    /// The runner gives up on `token`; whether the chunk was still waiting (`false`: the
    /// stream took it and answers).
    pub fn forget(&self, token: Uuid) -> bool {
        let mut inner = self.lock();
        inner.intents.remove(&token);
        inner.ready.remove(&token).is_some()
    }

    /// The stream read `token`'s low watermark.
    fn intent(&self, token: Uuid) -> Option<Intent> {
        self.lock().intents.get(&token).copied()
    }

    fn has_intent(&self, token: Uuid) -> bool {
        self.lock().intents.contains_key(&token)
    }

    /// The stream read `token`'s high watermark.
    fn take(&self, token: Uuid) -> Option<Chunk> {
        let mut inner = self.lock();
        inner.intents.remove(&token);
        inner.ready.remove(&token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Window {
    token: Uuid,
    intent: Intent,
    /// Rows of the table the stream sent the endpoint since the low watermark.
    changed: HashSet<String>,
    /// Of those, rows sent without their whole image (columns `omitted`: an update leaving a
    /// large value unchanged under a replica identity other than FULL).
    partial: HashSet<String>,
    /// Transactions read since the low watermark.
    xids: HashSet<u32>,
}

/// The windows of a session, and the transactions the stream read lately.
#[derive(Debug, Default)]
pub struct Windows {
    open: Vec<Window>,
    /// The last [`RECENT_XIDS`] transactions read, oldest first (kept across sessions).
    recent: VecDeque<u32>,
}

/// What to do at a high watermark.
#[derive(Debug)]
pub enum AtHigh {
    /// Not walhook's chunk of this process (another process's, or one given up): nothing.
    Unknown,
    /// Hand these rows of the chunk on (the others changed in the window), then reply.
    Send(Chunk),
    /// Tell the runner to read it again.
    Retry(Chunk, &'static str),
}

impl Windows {
    /// Whether any window is open (the stream has rows to watch).
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// A logical message `prefix`/`content` was read: opens or closes a window.
    pub fn message(&mut self, hub: &Hub, prefix: &str, content: &[u8]) -> Option<AtHigh> {
        let token = std::str::from_utf8(content).ok().and_then(|t| Uuid::parse_str(t).ok())?;
        match prefix {
            LOW => {
                if let Some(intent) = hub.intent(token) {
                    self.open.retain(|w| w.token != token);
                    let (changed, partial, xids) = (HashSet::new(), HashSet::new(), HashSet::new());
                    self.open.push(Window { token, intent, changed, partial, xids });
                }
                None
            }
            HIGH => Some(self.close(hub, token)),
            _ => None,
        }
    }

    /// A new session: no window is open (one opened before never closes: its chunk is read
    /// again); the transactions read lately are still remembered.
    pub fn new_session(&mut self) {
        self.open.clear();
    }

    /// A transaction `xid` begins in the stream. Windows of chunks the runner gave up on
    /// close here, so none grows for ever.
    pub fn transaction(&mut self, hub: &Hub, xid: u32) {
        if self.recent.len() == RECENT_XIDS {
            self.recent.pop_front();
        }
        self.recent.push_back(xid);
        if self.open.is_empty() {
            return;
        }
        self.open.retain(|w| hub.has_intent(w.token));
        for w in &mut self.open {
            w.xids.insert(xid);
        }
    }

    /// The stream sends row `entity_key` of `table` to `endpoints`, `whole` or with columns
    /// left out (a delete is whole: the row is gone).
    pub fn routed(
        &mut self,
        (table, entity_key, whole): (Table, &str, bool),
        endpoints: impl Iterator<Item = Uuid> + Clone,
    ) {
        for w in &mut self.open {
            if w.intent.table == table && endpoints.clone().any(|e| e == w.intent.endpoint_id) {
                w.changed.insert(entity_key.to_owned());
                if !whole {
                    w.partial.insert(entity_key.to_owned());
                }
            }
        }
    }

    fn close(&mut self, hub: &Hub, token: Uuid) -> AtHigh {
        let window = self.open.iter().position(|w| w.token == token).map(|i| self.open.swap_remove(i));
        let Some(mut chunk) = hub.take(token) else { return AtHigh::Unknown };
        let Some(window) = window else {
            return AtHigh::Retry(chunk, "the stream did not read the chunk's low watermark in this session");
        };
        let read_before = |x: &u32| !window.xids.contains(x) && self.recent.contains(x);
        if chunk.committed_unseen.iter().any(read_before) {
            return AtHigh::Retry(
                chunk,
                "a transaction committed before the low watermark was not yet visible to the read",
            );
        }
        // A row whose change came without its whole image cannot be dropped (the receiver
        // would never get the columns left out) nor sent as read (older than that change).
        if chunk.rows.iter().any(|r| window.partial.contains(&r.entity_key)) {
            return AtHigh::Retry(chunk, "a row changed between the watermarks without its whole image");
        }
        chunk.rows.retain(|r| !window.changed.contains(&r.entity_key));
        AtHigh::Send(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(hub: &Hub, token: Uuid, endpoint: Uuid, keys: &[&str], unseen: Vec<u32>) -> oneshot::Receiver<Lined> {
        let (reply, rx) = oneshot::channel();
        hub.ready(Chunk {
            token,
            backfill_id: Uuid::nil(),
            intent: Intent { table: Table::Contacts, endpoint_id: endpoint },
            account_id: Uuid::nil(),
            rows: keys.iter().map(|k| ChunkRow { entity_key: (*k).into(), body: Bytes::new() }).collect(),
            read_at_us: 0,
            committed_unseen: unseen,
            reply,
        });
        rx
    }

    fn keys(c: &Chunk) -> Vec<&str> {
        c.rows.iter().map(|r| r.entity_key.as_str()).collect()
    }

    #[test]
    fn rows_the_stream_sent_the_endpoint_between_the_watermarks_are_dropped() {
        let (hub, mut w) = (Hub::default(), Windows::default());
        let (token, ep, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t = token.to_string();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        // Before the low watermark: not the window's business.
        w.routed((Table::Contacts, "contacts:1", true), [ep].into_iter());
        assert!(w.message(&hub, LOW, t.as_bytes()).is_none());
        w.transaction(&hub, 7);
        w.routed((Table::Contacts, "contacts:2", true), [other, ep].into_iter());
        w.routed((Table::Contacts, "contacts:3", false), [other].into_iter()); // another endpoint's
        w.routed((Table::Companies, "contacts:4", false), [ep].into_iter()); // another table
        let _rx = chunk(&hub, token, ep, &["contacts:1", "contacts:2", "contacts:3", "contacts:4"], vec![7]);
        match w.message(&hub, HIGH, t.as_bytes()) {
            Some(AtHigh::Send(c)) => assert_eq!(keys(&c), ["contacts:1", "contacts:3", "contacts:4"]),
            other => panic!("{other:?}"),
        }
        assert!(w.is_empty());
    }

    #[test]
    fn a_chunk_that_cannot_be_lined_up_is_read_again() {
        let (hub, mut w) = (Hub::default(), Windows::default());
        let ep = Uuid::new_v4();
        // A high watermark without its low one (a reconnect between them).
        let token = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        let _rx = chunk(&hub, token, ep, &["contacts:1"], vec![]);
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Retry(..))));
        // A transaction the read could not see, read by the stream before the low watermark.
        let token = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        w.transaction(&hub, 5);
        w.message(&hub, LOW, token.to_string().as_bytes());
        w.transaction(&hub, 8);
        let _rx = chunk(&hub, token, ep, &["contacts:1"], vec![8, 5]);
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Retry(..))));
        // Ones read between the watermarks, or never shown (no published table), are fine.
        let token = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        w.message(&hub, LOW, token.to_string().as_bytes());
        w.transaction(&hub, 9);
        let _rx = chunk(&hub, token, ep, &["contacts:1"], vec![9, 12]);
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Send(..))));
        // A row of the chunk sent without its whole image meanwhile.
        let token = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        w.message(&hub, LOW, token.to_string().as_bytes());
        w.routed((Table::Contacts, "contacts:1", false), [ep].into_iter());
        let _rx = chunk(&hub, token, ep, &["contacts:1"], vec![]);
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Retry(..))));
    }

    #[test]
    fn watermarks_of_no_chunk_here_are_ignored() {
        let (hub, mut w) = (Hub::default(), Windows::default());
        let token = Uuid::new_v4();
        assert!(w.message(&hub, LOW, token.to_string().as_bytes()).is_none());
        assert!(w.is_empty(), "no intent: no window");
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Unknown)));
        assert!(w.message(&hub, HIGH, b"not a token").is_none());
        assert!(w.message(&hub, "walhook.heartbeat", b"x").is_none());
        // Given up by the runner before the stream got there.
        let ep = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        w.message(&hub, LOW, token.to_string().as_bytes());
        let _rx = chunk(&hub, token, ep, &["contacts:1"], vec![]);
        assert!(hub.forget(token));
        assert!(matches!(w.message(&hub, HIGH, token.to_string().as_bytes()), Some(AtHigh::Unknown)));
        assert!(!hub.forget(token));
        // A window whose chunk was given up closes at the next transaction.
        let token = Uuid::new_v4();
        hub.intend(token, Intent { table: Table::Contacts, endpoint_id: ep });
        w.message(&hub, LOW, token.to_string().as_bytes());
        assert!(!w.is_empty());
        hub.forget(token);
        w.transaction(&hub, 9);
        assert!(w.is_empty());
    }
}
