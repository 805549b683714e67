-- Performance (issue 22): a delivery that succeeds on its first attempt is one tuple. Its
-- delivery row keeps what that attempt was (first_*), and no walhook.attempts row is written
-- for it: one heap tuple and its index entries fewer per delivered event, in the database's
-- CPU and in its WAL. Every other attempt (failures, retries, outbox attempts) keeps its
-- walhook.attempts row. The first_* columns are written once, with the row, and never
-- changed: a later redelivery of the same row adds attempts 2, 3, … to walhook.attempts.
ALTER TABLE walhook.deliveries
    ADD COLUMN first_started_at timestamptz,
    ADD COLUMN first_duration_ms integer,
    ADD COLUMN first_http_status integer,
    ADD COLUMN first_snippet text;

-- Every attempt, wherever it is recorded: what webhooks-attempts and operators read.
CREATE VIEW walhook.attempt_log AS
    SELECT delivery_id, attempt, started_at, duration_ms, http_status_code, error_kind, error, response_snippet
    FROM walhook.attempts
    UNION ALL
    SELECT id, 1, first_started_at, first_duration_ms, first_http_status, NULL::text, NULL::text, first_snippet
    FROM walhook.deliveries WHERE first_started_at IS NOT NULL;
