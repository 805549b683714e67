-- A requeued delivery (webhooks-recover, -redeliver, -replay) joins its row's queue behind
-- whatever of that row is pending when the streaming replica reads the requeue's commit
-- (docs/architecture.md, invariant 4).
--
-- queue_lsn: its place in the row's queue; NULL means its own commit_lsn. The outbox sends
-- a row's pending deliveries in (coalesce(queue_lsn, commit_lsn), commit_lsn, seq) order.
ALTER TABLE walhook.deliveries ADD COLUMN queue_lsn bigint;
-- held: requeued but not yet released to the outbox. The streaming replica releases an
-- endpoint's held deliveries once it has read the requeue's commit (so the endpoint's
-- changes committed before it are stored or sent first, and later ones queue behind), or at
-- the start of a session, before it routes anything.
ALTER TABLE walhook.deliveries ADD COLUMN held boolean NOT NULL DEFAULT false;
