//! Saying why the store writer cannot commit.
//!
//! What must hold: a write (a batch, an outbox probe's queries, a raise of the replication
//! session's confirm ceiling) that has not finished `database.write_stall_after` after it
//! started is reported as a stall ([`StoreHealth`]), with what walhook's sessions wait on *now*: a lock and who holds it, commits waiting for a
//! synchronous standby, or the database's last error. The cause is looked up again while the
//! write waits, because it moves (a lock released while the commit behind it waits for a
//! standby): an SRE never reads a cause that no longer holds for longer than
//! [`RECHECK_EVERY`]. The report clears at the store writer's next commit, or when the
//! write outside it that reported it finishes.

use std::time::Duration;

use tokio::time::Instant;

use crate::ops::status::{StallOf, StoreHealth};
use crate::pg::db::{Db, DbError};

/// What a write is watched with.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    /// For a connection of its own to look up what walhook's sessions wait on.
    pub db: &'a Db,
    /// Where the stall is reported.
    pub health: &'a StoreHealth,
    /// How long a write may take before it is a stall (`database.write_stall_after`).
    pub stall_after: Duration,
    /// Whose write it is (each clears only its own report).
    pub of: StallOf,
}

/// While a stall lasts, its cause is looked up again this often (on a connection of its own).
pub(super) const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// Awaits `write`, reporting a stall if it has not finished `stall_after` after `started`,
/// and again every [`RECHECK_EVERY`] while it waits, each time with its cause as it is then.
/// (The store writer clears the report at its next commit.)
pub async fn watched<T>(ctx: Watch<'_>, write: impl std::future::Future<Output = T>, started: Instant) -> T {
    tokio::pin!(write);
    let mut look_at = started + ctx.stall_after;
    loop {
        tokio::select! {
            biased;
            // 1. The write finished.
            r = &mut write => return r,
            // 2. It takes too long: say so, with what it waits on now, and keep waiting.
            _ = tokio::time::sleep_until(look_at) => {
                let cause = cause(ctx).await;
                let what = match ctx.of {
                    StallOf::Store => "a store write",
                    StallOf::Ceiling => "the replication session's raise of its confirm ceiling (walhook.slot_state)",
                };
                ctx.health.stall(ctx.of, format!("{what} has not committed for {:?}: {cause}", ctx.stall_after));
                look_at = Instant::now() + RECHECK_EVERY;
            }
        }
    }
}

/// Like [`watched`], for a write outside the store writer, the only one of its kind at a time
/// (a raise of the confirm ceiling): its stall is cleared when it finishes, or is dropped
/// unfinished (a session ended around it), and no other writer's is.
pub async fn watched_alone<T>(ctx: Watch<'_>, write: impl std::future::Future<Output = T>, started: Instant) -> T {
    /// Clears `of`'s report however the write ends.
    struct Unstall<'a>(&'a StoreHealth, StallOf);
    impl Drop for Unstall<'_> {
        fn drop(&mut self) {
            self.0.unstall(self.1);
        }
    }
    let _clear = Unstall(ctx.health, ctx.of);
    watched(ctx, write, started).await
}

/// What the writer waits on: what walhook's sessions are found waiting on, else the
/// database's last error, else what the server says.
async fn cause(ctx: Watch<'_>) -> String {
    match (waits_of(ctx.db).await, ctx.health.last_error()) {
        (Waits::Found(waits), _) => waits,
        (_, Some(e)) => format!("the database's last answer: {e}"),
        (Waits::Nothing, None) => "no lock wait found: an overloaded database, or a slow disk?".to_owned(),
        (Waits::Unanswered(why), None) => why,
    }
}

/// What walhook's sessions were found waiting on.
enum Waits {
    /// Lock waits and their holders, or commits waiting for a synchronous standby.
    Found(String),
    /// Nothing they wait on is known.
    Nothing,
    /// The lookup got no answer (why).
    Unanswered(String),
}

/// Lock waits of walhook's sessions and who holds each lock (a prepared transaction named
/// with its gid; a holder whose commit waits for a synchronous standby says so).
const LOCK_WAITS: &str = "SELECT DISTINCT CASE WHEN bp.pid = 0 THEN \
         format('waiting for a lock (%s) held by a prepared transaction (%s): COMMIT PREPARED or ROLLBACK \
                 PREPARED it', w.wait_event, coalesce((SELECT string_agg(format('gid %L prepared at %s by %s', \
                 p.gid, to_char(p.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), p.owner), ', ') \
                 FROM pg_prepared_xacts p WHERE p.database = current_database()), 'see pg_prepared_xacts')) \
       ELSE format('waiting for a lock (%s) held by pid %s (user %s, application %s, %s since %s, query: %s)', \
                 w.wait_event, bp.pid, coalesce(b.usename::text, '?'), coalesce(b.application_name, '?'), \
                 coalesce(b.state, '?'), coalesce(to_char(b.state_change AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '?'), coalesce(left(b.query, 120), '?')) \
            || CASE WHEN b.wait_event = 'SyncRep' THEN format('; its commit waits for a synchronous standby to \
                 confirm it (synchronous_standby_names = %L): start or reconnect the standby, or take it out of \
                 synchronous_standby_names and reload', current_setting('synchronous_standby_names')) ELSE '' END \
       END \
     FROM pg_stat_activity w \
     CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid) \
     LEFT JOIN pg_stat_activity b ON b.pid = bp.pid \
     WHERE w.datname = current_database() AND w.usename = current_user \
       AND w.pid <> pg_backend_pid() AND w.wait_event_type = 'Lock' \
     LIMIT 3";

/// walhook's sessions whose commit waits for a synchronous standby to confirm it (the commit
/// is flushed locally, but the session waits, as does everything queued behind it).
const SYNC_REP_WAITS: &str = "SELECT format('walhook''s commits wait for a synchronous standby to confirm them \
       (synchronous_standby_names = %L): start or reconnect the standby, or take it out of \
       synchronous_standby_names and reload', current_setting('synchronous_standby_names')) \
     FROM pg_stat_activity \
     WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid() \
       AND wait_event = 'SyncRep' \
     HAVING count(*) > 0";

/// What walhook's own sessions wait on, read on a connection of its own (the pool's may all be
/// waiting): lock waits first, else commits waiting for a synchronous standby.
async fn waits_of(db: &Db) -> Waits {
    let looked = tokio::time::timeout(Duration::from_secs(3), async {
        let client = db.connect().await?;
        let mut waits: Vec<String> = client.query(LOCK_WAITS, &[]).await?.iter().map(|r| r.get(0)).collect();
        if waits.is_empty() {
            waits.extend(client.query(SYNC_REP_WAITS, &[]).await?.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok::<_, DbError>(waits)
    })
    .await;
    match looked {
        Ok(Ok(waits)) if !waits.is_empty() => Waits::Found(waits.join("; ")),
        Ok(Ok(_)) => Waits::Nothing,
        Ok(Err(e)) => Waits::Unanswered(format!("the database does not answer a new connection either: {e}")),
        Err(_) => Waits::Unanswered("the database does not answer a new connection within 3 s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A write outside the store writer that is dropped while reported stalled (its session
    /// ended around it) leaves no stale report; one that finishes clears its own only.
    #[tokio::test]
    async fn a_raise_dropped_or_finished_clears_its_own_stall_only() {
        // Nothing listens on port 1: the cause lookup fails at once.
        let cfg = Config::from_toml("[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n").unwrap();
        let db = Db::new(&cfg.database).unwrap();
        let health = StoreHealth::default();
        let ceiling = Watch { db: &db, health: &health, stall_after: Duration::ZERO, of: StallOf::Ceiling };
        let never = std::future::pending::<()>();
        let mut stuck = Box::pin(watched_alone(ceiling, never, Instant::now()));
        let reported = async {
            while health.problem().is_none() {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            _ = &mut stuck => unreachable!("the write never finishes"),
            _ = tokio::time::timeout(Duration::from_secs(10), reported) => {}
        }
        assert!(health.problem().is_some_and(|p| p.contains("confirm ceiling")), "{:?}", health.problem());
        drop(stuck);
        assert_eq!(health.problem(), None, "a dropped raise leaves no stale report");
        health.stall(StallOf::Store, "store write waits".into());
        watched_alone(ceiling, async {}, Instant::now()).await;
        assert_eq!(health.problem().as_deref(), Some("store write waits"), "a finished raise clears its own only");
    }
}
