//! The operations listener (`metrics.listen`): `/metrics`, `/healthz`, `/readyz`, and the
//! background monitor that keeps the database-derived gauges current.
//!
//! What must hold (docs/architecture.md, invariant 22): `/healthz` answers 200 while the
//! process runs; `/readyz` answers 200 only while the database answers, this replica streams
//! (or stands by because another replica holds the lock: never during its own start or
//! reconnect) and the store writer makes progress, otherwise 503 with a JSON reason naming the
//! cause (a lost slot or a failing prerequisite, see `slot`; replication's last error while it
//! is not streaming; a stalled store with what it waits on; on the streaming replica, a
//! primary that has held back every change for 30 s for a standby nothing streams from).
//! Neither `/readyz` nor a scrape waits on the database: readiness reads state the stages
//! keep, and whether the database answers is checked every [`PING_EVERY`] on a connection of
//! its own, never one of the pool the deliveries need. The monitor or the check ending before shutdown ends this stage with
//! it (gauges and readiness never freeze unnoticed).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::ops::status::{Reachability, ReplicationStatus, StoreHealth};
use crate::pg::db::{Db, DbError};

/// What the operations listener reads: handed over by `app`, which owns the stages.
#[derive(Clone)]
pub struct Health {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Database (readiness pings it; the monitor refreshes gauges from it).
    pub db: Db,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Replication's status (streaming, standing by, slot health).
    pub status: Arc<ReplicationStatus>,
    /// Whether the store writer makes progress.
    pub store: Arc<StoreHealth>,
    /// Whether the database answers (kept by this stage's own check).
    pub reach: Arc<Reachability>,
    /// Reads the outbox and endpoint gauges (the store owns those tables:
    /// `crate::store::deliveries::outbox_gauges`).
    pub gauges: ReadGauges,
}

/// The outbox and endpoint gauges, as one read of walhook's tables gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxGauges {
    /// Deliveries waiting in the outbox.
    pub pending: i64,
    /// Seconds since the oldest of them was committed, counting only those of active
    /// endpoints (one paused by hand, or deleted, waits on purpose and must not page anyone).
    pub oldest_pending_age: f64,
    /// Active endpoints.
    pub active_endpoints: i64,
    /// Disabled endpoints.
    pub disabled_endpoints: i64,
}

/// What [`ReadGauges`] returns: the gauges, read on the connection it borrows.
pub type GaugesFuture<'a> = Pin<Box<dyn Future<Output = Result<OutboxGauges, DbError>> + Send + 'a>>;

/// Reads [`OutboxGauges`] on the monitor's connection.
pub type ReadGauges = for<'a> fn(&'a tokio_postgres::Client) -> GaugesFuture<'a>;

/// How often slot lag and outbox gauges are refreshed.
const MONITOR_EVERY: Duration = Duration::from_secs(5);
/// How often the database is checked for `/readyz`.
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// A check not answered within this counts as no answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The streaming replica is not ready once the primary has held back changes for a standby
/// nothing streams from for this long (a standby restarting is not an outage), or once a
/// transaction it read has stayed invisible to queries this long.
const HELD_BACK_NOT_READY: Duration = Duration::from_secs(30);
/// The database counts as unreachable when no check answered for this long.
const PING_FRESH: Duration = Duration::from_secs(7);

/// Serves the operations endpoints until `shutdown`, within `limits` (`metrics.*`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    limits: crate::security::listener::ListenerLimits,
    shutdown: CancellationToken,
) {
    let mut monitor = tokio::spawn({
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            tokio::join!(monitor(health.clone(), shutdown.clone()), ping(health, shutdown));
        }
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let serve = crate::security::listener::serve(listener, app, limits, "metrics", shutdown.clone());
    tokio::pin!(serve);
    tokio::select! {
        biased;
        // 1. The listener ended (shutdown).
        () = &mut serve => return monitor.abort(),
        // 2. The gauge monitor or the database check ended. Before shutdown that is a bug, and
        //    frozen gauges or readiness would hide it: this stage ends with it (its panic
        //    carried on) for the supervisor to report.
        ended = &mut monitor => {
            if let Err(Ok(panic)) = ended.map_err(tokio::task::JoinError::try_into_panic) {
                std::panic::resume_unwind(panic);
            }
            if !shutdown.is_cancelled() {
                return;
            }
        }
    }
    serve.await;
}

async fn metrics(State(s): State<Health>) -> impl IntoResponse {
    let last = s.status.last_commit_us.load(Ordering::Relaxed);
    if last > 0 {
        let age = (chrono::Utc::now().timestamp_micros() - last).max(0) as f64 / 1e6;
        s.metrics.last_commit_age.set(age);
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn readyz(State(s): State<Health>) -> impl IntoResponse {
    let streaming = s.status.streaming.load(Ordering::Relaxed);
    let standby = s.status.standby.load(Ordering::Relaxed);
    let reason = if let Some(unreachable) = s.reach.problem(PING_FRESH) {
        Some(unreachable)
    } else if let Some(slot_problem) = s.status.health.not_ready_reason() {
        Some(slot_problem)
    } else if !streaming && !standby {
        Some(not_streaming(&s.status))
    } else if let Some(why) = s.store.problem() {
        Some(format!("the store writer cannot make progress: {why}"))
    } else if let Some((xid, waited)) = s.status.invisible_for(HELD_BACK_NOT_READY) {
        Some(format!(
            "transaction {xid} changed webhook endpoints and was read from the stream {}s ago, but queries still see \
             it in progress (a synchronous standby not answering?); every webhook waits behind it until it becomes \
             visible",
            waited.as_secs()
        ))
    } else {
        s.status.held_back(HELD_BACK_NOT_READY).filter(|_| streaming).map(|slots| {
            format!(
                "the primary holds back every change from walhook: synchronized_standby_slots names {slots}, which \
                 no standby streams from (a standby down, or the setting left over from before a promotion); start \
                 the standby, or remove it from synchronized_standby_slots and reload (runbook: \
                 WalhookHeldBackByStandby)"
            )
        })
    };
    let (code, mut body) = match reason {
        None => (StatusCode::OK, serde_json::json!({"ready": true, "standby": standby && !streaming})),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"ready": false, "reason": r})),
    };
    if let Some(view) = s.status.failover() {
        body["failover"] = failover_json(&view, s.cfg.replication.slot.as_str());
    }
    (code, Json(body))
}

/// `/readyz`'s `failover` member: what the primary shows, and what to set.
fn failover_json(view: &crate::pg::failover::FailoverView, slot: &str) -> serde_json::Value {
    serde_json::json!({
        "ready": view.ready(),
        "supported": view.supported(),
        "slot_failover": view.slot_failover,
        "standby_slots": view.standby_slots,
        "max_slot_wal_keep_size": view.max_slot_wal_keep_size,
        "idle_replication_slot_timeout": view.idle_replication_slot_timeout,
        "held_back_by": view.held_back_by(),
        "advice": view.advice(slot),
        "notes": view.notes(slot),
    })
}

/// Checks every [`PING_EVERY`] that the database answers, on a connection of its own (opened
/// again when it fails), and keeps the answer for `/readyz`.
async fn ping(s: Health, shutdown: CancellationToken) {
    let mut conn: Option<tokio_postgres::Client> = None;
    loop {
        let checked = tokio::time::timeout(PING_TIMEOUT, async {
            let client = match conn.take() {
                Some(c) if !c.is_closed() => c,
                _ => s.db.connect().await?,
            };
            client.simple_query("SELECT 1").await.map_err(DbError::from)?;
            Ok::<_, DbError>(client)
        })
        .await;
        match checked {
            Ok(Ok(client)) => {
                s.reach.answered();
                conn = Some(client);
            }
            Ok(Err(e)) => s.reach.failed(e.to_string()),
            Err(_) => s.reach.failed(format!("no answer within {PING_TIMEOUT:?}")),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PING_EVERY) => {}
        }
    }
}

/// Why replication is not streaming, with its last error when there is one (a busy slot, a
/// lost connection, what the server said).
fn not_streaming(status: &ReplicationStatus) -> String {
    match status.last_error() {
        Some(e) => format!("replication is not streaming: {e}"),
        None => "replication is not streaming".to_owned(),
    }
}

/// Refreshes slot lag, failover and outbox gauges.
async fn monitor(s: Health, shutdown: CancellationToken) {
    let slot = s.cfg.replication.slot.to_string();
    loop {
        let result: Result<(), DbError> = async {
            let client = s.db.get().await?;
            if let Some(r) = client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?
            {
                s.metrics.slot_lag_bytes.set(r.get::<_, Option<i64>>(0).unwrap_or(0));
            }
            // (Its failure must not stop the outbox gauges below.)
            match crate::pg::failover::inspect(&**client, &slot).await {
                Ok(view) => {
                    s.metrics.slot_failover.set(i64::from(view.slot_failover == Some(true)));
                    s.metrics.failover_standbys.set(view.standby_slots.len() as i64);
                    s.metrics.failover_ready.set(i64::from(view.ready()));
                    s.metrics.physical_standbys.set(view.physical_standbys);
                    s.metrics.held_back.set(i64::from(!view.held_back_by().is_empty()));
                    s.status.set_failover(view);
                }
                Err(e) => tracing::debug!(error = %e, "reading the failover view failed"),
            }
            let g = (s.gauges)(&client).await?;
            s.metrics.pending.set(g.pending);
            s.metrics.oldest_pending_age.set(g.oldest_pending_age);
            s.metrics.endpoints.with_label_values(&["active"]).set(g.active_endpoints);
            s.metrics.endpoints.with_label_values(&["disabled"]).set(g.disabled_endpoints);
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "monitor query failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MONITOR_EVERY) => {}
        }
    }
}
