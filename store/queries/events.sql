-- The event log: decisions, promotions, rollbacks, stops, faults. Newest first.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/events.sql
SELECT id, datetime(ts, 'unixepoch') AS at, round_id AS round, level, kind, message
FROM events ORDER BY id DESC LIMIT 200;
