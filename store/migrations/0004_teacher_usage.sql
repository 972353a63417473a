-- What the teacher was asked and how many tokens it cost, one row per batch of requests: the
-- round, the teacher (its model directory or served name), what for (label, revise, judge,
-- expand, distill, pairwise), the method (generate, score, token_logprobs),
-- the requests (prompts) sent, and the tokens: the prompts' (where the engine reports them:
-- generation) and the answered or scored ones. Written as the calls are made, outside the
-- phase's transaction: a call that was paid for stays counted even if the round is undone.
-- stopping.max_teacher_tokens reads the sum of prompt_tokens + completion_tokens.
CREATE TABLE teacher_usage (
    id                 INTEGER PRIMARY KEY,
    round_id           INTEGER REFERENCES rounds(id),
    teacher            TEXT NOT NULL,
    purpose            TEXT NOT NULL,
    method             TEXT NOT NULL,
    requests           INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    seconds            REAL NOT NULL,
    created_at         REAL NOT NULL
);
CREATE INDEX teacher_usage_round ON teacher_usage(round_id);
