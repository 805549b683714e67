//! Supervised stages: the long-lived tasks of `walhook run`, owned here with their names.
//!
//! What must hold:
//! - A stage that ends while shutdown was not requested (it returns, fails or panics), or
//!   that fails or panics at any time, ends the process: the shutdown token is cancelled for
//!   the others and [`Stages::run`] returns an error naming the stage, so that whatever
//!   supervises the process restarts it. A process that can no longer deliver does not look
//!   alive.
//! - The stage reported is the first that panicked, else the first that ended or failed: a
//!   panic is never the consequence of another stage ending, while an error may be (routing
//!   finds the dispatcher's channel closed when the dispatcher died).
//! - Once shutdown starts (asked for, or caused by a stage ending), all stages together get
//!   `shutdown.grace`; what still runs then is stopped. Nothing here confirms anything: a
//!   stage that dies drops the tickets it held unsettled, so the slot is not confirmed past
//!   them ([`crate::model::progress`]) and what it had not written is read again at the next start.
//!
//! Test hook, not configuration: `TEST_WALHOOK_FAULT=<stage>:<panic|end>:after=<n>` makes
//! the stage of that name (as [`Stage`] displays it) panic, or return, once `n` webhooks have
//! been delivered, as a bug in it would: its future is dropped where it stands, as unwinding
//! would drop it. It is read once at start, logged at WARN when set, refused when malformed,
//! and does nothing when unset. Only tests set it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// The environment variable of the fault-injection test hook.
pub const FAULT_ENV: &str = "TEST_WALHOOK_FAULT";
/// How often an injected fault checks whether its moment has come.
const FAULT_CHECK: Duration = Duration::from_millis(10);

/// The stages of `walhook run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reads the slot, decodes, routes, confirms.
    Replication,
    /// Sends from memory (the fast path).
    Dispatcher,
    /// Records deliveries and writes the outbox.
    StoreWriter,
    /// Retries what waits in the outbox.
    Outbox,
    /// Retention and disabling failing endpoints.
    Maintenance,
    /// Re-checks the slot and the prerequisites.
    SlotWatch,
    /// Closes database connections past their lifetime.
    PoolLifetime,
    /// `/metrics`, `/healthz`, `/readyz`.
    MetricsListener,
    /// The admin API.
    ApiListener,
    /// Reads backfill chunks for the stream to line up.
    Backfill,
}

impl Stage {
    /// Every stage, in the order they are listed in logs.
    pub const ALL: [Stage; 10] = [
        Stage::Replication,
        Stage::Dispatcher,
        Stage::StoreWriter,
        Stage::Outbox,
        Stage::Maintenance,
        Stage::SlotWatch,
        Stage::PoolLifetime,
        Stage::MetricsListener,
        Stage::ApiListener,
        Stage::Backfill,
    ];

    /// The name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Replication => "replication",
            Stage::Dispatcher => "dispatcher",
            Stage::StoreWriter => "store writer",
            Stage::Outbox => "outbox",
            Stage::Maintenance => "maintenance",
            Stage::SlotWatch => "slot watch",
            Stage::PoolLifetime => "pool lifetime",
            Stage::MetricsListener => "metrics listener",
            Stage::ApiListener => "api listener",
            Stage::Backfill => "backfill",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the stages stopped, naming the stage that stopped them.
#[derive(Debug, thiserror::Error)]
pub enum StageError<E> {
    /// It returned while shutdown was not requested.
    #[error("stage {stage} ended unexpectedly")]
    Ended {
        /// The stage.
        stage: Stage,
    },
    /// It panicked.
    #[error("stage {stage} ended unexpectedly: panicked: {message}")]
    Panicked {
        /// The stage.
        stage: Stage,
        /// The panic's message.
        message: String,
    },
    /// It returned an error.
    #[error("stage {stage} failed: {cause}")]
    Failed {
        /// The stage.
        stage: Stage,
        /// Its error.
        cause: E,
    },
}

impl<E> StageError<E> {
    /// The stage that stopped.
    pub fn stage(&self) -> Stage {
        match self {
            StageError::Ended { stage } | StageError::Panicked { stage, .. } | StageError::Failed { stage, .. } => {
                *stage
            }
        }
    }

    fn panicked(&self) -> bool {
        matches!(self, StageError::Panicked { .. })
    }
}

/// What an injected fault does to its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The stage panics.
    Panic,
    /// The stage returns as if it had finished.
    End,
}

/// A fault injected into one stage (the test hook, see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The stage.
    pub stage: Stage,
    /// What happens to it.
    pub kind: FaultKind,
    /// Webhooks delivered before it happens.
    pub after: u64,
}

/// `TEST_WALHOOK_FAULT` is malformed.
#[derive(Debug, thiserror::Error)]
#[error("{FAULT_ENV}={value:?}: {why} (expected <stage>:<panic|end>:after=<n>, stage one of {stages})", stages = stage_names())]
pub struct FaultError {
    value: String,
    why: &'static str,
}

fn stage_names() -> String {
    Stage::ALL.map(Stage::name).join(", ")
}

impl std::str::FromStr for Fault {
    type Err = FaultError;

    fn from_str(value: &str) -> Result<Fault, FaultError> {
        let bad = |why| FaultError { value: value.to_owned(), why };
        let parts: Vec<&str> = value.split(':').collect();
        let [stage, kind, after] = parts[..] else { return Err(bad("not three parts separated by ':'")) };
        let stage = *Stage::ALL.iter().find(|s| s.name() == stage).ok_or_else(|| bad("no such stage"))?;
        let kind = match kind {
            "panic" => FaultKind::Panic,
            "end" => FaultKind::End,
            _ => return Err(bad("the fault is neither panic nor end")),
        };
        let after = after
            .strip_prefix("after=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad("the third part is not after=<number of webhooks delivered>"))?;
        Ok(Fault { stage, kind, after })
    }
}

impl Fault {
    /// The fault `TEST_WALHOOK_FAULT` asks for, if it is set (logged at WARN).
    pub fn from_env() -> Result<Option<Fault>, FaultError> {
        let Some(value) = std::env::var_os(FAULT_ENV) else { return Ok(None) };
        let value = value.to_string_lossy();
        let fault: Fault = value.parse()?;
        tracing::warn!(
            stage = %fault.stage,
            fault = ?fault.kind,
            after = fault.after,
            "{FAULT_ENV} is set: a test hook makes this stage fail on purpose"
        );
        Ok(Some(fault))
    }
}

/// Webhooks delivered so far (what an injected fault waits for).
pub type Delivered = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The running stages.
pub struct Stages<E> {
    tasks: JoinSet<Result<(), E>>,
    names: HashMap<Id, Stage>,
    shutdown: CancellationToken,
    grace: Duration,
    fault: Option<(Fault, Delivered)>,
}

impl<E: std::fmt::Display + Send + 'static> Stages<E> {
    /// No stages yet; `shutdown` stops them, within `grace` once cancelled.
    pub fn new(shutdown: CancellationToken, grace: Duration) -> Self {
        Stages { tasks: JoinSet::new(), names: HashMap::new(), shutdown, grace, fault: None }
    }

    /// Injects `fault` (if any) into the stage it names, once `delivered` reaches its count.
    pub fn with_fault(mut self, fault: Option<Fault>, delivered: Delivered) -> Self {
        self.fault = fault.map(|f| (f, delivered));
        self
    }

    /// Starts a stage that has no error of its own.
    pub fn spawn(&mut self, stage: Stage, run: impl Future<Output = ()> + Send + 'static) {
        self.spawn_fallible(stage, async move {
            run.await;
            Ok(())
        });
    }

    /// Starts a stage that may fail.
    pub fn spawn_fallible(&mut self, stage: Stage, run: impl Future<Output = Result<(), E>> + Send + 'static) {
        let handle = match &self.fault {
            Some((fault, delivered)) if fault.stage == stage => {
                self.tasks.spawn(inject(*fault, delivered.clone(), run))
            }
            _ => self.tasks.spawn(run),
        };
        self.names.insert(handle.id(), stage);
    }

    /// Runs until every stage has ended, or until `grace` after shutdown started. `Ok` when
    /// shutdown was asked for and no stage failed on the way.
    pub async fn run(mut self) -> Result<(), StageError<E>> {
        let (shutdown, grace) = (self.shutdown.clone(), self.grace);
        let grace_over = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(grace_over);
        let mut reported: Option<StageError<E>> = None;
        loop {
            tokio::select! {
                biased;
                // 1. A stage ended.
                joined = self.tasks.join_next_with_id() => {
                    let Some(joined) = joined else { break };
                    let Some(failure) = self.ended(joined) else { continue };
                    if reported.is_none() || failure.panicked() {
                        tracing::error!(stage = %failure.stage(), "{failure}; stopping the other stages");
                    } else {
                        tracing::warn!(stage = %failure.stage(), "{failure} (while stopping)");
                    }
                    self.shutdown.cancel();
                    if reported.as_ref().is_none_or(|r| failure.panicked() && !r.panicked()) {
                        reported = Some(failure);
                    }
                }
                // 2. The grace period is over: stop what still runs.
                _ = &mut grace_over => {
                    for stage in Stage::ALL.iter().filter(|s| self.names.values().any(|n| n == *s)) {
                        tracing::warn!(%stage, "still running at the end of shutdown.grace; stopped it (unconfirmed changes are read again at the next start)");
                    }
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        reported.map_or(Ok(()), Err)
    }

    /// The failure a stage's end is, if it is one.
    fn ended(&mut self, joined: Result<(Id, Result<(), E>), JoinError>) -> Option<StageError<E>> {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let stage = self.names.remove(&id).expect("every task is named");
        match joined {
            Ok((_, Ok(()))) if self.shutdown.is_cancelled() => None,
            Ok((_, Ok(()))) => Some(StageError::Ended { stage }),
            Ok((_, Err(cause))) => Some(StageError::Failed { stage, cause }),
            Err(e) if e.is_panic() => Some(StageError::Panicked { stage, message: panic_message(e.into_panic()) }),
            // Only this module aborts, and not before it stops waiting.
            Err(_) => Some(StageError::Ended { stage }),
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast::<&str>().map(|s| s.to_string()).unwrap_or_else(|_| "(no message)".into()),
    }
}

/// `run`, until `delivered` reaches the fault's count; then dropped where it stands, and the
/// fault happens.
async fn inject<E>(fault: Fault, delivered: Delivered, run: impl Future<Output = Result<(), E>>) -> Result<(), E> {
    let mut run = Box::pin(run);
    let mut check = tokio::time::interval(FAULT_CHECK);
    loop {
        tokio::select! {
            biased;
            // 1. The stage ended by itself.
            r = &mut run => return r,
            // 2. Time for the fault?
            _ = check.tick() => if delivered() >= fault.after { break },
        }
    }
    drop(run);
    match fault.kind {
        FaultKind::Panic => panic!("injected by {FAULT_ENV}"),
        FaultKind::End => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    type Stages = super::Stages<String>;

    /// A stage that runs until shutdown.
    fn until(shutdown: &CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let shutdown = shutdown.clone();
        async move { shutdown.cancelled().await }
    }

    #[tokio::test]
    async fn asked_shutdown_is_ok() {
        let shutdown = CancellationToken::new();
        let mut stages = Stages::new(shutdown.clone(), Duration::from_secs(5));
        stages.spawn(Stage::Dispatcher, until(&shutdown));
        stages.spawn_fallible(Stage::Replication, {
            let s = shutdown.clone();
            async move {
                s.cancelled().await;
                Ok(())
            }
        });
        shutdown.cancel();
        stages.run().await.expect("a shutdown asked for is not a failure");
    }

    #[tokio::test]
    async fn a_stage_ending_stops_the_others_and_is_named() {
        let shutdown = CancellationToken::new();
        let mut stages = Stages::new(shutdown.clone(), Duration::from_secs(5));
        stages.spawn(Stage::Dispatcher, until(&shutdown));
        stages.spawn(Stage::Maintenance, async {});
        let e = stages.run().await.expect_err("an unexpected end is a failure");
        assert!(matches!(e, StageError::Ended { stage: Stage::Maintenance }), "{e}");
        assert_eq!(e.to_string(), "stage maintenance ended unexpectedly");
        assert!(shutdown.is_cancelled(), "the others were told to stop");
    }

    #[tokio::test]
    async fn a_panic_is_reported_over_the_error_it_caused() {
        let shutdown = CancellationToken::new();
        let mut stages = Stages::new(shutdown.clone(), Duration::from_secs(5));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Replication notices the dispatcher gone before the dispatcher's end is joined.
        stages.spawn_fallible(Stage::Replication, async move {
            let _ = rx.await;
            Err("the dispatcher's channel is closed".to_string())
        });
        stages.spawn(Stage::Dispatcher, async move {
            drop(tx);
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("bug in dispatch");
        });
        let e = stages.run().await.expect_err("a panic is a failure");
        assert_eq!(e.to_string(), "stage dispatcher ended unexpectedly: panicked: bug in dispatch");
    }

    #[tokio::test]
    async fn a_panic_during_shutdown_is_a_failure() {
        let shutdown = CancellationToken::new();
        let mut stages = Stages::new(shutdown.clone(), Duration::from_secs(5));
        let s = shutdown.clone();
        stages.spawn(Stage::Outbox, async move {
            s.cancelled().await;
            panic!("while draining");
        });
        shutdown.cancel();
        let e = stages.run().await.expect_err("a panic is a failure");
        assert!(matches!(e, StageError::Panicked { stage: Stage::Outbox, .. }), "{e}");
    }

    #[tokio::test]
    async fn a_stage_still_running_at_the_grace_is_stopped() {
        let shutdown = CancellationToken::new();
        let grace = Duration::from_millis(200);
        let mut stages = Stages::new(shutdown.clone(), grace);
        stages.spawn(Stage::StoreWriter, std::future::pending());
        stages.spawn(Stage::Dispatcher, until(&shutdown));
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        stages.run().await.expect("stopping a stage at the grace is no failure");
        let took = started.elapsed();
        assert!(took >= grace && took < grace * 5, "stopped at the grace, not before or much after: {took:?}");
    }

    #[test]
    fn the_fault_hook_is_parsed_strictly() {
        let f: Fault = "store writer:end:after=3".parse().unwrap();
        assert_eq!(f, Fault { stage: Stage::StoreWriter, kind: FaultKind::End, after: 3 });
        let f: Fault = "dispatcher:panic:after=0".parse().unwrap();
        assert_eq!(f, Fault { stage: Stage::Dispatcher, kind: FaultKind::Panic, after: 0 });
        for bad in [
            "",
            "dispatcher",
            "dispatch:panic:after=1",
            "dispatcher:crash:after=1",
            "dispatcher:panic:3",
            "dispatcher:panic:after=x",
            "dispatcher:panic:after=1:x",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?} is refused");
        }
    }

    #[tokio::test]
    async fn an_injected_fault_waits_for_its_count() {
        let shutdown = CancellationToken::new();
        let count = Arc::new(AtomicU64::new(0));
        let delivered: Delivered = {
            let count = count.clone();
            Arc::new(move || count.load(Ordering::Relaxed))
        };
        let fault = Fault { stage: Stage::Dispatcher, kind: FaultKind::Panic, after: 2 };
        let mut stages = Stages::new(shutdown.clone(), Duration::from_secs(5)).with_fault(Some(fault), delivered);
        stages.spawn(Stage::Dispatcher, until(&shutdown));
        stages.spawn(Stage::Outbox, until(&shutdown));
        let run = tokio::spawn(stages.run());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!run.is_finished(), "no fault before its count");
        count.store(2, Ordering::Relaxed);
        let e = tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap().expect_err("fault");
        assert!(matches!(e, StageError::Panicked { stage: Stage::Dispatcher, .. }), "{e}");
    }
}
