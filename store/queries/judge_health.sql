-- Judge health checks, newest first.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/judge_health.sql
SELECT id, round_id AS round, judge, round(agreement, 3) AS agreement,
       round(position_bias, 3) AS position_bias, distinct_scores, healthy, details
FROM judge_health ORDER BY id DESC;
