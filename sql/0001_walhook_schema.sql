-- walhook's own tables. Applied by `walhook migrate` in one transaction; never edit a
-- released migration, add a new file instead.

CREATE SCHEMA IF NOT EXISTS walhook;

-- Webhook endpoints registered by customers through the admin API. Replicated through the
-- publication too, so routing sees endpoint changes in LSN order with the CRM rows.
CREATE TABLE walhook.endpoints (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL,
    created_by      uuid NOT NULL,
    url             text NOT NULL,
    description     text NOT NULL DEFAULT '',
    -- 'whsec_…', or 'enc:v1:…' (AES-256-GCM) when secrets.encryption_key is set.
    secret          text NOT NULL,
    secret_prefix   text NOT NULL,
    events          text[] NOT NULL,
    is_active       boolean NOT NULL DEFAULT true,
    -- Set when walhook disabled the endpoint itself ('gone': it answered 410; 'failing':
    -- every delivery failed for dispatch.disable_after). NULL when enabled or disabled by hand.
    disabled_reason text,
    -- Start of the current run of failed attempts (NULL after any success).
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX endpoints_account_created ON walhook.endpoints (account_id, created_at DESC, id DESC);

-- Payloads of events that have at least one delivery in the outbox. Deliveries that
-- succeed on the first attempt never write their payload here.
CREATE TABLE walhook.events (
    id          uuid PRIMARY KEY,          -- derived from (commit_lsn, seq)
    account_id  uuid NOT NULL,
    event_type  text NOT NULL,
    commit_lsn  bigint NOT NULL,
    seq         integer NOT NULL,
    body        bytea NOT NULL,            -- the exact bytes POSTed and signed
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (event, endpoint). Happy path: written once, batched, as 'delivered'.
-- Outbox: 'pending' rows with next_attempt_at, claimed with FOR UPDATE SKIP LOCKED + lease.
CREATE TABLE walhook.deliveries (
    id               uuid PRIMARY KEY,     -- derived from (commit_lsn, seq, endpoint_id)
    endpoint_id      uuid NOT NULL,
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    entity_key       text NOT NULL,        -- table:primary key, the unit of ordering
    commit_lsn       bigint NOT NULL,
    seq              integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    http_status_code integer,
    attempt_count    integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    lease_until      timestamptz,
    leased_by        uuid,
    last_error       text,
    created_at       timestamptz NOT NULL, -- commit time of the source transaction
    completed_at     timestamptz
);
CREATE INDEX deliveries_endpoint_recent ON walhook.deliveries (endpoint_id, commit_lsn DESC, seq DESC);
CREATE INDEX deliveries_commit_lsn ON walhook.deliveries (commit_lsn);
CREATE INDEX deliveries_endpoint_due ON walhook.deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_entity_order ON walhook.deliveries (endpoint_id, entity_key, commit_lsn, seq)
    WHERE status = 'pending';
-- Retention: finished rows by age; events still needed by a pending delivery.
CREATE INDEX deliveries_completed ON walhook.deliveries (completed_at) WHERE status <> 'pending';
CREATE INDEX deliveries_pending_event ON walhook.deliveries (event_id) WHERE status = 'pending';
CREATE INDEX events_created ON walhook.events (created_at);
-- A queue table: rows churn from pending to done quickly, so keep its statistics and
-- visibility fresh rather than waiting for the default 10-20% of changed rows.
ALTER TABLE walhook.deliveries SET (
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000, autovacuum_analyze_threshold = 1000);

-- One row per HTTP attempt, for operators (why did this delivery fail?).
CREATE TABLE walhook.attempts (
    delivery_id      uuid NOT NULL,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      integer NOT NULL,
    http_status_code integer,
    error_kind       text CHECK (error_kind IN ('status', 'timeout', 'network', 'refused')),
    error            text,
    response_snippet text,             -- first 1 KiB of the response body
    PRIMARY KEY (delivery_id, attempt)
);
