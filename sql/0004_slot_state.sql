-- What walhook knows about its replication slot, so that a lost slot is noticed instead of
-- silently replaced, and the windows of changes walhook could not deliver.

-- One row per slot walhook has created or adopted. Its presence means "walhook streamed from
-- this slot": a missing or invalidated slot with a row here is lost, and only
-- `walhook slot-reset` creates a new one.
CREATE TABLE walhook.slot_state (
    slot          text PRIMARY KEY,
    -- When walhook created (or, for a slot that predates this table, adopted) the slot.
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The slot's first position: its consistent point when created, its confirmed position
    -- when adopted.
    start_lsn     pg_lsn NOT NULL,
    -- The slot's confirmed position as last seen by the streaming replica (recorded every
    -- few seconds, so it may trail the server's by that much: a gap starting here is never
    -- too short) and when it was seen.
    confirmed_lsn pg_lsn NOT NULL,
    confirmed_at  timestamptz NOT NULL
);

-- Windows whose changes were (or may have been) not delivered. `to_time` is NULL while the
-- window is still open (a prerequisite that still fails).
CREATE TABLE walhook.replication_gaps (
    id          bigserial PRIMARY KEY,
    slot        text NOT NULL,
    -- slot_lost: the slot was dropped or invalidated (recorded by `walhook slot-reset`);
    -- publication / replica_identity / table: a prerequisite failed while walhook ran.
    kind        text NOT NULL CHECK (kind IN ('slot_lost', 'publication', 'replica_identity', 'table')),
    reason      text NOT NULL,
    -- Where and when the window starts; NULL when unknown (a slot walhook never recorded).
    from_lsn    pg_lsn,
    from_time   timestamptz,
    to_lsn      pg_lsn,
    to_time     timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replication_gaps_slot ON walhook.replication_gaps (slot, from_time);
