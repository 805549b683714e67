//! Webhook targets in internal ranges are refused at connect time, whatever form the host
//! takes, and the target never sees a connection. (The endpoints here bypass the admin API's
//! create-time check on purpose: think of a DNS name that later points inside, or rows
//! created while `dispatch.allowed_cidrs` was wider.)

mod common;

use std::time::Duration;

use common::{wait_for, Env, ACCOUNT_A};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_targets_are_refused_in_every_spelling_and_never_connected_to() {
    let env = Env::new("ssrf_forms").await;
    let port = env.receiver.url("").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let hosts = ["localhost", "127.1", "2130706433", "0x7f.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "127.0.0.1"];
    for h in hosts {
        env.endpoint_url(ACCOUNT_A, &format!("https://{h}:{port}/ssrf"), &["contact.created"]).await;
    }
    // Default policy: no private range allowed (the test receiver lives on 127.0.0.1).
    let wh = env.start("[dispatch]\nallowed_cidrs = []\nretry_schedule = [\"200ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed' AND attempt_count = 2";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == hosts.len() as i64 }).await;
    let kinds: Vec<String> = env
        .client
        .query("SELECT DISTINCT error_kind FROM walhook.attempts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["refused"], "every attempt was refused");
    assert_eq!(env.receiver.connections(), 0, "the target never saw a connection");
    assert_eq!(env.metric("walhook_dispatch_attempts_total{outcome=\"refused\"}").await, 2.0 * hosts.len() as f64);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_cidrs_open_exactly_their_range() {
    let env = Env::new("ssrf_allowed").await;
    env.endpoint(ACCOUNT_A, "ok", &["contact.created"]).await; // https://127.0.0.1:<port>/ok
    let port = env.receiver.url("").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let (v6, _) = env.endpoint_url(ACCOUNT_A, &format!("https://[::1]:{port}/v6"), &["contact.created"]).await;
    let wh = env.start("[dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nretry_schedule = [\"200ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed'";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 1 }).await;
    let q = format!(
        "SELECT count(*) FROM walhook.attempts a JOIN walhook.deliveries d ON d.id = a.delivery_id \
         WHERE d.endpoint_id = '{}' AND a.error_kind = 'refused'",
        v6.id
    );
    assert_eq!(env.scalar_i64(&q).await, 2, "::1 is outside 127.0.0.0/8: refused, not merely unreachable");
    assert_eq!(env.receiver.received_on("ok").len(), 1);
    wh.stop().await.unwrap();
}
