-- webhooks-recover: failed deliveries become pending again, and the endpoint's row records
-- when (requeued_at). The row is published, so the streaming replica reads that change in
-- commit order and queues the endpoint's later changes behind the requeued deliveries
-- (docs/architecture.md, invariant 4), whichever replica served the call.
ALTER TABLE walhook.endpoints ADD COLUMN requeued_at timestamptz;

-- Payloads are kept while a failed delivery may be recovered (retention.failed), not only
-- while one is pending: this index finds the deliveries that still need their event.
CREATE INDEX deliveries_unsent_event ON walhook.deliveries (event_id) WHERE status <> 'delivered';

-- A requeued delivery gets a fresh retry schedule; its attempts keep counting (their records
-- are numbered by attempt_count): the schedule counts the attempts since retry_base.
ALTER TABLE walhook.deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
