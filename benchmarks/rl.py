"""Today's SFT loop against the policy gradient, on items no decision saw: the tiny model's comparison.

One run, one bootstrap, one set of tasks: the tiny char-level Llama bootstrapped on reasoning-gym
`spell_backward` (as in tests/learning), then the real daemon for the same number of rounds with
each `--arms` training algorithm, everything else equal:

- `sft`            rejection-sampling SFT on every verified answer so far (the learning test's loop);
- `grpo`           the group-relative policy gradient on the round's own 8 answers per task;
- `sft_then_grpo`  both stages in one round;
- `sft_then_dpo`   the default algorithm.

The store has an audit split (`tasks.audit_fraction`) that no gate and no training ever sees. After
the rounds, one engine (transformers, greedy) scores the bootstrap and each arm's final checkpoint
on the audit items (Wilson 95% intervals, paired exact McNemar p against the bootstrap and against
the sft arm), and the store gives each round's gate figures, its sampling pass rate, the answers'
diversity (distinct answers per task among the 8 samples) and its wall time.

Run (about 20 minutes on 2 CPU cores for 3 rounds of the four arms):

    .venv/bin/python benchmarks/rl.py --out bench-out/rl

It prints a JSON summary and a Markdown table (also written to OUT/rl.json and OUT/rl.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = {"min_word_len": 3, "max_word_len": 5}
TASK_SEED, TASK_SIZE = 1, 2400
BOOT_SEED, BOOT_SIZE, BOOT_STEPS = 100_000, 250, 250

ARMS = {
    "sft": 'algorithm = "sft"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n',
    "grpo": 'algorithm = "grpo"\nlearning_rate = 3e-3\n[training.rl]\nreward = "correct"\nlearning_rate = 1e-3\npasses = 4\nmin_groups = 8\n',
    "sft_then_grpo": ('algorithm = "sft_then_grpo"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n'
                      '[training.rl]\nreward = "correct"\nlearning_rate = 1e-3\npasses = 4\nmin_groups = 8\n'),
    "sft_then_dpo": 'algorithm = "sft_then_dpo"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n',
}


def policy_text(model_dir: Path, training: str, alpha: float) -> str:
    return f"""
name = "rl-bench"
state_dir = "state"
[student]
base_model = "{model_dir}"
lora = {{ r = 32, alpha = 64, dropout = 0.0, target_modules = "all-linear" }}
[engine]
kind = "transformers"
dtype = "float32"
max_model_len = 128
batch_size = 256
threads = 1
release_for_training = "keep"
[tasks]
heldout_fraction = 0.15
audit_fraction = 0.15
per_round = 500
[[tasks.sources]]
type = "reasoning_gym"
dataset = "spell_backward"
config = {{ min_word_len = {WORDS['min_word_len']}, max_word_len = {WORDS['max_word_len']} }}
seed = {TASK_SEED}
size = {TASK_SIZE}
[generation]
samples_per_task = 8
temperature = 1.0
max_tokens = 8
[pairs]
strategy = "verified_chosen"
sft_from = "verified"
max_sft_per_task = 2
[training]
batch_size = 32
max_length = 128
min_sft_examples = 8
min_pairs = 8
threads = 1
time_limit_s = 600
{training}
[evaluation]
heldout_items = 300
max_tokens = 8
anchor_prompts = ["abc", "hello"]
anchor_max_tokens = 8
[gates]
test = "mcnemar"
alpha = {alpha}
min_gain = 0.0
max_anchor_nll_increase = 1000.0
max_empty_fraction = 1.0
max_repetition = 1.0
max_length_ratio = 1000.0
max_category_regression = 1.0
[schedule]
idle_sleep_s = 0.1
[stopping]
stop_when_tasks_exhausted = true
[logging]
format = "json"
"""


def rows(db: Path, sql: str, params=()) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()


def run_arm(name: str, model_dir: Path, out: Path, rounds: int, alpha: float) -> dict[str, Any]:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "policy.toml").write_text(policy_text(model_dir, ARMS[name], alpha))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t = time.time()
    with open(d / "daemon.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(d / "policy.toml"), "--burst", "--max-rounds", str(rounds)],
                              cwd=d, env=env, stderr=log, stdout=subprocess.DEVNULL)
    seconds = round(time.time() - t, 1)
    if proc.returncode not in (0, 10):
        raise SystemExit(f"arm {name}: the daemon exited with {proc.returncode}; see {d / 'daemon.log'}")
    db = d / "state" / "selfdistill.db"
    per_round = []
    for r in rows(db, "SELECT id, decision, metrics FROM rounds ORDER BY id"):
        m = json.loads(r["metrics"] or "{}")
        div = rows(db, "SELECT avg(n) AS d FROM (SELECT count(DISTINCT text) AS n FROM generations WHERE round_id = ? AND purpose = 'train' "
                       "GROUP BY task_id)", (r["id"],))[0]["d"]
        passed = rows(db, "SELECT avg(s.correct) AS p FROM scores s JOIN generations g ON g.id = s.generation_id "
                          "WHERE g.round_id = ? AND g.purpose = 'train' AND s.scorer LIKE 'verifier:%'", (r["id"],))[0]["p"]
        phases = {p["phase"]: round(p["duration_s"] or 0, 1) for p in rows(db, "SELECT phase, duration_s FROM phases WHERE round_id = ?", (r["id"],))}
        per_round.append({"round": r["id"], "decision": r["decision"], "incumbent": m.get("incumbent_accuracy"),
                          "candidate": m.get("candidate_accuracy"), "p": m.get("p_value"), "sample_pass_rate": passed,
                          "distinct_answers_per_task": div, "rl": m.get("rl"), "seconds": phases})
    current = rows(db, "SELECT id, path FROM checkpoints WHERE is_current = 1")[0]
    audit = rows(db, "SELECT id, prompt FROM tasks WHERE split = 'audit' ORDER BY id")
    return {"rounds": per_round, "final": current["id"], "final_path": current["path"], "seconds": seconds,
            "audit_prompts": [a["prompt"] for a in audit], "db": str(db)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "rl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="sft,grpo,sft_then_grpo")
    ap.add_argument("--alpha", type=float, default=0.05, help="the gates' alpha")
    ap.add_argument("--audit", type=int, default=400, help="audit items scored (at most)")
    a = ap.parse_args()
    from bootstrap import Evaluator, bootstrap, build_model, disjoint, rg_tasks, sft_rows, summary

    from selfdistill.stats import discordant, mcnemar_one_sided
    from selfdistill.store import Store

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = a.out / "model"
    if not (model / "config.json").exists():
        tasks = rg_tasks("spell_backward", TASK_SEED, TASK_SIZE, WORDS)
        boot = disjoint(rg_tasks("spell_backward", BOOT_SEED, BOOT_SIZE, WORDS), tasks)
        build_model(model)
        bootstrap(model, sft_rows(boot), BOOT_STEPS, batch_size=32, lr=3e-3, threads=1)
    arms = {name: run_arm(name, model, a.out, a.rounds, a.alpha) for name in a.arms.split(",")}
    first = next(iter(arms.values()))
    assert all(x["audit_prompts"] == first["audit_prompts"] for x in arms.values()), "the arms' audit splits differ"
    store = Store.open(Path(first["db"]), readonly=True)
    try:
        audit = store.tasks(split="audit")[: a.audit]
    finally:
        store.close()
    ev = Evaluator(model, engine={"threads": 1}, lora_rank=32, max_tokens=8)
    try:
        base = ev.correct(audit)
        finals = {n: ev.correct(audit, Path(x["final_path"])) if x["final"] != "base" else base for n, x in arms.items()}
    finally:
        ev.close()
    result: dict[str, Any] = {"audit_items": len(audit), "rounds": a.rounds, "base": summary(base), "arms": {}}
    for n, x in arms.items():
        c = finals[n]
        entry = {"final": x["final"], "audit": summary(c), "p_vs_base": mcnemar_one_sided(*discordant(c, base)),
                 "seconds": x["seconds"], "rounds": x["rounds"]}
        if "sft" in finals and n != "sft":
            entry["p_vs_sft"] = mcnemar_one_sided(*discordant(c, finals["sft"]))
        result["arms"][n] = entry
    result["seconds"] = round(time.time() - t0, 1)
    (a.out / "rl.json").write_text(json.dumps(result, indent=2))
    md = ["| arm | final | audit accuracy [95% CI] | p vs base | p vs sft | promoted | sample pass rate by round | distinct answers/task by round | wall s |",
          "|---|---|---|---|---|---|---|---|---|",
          f"| bootstrap | base | {result['base']['accuracy']:.3f} [{result['base']['ci'][0]:.3f}, {result['base']['ci'][1]:.3f}] | - | - | - | - | - | - |"]
    for n, e in result["arms"].items():
        s = e["audit"]
        prom = sum(1 for r in e["rounds"] if r["decision"] == "promote")
        pr = ", ".join(f"{r['sample_pass_rate']:.3f}" for r in e["rounds"] if r["sample_pass_rate"] is not None)
        dv = ", ".join(f"{r['distinct_answers_per_task']:.2f}" for r in e["rounds"] if r["distinct_answers_per_task"] is not None)
        psft = f"{e['p_vs_sft']:.3g}" if "p_vs_sft" in e else "-"
        md.append(f"| {n} | {e['final']} | {s['accuracy']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {e['p_vs_base']:.3g} | {psft} | "
                  f"{prom}/{len(e['rounds'])} | {pr} | {dv} | {e['seconds']:.0f} |")
    (a.out / "rl.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
