-- Training data gathered per round: pairs and SFT examples, by signal source.
-- sqlite3 -header -column STATE/selfdistill.db < store/queries/pair_stats.sql
SELECT round_id AS round, 'pair' AS kind, source, count(*) AS n,
       round(avg(margin), 3) AS mean_margin, round(avg(length(chosen)), 1) AS chosen_chars,
       round(avg(length(rejected)), 1) AS rejected_chars
FROM pairs GROUP BY round_id, source
UNION ALL
SELECT round_id, 'sft', source, count(*), NULL, round(avg(length(completion)), 1), NULL
FROM sft_examples GROUP BY round_id, source
ORDER BY round, kind, source;
