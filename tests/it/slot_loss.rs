//! A lost replication slot is never replaced silently: walhook stops streaming, keeps serving
//! the API, says so (ERROR log, `/readyz` 503 with the reason, a metric) and waits for
//! `walhook slot-reset`, which records the gap and creates the new slot. A prerequisite that
//! breaks while walhook runs (a table dropped from the publication) is just as loud, and its
//! time window is recorded.

use crate::common;

use std::time::Duration;

use crate::common::{own_cluster, wait_for, Env, Proc, Readiness, ACCOUNT_A};
use walhook::local::receiver::{Received, Reply};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// `/readyz`: status and body.
async fn readyz(env: &Env) -> (u16, serde_json::Value) {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/readyz", env.metrics_port)).await else {
        return (0, serde_json::Value::Null); // not listening yet
    };
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default())
}

/// Waits until `/readyz` answers 503 with a reason containing every needle; returns the reason.
async fn wait_not_ready(env: &Env, needles: &[&str], within: Duration) -> String {
    let mut last = (0, serde_json::Value::Null);
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        last = readyz(env).await;
        let reason = last.1["reason"].as_str().unwrap_or_default().to_owned();
        if last.0 == 503 && needles.iter().all(|n| reason.contains(n)) {
            return reason;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered 503 naming {needles:?} within {within:?}; last answer {last:?}");
}

async fn contact(env: &Env, name: &str) {
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', '{name}')")).await;
}

fn has(received: &[Received], name: &str) -> bool {
    received.iter().any(|r| r.json()["data"]["first_name"] == name)
}

/// Terminates whatever streams the slot and drops it, retrying until the drop succeeds
/// (walhook reconnects within a second or so, so a single attempt may find it active again).
async fn drop_slot_behind_walhooks_back(env: &Env) {
    let slot = env.name.clone();
    wait_for(Duration::from_secs(30), || async {
        let _ = env
            .client
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        env.client.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).await.is_ok()
    })
    .await;
}

async fn slot_count(env: &Env) -> i64 {
    env.scalar_i64(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'", env.name)).await
}

async fn text(env: &Env, q: &str) -> String {
    env.client.query_one(q, &[]).await.unwrap_or_else(|e| panic!("{q}: {e}")).get(0)
}

/// Runs `walhook slot-reset` to its end; returns (success, output).
async fn slot_reset(env: &Env) -> (bool, String) {
    let mut reset: Proc = env.spawn_command("slot-reset", "");
    let status = reset.wait_exit(Duration::from_secs(60)).await.expect("slot-reset ends");
    (status.success(), reset.log_text())
}

const FAST_RECHECK: &str = "[replication]\nrecheck_interval = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_not_recreated_until_slot_reset_records_the_gap() {
    let env = Env::new("slot_lost_dropped").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    env.ready(Readiness::Streaming).await;
    contact(&env, "before").await;
    env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("delivered before the loss");

    drop_slot_behind_walhooks_back(&env).await;
    contact(&env, "during").await;
    let during_lsn = text(&env, "SELECT pg_current_wal_lsn()::text").await;

    let reason = wait_not_ready(&env, &["replication slot slot_lost_dropped", "lost"], Duration::from_secs(30)).await;
    assert_eq!(slot_count(&env).await, 0, "walhook must not create a slot over one it streamed from: {reason}");
    wait_for(Duration::from_secs(10), || async { env.metric("walhook_replication_slot_lost").await == 1.0 }).await;
    let confirmed =
        text(&env, "SELECT confirmed_lsn::text FROM walhook.slot_state WHERE slot = 'slot_lost_dropped'").await;
    wait_for(Duration::from_secs(10), || async {
        wh.log_text().lines().any(|l| l.contains("ERROR") && l.contains("slot_lost_dropped") && l.contains(&confirmed))
    })
    .await;
    assert!(reason.contains(&confirmed), "the reason names the last confirmed position {confirmed}: {reason}");
    // Still there for everything else: liveness and the API answer.
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", env.metrics_port)).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let api = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/webhooks-list", env.api_port))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(api.status().as_u16(), 401, "the API keeps answering");
    // The ERROR is logged once per state change, not on every poll: a fixed wait, on purpose,
    // long enough for several re-checks (they come on a timer; there is nothing to wait for).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(slot_count(&env).await, 0, "still no slot after several re-checks");
    let errors = wh.log_text().lines().filter(|l| l.contains("ERROR") && l.contains("slot_lost_dropped")).count();
    assert_eq!(errors, 1, "one ERROR per state change:\n{}", wh.log_text());

    let (ok, out) = slot_reset(&env).await;
    assert!(ok, "slot-reset succeeds on a lost slot:\n{out}");
    assert_eq!(slot_count(&env).await, 1, "slot-reset creates the slot");
    let gap = env
        .client
        .query_one(
            "SELECT kind, from_lsn::text, to_lsn::text, from_time IS NOT NULL AND to_time >= from_time, \
                    from_lsn <= $1::text::pg_lsn AND to_lsn >= $1::text::pg_lsn \
             FROM walhook.replication_gaps WHERE slot = 'slot_lost_dropped'",
            &[&during_lsn],
        )
        .await
        .expect("exactly one gap row");
    assert_eq!(gap.get::<_, String>(0), "slot_lost");
    assert_eq!(gap.get::<_, String>(1), confirmed, "the gap starts at the last confirmed position");
    assert!(gap.get::<_, bool>(3), "the gap has both times, in order");
    assert!(gap.get::<_, bool>(4), "the gap covers the contact written while the slot was gone");
    assert!(out.contains(&confirmed) && out.contains(&gap.get::<_, String>(2)), "slot-reset reports the gap:\n{out}");

    // The waiting walhook resumes by itself on the new slot.
    env.ready(Readiness::Streaming).await;
    wait_for(Duration::from_secs(20), || async { readyz(&env).await.0 == 200 }).await;
    wait_for(Duration::from_secs(10), || async { env.metric("walhook_replication_slot_lost").await == 0.0 }).await;
    contact(&env, "after").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "after")).await.expect("delivered after the reset");
    assert!(!has(&env.receiver.received(), "during"), "the gap is recorded, not papered over");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_from_the_publication_makes_walhook_not_ready_and_records_the_window() {
    let env = Env::new("slot_pub_drop").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created", "company.created"]).await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    env.ready(Readiness::Streaming).await;
    wait_for(Duration::from_secs(20), || async { readyz(&env).await.0 == 200 }).await;

    env.sql("ALTER PUBLICATION slot_pub_drop DROP TABLE contacts").await;
    let reason = wait_not_ready(&env, &["publication slot_pub_drop", "public.contacts"], Duration::from_secs(15)).await;
    wait_for(Duration::from_secs(10), || async {
        env.metric("walhook_replication_prerequisite_failing{check=\"publication\"}").await == 1.0
    })
    .await;
    wait_for(Duration::from_secs(10), || async {
        wh.log_text()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("ALTER PUBLICATION slot_pub_drop ADD TABLE public.contacts"))
    })
    .await;
    let open = env
        .scalar_i64(
            "SELECT count(*) FROM walhook.replication_gaps WHERE slot = 'slot_pub_drop' AND kind = 'publication' \
             AND from_time IS NOT NULL AND from_lsn IS NOT NULL AND to_time IS NULL",
        )
        .await;
    let rows = text(&env, "SELECT COALESCE(string_agg(g::text, E'\\n'), 'none') FROM walhook.replication_gaps g").await;
    assert_eq!(open, 1, "an open gap row while the table is missing ({reason}):\n{rows}");
    // A contact of the window: not in the stream (pgoutput decodes with the catalog of its
    // moment), so it is the gap row, not a later re-read, that accounts for it.
    contact(&env, "while-out").await;
    // The other tables keep streaming meanwhile.
    env.sql(&format!("INSERT INTO companies (account_id, name) VALUES ('{A}', 'still-flowing')")).await;
    env.receiver
        .wait_until(Duration::from_secs(20), |rs| rs.iter().any(|r| r.json()["data"]["name"] == "still-flowing"))
        .await
        .expect("other tables keep flowing");

    env.sql("ALTER PUBLICATION slot_pub_drop ADD TABLE contacts").await;
    wait_for(Duration::from_secs(15), || async { readyz(&env).await.0 == 200 }).await;
    assert_eq!(env.metric("walhook_replication_prerequisite_failing{check=\"publication\"}").await, 0.0);
    let closed = env
        .scalar_i64(
            "SELECT count(*) FROM walhook.replication_gaps WHERE slot = 'slot_pub_drop' AND kind = 'publication' \
             AND to_time >= from_time AND to_lsn >= from_lsn",
        )
        .await;
    assert_eq!(closed, 1, "the window is closed once the check passes again");
    contact(&env, "after").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "after")).await.expect("contacts flow again");
    assert!(!has(&env.receiver.received(), "while-out"), "re-adding the table does not bring the window back");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_identity_that_drops_account_id_while_running_is_reported_until_fixed() {
    let env = Env::new("slot_identity").await;
    let wh = env.start(FAST_RECHECK).await;
    wait_for(Duration::from_secs(20), || async { readyz(&env).await.0 == 200 }).await;
    env.sql("ALTER TABLE contacts REPLICA IDENTITY DEFAULT").await;
    wait_not_ready(&env, &["public.contacts", "REPLICA IDENTITY FULL"], Duration::from_secs(15)).await;
    assert_eq!(env.metric("walhook_replication_prerequisite_failing{check=\"replica_identity\"}").await, 1.0);
    env.sql("ALTER TABLE contacts REPLICA IDENTITY FULL").await;
    wait_for(Duration::from_secs(15), || async { readyz(&env).await.0 == 200 }).await;
    let closed = env
        .scalar_i64(
            "SELECT count(*) FROM walhook.replication_gaps WHERE kind = 'replica_identity' AND to_time >= from_time",
        )
        .await;
    assert_eq!(closed, 1, "the window is recorded and closed");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_reset_refuses_a_healthy_slot() {
    let env = Env::new("slot_reset_healthy").await;
    let wh = env.start("").await;
    let (ok, out) = slot_reset(&env).await;
    assert!(!ok, "slot-reset must refuse a healthy slot:\n{out}");
    assert!(out.contains("slot_reset_healthy is healthy") && out.contains("nothing to reset"), "says why:\n{out}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.replication_gaps").await, 0);
    env.ready(Readiness::Streaming).await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_from_before_the_record_is_adopted_and_its_position_recorded() {
    // An upgrade: an older walhook created the slot (after its publication) and kept no
    // record of it; the new `walhook migrate` adopts it.
    let env = Env::unmigrated(common::cluster(), "slot_adopted").await;
    walhook::pg::migrate::migrate(&env.db, &env.config("")).await.expect("the schema part of migrate");
    env.sql("SELECT pg_create_logical_replication_slot('slot_adopted', 'pgoutput')").await;
    let created =
        text(&env, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'slot_adopted'").await;
    let migrated = walhook::app::migrate(&env.db, &env.config("")).await.expect("migrate");
    assert_eq!(migrated.slot, walhook::app::Prepared::Adopted { lsn: created.clone() });
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start(FAST_RECHECK).await;
    contact(&env, "adopted").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "adopted")).await.expect("streams the adopted slot");
    assert_eq!(text(&env, "SELECT start_lsn::text FROM walhook.slot_state WHERE slot = 'slot_adopted'").await, created);
    // The confirmed position is recorded as it moves.
    wait_for(Duration::from_secs(20), || async {
        env.scalar_i64(
            "SELECT count(*) FROM walhook.slot_state WHERE slot = 'slot_adopted' AND confirmed_lsn > start_lsn",
        )
        .await
            == 1
    })
    .await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_replaced_only_by_slot_reset() {
    // Its own cluster: a tiny max_slot_wal_keep_size lets a checkpoint invalidate the slot.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&["max_slot_wal_keep_size = 1MB"])).await.unwrap();
    let env = Env::on(&cluster, "slot_invalidated").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start(FAST_RECHECK).await;
    contact(&env, "before").await;
    let written = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "before")).await.expect("streaming");
    // Let walhook confirm it, then stop it: the idle slot falls behind.
    wait_for(Duration::from_secs(20), || async { env.confirmed_lsn().await >= written }).await;
    wh.stop().await.unwrap();
    env.sql("CREATE TABLE filler (x text)").await;
    wait_for(Duration::from_secs(60), || async {
        env.sql(
            "INSERT INTO filler SELECT repeat('x', 200) FROM generate_series(1, 20000); \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await;
        text(&env, "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'slot_invalidated'")
            .await
            == "lost"
    })
    .await;

    let wh = env.spawn_binary(FAST_RECHECK);
    wait_not_ready(&env, &["replication slot slot_invalidated", "invalidated"], Duration::from_secs(30)).await;
    wait_for(Duration::from_secs(10), || async { env.metric("walhook_replication_slot_lost").await == 1.0 }).await;
    let (ok, out) = slot_reset(&env).await;
    assert!(ok, "slot-reset replaces an invalidated slot:\n{out}");
    let lost =
        text(&env, "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'slot_invalidated'")
            .await;
    assert_ne!(lost, "lost", "the invalidated slot was dropped and created anew");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.replication_gaps WHERE kind = 'slot_lost'").await, 1);
    env.ready(Readiness::Streaming).await;
    contact(&env, "after").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "after")).await.expect("delivered after the reset");
    drop(wh);
    drop(env);
    drop(cluster);
}

/// A publication that stops publishing updates or deletes, or filters rows or columns of a
/// table walhook reads, loses changes as surely as one missing a table: not ready, the
/// metric, until it is put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_actions_row_filters_and_column_lists_are_rechecked() {
    let env = Env::new("slot_pub_shape").await;
    let wh = env.start(FAST_RECHECK).await;
    wait_for(Duration::from_secs(20), || async { readyz(&env).await.0 == 200 }).await;
    let failing = "walhook_replication_prerequisite_failing{check=\"publication\"}";

    env.sql("ALTER PUBLICATION slot_pub_shape SET (publish = 'insert')").await;
    wait_not_ready(&env, &["publication slot_pub_shape", "update", "delete"], Duration::from_secs(15)).await;
    wait_for(Duration::from_secs(10), || async { env.metric(failing).await == 1.0 }).await;
    env.sql("ALTER PUBLICATION slot_pub_shape SET (publish = 'insert, update, delete, truncate')").await;
    wait_for(Duration::from_secs(15), || async { readyz(&env).await.0 == 200 }).await;

    env.sql("ALTER PUBLICATION slot_pub_shape SET TABLE contacts WHERE (lead_score > 100), companies (id, account_id), activities, projects, walhook.endpoints").await;
    wait_not_ready(
        &env,
        &["public.contacts", "row filter", "public.companies", "column list"],
        Duration::from_secs(15),
    )
    .await;
    // `walhook migrate` puts the publication back as walhook needs it.
    let report = walhook::pg::migrate::migrate(&env.db, &env.config("")).await.expect("migrate");
    assert_eq!(report.publication_restored.len(), 2, "{:?}", report.publication_restored);
    wait_for(Duration::from_secs(15), || async { readyz(&env).await.0 == 200 }).await;
    assert_eq!(env.metric(failing).await, 0.0);
    wh.stop().await.unwrap();
}

/// What a replica saw of the slot while it held it is not its to report once another holds
/// the slot: standing by again, it answers /readyz 200 (standby) and its gauges go back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_holding_the_slot_forgets_what_it_reported() {
    let env = Env::new("slot_forget").await;
    let _first = env.spawn_binary(FAST_RECHECK);
    env.ready(Readiness::Streaming).await;
    let other_metrics = common::free_port();
    let second = format!(
        "{FAST_RECHECK}[api]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{other_metrics}\"\n",
        common::free_port()
    );
    let _second = env.spawn_binary(&second);
    // Both started (past their checks), as an operator sees it: one streams, one stands by.
    common::wait_ready(format!("127.0.0.1:{other_metrics}").parse().unwrap(), Readiness::Standby).await;
    env.sql("ALTER TABLE contacts REPLICA IDENTITY DEFAULT").await;
    wait_not_ready(&env, &["public.contacts"], Duration::from_secs(15)).await;
    // The first replica loses its lock; the second takes the slot over.
    let n = env
        .scalar_i64(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(n, 1, "one leadership lock held");
    let standing_by = || async {
        let (status, body) = readyz(&env).await;
        status == 200 && body["standby"] == true
    };
    wait_for(Duration::from_secs(30), standing_by).await;
    assert_eq!(env.metric("walhook_replication_prerequisite_failing{check=\"replica_identity\"}").await, 0.0);
    env.sql("ALTER TABLE contacts REPLICA IDENTITY FULL").await;
}

/// A slot of walhook's name that walhook did not create (failover tooling's permanent slots,
/// a cleanup script) is a gap, never adopted silently: neither while walhook runs nor while
/// it was down. `slot-reset` adopts it and records the gap up to its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_created_again_by_someone_else_is_lost_until_slot_reset_adopts_it_with_the_gap() {
    let env = Env::new("slot_recreated").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    env.ready(Readiness::Streaming).await;
    contact(&env, "before").await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "before")).await.expect("streaming");

    // While walhook runs: its slot goes, a row is written, a slot of the same name comes back.
    drop_slot_behind_walhooks_back(&env).await;
    contact(&env, "between").await;
    let between = text(&env, "SELECT pg_current_wal_lsn()::text").await;
    wait_not_ready(&env, &["replication slot slot_recreated", "lost"], Duration::from_secs(30)).await;
    env.sql("SELECT pg_create_logical_replication_slot('slot_recreated', 'pgoutput')").await;
    contact(&env, "after").await;
    let reason =
        wait_not_ready(&env, &["slot_recreated", "not the one walhook streamed from"], Duration::from_secs(30)).await;
    assert!(reason.contains("walhook slot-reset"), "says what to do: {reason}");
    // And it stays so: looked at again and again, never adopted by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = readyz(&env).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(env.metric("walhook_replication_slot_lost").await, 1.0);
    assert!(!has(&env.receiver.received(), "after"), "nothing is streamed from a slot walhook did not create");

    let (ok, out) = slot_reset(&env).await;
    assert!(ok && out.contains("adopted replication slot slot_recreated"), "slot-reset adopts the slot:\n{out}");
    let covered = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM walhook.replication_gaps WHERE slot = 'slot_recreated' AND kind = 'slot_lost' \
             AND from_lsn <= '{between}' AND to_lsn >= '{between}'"
        ))
        .await;
    assert_eq!(covered, 1, "the gap covers the row written while the slot was gone:\n{out}");
    env.ready(Readiness::Streaming).await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "after")).await.expect("streams the adopted slot");
    assert!(!has(&env.receiver.received(), "between"), "the gap is recorded, not papered over");

    // While walhook is down: the same, found at start-up.
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
    env.sql("SELECT pg_drop_replication_slot('slot_recreated')").await;
    contact(&env, "down-between").await;
    env.sql("SELECT pg_create_logical_replication_slot('slot_recreated', 'pgoutput')").await;
    contact(&env, "down-after").await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    wait_not_ready(&env, &["slot_recreated", "not the one walhook streamed from"], Duration::from_secs(30)).await;
    let (ok, out) = slot_reset(&env).await;
    assert!(ok && out.contains("adopted replication slot slot_recreated"), "{out}");
    env.ready(Readiness::Streaming).await;
    env.receiver.wait_until(Duration::from_secs(20), |rs| has(rs, "down-after")).await.expect("streams again");
    assert!(!has(&env.receiver.received(), "down-between"));
    let gaps = env.scalar_i64("SELECT count(*) FROM walhook.replication_gaps WHERE slot = 'slot_recreated'").await;
    assert_eq!(gaps, 2, "one gap per replacement");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
}

/// The gap of a slot lost while confirmation was stuck (a forgotten lock on walhook's table)
/// starts no later than any change it lost, in position and in time, so the runbook's repair
/// (`updated_at BETWEEN from_time AND to_time`) finds every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slots_gap_starts_no_later_than_any_change_it_lost() {
    let cluster =
        tokio::task::spawn_blocking(|| own_cluster(&["max_slot_wal_keep_size = 1MB", "max_prepared_transactions = 4"]))
            .await
            .unwrap();
    let env = Env::on(&cluster, "slot_gap_time").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    env.ready(Readiness::Streaming).await;
    // Rows keep coming, about a hundred a second, each in its own transaction.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (stop, url) = (stop.clone(), env.url.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                client
                    .batch_execute(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'w{n}')"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    env.receiver.wait_until(Duration::from_secs(20), |rs| rs.len() >= 50).await.expect("streaming");
    // Someone forgets a lock on walhook's table, in a prepared transaction (no session shows
    // its start, so the gap's time must come from walhook's own looks): nothing more is
    // recorded, so nothing confirmed.
    let (locker, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    locker.batch_execute("BEGIN; LOCK TABLE walhook.deliveries; PREPARE TRANSACTION 'forgotten'").await.unwrap();
    // And the receiver fails from now on: what is read from now waits to be stored for a retry.
    env.receiver.set_default("hook", Reply::Status(500));
    tokio::time::sleep(Duration::from_secs(3)).await; // rows keep coming meanwhile
    env.sql("CREATE TABLE filler (x text)").await;
    wait_for(Duration::from_secs(90), || async {
        env.sql(
            "INSERT INTO filler SELECT repeat('x', 200) FROM generate_series(1, 20000); \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await;
        text(&env, "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'slot_gap_time'").await
            == "lost"
    })
    .await;
    stop.cancel();
    writer.await.unwrap();
    locker.batch_execute("ROLLBACK PREPARED 'forgotten'").await.unwrap();
    wait_not_ready(&env, &["replication slot slot_gap_time", "invalidated"], Duration::from_secs(30)).await;
    let (ok, out) = slot_reset(&env).await;
    assert!(ok, "{out}");
    env.ready(Readiness::Streaming).await;
    // What arrived is all that will: the rows of the gap are gone with the old slot.
    env.quiescent().await;
    let got: Vec<String> = (env.receiver.received().iter())
        .filter(|r| r.answered == 200)
        .map(|r| r.json()["data"]["first_name"].as_str().unwrap().to_owned())
        .collect();
    let row = env
        .client
        .query_one(
            "SELECT count(*), \
                    count(*) FILTER (WHERE c.updated_at < g.from_time), \
                    count(*) FILTER (WHERE c.updated_at > g.to_time), \
                    string_agg(c.first_name || ' at ' || c.updated_at::text, ', ') FILTER (WHERE c.updated_at < g.from_time), \
                    g.from_time::text \
             FROM contacts c, walhook.replication_gaps g \
             WHERE g.slot = 'slot_gap_time' AND NOT c.first_name = ANY($1) GROUP BY g.from_time, g.to_time",
            &[&got],
        )
        .await
        .expect("one gap, and rows it lost");
    let (lost, before, after): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(lost > 0, "the loss lost rows");
    assert_eq!(
        before,
        0,
        "{before} of {lost} lost rows were written before the gap's from_time {}: {:?}",
        row.get::<_, String>(4),
        row.get::<_, Option<String>>(3)
    );
    assert_eq!(after, 0, "and none after its to_time");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
    drop(env);
    drop(cluster);
}

/// Someone else advancing walhook's slot (`pg_replication_slot_advance`, a consumer on it)
/// past what walhook has handled is a loss, reported like any other, even when walhook was
/// killed in the middle of a backlog: its confirm ceiling never runs ahead of what it handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_by_someone_else_past_what_walhook_handled_is_lost() {
    let env = Env::new("slot_advanced").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    env.receiver.set_default("hook", Reply::Delay(Duration::from_millis(300), 200));
    // A backlog that takes a while to deliver.
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'b' || i FROM generate_series(1, 200) i"
    ))
    .await;
    for i in 0..200 {
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'one-{i}')")).await;
    }
    let ceiling = "SELECT COALESCE((confirm_ceiling - '0/0')::int8, 0) FROM walhook.slot_state";
    let first = env.scalar_i64(ceiling).await;
    let mut wh = env.spawn_binary(FAST_RECHECK);
    // Killed right after its first confirm: most of the backlog is not handled yet.
    wait_for(Duration::from_secs(60), || async { env.scalar_i64(ceiling).await > first }).await;
    wh.kill9();
    // (The server notices the dead walsender's connection a moment later; the slot can be moved
    // only once it is released.)
    let active = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'slot_advanced' AND active";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(active).await == 0 }).await;
    let (confirmed, end) =
        (env.confirmed_lsn().await, env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await);
    env.sql(
        "SELECT pg_replication_slot_advance('slot_advanced', \
         (SELECT confirmed_flush_lsn + ((pg_current_wal_lsn() - confirmed_flush_lsn) / 2)::numeric \
          FROM pg_replication_slots WHERE slot_name = 'slot_advanced'))",
    )
    .await;
    let wh = env.spawn_binary(FAST_RECHECK);
    let reason = wait_not_ready(&env, &["slot_advanced", "not the one walhook streamed from"], Duration::from_secs(30))
        .await
        .to_string();
    assert!(reason.contains("advanced"), "{reason} (slot was at {confirmed:#x}, WAL at {end:#x})");
    drop(wh);
}
