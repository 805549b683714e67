//! The Standard Webhooks test vectors verify, and walhook signs the way receivers verify.

use serde_json::Value;
use walhook::security::secrets::SigningSecret;
use walhook::security::sign::Signer;

fn vectors() -> Vec<Value> {
    let text = include_str!("../fixtures/standard-webhooks.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["vectors"].as_array().unwrap().clone()
}

#[test]
fn published_vectors_produce_the_published_signatures() {
    let vectors = vectors();
    assert!(!vectors.is_empty());
    for v in vectors {
        let secret = SigningSecret::parse(v["secret"].as_str().unwrap()).unwrap();
        let signer = Signer::new(&secret).unwrap();
        let (id, ts, payload) =
            (v["id"].as_str().unwrap(), v["timestamp"].as_i64().unwrap(), v["payload"].as_str().unwrap());
        assert_eq!(signer.sign(id, ts, payload.as_bytes()), v["signature"].as_str().unwrap());
        assert!(signer.verify(id, ts, payload.as_bytes(), v["signature"].as_str().unwrap()));
    }
}

#[test]
fn verification_rejects_any_change_and_accepts_rotation_lists() {
    let v = &vectors()[0];
    let signer = Signer::new(&SigningSecret::parse(v["secret"].as_str().unwrap()).unwrap()).unwrap();
    let (id, ts, payload) =
        (v["id"].as_str().unwrap(), v["timestamp"].as_i64().unwrap(), v["payload"].as_str().unwrap());
    let sig = v["signature"].as_str().unwrap();
    assert!(!signer.verify(id, ts + 1, payload.as_bytes(), sig), "timestamp is signed");
    assert!(!signer.verify("msg_other", ts, payload.as_bytes(), sig), "id is signed");
    assert!(!signer.verify(id, ts, b"{\"test\": 2432232315}", sig), "body is signed");
    let other = Signer::new(&SigningSecret::generate()).unwrap();
    assert!(!other.verify(id, ts, payload.as_bytes(), sig), "another secret does not verify");
    // Receivers may get several space-separated signatures (secret rotation).
    assert!(signer.verify(id, ts, payload.as_bytes(), &format!("v1,AAAA {sig}")));
}
