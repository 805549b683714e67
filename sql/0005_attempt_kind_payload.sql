-- An outbox delivery whose payload is gone from walhook.events fails without being sent; its
-- attempt record says so with its own kind instead of 'refused' (which means the target's
-- address is not allowed).
ALTER TABLE walhook.attempts DROP CONSTRAINT IF EXISTS attempts_error_kind_check;
ALTER TABLE walhook.attempts ADD CONSTRAINT attempts_error_kind_check
    CHECK (error_kind IN ('status', 'timeout', 'network', 'refused', 'payload'));
