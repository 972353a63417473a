-- The teacher's log-probability of each token of a student answer (on-policy distillation):
-- the student's sampled tokens (sample_logprobs.token_ids, same order) scored by the teacher after
-- the same rendered prompt, at temperature 1. 4 bytes per token: little-endian float32. Provenance:
-- which teacher (its model directory or served name) and its tokenizer's fingerprint (a hash of
-- its vocabulary and chat template, equal to the student's: distillation refuses a mismatch).
-- Pruned with sample_logprobs (training.rl.keep_logprobs_rounds).
CREATE TABLE teacher_logprobs (
    generation_id  INTEGER PRIMARY KEY REFERENCES generations(id),
    teacher        TEXT NOT NULL,
    tokenizer      TEXT NOT NULL,
    logprobs       BLOB NOT NULL,
    created_at     REAL NOT NULL
);
