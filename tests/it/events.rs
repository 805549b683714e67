//! Each of the twelve events, end to end: a committed CRM row change reaches the subscribed
//! endpoint as a signed `{event, timestamp, data}` body, and nothing else does.

use std::time::Duration;

use crate::common::{Env, ACCOUNT_A};

/// Writes `setup` (not subscribed), then `action`, and expects exactly one `event` webhook.
async fn one_event(
    name: &str,
    event: &str,
    setup: impl AsRef<str>,
    action: impl AsRef<str>,
    check: impl Fn(&serde_json::Value),
) {
    let env = Env::new(name).await;
    env.endpoint(ACCOUNT_A, "hook", &[event]).await;
    let wh = env.start("").await;
    env.sql(setup.as_ref()).await;
    env.sql(action.as_ref()).await;
    let got = env
        .receiver
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await
        .unwrap_or_else(|r| panic!("no {event} webhook; got {r:?}"));
    // A wrong extra delivery has arrived (or is pending) once walhook is quiescent.
    env.quiescent().await;
    let got = if env.receiver.count() > got.len() { env.receiver.received() } else { got };
    assert_eq!(got.len(), 1, "exactly one {event}: {got:?}");
    let r = &got[0];
    assert!(r.verified, "signature must verify");
    assert_eq!(r.content_type, "application/json");
    assert!(r.user_agent.starts_with("walhook/"), "{}", r.user_agent);
    let body = r.json();
    assert_eq!(body["event"], event);
    let ts = body["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    assert_eq!(body["data"]["account_id"], ACCOUNT_A.to_string());
    check(&body["data"]);
    wh.stop().await.unwrap();
}

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

macro_rules! event_test {
    ($fn:ident, $event:literal, $setup:expr, $action:expr, $check:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $fn() {
            one_event(stringify!($fn), $event, $setup, $action, $check).await;
        }
    };
}

fn ins(table: &str, id: &str, cols: &str, vals: &str) -> String {
    format!("INSERT INTO {table} (id, account_id, {cols}) VALUES ('{id}', '{A}', {vals})")
}

const ID: &str = "10000000-0000-4000-8000-000000000001";

event_test!(contact_created, "contact.created", "", ins("contacts", ID, "first_name", "'Jane'"), |d| assert_eq!(
    d["first_name"],
    "Jane"
));
event_test!(
    contact_updated,
    "contact.updated",
    ins("contacts", ID, "first_name", "'Jane'"),
    format!("UPDATE contacts SET first_name = 'Janet' WHERE id = '{ID}'"),
    |d| assert_eq!(d["first_name"], "Janet")
);
event_test!(
    contact_deleted,
    "contact.deleted",
    ins("contacts", ID, "first_name", "'Jane'"),
    format!("DELETE FROM contacts WHERE id = '{ID}'"),
    |d| {
        assert_eq!(d["id"], ID);
        assert_eq!(d["first_name"], "Jane", "a delete carries the whole old row");
    }
);
event_test!(company_created, "company.created", "", ins("companies", ID, "name", "'Acme'"), |d| assert_eq!(
    d["name"],
    "Acme"
));
event_test!(
    company_updated,
    "company.updated",
    ins("companies", ID, "name", "'Acme'"),
    format!("UPDATE companies SET name = 'Acme 2' WHERE id = '{ID}'"),
    |d| assert_eq!(d["name"], "Acme 2")
);
event_test!(
    company_deleted,
    "company.deleted",
    ins("companies", ID, "name", "'Acme'"),
    format!("DELETE FROM companies WHERE id = '{ID}'"),
    |d| assert_eq!(d["name"], "Acme")
);
event_test!(activity_created, "activity.created", "", ins("activities", ID, "subject", "'Call'"), |d| assert_eq!(
    d["kind"],
    "note"
));
event_test!(
    activity_updated,
    "activity.updated",
    ins("activities", ID, "subject", "'Call'"),
    format!("UPDATE activities SET completed = true WHERE id = '{ID}'"),
    |d| assert_eq!(d["completed"], true)
);
event_test!(
    activity_deleted,
    "activity.deleted",
    ins("activities", ID, "subject", "'Call'"),
    format!("DELETE FROM activities WHERE id = '{ID}'"),
    |d| assert_eq!(d["subject"], "Call")
);
event_test!(
    project_created,
    "project.created",
    "",
    ins("projects", ID, "name, budget", "'Launch', 1000.50"),
    |d| assert_eq!(d["budget"], serde_json::json!(1000.50))
);
event_test!(
    project_updated,
    "project.updated",
    ins("projects", ID, "name", "'Launch'"),
    format!("UPDATE projects SET status = 'done' WHERE id = '{ID}'"),
    |d| assert_eq!(d["status"], "done")
);
event_test!(
    project_deleted,
    "project.deleted",
    ins("projects", ID, "name", "'Launch'"),
    format!("DELETE FROM projects WHERE id = '{ID}'"),
    |d| assert_eq!(d["name"], "Launch")
);

/// Under the documented alternative identity (an index on `(id, account_id)`), PostgreSQL does
/// not repeat an unchanged large value in an update: the body says which columns it leaves out
/// and why, never silently; under REPLICA IDENTITY FULL the body is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_under_an_index_identity_names_the_unchanged_large_value_it_leaves_out() {
    let env = Env::new("events_index_identity_toast").await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created", "contact.updated"]).await;
    let wh = env.start("").await;
    for (identity, id) in [
        ("USING INDEX contacts_id_account", "98000000-0000-4000-8000-000000000001"),
        ("FULL", "98000000-0000-4000-8000-000000000002"),
    ] {
        env.sql(&format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS contacts_id_account ON contacts (id, account_id);
             ALTER TABLE contacts REPLICA IDENTITY {identity};
             INSERT INTO contacts (id, account_id, first_name, custom_fields)
               VALUES ('{id}', '{A}', 'big', jsonb_build_object('notes',
                 (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 2100))));
             UPDATE contacts SET first_name = 'renamed' WHERE id = '{id}';"
        ))
        .await;
        let updated = |rs: &[walhook::local::receiver::Received]| {
            rs.iter().map(|r| r.json()).find(|j| j["data"]["id"] == id && j["event"] == "contact.updated")
        };
        let got = env.receiver.wait_until(Duration::from_secs(20), |rs| updated(rs).is_some()).await;
        let body = updated(&got.expect("the update arrives")).unwrap();
        assert_eq!(body["data"]["first_name"], "renamed");
        if identity == "FULL" {
            assert!(body["data"]["custom_fields"]["notes"].as_str().unwrap().len() > 64 * 1024, "whole under FULL");
            assert!(body.get("omitted").is_none(), "{body}");
        } else {
            assert!(body["data"].get("custom_fields").is_none(), "not in the stream, not invented");
            assert_eq!(body["omitted"]["reason"], "unchanged_toast", "{body}");
            assert_eq!(body["omitted"]["columns"], serde_json::json!(["custom_fields"]), "{body}");
        }
    }
    wh.stop().await.unwrap();
}
