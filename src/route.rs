//! Route: which endpoints receive an event.
//!
//! What must hold (invariant 3): an event goes only to active endpoints whose `account_id`
//! equals the row's `account_id` and that subscribe to its event type. The endpoint set is
//! loaded at start and then changed only by `walhook.endpoints` rows from the replication
//! stream, so routing sees endpoint changes in LSN order with the CRM rows. Delivery and
//! event ids are derived from (commit LSN, position in transaction[, endpoint]) so a replay
//! produces the same ids.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::{Db, DbError};
use crate::decode::{self, EndpointRow, RowChange};
use crate::progress::Ticket;
use crate::secrets::SecretBox;
use crate::sign::Signer;

/// A webhook endpoint as routing and dispatch need it.
#[derive(Debug)]
pub struct Endpoint {
    /// Endpoint id.
    pub id: Uuid,
    /// Owning account.
    pub account_id: Uuid,
    /// Target URL, parsed once.
    pub url: url::Url,
    /// Bit `i` set: subscribed to the `i`-th of [`decode::all_event_types`].
    pub events: u16,
    /// Enabled?
    pub is_active: bool,
    /// Disabled by walhook itself (410 Gone, or failing too long): what waits for it fails.
    pub auto_disabled: bool,
    /// Signs bodies with the endpoint's secret.
    pub signer: Signer,
}

/// Bitmask of the named events (unknown names ignored).
pub fn event_mask<S: AsRef<str>>(names: &[S]) -> u16 {
    decode::all_event_types()
        .enumerate()
        .filter(|(_, e)| names.iter().any(|n| n.as_ref() == *e))
        .fold(0, |m, (i, _)| m | (1 << i))
}

fn event_bit(event_type: &str) -> u16 {
    decode::all_event_types().position(|e| e == event_type).map(|i| 1 << i).unwrap_or(0)
}

/// An endpoint's URL; `None` (logged) when the stored text is not a URL, which the admin
/// API never lets through.
pub fn parse_url(endpoint: Uuid, text: &str) -> Option<url::Url> {
    match url::Url::parse(text) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "stored endpoint URL does not parse; endpoint skipped");
            None
        }
    }
}

/// One change, as every endpoint receives it.
#[derive(Debug)]
pub struct Event {
    /// Derived from (commit LSN, seq).
    pub id: Uuid,
    /// Account of the row.
    pub account_id: Uuid,
    /// e.g. `contact.created`.
    pub event_type: &'static str,
    /// `table:id`.
    pub entity_key: String,
    /// LSN of the source transaction's commit record.
    pub commit_lsn: u64,
    /// Position of the change in its transaction.
    pub seq: u32,
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

/// Id of the event at (`commit_lsn`, `seq`).
pub fn event_id(commit_lsn: u64, seq: u32) -> Uuid {
    derive_id(b"walhook:event", commit_lsn, seq, None)
}

/// Id of that event's delivery to `endpoint`.
pub fn delivery_id(commit_lsn: u64, seq: u32, endpoint: Uuid) -> Uuid {
    derive_id(b"walhook:delivery", commit_lsn, seq, Some(endpoint))
}

fn derive_id(domain: &[u8], commit_lsn: u64, seq: u32, endpoint: Option<Uuid>) -> Uuid {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(commit_lsn.to_be_bytes());
    h.update(seq.to_be_bytes());
    if let Some(e) = endpoint {
        h.update(e.as_bytes());
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    Uuid::new_v8(b)
}

/// Errors while loading endpoints.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Reading `walhook.endpoints` failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored secret cannot be opened (wrong or missing `secrets.encryption_key`).
    #[error("endpoint {id}: {cause}")]
    Secret {
        /// The endpoint.
        id: Uuid,
        /// Why.
        cause: crate::secrets::SecretError,
    },
}

/// The endpoint set, by account.
#[derive(Debug)]
pub struct Router {
    by_account: HashMap<Uuid, Vec<Arc<Endpoint>>>,
    secrets: SecretBox,
}

impl Router {
    /// Loads every endpoint.
    pub async fn load(db: &Db, secrets: SecretBox) -> Result<Router, RouteError> {
        let client = db.get().await?;
        let rows = client
            .query(
                "SELECT id, account_id, url, secret, events, is_active, disabled_reason IS NOT NULL FROM walhook.endpoints",
                &[],
            )
            .await
            .map_err(DbError::from)?;
        let mut router = Router { by_account: HashMap::new(), secrets };
        for r in rows {
            let id: Uuid = r.get(0);
            let stored: String = r.get(3);
            let secret = router.secrets.open(&stored).map_err(|cause| RouteError::Secret { id, cause })?;
            let signer = Signer::new(&secret).map_err(|cause| RouteError::Secret { id, cause })?;
            let events: Vec<String> = r.get(4);
            let Some(url) = parse_url(id, &r.get::<_, String>(2)) else { continue };
            router.insert(Endpoint {
                id,
                account_id: r.get(1),
                url,
                events: event_mask(&events),
                is_active: r.get(5),
                auto_disabled: !r.get::<_, bool>(5) && r.get::<_, bool>(6),
                signer,
            });
        }
        Ok(router)
    }

    fn insert(&mut self, ep: Endpoint) {
        self.remove(ep.id);
        self.by_account.entry(ep.account_id).or_default().push(Arc::new(ep));
    }

    fn find(&self, id: Uuid) -> Option<&Arc<Endpoint>> {
        self.by_account.values().flatten().find(|e| e.id == id)
    }

    /// The endpoint `id`, if known.
    pub fn get(&self, id: Uuid) -> Option<Arc<Endpoint>> {
        self.find(id).cloned()
    }

    /// Removes an endpoint (deleted through the API).
    pub fn remove(&mut self, id: Uuid) {
        self.by_account.retain(|_, eps| {
            eps.retain(|e| e.id != id);
            !eps.is_empty()
        });
    }

    /// Applies an inserted or updated endpoint row; fields absent from the row image keep
    /// their current value.
    pub fn apply(&mut self, row: EndpointRow) {
        let Some(id) = row.id else { return };
        let current = self.find(id).cloned();
        let signer = match (&row.secret, &current) {
            (Some(stored), _) => match self.secrets.open(stored).and_then(|s| Signer::new(&s)) {
                Ok(signer) => signer,
                Err(e) => {
                    tracing::error!(endpoint = %id, error = %e, "cannot open endpoint secret; endpoint skipped");
                    return self.remove(id);
                }
            },
            (None, Some(cur)) => cur.signer.clone(),
            (None, None) => return,
        };
        let events = match (&row.events, &current) {
            (Some(names), _) => event_mask(names),
            (None, Some(cur)) => cur.events,
            (None, None) => 0,
        };
        let url = match (&row.url, &current) {
            (Some(text), _) => parse_url(id, text),
            (None, Some(cur)) => Some(cur.url.clone()),
            (None, None) => None,
        };
        let (Some(account_id), Some(url)) = (row.account_id.or(current.as_ref().map(|c| c.account_id)), url) else {
            return self.remove(id);
        };
        let is_active = row.is_active.or(current.as_ref().map(|c| c.is_active)).unwrap_or(false);
        let auto_disabled = !is_active && row.disabled_reason.is_some();
        self.insert(Endpoint { id, account_id, url, events, is_active, auto_disabled, signer });
    }

    /// The endpoints that receive `change`: same account, active, subscribed.
    pub fn targets<'a>(&'a self, change: &'a RowChange) -> impl Iterator<Item = &'a Arc<Endpoint>> + 'a {
        let bit = event_bit(change.event_type);
        change
            .account_id
            .and_then(|a| self.by_account.get(&a))
            .into_iter()
            .flatten()
            .filter(move |e| e.is_active && e.events & bit != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let e = Uuid::from_u128(7);
        assert_eq!(delivery_id(10, 1, e), delivery_id(10, 1, e));
        assert_ne!(delivery_id(10, 1, e), delivery_id(10, 2, e));
        assert_ne!(delivery_id(10, 1, e), delivery_id(11, 1, e));
        assert_ne!(delivery_id(10, 1, e), delivery_id(10, 1, Uuid::from_u128(8)));
        assert_ne!(event_id(10, 1), delivery_id(10, 1, e));
    }

    #[test]
    fn masks_cover_the_twelve_events() {
        assert_eq!(event_mask(&["contact.created", "project.deleted", "bogus"]).count_ones(), 2);
        assert_eq!(event_mask(&decode::all_event_types().collect::<Vec<_>>()), 0x0fff);
    }
}
