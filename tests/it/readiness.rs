//! Readiness means streaming, as a user relies on it: run `walhook migrate`, then `walhook
//! run`, wait for `/readyz` 200, create an endpoint, write rows; every row written after the
//! endpoint was created arrives. A replica is not ready while it waits out its own tenure,
//! while it reconnects after a walsender blip, or while its slot is lost; it is ready standing
//! by only while another replica holds the lock (docs/architecture.md, invariant 22).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, readyz, wait_for, wait_for_keys, Env, Proc, Readiness, ACCOUNT_A, USER};
use serde_json::json;
use sha2::{Digest, Sha256};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const TOKEN: &str = "readiness-operator-token";

fn operator() -> String {
    let sha: String = Sha256::digest(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!("[auth]\nstatic_tokens = [{{ token_sha256 = \"{sha}\", account_id = \"{ACCOUNT_A}\", user_id = \"{USER}\" }}]\n")
}

fn ops(env: &Env) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", env.metrics_port).parse().unwrap()
}

/// Runs `walhook migrate` as a user does, to its end.
async fn migrate(env: &Env) {
    let mut m: Proc = env.spawn_command("migrate", "");
    let status = m.wait_exit(Duration::from_secs(120)).await.expect("migrate ends");
    assert!(status.success(), "walhook migrate failed:\n{}", m.log_text());
}

/// Every `/readyz` answer from now until `until` resolves, polled back to back.
async fn watch_readyz(env: &Env, until: impl std::future::Future<Output = ()>) -> Vec<(u16, serde_json::Value)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let poll = {
        let (seen, ops) = (seen.clone(), ops(env));
        async move {
            loop {
                if let Some(answer) = readyz(ops).await {
                    seen.lock().unwrap().push(answer);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    tokio::select! {
        () = until => {}
        () = poll => {}
    }
    let seen = seen.lock().unwrap().clone();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_after_an_endpoint_created_once_ready_all_arrive_on_a_first_start() {
    let env = Env::unmigrated(common::cluster(), "ready_first_start").await;
    migrate(&env).await;
    // An endpoint made right after migrate (before walhook runs): every row from then on is
    // in the slot migrate created.
    env.endpoint(common::ACCOUNT_A, "early", &["contact.created"]).await;
    // Rows keep coming from the moment migrate returned, about 250 a second, each in its own
    // transaction, remembering when each was sent.
    let sent: Arc<Mutex<Vec<(i64, Instant)>>> = Default::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (sent, stop, url) = (sent.clone(), stop.clone(), env.url.clone());
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut n = 0i64;
            while !stop.is_cancelled() {
                n += 1;
                let at = Instant::now();
                client
                    .execute(
                        "INSERT INTO contacts (account_id, first_name, lead_score) VALUES ($1::text::uuid, 'w', $2::int4)",
                        &[&A, &(n as i32)],
                    )
                    .await
                    .unwrap();
                sent.lock().unwrap().push((n, at));
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };
    let wh = env.spawn_binary(&operator());
    // As a user (or a Kubernetes readiness probe) waits: for a 200, whatever the body says.
    wait_for(Duration::from_secs(60), || async { readyz(ops(&env)).await.is_some_and(|(s, _)| s == 200) }).await;
    let created = {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/api/webhooks-create", env.api_port))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(json!({"url": env.receiver.url("hook"), "events": ["contact.created"]}).to_string())
            .send()
            .await
            .unwrap();
        let at = Instant::now();
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        env.receiver.set_secret("hook", body["result"]["signing_secret"].as_str().expect("created"));
        at
    };
    tokio::time::sleep(Duration::from_secs(3)).await; // rows keep coming for a while
    stop.cancel();
    writer.await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let mut expected: HashSet<(String, i64)> =
        sent.iter().filter(|(_, at)| *at > created).map(|(n, _)| ("hook".to_owned(), *n)).collect();
    assert!(expected.len() > 100, "the writer kept writing after the endpoint was created: {}", expected.len());
    expected.extend(sent.iter().map(|(n, _)| ("early".to_owned(), *n)));
    let key = |r: &walhook::local::receiver::Received| {
        (r.path.trim_start_matches('/').to_owned(), r.json()["data"]["lead_score"].as_i64().unwrap())
    };
    let got = wait_for_keys(&env.receiver, &expected, key, &wh).await;
    assert!(got.iter().all(|r| r.verified), "signed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_200_only_while_streaming_never_in_the_tenure_wait_a_blip_or_over_a_lost_slot() {
    let env = Env::new("ready_means_streaming").await;
    // A first start: nothing but "ready and streaming" may be 200, and it is true when said.
    let mut wh = env.spawn_binary("");
    let seen = watch_readyz(&env, env.ready(Readiness::Streaming)).await;
    let standby_200 = seen.iter().filter(|(s, b)| *s == 200 && b["standby"] == true).count();
    assert_eq!(standby_200, 0, "the only replica said it stands by while it started: {seen:?}");
    assert!(
        seen.iter().any(|(s, b)| *s == 503 && b["reason"].as_str().unwrap_or("").contains("not streaming")),
        "before streaming it said so: {seen:?}"
    );
    let walsenders = format!(
        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = '{}'",
        env.name
    );
    assert_eq!(env.scalar_i64(&walsenders).await, 1, "ready means a walsender streams the slot");

    // A walsender blip: not ready until it streams again, never "standing by".
    let blip = async {
        env.sql(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}'",
            env.name
        ))
        .await;
        wait_for(Duration::from_secs(10), || async { readyz(ops(&env)).await.is_some_and(|(s, _)| s == 503) }).await;
        env.ready(Readiness::Streaming).await;
    };
    let seen = watch_readyz(&env, blip).await;
    let standby_200 = seen.iter().filter(|(s, b)| *s == 200 && b["standby"] == true).count();
    assert_eq!(standby_200, 0, "the only replica said it stands by while reconnecting: {seen:?}");

    // A restart over a lost slot: never ready, from the first answer on.
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
    env.sql(&format!("SELECT pg_drop_replication_slot('{}')", env.name)).await;
    let mut wh = env.spawn_binary("");
    let lost = async {
        wait_for(Duration::from_secs(30), || async {
            readyz(ops(&env)).await.is_some_and(|(s, b)| s == 503 && b["reason"].as_str().unwrap().contains("lost"))
        })
        .await;
        // And it stays so.
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let seen = watch_readyz(&env, lost).await;
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(s, _)| *s == 503), "ready over a lost slot: {seen:?}\n{}", wh.log_text());
    wh.kill9();
}

/// `/readyz` answers from state the stages keep, not from the database: a flood of probes
/// (no credentials needed) costs the database nothing and cannot take the pool's connections
/// from the deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_costs_the_database_nothing() {
    let env = Env::new("ready_flood").await;
    let wh = env.start("").await;
    let commits = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
    let before = env.scalar_i64(commits).await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/readyz", env.metrics_port);
    let probes = (0..16).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..125 {
                ok += usize::from(http.get(&url).send().await.is_ok_and(|r| r.status() == 200));
            }
            ok
        })
    });
    let answered: usize = futures::future::join_all(probes).await.into_iter().map(Result::unwrap).sum();
    // (pg_stat_database is updated when a backend reports; give the last reports a moment.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = env.scalar_i64(commits).await;
    assert_eq!(answered, 2000, "every probe answered 200");
    assert!(after - before < 200, "2000 probes made the database commit {} transactions", after - before);
    wh.stop().await.unwrap();
}
