//! The outbox's queries on `walhook.deliveries`: claiming due rows under a lease, giving
//! unattempted claims back, and reading a payload. `crate::delivery::outbox` says what must
//! hold of claims (leases, row order, per-endpoint caps, active endpoints only).
//!
//! What must hold here: a claim takes only the first pending delivery of each row
//! (endpoint + `entity_key`) in queue order (`coalesce(queue_lsn, commit_lsn)`, then commit
//! order: a requeued delivery queues where the requeue put it), never one while another of its
//! row is under a live lease (in flight), never one still held (requeued, not yet released by
//! the streaming replica); of active endpoints outside `busy`, at most `per_endpoint` per
//! endpoint, with `FOR UPDATE SKIP LOCKED`, and runs in the caller's transaction (the
//! caller commits it); a give-back touches only rows still leased by the claim's token and never
//! waits on a row lock.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::pg::db::DbError;
use crate::store::endpoints::{self, StoredEndpoint};

/// What one claim asks for.
#[derive(Debug)]
pub struct Claim<'a> {
    /// Rows at most.
    pub limit: i64,
    /// Rows per endpoint at most.
    pub per_endpoint: i64,
    /// Endpoints not to claim for (they have enough claims outstanding).
    pub busy: &'a [Uuid],
    /// Lease length, in seconds.
    pub lease_secs: f64,
    /// The claimer's lease token.
    pub lease_token: Uuid,
    /// Bodies up to this many bytes come with the claim.
    pub inline_max: i32,
    /// Claim for this endpoint only (claiming around one whose rows the database refuses).
    pub only: Option<Uuid>,
}

/// A claimed row, its endpoint and (when small) its payload.
#[derive(Debug)]
pub struct Claimed {
    /// Delivery id.
    pub id: Uuid,
    /// The attempt this claim is for (the claim counted it).
    pub attempt_no: i32,
    /// Its place in the retry schedule: `attempt_no` since the delivery was last requeued
    /// (`webhooks-recover`).
    pub retry_no: i32,
    /// The endpoint, as stored.
    pub endpoint: StoredEndpoint,
    /// The payload, when at most `inline_max` bytes.
    pub body: Option<Vec<u8>>,
    /// The payload's size; `None` when the payload is gone.
    pub body_len: Option<i32>,
    /// Commit time of the source change.
    pub committed_at: DateTime<Utc>,
}

/// Claims due rows in `tx` (the caller commits), leasing them to `claim.lease_token`.
pub async fn claim(tx: &deadpool_postgres::Transaction<'_>, claim: &Claim<'_>) -> Result<Vec<Claimed>, DbError> {
    // The queue table's statistics lag its contents (it fills and drains in seconds); with
    // stale estimates the planner was seen to choose an O(n²) anti-join taking seconds.
    // Pin the plan shape instead: walk each endpoint's due rows in index order and check
    // each candidate's row order with an index probe (`OFFSET 0` keeps it a sub-plan).
    tx.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off").await?;
    let st = tx
        .prepare_cached(&format!(
            "WITH due AS ( \
               SELECT x.id FROM walhook.endpoints e \
               CROSS JOIN LATERAL ( \
                 SELECT d.id FROM walhook.deliveries d \
                 WHERE d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at <= now() \
                   AND d.held_by IS NULL AND (d.lease_until IS NULL OR d.lease_until < now()) \
                   AND NOT EXISTS ( \
                     SELECT 1 FROM walhook.deliveries p \
                     WHERE p.endpoint_id = d.endpoint_id AND p.entity_key = d.entity_key \
                       AND p.status = 'pending' \
                       AND ((coalesce(p.queue_lsn, p.commit_lsn), p.commit_lsn, p.seq) \
                             < (coalesce(d.queue_lsn, d.commit_lsn), d.commit_lsn, d.seq) \
                            OR p.lease_until >= now()) \
                     OFFSET 0) \
                 ORDER BY d.next_attempt_at \
                 LIMIT $2 \
                 FOR UPDATE OF d SKIP LOCKED) x \
               WHERE e.is_active AND NOT (e.id = ANY($3)) AND ($7::uuid IS NULL OR e.id = $7) \
               LIMIT $1) \
             UPDATE walhook.deliveries d \
             SET lease_until = now() + make_interval(secs => $4), leased_by = $5, \
                 attempt_count = d.attempt_count + 1 \
             FROM due, walhook.endpoints e \
             WHERE d.id = due.id AND e.id = d.endpoint_id \
             RETURNING d.id, d.attempt_count, {}, \
               (SELECT CASE WHEN octet_length(ev.body) <= $6 THEN ev.body END \
                FROM walhook.events ev WHERE ev.id = d.event_id), d.created_at, \
               (SELECT octet_length(ev.body) FROM walhook.events ev WHERE ev.id = d.event_id), \
               d.attempt_count - d.retry_base",
            endpoints::columns_of("e")
        ))
        .await?;
    let c = claim;
    let rows = tx
        .query(&st, &[&c.limit, &c.per_endpoint, &c.busy, &c.lease_secs, &c.lease_token, &c.inline_max, &c.only])
        .await?;
    let after = 2 + endpoints::COLUMN_COUNT;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            id: r.get(0),
            attempt_no: r.get(1),
            endpoint: endpoints::decode(r, 2),
            body: r.get(after),
            committed_at: r.get(after + 1),
            body_len: r.get(after + 2),
            retry_no: r.get(after + 3),
        })
        .collect())
}

/// Active endpoints (outside `skip`) with deliveries due now, at most `limit`.
pub async fn due_endpoints(client: &impl GenericClient, skip: &[Uuid], limit: i64) -> Result<Vec<Uuid>, DbError> {
    let rows = client
        .query(
            "SELECT e.id FROM walhook.endpoints e WHERE e.is_active AND NOT (e.id = ANY($1)) AND EXISTS ( \
               SELECT 1 FROM walhook.deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending' \
                 AND d.held_by IS NULL AND d.next_attempt_at <= now() AND (d.lease_until IS NULL OR d.lease_until < now())) \
             LIMIT $2",
            &[&skip, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Gives back the claims on `ids[i]` still leased to `lease_tokens[i]` and pending: lease
/// cleared, the claim's attempt count undone. How many it gave back. A row another
/// transaction holds (a store batch completing or releasing it) is skipped, not waited for:
/// waiting there while that batch waits on a row this statement holds is a deadlock. A
/// skipped claim keeps its lease until it runs out.
pub async fn give_back(client: &impl GenericClient, ids: &[Uuid], lease_tokens: &[Uuid]) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "UPDATE walhook.deliveries d SET lease_until = NULL, leased_by = NULL, \
               attempt_count = d.attempt_count - 1 \
             FROM (SELECT c.id FROM walhook.deliveries c \
                   JOIN unnest($1::uuid[], $2::uuid[]) AS g(id, lease) ON c.id = g.id AND c.leased_by = g.lease \
                   WHERE c.status = 'pending' \
                   FOR UPDATE OF c SKIP LOCKED) free \
             WHERE d.id = free.id",
            &[&ids, &lease_tokens],
        )
        .await?)
}

/// The payload of delivery `id` (`None`: the payload is gone).
pub async fn payload(client: &impl GenericClient, id: Uuid) -> Result<Option<Vec<u8>>, DbError> {
    let row = client
        .query_opt(
            "SELECT ev.body FROM walhook.deliveries d JOIN walhook.events ev ON ev.id = d.event_id WHERE d.id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
