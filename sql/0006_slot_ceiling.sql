-- The confirm ceiling: walhook never confirms its slot past this position, and raises it only
-- while the slot's confirmed position is still at or below it. A slot whose confirmed position
-- is past the ceiling is therefore not the one walhook streamed from (dropped and created
-- again by someone else, or advanced by hand): it is reported as lost until `walhook
-- slot-reset` records the gap and adopts it (docs/architecture.md, invariant 13).
ALTER TABLE walhook.slot_state ADD COLUMN confirm_ceiling pg_lsn;

-- Slots recorded before this column existed: their position now is the best there is.
UPDATE walhook.slot_state st SET confirm_ceiling = s.confirmed_flush_lsn
FROM pg_replication_slots s
WHERE s.slot_name = st.slot AND s.confirmed_flush_lsn IS NOT NULL;
