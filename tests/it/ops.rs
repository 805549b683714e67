//! What operators and SREs rely on: metrics that appear and move (and pass promtool), health
//! and readiness, JSON logs without secrets, heartbeats that move an idle slot, and a
//! graceful SIGTERM that loses nothing.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use crate::common::{own_cluster, wait_for, Env, Readiness, ACCOUNT_A, USER};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_appear_move_and_pass_promtool() {
    let env = Env::new("ops_metrics").await;
    env.endpoint(ACCOUNT_A, "m", &["contact.created"]).await;
    let wh = env.start("").await;
    let before = env.metrics_text().await;
    assert!(before.contains("walhook_replication_streaming 1"), "{before}");
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'm')")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    wait_for(Duration::from_secs(10), || async {
        env.metric("walhook_dispatch_commit_to_delivered_seconds_count").await >= 1.0
    })
    .await;
    for (line, at_least) in [
        ("walhook_replication_changes_total{op=\"created\",table=\"contacts\"}", 1.0),
        ("walhook_events_total{event_type=\"contact.created\"}", 1.0),
        ("walhook_deliveries_total{path=\"direct\"}", 1.0),
        ("walhook_dispatch_attempts_total{outcome=\"2xx\"}", 1.0),
        ("walhook_dispatch_request_duration_seconds_count", 1.0),
    ] {
        assert!(env.metric(line).await >= at_least, "{line} did not move");
    }
    // DB-derived gauges refresh in the background.
    wait_for(Duration::from_secs(15), || async { env.metric("walhook_endpoints{state=\"active\"}").await == 1.0 })
        .await;
    // API requests are counted by route and status.
    let http = reqwest::Client::new();
    let _ = http.post(format!("http://127.0.0.1:{}/api/webhooks-list", env.api_port)).body("{}").send().await.unwrap();
    assert_eq!(env.metric("walhook_api_requests_total{route=\"/api/webhooks-list\",status=\"401\"}").await, 1.0);
    let text = env.metrics_text().await;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("walhook_"), "every metric is walhook_*: {line}");
        assert!(!line.contains(A) && !line.contains("127.0.0.1"), "no ids or URLs in labels: {line}");
    }
    // promtool: installed by .ci/install-tools (Debian's prometheus package).
    let promtool = Command::new("promtool").arg("--version").output();
    assert!(promtool.is_ok(), "promtool is not installed (apt-get install prometheus)");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "ops_readyz").await;
    let wh = env.start("").await;
    let http = reqwest::Client::new();
    let probe = |path: &'static str| {
        let (http, port) = (http.clone(), env.metrics_port);
        async move {
            let r = http.get(format!("http://127.0.0.1:{port}{path}")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(probe("/readyz").await.0, 200);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.pg_stop(false).unwrap();
        cluster
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (s, b) = probe("/readyz").await;
        if s == 503 || tokio::time::Instant::now() > deadline {
            break (s, b);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "not ready without the database: {body}");
    let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reason["ready"], false);
    assert!(reason["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    assert_eq!(probe("/healthz").await.0, 200, "alive all the same");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.pg_start().unwrap();
        cluster
    })
    .await
    .unwrap();
    wait_for(Duration::from_secs(60), || async { probe("/readyz").await.0 == 200 }).await;
    wh.stop().await.unwrap();
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_load_exits_cleanly_and_loses_nothing() {
    let env = Env::new("ops_sigterm").await;
    env.endpoint(ACCOUNT_A, "t", &["contact.created"]).await;
    env.receiver.set_default("t", walhook::local::receiver::Reply::Delay(Duration::from_millis(300), 200));
    let grace = 5;
    let mut proc = env.spawn_binary(&format!("[shutdown]\ngrace = \"{grace}s\"\n[dispatch]\nspill_after = \"10s\"\n"));
    env.ready(Readiness::Streaming).await;
    let n = 300;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'c' || i FROM generate_series(1, {n}) i"
    ))
    .await;
    env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 20).await.unwrap();
    let asked = std::time::Instant::now();
    proc.sigterm();
    let status = proc.wait_exit(Duration::from_secs(grace + 10)).await.expect("walhook exits after SIGTERM");
    let took = asked.elapsed();
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}\n{}", proc.log_text());
    assert!(took < Duration::from_secs(grace + 5), "exits within the grace period (took {took:?})");
    // Whatever it had not sent waits in the outbox or the slot: a new process sends the rest.
    let _next = env.spawn_binary("");
    let key =
        |r: &walhook::local::receiver::Received| r.json()["data"]["first_name"].as_str().unwrap_or_default().to_owned();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| rs.iter().map(key).collect::<HashSet<_>>().len() >= n)
        .await
        .expect("every change delivered across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_no_secrets_or_payloads() {
    let env = Env::new("ops_json_logs").await;
    let (_, secret) = env.endpoint_url(ACCOUNT_A, &env.receiver.url("j"), &["contact.created"]).await;
    env.receiver.set_secret("j", &secret);
    let mut proc = env.spawn_binary("[log]\nformat = \"json\"\nlevel = \"info\"\n[secrets]\nencryption_key = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n");
    env.ready(Readiness::Streaming).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'payload-marker-xyz')")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    let _ = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/webhooks-list", env.api_port))
        .bearer_auth("some-bearer-token-value")
        .body("{}")
        .send()
        .await;
    proc.sigterm();
    assert!(proc.wait_exit(Duration::from_secs(30)).await.unwrap().success());
    let log = proc.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    for needle in [&secret["whsec_".len()..], "some-bearer-token-value", "payload-marker-xyz", "MDEyMzQ1Njc4"] {
        assert!(!log.contains(needle), "{needle} in the log");
    }
    let _ = USER;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_an_idle_slot() {
    // A cluster of its own: on the shared one, other tests' WAL would move the slot anyway.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "ops_heartbeat").await;
    let wh = env.start("[replication]\nheartbeat_interval = \"1s\"\n").await;
    let first = env.confirmed_lsn().await;
    // No writes at all: only heartbeats produce WAL, and the slot follows them.
    wait_for(Duration::from_secs(20), || async { env.confirmed_lsn().await > first }).await;
    let second = env.confirmed_lsn().await;
    wait_for(Duration::from_secs(20), || async { env.confirmed_lsn().await > second }).await;
    wh.stop().await.unwrap();
    drop(env);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_wedged_store_exits_within_grace_and_loses_nothing() {
    // Its own cluster: while the store is wedged, walhook's open write transaction holds an xid,
    // and creating a logical slot anywhere in a cluster waits for such transactions to end.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "ops_sigterm_wedged").await;
    env.endpoint(ACCOUNT_A, "w", &["contact.created"]).await;
    let grace = 3;
    let mut proc = env.spawn_binary(&format!("[shutdown]\ngrace = \"{grace}s\"\n"));
    env.ready(Readiness::Streaming).await;
    // Wedge the store: a transaction holds walhook.deliveries, so nothing can be recorded.
    let (mut locker, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE walhook.deliveries IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let n = 50;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'w' || i FROM generate_series(1, {n}) i"
    ))
    .await;
    env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= n).await.expect("deliveries flow");
    let asked = std::time::Instant::now();
    proc.sigterm();
    let status = proc.wait_exit(Duration::from_secs(grace + 30)).await.expect("walhook exits after SIGTERM");
    let took = asked.elapsed();
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}\n{}", proc.log_text());
    // A functional promise (README: SIGTERM shuts down within shutdown.grace), with a margin
    // for closing connections and a loaded machine.
    assert!(
        took < Duration::from_secs(grace + 3),
        "exits within the grace period (took {took:?})\n{}",
        proc.log_text()
    );
    eprintln!("SIGTERM to exit with the store wedged: {took:?} (shutdown.grace = {grace}s)");
    lock.rollback().await.unwrap();
    // Nothing was recorded, so nothing was confirmed: the next process sends and records all.
    let _next = env.spawn_binary("");
    let key =
        |r: &walhook::local::receiver::Received| r.json()["data"]["first_name"].as_str().unwrap_or_default().to_owned();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| rs.iter().map(key).collect::<HashSet<_>>().len() >= n)
        .await
        .expect("every change delivered");
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(q).await == n as i64 }).await;
}
