//! Signing as a receiver checks it, with stock verifiers: the Standard Webhooks reference
//! library (`standardwebhooks`) for `v1`, ed25519-dalek with the endpoint's public key for
//! `v1a`. A rotated secret signs beside the new one through its grace period (retries made
//! before the rotation included, and after a takeover), and only the new one signs after it.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use walhook::local::receiver::{Received, Reply};

use crate::api::{auth_config, jwt, Api};
use crate::common::{free_port, wait_for, wait_ready, Env, Readiness, ACCOUNT_A, ACCOUNT_B};

const A: &str = "aaaa0000-0000-4000-8000-000000000001";

/// Whether the stock Standard Webhooks library, holding `secret`, accepts request `r`.
fn stock_accepts(secret: &str, r: &Received) -> bool {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("webhook-id", r.webhook_id.parse().unwrap());
    headers.insert("webhook-timestamp", r.timestamp.to_string().parse().unwrap());
    headers.insert("webhook-signature", r.signature.parse().unwrap());
    standardwebhooks::Webhook::new(secret).unwrap().verify(&r.body, &headers).is_ok()
}

/// Whether some `v1a` signature of `header` verifies `(id, ts, body)` with `public_key`
/// (`whpk_…`), checked with ed25519-dalek.
fn ed25519_accepts(public_key: &str, id: &str, ts: i64, body: &[u8], header: &str) -> bool {
    let raw: [u8; 32] = B64.decode(public_key.strip_prefix("whpk_").unwrap()).unwrap().try_into().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).unwrap();
    let msg = [id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body].concat();
    header.split(' ').filter_map(|s| s.strip_prefix("v1a,")).any(|sig| {
        let Ok(bytes) = B64.decode(sig) else { return false };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else { return false };
        key.verify_strict(&msg, &sig).is_ok()
    })
}

/// Rotates endpoint `id` with a grace period of an hour; returns the new secret.
async fn rotated_secret(api: &Api, token: &str, id: &Value) -> String {
    let answer = api.ok("webhooks-rotate-secret", token, json!({ "id": id, "grace_period": "1h" })).await;
    answer["signing_secret"].as_str().expect("a v1 secret").to_owned()
}

/// Creates an endpoint of account A on receiver path `path`; returns the create answer.
async fn create(env: &Env, api: &Api, token: &str, path: &str, extra: Value) -> Value {
    let mut body = json!({ "url": env.receiver.url(path), "events": ["contact.created"] });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    api.ok("webhooks-create", token, body).await
}

/// Inserts contact `n` of account A and returns its request on `path` answered 200.
async fn sent(env: &Env, path: &str, n: u32) -> Received {
    let id = format!("92000000-0000-4000-8000-{n:012}");
    env.sql(&format!("INSERT INTO contacts (id, account_id, first_name) VALUES ('{id}', '{A}', 'n{n}')")).await;
    let path = format!("/{path}");
    let got = env
        .receiver
        .wait_until(Duration::from_secs(60), |rs| {
            rs.iter().any(|r| r.path == path && r.answered == 200 && r.json()["data"]["id"] == id.as_str())
        })
        .await
        .unwrap_or_else(|rs| panic!("contact {n} not delivered: {rs:?}"));
    got.into_iter().rfind(|r| r.path == path && r.answered == 200 && r.json()["data"]["id"] == id.as_str()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_grace_period_both_secrets_verify_and_after_it_only_the_new_one() {
    let env = Env::new("signing_rotation").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({})).await;
    let (id, old) = (created["endpoint"]["id"].clone(), created["signing_secret"].as_str().unwrap().to_owned());
    let before = sent(&env, "r", 1).await;
    assert!(stock_accepts(&old, &before) && before.signature.split(' ').count() == 1, "{}", before.signature);

    let rotated = api.ok("webhooks-rotate-secret", &a, json!({ "id": id, "grace_period": "20s" })).await;
    let new = rotated["signing_secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    assert_eq!(rotated["endpoint"]["secret_prefix"], &new[..10]);
    let ends = rotated["previous_secret_expires_at"].as_str().expect("an end").to_owned();
    assert_eq!(rotated["endpoint"]["previous_secret_expires_at"], ends.as_str());
    let got = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert_eq!(got["endpoint"]["previous_secret_expires_at"], ends.as_str(), "get shows the live old secret");
    assert!(!got.to_string().contains(&new[6..]) && !got.to_string().contains(&old[6..]), "no secret shown");

    let during = sent(&env, "r", 2).await;
    let ends_at = chrono::DateTime::parse_from_rfc3339(&ends).unwrap();
    assert!(chrono::DateTime::<chrono::Utc>::from(during.at) < ends_at, "sent within the grace period");
    assert_eq!(during.signature.split(' ').count(), 2, "{}", during.signature);
    assert!(during.signature.split(' ').all(|s| s.starts_with("v1,")));
    assert!(stock_accepts(&old, &during), "a receiver still on the old secret accepts");
    assert!(stock_accepts(&new, &during), "a receiver on the new secret accepts");

    // After the grace period (as its owner sees it), only the new secret signs.
    wait_for(Duration::from_secs(60), || async {
        api.ok("webhooks-get", &a, json!({ "id": id })).await["endpoint"]["previous_secret_expires_at"].is_null()
    })
    .await;
    let after = sent(&env, "r", 3).await;
    assert_eq!(after.signature.split(' ').count(), 1, "{}", after.signature);
    assert!(stock_accepts(&new, &after) && !stock_accepts(&old, &after));
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_delivery_made_before_the_rotation_carries_both_signatures() {
    let env = Env::new("signing_retry").await;
    let wh = env.start(&format!("{}[dispatch]\nretry_schedule = [\"1s\", \"1s\", \"1s\"]\n", auth_config())).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({})).await;
    let (id, old) = (created["endpoint"]["id"].clone(), created["signing_secret"].as_str().unwrap().to_owned());
    env.receiver.set_default("r", Reply::Status(503));
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name) VALUES ('93000000-0000-4000-8000-000000000001', '{A}', 'x')"
    ))
    .await;
    env.receiver.wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.answered == 503)).await.unwrap();
    let first = env.receiver.received()[0].clone();
    assert!(stock_accepts(&old, &first) && first.signature.split(' ').count() == 1);

    let new = rotated_secret(&api, &a, &id).await;
    // Every attempt made once the rotation is read carries both; the receiver accepts the next.
    env.receiver.set_default("r", Reply::Status(200));
    let ok = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.answered == 200))
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.answered == 200)
        .unwrap();
    assert_eq!(ok.webhook_id, first.webhook_id, "the same delivery, retried");
    assert!(stock_accepts(&old, &ok) && stock_accepts(&new, &ok), "{}", ok.signature);
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_grace_period_ends_the_old_secret_at_once() {
    let env = Env::new("signing_zero_grace").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({})).await;
    let (id, old) = (created["endpoint"]["id"].clone(), created["signing_secret"].as_str().unwrap().to_owned());
    let rotated = api.ok("webhooks-rotate-secret", &a, json!({ "id": id, "grace_period": "0s" })).await;
    assert!(rotated["previous_secret_expires_at"].is_null(), "{rotated}");
    assert!(rotated["endpoint"]["previous_secret_expires_at"].is_null());
    let new = rotated["signing_secret"].as_str().unwrap().to_owned();
    let r = sent(&env, "r", 1).await;
    assert_eq!(r.signature.split(' ').count(), 1, "{}", r.signature);
    assert!(stock_accepts(&new, &r) && !stock_accepts(&old, &r));
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_taking_over_during_the_grace_period_signs_with_both() {
    let env = Env::new("signing_takeover").await;
    let cfg = auth_config();
    let mut leader = env.spawn_binary(&cfg);
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    env.ready(Readiness::Streaming).await;
    let created = create(&env, &api, &a, "r", json!({})).await;
    let (id, old) = (created["endpoint"]["id"].clone(), created["signing_secret"].as_str().unwrap().to_owned());
    let new = rotated_secret(&api, &a, &id).await;
    let standby_cfg = format!(
        "{cfg}\n[api]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    );
    let standby_ops = standby_cfg.split("[metrics]\nlisten = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let _standby = env.spawn_binary(&standby_cfg);
    wait_ready(standby_ops.parse().unwrap(), Readiness::Standby).await;
    leader.kill9();
    wait_ready(standby_ops.parse().unwrap(), Readiness::Streaming).await;
    let r = sent(&env, "r", 1).await;
    assert_eq!(r.signature.split(' ').count(), 2, "{}", r.signature);
    assert!(stock_accepts(&old, &r) && stock_accepts(&new, &r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1a_endpoints_are_verified_with_their_public_key_and_rotate_the_same_way() {
    let env = Env::new("signing_v1a").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({ "signature_scheme": "v1a" })).await;
    assert!(created.get("signing_secret").is_none(), "no shared secret for v1a: {created}");
    let public = created["public_key"].as_str().expect("a public key").to_owned();
    assert!(public.starts_with("whpk_"));
    let ep = &created["endpoint"];
    assert_eq!((ep["signature_scheme"].as_str(), ep["public_key"].as_str()), (Some("v1a"), Some(public.as_str())));
    assert!(!created.to_string().contains("whsk_"), "the private key never leaves walhook");

    let r = sent(&env, "r", 1).await;
    assert!(r.signature.starts_with("v1a,") && !r.signature.contains(' '), "{}", r.signature);
    assert!(ed25519_accepts(&public, &r.webhook_id, r.timestamp, &r.body, &r.signature));
    let mut tampered = r.body.to_vec();
    *tampered.last_mut().unwrap() = b' ';
    assert!(!ed25519_accepts(&public, &r.webhook_id, r.timestamp, &tampered, &r.signature), "a tampered body fails");
    assert!(!ed25519_accepts(&public, &r.webhook_id, r.timestamp + 1, &r.body, &r.signature));

    let id = ep["id"].clone();
    let rotated = api.ok("webhooks-rotate-secret", &a, json!({ "id": id, "grace_period": "1h" })).await;
    let new_public = rotated["public_key"].as_str().unwrap().to_owned();
    assert!(new_public.starts_with("whpk_") && new_public != public && rotated.get("signing_secret").is_none());
    let r = sent(&env, "r", 2).await;
    assert_eq!(r.signature.split(' ').count(), 2, "{}", r.signature);
    assert!(ed25519_accepts(&public, &r.webhook_id, r.timestamp, &r.body, &r.signature));
    assert!(ed25519_accepts(&new_public, &r.webhook_id, r.timestamp, &r.body, &r.signature));
    wh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rotations_and_schemes_are_refused_and_change_nothing() {
    let env = Env::new("signing_refused").await;
    let wh = env.start(&auth_config()).await;
    let (api, a, b) = (Api::new(&env), jwt(ACCOUNT_A), jwt(ACCOUNT_B));
    let bad = json!({ "url": env.receiver.url("r"), "events": ["contact.created"], "signature_scheme": "v2" });
    let msg = api.err("webhooks-create", &a, bad, 400, "webhooks.invalid_request").await;
    assert!(msg.contains("signature_scheme"), "{msg}");
    let created = create(&env, &api, &a, "r", json!({})).await;
    let id = created["endpoint"]["id"].clone();
    let before = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    for grace in ["8d", "soon", "-1s"] {
        let msg = api
            .err(
                "webhooks-rotate-secret",
                &a,
                json!({ "id": id, "grace_period": grace }),
                400,
                "webhooks.invalid_request",
            )
            .await;
        assert!(msg.contains("grace_period"), "{grace}: {msg}");
    }
    api.err("webhooks-rotate-secret", &b, json!({ "id": id }), 404, "webhooks.not_found").await;
    api.err("webhooks-rotate-secret", &a, json!({ "id": "nope" }), 400, "webhooks.invalid_id").await;
    api.err("webhooks-rotate-secret", &a, json!({ "id": id, "secret": "x" }), 400, "webhooks.invalid_request").await;
    assert_eq!(api.ok("webhooks-get", &a, json!({ "id": id })).await, before, "nothing changed");
    // The default grace period is a day.
    let rotated = api.ok("webhooks-rotate-secret", &a, json!({ "id": id })).await;
    let ends = chrono::DateTime::parse_from_rfc3339(rotated["previous_secret_expires_at"].as_str().unwrap()).unwrap();
    let left = ends.signed_duration_since(chrono::Utc::now());
    assert!(left > chrono::Duration::hours(23) && left <= chrono::Duration::hours(24), "{left}");
    wh.stop().await.unwrap();
}

/// Plain secrets (no encryption key), a rotation, then a restart with `secrets.encryption_key`:
/// both the current and the rotated-out secret must end up sealed, and requests still carry
/// both signatures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_out_secrets_stored_plain_are_sealed_once_a_key_is_set_and_still_sign() {
    let env = Env::new("signing_reseal_rotated").await;
    let wh = env.start(&auth_config()).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({})).await;
    let (id, old) = (created["endpoint"]["id"].clone(), created["signing_secret"].as_str().unwrap().to_owned());
    let new = rotated_secret(&api, &a, &id).await;
    wh.stop().await.unwrap();
    let key = "[secrets]\nencryption_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n";
    let wh = env.start(&format!("{}{key}", auth_config())).await;
    let plain = env
        .scalar_i64(
            "SELECT count(*) FROM walhook.endpoints WHERE secret LIKE 'whsec_%' OR previous_secret LIKE 'whsec_%'",
        )
        .await;
    assert_eq!(plain, 0, "a secret is still stored plain after a start with a key");
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name) VALUES ('96000000-0000-4000-8000-000000000001', '{A}', 'x')"
    ))
    .await;
    let r = env.receiver.wait_until(Duration::from_secs(30), |rs| rs.iter().any(|r| r.answered == 200)).await.unwrap()
        [0]
    .clone();
    assert!(stock_accepts(&old, &r) && stock_accepts(&new, &r), "{}", r.signature);
    // A further rotation with the key: the previous is the sealed form of `new`.
    let newer = rotated_secret(&api, &a, &id).await;
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name) VALUES ('96000000-0000-4000-8000-000000000002', '{A}', 'y')"
    ))
    .await;
    let rs = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| {
            rs.iter().any(|r| r.answered == 200 && r.json()["data"]["first_name"] == "y")
        })
        .await
        .unwrap();
    let r = rs.iter().find(|r| r.json()["data"]["first_name"] == "y").unwrap();
    assert!(stock_accepts(&new, r) && stock_accepts(&newer, r) && !stock_accepts(&old, r), "{}", r.signature);
    wh.stop().await.unwrap();
}

/// Concurrent rotations, v1a rotations and a webhooks-test, with the real binary logging at
/// debug: no secret (whsec_ body, whsk_) in any log line or answer; the final state is one
/// answer's secret signing beside another answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_leave_two_signing_secrets_and_no_key_in_the_logs() {
    let env = Env::new("signing_concurrent").await;
    let cfg = format!("{}[log]\nlevel = \"debug\"\n", auth_config());
    let mut proc = env.spawn_binary(&cfg);
    env.ready(Readiness::Streaming).await;
    let (api, a) = (Api::new(&env), jwt(ACCOUNT_A));
    let created = create(&env, &api, &a, "r", json!({})).await;
    let id = created["endpoint"]["id"].clone();
    let mut secrets = vec![created["signing_secret"].as_str().unwrap().to_owned()];
    let calls = (0..8).map(|_| api.call("webhooks-rotate-secret", &a, json!({ "id": id, "grace_period": "1h" })));
    let answers = futures::future::join_all(calls).await;
    for (s, v) in &answers {
        assert_eq!(*s, 200, "{v}");
        secrets.push(v["result"]["signing_secret"].as_str().unwrap().to_owned());
    }
    let v1a = create(&env, &api, &a, "k", json!({ "signature_scheme": "v1a" })).await;
    let kid = v1a["endpoint"]["id"].clone();
    let r1 = api.ok("webhooks-rotate-secret", &a, json!({ "id": kid })).await;
    assert_eq!(r1["endpoint"]["signature_scheme"], "v1a");
    assert!(!r1.to_string().contains("whsk_") && r1.get("signing_secret").is_none(), "{r1}");
    let t = api.call("webhooks-test", &a, json!({ "id": kid })).await;
    assert!(!t.1.to_string().contains("whsk_"), "{t:?}");
    env.sql(&format!(
        "INSERT INTO contacts (id, account_id, first_name) VALUES ('97000000-0000-4000-8000-000000000001', '{A}', 'x')"
    ))
    .await;
    let rs = env
        .receiver
        .wait_until(Duration::from_secs(30), |rs| {
            rs.iter().any(|r| r.path == "/r" && r.answered == 200 && r.json()["event"] == "contact.created")
        })
        .await
        .unwrap();
    let r = rs.iter().find(|r| r.path == "/r" && r.json()["event"] == "contact.created").unwrap();
    let verifying: Vec<usize> = (0..secrets.len()).filter(|&i| stock_accepts(&secrets[i], r)).collect();
    assert_eq!(verifying.len(), 2, "exactly the current and the previous secret sign: {}", r.signature);
    let get = api.ok("webhooks-get", &a, json!({ "id": id })).await;
    assert!(secrets.iter().all(|s| !get.to_string().contains(&s[6..])), "get shows no secret");
    proc.kill9();
    let log = proc.log_text();
    for s in &secrets {
        assert!(!log.contains(&s[6..]), "a secret is in the log");
    }
    assert!(!log.contains("whsk_"), "a private key is in the log");
    let stored = env.scalar_i64("SELECT count(*) FROM walhook.endpoints WHERE previous_secret IS NOT NULL").await;
    assert_eq!(stored, 2);
}
