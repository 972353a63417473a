-- Generations and tokens per checkpoint and purpose (scans the generations table).
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/generations.sql
SELECT checkpoint_id AS checkpoint, purpose, count(*) AS generations,
       sum(completion_tokens) AS tokens, round(avg(completion_tokens), 1) AS mean_tokens,
       sum(CASE WHEN finish_reason = 'length' THEN 1 ELSE 0 END) AS truncated
FROM generations
GROUP BY checkpoint_id, purpose
ORDER BY checkpoint_id, purpose;
