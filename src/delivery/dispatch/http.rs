//! One HTTP attempt: sign, POST, classify the answer.
//!
//! What must hold: only `https` targets; literal IPs and resolved names both pass the
//! address policy; redirects are never followed (a 3xx is a failure); the whole attempt is
//! bounded by `dispatch.request_timeout` and at most 64 KiB of the response is read; the
//! `webhook-id` is the delivery id (stable across attempts and restarts) while
//! `webhook-timestamp` and the signature are fresh per attempt; every text taken from the
//! receiver or the network (snippet, error) is made safe to store ([`safe_text`]). Proxy
//! environment variables (`HTTPS_PROXY`, `ALL_PROXY`, …) are ignored: a proxy would connect on
//! walhook's behalf to an address never checked. An attempt that fails for a local resource
//! reason (no file descriptor, no memory, no outbound connection free: see [`super::connect`])
//! is `FailureKind::Local`: the receiver was never reached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT as USER_AGENT_HEADER};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::{Host, Url};

use super::connect::{Connector, Gate, GateFull, IDLE_KEPT};
use crate::config::DispatchConfig;
use crate::model::attempt::{safe_text, Attempt, FailureKind, ERROR_BYTES, SNIPPET_BYTES};
use crate::model::delivery::Endpoint;
use crate::security::ssrf::AddressPolicy;

/// Response bytes read at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Delay before retrying an attempt that failed for a local reason (`FailureKind::Local`).
pub const LOCAL_RETRY: Duration = Duration::from_secs(1);
/// `user-agent` of every request.
pub const USER_AGENT: &str = concat!("walhook/", env!("CARGO_PKG_VERSION"));
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Building the HTTP client failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A `dispatch.ca_certs` file is unusable.
    #[error("dispatch.ca_certs: {0}")]
    CaCert(String),
}

/// Why an attempt got no answer: it ran out of time, or the client failed.
#[derive(Debug)]
enum Failed {
    Timeout,
    Client(hyper_util::client::legacy::Error),
    Body(hyper::Error),
}

/// Sends webhook requests.
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client<Connector, Full<Bytes>>,
    policy: Arc<AddressPolicy>,
    request_timeout: Duration,
}

impl Sender {
    /// A sender configured by `[dispatch]`: at most `dispatch.max_concurrency` +
    /// [`IDLE_KEPT`] connections open at once, pooled per host.
    pub fn new(cfg: &DispatchConfig) -> Result<Sender, HttpError> {
        crate::security::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for path in &cfg.ca_certs {
            let certs = crate::security::tls::read_pem_certs(path).map_err(|e| HttpError::CaCert(e.to_string()))?;
            for c in certs {
                roots.add(c).map_err(|e| HttpError::CaCert(format!("{}: {e}", path.display())))?;
            }
        }
        let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let policy = Arc::new(AddressPolicy::new(cfg.allowed_cidrs.clone()));
        let gate = Arc::new(Gate::new(cfg.max_concurrency + IDLE_KEPT));
        let connector = Connector::new(policy.clone(), Arc::new(tls), cfg.connect_timeout.get(), gate);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            // The pool is per host, not per endpoint: many endpoints on one HTTP/1.1 host (a
            // shared ingestion service) each need their connections kept, or every request
            // beyond the idle cap pays a new TLS handshake. The gate bounds them all together.
            .pool_max_idle_per_host(cfg.max_concurrency)
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(Sender { client, policy, request_timeout: cfg.request_timeout.get() })
    }

    /// Makes one attempt of delivery `msg_id` to `endpoint`.
    pub async fn attempt(&self, endpoint: &Endpoint, msg_id: &str, body: Bytes) -> Attempt {
        let started_at = chrono::Utc::now();
        let clock = Instant::now();
        let mut attempt = Attempt {
            status: None,
            failure: None,
            retry_after: None,
            error: None,
            started_at,
            duration: Duration::ZERO,
            response_snippet: String::new(),
        };
        if let Err(why) = check_target(&self.policy, &endpoint.url) {
            attempt.failure = Some(FailureKind::Refused);
            attempt.error = Some(why);
            return attempt;
        }
        let ts = started_at.timestamp();
        let signature = endpoint.signer.sign(msg_id, ts, &body);
        let request = hyper::Request::post(endpoint.url.as_str())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT))
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts)
            .header("webhook-signature", signature)
            .body(Full::new(body));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                attempt.failure = Some(FailureKind::Network);
                attempt.error = Some(format!("request failed: the URL cannot be sent to: {e}"));
                return attempt;
            }
        };
        // The whole attempt, connecting to reading the answer, within the request timeout.
        let answer = tokio::time::timeout(self.request_timeout, async {
            let resp = self.client.request(request).await.map_err(Failed::Client)?;
            // Its connection is not closed to make room while the body is still coming.
            let _reading = resp.extensions().get::<super::connect::InFlight>().map(super::connect::InFlight::reading);
            let (parts, mut body) = resp.into_parts();
            let mut read = 0usize;
            let mut snippet = Vec::new();
            let mut broken = None;
            while read < MAX_RESPONSE_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let Ok(chunk) = frame.into_data() else { continue };
                        if snippet.len() < SNIPPET_BYTES {
                            let take = (SNIPPET_BYTES - snippet.len()).min(chunk.len());
                            snippet.extend_from_slice(&chunk[..take]);
                        }
                        read += chunk.len();
                    }
                    Some(Err(e)) => {
                        broken = Some(Failed::Body(e));
                        break;
                    }
                    None => break,
                }
            }
            Ok::<_, Failed>((parts, snippet, broken))
        })
        .await
        .unwrap_or(Err(Failed::Timeout));
        match answer {
            Ok((parts, snippet, broken)) => {
                let status = parts.status;
                attempt.status = Some(status.as_u16());
                attempt.retry_after = parts.headers.get(RETRY_AFTER).and_then(parse_retry_after);
                attempt.response_snippet = safe_text(&String::from_utf8_lossy(&snippet), SNIPPET_BYTES).into_owned();
                // The status decides the outcome; a broken body only matters for a 2xx.
                if let (true, Some(e)) = (status.is_success(), broken) {
                    attempt.failure = Some(classify(&e));
                    attempt.error = Some(describe(&e));
                }
                if !status.is_success() {
                    attempt.failure = Some(FailureKind::Status);
                    attempt.error = Some(format!("HTTP {}", status.as_u16()));
                }
            }
            Err(e) => {
                attempt.failure = Some(classify(&e));
                attempt.error = Some(describe(&e));
            }
        }
        attempt.duration = clock.elapsed();
        make_texts_safe(&mut attempt);
        attempt
    }
}

fn check_target(policy: &AddressPolicy, url: &Url) -> Result<(), String> {
    if url.scheme() != "https" {
        return Err(format!("refused: scheme {} (only https)", url.scheme()));
    }
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => std::net::IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => std::net::IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err("refused: no host".into()),
    };
    policy.check(ip).map_err(|reason| format!("refused: {ip} is {reason}"))
}

fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(s).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

fn classify(e: &Failed) -> FailureKind {
    match e {
        Failed::Timeout => FailureKind::Timeout,
        Failed::Client(e) => classify_chain(e),
        Failed::Body(e) => classify_chain(e),
    }
}

/// Refused or local from anywhere in the error chain, else a network failure.
fn classify_chain(e: &(dyn std::error::Error + 'static)) -> FailureKind {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<crate::security::ssrf::Refused>() {
            return FailureKind::Refused;
        }
        if s.is::<GateFull>() || s.downcast_ref::<std::io::Error>().is_some_and(is_local_resource) {
            return FailureKind::Local;
        }
        source = s.source();
    }
    FailureKind::Network
}

/// The process or the system is out of descriptors or memory.
fn is_local_resource(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::OutOfMemory
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS))
}

/// The error chain in one line, without the URL (which could carry a token in its path).
fn describe(e: &Failed) -> String {
    let (head, top): (&str, Option<&(dyn std::error::Error + 'static)>) = match e {
        Failed::Timeout => return "timed out: no answer within dispatch.request_timeout".to_owned(),
        Failed::Client(e) if e.is_connect() => ("connect failed", std::error::Error::source(e)),
        Failed::Client(e) => ("request failed", std::error::Error::source(e)),
        Failed::Body(e) => ("reading the response failed", Some(e as &(dyn std::error::Error + 'static))),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut source = top;
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        head.to_owned()
    } else {
        format!("{head}: {}", parts.join(": "))
    }
}

/// The attempt's receiver- and network-derived texts, made safe to store.
fn make_texts_safe(attempt: &mut Attempt) {
    if let Some(e) = attempt.error.as_mut() {
        if let std::borrow::Cow::Owned(safe) = safe_text(e, ERROR_BYTES) {
            *e = safe;
        }
    }
    if let std::borrow::Cow::Owned(safe) = safe_text(&attempt.response_snippet, SNIPPET_BYTES) {
        attempt.response_snippet = safe;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error wrapping another, like hyper's connect error around the socket's.
    #[derive(Debug, thiserror::Error)]
    #[error("tcp open error")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn local_resource_failures_are_told_apart_from_network_ones() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            let e = Wrapped(std::io::Error::from_raw_os_error(errno));
            assert_eq!(classify_chain(&e), FailureKind::Local, "errno {errno}");
        }
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::ENETUNREACH] {
            let e = Wrapped(std::io::Error::from_raw_os_error(errno));
            assert_eq!(classify_chain(&e), FailureKind::Network, "errno {errno}");
        }
    }
}
