-- The sampled tokens of a student answer and each one's log-probability under the model that
-- sampled it (temperature 1, the raw model; see engines.base.Completion), kept for the
-- policy-gradient stage's importance correction. 8 bytes per token: token ids as little-endian
-- int32, log-probabilities as little-endian float32. Only answers sampled for training, only while
-- an RL stage may still use them (training.rl.keep_logprobs_rounds).
CREATE TABLE sample_logprobs (
    generation_id  INTEGER PRIMARY KEY REFERENCES generations(id),
    token_ids      BLOB NOT NULL,
    logprobs       BLOB NOT NULL,
    created_at     REAL NOT NULL
);
