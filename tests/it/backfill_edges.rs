//! Backfill at its edges, from the red team's experiments: every column exactly as the stream
//! writes it (booleans, inet), large values under concurrent updates with a FULL and an index
//! replica identity, a writer that moves rows between accounts, deletes and re-inserts them and
//! holds long transactions, twenty concurrent starts, a subscription dropped mid-backfill, and
//! the walsender terminated again and again. The receiver applies events in arrival order
//! (first arrival of each webhook-id; upserts merge, deletes remove) and is compared with the
//! table (`to_jsonb`) column by column.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Map, Value};
use walhook::local::receiver::Received;

use crate::api::{jwt, Api};
use crate::backfill::{config, endpoint, until_status};
use crate::common::{Env, ACCOUNT_A};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

async fn until_ended(api: &Api, token: &str, id: &str, within: Duration) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        last = api.ok("webhooks-backfill-get", token, json!({ "id": id })).await["backfill"].clone();
        if last["status"] != "running" {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backfill {id} not ended within {within:?}: {last}")
}

/// The receiver's state for `path`: events applied in arrival order (first arrival of each
/// webhook-id only), upserts merging the fields present, deletes removing.
fn applied(rs: &[Received], path: &str, entity: &str) -> HashMap<String, Map<String, Value>> {
    let path = format!("/{path}");
    let mut seen = HashSet::new();
    let mut state: HashMap<String, Map<String, Value>> = HashMap::new();
    for r in rs.iter().filter(|r| r.path == path && r.answered == 200) {
        if !seen.insert(r.webhook_id.clone()) {
            continue;
        }
        let b = r.json();
        let ev = b["event"].as_str().unwrap();
        if !ev.starts_with(entity) {
            continue;
        }
        let id = b["data"]["id"].as_str().unwrap().to_owned();
        if ev.ends_with(".deleted") {
            state.remove(&id);
        } else {
            let data = b["data"].as_object().unwrap().clone();
            let e = state.entry(id).or_default();
            for (k, v) in data {
                e.insert(k, v);
            }
        }
    }
    state
}

/// Ground truth: a second backfill, with no writer, to a fresh endpoint on `path`.
async fn truth(env: &Env, api: &Api, token: &str, path: &str, events: &[&str]) -> HashMap<String, Map<String, Value>> {
    let ep = endpoint(env, api, token, path, events).await;
    let id =
        api.ok("webhooks-backfill", token, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    until_status(api, token, &id, "finished", Duration::from_secs(300)).await;
    env.quiescent().await;
    applied(&env.receiver.received(), path, events[0].split('.').next().unwrap())
}

/// Rows missing at the receiver, extra there, and differing (with the columns that differ).
type Differences = (Vec<String>, Vec<String>, Vec<(String, Vec<String>)>);

/// (missing at receiver, extra at receiver, differing rows with the columns that differ)
fn compare(got: &HashMap<String, Map<String, Value>>, want: &HashMap<String, Map<String, Value>>) -> Differences {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).cloned().collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    let mut differ = Vec::new();
    for (k, w) in want {
        let Some(g) = got.get(k) else { continue };
        let cols: Vec<String> = w.keys().filter(|c| g.get(*c) != w.get(*c)).cloned().collect();
        if !cols.is_empty() {
            differ.push((k.clone(), cols));
        }
    }
    (missing, extra, differ)
}

fn spawn_writer(
    url: String,
    stop: tokio_util::sync::CancellationToken,
    f: impl Fn(u64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            if let Err(e) = client.batch_execute(&f(n)).await {
                // deadlocks/serialization between writers are fine; the tx rolled back
                let _ = client.batch_execute("ROLLBACK").await;
                tracing::debug!("writer: {e}");
            }
        }
        n
    })
}

/// The table as PostgreSQL says (to_jsonb), columns `cols`, for `account`.
async fn db_truth(env: &Env, account: &str, cols: &[&str]) -> HashMap<String, Map<String, Value>> {
    let q = format!("SELECT to_jsonb(c)::text FROM contacts c WHERE account_id = '{account}'");
    let mut out = HashMap::new();
    for r in env.client.query(q.as_str(), &[]).await.unwrap() {
        let v: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap();
        let m: Map<String, Value> = cols.iter().map(|c| ((*c).to_owned(), norm(&v[*c]))).collect();
        out.insert(v["id"].as_str().unwrap().to_owned(), m);
    }
    out
}

/// Numbers compared as f64 (numeric may be a string or a number).
fn norm(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::String(s) if s.parse::<f64>().is_ok() && !s.contains('-') => json!(s.parse::<f64>().unwrap()),
        other => other.clone(),
    }
}

fn project(state: &HashMap<String, Map<String, Value>>, cols: &[&str]) -> HashMap<String, Map<String, Value>> {
    state
        .iter()
        .map(|(k, r)| (k.clone(), cols.iter().filter_map(|c| r.get(*c).map(|v| ((*c).to_owned(), norm(v)))).collect()))
        .collect()
}

const COLS: &[&str] = &[
    "id",
    "account_id",
    "first_name",
    "last_name",
    "email",
    "title",
    "lead_score",
    "is_subscribed",
    "tags",
    "custom_fields",
    "lifetime_value",
];

/// Backfilled `(data.id → set of webhook-ids)` on `path`, and the number of backfilled requests.
fn backfilled_ids(rs: &[Received], path: &str) -> (HashMap<String, HashSet<String>>, usize) {
    let path = format!("/{path}");
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    let mut n = 0;
    for r in rs.iter().filter(|r| r.path == path && r.answered == 200) {
        let b = r.json();
        if b["event"].as_str().is_some_and(|e| e.ends_with(".backfilled")) {
            n += 1;
            ids.entry(b["data"]["id"].as_str().unwrap().to_owned()).or_default().insert(r.webhook_id.clone());
        }
    }
    (ids, n)
}

/// 1. Every column: a backfilled row says what the table says (no writer at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_rows_are_written_exactly_as_the_stream_writes_them() {
    let env = Env::new("bfe_columns").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, email, lead_score, tags, custom_fields, lifetime_value, is_subscribed) \
         SELECT '{A}', 'row ' || i, 'r' || i || '@x', i, ARRAY['t' || i], jsonb_build_object('k', i), i, i % 2 = 0 \
         FROM generate_series(1, 20) i"
    ))
    .await;
    env.sql("ALTER TABLE contacts ADD COLUMN ip inet, ADD COLUMN flags boolean[], ADD COLUMN net cidr").await;
    env.sql("UPDATE contacts SET ip = '10.0.0.1', flags = ARRAY[true, false], net = '10.1.0.0/16'").await;
    let wh = env.start(&config(100, 0)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    // The stream's rendering of the same rows, for the types the sample schema lacks.
    let live = endpoint(&env, &api, &a, "live", &["contact.updated"]).await;
    let _ = live;
    env.sql("UPDATE contacts SET first_name = first_name").await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().filter(|r| r.path == "/live").count() >= 20)
        .await
        .unwrap();
    let live_state = applied(&env.receiver.received(), "live", "contact");
    let got = truth(&env, &api, &a, "wh", &["contact.created"]).await;
    let want = db_truth(&env, A, COLS).await;
    let (missing, extra, differ) = compare(&project(&got, COLS), &want);
    for (k, cols) in differ.iter().take(2) {
        for c in cols {
            println!("  {k}.{c}: backfilled {:?} table {:?}", got[k].get(c), want[k].get(c));
        }
    }
    let extra_cols = ["ip", "flags", "net", "is_subscribed"];
    let lives = project(&live_state, &extra_cols);
    let (_, _, live_differ) = compare(&project(&got, &extra_cols), &lives);
    if let Some((k, cols)) = live_differ.first() {
        for c in cols {
            println!("  {k}.{c}: backfilled {:?} stream {:?}", got[k].get(c), live_state[k].get(c));
        }
    }
    println!("backfilled vs stream: {} rows differ in ip/flags/net/is_subscribed", live_differ.len());
    assert!(live_differ.is_empty(), "a backfilled row is written otherwise than the stream writes it");
    println!(
        "columns: {} rows; missing {}, extra {}, differing {}",
        want.len(),
        missing.len(),
        extra.len(),
        differ.len()
    );
    assert!(missing.is_empty() && extra.is_empty() && differ.is_empty(), "backfilled rows differ from the table");
    wh.stop().await.unwrap();
}

/// 1. TOAST-sized values: a row updated while its chunk is read is dropped from the chunk and
/// its `updated` arrives instead; the update carries no unchanged TOASTed value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_survive_a_backfill_under_concurrent_updates() {
    large_values_under_updates("bfe_toast", false).await;
}

/// 1b. The same with REPLICA IDENTITY USING INDEX (id, account_id) (deletes keep account_id, so
/// migrate keeps it): an update in a chunk's window leaves the large value out, so the chunk is
/// read again rather than dropping the row or sending it older than the update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_survive_a_backfill_under_an_index_replica_identity() {
    large_values_under_updates("bfe_toast_idx", true).await;
}

/// About 12 kB values in 1,500 rows (stored out of line), updated at random while a backfill
/// in chunks of 20 runs; under REPLICA IDENTITY FULL, or with `index_identity` an index on
/// `(id, account_id)` (updates then leave unchanged large values out).
async fn large_values_under_updates(name: &str, index_identity: bool) {
    let env = Env::new(name).await;
    if index_identity {
        env.sql("CREATE UNIQUE INDEX contacts_id_acct ON contacts (id, account_id); ALTER TABLE contacts REPLICA IDENTITY USING INDEX contacts_id_acct").await;
    }
    // title: ~12 KB of hex, stored out of line.
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, title, lead_score) \
         SELECT '{A}', 'row ' || i, (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 400) g), 0 \
         FROM generate_series(1, 1500) i"
    ))
    .await;
    let identity = if index_identity { "[replication]\nreplica_identity_full = false\n" } else { "" };
    let wh = env.start(&format!("{}{identity}", config(20, 0))).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let events = ["contact.created", "contact.updated", "contact.deleted"];
    let ep = endpoint(&env, &api, &a, "wh", &events).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = spawn_writer(env.url.clone(), stop.clone(), |n| {
        format!(
            "UPDATE contacts SET lead_score = {n} WHERE id = (SELECT id FROM contacts WHERE account_id = '{A}' \
             ORDER BY random() LIMIT 1)"
        )
    });
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(300)).await;
    stop.cancel();
    let changes = writer.await.unwrap();
    env.quiescent().await;
    let got = applied(&env.receiver.received(), "wh", "contact");
    let want = db_truth(&env, A, COLS).await;
    let got = project(&got, COLS);
    let (missing, extra, differ) = compare(&got, &want);
    let no_title = differ.iter().filter(|(_, c)| c.contains(&"title".to_owned())).count();
    println!(
        "toast: {} rows, rows_sent {}, {changes} changes; missing {}, extra {}, differing {} (title absent/wrong in {no_title}); e.g. {:?}",
        want.len(),
        done["rows_sent"],
        missing.len(),
        extra.len(),
        differ.len(),
        differ.iter().take(3).collect::<Vec<_>>()
    );
    for (k, cols) in differ.iter().take(2) {
        for c in cols {
            println!("  {k}.{c}: receiver {:?} table {:?}", got[k].get(c), want[k].get(c));
        }
    }
    assert!(missing.is_empty() && extra.is_empty() && differ.is_empty(), "receiver differs from the table");
    wh.stop().await.unwrap();
}

/// 1. A harder writer: multi-row transactions, moves A→B→A (across and within transactions),
/// delete + re-insert of the same id, long transactions spanning chunks, many small chunks.
/// Compares every column of `data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_moving_deleting_and_reinserting_rows_leaves_every_column_right() {
    let env = Env::new("bfe_hard").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, email, lead_score, tags, custom_fields, lifetime_value) \
         SELECT '{A}', 'row ' || i, 'r' || i || '@x', 0, ARRAY['t' || i], jsonb_build_object('k', i), i \
         FROM generate_series(1, 1500) i"
    ))
    .await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{B}', 'b ' || i FROM generate_series(1, 300) i"
    ))
    .await;
    let wh = env.start(&config(5, 0)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let events = ["contact.created", "contact.updated", "contact.deleted"];
    let ep = endpoint(&env, &api, &a, "wh", &events).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let pick = format!("(SELECT id FROM contacts WHERE account_id = '{A}' ORDER BY random() LIMIT 1)");
    let w1 = {
        let pick = pick.clone();
        spawn_writer(env.url.clone(), stop.clone(), move |n| {
            match n % 8 {
            // multi-row transaction touching several columns of 5 rows
            0 => format!(
                "BEGIN; UPDATE contacts SET lead_score = {n}, email = 'e{n}@x', tags = ARRAY['n{n}'], \
                 custom_fields = jsonb_build_object('n', {n}), lifetime_value = {n}.5 \
                 WHERE id IN (SELECT id FROM contacts WHERE account_id = '{A}' ORDER BY random() LIMIT 5); COMMIT;"
            ),
            // move to B and back in one transaction
            1 => format!(
                "BEGIN; CREATE TEMP TABLE IF NOT EXISTS m(id uuid); DELETE FROM m; INSERT INTO m SELECT {pick}; \
                 UPDATE contacts SET account_id = '{B}', first_name = 'inB{n}' WHERE id = (SELECT id FROM m); \
                 UPDATE contacts SET account_id = '{A}', first_name = 'back{n}' WHERE id = (SELECT id FROM m); COMMIT;"
            ),
            // move one way (either direction)
            2 => format!(
                "UPDATE contacts SET account_id = CASE WHEN account_id = '{A}' THEN '{B}'::uuid ELSE '{A}'::uuid END, \
                 lead_score = {n} WHERE id = (SELECT id FROM contacts ORDER BY random() LIMIT 1)"
            ),
            // delete and re-insert the same id, same transaction
            3 => format!(
                "BEGIN; CREATE TEMP TABLE IF NOT EXISTS d(LIKE contacts); DELETE FROM d; \
                 WITH x AS (DELETE FROM contacts WHERE id = {pick} RETURNING *) INSERT INTO d SELECT * FROM x; \
                 INSERT INTO contacts SELECT * FROM d; UPDATE contacts SET first_name = 'reins{n}' WHERE id IN (SELECT id FROM d); COMMIT;"
            ),
            // delete (re-inserted later by 5)
            4 => format!(
                "DELETE FROM contacts WHERE id = {pick}"
            ),
            5 => format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'new{n}', {n})"),
            _ => format!("UPDATE contacts SET lead_score = {n}, first_name = 'u{n}' WHERE id = {pick}"),
        }
        })
    };
    // Long transactions: hold changes of several rows across many chunks.
    let w2 = {
        let (url, stop) = (env.url.clone(), stop.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let r: Result<(), tokio_postgres::Error> = async {
                    client.batch_execute("BEGIN").await?;
                    for i in 0..5 {
                        client
                            .batch_execute(&format!(
                                "UPDATE contacts SET lead_score = -{n}{i}, last_name = 'long{n}.{i}' WHERE id = \
                                 (SELECT id FROM contacts WHERE account_id = '{A}' ORDER BY random() LIMIT 1); \
                                 INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'longins{n}.{i}')"
                            ))
                            .await?;
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                    client.batch_execute("COMMIT").await
                }
                .await;
                if r.is_err() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            }
            n
        })
    };
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(400)).await;
    stop.cancel();
    let (c1, c2) = (w1.await.unwrap(), w2.await.unwrap());
    env.quiescent().await;
    let got = applied(&env.receiver.received(), "wh", "contact");
    let want = db_truth(&env, A, COLS).await;
    let got = project(&got, COLS);
    let (missing, extra, differ) = compare(&got, &want);
    let (sent, retried) = (
        env.metric("walhook_backfill_chunks_total{outcome=\"sent\"}").await,
        env.metric("walhook_backfill_chunks_total{outcome=\"retried\"}").await,
    );
    println!(
        "hard writer: {} rows, rows_sent {}, chunks sent {sent} retried {retried}, {c1} short + {c2} long txs; \
         missing {} {:?}, extra {} {:?}, differing {} {:?}",
        want.len(),
        done["rows_sent"],
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>(),
        differ.len(),
        differ.iter().take(3).collect::<Vec<_>>()
    );
    // The truth endpoint (account A) must not have B's rows either.
    assert!(want.values().all(|r| r["account_id"] == A));
    assert!(got.values().all(|r| r["account_id"] == A), "an account-B row reached A's endpoint");
    assert!(missing.is_empty() && extra.is_empty() && differ.is_empty(), "receiver differs from the table");
    wh.stop().await.unwrap();
}

/// 4. Twenty concurrent webhooks-backfill calls on one endpoint: one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_starts_start_one_backfill() {
    let env = Env::new("bfe_race").await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'r' FROM generate_series(1, 3000)"))
        .await;
    let wh = env.start(&config(50, 100)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created"]).await;
    for round in 0..5 {
        let calls = (0..20).map(|_| api.call("webhooks-backfill", &a, json!({ "id": ep })));
        let answers = futures::future::join_all(calls).await;
        let ok: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
        let conflict =
            answers.iter().filter(|(s, v)| *s == 409 && v["error"]["code"] == "webhooks.backfill_running").count();
        let other: Vec<_> = answers.iter().filter(|(s, _)| *s != 200 && *s != 409).collect();
        println!("round {round}: {} ok, {conflict} conflict, other {:?}", ok.len(), other);
        assert_eq!(ok.len(), 1, "{answers:?}");
        assert!(other.is_empty(), "{other:?}");
        let id = ok[0].1["result"]["backfill"]["id"].as_str().unwrap().to_owned();
        for (s, v) in &answers {
            if *s == 409 {
                assert!(v["error"]["message"].as_str().unwrap().contains(&id), "names the running one: {v}");
            }
        }
        // cancel and start racing
        let (c, s) = tokio::join!(
            api.call("webhooks-backfill-cancel", &a, json!({ "id": id })),
            api.call("webhooks-backfill", &a, json!({ "id": ep }))
        );
        println!("  cancel {} / start {} {}", c.0, s.0, s.1["error"]["code"]);
        assert_eq!(c.0, 200);
        if s.0 == 200 {
            let id2 = s.1["result"]["backfill"]["id"].as_str().unwrap().to_owned();
            api.ok("webhooks-backfill-cancel", &a, json!({ "id": id2 })).await;
        }
    }
    let running = env.scalar_i64("SELECT count(*) FROM walhook.backfills WHERE status = 'running'").await;
    assert_eq!(running, 0);
    wh.stop().await.unwrap();
}

/// 6. The endpoint's subscriptions change mid-backfill: contacts no longer subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_endpoint_stops_subscribing_to_is_no_longer_backfilled() {
    let env = Env::new("bfe_unsub").await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'r' FROM generate_series(1, 3000)"))
        .await;
    env.sql(&format!("INSERT INTO companies (account_id, name) SELECT '{A}', 'c' FROM generate_series(1, 200)")).await;
    let wh = env.start(&config(50, 500)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let ep = endpoint(&env, &api, &a, "wh", &["contact.created", "company.created"]).await;
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    env.receiver.wait_until(Duration::from_secs(60), |rs| backfilled_ids(rs, "wh").1 >= 200).await.unwrap();
    api.ok("webhooks-update", &a, json!({ "id": ep, "events": ["company.created"] })).await;
    let at_update = backfilled_ids(&env.receiver.received(), "wh").1;
    let done = until_ended(&api, &a, &id, Duration::from_secs(120)).await;
    env.quiescent().await;
    let rs = env.receiver.received_on("/wh");
    let contacts_after: usize = rs.iter().skip(at_update).filter(|r| r.json()["event"] == "contact.backfilled").count();
    println!("unsubscribe: status {} reason {}; {contacts_after} contact.backfilled after the endpoint unsubscribed from contacts (at update: {at_update})", done["status"], done["reason"]);
    assert!(
        contacts_after <= 100,
        "contact.backfilled kept coming to an endpoint subscribed to no contact event: {contacts_after}"
    );
    wh.stop().await.unwrap();
}

/// 3. The walsender killed again and again mid-backfill, under a writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walsender_terminated_again_and_again_mid_backfill_loses_nothing() {
    let env = Env::new("bfe_walsender").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name, email, lead_score) SELECT '{A}', 'r' || i, 'e' || i, 0 FROM generate_series(1, 3000) i"
    ))
    .await;
    let wh = env.start(&config(100, 2000)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let events = ["contact.created", "contact.updated", "contact.deleted"];
    let ep = endpoint(&env, &api, &a, "wh", &events).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = spawn_writer(env.url.clone(), stop.clone(), |n| {
        match n % 6 {
        0 => format!("DELETE FROM contacts WHERE id = (SELECT id FROM contacts WHERE account_id = '{A}' ORDER BY random() LIMIT 1)"),
        1 => format!("INSERT INTO contacts (account_id, first_name, lead_score) VALUES ('{A}', 'new', {n})"),
        _ => format!("UPDATE contacts SET lead_score = {n}, email = 'x{n}' WHERE id = (SELECT id FROM contacts WHERE account_id = '{A}' ORDER BY random() LIMIT 1)"),
    }
    });
    let id = api.ok("webhooks-backfill", &a, json!({ "id": ep })).await["backfill"]["id"].as_str().unwrap().to_owned();
    let mut kills = 0;
    let mut progress = Vec::new();
    while kills < 12 {
        // Kill once the backfill has moved since the last kill (a chunk settled), at a varying delay.
        let before =
            api.ok("webhooks-backfill-get", &a, json!({ "id": id })).await["backfill"]["rows_sent"].as_i64().unwrap();
        let moved = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let b = api.ok("webhooks-backfill-get", &a, json!({ "id": id })).await["backfill"].clone();
                if b["status"] != "running" || b["rows_sent"].as_i64().unwrap() > before {
                    return b;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no progress within 60 s after {kills} kills (rows_sent {before})"));
        if moved["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis((kills * 37) % 150)).await;
        env.sql(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}' AND active_pid IS NOT NULL",
            env.name
        ))
        .await;
        progress.push(before);
        kills += 1;
    }
    println!("rows_sent at each kill: {progress:?}");
    until_ended(&api, &a, &id, Duration::from_secs(180)).await;
    let done = until_status(&api, &a, &id, "finished", Duration::from_secs(1)).await;
    stop.cancel();
    let changes = writer.await.unwrap();
    env.quiescent().await;
    let cols: &[&str] = &["id", "account_id", "first_name", "email", "lead_score"];
    let got = project(&applied(&env.receiver.received(), "wh", "contact"), cols);
    let want = db_truth(&env, A, cols).await;
    let (missing, extra, differ) = compare(&got, &want);
    let (ids, n) = backfilled_ids(&env.receiver.received(), "wh");
    let two_ids = ids.values().filter(|w| w.len() > 1).count();
    let retried = env.metric("walhook_backfill_chunks_total{outcome=\"retried\"}").await;
    println!(
        "walsender kills: {kills}, {changes} changes, rows_sent {}, {n} backfilled requests for {} rows ({} dup), {two_ids} rows under 2 ids, {retried} retried; missing {}, extra {}, differing {} {:?}",
        done["rows_sent"], ids.len(), n - ids.len(), missing.len(), extra.len(), differ.len(), differ.iter().take(3).collect::<Vec<_>>()
    );
    assert!(missing.is_empty() && extra.is_empty() && differ.is_empty());
    assert_eq!(two_ids, 0);
    wh.stop().await.unwrap();
}

/// Raw bytes of `data` in a body (it is the last member).
fn raw_data(r: &Received) -> String {
    let s = String::from_utf8_lossy(&r.body).into_owned();
    let at = s.find("\"data\":").expect("data");
    let end = s.rfind(",\"previous\":").unwrap_or(s.len() - 1);
    s[at + 7..end].to_owned()
}

async fn sql_dbg(env: &Env, q: &str) {
    if let Err(e) = env.client.batch_execute(q).await {
        panic!("{e:?}");
    }
}

/// Forty column types (numeric NaN and infinities, BC dates, bytea, arrays, ranges, enums,
/// domains, composites, xml, hstore when installed, odd column names, a generated column) in
/// a database whose own settings differ from the defaults: each backfilled row's `data` is
/// byte for byte the stream's `data` of the same row.
async fn types_case(name: &str, settings: &[&str]) {
    let env = Env::new(name).await;
    let _ = env.client.batch_execute("CREATE EXTENSION IF NOT EXISTS hstore").await;
    let has_hstore = env.client.query_one("SELECT 1 FROM pg_extension WHERE extname = 'hstore'", &[]).await.is_ok();
    // Servers built without libxml (the PostgreSQL 18 wheel) take the same values as text.
    let xml = if env.client.batch_execute("SELECT '<a/>'::xml").await.is_ok() { "xml" } else { "text" };
    let pg18 = env.scalar_i64("SELECT current_setting('server_version_num')::int8").await >= 180_000;
    env.sql(
        &"CREATE TYPE mood AS ENUM ('happy', 'sa\"d', 'o''k'); \
         CREATE DOMAIN posnum AS numeric(10,3); \
         CREATE TYPE pair AS (a int, b text); \
         ALTER TABLE contacts ADD COLUMN n1 numeric(12,4), ADD COLUMN n2 numeric, ADD COLUMN r4 real, \
           ADD COLUMN d8 double precision, ADD COLUMN tstz timestamptz, ADD COLUMN ts timestamp, ADD COLUMN dt date, \
           ADD COLUMN tm time, ADD COLUMN ttz timetz, ADD COLUMN iv interval, ADD COLUMN by bytea, ADD COLUMN ua uuid[], \
           ADD COLUMN ta text[], ADD COLUMN ir int4range, ADD COLUMN tr tstzrange, ADD COLUMN jb jsonb, ADD COLUMN js json, \
           ADD COLUMN mo money, ADD COLUMN bi bit(4), ADD COLUMN vb varbit, ADD COLUMN en mood, ADD COLUMN dn posnum, \
           ADD COLUMN cp pair, ADD COLUMN x xml, ADD COLUMN \"Weird \"\"Col\"\"\" text, ADD COLUMN \"UPPER\" int, \
           ADD COLUMN gen int GENERATED ALWAYS AS (coalesce(lead_score, 0) * 2) STORED, \
           ADD COLUMN tsa timestamptz[], ADD COLUMN f8a float8[], ADD COLUMN rc regclass, ADD COLUMN rt regtype, \
           ADD COLUMN ena mood[], ADD COLUMN dna posnum[], ADD COLUMN cpa pair[], ADD COLUMN mr int4multirange, \
           ADD COLUMN ch char(5), ADD COLUMN oi oid, ADD COLUMN pt point"
            .replace("ADD COLUMN x xml", &format!("ADD COLUMN x {xml}"))
            // PostgreSQL 18 refuses updates of a table whose REPLICA IDENTITY FULL holds a
            // generated column the publication does not publish.
            .replace(if pg18 { "ADD COLUMN gen int GENERATED ALWAYS AS (coalesce(lead_score, 0) * 2) STORED, " } else { "\u{0}" }, ""),
    )
    .await;
    if has_hstore {
        env.sql("ALTER TABLE contacts ADD COLUMN hs hstore").await;
    }
    sql_dbg(&env, &format!(
        "INSERT INTO contacts (account_id, first_name, lead_score, n1, n2, r4, d8, tstz, ts, dt, tm, ttz, iv, by, ua, ta, ir, tr, jb, js, mo, bi, vb, en, dn, cp, x, \"Weird \"\"Col\"\"\", \"UPPER\", tsa, f8a, rc, rt, ena, dna, cpa, mr, ch, oi, pt) VALUES \
         ('{A}', 'typical', 3, 12.3400, 1e20, 1.5, 0.1, '2025-06-15 14:30:00.123456+02', '2025-06-15 14:30:00.5', '2025-06-15', '14:30:00.25', '14:30:00+05:30', '1 year 2 mons 3 days 04:05:06.7', '\\xdeadbeef00', \
          ARRAY['11111111-1111-4111-8111-111111111111'::uuid], ARRAY['a,b', 'q\"uote', NULL, 'NULL', '', 'back\\\\slash', 'uni ü'], '[1,10)', '[2025-01-01 00:00+00,2025-02-01 00:00+00)', \
          '{{\"u\": \"\\u00e9\\u0001x\", \"big\": 123456789012345678901234567890, \"f\": 1.10}}', '{{\"dup\": 1, \"dup\": 2,  \"sp\" : [1,2] }}', 12.34, B'1010', B'101', 'o''k', 1.5, ROW(1, 'x,\"y\"'), '<a b=\"1\">t&amp;</a>', 'weird', 7, \
          ARRAY['2025-06-15 14:30:00+00'::timestamptz, NULL], ARRAY[1.5, 'NaN', '-Infinity']::float8[], 'contacts', 'timestamptz', ARRAY['happy', 'sa\"d']::mood[], ARRAY[1.5]::posnum[], ARRAY[ROW(1,'a b')::pair], '{{[1,3),[5,7)}}', 'ab', 42, '(1.5,2)'), \
         ('{A}', 'edges', 4, 'NaN', 'Infinity', '-0', 1e-7, 'infinity', '-infinity', '0044-03-15 BC', '24:00:00', '00:00:00-12', '-1 days +02:03:04', '', \
          '{{}}', ARRAY[]::text[], 'empty', '(,)', '[]', 'null', '-12.34', B'0000', B'', 'happy', 0.001, ROW(NULL, NULL), '', '', -1, \
          ARRAY[]::timestamptz[], ARRAY['-0'::float8, 1e300, 5e-324], 'pg_class', 'int4[]', '{{}}', '{{}}', '{{}}', '{{}}', ' ', 0, '(0,0)'), \
         ('{A}', 'dates', 5, -1.5, '-Infinity', 'Infinity', '-Infinity', '0001-01-01 00:00:00+00 BC', '294276-12-31 23:59:59.999999', 'infinity', '00:00:00', '23:59:59.999999+14', '1000000 years', '\\x00', \
          NULL, ARRAY[NULL]::text[], '[-5,-1]', '[2025-06-15 14:30:00.5+00,)', '{{\"a\": [1e300]}}', '\"s\"', 0, B'1111', B'0101010101', NULL, -0.0005, NULL, NULL, NULL, NULL, \
          NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), \
         ('{A}', 'nulls', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
    ))
    .await;
    if has_hstore {
        sql_dbg(&env, "UPDATE contacts SET hs = 'a=>1, \"b c\"=>NULL, \"q\\\"\"=>\"x\\\\y\"'").await;
    }
    for s in settings {
        env.sql(&format!("DO $$ BEGIN EXECUTE format('ALTER {s}', current_database()); END $$")).await;
    }
    let wh = env.start(&config(2, 0)).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    endpoint(&env, &api, &a, "live", &["contact.updated"]).await;
    env.sql("UPDATE contacts SET first_name = first_name").await;
    let n = env.scalar_i64("SELECT count(*) FROM contacts").await as usize;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().filter(|r| r.path == "/live").count() >= n)
        .await
        .unwrap();
    let bf = endpoint(&env, &api, &a, "bf", &["contact.created"]).await;
    let id = api.ok("webhooks-backfill", &a, json!({ "id": bf })).await["backfill"]["id"].as_str().unwrap().to_owned();
    let done = until_ended(&api, &a, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "finished", "{done}");
    env.quiescent().await;
    let rs = env.receiver.received();
    for r in &rs {
        if r.json().is_null() {
            println!("INVALID JSON on {}: {}", r.path, String::from_utf8_lossy(&r.body));
        }
    }
    let invalid = rs.iter().filter(|r| r.json().is_null()).count();
    assert_eq!(invalid, 0, "bodies that are not JSON");
    let by_id = |path: &str| -> HashMap<String, String> {
        rs.iter()
            .filter(|r| r.path == format!("/{path}"))
            .map(|r| (r.json()["data"]["id"].as_str().unwrap().to_owned(), raw_data(r)))
            .collect()
    };
    let (live, bfd) = (by_id("live"), by_id("bf"));
    assert_eq!(live.len(), n);
    assert_eq!(bfd.len(), n, "every row backfilled");
    let mut bad = 0;
    for (k, l) in &live {
        let b = &bfd[k];
        if l != b {
            bad += 1;
            let (lv, bv): (Value, Value) = (serde_json::from_str(l).unwrap(), serde_json::from_str(b).unwrap());
            for (c, x) in lv.as_object().unwrap() {
                if bv.get(c) != Some(x) {
                    println!("  {name} {c}: stream {x} backfill {:?}", bv.get(c));
                }
            }
            if lv == bv {
                println!("  {name}: same JSON, different bytes:\n   stream   {l}\n   backfill {b}");
            }
        }
    }
    println!("{name}: {} rows, {} differ; sample stream data: {}", n, bad, live.values().next().unwrap());
    wh.stop().await.unwrap();
    assert_eq!(bad, 0, "backfilled data differs from the stream's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_values_are_byte_for_byte_the_streams_under_other_database_settings() {
    types_case(
        "bfe_types_dbset",
        &[
            "DATABASE %I SET bytea_output = ''escape''",
            "DATABASE %I SET DateStyle = ''SQL, DMY''",
            "DATABASE %I SET TimeZone = ''Asia/Kolkata''",
            "DATABASE %I SET IntervalStyle = ''iso_8601''",
            "DATABASE %I SET extra_float_digits = 0",
            "DATABASE %I SET search_path = pg_catalog",
            "DATABASE %I SET lc_monetary = ''C''",
        ],
    )
    .await;
}
