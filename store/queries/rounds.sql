-- Rounds and their decisions, newest first.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/rounds.sql
SELECT r.id AS round,
       r.phase,
       r.status,
       r.incumbent_id AS incumbent,
       r.candidate_id AS candidate,
       r.decision,
       json_extract(r.metrics, '$.candidate_accuracy') AS cand_acc,
       json_extract(r.metrics, '$.incumbent_accuracy') AS inc_acc,
       json_extract(r.metrics, '$.p_value') AS p_value,
       r.reasons,
       round(coalesce(r.finished_at, strftime('%s', 'now')) - r.started_at, 1) AS seconds
FROM rounds r
ORDER BY r.id DESC;
