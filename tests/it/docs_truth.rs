//! Promises of the README, the config docs and the runbook, tried as a user would: logs for
//! machines carry no colour codes, a re-enabled endpoint stays enabled, a disable is counted
//! once, shutdown starts no new outbox attempt, a paused endpoint does not page, the rate
//! limit says what it limits, and `/readyz` names why replication is not streaming.

use crate::common;

use std::time::{Duration, SystemTime};

use crate::common::{wait_for, Env, Readiness, ACCOUNT_A, USER};
use walhook::admin::endpoints::{Caller, EndpointPatch, Endpoints};
use walhook::local::receiver::Reply;
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

fn insert_contact(name: &str) -> String {
    format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', '{name}')")
}

fn endpoints(env: &Env) -> Endpoints {
    Endpoints::new(env.db.clone(), SecretBox::new(None).unwrap(), AddressPolicy::new(vec![]), "public")
}

async fn readyz(env: &Env) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", env.metrics_port)).await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_carry_no_colour_codes() {
    let env = Env::new("truth_colour").await;
    let mut wh = env.spawn_binary("[log]\nformat = \"text\"\n");
    wait_for(Duration::from_secs(30), || async { wh.log_text().contains("walhook starting") }).await;
    env.ready(Readiness::Streaming).await;
    let log = wh.log_text();
    assert!(!log.contains('\u{1b}'), "stderr is a file, yet the log has ANSI escapes:\n{log:?}");
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.is_some());
}

/// What `walhook run` writes to a terminal (a pseudo-terminal from util-linux's `script`)
/// before it fails to reach a database that is not there.
fn run_on_a_terminal(no_color: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walhook.toml");
    std::fs::write(&config, "[database]\nurl = \"postgres://x@127.0.0.1:1/x\"\n[log]\nlevel = \"info\"\n").unwrap();
    let command = format!("{} run --config {}", env!("CARGO_BIN_EXE_walhook"), config.display());
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &command, "/dev/null"]).env_remove("RUST_LOG").env_remove("NO_COLOR");
    if let Some(v) = no_color {
        script.env("NO_COLOR", v);
    }
    let out = script.stderr(std::process::Stdio::inherit()).output().expect("script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("walhook starting"), "{text:?}");
    text
}

#[test]
fn text_logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    assert!(run_on_a_terminal(None).contains('\u{1b}'), "a terminal gets colour");
    let plain = run_on_a_terminal(Some("1"));
    assert!(!plain.contains('\u{1b}'), "NO_COLOR=1 on a terminal still got ANSI escapes: {plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enabling_an_auto_disabled_endpoint_lasts() {
    let env = Env::new("truth_reenable").await;
    let ep = env.endpoint(ACCOUNT_A, "back", &["contact.created"]).await;
    env.receiver.script("back", vec![Reply::Status(410)]);
    // Maintenance every 100 ms, disabling after 1 s of failures: a stale failure streak would
    // disable the endpoint again at once.
    let wh = env.start("[dispatch]\ndisable_after = \"1s\"\n[retention]\ninterval = \"100ms\"\n").await;
    env.sql(&insert_contact("first")).await;
    let disabled = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND NOT is_active AND disabled_reason = 'gone'",
        ep.id
    );
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&disabled).await == 1 }).await;
    let caller = Caller { account_id: ACCOUNT_A, user_id: USER };
    let patch = EndpointPatch { is_active: Some(true), ..Default::default() };
    let view = endpoints(&env).update(caller, ep.id, patch).await.unwrap();
    assert!(view.is_active);
    let clean = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND is_active \
           AND failing_since IS NULL AND disabled_reason IS NULL",
        ep.id
    );
    assert_eq!(env.scalar_i64(&clean).await, 1, "re-enabling must end the failure streak of the disabled endpoint");
    // Once disable_after has passed since the re-enable, with maintenance running every
    // 100 ms, it still receives new changes.
    let past = format!(
        "SELECT count(*) FROM walhook.endpoints WHERE id = '{}' AND updated_at < now() - interval '1500 ms'",
        ep.id
    );
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&past).await == 1 }).await;
    env.sql(&insert_contact("second")).await;
    env.receiver
        .wait_until(Duration::from_secs(10), |r| r.iter().any(|x| x.path == "/back" && x.answered == 200))
        .await
        .expect("the re-enabled endpoint receives the next change");
    assert_eq!(env.scalar_i64(&clean).await, 1, "still enabled");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_is_counted_once_and_the_series_exist_from_the_start() {
    let env = Env::new("truth_disable_count").await;
    let ep = env.endpoint(ACCOUNT_A, "gone", &["contact.created"]).await;
    let healthy = env.endpoint(ACCOUNT_A, "fine", &["contact.created"]).await;
    // The first attempts fail (the rows wait in the outbox), the retries meet 410 together.
    env.receiver.script("gone", vec![Reply::Status(503); 3]);
    env.receiver.set_default("gone", Reply::Delay(Duration::from_millis(500), 410));
    let wh = env.start("[dispatch]\nendpoint_concurrency = 4\n").await;
    let text = env.metrics_text().await;
    for reason in ["gone", "failing"] {
        let line = format!("walhook_endpoints_disabled_total{{reason=\"{reason}\"}} 0");
        assert!(text.lines().any(|l| l == line), "{line} missing before any disable:\n{text}");
    }
    // Three rows in one transaction: three retries in flight at once, each answered 410.
    env.sql(&format!("BEGIN; {}; {}; {}; COMMIT;", insert_contact("a"), insert_contact("b"), insert_contact("c")))
        .await;
    env.receiver
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().filter(|x| x.path == "/gone" && x.answered == 410).count() == 3
        })
        .await
        .expect("three 410 answers");
    let failed =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'failed'", ep.id);
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&failed).await == 3 }).await;
    // Everything sent to the store before this later delivery is written before it.
    env.sql(&insert_contact("later")).await;
    let later = format!(
        "SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered'",
        healthy.id
    );
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&later).await == 4 }).await;
    wait_for(Duration::from_secs(10), || async {
        env.metric("walhook_endpoints_disabled_total{reason=\"gone\"}").await >= 1.0
    })
    .await;
    assert_eq!(
        env.metric("walhook_endpoints_disabled_total{reason=\"gone\"}").await,
        1.0,
        "one endpoint disabled once, whatever the number of 410 answers"
    );
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_starts_no_new_outbox_attempt() {
    let env = Env::new("truth_shutdown_outbox").await;
    let ep = env.endpoint(ACCOUNT_A, "slow", &["contact.created"]).await;
    // First run: every delivery fails once and waits in the outbox.
    env.receiver.set_default("slow", Reply::Status(503));
    let wh = env.start("[dispatch]\nretry_schedule = [\"1s\", \"1s\", \"1s\"]\n").await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'c' || g FROM generate_series(1, 30) g"
    ))
    .await;
    let pending =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'pending'", ep.id);
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(&pending).await == 30 }).await;
    wh.stop().await.unwrap();
    // Second run: two slow requests at a time; shut down while they are in flight.
    env.receiver.set_default("slow", Reply::Delay(Duration::from_secs(2), 200));
    let before = env.receiver.received_on("slow").len();
    let wh = env.start("[dispatch]\nendpoint_concurrency = 2\n").await;
    env.receiver
        .wait_until(Duration::from_secs(20), |r| r.iter().filter(|x| x.path == "/slow").count() >= before + 2)
        .await
        .expect("outbox attempts start");
    let signalled = SystemTime::now();
    wh.stop().await.unwrap();
    let after: Vec<_> = env.receiver.received_on("slow").into_iter().filter(|r| r.at > signalled).collect();
    assert!(after.is_empty(), "{} requests started after shutdown was signalled", after.len());
    // Rows claimed but never attempted give their claim back.
    let leased = format!(
        "SELECT count(*) FROM walhook.deliveries d WHERE endpoint_id = '{}' AND status = 'pending' \
           AND (lease_until IS NOT NULL \
                OR attempt_count <> (SELECT count(*) FROM walhook.attempt_log a WHERE a.delivery_id = d.id))",
        ep.id
    );
    assert_eq!(env.scalar_i64(&leased).await, 0, "unattempted claims are released with their attempt count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_paused_by_hand_does_not_age_the_outbox() {
    let env = Env::new("truth_paused").await;
    let ep = env.endpoint(ACCOUNT_A, "paused", &["contact.created"]).await;
    env.receiver.set_default("paused", Reply::Status(503));
    let wh = env.start("[dispatch]\nretry_schedule = [\"1h\"]\n").await;
    env.sql(&insert_contact("waiting")).await;
    let age = "walhook_dispatch_oldest_pending_age_seconds";
    wait_for(Duration::from_secs(20), || async { env.metric(age).await > 0.0 }).await;
    // The customer pauses the endpoint: its waiting delivery is not stuck, it is on hold.
    let caller = Caller { account_id: ACCOUNT_A, user_id: USER };
    let patch = EndpointPatch { is_active: Some(false), ..Default::default() };
    endpoints(&env).update(caller, ep.id, patch).await.unwrap();
    wait_for(Duration::from_secs(20), || async { env.metric(age).await == 0.0 }).await;
    wh.stop().await.unwrap();
}

/// The text around each mention of `key`: the four lines above it (a comment block, the
/// start of a README paragraph) and the two below.
fn documentation_of(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    (0..lines.len())
        .filter(|&i| lines[i].contains(key))
        .map(|i| lines[i.saturating_sub(4)..(i + 3).min(lines.len())].join(" "))
        .collect()
}

#[test]
fn the_rate_limit_says_it_is_per_replica() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["README.md", "config/walhook.example.toml", "helm/walhook/values.yaml", "src/config/mod.rs"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let docs = documentation_of(&text, "rate_limit_per_second");
        assert!(!docs.is_empty(), "{file} does not mention rate_limit_per_second");
        assert!(
            docs.iter().any(|d| d.contains("per replica") || d.contains("each replica")),
            "{file} does not say the rate limit applies per replica: {docs:#?}"
        );
    }
    let openapi = std::fs::read_to_string(format!("{root}/docs/openapi.json")).unwrap();
    for line in openapi.lines().filter(|l| l.contains("Over the account's request rate")) {
        assert!(line.contains("replica"), "openapi.json: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_busy_slot() {
    let env = Env::new("truth_readyz_busy").await;
    let wh = env.start("").await;
    assert_eq!(readyz(&env).await.0, 200);
    // Another consumer takes the slot while walhook reconnects.
    env.sql(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}'",
        env.name
    ))
    .await;
    let free = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND NOT active", env.name);
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(&free).await == 1 }).await;
    let bindir = common::cluster().bindir().to_path_buf();
    let mut other = std::process::Command::new(bindir.join("pg_recvlogical"))
        .args(["-d", &env.url, "-S", &env.name, "--start", "-f", "/dev/null", "-o", "proto_version=1"])
        .args(["-o", &format!("publication_names={}", env.name), "--no-loop"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = readyz(&env).await;
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        if status == 503 && reason.contains("in use by another process") {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz does not name the busy slot: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body["reason"].as_str().unwrap().contains("pg_recvlogical"), "{body}");
    // The other consumer takes a change walhook never delivered, confirms it as it stops
    // (SIGINT), and goes: the slot is no longer walhook's to stream from without a word.
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'taken')")
        .await;
    let taken = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    let sent = format!(
        "SELECT COALESCE(max((r.sent_lsn - '0/0')::int8), 0) FROM pg_replication_slots s \
         JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = '{}'",
        env.name
    );
    wait_for(Duration::from_secs(30), || async { env.scalar_i64(&sent).await >= taken }).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.confirmed_lsn().await < taken && other.try_wait().unwrap().is_none() {
        std::process::Command::new("kill").args(["-INT", &other.id().to_string()]).status().unwrap();
        assert!(tokio::time::Instant::now() < deadline, "pg_recvlogical neither confirmed nor stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = other.wait();
    wait_for(Duration::from_secs(30), || async {
        let (status, body) = readyz(&env).await;
        status == 503 && body["reason"].as_str().unwrap_or_default().contains("not the one walhook streamed from")
    })
    .await;
    let mut reset = env.spawn_command("slot-reset", "");
    assert!(reset.wait_exit(Duration::from_secs(60)).await.unwrap().success(), "{}", reset.log_text());
    wait_for(Duration::from_secs(60), || async { readyz(&env).await.0 == 200 }).await;
    wh.stop().await.unwrap();
}
