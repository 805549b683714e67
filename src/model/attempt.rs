//! One attempt's result as every stage sees it: the status, how it failed, and the texts
//! kept from the receiver.
//!
//! What must hold: every text taken from a receiver or the network is made safe to store and
//! to log ([`safe_text`]: no control characters, cut at a character boundary) before it
//! leaves the HTTP client.

use std::time::Duration;

/// Response bytes kept for the attempt record.
pub const SNIPPET_BYTES: usize = 1024;
/// Bytes of an attempt's error text kept at most.
pub const ERROR_BYTES: usize = 1024;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Non-2xx status.
    Status,
    /// No answer within the timeout.
    Timeout,
    /// Connection refused, reset, TLS failure, DNS failure…
    Network,
    /// The target is not allowed (scheme or address).
    Refused,
    /// walhook itself ran out of a resource (file descriptors, memory) before reaching the
    /// receiver: retried soon, without spending one of the delivery's scheduled attempts.
    Local,
    /// The delivery's payload is gone from `walhook.events` (nothing was sent): it fails at
    /// once, as no later attempt could send it either.
    Payload,
}

impl FailureKind {
    /// The `walhook.attempts.error_kind` of this failure.
    pub fn record_name(self) -> &'static str {
        match self {
            FailureKind::Status => "status",
            FailureKind::Timeout => "timeout",
            FailureKind::Network => "network",
            FailureKind::Refused => "refused",
            FailureKind::Payload => "payload",
            // Never recorded as an attempt (see `StoreOp::Release`); kept within the column's
            // CHECK constraint should one ever get here.
            FailureKind::Local => "network",
        }
    }
}

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// HTTP status, when one was received.
    pub status: Option<u16>,
    /// `None` on 2xx.
    pub failure: Option<FailureKind>,
    /// Seconds asked for by `Retry-After`, if any.
    pub retry_after: Option<Duration>,
    /// Short description of a failure (never secrets or bodies).
    pub error: Option<String>,
    /// Start of the attempt.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// How long it took.
    pub duration: Duration,
    /// First bytes of the response body.
    pub response_snippet: String,
}

impl Attempt {
    /// Whether the receiver answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// Outcome class for metrics: 2xx, 3xx, 4xx, 5xx, timeout, network, refused, local
    /// (`payload` is never sent, so never counted as an attempt).
    pub fn class(&self) -> &'static str {
        match (self.failure, self.status) {
            (None, _) => "2xx",
            (Some(FailureKind::Timeout), _) => "timeout",
            (Some(FailureKind::Network), _) => "network",
            (Some(FailureKind::Refused), _) => "refused",
            (Some(FailureKind::Local), _) => "local",
            (Some(FailureKind::Payload), _) => "payload",
            (Some(FailureKind::Status), Some(300..=399)) => "3xx",
            (Some(FailureKind::Status), Some(400..=499)) => "4xx",
            (Some(FailureKind::Status), _) => "5xx",
        }
    }
}

/// `text` without NUL and other control characters (newline and tab are kept) and without
/// invisible format or separator characters (a right-to-left override, a zero-width space:
/// `security::invisible`), cut to at most `max_bytes` at a character boundary: what a receiver
/// sends (any bytes, read as lossy UTF-8) can always be stored in a PostgreSQL text column,
/// printed in a log and shown by the API as what it is. Borrows when nothing changes.
pub fn safe_text(text: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| (c.is_control() && c != '\n' && c != '\t') || crate::security::invisible::is_invisible(c);
    if text.len() <= max_bytes && !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max_bytes));
    for c in text.chars().filter(|&c| !unsafe_char(c)) {
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::safe_text;

    #[test]
    fn control_characters_go_and_the_cut_is_at_a_char_boundary() {
        assert_eq!(safe_text("ok\u{0}\u{fffd}\n\tx\u{1b}[31m\u{7f}\u{85}", 100), "ok\u{fffd}\n\tx[31m");
        assert_eq!(safe_text(&String::from_utf8_lossy(b"ok\x00\xff"), 100), "ok\u{fffd}");
        assert_eq!(safe_text("é".repeat(10).as_str(), 5), "éé");
        assert!(matches!(safe_text("plain text", 100), std::borrow::Cow::Borrowed(_)));
        assert_eq!(safe_text("", 0), "");
        assert_eq!(safe_text("hello\u{202E}olleh\u{200B}!\u{2028}", 100), "helloolleh!", "invisible ones go too");
        assert_eq!(safe_text("👨\u{200D}👩", 100), "👨\u{200D}👩", "a joiner stays (emoji sequences)");
    }
}
