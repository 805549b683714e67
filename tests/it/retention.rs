//! Background upkeep: retention removes only what it should, in small batches; an endpoint
//! whose deliveries have all failed for `dispatch.disable_after` is disabled.

use crate::common;

use std::time::Duration;

use crate::common::{wait_for, Env, ACCOUNT_A};
use walhook::admin::endpoints::{Caller, Endpoints};
use walhook::local::receiver::Reply;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_what_it_should() {
    let env = Env::new("retention_sweep").await;
    let ep = env.endpoint(ACCOUNT_A, "kept", &["contact.created"]).await;
    let doomed = env.endpoint(ACCOUNT_A, "deleted", &["contact.created"]).await;
    // Rows of every kind, aged by hand (retention: delivered 1h, failed 2h).
    env.sql(&format!(
        "INSERT INTO walhook.events (id, account_id, event_type, commit_lsn, seq, body, created_at) VALUES
           ('e0000000-0000-4000-8000-000000000001', '{A}', 'contact.created', 1, 1, '{{}}', now() - interval '3 hours'),
           ('e0000000-0000-4000-8000-000000000002', '{A}', 'contact.created', 1, 2, '{{}}', now() - interval '3 hours'),
           ('e0000000-0000-4000-8000-000000000003', '{A}', 'contact.created', 1, 3, '{{}}', now() - interval '10 minutes');
         INSERT INTO walhook.deliveries (id, endpoint_id, event_id, event_type, entity_key, commit_lsn, seq, status,
             attempt_count, next_attempt_at, created_at, completed_at) VALUES
           ('d0000000-0000-4000-8000-000000000001', '{ep}', gen_random_uuid(), 'contact.created', 'k1', 1, 1, 'delivered', 1, NULL, now() - interval '2 hours', now() - interval '2 hours'),
           ('d0000000-0000-4000-8000-000000000002', '{ep}', gen_random_uuid(), 'contact.created', 'k2', 1, 2, 'delivered', 1, NULL, now() - interval '3 hours', now() - interval '3 hours'),
           ('d0000000-0000-4000-8000-000000000003', '{ep}', gen_random_uuid(), 'contact.created', 'k3', 1, 3, 'delivered', 1, NULL, now() - interval '3 hours', now() - interval '3 hours'),
           ('d0000000-0000-4000-8000-000000000004', '{ep}', gen_random_uuid(), 'contact.created', 'k4', 1, 4, 'delivered', 1, NULL, now(), now() - interval '10 minutes'),
           ('d0000000-0000-4000-8000-000000000005', '{ep}', gen_random_uuid(), 'contact.created', 'k5', 1, 5, 'failed', 10, NULL, now(), now() - interval '90 minutes'),
           ('d0000000-0000-4000-8000-000000000006', '{ep}', gen_random_uuid(), 'contact.created', 'k6', 1, 6, 'failed', 10, NULL, now(), now() - interval '3 hours'),
           ('d0000000-0000-4000-8000-000000000007', '{ep}', 'e0000000-0000-4000-8000-000000000001', 'contact.created', 'k7', 1, 7, 'pending', 3, now() + interval '1 day', now() - interval '3 hours', NULL),
           ('d0000000-0000-4000-8000-000000000008', '{doomed}', gen_random_uuid(), 'contact.created', 'k8', 1, 8, 'pending', 3, now() + interval '1 day', now(), NULL),
           ('d0000000-0000-4000-8000-000000000009', '{doomed}', gen_random_uuid(), 'contact.created', 'k9', 1, 9, 'pending', 3, now() + interval '1 day', now(), NULL);
         INSERT INTO walhook.attempts (delivery_id, attempt, started_at, duration_ms, http_status_code)
           SELECT id, 1, now(), 5, 200 FROM walhook.deliveries;",
        ep = ep.id,
        doomed = doomed.id
    ))
    .await;
    let endpoints = Endpoints::new(env.db.clone(), SecretBox::new(None).unwrap(), AddressPolicy::default(), "public");
    endpoints.delete(Caller { account_id: ACCOUNT_A, user_id: common::USER }, doomed.id).await.unwrap();
    let wh =
        env.start("[retention]\ndelivered = \"1h\"\nfailed = \"2h\"\ninterval = \"200ms\"\nbatch_size = 1\n").await;
    let ids = || async {
        let rows =
            env.client.query("SELECT right(id::text, 1) FROM walhook.deliveries ORDER BY id", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<String>()
    };
    wait_for(Duration::from_secs(20), || async { ids().await == "457" }).await;
    // Kept: recent delivered (4), failed within 2h (5), pending of a live endpoint (7).
    let attempts = env.scalar_i64("SELECT count(*) FROM walhook.attempt_log").await;
    assert_eq!(attempts, 3, "attempts of removed deliveries are removed with them");
    let events: Vec<String> = env
        .client
        .query("SELECT right(id::text, 1) FROM walhook.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["1", "3"], "old payloads go unless a pending delivery needs them");
    assert!(env.metric("walhook_retention_deleted_rows_total{table=\"deliveries\"}").await >= 6.0);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_too_long_is_disabled() {
    let env = Env::new("disable_after_failing").await;
    let broken = env.endpoint(ACCOUNT_A, "broken", &["contact.created"]).await;
    let flaky = env.endpoint(ACCOUNT_A, "flaky", &["contact.created"]).await;
    env.receiver.set_default("broken", Reply::Status(500));
    env.receiver.script("flaky", vec![Reply::Status(500)]); // fails once, then recovers
    let wh = env
        .start("[dispatch]\ndisable_after = \"2s\"\nretry_schedule = [\"500ms\", \"1h\"]\n[retention]\ninterval = \"200ms\"\n")
        .await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'one')")).await;
    let q = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND NOT is_active AND disabled_reason = 'failing'",
        broken.id
    );
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(&q).await == 1 }).await;
    let q =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'failed'", broken.id);
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&q).await == 1 }).await;
    let q = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND is_active AND failing_since IS NULL",
        flaky.id
    );
    assert_eq!(env.scalar_i64(&q).await, 1, "an endpoint that recovered stays enabled");
    assert_eq!(env.metric("walhook_endpoints_disabled_total{reason=\"failing\"}").await, 1.0);
    wh.stop().await.unwrap();
}

/// Retention deciding to delete an old payload while a new pending delivery of the same event
/// is stored: the delete must not win, or the delivery fails for good without its payload.
/// The sweep is held (by a trigger waiting on an advisory lock) after it chose and locked the
/// event row, while the store writer stores the pending delivery; then it is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_deletes_the_payload_of_a_delivery_stored_meanwhile() {
    use std::sync::Arc;
    use walhook::model::delivery::Event;
    use walhook::store::{Record, Status, StoreOp, StoreWriter};

    let env = Env::new("retention_race").await;
    let ep = env.endpoint(ACCOUNT_A, "r", &["contact.created"]).await;
    let event = Arc::new(Event {
        id: walhook::model::delivery::event_id(walhook::model::position::Position::new(0x3000, 1)),
        account_id: ACCOUNT_A,
        event_type: walhook::model::event::EventType::parse("contact.created").unwrap(),
        entity_key: "contacts:1".into(),
        position: walhook::model::position::Position::new(0x3000, 1),
        committed_at_us: chrono::Utc::now().timestamp_micros(),
        body: bytes::Bytes::from_static(b"{\"event\":\"contact.created\"}"),
    });
    // The payload was stored hours ago (an earlier delivery of the event, since finished).
    env.sql(&format!(
        "INSERT INTO walhook.events (id, account_id, event_type, commit_lsn, seq, body, created_at)
           VALUES ('{}', '{A}', 'contact.created', {}, 1, '\\x7b7d', now() - interval '3 hours');
         CREATE FUNCTION public.hold_delete() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); RETURN OLD; END $$;
         CREATE TRIGGER hold_delete BEFORE DELETE ON walhook.events FOR EACH ROW EXECUTE FUNCTION public.hold_delete();
         SELECT pg_advisory_lock(4242);",
        event.id, 0x3000
    ))
    .await;
    let cfg = env.config("[retention]\ndelivered = \"1h\"\n");
    let db = env.db.clone();
    let sweep = tokio::spawn(async move {
        let metrics = walhook::ops::metrics::Metrics::new();
        walhook::store::maintenance::sweep(&db, &cfg, &metrics, &tokio_util::sync::CancellationToken::new()).await
    });
    let env = &env;
    let waiting_on = |what: &'static str| async move {
        let q = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND wait_event = '{what}'"
        );
        env.scalar_i64(&q).await
    };
    wait_for(Duration::from_secs(20), || async { waiting_on("advisory").await == 1 }).await;
    // The sweep has chosen the event; now a new pending delivery of it is stored.
    let (writer, tx) = StoreWriter::new(env.db.clone(), 8, crate::common::writer_settings());
    let writer = tokio::spawn(writer.run());
    let delivery = walhook::model::delivery::delivery_id(walhook::model::position::Position::new(0x3000, 1), ep.id);
    tx.send(StoreOp::Insert(Record {
        id: delivery,
        endpoint_id: ep.id,
        event: event.clone(),
        status: Status::Pending,
        attempt_count: 1,
        http_status: Some(503),
        next_attempt_at: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        lease: None,
        last_error: Some("HTTP 503".into()),
        completed_at: None,
        attempt: None,
        ticket: None,
    }))
    .await
    .unwrap();
    drop(tx);
    // Stored, or waiting for the sweep's row lock: either way, let the sweep go on.
    let stored = format!("SELECT count(*) FROM walhook.deliveries WHERE id = '{delivery}'");
    wait_for(Duration::from_secs(20), || async {
        env.scalar_i64(&stored).await == 1 || waiting_on("transactionid").await + waiting_on("tuple").await > 0
    })
    .await;
    env.sql("SELECT pg_advisory_unlock(4242)").await;
    sweep.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(20), writer).await.expect("the writer finishes").unwrap();
    let q = format!(
        "SELECT count(*) FROM walhook.deliveries d JOIN walhook.events e ON e.id = d.event_id \
         WHERE d.id = '{delivery}' AND d.status = 'pending'"
    );
    assert_eq!(env.scalar_i64(&q).await, 1, "the pending delivery's payload is still there");
}
