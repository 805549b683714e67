//! Route: which endpoints receive an event.
//!
//! What must hold (docs/architecture.md, invariant 3): an event goes only to active endpoints whose `account_id`
//! equals the row's `account_id` and that subscribe to its event type. A change is routed
//! with the endpoint set as it was at its commit position: each session starts from the
//! routing versions valid at the slot's confirmed position ([`crate::source::route_versions`]), and
//! the set then changes only by `walhook.endpoints` rows from the replication stream, in LSN
//! order with the CRM rows, so a replay routes exactly as the first pass did. Only routing
//! (account, events, active) is versioned; URL and secret are the endpoint's current ones.
//! Delivery and event ids are derived from (commit LSN, position in transaction[, endpoint])
//! so a replay produces the same ids.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use uuid::Uuid;

pub use crate::model::delivery::Routing;
use crate::model::delivery::{Endpoint, OpenError, Sending};
use crate::model::event::Op;
use crate::pg::db::{Db, DbError};
use crate::security::secrets::SecretBox;
use crate::source::decode::{EndpointRow, RowChange};

/// Errors while loading endpoints.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Reading `walhook.endpoints` failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored secret cannot be opened (wrong or missing `secrets.encryption_key`).
    #[error("endpoint {id}: {cause}")]
    Open {
        /// The endpoint.
        id: Uuid,
        /// Why.
        cause: OpenError,
    },
}

/// The endpoint set, by account.
#[derive(Debug)]
pub struct Router {
    by_account: HashMap<Uuid, Vec<Arc<Endpoint>>>,
    /// Routing state of every endpoint known, routable or not (an endpoint without a usable
    /// URL or secret is known but receives nothing).
    routing: HashMap<Uuid, Routing>,
    /// How requests of each routable endpoint are made (URL and stored secrets), as last read.
    sending: HashMap<Uuid, Sending>,
    /// Endpoints changed by the transaction being read (`false`: deleted).
    changed: HashMap<Uuid, bool>,
    /// The last `requeue_tag` seen of each endpoint, and those whose value moved in the
    /// transaction being read (`webhooks-recover` requeued deliveries of theirs).
    requeued: HashMap<Uuid, i64>,
    requeued_now: Vec<(Uuid, i64)>,
    secrets: SecretBox,
    /// (endpoint, column) pairs of filters naming a column the table lacks, already logged.
    unknown_columns: std::sync::Mutex<HashSet<(Uuid, String)>>,
}

impl Router {
    /// An empty endpoint set.
    pub fn new(secrets: SecretBox) -> Router {
        Router {
            by_account: HashMap::new(),
            routing: HashMap::new(),
            sending: HashMap::new(),
            changed: HashMap::new(),
            requeued: HashMap::new(),
            requeued_now: Vec::new(),
            secrets,
            unknown_columns: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Loads every endpoint as it is now (start-up check that every secret opens; sessions
    /// route with the versioned set of [`crate::source::route_versions::load`]).
    pub async fn load(db: &Db, secrets: SecretBox) -> Result<Router, RouteError> {
        let client = db.get().await?;
        let rows = crate::store::endpoints::all(&**client).await?;
        let mut router = Router::new(secrets);
        for e in rows {
            router.set(e.id, e.routing(), Some(e.sending()))?;
        }
        Ok(router)
    }

    /// Sets endpoint `id`'s routing state and, when given, how its requests are made. A secret
    /// that cannot be opened is an error (a wrong or missing key is the operator's to fix); a
    /// stored URL that does not parse leaves the endpoint unroutable (logged), so one bad row
    /// never stops the others.
    pub fn set(&mut self, id: Uuid, routing: Routing, sending: Option<Sending>) -> Result<(), RouteError> {
        self.routing.insert(id, routing);
        let Some(sending) = sending else {
            self.unroute(id);
            return Ok(());
        };
        match self.route_with(id, sending) {
            Err(OpenError::Url(e)) => {
                tracing::error!(endpoint = %id, error = %e, "stored endpoint URL does not parse; endpoint skipped");
                Ok(())
            }
            r => r.map_err(|cause| RouteError::Open { id, cause }),
        }
    }

    /// Like [`Router::set`] for a change read from the stream: an endpoint that cannot be
    /// opened is left unroutable (logged).
    pub fn refresh(&mut self, id: Uuid, sending: Sending) {
        if !self.routing.contains_key(&id) {
            return;
        }
        if let Err(e) = self.route_with(id, sending) {
            tracing::error!(endpoint = %id, error = %e, "cannot open endpoint; endpoint skipped");
        }
    }

    /// Opens endpoint `id` with `sending` and its routing state, and routes to it; on error it
    /// receives nothing.
    fn route_with(&mut self, id: Uuid, sending: Sending) -> Result<(), OpenError> {
        self.unroute(id);
        let Some(routing) = self.routing.get(&id) else { return Ok(()) };
        let ep = Endpoint::open(id, routing, &sending, &self.secrets)?;
        self.sending.insert(id, sending);
        self.by_account.entry(ep.account_id).or_default().push(Arc::new(ep));
        Ok(())
    }

    /// Stops sending to `id` (its routing state is kept).
    pub fn unroute(&mut self, id: Uuid) {
        self.sending.remove(&id);
        self.by_account.retain(|_, eps| {
            eps.retain(|e| e.id != id);
            !eps.is_empty()
        });
    }

    fn find(&self, id: Uuid) -> Option<&Arc<Endpoint>> {
        self.by_account.values().flatten().find(|e| e.id == id)
    }

    /// The endpoint `id`, if routable.
    pub fn get(&self, id: Uuid) -> Option<Arc<Endpoint>> {
        self.find(id).cloned()
    }

    /// The routing state of endpoint `id`, if known.
    #[cfg(test)]
    pub fn routing(&self, id: Uuid) -> Option<&Routing> {
        self.routing.get(&id)
    }

    /// Removes an endpoint (deleted through the API).
    pub fn remove(&mut self, id: Uuid) {
        self.routing.remove(&id);
        self.unroute(id);
        self.changed.insert(id, false);
    }

    /// Applies an inserted or updated endpoint row; fields absent from the row image
    /// (unchanged TOAST) keep their current value. The commit then reads the endpoint's
    /// current URL and secrets ([`Router::refresh`]).
    pub fn apply(&mut self, row: EndpointRow) {
        let Some(id) = row.id else { return };
        let current = self.routing.get(&id).cloned();
        let Some(account_id) = row.account_id.or(current.as_ref().map(|c| c.account_id)) else {
            tracing::error!(endpoint = %id, "endpoint row without account_id; endpoint skipped");
            return;
        };
        let routing = Routing {
            account_id,
            events: row.events.or(current.as_ref().map(|c| c.events.clone())).unwrap_or_default(),
            is_active: row.is_active.or(current.as_ref().map(|c| c.is_active)).unwrap_or(false),
            disabled_reason: row.disabled_reason,
            update_columns: match row.update_columns {
                Some(filter) => filter,
                None => current.as_ref().and_then(|c| c.update_columns.clone()),
            },
        };
        self.changed.insert(id, true);
        if let Some(tag) = row.requeue_tag {
            if self.requeued.get(&id) != Some(&tag) {
                // (Also the first time a session sees it: a needless spill at most.)
                self.requeued.insert(id, tag);
                self.requeued_now.push((id, tag));
            }
        }
        let known = self.sending.get(&id).cloned();
        self.routing.insert(id, routing);
        // URL and secret: from the row, else as they were; a rotated-out secret as it was.
        let sending = match (row.url, row.secret, known) {
            (Some(url), Some(secret), known) => Some(Sending {
                url,
                secret,
                previous_secret: known.as_ref().and_then(|k| k.previous_secret.clone()),
                previous_expires_at: known.and_then(|k| k.previous_expires_at),
            }),
            (url, secret, Some(known)) => {
                Some(Sending { url: url.unwrap_or(known.url), secret: secret.unwrap_or(known.secret), ..known })
            }
            (_, _, None) => None,
        };
        match sending {
            Some(sending) => self.refresh(id, sending),
            None => self.unroute(id),
        }
    }

    /// The endpoints changed by the transaction read so far, with their new routing state
    /// (`None`: deleted); clears the list.
    pub fn take_changed(&mut self) -> Vec<(Uuid, Option<Routing>)> {
        let changed = std::mem::take(&mut self.changed);
        changed.into_iter().map(|(id, alive)| (id, alive.then(|| self.routing.get(&id).cloned()).flatten())).collect()
    }

    /// The endpoints whose deliveries the transaction read so far requeued, each with the
    /// requeue's tag (`requeue_tag`, as read); clears the list.
    pub fn take_requeued(&mut self) -> Vec<(Uuid, i64)> {
        std::mem::take(&mut self.requeued_now)
    }

    /// Forgets the changes of a transaction that will be read again.
    pub fn clear_changed(&mut self) {
        self.changed.clear();
        // Read again, its requeues are told again.
        for (id, _) in self.requeued_now.drain(..) {
            self.requeued.remove(&id);
        }
    }

    /// The endpoints that receive `change`: same account, active, subscribed, and for an
    /// update, passing the endpoint's changed-column filter of that table.
    pub fn targets<'a>(&'a self, change: &'a RowChange) -> impl Iterator<Item = &'a Arc<Endpoint>> + 'a {
        let bit = change.event_type.bit();
        change
            .account_id
            .and_then(|a| self.by_account.get(&a))
            .into_iter()
            .flatten()
            .filter(move |e| e.is_active && e.events & bit != 0 && self.passes_filter(e, change))
    }

    /// Whether `change` passes `endpoint`'s changed-column filter (only updates are filtered).
    fn passes_filter(&self, endpoint: &Endpoint, change: &RowChange) -> bool {
        let Some(filter) = endpoint.update_columns.as_deref() else { return true };
        if change.event_type.op != Op::Updated {
            return true;
        }
        let table = change.event_type.table.name();
        match (filter.of(table), &change.changed) {
            // A table the filter does not name; or which columns changed is not known (the old
            // row is not in the stream): the update is not provably irrelevant, so it passes.
            (None, _) | (Some(_), None) => true,
            (Some(columns), Some(changed)) => {
                for column in columns.iter().filter(|c| !changed.knows(c)) {
                    // Renamed or dropped since the filter was set: it never matches. Said once
                    // per session, so an operator can tell the customer why updates stopped.
                    if self.unknown_columns.lock().is_ok_and(|mut told| told.insert((endpoint.id, column.clone()))) {
                        tracing::warn!(
                            endpoint = %endpoint.id,
                            table,
                            column = %column,
                            "an update_columns filter names a column the table no longer has (renamed or dropped?); \
                             it never matches until the filter is set again"
                        );
                    }
                }
                changed.any_of(columns)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: Uuid) -> EndpointRow {
        EndpointRow {
            id: Some(id),
            account_id: Some(Uuid::from_u128(1)),
            url: Some("https://example.com/hook".into()),
            secret: Some(format!("whsec_{}", "A".repeat(43) + "=")),
            events: Some(vec!["contact.created".into()]),
            is_active: Some(true),
            disabled_reason: None,
            requeue_tag: None,
            update_columns: None,
        }
    }

    #[test]
    fn a_requeue_is_told_once_per_new_tag() {
        let mut router = Router::new(SecretBox::new(None).unwrap());
        let e = Uuid::from_u128(7);
        router.apply(row(e));
        assert!(router.take_requeued().is_empty());
        let at = |tag: i64| EndpointRow { requeue_tag: Some(tag), ..row(e) };
        router.apply(at(501));
        assert_eq!(router.take_requeued(), [(e, 501)]);
        router.apply(at(501));
        assert!(router.take_requeued().is_empty(), "the same tag is no new requeue");
        router.apply(at(502));
        assert_eq!(router.take_requeued(), [(e, 502)]);
        // A transaction read again (after it was forgotten) tells its requeue again.
        router.apply(at(503));
        router.clear_changed();
        router.apply(at(503));
        assert_eq!(router.take_requeued(), [(e, 503)]);
    }

    #[test]
    fn an_update_keeps_unchanged_toast_fields_and_every_change_is_listed_once() {
        let mut router = Router::new(SecretBox::new(None).unwrap());
        let (e, f) = (Uuid::from_u128(7), Uuid::from_u128(8));
        router.apply(row(e));
        router.apply(row(f));
        // An update whose row image lacks the (unchanged, TOASTed) events, URL and secret.
        router.apply(EndpointRow { id: Some(e), is_active: Some(false), ..Default::default() });
        router.remove(f);
        let mut changed = router.take_changed();
        changed.sort_by_key(|(id, _)| *id);
        let merged = Routing {
            account_id: Uuid::from_u128(1),
            events: vec!["contact.created".into()],
            is_active: false,
            disabled_reason: None,
            update_columns: None,
        };
        assert_eq!(changed, vec![(e, Some(merged)), (f, None)]);
        assert!(router.take_changed().is_empty());
        let ep = router.get(e).expect("still routable with its URL and secret");
        assert!(!ep.is_active && ep.events != 0);
        assert!(router.get(f).is_none() && router.routing(f).is_none());
    }

    #[test]
    fn an_update_reaches_a_filtered_endpoint_only_when_a_listed_column_changed_or_it_cannot_tell() {
        use crate::model::columns::UpdateColumns;
        use crate::model::event::{EventType, Op, Table};
        use crate::source::changed::ChangedColumns;
        let mut router = Router::new(SecretBox::new(None).unwrap());
        let e = Uuid::from_u128(7);
        let filter = UpdateColumns([("contacts".to_owned(), vec!["email".to_owned()])].into());
        router.apply(EndpointRow {
            events: Some(vec!["contact.updated".into(), "contact.created".into(), "company.updated".into()]),
            update_columns: Some(Some(filter)),
            ..row(e)
        });
        let names: std::sync::Arc<[String]> = ["id".to_owned(), "first_name".into(), "email".into()].into();
        let change = |table, op, marked: Option<&[usize]>| RowChange {
            event_type: EventType::new(table, op),
            account_id: Some(Uuid::from_u128(1)),
            entity_key: "k".into(),
            body: bytes::Bytes::new(),
            changed: marked.map(|m| {
                let mut c = ChangedColumns::new(names.clone());
                m.iter().for_each(|&i| c.mark(i));
                c
            }),
            whole: true,
        };
        let reaches = |router: &Router, c: &RowChange| router.targets(c).count() == 1;
        assert!(reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[2]))), "email changed");
        assert!(!reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[1]))), "only first_name changed");
        assert!(!reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[]))), "nothing changed");
        assert!(reaches(&router, &change(Table::Contacts, Op::Updated, None)), "the old row is not known");
        assert!(reaches(&router, &change(Table::Contacts, Op::Created, None)), "created is not filtered");
        assert!(
            reaches(&router, &change(Table::Companies, Op::Updated, Some(&[1]))),
            "a table the filter does not name"
        );
        // A column the table no longer has never matches (and is logged once).
        let gone = UpdateColumns([("contacts".to_owned(), vec!["gone".to_owned()])].into());
        router.apply(EndpointRow { update_columns: Some(Some(gone)), ..row(e) });
        router.apply(EndpointRow { events: Some(vec!["contact.updated".into()]), ..row(e) });
        assert!(!reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[0, 1, 2]))));
        assert!(!reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[0, 1, 2]))));
        // Removing the filter (NULL in the row) lets every update through again.
        router.apply(EndpointRow { update_columns: Some(None), ..row(e) });
        router.apply(EndpointRow { events: Some(vec!["contact.updated".into()]), ..row(e) });
        assert!(reaches(&router, &change(Table::Contacts, Op::Updated, Some(&[1]))));
    }

    #[test]
    fn a_stored_url_that_does_not_parse_skips_only_that_endpoint() {
        let mut router = Router::new(SecretBox::new(None).unwrap());
        let (bad, good) = (Uuid::from_u128(7), Uuid::from_u128(8));
        let routing = Routing {
            account_id: Uuid::from_u128(1),
            events: vec!["contact.created".into()],
            is_active: true,
            disabled_reason: None,
            update_columns: None,
        };
        let sending = |url: &str| Sending {
            url: url.into(),
            secret: format!("whsec_{}", "A".repeat(43) + "="),
            previous_secret: None,
            previous_expires_at: None,
        };
        router.set(bad, routing.clone(), Some(sending("not a url"))).expect("skipped, not an error");
        router.set(good, routing.clone(), Some(sending("https://example.com/hook"))).unwrap();
        assert!(router.get(bad).is_none() && router.get(good).is_some());
        let unreadable = Sending { secret: "enc:v2:AAAA".into(), ..sending("https://example.com/hook") };
        assert!(
            matches!(router.set(bad, routing, Some(unreadable)), Err(RouteError::Open { .. })),
            "a key problem stops"
        );
    }
}
