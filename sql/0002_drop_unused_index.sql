-- deliveries_commit_lsn served no query (the API's history uses deliveries_endpoint_recent,
-- retention uses completed_at) but cost every delivery record an index insert: about 15% of
-- the database time per recorded delivery in the benchmark's insert mix.
DROP INDEX IF EXISTS walhook.deliveries_commit_lsn;
