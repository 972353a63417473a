"""Can the student's own judgment stand in for a verifier? The judge-only loop, measured by the verifier it never sees.

One run, one task set, one split, the same clock per arm. The tasks are the demo's (reasoning-gym
chain_sum, as policies/cpu-demo.toml draws them), written to JSONL twice: with their answers (the
verifier arm) and without (the judge arms: no verifier exists for them, in scoring or in the gate).
Each arm is the real daemon (`selfdistill init`, `selfdistill run --burst`) on a copy of the policy:

- `verifier`  the loop as shipped: SFT on verified answers, DPO on verified pairs, the accuracy gate;
- `self`      Self-Rewarding style, judge only: the student compares its own answers pairwise
              (every two, both orders, counted when they agree), the matches won train DPO, and it
              compares candidate with incumbent for the gate (`evaluation.pairwise_judge = "self"`);
              the judge must first pass its anchor check;
- `forced`    the same with the anchor check's thresholds at zero: what the judge's pairs do when
              nothing refuses them.

The anchor file is labelled arithmetic: questions of the same kind that are in no split, each with
its right answer and a near miss (one off), as a user would label a few dozen items by hand.

Afterwards one engine scores, greedily and with the verifier, the base and each arm's final
checkpoint on the gate's held-out items and on an audit split (never trained on, never seen by a
gate), paired exact McNemar p against the base. Per arm also: rounds and decisions, and every judge
check the store recorded (agreement, position bias, distinct scores, healthy).

Run:

    .venv/bin/python benchmarks/self_judge.py --out bench-out/self-judge --minutes 6

It prints a JSON summary and a Markdown table (also OUT/self_judge.json and OUT/self_judge.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bootstrap import rg_tasks, rows, summary  # noqa: E402
from distill import arm_figures  # noqa: E402
from learning import add_arm_options, cell, chosen_arms, cli, dump_toml  # noqa: E402

ARMS = ("verifier", "self", "forced")
SELF_JUDGE = {"enabled": True, "mode": "pairwise", "matches": "all", "anchor_size": 16, "recheck_every_rounds": 2,
              "min_agreement": 0.7, "max_position_bias": 0.3, "max_tokens": 16}


def write_tasks(src: dict, out: Path, size: int | None) -> tuple[Path, Path, dict[str, str]]:
    """The policy's reasoning-gym tasks as two JSONL files (with and without answers), and prompt -> answer."""
    (rg,) = [s for s in src["tasks"]["sources"] if s["type"] == "reasoning_gym"]
    tasks = rg_tasks(rg["dataset"], rg.get("seed", 0), size or rg.get("size", 1000), rg.get("config"))
    answers = {t.prompt: t.answer for t in tasks}
    with_answers, without = out / "tasks-verified.jsonl", out / "tasks-open.jsonl"
    # each task keeps its group (the split stays the policy's, by group) and its entry's numbers (the
    # curriculum's levels, e.g. chain_sum's num_terms), neither of which tells the answer
    def line(t, **extra) -> str:
        return json.dumps({"prompt": t.prompt, **extra, "metadata": t.metadata.get("fields", {}), "group": t.group}) + "\n"

    with_answers.write_text("".join(line(t, answer=t.answer, verifier="numeric") for t in tasks))
    without.write_text("".join(line(t) for t in tasks))
    return with_answers, without, answers


def write_anchors(src: dict, out: Path, avoid: set[str], n: int = 24) -> Path:
    """Labelled anchors: chain_sum questions in no split, each with its answer (good) and one off (bad)."""
    (rg,) = [s for s in src["tasks"]["sources"] if s["type"] == "reasoning_gym"]
    suffix = src["tasks"].get("prompt_suffix", "")
    rng = random.Random(0)
    pool = [t for t in rg_tasks(rg["dataset"], 10_000 + rg.get("seed", 0), 4 * n, rg.get("config")) if t.prompt not in avoid][:n]
    lines = []
    for t in pool:
        right = int(t.answer)
        lines.append({"prompt": t.prompt + suffix, "answer": str(right), "verdict": True})
        lines.append({"prompt": t.prompt + suffix, "answer": str(right + rng.choice((-1, 1))), "verdict": False})
    path = out / "anchors.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def arm_policy(src: dict, src_path: Path, arm: str, out: Path, tasks: Path, anchors: Path, minutes: float, audit_fraction: float,
               rounds: int = 100, sizes: dict | None = None) -> Path:
    """One arm's policy: the source policy on the arm's task file, with its own state, clock, sizes and scoring."""
    sizes = sizes or {}
    data = json.loads(json.dumps(src))
    data["name"] = f"bench-self-judge-{arm}"
    data["state_dir"] = str((out / arm / "state").resolve())
    data["tasks"]["sources"] = [{"type": "jsonl", "path": str(tasks)}]
    data["tasks"]["audit_fraction"] = audit_fraction
    per_round = data["tasks"].get("per_round", 64)
    data["tasks"].update(sizes.get("tasks", {}))
    tr = data.setdefault("training", {})
    for key in ("min_sft_examples", "min_pairs"):  # a smaller round makes fewer rows: the minimums scale with it
        if key in tr:
            tr[key] = max(1, round(tr[key] * data["tasks"].get("per_round", per_round) / per_round))
    for table in ("generation", "evaluation"):
        data.setdefault(table, {}).update(sizes.get(table, {}))
    st = data.setdefault("stopping", {})
    st.update(max_wall_s=minutes * 60, max_rounds=rounds)
    st.pop("plateau_rounds", None)
    if arm != "verifier":
        data["tasks"]["default_verifier"] = "auto"  # no answer, no verifier: the judge is all there is
        judge = dict(SELF_JUDGE, anchors=str(anchors))
        if arm == "forced":
            judge.update(min_agreement=0.0, max_position_bias=1.0, min_distinct_scores=1)
        data["scoring"] = {"self_judge": judge}
        data["pairs"] = {**data.get("pairs", {}), "strategy": "best_vs_worst", "min_margin": 0.3, "sft_from": "none"}
        data["training"] = {**data.get("training", {}), "algorithm": "dpo"}
        data["training"].pop("min_sft_examples", None)
        data["evaluation"] = {**data.get("evaluation", {}), "pairwise_judge": "self",
                              "pairwise_items": min(60, data.get("evaluation", {}).get("heldout_items", 60))}
        data["gates"] = {k: v for k, v in data.get("gates", {}).items() if k not in ("test", "alpha", "min_gain")}
        data["gates"]["min_win_rate"] = 0.5
    data.setdefault("logging", {})["format"] = "json"
    (out / arm).mkdir(parents=True, exist_ok=True)
    p = out / arm / "policy.toml"
    p.write_text(f"# written by benchmarks/self_judge.py from {src_path}, arm {arm}\n" + dump_toml(data))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, default=ROOT / "policies" / "cpu-demo.toml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "self-judge")
    add_arm_options(ap, ARMS, minutes=6.0)
    ap.add_argument("--size", type=int, default=None, help="tasks drawn (default: the policy source's size)")
    ap.add_argument("--per-round", type=int, default=16, help="tasks.per_round of every arm (the demo's 64 x 8 answers take 12 min a round)")
    ap.add_argument("--samples", type=int, default=4, help="generation.samples_per_task of every arm (a pairwise judge meets k(k-1)/2 pairs)")
    ap.add_argument("--heldout-items", type=int, default=100, help="evaluation.heldout_items of every arm")
    ap.add_argument("--audit-fraction", type=float, default=0.2)
    a = ap.parse_args()
    arms = chosen_arms(a, ARMS)

    from selfdistill.config import load_policy
    from selfdistill.engines import make_engine
    from selfdistill.engines.base import AdapterRef
    from selfdistill.evaluation import evaluate_heldout
    from selfdistill.operations import base_model_dir
    from selfdistill.records import chat_messages
    from selfdistill.scoring.verifiers import get_verifier
    from selfdistill.stats import discordant, mcnemar_one_sided
    from selfdistill.store import DB_NAME

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = tomllib.loads(a.policy.read_text())
    if src["student"].get("base_model", "").startswith("."):
        src["student"]["base_model"] = str((a.policy.parent / src["student"]["base_model"]).resolve())
    verified, open_tasks, answers = write_tasks(src, out, a.size)
    anchors = write_anchors(src, out, set(answers))
    figures: dict[str, Any] = {}
    t0 = time.time()
    for arm in arms:
        path = arm_policy(src, a.policy, arm, out, verified if arm == "verifier" else open_tasks, anchors, a.minutes, a.audit_fraction,
                          a.rounds, {"tasks": {"per_round": a.per_round}, "generation": {"samples_per_task": a.samples},
                                     "evaluation": {"heldout_items": a.heldout_items}})
        log = out / arm / "daemon.log"
        t = time.time()
        assert cli("init", str(path), log=log, timeout=900) == 0, log.read_text()[-3000:]
        rc = cli("run", str(path), "--burst", log=log, timeout=a.minutes * 60 + 1800)
        assert rc in (0, 10), log.read_text()[-3000:]
        policy = load_policy(path)
        figures[arm] = {**arm_figures(policy, a.audit), "wall_s": round(time.time() - t, 1),
                        "judge_checks": rows(policy.state_dir / DB_NAME, "SELECT round_id, healthy, agreement, position_bias, "
                                             "distinct_scores, json_extract(details, '$.reasons') AS reasons FROM judge_health ORDER BY id"),
                        "pairs": rows(policy.state_dir / DB_NAME, "SELECT count(*) AS n FROM pairs")[0]["n"]}
        print(f"{arm}: {figures[arm]['rounds']} rounds {figures[arm]['decisions']} in {figures[arm]['wall_s']}s; "
              f"judge checks {[(c['round_id'], c['healthy'], c['agreement']) for c in figures[arm]['judge_checks']]}", flush=True)

    first = figures[arms[0]]
    for arm in arms[1:]:  # one split for all: the same prompts, so the same hash
        for split in ("gate", "audit"):
            if [t.prompt for t in figures[arm][split]] != [t.prompt for t in first[split]]:
                raise SystemExit(f"arm {arm}: its {split} items are not arm {arms[0]}'s; the arms must share one split")
    items = {"gate": first["gate"], "audit": first["audit"]}
    numeric = get_verifier("numeric")
    load = load_policy(out / arms[0] / "policy.toml")  # its engine, student and evaluation settings are every arm's
    suffix = load.tasks.prompt_suffix

    def verify(text, task):  # the verifier no judge arm saw: the reference answer of the same prompt
        r = numeric(text, dataclasses.replace(task, answer=answers[task.prompt]))
        return r.score, r.correct

    t = time.time()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(load.engine.cpu_kv_cache_gib)))
    engine = make_engine(load.engine, base_model_dir(load), lora_rank=load.student.lora.r, cache_dir=out / "cache")

    def score(tasks, name):
        res = evaluate_heldout(engine, name, tasks, verify, lambda tk: chat_messages(tk.prompt + suffix, load.student.system_prompt),
                               load.evaluation.max_tokens)
        return [bool(it.correct) for it in res.items]

    correct: dict[str, dict[str, list[bool]]] = {s: {"base": score(tasks, None)} for s, tasks in items.items()}
    for arm in arms:
        if figures[arm]["path"] is not None:  # never promoted: the arm's model is the base
            engine.load_adapter(AdapterRef(name=arm, path=figures[arm]["path"]))
        for split, tasks in items.items():
            correct[split][arm] = score(tasks, arm) if figures[arm]["path"] is not None else correct[split]["base"]
    engine.close()
    models = ["base", *arms]
    results = {split: {m: {**summary(c[m]), **({"p_vs_base": mcnemar_one_sided(*discordant(c[m], c["base"]))} if m != "base" else {})}
                       for m in models} for split, c in correct.items()}
    report = {"policy": str(a.policy), "minutes_per_arm": a.minutes,
              "arms": {k: {x: v for x, v in f.items() if x not in ("gate", "audit")} for k, f in figures.items()},
              "results": results, "eval_s": round(time.time() - t, 1), "total_s": round(time.time() - t0, 1)}
    (out / "self_judge.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["| model | audit acc [95% CI] | p vs base | gate items acc [95% CI] | rounds (promoted) | pairs "
             "| judge checks: agreement, position bias (healthy) |", "|---|---|---|---|---|---|---|"]
    for m in models:
        au, g = results["audit"][m], results["gate"][m]
        f = figures.get(m)
        checks = "; ".join(f"r{c['round_id']}: {c['agreement']:.2f}, {c['position_bias'] if c['position_bias'] is None else round(c['position_bias'], 2)}"
                           f" ({'yes' if c['healthy'] else 'no'})" for c in (f or {}).get("judge_checks", []) if c["agreement"] is not None) or "-"
        extra = f"{f['rounds']} ({f['decisions'].count('promote')}) | {f['pairs']} | {checks}" if f else "- | - | -"
        p = f"{au['p_vs_base']:.2g}" if "p_vs_base" in au else "-"
        lines.append(f"| {m} | {cell(au)} | {p} | {cell(g)} | {extra} |")
    (out / "self_judge.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
