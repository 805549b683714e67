//! Outbox claims: an attempt in flight when its process died is retried once its lease has
//! run out (not before), and two processes working one outbox never make the same attempt.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::{free_port, wait_for, Env, Readiness, ACCOUNT_A};
use walhook::local::receiver::Reply;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_an_attempt_in_flight_retries_it_after_its_lease() {
    let env = Env::new("lease_after_sigkill").await;
    env.endpoint(ACCOUNT_A, "slow", &["contact.created"]).await;
    // First attempt fails (fast path); the outbox's retry hangs until walhook is killed.
    env.receiver.script("slow", vec![Reply::Status(500), Reply::Hang]);
    let cfg =
        "[dispatch]\nretry_schedule = [\"300ms\", \"300ms\"]\nrequest_timeout = \"1s\"\nconnect_timeout = \"1s\"\n";
    let mut first = env.spawn_binary(cfg);
    env.ready(Readiness::Streaming).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'leased')")).await;
    env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await.expect("the retry is in flight");
    let row = env.client.query_one("SELECT lease_until, attempt_count FROM walhook.deliveries", &[]).await.unwrap();
    let lease_until: chrono::DateTime<chrono::Utc> = row.get(0);
    assert_eq!(row.get::<_, i32>(1), 2, "the claim counted the attempt in flight");
    first.kill9();
    let _second = env.spawn_binary(cfg);
    let got =
        env.receiver.wait_until(Duration::from_secs(60), |r| r.len() >= 3).await.expect("retried after the lease");
    let third: chrono::DateTime<chrono::Utc> = got[2].at.into();
    assert!(
        third >= lease_until - chrono::TimeDelta::milliseconds(100),
        "retried at {third}, before its lease ran out at {lease_until}"
    );
    assert!(got.iter().all(|r| r.webhook_id == got[0].webhook_id));
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered' AND attempt_count = 3";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 1 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_never_send_the_same_attempt() {
    let env = Env::new("lease_two_processes").await;
    env.endpoint(ACCOUNT_A, "shared", &["contact.created"]).await;
    let n = 60;
    env.receiver.script("shared", vec![Reply::Status(500); 2 * n]);
    let cfg = "[dispatch]\nretry_schedule = [\"200ms\", \"200ms\", \"200ms\", \"200ms\"]\n";
    // The leader sends at most 2 attempts to the endpoint at a time, so it claims only a few
    // rows at once and the standby (32) finds due rows too: both processes claim the same rows.
    let leader_cfg = cfg.replace("[dispatch]\n", "[dispatch]\nendpoint_concurrency = 2\n");
    let _leader = env.spawn_binary(&leader_cfg);
    env.ready(Readiness::Streaming).await;
    // A second replica: stands by for the slot, works the same outbox. It looks for due rows
    // every 100 ms, while the leader, woken by its own writes, could otherwise win every claim
    // on a loaded machine: the scenario must exercise two processes claiming the same rows.
    let standby_metrics = free_port();
    let standby_cfg = cfg.replace("[dispatch]\n", "[dispatch]\npoll_interval = \"100ms\"\n");
    let other = format!(
        "{standby_cfg}[api]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{standby_metrics}\"\n",
        free_port()
    );
    let _standby = env.spawn_binary(&other);
    // Both replicas work the outbox before the rows arrive: the standby says so on /readyz.
    let standby_ready = || async move {
        let url = format!("http://127.0.0.1:{standby_metrics}/readyz");
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default().contains("\"standby\":true"),
            Err(_) => false,
        }
    };
    wait_for(Duration::from_secs(30), standby_ready).await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'c' || i FROM generate_series(1, {n}) i"
    ))
    .await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(60), || async { env.scalar_i64(q).await == n as i64 }).await;
    let mut received: HashMap<String, i64> = HashMap::new();
    for r in env.receiver.received() {
        *received.entry(r.webhook_id).or_default() += 1;
    }
    let rows = env
        .client
        .query(
            "SELECT d.id::text, d.attempt_count::int8, (SELECT count(*) FROM walhook.attempt_log a WHERE a.delivery_id = d.id) \
             FROM walhook.deliveries d",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), n);
    for r in rows {
        let (id, attempts, recorded): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            received.get(&id).copied().unwrap_or(0),
            attempts,
            "delivery {id}: requests sent vs attempts counted"
        );
        assert_eq!(recorded, attempts, "delivery {id}: one attempt record per attempt");
    }
    assert!(received.values().any(|&c| c > 1), "the scenario exercised retries");
    let scrape = |port: u16| async move {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("walhook_dispatch_attempts_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (leader, standby) = (scrape(env.metrics_port).await, scrape(standby_metrics).await);
    assert!(leader > 0.0 && standby > 0.0, "both processes made attempts: {leader} and {standby}");
}
