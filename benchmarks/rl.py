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
diversity (distinct answers per task among the 8 samples) and its wall time. Every candidate is measured, promoted or not: while an arm promotes nothing,
each round's candidates of all arms were trained from the same incumbent on the same samples.

Run (about 20 minutes on 2 CPU cores for 3 rounds of the four arms):

    .venv/bin/python benchmarks/rl.py --out bench-out/rl

It prints a JSON summary and a Markdown table (also written to OUT/rl.json and OUT/rl.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TASK_SIZE = 2400  # more than the learning test's 2,000: room for an audit split

ARMS = {
    "sft": 'algorithm = "sft"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n',
    "grpo": 'algorithm = "grpo"\nlearning_rate = 3e-3\n[training.rl]\nreward = "correct"\nlearning_rate = 1e-3\npasses = 4\nmin_groups = 8\n',
    "sft_then_grpo": ('algorithm = "sft_then_grpo"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n'
                      '[training.rl]\nreward = "correct"\nlearning_rate = 1e-3\npasses = 4\nmin_groups = 8\n'),
    "sft_then_dpo": 'algorithm = "sft_then_dpo"\nlearning_rate = 3e-3\nepochs = 8\ndata_scope = "all"\n',
}


TRAINING = "batch_size = 32\nmax_length = 128\nmin_sft_examples = 8\nmin_pairs = 8\nthreads = 1\ntime_limit_s = 600\n"


def policy_text(model_dir: Path, training: str, alpha: float, per_round: int = 500) -> str:
    from bootstrap import spell_policy

    return spell_policy(model_dir, TRAINING + training, name="rl-bench", alpha=alpha, task_size=TASK_SIZE, per_round=per_round,
                        audit_fraction=0.15)


def run_arm(name: str, model_dir: Path, out: Path, rounds: int, alpha: float, reuse: bool = False, per_round: int = 500) -> dict[str, Any]:
    from bootstrap import round_samples, rows

    d = out / name
    db = d / "state" / "selfdistill.db"
    seconds = None
    if not (reuse and db.exists()):
        d.mkdir(parents=True, exist_ok=True)
        (d / "policy.toml").write_text(policy_text(model_dir, ARMS[name], alpha, per_round))
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        t = time.time()
        with open(d / "daemon.log", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(d / "policy.toml"), "--burst", "--max-rounds", str(rounds)],
                                  cwd=d, env=env, stderr=log, stdout=subprocess.DEVNULL)
        seconds = round(time.time() - t, 1)
        if proc.returncode not in (0, 10):
            raise SystemExit(f"arm {name}: the daemon exited with {proc.returncode}; see {d / 'daemon.log'}")
    per_round = []
    for r in rows(db, "SELECT id, decision, metrics FROM rounds ORDER BY id"):
        m = json.loads(r["metrics"] or "{}")
        div, passed = round_samples(db, r["id"])
        phases = {p["phase"]: round(p["duration_s"] or 0, 1) for p in rows(db, "SELECT phase, duration_s FROM phases WHERE round_id = ?", (r["id"],))}
        cand = rows(db, "SELECT c.id, c.path FROM checkpoints c JOIN rounds r ON r.candidate_id = c.id WHERE r.id = ?", (r["id"],))
        per_round.append({"round": r["id"], "decision": r["decision"], "incumbent": m.get("incumbent_accuracy"),
                          "candidate_id": cand[0]["id"] if cand else None, "candidate_path": cand[0]["path"] if cand else None,
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
    ap.add_argument("--reuse", action="store_true", help="measure the arms already run under --out instead of running them")
    ap.add_argument("--k", type=int, default=8, help="samples per audit item for the pass rate at T = 1")
    ap.add_argument("--per-round", type=int, default=500, help="tasks.per_round")
    ap.add_argument("--boot-steps", type=int, default=250, help="bootstrap optimizer steps")
    ap.add_argument("--model", type=Path, default=None, help="a model already bootstrapped (copied under --out) instead of a new one")
    a = ap.parse_args()
    from bootstrap import (
        SPELL_BOOT_SEED,
        SPELL_BOOT_SIZE,
        SPELL_TASK_SEED,
        SPELL_WORDS,
        Evaluator,
        bootstrap,
        build_model,
        disjoint,
        rg_tasks,
        sft_rows,
        summary,
    )

    from selfdistill.stats import discordant, mcnemar_one_sided
    from selfdistill.store import Store

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = a.out / "model"
    if a.model is not None and not (model / "config.json").exists():
        import shutil

        shutil.copytree(a.model, model, ignore=shutil.ignore_patterns("cache"))
    if not (model / "config.json").exists():
        tasks = rg_tasks("spell_backward", SPELL_TASK_SEED, TASK_SIZE, SPELL_WORDS)
        boot = disjoint(rg_tasks("spell_backward", SPELL_BOOT_SEED, SPELL_BOOT_SIZE, SPELL_WORDS), tasks)
        build_model(model)
        bootstrap(model, sft_rows(boot), a.boot_steps, batch_size=32, lr=3e-3, threads=1)
    arms = {name: run_arm(name, model, a.out, a.rounds, a.alpha, a.reuse, a.per_round) for name in a.arms.split(",")}
    first = next(iter(arms.values()))
    assert all(x["audit_prompts"] == first["audit_prompts"] for x in arms.values()), "the arms' audit splits differ"
    store = Store.open(Path(first["db"]), readonly=True)
    try:
        audit = store.tasks(split="audit")[: a.audit]
    finally:
        store.close()
    ev = Evaluator(model, engine={"threads": 2}, lora_rank=32, max_tokens=8)
    try:
        base = ev.correct(audit)
        base_pass = ev.pass_rates(audit, k=a.k)
        # every candidate, promoted or not: while no arm promotes, each round's candidates of all
        # arms were trained from the same incumbent on the same round's samples, side by side
        measured: dict[str, dict[int, tuple[list[bool], list[float]]]] = {}
        for n, x in arms.items():
            measured[n] = {r["round"]: (ev.correct(audit, Path(r["candidate_path"])), ev.pass_rates(audit, Path(r["candidate_path"]), k=a.k))
                           for r in x["rounds"] if r["candidate_path"]}
    finally:
        ev.close()

    def mean(v):
        return round(sum(v) / len(v), 4)

    result: dict[str, Any] = {"audit_items": len(audit), "rounds": a.rounds, "k": a.k,
                              "base": {**summary(base), "pass_rate_T1": mean(base_pass)}, "arms": {}}
    for n, x in arms.items():
        cands = {}
        for rnd, (c, pr) in measured[n].items():
            wins = sum(1 for u, v in zip(pr, base_pass) if u > v)
            losses = sum(1 for u, v in zip(pr, base_pass) if u < v)
            cands[rnd] = {"audit": summary(c), "p_vs_base": mcnemar_one_sided(*discordant(c, base)), "pass_rate_T1": mean(pr),
                          "pass_rate_items_better_worse": [wins, losses], "pass_rate_p_vs_base": mcnemar_one_sided(wins, losses)}
            if "sft" in measured and n != "sft" and rnd in measured["sft"]:
                cands[rnd]["p_vs_sft"] = mcnemar_one_sided(*discordant(c, measured["sft"][rnd][0]))
        result["arms"][n] = {"final": x["final"], "seconds": x["seconds"], "rounds": x["rounds"], "candidates": cands}
    result["seconds"] = round(time.time() - t0, 1)
    (a.out / "rl.json").write_text(json.dumps(result, indent=2))
    b = result["base"]
    md = ["| arm | round | candidate | gate (incumbent -> candidate, p) | audit greedy [95% CI] | p vs base | p vs sft "
          "| audit pass@1 at T=1 | items better/worse | p | sample pass rate | distinct answers/task |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|",
          f"| bootstrap | - | base | - | {b['accuracy']:.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}] | - | - | {b['pass_rate_T1']:.3f} | - | - | - | - |"]
    for n, e in result["arms"].items():
        for r in e["rounds"]:
            c = e["candidates"].get(r["round"])
            if c is None:
                continue
            s_ = c["audit"]
            gate = f"{r['incumbent']:.3f} -> {r['candidate']:.3f}, {r['p']:.2g} ({r['decision']})" if r["candidate"] is not None else r["decision"]
            psft = f"{c['p_vs_sft']:.3g}" if "p_vs_sft" in c else "-"
            md.append(f"| {n} | {r['round']} | {r['candidate_id']} | {gate} | {s_['accuracy']:.3f} [{s_['ci'][0]:.3f}, {s_['ci'][1]:.3f}] | "
                      f"{c['p_vs_base']:.3g} | {psft} | {c['pass_rate_T1']:.3f} | "
                      f"{c['pass_rate_items_better_worse'][0]}/{c['pass_rate_items_better_worse'][1]} | "
                      f"{c['pass_rate_p_vs_base']:.3g} | {r['sample_pass_rate']:.3f} | {r['distinct_answers_per_task']:.2f} |")
    (a.out / "rl.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
