//! Webhook targets in internal ranges are refused at connect time, whatever form the host
//! takes, and the target never sees a connection. (The endpoints here bypass the admin API's
//! create-time check on purpose: think of a DNS name that later points inside, or rows
//! created while `dispatch.allowed_cidrs` was wider.)

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{wait_for, Env, Readiness, ACCOUNT_A};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_targets_are_refused_in_every_spelling_and_never_connected_to() {
    let env = Env::new("ssrf_forms").await;
    let port = env.receiver.url("").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let hosts = ["localhost", "127.1", "2130706433", "0x7f.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "127.0.0.1"];
    for h in hosts {
        env.endpoint_url(ACCOUNT_A, &format!("https://{h}:{port}/ssrf"), &["contact.created"]).await;
    }
    // Default policy: no private range allowed (the test receiver lives on 127.0.0.1).
    let wh = env.start("[dispatch]\nallowed_cidrs = []\nretry_schedule = [\"200ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed' AND attempt_count = 2";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == hosts.len() as i64 }).await;
    let kinds: Vec<String> = env
        .client
        .query("SELECT DISTINCT error_kind FROM walhook.attempt_log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["refused"], "every attempt was refused");
    assert_eq!(env.receiver.connections(), 0, "the target never saw a connection");
    assert_eq!(env.metric("walhook_dispatch_attempts_total{outcome=\"refused\"}").await, 2.0 * hosts.len() as f64);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_cidrs_open_exactly_their_range() {
    let env = Env::new("ssrf_allowed").await;
    env.endpoint(ACCOUNT_A, "ok", &["contact.created"]).await; // https://127.0.0.1:<port>/ok
    let port = env.receiver.url("").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let (v6, _) = env.endpoint_url(ACCOUNT_A, &format!("https://[::1]:{port}/v6"), &["contact.created"]).await;
    let wh = env.start("[dispatch]\nallowed_cidrs = [\"127.0.0.0/8\"]\nretry_schedule = [\"200ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed'";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 1 }).await;
    let q = format!(
        "SELECT count(*) FROM walhook.attempt_log a JOIN walhook.deliveries d ON d.id = a.delivery_id \
         WHERE d.endpoint_id = '{}' AND a.error_kind = 'refused'",
        v6.id
    );
    assert_eq!(env.scalar_i64(&q).await, 2, "::1 is outside 127.0.0.0/8: refused, not merely unreachable");
    assert_eq!(env.receiver.received_on("ok").len(), 1);
    wh.stop().await.unwrap();
}

/// The forms issue 13 found accepted at create and at connect: IPv4-embedding IPv6 forms of
/// loopback, and special-purpose ranges that are not globally reachable.
const ISSUE_13_HOSTS: [&str; 10] = [
    "[::ffff:0:127.0.0.1]",
    "[64:ff9b:1::7f00:1]",
    "[2002:7f00:1::1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
    "[100::1]",
    "[2001:db8::1]",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "192.88.99.1",
];

const TOKEN: &str = "ssrf-operator-token-0b6d";

fn token_config() -> String {
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "[auth]\nstatic_tokens = [{{ token_sha256 = \"{sha}\", account_id = \"{ACCOUNT_A}\", user_id = \"{}\" }}]\n",
        common::USER
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_global_ranges_and_embedded_forms_are_refused_at_create() {
    let env = Env::new("ssrf_create_ranges").await;
    let wh = env.start(&format!("[dispatch]\nallowed_cidrs = []\n{}", token_config())).await;
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    for host in ISSUE_13_HOSTS {
        let body = serde_json::json!({ "url": format!("https://{host}/hook"), "events": ["contact.created"] });
        let resp = http
            .post(format!("http://127.0.0.1:{}/api/webhooks-create", env.api_port))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        if (status, v["error"]["code"].as_str()) != (400, Some("webhooks.invalid_url")) {
            accepted.push(format!("{host}: {status} {v}"));
        }
    }
    assert!(accepted.is_empty(), "accepted at create: {accepted:#?}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.endpoints").await, 0);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_global_ranges_and_embedded_forms_are_refused_at_connect() {
    let env = Env::new("ssrf_connect_ranges").await;
    for host in ISSUE_13_HOSTS {
        env.endpoint_url(ACCOUNT_A, &format!("https://{host}:443/ssrf"), &["contact.created"]).await;
    }
    let wh = env.start("[dispatch]\nallowed_cidrs = []\nretry_schedule = [\"200ms\"]\n").await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'failed' AND attempt_count = 2";
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(q).await == ISSUE_13_HOSTS.len() as i64 }).await;
    let not_refused: Vec<String> = env
        .client
        .query(
            "SELECT e.url || ' ' || coalesce(a.error_kind, 'ok') FROM walhook.attempt_log a \
             JOIN walhook.deliveries d ON d.id = a.delivery_id JOIN walhook.endpoints e ON e.id = d.endpoint_id \
             WHERE a.error_kind IS DISTINCT FROM 'refused' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(not_refused.is_empty(), "attempts not refused before connecting: {not_refused:#?}");
    wh.stop().await.unwrap();
}

/// A CONNECT proxy on loopback that counts the tunnels it was asked for.
async fn connect_proxy() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connects = Arc::new(AtomicUsize::new(0));
    let seen = connects.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let Some(target) = head.strip_prefix("CONNECT ").and_then(|r| r.split(' ').next()) else { return };
                seen.fetch_add(1, Ordering::SeqCst);
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (port, connects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_in_the_environment_does_not_bypass_the_address_check() {
    let env = Env::new("ssrf_proxy").await;
    let port = env.receiver.url("").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let (_, secret) =
        env.endpoint_url(ACCOUNT_A, &format!("https://localhost:{port}/proxied"), &["contact.created"]).await;
    env.receiver.set_secret("proxied", &secret);
    let (proxy_port, connects) = connect_proxy().await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    // Loopback is not allowed as a target; the proxy (a literal address) was never checked.
    let mut wh = env.spawn_command_with("run", "[dispatch]\nallowed_cidrs = []\nretry_schedule = [\"200ms\"]\n", |c| {
        c.env("HTTPS_PROXY", &proxy)
            .env("https_proxy", &proxy)
            .env("ALL_PROXY", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
    });
    env.ready(Readiness::Streaming).await;
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status <> 'pending'";
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(q).await == 1 }).await;
    let row = env.client.query_one("SELECT status, attempt_count FROM walhook.deliveries", &[]).await.unwrap();
    let outcome = (row.get::<_, String>(0), row.get::<_, i32>(1));
    let tunnels = connects.load(Ordering::SeqCst);
    let received = env.receiver.received_on("proxied").len();
    wh.sigterm();
    let _ = wh.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        (outcome.0.as_str(), outcome.1, tunnels, received),
        ("failed", 2, 0, 0),
        "https://localhost must be refused, never tunnelled through HTTPS_PROXY (status, attempts, CONNECTs, received)"
    );
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.attempt_log WHERE error_kind <> 'refused'").await, 0);
}
