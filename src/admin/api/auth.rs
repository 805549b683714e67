//! Who is calling: `Authorization: Bearer <token>` where the token is a Driftwood access
//! token (HS256 JWT) or an operator token from `auth.static_tokens`.
//!
//! What must hold: only HS256 is accepted (no `none`, no algorithm confusion); `exp` is
//! required and `exp`/`nbf` are enforced; with `auth.jwt_audience` / `auth.jwt_issuer` set,
//! `aud` / `iss` are required and must match; the account comes from `auth.account_claim` and
//! the user from `sub`, both UUIDs; a token whose header lists critical extensions (`crit`)
//! is refused, since walhook understands none (RFC 7515 §4.1.11); static tokens are compared
//! by SHA-256 in constant time; no token ever reaches a log line or an error message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::ApiError;
use crate::admin::endpoints::Caller;
use crate::config::AuthConfig;
use crate::security::jwt::{Hs256, JwtError};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;

struct StaticToken {
    sha256: [u8; 32],
    caller: Caller,
}

/// Verifies bearer tokens.
pub struct Authenticator {
    jwt: Option<Hs256>,
    account_claim: String,
    static_tokens: Vec<StaticToken>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authenticator(jwt: {}, static tokens: {})", self.jwt.is_some(), self.static_tokens.len())
    }
}

impl Authenticator {
    /// From `[auth]` (already validated).
    pub fn new(cfg: &AuthConfig) -> Self {
        let set = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let jwt = (cfg.jwt_hs256_secret.as_ref())
            .map(|s| Hs256::new(s.expose().as_bytes(), LEEWAY_SECS, set(&cfg.jwt_audience), set(&cfg.jwt_issuer)));
        let static_tokens = cfg
            .static_tokens
            .iter()
            .filter_map(|t| {
                let bytes: Vec<u8> = (0..t.token_sha256.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&t.token_sha256[i..i + 2], 16))
                    .collect::<Result<_, _>>()
                    .ok()?;
                Some(StaticToken {
                    sha256: bytes.try_into().ok()?,
                    caller: Caller { account_id: t.account_id, user_id: t.user_id },
                })
            })
            .collect();
        Authenticator { jwt, account_claim: cfg.account_claim.clone(), static_tokens }
    }

    /// The caller behind the request's bearer token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized("missing Authorization: Bearer token"))?;
        let value = value.to_str().map_err(|_| ApiError::Unauthorized("malformed Authorization header"))?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => return Err(ApiError::Unauthorized("Authorization must be: Bearer <token>")),
        };
        if let Some(caller) = self.static_token(token) {
            return Ok(caller);
        }
        self.jwt_caller(token)
    }

    /// A matching operator token; every configured hash is compared, in constant time.
    fn static_token(&self, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for t in &self.static_tokens {
            let diff = t.sha256.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(t.caller);
            }
        }
        found
    }

    fn jwt_caller(&self, token: &str) -> Result<Caller, ApiError> {
        let Some(jwt) = &self.jwt else {
            return Err(ApiError::Unauthorized("invalid token"));
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = jwt.verify(token, now).map_err(|e| {
            ApiError::Unauthorized(match e {
                JwtError::Expired => "token expired",
                JwtError::Immature => "token not valid yet",
                JwtError::MissingClaim => "token lacks a required claim (exp, sub, and aud/iss when configured)",
                JwtError::Audience => "token audience not accepted",
                JwtError::Issuer => "token issuer not accepted",
                JwtError::Critical => "token header lists critical extensions (crit) walhook does not know",
                JwtError::Malformed | JwtError::Algorithm | JwtError::Signature => "invalid token",
            })
        })?;
        let uuid_claim = |name: &str| claims.get(name).and_then(|v| v.as_str()).and_then(|s| Uuid::parse_str(s).ok());
        let user_id = uuid_claim("sub").ok_or(ApiError::Unauthorized("token sub is not a user id"))?;
        let account_id = uuid_claim(&self.account_claim).ok_or(ApiError::Unauthorized("token has no account claim"))?;
        Ok(Caller { account_id, user_id })
    }
}

/// A token bucket per account in this process: `rate` requests per second, `burst` at once.
/// Replicas do not share buckets, so the limit holds per replica, not across them.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Uuid, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` per second (0: unlimited) with bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter { rate: rate as f64, burst: burst as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `account`'s bucket, or says how many seconds to wait.
    pub fn check(&self, account: Uuid) -> Result<(), ApiError> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() > 100_000 {
            // Forget full buckets rather than grow without bound.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(account).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(ApiError::RateLimited(((1.0 - *tokens) / self.rate).ceil() as u64))
        }
    }
}
