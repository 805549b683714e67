//! Where a connection is in its request/response cycle: what decides whether it may be closed
//! to make room, and the deadline for reading a whole request.
//!
//! What must hold: a connection is *handling* only from the moment its current request has
//! been read completely (headers, and the body to its end) until its response has been
//! written or dropped; only then, or while the handler of a request whose headers are read
//! runs without waiting on the client for its body, is it protected from being closed to
//! make room. A request
//! is *reading* from its first byte (or, for a request whose bytes arrived while the
//! previous one was handled, from the end of that response) until it is read completely, and
//! [`Phase::overdue`] completes once a request has been reading for the limit given. A
//! connection whose answer the client does not take (a write blocked on a full socket) is
//! *write-blocked* from that write until a byte moves again: [`Phase::write_blocked_for`]
//! lets the listener close it to make room, whatever the request phase, and
//! [`Phase::write_stalled`] ends it once blocked for the limit given. All transitions happen
//! on the connection's own task; atomics only let the listener look.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Between requests: nothing of the next request read yet.
const IDLE: u8 = 0;
/// Part of a request has been read.
const READING: u8 = 1;
/// The request is read completely and being handled or answered.
const HANDLING: u8 = 2;

/// The request/response phase of one connection.
#[derive(Debug)]
pub(super) struct Phase {
    opened: Instant,
    state: AtomicU8,
    /// When the request being read began, in milliseconds after `opened`.
    started_ms: AtomicU64,
    /// Bytes arrived while a request was being handled: the next request has begun.
    next_began: AtomicBool,
    /// A read found nothing to read at least once: the connection's own task has looked at
    /// its socket, so a request already sent would have been seen.
    looked: AtomicBool,
    /// The request's headers are parsed and its handler runs (until the response is done).
    in_service: AtomicBool,
    /// The handler waits for more of the request's body from the client.
    awaiting_body: AtomicBool,
    /// A byte has been read, ever.
    heard: AtomicBool,
    /// Woken when a request begins, for [`Phase::overdue`].
    began: Notify,
    /// When a write found the socket full, in milliseconds after `opened`, plus one (0: the
    /// last write went through).
    blocked_ms: AtomicU64,
    /// Woken when a write blocks, for [`Phase::write_stalled`].
    blocked: Notify,
}

impl Phase {
    pub(super) fn new() -> Self {
        Phase {
            opened: Instant::now(),
            state: AtomicU8::new(IDLE),
            started_ms: AtomicU64::new(0),
            next_began: AtomicBool::new(false),
            looked: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            in_service: AtomicBool::new(false),
            awaiting_body: AtomicBool::new(false),
            began: Notify::new(),
            blocked_ms: AtomicU64::new(0),
            blocked: Notify::new(),
        }
    }

    /// A write found the socket full: the client does not take the answer (yet).
    pub(super) fn write_blocked(&self) {
        let ms = self.opened.elapsed().as_millis().min(u64::MAX as u128 - 1) as u64 + 1;
        if self.blocked_ms.compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.blocked.notify_one();
        }
    }

    /// A write went through.
    pub(super) fn write_flowed(&self) {
        self.blocked_ms.store(0, Ordering::Relaxed);
    }

    /// How long the connection's writes have been blocked, if they are.
    pub(super) fn write_blocked_for(&self) -> Option<Duration> {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.opened.elapsed().saturating_sub(Duration::from_millis(ms - 1))),
        }
    }

    /// Completes once a write has been blocked for `limit` without a byte going through.
    pub(super) async fn write_stalled(&self, limit: Duration) {
        loop {
            match self.write_blocked_for() {
                None => self.blocked.notified().await,
                Some(blocked) if blocked >= limit => return,
                Some(blocked) => tokio::time::sleep(limit - blocked).await,
            }
        }
    }

    fn begin(&self) {
        let ms = self.opened.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.started_ms.store(ms, Ordering::Relaxed);
        self.state.store(READING, Ordering::Relaxed);
        self.began.notify_one();
    }

    /// At least one byte was read from the socket.
    pub(super) fn bytes_read(&self) {
        self.heard.store(true, Ordering::Relaxed);
        match self.state.load(Ordering::Relaxed) {
            IDLE => self.begin(),
            HANDLING => self.next_began.store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    /// A read found nothing waiting.
    pub(super) fn nothing_to_read(&self) {
        self.looked.store(true, Ordering::Relaxed);
    }

    /// A request's headers have been parsed (its first bytes may have been read earlier).
    pub(super) fn headers_read(&self) {
        self.in_service.store(true, Ordering::Relaxed);
        self.awaiting_body.store(false, Ordering::Relaxed);
        if self.state.load(Ordering::Relaxed) == IDLE {
            self.begin();
        }
    }

    /// The request, body included, has been read completely.
    pub(super) fn request_read(&self) {
        self.state.store(HANDLING, Ordering::Relaxed);
    }

    /// Whether the handler now waits for more of the body from the client (`true`) or has
    /// just received some of it (`false`).
    pub(super) fn awaiting_body(&self, waiting: bool) {
        self.awaiting_body.store(waiting, Ordering::Relaxed);
    }

    /// The response has been written (or dropped).
    pub(super) fn response_done(&self) {
        self.in_service.store(false, Ordering::Relaxed);
        self.awaiting_body.store(false, Ordering::Relaxed);
        if self.next_began.swap(false, Ordering::Relaxed) {
            self.begin();
        } else {
            self.state.store(IDLE, Ordering::Relaxed);
        }
    }

    /// Whether the client has ever sent a byte.
    pub(super) fn heard(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    /// Time since the connection was accepted.
    pub(super) fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Whether the connection may be closed to make room: it is not handling a request it
    /// has read completely, nor running the handler of one whose body the handler has not
    /// asked the client for yet (the body may be buffered already), and its task has looked
    /// at its socket at least once.
    pub(super) fn evictable(&self) -> bool {
        let handled = match self.state.load(Ordering::Relaxed) {
            HANDLING => true,
            _ => self.in_service.load(Ordering::Relaxed) && !self.awaiting_body.load(Ordering::Relaxed),
        };
        !handled && self.looked.load(Ordering::Relaxed)
    }

    /// Completes once a request has been reading for `limit`.
    pub(super) async fn overdue(&self, limit: Duration) {
        loop {
            if self.state.load(Ordering::Relaxed) != READING {
                self.began.notified().await;
                continue;
            }
            let started = self.started_ms.load(Ordering::Relaxed);
            let deadline = self.opened + Duration::from_millis(started) + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                biased;
                // 1. The deadline of the request being read.
                _ = tokio::time::sleep_until(deadline) => {}
                // 2. A new request began (the previous one was read): look again.
                _ = self.began.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_completely_read_request_being_answered_is_protected() {
        let p = Phase::new();
        assert!(!p.evictable(), "not looked at yet");
        p.nothing_to_read();
        assert!(p.evictable(), "silent");
        p.bytes_read();
        assert!(p.evictable(), "part of a request");
        p.headers_read();
        assert!(!p.evictable(), "headers read, the handler has not asked for the body yet");
        p.awaiting_body(true);
        assert!(p.evictable(), "headers, the handler waits for the body");
        p.awaiting_body(false);
        assert!(!p.evictable(), "some of the body arrived");
        p.awaiting_body(true);
        p.request_read();
        assert!(!p.evictable(), "handling");
        p.bytes_read(); // the next request, pipelined
        p.response_done();
        assert!(p.evictable());
        assert_eq!(p.state.load(Ordering::Relaxed), READING, "the pipelined request is being read");
        p.request_read();
        p.response_done();
        assert_eq!(p.state.load(Ordering::Relaxed), IDLE);
    }

    #[tokio::test]
    async fn a_write_blocked_for_the_limit_stalls_and_one_that_flows_does_not() {
        let p = Phase::new();
        let limit = Duration::from_millis(200);
        assert_eq!(p.write_blocked_for(), None);
        let flowing = tokio::time::timeout(Duration::from_millis(400), p.write_stalled(limit)).await;
        assert!(flowing.is_err(), "nothing blocked");
        p.write_blocked();
        tokio::time::sleep(Duration::from_millis(50)).await;
        p.write_blocked(); // still the same block: counted from the first
        assert!(p.write_blocked_for().unwrap() >= Duration::from_millis(50));
        p.write_flowed();
        assert_eq!(p.write_blocked_for(), None, "a byte went through");
        p.write_blocked();
        let t = Instant::now();
        let stalled = tokio::time::timeout(Duration::from_secs(5), p.write_stalled(limit)).await;
        assert!(stalled.is_ok() && t.elapsed() >= limit);
    }

    #[tokio::test]
    async fn a_request_reading_for_longer_than_the_limit_is_overdue() {
        let p = Phase::new();
        let limit = Duration::from_millis(200);
        let idle = tokio::time::timeout(Duration::from_millis(600), p.overdue(limit)).await;
        assert!(idle.is_err(), "an idle connection has no request deadline");
        p.bytes_read();
        let t = Instant::now();
        let overdue = tokio::time::timeout(Duration::from_secs(10), p.overdue(limit)).await;
        assert!(overdue.is_ok() && t.elapsed() >= limit, "a request reading for the limit is overdue");
    }
}
