"""The store: the only code that touches SQLite.

One database file per state directory, in WAL mode with foreign keys on and a busy timeout, so
readers (`selfdistill status`, the report, `sqlite3` in a shell) are welcome while the daemon
writes. The schema lives in `store/migrations/*.sql` at the top of the repository (inside the
package as `_data/store` when installed from a wheel); each migration is applied in one
transaction together with its row in `migrations`.

Every write that belongs to a phase goes through `transaction()`, so a crash leaves either all of
a phase's output or none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from selfdistill.errors import StoreError
from selfdistill.records import PairRecord, SftRecord, Task, TaskIn, split_for

APP_ID = 0x53444C53  # "SDLS": PRAGMA application_id marks a selfdistill database
DB_NAME = "selfdistill.db"
BUSY_TIMEOUT_MS = 60_000


def sql_dir() -> Path:
    """The directory holding migrations/ and queries/ (repository checkout or installed wheel)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_data" / "store", here.parent / "store"):
        if (cand / "migrations").is_dir():
            return cand
    raise StoreError("the schema files are missing (store/migrations): reinstall selfdistill")


def migrations() -> list[tuple[str, str]]:
    d = sql_dir() / "migrations"
    return [(p.stem, p.read_text()) for p in sorted(d.glob("*.sql"))]


def canned_queries() -> dict[str, str]:
    d = sql_dir() / "queries"
    return {p.stem: p.read_text() for p in sorted(d.glob("*.sql"))}


def _now() -> float:
    return time.time()


def _j(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _is_sqlite_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


class Store:
    """A selfdistill database. `Store.open(path)` for an existing one, `Store.create(path)` to make it."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._in_tx = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def _connect(cls, path: Path, readonly: bool = False) -> sqlite3.Connection:
        uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> "Store":
        """Create (or open and migrate) the database at `path`, owner-only."""
        p = Path(path)
        if p.exists():
            return cls.open(p)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except OSError as e:
            raise StoreError(f"{p}: cannot create the database ({e.strerror}); check the state directory's permissions") from None
        conn = cls._connect(p)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA application_id = {APP_ID}")
        except sqlite3.Error as e:
            raise StoreError(f"{p}: cannot initialise the database ({e})") from None
        store = cls(conn, p)
        store.migrate()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], readonly: bool = False) -> "Store":
        p = Path(path)
        if not p.exists():
            raise StoreError(f"{p}: no database here; run `selfdistill init POLICY` first")
        try:
            if not _is_sqlite_file(p):
                raise StoreError(f"{p}: not an SQLite database; move it away or point state_dir elsewhere")
        except OSError as e:
            raise StoreError(f"{p}: cannot read the database ({e.strerror})") from None
        try:
            conn = cls._connect(p, readonly=readonly)
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{p}: the database is corrupt or unreadable ({e}); restore it from a backup") from None
        if app_id != APP_ID:
            conn.close()
            raise StoreError(f"{p}: an SQLite database that selfdistill did not create; refusing to touch it (use another state_dir)")
        store = cls(conn, p)
        known = {name for name, _ in migrations()}
        try:
            applied = {r[0] for r in conn.execute("SELECT name FROM migrations")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{p}: the database is corrupt ({e}); restore it from a backup") from None
        newer = applied - known
        if newer:
            conn.close()
            raise StoreError(
                f"{p}: the database was written by a newer selfdistill (migration {sorted(newer)[-1]} is unknown here); upgrade selfdistill"
            )
        if known - applied and not readonly:
            store.migrate()
        return store

    def close(self) -> None:
        self.conn.close()

    def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded, each in one transaction with its record."""
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {r[0] for r in self.conn.execute("SELECT name FROM migrations")}
        applied = []
        for name, sql in migrations():
            if name in done:
                continue
            try:
                # executescript commits implicitly, so the migration carries its own BEGIN/COMMIT.
                self.conn.executescript(
                    "BEGIN IMMEDIATE;\n" + sql + f"\nINSERT INTO migrations(name, applied_at) VALUES ({_sq(name)}, {_now()});\nCOMMIT;"
                )
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise StoreError(f"{self.path}: migration {name} failed ({e}); the database is unchanged") from None
            applied.append(name)
        return applied

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; nested use joins the outer transaction."""
        if self._in_tx:
            yield self.conn
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise _store_error(self.path, e) from None
        self._in_tx = True
        try:
            yield self.conn
        except BaseException:
            self._in_tx = False
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise _store_error(self.path, e) from None
        finally:
            self._in_tx = False

    def execute(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as e:
            raise _store_error(self.path, e) from None

    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.execute(sql, params).fetchall()]

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    def wal_checkpoint(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum_if_worthwhile(self, min_free_fraction: float = 0.25) -> bool:
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        if pages and free / pages >= min_free_fraction:
            self.conn.execute("VACUUM")
            return True
        return False

    # -- meta and events -------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def event(self, kind: str, message: str, *, level: str = "info", round_id: int | None = None, data: dict | None = None) -> int:
        with self.transaction():
            cur = self.execute(
                "INSERT INTO events(ts, round_id, level, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                (_now(), round_id, level, kind, message, _j(data or {})),
            )
            return cur.lastrowid

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if kind:
            return self.query("SELECT * FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?", (kind, limit))
        return self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))

    # -- tasks -----------------------------------------------------------------------------

    def add_tasks(self, tasks: Iterable[TaskIn], heldout_fraction: float, audit_fraction: float = 0.0) -> tuple[int, int]:
        """Insert new tasks (idempotent by key); returns (added, already present)."""
        added = existing = 0
        with self.transaction():
            for t in tasks:
                key = t.key
                cur = self.execute(
                    "INSERT OR IGNORE INTO tasks(key, source, prompt, answer, verifier, category, metadata, split, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, t.source, t.prompt, t.answer, t.verifier, t.category, _j(t.metadata),
                     split_for(key, heldout_fraction, audit_fraction), _now()),
                )
                if cur.rowcount:
                    added += 1
                else:
                    existing += 1
        return added, existing

    @staticmethod
    def _task(row: sqlite3.Row | dict) -> Task:
        d = dict(row)
        return Task(
            source=d["source"], prompt=d["prompt"], answer=d["answer"], verifier=d["verifier"],
            category=d["category"], metadata=json.loads(d["metadata"]), id=d["id"], split=d["split"],
            uses=d["uses"], attempts=d["attempts"], successes=d["successes"],
        )

    def tasks(self, split: str | None = None, ids: Iterable[int] | None = None, limit: int | None = None) -> list[Task]:
        sql, params = "SELECT * FROM tasks", []
        where = []
        if split:
            where.append("split = ?")
            params.append(split)
        if ids is not None:
            ids = list(ids)
            where.append(f"id IN ({','.join('?' * len(ids))})")
            params.extend(ids)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [self._task(r) for r in self.execute(sql, params).fetchall()]

    def count_tasks(self) -> dict[str, int]:
        return {r["split"]: r["n"] for r in self.query("SELECT split, count(*) AS n FROM tasks GROUP BY split")}

    # -- rounds and phases -----------------------------------------------------------------

    def open_round(self) -> dict[str, Any] | None:
        """The round still running (at most one), to resume after a crash."""
        rows = self.query("SELECT * FROM rounds WHERE status = 'running' ORDER BY id DESC LIMIT 1")
        return _decode(rows[0]) if rows else None

    def create_round(self, incumbent_id: str) -> int:
        with self.transaction():
            cur = self.execute(
                "INSERT INTO rounds(phase, status, incumbent_id, started_at) VALUES ('sample', 'running', ?, ?)",
                (incumbent_id, _now()),
            )
            return cur.lastrowid

    def get_round(self, round_id: int) -> dict[str, Any]:
        rows = self.query("SELECT * FROM rounds WHERE id = ?", (round_id,))
        if not rows:
            raise StoreError(f"round {round_id} does not exist")
        return _decode(rows[0])

    def rounds(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM rounds ORDER BY id"
        if limit:
            sql = f"SELECT * FROM (SELECT * FROM rounds ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
        return [_decode(r) for r in self.query(sql)]

    def update_round(self, round_id: int, **fields: Any) -> None:
        """Set round columns; dict/list values are stored as JSON. Joins an open transaction."""
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        vals = [(_j(v) if isinstance(v, (dict, list)) else v) for v in fields.values()]
        with self.transaction():
            self.execute(f"UPDATE rounds SET {cols} WHERE id = ?", (*vals, round_id))

    def merge_round_metrics(self, round_id: int, metrics: dict[str, Any]) -> None:
        with self.transaction():
            cur = json.loads(self.execute("SELECT metrics FROM rounds WHERE id = ?", (round_id,)).fetchone()[0])
            cur.update(metrics)
            self.execute("UPDATE rounds SET metrics = ? WHERE id = ?", (_j(cur), round_id))

    def record_phase(self, round_id: int, phase: str, started_at: float, counts: dict[str, Any], next_phase: str) -> None:
        """Close a phase (its duration and counts) and move the round on, in the current transaction."""
        now = _now()
        with self.transaction():
            self.execute(
                "INSERT INTO phases(round_id, phase, started_at, finished_at, duration_s, counts) VALUES (?, ?, ?, ?, ?, ?)",
                (round_id, phase, started_at, now, now - started_at, _j(counts)),
            )
            self.execute("UPDATE rounds SET phase = ? WHERE id = ?", (next_phase, round_id))

    def phases(self, round_id: int | None = None) -> list[dict[str, Any]]:
        if round_id is None:
            return [_decode(r) for r in self.query("SELECT * FROM phases ORDER BY id")]
        return [_decode(r) for r in self.query("SELECT * FROM phases WHERE round_id = ? ORDER BY id", (round_id,))]

    def set_round_tasks(self, round_id: int, task_ids: list[int]) -> None:
        with self.transaction():
            self.execute("DELETE FROM round_tasks WHERE round_id = ?", (round_id,))
            self.conn.executemany("INSERT INTO round_tasks(round_id, task_id) VALUES (?, ?)", [(round_id, t) for t in task_ids])
            if task_ids:
                self.execute(f"UPDATE tasks SET uses = uses + 1 WHERE id IN ({','.join('?' * len(task_ids))})", task_ids)

    def round_tasks(self, round_id: int) -> list[Task]:
        rows = self.execute(
            "SELECT t.* FROM tasks t JOIN round_tasks rt ON rt.task_id = t.id WHERE rt.round_id = ? ORDER BY t.id", (round_id,)
        ).fetchall()
        return [self._task(r) for r in rows]

    # -- generations and scores ------------------------------------------------------------

    def add_generations(self, rows: list[dict[str, Any]]) -> list[int]:
        """rows: round_id, task_id, checkpoint_id, purpose, sample_index, prompt, text, params, prompt_tokens, completion_tokens, finish_reason."""
        ids = []
        with self.transaction():
            for r in rows:
                cur = self.execute(
                    "INSERT INTO generations(round_id, task_id, checkpoint_id, purpose, sample_index, prompt, text, params, "
                    "prompt_tokens, completion_tokens, finish_reason, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (r.get("round_id"), r["task_id"], r["checkpoint_id"], r["purpose"], r.get("sample_index", 0), r["prompt"],
                     r["text"], _j(r.get("params", {})), r.get("prompt_tokens", 0), r.get("completion_tokens", 0),
                     r.get("finish_reason"), _now()),
                )
                ids.append(cur.lastrowid)
        return ids

    def generations(self, round_id: int, purpose: str = "train") -> list[dict[str, Any]]:
        return [_decode(r) for r in self.query(
            "SELECT * FROM generations WHERE round_id = ? AND purpose = ? ORDER BY id", (round_id, purpose))]

    def delete_generations(self, round_id: int, purpose: str) -> int:
        """Drop a round's generations of one purpose (and their scores): a phase restarting from scratch."""
        with self.transaction():
            self.execute(
                "DELETE FROM scores WHERE generation_id IN (SELECT id FROM generations WHERE round_id = ? AND purpose = ?)",
                (round_id, purpose),
            )
            return self.execute("DELETE FROM generations WHERE round_id = ? AND purpose = ?", (round_id, purpose)).rowcount

    def add_scores(self, rows: list[dict[str, Any]]) -> None:
        """rows: generation_id, scorer, score (None = unparseable), correct, parsed, details."""
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO scores(generation_id, scorer, score, correct, parsed, details, created_at) VALUES (?,?,?,?,?,?,?)",
                [(r["generation_id"], r["scorer"], r.get("score"),
                  None if r.get("correct") is None else int(bool(r["correct"])),
                  int(r.get("parsed", True)), _j(r.get("details", {})), _now()) for r in rows],
            )

    def scores_for_round(self, round_id: int, purpose: str = "train") -> list[dict[str, Any]]:
        return [_decode(r) for r in self.query(
            "SELECT s.*, g.task_id, g.text, g.completion_tokens FROM scores s JOIN generations g ON g.id = s.generation_id "
            "WHERE g.round_id = ? AND g.purpose = ? ORDER BY s.id", (round_id, purpose))]

    def update_task_stats(self, stats: dict[int, tuple[int, float]]) -> None:
        """Add (attempts, successes) to each task's running pass-rate counts."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE tasks SET attempts = attempts + ?, successes = successes + ? WHERE id = ?",
                [(a, s, tid) for tid, (a, s) in stats.items()],
            )

    def total_generated_tokens(self) -> int:
        return int(self.execute("SELECT coalesce(sum(completion_tokens), 0) FROM generations").fetchone()[0])

    # -- pairs and SFT examples ------------------------------------------------------------

    def add_training_data(self, round_id: int, pairs: list[PairRecord], sft: list[SftRecord]) -> tuple[int, int]:
        """Insert a round's pairs and examples (duplicates of earlier ones are ignored)."""
        now = _now()
        with self.transaction():
            np_ = ns = 0
            for p in pairs:
                np_ += self.execute(
                    "INSERT OR IGNORE INTO pairs(round_id, task_id, prompt, chosen, rejected, chosen_gen_id, rejected_gen_id, "
                    "margin, weight, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (round_id, p.task_id, p.prompt, p.chosen, p.rejected, p.chosen_gen_id, p.rejected_gen_id,
                     p.margin, p.weight, p.source, now),
                ).rowcount
            for s in sft:
                ns += self.execute(
                    "INSERT OR IGNORE INTO sft_examples(round_id, task_id, prompt, completion, generation_id, weight, source, created_at) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (round_id, s.task_id, s.prompt, s.completion, s.generation_id, s.weight, s.source, now),
                ).rowcount
        return np_, ns

    def delete_training_data(self, round_id: int) -> None:
        with self.transaction():
            self.execute("DELETE FROM pairs WHERE round_id = ?", (round_id,))
            self.execute("DELETE FROM sft_examples WHERE round_id = ?", (round_id,))

    def training_data(self, round_id: int, scope: str = "all", replay_fraction: float = 0.0, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
        """The SFT examples and pairs a training round may use, read in one snapshot.

        The held-out wall lives here: only rows whose task is in the 'train' split are returned,
        whatever the rows say about themselves.
        """
        import random

        with self.transaction():  # one consistent snapshot of both tables
            if scope == "all":
                cond, params = "x.round_id <= ?", [round_id]
            else:
                last = self.execute(
                    "SELECT coalesce(max(round_id), 0) FROM training_runs WHERE status = 'succeeded' AND round_id < ?", (round_id,)
                ).fetchone()[0]
                cond, params = "x.round_id > ? AND x.round_id <= ?", [last, round_id]
            sft = self.query(
                f"SELECT x.id, x.task_id, x.prompt, x.completion, x.weight, x.source, x.round_id FROM sft_examples x "
                f"JOIN tasks t ON t.id = x.task_id WHERE t.split = 'train' AND {cond} ORDER BY x.id", params)
            pairs = self.query(
                f"SELECT x.id, x.task_id, x.prompt, x.chosen, x.rejected, x.weight, x.source, x.margin, x.round_id FROM pairs x "
                f"JOIN tasks t ON t.id = x.task_id WHERE t.split = 'train' AND {cond} ORDER BY x.id", params)
            if scope != "all" and replay_fraction > 0:
                rng = random.Random(seed + round_id)
                for table, rows in (("sft_examples", sft), ("pairs", pairs)):
                    cols = "x.id, x.task_id, x.prompt, x.completion, x.weight, x.source, x.round_id" if table == "sft_examples" else \
                        "x.id, x.task_id, x.prompt, x.chosen, x.rejected, x.weight, x.source, x.margin, x.round_id"
                    older = self.query(
                        f"SELECT {cols} FROM {table} x JOIN tasks t ON t.id = x.task_id WHERE t.split = 'train' AND x.round_id <= ? ORDER BY x.id",
                        [params[0]])
                    want = int(round(len(rows) * replay_fraction / max(1e-9, 1 - replay_fraction)))
                    rows.extend(rng.sample(older, min(want, len(older))))
        return {"sft": sft, "pairs": pairs}

    def mark_data_used(self, round_id: int, sft_ids: list[int], pair_ids: list[int]) -> None:
        with self.transaction():
            if sft_ids:
                self.execute(f"UPDATE sft_examples SET used_in_round = ? WHERE used_in_round IS NULL AND id IN ({','.join('?' * len(sft_ids))})", (round_id, *sft_ids))
            if pair_ids:
                self.execute(f"UPDATE pairs SET used_in_round = ? WHERE used_in_round IS NULL AND id IN ({','.join('?' * len(pair_ids))})", (round_id, *pair_ids))

    def count_new_training_data(self) -> int:
        """Pairs + examples not yet used by any training round."""
        a = self.execute("SELECT count(*) FROM pairs WHERE used_in_round IS NULL").fetchone()[0]
        b = self.execute("SELECT count(*) FROM sft_examples WHERE used_in_round IS NULL").fetchone()[0]
        return a + b

    # -- training runs ---------------------------------------------------------------------

    def start_training_run(self, round_id: int, attempt: int, spec: dict[str, Any]) -> int:
        with self.transaction():
            return self.execute(
                "INSERT INTO training_runs(round_id, attempt, status, spec, started_at) VALUES (?, ?, 'running', ?, ?)",
                (round_id, attempt, _j(spec), _now()),
            ).lastrowid

    def finish_training_run(self, run_id: int, status: str, metrics: dict[str, Any], error: str | None, pid: int | None = None) -> None:
        with self.transaction():
            self.execute(
                "UPDATE training_runs SET status = ?, metrics = ?, error = ?, pid = coalesce(?, pid), finished_at = ? WHERE id = ?",
                (status, _j(metrics), error, pid, _now(), run_id),
            )

    def training_runs(self, round_id: int | None = None) -> list[dict[str, Any]]:
        if round_id is None:
            return [_decode(r) for r in self.query("SELECT * FROM training_runs ORDER BY id")]
        return [_decode(r) for r in self.query("SELECT * FROM training_runs WHERE round_id = ? ORDER BY id", (round_id,))]

    # -- checkpoints -----------------------------------------------------------------------

    def ensure_base_checkpoint(self) -> None:
        with self.transaction():
            self.execute(
                "INSERT OR IGNORE INTO checkpoints(id, status, is_current, created_at) VALUES ('base', 'base', "
                "(SELECT CASE WHEN EXISTS (SELECT 1 FROM checkpoints WHERE is_current = 1) THEN 0 ELSE 1 END), ?)",
                (_now(),),
            )

    def add_checkpoint(self, ckpt_id: str, parent_id: str, round_id: int, path: str, training: dict[str, Any]) -> None:
        with self.transaction():
            self.execute(
                "INSERT OR REPLACE INTO checkpoints(id, parent_id, round_id, path, status, training, created_at) "
                "VALUES (?, ?, ?, ?, 'candidate', ?, ?)",
                (ckpt_id, parent_id, round_id, path, _j(training), _now()),
            )

    def checkpoint(self, ckpt_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM checkpoints WHERE id = ?", (ckpt_id,))
        return _decode(rows[0]) if rows else None

    def checkpoints(self) -> list[dict[str, Any]]:
        return [_decode(r) for r in self.query("SELECT * FROM checkpoints ORDER BY created_at, id")]

    def current_checkpoint(self) -> dict[str, Any]:
        rows = self.query("SELECT * FROM checkpoints WHERE is_current = 1")
        if not rows:
            raise StoreError(f"{self.path}: no current checkpoint recorded; run `selfdistill init POLICY`")
        return _decode(rows[0])

    def set_checkpoint_status(self, ckpt_id: str, status: str, reason: str | None = None) -> None:
        with self.transaction():
            self.execute("UPDATE checkpoints SET status = ?, reason = coalesce(?, reason) WHERE id = ?", (status, reason, ckpt_id))

    def commit_promotion(self, ckpt_id: str, reason: str, round_id: int | None = None, kind: str = "promote") -> str:
        """The one transaction of a promotion (or rollback): current moves to ckpt_id, the event is
        logged; returns the id that was current (checkpoints.PromotionStore)."""
        with self.transaction():
            row = self.execute("SELECT status FROM checkpoints WHERE id = ?", (ckpt_id,)).fetchone()
            if row is None:
                raise StoreError(f"checkpoint {ckpt_id} does not exist (see `selfdistill status`)")
            prev = self.execute("SELECT id FROM checkpoints WHERE is_current = 1").fetchone()
            self.execute("UPDATE checkpoints SET is_current = 0 WHERE is_current = 1")
            new_status = "base" if ckpt_id == "base" else "promoted"
            self.execute(
                "UPDATE checkpoints SET is_current = 1, status = ?, promoted_at = coalesce(promoted_at, ?), reason = ? WHERE id = ?",
                (new_status, _now(), reason, ckpt_id),
            )
            self.execute(
                "INSERT INTO events(ts, round_id, level, kind, message, data) VALUES (?, ?, 'info', ?, ?, ?)",
                (_now(), round_id, kind, f"{kind}: {prev[0] if prev else None} -> {ckpt_id}: {reason}",
                 _j({"from": prev[0] if prev else None, "to": ckpt_id})),
            )
            if kind == "rollback" and prev and prev[0] not in ("base", ckpt_id):
                self.execute("UPDATE checkpoints SET status = 'rejected', reason = ? WHERE id = ?", (f"rolled back: {reason}", prev[0]))
            return prev[0] if prev else "base"

    def commit_rollback(self, to_id: str, reason: str) -> str:
        """Serve `to_id` again (checkpoints.PromotionStore); the checkpoint left is marked rejected."""
        row = self.checkpoint(to_id)
        if row is None or row["status"] not in ("base", "promoted"):
            raise StoreError(f"cannot roll back to {to_id}: only the base or an earlier promoted checkpoint can be served again")
        return self.commit_promotion(to_id, reason, kind="rollback")

    def promoted_chain(self) -> list[str]:
        """Promoted checkpoints, oldest first (the base first)."""
        return [r["id"] for r in self.query(
            "SELECT id FROM checkpoints WHERE status IN ('base', 'promoted') ORDER BY coalesce(promoted_at, created_at), id")]

    def next_checkpoint_id(self) -> str:
        n = self.execute("SELECT count(*) FROM checkpoints WHERE id != 'base'").fetchone()[0]
        while True:
            n += 1
            cid = f"ckpt-{n:06d}"
            if self.checkpoint(cid) is None:
                return cid

    # -- evaluations -----------------------------------------------------------------------

    def add_evaluation(self, checkpoint_id: str, suite: str, metrics: dict[str, Any], items: list[dict[str, Any]], round_id: int | None = None) -> int:
        with self.transaction():
            eid = self.execute(
                "INSERT INTO evaluations(round_id, checkpoint_id, suite, metrics, created_at) VALUES (?, ?, ?, ?, ?)",
                (round_id, checkpoint_id, suite, _j(metrics), _now()),
            ).lastrowid
            self.conn.executemany(
                "INSERT INTO eval_items(evaluation_id, task_id, correct, score, text, tokens) VALUES (?,?,?,?,?,?)",
                [(eid, it["task_id"], None if it.get("correct") is None else int(bool(it["correct"])), it.get("score"),
                  it.get("text", ""), it.get("tokens", 0)) for it in items],
            )
            return eid

    def latest_evaluation(self, checkpoint_id: str, suite: str, task_ids: list[int] | None = None) -> dict[str, Any] | None:
        """The newest evaluation of a checkpoint on a suite (with its items), or None."""
        rows = self.query(
            "SELECT * FROM evaluations WHERE checkpoint_id = ? AND suite = ? ORDER BY id DESC LIMIT 1", (checkpoint_id, suite))
        if not rows:
            return None
        ev = _decode(rows[0])
        ev["items"] = self.query("SELECT task_id, correct, score, text, tokens FROM eval_items WHERE evaluation_id = ? ORDER BY task_id", (ev["id"],))
        if task_ids is not None and sorted(task_ids) != [i["task_id"] for i in ev["items"]]:
            return None
        return ev

    def evaluations(self, suite: str | None = None) -> list[dict[str, Any]]:
        if suite:
            return [_decode(r) for r in self.query("SELECT * FROM evaluations WHERE suite = ? ORDER BY id", (suite,))]
        return [_decode(r) for r in self.query("SELECT * FROM evaluations ORDER BY id")]

    # -- judge health ----------------------------------------------------------------------

    def add_judge_health(self, judge: str, healthy: bool, agreement: float | None, position_bias: float | None,
                         distinct_scores: int | None, details: dict[str, Any], round_id: int | None = None) -> None:
        with self.transaction():
            self.execute(
                "INSERT INTO judge_health(round_id, judge, agreement, position_bias, distinct_scores, healthy, details, created_at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (round_id, judge, agreement, position_bias, distinct_scores, int(healthy), _j(details), _now()),
            )

    def latest_judge_health(self, judge: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM judge_health WHERE judge = ? ORDER BY id DESC LIMIT 1", (judge,))
        return _decode(rows[0]) if rows else None


_JSON_COLS = {"reasons", "metrics", "counts", "params", "details", "training", "spec", "data", "metadata"}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in _JSON_COLS and isinstance(v, str) else v) for k, v in row.items()}


def _sq(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _store_error(path: Path, e: sqlite3.Error) -> StoreError:
    msg = str(e)
    if "locked" in msg or "busy" in msg:
        return StoreError(f"{path}: the database stayed locked for {BUSY_TIMEOUT_MS // 1000}s ({msg}); a long reader holds it — retry later")
    if "disk" in msg and ("full" in msg or "I/O" in msg):
        return StoreError(f"{path}: the disk is full ({msg}); free space and the daemon resumes")
    if "readonly" in msg:
        return StoreError(f"{path}: the database is read-only ({msg}); check the state directory's permissions")
    return StoreError(f"{path}: {msg}")
