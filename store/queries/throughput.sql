-- Generation throughput and phase durations per round.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/throughput.sql
SELECT p.round_id AS round,
       p.phase,
       round(p.duration_s, 2) AS seconds,
       json_extract(p.counts, '$.generations') AS generations,
       json_extract(p.counts, '$.tokens') AS tokens,
       CASE WHEN p.duration_s > 0 AND json_extract(p.counts, '$.tokens') IS NOT NULL
            THEN round(json_extract(p.counts, '$.tokens') / p.duration_s, 1) END AS tokens_per_s
FROM phases p
WHERE p.finished_at IS NOT NULL
ORDER BY p.round_id, p.id;
