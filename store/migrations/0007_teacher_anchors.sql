-- Anchors the teacher labelled once for the self judge (scoring.self_judge.teacher_anchors):
-- the student's answers to train tasks, with the teacher's verdict (kind 'verdict': `answer`,
-- `good`) or its preference asked in both orders and kept where they agree (kind 'preference':
-- `answer` the better, `answer_b` the worse). Provenance: the teacher, the round, the
-- generation(s) and the teacher's raw replies. Written in the score phase's transaction; kept
-- for good (the self judge is re-measured on them every recheck_every_rounds).
CREATE TABLE teacher_anchors (
    id             INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('verdict', 'preference')),
    prompt         TEXT NOT NULL,
    answer         TEXT NOT NULL,
    good           INTEGER,
    answer_b       TEXT,
    teacher        TEXT NOT NULL,
    round_id       INTEGER REFERENCES rounds(id),
    generation_ids TEXT NOT NULL,
    details        TEXT,
    created_at     REAL NOT NULL
);
