-- A requeued delivery (webhooks-recover, -redeliver, -replay) joins its row's queue behind
-- whatever of that row is pending when the streaming replica reads the requeue's commit
-- (docs/architecture.md, invariant 4).
--
-- queue_lsn: its place in the row's queue; NULL means its own commit_lsn. The outbox sends
-- a row's pending deliveries in (coalesce(queue_lsn, commit_lsn), commit_lsn, seq) order.
ALTER TABLE walhook.deliveries ADD COLUMN queue_lsn bigint;
-- held_by: requeued, not yet released to the outbox: the call's tag (its transaction id), which
-- the call also writes to the endpoint row's requeue_tag. The streaming replica releases the
-- deliveries of exactly that tag once it has read that endpoint change (what of the endpoint
-- was committed before it is stored or sent first, later changes queue behind), and the slot
-- is not confirmed past the requeue until the release has committed, so a restart reads it
-- again. A bigint, so the tag reads the same in the stream's text and in a query, whatever
-- the sessions' DateStyle or TimeZone.
ALTER TABLE walhook.deliveries ADD COLUMN held_by bigint;
ALTER TABLE walhook.endpoints ADD COLUMN requeue_tag bigint;
