//! A database failover, as managed services do it: a primary and a physical standby, walhook
//! connected through a TCP proxy (the stable address), changes written all along; the primary
//! stops, the standby is promoted and the proxy re-pointed at it.
//!
//! On PostgreSQL 17 and later, with the standby synchronising walhook's failover slot, every
//! change is delivered once per `webhook-id` to its own account, and no `slot-reset` is
//! needed. Without a synchronised slot (before 17, or before the standby has it), walhook says
//! the slot is lost, loudly, never carrying on silently. Also: a slot made without failover is
//! altered on start (17+), `/readyz` and the metrics show whether a failover would keep the
//! slot, and PostgreSQL 18's `idle_replication_slot_timeout` invalidation is reported as such.
//! (Own clusters: stopping the shared one would disturb other tests.)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use walhook::local::cluster::TempCluster;
use walhook::pg::db::Db;

use crate::common::{own_cluster, readyz, wait_for, Env, Readiness, ACCOUNT_A, ACCOUNT_B};

/// A TCP proxy with one upstream port that can be re-pointed; re-pointing cuts the
/// connections to the old upstream, as a managed service's address switch does.
struct Proxy {
    port: u16,
    upstream: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let accept = tokio::spawn({
            let (upstream, conns) = (upstream.clone(), conns.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let to = upstream.load(Ordering::SeqCst);
                    conns.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            }
        });
        Proxy { port, upstream, conns, accept }
    }

    fn repoint(&self, upstream: u16) {
        self.upstream.store(upstream, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.repoint(0);
    }
}

async fn server_version(env: &Env) -> i64 {
    env.scalar_i64("SELECT current_setting('server_version_num')::int8").await
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Inserts contacts of accounts A and B in turn, one transaction each, about 150 a second,
/// reconnecting after errors, until `stop`; `next` is the next row's number.
async fn writer(url: String, next: Arc<AtomicU64>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.is_cancelled() {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let account = if i % 2 == 0 { ACCOUNT_A } else { ACCOUNT_B };
            let sql =
                format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{account}', 'w')", row_id(i));
            if client.batch_execute(&sql).await.is_err() {
                break; // the server went away: reconnect (whether it committed, the new primary says)
            }
            tokio::time::sleep(Duration::from_micros(6_600)).await;
        }
    }
}

fn row_id(i: u64) -> String {
    format!("f0000000-0000-4000-8000-{i:012}")
}

fn row_number(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Points the test's walhook (and its `Env::db`) at `url` instead of the primary itself.
fn through(env: &mut Env, url: String) {
    env.url = url;
    env.db = Db::new(&env.config("").database).expect("db");
}

/// The standby's settings (README, "Failover on PostgreSQL 17 and later"); `sync` only where
/// PostgreSQL has slot synchronisation (17+).
fn standby_conf(primary: &TempCluster, db: &str, version: i64, sync: bool) -> Vec<String> {
    let mut conf = vec![
        "hot_standby_feedback = on".to_owned(),
        format!("primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname={db}'", primary.port()),
    ];
    if version >= 170_000 {
        conf.push(format!("sync_replication_slots = {}", if sync { "on" } else { "off" }));
    }
    conf
}

/// The failover of the module doc, with the primary stopped fast or crashed (`crash`).
async fn fail_over_with_a_synchronised_slot(name: &str, crash: bool) {
    let primary = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let mut env = Env::on(&primary, name).await;
    if server_version(&env).await < 170_000 {
        eprintln!("skipped: PostgreSQL before 17 cannot carry a logical slot to a standby (see slot_loss tests)");
        return;
    }
    let failover: bool = env
        .client
        .query_one("SELECT failover FROM pg_replication_slots WHERE slot_name = $1", &[&name])
        .await
        .unwrap()
        .get(0);
    assert!(failover, "walhook migrate creates the slot with failover = true on 17+");
    let conf = standby_conf(&primary, name, server_version(&env).await, true);
    let standby_slot = format!("{name}_standby");
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let standby = primary.start_standby(&standby_slot, &conf).expect("standby");
        (primary, standby)
    })
    .await
    .unwrap();
    env.sql(&format!("ALTER SYSTEM SET synchronized_standby_slots = '{name}_standby'")).await;
    env.sql("SELECT pg_reload_conf()").await;
    let proxy = Proxy::start(primary.port()).await;
    through(&mut env, format!("postgres://postgres@127.0.0.1:{}/{name}", proxy.port));
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    env.endpoint(ACCOUNT_B, "b", &["contact.created"]).await;
    let mut wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;

    // What an operator checks before trusting a failover: the standby has the slot, and
    // walhook says a failover would keep it.
    let on_standby = connect(&standby.url(name)).await;
    wait_for(Duration::from_secs(60), || async {
        on_standby
            .query_opt("SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1", &[&name])
            .await
            .unwrap()
            .is_some_and(|r| r.get::<_, bool>(0))
    })
    .await;
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    wait_for(Duration::from_secs(30), || async {
        readyz(ops).await.is_some_and(|(s, b)| s == 200 && b["failover"]["ready"] == true)
    })
    .await;
    assert_eq!(env.metric("walhook_replication_failover_ready").await, 1.0);
    assert_eq!(env.metric("walhook_replication_failover_standbys").await, 1.0);
    assert_eq!(env.metric("walhook_replication_slot_failover").await, 1.0);

    let (next, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
    let load = tokio::spawn(writer(env.url.clone(), next.clone(), stop.clone()));
    env.receiver.wait_until(Duration::from_secs(30), |r| r.len() >= 150).await.expect("delivering before the failover");

    // The failover: the primary stops (fast, or a crash), the standby is promoted, the address
    // re-pointed.
    let stopped_at = Instant::now();
    let first_after = next.load(Ordering::SeqCst);
    let standby = tokio::task::spawn_blocking(move || {
        primary.pg_stop(crash).expect("stop the primary");
        standby.promote().expect("promote the standby");
        standby
    })
    .await
    .unwrap();
    proxy.repoint(standby.port());
    let is_new = |r: &walhook::local::receiver::Received| {
        row_number(r.json()["data"]["id"].as_str().unwrap_or_default()) > first_after
    };
    env.receiver
        .wait_until(Duration::from_secs(90), |rs| rs.iter().any(is_new))
        .await
        .unwrap_or_else(|_| panic!("nothing written after the failover arrived\n{}", wh.log_text()));
    let first_change_after = stopped_at.elapsed();
    env.receiver
        .wait_until(Duration::from_secs(60), |rs| rs.iter().filter(|r| is_new(r)).count() >= 150)
        .await
        .expect("streaming from the new primary");
    stop.cancel();
    load.await.unwrap();

    // What the new primary holds is what was committed: each of it arrives, once per
    // webhook-id, at its own account's endpoint only; nothing else arrives.
    let new_primary = connect(&standby.url(name)).await;
    let rows: Vec<(String, String)> = new_primary
        .query("SELECT id::text, account_id::text FROM contacts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = |account: uuid::Uuid| -> HashSet<String> {
        rows.iter().filter(|(_, a)| *a == account.to_string()).map(|(id, _)| id.clone()).collect()
    };
    let (want_a, want_b) = (expected(ACCOUNT_A), expected(ACCOUNT_B));
    let id_of = |r: &walhook::local::receiver::Received| r.json()["data"]["id"].as_str().unwrap_or_default().to_owned();
    env.receiver
        .wait_until(Duration::from_secs(90), |rs| {
            let on = |p: &str| rs.iter().filter(|r| r.path == p).map(id_of).collect::<HashSet<_>>();
            want_a.is_subset(&on("/a")) && want_b.is_subset(&on("/b"))
        })
        .await
        .unwrap_or_else(|_| panic!("not every committed change arrived\n{}", wh.log_text()));
    // Nothing more is on its way: the slot has confirmed the last commit and nothing is pending.
    let end: String = new_primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    wait_for(Duration::from_secs(60), || async {
        new_primary
            .query_one(
                "SELECT (SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                         WHERE slot_name = $2) \
                    AND NOT EXISTS (SELECT 1 FROM walhook.deliveries WHERE status = 'pending')",
                &[&end, &name],
            )
            .await
            .unwrap()
            .get::<_, Option<bool>>(0)
            == Some(true)
    })
    .await;
    let received = env.receiver.received();
    for (path, want) in [("/a", &want_a), ("/b", &want_b)] {
        let mut ids_by_row: HashMap<String, HashSet<String>> = HashMap::new();
        for r in received.iter().filter(|r| r.path == path) {
            assert!(r.verified, "unsigned or wrongly signed delivery on {path}");
            ids_by_row.entry(id_of(r)).or_default().insert(r.webhook_id.clone());
        }
        let got: HashSet<String> = ids_by_row.keys().cloned().collect();
        assert_eq!(&got, want, "{path} got a change of another account or one the new primary does not have");
        let twice: Vec<_> = ids_by_row.iter().filter(|(_, ids)| ids.len() > 1).take(3).collect();
        assert!(twice.is_empty(), "changes sent under two webhook-ids on {path}: {twice:?}");
    }
    let gaps: i64 = new_primary.query_one("SELECT count(*) FROM walhook.replication_gaps", &[]).await.unwrap().get(0);
    assert_eq!(gaps, 0, "no gap: the synchronised slot carried on");
    assert_eq!(env.metric("walhook_replication_slot_lost").await, 0.0);
    env.ready(Readiness::Streaming).await;
    let resent = received.len() - received.iter().map(|r| &r.webhook_id).collect::<HashSet<_>>().len();
    eprintln!(
        "failover figures ({}): {} changes committed ({} of A, {} of B), all delivered, {resent} re-sends; the first \
         change written after the stop arrived {:.1} s after it",
        if crash { "crash" } else { "fast stop" },
        rows.len(),
        want_a.len(),
        want_b.len(),
        first_change_after.as_secs_f64()
    );
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_a_standby_with_the_synchronised_slot_loses_nothing() {
    fail_over_with_a_synchronised_slot("failover_sync", false).await;
}

/// A crash loses what the standby never received, in the database itself: what the new
/// primary has is still exactly what arrives (the primary sent walhook only what the standby
/// had, `synchronized_standby_slots`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_after_a_crash_delivers_exactly_what_the_new_primary_has() {
    fail_over_with_a_synchronised_slot("failover_crash", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_standby_without_the_slot_is_reported_lost_never_silent() {
    let primary = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let mut env = Env::on(&primary, "failover_unsynced").await;
    // Before 17 no standby carries a logical slot; from 17 on, this one does not synchronise.
    let conf = standby_conf(&primary, "failover_unsynced", server_version(&env).await, false);
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let standby = primary.start_standby("failover_unsynced_standby", &conf).expect("standby");
        (primary, standby)
    })
    .await
    .unwrap();
    let proxy = Proxy::start(primary.port()).await;
    through(&mut env, format!("postgres://postgres@127.0.0.1:{}/failover_unsynced", proxy.port));
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    let mut wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    wait_for(Duration::from_secs(30), || async {
        readyz(ops).await.is_some_and(|(_, b)| b["failover"]["ready"] == false && b["failover"].is_object())
    })
    .await;
    let writes = connect(&env.url).await;
    writes
        .batch_execute(&format!(
            "INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{ACCOUNT_A}', 'before')",
            row_id(1)
        ))
        .await
        .unwrap();
    env.receiver.wait_until(Duration::from_secs(30), |r| !r.is_empty()).await.expect("delivered before");
    // Make sure the standby has everything, then fail over.
    let standby = tokio::task::spawn_blocking(move || {
        primary.pg_stop(false).expect("stop the primary");
        standby.promote().expect("promote the standby");
        standby
    })
    .await
    .unwrap();
    proxy.repoint(standby.port());
    let new_primary = connect(&standby.url("failover_unsynced")).await;
    new_primary
        .batch_execute(&format!(
            "INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{ACCOUNT_A}', 'after')",
            row_id(2)
        ))
        .await
        .unwrap();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let answer = readyz(ops).await;
        if let Some((503, body)) = &answer {
            let reason = body["reason"].as_str().unwrap_or_default();
            if reason.contains("replication slot failover_unsynced lost") {
                assert!(reason.contains("not carried over by a PostgreSQL failover"), "{reason}");
                assert!(reason.contains("walhook slot-reset"), "{reason}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the lost slot was never reported; /readyz said {last:?}\n{}",
            wh.log_text()
        );
        last = answer;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.metric("walhook_replication_slot_lost").await, 1.0);
    assert!(wh.log_text().contains("replication slot failover_unsynced lost"), "one ERROR names the slot");
    assert_eq!(env.receiver.count(), 1, "nothing is delivered from a slot walhook did not create");
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_without_failover_is_altered_on_start_where_postgres_can_carry_it() {
    let env = Env::unmigrated(crate::common::cluster(), "failover_alter").await;
    // Made by hand after the publication (or before an upgrade to 17): no failover flag;
    // walhook migrate adopts it.
    walhook::pg::migrate::migrate(&env.db, &env.config("")).await.expect("schema and publication");
    env.sql("SELECT pg_create_logical_replication_slot('failover_alter', 'pgoutput')").await;
    walhook::app::migrate(&env.db, &env.config("")).await.expect("migrate");
    let mut wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    wait_for(Duration::from_secs(30), || async { readyz(ops).await.is_some_and(|(_, b)| b["failover"].is_object()) })
        .await;
    if server_version(&env).await < 170_000 {
        let (_, body) = readyz(ops).await.unwrap();
        assert_eq!(body["failover"]["supported"], false, "{body}");
        assert!(body["failover"]["notes"].to_string().contains("does not carry logical replication slots"), "{body}");
        assert_eq!(env.metric("walhook_replication_slot_failover").await, 0.0);
    } else {
        let failover: bool = env
            .client
            .query_one("SELECT failover FROM pg_replication_slots WHERE slot_name = 'failover_alter'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(failover, "altered to failover = true\n{}", wh.log_text());
        assert!(wh.log_text().contains("replication slot altered to failover = true"), "{}", wh.log_text());
        wait_for(Duration::from_secs(30), || async { env.metric("walhook_replication_slot_failover").await == 1.0 })
            .await;
        let (_, body) = readyz(ops).await.unwrap();
        assert_eq!((&body["failover"]["supported"], &body["failover"]["slot_failover"]), (&json!(true), &json!(true)));
        assert!(body["failover"]["notes"].to_string().contains("no standby is set up"), "{body}");
        let warned = wh.log_text().lines().any(|l| l.contains(" WARN ") && l.contains("failover"));
        assert!(!warned, "altering is no reason to warn\n{}", wh.log_text());
    }
    // Streaming still delivers.
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{ACCOUNT_A}', 'x')", row_id(7)))
        .await;
    env.receiver.wait_until(Duration::from_secs(30), |r| r.len() == 1).await.expect("delivered");
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_for_idleness_is_reported_with_the_setting_to_change() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "failover_idle").await;
    if server_version(&env).await < 180_000 {
        eprintln!("skipped: idle_replication_slot_timeout is new in PostgreSQL 18");
        return;
    }
    let mut wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
    // walhook is down longer than the timeout: the next checkpoint invalidates its slot.
    env.sql("ALTER SYSTEM SET idle_replication_slot_timeout = '1s'").await;
    env.sql("SELECT pg_reload_conf()").await;
    wait_for(Duration::from_secs(60), || async {
        env.sql("CHECKPOINT").await;
        env.scalar_i64(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'failover_idle' \
             AND invalidation_reason = 'idle_timeout'",
        )
        .await
            == 1
    })
    .await;
    let mut wh = env.spawn_binary("");
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        last = readyz(ops).await.or(last);
        if let Some((503, body)) = &last {
            if body["reason"].as_str().unwrap_or_default().contains("idle_replication_slot_timeout") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "not reported: /readyz said {last:?}\n{}", wh.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = wh.log_text();
    assert!(log.contains("idle_replication_slot_timeout is 1s"), "the start-up warning names the setting\n{log}");
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
    drop(cluster);
}

/// The setting a promotion leaves behind (or a standby that is down): the primary waits for a
/// standby slot nothing streams from and sends walhook nothing. That is loud: a WARN, the
/// gauge, and after 30 s the streaming replica is not ready, naming the slot; it recovers as
/// soon as the setting is fixed, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_holding_back_changes_for_a_missing_standby_is_loud_and_nothing_is_lost() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "failover_held").await;
    if server_version(&env).await < 170_000 {
        eprintln!("skipped: synchronized_standby_slots is new in PostgreSQL 17");
        return;
    }
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    let mut wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    // Unquoted, as an operator types it: PostgreSQL folds it to lower case.
    env.sql("ALTER SYSTEM SET synchronized_standby_slots = 'Gone_Standby'").await;
    env.sql("SELECT pg_reload_conf()").await;
    let ops = format!("127.0.0.1:{}", env.metrics_port).parse().unwrap();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        last = readyz(ops).await.or(last);
        if let Some((503, body)) = &last {
            let reason = body["reason"].as_str().unwrap_or_default();
            if reason.contains("holds back every change") {
                assert!(reason.contains("gone_standby"), "{reason}");
                assert_eq!(body["failover"]["held_back_by"], json!(["gone_standby"]), "{body}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never reported: /readyz said {last:?}\n{}", wh.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Written once walhook says it is held back (by then its walsender has long read the
    // reloaded setting: a reload reaches a running walsender only when it next wakes).
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name) VALUES ('{}', '{ACCOUNT_A}', 'held')",
        row_id(1)
    ))
    .await;
    assert_eq!(env.metric("walhook_replication_held_back_by_standby").await, 1.0);
    assert_eq!(env.receiver.count(), 0, "held back: nothing reached walhook");
    assert!(wh.log_text().contains("the primary holds back every change from walhook"), "{}", wh.log_text());

    env.sql("ALTER SYSTEM SET synchronized_standby_slots = ''").await;
    env.sql("SELECT pg_reload_conf()").await;
    env.receiver.wait_until(Duration::from_secs(60), |r| r.len() == 1).await.expect("delivered once released");
    env.ready(Readiness::Streaming).await;
    wait_for(Duration::from_secs(30), || async { env.metric("walhook_replication_held_back_by_standby").await == 0.0 })
        .await;
    wh.sigterm();
    wh.wait_exit(Duration::from_secs(30)).await;
    drop(cluster);
}
