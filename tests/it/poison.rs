//! A hostile tenant cannot stop anyone else's deliveries: whatever its receiver answers (NUL
//! bytes, invalid UTF-8, binary or gzip bodies, huge or odd headers, any status), every other
//! account's webhooks keep being delivered and recorded and the slot keeps moving; and a store
//! batch the database refuses is split so that only the row at fault is set aside.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{
    own_cluster, wait_for, wait_until, Env, InProcess, Readiness, ABSENT_STANDBY, ACCOUNT_A, ACCOUNT_B, SYNC_WAITS,
};
use bytes::Bytes;
use uuid::Uuid;
use walhook::local::receiver::Reply;
use walhook::model::attempt::Attempt;
use walhook::model::delivery::Event;
use walhook::model::progress::Tracker;
use walhook::store::{Record, Status, StoreOp, StoreWriter};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const B: &str = "bbbb0000-0000-4000-8000-000000000002";

/// Every kind of hostile answer, in turn.
fn hostile_answers() -> Vec<Reply> {
    let gzip =
        Bytes::from_static(&[0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0xff, 0xfe]);
    let odd_headers: Vec<(String, String)> = (0..40)
        .map(|i| (format!("x-odd-{i}"), format!("caf\u{e9}\t{}", "\u{7f}".len().to_string().repeat(2000))))
        .collect();
    let mut big = vec![0u8; 200 * 1024];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i * 7 % 256) as u8;
    }
    vec![
        Reply::Raw(200, vec![], Bytes::from_static(b"ok\x00\xff")),
        Reply::Raw(500, vec![], Bytes::from_static(b"boom\x00\xc3\x28")),
        Reply::Raw(200, vec![("content-encoding".into(), "gzip".into())], gzip),
        Reply::Raw(200, odd_headers, Bytes::from_static(b"\xff\xfe\x00\x01\x1b[31m")),
        Reply::Raw(503, vec![("retry-after".into(), "\u{e9}\u{e9}".into())], Bytes::from(big)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_receiver_stops_no_other_account() {
    let env = Env::new("poison_tenant").await;
    let evil = env.endpoint(ACCOUNT_A, "evil", &["contact.created"]).await;
    // The other account's server is another host (connections are pooled per host).
    let other = walhook::local::receiver::Receiver::start(&env.ca).await.unwrap();
    let (good, secret) = env.endpoint_url(ACCOUNT_B, &other.url("good"), &["contact.created"]).await;
    other.set_secret("good", &secret);
    let mut script = Vec::new();
    for _ in 0..8 {
        script.extend(hostile_answers());
    }
    env.receiver.script("evil", script);
    env.receiver.set_default("evil", Reply::Raw(200, vec![], Bytes::from_static(b"ok\x00\xff")));
    let wh = env.start("[dispatch]\nretry_schedule = [\"200ms\"]\n").await;
    // Both accounts write in the same transactions, so their records share store batches.
    let n = 40;
    for round in 0..4 {
        env.sql(&format!(
            "INSERT INTO contacts (account_id, first_name) SELECT a, 'r{round}-' || i \
             FROM generate_series(1, {}) i, (VALUES ('{A}'::uuid), ('{B}'::uuid)) v(a)",
            n / 4
        ))
        .await;
    }
    let written = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    let good_ones = |r: &[walhook::local::receiver::Received]| r.iter().filter(|r| r.path == "/good").count();
    if let Err(got) = other.wait_until(Duration::from_secs(30), |r| good_ones(r) >= n).await {
        panic!("the other account's webhooks arrive: {} of {n}", good_ones(&got));
    }
    let recorded =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'delivered'", good.id);
    let settled =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status <> 'pending'", evil.id);
    let deadline = Duration::from_secs(30);
    let outcome = tokio::time::timeout(deadline, async {
        wait_for(deadline, || async {
            env.scalar_i64(&recorded).await == n as i64 && env.scalar_i64(&settled).await == n as i64
        })
        .await
    })
    .await;
    if outcome.is_err() {
        let rows = env
            .client
            .query(
                "SELECT endpoint_id::text || status || coalesce(last_error, ''), count(*)::text, 0::int8 FROM walhook.deliveries GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        let states: Vec<(String, String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        panic!("every delivery recorded (other account {}, hostile {}): {states:?}", good.id, evil.id);
    }
    wait_for(Duration::from_secs(20), || async { env.confirmed_lsn().await >= written }).await;
    // What the receiver sent is kept for operators, made safe.
    let snippets = env
        .client
        .query(
            "SELECT a.response_snippet FROM walhook.attempt_log a JOIN walhook.deliveries d ON d.id = a.delivery_id \
             WHERE d.endpoint_id = $1 AND a.response_snippet IS NOT NULL",
            &[&evil.id],
        )
        .await
        .unwrap();
    assert!(snippets.iter().any(|r| r.get::<_, String>(0).starts_with("ok")), "snippets are kept");
    for r in &snippets {
        let s: String = r.get(0);
        assert!(s.len() <= 1024 && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{s:?}");
    }
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", env.metrics_port)).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    wh.stop().await.unwrap();
}

fn event(seq: u32, key: &str) -> Arc<Event> {
    Arc::new(Event {
        id: walhook::model::delivery::event_id(walhook::model::position::Position::new(0x2000, seq)),
        account_id: ACCOUNT_A,
        event_type: walhook::model::event::EventType::parse("contact.created").unwrap(),
        entity_key: key.to_owned(),
        position: walhook::model::position::Position::new(0x2000, seq),
        committed_at_us: chrono::Utc::now().timestamp_micros(),
        body: Bytes::from_static(b"{\"event\":\"contact.created\"}"),
    })
}

fn delivered(endpoint: Uuid, seq: u32, key: &str, snippet: &str, tracker: &Tracker) -> StoreOp {
    StoreOp::Insert(Record {
        id: walhook::model::delivery::delivery_id(walhook::model::position::Position::new(0x2000, seq), endpoint),
        endpoint_id: endpoint,
        event: event(seq, key),
        status: if seq % 2 == 0 { Status::Pending } else { Status::Delivered },
        attempt_count: 1,
        http_status: Some(200),
        next_attempt_at: (seq % 2 == 0).then(chrono::Utc::now),
        lease: None,
        last_error: None,
        completed_at: Some(chrono::Utc::now()),
        attempt: Some(Attempt {
            status: Some(200),
            failure: None,
            retry_after: None,
            error: None,
            started_at: chrono::Utc::now(),
            duration: Duration::from_millis(3),
            response_snippet: snippet.into(),
        }),
        ticket: tracker.ticket(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_split_and_only_the_row_at_fault_is_set_aside() {
    let env = Env::new("poison_bisect").await;
    // Rows the database refuses (constraints standing in for any row-level refusal): one
    // whose texts are refused (stored again without them), one whose payload is refused
    // (stored as failed, with the reason), and one refused in every form.
    env.sql(
        "ALTER TABLE walhook.deliveries ADD CONSTRAINT no_poison CHECK (first_snippet IS DISTINCT FROM 'poison');
         ALTER TABLE walhook.events ADD CONSTRAINT no_payload CHECK (seq <> 54);
         ALTER TABLE walhook.deliveries ADD CONSTRAINT no_cursed CHECK (entity_key <> 'contacts:cursed');",
    )
    .await;
    let endpoint = Uuid::new_v4();
    let mut tracker = Tracker::new();
    let (writer, tx) = StoreWriter::new(env.db.clone(), 256, crate::common::writer_settings());
    let mut ops = Vec::new();
    for seq in 1..=100u32 {
        tracker.begin();
        let (key, snippet) = match seq {
            37 => ("contacts:37".to_owned(), "poison"),
            71 => ("contacts:cursed".to_owned(), "ok"),
            _ => (format!("contacts:{seq}"), "ok"),
        };
        ops.push(delivered(endpoint, seq, &key, snippet, &tracker));
        tracker.commit(u64::from(seq) * 100);
    }
    for op in ops {
        tx.send(op).await.unwrap();
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(60), writer.run()).await.expect("the writer gets past a refused row");
    let count = |q: &'static str| env.scalar_i64(q);
    assert_eq!(count("SELECT count(*) FROM walhook.deliveries").await, 99, "all but the cursed row");
    assert_eq!(
        count("SELECT count(*) FROM walhook.attempt_log WHERE response_snippet IS NULL").await,
        1,
        "the poisoned attempt is stored without its texts"
    );
    assert_eq!(count("SELECT count(*) FROM walhook.deliveries WHERE seq = 37").await, 1);
    let q = "SELECT count(*) FROM walhook.deliveries WHERE seq = 54 AND status = 'failed' AND last_error LIKE '%could not store this delivery%'";
    assert_eq!(count(q).await, 1, "the row whose payload was refused is failed with the reason");
    // Tickets: every stored row settled; the one never stored holds its transaction.
    assert_eq!(tracker.confirmable(), Some(7000), "transactions up to the refused row are confirmable");
    assert_eq!(tracker.confirmable(), None, "the refused row's transaction is not settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_makes_readyz_fail_with_the_reason() {
    // Its own cluster: while the store is wedged, walhook's open write transaction holds an xid,
    // and creating a logical slot anywhere in a cluster waits for such transactions to end.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "poison_stall").await;
    env.endpoint(ACCOUNT_A, "s", &["contact.created"]).await;
    let wh = env.start("[database]\nwrite_stall_after = \"1s\"\n").await;
    let readyz = || readyz(&env);
    assert_eq!(readyz().await.0, 200);
    // Wedge the store: a transaction holding walhook.deliveries.
    let (_locker, lock) = lock_deliveries(&env).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'stalled')")).await;
    env.receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await.unwrap();
    let (status, body) = readyz_until_503(&env, Duration::from_secs(15)).await;
    assert_eq!(status, 503, "not ready while the store cannot commit: {body}");
    assert!(body.contains("store writer cannot make progress"), "{body}");
    // The real cause: the lock and who holds it, not a guess (and never "unreachable").
    let holder: i32 = lock.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(body.contains("waiting for a lock") && body.contains(&format!("held by pid {holder}")), "{body}");
    assert!(!body.contains("unreachable"), "{body}");
    assert_eq!(env.metric("walhook_store_stalled").await, 1.0);
    lock.batch_execute("ROLLBACK").await.unwrap();
    wait_for(Duration::from_secs(20), || async { readyz().await.0 == 200 }).await;
    assert_eq!(env.metric("walhook_store_stalled").await, 0.0);
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 1 }).await;
    wh.stop().await.unwrap();
}

/// A store whose commits wait for a synchronous standby that does not answer is reported
/// naming the standby setting (not as an overloaded database), and recovers once the
/// standby answers, with the delivery stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_waiting_for_a_synchronous_standby_is_reported_naming_the_standby() {
    // Its own cluster: its commits are made to wait for a standby that is not there.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let (env, wh) = stalling(&cluster, "poison_sync_standby").await;
    assert_eq!(readyz(&env).await.0, 200);
    env.synchronous_standby(ABSENT_STANDBY).await;
    // The CRM's own commit does not wait (its session commits locally); walhook's do: its
    // record of the delivery, and the raise of its confirm ceiling (which may come first).
    insert_committed_locally(&env).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "not ready while the store's commits wait for the standby: {body}");
    assert!(body.contains("store writer cannot make progress"), "{body}");
    assert!(body.contains("synchronous standby") && body.contains("walhook_absent_standby"), "{body}");
    assert!(!body.contains("no lock wait found"), "{body}");
    standby_answers(&env, wh).await;
}

/// A raise of the confirm ceiling that cannot commit (the replication session waits on it)
/// is reported like the store's own writes, naming the standby, though no delivery waits to
/// be recorded; the rows behind it are delivered once the standby answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_ceiling_waiting_for_a_standby_is_reported() {
    // Its own cluster: its commits are made to wait for a standby that is not there.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let (env, wh) = stalling(&cluster, "poison_ceiling_sync").await;
    env.quiescent().await;
    env.synchronous_standby(ABSENT_STANDBY).await;
    // A row no endpoint wants: nothing to record, only a position to confirm, past the ceiling.
    env.sql(&format!(
        "BEGIN; SET LOCAL synchronous_commit = local; \
         INSERT INTO contacts (account_id, first_name) VALUES ('{ACCOUNT_B}', 'nobody wants this'); COMMIT;"
    ))
    .await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "walhook cannot confirm (its ceiling waits for the standby), yet: {body}");
    assert!(body.contains("synchronous standby") && body.contains("walhook_absent_standby"), "{body}");
    insert_committed_locally(&env).await;
    standby_answers(&env, wh).await;
}

/// A raise of the confirm ceiling stuck on a lock stays reported while the store writer
/// commits other work (retries of a failing endpoint): one writer's commits never hide
/// another's stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_ceiling_raise_stays_reported_while_retries_commit() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "poison_ceiling_lock").await;
    env.endpoint(ACCOUNT_A, "s", &["contact.created"]).await;
    env.receiver.set_default("s", Reply::Status(500));
    let every_second = format!("[{}]", vec!["\"1s\""; 60].join(", "));
    let wh = env
        .start(&format!("[database]\nwrite_stall_after = \"1s\"\n[dispatch]\nretry_schedule = {every_second}\n"))
        .await;
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'r' || i FROM generate_series(1, 5) i"
    ))
    .await;
    let now = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    wait_for(Duration::from_secs(15), || async { env.confirmed_lsn().await >= now }).await;
    // The ceiling's row held: the next raise waits.
    let (holder, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    holder.batch_execute("BEGIN; SELECT * FROM walhook.slot_state FOR NO KEY UPDATE").await.unwrap();
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{ACCOUNT_B}', 'nobody wants this')"))
        .await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(15)).await;
    assert!(status == 503 && body.contains("confirm ceiling") && body.contains("waiting for a lock"), "{body}");
    // Longer than a recheck: the retries' commits do not hide it.
    let retried = env.receiver.received_on("s").len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < deadline {
        let (status, body) = readyz(&env).await;
        assert_eq!(status, 503, "the raise still waits, yet: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(env.receiver.received_on("s").len() > retried, "retries went on meanwhile");
    holder.batch_execute("ROLLBACK").await.unwrap();
    env.receiver.set_default("s", Reply::Status(200));
    wait_for(Duration::from_secs(30), || async { readyz(&env).await.0 == 200 }).await;
    env.quiescent().await;
    wh.stop().await.unwrap();
}

/// A stall's cause is what the store waits on now, not what it waited on first: a stall that
/// began as a lock wait names the synchronous standby once the lock is gone and walhook's
/// commits wait for the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalls_cause_follows_what_the_store_waits_on_now() {
    // Its own cluster: its commits are made to wait for a standby that is not there.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let (env, wh) = stalling(&cluster, "poison_cause_moves").await;
    let (_locker, lock) = lock_deliveries(&env).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'waits twice')")).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(15)).await;
    assert!(status == 503 && body.contains("waiting for a lock"), "{body}");
    env.synchronous_standby(ABSENT_STANDBY).await;
    // The lock goes (its holder commits without waiting for the standby); the write it held
    // commits and now waits for the standby.
    lock.batch_execute("SET LOCAL synchronous_commit = local; COMMIT").await.unwrap();
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(SYNC_WAITS).await >= 1 }).await;
    let last = std::sync::Mutex::new(String::new());
    let named = wait_until(Duration::from_secs(30), || async {
        let (_, body) = readyz(&env).await;
        let named = body.contains("synchronous standby") && !body.contains("waiting for a lock");
        *last.lock().unwrap() = body;
        named
    })
    .await;
    assert!(
        named,
        "the lock is gone and walhook's commits wait for the standby, yet /readyz says {}",
        last.lock().unwrap()
    );
    standby_answers(&env, wh).await;
}

/// A lock held by a transaction whose own commit waits for a synchronous standby is named
/// with that wait: ending the holder is not the remedy, the standby is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_commit_waiting_for_a_standby_names_the_standby() {
    // Its own cluster: its commits are made to wait for a standby that is not there.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let (env, wh) = stalling(&cluster, "poison_lock_sync").await;
    let (_locker, lock) = lock_deliveries(&env).await;
    env.synchronous_standby(ABSENT_STANDBY).await;
    // The holder commits, and waits for the standby with the lock still held.
    let holder: i32 = lock.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let committing = tokio::spawn(async move { lock.batch_execute("COMMIT").await });
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(SYNC_WAITS).await >= 1 }).await;
    insert_committed_locally(&env).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("held by pid {holder}")), "{body}");
    assert!(
        body.contains("its commit waits for a synchronous standby") && body.contains("walhook_absent_standby"),
        "{body}"
    );
    standby_answers(&env, wh).await;
    committing.await.unwrap().unwrap();
}

/// A database that refuses walhook's writes (permissions, read-only, disk full) stalls the
/// store; the ERROR line and `/readyz` carry the database's own words, not a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_writes_is_reported_in_its_own_words() {
    let env = Env::new("poison_refuses_writes").await;
    env.endpoint(ACCOUNT_A, "w", &["contact.created"]).await;
    let mut wh = env.spawn_binary("[database]\nwrite_stall_after = \"1s\"\n");
    env.ready(Readiness::Streaming).await;
    // As a revoked privilege answers (SQLSTATE 42501), for every write of a delivery.
    env.sql(
        "CREATE FUNCTION walhook.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'permission denied for table deliveries' USING ERRCODE = '42501'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON walhook.deliveries FOR EACH ROW EXECUTE FUNCTION walhook.refuse();",
    )
    .await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'refused')")).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("permission denied for table deliveries"), "{body}");
    let said = |log: &str| {
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("cannot make progress") && l.contains("permission denied"))
    };
    wait_for(Duration::from_secs(10), || async { said(&wh.log_text()) }).await;
    env.sql("DROP TRIGGER refuse ON walhook.deliveries").await;
    wait_for(Duration::from_secs(30), || async { readyz(&env).await.0 == 200 }).await;
    env.quiescent().await;
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", wh.log_text());
}

/// A store writer waiting on a lock while it answers an outbox probe (rows blocked behind a
/// failed delivery are probed every tick) is stalled just the same: /readyz and the gauge say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stuck_on_an_outbox_probe_is_reported_as_stalled() {
    // Its own cluster: while the store is wedged, walhook's open write transaction holds an xid,
    // and creating a logical slot anywhere in a cluster waits for such transactions to end.
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&[])).await.unwrap();
    let env = Env::on(&cluster, "poison_probe_stall").await;
    env.endpoint(ACCOUNT_A, "p", &["contact.created"]).await;
    env.receiver.set_default("p", Reply::Status(500));
    let wh = env.start("[database]\nwrite_stall_after = \"1s\"\n[dispatch]\nretry_schedule = [\"60s\"]\n").await;
    let readyz = || readyz(&env);
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'blocked')")).await;
    let pending = "SELECT count(*) FROM walhook.deliveries WHERE status = 'pending'";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(pending).await == 1 }).await;
    assert_eq!(readyz().await.0, 200);
    // The row is blocked behind its failed delivery, so dispatch probes the outbox; wedge it.
    let (_locker, lock) = lock_deliveries(&env).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(15)).await;
    assert_eq!(status, 503, "not ready while a probe cannot read the outbox: {body}");
    assert!(body.contains("store writer cannot make progress"), "{body}");
    assert_eq!(env.metric("walhook_store_stalled").await, 1.0);
    lock.batch_execute("ROLLBACK").await.unwrap();
    wait_for(Duration::from_secs(20), || async { readyz().await.0 == 200 }).await;
    wh.stop().await.unwrap();
}

/// walhook on `cluster` with one endpoint for account A's new contacts, reporting a store
/// write that takes over 1 s as a stall.
async fn stalling(cluster: &walhook::local::cluster::TempCluster, name: &str) -> (Env, InProcess) {
    let env = Env::on(cluster, name).await;
    env.endpoint(ACCOUNT_A, "s", &["contact.created"]).await;
    let wh = env.start("[database]\nwrite_stall_after = \"1s\"\n").await;
    (env, wh)
}

/// A contact of account A, committed without waiting for a standby (as the CRM's sessions
/// commit in these tests; walhook's wait).
async fn insert_committed_locally(env: &Env) {
    env.sql(&format!(
        "BEGIN; SET LOCAL synchronous_commit = local; \
         INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'committed locally'); COMMIT;"
    ))
    .await;
}

/// The standby requirement goes: `/readyz` is 200 again, the one contact's delivery is
/// stored, and `wh` stops.
async fn standby_answers(env: &Env, wh: InProcess) {
    env.synchronous_standby("").await;
    wait_for(Duration::from_secs(30), || async { readyz(env).await.0 == 200 }).await;
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 1 }).await;
    wh.stop().await.unwrap();
}

/// `/readyz`: status and body.
async fn readyz(env: &Env) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", env.metrics_port)).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `/readyz` once it answers 503, or its last answer after `within`.
async fn readyz_until_503(env: &Env, within: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (s, b) = readyz(env).await;
        if s == 503 || tokio::time::Instant::now() > deadline {
            return (s, b);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session holding `walhook.deliveries` in ACCESS EXCLUSIVE mode until `ROLLBACK` is sent
/// on the returned client (the store wedged).
async fn lock_deliveries(env: &Env) -> (tokio::task::JoinHandle<()>, tokio_postgres::Client) {
    let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    client.batch_execute("BEGIN; LOCK TABLE walhook.deliveries IN ACCESS EXCLUSIVE MODE").await.unwrap();
    (task, client)
}

/// A delivery record the database refuses in every form (an operator's constraint) holds the
/// slot, and says so: `/readyz` 503 naming the delivery, `walhook_store_pinned_records`, one
/// ERROR. It is tried again, so once the cause is gone the slot catches up without a restart;
/// and a SIGTERM while one is pinned does not wait out the grace period for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_in_every_form_pins_the_slot_loudly_and_is_stored_once_the_cause_is_gone() {
    let env = Env::new("poison_pinned").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let mut wh = env.spawn_binary("[shutdown]\ngrace = \"20s\"\n");
    env.ready(Readiness::Streaming).await;
    let cursed = "96000000-0000-4000-8000-000000000001";
    env.sql(&format!(
        "ALTER TABLE walhook.deliveries ADD CONSTRAINT refuse_one CHECK (entity_key <> 'contacts:{cursed}') NOT VALID"
    ))
    .await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{cursed}', '{A}', 'cursed')")).await;
    let cursed_end = env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'after')")).await;
    env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await.expect("both are sent");
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("hold the replication slot") && body.contains("refuse_one"), "{body}");
    assert_eq!(env.metric("walhook_store_pinned_records").await, 1.0);
    let errors = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("refused this delivery's record in every form"))
            .count()
    };
    assert_eq!(errors(&wh.log_text()), 1, "one ERROR naming it:\n{}", wh.log_text());
    // The slot stays behind it, however long.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.confirmed_lsn().await < cursed_end, "the slot moved past a delivery that is not recorded");

    env.sql("ALTER TABLE walhook.deliveries DROP CONSTRAINT refuse_one").await;
    wait_for(Duration::from_secs(60), || async { readyz(&env).await.0 == 200 }).await;
    env.quiescent().await;
    assert_eq!(env.metric("walhook_store_pinned_records").await, 0.0);
    let recorded = format!("SELECT count(*) FROM walhook.deliveries WHERE entity_key = 'contacts:{cursed}'");
    assert_eq!(env.scalar_i64(&recorded).await, 1, "stored at last, once");
    assert_eq!(errors(&wh.log_text()), 1);

    // Pinned again, then SIGTERM: the process does not wait for what cannot be stored.
    let second = "96000000-0000-4000-8000-000000000002";
    env.sql(&format!(
        "ALTER TABLE walhook.deliveries ADD CONSTRAINT refuse_two CHECK (entity_key <> 'contacts:{second}') NOT VALID;
         INSERT INTO contacts (id, account_id, first_name) VALUES ('{second}', '{A}', 'second');"
    ))
    .await;
    readyz_until_503(&env, Duration::from_secs(20)).await;
    let asked = std::time::Instant::now();
    wh.sigterm();
    let status = wh.wait_exit(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "{}", wh.log_text());
    assert!(asked.elapsed() < Duration::from_secs(15), "it waited out the grace period: {:?}", asked.elapsed());
    assert!(env.confirmed_lsn().await < env.scalar_i64("SELECT (pg_current_wal_lsn() - '0/0')::int8").await);
    env.sql("ALTER TABLE walhook.deliveries DROP CONSTRAINT refuse_two").await;
    // After a restart it is read again and recorded.
    let _wh = env.spawn_binary("");
    env.ready(Readiness::Streaming).await;
    env.quiescent().await;
    let recorded = format!("SELECT count(*) FROM walhook.deliveries WHERE entity_key = 'contacts:{second}'");
    assert_eq!(env.scalar_i64(&recorded).await, 1);
}

/// The lock a stalled store waits for may be held by a prepared transaction someone forgot
/// (it has no session to name): the cause names it by its gid and says how to end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_forgotten_prepared_transaction_is_named() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(&["max_prepared_transactions = 4"])).await.unwrap();
    let env = Env::on(&cluster, "poison_prepared_lock").await;
    env.endpoint(ACCOUNT_A, "s", &["contact.created"]).await;
    let wh = env.start("[database]\nwrite_stall_after = \"1s\"\n").await;
    env.sql("BEGIN; LOCK TABLE walhook.deliveries IN ACCESS EXCLUSIVE MODE; PREPARE TRANSACTION 'forgotten-lock'")
        .await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'stalled')")).await;
    let (status, body) = readyz_until_503(&env, Duration::from_secs(20)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("prepared transaction") && body.contains("forgotten-lock"), "{body}");
    env.sql("ROLLBACK PREPARED 'forgotten-lock'").await;
    wait_for(Duration::from_secs(20), || async { readyz(&env).await.0 == 200 }).await;
    wh.stop().await.unwrap();
    drop(env);
    drop(cluster);
}

/// A due delivery the database refuses to claim (an operator's constraint on
/// `walhook.deliveries` refusing its row) holds back only its own endpoint: other accounts'
/// retries keep being claimed and delivered, and one ERROR names the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_delivery_the_database_refuses_to_claim_holds_back_only_its_endpoint() {
    let env = Env::new("poison_refused_claim").await;
    let stuck = env.endpoint(ACCOUNT_B, "b", &["contact.created"]).await;
    env.receiver.set_default("b", Reply::Status(500));
    env.endpoint(ACCOUNT_A, "a", &["contact.created"]).await;
    let mut wh = env.spawn_binary("[dispatch]\nretry_schedule = [\"300ms\", \"300ms\", \"300ms\", \"300ms\"]\n");
    env.ready(Readiness::Streaming).await;
    let b_row = "97100000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{b_row}', '{B}', 'stuck')")).await;
    let pending =
        format!("SELECT count(*) FROM walhook.deliveries WHERE endpoint_id = '{}' AND status = 'pending'", stuck.id);
    wait_for(Duration::from_secs(20), || async { env.scalar_i64(&pending).await == 1 }).await;
    env.sql(&format!(
        "ALTER TABLE walhook.deliveries ADD CONSTRAINT refuse_claim CHECK (entity_key <> 'contacts:{b_row}' OR \
         leased_by IS NULL) NOT VALID"
    ))
    .await;
    // Account A's first attempts fail too, so their retries come from the outbox.
    env.receiver.script("a", vec![Reply::Status(500); 5]);
    env.sql(&format!(
        "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'a' || i FROM generate_series(1, 5) i"
    ))
    .await;
    let delivered =
        |rs: &[walhook::local::receiver::Received]| rs.iter().filter(|r| r.path == "/a" && r.answered == 200).count();
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| delivered(rs) == 5)
        .await
        .unwrap_or_else(|rs| panic!("{} of 5 of account A's retries delivered\n{}", delivered(&rs), wh.log_text()));
    let named = |log: &str| {
        log.lines().any(|l| l.contains("ERROR") && l.contains("refuses to claim") && l.contains(&stuck.id.to_string()))
    };
    wait_for(Duration::from_secs(10), || async { named(&wh.log_text()) }).await;
    env.sql("ALTER TABLE walhook.deliveries DROP CONSTRAINT refuse_claim").await;
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.unwrap().success());
}
