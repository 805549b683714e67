//! The store writer against a real database: whatever lands in one batch is written as if op
//! by op, in order, exactly once.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{Env, ACCOUNT_A};
use bytes::Bytes;
use uuid::Uuid;
use walhook::model::attempt::Attempt;
use walhook::model::delivery::Event;
use walhook::store::{Completion, Record, Status, StoreOp, StoreWriter};

fn event(seq: u32) -> Arc<Event> {
    Arc::new(Event {
        id: walhook::model::delivery::event_id(walhook::model::position::Position::new(0x1000, seq)),
        account_id: ACCOUNT_A,
        event_type: walhook::model::event::EventType::parse("contact.created").unwrap(),
        entity_key: format!("contacts:{seq}"),
        position: walhook::model::position::Position::new(0x1000, seq),
        committed_at_us: chrono::Utc::now().timestamp_micros(),
        body: Bytes::from_static(b"{\"event\":\"contact.created\"}"),
    })
}

fn ok_attempt() -> Attempt {
    Attempt {
        status: Some(200),
        failure: None,
        retry_after: None,
        error: None,
        started_at: chrono::Utc::now(),
        duration: Duration::from_millis(3),
        response_snippet: "ok".into(),
    }
}

fn record(endpoint: Uuid, seq: u32, status: Status, lease: Option<(Uuid, chrono::DateTime<chrono::Utc>)>) -> Record {
    let delivered = status == Status::Delivered;
    Record {
        id: walhook::model::delivery::delivery_id(walhook::model::position::Position::new(0x1000, seq), endpoint),
        endpoint_id: endpoint,
        event: event(seq),
        status,
        attempt_count: i32::from(delivered || lease.is_some()),
        http_status: delivered.then_some(200),
        next_attempt_at: (!delivered).then(chrono::Utc::now),
        lease,
        last_error: None,
        completed_at: delivered.then(chrono::Utc::now),
        attempt: delivered.then(ok_attempt),
        ticket: None,
    }
}

/// The outcome of a leased row's first attempt, a 200, under `lease`.
fn delivered_on_attempt_1(id: Uuid, endpoint: Uuid, lease: Uuid) -> Completion {
    Completion {
        id,
        endpoint_id: endpoint,
        lease,
        status: Status::Delivered,
        http_status: Some(200),
        next_attempt_at: None,
        last_error: None,
        completed_at: Some(chrono::Utc::now()),
        attempt_no: 1,
        attempt: ok_attempt(),
    }
}

/// Sends `ops` before the writer starts, so they reach it as one batch; waits for it to finish.
async fn write_as_one_batch(env: &Env, ops: Vec<StoreOp>) {
    let (writer, tx) = StoreWriter::new(env.db.clone(), 64, crate::common::writer_settings());
    for op in ops {
        tx.send(op).await.unwrap();
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(30), writer.run()).await.expect("the writer finishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_batched_with_its_own_insert_is_not_lost() {
    let env = Env::new("store_same_batch").await;
    let endpoint = Uuid::new_v4();
    let lease = Uuid::new_v4();
    let leased =
        record(endpoint, 1, Status::Pending, Some((lease, chrono::Utc::now() + chrono::Duration::seconds(60))));
    let leased_id = leased.id;
    let ops = vec![
        StoreOp::Insert(leased),
        StoreOp::Insert(record(endpoint, 2, Status::Delivered, None)),
        StoreOp::Complete(delivered_on_attempt_1(leased_id, endpoint, lease)),
    ];
    write_as_one_batch(&env, ops).await;
    let rows = env
        .client
        .query("SELECT status, leased_by IS NULL, completed_at IS NOT NULL FROM walhook.deliveries ORDER BY seq", &[])
        .await
        .unwrap();
    let got: Vec<(String, bool, bool)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let delivered = ("delivered".to_owned(), true, true);
    assert_eq!(got, vec![delivered.clone(), delivered], "the leased row's completion was applied");
    let attempts = env.scalar_i64("SELECT count(*) FROM walhook.attempt_log").await;
    assert_eq!(attempts, 2, "one attempt row per attempt");
    let events = env.scalar_i64("SELECT count(*) FROM walhook.events").await;
    assert_eq!(events, 1, "the pending row's payload was stored, the delivered one's was not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_inserts_nothing_twice() {
    let env = Env::new("store_replay").await;
    let endpoint = Uuid::new_v4();
    let batch = || {
        vec![
            StoreOp::Insert(record(endpoint, 1, Status::Delivered, None)),
            StoreOp::Insert(record(endpoint, 2, Status::Pending, None)),
            StoreOp::Insert(record(endpoint, 2, Status::Pending, None)),
        ]
    };
    write_as_one_batch(&env, batch()).await;
    write_as_one_batch(&env, batch()).await;
    let count = |t: &str| format!("SELECT count(*) FROM walhook.{t}");
    assert_eq!(env.scalar_i64(&count("deliveries")).await, 2);
    assert_eq!(env.scalar_i64(&count("events")).await, 1);
    assert_eq!(env.scalar_i64(&count("attempt_log")).await, 1);
}

/// Two writers storing the same rows at once (a replica replaying what another is storing)
/// both succeed: each row is stored once, as it was sent, and neither takes the other's rows
/// for a refusal of its own (nothing is set aside or stored in a reduced form).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_storing_the_same_rows_at_once_store_each_once() {
    let env = Env::new("store_concurrent").await;
    let endpoint = Uuid::new_v4();
    let metrics = Arc::new(walhook::ops::metrics::Metrics::new());
    let writer = |ops: Vec<StoreOp>| {
        let health =
            Arc::new(walhook::ops::StoreHealth::new(metrics.store_stalled.clone(), metrics.store_pinned.clone()));
        let settings = walhook::store::WriterSettings {
            health,
            metrics: metrics.clone(),
            stall_after: walhook::store::DEFAULT_STALL_AFTER,
            archive: false,
        };
        let (writer, tx) = StoreWriter::new(env.db.clone(), 512, settings);
        async move {
            for op in ops {
                tx.send(op).await.unwrap();
            }
            drop(tx);
            tokio::time::timeout(Duration::from_secs(30), writer.run()).await.expect("the writer finishes");
        }
    };
    for round in 0..10u32 {
        let batch = || -> Vec<StoreOp> {
            (1..=300).map(|s| StoreOp::Insert(record(endpoint, round * 1000 + s, Status::Delivered, None))).collect()
        };
        tokio::join!(writer(batch()), writer(batch()));
    }
    let count = |q: &'static str| env.scalar_i64(q);
    assert_eq!(count("SELECT count(*) FROM walhook.deliveries").await, 3000);
    assert_eq!(count("SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'").await, 3000);
    assert_eq!(count("SELECT count(*) FROM walhook.attempt_log WHERE response_snippet = 'ok'").await, 3000);
    let set_aside: u64 =
        ["texts", "failed", "rejected"].iter().map(|f| metrics.store_set_aside.with_label_values(&[f]).get()).sum();
    assert_eq!(set_aside, 0, "a row the other writer stored was taken for a refusal");
}

fn failed_first(endpoint: Uuid, seq: u32) -> Record {
    let mut r = record(endpoint, seq, Status::Pending, None);
    r.attempt_count = 1;
    r.http_status = Some(500);
    r.last_error = Some("HTTP 500".into());
    r.attempt = Some(Attempt {
        status: Some(500),
        failure: Some(walhook::model::attempt::FailureKind::Status),
        error: Some("HTTP 500".into()),
        response_snippet: "oops".into(),
        ..ok_attempt()
    });
    r
}

async fn attempt_log(env: &Env, id: Uuid) -> Vec<(i32, Option<i32>)> {
    let q = "SELECT attempt, http_status_code FROM walhook.attempt_log WHERE delivery_id = $1 ORDER BY attempt";
    env.client.query(q, &[&id]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// A delivery written again with another outcome of its first attempt (a replay, or a second
/// writer at the same time) keeps one attempt 1: the one stored first, whichever table holds
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_written_again_keeps_one_first_attempt() {
    let env = Env::new("store_one_first").await;
    let endpoint = Uuid::new_v4();
    let (ok_first, failed_first_) = (record(endpoint, 1, Status::Delivered, None), failed_first(endpoint, 2));
    let (a, b) = (ok_first.id, failed_first_.id);
    write_as_one_batch(&env, vec![StoreOp::Insert(ok_first), StoreOp::Insert(failed_first_)]).await;
    write_as_one_batch(&env, vec![StoreOp::Insert(failed_first(endpoint, 1))]).await;
    write_as_one_batch(&env, vec![StoreOp::Insert(record(endpoint, 2, Status::Delivered, None))]).await;
    assert_eq!(attempt_log(&env, a).await, [(1, Some(200))], "the success stored first stays the only attempt 1");
    assert_eq!(attempt_log(&env, b).await, [(1, Some(500))], "the failure stored first stays the only attempt 1");
    // Two writers at once, one with the successes, the other with failures of the same rows
    // (60 rows each: a batch fits the writer's channel before it starts).
    for round in 1..=10u32 {
        let ok: Vec<StoreOp> =
            (1..=60).map(|s| StoreOp::Insert(record(endpoint, round * 1000 + s, Status::Delivered, None))).collect();
        let failed: Vec<StoreOp> =
            (1..=60).map(|s| StoreOp::Insert(failed_first(endpoint, round * 1000 + s))).collect();
        tokio::join!(write_as_one_batch(&env, ok), write_as_one_batch(&env, failed));
    }
    let twice = "SELECT count(*) FROM (SELECT delivery_id FROM walhook.attempt_log WHERE attempt = 1 \
                 GROUP BY 1 HAVING count(*) > 1) x";
    assert_eq!(env.scalar_i64(twice).await, 0, "a delivery with two attempt-1 records");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.attempt_log").await, 602);
}

/// An outbox attempt that succeeded but whose lease passed to another claim before its
/// outcome was stored: the row is the other claim's, and the attempt is still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_completed_after_its_lease_passed_on_is_still_recorded() {
    let env = Env::new("store_stale_lease").await;
    let endpoint = Uuid::new_v4();
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    let until = chrono::Utc::now() + chrono::Duration::seconds(60);
    let leased = record(endpoint, 1, Status::Pending, Some((theirs, until)));
    let id = leased.id;
    write_as_one_batch(&env, vec![StoreOp::Insert(leased)]).await;
    write_as_one_batch(&env, vec![StoreOp::Complete(delivered_on_attempt_1(id, endpoint, mine))]).await;
    assert_eq!(attempt_log(&env, id).await, [(1, Some(200))], "the receiver answered: the attempt is recorded");
    let status = env.scalar_i64("SELECT count(*) FROM walhook.deliveries WHERE status = 'pending'").await;
    assert_eq!(status, 1, "the row stays the other claim's");
}

/// A give-back never waits on a row another transaction holds (a store batch completing it):
/// waiting there while that batch waits on a row the give-back holds was a deadlock, seen
/// once under load as a 30 s stall and duplicate sends. It gives back only a row still
/// leased by the claim it names (each claim has its own token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_back_claims_skips_rows_another_transaction_holds_or_another_claim_leased() {
    let env = Env::new("store_give_back_skips_locked").await;
    let endpoint = Uuid::new_v4();
    let (token, later_claim) = (Uuid::new_v4(), Uuid::new_v4());
    let until = chrono::Utc::now() + chrono::Duration::seconds(60);
    let lease = |seq| if seq == 4 { Some((later_claim, until)) } else { Some((token, until)) };
    let rows: Vec<Record> = (1..=4).map(|seq| record(endpoint, seq, Status::Pending, lease(seq))).collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    write_as_one_batch(&env, rows.into_iter().map(StoreOp::Insert).collect()).await;
    let (mut locker, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM walhook.deliveries WHERE id = $1 FOR UPDATE", &[&ids[2]]).await.unwrap();
    let given = tokio::time::timeout(
        Duration::from_secs(10),
        walhook::store::outbox::give_back(&env.client, &ids, &[token; 4]),
    )
    .await
    .expect("the give-back waited on the locked row")
    .unwrap();
    assert_eq!(given, 2, "the two rows nobody holds and still leased by this claim are given back");
    tx.rollback().await.unwrap();
    let leased: Vec<Uuid> = env
        .client
        .query("SELECT id FROM walhook.deliveries WHERE leased_by IS NOT NULL ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut kept = vec![ids[2], ids[3]];
    kept.sort();
    assert_eq!(leased, kept, "the held row and the later claim's row keep their leases");
}
