//! Races around sending a delivery again, found by attacking `webhooks-redeliver`: each test
//! failed before its fix. A later call's delivery never borrows an earlier call's place; a call
//! made while no walhook streams waits for the stream; a tracked tail settling first never
//! lets a later change of the row overtake; retention never deletes a payload a call just
//! accepted; a burst of calls never deadlocks the pool delivery shares; a call made while the
//! slot was lost is released by `walhook slot-reset`.

use std::time::Duration;

use serde_json::json;
use walhook::local::receiver::Reply;

use crate::api::{auth_config, jwt, Api};
use crate::common::{wait_for, Env, ACCOUNT_A, USER};
use crate::resend::{answered, names};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
/// An account with no endpoint: its rows only make the stream busy.
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

fn archive() -> String {
    format!("{}[retention]\npayloads = \"1h\"\n", auth_config())
}

async fn endpoint(env: &Env, api: &Api, token: &str) -> String {
    let body = json!({ "url": env.receiver.url("r"), "events": ["contact.created", "contact.updated"] });
    let created = api.ok("webhooks-create", token, body).await;
    env.receiver.set_secret("r", created["signing_secret"].as_str().unwrap());
    env.receiver.set_default("r", Reply::Status(200));
    created["endpoint"]["id"].as_str().unwrap().to_owned()
}

/// Redelivers `delivery` of account A the way the API does, without a walhook running.
async fn redeliver_directly(env: &Env, delivery: &str) {
    let endpoints = walhook::admin::endpoints::Endpoints::new(
        env.db.clone(),
        walhook::security::secrets::SecretBox::new(None).unwrap(),
        walhook::security::ssrf::AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        "public",
    );
    let caller = walhook::admin::endpoints::Caller { account_id: ACCOUNT_A, user_id: USER };
    endpoints.redeliver(caller, delivery.parse().unwrap()).await.expect("redelivered");
}

/// Inserts row `id` of account A named `name`, waits until it is delivered, returns its
/// `webhook-id`.
async fn delivered_row(env: &Env, api: &Api, token: &str, endpoint: &str, id: &str, name: &str) -> String {
    let before = api.count_status(token, endpoint, "delivered").await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', '{name}')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(token, endpoint, "delivered").await > before }).await;
    answered(&env.receiver.received(), id, 0)[0].webhook_id.clone()
}

/// The stream lags behind two calls; between them, a change of the second call's row
/// commits. Releasing the first call's deliveries must not release the second's at the first
/// one's place (they would go before that change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_calls_delivery_never_takes_an_earlier_calls_place() {
    let env = Env::new("races_tags").await;
    let wh = env.start(&archive()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let (x, z) = ("93000000-0000-4000-8000-000000000001", "93000000-0000-4000-8000-000000000002");
    let x1 = delivered_row(&env, &api, &a, &id, x, "x1").await;
    let z1 = delivered_row(&env, &api, &a, &id, z, "z1").await;
    let from = env.receiver.count();
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{B}', 'bulk' FROM generate_series(1, 300000)"
    ))
    .await;
    api.ok("webhooks-redeliver", &a, json!({ "delivery_id": z1 })).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'x2' WHERE id = '{x}'")).await;
    api.ok("webhooks-redeliver", &a, json!({ "delivery_id": x1 })).await;
    let log = env.receiver.wait_until(Duration::from_secs(120), |rs| answered(rs, x, from).len() >= 2).await;
    assert_eq!(names(&answered(&log.expect("x1 and x2"), x, from)), ["x2", "x1"], "x2 committed before x1's call");
    wh.stop().await.unwrap();
}

/// A call served while no walhook streams (the leader down, a standby's API answering): once
/// one streams again, the delivery queues after the changes of its row committed before the
/// call, which the stream reads first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_while_nothing_streams_waits_for_the_stream() {
    let env = Env::new("races_offline").await;
    let mut wh = env.start(&archive()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let x = "95000000-0000-4000-8000-000000000001";
    let x1 = delivered_row(&env, &api, &a, &id, x, "x1").await;
    env.quiescent().await;
    wh.stop().await.unwrap();
    let from = env.receiver.count();
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{B}', 'bulk' FROM generate_series(1, 200000)"
    ))
    .await;
    env.sql(&format!("UPDATE contacts SET first_name = 'x2' WHERE id = '{x}'")).await;
    redeliver_directly(&env, &x1).await; // no walhook runs to serve the API
    wh = env.start(&archive()).await;
    let log = env.receiver.wait_until(Duration::from_secs(120), |rs| answered(rs, x, from).len() >= 2).await;
    assert_eq!(names(&answered(&log.expect("x1 and x2"), x, from)), ["x2", "x1"]);
    wh.stop().await.unwrap();
}

/// The change in flight when the call committed settles first and its row's next change
/// arrives while the delivery sent again is still retrying: that change waits behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_change_waits_for_a_retrying_delivery_sent_again() {
    let env = Env::new("races_tail").await;
    let cfg = format!("{}[dispatch]\nretry_schedule = [\"8s\"]\n", archive());
    let wh = env.start(&cfg).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let y = "98000000-0000-4000-8000-000000000001";
    let y1 = delivered_row(&env, &api, &a, &id, y, "y1").await;
    let from = env.receiver.count();
    env.receiver.set_default("r", Reply::Delay(Duration::from_millis(1500), 200));
    env.sql(&format!("UPDATE contacts SET first_name = 'y2' WHERE id = '{y}'")).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs[from..].iter().any(|r| r.json()["data"]["first_name"] == "y2"))
        .await
        .expect("y2 in flight");
    // y1, sent again behind y2, is refused once and retries 8 s later.
    env.receiver.script("r", vec![Reply::Status(503)]);
    env.receiver.set_default("r", Reply::Status(200));
    api.ok("webhooks-redeliver", &a, json!({ "delivery_id": y1 })).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| {
            rs[from..].iter().any(|r| r.json()["data"]["first_name"] == "y1" && r.answered == 503)
        })
        .await
        .expect("y1 sent again, refused once");
    // y2 is delivered (its owner sees it); a while later (long enough for walhook to look at
    // the outbox again) the row changes once more.
    wait_for(Duration::from_secs(30), || async {
        let newest = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id, "limit": 1 })).await;
        newest["deliveries"][0]["status"] == "delivered"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'y3' WHERE id = '{y}'")).await;
    let log = env.receiver.wait_until(Duration::from_secs(40), |rs| answered(rs, y, from).len() >= 3).await;
    assert_eq!(names(&answered(&log.expect("y1, y2, y3"), y, from)), ["y2", "y1", "y3"]);
    wh.stop().await.unwrap();
}

/// The retention sweep deleting a payload while a call accepts its delivery: the call waits
/// for the sweep and answers 409, or the sweep skips the payload; never a 200 for a delivery
/// that then fails for its missing payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_deletes_a_payload_a_call_accepted() {
    let env = Env::new("races_sweep").await;
    let wh = env.start(&archive()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let x1 = delivered_row(&env, &api, &a, &id, "94000000-0000-4000-8000-000000000001", "x1").await;
    // The sweep's own statement (at age 0), not committed yet.
    let (sweeper, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    sweeper.batch_execute("BEGIN").await.unwrap();
    let swept = sweeper
        .execute(
            "DELETE FROM walhook.events WHERE id IN ( \
               SELECT e.id FROM walhook.events e \
               WHERE NOT EXISTS (SELECT 1 FROM walhook.deliveries d WHERE d.event_id = e.id AND d.status <> 'delivered') \
               LIMIT 100 FOR UPDATE SKIP LOCKED)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let call = {
        let (api, a, x1) = (Api::new(&env), a.clone(), x1.clone());
        tokio::spawn(async move { api.call("webhooks-redeliver", &a, json!({ "delivery_id": x1 })).await })
    };
    // Commit the sweep once the call waits for it (or has answered without waiting).
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()";
    wait_for(Duration::from_secs(30), || async { call.is_finished() || env.scalar_i64(waiting).await > 0 }).await;
    sweeper.batch_execute("COMMIT").await.unwrap();
    let (status, body) = call.await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("webhooks.payload_unavailable")), "{body}");
    wh.stop().await.unwrap();
}

/// As many concurrent calls as the pool has connections all succeed (a call never holds one
/// connection while it waits for another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_calls_never_deadlocks_the_pool() {
    let env = Env::new("races_pool").await;
    let wh = env.start(&archive()).await; // pool_size 4
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(delivered_row(&env, &api, &a, &id, &format!("96000000-0000-4000-8000-00000000000{i}"), "c").await);
    }
    let calls: Vec<_> = ids
        .into_iter()
        .map(|d| {
            let (api, a) = (Api::new(&env), a.clone());
            tokio::spawn(async move { api.call("webhooks-redeliver", &a, json!({ "delivery_id": d })).await.0 })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200, "a call ran out of the pool");
    }
    wh.stop().await.unwrap();
}

/// A call made while the slot is lost (the API keeps answering) commits before the new slot's
/// start, where no session reads it: `walhook slot-reset` releases what it held, and the row's
/// later changes are not stuck behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_while_the_slot_was_lost_is_released_by_slot_reset() {
    let env = Env::new("races_slot_reset").await;
    let mut wh = env.start(&archive()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let id = endpoint(&env, &api, &a).await;
    let x = "a2000000-0000-4000-8000-000000000001";
    let x1 = delivered_row(&env, &api, &a, &id, x, "x1").await;
    env.quiescent().await;
    wh.stop().await.unwrap();
    // (The stopped walhook's walsender may still hold the slot for a moment.)
    let drop = format!("SELECT pg_drop_replication_slot('{}')", env.name);
    wait_for(Duration::from_secs(30), || async { env.client.batch_execute(&drop).await.is_ok() }).await;
    redeliver_directly(&env, &x1).await; // as the API of a replica would, while the slot is lost
    let mut reset = env.spawn_command("slot-reset", "");
    let status = reset.wait_exit(Duration::from_secs(60)).await.expect("slot-reset ends");
    let out = reset.log_text();
    assert!(status.success(), "{out}");
    let from = env.receiver.count();
    wh = env.start(&archive()).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'x2' WHERE id = '{x}'")).await;
    let log = env.receiver.wait_until(Duration::from_secs(30), |rs| answered(rs, x, from).len() >= 2).await;
    let xs = answered(&log.expect("x1 and x2 sent"), x, from);
    assert_eq!(names(&xs), ["x1", "x2"]);
    wh.stop().await.unwrap();
}
