//! A customer reading an endpoint's delivery history over the API: filtered by status and
//! event type, a page at a time, with pages that deliveries recorded meanwhile never shift;
//! bad filters and forged cursors are refused naming the field.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use walhook::local::receiver::Reply;

use crate::api::{auth_config, jwt, Api};
use crate::common::{wait_for, Env, ACCOUNT_A, ACCOUNT_B};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

fn ids(page: &Value) -> Vec<String> {
    page["deliveries"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_filter_by_status_and_event_type_and_page_stably() {
    let env = Env::new("history_pages").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = api
        .ok(
            "webhooks-create",
            &a,
            json!({ "url": env.receiver.url("h"), "events": ["contact.created", "contact.updated"] }),
        )
        .await;
    env.receiver.set_secret("h", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();
    let count = |status: &'static str| api.count_status(&a, &id, status);

    // Five created and three updated, delivered; then two created that fail every attempt.
    for i in 0..5 {
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'c{i}')")).await;
    }
    env.sql("UPDATE contacts SET last_name = 'u' WHERE first_name IN ('c0', 'c1', 'c2')").await;
    wait_for(Duration::from_secs(30), || async { count("delivered").await == 8 }).await;
    env.receiver.set_default("h", Reply::Status(500));
    for i in 0..2 {
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'bad{i}')")).await;
    }
    wait_for(Duration::from_secs(30), || async { count("failed").await == 2 }).await;

    let all = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id, "limit": 100 })).await;
    assert_eq!(ids(&all).len(), 10);
    assert_eq!(all["next_cursor"], Value::Null, "one page holds them all: no next page");
    let of = |body: Value| {
        let (api, a, id) = (&api, &a, &id);
        async move {
            let mut body = body;
            body["endpoint_id"] = json!(id);
            api.ok("webhooks-deliveries", a, body).await
        }
    };
    let failed = of(json!({ "status": "failed" })).await;
    assert_eq!(ids(&failed).len(), 2);
    assert!(failed["deliveries"].as_array().unwrap().iter().all(|d| d["status"] == "failed"));
    let updated = of(json!({ "event_type": "contact.updated" })).await;
    assert_eq!(ids(&updated).len(), 3);
    assert!(updated["deliveries"].as_array().unwrap().iter().all(|d| d["event_type"] == "contact.updated"));
    let both = of(json!({ "status": "delivered", "event_type": "contact.created" })).await;
    assert_eq!(ids(&both).len(), 5);
    assert!(ids(&of(json!({ "status": "pending" })).await).is_empty());

    // Pages of three; between the first and the second, more deliveries are recorded: they
    // are newer than every page, so no page repeats or skips one.
    env.receiver.set_default("h", Reply::Status(200));
    let mut pages = vec![of(json!({ "limit": 3 })).await];
    for i in 0..2 {
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'late{i}')")).await;
    }
    wait_for(Duration::from_secs(30), || async { count("delivered").await == 10 }).await;
    while let Some(cursor) = pages.last().unwrap()["next_cursor"].as_str().map(str::to_owned) {
        pages.push(of(json!({ "limit": 3, "cursor": cursor })).await);
        assert!(pages.len() <= 4, "more pages than deliveries");
    }
    let paged: Vec<String> = pages.iter().flat_map(ids).collect();
    assert_eq!(paged, ids(&all), "the pages are the history as it was, in order, once each");
    assert_eq!(pages.iter().map(|p| ids(p).len()).collect::<Vec<_>>(), [3, 3, 3, 1]);
    // A cursor carries the filter's place, not the filter: paging the failed ones.
    let f1 = of(json!({ "status": "failed", "limit": 1 })).await;
    let f2 = of(json!({ "status": "failed", "limit": 1, "cursor": f1["next_cursor"] })).await;
    assert_eq!([ids(&f1), ids(&f2)].concat(), ids(&failed));
    assert_eq!(f2["next_cursor"], Value::Null);

    // Bad input names the field; another account sees nothing.
    let bad = |body: Value, needle: &'static str| {
        let (api, a, id) = (&api, &a, &id);
        async move {
            let mut body = body;
            body["endpoint_id"] = json!(id);
            let msg = api.err("webhooks-deliveries", a, body, 400, "webhooks.invalid_request").await;
            assert!(msg.contains(needle), "{msg}");
        }
    };
    bad(json!({ "status": "lost" }), "status").await;
    bad(json!({ "status": 3 }), "status").await;
    bad(json!({ "event_type": "contact.exploded" }), "event_type").await;
    bad(json!({ "cursor": "bm90IGEgY3Vyc29y" }), "cursor").await;
    let list_cursor = "1764590000000000_aaaa0000-0000-4000-8000-000000000001";
    bad(json!({ "cursor": list_cursor }), "cursor").await;
    api.err("webhooks-deliveries", &jwt(ACCOUNT_B), json!({ "endpoint_id": id }), 404, "webhooks.not_found").await;
    let seen: HashSet<String> = env.receiver.received().iter().map(|r| r.webhook_id.clone()).collect();
    assert!(ids(&all).iter().all(|d| seen.contains(d)), "every listed delivery was attempted under its id");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_say_when_how_long_and_why_each_failed() {
    let env = Env::new("history_attempts").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created =
        api.ok("webhooks-create", &a, json!({ "url": env.receiver.url("t"), "events": ["contact.created"] })).await;
    env.receiver.set_secret("t", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();
    env.receiver.script(
        "t",
        vec![
            Reply::Raw(503, vec![], bytes::Bytes::from_static(b"down for maintenance\x07 back soon")),
            Reply::Reset,
            Reply::Status(200),
        ],
    );
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'x')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 1 }).await;
    let history = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id })).await;
    let delivery = history["deliveries"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(env.receiver.received()[0].webhook_id, delivery);

    let got = api.ok("webhooks-attempts", &a, json!({ "delivery_id": delivery })).await;
    let attempts = got["attempts"].as_array().unwrap();
    assert_eq!(attempts.iter().map(|t| t["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), [3, 2, 1], "{got}");
    for t in attempts {
        let keys: HashSet<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["attempt", "started_at", "duration_ms", "http_status_code", "error", "response_snippet"].into()
        );
        assert!(t["duration_ms"].as_i64().unwrap() >= 0);
    }
    let (ok, reset, busy) = (&attempts[0], &attempts[1], &attempts[2]);
    assert_eq!((ok["http_status_code"].as_i64(), &ok["error"]), (Some(200), &Value::Null), "{ok}");
    assert_eq!(busy["http_status_code"], 503);
    assert_eq!(busy["error"], "HTTP 503");
    assert_eq!(busy["response_snippet"], "down for maintenance back soon", "the answer, its control character removed");
    assert_eq!(reset["http_status_code"], Value::Null);
    let why = reset["error"].as_str().unwrap();
    assert!(["connection reset", "network"].iter().any(|k| why.starts_with(k)), "{why}");
    assert!(busy["started_at"].as_str() < reset["started_at"].as_str());

    let one = api.ok("webhooks-attempts", &a, json!({ "delivery_id": delivery, "limit": 1 })).await;
    assert_eq!(one["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(one["attempts"][0]["attempt"], 3);
    // Another account's delivery looks missing; bad input names the field.
    let msg = api
        .err("webhooks-attempts", &jwt(ACCOUNT_B), json!({ "delivery_id": delivery }), 404, "webhooks.not_found")
        .await;
    assert_eq!(msg, "delivery not found");
    let nobody = "00000000-0000-4000-8000-000000000000";
    api.err("webhooks-attempts", &a, json!({ "delivery_id": nobody }), 404, "webhooks.not_found").await;
    api.err("webhooks-attempts", &a, json!({ "delivery_id": "x" }), 400, "webhooks.invalid_id").await;
    let msg = api
        .err("webhooks-attempts", &a, json!({ "delivery_id": delivery, "limit": 0 }), 400, "webhooks.invalid_request")
        .await;
    assert!(msg.contains("limit"), "{msg}");
    let msg = api.err("webhooks-attempts", &a, json!({}), 400, "webhooks.invalid_request").await;
    assert!(msg.contains("delivery_id"), "{msg}");
    wh.stop().await.unwrap();
}

/// A delivery that succeeds on its first attempt is recorded as one row (its attempt on the
/// delivery's own row, none in `walhook.attempts`), and its attempt reads as any other: over
/// the API and in `walhook.attempt_log`. Sent again, attempt 1 keeps what it was, and the
/// new attempts follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_success_is_one_row_and_keeps_its_attempt_through_a_redelivery() {
    let env = Env::new("history_first_attempt").await;
    let wh = env.start(&format!("{}[retention]\npayloads = \"1h\"\n", auth_config())).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created =
        api.ok("webhooks-create", &a, json!({ "url": env.receiver.url("f"), "events": ["contact.created"] })).await;
    env.receiver.set_secret("f", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();
    env.receiver.script(
        "f",
        vec![
            Reply::Raw(201, vec![], bytes::Bytes::from_static(b"accepted")),
            Reply::Raw(500, vec![], bytes::Bytes::from_static(b"oops")),
            Reply::Status(202),
        ],
    );
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'x')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 1 }).await;
    let history = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id })).await;
    let delivery = history["deliveries"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.attempts").await, 0, "no attempt row of its own");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.deliveries").await, 1);

    let first = api.ok("webhooks-attempts", &a, json!({ "delivery_id": delivery })).await;
    let attempts = first["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{first}");
    let one = attempts[0].clone();
    assert_eq!(
        (one["attempt"].as_i64(), one["http_status_code"].as_i64(), &one["error"], one["response_snippet"].as_str()),
        (Some(1), Some(201), &Value::Null, Some("accepted")),
        "{one}"
    );
    assert!(one["duration_ms"].as_i64().unwrap() >= 0);
    let sent_at = env.receiver.received()[0].at;
    let started = chrono::DateTime::parse_from_rfc3339(one["started_at"].as_str().unwrap()).unwrap();
    let sent_at = chrono::DateTime::<chrono::Utc>::from(sent_at);
    let skew = (sent_at - started.with_timezone(&chrono::Utc)).num_milliseconds();
    assert!((0..2000).contains(&skew), "started {started}, received {sent_at}");

    // Sent again: fails once, then succeeds; attempt 1 is unchanged, 2 and 3 follow.
    api.ok("webhooks-redeliver", &a, json!({ "delivery_id": delivery })).await;
    wait_for(Duration::from_secs(60), || async {
        let got = api.ok("webhooks-attempts", &a, json!({ "delivery_id": delivery })).await;
        got["attempts"].as_array().unwrap().len() == 3
    })
    .await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "delivered").await == 1 }).await;
    let all = api.ok("webhooks-attempts", &a, json!({ "delivery_id": delivery })).await;
    let all = all["attempts"].as_array().unwrap();
    let numbers: Vec<i64> = all.iter().map(|t| t["attempt"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [3, 2, 1]);
    assert_eq!(all[2], one, "attempt 1 reads as it did before the redelivery");
    assert_eq!((all[1]["http_status_code"].as_i64(), all[0]["http_status_code"].as_i64()), (Some(500), Some(202)));
    let logged =
        env.scalar_i64(&format!("SELECT count(*) FROM walhook.attempt_log WHERE delivery_id = '{delivery}'")).await;
    assert_eq!(logged, 3, "walhook.attempt_log shows every attempt");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_request_is_signed_sent_now_once_and_answered_with_what_happened() {
    let env = Env::new("history_test_send").await;
    let config = format!("{}[dispatch]\naccount_concurrency = 1\n", auth_config());
    let wh = env.start(&config).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created =
        api.ok("webhooks-create", &a, json!({ "url": env.receiver.url("t"), "events": ["contact.created"] })).await;
    env.receiver.set_secret("t", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();

    let got = api.ok("webhooks-test", &a, json!({ "id": id })).await;
    assert_eq!((got["http_status_code"].as_i64(), &got["error"]), (Some(200), &Value::Null), "{got}");
    assert!(got["duration_ms"].as_i64().is_some());
    let r = env.receiver.received_on("/t");
    assert_eq!(r.len(), 1);
    assert!(r[0].verified, "signed with the endpoint's secret");
    assert_eq!(r[0].json()["event"], "webhook.test");
    assert_eq!(r[0].json()["data"], json!({ "endpoint_id": id }));
    assert!(r[0].json()["timestamp"].as_str().unwrap().ends_with('Z'));

    // An inactive endpoint can be checked before enabling it; a failure is answered, not
    // retried, and leaves no delivery behind.
    api.ok("webhooks-update", &a, json!({ "id": id, "is_active": false })).await;
    env.receiver.set_default("t", Reply::Raw(500, vec![], bytes::Bytes::from_static(b"boom")));
    let got = api.ok("webhooks-test", &a, json!({ "id": id })).await;
    assert_eq!((got["http_status_code"].as_i64(), got["error"].as_str()), (Some(500), Some("HTTP 500")), "{got}");
    assert_eq!(got["response_snippet"], "boom");
    let history = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id })).await;
    assert!(ids(&history).is_empty(), "no delivery: nothing to retry");
    assert_eq!(env.receiver.received_on("/t").len(), 2);

    // The address policy applies as to deliveries.
    let (outside, _) = env.endpoint_url(ACCOUNT_A, "https://10.255.255.1/hook", &["contact.created"]).await;
    let got = api.ok("webhooks-test", &a, json!({ "id": outside.id })).await;
    assert!(got["error"].as_str().unwrap().starts_with("refused by address policy"), "{got}");

    // The account's concurrency applies: with its one place held by a hanging test, another
    // waits briefly and is refused as rate limited.
    env.receiver.set_default("t", Reply::Hang);
    let hanging = tokio::spawn({
        let (api, a, id) = (Api::new(&env), a.clone(), id.clone());
        async move { api.ok("webhooks-test", &a, json!({ "id": id })).await }
    });
    wait_for(Duration::from_secs(10), || async { env.receiver.received_on("/t").len() == 3 }).await;
    api.err("webhooks-test", &a, json!({ "id": id }), 429, "webhooks.rate_limited").await;
    let timed_out = hanging.await.unwrap();
    assert!(timed_out["error"].as_str().unwrap().starts_with("timeout"), "{timed_out}");

    // Another account's endpoint looks missing; bad ids are refused.
    api.err("webhooks-test", &jwt(ACCOUNT_B), json!({ "id": id }), 404, "webhooks.not_found").await;
    api.err("webhooks-test", &a, json!({ "id": "x" }), 400, "webhooks.invalid_id").await;
    api.err("webhooks-test", &a, json!({ "id": id, "url": "https://x" }), 400, "webhooks.invalid_request").await;
    wh.stop().await.unwrap();
}

/// A receiver down long enough for deliveries to fail: once it is back, `webhooks-recover`
/// sends each again under its old `webhook-id`, in row order, and a change of the same row
/// committed right after the recovery waits behind them (it would otherwise overtake them on
/// the fast path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_resends_failed_deliveries_under_their_ids_in_row_order() {
    let env = Env::new("history_recover").await;
    let mut wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = api
        .ok(
            "webhooks-create",
            &a,
            json!({ "url": env.receiver.url("r"), "events": ["contact.created", "contact.updated"] }),
        )
        .await;
    env.receiver.set_secret("r", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();

    // Down: three changes of two rows fail every attempt.
    env.receiver.set_default("r", Reply::Status(503));
    let (x, y) = ("90000000-0000-4000-8000-000000000001", "90000000-0000-4000-8000-000000000002");
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{x}', '{A}', 'x1')")).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'x2' WHERE id = '{x}'")).await;
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{y}', '{A}', 'y1')")).await;
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "failed").await == 3 }).await;
    let ids_of_failed: HashSet<String> = {
        let page = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id, "status": "failed" })).await;
        ids(&page).into_iter().collect()
    };

    // Days later (a restart: nothing of it is in memory), the receiver is back, and the
    // endpoint sends directly again (a change of another row goes out without the outbox).
    wh.stop().await.unwrap();
    wh = env.start(&auth_config()).await;
    env.receiver.set_default("r", Reply::Status(200));
    let direct = "walhook_deliveries_total{path=\"direct\"}";
    let mut n = 0;
    loop {
        let before = env.metric(direct).await;
        n += 1;
        env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'z{n}')")).await;
        wait_for(Duration::from_secs(30), || async {
            env.receiver
                .received()
                .iter()
                .any(|r| r.answered == 200 && r.json()["data"]["first_name"] == format!("z{n}"))
        })
        .await;
        if env.metric(direct).await > before {
            break;
        }
        assert!(n < 20, "the endpoint never went back to direct sending");
    }
    let down_until = env.receiver.count();
    // Recover, and at once another change of row x.
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let got = api.ok("webhooks-recover", &a, json!({ "id": id, "since": since })).await;
    assert_eq!(got, json!({ "recovered": 3 }));
    env.sql(&format!("UPDATE contacts SET first_name = 'x3' WHERE id = '{x}'")).await;
    let after =
        |rs: &[walhook::local::receiver::Received]| rs[down_until..].iter().filter(|r| r.answered == 200).count();
    env.receiver.wait_until(Duration::from_secs(30), |rs| after(rs) >= 4).await.expect("all four arrive");
    let sent: Vec<_> = env.receiver.received()[down_until..].iter().filter(|r| r.answered == 200).cloned().collect();
    let names = |row: &str| -> Vec<String> {
        sent.iter()
            .filter(|r| r.json()["data"]["id"] == row)
            .map(|r| r.json()["data"]["first_name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(x), ["x1", "x2", "x3"], "row x in commit order: the recovered ones before the later change");
    assert_eq!(names(y), ["y1"]);
    let resent: HashSet<String> =
        sent.iter().filter(|r| r.json()["data"]["first_name"] != "x3").map(|r| r.webhook_id.clone()).collect();
    assert_eq!(resent, ids_of_failed, "each recovered delivery keeps its webhook-id");
    assert!(sent.iter().all(|r| r.verified));
    wait_for(Duration::from_secs(30), || async { api.count_status(&a, &id, "failed").await == 0 }).await;
    // Nothing failed is left to recover; the attempts tell the whole story.
    assert_eq!(api.ok("webhooks-recover", &a, json!({ "id": id, "since": since })).await, json!({ "recovered": 0 }));
    let one = ids_of_failed.iter().next().unwrap();
    let attempts = api.ok("webhooks-attempts", &a, json!({ "delivery_id": one })).await;
    assert_eq!(attempts["attempts"][0]["http_status_code"], 200, "{attempts}");
    assert_eq!(attempts["attempts"][1]["http_status_code"], 503, "{attempts}");

    // Errors change nothing: bad windows, another account, an inactive endpoint.
    let bad = |body: Value, needle: &'static str| {
        let (api, a) = (&api, &a);
        async move {
            let msg = api.err("webhooks-recover", a, body, 400, "webhooks.invalid_request").await;
            assert!(msg.contains(needle), "{msg}");
        }
    };
    bad(json!({ "id": id }), "since").await;
    bad(json!({ "id": id, "since": "yesterday" }), "since").await;
    let empty = json!({ "id": id, "since": since, "until": "2000-01-01T00:00:00Z" });
    assert_eq!(api.ok("webhooks-recover", &a, empty).await, json!({ "recovered": 0 }), "an empty window");
    bad(json!({ "id": id, "since": since, "until": "soon" }), "until").await;
    api.err("webhooks-recover", &jwt(ACCOUNT_B), json!({ "id": id, "since": since }), 404, "webhooks.not_found").await;
    api.ok("webhooks-update", &a, json!({ "id": id, "is_active": false })).await;
    bad(json!({ "id": id, "since": since }), "inactive").await;
    wh.stop().await.unwrap();
}

/// Paging through 250 deliveries while new ones keep arriving: every one of the 250 is on
/// exactly one page, in history order; the new ones are newer than the first page, so they
/// shift nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_250_deliveries_while_new_ones_arrive_skips_none_and_repeats_none() {
    let env = Env::new("history_250").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let body = json!({ "url": env.receiver.url("p"), "events": ["contact.created"] });
    let created = api.ok("webhooks-create", &a, body).await;
    env.receiver.set_secret("p", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].as_str().unwrap().to_owned();
    // 250 in transactions of 10, 25 commits.
    for t in 0..25 {
        env.sql(&format!(
            "INSERT INTO contacts (account_id, first_name) SELECT '{A}', 'old' || i FROM generate_series({}, {}) i",
            t * 10,
            t * 10 + 9
        ))
        .await;
    }
    wait_for(Duration::from_secs(60), || async { api.count_status(&a, &id, "delivered").await == 100 }).await;
    let delivered_all = || async {
        let mut n = 0;
        let mut cursor = Value::Null;
        loop {
            let body = json!({ "endpoint_id": id, "limit": 100, "cursor": cursor });
            let page = api.ok("webhooks-deliveries", &a, body).await;
            n += ids(&page).len();
            cursor = page["next_cursor"].clone();
            if cursor.is_null() {
                return n;
            }
        }
    };
    wait_for(Duration::from_secs(60), || async { delivered_all().await == 250 }).await;

    // New rows every few milliseconds while a reader pages with an odd page size.
    let writer = {
        let url = env.url.clone();
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            for i in 0..200 {
                let q = format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'new{i}')");
                client.batch_execute(&q).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let body = json!({ "endpoint_id": id, "limit": 7, "cursor": cursor });
        let page = api.ok("webhooks-deliveries", &a, body).await;
        seen.extend(ids(&page));
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a delivery on two pages");
    let bodies: HashSet<String> = env
        .receiver
        .received()
        .iter()
        .filter(|r| r.json()["data"]["first_name"].as_str().is_some_and(|n| n.starts_with("old")))
        .map(|r| r.webhook_id.clone())
        .collect();
    assert_eq!(bodies.len(), 250);
    let old_seen = seen.iter().filter(|d| bodies.contains(*d)).count();
    assert_eq!(old_seen, 250, "every one of the 250 on a page");
    assert_eq!(
        seen.len() - old_seen,
        seen.iter().take(7).filter(|d| !bodies.contains(*d)).count(),
        "new ones only on the first page"
    );
    wh.stop().await.unwrap();
}
