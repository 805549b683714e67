//! `walhook run`: wires the pipeline together and runs it until shutdown.
//!
//! replication → decode → route → dispatch (fast path) → store writer
//!                                      outbox workers ↗
//!
//! What must hold: every channel between the stages is bounded; shutdown is a token passed
//! in, observed by every stage; every long-lived task is a stage of [`crate::app::supervise`]: a
//! fatal replication error, or any stage ending or panicking while shutdown was not asked
//! for, stops the whole process with the stage named (nothing keeps serving while the slot
//! is not read or what is read cannot be delivered); once shutdown starts, every stage gets
//! `shutdown.grace` in all, whatever the database does, and a stage still running then is
//! stopped (what it had not written stays unconfirmed in the slot and is read again).

pub mod supervise;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::app::supervise::{Fault, FaultError, Stage, StageError, Stages};
use crate::config::Config;
use crate::delivery::dispatch::budget::MemoryBudget;
use crate::delivery::dispatch::http::{HttpError, Sender};
use crate::delivery::dispatch::limits::Limits;
use crate::delivery::dispatch::policy::RetryPolicy;
use crate::delivery::dispatch::{DispatchSettings, Dispatcher};
use crate::delivery::outbox::{OutboxSettings, OutboxWorker};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::status::{ReplicationStatus, StoreHealth};
use crate::pg::db::{Db, DbError};
use crate::pg::preflight::{self, PreflightError};
use crate::security::secrets::{SecretBox, SecretError};
use crate::source::backfill::window::Hub;
use crate::source::backfill::Backfiller;
use crate::source::error::ReplicationError;
use crate::source::replication::{Replication, ReplicationHandles};
use crate::source::route::{RouteError, Router};
use crate::store::{StoreWriter, WriterSettings};

/// Deliveries routed but not yet taken by dispatch. (Their payloads are charged to the
/// memory budget, so this bounds a count; `dispatch.memory_limit` bounds the bytes.)
const DISPATCH_CHANNEL: usize = 1024;
/// Writes waiting for the store writer (payloads charged as above).
const STORE_CHANNEL: usize = 4096;

/// Why `walhook run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Database setup failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The database is not ready.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// `secrets.encryption_key` is unusable.
    #[error(transparent)]
    Secrets(#[from] SecretError),
    /// Secrets stored plain could not be re-encrypted.
    #[error(transparent)]
    Reseal(#[from] crate::store::secrets::ResealError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Endpoints could not be loaded.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Replication failed for good.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// A stage ended or panicked while shutdown was not asked for.
    #[error(transparent)]
    Stage(StageError<std::convert::Infallible>),
    /// The fault-injection test hook is malformed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The connection caps do not fit in the file descriptor limit.
    #[error(transparent)]
    Descriptors(#[from] crate::ops::descriptors::BudgetError),
    /// A listener could not be opened.
    #[error("listening on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
}

pub use crate::source::slot::Prepared;

/// What `walhook migrate` did.
#[derive(Debug)]
pub struct Migrated {
    /// The schema, publication, replica identity and grants.
    pub schema: crate::pg::migrate::MigrateReport,
    /// The replication slot.
    pub slot: Prepared,
}

/// Why `walhook migrate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The schema part failed.
    #[error(transparent)]
    Schema(#[from] crate::pg::migrate::MigrateError),
    /// The slot could not be created or adopted.
    #[error(transparent)]
    Slot(#[from] crate::source::slot::SlotError),
}

/// `walhook migrate`: the schema, the publication, then the slot, so that from the moment it
/// returns every committed change of a published table is in the slot (invariant 22).
pub async fn migrate(db: &Db, cfg: &Config) -> Result<Migrated, MigrateError> {
    let schema = crate::pg::migrate::migrate(db, cfg).await?;
    let slot = crate::source::slot::prepare(db, cfg).await?;
    Ok(Migrated { schema, slot })
}

/// Runs walhook until `shutdown` is cancelled, replication fails for good, or a stage ends.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> Result<(), AppError> {
    let fault = Fault::from_env()?;
    crate::ops::descriptors::reserve(&cfg)?;
    let db = Db::new(&cfg.database)?;
    preflight::check(&db, &cfg).await?;
    let secrets = SecretBox::new(cfg.secrets.encryption_key.as_ref().map(|k| k.expose()))?;
    if !secrets.encrypts() {
        tracing::warn!("secrets.encryption_key is not set: endpoint signing secrets are stored unencrypted");
    }
    let resealed = crate::store::secrets::reseal_plain(&db, &secrets, None).await?;
    if resealed > 0 {
        tracing::info!("re-encrypted {resealed} signing secrets stored before secrets.encryption_key was set");
    }
    // Fail now, not on the first reconnect, if a stored secret cannot be opened.
    Router::load(&db, secrets.clone()).await?;

    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(ReplicationStatus::default());
    let store_health = Arc::new(StoreHealth::new(metrics.store_stalled.clone(), metrics.store_pinned.clone()));
    let health = Health {
        cfg: cfg.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        store: store_health.clone(),
        reach: Default::default(),
        gauges: crate::store::deliveries::outbox_gauges,
    };
    let ops_listener = bind(cfg.metrics.listen).await?;
    let api_listener = bind(cfg.api.listen).await?;
    let d = &cfg.dispatch;
    let sender = Sender::new(d)?;
    let limits = Arc::new(Limits::new(d.max_concurrency, d.endpoint_concurrency, d.account_concurrency));
    let api_state = crate::admin::api::ApiState::new(
        crate::admin::endpoints::Endpoints::new(
            db.clone(),
            secrets.clone(),
            crate::security::ssrf::AddressPolicy::new(cfg.dispatch.allowed_cidrs.clone()),
            cfg.database.crm_schema.as_str(),
        )
        .with_quota(cfg.api.max_endpoints_per_account),
        crate::admin::api::auth::Authenticator::new(&cfg.auth),
        crate::admin::api::auth::RateLimiter::new(cfg.api.rate_limit_per_second, cfg.api.rate_limit_burst),
        metrics.clone(),
        cfg.api.max_body_bytes,
    )
    .with_prober(crate::admin::probe::Prober::new(db.clone(), secrets.clone(), sender.clone(), limits.clone()));

    let budget = Arc::new(MemoryBudget::new(d.memory_limit.get(), metrics.payload_memory.clone()));
    metrics.payload_memory_limit.set(budget.limit() as i64);
    let retry = RetryPolicy::new(d);
    // Long enough for every claim an endpoint may have waiting to take its turn and time out.
    let attempt_max = d.connect_timeout.get() + d.request_timeout.get();
    let lease_for = attempt_max * (crate::delivery::outbox::CLAIM_DEPTH as u32 + 2) + Duration::from_secs(5);
    let grace = cfg.shutdown.grace.get();
    let (writer, store_tx) = StoreWriter::new(
        db.clone(),
        STORE_CHANNEL,
        WriterSettings {
            health: store_health.clone(),
            metrics: metrics.clone(),
            stall_after: cfg.database.write_stall_after.get(),
            archive: !cfg.retention.payloads.get().is_zero(),
        },
    );
    let outbox_wake = Arc::new(Notify::new());
    let (dispatch_tx, dispatch_rx) = mpsc::channel(DISPATCH_CHANNEL);
    let dispatcher = Dispatcher::new(
        DispatchSettings {
            endpoint_queue: d.endpoint_queue,
            queue_capacity: d.queue_capacity,
            spill_after: d.spill_after.get(),
            lease_for,
            retry: retry.clone(),
            budget: budget.clone(),
        },
        sender.clone(),
        limits.clone(),
        store_tx.clone(),
        outbox_wake.clone(),
        metrics.clone(),
    );
    let outbox = OutboxWorker::new(
        db.clone(),
        sender,
        limits,
        store_tx.clone(),
        secrets.clone(),
        OutboxSettings { poll_interval: d.poll_interval.get(), lease_for, attempt_max, retry, budget: budget.clone() },
        metrics.clone(),
        outbox_wake,
    );
    // Backfill chunks pass from the runner to the stream through this one hub.
    let hub = Arc::new(Hub::default());
    let backfiller = Backfiller::new(cfg.clone(), db.clone(), hub.clone(), metrics.clone(), status.clone());
    let replication = Replication::new(
        cfg.clone(),
        db.clone(),
        secrets,
        dispatch_tx,
        ReplicationHandles {
            metrics: metrics.clone(),
            status: status.clone(),
            budget,
            fence: dispatcher.fence(),
            backfill: hub,
            store_health,
        },
    );

    let delivered = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.delivery(true).get() + metrics.delivery(false).get())
    };
    let mut stages = Stages::new(shutdown.clone(), grace).with_fault(fault, delivered);
    let maintenance =
        crate::store::maintenance::run(db.clone(), cfg.clone(), metrics.clone(), store_tx, shutdown.clone());
    stages.spawn(Stage::Maintenance, maintenance);
    stages.spawn(
        Stage::SlotWatch,
        crate::source::slot::watch(db.clone(), cfg.clone(), metrics, status, shutdown.clone()),
    );
    stages.spawn(Stage::PoolLifetime, db.close_old_connections(shutdown.clone()));
    stages.spawn(
        Stage::MetricsListener,
        crate::ops::health::serve(ops_listener, health, cfg.metrics.limits(), shutdown.clone()),
    );
    stages.spawn(
        Stage::ApiListener,
        crate::admin::api::serve(api_listener, api_state, cfg.api.limits(), shutdown.clone()),
    );
    // The writer ends once every stage holding a sender has ended and its writes are in.
    stages.spawn(Stage::StoreWriter, writer.run());
    stages.spawn(Stage::Dispatcher, dispatcher.run(dispatch_rx, shutdown.clone(), grace));
    stages.spawn(Stage::Outbox, outbox.run(shutdown.clone(), grace));
    stages.spawn(Stage::Backfill, backfiller.run(shutdown.clone()));
    stages.spawn_fallible(Stage::Replication, async move {
        match replication.run(shutdown.clone()).await {
            // The dispatcher ended: its end is the one to report, and it stops the stages.
            Err(ReplicationError::DispatchClosed) => {
                shutdown.cancelled().await;
                Ok(())
            }
            r => r,
        }
    });
    Ok(stages.run().await?)
}

impl From<StageError<ReplicationError>> for AppError {
    fn from(e: StageError<ReplicationError>) -> Self {
        match e {
            // Replication's own errors read as they always have.
            StageError::Failed { cause, .. } => AppError::Replication(cause),
            StageError::Ended { stage } => AppError::Stage(StageError::Ended { stage }),
            StageError::Panicked { stage, message } => AppError::Stage(StageError::Panicked { stage, message }),
        }
    }
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, AppError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|cause| AppError::Listen { addr, cause })
}
