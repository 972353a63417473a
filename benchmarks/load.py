"""Load: many readers against one writer on the same store, as when monitoring runs beside the daemon.

A writer process inserts generations and their scores through selfdistill.store.Store at full
speed, in phase-sized transactions (`--batch` generations + one score each, one transaction), while
`--readers` reader processes loop over `selfdistill status --json`, `selfdistill report` and
ad-hoc SQL (sqlite3 module, read-only URI). It measures the writer's throughput alone and with
readers (the ratio) and counts every "database is locked" error that reaches a reader or the
writer (it must be 0: WAL readers never block the writer, and the busy timeout absorbs the rest).

Run:  .venv/bin/python benchmarks/load.py --seconds 20 --readers 6
(prints one JSON summary; the CI version is tests/reliability/test_load.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup(work: Path) -> Path:
    """A policy and an initialised store with tasks and one round to write into."""
    from selfdistill.records import TaskIn
    from selfdistill.store import DB_NAME, Store

    work.mkdir(parents=True, exist_ok=True)
    policy = work / "p.toml"
    tasks = work / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(50)))
    policy.write_text(f'name = "load"\nstate_dir = "state"\n[student]\nbase_model = "{work}"\n'
                      f'[[tasks.sources]]\ntype = "jsonl"\npath = "{tasks}"\n')
    (work / "state").mkdir(mode=0o700, exist_ok=True)
    store = Store.create(work / "state" / DB_NAME)
    store.ensure_base_checkpoint()
    store.add_tasks([TaskIn(source="load", prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(50)], 0.3)
    store.create_round("base")
    store.close()
    return policy


def writer(db: str, seconds: float, batch: int, out: mp.Queue) -> None:
    from selfdistill.store import Store

    store = Store.open(db)
    tids = [r[0] for r in store.execute("SELECT id FROM tasks WHERE split = 'train'").fetchall()]
    rows = done = errors = 0
    lat = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        gens = [{"round_id": 1, "task_id": tids[i % len(tids)], "checkpoint_id": "base", "purpose": "eval", "sample_index": i,
                 "prompt": "What is 1 + 1?", "text": "2 " * 20, "params": {"n": 4}, "completion_tokens": 20} for i in range(batch)]
        t0 = time.time()
        try:
            with store.transaction():  # one phase's worth: generations and their scores together
                ids = store.add_generations(gens)
                store.add_scores([{"generation_id": g, "scorer": "verifier:load", "score": 1.0, "correct": True} for g in ids])
            rows += 2 * batch
            done += 1
        except Exception as e:  # counted, not hidden: every error here is a failure of the test
            errors += 1
            out.put(("writer_error", str(e)))
        lat.append(time.time() - t0)
    lat.sort()
    out.put(("writer", {"rows": rows, "transactions": done, "errors": errors, "seconds": seconds,
                        "p99_tx_s": lat[int(0.99 * (len(lat) - 1))] if lat else None}))
    store.close()


def reader(policy: str, db: str, seconds: float, kind: str, out: mp.Queue) -> None:
    n = locked = other = 0
    t_end = time.time() + seconds
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    while time.time() < t_end:
        if kind == "sql":
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
                con.execute("SELECT count(*), sum(completion_tokens) FROM generations").fetchone()
                con.execute("SELECT scorer, avg(score) FROM scores GROUP BY scorer").fetchall()
                con.close()
            except sqlite3.Error as e:
                locked += "locked" in str(e)
                other += "locked" not in str(e)
                out.put(("reader_error", f"sql: {e}"))
        else:
            args = ["status", policy, "--json"] if kind == "status" else ["report", policy]
            r = subprocess.run([sys.executable, "-m", "selfdistill", *args], capture_output=True, text=True, env=env)
            # only a failed call counts: status output may well contain the word "locked" as data
            if r.returncode != 0:
                locked += "locked" in r.stderr
                other += "locked" not in r.stderr
                out.put(("reader_error", r.stderr[-300:]))
        n += 1
    out.put(("reader", {"kind": kind, "calls": n, "locked": locked, "other_errors": other}))


def _drain(q: mp.Queue, procs: list) -> list:
    import queue

    items = []
    # read while they run (a child blocks on exit until its queued items are consumed), then
    # whatever is left; Queue.empty() is not reliable across processes
    while any(p.is_alive() for p in procs):
        try:
            items.append(q.get(timeout=0.5))
        except queue.Empty:
            pass
    while True:
        try:
            items.append(q.get(timeout=1.0))
        except queue.Empty:
            break
    for p in procs:
        p.join()
    return items


def load(work: Path, seconds: float = 15.0, readers: int = 6, batch: int = 96) -> dict:
    policy = setup(work)
    db = str(work / "state" / "selfdistill.db")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    w = ctx.Process(target=writer, args=(db, seconds, batch, q))
    w.start()
    alone = _drain(q, [w])
    q = ctx.Queue()
    kinds = ["status", "report", "sql"]
    procs = [ctx.Process(target=reader, args=(str(policy), db, seconds, kinds[i % 3], q)) for i in range(readers)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # readers running before the writer starts
    w = ctx.Process(target=writer, args=(db, seconds, batch, q))
    w.start()
    loaded = _drain(q, [w, *procs])
    wa = next(v for k, v in alone if k == "writer")
    wl = next(v for k, v in loaded if k == "writer")
    rs = [v for k, v in loaded if k == "reader"]
    errors = [v for k, v in alone + loaded if k.endswith("_error")]
    con = sqlite3.connect(db)
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    stored = con.execute("SELECT count(*) FROM generations").fetchone()[0] + con.execute("SELECT count(*) FROM scores").fetchone()[0]
    con.close()
    return {
        "writer_rows_per_s_alone": round(wa["rows"] / seconds, 1),
        "writer_rows_per_s_with_readers": round(wl["rows"] / seconds, 1),
        "ratio": round(wl["rows"] / max(wa["rows"], 1), 3),
        "writer_p99_tx_s": {"alone": wa["p99_tx_s"], "with_readers": wl["p99_tx_s"]},
        "writer_errors": wa["errors"] + wl["errors"],
        "reader_calls": {k: sum(r["calls"] for r in rs if r["kind"] == k) for k in kinds},
        "locked_errors_at_readers": sum(r["locked"] for r in rs),
        "other_reader_errors": sum(r["other_errors"] for r in rs),
        "errors": errors[:5],
        "rows_written": wa["rows"] + wl["rows"],
        "rows_stored": stored,
        "integrity": integrity,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--readers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=96, help="generations per transaction (each with one score)")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    res = load(a.work or Path(tempfile.mkdtemp(prefix="selfdistill-load-")), a.seconds, a.readers, a.batch)
    print(json.dumps(res, indent=2))
    ok = res["locked_errors_at_readers"] == 0 and res["writer_errors"] == 0 and res["rows_written"] == res["rows_stored"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
