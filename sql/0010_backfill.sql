-- Backfills (issue 21): an endpoint is sent every current row of its account in the chosen
-- tables, as <entity>.backfilled events lined up with the live stream.
--
-- One running backfill per endpoint (backfills_one_running). Progress is the table being read
-- (tables[table_index + 1]) and the last key of it whose chunk is settled (delivered and
-- recorded, or stored in the outbox): after a crash or a takeover, the next leader reads on
-- from there, so at most one chunk is sent again, under the same webhook-ids.
CREATE TABLE walhook.backfills (
    id                  uuid PRIMARY KEY,
    endpoint_id         uuid NOT NULL REFERENCES walhook.endpoints (id) ON DELETE CASCADE,
    account_id          uuid NOT NULL,
    tables              text[] NOT NULL,
    status              text NOT NULL DEFAULT 'running'
                        CHECK (status IN ('running', 'finished', 'cancelled', 'failed')),
    reason              text,
    rows_sent           bigint NOT NULL DEFAULT 0,
    rows_total_estimate bigint,
    chunks              bigint NOT NULL DEFAULT 0,
    table_index         integer NOT NULL DEFAULT 0,
    last_key            uuid,
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
CREATE UNIQUE INDEX backfills_one_running ON walhook.backfills (endpoint_id) WHERE status = 'running';
CREATE INDEX backfills_account ON walhook.backfills (account_id, started_at DESC);
