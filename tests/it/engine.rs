//! The delivery engine against receivers that misbehave on purpose: timeouts, slow answers,
//! resets, 410, 429 with Retry-After, redirects; per-row order with a stuck row overtaken by
//! another; a dead endpoint beside a healthy one; attempt records.

use std::time::Duration;

use crate::common::{wait_for, Env, ACCOUNT_A};
use walhook::local::receiver::{Received, Reply};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

fn insert_contact(name: &str) -> String {
    format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', '{name}')")
}

async fn one_delivery(env: &Env) -> (String, i64, String) {
    let r = env.client.query_one("SELECT status, attempt_count, id::text FROM walhook.deliveries", &[]).await.unwrap();
    (r.get(0), r.get::<_, i32>(1) as i64, r.get(2))
}

async fn error_kinds(env: &Env) -> Vec<Option<String>> {
    env.client
        .query("SELECT error_kind FROM walhook.attempt_log ORDER BY attempt", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_delivered(env: &Env, attempts: i64) {
    let q =
        format!("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered' AND attempt_count = {attempts}");
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(&q).await == 1 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_retried_and_recorded() {
    let env = Env::new("engine_timeout").await;
    env.endpoint(ACCOUNT_A, "t", &["contact.created"]).await;
    env.receiver.script("t", vec![Reply::Hang]);
    let wh = env.start("[dispatch]\nrequest_timeout = \"1s\"\n").await;
    env.sql(&insert_contact("t")).await;
    wait_delivered(&env, 2).await;
    assert_eq!(error_kinds(&env).await, [Some("timeout".to_string()), None]);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_within_the_timeout_is_a_success() {
    let env = Env::new("engine_slow").await;
    env.endpoint(ACCOUNT_A, "s", &["contact.created"]).await;
    env.receiver.script("s", vec![Reply::Delay(Duration::from_millis(1200), 204)]);
    let wh = env.start("[dispatch]\nrequest_timeout = \"3s\"\nspill_after = \"500ms\"\n").await;
    env.sql(&insert_contact("s")).await;
    wait_delivered(&env, 1).await;
    let ms = env.scalar_i64("SELECT duration_ms::int8 FROM walhook.attempt_log").await;
    assert!(ms >= 1200, "the attempt record keeps the duration: {ms} ms");
    assert_eq!(env.scalar_i64("SELECT http_status_code::int8 FROM walhook.deliveries").await, 204);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_is_retried() {
    let env = Env::new("engine_reset").await;
    env.endpoint(ACCOUNT_A, "r", &["contact.created"]).await;
    env.receiver.script("r", vec![Reply::Reset, Reply::Reset]);
    let wh = env.start("").await;
    env.sql(&insert_contact("r")).await;
    wait_delivered(&env, 3).await;
    assert_eq!(error_kinds(&env).await, [Some("network".to_string()), Some("network".to_string()), None]);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let env = Env::new("engine_redirect").await;
    env.endpoint(ACCOUNT_A, "moved", &["contact.created"]).await;
    let elsewhere = env.receiver.url("elsewhere");
    env.receiver.script("moved", vec![Reply::StatusWith(302, vec![("location".into(), elsewhere)])]);
    let wh = env.start("").await;
    env.sql(&insert_contact("m")).await;
    wait_delivered(&env, 2).await;
    assert!(env.receiver.received_on("elsewhere").is_empty(), "the redirect was followed");
    let first = env.scalar_i64("SELECT http_status_code::int8 FROM walhook.attempt_log WHERE attempt = 1").await;
    assert_eq!(first, 302);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_but_clamped_to_the_schedule() {
    let env = Env::new("engine_retry_after").await;
    env.endpoint(ACCOUNT_A, "busy", &["contact.created"]).await;
    let retry_after = |secs: &str| Reply::StatusWith(429, vec![("retry-after".into(), secs.into())]);
    env.receiver.script("busy", vec![retry_after("3"), retry_after("1"), retry_after("3600")]);
    let wh = env.start("[dispatch]\nretry_schedule = [\"2s\", \"2s\", \"2s\"]\n").await;
    env.sql(&insert_contact("b")).await;
    wait_delivered(&env, 4).await;
    // The gap between attempt starts: asked 3 s (within [2, 4]), asked 1 s (raised to 2),
    // asked an hour (capped at 4).
    let gaps: Vec<f64> = env
        .client
        .query(
            "SELECT EXTRACT(EPOCH FROM started_at - lag(started_at) OVER (ORDER BY attempt))::float8 \
             FROM walhook.attempt_log ORDER BY attempt",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .skip(1)
        .map(|r| r.get(0))
        .collect();
    assert_eq!(gaps.len(), 3);
    assert!((3.0..3.9).contains(&gaps[0]), "Retry-After 3 within bounds: {gaps:?}");
    assert!((2.0..2.9).contains(&gaps[1]), "Retry-After 1 raised to the scheduled 2 s: {gaps:?}");
    assert!((4.0..4.9).contains(&gaps[2]), "Retry-After 3600 capped at 2 × 2 s: {gaps:?}");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_fails_what_waits_for_it() {
    let env = Env::new("engine_gone").await;
    let ep = env.endpoint(ACCOUNT_A, "gone", &["contact.created"]).await;
    let healthy = env.endpoint(ACCOUNT_A, "fine", &["contact.created"]).await;
    env.receiver.script("gone", vec![Reply::Status(500), Reply::Status(410)]);
    let wh = env.start("[dispatch]\nretry_schedule = [\"30s\"]\n").await;
    // The first row's delivery fails and waits 30 s for its retry; the second gets 410.
    env.sql(&insert_contact("first")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| r.iter().any(|x| x.path == "/gone")).await.unwrap();
    env.sql(&insert_contact("second")).await;
    let q = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND NOT is_active AND disabled_reason = 'gone'",
        ep.id
    );
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&q).await == 1 }).await;
    let q = format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'failed'", ep.id);
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&q).await == 2 }).await;
    // Later rows are not routed to it; the healthy endpoint is unaffected.
    env.sql(&insert_contact("third")).await;
    env.receiver
        .wait_until(Duration::from_secs(10), |r| r.iter().filter(|x| x.path == "/fine").count() == 3)
        .await
        .unwrap();
    assert_eq!(env.receiver.received_on("gone").len(), 2);
    assert_eq!(env.metric("walhook_endpoints_disabled_total{reason=\"gone\"}").await, 1.0);
    let q = format!("SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND is_active", healthy.id);
    assert_eq!(env.scalar_i64(&q).await, 1);
    wh.stop().await.unwrap();
}

/// The `lead_score` of each successfully answered request for `entity` (by first_name).
fn successes(got: &[Received], name: &str) -> Vec<i64> {
    got.iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.json())
        .filter(|b| b["data"]["first_name"] == name)
        .map(|b| b["data"]["lead_score"].as_i64().unwrap_or(-1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_row_holds_back_only_itself_and_keeps_its_order() {
    let env = Env::new("engine_order").await;
    env.endpoint(ACCOUNT_A, "o", &["contact.created", "contact.updated"]).await;
    env.receiver.script("o", vec![Reply::Status(500)]);
    let wh = env.start("[dispatch]\nretry_schedule = [\"1500ms\"]\n").await;
    // Row X's first delivery fails; its later changes must wait behind it.
    env.sql(&format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'X', 0)")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    env.sql(&format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'Y', 0)")).await;
    for i in 1..=5 {
        env.sql(&format!("UPDATE contacts SET lead_score = {i} WHERE first_name = 'X'")).await;
        env.sql(&format!("UPDATE contacts SET lead_score = {i} WHERE first_name = 'Y'")).await;
    }
    let got = env
        .receiver
        .wait_until(Duration::from_secs(30), |r| r.iter().filter(|x| x.answered == 200).count() >= 12)
        .await
        .expect("everything delivered");
    assert_eq!(successes(&got, "X"), [0, 1, 2, 3, 4, 5], "row X arrives in commit order");
    assert_eq!(successes(&got, "Y"), [0, 1, 2, 3, 4, 5], "row Y arrives in commit order");
    let first_ok =
        |name: &str| got.iter().position(|r| r.answered == 200 && r.json()["data"]["first_name"] == name).unwrap();
    let last_y = got.iter().rposition(|r| r.json()["data"]["first_name"] == "Y").unwrap();
    assert!(last_y < first_ok("X"), "row Y was not held back by row X's retry");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_row_holds_across_a_restart() {
    let env = Env::new("engine_order_restart").await;
    env.endpoint(ACCOUNT_A, "o", &["contact.created", "contact.updated"]).await;
    env.receiver.script("o", vec![Reply::Status(500)]);
    let cfg = "[dispatch]\nretry_schedule = [\"3s\"]\n";
    let wh = env.start(cfg).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'X', 0)")).await;
    wait_for(Duration::from_secs(10), || async {
        env.scalar_i64("SELECT count(*) FROM walhook.deliveries WHERE status = 'pending'").await == 1
    })
    .await;
    wh.stop().await.unwrap();
    // A new process: row X still has a delivery waiting; its next change must queue behind it.
    let wh = env.start(cfg).await;
    env.sql("UPDATE contacts SET lead_score = 1 WHERE first_name = 'X'").await;
    let got = env
        .receiver
        .wait_until(Duration::from_secs(30), |r| r.iter().filter(|x| x.answered == 200).count() >= 2)
        .await
        .expect("both delivered");
    assert_eq!(successes(&got, "X"), [0, 1], "the older change first, also after a restart");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_delay_a_healthy_one() {
    let env = Env::new("engine_dead_beside_healthy").await;
    let dead = env.endpoint(ACCOUNT_A, "dead", &["contact.created"]).await;
    env.endpoint(ACCOUNT_A, "healthy", &["contact.created"]).await;
    env.receiver.set_default("dead", Reply::Hang);
    // The dead endpoint's first attempts time out only after 20 s.
    let wh =
        env.start("[dispatch]\nrequest_timeout = \"20s\"\nendpoint_concurrency = 4\nspill_after = \"500ms\"\n").await;
    let n = 100;
    for i in 0..n {
        env.sql(&insert_contact(&format!("c{i}"))).await;
    }
    let last_commit = env.scalar_i64("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").await;
    env.receiver
        .wait_until(Duration::from_secs(15), |r| r.iter().filter(|x| x.path == "/healthy").count() >= n)
        .await
        .expect("the healthy endpoint got every change");
    // ...while not one request to the dead endpoint has even finished, and the slot has moved
    // past all of it (the dead endpoint's deliveries wait in the outbox, not in memory).
    let q = format!("SELECT count(*) FROM walhook.attempt_log a JOIN walhook.deliveries d ON d.id = a.delivery_id WHERE d.endpoint_id = '{}'", dead.id);
    assert_eq!(env.scalar_i64(&q).await, 0, "no dead attempt has completed yet");
    wait_for(Duration::from_secs(10), || async { env.confirmed_lsn().await >= last_commit }).await;
    assert_eq!(env.scalar_i64(&q).await, 0, "confirmed while the dead endpoint still hangs");
    let pending =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'pending'", dead.id);
    assert_eq!(env.scalar_i64(&pending).await, n as i64, "the dead endpoint's deliveries wait in the outbox");
    let inflight = env.receiver.received_on("dead").len();
    assert!(inflight <= 4 * 3, "the dead endpoint holds at most its own share of connections: {inflight}");
    wh.token.cancel(); // no need to wait out the hanging requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_records_describe_each_attempt() {
    let env = Env::new("engine_attempt_records").await;
    env.endpoint(ACCOUNT_A, "rec", &["contact.created"]).await;
    env.receiver.script("rec", vec![Reply::Status(503)]);
    let wh = env.start("").await;
    env.sql(&insert_contact("rec")).await;
    wait_delivered(&env, 2).await;
    let (_, _, id) = one_delivery(&env).await;
    let rows = env
        .client
        .query(
            "SELECT attempt, started_at IS NOT NULL, duration_ms, http_status_code, error_kind, error, response_snippet \
             FROM walhook.attempt_log WHERE delivery_id::text = $1 ORDER BY attempt",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    assert_eq!(first.get::<_, i32>(0), 1);
    assert!(first.get::<_, bool>(1));
    assert!(first.get::<_, i32>(2) >= 0);
    assert_eq!(first.get::<_, Option<i32>>(3), Some(503));
    assert_eq!(first.get::<_, Option<String>>(4).as_deref(), Some("status"));
    assert_eq!(first.get::<_, Option<String>>(5).as_deref(), Some("HTTP 503"));
    assert_eq!(first.get::<_, Option<String>>(6).as_deref(), Some("ok"), "the start of the response body");
    assert_eq!(rows[1].get::<_, Option<i32>>(3), Some(200));
    assert_eq!(rows[1].get::<_, Option<String>>(4), None);
    wh.stop().await.unwrap();
}

/// Many endpoints on one HTTP/1.1-only host (a shared ingestion service) keep their
/// connections: none is closed for want of idle slots and re-opened with a new TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_sharing_an_http1_host_reuse_their_connections() {
    let env = Env::new("engine_http1_reuse").await;
    let h1 = walhook::local::receiver::Receiver::start_http1(&env.ca).await.unwrap();
    for i in 0..4 {
        let path = format!("h{i}");
        let (_, secret) = env.endpoint_url(ACCOUNT_A, &h1.url(&path), &["contact.created"]).await;
        h1.set_secret(&path, &secret);
        // Slow enough that the four endpoints' requests overlap.
        h1.set_default(&path, Reply::Delay(Duration::from_millis(30), 200));
    }
    let wh = env.start("[dispatch]\nendpoint_concurrency = 1\n").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'c' || i FROM generate_series(1, 25) i"
    ))
    .await;
    let all = h1.wait_until(Duration::from_secs(60), |r| r.len() >= 100).await.expect("100 webhooks");
    assert!(all.iter().all(|r| r.verified), "every signature verifies");
    let connections = h1.connections();
    assert!(connections <= 8, "100 requests over {connections} connections: idle connections were dropped");
    wh.stop().await.unwrap();
}

/// An endpoint spilled to the outbox (it was stuck for a while) goes back to direct sending
/// once the outbox has caught up, although deliveries never stop arriving; each row's changes
/// still arrive in order across the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_endpoint_returns_to_direct_sending_under_steady_traffic() {
    let env = Env::new("engine_unspill_under_traffic").await;
    let ep = env.endpoint(ACCOUNT_A, "busy", &["contact.created", "contact.updated"]).await;
    // The first request hangs past spill_after: everything after it goes to the outbox.
    env.receiver.script("busy", vec![Reply::Delay(Duration::from_millis(1500), 200)]);
    let wh =
        env.start("[dispatch]\nendpoint_concurrency = 1\nspill_after = \"300ms\"\npoll_interval = \"100ms\"\n").await;
    let tracker = "cccc0000-0000-4000-8000-00000000000c";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{tracker}', '{A}', 'v0')")).await;
    // Steady traffic for about 4 s: new contacts and a change of the tracked row every 10 ms.
    let rounds = 400;
    for i in 1..=rounds {
        env.sql(&format!(
            "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'n' || g FROM generate_series(1, 3) g;
             UPDATE contacts SET first_name = 'v{i}' WHERE id = '{tracker}';"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected = 1 + rounds * 4;
    let got = env
        .receiver
        .wait_until(Duration::from_secs(60), |r| r.len() >= expected)
        .await
        .unwrap_or_else(|r| panic!("{} of {expected} webhooks", r.len()));
    let versions: Vec<u32> = got
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        .filter(|b| b["data"]["id"] == tracker)
        .filter_map(|b| b["data"]["first_name"].as_str()?.strip_prefix('v')?.parse().ok())
        .collect();
    assert_eq!(versions, (0..=rounds as u32).collect::<Vec<_>>(), "the tracked row's changes arrive in order");
    // Direct deliveries leave no stored payload; outbox ones do.
    let direct = format!(
        "SELECT count(*) FROM walhook.deliveries d WHERE d.endpoint_id = '{}' \
         AND NOT EXISTS (SELECT 1 FROM walhook.events e WHERE e.id = d.event_id)",
        ep.id
    );
    let direct = env.scalar_i64(&direct).await;
    assert!(direct >= expected as i64 / 4, "only {direct} of {expected} were sent directly after the spill");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_payload_fails_with_its_own_kind() {
    let env = Env::new("engine_payload_gone").await;
    env.endpoint(ACCOUNT_A, "p", &["contact.created"]).await;
    env.receiver.script("p", vec![Reply::Status(500)]);
    let wh = env.start("[dispatch]\nretry_schedule = [\"3s\", \"3s\"]\n").await;
    env.sql(&insert_contact("p")).await;
    let waiting = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending' AND attempt_count = 1";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(waiting).await == 1 }).await;
    // The payload disappears while the delivery waits for its retry.
    env.sql("DELETE FROM walhook.events").await;
    let failed = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed'";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(failed).await == 1 }).await;
    assert_eq!(error_kinds(&env).await, [Some("status".to_string()), Some("payload".to_string())]);
    assert_eq!(env.receiver.received().len(), 1, "nothing is sent without a payload");
    wh.stop().await.unwrap();
}
