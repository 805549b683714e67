//! Standard Webhooks signatures of one endpoint: `v1,` + base64(HMAC-SHA256(key,
//! "{id}.{timestamp}.{body}")), the key being the base64-decoded part of `whsec_…`; or
//! `v1a,` + base64(ed25519 signature of the same message) with a `whsk_…` private key.
//!
//! What must hold: the Standard Webhooks specification's published test vectors, and the
//! ed25519 vectors of `tests/fixtures/` (checked by `tests/it/signatures.rs`), verify; while a
//! rotated-out key is within its grace period every request carries a signature by each key,
//! the current one first, space-separated as the specification says, and once the grace
//! period has ended only the current one; keys are kept ready to sign (a pre-keyed HMAC state,
//! a parsed key pair) so signing does not re-derive them per request; `Debug` never shows key
//! material.

use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::hmac;
use ring::signature::Ed25519KeyPair;

use crate::security::secrets::{Scheme, SecretError, SigningSecret};

/// One key, ready to sign.
#[derive(Clone)]
enum Key {
    /// `v1`: HMAC-SHA256.
    Hmac(hmac::Key),
    /// `v1a`: ed25519.
    Ed25519(Arc<Ed25519KeyPair>),
}

impl Key {
    fn of(secret: &SigningSecret) -> Result<Key, SecretError> {
        Ok(match secret.scheme() {
            Scheme::V1 => Key::Hmac(hmac::Key::new(hmac::HMAC_SHA256, &secret.key_bytes()?)),
            Scheme::V1a => Key::Ed25519(Arc::new(secret.key_pair()?)),
        })
    }

    /// `v1,<base64>` or `v1a,<base64>` for one message, appended to `out`.
    fn sign_into(&self, out: &mut String, msg_id: &str, timestamp: i64, body: &[u8]) {
        match self {
            Key::Hmac(key) => {
                out.push_str("v1,");
                B64.encode_string(hmac_tag(key, msg_id, timestamp, body).as_ref(), out);
            }
            Key::Ed25519(pair) => {
                let ts = timestamp.to_string();
                let mut msg = Vec::with_capacity(msg_id.len() + ts.len() + 2 + body.len());
                msg.extend_from_slice(msg_id.as_bytes());
                msg.push(b'.');
                msg.extend_from_slice(ts.as_bytes());
                msg.push(b'.');
                msg.extend_from_slice(body);
                out.push_str("v1a,");
                B64.encode_string(pair.sign(&msg).as_ref(), out);
            }
        }
    }
}

/// Signs webhook bodies for one endpoint: with its current key, and with the key a rotation
/// replaced until that key's grace period ends.
#[derive(Clone)]
pub struct Signer {
    current: Key,
    /// The rotated-out key and when it stops signing.
    previous: Option<(Key, SystemTime)>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.previous.is_some() { "Signer(<key>, <previous key>)" } else { "Signer(<key>)" })
    }
}

impl Signer {
    /// A signer for `secret` (a `whsec_` or a `whsk_` one).
    pub fn new(secret: &SigningSecret) -> Result<Self, SecretError> {
        Ok(Signer { current: Key::of(secret)?, previous: None })
    }

    /// Also signs with `previous` (the secret a rotation replaced) until `until`.
    pub fn with_previous(mut self, previous: &SigningSecret, until: SystemTime) -> Result<Self, SecretError> {
        self.previous = Some((Key::of(previous)?, until));
        Ok(self)
    }

    /// Until when the rotated-out key signs too, if one is kept.
    pub fn previous_until(&self) -> Option<SystemTime> {
        self.previous.as_ref().map(|(_, until)| *until)
    }

    /// The `webhook-signature` header value for one attempt sent now.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        self.sign_at(SystemTime::now(), msg_id, timestamp, body)
    }

    /// The `webhook-signature` header value for one attempt sent at `now`: the current key's
    /// signature, then the rotated-out key's while `now` is before its end.
    pub fn sign_at(&self, now: SystemTime, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(96);
        self.current.sign_into(&mut out, msg_id, timestamp, body);
        if let Some((key, until)) = &self.previous {
            if now < *until {
                out.push(' ');
                key.sign_into(&mut out, msg_id, timestamp, body);
            }
        }
        out
    }

    /// Whether any space-separated `v1,` signature in `header` matches the current key, which
    /// must be a `v1` one (constant time; the local receiver and the tests verify with it).
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let Key::Hmac(key) = &self.current else { return false };
        let tag = hmac_tag(key, msg_id, timestamp, body);
        header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
            let Ok(sig) = B64.decode(sig) else { return false };
            sig.len() == tag.as_ref().len() && sig.iter().zip(tag.as_ref()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }
}

/// HMAC-SHA256 of `{msg_id}.{timestamp}.{body}`.
fn hmac_tag(key: &hmac::Key, msg_id: &str, timestamp: i64, body: &[u8]) -> hmac::Tag {
    let mut mac = hmac::Context::with_key(key);
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.sign()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_rotated_out_key_signs_beside_the_new_one_until_its_end() {
        let (old, new) = (SigningSecret::generate(), SigningSecret::generate());
        let end = SystemTime::now() + Duration::from_secs(60);
        let signer = Signer::new(&new).unwrap().with_previous(&old, end).unwrap();
        let (old_only, new_only) = (Signer::new(&old).unwrap(), Signer::new(&new).unwrap());
        let during = signer.sign_at(end - Duration::from_secs(1), "msg_1", 7, b"{}");
        let parts: Vec<&str> = during.split(' ').collect();
        assert_eq!(parts.len(), 2, "{during}");
        assert_eq!(parts[0], new_only.sign("msg_1", 7, b"{}"), "the current key first");
        assert!(old_only.verify("msg_1", 7, b"{}", &during) && new_only.verify("msg_1", 7, b"{}", &during));
        let after = signer.sign_at(end, "msg_1", 7, b"{}");
        assert!(!after.contains(' ') && !old_only.verify("msg_1", 7, b"{}", &after));
        assert!(new_only.verify("msg_1", 7, b"{}", &after));
        assert!(!format!("{signer:?}").contains("whsec"));
    }

    #[test]
    fn v1a_keys_sign_with_their_own_identifier_and_verify_with_the_public_key() {
        let secret = SigningSecret::generate_for(Scheme::V1a);
        let public = secret.public_key().expect("a v1a secret has a public key");
        let raw = B64.decode(public.strip_prefix("whpk_").unwrap()).unwrap();
        let header = Signer::new(&secret).unwrap().sign("msg_1", 7, b"{\"a\":1}");
        let sig = B64.decode(header.strip_prefix("v1a,").expect("v1a identifier")).unwrap();
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw);
        assert!(key.verify(b"msg_1.7.{\"a\":1}", &sig).is_ok());
        assert!(key.verify(b"msg_1.7.{\"a\":2}", &sig).is_err(), "a tampered body fails");
        assert!(!Signer::new(&secret).unwrap().verify("msg_1", 7, b"{}", &header), "verify is for v1 only");
    }
}
