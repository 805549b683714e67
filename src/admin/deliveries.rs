//! An endpoint's deliveries, beside the endpoints themselves: their history
//! (`webhooks-deliveries`, filtered and paged by commit order), each delivery's attempts
//! (`webhooks-attempts`, with why each failed in words a customer can act on), and sending
//! them again: what failed (`webhooks-recover`), one delivery (`webhooks-redeliver`), a
//! window (`webhooks-replay`).
//!
//! What must hold of sending again (`store::recover`): a delivery keeps its id and
//! `webhook-id`; it joins its row's queue behind what of that row is pending, in commit order
//! among those requeued together; only deliveries the caller's account owns, of an active
//! endpoint, whose payload is still stored; a refused call changes nothing.
//!
//! What must hold (docs/architecture.md, invariants 3 and 7): a delivery is found only
//! through an endpoint of the caller's account (another account's looks missing); only
//! texts that were made safe when the attempt was recorded are shown (no control characters,
//! at most 1 KiB of the answer).

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::admin::endpoints::{invalid, Caller, EndpointError, Endpoints};
use crate::model::event::EventType;
use crate::store;
use crate::store::deliveries::AttemptRecord;
pub use crate::store::deliveries::DeliveryView;
use crate::store::recover::{Redelivery, Replayed};

/// What `webhooks-deliveries` asks for besides the endpoint and the page size.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only deliveries of this status.
    pub status: Option<String>,
    /// Only deliveries of this event type.
    pub event_type: Option<String>,
    /// Only deliveries after this cursor's place.
    pub after: Option<DeliveryCursor>,
}

/// Where a `webhooks-deliveries` page ends: the last delivery shown, by its change's place in
/// the commit order (which deliveries recorded later never precede).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCursor {
    commit_lsn: i64,
    seq: i32,
}

impl DeliveryCursor {
    /// The text handed to the client: `<commit position>.<place in the transaction>`, the
    /// OpenAPI document's pattern (any text of that pattern is a valid place to start from).
    pub fn encode(&self) -> String {
        format!("{}.{}", self.commit_lsn, self.seq)
    }

    /// Reads a cursor of that pattern.
    pub fn decode(text: &str) -> Result<Self, EndpointError> {
        let bad = || invalid("cursor is not one webhooks-deliveries returned");
        let (lsn, seq) = text.split_once('.').ok_or_else(bad)?;
        let digits = |t: &str, max: usize| !t.is_empty() && t.len() <= max && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(lsn, 18) || !digits(seq, 9) {
            return Err(bad());
        }
        Ok(DeliveryCursor { commit_lsn: lsn.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// An attempt as `webhooks-attempts` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptView {
    /// 1 for the first attempt.
    pub attempt: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took, in milliseconds.
    pub duration_ms: i32,
    /// The status received, if any.
    pub http_status_code: Option<i32>,
    /// `null` on 2xx; else the status (`HTTP 503`) or what kind of failure it was
    /// (`timeout`, `connection refused`, `TLS`, `DNS`, `refused by address policy`, …) and
    /// what was seen.
    pub error: Option<String>,
    /// The first 1 KiB of the answer, as text.
    pub response_snippet: Option<String>,
}

impl Endpoints {
    /// Up to `limit` deliveries of one of the caller's endpoints, newest commit first,
    /// matching `query`; with the cursor of the next page when more remain.
    pub async fn deliveries(
        &self,
        caller: Caller,
        endpoint_id: Uuid,
        query: HistoryQuery,
        limit: i64,
    ) -> Result<(Vec<DeliveryView>, Option<DeliveryCursor>), EndpointError> {
        if let Some(status) = query.status.as_deref() {
            if !["pending", "delivered", "failed"].contains(&status) {
                let shown: String = status.chars().take(32).collect();
                return Err(invalid(format!("status must be pending, delivered or failed, not {shown:?}")));
            }
        }
        if let Some(event_type) = query.event_type.as_deref() {
            if EventType::parse_sent(event_type).is_none() {
                let shown: String = event_type.chars().take(64).collect();
                return Err(invalid(format!("event_type: unknown event {shown:?}")));
            }
        }
        self.get(caller, endpoint_id).await?;
        let client = self.db().get().await?;
        let filter = store::deliveries::HistoryFilter {
            status: query.status.as_deref(),
            event_type: query.event_type.as_deref(),
            before: query.after.map(|c| (c.commit_lsn, c.seq)),
        };
        let mut rows = store::deliveries::history_of_endpoint(&**client, endpoint_id, filter, limit + 1).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit.max(0) as usize);
        let next = rows
            .last()
            .filter(|_| more)
            .map(|(_, (commit_lsn, seq))| DeliveryCursor { commit_lsn: *commit_lsn, seq: *seq });
        Ok((rows.into_iter().map(|(view, _)| view).collect(), next))
    }

    /// The newest `limit` attempts of one of the caller's deliveries, newest first.
    pub async fn attempts(
        &self,
        caller: Caller,
        delivery: Uuid,
        limit: i64,
    ) -> Result<Vec<AttemptView>, EndpointError> {
        let client = self.db().get().await?;
        let records = store::deliveries::attempts_in_account(&**client, caller.account_id, delivery, limit)
            .await?
            .ok_or(EndpointError::DeliveryNotFound)?;
        Ok(records.into_iter().map(view).collect())
    }
}

impl Endpoints {
    /// Requeues the failed deliveries of one of the caller's endpoints committed in
    /// `[since, until)` (empty when `since` is not before `until`); returns how many. The
    /// endpoint must be active: requeued deliveries of an inactive one would not be sent.
    pub async fn recover(
        &self,
        caller: Caller,
        id: Uuid,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<u64, EndpointError> {
        self.active_for("recovered", caller, id).await?;
        if since >= until {
            return Ok(0); // an empty window
        }
        let mut client = self.db().get().await?;
        Ok(store::recover::requeue_failed(&mut client, id, since, until).await?)
    }

    /// Sends one of the caller's deliveries again, whatever its status; returns it as it is
    /// now.
    pub async fn redeliver(&self, caller: Caller, delivery: Uuid) -> Result<DeliveryView, EndpointError> {
        // One pooled connection at a time: a call holding one while it waits for another
        // could, with enough of them at once, starve the pool it shares with delivery.
        let found = {
            let client = self.db().get().await?;
            store::deliveries::delivery_in_account(&**client, caller.account_id, delivery).await?
        };
        let (endpoint, _) = found.ok_or(EndpointError::DeliveryNotFound)?;
        self.active_for("redelivered", caller, endpoint).await?;
        let mut client = self.db().get().await?;
        match store::recover::redeliver(&mut client, endpoint, delivery).await? {
            Redelivery::Queued => {}
            Redelivery::PayloadUnavailable => return Err(EndpointError::PayloadUnavailable),
            Redelivery::NotFound => return Err(EndpointError::DeliveryNotFound), // deleted meanwhile
        }
        let now = store::deliveries::delivery_in_account(&**client, caller.account_id, delivery).await?;
        now.map(|(_, view)| view).ok_or(EndpointError::DeliveryNotFound)
    }

    /// Sends every finished delivery of one of the caller's endpoints committed in
    /// `[since, until)` again (only those of `event_types` when given).
    pub async fn replay(
        &self,
        caller: Caller,
        id: Uuid,
        window: (DateTime<Utc>, DateTime<Utc>),
        event_types: Option<&[String]>,
    ) -> Result<Replayed, EndpointError> {
        let event_types = event_types.map(crate::admin::endpoints::check_events).transpose()?;
        self.active_for("replayed", caller, id).await?;
        if window.0 >= window.1 {
            return Ok(Replayed::default()); // an empty window
        }
        let mut client = self.db().get().await?;
        Ok(store::recover::requeue_finished(&mut client, id, window, event_types.as_deref()).await?)
    }

    /// Endpoint `id` of the caller's account, refused when inactive: deliveries sent again
    /// (`what`) would wait unsent.
    async fn active_for(&self, what: &str, caller: Caller, id: Uuid) -> Result<(), EndpointError> {
        if self.get(caller, id).await?.is_active {
            return Ok(());
        }
        Err(EndpointError::InvalidRequest(format!(
            "the endpoint is inactive, so {what} deliveries would not be sent: enable it first \
             (webhooks-update with is_active true)"
        )))
    }
}

fn view(a: AttemptRecord) -> AttemptView {
    let error = error_text(a.error_kind.as_deref(), a.http_status_code, a.error.as_deref());
    AttemptView {
        attempt: a.attempt,
        started_at: a.started_at,
        duration_ms: a.duration_ms,
        http_status_code: a.http_status_code,
        error,
        response_snippet: a.response_snippet.filter(|s| !s.is_empty()),
    }
}

/// The attempt's failure as the customer reads it: the status, or the kind of failure first,
/// then what was recorded.
pub(crate) fn error_text(kind: Option<&str>, status: Option<i32>, detail: Option<&str>) -> Option<String> {
    let detail = detail.unwrap_or_default();
    let with = |head: &str| if detail.is_empty() { head.to_owned() } else { format!("{head}: {detail}") };
    match kind? {
        "status" => Some(status.map(|s| format!("HTTP {s}")).unwrap_or_else(|| with("HTTP error"))),
        "timeout" => Some(with("timeout")),
        "refused" => Some(with("refused by address policy")),
        "payload" => Some(with("payload unavailable")),
        "local" => Some(with("walhook could not send it now (out of connections or descriptors)")),
        _ => {
            let lower = detail.to_ascii_lowercase();
            let head = if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                "TLS"
            } else if lower.contains("connection refused") {
                "connection refused"
            } else if lower.contains("dns") || lower.contains("lookup") || lower.contains("resolve") {
                "DNS"
            } else if lower.contains("reset") || lower.contains("closed") || lower.contains("broken pipe") {
                "connection reset"
            } else {
                "network"
            };
            Some(with(head))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::endpoints::ListCursor;

    #[test]
    fn delivery_cursors_round_trip_and_forged_ones_are_refused() {
        let c = DeliveryCursor { commit_lsn: 123_456_789, seq: 7 };
        assert_eq!(c.encode(), "123456789.7");
        assert_eq!(DeliveryCursor::decode(&c.encode()).unwrap(), c);
        let widest = DeliveryCursor::decode("999999999999999999.999999999").unwrap();
        assert_eq!(widest, DeliveryCursor { commit_lsn: 999_999_999_999_999_999, seq: 999_999_999 });
        for forged in ["-1.0", "1.-1", "1", "1.2.3", "x.2", "9999999999999999999.1", "1.2147483648", "", ".", " 1.2"] {
            assert!(DeliveryCursor::decode(forged).is_err(), "{forged}");
        }
        assert!(ListCursor::decode(&c.encode()).is_err(), "a deliveries cursor is not a list cursor");
    }

    #[test]
    fn an_error_starts_with_the_status_or_the_kind_of_failure() {
        assert_eq!(error_text(None, Some(200), None), None);
        assert_eq!(error_text(Some("status"), Some(503), Some("HTTP 503")).as_deref(), Some("HTTP 503"));
        assert_eq!(
            error_text(Some("timeout"), None, Some("timed out: no answer within dispatch.request_timeout")).as_deref(),
            Some("timeout: timed out: no answer within dispatch.request_timeout")
        );
        let refused = "connect failed: tcp connect error: Connection refused (os error 111)";
        assert!(error_text(Some("network"), None, Some(refused)).unwrap().starts_with("connection refused: "));
        let tls = "connect failed: invalid peer certificate: UnknownIssuer";
        assert!(error_text(Some("network"), None, Some(tls)).unwrap().starts_with("TLS: "));
        let policy = "10.0.0.1 is in a private range";
        assert!(error_text(Some("refused"), None, Some(policy)).unwrap().starts_with("refused by address policy: "));
        assert_eq!(error_text(Some("network"), None, Some("odd")).as_deref(), Some("network: odd"));
    }
}
