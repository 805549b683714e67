//! Column values become the JSON the CRM's API uses, whatever the table's shape and the
//! server's TimeZone, and unchanged TOASTed values are filled in or left out, never null.

use std::time::Duration;

use crate::common::{Env, ACCOUNT_A};
use serde_json::json;

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_maps_to_the_api_json() {
    let env = Env::new("types_mapping").await;
    env.sql(
        "ALTER DATABASE types_mapping SET timezone = 'Asia/Kolkata';
         CREATE DOMAIN short_code AS varchar(8);
         ALTER TABLE contacts ADD COLUMN doomed int;
         ALTER TABLE contacts
           ADD COLUMN c_small smallint, ADD COLUMN c_big bigint, ADD COLUMN c_real real,
           ADD COLUMN c_double double precision, ADD COLUMN c_num numeric, ADD COLUMN c_nan numeric,
           ADD COLUMN c_inf double precision, ADD COLUMN c_json json, ADD COLUMN c_ts timestamp,
           ADD COLUMN c_tstz timestamptz, ADD COLUMN c_tstz_whole timestamptz, ADD COLUMN c_time time,
           ADD COLUMN c_interval interval, ADD COLUMN c_bytea bytea, ADD COLUMN c_int2d int[],
           ADD COLUMN c_uuids uuid[], ADD COLUMN c_jsonbs jsonb[], ADD COLUMN c_tstzs timestamptz[],
           ADD COLUMN c_enum activity_kind, ADD COLUMN c_enums activity_kind[], ADD COLUMN c_domain short_code,
           ADD COLUMN c_char char(3), ADD COLUMN c_inet inet, ADD COLUMN c_empty text[], ADD COLUMN c_null text,
           ADD COLUMN c_bool_arr boolean[], ADD COLUMN c_num_arr numeric[];
         ALTER TABLE contacts DROP COLUMN doomed;",
    )
    .await;
    env.endpoint(ACCOUNT_A, "hook", &["contact.created"]).await;
    let wh = env.start("").await;
    env.sql(&format!(
        r#"INSERT INTO contacts (id, account_id, first_name, tags, custom_fields, birthday, lead_score,
             lifetime_value, is_subscribed, created_at,
             c_small, c_big, c_real, c_double, c_num, c_nan, c_inf, c_json, c_ts, c_tstz, c_tstz_whole,
             c_time, c_interval, c_bytea, c_int2d, c_uuids, c_jsonbs, c_tstzs, c_enum, c_enums, c_domain,
             c_char, c_inet, c_empty, c_null, c_bool_arr, c_num_arr)
           VALUES ('20000000-0000-4000-8000-000000000002', '{A}', E'Zoë "Q" O''Neil\n\ttab\\',
             ARRAY['vip', 'has space', 'quo"te', 'back\slash', NULL, 'NULL', 'comma,inside', '{{brace}}'],
             '{{"nested": {{"a": [1, 2.5, null, "x"]}}, "emoji": "🦀"}}', '1990-04-01', -42,
             1234.50, false, '2025-06-15 14:30:00.123456+00',
             -32768, 9007199254740993, 1.5, 0.1, 12345678901234567890.123456789, 'NaN', 'Infinity',
             '{{"raw":   "json kept as written"}}', '2025-06-15 14:30:00.5',
             '2025-06-15 20:00:00.25+05:30', '2025-01-01 00:00:00-08',
             '13:45:00', '1 day 02:03:04', '\xdeadbeef', '{{{{1,2}},{{3,NULL}}}}',
             ARRAY['30000000-0000-4000-8000-000000000003'::uuid], ARRAY['{{"k": 1}}'::jsonb, '[true]'],
             ARRAY['2025-06-15 14:30:00+00'::timestamptz], 'call', ARRAY['email', 'task']::activity_kind[],
             'ABC', 'ab', '10.1.2.3/32', '{{}}', NULL, ARRAY[true, false, NULL], ARRAY[1.50, -2])"#
    ))
    .await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("webhook");
    let d = &got[0].json()["data"];
    let expect = [
        ("id", json!("20000000-0000-4000-8000-000000000002")),
        ("first_name", json!("Zoë \"Q\" O'Neil\n\ttab\\")),
        ("tags", json!(["vip", "has space", "quo\"te", "back\\slash", null, "NULL", "comma,inside", "{brace}"])),
        ("custom_fields", json!({"nested": {"a": [1, 2.5, null, "x"]}, "emoji": "🦀"})),
        ("birthday", json!("1990-04-01")),
        ("lead_score", json!(-42)),
        ("lifetime_value", json!(1234.50)),
        ("is_subscribed", json!(false)),
        ("created_at", json!("2025-06-15T14:30:00.123456Z")),
        ("last_contacted_at", json!(null)),
        ("c_small", json!(-32768)),
        ("c_real", json!(1.5)),
        ("c_double", json!(0.1)),
        ("c_nan", json!("NaN")),
        ("c_inf", json!("Infinity")),
        ("c_json", json!({"raw": "json kept as written"})),
        ("c_ts", json!("2025-06-15T14:30:00.5")),
        ("c_tstz", json!("2025-06-15T14:30:00.25Z")),
        ("c_tstz_whole", json!("2025-01-01T08:00:00Z")),
        ("c_time", json!("13:45:00")),
        ("c_interval", json!("1 day 02:03:04")),
        ("c_bytea", json!("\\xdeadbeef")),
        ("c_int2d", json!([[1, 2], [3, null]])),
        ("c_uuids", json!(["30000000-0000-4000-8000-000000000003"])),
        ("c_jsonbs", json!([{"k": 1}, [true]])),
        ("c_tstzs", json!(["2025-06-15T14:30:00Z"])),
        ("c_enum", json!("call")),
        ("c_enums", json!(["email", "task"])),
        ("c_domain", json!("ABC")),
        ("c_char", json!("ab ")),
        ("c_inet", json!("10.1.2.3")),
        ("c_empty", json!([])),
        ("c_null", json!(null)),
        ("c_bool_arr", json!([true, false, null])),
        ("c_num_arr", json!([1.50, -2])),
    ];
    for (col, want) in expect {
        assert_eq!(d[col], want, "column {col} in {d}");
    }
    // Numbers keep every digit Postgres printed.
    let raw = String::from_utf8_lossy(&got[0].body).into_owned();
    assert!(raw.contains("\"c_big\":9007199254740993"), "{raw}");
    assert!(raw.contains("\"c_num\":12345678901234567890.123456789"), "{raw}");
    assert!(raw.contains("\"lifetime_value\":1234.50"), "{raw}");
    assert!(d.get("doomed").is_none(), "dropped columns are not sent");
    let cols: Vec<&String> = d.as_object().unwrap().keys().collect();
    assert_eq!(cols.len(), 17 + 27, "every column of the row: {cols:?}");
    wh.stop().await.unwrap();
}

/// A value big enough to be stored out of line (TOAST).
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_filled_from_the_old_row_with_replica_identity_full() {
    let env = Env::new("toast_full").await;
    env.endpoint(ACCOUNT_A, "hook", &["activity.updated"]).await;
    env.sql(&format!(
        "INSERT INTO activities (id, account_id, subject, body) VALUES ('40000000-0000-4000-8000-000000000004', '{A}', 'big', {BIG})"
    ))
    .await;
    let wh = env.start("").await;
    env.sql("UPDATE activities SET completed = true WHERE subject = 'big'").await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("webhook");
    let d = &got[0].json()["data"];
    assert_eq!(d["completed"], true);
    assert_eq!(d["body"].as_str().map(str::len), Some(4000 * 32), "body filled from the old row image");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_without_an_old_row_is_left_out_not_null() {
    let env = Env::new("toast_index").await;
    // An identity that keeps account_id (so deletes stay routable) but not the whole row.
    env.sql(
        "CREATE UNIQUE INDEX activities_ident ON activities (id, account_id);
         ALTER TABLE activities REPLICA IDENTITY USING INDEX activities_ident;",
    )
    .await;
    env.endpoint(ACCOUNT_A, "hook", &["activity.updated", "activity.deleted"]).await;
    env.sql(&format!(
        "INSERT INTO activities (id, account_id, subject, body) VALUES ('40000000-0000-4000-8000-000000000004', '{A}', 'big', {BIG})"
    ))
    .await;
    let wh = env.start("").await;
    env.sql("UPDATE activities SET completed = true WHERE subject = 'big'").await;
    env.sql("DELETE FROM activities WHERE subject = 'big'").await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await.expect("webhooks");
    let updated = got.iter().map(|r| r.json()).find(|b| b["event"] == "activity.updated").unwrap();
    let d = &updated["data"];
    assert_eq!(d["completed"], true);
    assert!(d.get("body").is_none(), "an unchanged TOAST value with no old image is left out: {d}");
    assert_eq!(d["subject"], "big");
    let deleted = got.iter().map(|r| r.json()).find(|b| b["event"] == "activity.deleted").unwrap();
    let mut keys: Vec<&String> = deleted["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["account_id", "id"], "an index identity delete carries its key columns only");
    wh.stop().await.unwrap();
}
