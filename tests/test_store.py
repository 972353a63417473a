"""The store on a real SQLite file: migrations, canned queries, permissions, refusals, the held-out wall."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess

import pytest

from selfdistill.errors import StoreError
from selfdistill.records import PairRecord, SftRecord, TaskIn, split_for, task_key
from selfdistill.store import Store, canned_queries, migrations, sql_dir


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "state" / "selfdistill.db")
    s.ensure_base_checkpoint()
    yield s
    s.close()


def test_migrations_from_empty_are_recorded(store):
    names = [r["name"] for r in store.query("SELECT name FROM migrations ORDER BY name")]
    assert names == [n for n, _ in migrations()]
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.integrity_check() == "ok"
    assert store.migrate() == []  # idempotent


def test_database_is_owner_only(store):
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_every_canned_query_runs_in_the_sqlite3_shell(store, tmp_path):
    rid = store.create_round("base")
    store.add_tasks([TaskIn("t", "q1", "1")], 0.0)
    assert len(canned_queries()) >= 5
    for name, sql in canned_queries().items():
        r = subprocess.run(["sqlite3", "-header", "-column", str(store.path)], input=sql, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, (name, r.stderr)
        assert store.query(sql) is not None
    assert "round" in subprocess.run(["sqlite3", "-header", str(store.path)], input=canned_queries()["rounds"],
                                     capture_output=True, text=True).stdout
    assert rid == 1


def test_foreign_and_corrupt_databases_are_refused(tmp_path):
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE x(a)").connection.commit()
    with pytest.raises(StoreError, match="did not create"):
        Store.open(foreign)
    notdb = tmp_path / "notdb.db"
    notdb.write_bytes(b"hello, this is not sqlite at all" * 10)
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store.open(notdb)
    with pytest.raises(StoreError, match="run `selfdistill init"):
        Store.open(tmp_path / "missing.db")


def test_newer_schema_is_refused(store):
    store.conn.execute("INSERT INTO migrations(name, applied_at) VALUES ('9999_future', 0)")
    path = store.path
    store.close()
    with pytest.raises(StoreError, match="newer selfdistill"):
        Store.open(path)


def test_tasks_are_idempotent_and_split_by_key(store):
    tasks = [TaskIn("s", f"question {i}", str(i)) for i in range(200)]
    assert store.add_tasks(tasks, 0.3) == (200, 0)
    assert store.add_tasks(tasks + [TaskIn("other-source", "question  7", "x")], 0.3) == (0, 201)
    counts = store.count_tasks()
    assert sum(counts.values()) == 200
    assert 30 < counts["heldout"] < 90
    for t in store.tasks():
        assert t.split == split_for(task_key(t.prompt), 0.3)


def test_audit_split_is_a_third_wall(store):
    store.add_tasks([TaskIn("s", f"question {i}", str(i)) for i in range(300)], 0.2, 0.2)
    counts = store.count_tasks()
    assert set(counts) == {"train", "heldout", "audit"} and all(40 < counts[s] for s in ("heldout", "audit"))
    rid = store.create_round("base")
    audit = store.tasks(split="audit")
    store.add_training_data(rid, [], [SftRecord(t.id, t.prompt, "x", 1.0, "verifier") for t in audit])
    assert store.training_data(rid, "all").sft == []


def test_heldout_wall_in_training_data(store):
    """Rows built from held-out tasks never reach training data, whatever the rows say."""
    store.add_tasks([TaskIn("s", f"q{i}", str(i)) for i in range(60)], 0.5)
    rid = store.create_round("base")
    tasks = store.tasks()
    held = [t for t in tasks if t.split == "heldout"]
    train = [t for t in tasks if t.split == "train"]
    assert held and train
    pairs = [PairRecord(t.id, t.prompt, "good", "bad", 1.0, 1.0, "verifier") for t in tasks]
    sft = [SftRecord(t.id, t.prompt, "good", 1.0, "verifier") for t in tasks]
    assert store.add_training_data(rid, pairs, sft) == (60, 60)
    data = store.training_data(rid, "all")
    got = {r.task_id for r in data.pairs} | {r.task_id for r in data.sft}
    assert got == {t.id for t in train}
    assert not got & {t.id for t in held}


def test_training_data_scope_and_replay(store):
    store.add_tasks([TaskIn("s", f"q{i}", str(i)) for i in range(40)], 0.0)
    tasks = store.tasks()
    r1 = store.create_round("base")
    store.add_training_data(r1, [], [SftRecord(t.id, t.prompt, "a", 1.0, "verifier") for t in tasks[:20]])
    run = store.start_training_run(r1, 1, {})
    store.finish_training_run(run, "succeeded", {}, None)
    store.update_round(r1, status="done", phase="done")
    r2 = store.create_round("base")
    store.add_training_data(r2, [], [SftRecord(t.id, t.prompt, "b", 1.0, "verifier") for t in tasks[20:30]])
    assert len(store.training_data(r2, "all").sft) == 30
    # round 1 trained but was not promoted: the incumbent (the base) never learned its rows, so they stay
    assert len(store.training_data(r2, "since_last").sft) == 30
    store.add_checkpoint("ckpt-000001", "base", r1, "/x", {})
    r3 = store.create_round("ckpt-000001")
    store.add_training_data(r3, [], [SftRecord(t.id, t.prompt, "c", 1.0, "verifier") for t in tasks[30:40]])
    assert len(store.training_data(r3, "all").sft) == 40
    assert len(store.training_data(r3, "since_last").sft) == 20  # rounds 2 and 3: the incumbent is round 1's
    replayed = store.training_data(r3, "since_last", replay_fraction=0.2).sft  # a fifth of the rows from round 1
    assert len(replayed) == 25 and sum(x.round_id == r1 for x in replayed) == 5


def test_promotion_is_one_transaction_and_one_current(store):
    rid = store.create_round("base")
    store.add_checkpoint("ckpt-000001", "base", rid, "/x", {})
    store.commit_promotion("ckpt-000001", "test", rid)
    assert store.current_checkpoint()["id"] == "ckpt-000001"
    assert store.query("SELECT count(*) AS n FROM checkpoints WHERE is_current = 1")[0]["n"] == 1
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("UPDATE checkpoints SET is_current = 1 WHERE id = 'base'")
    with pytest.raises(StoreError, match="does not exist"):
        store.commit_promotion("ckpt-999", "nope")
    assert store.current_checkpoint()["id"] == "ckpt-000001"
    assert store.events("promote")[0]["message"].startswith("promote: base -> ckpt-000001")


def test_failed_transaction_leaves_nothing(store):
    rid = store.create_round("base")
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.record_phase(rid, "sample", 0.0, {}, "generate")
            raise RuntimeError("crash mid-phase")
    assert store.get_round(rid)["phase"] == "sample"
    assert store.phases(rid) == []


def test_batched_writes_join_the_phase_transaction_and_return_their_ids(store):
    """The store writes rows through sqlite-utils; its helpers must join the phase's open transaction
    (a SAVEPOINT), not commit on their own, or a crash mid-phase would leave half a phase behind."""
    store.add_tasks([TaskIn(source="t", prompt=f"q{i}", answer=str(i)) for i in range(3)], heldout_fraction=0.0)
    tid = store.tasks()[0].id
    rid = store.create_round("base")
    rows = [{"round_id": rid, "task_id": tid, "checkpoint_id": "base", "purpose": "train", "sample_index": i,
             "prompt": "q", "text": f"a{i}", "params": {"t": 1.0}} for i in range(5)]
    first = store.add_generations(rows[:2])
    with pytest.raises(RuntimeError):
        with store.transaction():
            gids = store.add_generations(rows)
            store.add_scores([{"generation_id": g, "scorer": "v", "score": 1.0, "correct": True} for g in gids])
            store.add_training_data(rid, [PairRecord(task_id=tid, prompt="q", chosen="a", rejected="b", chosen_gen_id=gids[0],
                                                     rejected_gen_id=gids[1], margin=1.0, weight=1.0, source="verifier")], [])
            store.event("x", "inside")
            raise RuntimeError("crash mid-phase")
    assert [g["id"] for g in store.generations(rid)] == first
    assert store.query("SELECT count(*) AS n FROM scores")[0]["n"] == 0
    assert store.query("SELECT count(*) AS n FROM pairs")[0]["n"] == 0
    assert store.events("x") == []
    gids = store.add_generations(rows)
    got = {g["id"]: g["text"] for g in store.generations(rid)}
    assert [got[g] for g in gids] == [f"a{i}" for i in range(5)]  # returned ids are the rows' ids, in order
    assert store.generations(rid)[0]["params"] == {"t": 1.0}


def test_verified_counts_are_per_student_oldest_first_and_count_only_training_answers_a_verifier_scored(store):
    store.add_tasks([TaskIn(source="t", prompt=f"q{i}", answer=str(i)) for i in range(2)], heldout_fraction=0.0)
    t0, t1 = (t.id for t in store.tasks())
    r1 = store.create_round("base")
    store.add_checkpoint("ckpt-000001", "base", r1, "/x", {})
    r2 = store.create_round("ckpt-000001")

    def answers(rid, ckpt, tid, verdicts, purpose="train", scorer="verifier:exact"):
        gids = store.add_generations([{"round_id": rid, "task_id": tid, "checkpoint_id": ckpt, "purpose": purpose, "sample_index": i,
                                       "prompt": "q", "text": f"a{i}", "params": {}} for i in range(len(verdicts))])
        store.add_scores([{"generation_id": g, "scorer": scorer, "score": float(v), "correct": v} for g, v in zip(gids, verdicts)])

    answers(r2, "ckpt-000001", t0, [True, True, False])
    answers(r1, "base", t0, [True, False, False, False])
    answers(r1, "base", t1, [True, True], purpose="anchor")          # not the round's own answers
    answers(r1, "base", t1, [True, True], scorer="judge:self")       # no verifier
    assert list(store.verified_counts().items()) == [("base", {t0: (4, 1.0)}), ("ckpt-000001", {t0: (3, 2.0)})]


def test_readers_while_a_writer_holds_a_transaction(store):
    reader = Store.open(store.path, readonly=True)
    with store.transaction():
        store.record_phase(store.create_round("base"), "sample", 0.0, {}, "generate")
        assert reader.rounds() == []  # WAL: the reader sees the last committed state, without waiting
    assert len(reader.rounds()) == 1
    reader.close()


def test_schema_files_are_found():
    assert (sql_dir() / "migrations" / "0001_initial.sql").is_file()


def test_sampling_logprobs_round_trip_are_deleted_with_their_answers_and_pruned(store):
    """8 bytes a token; a redone generate phase and the retention policy both remove them."""
    store.add_tasks([TaskIn("s", "q", "1")], 0.0)
    tid = store.tasks()[0].id
    r1, r2 = store.create_round("base"), store.create_round("base")
    row = dict(task_id=tid, checkpoint_id="base", purpose="train", prompt="q", text="1")
    ids = store.add_generations([dict(row, round_id=r1, token_ids=[5, 70000], logprobs=[-0.25, -1.5]),
                                 dict(row, round_id=r1),  # an engine that gave none
                                 dict(row, round_id=r2, token_ids=[1], logprobs=[-2.0])])
    got = store.sample_logprobs(r1)
    assert got == {ids[0]: ([5, 70000], [-0.25, -1.5])}
    blob = store.query("SELECT token_ids, logprobs FROM sample_logprobs WHERE generation_id = ?", (ids[0],))[0]
    assert len(blob["token_ids"]) + len(blob["logprobs"]) == 8 * 2
    assert store.delete_generations(r1, "train") == 2  # a foreign key: the log-probabilities go first
    assert store.sample_logprobs(r1) == {} and store.sample_logprobs(r2) == {ids[2]: ([1], [-2.0])}
    assert store.prune_sample_logprobs(before_round=r2) == 0
    assert store.prune_sample_logprobs(before_round=r2 + 1) == 1 and store.sample_logprobs(r2) == {}


def test_teacher_logprobs_keep_provenance_first_figures_and_go_with_their_answers(store):
    """4 bytes a token with the teacher and its tokenizer's fingerprint; a second scoring of the same
    answer keeps the first; a redone generate phase and the retention policy both remove them."""
    store.add_tasks([TaskIn("s", "q", "1")], 0.0)
    tid = store.tasks()[0].id
    r1, r2 = store.create_round("base"), store.create_round("base")
    row = dict(task_id=tid, checkpoint_id="base", purpose="train", prompt="q", text="1", token_ids=[5, 6], logprobs=[-1.0, -2.0])
    ids = store.add_generations([dict(row, round_id=r1), dict(row, round_id=r1), dict(row, round_id=r2)])
    assert store.add_teacher_logprobs("teacher-dir", "tok:abc", {ids[0]: [-0.5, -0.25], ids[2]: [-3.0, -0.125]}) == 2
    assert store.add_teacher_logprobs("teacher-dir", "tok:abc", {ids[0]: [-9.0, -9.0], ids[1]: [-1.0, -1.0]}) == 1
    assert store.teacher_logprobs(r1) == {ids[0]: [-0.5, -0.25], ids[1]: [-1.0, -1.0]}
    row0 = store.query("SELECT * FROM teacher_logprobs WHERE generation_id = ?", (ids[0],))[0]
    assert (row0["teacher"], row0["tokenizer"], len(row0["logprobs"])) == ("teacher-dir", "tok:abc", 4 * 2)
    assert store.delete_generations(r1, "train") == 2
    assert store.teacher_logprobs(r1) == {} and store.teacher_logprobs(r2) == {ids[2]: [-3.0, -0.125]}
    assert store.prune_sample_logprobs(before_round=r2 + 1) == 2  # the sampler's and the teacher's
    assert store.teacher_logprobs(r2) == {}


def test_the_anchor_migration_rebuilds_generations_keeping_every_row_and_reference(tmp_path, monkeypatch):
    """0008 rebuilds the generations table to admit purpose 'anchor' (SQLite cannot alter a CHECK):
    a store made before it keeps its ids, rows and every reference to them."""
    import selfdistill.store as store_mod

    every = migrations()
    before = [m for m in every if m[0] < "0008"]
    monkeypatch.setattr(store_mod, "migrations", lambda: before)
    s = Store.create(tmp_path / "old.db")
    s.ensure_base_checkpoint()
    rid = s.create_round("base")
    s.add_tasks([TaskIn("t", "q1", "1")], 0.0)
    tid = s.tasks()[0].id
    gen = {"round_id": rid, "task_id": tid, "checkpoint_id": "base", "purpose": "train", "prompt": "q1", "text": "1",
           "token_ids": [1, 2], "logprobs": [-0.1, -0.2]}
    ids = s.add_generations([gen, {**gen, "text": "2"}])
    s.add_scores([{"generation_id": i, "scorer": "verifier:x", "score": 1.0, "correct": True} for i in ids])
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        s.add_generations([{**gen, "purpose": "anchor"}])
    rows = s.query("SELECT * FROM generations ORDER BY id")
    s.close()

    monkeypatch.setattr(store_mod, "migrations", lambda: every)
    s = Store.open(tmp_path / "old.db")
    assert s.query("SELECT * FROM generations ORDER BY id") == rows
    assert [r["generation_id"] for r in s.scores_for_round(rid)] == ids
    assert set(s.sample_logprobs(rid)) == set(ids)
    assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert s.conn.execute("PRAGMA foreign_key_check").fetchall() == [] and s.integrity_check() == "ok"
    s.add_generations([{**gen, "purpose": "anchor"}])
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):  # the rebuilt table's references hold
        s.add_scores([{"generation_id": 10**6, "scorer": "verifier:x", "score": 1.0}])
    s.close()


def test_a_migration_that_would_break_a_reference_is_refused_whole(store, monkeypatch):
    """Migrations run with foreign keys off (a table rebuild needs it), so each is checked before its
    COMMIT: one that leaves a dangling reference fails and changes nothing."""
    import selfdistill.store as store_mod

    rid = store.create_round("base")
    bad = "INSERT INTO scores(generation_id, scorer, created_at) VALUES (424242, 'x', 0);\nCREATE TABLE extra(a);"
    monkeypatch.setattr(store_mod, "migrations", lambda: [*migrations(), ("9000_bad", bad)])
    with pytest.raises(StoreError, match="9000_bad failed .*1 rows would break a foreign key.*the database is unchanged"):
        store.migrate()
    assert store.query("SELECT count(*) AS n FROM scores")[0]["n"] == 0
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'extra'") == []
    assert "9000_bad" not in {r["name"] for r in store.query("SELECT name FROM migrations")}
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert rid == 1
