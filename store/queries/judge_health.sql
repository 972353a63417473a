-- Judge health checks, newest first: the figures, and what they were measured on (anchor-file
-- items, the teacher's stored labels, the round's verifier-scored answers, the file and its sha256).
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/judge_health.sql
SELECT id, round_id AS round, judge, round(agreement, 3) AS agreement,
       round(position_bias, 3) AS position_bias, distinct_scores, healthy,
       json_extract(details, '$.anchors.file_items') AS from_file,
       json_extract(details, '$.anchors.teacher_items') AS from_teacher,
       json_extract(details, '$.anchors.verifier_items') AS from_verifier,
       json_extract(details, '$.anchors.file') AS anchor_file,
       substr(json_extract(details, '$.anchors.sha256'), 1, 12) AS anchor_sha,
       json_extract(details, '$.reasons') AS reasons
FROM judge_health ORDER BY id DESC;
