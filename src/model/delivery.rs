//! Events and deliveries as they pass from routing to dispatch and the store, and the
//! endpoint as routing and dispatch see it.
//!
//! What must hold: event and delivery ids are derived from the change's [`Position`]
//! (commit LSN, place in the transaction) and the endpoint only, so a replay produces the same ids and a receiver can
//! deduplicate on `webhook-id`; outside unit tests an [`Endpoint`] is made only by
//! [`Endpoint::open`] (routing, the outbox and `webhooks-test` alike), so each signs with the same keys, a rotated-out one
//! included until its grace period ends.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::columns::UpdateColumns;
use crate::model::event::EventType;
use crate::model::position::Position;
use crate::model::progress::Ticket;
use crate::security::secrets::{SecretBox, SecretError};
use crate::security::sign::Signer;

/// What routing needs of an endpoint: the part kept per version (no URL, no secret).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Owning account.
    pub account_id: Uuid,
    /// Subscribed event names.
    pub events: Vec<String>,
    /// Enabled?
    pub is_active: bool,
    /// Why walhook disabled it itself (`None`: enabled, or disabled by hand).
    pub disabled_reason: Option<String>,
    /// Changed-column filters of updates (`None`: every update of a subscribed type).
    pub update_columns: Option<UpdateColumns>,
}

/// How an endpoint's requests are made, as its row stores them (secrets sealed or plain).
#[derive(Clone, PartialEq)]
pub struct Sending {
    /// Target URL.
    pub url: String,
    /// The signing secret (or `v1a` private key) as stored.
    pub secret: String,
    /// The secret a rotation replaced, as stored, while one is kept.
    pub previous_secret: Option<String>,
    /// When the replaced secret stops signing.
    pub previous_expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Sending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending")
            .field("url", &self.url)
            .field("previous_expires_at", &self.previous_expires_at)
            .finish_non_exhaustive()
    }
}

/// Why an endpoint cannot be sent to. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A stored secret cannot be opened (wrong or missing `secrets.encryption_key`).
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The stored URL does not parse (the admin API never lets such a URL through).
    #[error("stored endpoint URL does not parse: {0}")]
    Url(#[from] url::ParseError),
}
/// A webhook endpoint as routing and dispatch need it.
#[derive(Debug)]
pub struct Endpoint {
    /// Endpoint id.
    pub id: Uuid,
    /// Owning account.
    pub account_id: Uuid,
    /// Target URL, parsed once.
    pub url: url::Url,
    /// [`EventType::bit`] of each subscribed event type.
    pub events: u16,
    /// Enabled?
    pub is_active: bool,
    /// Disabled by walhook itself (410 Gone, or failing too long): what waits for it fails.
    pub auto_disabled: bool,
    /// Changed-column filters of updates.
    pub update_columns: Option<Arc<UpdateColumns>>,
    /// Signs bodies with the endpoint's secret (and a rotated-out one during its grace).
    pub signer: Signer,
}

impl Endpoint {
    /// Endpoint `id` as routing and dispatch use it: its routing state, and its stored URL and
    /// secrets opened with `secrets`. The one way an [`Endpoint`] is made.
    pub fn open(id: Uuid, routing: &Routing, sending: &Sending, secrets: &SecretBox) -> Result<Endpoint, OpenError> {
        let url = url::Url::parse(&sending.url)?;
        let mut signer = Signer::new(&secrets.open(&sending.secret, id)?)?;
        // (One whose grace period has ended signs nothing: it is not even opened.)
        if let (Some(previous), Some(until)) = (&sending.previous_secret, sending.previous_expires_at) {
            if until > Utc::now() {
                signer = signer.with_previous(&secrets.open(previous, id)?, until.into())?;
            }
        }
        Ok(Endpoint {
            id,
            account_id: routing.account_id,
            url,
            events: event_mask(&routing.events),
            is_active: routing.is_active,
            auto_disabled: !routing.is_active && routing.disabled_reason.is_some(),
            update_columns: routing.update_columns.clone().filter(|f| !f.is_empty()).map(Arc::new),
            signer,
        })
    }
}

/// Bitmask of the named events (unknown names ignored).
pub fn event_mask<S: AsRef<str>>(names: &[S]) -> u16 {
    names.iter().filter_map(|n| EventType::parse(n.as_ref())).fold(0, |m, e| m | e.bit())
}

/// One change, as every endpoint receives it.
#[derive(Debug)]
pub struct Event {
    /// Derived from its position.
    pub id: Uuid,
    /// Account of the row.
    pub account_id: Uuid,
    /// e.g. `contact.created`.
    pub event_type: EventType,
    /// `table:id`.
    pub entity_key: String,
    /// Where the change sits in the stream.
    pub position: Position,
    /// Commit time, microseconds since the Unix epoch.
    pub committed_at_us: i64,
    /// The exact body to POST.
    pub body: Bytes,
}

/// One event for one endpoint.
#[derive(Debug)]
pub struct Delivery {
    /// Derived from (commit LSN, seq, endpoint); also the `webhook-id`.
    pub id: Uuid,
    /// Where it goes.
    pub endpoint: Arc<Endpoint>,
    /// What goes.
    pub event: Arc<Event>,
    /// Settles the source transaction once this delivery is durable.
    pub ticket: Option<Ticket>,
}

/// Id of the event at `at`.
pub fn event_id(at: Position) -> Uuid {
    derive_id(b"walhook:event", at, None)
}

/// Id of that event's delivery to `endpoint`.
pub fn delivery_id(at: Position, endpoint: Uuid) -> Uuid {
    derive_id(b"walhook:delivery", at, Some(endpoint))
}

/// An id from `domain`, `key`, `bytes` and, for a delivery, its `endpoint` (a backfill's
/// event and delivery ids: the same on every read of the row).
pub fn keyed_id(domain: &[u8], key: Uuid, bytes: &[u8], endpoint: Option<Uuid>) -> Uuid {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(key.as_bytes());
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
    finish_id(h, endpoint)
}

fn derive_id(domain: &[u8], at: Position, endpoint: Option<Uuid>) -> Uuid {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(at.commit_lsn.to_be_bytes());
    h.update(at.seq.to_be_bytes());
    finish_id(h, endpoint)
}

/// `h` after `endpoint` (for a delivery's id), its digest's first 16 bytes as a UUID.
fn finish_id(mut h: Sha256, endpoint: Option<Uuid>) -> Uuid {
    if let Some(e) = endpoint {
        h.update(e.as_bytes());
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    Uuid::new_v8(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let e = Uuid::from_u128(7);
        assert_eq!(delivery_id(Position::new(10, 1), e), delivery_id(Position::new(10, 1), e));
        assert_ne!(delivery_id(Position::new(10, 1), e), delivery_id(Position::new(10, 2), e));
        assert_ne!(delivery_id(Position::new(10, 1), e), delivery_id(Position::new(11, 1), e));
        assert_ne!(delivery_id(Position::new(10, 1), e), delivery_id(Position::new(10, 1), Uuid::from_u128(8)));
        assert_ne!(event_id(Position::new(10, 1)), delivery_id(Position::new(10, 1), e));
    }

    #[test]
    fn masks_cover_the_twelve_events() {
        assert_eq!(event_mask(&["contact.created", "project.deleted", "bogus"]).count_ones(), 2);
        assert_eq!(event_mask(&EventType::ALL.map(EventType::name)), 0x0fff);
    }

    /// Ids are stored and sent as `webhook-id`: these were computed before `Position` existed
    /// and must never change.
    #[test]
    fn ids_stay_what_they_were() {
        let e = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let known = [
            (0u64, 0u32, "3bd9e83b-3417-8958-a9e5-28fe11cb5356", "91342155-6bf4-893d-8581-86133e05abdd"),
            (0x1A2B3C8, 1, "dff4d667-1ec4-8ec9-9ed4-a898ad357757", "4fb09f02-1d90-80b1-8153-e9d8945fe101"),
            (0xFFFF_FFFF_0000_0001, 7, "6a4b44a9-2c16-84fe-8cb7-f77abb2d40df", "3e1abcde-3490-8fec-8c23-d70555bde95b"),
            (0x3000, 1, "27d953a0-b94f-8e66-b747-80746aa264a3", "f578c876-bf8e-821c-8e95-5d99f0b119a4"),
        ];
        for (lsn, seq, event, delivery) in known {
            assert_eq!(event_id(Position::new(lsn, seq)).to_string(), event, "event id at {lsn:#x}/{seq}");
            assert_eq!(delivery_id(Position::new(lsn, seq), e).to_string(), delivery, "delivery id at {lsn:#x}/{seq}");
        }
    }

    /// Masks are computed from stored event names on every load; their bits must not move.
    #[test]
    fn masks_stay_what_they_were() {
        assert_eq!(event_mask(&["contact.created"]), 0x0001);
        assert_eq!(event_mask(&["company.updated", "project.deleted"]), 0x0810);
        assert_eq!(event_mask(&["activity.deleted", "activity.created", "bogus"]), 0x0140);
        assert_eq!(event_mask(&["contact.deleted", "company.created"]), 0x000c);
        assert_eq!(event_mask::<&str>(&[]), 0);
    }
}
