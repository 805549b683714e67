//! HS256 JSON Web Tokens (RFC 7519), verified: the only kind of access token walhook accepts.
//!
//! What must hold: a token is three base64url parts; its header's `alg` is exactly `HS256`
//! (no `none`, no other algorithm, whatever the key could verify) and it lists no critical
//! extensions (`crit`, RFC 7515 §4.1.11: walhook understands none); its signature is the
//! HMAC-SHA256 of the first two parts with the configured key, compared in constant time,
//! before any claim is looked at; `exp` is required and enforced, `nbf` enforced when present,
//! both with [`Hs256::leeway`]; `sub` is required; with an audience or issuer configured, `aud`
//! (a string or a list) and `iss` are required and must match. Nothing here logs or returns the
//! token or the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ring::hmac;
use serde_json::{Map, Value};

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON objects.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not HS256.
    #[error("token algorithm not accepted")]
    Algorithm,
    /// The header lists critical extensions.
    #[error("token header lists critical extensions (crit) walhook does not know")]
    Critical,
    /// The signature does not verify with the key.
    #[error("token signature does not verify")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` has not come yet.
    #[error("token not valid yet")]
    Immature,
    /// A required claim is missing (or of the wrong type).
    #[error("token lacks a required claim (exp, sub, and aud/iss when configured)")]
    MissingClaim,
    /// `aud` does not name this audience.
    #[error("token audience not accepted")]
    Audience,
    /// `iss` is another issuer.
    #[error("token issuer not accepted")]
    Issuer,
}

/// Verifies HS256 tokens signed with one key.
pub struct Hs256 {
    key: hmac::Key,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway: u64,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Hs256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hs256").field("audience", &self.audience).field("issuer", &self.issuer).finish()
    }
}

impl Hs256 {
    /// A verifier for tokens signed with `key`, requiring `audience` and `issuer` when given.
    pub fn new(key: &[u8], leeway: u64, audience: Option<String>, issuer: Option<String>) -> Self {
        Hs256 { key: hmac::Key::new(hmac::HMAC_SHA256, key), leeway, audience, issuer }
    }

    /// The claims of `token` at `now` (seconds since the Unix epoch), once every check passed.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header = object(header)?;
        if header.get("alg").and_then(Value::as_str) != Some("HS256") {
            return Err(JwtError::Algorithm);
        }
        if header.contains_key("crit") {
            return Err(JwtError::Critical);
        }
        let signature = B64URL.decode(signature).map_err(|_| JwtError::Malformed)?;
        let signed = &token[..token.rfind('.').expect("three parts")];
        hmac::verify(&self.key, signed.as_bytes(), &signature).map_err(|_| JwtError::Signature)?;
        let claims = object(claims)?;
        let time = |name: &str| claims.get(name).map(|v| v.as_f64().ok_or(JwtError::MissingClaim)).transpose();
        let exp = time("exp")?.ok_or(JwtError::MissingClaim)?;
        if (now as f64) > exp + self.leeway as f64 {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = time("nbf")? {
            if ((now + self.leeway) as f64) < nbf {
                return Err(JwtError::Immature);
            }
        }
        if !claims.contains_key("sub") {
            return Err(JwtError::MissingClaim);
        }
        if let Some(audience) = &self.audience {
            let named = match claims.get("aud") {
                None => return Err(JwtError::MissingClaim),
                Some(Value::String(a)) => a == audience,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
                Some(_) => false,
            };
            if !named {
                return Err(JwtError::Audience);
            }
        }
        if let Some(issuer) = &self.issuer {
            match claims.get("iss").and_then(Value::as_str) {
                None => return Err(JwtError::MissingClaim),
                Some(iss) if iss != issuer => return Err(JwtError::Issuer),
                Some(_) => {}
            }
        }
        Ok(claims)
    }
}

/// A base64url part holding a JSON object.
fn object(part: &str) -> Result<Map<String, Value>, JwtError> {
    let json = B64URL.decode(part).map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"a-test-key-of-at-least-thirty-two-bytes!";
    const NOW: u64 = 1_800_000_000;

    fn token(header: &str, claims: &str, key: &[u8]) -> String {
        let signed = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), signed.as_bytes());
        format!("{signed}.{}", B64URL.encode(tag.as_ref()))
    }

    fn claims(extra: &str) -> String {
        format!(r#"{{"sub":"u","exp":{}{extra}}}"#, NOW + 60)
    }

    #[test]
    fn a_good_token_verifies_and_every_defect_is_refused_for_its_reason() {
        let v = Hs256::new(KEY, 30, Some("walhook".into()), Some("driftwood".into()));
        let good = claims(r#","aud":["x","walhook"],"iss":"driftwood""#);
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        assert_eq!(v.verify(&token(hs, &good, KEY), NOW).unwrap()["sub"], "u");
        let cases = [
            (token(r#"{"alg":"none"}"#, &good, KEY), JwtError::Algorithm),
            (token(r#"{"alg":"HS384"}"#, &good, KEY), JwtError::Algorithm),
            (token(r#"{"alg":"RS256"}"#, &good, KEY), JwtError::Algorithm),
            (token(r#"{"alg":"HS256","crit":["exp"]}"#, &good, KEY), JwtError::Critical),
            (token(hs, &good, b"another-key-of-at-least-thirty-two-bytes"), JwtError::Signature),
            (
                token(hs, &format!(r#"{{"sub":"u","exp":{},"aud":"walhook","iss":"driftwood"}}"#, NOW - 31), KEY),
                JwtError::Expired,
            ),
            (token(hs, &claims(r#","nbf":1800000031,"aud":"walhook","iss":"driftwood""#), KEY), JwtError::Immature),
            (token(hs, r#"{"sub":"u","aud":"walhook","iss":"driftwood"}"#, KEY), JwtError::MissingClaim),
            (
                token(hs, &format!(r#"{{"exp":{},"aud":"walhook","iss":"driftwood"}}"#, NOW + 60), KEY),
                JwtError::MissingClaim,
            ),
            (token(hs, &claims(r#","iss":"driftwood""#), KEY), JwtError::MissingClaim),
            (token(hs, &claims(r#","aud":"other","iss":"driftwood""#), KEY), JwtError::Audience),
            (token(hs, &claims(r#","aud":"walhook","iss":"evil""#), KEY), JwtError::Issuer),
            ("a.b".to_owned(), JwtError::Malformed),
            ("not.a.jwt.at-all".to_owned(), JwtError::Malformed),
        ];
        for (t, want) in cases {
            assert_eq!(v.verify(&t, NOW).unwrap_err(), want, "{t}");
        }
        // Within the leeway either side.
        let edge = format!(r#"{{"sub":"u","exp":{},"nbf":{},"aud":"walhook","iss":"driftwood"}}"#, NOW - 30, NOW + 30);
        assert!(v.verify(&token(hs, &edge, KEY), NOW).is_ok());
    }

    #[test]
    fn a_changed_payload_breaks_the_signature() {
        let v = Hs256::new(KEY, 30, None, None);
        let t = token(r#"{"alg":"HS256"}"#, &claims(""), KEY);
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64URL.encode(claims(r#","account_id":"someone-else""#));
        parts[1] = &forged;
        assert_eq!(v.verify(&parts.join("."), NOW).unwrap_err(), JwtError::Signature);
    }
}
