"""The store: the only code that touches SQLite.

One database file per state directory, in WAL mode with foreign keys on and a busy timeout, so
readers (`selfdistill status`, the report, `sqlite3` in a shell) are welcome while the daemon
writes. The schema lives in `store/migrations/*.sql` at the top of the repository (inside the
package as `_data/store` when installed from a wheel); each migration is applied in one
transaction together with its row in `migrations`.

Every write that belongs to a phase goes through `transaction()`, so a crash leaves either all of
a phase's output or none of it. Rows are written and read through sqlite-utils (`Store.db`); its
write helpers open a SAVEPOINT inside an open transaction instead of committing, so they join the
phase's `BEGIN IMMEDIATE` transaction. Only schema-shaped statements (migrations, counters
updated in place, the promotion's conditional updates) are written as SQL here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from selfdistill.errors import PromotionSuperseded, StoreError
from selfdistill.records import Checkpoint, Evaluation, PairRecord, Round, SftRecord, Task, TaskIn, TrainingData, split_for

APP_ID = 0x53444C53  # "SDLS": PRAGMA application_id marks a selfdistill database
DB_NAME = "selfdistill.db"
BUSY_TIMEOUT_MS = 60_000
LOGPROB_TABLES = ("sample_logprobs", "teacher_logprobs")  # per-token figures of answers, pruned together


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
        from sqlite_utils import Database

        self.conn = conn
        self.path = path
        self._in_tx = False
        # No plugins, no PRAGMA changes: the store sets its own connection up in _connect.
        self.db = Database(conn, recursive_triggers=False, execute_plugins=False)

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
        store = cls(cls._connect(p), p)
        try:
            store.db.enable_wal()
            store.conn.execute(f"PRAGMA application_id = {APP_ID}")
        except sqlite3.Error as e:
            raise StoreError(f"{p}: cannot initialise the database ({e})") from None
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
        todo = [(name, sql) for name, sql in migrations() if name not in done]
        if not todo:
            return applied
        # Foreign keys off while migrations run (a table rebuild, SQLite's way to change a constraint,
        # drops a table other tables reference), and each migration checked with foreign_key_check
        # before its COMMIT: it commits whole and consistent, or not at all.
        self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            for name, sql in todo:
                try:
                    # executescript commits any open transaction first; this one stays open until checked.
                    self.conn.executescript(
                        "BEGIN IMMEDIATE;\n" + sql + f"\nINSERT INTO migrations(name, applied_at) VALUES ({_sq(name)}, {_now()});"
                    )
                    broken = self.conn.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise sqlite3.IntegrityError(f"{len(broken)} rows would break a foreign key (first: table {broken[0][0]}, "
                                                     f"row {broken[0][1]}, referencing {broken[0][2]})")
                    self.conn.execute("COMMIT")
                except sqlite3.Error as e:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                    raise StoreError(f"{self.path}: migration {name} failed ({e}); the database is unchanged") from None
                applied.append(name)
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")
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
        """Rows as dicts (sqlite-utils' query: a statement that returns no rows is refused and rolled back)."""
        try:
            return list(self.db.query(sql, params if isinstance(params, dict) else list(params)))
        except sqlite3.OperationalError as e:
            raise _store_error(self.path, e) from None

    def _insert(self, table: str, row: dict[str, Any], **kw: Any) -> int:
        """Insert one row (joining an open transaction); returns its rowid."""
        with self.transaction():
            return self.db[table].insert(row, **kw).last_rowid

    def _insert_all(self, table: str, rows: Iterable[dict[str, Any]], **kw: Any) -> int:
        """Insert many rows in one transaction; returns how many were written (INSERT OR IGNORE skips count as 0)."""
        with self.transaction():
            before = self.conn.total_changes
            self.db[table].insert_all(rows, **kw)
            return self.conn.total_changes - before

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    def wal_checkpoint(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum_if_worthwhile(self, min_free_fraction: float = 0.25) -> bool:
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        if pages and free / pages >= min_free_fraction:
            self.db.vacuum()
            return True
        return False

    # -- meta and events -------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    def event(self, kind: str, message: str, *, level: str = "info", round_id: int | None = None, data: dict | None = None) -> int:
        return self._insert("events", {"ts": _now(), "round_id": round_id, "level": level, "kind": kind,
                                       "message": message, "data": _j(data or {})})

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if kind:
            return self.query("SELECT * FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?", (kind, limit))
        return self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))

    # -- tasks -----------------------------------------------------------------------------

    def add_tasks(self, tasks: Iterable[TaskIn], heldout_fraction: float, audit_fraction: float = 0.0) -> tuple[int, int]:
        """Insert new tasks (idempotent by key); returns (added, already present)."""
        rows = [{"key": t.key, "source": t.source, "prompt": t.prompt, "answer": t.answer, "verifier": t.verifier,
                 "category": t.category, "metadata": _j(t.metadata), "task_group": t.group,
                 "split": split_for(t.split_key, heldout_fraction, audit_fraction),
                 "created_at": _now()} for t in tasks]
        added = self._insert_all("tasks", rows, ignore=True)
        return added, len(rows) - added

    @staticmethod
    def _task(row: sqlite3.Row | dict) -> Task:
        d = dict(row)
        return Task(
            source=d["source"], prompt=d["prompt"], answer=d["answer"], verifier=d["verifier"],
            category=d["category"], metadata=json.loads(d["metadata"]), group=d.get("task_group"), id=d["id"], split=d["split"],
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
        return [self._task(r) for r in self.query(sql, params)]

    def count_tasks(self) -> dict[str, int]:
        return {r["split"]: r["n"] for r in self.query("SELECT split, count(*) AS n FROM tasks GROUP BY split")}

    def count_code_tasks(self, default_is_code: bool = False) -> int:
        """Tasks whose answers the code verifier runs (their own verifier, or none and the default's)."""
        where = "verifier = 'code'" + (" OR verifier IS NULL OR verifier = ''" if default_is_code else "")
        return self.query(f"SELECT count(*) AS n FROM tasks WHERE {where}")[0]["n"]

    # -- rounds and phases -----------------------------------------------------------------

    def open_round(self) -> Round | None:
        """The round still running (at most one), to resume after a crash."""
        rows = self.query("SELECT * FROM rounds WHERE status = 'running' ORDER BY id DESC LIMIT 1")
        return Round(**_decode(rows[0])) if rows else None

    def create_round(self, incumbent_id: str) -> int:
        return self._insert("rounds", {"phase": "sample", "status": "running", "incumbent_id": incumbent_id, "started_at": _now()})

    def get_round(self, round_id: int) -> Round:
        rows = self.query("SELECT * FROM rounds WHERE id = ?", (round_id,))
        if not rows:
            raise StoreError(f"round {round_id} does not exist")
        return Round(**_decode(rows[0]))

    def rounds(self, limit: int | None = None) -> list[Round]:
        sql = "SELECT * FROM rounds ORDER BY id"
        if limit:
            sql = f"SELECT * FROM (SELECT * FROM rounds ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
        return [Round(**_decode(r)) for r in self.query(sql)]

    def update_round(self, round_id: int, **fields: Any) -> None:
        """Set round columns; dict/list values are stored as JSON. Joins an open transaction."""
        if not fields:
            return
        with self.transaction():
            self.db["rounds"].update(round_id, {k: (_j(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()})

    def merge_round_metrics(self, round_id: int, metrics: dict[str, Any]) -> None:
        with self.transaction():
            cur = json.loads(self.db["rounds"].get(round_id)["metrics"])
            cur.update(metrics)
            self.db["rounds"].update(round_id, {"metrics": _j(cur)})

    def record_phase(self, round_id: int, phase: str, started_at: float, counts: dict[str, Any], next_phase: str) -> None:
        """Close a phase (its duration and counts) and move the round on, in the current transaction."""
        now = _now()
        with self.transaction():
            self._insert("phases", {"round_id": round_id, "phase": phase, "started_at": started_at, "finished_at": now,
                                    "duration_s": now - started_at, "counts": _j(counts)})
            self.db["rounds"].update(round_id, {"phase": next_phase})

    def phases(self, round_id: int | None = None) -> list[dict[str, Any]]:
        if round_id is None:
            return [_decode(r) for r in self.query("SELECT * FROM phases ORDER BY id")]
        return [_decode(r) for r in self.query("SELECT * FROM phases WHERE round_id = ? ORDER BY id", (round_id,))]

    def set_round_tasks(self, round_id: int, task_ids: list[int]) -> None:
        with self.transaction():
            self.db["round_tasks"].delete_where("round_id = ?", [round_id])
            self._insert_all("round_tasks", ({"round_id": round_id, "task_id": t} for t in task_ids))
            if task_ids:
                self.execute(f"UPDATE tasks SET uses = uses + 1 WHERE id IN ({','.join('?' * len(task_ids))})", task_ids)

    def round_tasks(self, round_id: int) -> list[Task]:
        rows = self.query(
            "SELECT t.* FROM tasks t JOIN round_tasks rt ON rt.task_id = t.id WHERE rt.round_id = ? ORDER BY t.id", (round_id,))
        return [self._task(r) for r in rows]

    # -- generations and scores ------------------------------------------------------------

    def add_generations(self, rows: list[dict[str, Any]]) -> list[int]:
        """rows: round_id, task_id, checkpoint_id, purpose, sample_index, prompt, text, params, prompt_tokens, completion_tokens, finish_reason."""
        now = _now()
        with self.transaction():
            n = self._insert_all("generations", (
                {"round_id": r.get("round_id"), "task_id": r["task_id"], "checkpoint_id": r["checkpoint_id"], "purpose": r["purpose"],
                 "sample_index": r.get("sample_index", 0), "prompt": r["prompt"], "text": r["text"], "params": _j(r.get("params", {})),
                 "prompt_tokens": r.get("prompt_tokens", 0), "completion_tokens": r.get("completion_tokens", 0),
                 "finish_reason": r.get("finish_reason"), "created_at": now} for r in rows))
            if not n:
                return []
            # One writer holds the transaction (BEGIN IMMEDIATE) and the id is a plain INTEGER PRIMARY KEY, so SQLite
            # gives the rows consecutive ids ending at the last one inserted.
            last = self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            ids = list(range(last - n + 1, last + 1))
            self._insert_all("sample_logprobs", (
                {"generation_id": gid, "token_ids": pack_ints(r["token_ids"]), "logprobs": pack_floats(r["logprobs"]), "created_at": now}
                for gid, r in zip(ids, rows) if r.get("token_ids") is not None and r.get("logprobs") is not None
                and len(r["token_ids"]) == len(r["logprobs"])))
            return ids

    def sample_logprobs(self, round_id: int, purpose: str = "train") -> dict[int, tuple[list[int], list[float]]]:
        """generation id -> (sampled token ids, their sampling log-probabilities) of a round's answers that have them."""
        return {r["generation_id"]: (unpack_ints(r["token_ids"]), unpack_floats(r["logprobs"])) for r in self.query(
            "SELECT l.* FROM sample_logprobs l JOIN generations g ON g.id = l.generation_id "
            "WHERE g.round_id = ? AND g.purpose = ?", (round_id, purpose))}

    def add_teacher_logprobs(self, teacher: str, tokenizer: str, rows: dict[int, list[float]],
                             topk: dict[int, tuple[list[list[int]], list[list[float]]]] | None = None) -> int:
        """Store the teacher's log-probability of each token of these answers (generation id -> one per
        sampled token), and with `topk` each position's k most likely tokens and theirs (generation id
        -> ([tokens][k] ids, [tokens][k] log-probabilities), the same k throughout); the rows written.
        Without top-k an answer already scored keeps its first figures; with it a row scored without
        (or with fewer alternatives) is replaced."""
        now = _now()
        if not topk:
            return self._insert_all("teacher_logprobs", (
                {"generation_id": gid, "teacher": teacher, "tokenizer": tokenizer, "logprobs": pack_floats(lps), "created_at": now}
                for gid, lps in rows.items()), ignore=True)
        return self._insert_all("teacher_logprobs", (
            {"generation_id": gid, "teacher": teacher, "tokenizer": tokenizer, "logprobs": pack_floats(lps), "created_at": now,
             "top_k": len(topk[gid][0][0]) if topk[gid][0] else 0,
             "topk_ids": pack_ints([t for row in topk[gid][0] for t in row]),
             "topk_logprobs": pack_floats([x for row in topk[gid][1] for x in row])}
            for gid, lps in rows.items()), replace=True)

    def teacher_logprobs(self, round_id: int, purpose: str = "train") -> dict[int, list[float]]:
        """generation id -> the teacher's log-probability of each sampled token, for a round's answers that have them."""
        return {r["generation_id"]: unpack_floats(r["logprobs"]) for r in self.query(
            "SELECT t.generation_id, t.logprobs FROM teacher_logprobs t JOIN generations g ON g.id = t.generation_id "
            "WHERE g.round_id = ? AND g.purpose = ?", (round_id, purpose))}

    def teacher_topk(self, round_id: int, k: int, purpose: str = "train") -> dict[int, tuple[list[list[int]], list[list[float]]]]:
        """generation id -> the teacher's k most likely tokens at each position of the answer and their
        log-probabilities ([tokens][k] each), for a round's answers scored with at least k alternatives."""
        out = {}
        for r in self.query("SELECT t.generation_id, t.top_k, t.topk_ids, t.topk_logprobs FROM teacher_logprobs t "
                            "JOIN generations g ON g.id = t.generation_id "
                            "WHERE g.round_id = ? AND g.purpose = ? AND t.top_k >= ?", (round_id, purpose, k)):
            w, ids, lps = r["top_k"], unpack_ints(r["topk_ids"]), unpack_floats(r["topk_logprobs"])
            out[r["generation_id"]] = ([ids[i:i + k] for i in range(0, len(ids), w)], [lps[i:i + k] for i in range(0, len(lps), w)])
        return out

    def add_teacher_usage(self, round_id: int | None, teacher: str, purpose: str, method: str, requests: int,
                          prompt_tokens: int, completion_tokens: int, seconds: float) -> int:
        """Count one batch of teacher requests (committed at once, even inside no phase: a paid call stays paid)."""
        return self._insert("teacher_usage", {"round_id": round_id, "teacher": teacher, "purpose": purpose, "method": method,
                                              "requests": requests, "prompt_tokens": prompt_tokens,
                                              "completion_tokens": completion_tokens, "seconds": seconds, "created_at": _now()})

    def teacher_usage(self, round_id: int | None = None) -> dict[str, dict[str, int]]:
        """purpose -> requests, prompt_tokens, completion_tokens and tokens (their sum), for one round or all of them."""
        where, args = ("WHERE round_id = ?", (round_id,)) if round_id is not None else ("", ())
        return {r.pop("purpose"): {**r, "tokens": r["prompt_tokens"] + r["completion_tokens"]} for r in self.query(
            "SELECT purpose, sum(requests) AS requests, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens "
            f"FROM teacher_usage {where} GROUP BY purpose ORDER BY purpose", args)}

    def total_teacher_tokens(self) -> int:
        return int(self.execute("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM teacher_usage").fetchone()[0])

    def prune_sample_logprobs(self, before_round: int) -> int:
        """Retention: drop the stored log-probabilities (the sampler's and the teacher's) of answers
        sampled before round `before_round`."""
        with self.transaction():
            before = self.conn.total_changes
            for table in LOGPROB_TABLES:
                self.execute(f"DELETE FROM {table} WHERE generation_id IN "
                             "(SELECT id FROM generations WHERE round_id < ?)", (before_round,))
            return self.conn.total_changes - before

    def generations(self, round_id: int, purpose: str = "train") -> list[dict[str, Any]]:
        return [_decode(r) for r in self.query(
            "SELECT * FROM generations WHERE round_id = ? AND purpose = ? ORDER BY id", (round_id, purpose))]

    def base_answers(self, task_ids: list[int], per_task: int) -> dict[int, list[dict[str, Any]]]:
        """The base model's stored sampled answers to these tasks (a round's own while the base was the
        incumbent, or anchors), the first `per_task` distinct texts of each, oldest first."""
        out: dict[int, list[dict[str, Any]]] = {}
        texts: dict[int, set[str]] = {}
        for i in range(0, len(task_ids), 500):
            chunk = task_ids[i : i + 500]
            for r in self.query(
                f"SELECT * FROM generations WHERE checkpoint_id = 'base' AND purpose IN ('train', 'anchor') "
                f"AND task_id IN ({','.join('?' * len(chunk))}) ORDER BY id", tuple(chunk)):
                got = out.setdefault(r["task_id"], [])
                seen = texts.setdefault(r["task_id"], set())
                if len(got) < per_task and r["text"] not in seen:
                    seen.add(r["text"])
                    got.append(_decode(r))
        return out

    def verified_counts(self) -> dict[str, dict[int, tuple[int, float]]]:
        """Per student (checkpoint id, oldest first), per task: (answers, verified correct) of the
        training answers a verifier scored: what each student got right (the curriculum's levels)."""
        out: dict[str, dict[int, tuple[int, float]]] = {}
        for r in self.query(
            "SELECT g.checkpoint_id AS ckpt, g.task_id, count(*) AS n, sum(s.correct) AS ok, min(g.round_id) AS first "
            "FROM generations g JOIN scores s ON s.generation_id = g.id "
            "WHERE g.purpose = 'train' AND s.scorer LIKE 'verifier:%' AND s.correct IS NOT NULL "
            "GROUP BY g.checkpoint_id, g.task_id ORDER BY first, g.checkpoint_id"):
            out.setdefault(r["ckpt"], {})[r["task_id"]] = (int(r["n"]), float(r["ok"]))
        return out

    def delete_generations(self, round_id: int, purpose: str) -> int:
        """Drop a round's generations of one purpose (and their scores): a phase restarting from scratch."""
        with self.transaction():
            for table in ("scores", *LOGPROB_TABLES):
                self.db[table].delete_where(
                    "generation_id IN (SELECT id FROM generations WHERE round_id = ? AND purpose = ?)", [round_id, purpose])
            before = self.conn.total_changes
            self.db["generations"].delete_where("round_id = ? AND purpose = ?", [round_id, purpose])
            return self.conn.total_changes - before

    def add_scores(self, rows: list[dict[str, Any]]) -> None:
        """rows: generation_id, scorer, score (None = unparseable), correct, parsed, details."""
        now = _now()
        self._insert_all("scores", (
            {"generation_id": r["generation_id"], "scorer": r["scorer"], "score": r.get("score"),
             "correct": None if r.get("correct") is None else int(bool(r["correct"])), "parsed": int(r.get("parsed", True)),
             "details": _j(r.get("details", {})), "created_at": now} for r in rows), replace=True)

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
            np_ = self._insert_all("pairs", (
                {"round_id": round_id, "task_id": p.task_id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                 "chosen_gen_id": p.chosen_gen_id, "rejected_gen_id": p.rejected_gen_id, "margin": p.margin, "weight": p.weight,
                 "source": p.source, "created_at": now} for p in pairs), ignore=True)
            ns = self._insert_all("sft_examples", (
                {"round_id": round_id, "task_id": s.task_id, "prompt": s.prompt, "completion": s.completion,
                 "generation_id": s.generation_id, "weight": s.weight, "source": s.source, "created_at": now} for s in sft), ignore=True)
        return np_, ns

    def delete_training_data(self, round_id: int) -> None:
        with self.transaction():
            self.db["pairs"].delete_where("round_id = ?", [round_id])
            self.db["sft_examples"].delete_where("round_id = ?", [round_id])

    def training_data(self, round_id: int, scope: str = "all", replay_fraction: float = 0.0, seed: int = 0) -> TrainingData:
        """The SFT examples and pairs a training round may use, read in one snapshot.

        The held-out wall lives here: only rows whose task is in the 'train' split are returned,
        whatever the rows say about themselves.
        """
        import random

        from selfdistill.stats import draw_share

        with self.transaction():  # one consistent snapshot of both tables
            if scope == "all":
                cond, params = "x.round_id <= ?", [round_id]
            else:
                # the rows the round's incumbent was not trained on: those since the round that made it
                # (not since the last training: a rejected round's rows were never learned)
                last = self.execute(
                    "SELECT coalesce((SELECT c.round_id FROM rounds r JOIN checkpoints c ON c.id = r.incumbent_id "
                    "WHERE r.id = ?), 0)", (round_id,)).fetchone()[0]
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
                    rows.extend(draw_share(older, len(rows), replay_fraction, rng))
        return TrainingData(sft=[SftRecord(**r) for r in sft], pairs=[PairRecord(**r) for r in pairs])

    def mark_data_used(self, round_id: int, sft_ids: list[int], pair_ids: list[int]) -> None:
        with self.transaction():
            if sft_ids:
                self.execute(f"UPDATE sft_examples SET used_in_round = ? WHERE used_in_round IS NULL "
                             f"AND id IN ({','.join('?' * len(sft_ids))})", (round_id, *sft_ids))
            if pair_ids:
                self.execute(f"UPDATE pairs SET used_in_round = ? WHERE used_in_round IS NULL "
                             f"AND id IN ({','.join('?' * len(pair_ids))})", (round_id, *pair_ids))

    def count_new_training_data(self) -> int:
        """Pairs + examples not yet used by any training round."""
        a = self.execute("SELECT count(*) FROM pairs WHERE used_in_round IS NULL").fetchone()[0]
        b = self.execute("SELECT count(*) FROM sft_examples WHERE used_in_round IS NULL").fetchone()[0]
        return a + b

    # -- training runs ---------------------------------------------------------------------

    def start_training_run(self, round_id: int, attempt: int, spec: dict[str, Any]) -> int:
        return self._insert("training_runs", {"round_id": round_id, "attempt": attempt, "status": "running", "spec": _j(spec),
                                              "started_at": _now()})

    def finish_training_run(self, run_id: int, status: str, metrics: dict[str, Any], error: str | None, pid: int | None = None) -> None:
        with self.transaction():
            self.execute(
                "UPDATE training_runs SET status = ?, metrics = ?, error = ?, pid = coalesce(?, pid), finished_at = ? WHERE id = ?",
                (status, _j(metrics), error, pid, _now(), run_id),
            )

    def set_training_pid(self, run_id: int, pid: int) -> None:
        with self.transaction():
            self.db["training_runs"].update(run_id, {"pid": pid})

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
        self._insert("checkpoints", {"id": ckpt_id, "parent_id": parent_id, "round_id": round_id, "path": path,
                                     "status": "candidate", "training": _j(training), "created_at": _now()}, replace=True)

    def checkpoint(self, ckpt_id: str) -> Checkpoint | None:
        rows = self.query("SELECT * FROM checkpoints WHERE id = ?", (ckpt_id,))
        return Checkpoint(**_decode(rows[0])) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(**_decode(r)) for r in self.query("SELECT * FROM checkpoints ORDER BY created_at, id")]

    def current_checkpoint(self) -> Checkpoint:
        rows = self.query("SELECT * FROM checkpoints WHERE is_current = 1")
        if not rows:
            raise StoreError(f"{self.path}: no current checkpoint recorded; run `selfdistill init POLICY`")
        return Checkpoint(**_decode(rows[0]))

    def set_checkpoint_status(self, ckpt_id: str, status: str, reason: str | None = None) -> None:
        with self.transaction():
            self.execute("UPDATE checkpoints SET status = ?, reason = coalesce(?, reason) WHERE id = ?", (status, reason, ckpt_id))

    def commit_promotion(self, ckpt_id: str, reason: str, round_id: int | None = None, kind: str = "promote",
                         expected_current: str | None = None) -> str:
        """The one transaction of a promotion (or rollback): current moves to ckpt_id, the event is
        logged; returns the id that was current (checkpoints.PromotionStore).

        With `expected_current` it is a compare-and-set: when another checkpoint is current (a
        rollback or forced promotion happened meanwhile) it raises PromotionSuperseded and
        changes nothing."""
        with self.transaction():
            row = self.execute("SELECT status FROM checkpoints WHERE id = ?", (ckpt_id,)).fetchone()
            if row is None:
                raise StoreError(f"checkpoint {ckpt_id} does not exist (see `selfdistill status`)")
            prev = self.execute("SELECT id FROM checkpoints WHERE is_current = 1").fetchone()
            if expected_current is not None and (prev[0] if prev else "base") != expected_current:
                raise PromotionSuperseded(
                    f"{ckpt_id} was measured against {expected_current}, but {prev[0] if prev else 'base'} is current now "
                    "(a rollback or forced promotion happened meanwhile): not promoted")
            self.execute("UPDATE checkpoints SET is_current = 0 WHERE is_current = 1")
            new_status = "base" if ckpt_id == "base" else "promoted"
            self.execute(
                "UPDATE checkpoints SET is_current = 1, status = ?, promoted_at = coalesce(promoted_at, ?), reason = ? WHERE id = ?",
                (new_status, _now(), reason, ckpt_id),
            )
            self.event(kind, f"{kind}: {prev[0] if prev else None} -> {ckpt_id}: {reason}", round_id=round_id,
                       data={"from": prev[0] if prev else None, "to": ckpt_id})
            if kind == "rollback" and prev and prev[0] not in ("base", ckpt_id):
                self.execute("UPDATE checkpoints SET status = 'rejected', reason = ? WHERE id = ?", (f"rolled back: {reason}", prev[0]))
            return prev[0] if prev else "base"

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
            eid = self._insert("evaluations", {"round_id": round_id, "checkpoint_id": checkpoint_id, "suite": suite,
                                               "metrics": _j(metrics), "created_at": _now()})
            self._insert_all("eval_items", (
                {"evaluation_id": eid, "task_id": it["task_id"], "correct": None if it.get("correct") is None else int(bool(it["correct"])),
                 "score": it.get("score"), "text": it.get("text", ""), "tokens": it.get("tokens", 0)} for it in items))
            return eid

    def latest_evaluation(self, checkpoint_id: str, suite: str, task_ids: list[int] | None = None,
                          round_id: int | None = None) -> Evaluation | None:
        """The newest evaluation of a checkpoint on a suite (with its items), or None; with
        `task_ids`, only one made on exactly those items; with `round_id`, the newest made in that round."""
        by_round = " AND round_id = ?" if round_id is not None else ""
        rows = self.query(
            f"SELECT * FROM evaluations WHERE checkpoint_id = ? AND suite = ?{by_round} ORDER BY id DESC LIMIT 1",
            (checkpoint_id, suite, *(() if round_id is None else (round_id,))))
        if not rows:
            return None
        ev = Evaluation(**_decode(rows[0]))
        ev.items = self.query("SELECT task_id, correct, score, text, tokens FROM eval_items WHERE evaluation_id = ? ORDER BY task_id", (ev.id,))
        if task_ids is not None and sorted(task_ids) != [i["task_id"] for i in ev.items]:
            return None
        return ev

    def answers_of(self, checkpoint_id: str, suite: str, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """A checkpoint's stored answers to these items of a suite, from any of its evaluations: the
        first measured of each (a checkpoint answers an item once; later evaluations reuse it)."""
        ids = list(task_ids)
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.query(
                "SELECT i.task_id, i.correct, i.score, i.text, i.tokens FROM eval_items i JOIN evaluations e ON e.id = i.evaluation_id "
                f"WHERE e.checkpoint_id = ? AND e.suite = ? AND i.task_id IN ({','.join('?' * len(chunk))}) ORDER BY e.id DESC",
                (checkpoint_id, suite, *chunk))
            out.update({r["task_id"]: r for r in rows})  # the oldest last: it wins
        return out

    def evaluations(self, suite: str | None = None) -> list[Evaluation]:
        """Evaluations (without their items), oldest first."""
        if suite:
            return [Evaluation(**_decode(r)) for r in self.query("SELECT * FROM evaluations WHERE suite = ? ORDER BY id", (suite,))]
        return [Evaluation(**_decode(r)) for r in self.query("SELECT * FROM evaluations ORDER BY id")]

    # -- judge health ----------------------------------------------------------------------

    def add_judge_health(self, judge: str, healthy: bool, agreement: float | None, position_bias: float | None,
                         distinct_scores: int | None, details: dict[str, Any], round_id: int | None = None) -> None:
        self._insert("judge_health", {"round_id": round_id, "judge": judge, "agreement": agreement, "position_bias": position_bias,
                                      "distinct_scores": distinct_scores, "healthy": int(healthy), "details": _j(details),
                                      "created_at": _now()})

    def latest_judge_health(self, judge: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM judge_health WHERE judge = ? ORDER BY id DESC LIMIT 1", (judge,))
        return _decode(rows[0]) if rows else None

    def judge_checks(self) -> list[dict[str, Any]]:
        """Every judge_health row, oldest first, details decoded."""
        return [_decode(r) for r in self.query("SELECT * FROM judge_health ORDER BY id")]

    def add_teacher_anchors(self, rows: list[dict[str, Any]]) -> int:
        """Anchors the teacher labelled (kind, prompt, answer, good or answer_b, teacher, round_id,
        generation_ids, details); joins the score phase's transaction."""
        now = _now()
        return self._insert_all("teacher_anchors", [{**r, "generation_ids": _j(r["generation_ids"]), "details": _j(r.get("details")),
                                                     "created_at": now} for r in rows])

    def teacher_anchors(self) -> list[dict[str, Any]]:
        return [_decode(r) for r in self.query("SELECT * FROM teacher_anchors ORDER BY id")]


_JSON_COLS = {"reasons", "metrics", "counts", "params", "details", "training", "spec", "data", "metadata", "generation_ids"}


def pack_ints(values: list[int]) -> bytes:
    """Token ids as little-endian int32 (4 bytes each)."""
    return _packed("i", values)


def pack_floats(values: list[float]) -> bytes:
    """Log-probabilities as little-endian float32 (4 bytes each)."""
    return _packed("f", values)


def unpack_ints(blob: bytes) -> list[int]:
    return _unpacked("i", blob)


def unpack_floats(blob: bytes) -> list[float]:
    return _unpacked("f", blob)


def _packed(code: str, values) -> bytes:
    import array
    import sys

    a = array.array(code, values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _unpacked(code: str, blob: bytes) -> list:
    import array
    import sys

    a = array.array(code)
    a.frombytes(blob)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


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
