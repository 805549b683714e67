//! Backfill as a customer's data warehouse sees it (`webhooks-backfill`, `-backfill-get`,
//! `-backfill-cancel`): every current row of the caller's account in the subscribed tables
//! arrives as `<entity>.backfilled`, signed and listed like any delivery; never older than the
//! live stream, so a receiver applying events in arrival order ends with exactly the table
//! while a writer changes it throughout; cancel, kill -9 and a takeover mid-backfill; the
//! refusals.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use walhook::local::receiver::Received;

use crate::api::{auth_config, jwt, Api};
use crate::common::{free_port, wait_for, Env, ACCOUNT_A, ACCOUNT_B};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

/// `[backfill]` with `chunk_size` and `rows_per_second`, and the test's auth.
pub(crate) fn config(chunk_size: usize, rows_per_second: u32) -> String {
    format!("{}[backfill]\nchunk_size = {chunk_size}\nrows_per_second = {rows_per_second}\n", auth_config())
}

/// `extra` plus listeners of their own, for a second process beside the first; and its API port.
fn second(extra: &str) -> (String, u16) {
    let api = free_port();
    (format!("{extra}\n[api]\nlisten = \"127.0.0.1:{api}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n", free_port()), api)
}

/// Inserts `n` rows into each of `tables` for `account` (ids from `generate_series`).
async fn rows(env: &Env, account: &str, tables: &[&str], n: usize) {
    for t in tables {
        let cols = match *t {
            "contacts" => "first_name",
            "companies" | "projects" => "name",
            _ => "subject",
        };
        env.sql(&format!(
            "INSERT INTO {t} (account_id, {cols}) SELECT '{account}', 'row ' || i FROM generate_series(1, {n}) i"
        ))
        .await;
    }
}

/// Creates an endpoint on receiver path `path` subscribed to `events` (the receiver checks
/// its signatures).
pub(crate) async fn endpoint(env: &Env, api: &Api, token: &str, path: &str, events: &[&str]) -> String {
    let created = api.ok("webhooks-create", token, json!({ "url": env.receiver.url(path), "events": events })).await;
    env.receiver.set_secret(path, created["signing_secret"].as_str().unwrap());
    created["endpoint"]["id"].as_str().unwrap().to_owned()
}

/// Waits until the process `p` (on the test's ports) streams; panics with its log if not.
async fn streaming(env: &Env, p: &mut crate::common::Proc) {
    let ops: std::net::SocketAddr = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = crate::common::readyz(ops).await {
            if body["standby"].as_bool() != Some(true) {
                return;
            }
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("walhook exited ({status})\n{}", p.log_text());
        }
        assert!(tokio::time::Instant::now() < deadline, "not streaming within 60 s\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until backfill `id` has `status`; returns it.
pub(crate) async fn until_status(api: &Api, token: &str, id: &str, status: &str, within: Duration) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        last = api.ok("webhooks-backfill-get", token, json!({ "id": id })).await["backfill"].clone();
        if last["status"] == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backfill {id} not {status} within {within:?}: {last}")
}

/// `(event, data.id)` of every backfilled request answered 200 on `path`.
fn backfilled(rs: &[Received], path: &str) -> Vec<(String, String)> {
    let path = format!("/{path}");
    rs.iter()
        .filter(|r| r.path == path && r.answered == 200)
        .map(|r| r.json())
        .filter(|b| b["event"].as_str().is_some_and(|e| e.ends_with(".backfilled")))
        .map(|b| (b["event"].as_str().unwrap().to_owned(), b["data"]["id"].as_str().unwrap().to_owned()))
        .collect()
}

/// `(event, id)` of every row of `account` in `tables` now.
async fn table_rows(env: &Env, account: &str, tables: &[(&str, &str)]) -> HashSet<(String, String)> {
    let mut out = HashSet::new();
    for (table, entity) in tables {
        let q = format!("SELECT id::text FROM {table} WHERE account_id = '{account}'");
        for r in env.client.query(q.as_str(), &[]).await.unwrap() {
            out.insert((format!("{entity}.backfilled"), r.get::<_, String>(0)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_sends_the_callers_rows_of_the_subscribed_tables_and_nothing_else() {
    let env = Env::new("backfill_all").await;
    rows(&env, A, &["contacts", "companies", "activities", "projects"], 700).await;
    rows(&env, B, &["contacts", "companies", "activities", "projects"], 300).await;
    let wh = env.start(&config(250, 0)).await;
    let (api, a, b) = (Api::new(&env), jwt(ACCOUNT_A), jwt(ACCOUNT_B));
    // Subscribed to contacts, companies and activities; not to projects.
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created", "company.updated", "activity.deleted"]).await;
    // Account B's endpoint on its own path: it must get nothing of this.
    let other = endpoint(&env, &api, &b, "b", &["contact.created", "project.created"]).await;

    let started = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"].clone();
    assert_eq!(started["status"], "running");
    assert_eq!(started["endpoint_id"], ep.as_str());
    assert_eq!(started["tables"], json!(["contacts", "companies", "activities"]));
    assert!(started["finished_at"].is_null() && started["reason"].is_null());
    let id = started["id"].as_str().unwrap().to_owned();
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(120)).await;
    env.quiescent().await;

    let expected =
        table_rows(&env, A, &[("contacts", "contact"), ("companies", "company"), ("activities", "activity")]).await;
    assert_eq!(expected.len(), 2100);
    let got = backfilled(&env.receiver.received(), "wh");
    let got_set: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(got_set, expected, "exactly account A's rows of the subscribed tables");
    assert_eq!(got.len(), got_set.len(), "each row once (no crash, no re-read)");
    assert_eq!(done["rows_sent"], 2100);
    assert_eq!(done["rows_total_estimate"], 2100);
    assert!(done["finished_at"].is_string());
    assert!(env.receiver.received_on("/b").is_empty(), "account B's endpoint got nothing");
    let _ = other;
    // Signed like every delivery, and listed with its event type.
    assert!(env.receiver.received_on("/wh").iter().all(|r| r.verified), "every backfilled request verifies");
    let sample = env.receiver.received_on("/wh")[0].json();
    assert!(sample["timestamp"].is_string() && sample["data"]["account_id"] == A, "{sample}");
    let listed = api
        .ok("webhooks-deliveries", &a, json!({ "endpoint_id": ep, "event_type": "company.backfilled", "limit": 100 }))
        .await;
    let listed = listed["deliveries"].as_array().unwrap();
    assert_eq!(listed.len(), 100);
    assert!(listed.iter().all(|d| d["event_type"] == "company.backfilled" && d["status"] == "delivered"));
    let metrics = env.metrics_text().await;
    assert!(metrics.contains("walhook_backfill_rows_total 2100"), "{metrics}");
    wh.stop().await.unwrap();
}

/// The consistency property: a receiver applying every event in arrival order (backfilled,
/// created and updated as an upsert, deleted as a delete) ends with exactly the table's rows
/// of the account, although a writer updates, deletes and inserts them throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_applying_events_in_arrival_order_ends_with_exactly_the_table_under_a_concurrent_writer() {
    let env = Env::new("backfill_consistency").await;
    rows(&env, A, &["contacts"], 3000).await;
    rows(&env, B, &["contacts"], 500).await;
    env.sql("UPDATE contacts SET lead_score = 0").await;
    let wh = env.start(&config(100, 4000)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created", "contact.updated", "contact.deleted"]).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (url, stop) = (env.url.clone(), stop.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut changes = 0u64;
            while !stop.is_cancelled() {
                changes += 1;
                // Each change touches a random row of A (and now and then moves one to B and back).
                let sql = match changes % 10 {
                    0 => format!(
                        "DELETE FROM contacts WHERE id = (SELECT id FROM contacts WHERE account_id = '{A}' \
                         ORDER BY random() LIMIT 1)"
                    ),
                    1 => format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'new', {changes})"),
                    2 => format!(
                        "UPDATE contacts SET account_id = CASE WHEN account_id = '{A}' THEN '{B}'::uuid ELSE '{A}'::uuid END, \
                         lead_score = {changes} WHERE id = (SELECT id FROM contacts ORDER BY random() LIMIT 1)"
                    ),
                    _ => format!(
                        "UPDATE contacts SET lead_score = {changes} WHERE id = (SELECT id FROM contacts \
                         WHERE account_id = '{A}' ORDER BY random() LIMIT 1)"
                    ),
                };
                client.batch_execute(&sql).await.unwrap();
            }
            changes
        })
    };
    let started = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"].clone();
    let id = started["id"].as_str().unwrap().to_owned();
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(180)).await;
    stop.cancel();
    let changes = writer.await.unwrap();
    env.quiescent().await;

    // Apply in arrival order.
    let mut applied: HashMap<String, i64> = HashMap::new();
    for r in env.receiver.received_on("/wh").iter().filter(|r| r.answered == 200) {
        let b = r.json();
        let row = b["data"]["id"].as_str().unwrap().to_owned();
        match b["event"].as_str().unwrap() {
            "contact.deleted" => {
                applied.remove(&row);
            }
            _ => {
                applied.insert(row, b["data"]["lead_score"].as_i64().unwrap_or(-1));
            }
        }
    }
    let table: HashMap<String, i64> = env
        .client
        .query(&format!("SELECT id::text, lead_score FROM contacts WHERE account_id = '{A}'"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<i32>>(1).map_or(-1, i64::from)))
        .collect();
    let mismatches: Vec<_> = table
        .iter()
        .filter(|(k, v)| applied.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), *v, applied.get(k).copied()))
        .chain(applied.iter().filter(|(k, _)| !table.contains_key(*k)).map(|(k, v)| (k.clone(), -2, Some(*v))))
        .collect();
    let (sent, retried) = (
        env.metric("walhook_backfill_chunks_total{outcome=\"sent\"}").await,
        env.metric("walhook_backfill_chunks_total{outcome=\"retried\"}").await,
    );
    println!(
        "backfill consistency: {} rows in the table, {} sent by the backfill in {sent} chunks ({retried} read \
         again), {changes} concurrent changes, {} mismatches",
        table.len(),
        done["rows_sent"],
        mismatches.len()
    );
    assert!(changes > 100, "the writer ran throughout ({changes} changes)");
    assert!(
        mismatches.is_empty(),
        "rows differing (id, table, receiver): {:?}",
        &mismatches[..mismatches.len().min(10)]
    );
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_backfill_reads_no_chunk_after_the_call() {
    let env = Env::new("backfill_cancel").await;
    rows(&env, A, &["contacts"], 3000).await;
    let wh = env.start(&config(50, 200)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created"]).await;
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    env.receiver.wait_until(Duration::from_secs(60), |rs| backfilled(rs, "wh").len() >= 100).await.unwrap();
    let cancelled = api.ok("webhooks-backfill-cancel", &a, json!({ "id": id })).await["backfill"].clone();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    let at_cancel = backfilled(&env.receiver.received(), "wh").len();
    // The runner has moved on from it (it says so once the chunk it was reading is done),
    // and everything sent has arrived.
    wait_for(Duration::from_secs(60), || async { env.metric("walhook_backfills_running").await == 0.0 }).await;
    env.quiescent().await;
    let after = backfilled(&env.receiver.received(), "wh").len();
    assert!(after <= at_cancel + 50, "at most the chunk being read when the call was made: {at_cancel} → {after}");
    assert!(after < 3000);
    let got = api.ok("webhooks-backfill-get", &a, json!({ "id": id })).await["backfill"].clone();
    assert_eq!(got["status"], "cancelled");
    // Cancelling again answers it as it is; a new backfill may start.
    assert_eq!(api.ok("webhooks-backfill-cancel", &a, json!({ "id": id })).await["backfill"]["status"], "cancelled");
    api.ok("webhooks-backfill", &a, json!({ "id": ep })).await;
    wh.stop().await.unwrap();
}

/// Every row of A's contacts arrives at least once; a row sent twice (the chunk being read
/// when the process died) carries the same `webhook-id` both times. Returns the duplicates.
fn every_row_once_or_again_under_its_id(rs: &[Received], expected: &HashSet<(String, String)>) -> usize {
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for r in rs.iter().filter(|r| r.path == "/wh" && r.answered == 200) {
        let b = r.json();
        if b["event"] == "contact.backfilled" {
            ids.entry(b["data"]["id"].as_str().unwrap().to_owned()).or_default().insert(r.webhook_id.clone());
        }
    }
    let got: HashSet<_> = ids.keys().map(|k| ("contact.backfilled".to_owned(), k.clone())).collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    assert!(missing.is_empty(), "{} of {} rows arrived; missing e.g. {missing:?}", got.len(), expected.len());
    assert!(ids.values().all(|w| w.len() == 1), "a row sent again keeps its webhook-id");
    let requests = backfilled(rs, "wh").len();
    requests - got.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_mid_way_finishes_after_a_restart_and_misses_no_row() {
    let env = Env::new("backfill_kill9").await;
    rows(&env, A, &["contacts"], 4000).await;
    let cfg = config(200, 1000);
    let mut first = env.spawn_binary(&cfg);
    streaming(&env, &mut first).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created"]).await;
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| backfilled(rs, "wh").len() >= 1000)
        .await
        .unwrap_or_else(|_| panic!("backfill did not start\n{}", first.log_text()));
    first.kill9();
    let mut again = env.spawn_binary(&cfg);
    streaming(&env, &mut again).await;
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(120)).await;
    env.quiescent().await;
    let expected = table_rows(&env, A, &[("contacts", "contact")]).await;
    let twice = every_row_once_or_again_under_its_id(&env.receiver.received(), &expected);
    println!("backfill after kill -9: {} rows, {twice} sent twice", expected.len());
    assert!(twice <= 2 * 200, "at most the chunks in flight are sent again: {twice}");
    assert!(done["rows_sent"].as_i64().unwrap() >= 4000);
    again.sigterm();
    assert!(again.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_mid_backfill_finishes_it() {
    let env = Env::new("backfill_takeover").await;
    rows(&env, A, &["contacts"], 4000).await;
    let cfg = config(200, 1000);
    let mut leader = env.spawn_binary(&cfg);
    streaming(&env, &mut leader).await;
    let (standby_cfg, standby_api) = second(&cfg);
    let mut standby = env.spawn_binary(&standby_cfg);
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created"]).await;
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| backfilled(rs, "wh").len() >= 1000)
        .await
        .unwrap_or_else(|_| panic!("backfill did not start\n{}", leader.log_text()));
    leader.kill9();
    // The customer's calls now reach the standby.
    let api = Api::on_port(standby_api);
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(120)).await;
    env.quiescent().await;
    let expected = table_rows(&env, A, &[("contacts", "contact")]).await;
    let twice = every_row_once_or_again_under_its_id(&env.receiver.received(), &expected);
    assert!(twice <= 2 * 200, "at most the chunks in flight are sent again: {twice}");
    assert!(done["rows_sent"].as_i64().unwrap() >= 4000);
    assert!(standby.log_text().contains("replication streaming"), "the standby took over");
    standby.sigterm();
    assert!(standby.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backfills_change_nothing_and_say_why() {
    let env = Env::new("backfill_refusals").await;
    rows(&env, A, &["contacts"], 2000).await;
    let wh = env.start(&config(100, 100)).await;
    let (api, a, b) = (Api::new(&env), jwt(ACCOUNT_A), jwt(ACCOUNT_B));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created", "company.deleted"]).await;
    // Tables it does not subscribe to, or that do not exist; an empty list.
    let m = api
        .err("webhooks-backfill", &a, json!({ "id": ep, "tables": ["projects"] }), 400, "webhooks.invalid_request")
        .await;
    assert!(m.contains("tables") && m.contains("projects"), "{m}");
    let m = api
        .err("webhooks-backfill", &a, json!({ "id": ep, "tables": ["deals"] }), 400, "webhooks.invalid_request")
        .await;
    assert!(m.contains("deals"), "{m}");
    api.err("webhooks-backfill", &a, json!({ "id": ep, "tables": [] }), 400, "webhooks.invalid_request").await;
    api.err("webhooks-backfill", &a, json!({ "id": ep, "tables": "contacts" }), 400, "webhooks.invalid_request").await;
    api.err("webhooks-backfill", &a, json!({ "id": "nope" }), 400, "webhooks.invalid_id").await;
    api.err("webhooks-backfill", &a, json!({ "id": ep, "extra": 1 }), 400, "webhooks.invalid_request").await;
    // Another account's endpoint does not exist for B.
    api.err("webhooks-backfill", &b, json!({ "id": ep }), 404, "webhooks.not_found").await;
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.backfills").await, 0, "nothing started");

    let one = api.ok("webhooks-backfill", &a, json!({ "id": ep, "tables": ["contacts"] })).await["backfill"].clone();
    let id = one["id"].as_str().unwrap();
    let m = api.err("webhooks-backfill", &a, json!({ "id": ep }), 409, "webhooks.backfill_running").await;
    assert!(m.contains(id), "names the running backfill: {m}");
    // B sees neither the backfill nor a way to cancel it.
    api.err("webhooks-backfill-get", &b, json!({ "id": id }), 404, "webhooks.not_found").await;
    api.err("webhooks-backfill-cancel", &b, json!({ "id": id }), 404, "webhooks.not_found").await;
    assert_eq!(api.ok("webhooks-backfill-get", &a, json!({ "id": id })).await["backfill"]["status"], "running");
    // An inactive endpoint would send nothing.
    api.ok("webhooks-backfill-cancel", &a, json!({ "id": id })).await;
    api.ok("webhooks-update", &a, json!({ "id": ep, "is_active": false })).await;
    let m = api.err("webhooks-backfill", &a, json!({ "id": ep }), 400, "webhooks.invalid_request").await;
    assert!(m.contains("inactive"), "{m}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.backfills").await, 1);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_endpoint_ends_its_backfill() {
    let env = Env::new("backfill_deleted_endpoint").await;
    rows(&env, A, &["contacts"], 2000).await;
    let wh = env.start(&config(50, 200)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created"]).await;
    let keep = endpoint(&env, &api, &a, "keep", &["contact.created"]).await;
    let gone =
        api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    let kept =
        api.ok("webhooks-backfill", &a, json!({ "id": keep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    env.receiver.wait_until(Duration::from_secs(60), |rs| backfilled(rs, "wh").len() >= 50).await.unwrap();
    api.ok("webhooks-delete", &a, json!({ "id": ep })).await;
    api.err("webhooks-backfill-get", &a, json!({ "id": gone }), 404, "webhooks.not_found").await;
    // The other endpoint's backfill goes on to the end.
    until_status(&api, &a, &kept, "finished", Duration::from_secs(120)).await;
    env.quiescent().await;
    let expected = table_rows(&env, A, &[("contacts", "contact")]).await;
    let got: HashSet<_> = backfilled(&env.receiver.received(), "keep").into_iter().collect();
    assert_eq!(got, expected);
    wh.stop().await.unwrap();
}
