-- Held-out accuracy of every evaluated checkpoint, in order, with its status.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/heldout_curve.sql
SELECT e.round_id AS round,
       e.checkpoint_id AS checkpoint,
       c.status,
       json_extract(e.metrics, '$.accuracy') AS accuracy,
       json_extract(e.metrics, '$.ci_low') AS ci_low,
       json_extract(e.metrics, '$.ci_high') AS ci_high,
       json_extract(e.metrics, '$.n') AS items
FROM evaluations e
JOIN checkpoints c ON c.id = e.checkpoint_id
WHERE e.suite = 'heldout'
ORDER BY e.id;
