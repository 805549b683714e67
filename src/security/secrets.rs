//! Endpoint signing secrets: generation, the shown prefix, and encryption at rest.
//!
//! What must hold: a secret comes from the OS CSPRNG (`whsec_` + base64 of 32 bytes for `v1`;
//! for `v1a` an ed25519 private key, `whsk_` + base64 of its 32-byte seed and 32-byte public
//! key, whose public half is shown as `whpk_` + base64); the prefix shown after creation is too
//! short to be used; when an encryption key is configured
//! the stored form is AES-256-GCM ciphertext with a fresh nonce, bound to its endpoint (the
//! endpoint's id is the associated data), so a ciphertext copied onto another endpoint's row
//! does not open; secrets stored plain before the key was set, or sealed before they were
//! bound (`enc:v1:`), are read and sealed again at start and on update
//! (`store::secrets::reseal_plain`); no error or log line here carries the secret or the key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Prefix of every symmetric (`v1`) signing secret (Standard Webhooks).
pub const SECRET_PREFIX: &str = "whsec_";
/// Prefix of an ed25519 (`v1a`) private key (Standard Webhooks).
pub const PRIVATE_KEY_PREFIX: &str = "whsk_";
/// Prefix of an ed25519 (`v1a`) public key (Standard Webhooks).
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// Marks an encrypted stored secret bound to its endpoint (the current form).
pub const ENCRYPTED_PREFIX: &str = "enc:v2:";
/// Marks an encrypted stored secret from before secrets were bound to their endpoint: read,
/// and sealed again in the current form.
pub const UNBOUND_PREFIX: &str = "enc:v1:";
/// Characters of the secret kept as `secret_prefix`: `whsec_` plus 4 of the 43 base64
/// characters (24 bits of 256), enough to tell secrets apart, useless for forging.
const SHOWN_CHARS: usize = SECRET_PREFIX.len() + 4;

/// Why a secret could not be used. Never includes the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The stored secret is encrypted but no key is configured.
    #[error("the stored signing secret is encrypted but secrets.encryption_key is not set")]
    KeyMissing,
    /// Decryption failed: wrong key, damaged ciphertext, or another endpoint's.
    #[error(
        "the stored signing secret cannot be decrypted with secrets.encryption_key for this endpoint (a wrong key, \
         a damaged value, or another endpoint's secret copied onto it)"
    )]
    Decrypt,
    /// The secret is not `whsec_` + base64, nor `whsk_` + base64 of an ed25519 key.
    #[error("the signing secret is not whsec_ followed by base64, nor whsk_ followed by an ed25519 key in base64")]
    Malformed,
    /// The configured key is not base64 of 32 bytes.
    #[error("secrets.encryption_key must be base64 of exactly 32 bytes")]
    BadKey,
}

/// Fills `buf` from the operating system's CSPRNG.
fn os_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator is unavailable");
}

/// How requests are signed (Standard Webhooks signature identifiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HMAC-SHA256 with a shared `whsec_` secret.
    V1,
    /// ed25519 with a `whsk_` private key; receivers verify with the `whpk_` public key.
    V1a,
}

impl Scheme {
    /// `v1` or `v1a`, as in the API and the signature header.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::V1 => "v1",
            Scheme::V1a => "v1a",
        }
    }

    /// The scheme named `name`.
    pub fn parse(name: &str) -> Option<Scheme> {
        match name {
            "v1" => Some(Scheme::V1),
            "v1a" => Some(Scheme::V1a),
            _ => None,
        }
    }
}

/// A signing secret in its plain form: `whsec_…` (v1) or `whsk_…` (v1a).
#[derive(Clone)]
pub struct SigningSecret(String);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningSecret({}…)", self.prefix())
    }
}

impl SigningSecret {
    /// A new secret from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        os_random(&mut bytes);
        SigningSecret(format!("{SECRET_PREFIX}{}", B64.encode(bytes)))
    }

    /// A new secret of `scheme` from the OS CSPRNG (for `v1a`, a fresh ed25519 key pair).
    pub fn generate_for(scheme: Scheme) -> Self {
        match scheme {
            Scheme::V1 => Self::generate(),
            Scheme::V1a => {
                let mut seed = [0u8; 32];
                os_random(&mut seed);
                let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an ed25519 seed");
                let mut both = seed.to_vec();
                both.extend_from_slice(pair.public_key().as_ref());
                SigningSecret(format!("{PRIVATE_KEY_PREFIX}{}", B64.encode(both)))
            }
        }
    }

    /// Wraps an existing `whsec_…` or `whsk_…` secret after checking its form.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let secret = SigningSecret(s.to_owned());
        match secret.scheme() {
            Scheme::V1 => secret.key_bytes().map(|_| secret),
            Scheme::V1a => secret.key_pair().map(|_| secret),
        }
    }

    /// The scheme this secret signs with.
    pub fn scheme(&self) -> Scheme {
        if self.0.starts_with(PRIVATE_KEY_PREFIX) {
            Scheme::V1a
        } else {
            Scheme::V1
        }
    }

    /// The ed25519 key pair of a `whsk_` secret: base64 of the 32-byte seed followed by the
    /// 32-byte public key (checked against the seed), or of the seed alone.
    pub fn key_pair(&self) -> Result<Ed25519KeyPair, SecretError> {
        let b64 = self.0.strip_prefix(PRIVATE_KEY_PREFIX).ok_or(SecretError::Malformed)?;
        let bytes = B64.decode(b64).map_err(|_| SecretError::Malformed)?;
        match bytes.len() {
            32 => Ed25519KeyPair::from_seed_unchecked(&bytes).map_err(|_| SecretError::Malformed),
            64 => {
                Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..]).map_err(|_| SecretError::Malformed)
            }
            _ => Err(SecretError::Malformed),
        }
    }

    /// The `whpk_…` public key of a `v1a` secret, which receivers verify with; `None` for `v1`.
    pub fn public_key(&self) -> Option<String> {
        let pair = self.key_pair().ok()?;
        Some(format!("{PUBLIC_KEY_PREFIX}{}", B64.encode(pair.public_key().as_ref())))
    }

    /// The full secret, shown to the user once at creation.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `secret_prefix` shown afterwards: the first characters of a `v1` secret; of a `v1a`
    /// key, the first characters of its public key (the private key is never shown).
    pub fn prefix(&self) -> String {
        match self.public_key() {
            Some(public) => public[..(PUBLIC_KEY_PREFIX.len() + 4).min(public.len())].to_owned(),
            None => self.0[..SHOWN_CHARS.min(self.0.len())].to_owned(),
        }
    }

    /// The HMAC key: the base64-decoded part after `whsec_`.
    pub fn key_bytes(&self) -> Result<Vec<u8>, SecretError> {
        let b64 = self.0.strip_prefix(SECRET_PREFIX).ok_or(SecretError::Malformed)?;
        let key = B64.decode(b64).map_err(|_| SecretError::Malformed)?;
        if key.is_empty() {
            return Err(SecretError::Malformed);
        }
        Ok(key)
    }
}

/// Parses `secrets.encryption_key` (base64 of 32 bytes).
pub fn parse_encryption_key(b64: &str) -> Result<[u8; 32], SecretError> {
    let bytes = B64.decode(b64.trim()).map_err(|_| SecretError::BadKey)?;
    bytes.try_into().map_err(|_| SecretError::BadKey)
}

/// Seals and opens stored secrets; without a key it stores them as they are.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Option<std::sync::Arc<LessSafeKey>>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(encrypting: {})", self.cipher.is_some())
    }
}

impl SecretBox {
    /// A box for the configured key (`None`: store plain).
    pub fn new(key: Option<&str>) -> Result<Self, SecretError> {
        let cipher = match key {
            Some(k) => {
                let key = UnboundKey::new(&AES_256_GCM, &parse_encryption_key(k)?).map_err(|_| SecretError::BadKey)?;
                Some(std::sync::Arc::new(LessSafeKey::new(key)))
            }
            None => None,
        };
        Ok(SecretBox { cipher })
    }

    /// Whether secrets are encrypted at rest.
    pub fn encrypts(&self) -> bool {
        self.cipher.is_some()
    }

    /// The form stored in `walhook.endpoints.secret` of endpoint `endpoint`.
    pub fn seal(&self, secret: &SigningSecret, endpoint: uuid::Uuid) -> String {
        let Some(cipher) = &self.cipher else {
            return secret.0.clone();
        };
        let mut nonce = [0u8; 12];
        os_random(&mut nonce);
        let mut sealed = secret.0.as_bytes().to_vec();
        cipher
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(endpoint.as_bytes()), &mut sealed)
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{ENCRYPTED_PREFIX}{}", B64.encode(blob))
    }

    /// The plain secret of endpoint `endpoint` from its stored form.
    pub fn open(&self, stored: &str, endpoint: uuid::Uuid) -> Result<SigningSecret, SecretError> {
        let (b64, aad): (&str, &[u8]) =
            match (stored.strip_prefix(ENCRYPTED_PREFIX), stored.strip_prefix(UNBOUND_PREFIX)) {
                (Some(b64), _) => (b64, endpoint.as_bytes()),
                (None, Some(b64)) => (b64, &[]),
                (None, None) => return SigningSecret::parse(stored),
            };
        let cipher = self.cipher.as_ref().ok_or(SecretError::KeyMissing)?;
        let blob = B64.decode(b64).map_err(|_| SecretError::Decrypt)?;
        if blob.len() < 12 {
            return Err(SecretError::Decrypt);
        }
        let (nonce, sealed) = blob.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Decrypt)?;
        let mut sealed = sealed.to_vec();
        let plain = cipher.open_in_place(nonce, Aad::from(aad), &mut sealed).map_err(|_| SecretError::Decrypt)?;
        let text = std::str::from_utf8(plain).map_err(|_| SecretError::Decrypt)?;
        SigningSecret::parse(text)
    }

    /// Whether `stored` is in the current form for this box: sealed and bound when it has a
    /// key (anything else is sealed again at start), as it is otherwise.
    pub fn is_current(&self, stored: &str) -> bool {
        !self.encrypts() || stored.starts_with(ENCRYPTED_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_32_random_bytes() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.key_bytes().unwrap().len(), 32);
        assert!(a.prefix().starts_with("whsec_") && a.prefix().len() == 10);
    }

    #[test]
    fn sealed_secrets_round_trip_and_hide_the_secret() {
        let key = B64.encode([7u8; 32]);
        let bx = SecretBox::new(Some(&key)).unwrap();
        let s = SigningSecret::generate();
        let ep = uuid::Uuid::new_v4();
        let stored = bx.seal(&s, ep);
        assert!(!stored.contains(&s.expose()[6..]));
        assert!(stored.starts_with(ENCRYPTED_PREFIX) && bx.is_current(&stored));
        assert_eq!(bx.open(&stored, ep).unwrap().expose(), s.expose());
        let other = SecretBox::new(Some(&B64.encode([8u8; 32]))).unwrap();
        assert!(matches!(other.open(&stored, ep), Err(SecretError::Decrypt)));
        assert!(matches!(SecretBox::new(None).unwrap().open(&stored, ep), Err(SecretError::KeyMissing)));
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_own_endpoint() {
        let bx = SecretBox::new(Some(&B64.encode([7u8; 32]))).unwrap();
        let (mine, theirs) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let stored = bx.seal(&SigningSecret::generate(), mine);
        assert!(bx.open(&stored, mine).is_ok());
        assert!(matches!(bx.open(&stored, theirs), Err(SecretError::Decrypt)), "copied onto another endpoint");
    }

    #[test]
    fn secrets_sealed_before_binding_still_open_and_are_not_current() {
        let key = [7u8; 32];
        let bx = SecretBox::new(Some(&B64.encode(key))).unwrap();
        let s = SigningSecret::generate();
        // The unbound form: the same cipher, no associated data.
        let nonce = [1u8; 12];
        let mut ct = s.0.as_bytes().to_vec();
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap())
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut ct)
            .unwrap();
        let stored = format!("{UNBOUND_PREFIX}{}", B64.encode([nonce.to_vec(), ct].concat()));
        assert_eq!(bx.open(&stored, uuid::Uuid::new_v4()).unwrap().expose(), s.expose());
        assert!(!bx.is_current(&stored), "sealed again at start");
        assert!(!bx.is_current(s.expose()) && SecretBox::new(None).unwrap().is_current(s.expose()));
    }
}
