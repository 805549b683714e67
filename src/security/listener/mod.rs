//! Serving the admin API and the operations endpoints: HTTP/1.1 with a header-read timeout,
//! a request-read deadline, an idle timeout, a bounded header buffer and a connection cap per
//! listener.
//!
//! What must hold: a client gets `header_timeout` to send a request's headers, counted from
//! connecting or from the end of its previous response (so idle keep-alive connections end
//! too), and `header_timeout` to send a whole request (headers and body) counted from its
//! first byte; a connection on which no byte is read or written for `idle_timeout` is closed
//! (a client that stops reading), and one whose answer the client has not taken for
//! `header_timeout` (a write blocked on a full socket: a client that never reads, or reads a
//! trickle); at most [`MAX_HEADER_BUF`] bytes of a request's headers are
//! buffered per connection (beyond: 431 and close); at most `max_connections` connections
//! are open at once (plus the one just accepted): a new connection beyond the cap closes the
//! oldest connection that is not handling a request it has read completely (one that sent
//! nothing for [`SILENT_GRACE`] at least, is still sending its request's headers or body, or
//! idles between keep-alive requests, with no unread byte waiting in its socket) or whose
//! answer its client has not taken for `room::WRITE_BLOCK_GRACE`, so
//! clients holding places can never keep out a probe or a real request; only when every
//! connection is handling a read request does the listener accept nothing more,
//! and new connections wait in the kernel's backlog until one ends; an accept that fails for
//! lack of descriptors closes a connection the cap would close, then, like any accept error,
//! waits before the next try instead of spinning and is logged at most once per
//! [`ACCEPT_WARN_EVERY`] with the count of those not logged; on shutdown every connection
//! finishes the request it is serving (for at most `DRAIN`) and closes.
//!
//! HTTP/2 is not offered on these listeners: its connections would need their own idle and
//! header limits, and neither the API's clients nor Prometheus need it.

mod activity;
mod body;
mod io;
mod phase;
mod room;
mod warn;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use io::TrackedIo;
use room::{Conn, Room};

/// Wait after a failed accept (usually: out of file descriptors) before the next one.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(250);
/// After shutdown, how long open connections get to finish their request.
const DRAIN: Duration = Duration::from_secs(10);
/// How often a full listener with nothing it may close looks again for a connection to close.
const RELOOK: Duration = Duration::from_millis(20);
/// A connection that has not sent a byte yet is not closed to make room before it has been
/// open this long (its first request may be on its way).
const SILENT_GRACE: Duration = Duration::from_millis(25);
/// Bytes of request headers buffered per connection at most (hyper's own default is ~400 KB).
pub const MAX_HEADER_BUF: usize = 16 * 1024;
/// At most one "accepting a connection failed" warning per listener this often.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(1);
/// At most one "cap reached" warning per listener this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The limits of one listener (`api.*` or `metrics.*`).
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections open at once at most.
    pub max_connections: usize,
    /// Time to send a request's headers; also the time to send a whole request from its
    /// first byte.
    pub header_timeout: Duration,
    /// Time without a byte read or written before the connection is closed.
    pub idle_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish their
/// request. `name` names the listener in logs.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let room = Arc::new(Room::new(limits.max_connections));
    let mut warned: Option<tokio::time::Instant> = None;
    let mut accept_warn = warn::Every::new(ACCEPT_WARN_EVERY);
    loop {
        let accepted = tokio::select! {
            biased;
            // 1. Shutdown.
            _ = shutdown.cancelled() => break,
            // 2. A new connection.
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                if let Some(not_logged) = accept_warn.occurred(tokio::time::Instant::now()) {
                    tracing::warn!(listener = name, error = %e, not_logged, "accepting a connection failed");
                }
                // Out of descriptors: free one, as at the cap, so a waiting client gets in.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    room.evict_oldest(SILENT_GRACE);
                }
                tokio::select! {
                    biased;
                    // 1. Shutdown.
                    _ = shutdown.cancelled() => break,
                    // 2. Try again.
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection cap reached; closing the oldest connections not handling a request to make room"
                    );
                    warned = Some(tokio::time::Instant::now());
                }
                let Some(slot) = make_room(&slots, &room, &shutdown).await else { break };
                slot
            }
        };
        let conn = Conn::new(std::os::fd::AsRawFd::as_raw_fd(&tcp));
        room.push(&conn);
        tokio::spawn(connection(tcp, app.clone(), limits, conn, slot, shutdown.clone()));
    }
    drop(listener);
    // Every connection holds a slot until it ends: all slots back means all ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all)).await.is_err() {
        tracing::warn!(listener = name, "connections still open {DRAIN:?} after shutdown; leaving them");
    }
}

/// Waits for a slot at the cap, closing the oldest connection not handling a request to free
/// one; `None` on shutdown.
async fn make_room(slots: &Arc<Semaphore>, room: &Room, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    loop {
        room.evict_oldest(SILENT_GRACE);
        tokio::select! {
            biased;
            // 1. Shutdown.
            _ = shutdown.cancelled() => return None,
            // 2. A connection closed (the evicted one, or any other).
            slot = slots.clone().acquire_owned() => return Some(slot.expect("the semaphore is never closed")),
            // 3. Nothing to evict yet: look again once more connections may qualify.
            _ = tokio::time::sleep(RELOOK) => {}
        }
    }
}

/// Serves one connection; `_slot` is its place under the cap, given back when it ends.
async fn connection(
    tcp: TcpStream,
    app: Router,
    limits: ListenerLimits,
    conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(TrackedIo::new(tcp, conn.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEADER_BUF);
    let http = builder.serve_connection(io, body::service(app, conn.clone()));
    tokio::pin!(http);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            // 1. The connection ended (closed by the client, header timeout, error).
            result = http.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            // 2. Shutdown: finish the request in progress, then close.
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
            // 3. Closed to make room: it handles no request it has read, and the listener is full.
            _ = conn.evict.cancelled() => {
                tracing::debug!("closing a connection not handling a request to make room under the connection cap");
                return;
            }
            // 4. Its request has not arrived completely within header_timeout of its first byte.
            _ = conn.phase.overdue(limits.header_timeout) => {
                tracing::debug!("closing a connection whose request took longer than header_timeout to arrive");
                return;
            }
            // 5. Nothing moved for idle_timeout.
            _ = conn.activity.idle_for(limits.idle_timeout) => {
                tracing::debug!("closing a connection idle for longer than idle_timeout");
                return;
            }
            // 6. The client has not taken its answer for header_timeout (it reads nothing, or
            //    too little): it may not hold its place, nor the answer in memory, any longer.
            _ = conn.phase.write_stalled(limits.header_timeout) => {
                tracing::debug!("closing a connection whose client took none of its answer for header_timeout");
                return;
            }
        }
    }
}
