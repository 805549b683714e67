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

/// `v1a` (ed25519): the spec's reference libraries publish no vectors, so these sign the spec's
/// messages with RFC 8032's test keys, computed by an independent implementation
/// (ed25519-dalek); ed25519 is deterministic, so walhook must reproduce each byte.
#[test]
fn v1a_vectors_produce_the_published_signatures() {
    let doc: Value = serde_json::from_str(include_str!("../fixtures/standard-webhooks-v1a.json")).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(!vectors.is_empty());
    for v in vectors {
        let secret = SigningSecret::parse(v["secret"].as_str().unwrap()).unwrap();
        assert_eq!(secret.public_key().as_deref(), v["public_key"].as_str(), "the public key derives from the seed");
        let (id, ts, payload) =
            (v["id"].as_str().unwrap(), v["timestamp"].as_i64().unwrap(), v["payload"].as_str().unwrap());
        assert_eq!(Signer::new(&secret).unwrap().sign(id, ts, payload.as_bytes()), v["signature"].as_str().unwrap());
        // The RFC's key, as published there, is the one inside the `whpk_` form.
        let raw = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v["public_key"].as_str().unwrap().strip_prefix("whpk_").unwrap(),
        )
        .unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, v["public_key_hex"].as_str().unwrap());
    }
    // The seed alone (32 bytes) is read too; a mismatched public half is refused.
    let full = vectors[0]["secret"].as_str().unwrap();
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &full[5..]).unwrap();
    let seed_only =
        format!("whsk_{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes[..32]));
    assert_eq!(SigningSecret::parse(&seed_only).unwrap().public_key().as_deref(), vectors[0]["public_key"].as_str());
    let mut wrong = bytes.clone();
    wrong[40] ^= 1;
    let wrong = format!("whsk_{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &wrong));
    assert!(SigningSecret::parse(&wrong).is_err());
}
