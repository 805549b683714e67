//! Delivery semantics: tenants never mix, failures are retried with a stable webhook-id, the
//! slot is confirmed only past what is durable, idle or unrelated writes still move it, a
//! replay records and sends nothing twice, and a huge transaction spills instead of piling up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{wait_for, Env, ACCOUNT_A, ACCOUNT_B};
use walhook::local::receiver::Reply;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_mix() {
    let env = Env::new("tenants_never_mix").await;
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    env.endpoint(ACCOUNT_B, "b", &["contact.created"]).await;
    let inactive = env.endpoint(ACCOUNT_A, "a-off", &["contact.created"]).await;
    env.sql(&format!("UPDATE walhook.endpoints SET is_active = false WHERE id = '{}'", inactive.id)).await;
    let wh = env.start("").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'a' || i FROM generate_series(1, 20) i;
         INSERT INTO contacts (account_id, first_name) SELECT '{B}', 'b' || i FROM generate_series(1, 15) i;"
    ))
    .await;
    env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 35).await.expect("35 webhooks");
    env.quiescent().await;
    let a = env.receiver.received_on("a");
    let b = env.receiver.received_on("b");
    assert_eq!(a.len(), 20);
    assert_eq!(b.len(), 15);
    assert!(a.iter().all(|r| r.json()["data"]["account_id"] == A && r.verified));
    assert!(b.iter().all(|r| r.json()["data"]["account_id"] == B && r.verified));
    assert!(env.receiver.received_on("a-off").is_empty(), "an inactive endpoint gets nothing");
    wh.stop().await.unwrap();
}

/// A row whose `account_id` changes leaves its old account and joins the new one: the old
/// account's endpoints get `contact.deleted` with the old row, the new account's get
/// `contact.created` with the new row, and neither ever sees the other's data. Under REPLICA
/// IDENTITY FULL (walhook's default) and under an index identity that carries `account_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_moves_between_accounts_leaves_one_and_joins_the_other() {
    let env = Env::new("tenants_row_moves").await;
    let all = ["contact.created", "contact.updated", "contact.deleted"];
    env.endpoint(ACCOUNT_A, "a", &all).await;
    env.endpoint(ACCOUNT_B, "b", &all).await;
    let wh = env.start("").await;
    for (identity, id) in [
        ("FULL", "97000000-0000-4000-8000-000000000001"),
        ("USING INDEX contacts_id_account", "97000000-0000-4000-8000-000000000002"),
    ] {
        env.sql(&format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS contacts_id_account ON contacts (id, account_id);
             ALTER TABLE contacts REPLICA IDENTITY {identity};
             INSERT INTO contacts (id, account_id, first_name, email) VALUES ('{id}', '{A}', 'in-a', 'secret@a.example');
             UPDATE contacts SET account_id = '{B}', first_name = 'in-b', email = 'new@b.example' WHERE id = '{id}';"
        ))
        .await;
        let of = |rs: &[walhook::local::receiver::Received], path: &str| -> Vec<serde_json::Value> {
            let ours = rs.iter().filter(|r| r.path == format!("/{path}")).map(|r| r.json());
            ours.filter(|j| j["data"]["id"] == id).collect()
        };
        env.receiver
            .wait_until(Duration::from_secs(20), |rs| of(rs, "a").len() >= 2 && !of(rs, "b").is_empty())
            .await
            .unwrap_or_else(|rs| panic!("{identity}: a got {:?}, b got {:?}", of(&rs, "a"), of(&rs, "b")));
        env.quiescent().await;
        let rs = env.receiver.received();
        let (a, b) = (of(&rs, "a"), of(&rs, "b"));
        let events =
            |v: &[serde_json::Value]| v.iter().map(|j| j["event"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(events(&a), ["contact.created", "contact.deleted"], "{identity}: {a:?}");
        assert_eq!(events(&b), ["contact.created"], "{identity}: {b:?}");
        assert_eq!(a[1]["data"]["account_id"], A, "{identity}: A is told with A's own row");
        assert_eq!(b[0]["data"]["account_id"], B);
        assert_eq!(b[0]["data"]["first_name"], "in-b", "{identity}: B gets the whole new row");
        assert!(!b[0].to_string().contains("secret@a.example"), "{identity}: B never sees A's data");
        assert!(!a[1].to_string().contains("new@b.example"), "{identity}: A never sees B's data");
        if identity == "FULL" {
            assert_eq!(a[1]["data"]["first_name"], "in-a", "A's old row, whole");
        }
    }
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_with_the_same_webhook_id() {
    let env = Env::new("retried_same_id").await;
    let ep = env.endpoint(ACCOUNT_A, "flaky", &["company.created"]).await;
    env.receiver.script("flaky", vec![Reply::Status(500), Reply::Status(503)]);
    let wh = env.start("").await;
    env.sql(&format!("INSERT INTO companies (account_id, name) VALUES ('{A}', 'Flaky Inc')")).await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 3).await.expect("three attempts");
    assert!(got.iter().all(|r| r.webhook_id == got[0].webhook_id), "webhook-id is stable across attempts");
    assert!(got.iter().all(|r| r.body == got[0].body), "the body is the same bytes each time");
    assert!(got.iter().all(|r| r.verified), "each attempt is signed");
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [500, 503, 200]);
    let q = format!(
        "SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered' \
         AND attempt_count = 3 AND http_status_code = 200 AND completed_at IS NOT NULL AND id::text = '{}'",
        ep.id, got[0].webhook_id
    );
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&q).await == 1 }).await;
    let attempts = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM walhook.attempt_log WHERE delivery_id::text = '{}'",
            got[0].webhook_id
        ))
        .await;
    assert_eq!(attempts, 3, "one attempt record per attempt");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_fails_after_its_last_scheduled_retry() {
    let env = Env::new("fails_after_schedule").await;
    env.endpoint(ACCOUNT_A, "down", &["project.created"]).await;
    env.receiver.set_default("down", Reply::Status(500));
    let wh = env.start("").await;
    env.sql(&format!("INSERT INTO projects (account_id, name) VALUES ('{A}', 'Doomed')")).await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed' AND attempt_count = 4 AND http_status_code = 500";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == 1 }).await;
    assert_eq!(env.receiver.count(), 4, "first attempt + 3 scheduled retries");
    // A fixed wait, on purpose: a wrong fifth attempt would come on the retry schedule (its
    // last step is 1 s, the outbox polls every 100 ms), and a failed delivery is not pending,
    // so quiescence would not wait for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.receiver.count(), 4, "nothing after failing");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_unrelated_tables_still_advance_the_slot() {
    let env = Env::new("unrelated_advance").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start("").await;
    env.sql(&format!(
        "INSERT INTO audit_log (account_id, message) SELECT '{A}', repeat('x', 500) FROM generate_series(1, 2000)"
    ))
    .await;
    let target = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    wait_for(Duration::from_secs(30), || async { env.confirmed_lsn().await >= target }).await;
    assert_eq!(env.receiver.count(), 0);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_not_confirmed_past_a_delivery_in_flight() {
    let env = Env::new("confirm_waits").await;
    env.endpoint(ACCOUNT_A, "slow", &["contact.created"]).await;
    env.receiver.script("slow", vec![Reply::Delay(Duration::from_millis(1500), 200)]);
    // spill_after longer than the delay: the delivery stays in memory, in flight.
    let wh = env.start("[dispatch]\nspill_after = \"10s\"\n").await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'Slow')")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.expect("request arrives");
    // The receiver holds the request for 1.5 s; sample the slot meanwhile.
    let mut during = Vec::new();
    for _ in 0..10 {
        during.push(env.confirmed_lsn().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let q = "SELECT commit_lsn FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(10), || async { env.client.query_opt(q, &[]).await.unwrap().is_some() }).await;
    let commit_lsn = env.scalar_i64(q).await;
    assert!(
        during.iter().all(|&c| c <= commit_lsn),
        "the slot was confirmed past commit {commit_lsn} while its delivery was in flight: {during:?}"
    );
    wait_for(Duration::from_secs(10), || async { env.confirmed_lsn().await > commit_lsn }).await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_an_older_lsn_creates_no_duplicates() {
    let env = Env::new("replay_no_dupes").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created", "contact.updated", "contact.deleted"]).await;
    env.endpoint(ACCOUNT_A, "flaky", &["contact.created"]).await;
    // One endpoint's first attempts fail: their deliveries wait in the outbox meanwhile.
    env.receiver.script("flaky", vec![Reply::Status(500); 5]);
    let wh = env.start("").await;
    // A copy of the slot, still at the position before the writes below.
    env.sql("SELECT pg_copy_logical_replication_slot('replay_no_dupes', 'replay_no_dupes_copy')").await;
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name)
           SELECT ('50000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, '{A}', 'r' || i FROM generate_series(1, 40) i;
         UPDATE contacts SET last_name = 'x' WHERE first_name = 'r1';
         DELETE FROM contacts WHERE first_name = 'r2';"
    ))
    .await;
    let expected = 42 + 40;
    env.receiver
        .wait_until(Duration::from_secs(30), |r| r.iter().filter(|x| x.answered == 200).count() >= expected)
        .await
        .expect("all delivered");
    wait_for(Duration::from_secs(10), || async {
        env.scalar_i64("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'").await == expected as i64
    })
    .await;
    wh.stop().await.unwrap();
    let before = env.receiver.count();
    let rows = env.scalar_i64("SELECT count(*) FROM walhook.deliveries").await;
    let events = env.scalar_i64("SELECT count(*) FROM walhook.events").await;
    let source_confirmed = env.confirmed_lsn().await;
    let last_commit = env.scalar_i64("SELECT max(commit_lsn) FROM walhook.deliveries").await;
    assert!(source_confirmed > last_commit, "a graceful stop confirms what it delivered");

    // Replay everything from the copy's older position.
    env.migrate_slot("replay_no_dupes_copy").await;
    let wh = env.start("[replication]\nslot = \"replay_no_dupes_copy\"\n").await;
    let q =
        "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'replay_no_dupes_copy'";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(q).await >= source_confirmed }).await;
    wh.stop().await.unwrap();
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.deliveries").await, rows, "no new delivery rows");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.events").await, events, "no new event rows");
    assert_eq!(env.receiver.count(), before, "nothing already delivered is sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_spills_to_the_outbox_and_is_delivered_whole() {
    let env = Env::new("huge_tx_spills").await;
    env.endpoint(ACCOUNT_A, "hook", &["activity.created"]).await;
    // Tiny in-memory limits: the transaction cannot fit, so most of it must spill.
    let wh = env.start("[dispatch]\nendpoint_queue = 50\nqueue_capacity = 100\nendpoint_concurrency = 4\n").await;
    let n = 3000;
    env.sql(&format!(
        "INSERT INTO activities (account_id, subject) SELECT '{A}', 's' || i FROM generate_series(1, {n}) i"
    ))
    .await;
    let got = env
        .receiver
        .wait_until(Duration::from_secs(120), |r| r.iter().map(|x| &x.webhook_id).collect::<HashSet<_>>().len() >= n)
        .await
        .expect("every row delivered");
    let subjects: HashSet<String> =
        got.iter().map(|r| r.json()["data"]["subject"].as_str().unwrap().to_owned()).collect();
    assert_eq!(subjects.len(), n);
    wait_for(Duration::from_secs(20), || async {
        env.scalar_i64("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'").await == n as i64
    })
    .await;
    assert!(env.scalar_i64("SELECT count(*) FROM walhook.events").await > 0, "part of it went through the outbox");
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        *per_id.entry(&r.webhook_id).or_default() += 1;
    }
    assert!(per_id.values().all(|&c| c == 1), "no delivery was sent twice");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_survive_a_restart() {
    let env = Env::new("retries_survive_restart").await;
    env.endpoint(ACCOUNT_A, "later", &["contact.created"]).await;
    env.receiver.script("later", vec![Reply::Status(503)]);
    let wh = env.start("[dispatch]\nretry_schedule = [\"2s\"]\n").await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'Patient')")).await;
    let pending = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending' AND attempt_count = 1";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(pending).await == 1 }).await;
    wh.stop().await.unwrap();
    assert_eq!(env.receiver.count(), 1, "only the failed first attempt so far");
    let wh = env.start("[dispatch]\nretry_schedule = [\"2s\"]\n").await;
    let got =
        env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await.expect("retried after the restart");
    assert_eq!(got[0].webhook_id, got[1].webhook_id);
    assert_eq!(got[1].answered, 200);
    let delivered = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered' AND attempt_count = 2";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(delivered).await == 1 }).await;
    wh.stop().await.unwrap();
}
