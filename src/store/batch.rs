//! Taking the next batch off the writer's channel.
//!
//! What must hold: a batch holds at most [`MAX_BATCH`] ops and at most [`MAX_BATCH_BYTES`] of
//! payloads and texts, each payload counted once however many deliveries of its event the
//! batch holds (it is stored once); an op bigger than that starts a batch of its own, which
//! then takes at most [`MAX_BATCH_BYTES`]` / 8` more (the other deliveries of a large event
//! fit, so a large row's fan-out is one write, not one per endpoint). One statement stays far
//! below PostgreSQL's 1 GB limit on a parameter; ops keep their order (an op that does not fit
//! starts the next batch); a probe ends its batch; every text reaching the database is safe
//! to store whoever built the op.

use std::collections::HashSet;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Status, StoreOp};
use crate::model::attempt::{safe_text, Attempt, ERROR_BYTES, SNIPPET_BYTES};

/// Ops written per batch (one atomic write) at most.
pub(super) const MAX_BATCH: usize = 1024;
/// Bytes of payloads and texts per batch at most (see [`op_bytes`]). tokio-postgres keeps
/// the buffers a statement needed for the life of its connection (the encoded parameters,
/// then the connection's write buffer), so this is also about what one pooled connection
/// keeps after a burst of large payloads: at most about twice this, or the connection is
/// closed after its batch (see `write::write_batch`).
pub(super) const MAX_BATCH_BYTES: usize = 1 << 20;
/// What an op's ids, numbers and times cost, on top of its payload and texts.
const FIXED_OP_BYTES: usize = 256;

/// The next batch, or `None` once every sender is gone and nothing is left; `carry` holds an
/// op taken from the channel that did not fit the previous batch.
pub(super) async fn next(
    rx: &mut mpsc::Receiver<StoreOp>,
    carry: &mut Option<StoreOp>,
    archive: bool,
) -> Option<Vec<StoreOp>> {
    let first = match carry.take() {
        Some(op) => op,
        None => rx.recv().await?,
    };
    let mut payloads = HashSet::new();
    let mut bytes = op_bytes(&first, archive, &mut payloads);
    let limit = MAX_BATCH_BYTES.max(bytes + MAX_BATCH_BYTES / 8);
    let mut batch = vec![made_safe(first)];
    while batch.len() < MAX_BATCH && !matches!(batch.last(), Some(StoreOp::Probe(_))) {
        let Ok(op) = rx.try_recv() else { break };
        // (An op that does not fit ends the batch: what it added to `payloads` no longer counts.)
        let size = op_bytes(&op, archive, &mut payloads);
        if bytes + size > limit {
            *carry = Some(op);
            break;
        }
        bytes += size;
        batch.push(made_safe(op));
    }
    Some(batch)
}

/// What a whole batch's parameters hold (see [`op_bytes`]).
pub(super) fn batch_bytes(batch: &[StoreOp], archive: bool) -> usize {
    let mut payloads = HashSet::new();
    batch.iter().map(|op| op_bytes(op, archive, &mut payloads)).sum()
}

/// What `op` adds to a batch's parameters: its payload (stored for pending rows, and for
/// every row with the payload archive on) unless its event's is among `payloads` already
/// (then added to it), and texts.
pub(super) fn op_bytes(op: &StoreOp, archive: bool, payloads: &mut HashSet<Uuid>) -> usize {
    let texts = |err: &Option<String>, a: Option<&Attempt>| {
        err.as_ref().map_or(0, String::len)
            + a.map_or(0, |a| a.error.as_ref().map_or(0, String::len) + a.response_snippet.len())
    };
    FIXED_OP_BYTES
        + match op {
            StoreOp::Insert(r) => {
                let stored = archive || r.status == Status::Pending;
                let payload = if stored && payloads.insert(r.event.id) { r.event.body.len() } else { 0 };
                payload + r.event.entity_key.len() + texts(&r.last_error, r.attempt.as_ref())
            }
            StoreOp::Complete(c) => texts(&c.last_error, Some(&c.attempt)),
            StoreOp::Release(r) => r.last_error.len(),
            StoreOp::Probe(p) => p.known_rows.iter().map(String::len).sum::<usize>() + 16 * p.ids.len(),
            StoreOp::Disable { .. } | StoreOp::FailPending { .. } | StoreOp::ReleaseHeld { .. } => 0,
        }
}

/// `op` with every free text made safe to store (no NUL or control characters, bounded).
fn made_safe(mut op: StoreOp) -> StoreOp {
    let (last_error, attempt) = match &mut op {
        StoreOp::Insert(r) => (&mut r.last_error, r.attempt.as_mut()),
        StoreOp::Complete(c) => (&mut c.last_error, Some(&mut c.attempt)),
        StoreOp::Release(r) => {
            if let std::borrow::Cow::Owned(s) = safe_text(&r.last_error, ERROR_BYTES) {
                r.last_error = s;
            }
            return op;
        }
        _ => return op,
    };
    safe_in_place(last_error, ERROR_BYTES);
    if let Some(a) = attempt {
        safe_in_place(&mut a.error, ERROR_BYTES);
        if let std::borrow::Cow::Owned(s) = safe_text(&a.response_snippet, SNIPPET_BYTES) {
            a.response_snippet = s;
        }
    }
    op
}

fn safe_in_place(text: &mut Option<String>, max: usize) {
    if let Some(t) = text.as_mut() {
        if let std::borrow::Cow::Owned(s) = safe_text(t, max) {
            *t = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use uuid::Uuid;

    use super::*;
    use crate::model::delivery::Event;
    use crate::model::event::{EventType, Op, Table};
    use crate::model::position::Position;
    use crate::store::Record;

    fn pending(body_bytes: usize, last_error: &str) -> StoreOp {
        StoreOp::Insert(Record {
            id: Uuid::new_v4(),
            endpoint_id: Uuid::new_v4(),
            event: Arc::new(Event {
                id: Uuid::new_v4(),
                account_id: Uuid::new_v4(),
                event_type: EventType::new(Table::Contacts, Op::Created),
                entity_key: "contacts:1".into(),
                position: Position::new(1, 1),
                committed_at_us: 0,
                body: Bytes::from(vec![b'x'; body_bytes]),
            }),
            status: Status::Pending,
            attempt_count: 0,
            http_status: None,
            next_attempt_at: None,
            lease: None,
            last_error: Some(last_error.into()),
            completed_at: None,
            attempt: None,
            ticket: None,
        })
    }

    #[tokio::test]
    async fn batches_are_bounded_by_bytes_and_keep_their_order() {
        let (tx, mut rx) = mpsc::channel(64);
        // Rows of 5/16 of the bound: three fit; a row of 2.5 times the bound starts its own
        // batch, which the small rows after it still join.
        let row = MAX_BATCH_BYTES * 5 / 16;
        let sizes = [row, row, row, row, MAX_BATCH_BYTES * 5 / 2, 10, 10];
        for (i, size) in sizes.iter().enumerate() {
            tx.send(pending(*size, &i.to_string())).await.unwrap();
        }
        drop(tx);
        let mut carry = None;
        let mut got = Vec::new();
        while let Some(batch) = next(&mut rx, &mut carry, false).await {
            let first = op_bytes(&batch[0], false, &mut HashSet::new());
            let bytes = batch_bytes(&batch, false);
            assert!(bytes <= MAX_BATCH_BYTES.max(first + MAX_BATCH_BYTES / 8), "{bytes} bytes in {} ops", batch.len());
            let order = batch.iter().map(|op| match op {
                StoreOp::Insert(r) => r.last_error.clone().unwrap(),
                _ => unreachable!(),
            });
            got.push(order.collect::<Vec<_>>().join(","));
        }
        assert_eq!(got, ["0,1,2", "3", "4,5,6"]);
    }

    #[tokio::test]
    async fn a_large_rows_deliveries_share_one_payload_and_one_batch() {
        // One event of twice the bound for 40 endpoints: its payload counts once, and all 40
        // are one write; the next event's starts the next.
        let StoreOp::Insert(first) = pending(MAX_BATCH_BYTES * 2, "e1") else { unreachable!() };
        let StoreOp::Insert(second) = pending(MAX_BATCH_BYTES * 2, "e2") else { unreachable!() };
        let (tx, mut rx) = mpsc::channel(128);
        for event in [&first.event, &second.event] {
            for _ in 0..40 {
                let StoreOp::Insert(mut r) = pending(0, "x") else { unreachable!() };
                r.event = event.clone();
                tx.send(StoreOp::Insert(r)).await.unwrap();
            }
        }
        drop(tx);
        let (mut carry, mut sizes) = (None, Vec::new());
        while let Some(batch) = next(&mut rx, &mut carry, false).await {
            assert!(batch_bytes(&batch, false) < MAX_BATCH_BYTES * 2 + MAX_BATCH_BYTES / 8);
            sizes.push(batch.len());
        }
        assert_eq!(sizes, [40, 40]);
    }

    #[tokio::test]
    async fn with_the_payload_archive_delivered_rows_count_their_payloads_too() {
        let delivered = |size: usize, name: &str| {
            let StoreOp::Insert(mut r) = pending(size, name) else { unreachable!() };
            r.status = Status::Delivered;
            StoreOp::Insert(r)
        };
        // Without the archive a delivered row stores no payload; with it, every row does.
        let row = MAX_BATCH_BYTES * 5 / 16;
        assert!(op_bytes(&delivered(row, "a"), false, &mut HashSet::new()) < 1 << 10);
        assert!(op_bytes(&delivered(row, "a"), true, &mut HashSet::new()) >= row);
        let (tx, mut rx) = mpsc::channel(8);
        for i in 0..4 {
            tx.send(delivered(row, &i.to_string())).await.unwrap();
        }
        drop(tx);
        let (mut carry, mut sizes) = (None, Vec::new());
        while let Some(batch) = next(&mut rx, &mut carry, true).await {
            sizes.push(batch.len());
        }
        assert_eq!(sizes, [3, 1], "payloads archived with delivered rows bound the batch");
    }

    #[tokio::test]
    async fn texts_are_made_safe_on_the_way_in() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(pending(1, "bad\0text")).await.unwrap();
        let batch = next(&mut rx, &mut None, false).await.unwrap();
        let StoreOp::Insert(r) = &batch[0] else { unreachable!() };
        assert_eq!(r.last_error.as_deref(), Some("badtext"));
    }
}
