//! The admin API, as a customer's integration sees it over HTTP: every operation, every error
//! code and status, authentication, tenant isolation, the secret shown once, and endpoint
//! changes reaching routing through the replication stream.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{Env, Readiness, ACCOUNT_A, ACCOUNT_B, USER};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use walhook::security::secrets::SecretBox;

const JWT_KEY: &str = "driftwood-test-signing-key-of-32-bytes-or-more";
pub(crate) const OPERATOR_TOKEN: &str = "op-token-7c1f0e9b2d";

pub(crate) fn auth_config() -> String {
    let sha = hex(&Sha256::digest(OPERATOR_TOKEN.as_bytes()));
    format!(
        "[auth]\njwt_hs256_secret = \"{JWT_KEY}\"\n\
         static_tokens = [{{ token_sha256 = \"{sha}\", account_id = \"{ACCOUNT_B}\", user_id = \"{USER}\" }}]\n"
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A Driftwood access token for `account`.
pub(crate) fn jwt(account: uuid::Uuid) -> String {
    token(json!({ "sub": USER.to_string(), "account_id": account.to_string(), "exp": now() + 600 }), JWT_KEY)
}

fn token(claims: Value, key: &str) -> String {
    encode(&Header::default(), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
}

pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub(crate) fn new(env: &Env) -> Api {
        Self::on_port(env.api_port)
    }

    /// The API of a walhook listening on `port` (a second process beside the test's first).
    pub(crate) fn on_port(port: u16) -> Api {
        Api { http: reqwest::Client::new(), base: format!("http://127.0.0.1:{port}/api") }
    }

    async fn raw(
        &self,
        op: &str,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req =
            self.http.post(format!("{}/{op}", self.base)).header("content-type", "application/json").body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")), headers)
    }

    pub(crate) async fn call(&self, op: &str, token: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self.raw(op, Some(token), body.to_string()).await;
        (s, v)
    }

    /// Expects success; returns `result`.
    pub(crate) async fn ok(&self, op: &str, token: &str, body: Value) -> Value {
        let (s, v) = self.call(op, token, body.clone()).await;
        assert_eq!(s, 200, "{op} {body}: {v}");
        assert_eq!(v["ok"], true);
        v["result"].clone()
    }

    /// How many of `endpoint`'s deliveries have `status` (up to 100), as its owner reads them
    /// (what a user waits on, not walhook's tables).
    pub(crate) async fn count_status(&self, token: &str, endpoint: &str, status: &str) -> usize {
        let body = json!({ "endpoint_id": endpoint, "status": status, "limit": 100 });
        self.ok("webhooks-deliveries", token, body).await["deliveries"].as_array().unwrap().len()
    }

    /// Expects the error envelope with `code` and `status`; returns the message.
    pub(crate) async fn err(&self, op: &str, token: &str, body: Value, status: u16, code: &str) -> String {
        let (s, v) = self.call(op, token, body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str().unwrap_or_default()), (status, code), "{op} {body}: {v}");
        assert_eq!(v["ok"], false);
        v["error"]["message"].as_str().unwrap().to_owned()
    }
}

fn create_body(env: &Env, path: &str) -> Value {
    json!({ "url": env.receiver.url(path), "description": "CRM sync", "events": ["contact.created", "contact.deleted"] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_update_delete_round_trip() {
    let env = Env::new("api_round_trip").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let created = api.ok("webhooks-create", &a, create_body(&env, "one")).await;
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let key = base64_decode(&secret["whsec_".len()..]);
    assert_eq!(key.len(), 32, "32 random bytes");
    let ep = &created["endpoint"];
    let id = ep["id"].as_str().unwrap().to_owned();
    assert_eq!(ep["account_id"], ACCOUNT_A.to_string());
    assert_eq!(ep["created_by"], USER.to_string());
    assert_eq!(ep["url"], env.receiver.url("one"));
    assert_eq!(ep["description"], "CRM sync");
    assert_eq!(ep["events"], json!(["contact.created", "contact.deleted"]));
    assert_eq!(ep["is_active"], true);
    assert!(
        secret.starts_with(ep["secret_prefix"].as_str().unwrap()) && ep["secret_prefix"].as_str().unwrap().len() < 16
    );
    let fields: HashSet<&str> = ep.as_object().unwrap().keys().map(String::as_str).collect();
    let page_fields: HashSet<&str> = [
        "id",
        "account_id",
        "created_by",
        "url",
        "description",
        "secret_prefix",
        "events",
        "is_active",
        "created_at",
        "updated_at",
    ]
    .into();
    // The page's fields, and exactly the ones the signing and payload work added (the Endpoint
    // schema of docs/openapi.json).
    let added: HashSet<&str> =
        ["signature_scheme", "public_key", "update_columns", "previous_secret_expires_at"].into();
    assert_eq!(fields, &page_fields | &added, "the endpoint object of the public page, and the added fields");
    assert_eq!((ep["signature_scheme"].as_str(), ep["public_key"].is_null()), (Some("v1"), true));
    assert!(ep["update_columns"].is_null() && ep["previous_secret_expires_at"].is_null());

    let got = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(got["endpoint"], *ep);
    let second = api.ok("webhooks-create", &a, create_body(&env, "two")).await;
    let listed = api.ok("webhooks-list", &a, json!({})).await;
    let ids: Vec<&str> = listed["endpoints"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second["endpoint"]["id"].as_str().unwrap(), id.as_str()], "newest first");

    let updated = api
        .ok(
            "webhooks-update",
            &a,
            json!({ "id": id, "description": "renamed", "is_active": false, "events": ["company.updated"] }),
        )
        .await;
    let u = &updated["endpoint"];
    assert_eq!(u["description"], "renamed");
    assert_eq!(u["is_active"], false);
    assert_eq!(u["events"], json!(["company.updated"]));
    assert_eq!(u["url"], ep["url"], "fields not given stay");
    assert!(u["updated_at"].as_str() > ep["updated_at"].as_str(), "updated_at moves");
    assert_eq!(u["created_at"], ep["created_at"]);

    for body in [got, listed, updated] {
        assert!(!body.to_string().contains(&secret), "the secret is shown only at creation");
    }
    assert_eq!(api.ok("webhooks-delete", &a, json!({ "id": id })).await, json!({ "id": id, "deleted": true }));
    api.err("webhooks-get", &a, json!({ "id": id }), 404, "webhooks.not_found").await;
    api.err("webhooks-delete", &a, json!({ "id": id }), 404, "webhooks.not_found").await;
    wh.stop().await.unwrap();
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_and_status_and_a_failed_request_writes_nothing() {
    let env = Env::new("api_errors").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let count = || async { env.scalar_i64("SELECT count(*) FROM walhook.endpoints").await };
    let url = env.receiver.url("x");
    let ev = json!(["contact.created"]);

    let (s, v, _) = api.raw("webhooks-create", Some(&a), "{not json").await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (400, "webhooks.invalid_request"));
    let (s, v, _) = api.raw("webhooks-create", Some(&a), "[1, 2]").await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (400, "webhooks.invalid_request"));
    let cases = [
        (json!({ "url": url, "events": ev, "colour": "red" }), "colour"),
        (json!({ "url": url, "events": "contact.created" }), "events"),
        (json!({ "url": url, "events": [7] }), "events[0]"),
        (json!({ "url": url, "events": ["contact.exploded"] }), "contact.exploded"),
        (json!({ "url": url, "events": [] }), "events"),
        (json!({ "url": url }), "events"),
        (json!({ "url": url, "events": ev, "description": "d".repeat(501) }), "description"),
        (json!({ "url": 5, "events": ev }), "url"),
    ];
    for (body, field) in cases {
        let msg = api.err("webhooks-create", &a, body, 400, "webhooks.invalid_request").await;
        assert!(msg.contains(field), "message names {field}: {msg}");
    }
    let (s, v, _) = api
        .raw(
            "webhooks-create",
            Some(&a),
            format!("{{\"url\": \"{url}\", \"description\": \"{}\"}}", "x".repeat(70_000)),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (413, "webhooks.invalid_request"));

    api.err("webhooks-create", &a, json!({ "events": ev }), 400, "webhooks.url_required").await;
    api.err("webhooks-create", &a, json!({ "url": "  ", "events": ev }), 400, "webhooks.url_required").await;
    for bad in [
        "http://example.com/hook",
        "ftp://example.com/hook",
        "not a url",
        "https://",
        "https://user:pass@example.com/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[fd00:ec2::254]/",
        "https://167772161/",
        "https://100.64.0.1/",
    ] {
        api.err("webhooks-create", &a, json!({ "url": bad, "events": ev }), 400, "webhooks.invalid_url").await;
    }
    let long = format!("https://example.com/{}", "a".repeat(2048));
    api.err("webhooks-create", &a, json!({ "url": long, "events": ev }), 400, "webhooks.invalid_url").await;
    assert_eq!(count().await, 0, "no failed create wrote anything");

    let id = api.ok("webhooks-create", &a, json!({ "url": url, "events": ev })).await["endpoint"]["id"].clone();
    api.err("webhooks-get", &a, json!({ "id": "not-a-uuid" }), 400, "webhooks.invalid_id").await;
    api.err("webhooks-get", &a, json!({}), 400, "webhooks.invalid_request").await;
    api.err("webhooks-get", &a, json!({ "id": uuid::Uuid::new_v4() }), 404, "webhooks.not_found").await;
    api.err("webhooks-update", &a, json!({ "id": id, "url": "http://plain" }), 400, "webhooks.invalid_url").await;
    api.err("webhooks-update", &a, json!({ "id": id, "url": "" }), 400, "webhooks.url_required").await;
    api.err("webhooks-update", &a, json!({ "id": id, "events": [] }), 400, "webhooks.invalid_request").await;
    api.err("webhooks-update", &a, json!({ "id": id, "is_active": "no" }), 400, "webhooks.invalid_request").await;
    let after = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(after["endpoint"]["url"], url, "a refused update changes nothing");
    api.err("webhooks-delete", &a, json!({ "id": 42 }), 400, "webhooks.invalid_request").await;
    api.err("webhooks-deliveries", &a, json!({ "endpoint_id": "nope" }), 400, "webhooks.invalid_id").await;
    for limit in [json!(0), json!(101), json!("ten"), json!(-1)] {
        api.err(
            "webhooks-deliveries",
            &a,
            json!({ "endpoint_id": id, "limit": limit }),
            400,
            "webhooks.invalid_request",
        )
        .await;
    }
    api.err("webhooks-list", &a, json!({ "page": 2 }), 400, "webhooks.invalid_request").await;

    // 401 without a valid bearer token, with a challenge.
    let (s, v, h) = api.raw("webhooks-list", None, "{}").await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (401, "auth.unauthorized"));
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    let (s, _, _) = api
        .http
        .post(format!("{}/webhooks-list", api.base))
        .header("authorization", format!("Basic {a}"))
        .body("{}")
        .send()
        .await
        .map(|r| (r.status().as_u16(), (), ()))
        .unwrap();
    assert_eq!(s, 401);

    // 500 without details when the database fails underneath.
    env.sql("ALTER TABLE walhook.endpoints RENAME TO endpoints_away").await;
    let msg = api.err("webhooks-list", &a, json!({}), 500, "webhooks.internal").await;
    assert_eq!(msg, "internal error", "no database detail leaks");
    env.sql("ALTER TABLE walhook.endpoints_away RENAME TO endpoints").await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_endpoint_does_not_exist_for_you() {
    let env = Env::new("api_tenants").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let b = OPERATOR_TOKEN; // acts for account B
    let id = api.ok("webhooks-create", &a, create_body(&env, "a")).await["endpoint"]["id"].clone();
    for (op, body) in [
        ("webhooks-get", json!({ "id": id })),
        ("webhooks-update", json!({ "id": id, "description": "hijacked" })),
        ("webhooks-delete", json!({ "id": id })),
        ("webhooks-deliveries", json!({ "endpoint_id": id })),
    ] {
        let msg = api.err(op, b, body, 404, "webhooks.not_found").await;
        assert!(!msg.contains(&ACCOUNT_A.to_string()));
    }
    assert_eq!(api.ok("webhooks-list", b, json!({})).await, json!({ "endpoints": [] }));
    let mine = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(mine["endpoint"]["description"], "CRM sync", "untouched by the other account");
    // The operator token creates in its own account.
    let theirs = api.ok("webhooks-create", b, create_body(&env, "b")).await;
    assert_eq!(theirs["endpoint"]["account_id"], ACCOUNT_B.to_string());
    assert_eq!(api.ok("webhooks-list", &a, json!({})).await["endpoints"].as_array().unwrap().len(), 1);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked() {
    let env = Env::new("api_tokens").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let ok_claims = |extra: Value| {
        let mut c = json!({ "sub": USER.to_string(), "account_id": ACCOUNT_A.to_string(), "exp": now() + 600 });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    api.ok("webhooks-list", &token(ok_claims(json!({})), JWT_KEY), json!({})).await;
    let hs256 = hmac_signed(r#"{"alg":"HS256","typ":"JWT"}"#, &ok_claims(json!({})).to_string(), JWT_KEY);
    api.ok("webhooks-list", &hs256, json!({})).await;
    api.ok("webhooks-list", OPERATOR_TOKEN, json!({})).await;
    let refused = [
        token(ok_claims(json!({ "exp": now() - 3600 })), JWT_KEY),
        token(ok_claims(json!({ "nbf": now() + 3600 })), JWT_KEY),
        token(ok_claims(json!({})), "some-other-key"),
        token(ok_claims(json!({ "account_id": null })), JWT_KEY),
        token(ok_claims(json!({ "account_id": "not-a-uuid" })), JWT_KEY),
        token(ok_claims(json!({ "exp": null })), JWT_KEY),
        token(ok_claims(json!({ "sub": null })), JWT_KEY),
        encode(
            &Header::new(jsonwebtoken::Algorithm::HS512),
            &ok_claims(json!({})),
            &EncodingKey::from_secret(JWT_KEY.as_bytes()),
        )
        .unwrap(),
        // alg "none": header {"alg":"none"} and no signature.
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", b64url(&ok_claims(json!({})).to_string())),
        encode(
            &Header::new(jsonwebtoken::Algorithm::HS384),
            &ok_claims(json!({})),
            &EncodingKey::from_secret(JWT_KEY.as_bytes()),
        )
        .unwrap(),
        // Algorithm confusion: RS256 in the header, signed with the HMAC key.
        hmac_signed(r#"{"alg":"RS256","typ":"JWT"}"#, &ok_claims(json!({})).to_string(), JWT_KEY),
        // Critical extensions walhook does not understand (RFC 7515 §4.1.11), correctly signed.
        hmac_signed(
            r#"{"alg":"HS256","typ":"JWT","crit":["zzz"],"zzz":1}"#,
            &ok_claims(json!({})).to_string(),
            JWT_KEY,
        ),
        hmac_signed(r#"{"alg":"HS256","crit":[]}"#, &ok_claims(json!({})).to_string(), JWT_KEY),
        "op-token-wrong".to_string(),
        String::new(),
    ];
    for t in refused {
        api.err("webhooks-list", &t, json!({}), 401, "auth.unauthorized").await;
    }
    wh.stop().await.unwrap();
}

/// A JWT with the given header, signed HMAC-SHA256 with `key` whatever the header says.
fn hmac_signed(header: &str, claims: &str, key: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let input = format!("{}.{}", b64url(header), b64url(claims));
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}

fn b64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_creates() {
    let env = Env::new("api_concurrent").await;
    let wh = env.start(&auth_config()).await;
    let api = std::sync::Arc::new(Api::new(&env));
    let a = jwt(ACCOUNT_A);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (api, a, body) = (api.clone(), a.clone(), create_body(&env, &format!("c{i}")));
        tasks.push(tokio::spawn(async move { api.ok("webhooks-create", &a, body).await }));
    }
    let mut ids = HashSet::new();
    let mut secrets = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        ids.insert(r["endpoint"]["id"].as_str().unwrap().to_owned());
        secrets.insert(r["signing_secret"].as_str().unwrap().to_owned());
    }
    assert_eq!((ids.len(), secrets.len()), (100, 100));
    let listed = api.ok("webhooks-list", &a, json!({})).await;
    let listed: Vec<&Value> = listed["endpoints"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 100);
    // Compared as instants: RFC 3339 strings with 3 or 6 fraction digits do not sort as text.
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    assert!(listed.windows(2).all(|w| at(w[0]) >= at(w[1])), "newest first");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_routing_in_order_with_the_rows() {
    let env = Env::new("api_routing").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    const A: &str = "aaaa0000-0000-4000-8000-000000000001";
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'before')")).await;
    let created = api
        .ok(
            "webhooks-create",
            &a,
            json!({ "url": env.receiver.url("live"), "events": ["contact.created", "contact.updated"] }),
        )
        .await;
    env.receiver.set_secret("live", created["signing_secret"].as_str().unwrap());
    let id = created["endpoint"]["id"].clone();
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'after')")).await;
    let got = env
        .receiver
        .wait_until(Duration::from_secs(20), |r| !r.is_empty())
        .await
        .expect("the new endpoint gets the row");
    assert_eq!(got[0].json()["data"]["first_name"], "after", "rows committed before the create are not sent");
    assert!(got[0].verified, "signed with the secret returned at creation");

    // Unsubscribing from created: the next insert is not sent, an update is.
    api.ok("webhooks-update", &a, json!({ "id": id, "events": ["contact.updated"] })).await;
    env.sql(&format!("INSERT INTO contacts (account_id, first_name) VALUES ('{A}', 'unsubscribed')")).await;
    env.sql("UPDATE contacts SET last_name = 'x' WHERE first_name = 'after'").await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await.expect("update arrives");
    assert_eq!(got[1].json()["event"], "contact.updated");

    // The deliveries view shows them (once recorded), newest first, with the page's fields.
    let q = "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'";
    common::wait_for(Duration::from_secs(10), || async { env.scalar_i64(q).await == 2 }).await;
    let deliveries = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id })).await;
    let list = deliveries["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["event_type"], "contact.updated");
    assert_eq!(list[1]["event_type"], "contact.created");
    for d in list {
        let keys: HashSet<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["id", "event_type", "status", "http_status_code", "attempt_count", "completed_at", "created_at"].into()
        );
    }
    let first = &list[1];
    assert_eq!(first["status"], "delivered");
    assert_eq!(first["http_status_code"], 200);
    assert_eq!(first["attempt_count"], 1);
    assert_eq!(first["id"].as_str().unwrap(), got[0].webhook_id, "the delivery id is the webhook-id");
    let one = api.ok("webhooks-deliveries", &a, json!({ "endpoint_id": id, "limit": 1 })).await;
    assert_eq!(one["deliveries"].as_array().unwrap().len(), 1);

    // Deleted: nothing more is sent to it.
    api.ok("webhooks-delete", &a, json!({ "id": id })).await;
    env.sql("UPDATE contacts SET last_name = 'y' WHERE first_name = 'after'").await;
    env.quiescent().await;
    assert_eq!(env.receiver.count(), 2, "a deleted endpoint gets nothing more");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_and_never_logged() {
    let env = Env::new("api_secrets").await;
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let mut proc = env
        .spawn_binary(&format!("{}[secrets]\nencryption_key = \"{key}\"\n[log]\nlevel = \"debug\"\n", auth_config()));
    env.ready(Readiness::Streaming).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let created = api.ok("webhooks-create", &a, create_body(&env, "enc")).await;
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    env.receiver.set_secret("enc", &secret);
    let stored: String = env.client.query_one("SELECT secret FROM walhook.endpoints", &[]).await.unwrap().get(0);
    assert!(stored.starts_with("enc:v2:") && !stored.contains(&secret["whsec_".len()..]), "stored encrypted");
    // The encrypted secret still signs: a delivery verifies.
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'enc')")
        .await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("delivery");
    assert!(got[0].verified);
    api.ok("webhooks-list", OPERATOR_TOKEN, json!({})).await;
    api.err("webhooks-list", "wrong-token-value-123", json!({}), 401, "auth.unauthorized").await;
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(30)).await.expect("exits");
    let log = proc.log_text();
    assert!(log.contains("webhook endpoint created"), "the log is being written:\n{log}");
    for needle in
        [secret.as_str(), &secret["whsec_".len()..], &a, OPERATOR_TOKEN, "wrong-token-value-123", key, JWT_KEY]
    {
        assert!(!log.contains(needle), "{needle} appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_and_the_router_agree() {
    let env = Env::new("api_openapi").await;
    let wh = env.start(&auth_config()).await;
    let served = reqwest::get(format!("http://127.0.0.1:{}/api/openapi.json", env.api_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served: Value = serde_json::from_str(&served).unwrap();
    let committed: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert_eq!(served, committed, "the served document is the committed one");
    assert_eq!(committed["openapi"], "3.1.0");
    let paths: HashSet<String> = committed["paths"].as_object().unwrap().keys().cloned().collect();
    let routed: HashSet<String> = walhook::admin::api::operations().map(|o| format!("/api/{}", o.name)).collect();
    assert_eq!(paths, routed, "documented paths are exactly the routed operations");
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    for walhook::admin::api::Operation { name: op, fields, .. } in walhook::admin::api::operations() {
        let item = &committed["paths"][format!("/api/{op}")];
        assert_eq!(item.as_object().unwrap().keys().collect::<Vec<_>>(), ["post"], "{op} is POST only");
        let props: HashSet<&str> = item["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(props, fields.iter().copied().collect(), "{op}: documented fields are the accepted ones");
        // And the router really refuses anything undocumented.
        let (s, v) = api.call(op, &a, json!({ "undocumented_field": 1 })).await;
        assert_eq!((s, v["error"]["code"].as_str().unwrap()), (400, "webhooks.invalid_request"), "{op}");
    }
    let codes: HashSet<&str> = committed["components"]["schemas"]["ErrorEnvelope"]["properties"]["error"]["properties"]
        ["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(codes, walhook::admin::api::error::ERROR_CODES.into_iter().collect());
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencrypted_secret_is_not_logged_even_at_debug_level() {
    let env = Env::new("api_secret_debug_log").await;
    let mut proc = env.spawn_binary(&format!("{}[log]\nlevel = \"debug\"\n", auth_config()));
    env.ready(Readiness::Streaming).await;
    let api = Api::new(&env);
    let created = api.ok("webhooks-create", &jwt(ACCOUNT_A), create_body(&env, "plain")).await;
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(30)).await.expect("exits");
    let log = proc.log_text();
    assert!(log.contains("secrets.encryption_key is not set"), "warned once at start:\n{log}");
    assert_eq!(log.matches("secrets.encryption_key is not set").count(), 1);
    assert!(!log.contains(&secret["whsec_".len()..]), "the secret appears in a debug log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_text_fields_are_refused_naming_the_field() {
    let env = Env::new("api_control_chars").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let url = env.receiver.url("ctl");
    let ev = json!(["contact.created"]);
    for bad in ["nul\u{0}byte", "bell\u{7}", "esc\u{1b}[31m", "del\u{7f}", "c1\u{85}", "line\nbreak"] {
        let msg = api
            .err(
                "webhooks-create",
                &a,
                json!({ "url": url, "events": ev, "description": bad }),
                400,
                "webhooks.invalid_request",
            )
            .await;
        assert!(msg.contains("description"), "names the field: {msg}");
    }
    let msg = api
        .err(
            "webhooks-create",
            &a,
            json!({ "url": format!("{url}/a\u{0}b"), "events": ev }),
            400,
            "webhooks.invalid_url",
        )
        .await;
    assert!(msg.starts_with("url"), "names the field: {msg}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.endpoints").await, 0, "nothing written");
    let id = api.ok("webhooks-create", &a, json!({ "url": url, "events": ev, "description": "ok – ünïcode" })).await
        ["endpoint"]["id"]
        .clone();
    let msg = api
        .err("webhooks-update", &a, json!({ "id": id, "description": "x\u{0}" }), 400, "webhooks.invalid_request")
        .await;
    assert!(msg.contains("description"), "{msg}");
    api.err("webhooks-update", &a, json!({ "id": id, "url": format!("{url}\u{0}") }), 400, "webhooks.invalid_url")
        .await;
    let got = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(got["endpoint"]["description"], "ok – ünïcode", "a refused update changes nothing");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_format_and_separator_characters_in_text_fields_are_refused_naming_the_field() {
    let env = Env::new("api_format_chars").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let url = env.receiver.url("fmt");
    let ev = json!(["contact.created"]);
    // Right-to-left override, line and paragraph separators, zero-width space, byte order
    // mark, bidi isolate, soft hyphen (Unicode categories Cf, Zl, Zp).
    for bad in [
        "evil\u{202E}gpj.exe",
        "a\u{2028}b",
        "a\u{2029}b",
        "zero\u{200B}width",
        "\u{FEFF}bom",
        "x\u{2066}y",
        "soft\u{AD}",
    ] {
        let msg = api
            .err(
                "webhooks-create",
                &a,
                json!({ "url": url, "events": ev, "description": bad }),
                400,
                "webhooks.invalid_request",
            )
            .await;
        assert!(msg.contains("description"), "names the field: {msg}");
    }
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.endpoints").await, 0, "nothing written");
    let id = api.ok("webhooks-create", &a, json!({ "url": url, "events": ev, "description": "ok – ünïcode ✓" })).await
        ["endpoint"]["id"]
        .clone();
    let msg = api
        .err("webhooks-update", &a, json!({ "id": id, "description": "x\u{202E}" }), 400, "webhooks.invalid_request")
        .await;
    assert!(msg.contains("description"), "{msg}");
    let got = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(got["endpoint"]["description"], "ok – ünïcode ✓", "a refused update changes nothing");
    // The joiners are format characters too, but emoji sequences and some scripts need them.
    let family = "team \u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467} بی\u{200C}نام";
    api.ok("webhooks-update", &a, json!({ "id": id, "description": family })).await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_length_is_checked_as_sent_and_the_stored_form_is_bounded() {
    let env = Env::new("api_url_length").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let ev = json!(["contact.created"]);
    // The document's maxLength counts characters as sent: 2,048 of them are accepted, even
    // when normalising lengthens them (a host-only URL gains its "/").
    let host = format!("https://{}.example.com", "a".repeat(2048 - "https://.example.com".len()));
    assert_eq!(host.chars().count(), 2048);
    let made = api.ok("webhooks-create", &a, json!({ "url": host, "events": ev })).await;
    assert_eq!(made["endpoint"]["url"], format!("{host}/"));
    let id = made["endpoint"]["id"].clone();
    let over = format!("{host}a");
    let msg = api.err("webhooks-update", &a, json!({ "id": id, "url": over }), 400, "webhooks.invalid_url").await;
    assert!(msg.contains("2048"), "{msg}");
    // 700 spaces are 721 characters as sent and 2,121 once normalised to %20: accepted, stored
    // normalised.
    let spaced = format!("https://example.com/a{}b", " ".repeat(700));
    let made = api.ok("webhooks-update", &a, json!({ "id": id, "url": spaced })).await;
    assert_eq!(made["endpoint"]["url"], format!("https://example.com/a{}b", "%20".repeat(700)));
    // What normalising makes of 2,048 characters is bounded too: 1,600 two-byte letters are
    // 9,600 characters percent-encoded.
    let wide = format!("https://example.com/{}", "é".repeat(1600));
    let msg = api.err("webhooks-update", &a, json!({ "id": id, "url": wide }), 400, "webhooks.invalid_url").await;
    assert!(msg.contains("8192"), "{msg}");
    let longest: i64 = env.scalar_i64("SELECT max(length(url))::int8 FROM walhook.endpoints").await;
    assert!(longest <= 8192, "a stored URL is {longest} characters");
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audience_and_issuer_are_required_when_configured() {
    let env = Env::new("api_jwt_aud_iss").await;
    let wh = env
        .start(&format!(
            "{}jwt_audience = \"walhook-admin\"\njwt_issuer = \"https://auth.driftwood.test\"\n",
            auth_config()
        ))
        .await;
    let api = Api::new(&env);
    let claims = |extra: Value| {
        let mut c = json!({ "sub": USER.to_string(), "account_id": ACCOUNT_A.to_string(), "exp": now() + 600,
                            "aud": "walhook-admin", "iss": "https://auth.driftwood.test" });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    api.ok("webhooks-list", &token(claims(json!({})), JWT_KEY), json!({})).await;
    api.ok("webhooks-list", &token(claims(json!({ "aud": ["other", "walhook-admin"] })), JWT_KEY), json!({})).await;
    for extra in [
        json!({ "aud": null }),
        json!({ "iss": null }),
        json!({ "aud": "another-service" }),
        json!({ "iss": "https://evil.test" }),
        json!({ "aud": null, "iss": null }),
    ] {
        api.err("webhooks-list", &token(claims(extra.clone()), JWT_KEY), json!({}), 401, "auth.unauthorized").await;
    }
    // What held before still holds with them set.
    api.err(
        "webhooks-list",
        &token(claims(json!({ "exp": now() - 3600 })), JWT_KEY),
        json!({}),
        401,
        "auth.unauthorized",
    )
    .await;
    api.ok("webhooks-list", OPERATOR_TOKEN, json!({})).await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_jwt_key_does_not_start_and_does_not_accept_forged_tokens() {
    let env = Env::new("api_empty_jwt_key").await;
    let cfg = walhook::config::Config::from_toml(&env.config_toml("[auth]\njwt_hs256_secret = \"\"\n"));
    let e = cfg.expect_err("an empty HS256 key is refused").to_string();
    assert!(e.contains("auth.jwt_hs256_secret"), "{e}");
    // And a start with a key of 32 bytes or more works with tokens signed by it only.
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let forged = token(json!({ "sub": USER.to_string(), "account_id": ACCOUNT_A.to_string(), "exp": now() + 600 }), "");
    api.err("webhooks-list", &forged, json!({}), 401, "auth.unauthorized").await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_replication_messages_are_not_logged_even_at_trace_level() {
    let env = Env::new("api_trace_log").await;
    let mut proc = env.spawn_binary(&format!("{}[log]\nlevel = \"trace\"\n", auth_config()));
    env.ready(Readiness::Streaming).await;
    // Created while streaming: the endpoint row (its unencrypted secret included) replicates.
    let created = Api::new(&env).ok("webhooks-create", &jwt(ACCOUNT_A), create_body(&env, "trace")).await;
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    env.receiver.set_secret("trace", &secret);
    env.sql(
        "INSERT INTO contacts (account_id, first_name, last_name) \
         VALUES ('aaaa0000-0000-4000-8000-000000000001', 'Personal-Zyxwvut', 'Datum-Qwerty')",
    )
    .await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("delivery");
    assert!(got[0].verified);
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(30)).await.expect("exits");
    let log = proc.log_text();
    assert!(log.contains("replication event"), "the trace log is being written:\n{}", &log[..log.len().min(2000)]);
    for needle in ["Personal-Zyxwvut", "Datum-Qwerty", &secret["whsec_".len()..], &secret["whsec_".len()..][..16]] {
        assert!(!log.contains(needle), "{needle} appears in the trace log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_on_encryption_re_encrypts_existing_secrets_and_says_how_many() {
    let env = Env::new("api_reencrypt").await;
    // Created while no key was configured: stored plain.
    let one = env.endpoint(ACCOUNT_A, "re1", &["contact.created"]).await;
    env.endpoint(ACCOUNT_B, "re2", &["contact.created"]).await;
    let plain = env.scalar_i64("SELECT count(*) FROM walhook.endpoints WHERE secret LIKE 'whsec_%'").await;
    assert_eq!(plain, 2);
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let mut proc = env.spawn_binary(&format!("{}[secrets]\nencryption_key = \"{key}\"\n", auth_config()));
    env.ready(Readiness::Streaming).await;
    let plain = env.scalar_i64("SELECT count(*) FROM walhook.endpoints WHERE secret NOT LIKE 'enc:v2:%'").await;
    assert_eq!(plain, 0, "every stored secret is encrypted once the key is on");
    // They still sign what the receiver verifies.
    env.sql("INSERT INTO contacts (account_id, first_name) VALUES ('aaaa0000-0000-4000-8000-000000000001', 'x')").await;
    let got = env.receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await.expect("delivery");
    assert!(got[0].verified, "the re-encrypted secret is the same secret");
    // An endpoint stored plain later (another replica without the key) is sealed by an update.
    let stored: String =
        env.client.query_one("SELECT secret FROM walhook.endpoints WHERE id = $1", &[&one.id]).await.unwrap().get(0);
    let plain_secret = SecretBox::new(Some(key)).unwrap().open(&stored, one.id).unwrap().expose().to_owned();
    env.client
        .execute("UPDATE walhook.endpoints SET secret = $2 WHERE id = $1", &[&one.id, &plain_secret])
        .await
        .unwrap();
    Api::new(&env).ok("webhooks-update", &jwt(ACCOUNT_A), json!({ "id": one.id, "description": "touched" })).await;
    let plain = env.scalar_i64("SELECT count(*) FROM walhook.endpoints WHERE secret NOT LIKE 'enc:v2:%'").await;
    assert_eq!(plain, 0, "an update re-encrypts a plain secret");
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(30)).await.expect("exits");
    let log = proc.log_text();
    assert!(log.contains("re-encrypted 2 signing secrets"), "says how many:\n{log}");
    assert!(!log.contains(&plain_secret["whsec_".len()..]));
}

/// A sealed secret is bound to its endpoint: someone who can write `walhook.endpoints` (but
/// does not have the key) cannot move one endpoint's ciphertext onto another to make walhook
/// sign that one's requests with a secret they know. walhook refuses, naming the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_secret_moved_onto_another_endpoint_is_refused_naming_it() {
    let env = Env::new("api_secret_swap").await;
    let one = env.endpoint(ACCOUNT_A, "s1", &["contact.created"]).await;
    let two = env.endpoint(ACCOUNT_B, "s2", &["contact.created"]).await;
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let cfg = format!("{}[secrets]\nencryption_key = \"{key}\"\n", auth_config());
    let mut proc = env.spawn_binary(&cfg);
    env.ready(Readiness::Streaming).await;
    proc.sigterm();
    assert!(proc.wait_exit(Duration::from_secs(30)).await.unwrap().success());
    let sealed = env.scalar_i64("SELECT count(*) FROM walhook.endpoints WHERE secret LIKE 'enc:v2:%'").await;
    assert_eq!(sealed, 2);
    env.client
        .execute(
            "UPDATE walhook.endpoints SET secret = (SELECT secret FROM walhook.endpoints WHERE id = $2) WHERE id = $1",
            &[&one.id, &two.id],
        )
        .await
        .unwrap();
    let mut proc = env.spawn_binary(&cfg);
    let status = proc.wait_exit(Duration::from_secs(60)).await.expect("refuses to start");
    let log = proc.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&one.id.to_string()) && log.contains("another endpoint's secret"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_cannot_create_more_endpoints_than_its_quota() {
    let env = Env::new("api_endpoint_quota").await;
    let wh = env.start(&format!("{}[api]\nmax_endpoints_per_account = 3\n", auth_config())).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    // Ten at once: exactly the quota gets through, however the requests interleave.
    let calls = (0..10).map(|i| {
        let (api, a, body) = (&api, &a, create_body(&env, &format!("q{i}")));
        async move { api.call("webhooks-create", a, body).await }
    });
    let answers = futures::future::join_all(calls).await;
    let created = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(created, 3, "{answers:?}");
    for (s, v) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!((*s, v["error"]["code"].as_str().unwrap()), (400, "webhooks.invalid_request"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("quota") && msg.contains('3'), "names the quota: {msg}");
    }
    assert_eq!(env.scalar_i64("SELECT count(*) FROM walhook.endpoints").await, 3);
    // Another account has its own quota; deleting one frees a place.
    api.ok("webhooks-create", OPERATOR_TOKEN, create_body(&env, "b")).await;
    let listed = api.ok("webhooks-list", &a, json!({})).await;
    let id = listed["endpoints"][0]["id"].clone();
    api.ok("webhooks-delete", &a, json!({ "id": id })).await;
    api.ok("webhooks-create", &a, create_body(&env, "again")).await;
    api.err("webhooks-create", &a, create_body(&env, "over"), 400, "webhooks.invalid_request").await;
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_with_limit_and_cursor() {
    let env = Env::new("api_list_paging").await;
    let wh = env.start(&auth_config()).await;
    let api = Api::new(&env);
    let a = jwt(ACCOUNT_A);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(api.ok("webhooks-create", &a, create_body(&env, &format!("p{i}"))).await["endpoint"]["id"].clone());
    }
    api.ok("webhooks-create", OPERATOR_TOKEN, create_body(&env, "other")).await;
    ids.reverse(); // newest first
                   // The default answer keeps its shape: every endpoint, no cursor when nothing remains.
    let all = api.ok("webhooks-list", &a, json!({})).await;
    assert_eq!(all.as_object().unwrap().keys().collect::<Vec<_>>(), ["endpoints"], "{all}");
    let listed: Vec<Value> = all["endpoints"].as_array().unwrap().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(listed, ids);
    // Pages of two follow the cursor to the end, newest first, nothing twice or missed.
    let mut seen = Vec::new();
    let mut cursor: Option<Value> = None;
    let mut pages = 0;
    loop {
        let mut body = json!({ "limit": 2 });
        if let Some(c) = &cursor {
            body["cursor"] = c.clone();
        }
        let page = api.ok("webhooks-list", &a, body).await;
        let got = page["endpoints"].as_array().unwrap();
        assert!(got.len() <= 2);
        seen.extend(got.iter().map(|e| e["id"].clone()));
        pages += 1;
        match page.get("next_cursor") {
            Some(c) => cursor = Some(c.clone()),
            None => break,
        }
        assert!(pages < 10, "the cursor ends");
    }
    assert_eq!(seen, ids, "the pages are the whole list in order");
    assert_eq!(pages, 3);
    // A cursor is opaque: a forged one is refused, another account's sees only its own.
    use base64::Engine;
    let forged = |text: &str| json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text));
    let uuid = uuid::Uuid::new_v4();
    for bad in [
        json!("not-a-cursor"),
        json!(5),
        // Well formed, but a time no endpoint has (and outside PostgreSQL's range).
        forged(&format!("-4713000000000000000:{uuid}")),
        forged(&format!("9223372036854775807:{uuid}")),
        forged(&format!("-1:{uuid}")),
    ] {
        let msg = api.err("webhooks-list", &a, json!({ "cursor": bad }), 400, "webhooks.invalid_request").await;
        assert!(msg.contains("cursor"), "{msg}");
    }
    for limit in [json!(0), json!(101), json!("ten")] {
        let msg = api.err("webhooks-list", &a, json!({ "limit": limit }), 400, "webhooks.invalid_request").await;
        assert!(msg.contains("limit"), "{msg}");
    }
    let first = api.ok("webhooks-list", &a, json!({ "limit": 1 })).await;
    let theirs = api.ok("webhooks-list", OPERATOR_TOKEN, json!({ "cursor": first["next_cursor"] })).await;
    assert!(theirs["endpoints"].as_array().unwrap().iter().all(|e| e["account_id"] == ACCOUNT_B.to_string()));
    wh.stop().await.unwrap();
}
