//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")),
//! the key being the base64-decoded part of `whsec_…`.
//!
//! What must hold: the Standard Webhooks specification's published test vectors
//! (`tests/fixtures/standard-webhooks.json`, checked by `tests/it/signatures.rs`) verify; the key is kept
//! as a pre-keyed HMAC state so signing does not re-derive it per request; `Debug` never
//! shows key material.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::hmac;

use crate::security::secrets::{SecretError, SigningSecret};

/// Signs webhook bodies for one endpoint.
#[derive(Clone)]
pub struct Signer {
    key: hmac::Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<key>)")
    }
}

impl Signer {
    /// A signer for `secret`.
    pub fn new(secret: &SigningSecret) -> Result<Self, SecretError> {
        let key = secret.key_bytes()?;
        Ok(Signer { key: hmac::Key::new(hmac::HMAC_SHA256, &key) })
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", B64.encode(self.tag(msg_id, timestamp, body).as_ref()))
    }

    /// Whether any space-separated `v1,` signature in `header` matches (constant time).
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let tag = self.tag(msg_id, timestamp, body);
        header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
            let Ok(sig) = B64.decode(sig) else { return false };
            sig.len() == tag.as_ref().len() && sig.iter().zip(tag.as_ref()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }

    fn tag(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> hmac::Tag {
        let mut mac = hmac::Context::with_key(&self.key);
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.sign()
    }
}
