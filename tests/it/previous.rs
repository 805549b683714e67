//! `previous` in `*.updated` bodies, end to end: under REPLICA IDENTITY FULL (what `walhook
//! migrate` sets on every CRM table by default) an update carries the old values of exactly
//! the columns it changed, encoded as `data` encodes them; an unchanged large (TOASTed) value
//! never counts as changed; without the old row (an identity that is not FULL) there is no
//! `previous`. And `walhook migrate` leaves a table's identity alone only when told to.

use std::time::Duration;

use serde_json::{json, Value};
use walhook::local::receiver::Received;

use crate::common::{cluster, Env, ACCOUNT_A};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// The JSON bodies of `event` for row `id` that arrived so far, in arrival order.
fn bodies(rs: &[Received], event: &str, id: &str) -> Vec<Value> {
    rs.iter().map(Received::json).filter(|j| j["event"] == event && j["data"]["id"] == id).collect()
}

/// Waits until `n` bodies of `event` for row `id` have arrived; returns them with their raw
/// text.
async fn wait_bodies(env: &Env, event: &str, id: &str, n: usize) -> Vec<(Value, String)> {
    let got = env
        .receiver
        .wait_until(Duration::from_secs(20), |rs| bodies(rs, event, id).len() >= n)
        .await
        .unwrap_or_else(|rs| panic!("{n} × {event} of {id} did not arrive; got {rs:?}"));
    got.iter()
        .filter(|r| r.json()["event"] == event && r.json()["data"]["id"] == id)
        .map(|r| (r.json(), String::from_utf8_lossy(&r.body).into_owned()))
        .collect()
}

/// The relation's replica identity (`d`, `f`, `i`, `n`) of each CRM table, by name.
async fn identities(env: &Env) -> Vec<(String, String)> {
    env.client
        .query(
            "SELECT relname::text, relreplident::text FROM pg_class \
             WHERE relname IN ('companies', 'contacts', 'activities', 'projects') AND relkind = 'r' \
               AND relnamespace = 'public'::regnamespace ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_carries_the_old_values_of_exactly_the_columns_it_changed() {
    let env = Env::new("previous_every_type").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created", "contact.updated"]).await;
    let wh = env.start("").await;
    let id = "50000000-0000-4000-8000-000000000001";
    env.sql(&format!(
        r#"INSERT INTO contacts (id, account_id, company_id, first_name, last_name, email, phone, title,
             lead_score, lifetime_value, is_subscribed, birthday, tags, custom_fields, last_contacted_at,
             created_at)
           VALUES ('{id}', '{A}', '60000000-0000-4000-8000-000000000001', 'Jane', 'Doe', 'jane@example.com',
             '+1 555 0100', NULL, 10, 1234.50, true, '1990-04-01', ARRAY['vip', 'has space'],
             '{{"plan": "pro", "seats": [1, 2]}}', '2025-06-15 20:00:00.25+05:30', '2025-01-01 00:00:00+00')"#
    ))
    .await;
    // Every type mapping of the table changes (uuid, text, varchar, NULL → text, integer,
    // numeric, boolean, date, text[], jsonb, timestamptz → NULL); last_name, email and the
    // timestamps created_at and updated_at do not.
    env.sql(&format!(
        r#"UPDATE contacts SET company_id = '60000000-0000-4000-8000-000000000002', first_name = 'Janet',
             phone = '+1 555 0199', title = 'CTO', lead_score = 11, lifetime_value = 99.99,
             is_subscribed = false, birthday = '1990-04-02', tags = ARRAY['vip'],
             custom_fields = '{{"plan": "team"}}', last_contacted_at = NULL
           WHERE id = '{id}'"#
    ))
    .await;
    // And an update that changes nothing.
    env.sql(&format!("UPDATE contacts SET first_name = 'Janet', lead_score = 11 WHERE id = '{id}'")).await;

    let created = wait_bodies(&env, "contact.created", id, 1).await.remove(0).0;
    let updates = wait_bodies(&env, "contact.updated", id, 2).await;
    let (body, raw) = &updates[0];
    let (old, new) = (created["data"].as_object().unwrap(), body["data"].as_object().unwrap());
    let previous = body["previous"].as_object().unwrap_or_else(|| panic!("no previous: {raw}"));
    // Exactly the columns whose value differs, each with its old value as `data` had it.
    let expected: serde_json::Map<String, Value> =
        old.iter().filter(|(col, value)| new.get(*col) != Some(value)).map(|(c, v)| (c.clone(), v.clone())).collect();
    assert_eq!(previous, &expected, "{raw}");
    let mut changed: Vec<&str> = previous.keys().map(String::as_str).collect();
    changed.sort();
    assert_eq!(
        changed,
        [
            "birthday",
            "company_id",
            "custom_fields",
            "first_name",
            "is_subscribed",
            "last_contacted_at",
            "lead_score",
            "lifetime_value",
            "phone",
            "tags",
            "title"
        ],
        "{raw}"
    );
    let want = [
        ("company_id", json!("60000000-0000-4000-8000-000000000001")),
        ("first_name", json!("Jane")),
        ("phone", json!("+1 555 0100")),
        ("title", json!(null)),
        ("lead_score", json!(10)),
        ("is_subscribed", json!(true)),
        ("birthday", json!("1990-04-01")),
        ("tags", json!(["vip", "has space"])),
        ("custom_fields", json!({"plan": "pro", "seats": [1, 2]})),
        ("last_contacted_at", json!("2025-06-15T14:30:00.25Z")),
    ];
    for (col, value) in want {
        assert_eq!(previous[col], value, "previous.{col} in {raw}");
    }
    // Numbers keep every digit, as in `data`; `previous` comes right after `data`, in table
    // order.
    assert!(
        raw.contains(r#","previous":{"company_id":"60000000-0000-4000-8000-000000000001","first_name":"Jane","#),
        "{raw}"
    );
    assert!(raw.contains(r#""lifetime_value":1234.50,"#), "{raw}");
    assert!(raw.ends_with("}}"), "{raw}");
    // Nothing changed: an empty previous.
    let (body, raw) = &updates[1];
    assert_eq!(body["previous"], json!({}), "{raw}");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_old_row_an_update_carries_no_previous() {
    let env = Env::new("previous_identity_default").await;
    // After migrate: an identity that keeps deletes routable (the primary key holds
    // account_id) but writes no old row for updates.
    env.sql(
        "ALTER TABLE contacts DROP CONSTRAINT contacts_pkey, ADD PRIMARY KEY (id, account_id);
         ALTER TABLE contacts REPLICA IDENTITY DEFAULT;",
    )
    .await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.updated"]).await;
    let wh = env.start("").await;
    let id = "50000000-0000-4000-8000-000000000002";
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name, lead_score) VALUES ('{id}', '{A}', 'Jane', 1);
         UPDATE contacts SET first_name = 'Janet', lead_score = 2 WHERE id = '{id}';"
    ))
    .await;
    let (body, raw) = wait_bodies(&env, "contact.updated", id, 1).await.remove(0);
    assert_eq!((body["data"]["first_name"].clone(), body["data"]["lead_score"].clone()), (json!("Janet"), json!(2)));
    assert!(body.get("previous").is_none(), "the old row is not in the stream: no previous: {raw}");
    assert!(body.get("omitted").is_none(), "{raw}");
    wh.stop().await.unwrap();
}

/// A value too big and too random to stay in the row: stored out of line (TOAST).
const BIG: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 2000))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_large_value_is_never_in_previous_and_stays_whole_in_data() {
    let env = Env::new("previous_toast").await;
    env.endpoint(ACCOUNT_A, "hook", &["activity.updated"]).await;
    let id = "50000000-0000-4000-8000-000000000003";
    env.sql(&format!("INSERT INTO activities (id, account_id, subject, body) VALUES ('{id}', '{A}', 'big', {BIG})"))
        .await;
    let stored = env.scalar_i64(&format!("SELECT pg_column_size(body)::int8 FROM activities WHERE id = '{id}'")).await;
    assert!(stored > 2048, "the value must be stored out of line: {stored} bytes");
    let big = env
        .client
        .query_one(&format!("SELECT body FROM activities WHERE id = '{id}'"), &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let wh = env.start("").await;
    env.sql(&format!("UPDATE activities SET completed = true, subject = 'renamed' WHERE id = '{id}'")).await;
    // Then the large value itself changes: now it is in previous, whole.
    env.sql(&format!("UPDATE activities SET body = 'short' WHERE id = '{id}'")).await;
    let updates = wait_bodies(&env, "activity.updated", id, 2).await;
    let (body, raw) = &updates[0];
    assert_eq!(body["previous"], json!({"completed": false, "subject": "big"}), "{raw}");
    assert_eq!(body["data"]["body"].as_str(), Some(big.as_str()), "data is whole under FULL");
    assert!(body.get("omitted").is_none());
    let (body, _) = &updates[1];
    assert_eq!(body["data"]["body"], "short");
    let previous = body["previous"].as_object().unwrap();
    assert_eq!(previous.keys().collect::<Vec<_>>(), ["body"]);
    assert_eq!(previous["body"].as_str(), Some(big.as_str()));
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sets_full_on_every_crm_table_unless_told_to_keep_identities() {
    let env = Env::unmigrated(cluster(), "previous_migrate_identity").await;
    // Identities whose deletes keep account_id: a primary key holding it, an identity index.
    env.sql(
        "ALTER TABLE contacts DROP CONSTRAINT contacts_pkey, ADD PRIMARY KEY (id, account_id);
         CREATE UNIQUE INDEX projects_ident ON projects (id, account_id);
         ALTER TABLE projects REPLICA IDENTITY USING INDEX projects_ident;",
    )
    .await;
    let keep = env.config("[replication]\nreplica_identity_full = false\n");
    let report = walhook::app::migrate(&env.db, &keep).await.expect("migrate").schema;
    assert_eq!(report.replica_identity_set, ["companies", "activities"].map(String::from).to_vec());
    let want = |c: &str, p: &str| {
        [("activities", "f"), ("companies", "f"), ("contacts", c), ("projects", p)]
            .map(|(t, i)| (t.to_owned(), i.to_owned()))
            .to_vec()
    };
    assert_eq!(identities(&env).await, want("d", "i"), "kept where deletes keep account_id");
    // The default: every CRM table FULL, and a second run changes nothing.
    let report = walhook::app::migrate(&env.db, &env.config("")).await.expect("migrate").schema;
    let mut set = report.replica_identity_set;
    set.sort();
    assert_eq!(set, ["contacts", "projects"]);
    assert_eq!(identities(&env).await, want("f", "f"));
    let again = walhook::app::migrate(&env.db, &env.config("")).await.expect("migrate").schema;
    assert!(again.replica_identity_set.is_empty(), "{:?}", again.replica_identity_set);
}
