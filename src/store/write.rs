//! Turns a batch of [`StoreOp`]s into SQL: column arrays, `unnest`, one round trip.
//!
//! What must hold: a batch commits as a whole or not at all; inserts skip what is stored
//! already (replays insert nothing twice; a row stored meanwhile by another writer is skipped
//! too, on a second try), except payloads, which are touched on conflict so that retention
//! cannot delete one a new pending delivery needs. A delivery that succeeded on its first
//! attempt is one tuple: the attempt is written on its row (`first_*`, never changed after),
//! every other attempt to `walhook.attempts` (`walhook.attempt_log` shows both). A batch of
//! inserts and completions is one statement (its data-modifying CTEs run atomically, and no
//! sibling sees another's rows); a batch that completes a row inserted in the same batch, or
//! disables an endpoint, needs statements that see each other's writes, so it runs as a
//! transaction in op order.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::batch::{batch_bytes, MAX_BATCH_BYTES};
use super::{Status, StoreOp};
use crate::model::attempt::{Attempt, FailureKind};
use crate::pg::db::{Db, DbError};

/// A payload already stored (by an earlier delivery of the event) is touched, not left alone:
/// its `created_at` moves to now. Retention deletes payloads older than `retention.delivered`
/// that no pending delivery needs, judged on its statement's snapshot; touching the row makes
/// a concurrent delete either wait for this write and find the row gone (then this insert
/// stores it again) or find a newer version whose `created_at` fails its re-check (READ
/// COMMITTED re-evaluates the row's own conditions, not the `NOT EXISTS` on deliveries).
const INSERT_EVENTS: &str =
    "INSERT INTO walhook.events (id, account_id, event_type, commit_lsn, seq, body, created_at) \
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::int4[], $6::bytea[], $7::timestamptz[]) \
     ON CONFLICT (id) DO UPDATE SET created_at = now()";
/// New delivery rows; one already stored (a replay) is left alone. The rows a statement
/// cannot see yet (a concurrent writer's, uncommitted) make it fail with a unique violation,
/// and the batch is written again with [`ON_CONFLICT`] (see [`write_batch`]): the plain
/// anti-join spares every row the speculative insertion `ON CONFLICT` costs (a `HEAP_CONFIRM`
/// WAL record and an index probe more).
const INSERT_DELIVERIES: &str = "INSERT INTO walhook.deliveries (id, endpoint_id, event_id, event_type, entity_key, \
       commit_lsn, seq, status, http_status_code, attempt_count, next_attempt_at, lease_until, leased_by, last_error, \
       created_at, completed_at, first_started_at, first_duration_ms, first_http_status, first_snippet) \
     SELECT * FROM unnest($8::uuid[], $9::uuid[], $10::uuid[], $11::text[], $12::text[], $13::int8[], $14::int4[], \
       $15::text[], $16::int4[], $17::int4[], $18::timestamptz[], $19::timestamptz[], $20::uuid[], $21::text[], \
       $22::timestamptz[], $23::timestamptz[], $24::timestamptz[], $25::int4[], $26::int4[], $27::text[]) \
       AS u(id, endpoint_id, event_id, event_type, entity_key, commit_lsn, seq, status, http_status_code, \
         attempt_count, next_attempt_at, lease_until, leased_by, last_error, created_at, completed_at, \
         first_started_at, first_duration_ms, first_http_status, first_snippet) \
     WHERE NOT EXISTS (SELECT 1 FROM walhook.deliveries d WHERE d.id = u.id)";
/// What [`INSERT_DELIVERIES`] becomes when a concurrent writer stored some of the same rows.
const ON_CONFLICT: &str = " ON CONFLICT (id) DO NOTHING";
/// Outcomes of leased rows. Their attempts are always written to `walhook.attempts`, first
/// ones included: the attempt happened even when the row's lease has passed to another claim
/// meanwhile (and this update then changes nothing).
const COMPLETE: &str = "UPDATE walhook.deliveries d SET status = u.status, \
       http_status_code = COALESCE(u.http, d.http_status_code), next_attempt_at = u.next_at, \
       lease_until = NULL, leased_by = NULL, last_error = u.err, completed_at = u.done \
     FROM unnest($28::uuid[], $29::uuid[], $30::text[], $31::int4[], $32::timestamptz[], $33::text[], \
       $34::timestamptz[]) AS u(id, lease, status, http, next_at, err, done) \
     WHERE d.id = u.id AND d.leased_by = u.lease AND d.status = 'pending'";
/// Attempt records; an attempt already recorded (a replay) is left alone, whether in
/// `walhook.attempts` or, for attempt 1, on its delivery row (a first-attempt success).
const INSERT_ATTEMPTS: &str = "INSERT INTO walhook.attempts (delivery_id, attempt, started_at, duration_ms, \
       http_status_code, error_kind, error, response_snippet) \
     SELECT * FROM unnest($35::uuid[], $36::int4[], $37::timestamptz[], $38::int4[], $39::int4[], $40::text[], \
       $41::text[], $42::text[]) \
       AS u(delivery_id, attempt, started_at, duration_ms, http_status_code, error_kind, error, response_snippet) \
     WHERE u.attempt <> 1 OR NOT EXISTS ( \
       SELECT 1 FROM walhook.deliveries d WHERE d.id = u.delivery_id AND d.first_started_at IS NOT NULL) \
     ON CONFLICT (delivery_id, attempt) DO NOTHING";
/// Leased rows given back after a local failure: the claim's attempt does not count.
const RELEASE: &str = "UPDATE walhook.deliveries d SET attempt_count = greatest(d.attempt_count - 1, 0), \
       next_attempt_at = u.next_at, lease_until = NULL, leased_by = NULL, last_error = u.err \
     FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[]) AS u(id, lease, next_at, err) \
     WHERE d.id = u.id AND d.leased_by = u.lease AND d.status = 'pending'";
/// Requeued deliveries of one call (its tag, the endpoint's `requeue_tag` as the stream read
/// it) released to the outbox, queued in their rows at the requeue's commit
/// (`store::recover`); after the batch's inserts, so what was stored before queues first.
const RELEASE_HELD: &str = "UPDATE walhook.deliveries d SET held_by = NULL, queue_lsn = u.at \
     FROM unnest($1::uuid[], $2::int8[], $3::int8[]) AS u(endpoint, at, tag) \
     WHERE d.endpoint_id = u.endpoint AND d.held_by = u.tag AND d.status = 'pending'";
/// Failure streaks (for `dispatch.disable_after`); only rows that change are written.
const ENDPOINTS_OK: &str =
    "UPDATE walhook.endpoints SET failing_since = NULL WHERE id = ANY($43) AND failing_since IS NOT NULL";
const ENDPOINTS_FAILING: &str = "UPDATE walhook.endpoints SET failing_since = now() \
     WHERE id = ANY($44) AND failing_since IS NULL AND NOT (id = ANY($43))";
const DISABLE: &str =
    "UPDATE walhook.endpoints e SET is_active = false, disabled_reason = u.reason, updated_at = now() \
     FROM unnest($1::uuid[], $2::text[]) AS u(id, reason) WHERE e.id = u.id AND e.is_active \
     RETURNING e.id, u.reason";
const FAIL_PENDING: &str = "UPDATE walhook.deliveries d SET status = 'failed', completed_at = now(), \
       lease_until = NULL, leased_by = NULL, last_error = 'endpoint disabled: ' || e.disabled_reason \
     FROM walhook.endpoints e \
     WHERE d.endpoint_id = ANY($1) AND d.status = 'pending' AND e.id = d.endpoint_id \
       AND NOT e.is_active AND e.disabled_reason IS NOT NULL";

/// The column arrays of one batch; parameter `$n` is `params()[n - 1]`.
#[derive(Default)]
struct Columns<'a> {
    // Events (payloads of pending rows): $1-$7.
    e_id: Vec<Uuid>,
    e_acct: Vec<Uuid>,
    e_type: Vec<&'a str>,
    e_lsn: Vec<i64>,
    e_seq: Vec<i32>,
    e_body: Vec<&'a [u8]>,
    e_at: Vec<DateTime<Utc>>,
    // Deliveries: $8-$27 (a first-attempt success's attempt in $24-$27).
    d_id: Vec<Uuid>,
    d_ep: Vec<Uuid>,
    d_ev: Vec<Uuid>,
    d_type: Vec<&'a str>,
    d_key: Vec<&'a str>,
    d_lsn: Vec<i64>,
    d_seq: Vec<i32>,
    d_status: Vec<&'static str>,
    d_http: Vec<Option<i32>>,
    d_count: Vec<i32>,
    d_next: Vec<Option<DateTime<Utc>>>,
    d_lease_until: Vec<Option<DateTime<Utc>>>,
    d_lease_by: Vec<Option<Uuid>>,
    d_err: Vec<Option<&'a str>>,
    d_created: Vec<DateTime<Utc>>,
    d_done: Vec<Option<DateTime<Utc>>>,
    d_first_started: Vec<Option<DateTime<Utc>>>,
    d_first_ms: Vec<Option<i32>>,
    d_first_http: Vec<Option<i32>>,
    d_first_snippet: Vec<Option<&'a str>>,
    // Completions of leased rows: $28-$34.
    c_id: Vec<Uuid>,
    c_lease: Vec<Uuid>,
    c_status: Vec<&'static str>,
    c_http: Vec<Option<i32>>,
    c_next: Vec<Option<DateTime<Utc>>>,
    c_err: Vec<Option<&'a str>>,
    c_done: Vec<Option<DateTime<Utc>>>,
    // Attempts: $35-$42.
    a_delivery: Vec<Uuid>,
    a_number: Vec<i32>,
    a_started: Vec<DateTime<Utc>>,
    a_duration_ms: Vec<i32>,
    a_status: Vec<Option<i32>>,
    a_kind: Vec<Option<&'static str>>,
    a_error: Vec<Option<&'a str>>,
    a_snippet: Vec<Option<&'a str>>,
    // Endpoints whose attempts succeeded ($43) / failed ($44) in this batch.
    ep_ok: Vec<Uuid>,
    ep_failed: Vec<Uuid>,
    // Releases (transaction path only).
    r_id: Vec<Uuid>,
    r_lease: Vec<Uuid>,
    r_next: Vec<DateTime<Utc>>,
    r_err: Vec<&'a str>,
    // Endpoint-wide changes (transaction path only).
    disable_ids: Vec<Uuid>,
    disable_reasons: Vec<&'static str>,
    fail_pending: Vec<Uuid>,
    // Held deliveries released (transaction path only).
    held_ids: Vec<Uuid>,
    held_lsn: Vec<i64>,
    held_tag: Vec<i64>,
}

impl<'a> Columns<'a> {
    /// With `archive`, every event's payload is stored, else only those of pending rows.
    fn of(batch: &'a [StoreOp], archive: bool) -> Self {
        let mut c = Columns::default();
        let (mut events, mut deliveries) = (HashSet::new(), HashSet::new());
        for op in batch {
            match op {
                // A row twice in one batch (a replay): the first is written, as a conflict
                // would have it.
                StoreOp::Insert(r) if !deliveries.insert(r.id) => {}
                StoreOp::Insert(r) => {
                    let ev = &r.event;
                    if (archive || r.status == Status::Pending) && events.insert(ev.id) {
                        c.e_id.push(ev.id);
                        c.e_acct.push(ev.account_id);
                        c.e_type.push(ev.event_type.name());
                        c.e_lsn.push(ev.position.commit_lsn as i64);
                        c.e_seq.push(ev.position.seq as i32);
                        c.e_body.push(ev.body.as_ref());
                        c.e_at.push(micros_to_time(ev.committed_at_us));
                    }
                    c.d_id.push(r.id);
                    c.d_ep.push(r.endpoint_id);
                    c.d_ev.push(ev.id);
                    c.d_type.push(ev.event_type.name());
                    c.d_key.push(ev.entity_key.as_str());
                    c.d_lsn.push(ev.position.commit_lsn as i64);
                    c.d_seq.push(ev.position.seq as i32);
                    c.d_status.push(r.status.as_str());
                    c.d_http.push(r.http_status.map(i32::from));
                    c.d_count.push(r.attempt_count);
                    c.d_next.push(r.next_attempt_at);
                    c.d_lease_until.push(r.lease.map(|l| l.1));
                    c.d_lease_by.push(r.lease.map(|l| l.0));
                    c.d_err.push(r.last_error.as_deref());
                    c.d_created.push(micros_to_time(ev.committed_at_us));
                    c.d_done.push(r.completed_at);
                    match &r.attempt {
                        // One tuple per first-attempt success: the attempt lives on the row.
                        Some(a) if r.is_first_attempt_success() => {
                            c.d_first_started.push(Some(a.started_at));
                            c.d_first_ms.push(Some(duration_ms(a)));
                            c.d_first_http.push(a.status.map(i32::from));
                            c.d_first_snippet.push(snippet(a));
                            c.streak(r.endpoint_id, true);
                        }
                        attempt => {
                            c.d_first_started.push(None);
                            c.d_first_ms.push(None);
                            c.d_first_http.push(None);
                            c.d_first_snippet.push(None);
                            if let Some(a) = attempt {
                                c.attempt(r.id, r.endpoint_id, r.attempt_count, a);
                            }
                        }
                    }
                }
                StoreOp::Complete(x) => {
                    c.c_id.push(x.id);
                    c.c_lease.push(x.lease);
                    c.c_status.push(x.status.as_str());
                    c.c_http.push(x.http_status.map(i32::from));
                    c.c_next.push(x.next_attempt_at);
                    c.c_err.push(x.last_error.as_deref());
                    c.c_done.push(x.completed_at);
                    c.attempt(x.id, x.endpoint_id, x.attempt_no, &x.attempt);
                }
                StoreOp::Probe(_) => {}
                StoreOp::Release(x) => {
                    c.r_id.push(x.id);
                    c.r_lease.push(x.lease);
                    c.r_next.push(x.next_attempt_at);
                    c.r_err.push(x.last_error.as_str());
                }
                StoreOp::Disable { endpoint_id, reason } => {
                    c.disable_ids.push(*endpoint_id);
                    c.disable_reasons.push(reason);
                    c.fail_pending.push(*endpoint_id);
                }
                StoreOp::FailPending { endpoint_id } => c.fail_pending.push(*endpoint_id),
                StoreOp::ReleaseHeld { endpoint_id, at, tag, .. } => {
                    c.held_ids.push(*endpoint_id);
                    c.held_lsn.push(*at as i64);
                    c.held_tag.push(*tag);
                }
            }
        }
        c
    }

    fn attempt(&mut self, id: Uuid, endpoint: Uuid, number: i32, a: &'a Attempt) {
        self.a_delivery.push(id);
        self.a_number.push(number);
        self.a_started.push(a.started_at);
        self.a_duration_ms.push(duration_ms(a));
        self.a_status.push(a.status.map(i32::from));
        self.a_kind.push(a.failure.map(FailureKind::record_name));
        self.a_error.push(a.error.as_deref());
        self.a_snippet.push(snippet(a));
        self.streak(endpoint, a.succeeded());
    }

    /// The endpoint's failure streak: ended by a success, started by a failure.
    fn streak(&mut self, endpoint: Uuid, succeeded: bool) {
        let list = if succeeded { &mut self.ep_ok } else { &mut self.ep_failed };
        if !list.contains(&endpoint) {
            list.push(endpoint);
        }
    }

    fn is_empty(&self) -> bool {
        self.d_id.is_empty()
            && self.c_id.is_empty()
            && self.fail_pending.is_empty()
            && self.r_id.is_empty()
            && self.held_ids.is_empty()
    }

    /// Whether one statement can write this batch: no endpoint-wide change, and no row that
    /// is both inserted and completed here (the update would not see the insert).
    fn fits_one_statement(&self) -> bool {
        if !self.fail_pending.is_empty() || !self.r_id.is_empty() || !self.held_ids.is_empty() {
            return false;
        }
        if self.c_id.is_empty() || self.d_id.is_empty() {
            return true;
        }
        let inserted: HashSet<&Uuid> = self.d_id.iter().collect();
        !self.c_id.iter().any(|id| inserted.contains(id))
    }

    /// `$1`-`$44` in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 44] {
        [
            &self.e_id,
            &self.e_acct,
            &self.e_type,
            &self.e_lsn,
            &self.e_seq,
            &self.e_body,
            &self.e_at,
            &self.d_id,
            &self.d_ep,
            &self.d_ev,
            &self.d_type,
            &self.d_key,
            &self.d_lsn,
            &self.d_seq,
            &self.d_status,
            &self.d_http,
            &self.d_count,
            &self.d_next,
            &self.d_lease_until,
            &self.d_lease_by,
            &self.d_err,
            &self.d_created,
            &self.d_done,
            &self.d_first_started,
            &self.d_first_ms,
            &self.d_first_http,
            &self.d_first_snippet,
            &self.c_id,
            &self.c_lease,
            &self.c_status,
            &self.c_http,
            &self.c_next,
            &self.c_err,
            &self.c_done,
            &self.a_delivery,
            &self.a_number,
            &self.a_started,
            &self.a_duration_ms,
            &self.a_status,
            &self.a_kind,
            &self.a_error,
            &self.a_snippet,
            &self.ep_ok,
            &self.ep_failed,
        ]
    }
}

/// The delivery insert: a plain one, or (`careful`) one that skips rows a concurrent writer
/// stored meanwhile.
fn insert_deliveries(careful: bool) -> String {
    format!("{INSERT_DELIVERIES}{}", if careful { ON_CONFLICT } else { "" })
}

/// The whole batch as one statement (one round trip, one commit).
fn one_statement(careful: bool) -> String {
    format!(
        "WITH ev AS ({INSERT_EVENTS}), dl AS ({}), cp AS ({COMPLETE}), at AS ({INSERT_ATTEMPTS}), \
         ok AS ({ENDPOINTS_OK}), bad AS ({ENDPOINTS_FAILING}) SELECT 1",
        insert_deliveries(careful)
    )
}

/// Writes `batch` atomically; returns the endpoints it disabled (an endpoint already
/// disabled is not among them), with their reasons. A batch larger than
/// [`MAX_BATCH_BYTES`] (one op too large to share a batch) closes its connection afterwards
/// instead of returning it to the pool: tokio-postgres never shrinks the buffers that batch
/// grew, and a pooled connection would keep them for its lifetime.
pub(super) async fn write_batch(db: &Db, batch: &[StoreOp], archive: bool) -> Result<Vec<(Uuid, String)>, DbError> {
    let cols = Columns::of(batch, archive);
    if cols.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = db.get().await?;
    let written = match write_on(&mut client, &cols, false).await {
        Err(e) if is_unique_violation(&e) => write_on(&mut client, &cols, true).await,
        written => written,
    };
    if batch_bytes(batch, archive) > MAX_BATCH_BYTES {
        drop(deadpool_postgres::Object::take(client));
    }
    written
}

/// Whether a write failed because a row it inserts was stored meanwhile by another writer.
fn is_unique_violation(e: &DbError) -> bool {
    matches!(e, DbError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

/// [`write_batch`] on one connection; `careful`: with [`ON_CONFLICT`].
async fn write_on(
    client: &mut deadpool_postgres::Object,
    cols: &Columns<'_>,
    careful: bool,
) -> Result<Vec<(Uuid, String)>, DbError> {
    let params = cols.params();
    if cols.fits_one_statement() {
        static SQL: [std::sync::OnceLock<String>; 2] = [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
        let sql = SQL[usize::from(careful)].get_or_init(|| one_statement(careful));
        let st = client.prepare_cached(sql).await?;
        client.execute(&st, &params).await?;
        return Ok(Vec::new());
    }
    // Statement by statement, each seeing the ones before: events, deliveries, completions,
    // attempts, failure streaks, releases, then disables and what they fail, then requeued
    // deliveries released.
    let tx = client.transaction().await?;
    let deliveries = insert_deliveries(careful);
    let steps: [(&str, &[&(dyn ToSql + Sync)], bool); 6] = [
        (INSERT_EVENTS, &params[0..7], !cols.e_id.is_empty()),
        (&deliveries, &params[7..27], !cols.d_id.is_empty()),
        (COMPLETE, &params[27..34], !cols.c_id.is_empty()),
        (INSERT_ATTEMPTS, &params[34..42], !cols.a_delivery.is_empty()),
        (ENDPOINTS_OK, &params[42..43], !cols.ep_ok.is_empty()),
        (ENDPOINTS_FAILING, &params[42..44], !cols.ep_failed.is_empty()),
    ];
    for (sql, params, needed) in steps {
        if needed {
            let st = tx.prepare_cached(&renumber(sql)).await?;
            tx.execute(&st, params).await?;
        }
    }
    if !cols.r_id.is_empty() {
        let st = tx.prepare_cached(RELEASE).await?;
        tx.execute(&st, &[&cols.r_id, &cols.r_lease, &cols.r_next, &cols.r_err]).await?;
    }
    let mut disabled = Vec::new();
    if !cols.disable_ids.is_empty() {
        let st = tx.prepare_cached(DISABLE).await?;
        let rows = tx.query(&st, &[&cols.disable_ids, &cols.disable_reasons]).await?;
        disabled = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    if !cols.fail_pending.is_empty() {
        let st = tx.prepare_cached(FAIL_PENDING).await?;
        tx.execute(&st, &[&cols.fail_pending]).await?;
    }
    if !cols.held_ids.is_empty() {
        let st = tx.prepare_cached(RELEASE_HELD).await?;
        tx.execute(&st, &[&cols.held_ids, &cols.held_lsn, &cols.held_tag]).await?;
    }
    tx.commit().await?;
    Ok(disabled)
}

/// `sql` with its parameters renumbered from `$1` (each statement on its own), in one pass.
fn renumber(sql: &str) -> String {
    let number_at = |i: usize| -> Option<(usize, usize)> {
        let digits = sql[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
        sql[i + 1..i + 1 + digits].parse().ok().map(|n| (n, digits))
    };
    let dollars = sql.match_indices('$').map(|(i, _)| i);
    let base = dollars.filter_map(|i| number_at(i).map(|(n, _)| n)).min().unwrap_or(1);
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (i, _) in sql.match_indices('$') {
        if let Some((n, digits)) = number_at(i) {
            out.push_str(&sql[copied..i]);
            out.push_str(&format!("${}", n + 1 - base));
            copied = i + 1 + digits;
        }
    }
    out.push_str(&sql[copied..]);
    out
}

/// An attempt's duration as stored: whole milliseconds.
fn duration_ms(a: &Attempt) -> i32 {
    a.duration.as_millis().min(i32::MAX as u128) as i32
}

/// An attempt's response snippet as stored: NULL when empty.
fn snippet(a: &Attempt) -> Option<&str> {
    (!a.response_snippet.is_empty()).then_some(a.response_snippet.as_str())
}

fn micros_to_time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbering_starts_each_statement_at_one() {
        assert_eq!(renumber(ENDPOINTS_FAILING), ENDPOINTS_FAILING.replace("$44", "$2").replace("$43", "$1"));
        let attempts = renumber(INSERT_ATTEMPTS);
        assert!(attempts.contains("$1::uuid[]") && attempts.contains("$8::text[]"), "{attempts}");
        assert!(!attempts.contains("$35") && !attempts.contains("$42"), "{attempts}");
        assert_eq!(renumber(INSERT_EVENTS), INSERT_EVENTS);
        let deliveries = renumber(INSERT_DELIVERIES);
        for n in 1..=20 {
            assert_eq!(deliveries.matches(&format!("${n}::")).count(), 1, "${n} in {deliveries}");
        }
    }
}
