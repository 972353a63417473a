-- selfdistill schema, migration 0001: everything the service records.
-- Applied by selfdistill/store.py in one transaction together with its row in `migrations`.
-- Read it with: sqlite3 STATE/selfdistill.db '.schema'

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Tasks enter once (key = content hash) and are split train/heldout by that key, for good.
CREATE TABLE tasks (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    answer      TEXT,
    verifier    TEXT,
    category    TEXT NOT NULL DEFAULT '',
    metadata    TEXT NOT NULL DEFAULT '{}',
    split       TEXT NOT NULL CHECK (split IN ('train', 'heldout', 'audit')),
    uses        INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    successes   REAL NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL
);
CREATE INDEX tasks_split ON tasks(split);

CREATE TABLE checkpoints (
    id           TEXT PRIMARY KEY,               -- 'base' or 'ckpt-000001'
    parent_id    TEXT REFERENCES checkpoints(id),
    round_id     INTEGER,
    path         TEXT,                           -- NULL for the base
    status       TEXT NOT NULL CHECK (status IN ('base', 'candidate', 'promoted', 'rejected', 'failed', 'deleted')),
    is_current   INTEGER NOT NULL DEFAULT 0,
    training     TEXT NOT NULL DEFAULT '{}',     -- data used, settings, metrics of the training run
    reason       TEXT,
    created_at   REAL NOT NULL,
    promoted_at  REAL
);
CREATE UNIQUE INDEX checkpoints_one_current ON checkpoints(is_current) WHERE is_current = 1;

CREATE TABLE rounds (
    id            INTEGER PRIMARY KEY,
    phase         TEXT NOT NULL,                 -- sample, generate, score, pair, train, evaluate, decide, promote, done
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed', 'skipped')),
    incumbent_id  TEXT REFERENCES checkpoints(id),
    candidate_id  TEXT REFERENCES checkpoints(id),
    decision      TEXT,                          -- promote, reject, skip, fail
    reasons       TEXT NOT NULL DEFAULT '[]',
    metrics       TEXT NOT NULL DEFAULT '{}',
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    started_at    REAL NOT NULL,
    finished_at   REAL
);

CREATE TABLE phases (
    id          INTEGER PRIMARY KEY,
    round_id    INTEGER NOT NULL REFERENCES rounds(id),
    phase       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    duration_s  REAL,
    counts      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX phases_round ON phases(round_id);

-- The tasks a round drew (so a resumed round generates for the same tasks).
CREATE TABLE round_tasks (
    round_id  INTEGER NOT NULL REFERENCES rounds(id),
    task_id   INTEGER NOT NULL REFERENCES tasks(id),
    PRIMARY KEY (round_id, task_id)
);

CREATE TABLE generations (
    id                INTEGER PRIMARY KEY,
    round_id          INTEGER REFERENCES rounds(id),
    task_id           INTEGER NOT NULL REFERENCES tasks(id),
    checkpoint_id     TEXT NOT NULL REFERENCES checkpoints(id),
    purpose           TEXT NOT NULL CHECK (purpose IN ('train', 'eval', 'judge', 'label', 'expand')),
    sample_index      INTEGER NOT NULL DEFAULT 0,
    prompt            TEXT NOT NULL,
    text              TEXT NOT NULL,
    params            TEXT NOT NULL DEFAULT '{}',
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    finish_reason     TEXT,
    created_at        REAL NOT NULL
);
CREATE INDEX generations_round ON generations(round_id, purpose);
CREATE INDEX generations_task ON generations(task_id);

CREATE TABLE scores (
    id             INTEGER PRIMARY KEY,
    generation_id  INTEGER NOT NULL REFERENCES generations(id),
    scorer         TEXT NOT NULL,                -- verifier:<name>, self:<mode>, teacher:<mode>
    score          REAL,                         -- NULL when the verdict was unparseable
    correct        INTEGER,                      -- 1/0 for verifiers (full score only), NULL otherwise
    parsed         INTEGER NOT NULL DEFAULT 1,
    details        TEXT NOT NULL DEFAULT '{}',
    created_at     REAL NOT NULL,
    UNIQUE (generation_id, scorer)
);

CREATE TABLE pairs (
    id                INTEGER PRIMARY KEY,
    round_id          INTEGER NOT NULL REFERENCES rounds(id),   -- round whose data built it
    task_id           INTEGER NOT NULL REFERENCES tasks(id),
    prompt            TEXT NOT NULL,
    chosen            TEXT NOT NULL,
    rejected          TEXT NOT NULL,
    chosen_gen_id     INTEGER REFERENCES generations(id),
    rejected_gen_id   INTEGER REFERENCES generations(id),
    margin            REAL NOT NULL,
    weight            REAL NOT NULL DEFAULT 1.0,
    source            TEXT NOT NULL,                            -- verifier, teacher, self
    used_in_round     INTEGER REFERENCES rounds(id),            -- first training round that used it
    created_at        REAL NOT NULL,
    UNIQUE (task_id, chosen, rejected)
);

CREATE TABLE sft_examples (
    id             INTEGER PRIMARY KEY,
    round_id       INTEGER NOT NULL REFERENCES rounds(id),
    task_id        INTEGER NOT NULL REFERENCES tasks(id),
    prompt         TEXT NOT NULL,
    completion     TEXT NOT NULL,
    generation_id  INTEGER REFERENCES generations(id),
    weight         REAL NOT NULL DEFAULT 1.0,
    source         TEXT NOT NULL,                               -- verifier, teacher_label, teacher_revise, top
    used_in_round  INTEGER REFERENCES rounds(id),
    created_at     REAL NOT NULL,
    UNIQUE (task_id, completion)
);

CREATE TABLE training_runs (
    id             INTEGER PRIMARY KEY,
    round_id       INTEGER NOT NULL REFERENCES rounds(id),
    attempt        INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    pid            INTEGER,
    spec           TEXT NOT NULL DEFAULT '{}',
    metrics        TEXT NOT NULL DEFAULT '{}',
    error          TEXT,
    started_at     REAL NOT NULL,
    finished_at    REAL
);

CREATE TABLE evaluations (
    id             INTEGER PRIMARY KEY,
    round_id       INTEGER REFERENCES rounds(id),
    checkpoint_id  TEXT NOT NULL REFERENCES checkpoints(id),
    suite          TEXT NOT NULL,                -- heldout, audit, anchors, pairwise
    metrics        TEXT NOT NULL DEFAULT '{}',
    created_at     REAL NOT NULL
);
CREATE INDEX evaluations_ckpt ON evaluations(checkpoint_id, suite);

CREATE TABLE eval_items (
    evaluation_id  INTEGER NOT NULL REFERENCES evaluations(id),
    task_id        INTEGER NOT NULL REFERENCES tasks(id),
    correct        INTEGER,
    score          REAL,
    text           TEXT NOT NULL,
    tokens         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (evaluation_id, task_id)
);

CREATE TABLE judge_health (
    id          INTEGER PRIMARY KEY,
    round_id    INTEGER REFERENCES rounds(id),
    judge       TEXT NOT NULL,
    agreement   REAL,
    position_bias REAL,
    distinct_scores INTEGER,
    healthy     INTEGER NOT NULL,
    details     TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL
);

CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    ts        REAL NOT NULL,
    round_id  INTEGER,
    level     TEXT NOT NULL DEFAULT 'info',
    kind      TEXT NOT NULL,
    message   TEXT NOT NULL,
    data      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_kind ON events(kind);
