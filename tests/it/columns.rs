//! Changed-column filters (`update_columns`): an update reaches a filtered endpoint only when
//! one of the listed columns changed; created, deleted and other tables pass; bad names are
//! refused and change nothing; a filter changed while rows wait, or before a replay, filters
//! each row as of its commit.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use walhook::admin::endpoints::{Caller, EndpointPatch, Endpoints};
use walhook::local::receiver::{Received, Reply};
use walhook::security::secrets::SecretBox;
use walhook::security::ssrf::AddressPolicy;

use crate::api::{auth_config, jwt, Api};
use crate::common::{Env, Readiness, ACCOUNT_A, ACCOUNT_B, USER};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";
const EVENTS: [&str; 4] = ["contact.created", "contact.updated", "contact.deleted", "company.updated"];

/// What reached `path` answered 200, once per `webhook-id`, in arrival order.
fn answered(rs: &[Received], path: &str) -> Vec<Received> {
    let mut seen = std::collections::HashSet::new();
    rs.iter().filter(|r| r.path == path && r.answered == 200 && seen.insert(r.webhook_id.clone())).cloned().collect()
}

/// `event first_name email` of each request.
fn summary(rs: &[Received]) -> Vec<String> {
    rs.iter()
        .map(|r| {
            let b = r.json();
            let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
            format!("{} {} {}", s(&b["event"]), s(&b["data"]["first_name"]), s(&b["data"]["email"]))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_reaches_a_filtered_endpoint_only_when_a_listed_column_changed() {
    let env = Env::new("columns_filter").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    for (path, filter) in [("f", json!({ "contacts": ["email", "lead_score"] })), ("all", Value::Null)] {
        let body = json!({ "url": env.receiver.url(path), "events": EVENTS, "update_columns": filter });
        let created = api.ok("webhooks-create", &a, body).await;
        assert_eq!(created["endpoint"]["update_columns"], filter);
        env.receiver.set_secret(path, created["signing_secret"].as_str().unwrap());
    }
    let (c, co) = ("94000000-0000-4000-8000-000000000001", "94000000-0000-4000-8000-000000000002");
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name, email) VALUES ('{c}', '{A}', 'n0', 'e0')"))
        .await;
    env.sql(&format!("INSERT INTO companies (id, account_id, name) VALUES ('{co}', '{A}', 'Acme')")).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'n1' WHERE id = '{c}'")).await;
    env.sql(&format!("UPDATE contacts SET email = 'e2' WHERE id = '{c}'")).await;
    env.sql(&format!("UPDATE contacts SET lead_score = 7, first_name = 'n3' WHERE id = '{c}'")).await;
    env.sql(&format!("UPDATE contacts SET lead_score = 7 WHERE id = '{c}'")).await;
    env.sql(&format!("UPDATE companies SET name = 'Acme 2' WHERE id = '{co}'")).await;
    env.sql(&format!("DELETE FROM contacts WHERE id = '{c}'")).await;
    // The delete comes last in the row's order: once it is there, every update before it is.
    let rs = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| {
            ["/f", "/all"].iter().all(|p| {
                answered(rs, p).iter().any(|r| r.json()["event"] == "contact.deleted")
                    && answered(rs, p).iter().any(|r| r.json()["event"] == "company.updated")
            })
        })
        .await
        .unwrap_or_else(|rs| panic!("{:?}", summary(&rs)));
    let contacts = |p: &str| -> Vec<String> {
        summary(&answered(&rs, p).into_iter().filter(|r| r.json()["data"]["id"] == c).collect::<Vec<_>>())
    };
    assert_eq!(
        contacts("/all"),
        [
            "contact.created n0 e0",
            "contact.updated n1 e0",
            "contact.updated n1 e2",
            "contact.updated n3 e2",
            "contact.updated n3 e2",
            "contact.deleted n3 e2"
        ]
    );
    assert_eq!(
        contacts("/f"),
        ["contact.created n0 e0", "contact.updated n1 e2", "contact.updated n3 e2", "contact.deleted n3 e2"],
        "only updates changing email or lead_score (setting lead_score to its own value changes nothing)"
    );
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tables_and_columns_are_refused_by_name_and_change_nothing() {
    let env = Env::new("columns_refused").await;
    let wh = env.start(&auth_config()).await;
    let (api, a, b) = (Api::new(&env), jwt(ACCOUNT_A), jwt(ACCOUNT_B));
    let create = |filter: Value| json!({ "url": env.receiver.url("r"), "events": EVENTS, "update_columns": filter });
    for (filter, named) in [
        (json!({ "deals": ["stage"] }), vec!["deals"]),
        (json!({ "contacts": ["email", "emial", "nope"] }), vec!["emial", "nope"]),
        (json!({ "contacts": [] }), vec!["contacts"]),
        (json!({ "contacts": "email" }), vec!["contacts"]),
        (json!({ "contacts": [7] }), vec!["contacts"]),
        (json!(["contacts"]), vec!["update_columns"]),
    ] {
        let msg = api.err("webhooks-create", &a, create(filter.clone()), 400, "webhooks.invalid_request").await;
        assert!(named.iter().all(|n| msg.contains(n)), "{filter}: {msg}");
    }
    let listed = api.ok("webhooks-list", &a, json!({})).await;
    assert_eq!(listed["endpoints"].as_array().unwrap().len(), 0, "no refused create wrote anything");

    let created = api.ok("webhooks-create", &a, create(json!({ "contacts": ["email"] }))).await;
    let id = created["endpoint"]["id"].clone();
    let before = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    let msg = api
        .err(
            "webhooks-update",
            &a,
            json!({ "id": id, "update_columns": { "projects": ["budget", "vibes"] }, "description": "x" }),
            400,
            "webhooks.invalid_request",
        )
        .await;
    assert!(msg.contains("vibes") && msg.contains("projects"), "{msg}");
    assert_eq!(api.ok("webhooks-get", &a, json!({ "id": id })).await, before, "a refused update changes nothing");
    api.err("webhooks-update", &b, json!({ "id": id, "update_columns": null }), 404, "webhooks.not_found").await;
    // Omitted keeps the filter, a new one replaces it, null removes it.
    let kept = api.ok("webhooks-update", &a, json!({ "id": id, "description": "kept" })).await;
    assert_eq!(kept["endpoint"]["update_columns"], json!({ "contacts": ["email"] }));
    let set = json!({ "contacts": ["lead_score", "email", "lead_score"], "projects": ["status"] });
    let replaced = api.ok("webhooks-update", &a, json!({ "id": id, "update_columns": set })).await;
    assert_eq!(
        replaced["endpoint"]["update_columns"],
        json!({ "contacts": ["lead_score", "email"], "projects": ["status"] }),
        "duplicates dropped"
    );
    let removed = api.ok("webhooks-update", &a, json!({ "id": id, "update_columns": null })).await;
    assert!(removed["endpoint"]["update_columns"].is_null());
    let emptied = api.ok("webhooks-update", &a, json!({ "id": id, "update_columns": {} })).await;
    assert!(emptied["endpoint"]["update_columns"].is_null(), "{{}} is no filter");
    wh.stop().await.unwrap();
}

fn endpoints(env: &Env) -> Endpoints {
    Endpoints::new(env.db.clone(), SecretBox::new(None).unwrap(), AddressPolicy::new(vec![]), "public")
}

async fn set_filter(env: &Env, id: Uuid, filter: Value) {
    let patch = EndpointPatch { update_columns: Some(filter), ..Default::default() };
    endpoints(env).update(Caller { account_id: ACCOUNT_A, user_id: USER }, id, patch).await.expect("filter set");
}

const SLOW: &str = "[dispatch]\nrequest_timeout = \"60s\"\nspill_after = \"60s\"\n";

/// A filter changed while rows wait in the slot: each update is filtered as of its commit,
/// on the first pass and on a replay after kill -9 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_changed_while_rows_wait_filters_each_row_as_of_its_commit() {
    let env = Env::new("columns_as_of_commit").await;
    let e = env.endpoint(ACCOUNT_A, "e", &EVENTS).await;
    env.endpoint(ACCOUNT_A, "w", &["company.created"]).await;
    set_filter(&env, e.id, json!({ "contacts": ["email"] })).await;
    // The first attempt hangs, so nothing of the row is confirmed when walhook dies.
    env.receiver.script("e", vec![Reply::Hang]);
    let mut first = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    let c = "95000000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name, email) VALUES ('{c}', '{A}', 'n0', 'e0')"))
        .await;
    env.receiver.wait_until(Duration::from_secs(30), |rs| rs.len() == 1).await.expect("the first attempt hangs");
    env.sql(&format!("UPDATE contacts SET email = 'e1' WHERE id = '{c}'")).await; // passes the email filter
    env.sql(&format!("UPDATE contacts SET first_name = 'n1' WHERE id = '{c}'")).await; // filtered out
    set_filter(&env, e.id, json!({ "contacts": ["first_name"] })).await;
    env.sql(&format!("UPDATE contacts SET first_name = 'n2' WHERE id = '{c}'")).await; // passes first_name
    env.sql(&format!("UPDATE contacts SET email = 'e3' WHERE id = '{c}'")).await; // filtered out
                                                                                  // Once W has a later row, the first walhook has read the filter change and everything before.
    let co = "95000000-0000-4000-8000-000000000002";
    env.sql(&format!("INSERT INTO companies (id, account_id, name) VALUES ('{co}', '{A}', 'later')")).await;
    env.receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.path == "/w"))
        .await
        .expect("W gets the later row");
    first.kill9();
    // The replay reads all of it again, with today's filter being first_name.
    let mut second = env.spawn_binary(SLOW);
    env.ready(Readiness::Streaming).await;
    env.sql(&format!("DELETE FROM contacts WHERE id = '{c}'")).await;
    let rs = env
        .receiver
        .wait_until(Duration::from_secs(60), |rs| {
            answered(rs, "/e").iter().any(|r| r.json()["event"] == "contact.deleted")
        })
        .await
        .unwrap_or_else(|rs| panic!("{:?}\n{}", summary(&rs), second.log_text()));
    assert_eq!(
        summary(&answered(&rs, "/e")),
        ["contact.created n0 e0", "contact.updated n0 e1", "contact.updated n2 e1", "contact.deleted n2 e3"],
        "each update filtered as of its commit"
    );
    second.sigterm();
    assert!(second.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}

/// The OpenAPI document lists the Driftwood CRM's columns for `update_columns`: exactly those
/// of the sample schema (what the API accepts there, since names are checked against it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_columns_are_the_crms() {
    let env = Env::new("columns_documented").await;
    let doc: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let tables = &doc["components"]["schemas"]["UpdateColumns"]["properties"];
    for table in ["contacts", "companies", "activities", "projects"] {
        let documented: Vec<String> = tables[table]["items"]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{table} documented"))
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        let client = env.db.get().await.unwrap();
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                &[&table],
            )
            .await
            .unwrap();
        let actual: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(documented, actual, "{table}");
    }
}

/// A filter names columns, not their history: after the CRM renames a filtered column the
/// filter never matches, walhook's log says so (naming endpoint and column), and setting the
/// filter again with the new name brings the updates back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_column_stops_its_filter_loudly_until_the_filter_is_set_again() {
    let env = Env::new("columns_renamed").await;
    let mut wh = env.spawn_binary(&auth_config());
    env.ready(Readiness::Streaming).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let body = json!({ "url": env.receiver.url("f"), "events": EVENTS, "update_columns": { "contacts": ["email"] } });
    let created = api.ok("webhooks-create", &a, body).await;
    env.receiver.set_secret("f", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].clone();
    let c = "98000000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name, email) VALUES ('{c}', '{A}', 'n0', 'e0')"))
        .await;
    env.sql("ALTER TABLE contacts RENAME COLUMN email TO email_address").await;
    env.sql(&format!("UPDATE contacts SET email_address = 'e1' WHERE id = '{c}'")).await;
    // Set again with the new name: the next change of it arrives; the delete closes the row.
    let set = json!({ "id": id, "update_columns": { "contacts": ["email_address"] } });
    api.ok("webhooks-update", &a, set).await;
    env.sql(&format!("UPDATE contacts SET email_address = 'e2' WHERE id = '{c}'")).await;
    env.sql(&format!("DELETE FROM contacts WHERE id = '{c}'")).await;
    let rs = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| {
            answered(rs, "/f").iter().any(|r| r.json()["event"] == "contact.deleted")
        })
        .await
        .unwrap_or_else(|rs| panic!("{:?}\n{}", summary(&rs), wh.log_text()));
    let got: Vec<String> = answered(&rs, "/f")
        .iter()
        .map(|r| format!("{} {}", r.json()["event"].as_str().unwrap(), r.json()["data"]["email_address"]))
        .collect();
    assert_eq!(got, ["contact.created null", "contact.updated \"e2\"", "contact.deleted \"e2\""]);
    let log = wh.log_text();
    assert!(
        log.lines().any(|l| l.contains("no longer has") && l.contains(id.as_str().unwrap()) && l.contains("email")),
        "the log names the endpoint and the column:\n{log}"
    );
    wh.sigterm();
    assert!(wh.wait_exit(Duration::from_secs(30)).await.expect("exits").success());
}
