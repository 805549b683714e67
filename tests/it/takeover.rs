//! Two walhook processes on one slot: the standby that takes over keeps per-row order with
//! what waits in the outbox, an old leader whose lock connection dropped stops sending
//! before anyone else streams, and a standby waits for the old walsender instead of exiting.

use std::time::{Duration, SystemTime};

use crate::common::{free_port, wait_for, Env, Proc, Readiness, ACCOUNT_A};
use walhook::local::receiver::{Received, Reply};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// `extra` plus listeners of their own, for a second process beside the first.
fn second(extra: &str) -> String {
    format!(
        "{extra}\n[api]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    )
}

async fn wait_log(p: &mut Proc, what: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if p.log_text().contains(what) {
            return;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("walhook exited ({status}) before logging {what:?}\n{}", p.log_text());
        }
        assert!(std::time::Instant::now() < deadline, "no {what:?} within {timeout:?}\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Terminates the backend holding walhook's leadership lock in this test's database.
async fn drop_lock_connection(env: &Env) {
    let n = env
        .scalar_i64(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(n, 1, "one leadership lock held");
}

/// The version of contact row `x` a request carries: 0 created, N for `last_name = 'vN'`.
fn version(r: &Received) -> i64 {
    let b = r.json();
    match b["data"]["last_name"].as_str() {
        Some(v) => v.trim_start_matches('v').parse().unwrap_or(-1),
        None => 0,
    }
}

async fn wait_confirmed_to_now(env: &Env) {
    let now = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    wait_for(Duration::from_secs(60), || async { env.confirmed_lsn().await >= now }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_keeps_a_row_behind_its_delivery_waiting_in_the_outbox() {
    let env = Env::new("takeover_outbox_order").await;
    env.endpoint(ACCOUNT_A, "x", &["contact.created", "contact.updated"]).await;
    env.receiver.script("x", vec![Reply::Status(500)]);
    let cfg = "[dispatch]\nretry_schedule = [\"15s\", \"1s\"]\n";
    let mut leader = env.spawn_binary(cfg);
    env.ready(Readiness::Streaming).await;
    let mut standby = env.spawn_binary(&second(cfg));
    wait_log(&mut standby, "standing by", Duration::from_secs(30)).await;
    let x = "91000000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{x}', '{A}', 'x')")).await;
    let pending = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending' AND attempt_count = 1";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(pending).await == 1 }).await;
    leader.kill9();
    wait_log(&mut standby, "replication streaming", Duration::from_secs(30)).await;
    env.sql(&format!("UPDATE contacts SET last_name = 'v1' WHERE id = '{x}'")).await;
    let ok = |rs: &[Received]| rs.iter().filter(|r| r.answered == 200).map(version).collect::<Vec<_>>();
    let got = env
        .receiver
        .wait_until(Duration::from_secs(60), |rs| ok(rs).len() >= 2)
        .await
        .unwrap_or_else(|rs| panic!("delivered: {:?}\n{}", ok(&rs), standby.log_text()));
    assert_eq!(ok(&got), vec![0, 1], "X's first version is delivered before its update");
    standby.sigterm();
    assert!(standby.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_lock_stops_sending_before_another_streams() {
    let env = Env::new("takeover_lost_lock").await;
    env.endpoint(ACCOUNT_A, "x", &["contact.created", "contact.updated"]).await;
    // The old leader's first attempt is slow; everything after it is answered at once.
    env.receiver.script("x", vec![Reply::Delay(Duration::from_secs(8), 200)]);
    let cfg = "[dispatch]\nendpoint_concurrency = 1\nspill_after = \"60s\"\nrequest_timeout = \"30s\"\n";
    let leader = env.spawn_binary(cfg);
    env.ready(Readiness::Streaming).await;
    let mut standby = env.spawn_binary(&second(cfg));
    wait_log(&mut standby, "standing by", Duration::from_secs(30)).await;
    let x = "92000000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{x}', '{A}', 'x')")).await;
    for v in 1..=5 {
        env.sql(&format!("UPDATE contacts SET last_name = 'v{v}' WHERE id = '{x}'")).await;
    }
    // The first version is in flight; the five updates wait behind it in the leader's memory.
    env.receiver.wait_until(Duration::from_secs(30), |rs| !rs.is_empty()).await.expect("first attempt");
    let lost_at = SystemTime::now();
    drop_lock_connection(&env).await;
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| rs.iter().any(|r| r.at > lost_at && version(r) == 5))
        .await
        .expect("the newest version arrives after the takeover");
    wait_confirmed_to_now(&env).await;
    // Past the old leader's slow answer: whatever it still held would have been sent by now.
    let quiet = env.receiver.count();
    let _ = env.receiver.wait_until(Duration::from_secs(10), |rs| rs.len() > quiet + 5).await;
    let after: Vec<i64> = env.receiver.received().iter().filter(|r| r.at > lost_at).map(version).collect();
    assert!(
        after.windows(2).all(|w| w[0] <= w[1]),
        "after the lock was lost, versions arrived out of order (two senders): {after:?}\nold leader:\n{}",
        leader.log_text()
    );
    assert_eq!(after.last(), Some(&5), "the receiver ends with the newest version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_waits_for_the_old_walsender_instead_of_exiting() {
    let env = Env::new("takeover_busy_walsender").await;
    env.endpoint(ACCOUNT_A, "x", &["contact.created"]).await;
    let mut leader = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    let mut standby = env.spawn_binary(&second(""));
    wait_log(&mut standby, "standing by", Duration::from_secs(30)).await;
    // A leader that hangs: its walsender stays while its lock connection is cut.
    let pid = leader.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    drop_lock_connection(&env).await;
    wait_log(&mut standby, "took over replication", Duration::from_secs(30)).await;
    wait_log(&mut standby, "waiting for the previous walsender", Duration::from_secs(40)).await;
    leader.kill9();
    wait_log(&mut standby, "replication streaming", Duration::from_secs(60)).await;
    let c = "93000000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{c}', '{A}', 'x')")).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.json()["data"]["id"].as_str() == Some(c)))
        .await
        .unwrap_or_else(|_| panic!("the standby delivers after taking over\n{}", standby.log_text()));
    standby.sigterm();
    assert!(standby.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

/// A leader frozen (SIGSTOP) while its lock and walsender are taken away learns nothing when
/// it resumes until it checks; meanwhile its dispatcher must not send what it still holds, or
/// a receiver ends with an older version than the new leader already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_that_resumes_after_a_takeover_sends_nothing_stale() {
    let env = Env::new("takeover_frozen").await;
    env.endpoint(ACCOUNT_A, "f", &["contact.created", "contact.updated"]).await;
    env.receiver.set_default("f", Reply::Delay(Duration::from_millis(400), 200));
    let cfg = "[dispatch]\nendpoint_concurrency = 16\nspill_after = \"60s\"\nrequest_timeout = \"30s\"\n";
    let mut leader = env.spawn_binary(cfg);
    env.ready(Readiness::Streaming).await;
    let mut standby = env.spawn_binary(&second(cfg));
    wait_log(&mut standby, "standing by", Duration::from_secs(30)).await;
    let rows: Vec<String> = (1..=24).map(|i| format!("94000000-0000-4000-8000-{i:012}")).collect();
    for id in &rows {
        env.sql(&format!(
            "INSERT INTO contacts (id, account_id, first_name, last_name) VALUES ('{id}', '{A}', 'f', 'v0')"
        ))
        .await;
    }
    for v in 1..=3 {
        env.sql(&format!("UPDATE contacts SET last_name = 'v{v}' WHERE first_name = 'f'")).await;
    }
    // The leader is busy: 16 requests in flight, most of the 96 still in its memory.
    env.receiver.wait_until(Duration::from_secs(30), |rs| rs.len() >= 16).await.expect("the leader sends");
    let pid = leader.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let frozen_at = SystemTime::now();
    drop_lock_connection(&env).await;
    env.sql(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}' AND active",
        env.name
    ))
    .await;
    wait_log(&mut standby, "took over replication", Duration::from_secs(30)).await;
    let newest = |rs: &[Received], id: &str| {
        rs.iter().filter(|r| r.at > frozen_at && r.json()["data"]["id"].as_str() == Some(id)).map(version).max()
    };
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| rs.len() > 16 && rows.iter().all(|id| newest(rs, id) == Some(3)))
        .await
        .expect("the new leader delivers every row's newest version");
    let before_resume = SystemTime::now();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    // Whatever the old leader still held would go out within moments of resuming.
    let count = env.receiver.count();
    let _ = env.receiver.wait_until(Duration::from_secs(5), |rs| rs.len() > count + 3).await;
    let late: Vec<(String, i64)> = env
        .receiver
        .received()
        .iter()
        .filter(|r| r.at > before_resume)
        .map(|r| (r.json()["data"]["id"].as_str().unwrap_or("").to_owned(), version(r)))
        .collect();
    assert!(
        late.iter().all(|(_, v)| *v == 3),
        "the resumed old leader sent stale versions after the takeover: {late:?}\nold leader:\n{}",
        leader.log_text()
    );
    leader.kill9();
}

/// Walsender blips beside a standby: the replica that streams keeps its lock across each
/// reconnect (a blip hands nothing over), so with two replicas, rows of a busy, slow endpoint
/// still arrive in commit order: every version first arrives after every older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_blips_beside_a_standby_keep_every_rows_order() {
    let env = Env::new("takeover_blips_order").await;
    env.endpoint(ACCOUNT_A, "o", &["contact.created", "contact.updated"]).await;
    env.receiver.set_default("o", Reply::Delay(Duration::from_millis(300), 200));
    let mut leader = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    let standby_cfg = second("");
    let mut standby = env.spawn_binary(&standby_cfg);
    wait_log(&mut standby, "standing by", Duration::from_secs(30)).await;
    let rows: Vec<String> = (1..=20).map(|i| format!("95000000-0000-4000-8000-{i:012}")).collect();
    for id in &rows {
        env.sql(&format!(
            "INSERT INTO contacts (id, account_id, first_name, last_name) VALUES ('{id}', '{A}', 'o', 'v0')"
        ))
        .await;
    }
    // About a hundred updates a second, one row after the other; the walsender is terminated
    // five times along the way.
    let versions = 60;
    let updater = {
        let (url, rows) = (env.url.clone(), rows.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            for v in 1..=versions {
                for id in &rows {
                    client
                        .batch_execute(&format!("UPDATE contacts SET last_name = 'v{v}' WHERE id = '{id}'"))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    // The backend holding the leadership lock: a blip must leave it as it is.
    let holder = "SELECT COALESCE(max(pid), 0)::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let lock_holder = env.scalar_i64(holder).await;
    assert_ne!(lock_holder, 0, "the leader holds the lock");
    let mut blips = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        blips += env
            .scalar_i64(&format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                 WHERE slot_name = '{}' AND active",
                env.name
            ))
            .await;
        assert_eq!(env.scalar_i64(holder).await, lock_holder, "a walsender blip gave up the leadership lock");
    }
    assert!(blips >= 1, "no blip hit a streaming walsender");
    updater.await.unwrap();
    let all = |rs: &[Received]| {
        rows.iter().all(|id| rs.iter().any(|r| r.json()["data"]["id"].as_str() == Some(id) && version(r) == versions))
    };
    env.receiver.wait_until(Duration::from_secs(180), all).await.expect("every row's last version arrives");
    env.quiescent().await;
    assert_eq!(env.scalar_i64(holder).await, lock_holder, "a walsender blip gave up the leadership lock");
    assert!(!standby.log_text().contains("took over replication"), "a blip handed the slot to the standby");
    // First arrivals only (a re-send under the same webhook-id after a failure is allowed).
    let mut seen = std::collections::HashSet::new();
    let mut newest: std::collections::HashMap<String, i64> = Default::default();
    let mut out_of_order = Vec::new();
    for r in env.receiver.received() {
        if !seen.insert(r.webhook_id.clone()) {
            continue;
        }
        let id = r.json()["data"]["id"].as_str().unwrap().to_owned();
        let v = version(&r);
        let top = newest.entry(id.clone()).or_insert(-1);
        if v < *top {
            out_of_order.push((id, v, *top));
        }
        *top = (*top).max(v);
    }
    assert!(
        out_of_order.is_empty(),
        "{} versions first arrived after a newer one of their row, e.g. {:?}\nleader:\n{}\nstandby:\n{}",
        out_of_order.len(),
        &out_of_order[..out_of_order.len().min(5)],
        leader.log_text(),
        standby.log_text()
    );
    leader.sigterm();
    standby.sigterm();
    assert!(leader.wait_exit(Duration::from_secs(30)).await.unwrap().success());
    assert!(standby.wait_exit(Duration::from_secs(30)).await.unwrap().success());
}
