//! Supervised stages: a stage that dies in the middle of a load ends the process by itself,
//! non-zero and named; the slot is not confirmed past a delivery that was never recorded;
//! and the next start delivers every change (duplicates allowed, one webhook-id per change).
//! The real binary runs with the `TEST_WALHOOK_FAULT` test hook (see `src/supervise.rs`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{wait_for, wait_for_keys, Env, Readiness, ACCOUNT_A};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// Writes `n` single-row transactions on its own connection; returns each row's id with a
/// WAL position inside its transaction (after the insert, before the commit).
async fn load(url: String, n: usize) -> Vec<(String, i64)> {
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("70000000-0000-4000-8000-{i:012}");
        let tx = client.transaction().await.unwrap();
        tx.batch_execute(&format!(
            "INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', 'load{i}')"
        ))
        .await
        .unwrap();
        let inside: i64 = tx.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[]).await.unwrap().get(0);
        tx.commit().await.unwrap();
        rows.push((id, inside));
    }
    rows
}

/// Runs the binary with `fault` injected under load, checks it exits by itself naming
/// `stage`, that nothing unrecorded was confirmed, and that a restart delivers everything.
async fn stage_dies_then_restart_loses_nothing(name: &str, fault: &str, stage: &str) {
    let env = Env::new(name).await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let mut first = env.spawn_command_with("run", "", |c| {
        c.env("TEST_WALHOOK_FAULT", fault);
    });
    env.ready(Readiness::Streaming).await;
    let n = 800;
    let writer = tokio::spawn(load(env.url.clone(), n));

    // The stage dies once 100 webhooks were delivered; the process must not stay up.
    let status = first.wait_exit(Duration::from_secs(60)).await;
    let log = first.log_text();
    let status = status.unwrap_or_else(|| {
        panic!("walhook still running 60 s after {fault}; {} webhooks arrived\n{log}", env.receiver.count())
    });
    assert!(!status.success(), "a stage that died is a failure exit: {status:?}\n{log}");
    let named = format!("stage {stage} ended unexpectedly");
    let errors: Vec<&str> = log.lines().filter(|l| l.split_whitespace().nth(1) == Some("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line: {errors:#?}\n{log}");
    assert!(errors[0].contains(&named), "the ERROR line names the stage: {errors:#?}");
    assert!(log.lines().any(|l| l.starts_with(&format!("walhook: {named}"))), "main reports it: {log}");

    // Nothing confirmed past a change that was not recorded.
    let rows = writer.await.unwrap();
    let confirmed = env.confirmed_lsn().await;
    let recorded: HashSet<String> = env
        .client
        .query("SELECT entity_key FROM walhook.deliveries", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0).trim_start_matches("contacts:").to_owned())
        .collect();
    let (first_unrecorded, inside) = rows
        .iter()
        .find(|(id, _)| !recorded.contains(id))
        .expect("the stage died mid-load: some change is not recorded");
    assert!(
        confirmed <= *inside,
        "the slot is confirmed at {confirmed}, past change {first_unrecorded} (at {inside}) that was never recorded"
    );
    let seen_at_exit = env.receiver.count();

    // The next start, without the fault, delivers every change.
    let mut second = env.spawn_binary("");
    let expected: HashSet<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    let key = |r: &walhook::local::receiver::Received| r.json()["data"]["id"].as_str().unwrap_or_default().to_string();
    let got = wait_for_keys(&env.receiver, &expected, key, &second).await;
    let seen: HashSet<_> = got.iter().map(key).collect();
    assert_eq!(seen, expected, "every committed change arrives, nothing else");
    assert!(got.iter().all(|r| r.verified));
    assert!(
        seen_at_exit < expected.len(),
        "the stage died mid-load ({seen_at_exit} of {} had arrived)",
        expected.len()
    );
    let mut ids_per_change: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &got {
        ids_per_change.entry(key(r)).or_default().insert(r.webhook_id.clone());
    }
    assert!(ids_per_change.values().all(|s| s.len() == 1), "a replayed change keeps its webhook-id");
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == n as i64 }).await;
    second.sigterm();
    let status = second.wait_exit(Duration::from_secs(30)).await.expect("exits after SIGTERM");
    assert!(status.success(), "graceful exit: {status:?}\n{}", second.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_panic_exits_named_and_restart_loses_nothing() {
    stage_dies_then_restart_loses_nothing("supervise_dispatcher", "dispatcher:panic:after=100", "dispatcher").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_writer_end_exits_named_and_restart_loses_nothing() {
    stage_dies_then_restart_loses_nothing("supervise_store_writer", "store writer:end:after=100", "store writer").await;
}
