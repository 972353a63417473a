-- Generations of purpose 'anchor': the base model's answers to a round's tasks, the rejected
-- sides of pairs.rejected_from = "base" (anchored rejection). Kept apart from the round's own
-- 'train' answers so that nothing that reads the incumbent's samples (pass rates, SFT, the
-- policy gradient's groups, distillation) ever meets them.
--
-- SQLite cannot alter a CHECK constraint: the table is rebuilt by the procedure of SQLite's
-- ALTER TABLE documentation (foreign keys off while it runs, set by the migration runner, and
-- PRAGMA foreign_key_check before the COMMIT). Ids are kept, so every reference stays valid.
CREATE TABLE generations_new (
    id                INTEGER PRIMARY KEY,
    round_id          INTEGER REFERENCES rounds(id),
    task_id           INTEGER NOT NULL REFERENCES tasks(id),
    checkpoint_id     TEXT NOT NULL REFERENCES checkpoints(id),
    purpose           TEXT NOT NULL CHECK (purpose IN ('train', 'eval', 'judge', 'label', 'expand', 'anchor')),
    sample_index      INTEGER NOT NULL DEFAULT 0,
    prompt            TEXT NOT NULL,
    text              TEXT NOT NULL,
    params            TEXT NOT NULL DEFAULT '{}',
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    finish_reason     TEXT,
    created_at        REAL NOT NULL
);
INSERT INTO generations_new SELECT id, round_id, task_id, checkpoint_id, purpose, sample_index, prompt, text, params,
    prompt_tokens, completion_tokens, finish_reason, created_at FROM generations;
DROP TABLE generations;
ALTER TABLE generations_new RENAME TO generations;
CREATE INDEX generations_round ON generations(round_id, purpose);
CREATE INDEX generations_task ON generations(task_id);
CREATE INDEX generations_base ON generations(task_id, checkpoint_id);
