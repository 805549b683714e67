//! Memory is bounded in bytes: with `dispatch.memory_limit` small and rows large, walhook
//! never holds more payload bytes in memory (waiting, in flight, or on their way to the
//! store) than the limit, and still delivers every row, in order per row.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::{wait_for, Env, ACCOUNT_A};
use walhook::local::receiver::{Received, Reply};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const LIMIT: usize = 2 * 1024 * 1024;
/// Characters of the large column: each body is a little over this.
const ROW_CHARS: usize = 380_000;
/// How long the receiver takes to answer each request.
const ANSWER_AFTER: Duration = Duration::from_secs(1);

/// The largest sum of body bytes among requests that were all in progress at once: each is
/// answered `ANSWER_AFTER` after it arrived, so requests arriving within a shorter window of
/// each other overlap, and walhook held each body in memory while it was in progress.
fn peak_bytes_in_progress(got: &[Received]) -> (usize, usize) {
    let window = ANSWER_AFTER - Duration::from_millis(100);
    let mut peak = (0, 0);
    for r in got {
        let overlapping: Vec<&Received> =
            got.iter().filter(|o| o.at <= r.at && r.at.duration_since(o.at).unwrap_or_default() < window).collect();
        let bytes = overlapping.iter().map(|o| o.body.len()).sum::<usize>();
        if bytes > peak.0 {
            peak = (bytes, overlapping.len());
        }
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_behind_a_slow_endpoint_stay_within_the_memory_limit() {
    let env = Env::new("memory_bytes_bounded").await;
    env.endpoint(ACCOUNT_A, "slow", &["contact.created", "contact.updated"]).await;
    env.receiver.set_default("slow", Reply::Delay(ANSWER_AFTER, 200));
    let wh = env.start(&format!("[dispatch]\nmemory_limit = {LIMIT}\nspill_after = \"10s\"\n")).await;

    // Sample the in-memory payload gauge all along.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, port) = (sampling.clone(), env.metrics_port);
        tokio::spawn(async move {
            let mut max = 0.0f64;
            while sampling.load(Ordering::Relaxed) {
                let text =
                    reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
                let value = text
                    .lines()
                    .find(|l| l.starts_with("walhook_dispatch_payload_memory_bytes "))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                max = max.max(value);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };

    // Eight rows of ~380 KB in one transaction (3 MB: more than the limit), then two updates
    // of each, a row per transaction.
    let rows = 8;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, last_name) \
         SELECT '{A}', 'r' || i, rpad('v1-', {ROW_CHARS}, 'x') FROM generate_series(1, {rows}) i"
    ))
    .await;
    for v in 2..=3 {
        for i in 1..=rows {
            env.sql(&format!(
                "UPDATE contacts SET last_name = rpad('v{v}-', {ROW_CHARS}, 'y') WHERE first_name = 'r{i}'"
            ))
            .await;
        }
    }
    let expected = rows * 3;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(120), || async { env.scalar_i64(q).await == expected as i64 }).await;
    sampling.store(false, Ordering::Relaxed);
    let max_gauge = sampler.await.unwrap();

    // Every version of every row arrived, in order per row (first arrival of each delivery).
    let got = env.receiver.received_on("slow");
    let mut first: HashMap<String, (SystemTime, String, u32)> = HashMap::new();
    for r in &got {
        assert!(r.verified, "signed");
        let data = &r.json()["data"];
        let row = data["first_name"].as_str().unwrap().to_owned();
        let version = data["last_name"].as_str().unwrap()[1..2].parse().unwrap();
        first.entry(r.webhook_id.clone()).or_insert((r.at, row, version));
    }
    let mut per_row: BTreeMap<String, Vec<(SystemTime, u32)>> = BTreeMap::new();
    for (at, row, version) in first.into_values() {
        per_row.entry(row).or_default().push((at, version));
    }
    assert_eq!(per_row.len(), rows, "every row arrived: {per_row:?}");
    for (row, mut arrivals) in per_row {
        arrivals.sort();
        let versions: Vec<u32> = arrivals.iter().map(|a| a.1).collect();
        assert_eq!(versions, [1, 2, 3], "row {row}: every version, in commit order");
    }

    let (peak, requests) = peak_bytes_in_progress(&got);
    assert!(
        peak <= LIMIT,
        "{requests} requests carrying {peak} payload bytes were in progress at once; dispatch.memory_limit is {LIMIT}"
    );
    assert!(max_gauge > 0.0, "the payload memory gauge moved");
    assert!(max_gauge <= LIMIT as f64, "payload bytes held in memory reached {max_gauge}, above the limit {LIMIT}");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_waiting_for_an_endpoint_spill_to_the_outbox_early() {
    let env = Env::new("memory_large_rows_spill").await;
    env.endpoint(ACCOUNT_A, "slow", &["contact.created", "contact.updated"]).await;
    env.receiver.set_default("slow", Reply::Delay(ANSWER_AFTER, 200));
    // Far below endpoint_queue and spill_after: only the bytes waiting can make it spill.
    let wh = env.start(&format!("[dispatch]\nmemory_limit = {LIMIT}\nspill_after = \"30s\"\n")).await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, last_name) VALUES ('{A}', 'r1', rpad('v1-', {ROW_CHARS}, 'x'))"
    ))
    .await;
    // Later versions of the row wait behind the one in flight: past a quarter of the limit
    // (two of them), the endpoint spills.
    for v in 2..=6 {
        env.sql(&format!("UPDATE contacts SET last_name = rpad('v{v}-', {ROW_CHARS}, 'y') WHERE first_name = 'r1'"))
            .await;
    }
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(120), || async { env.scalar_i64(q).await == 6 }).await;
    let outbox = env.metric("walhook_deliveries_total{path=\"outbox\"}").await;
    assert!(outbox >= 1.0, "no delivery of the large row went to the outbox ({outbox})");
    let mut seen: Vec<String> = Vec::new();
    let mut versions = Vec::new();
    for r in env.receiver.received_on("slow") {
        if !seen.contains(&r.webhook_id) {
            seen.push(r.webhook_id.clone());
            versions.push(r.json()["data"]["last_name"].as_str().unwrap()[1..2].parse::<u32>().unwrap());
        }
    }
    assert_eq!(versions, [1, 2, 3, 4, 5, 6], "every version, in commit order");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_transaction_larger_than_the_limit_does_not_wait_on_itself() {
    let env = Env::new("memory_replay_large_tx").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let extra = format!("[dispatch]\nmemory_limit = {LIMIT}\n");
    let wh = env.start(&extra).await;
    // A copy of the slot, still at the position before the transaction below.
    env.sql("SELECT pg_copy_logical_replication_slot('memory_replay_large_tx', 'memory_replay_large_tx_copy')").await;
    let rows = 12; // ~4.5 MB in one transaction: more than twice the limit
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, last_name) \
         SELECT '{A}', 'r' || i, rpad('v1-', {ROW_CHARS}, 'x') FROM generate_series(1, {rows}) i"
    ))
    .await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(60), || async { env.scalar_i64(q).await == rows }).await;
    wh.stop().await.unwrap();
    let before = env.receiver.count();
    let source_confirmed = env.confirmed_lsn().await;

    // Replaying it buffers its deliveries to check them against the database; the buffer
    // must not hold the budget that routing waits for.
    env.migrate_slot("memory_replay_large_tx_copy").await;
    let wh = env.start(&format!("{extra}[replication]\nslot = \"memory_replay_large_tx_copy\"\n")).await;
    let q = "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots \
             WHERE slot_name = 'memory_replay_large_tx_copy'";
    let routed = "walhook_events_total{event_type=\"contact.created\"}";
    wait_for(Duration::from_secs(60), || async {
        env.scalar_i64(q).await >= source_confirmed
            && env.metric(routed).await == rows as f64
            && env.metric("walhook_dispatch_payload_memory_bytes").await == 0.0
    })
    .await;
    assert_eq!(env.receiver.count(), before, "nothing already delivered is sent again");
    wh.stop().await.unwrap();
}
