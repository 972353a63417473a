"""Crash torture: SIGKILL the real daemon at random moments, restart it, and prove nothing committed is lost.

Runs `selfdistill run` (tiny local model, transformers engine) as a real process and kills it with
SIGKILL again and again: at random delays after start, and inside chosen phases (the daemon's
SELFDISTILL_TEST_DELAY hook holds a phase open for a moment so the kill can land there; a second
random wait lets it land after the hook, in the phase's real work: the engine's generate, the
training child, the evaluation). After every kill it restarts the daemon, until `rounds` rounds
have reached a decision, then checks the end state.

What "no committed row lost" means here: every row the store had committed when the daemon was
killed is still there, with the same content, at every later snapshot and at the end; the only
rows a restarted daemon may legitimately delete are those of a phase that had not finished (the
generate phase deletes its round's 'train' generations and their scores, and the pair phase its
round's pairs and SFT examples, in the transaction that rewrites them). Because a phase commits
its rows in the same transaction that records it in `phases`, such rows never exist for an
unfinished phase, so in practice the allowance must never be used; it is counted and reported.

End checks: PRAGMA integrity_check = ok; no round left 'running'; every round decided; no phase
recorded twice for a round (a committed phase is never redone); each round's train generations
= its sampled tasks x samples; exactly one is_current checkpoint, equal to the `current` symlink; no
`.tmp` or hidden leftover in checkpoints/; no orphaned training child alive.

Run:  .venv/bin/python benchmarks/torture.py --kills 40 --rounds 3 [--work DIR] [--seed S]
(prints one JSON summary; the CI version is tests/reliability/test_torture.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "daemon"))

from daemon_helpers import DaemonProc, tiny_policy  # noqa: E402

# Columns that a later phase legitimately updates in place; everything else in a row is frozen
# once committed.
MUTABLE = {
    "tasks": {"uses", "attempts", "successes"},
    "rounds": {"phase", "status", "candidate_id", "incumbent_id", "decision", "reasons", "metrics", "attempts", "error", "finished_at"},
    "checkpoints": {"status", "is_current", "reason", "promoted_at", "path", "training", "created_at", "parent_id", "round_id"},
    "pairs": {"used_in_round"},
    "sft_examples": {"used_in_round"},
    "training_runs": {"status", "metrics", "error", "pid", "finished_at"},
    "meta": {"value"},
}
TABLES = ["tasks", "rounds", "phases", "round_tasks", "generations", "scores", "pairs", "sft_examples",
          "training_runs", "checkpoints", "evaluations", "eval_items", "events", "judge_health", "meta"]
PER_ROUND = 6  # tiny_policy's tasks.per_round
KILL_PHASES = ["generate", "score", "pair", "train", "evaluate", "decide", "promote"]


def ro_connect(db: Path) -> sqlite3.Connection:
    # Read-only, as a monitoring reader would: the torture must not change what it measures.
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    con.row_factory = sqlite3.Row
    return con


def snapshot(db: Path) -> dict[str, dict]:
    """{table: {row key: content hash of the frozen columns}} in one read transaction."""
    con = ro_connect(db)
    try:
        con.execute("BEGIN")
        snap: dict[str, dict] = {}
        for t in TABLES:
            try:
                rows = con.execute(f"SELECT * FROM {t}").fetchall()
            except sqlite3.OperationalError:
                continue  # not created yet (killed before the first migration committed)
            cur = {}
            for r in rows:
                d = dict(r)
                key = {"round_tasks": lambda: (d["round_id"], d["task_id"]), "eval_items": lambda: (d["evaluation_id"], d["task_id"]),
                       "meta": lambda: d["key"]}.get(t, lambda: d["id"])()
                frozen = {k: v for k, v in d.items() if k not in MUTABLE.get(t, set())}
                cur[key] = (hashlib.sha1(json.dumps(frozen, sort_keys=True, default=str).encode()).hexdigest(), d)
            snap[t] = cur
        # which phases had finished, per round, as of this snapshot
        snap["_done"] = {(r["round_id"], r["phase"]) for r in con.execute("SELECT round_id, phase FROM phases")} if "phases" in snap else set()
        snap["_round_phase"] = {r["id"]: (r["phase"], r["status"]) for r in con.execute("SELECT id, phase, status FROM rounds")} if "rounds" in snap else {}
        con.execute("COMMIT")
        return snap
    finally:
        con.close()


def _rewritable(table: str, row: dict, before: dict, gens: dict) -> bool:
    """Rows a phase that had not finished at `before` may delete when it runs again."""
    done = before["_done"]
    if table == "generations":
        return row["purpose"] == "train" and (row["round_id"], "generate") not in done
    if table == "scores":
        g = gens.get(row["generation_id"])
        return g is not None and g[1]["purpose"] == "train" and (g[1]["round_id"], "generate") not in done
    if table in ("pairs", "sft_examples"):
        return (row["round_id"], "pair") not in done
    if table == "round_tasks":
        return (row["round_id"], "sample") not in done
    return False


def compare(before: dict, after: dict) -> tuple[list[str], int]:
    """(lost or changed rows, described; rows legitimately rewritten) between two snapshots."""
    lost, rewritten = [], 0
    for t in TABLES:
        if t not in before:
            continue
        now = after.get(t, {})
        for key, (h, row) in before[t].items():
            if key in now and now[key][0] == h:
                continue
            if _rewritable(t, row, before, before.get("generations", {})):
                rewritten += 1
                continue
            lost.append(f"{t} {key}: {'changed' if key in now else 'gone'}")
    return lost, rewritten


def training_orphans(work: Path) -> list[int]:
    """Training children of a daemon under `work` that are still alive."""
    out = subprocess.run(["pgrep", "-f", "selfdistill.training"], capture_output=True, text=True).stdout.split()
    pids = []
    for p in out:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(work) in cmd:
            pids.append(int(p))
    return pids


def end_checks(work: Path, rounds: int, per_round_gens: int) -> dict:
    from selfdistill.checkpoints import read_current

    state = work / "state"
    con = ro_connect(state / "selfdistill.db")
    try:
        problems = []
        integ = con.execute("PRAGMA integrity_check").fetchone()[0]
        if integ != "ok":
            problems.append(f"integrity_check: {integ}")
        rs = [dict(r) for r in con.execute("SELECT id, phase, status, decision FROM rounds ORDER BY id")]
        if [r for r in rs if r["status"] == "running"]:
            problems.append(f"rounds left running: {[r['id'] for r in rs if r['status'] == 'running']}")
        if [r for r in rs if r["decision"] not in ("promote", "reject", "fail", "skip")]:
            problems.append(f"rounds without a decision: {rs}")
        if len(rs) < rounds:
            problems.append(f"only {len(rs)} rounds of {rounds}")
        twice = con.execute("SELECT round_id, phase, count(*) FROM phases GROUP BY round_id, phase HAVING count(*) > 1").fetchall()
        if twice:
            problems.append(f"phases recorded twice: {[tuple(r) for r in twice]}")
        samples = per_round_gens // PER_ROUND
        for r in rs:
            if r["decision"] in ("promote", "reject"):
                n = con.execute("SELECT count(*) FROM generations WHERE purpose = 'train' AND round_id = ?", (r["id"],)).fetchone()[0]
                # a round samples per_round tasks, fewer once the pool runs dry (tasks.curriculum.max_uses)
                t = con.execute("SELECT count(*) FROM round_tasks WHERE round_id = ?", (r["id"],)).fetchone()[0]
                if not 0 < t <= PER_ROUND or n != t * samples:
                    problems.append(f"round {r['id']}: {n} train generations for {t} tasks, expected {t} x {samples} (at most {per_round_gens})")
        cur = [r[0] for r in con.execute("SELECT id FROM checkpoints WHERE is_current = 1")]
    finally:
        con.close()
    if len(cur) != 1:
        problems.append(f"is_current checkpoints: {cur}")
    pointer = read_current(state)
    if cur and pointer != cur[0] and not (pointer is None and cur[0] == "base"):
        problems.append(f"current symlink -> {pointer}, store says {cur}")
    ck = state / "checkpoints"
    leftovers = [p.name for p in ck.iterdir() if p.name.endswith(".tmp")] if ck.is_dir() else []
    if leftovers:
        problems.append(f"leftovers in checkpoints/: {leftovers}")
    # a killed training child's hidden scratch directory: a known leak (test_faults has the xfail)
    hidden = [p.name for p in ck.iterdir() if p.name.startswith(".")] if ck.is_dir() else []
    orphans = training_orphans(work)
    if orphans:
        problems.append(f"orphaned training children alive: {orphans}")
    return {"problems": problems, "rounds": rs, "current": cur, "pointer": pointer, "hidden_leftovers": hidden}


def decided(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = ro_connect(db)
        try:
            return con.execute("SELECT count(*) FROM rounds WHERE status != 'running' AND decision IS NOT NULL").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _unwedge(work: Path, code: int, log: str) -> str:
    """A restart that fails instead of resuming: record it and, for the one known case, do what an
    operator would (remove a complete adapter directory the store never recorded) so the torture
    can go on. Anything else is fatal."""
    err = [ln for ln in log.splitlines() if ln.startswith("error:")]
    line = err[-1] if err else log[-500:]
    if "checkpoint already exists" in line:
        path = Path(line.split(": ")[1])
        con = ro_connect(work / "state" / "selfdistill.db")
        try:
            known = con.execute("SELECT count(*) FROM checkpoints WHERE id = ?", (path.name,)).fetchone()[0]
        finally:
            con.close()
        if not known and path.parent == work / "state" / "checkpoints":
            import shutil

            shutil.rmtree(path)
            return f"exit {code}: {line} (unrecorded adapter removed by hand to go on)"
    raise RuntimeError(f"daemon exited {code} and cannot be restarted:\n{log[-3000:]}")


def torture(work: Path, model_dir: Path, *, rounds: int = 3, kills: int = 40, seed: int = 0,
            max_wait_s: float = 45.0, reap_orphans: bool = True, say=print) -> dict:
    """Kill the daemon `kills` times (fewer if the rounds finish first), then let it finish.

    reap_orphans: after each kill, SIGKILL training children the dead daemon left behind (they
    are reported either way); without it they keep running and race the restarted daemon.
    """
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    policy = tiny_policy(work, model_dir, engine="transformers", stopping="")
    db = work / "state" / "selfdistill.db"
    per_round_gens = PER_ROUND * 4  # tiny_policy: per_round x samples_per_task
    history: list[dict] = []
    snaps: list[dict] = []
    lost_all: list[str] = []
    rewritten = 0
    orphans_seen = 0
    wedges: list[str] = []
    t_start = time.time()
    while len(history) < kills and decided(db) < rounds:
        left = rounds - decided(db)
        target = rng.choice(["random"] * 3 + KILL_PHASES)
        env = {}
        if target != "random":
            env["SELFDISTILL_TEST_DELAY"] = f"{target}:{rng.uniform(0.0, 2.0):.2f}"
        d = DaemonProc(policy, "--max-rounds", str(left), env=env)
        try:
            if target == "random":
                deadline = time.time() + rng.uniform(0.2, max_wait_s)
                while time.time() < deadline and d.proc.poll() is None:
                    time.sleep(0.05)
            else:
                try:
                    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == target, timeout=240)
                except AssertionError:
                    pass  # exited (rounds done) or the phase never came (a round without training)
                # land in the hook's delay or after it, inside the phase's real work
                extra = 25.0 if target == "train" else 3.0
                deadline = time.time() + rng.uniform(0.0, extra)
                while time.time() < deadline and d.proc.poll() is None:
                    time.sleep(0.05)
            if d.proc.poll() is not None:
                code = d.wait(5)
                history.append({"target": target, "killed": False, "exit": code})
                if code not in (0, 10):
                    wedges.append(_unwedge(work, code, d.stderr_path.read_text()))
                continue
            before = snapshot(db) if db.exists() else None
            where = None
            if before is not None:
                open_r = [(rid, ph) for rid, (ph, st) in before["_round_phase"].items() if st == "running"]
                where = open_r[-1][1] if open_r else "between rounds"
            d.kill()
        finally:
            if d.proc.poll() is None:
                d.kill()
        orphans = training_orphans(work)
        orphans_seen += len(orphans)
        if reap_orphans:
            for p in orphans:
                try:
                    os.killpg(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        after = snapshot(db) if db.exists() else None
        if before is not None:
            snaps.append(before)
            lost, rw = compare(before, after)
            lost_all += [f"kill {len(history) + 1}: {x}" for x in lost]
            rewritten += rw
        history.append({"target": target, "killed": True, "db_phase": where, "orphans": len(orphans),
                        "t": round(time.time() - t_start, 1)})
        say(f"kill {sum(h['killed'] for h in history)}: target={target} db_phase={where} orphans={len(orphans)} decided={decided(db)}")
    # let it finish undisturbed
    while decided(db) < rounds:
        d = DaemonProc(policy, "--max-rounds", str(rounds - decided(db)))
        code = d.wait(1200)
        if code not in (0, 10):
            wedges.append(_unwedge(work, code, d.stderr_path.read_text()))
    final = snapshot(db)
    # every committed row of every pre-kill snapshot must still be there at the end
    for i, s in enumerate(snaps):
        lost, rw = compare(s, final)
        lost_all += [f"end vs kill {i + 1}: {x}" for x in lost]
    checks = end_checks(work, rounds, per_round_gens)
    killed = [h for h in history if h["killed"]]
    where_counts: dict[str, int] = {}
    for h in killed:
        where_counts[h["db_phase"] or "before the store existed"] = where_counts.get(h["db_phase"] or "before the store existed", 0) + 1
    return {
        "kills": len(killed),
        "kills_by_db_phase": where_counts,
        "kills_by_target": {t: sum(1 for h in killed if h["target"] == t) for t in ["random", *KILL_PHASES]},
        "rounds": rounds,
        "decisions": [r["decision"] for r in checks["rounds"]],
        "rows_lost": len(lost_all),
        "lost": lost_all[:20],
        "rows_rewritten_by_unfinished_phases": rewritten,
        "orphaned_training_children": orphans_seen,
        "wedges": wedges,
        "hidden_scratch_leftovers": checks["hidden_leftovers"],
        "problems": checks["problems"],
        "current": checks["current"],
        "wall_s": round(time.time() - t_start, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    ap.add_argument("--model", type=Path, default=None, help="tiny model directory (default: built in the work directory)")
    ap.add_argument("--keep-orphans", action="store_true", help="do not reap training children a killed daemon left behind")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = a.work or Path(tempfile.mkdtemp(prefix="selfdistill-torture-"))
    model = a.model
    if model is None:
        from selfdistill.models import build_tiny_model

        model = work / "tiny-model"
        if not model.exists():
            build_tiny_model(model)
    res = torture(work / "run", model, rounds=a.rounds, kills=a.kills, seed=a.seed, reap_orphans=not a.keep_orphans,
                  say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=2))
    return 0 if not res["problems"] and res["rows_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
