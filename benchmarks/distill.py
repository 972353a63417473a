"""What does a teacher buy the student, and by which route? One run, the same items, the same clock.

Arms, each the real daemon (`selfdistill init`, `selfdistill run --burst`) on a copy of a policy
(default policies/cpu-distill.toml) with its own state directory, the same task source and split
(so the same held-out and audit items: checked), and the same wall-clock budget
(`stopping.max_wall_s = --minutes`; the daemon does not start a round the last ones say cannot end
in time):

- `loop`            today's loop without a teacher: SFT on verified answers, then DPO on verified pairs;
- `labels`          SFT on the verified answers and the teacher's verified labels (scoring.teacher_label);
- `labels_loop`     the loop's SFT then DPO, with the teacher's verified labels among the SFT examples
                    (policies/cpu-distill.toml as shipped);
- `distill`         on-policy distillation alone (reverse KL on the student's own samples, training.distill);
- `labels_distill`  teacher labels, SFT, then on-policy distillation in the same round (cpu-distill's
                    policy until 2026-12-05, when this benchmark measured it against the others);
- `grpo`            no teacher: the group-relative policy gradient on the round's own samples, rewarded
                    1/0 by the verifier (training.rl);
- `sft_then_grpo`   no teacher: SFT on verified answers, then the policy gradient, in one round;
- `loop_anchored`   `loop` with anchored rejection (pairs.rejected_from = "base"): each pair's rejected
                    side is one of the base model's wrong answers to the task, not the round's own;
- `loop_replay`     `loop` training each round on the data its incumbent was not trained on plus a
                    replay share of the older (training.data_scope = "since_last", replay_fraction
                    REPLAY) instead of on everything so far;
- `loop_curriculum` `loop` with a difficulty curriculum (tasks.curriculum, LEVELS): training tasks drawn
                    from the lowest number of terms not yet passed, the next opening when the
                    student's pass rate there reaches advance_at (chain_sum: 2 terms, then 3);
                    policies/cpu-demo.toml ships with it since 2026-12-07, so there `loop` is this;
- `loop_flat`       `loop` without any difficulty levels (the policy's tasks.curriculum level keys
                    dropped): every training task open from round 1, the demo before 2026-12-07;
- `loop_rotate`     `loop` whose gate tests each round on the next evaluation.heldout_items of the
                    held-out pool (evaluation.gate_items = "rotate") instead of the same items every
                    round: the items that chose the incumbent are mostly not the ones it is re-tested on;
                    policies/cpu-demo.toml ships it since 2026-12-07, so there `loop` is this;
- `loop_fixed`      `loop` whose gate tests on the same first heldout_items every round (gate_items = "fixed").

The two RL arms are the reinforcement-learning issue's comparison on the demo's own task and
student (`--policy policies/cpu-demo.toml --arms loop,grpo,sft_then_grpo`: the loop is then the
demo's own); they use the policy's [training.rl] table, or where it has none RL below. When no
chosen arm uses the teacher and the policy has none, or its directory does not exist, the teacher's
ceiling is left out. Per arm also the answers' diversity (distinct answers per task among
a round's samples) and the samples' pass rate, averaged over the rounds: RL is known to trade
diversity for pass@1.

The distillation arms use the policy's [training.distill] table, or where it has none the settings
measured on 2026-12-05 (DISTILL: two samples a task scored by the teacher, at least 32, two passes).

Then one vLLM engine scores, greedily and with the project's verifiers, the base and each arm's
final checkpoint on the gate's held-out items and on the audit split (never trained on, never seen
by a gate), paired exact McNemar p against the base; and the teacher itself (its own engine) on
the same items: the ceiling. Per arm also: rounds, promotions, teacher tokens by use
(teacher_usage), seconds per phase (summed over rounds).

Run (the teacher first: benchmarks/teacher.py makes it once):

    .venv/bin/python benchmarks/distill.py --out bench-out/distill --minutes 8

It prints a JSON summary and a Markdown table (also OUT/distill.json and OUT/distill.md), and
each arm's rounds (OUT/distill-rounds.md): the candidate's gate accuracy with its interval against
the incumbent's, the gate's p-value and decision, the promoted checkpoints' audit accuracy as the
daemon measured it, the round's samples (pass rate, distinct answers per task) and, where a
policy-gradient stage ran, its clip fraction and KLs (from the sampling policy; to the reference,
where kl_beta penalises it). `--rounds-table` writes that table alone from
an earlier run's OUT (no arm is run again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bootstrap import round_samples, summary  # noqa: E402
from learning import add_arm_options, cell, chosen_arms, cli, dump_toml, greedy_scorer, student_engine  # noqa: E402

ARMS = ("loop", "labels", "labels_loop", "distill", "labels_distill", "grpo", "sft_then_grpo", "loop_anchored", "loop_replay",
        "loop_curriculum", "loop_flat", "loop_rotate", "loop_fixed")
RL_ARMS = ("grpo", "sft_then_grpo")
LOOPS = ("loop", "loop_anchored", "loop_replay", "loop_curriculum", "loop_flat", "loop_rotate", "loop_fixed")  # the teacher-free loop and its variants
TEACHER_FREE = (*LOOPS, *RL_ARMS)
OPT_IN = (*RL_ARMS, *LOOPS[1:])  # run only when asked for
REPLAY = 0.3  # loop_replay: the share of a round's rows drawn from older rounds' data
# loop_curriculum: levels by chain_sum's number of terms; a level is passed at a 0.4 pass rate over 32 attempted tasks
LEVELS = {"level_field": "num_terms", "advance_at": 0.4, "min_attempted": 32}
LEVEL_KEYS = ("level_field", "advance_at", "min_attempted", "review_weight")  # loop_flat drops them
DISTILL = {"samples_per_task": 2, "min_samples": 32, "passes": 2}
# the RL arms' stage where the policy has no [training.rl]: the gate counts full correctness, so the
# reward does too; the learning rate is the stage's default (training.learning_rate / 4)
RL = {"reward": "correct", "passes": 2, "min_groups": 8}


def arm_policy(src: Path, arm: str, out: Path, minutes: float, audit_fraction: float | None = None, rounds: int = 100) -> Path:
    """The policy of one arm: `src` with its own state, the wall budget, the audit share (the same in
    every arm, so the split is the same), and the arm's algorithm."""
    data = tomllib.loads(src.read_text())
    if audit_fraction is not None:
        data.setdefault("tasks", {})["audit_fraction"] = audit_fraction
    if "teacher" in data:
        teacher = dict(data["teacher"])
        if teacher.get("model", "").startswith("."):
            teacher["model"] = str((src.parent / teacher["model"]).resolve())
        data["teacher"] = teacher
    data["name"] = f"bench-distill-{arm}"
    data["state_dir"] = str((out / arm / "state").resolve())
    st = data.setdefault("stopping", {})
    st["max_wall_s"] = minutes * 60
    st["max_rounds"] = rounds
    st.pop("plateau_rounds", None)
    tr, sc, pairs = data.setdefault("training", {}), data.setdefault("scoring", {}), data.setdefault("pairs", {})
    if arm in TEACHER_FREE:
        data.pop("teacher", None)
        st.pop("max_teacher_tokens", None)
        sc["teacher_label"] = False
        sc.get("self_judge", {}).pop("teacher_anchors", None)
    if arm in RL_ARMS:
        tr.pop("distill", None)
        tr["algorithm"] = arm
        tr.setdefault("rl", dict(RL))
    elif arm in (*LOOPS, "labels_loop"):
        tr.pop("distill", None)
        tr["algorithm"] = "sft_then_dpo"
        sc["teacher_label"] = arm == "labels_loop"
        pairs.update(strategy="verified_chosen", max_pairs_per_task=1)  # policies/cpu-demo.toml's pairs
        pairs["rejected_from"] = "base" if arm == "loop_anchored" else "round"
        if arm == "loop_replay":
            tr.update(data_scope="since_last", replay_fraction=REPLAY)
        if arm == "loop_curriculum":
            data.setdefault("tasks", {}).setdefault("curriculum", {}).update(LEVELS)
        if arm in ("loop_rotate", "loop_fixed"):
            data.setdefault("evaluation", {})["gate_items"] = arm.removeprefix("loop_")
        if arm == "loop_flat":
            cur = data.get("tasks", {}).get("curriculum", {})
            for key in LEVEL_KEYS:
                cur.pop(key, None)
            tr.pop("review_fraction", None)  # it cuts the rows of passed levels: there are none
        tr.setdefault("min_pairs", 8)
    elif arm == "labels":
        tr.pop("distill", None)
        tr["algorithm"] = "sft"
        sc["teacher_label"] = True
    else:  # distill, labels_distill
        tr["algorithm"] = "distill" if arm == "distill" else "sft_then_distill"
        tr.setdefault("distill", dict(DISTILL))
        sc["teacher_label"] = arm == "labels_distill"
    data.setdefault("logging", {})["format"] = "json"
    (out / arm).mkdir(parents=True, exist_ok=True)
    p = out / arm / "policy.toml"
    p.write_text(f"# written by benchmarks/distill.py from {src}, arm {arm}\n" + dump_toml(data))
    return p


def arm_figures(policy, audit_n: int) -> dict[str, Any]:
    from selfdistill.store import DB_NAME, Store

    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        rounds = store.rounds()
        phases: dict[str, float] = {}
        for ph in store.phases():
            phases[ph["phase"]] = phases.get(ph["phase"], 0.0) + (ph["duration_s"] or 0.0)
        current = store.current_checkpoint()
        return {
            "rounds": len(rounds), "decisions": [r["decision"] for r in rounds],
            "final": current["id"], "path": current["path"] if current["id"] != "base" else None,
            "teacher": store.teacher_usage(), "teacher_tokens": store.total_teacher_tokens(),
            "phase_s": {k: round(v, 1) for k, v in sorted(phases.items())},
            **sample_figures(policy.state_dir / DB_NAME, [r["id"] for r in rounds]),
            "gate": store.tasks(split="heldout", limit=policy.evaluation.heldout_items),
            "audit": store.tasks(split="audit", limit=audit_n),
        }
    finally:
        store.close()


def sample_figures(db: Path, round_ids: list[int]) -> dict[str, Any]:
    """The rounds' samples: diversity (distinct answers per task) and verifier pass rate, each averaged over the rounds that have it."""
    per_round = [round_samples(db, rid) for rid in round_ids]

    def mean(i: int, digits: int) -> float | None:
        vals = [r[i] for r in per_round if r[i] is not None]
        return round(sum(vals) / len(vals), digits) if vals else None

    return {"distinct_answers_per_task": mean(0, 2), "sample_pass_rate": mean(1, 3)}


def round_rows(policy) -> list[dict[str, Any]]:
    """One arm's rounds, read from its store (see the module docstring)."""
    from selfdistill.store import DB_NAME, Store

    db = policy.state_dir / DB_NAME
    store = Store.open(db, readonly=True)
    try:
        out = []
        for r in store.rounds():
            def acc(ckpt: str | None, suite: str) -> dict[str, Any] | None:
                ev = store.latest_evaluation(ckpt, suite) if ckpt else None
                return {k: ev.metrics.get(k) for k in ("accuracy", "ci_low", "ci_high", "n")} if ev else None

            m = r.metrics or {}
            div, passed = round_samples(db, r.id)
            ci = m.get("candidate_ci") or [None, None]  # the round's own gate items (they move with evaluation.gate_items = "rotate")
            cand = {"accuracy": m["candidate_accuracy"], "ci_low": ci[0], "ci_high": ci[1]} if m.get("candidate_accuracy") is not None else None
            out.append({"round": r.id, "decision": r.decision, "candidate": cand,
                        "incumbent": m.get("accuracy_incumbent"), "p_value": m.get("p_value"),
                        "audit": acc(r.candidate_id, "audit") if r.decision == "promote" else None,
                        "sample_pass_rate": passed, "distinct_answers_per_task": div,
                        **{k: (m.get("rl") or {}).get(k) for k in ("clip_fraction", "policy_kl", "kl")}})
        return out
    finally:
        store.close()


def rounds_table(per_arm: dict[str, list[dict[str, Any]]]) -> str:
    """The arms' rounds as one Markdown table."""
    def ci(a: dict[str, Any] | None) -> str:
        if not a or a["accuracy"] is None:
            return "-"
        return f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"

    lines = ["| arm | round | gate: incumbent -> candidate [95% CI] | p | decision | audit (promoted) [95% CI] "
             "| samples' pass rate | distinct answers/task | clip fraction | KL from the sampler | KL to the reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rows in per_arm.items():
        for r in rows:
            lines.append(f"| {arm} | {r['round']} | {_f(r['incumbent'], 3)} -> {ci(r['candidate'])} | {_g(r['p_value'])} "
                         f"| {r['decision'] or '-'} | {ci(r['audit'])} | {_f(r['sample_pass_rate'], 3)} "
                         f"| {_f(r['distinct_answers_per_task'], 2)} | {_f(r['clip_fraction'], 3)} | {_g(r['policy_kl'])} | {_g(r['kl'])} |")
    return "\n".join(lines) + "\n"


def write_rounds_table(out: Path, arms: list[str]) -> str:
    from selfdistill.config import load_policy

    missing = [a for a in arms if not (out / a / "policy.toml").is_file()]
    if missing:
        raise SystemExit(f"{out}: no arm {', '.join(missing)} there (no {out / missing[0] / 'policy.toml'}); "
                         "give the --out and --arms of the run that made them")
    table = rounds_table({arm: round_rows(load_policy(out / arm / "policy.toml")) for arm in arms})
    (out / "distill-rounds.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, default=ROOT / "policies" / "cpu-distill.toml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "distill")
    add_arm_options(ap, ARMS, minutes=8.0, default=tuple(a for a in ARMS if a not in OPT_IN))
    ap.add_argument("--audit-fraction", type=float, default=0.2, help="tasks.audit_fraction of every arm (the policy's 0.1 holds ~100 items)")
    ap.add_argument("--rounds-table", action="store_true", help="only write OUT/distill-rounds.md from an earlier run's arms")
    a = ap.parse_args()
    arms = chosen_arms(a, ARMS)
    if a.rounds_table:
        print(write_rounds_table(a.out.resolve(), arms), end="")
        return

    from selfdistill.config import load_policy
    from selfdistill.stats import discordant, mcnemar_one_sided

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = load_policy(a.policy)
    ceiling = src.teacher is not None and Path(src.teacher.model or "").is_dir()
    if not ceiling and not set(arms) <= set(TEACHER_FREE):
        raise SystemExit(f"{a.policy}: its teacher {src.teacher.model if src.teacher else None} is not a model directory; "
                         "make it first: .venv/bin/python benchmarks/teacher.py --out state/teacher")
    figures: dict[str, Any] = {}
    t0 = time.time()
    for arm in arms:
        path = arm_policy(a.policy, arm, out, a.minutes, a.audit_fraction, a.rounds)
        log = out / arm / "daemon.log"
        t = time.time()
        assert cli("init", str(path), log=log, timeout=900) == 0, log.read_text()[-3000:]
        rc = cli("run", str(path), "--burst", log=log, timeout=a.minutes * 60 + 1800)
        assert rc in (0, 10), log.read_text()[-3000:]
        figures[arm] = {**arm_figures(load_policy(path), a.audit), "wall_s": round(time.time() - t, 1)}
        print(f"{arm}: {figures[arm]['rounds']} rounds {figures[arm]['decisions']} in {figures[arm]['wall_s']}s", flush=True)

    first = figures[arms[0]]
    for arm in arms[1:]:  # one split for all: the same source, seed and hash
        for split in ("gate", "audit"):
            if [t.prompt for t in figures[arm][split]] != [t.prompt for t in first[split]]:
                raise SystemExit(f"arm {arm}: its {split} items are not arm {arms[0]}'s; the arms must share one split")
    items = {"gate": first["gate"], "audit": first["audit"]}

    from selfdistill.engines import make_engine
    from selfdistill.engines.base import AdapterRef

    t = time.time()
    correct: dict[str, dict[str, list[bool]]] = {s: {} for s in items}
    engine = student_engine(src, out / "cache")
    score = greedy_scorer(src, engine)
    for split, tasks in items.items():
        correct[split]["base"] = score(tasks, None)
    for arm in arms:
        if figures[arm]["path"] is None:
            for split in items:
                correct[split][arm] = correct[split]["base"]
            continue
        engine.load_adapter(AdapterRef(name=arm, path=figures[arm]["path"]))
        for split, tasks in items.items():
            correct[split][arm] = score(tasks, arm)
    engine.close()
    if ceiling:
        teacher = make_engine(src.engine, Path(src.teacher.model), lora_rank=None, cache_dir=out / "cache-teacher")
        score = greedy_scorer(src, teacher)
        for split, tasks in items.items():
            correct[split]["teacher"] = score(tasks, None)
        teacher.close()
    eval_s = time.time() - t

    models = ["base", *arms, *(["teacher"] if ceiling else [])]
    results = {split: {m: {**summary(c[m]), **({"p_vs_base": mcnemar_one_sided(*discordant(c[m], c["base"]))} if m != "base" else {})}
                       for m in models} for split, c in correct.items()}
    report = {"policy": str(a.policy), "minutes_per_arm": a.minutes, "arms": {k: {x: v for x, v in f.items() if x not in ("gate", "audit")}
                                                                              for k, f in figures.items()},
              "results": results, "eval_s": round(eval_s, 1), "total_s": round(time.time() - t0, 1)}
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | audit acc [95% CI] | p vs base | gate items acc [95% CI] | rounds (promoted) | teacher tokens "
             "| samples' pass rate | distinct answers/task | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        au, g = results["audit"][m], results["gate"][m]
        f = figures.get(m)
        extra = (f"{f['rounds']} ({f['decisions'].count('promote')}) | {f['teacher_tokens']:,} | {_f(f['sample_pass_rate'], 3)} | "
                 f"{_f(f['distinct_answers_per_task'], 2)} | {f['wall_s']:.0f}" if f else "- | - | - | - | -")
        p = f"{au['p_vs_base']:.2g}" if "p_vs_base" in au else "-"
        lines.append(f"| {m} | {cell(au)} | {p} | {cell(g)} | {extra} |")
    (out / "distill.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2))
    print("\n".join(lines))
    print(write_rounds_table(out, arms), end="")


def _f(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.2g}"


if __name__ == "__main__":
    main()
