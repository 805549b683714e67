//! A lost replication slot is never replaced silently: walhook stops streaming, keeps serving
//! the API, says so (ERROR log, `/readyz` 503 with the reason, a metric) and waits for
//! `walhook slot-reset`, which records the gap and creates the new slot. A prerequisite that
//! breaks while walhook runs (a table dropped from the publication) is just as loud, and its
//! time window is recorded.

use crate::common;

use std::time::Duration;

use crate::common::{own_cluster, wait_for, Env, Proc, ACCOUNT_A};
use walhook::local::receiver::Received;

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
    env.wait_streaming().await;
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
    env.wait_streaming().await;
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
    env.wait_streaming().await;
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
    env.wait_streaming().await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_from_before_the_record_is_adopted_and_its_position_recorded() {
    // An upgrade: the slot exists, walhook.slot_state has no row for it yet.
    let env = Env::new("slot_adopted").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    env.sql("SELECT pg_create_logical_replication_slot('slot_adopted', 'pgoutput')").await;
    let created =
        text(&env, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'slot_adopted'").await;
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
    env.wait_streaming().await;
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
    env.wait_streaming().await;
    let other_metrics = common::free_port();
    let second = format!(
        "{FAST_RECHECK}[api]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{other_metrics}\"\n",
        common::free_port()
    );
    let _second = env.spawn_binary(&second);
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
