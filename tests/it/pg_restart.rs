//! A PostgreSQL restart (even a crash) mid-stream is survived: walhook reconnects with
//! backoff, resumes from the slot, and every committed change is delivered.
//! (Its own cluster: restarting the shared one would disturb other tests.)

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{own_cluster, Env, ACCOUNT_A};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// Inserts rows one transaction at a time until `stop`, reconnecting after errors; returns
/// the ids whose commit was acknowledged.
async fn writer(url: String, stop: tokio_util::sync::CancellationToken) -> Vec<String> {
    let mut committed = Vec::new();
    let mut i = 0;
    while !stop.is_cancelled() {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.is_cancelled() {
            let id = format!("70000000-0000-4000-8000-{i:012}");
            i += 1;
            let sql = format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', 'w')");
            match client.batch_execute(&sql).await {
                Ok(()) => committed.push(id),
                Err(_) => break, // server went away; reconnect
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    committed
}

async fn restart_mid_stream(name: &str, crash: bool) {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, name).await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start("").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn(writer(env.url.clone(), stop.clone()));
    env.receiver.wait_until(Duration::from_secs(30), |r| r.len() >= 50).await.expect("streaming before the restart");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.pg_stop(crash).expect("stop");
        cluster.pg_start().expect("start");
        cluster
    })
    .await
    .unwrap();
    let before = env.receiver.count();
    env.receiver
        .wait_until(Duration::from_secs(60), |r| r.len() >= before + 50)
        .await
        .expect("streaming after the restart");
    stop.cancel();
    let committed: HashSet<String> = load.await.unwrap().into_iter().collect();
    let key = |r: &walhook::local::receiver::Received| r.json()["data"]["id"].as_str().unwrap_or_default().to_string();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| committed.is_subset(&rs.iter().map(key).collect()))
        .await
        .unwrap_or_else(|rs| {
            let seen: HashSet<String> = rs.iter().map(key).collect();
            panic!("{} committed rows never arrived", committed.difference(&seen).count())
        });
    wh.stop().await.unwrap();
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_postgres_restart_mid_stream_loses_nothing() {
    restart_mid_stream("pg_restart_fast", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_mid_stream_loses_nothing() {
    restart_mid_stream("pg_restart_crash", true).await;
}

/// A server that refuses a connection for now (too many connections, shutting down, starting
/// up, not accepting connections) says so with an error code; that is still connection
/// trouble, retried, not a reason for a stage to stop the process. Here: a role whose
/// connection limit is reached (SQLSTATE 53300, what `max_connections` exhaustion also says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_connections_for_now_is_a_transient_error() {
    let env = Env::new("pg_refuses_for_now").await;
    env.sql(
        "DROP ROLE IF EXISTS walhook_refused_for_now; CREATE ROLE walhook_refused_for_now LOGIN CONNECTION LIMIT 0",
    )
    .await;
    let url = env.url.replacen("postgres://postgres@", "postgres://walhook_refused_for_now@", 1);
    let cfg = walhook::config::Config::from_toml(&format!("[database]\nurl = \"{url}\"\n")).unwrap();
    let db = walhook::pg::db::Db::new(&cfg.database).unwrap();
    let Err(err) = db.connect().await else { panic!("the role's connection limit refuses the connection") };
    assert!(err.to_string().contains("too many connections"), "{err}");
    assert!(err.is_transient(), "refused for now, so retried: {err}");
    env.sql("DROP ROLE walhook_refused_for_now").await;
}

/// A walsender that stops answering (frozen, or a half-open connection) is noticed: the stream
/// brings nothing, not even the message walhook writes to probe it, so the session is rebuilt
/// and `/readyz` says why; once the walsender is gone, streaming resumes and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_walsender_is_noticed_and_nothing_is_lost() {
    let env = Env::new("pg_frozen_walsender").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start("[replication]\nstream_timeout = \"4s\"\n").await;
    let pid = env
        .scalar_i64("SELECT active_pid::int8 FROM pg_replication_slots WHERE slot_name = 'pg_frozen_walsender'")
        .await;
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'during')")).await;
    let ops: std::net::SocketAddr = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reason = loop {
        if let Some((503, body)) = crate::common::readyz(ops).await {
            let reason = body["reason"].as_str().unwrap_or_default().to_owned();
            if reason.contains("stuck") || reason.contains("in use by another process") {
                break reason;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "a frozen walsender went unnoticed for 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status().unwrap().success());
    env.ready(crate::common::Readiness::Streaming).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.json()["data"]["first_name"] == "during"))
        .await
        .unwrap_or_else(|_| panic!("the change written while the walsender was frozen arrives ({reason})"));
    wh.stop().await.unwrap();
}
