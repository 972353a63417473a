-- The difficulty curriculum (tasks.curriculum.level_field): per round, the level its training tasks
-- were drawn up to, how many were drawn, and the curriculum event where the level changed.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/curriculum.sql
SELECT p.round_id AS round, json_extract(p.counts, '$.curriculum_level') AS open_level,
       json_extract(p.counts, '$.tasks') AS tasks, coalesce(e.message, '') AS change
FROM phases p LEFT JOIN events e ON e.round_id = p.round_id AND e.kind = 'curriculum'
WHERE p.phase = 'sample'
ORDER BY p.round_id;
