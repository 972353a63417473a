"""The daemon's own cost, with generation and training taken out.

1. Per round: the real `Cycle` (sample, generate, score, pair phases, with their store writes) on
   10,000 generations, the engine replaced by one that answers instantly. What is left is the
   daemon's own time: curriculum, store writes, verifiers, pairing, phase bookkeeping.
2. The store at scale: insert 1,000,000 generations (with a score each) in phase-sized
   transactions, then time every canned monitoring query in store/queries/.

    .venv/bin/python benchmarks/overhead.py                     # both parts
    .venv/bin/python benchmarks/overhead.py --rows 200000       # a smaller store
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from selfdistill.config import parse_policy
from selfdistill.cycle import Cycle, RunState
from selfdistill.engines.base import Completion
from selfdistill.operations import ingest_tasks, open_state
from selfdistill.store import DB_NAME, Store, canned_queries


class InstantEngine:
    """Answers every prompt at once: half the samples right, half wrong (so pairs get built)."""

    def generate(self, prompts, params, adapter=None):
        out = []
        for i, p in enumerate(prompts):
            q = p[-1]["content"] if isinstance(p, list) else p
            a, b = (int(x) for x in q.split("What is ")[1].split("?")[0].split(" + "))
            out.append([Completion(f"The answer is {a + b if k % 2 == 0 else a + b + k}.", 20, 6, "stop") for k in range(params.n)])
        return out

    def load_adapter(self, ref):
        pass

    def drop_adapter(self, name):
        pass

    def close(self):
        pass


def round_overhead(tmp: Path, generations: int, k: int = 8) -> dict:
    tasks = tmp / "tasks.jsonl"
    n_tasks = generations // k
    rng = random.Random(0)
    with open(tasks, "w") as f:
        for i in range(n_tasks * 3):
            a, b = rng.randint(0, 10**6), rng.randint(0, 10**6)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    policy = parse_policy({
        "state_dir": str(tmp / "state"), "student": {"base_model": str(tmp)},
        "tasks": {"sources": [{"type": "jsonl", "path": str(tasks)}], "per_round": n_tasks, "heldout_fraction": 0.1,
                  "default_verifier": "numeric"},
        "generation": {"samples_per_task": k},
        "schedule": {"train_min_new_pairs": 10**9},  # collect-only rounds: no training
    })
    store = open_state(policy)
    t = time.perf_counter()
    ingest_tasks(policy, store)
    ingest_s = time.perf_counter() - t
    cyc = Cycle(policy, store, RunState())
    cyc.serving._engine = InstantEngine()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        rnd = cyc.run_round()
        times.append(time.perf_counter() - t)
        assert rnd["decision"] == "collect", rnd
    phases = {}
    for p in store.phases(rnd["id"]):
        phases[p["phase"]] = round(p["duration_s"], 3)
    n_gen = store.execute("SELECT count(*) FROM generations WHERE round_id = ?", (rnd["id"],)).fetchone()[0]
    n_pairs = store.execute("SELECT count(*) FROM pairs WHERE round_id = ?", (rnd["id"],)).fetchone()[0]
    store.close()
    return {"generations_per_round": n_gen, "pairs_per_round": n_pairs, "round_s": [round(x, 2) for x in times],
            "last_round_phases_s": phases, "ingest_s": round(ingest_s, 2), "tasks_ingested": n_tasks * 3}


def store_at_scale(tmp: Path, rows: int, batch: int = 10_000) -> dict:
    store = Store.create(tmp / DB_NAME)
    store.ensure_base_checkpoint()
    from selfdistill.records import TaskIn

    store.add_tasks([TaskIn("bench", f"task {i}", str(i)) for i in range(10_000)], 0.1)
    ids = [t.id for t in store.tasks()]
    rid = store.create_round("base")
    params = {"n": 8, "temperature": 1.0, "top_p": 1.0, "max_tokens": 128, "stop": [], "seed": 0}
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        n = min(batch, rows - done)
        rows_ = [{"round_id": rid, "task_id": ids[(done + i) % len(ids)], "checkpoint_id": "base", "purpose": "train",
                  "sample_index": i % 8, "prompt": "What is 2 + 2? Give only the final answer.",
                  "text": "The answer is 4, because two and two make four.", "params": params,
                  "prompt_tokens": 30, "completion_tokens": 12, "finish_reason": "stop"} for i in range(n)]
        with store.transaction():
            gids = store.add_generations(rows_)
            store.add_scores([{"generation_id": g, "scorer": "verifier:numeric", "score": 1.0, "correct": True} for g in gids])
            store.record_phase(rid, "generate", time.time(), {"generations": n, "tokens": 12 * n}, "generate")
        done += n
    insert_s = time.perf_counter() - t0
    lat = {}
    for name, sql in canned_queries().items():
        t = time.perf_counter()
        store.query(sql)
        lat[name] = round((time.perf_counter() - t) * 1000, 1)
    size_mb = (tmp / DB_NAME).stat().st_size / 2**20
    store.close()
    return {"rows": rows, "insert_s": round(insert_s, 1), "generations_per_s": round(rows / insert_s),
            "db_mb": round(size_mb), "query_ms": lat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=10_000, help="generations per round (part 1)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="generations in the store (part 2)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        r1 = round_overhead(Path(d1), args.generations)
        print(json.dumps({"round_overhead": r1}, indent=1), flush=True)
        r2 = store_at_scale(Path(d2), args.rows)
        print(json.dumps({"store_at_scale": r2}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
