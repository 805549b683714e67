//! Sending deliveries again, as a customer does over the API: `webhooks-redeliver` (one
//! delivery, whatever its status) and `webhooks-replay` (a window), with and without the
//! payload archive (`retention.payloads`); and where a delivery sent again (also by
//! `webhooks-recover`) queues in its row: behind a change of that row in flight on the fast
//! path when the call commits (never beside it), and behind one already pending.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use walhook::local::receiver::{Received, Reply};

use crate::api::{auth_config, jwt, Api};
use crate::common::{wait_for, Env, ACCOUNT_A, ACCOUNT_B};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// The endpoint's deliveries, newest first.
async fn deliveries(api: &Api, token: &str, endpoint: &str) -> Vec<Value> {
    let body = json!({ "endpoint_id": endpoint, "limit": 100 });
    api.ok("webhooks-deliveries", token, body).await["deliveries"].as_array().unwrap().clone()
}

/// Creates an endpoint of account A on receiver path `path`; returns its id.
async fn endpoint(env: &Env, api: &Api, token: &str, path: &str) -> String {
    let body = json!({ "url": env.receiver.url(path), "events": ["contact.created", "contact.updated"] });
    let created = api.ok("webhooks-create", token, body).await;
    env.receiver.set_secret(path, created["signing_secret"].as_str().unwrap());
    created["endpoint"]["id"].as_str().unwrap().to_owned()
}

/// The 2xx-answered requests carrying row `row` in `log` from index `from` on.
pub(crate) fn answered(log: &[Received], row: &str, from: usize) -> Vec<Received> {
    log[from..].iter().filter(|r| r.answered == 200 && r.json()["data"]["id"] == row).cloned().collect()
}

/// The `first_name`s of `rs`, in order.
pub(crate) fn names(rs: &[Received]) -> Vec<String> {
    rs.iter().map(|r| r.json()["data"]["first_name"].as_str().unwrap().to_owned()).collect()
}

/// A delivery sent again never travels beside a change of its row: one in flight on the fast
/// path when the recovery commits finishes first (the recovered one waits for its answer),
/// and one pending in the outbox goes first too; changes after the call queue behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_delivery_queues_behind_its_rows_change_in_flight_or_pending() {
    let env = Env::new("resend_order").await;
    // Deliveries fail fast at first (two attempts).
    let mut wh = env.start(&format!("{}[dispatch]\nretry_schedule = [\"200ms\"]\n", auth_config())).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a, "r").await;
    let (x, y) = ("91000000-0000-4000-8000-000000000001", "91000000-0000-4000-8000-000000000002");

    // Rows x and y fail while the endpoint is down.
    env.receiver.set_default("r", Reply::Status(503));
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{x}', '{A}', 'x1')")).await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{y}', '{A}', 'y1')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "failed").await == 2 }).await;
    let failed: HashSet<String> =
        deliveries(&api, &a, &id).await.iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();

    // 1. In flight on the fast path: the endpoint sends directly again (a probe row goes out
    //    at once), answers slowly, and the recovery commits while y2 is being answered.
    env.receiver.set_default("r", Reply::Status(200));
    let direct = "walhook_deliveries_total{path=\"direct\"}";
    for n in 0.. {
        assert!(n < 30, "the endpoint never went back to sending directly");
        let before = env.metric(direct).await;
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'probe{n}')")).await;
        let probe = format!("probe{n}");
        env.receiver
            .wait_until(Duration::from_secs(30), |rs| {
                rs.iter().any(|r| r.answered == 200 && r.json()["data"]["first_name"] == probe.as_str())
            })
            .await
            .expect("probe row delivered");
        if env.metric(direct).await > before {
            break;
        }
    }
    let from = env.receiver.count();
    let slow = Duration::from_millis(1500);
    env.receiver.set_default("r", Reply::Delay(slow, 200));
    env.sql(&format!("UPDATE contacts SET first_name = 'y2' WHERE id = '{y}'")).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs[from..].iter().any(|r| r.json()["data"]["first_name"] == "y2"))
        .await
        .expect("y2 sent");
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let got = api.ok("webhooks-recover", &a, json!({ "id": id, "since": since })).await;
    assert_eq!(got, json!({ "recovered": 2 }));
    env.sql(&format!("UPDATE contacts SET first_name = 'y3' WHERE id = '{y}'")).await;
    let log = env.receiver.wait_until(Duration::from_secs(60), |rs| answered(rs, y, from).len() >= 3).await;
    let ys = answered(&log.expect("y1, y2 and y3 arrive"), y, from);
    assert_eq!(names(&ys), ["y2", "y1", "y3"], "in flight first, then the recovered one, then the later change");
    for pair in ys.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap();
        assert!(gap >= slow - Duration::from_millis(100), "sent {gap:?} apart, beside one another");
    }
    assert!(failed.contains(&ys[1].webhook_id), "recovered under its webhook-id");
    let log = env.receiver.wait_until(Duration::from_secs(30), |rs| answered(rs, x, from).len() == 1).await;
    let x1 = answered(&log.expect("x1 recovered"), x, from)[0].webhook_id.clone();
    assert!(failed.contains(&x1));

    // 2. Pending in the outbox: after a restart with a long last retry, x2 fails its first
    //    attempts and waits; x1 (delivered) is redelivered, behind it; redelivering x2 makes it
    //    due now and keeps its place: x2 goes first, then x1.
    wh.stop().await.unwrap();
    wh = env.start(&format!("{}[dispatch]\nretry_schedule = [\"300ms\", \"10m\"]\n", auth_config())).await;
    env.receiver.set_default("r", Reply::Status(503));
    let from = env.receiver.count();
    env.sql(&format!("UPDATE contacts SET first_name = 'x2' WHERE id = '{x}'")).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| {
            rs[from..].iter().filter(|r| r.json()["data"]["first_name"] == "x2").count() >= 2
        })
        .await
        .expect("x2 tried twice");
    let x2 = deliveries(&api, &a, &id).await.into_iter().find(|d| d["status"] == "pending").expect("x2 pending");
    env.receiver.set_default("r", Reply::Status(200));
    let again = api.ok("webhooks-redeliver", &a, json!({ "delivery_id": x1 })).await;
    assert_eq!(
        (again["delivery"]["id"].as_str(), again["delivery"]["status"].as_str()),
        (Some(x1.as_str()), Some("pending"))
    );
    let again = api.ok("webhooks-redeliver", &a, json!({ "delivery_id": x2["id"] })).await;
    assert_eq!(again["delivery"]["id"], x2["id"]);
    let log = env.receiver.wait_until(Duration::from_secs(30), |rs| answered(rs, x, from).len() >= 2).await;
    let xs = answered(&log.expect("x2 and x1 arrive"), x, from);
    assert_eq!(names(&xs), ["x2", "x1"], "the pending change first, the one sent again behind it");
    assert_eq!(xs[1].webhook_id, x1, "sent again under its webhook-id");
    assert!(xs.iter().all(|r| r.verified));
    wh.stop().await.unwrap();
}

/// Redeliver and replay need the payload: without the archive a delivered delivery cannot be
/// sent again (409, saying how to keep payloads); with it, any delivery of the window can,
/// under its `webhook-id`, as recorded (a replay never routes anew), in commit order per row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_and_replay_with_and_without_the_payload_archive() {
    let env = Env::new("resend_archive").await;
    let mut wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a, "r").await;
    env.receiver.set_default("r", Reply::Status(200));
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'before')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 1 }).await;
    let before = deliveries(&api, &a, &id).await[0]["id"].as_str().unwrap().to_owned();
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();

    // Without the archive: refused, nothing changes.
    let msg =
        api.err("webhooks-redeliver", &a, json!({ "delivery_id": before }), 409, "webhooks.payload_unavailable").await;
    assert!(msg.contains("retention.payloads"), "{msg}");
    let got = api.ok("webhooks-replay", &a, json!({ "id": id, "since": since })).await;
    assert_eq!(got, json!({ "replayed": 0, "payload_unavailable": 1 }));
    assert_eq!(api.count_status(&a, &id, "delivered").await, 1);
    // Errors name the field; another account's delivery looks missing.
    api.err("webhooks-redeliver", &a, json!({}), 400, "webhooks.invalid_request").await;
    api.err("webhooks-redeliver", &a, json!({ "delivery_id": "nope" }), 400, "webhooks.invalid_id").await;
    api.err("webhooks-redeliver", &jwt(ACCOUNT_B), json!({ "delivery_id": before }), 404, "webhooks.not_found").await;
    let missing = json!({ "delivery_id": "00000000-0000-4000-8000-000000000000" });
    api.err("webhooks-redeliver", &a, missing, 404, "webhooks.not_found").await;
    let msg = api.err("webhooks-replay", &a, json!({ "id": id }), 400, "webhooks.invalid_request").await;
    assert!(msg.contains("since"), "{msg}");
    let bad_event = json!({ "id": id, "since": since, "events": ["contact.exploded"] });
    let msg = api.err("webhooks-replay", &a, bad_event, 400, "webhooks.invalid_request").await;
    assert!(msg.contains("events"), "{msg}");
    api.err("webhooks-replay", &jwt(ACCOUNT_B), json!({ "id": id, "since": since }), 404, "webhooks.not_found").await;

    // With the archive.
    wh.stop().await.unwrap();
    wh = env.start(&format!("{}[retention]\npayloads = \"1h\"\n", auth_config())).await;
    let (p, q) = ("92000000-0000-4000-8000-000000000001", "92000000-0000-4000-8000-000000000002");
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{p}', '{A}', 'p1')")).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'p2' WHERE id = '{p}'")).await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{q}', '{A}', 'q1')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 4 }).await;
    let first = answered(&env.receiver.received(), p, 0);
    assert_eq!(names(&first), ["p1", "p2"]);

    let from = env.receiver.count();
    let got = api.ok("webhooks-redeliver", &a, json!({ "delivery_id": first[0].webhook_id })).await;
    assert_eq!(got["delivery"]["status"], "pending", "{got}");
    assert_eq!(got["delivery"]["completed_at"], Value::Null, "{got}");
    let log = env.receiver.wait_until(Duration::from_secs(30), |rs| !answered(rs, p, from).is_empty()).await;
    let again = answered(&log.expect("p1 sent again"), p, from);
    assert_eq!((names(&again), again[0].webhook_id.clone()), (vec!["p1".to_owned()], first[0].webhook_id.clone()));
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 4 }).await;

    // Replay what was recorded, even of events the endpoint no longer subscribes to.
    api.ok("webhooks-update", &a, json!({ "id": id, "events": ["contact.created"] })).await;
    let only_updates = json!({ "id": id, "since": since, "events": ["contact.updated"] });
    assert_eq!(api.ok("webhooks-replay", &a, only_updates).await, json!({ "replayed": 1, "payload_unavailable": 0 }));
    let log = env.receiver.wait_until(Duration::from_secs(30), |rs| answered(rs, p, from).len() >= 2).await;
    assert_eq!(names(&answered(&log.expect("p2 replayed"), p, from)), ["p1", "p2"]);
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 4 }).await;
    let from = env.receiver.count();
    let all = json!({ "id": id, "since": since });
    assert_eq!(api.ok("webhooks-replay", &a, all).await, json!({ "replayed": 3, "payload_unavailable": 1 }));
    let log = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| answered(rs, p, from).len() + answered(rs, q, from).len() >= 3)
        .await
        .expect("the window replayed");
    let replayed = answered(&log, p, from);
    assert_eq!(names(&replayed), ["p1", "p2"], "commit order per row");
    let ids: Vec<&str> = replayed.iter().map(|r| r.webhook_id.as_str()).collect();
    assert_eq!(ids, first.iter().map(|r| r.webhook_id.as_str()).collect::<Vec<_>>(), "same webhook-ids");
    assert_eq!(names(&answered(&log, q, from)), ["q1"]);

    // An inactive endpoint: refused, nothing changes.
    api.ok("webhooks-update", &a, json!({ "id": id, "is_active": false })).await;
    let msg =
        api.err("webhooks-replay", &a, json!({ "id": id, "since": since }), 400, "webhooks.invalid_request").await;
    assert!(msg.contains("inactive"), "{msg}");
    let msg = api
        .err("webhooks-redeliver", &a, json!({ "delivery_id": first[1].webhook_id }), 400, "webhooks.invalid_request")
        .await;
    assert!(msg.contains("inactive"), "{msg}");
    wh.stop().await.unwrap();
}
