//! Tenant fairness in dispatch: one account's endpoints cannot hold every request slot, so
//! another account's deliveries (first attempts and outbox retries alike) keep flowing.

use crate::common;

use std::time::Duration;

use crate::common::{Env, ACCOUNT_A, ACCOUNT_B};
use walhook::local::receiver::Reply;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_hanging_endpoints_leave_room_for_another_account() {
    let env = Env::new("fair_accounts").await;
    for i in 0..4 {
        let path = format!("a{i}");
        env.endpoint(ACCOUNT_A, &path, &["contact.created"]).await;
        env.receiver.set_default(&path, Reply::Hang);
    }
    env.endpoint(ACCOUNT_B, "b", &["contact.created"]).await;
    // B's first attempt fails, so its second one comes from the outbox.
    env.receiver.script("b", vec![Reply::Status(500)]);
    let wh = env
        .start(
            "[dispatch]\nmax_concurrency = 4\nendpoint_concurrency = 2\naccount_concurrency = 2\n\
             request_timeout = \"60s\"\n",
        )
        .await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'fan-out')")).await;
    let a_requests = || (0..4).map(|i| env.receiver.received_on(&format!("a{i}")).len()).sum::<usize>();
    env.receiver
        .wait_until(Duration::from_secs(20), |r| r.iter().filter(|x| x.path.starts_with("/a")).count() >= 2)
        .await
        .expect("account A's requests hang");
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{B}', 'beside')")).await;
    // Without a per-account share, A's four hanging requests hold all four slots for 60 s.
    let got = env
        .receiver
        .wait_until(Duration::from_secs(15), |r| r.iter().filter(|x| x.path == "/b" && x.answered == 200).count() == 1)
        .await;
    let got = got.unwrap_or_else(|r| {
        let paths: Vec<(&str, u16)> = r.iter().map(|x| (x.path.as_str(), x.answered)).collect();
        panic!("account B starved while A hangs: {} requests to A; received {paths:?}", a_requests())
    });
    assert_eq!(got.iter().filter(|x| x.path == "/b").count(), 2, "a failed attempt and its retry");
    assert_eq!(a_requests(), 2, "account A holds no more than its share");
    wh.token.cancel();
}

/// An account at its concurrency cap makes its claimed outbox rows wait for a slot; a claim
/// whose lease would run out before its attempt could finish must be given back, not sent
/// late while another claim of the same row (after the lease expired) sends it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_waiting_for_an_accounts_share_never_outlive_their_lease() {
    let env = Env::new("fair_lease").await;
    let paths = ["l0", "l1", "l2"];
    for p in paths {
        env.endpoint(ACCOUNT_A, p, &["contact.created"]).await;
        // Every first attempt fails at once, so all 36 deliveries wait in the outbox and come
        // due within about a second of each other; retries answer after 0.7 s.
        env.receiver.script(p, vec![Reply::Status(500); 12]);
        env.receiver.set_default(p, Reply::Delay(Duration::from_millis(700), 200));
    }
    // Attempts take at most 2 s: leases of 2 × (2 + 2) + 5 = 13 s. One request of the account
    // at a time at 0.7 s each: the 36 rows, claimed as they come due, need about 25 s.
    let wh = env
        .start(
            "[dispatch]\naccount_concurrency = 1\nconnect_timeout = \"1s\"\nrequest_timeout = \"1s\"\n\
             poll_interval = \"100ms\"\nretry_schedule = [\"3s\"]\n",
        )
        .await;
    let values: Vec<String> = (0..12).map(|i| format!("('{A}', 'held {i}')")).collect();
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES {}", values.join(", "))).await;
    let delivered = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    common::wait_for(Duration::from_secs(90), || async { env.scalar_i64(delivered).await == 36 }).await;
    let mut seen = std::collections::HashMap::new();
    for r in env.receiver.received().into_iter().filter(|r| r.answered != 500) {
        *seen.entry(r.webhook_id).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "deliveries sent again after their claim's lease ran out: {twice:?}");
    assert_eq!(seen.len(), 36);
    wh.token.cancel();
}

/// Invariant 16 in bytes: account A's 40 endpoints never answer and it commits one transaction
/// of twelve 5 MB activities (four times the memory budget); account B's contacts, written
/// every second meanwhile, still arrive within seconds. A's large bodies may not hold the budget
/// in attempts (at most its share) nor in line (nobody waits in line but routing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_large_rows_and_dead_endpoints_leave_another_account_on_time() {
    let env = Env::new("fair_bytes").await;
    for i in 0..40 {
        let path = format!("a{i}");
        env.endpoint(ACCOUNT_A, &path, &["activity.created"]).await;
        env.receiver.set_default(&path, Reply::Hang);
    }
    env.receiver.keep_bodies(false);
    let other = walhook::local::receiver::Receiver::start(&env.ca).await.unwrap();
    let (_, secret) = env.endpoint_url(ACCOUNT_B, &other.url("b"), &["contact.created"]).await;
    other.set_secret("b", &secret);
    // The defaults a new user has: a 16 MiB budget, 15 s per request.
    let wh = env.start("[dispatch]\nrequest_timeout = \"15s\"\nretry_schedule = [\"5s\", \"30s\"]\n").await;
    env.sql(&format!(
        "INSERT INTO activities (account_id, subject, body) \
         SELECT '{A}', 'big ' || i, repeat(md5(i::text), 5000000 / 32) FROM generate_series(1, 12) i"
    ))
    .await;
    let mut written = Vec::new();
    for i in 0..30 {
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{B}', 'b{i}')")).await;
        written.push((format!("b{i}"), std::time::SystemTime::now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = other.wait_until(Duration::from_secs(60), |r| r.len() >= 30).await.unwrap_or_else(|r| {
        panic!("account B starved behind A's large rows: {} of 30 arrived", r.len());
    });
    let mut lags: Vec<Duration> = written
        .iter()
        .map(|(name, at)| {
            let r = got.iter().find(|r| r.json()["data"]["first_name"] == name.as_str()).expect("each arrives");
            r.at.duration_since(*at).unwrap_or_default()
        })
        .collect();
    lags.sort();
    println!("account B's latency beside A's stall: p50 {:?}, max {:?}", lags[lags.len() / 2], lags[lags.len() - 1]);
    assert!(
        lags[lags.len() - 1] < Duration::from_secs(10),
        "account B waited behind account A's large rows: latencies {lags:?}"
    );
    wh.token.cancel();
}
