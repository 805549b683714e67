-- Routing versions: the endpoint set as replication saw it, per slot and position, so a
-- replayed change is routed with the endpoints of its commit, not with today's. Only what
-- routing needs is kept (no URL, no secret: sending uses the endpoint's current row).

-- Slots whose versions were seeded (from the endpoint rows, at position 0).
CREATE TABLE walhook.routing_slots (
    slot      text PRIMARY KEY,
    seeded_at timestamptz NOT NULL DEFAULT now()
);

-- One row per endpoint change read from the stream: the endpoint's full routing state from
-- the end LSN of the change's commit on (0 for the seed). deleted: the endpoint was deleted.
CREATE TABLE walhook.endpoint_versions (
    slot            text NOT NULL,
    endpoint_id     uuid NOT NULL,
    valid_from      bigint NOT NULL,
    deleted         boolean NOT NULL DEFAULT false,
    account_id      uuid,
    events          text[],
    is_active       boolean,
    disabled_reason text,
    PRIMARY KEY (slot, endpoint_id, valid_from)
);
