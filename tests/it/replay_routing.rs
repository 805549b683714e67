//! A replayed change is routed with the endpoints as they were at its commit position, in
//! every session: after a kill -9, and after a PostgreSQL restart in the same process.

use std::time::Duration;

use crate::common::{own_cluster, readyz, wait_for, wait_until, Env, Readiness, ACCOUNT_A, SYNC_WAITS, USER};
use uuid::Uuid;
use walhook::admin::endpoints::{Caller, EndpointPatch, Endpoints, NewEndpoint};
use walhook::config::Config;
use walhook::local::receiver::{Received, Reply};
use walhook::pg::db::Db;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
/// Attempts hang long enough that only a kill ends them.
const SLOW: &str = "[dispatch]\nrequest_timeout = \"60s\"\nspill_after = \"60s\"\n";

fn endpoints(env: &Env) -> Endpoints {
    endpoints_on(env.db.clone())
}

/// The endpoint operations on pool `db`, with the address policy wide open.
fn endpoints_on(db: Db) -> Endpoints {
    Endpoints::new(db, SecretBox::new(None).unwrap(), AddressPolicy::new(vec!["0.0.0.0/0".parse().unwrap()]), "public")
}

async fn set_active(env: &Env, id: Uuid, active: bool) {
    endpoints(env)
        .update(
            Caller { account_id: ACCOUNT_A, user_id: USER },
            id,
            EndpointPatch { is_active: Some(active), ..Default::default() },
        )
        .await
        .expect("update endpoint");
}

async fn insert_contact(env: &Env, id: &str, name: &str) {
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', '{name}')")).await;
}

fn is_contact(r: &Received, id: &str) -> bool {
    r.json()["data"]["id"].as_str() == Some(id)
}

/// What the receiver got, one request per line: path and contact id.
fn seen(rs: &[Received]) -> String {
    rs.iter().map(|r| format!("{} {}", r.path, r.json()["data"]["id"])).collect::<Vec<_>>().join("\n")
}

/// Waits until the slot has confirmed everything written so far.
async fn wait_confirmed_to_now(env: &Env) {
    let now = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    wait_for(Duration::from_secs(30), || async { env.confirmed_lsn().await >= now }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_disabled_before_a_replay_still_gets_the_change_committed_while_it_was_active() {
    let env = Env::new("replay_routing_disabled").await;
    let e = env.endpoint(ACCOUNT_A, "e", &["contact.created"]).await;
    env.receiver.script("e", vec![Reply::Hang]);
    let mut first = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    let contact = "81000000-0000-4000-8000-000000000001";
    insert_contact(&env, contact, "while-active").await;
    env.receiver.wait_until(Duration::from_secs(30), |r| r.len() == 1).await.expect("first attempt arrives");
    // The change is unconfirmed (its attempt hangs) when walhook dies; E is disabled by hand
    // before walhook reads the stream again.
    first.kill9();
    set_active(&env, e.id, false).await;
    let mut second = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    wait_confirmed_to_now(&env).await;
    set_active(&env, e.id, true).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().filter(|r| is_contact(r, contact)).count() >= 2)
        .await
        .unwrap_or_else(|rs| {
            panic!("E got the contact {} time(s), never after the replay\n{}", rs.len(), second.log_text())
        });
    let q = format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered'", e.id);
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(&q).await == 1 }).await;
    second.sigterm();
    assert!(second.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_created_after_a_row_does_not_get_it_on_replay() {
    let env = Env::new("replay_routing_created_after").await;
    env.endpoint(ACCOUNT_A, "g", &["contact.created"]).await;
    env.receiver.script("g", vec![Reply::Hang]);
    let mut first = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    let old_row = "82000000-0000-4000-8000-000000000001";
    insert_contact(&env, old_row, "before-f").await;
    env.receiver.wait_until(Duration::from_secs(30), |r| r.len() == 1).await.expect("G's attempt hangs");
    env.endpoint(ACCOUNT_A, "f", &["contact.created"]).await;
    // F is known to this session (it gets a later row) while the old row is still unconfirmed.
    let later = "82000000-0000-4000-8000-000000000002";
    insert_contact(&env, later, "after-f").await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.path == "/f" && is_contact(r, later)))
        .await
        .unwrap_or_else(|rs| panic!("F did not receive the later row\n{}\n{}", seen(&rs), first.log_text()));
    first.kill9();
    let mut second = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    let last = "82000000-0000-4000-8000-000000000003";
    insert_contact(&env, last, "after-restart").await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.path == "/f" && is_contact(r, last)))
        .await
        .unwrap_or_else(|rs| panic!("F did not receive a row after the restart\n{}\n{}", seen(&rs), second.log_text()));
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| {
            rs.iter().filter(|r| r.path == "/g" && is_contact(r, old_row)).count() >= 2
        })
        .await
        .unwrap_or_else(|rs| panic!("G did not get the old row again\n{}\n{}", seen(&rs), second.log_text()));
    wait_confirmed_to_now(&env).await;
    let f_got_old: Vec<_> = env.receiver.received_on("f").into_iter().filter(|r| is_contact(r, old_row)).collect();
    assert!(f_got_old.is_empty(), "F, created after the row was committed, received it on replay");
    second.sigterm();
    assert!(second.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

/// The advisory lock key walhook's leaders take for `slot`.
fn leader_key(slot: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("walhook:slot:{slot}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restart_the_new_session_routes_with_the_endpoints_of_the_change() {
    let name = "replay_routing_pg_restart";
    let mut cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, name).await;
    let e = env.endpoint(ACCOUNT_A, "e", &["contact.created"]).await;
    let wh = env.start("").await;
    let contact = "83000000-0000-4000-8000-000000000001";
    // Restart PostgreSQL and hold walhook's leadership lock before it reconnects, so the
    // contact and E's deactivation are both written before its new session starts. (If
    // walhook wins the race to the lock, restart again.)
    let mut holder = None;
    for _ in 0..5 {
        cluster = tokio::task::spawn_blocking(move || {
            cluster.pg_stop(false).expect("stop");
            cluster.pg_start().expect("start");
            cluster
        })
        .await
        .unwrap();
        let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&leader_key(name)]).await.unwrap().get(0);
        if got {
            holder = Some(client);
            break;
        }
    }
    let holder = holder.expect("took the leadership lock before walhook reconnected");
    let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{contact}', '{A}', 'x')"))
        .await
        .unwrap();
    set_active(&env, e.id, false).await;
    drop(holder);
    // (The test's own connection died with the restart: query on a new one.)
    let now: i64 = client.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.unwrap().get(0);
    let q = format!("SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = '{name}'");
    wait_for(Duration::from_secs(30), || async { client.query_one(&q, &[]).await.unwrap().get::<_, i64>(0) >= now })
        .await;
    set_active(&env, e.id, true).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| is_contact(r, contact)))
        .await
        .expect("E receives the contact committed while it was active");
    wh.stop().await.unwrap();
    drop(env);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_versions_are_written_per_change_and_compacted_at_the_next_session() {
    let env = Env::new("replay_routing_versions").await;
    let e = env.endpoint(ACCOUNT_A, "e", &["contact.created"]).await;
    let gone = env.endpoint(ACCOUNT_A, "gone", &["contact.created"]).await;
    let wh = env.start("").await;
    let versions = |id: Uuid| format!("SELECT count(*) FROM walhook.endpoint_versions WHERE endpoint_id = '{id}'");
    // Created after `walhook migrate` seeded the versions: its creation is a change in the
    // stream, written as a version once the stream has passed it.
    wait_confirmed_to_now(&env).await;
    assert_eq!(env.scalar_i64(&versions(e.id)).await, 1, "one version for the creation");
    set_active(&env, e.id, false).await;
    set_active(&env, e.id, true).await;
    endpoints(&env).delete(Caller { account_id: ACCOUNT_A, user_id: USER }, gone.id).await.unwrap();
    wait_confirmed_to_now(&env).await;
    assert_eq!(env.scalar_i64(&versions(e.id)).await, 3, "one version per change");
    assert_eq!(env.scalar_i64(&versions(gone.id)).await, 2, "the delete is a version too");
    wh.stop().await.unwrap();
    let wh = env.start("").await;
    // (The old walsender may still show as streaming: wait for the new session's start.)
    // Superseded versions are compacted, and a confirmed delete leaves nothing.
    wait_for(Duration::from_secs(30), || async {
        env.scalar_i64(&versions(e.id)).await == 1 && env.scalar_i64(&versions(gone.id)).await == 0
    })
    .await;
    let active = format!("SELECT count(*) FROM walhook.endpoint_versions WHERE endpoint_id = '{}' AND is_active", e.id);
    assert_eq!(env.scalar_i64(&active).await, 1);
    // Still routed after the restart.
    insert_contact(&env, "84000000-0000-4000-8000-000000000001", "after").await;
    env.receiver.wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.path == "/e")).await.expect("E routed");
    wh.stop().await.unwrap();
}

/// A cluster whose commits wait for a synchronous standby that is not there
/// (`common::ABSENT_STANDBY`), except those of sessions that ask (`synchronous_commit = on`).
const SYNC_ONLY_IF_ASKED: [&str; 2] =
    ["synchronous_standby_names = 'walhook_absent_standby'", "synchronous_commit = local"];

/// The commits waiting for the absent standby go through (as if it answered).
async fn standby_answers(env: &Env) {
    env.synchronous_standby("").await;
}

/// An endpoint whose creating transaction is streamed before anyone can see it (its commit
/// waits for a synchronous standby that is not there; under load the same gap is shorter) is
/// not taken for deleted: the rows committed after it reach it once it is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_streamed_before_its_commit_is_visible_gets_the_rows_after_it() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&SYNC_ONLY_IF_ASKED)).await.unwrap();
    let env = Env::on(&cluster, "replay_routing_invisible").await;
    env.endpoint(ACCOUNT_A, "old", &["contact.created"]).await;
    let wh = env.start("").await;
    let url = format!("[database]\nurl = \"{}?options=-c%20synchronous_commit%3Don\"\n", env.url);
    let waiting = Db::new(&Config::from_toml(&url).unwrap().database).unwrap();
    let new_url = env.receiver.url("new");
    let create = tokio::spawn(async move {
        let new =
            NewEndpoint { url: Some(new_url), events: Some(vec!["contact.created".to_owned()]), ..Default::default() };
        endpoints_on(waiting).create(Caller { account_id: ACCOUNT_A, user_id: USER }, new).await.expect("created")
    });
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(SYNC_WAITS).await == 1 }).await;
    let (x1, x2) = ("84000000-0000-4000-8000-000000000001", "84000000-0000-4000-8000-000000000002");
    insert_contact(&env, x1, "after-the-endpoint").await;
    // Give walhook the time to route x1 while the endpoint is still invisible (it gets to the
    // old endpoint at once when walhook does not wait for the endpoint's commit).
    let _ = env
        .receiver
        .wait_until(Duration::from_secs(3), |rs| rs.iter().any(|r| r.path == "/old" && is_contact(r, x1)))
        .await;
    standby_answers(&env).await;
    let (_, secret) = create.await.unwrap();
    env.receiver.set_secret("new", secret.expose());
    insert_contact(&env, x2, "once-visible").await;
    let got_both = |rs: &[Received]| [x1, x2].iter().all(|x| rs.iter().any(|r| r.path == "/new" && is_contact(r, x)));
    env.receiver
        .wait_until(Duration::from_secs(30), got_both)
        .await
        .unwrap_or_else(|rs| panic!("the new endpoint did not get both rows after it\n{}", seen(&rs)));
    wh.stop().await.unwrap();
}

/// A transaction with rows and an endpoint change that stays invisible past the wait's bound:
/// `/readyz` says so after 30 s (every webhook waits behind it), also when the sessions that
/// read it again first read an earlier endpoint change (visible at once), and every row is
/// delivered and stored once, each under one webhook-id, through those sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_invisible_for_long_is_reported_and_its_rows_are_delivered_once() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&SYNC_ONLY_IF_ASKED)).await.unwrap();
    let env = Env::on(&cluster, "replay_routing_invisible_long").await;
    let slow = env.endpoint(ACCOUNT_A, "slow", &["contact.created"]).await;
    let other = env.endpoint(ACCOUNT_A, "other", &["contact.updated"]).await;
    // Answers after the wait's bound (20 s), so the first attempts are in flight when the
    // session ends.
    env.receiver.set_default("slow", Reply::Delay(Duration::from_secs(25), 200));
    let wh = env.start("[dispatch]\nrequest_timeout = \"60s\"\nspill_after = \"120s\"\n").await;
    let url = format!("{}?options=-c%20synchronous_commit%3Don", env.url);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let ids: Vec<String> = (0..=3).map(|i| format!("86000000-0000-4000-8000-00000000000{i}")).collect();
    // An endpoint change committed (and visible) just before, in a transaction whose row is
    // unconfirmed until the slow endpoint answers: every session after the first reads it
    // again before the held one.
    env.sql(&format!(
        "BEGIN; INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{A}', 'before'); \
         UPDATE walhook.endpoints SET description = 'moved first' WHERE id = '{}'; COMMIT;",
        ids[0], other.id
    ))
    .await;
    let tx = format!(
        "BEGIN; INSERT INTO contacts (id, account_id, first_name) SELECT unnest(ARRAY['{}']::uuid[]), '{A}', 'held'; \
         UPDATE walhook.endpoints SET description = 'moved' WHERE id = '{}'; COMMIT;",
        ids[1..].join("','"),
        other.id
    );
    let committing = tokio::spawn(async move { client.batch_execute(&tx).await });
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(SYNC_WAITS).await == 1 }).await;
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let last = std::sync::Mutex::new(None);
    let reported = || async {
        let answer = readyz(ops).await;
        let hit = answer.as_ref().is_some_and(|(code, body)| {
            *code == 503 && body["reason"].as_str().is_some_and(|r| r.contains("every webhook waits behind it"))
        });
        *last.lock().unwrap() = answer;
        hit
    };
    if !wait_until(Duration::from_secs(60), reported).await {
        panic!("/readyz never reported the wait; it last said {:?}", last.lock().unwrap());
    }
    standby_answers(&env).await;
    committing.await.unwrap().unwrap();
    let sends = |rs: &[Received], id: &str| rs.iter().filter(|r| r.path == "/slow" && is_contact(r, id)).count();
    env.receiver
        .wait_until(Duration::from_secs(90), |rs| ids.iter().all(|id| sends(rs, id) >= 1))
        .await
        .unwrap_or_else(|rs| panic!("not every row arrived\n{}", seen(&rs)));
    // The session that reads it again may send a row whose first attempt is still in flight
    // a second time (at least once), always under the same webhook-id; each is stored once.
    wait_confirmed_to_now(&env).await;
    let q =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered'", slow.id);
    wait_for(Duration::from_secs(60), || async { env.scalar_i64(&q).await == 4 }).await;
    let got = env.receiver.received_on("slow");
    for id in &ids {
        let webhook_ids: std::collections::HashSet<_> =
            got.iter().filter(|r| is_contact(r, id)).map(|r| r.webhook_id.clone()).collect();
        assert_eq!(webhook_ids.len(), 1, "row {id} was sent under {webhook_ids:?}");
    }
    env.ready(Readiness::Streaming).await;
    wh.stop().await.unwrap();
}
