"""Model feedback inside a round: judges (self and teacher) checked before they are trusted, and
teacher labels and revisions. The daemon's score and pair phases call these; they take engines and
plain rows and return plain rows, touching neither the store nor the files.

A judge is used only after an anchor check: it grades answers whose verifier verdict is known
(pointwise), or picks between a verified-correct and a wrong answer in both orders (pairwise);
`scoring.health.judge_health` turns that into healthy or not, against the policy's thresholds.
An unhealthy judge contributes no scores, and the check is stored and logged.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from selfdistill.config import JudgeConfig
from selfdistill.engines.base import Engine
from selfdistill.records import Candidate, PairRecord, SftRecord, Task
from selfdistill.scoring.health import JudgeHealth, judge_health
from selfdistill.scoring.judges import anchor_verdicts, judge_pairwise, judge_pointwise

Gen = dict[str, Any]  # a generation row: id, task_id, text (+ correct when verified)


def anchor_check(engine: Engine, who: str, cfg: JudgeConfig, gens: Sequence[Gen], prompts: dict[int, str],
                 adapter: str | None, rng: random.Random) -> JudgeHealth:
    """Measure a judge on answers whose verifier verdict is known (`gen["correct"]` not None)."""
    known = [g for g in gens if g.get("correct") is not None]
    if cfg.mode == "pointwise":
        good = [g for g in known if g["correct"]]
        bad = [g for g in known if not g["correct"]]
        half = cfg.anchor_size // 2
        pick = rng.sample(good, min(half, len(good))) + rng.sample(bad, min(cfg.anchor_size - min(half, len(good)), len(bad)))
        if not pick:
            return judge_health([], cfg)
        verdicts = judge_pointwise(engine, [(prompts[g["task_id"]], g["text"]) for g in pick], cfg, adapter=adapter)
        return judge_health(anchor_verdicts(verdicts, [bool(g["correct"]) for g in pick]), cfg)
    by_task: dict[int, tuple[list[Gen], list[Gen]]] = {}
    for g in known:
        by_task.setdefault(g["task_id"], ([], []))[0 if g["correct"] else 1].append(g)
    pairs = [(rng.choice(good), rng.choice(bad)) for good, bad in by_task.values() if good and bad]
    pairs = pairs[: cfg.anchor_size]
    if not pairs:
        return judge_health([], cfg)
    verdicts = judge_pairwise(engine, [(prompts[g["task_id"]], g["text"], b["text"]) for g, b in pairs], cfg, adapter=adapter)
    return judge_health(anchor_verdicts(verdicts, [True] * len(pairs)), cfg)


def judge_scores(engine: Engine, who: str, cfg: JudgeConfig, gens: Sequence[Gen], prompts: dict[int, str],
                 adapter: str | None) -> list[dict[str, Any]]:
    """Score rows (store.add_scores) from a judge; unparseable verdicts are recorded with score None."""
    rows: list[dict[str, Any]] = []
    if cfg.mode == "pointwise":
        verdicts = judge_pointwise(engine, [(prompts[g["task_id"]], g["text"]) for g in gens], cfg, adapter=adapter)
        for g, v in zip(gens, verdicts):
            rows.append({"generation_id": g["id"], "scorer": f"{who}:pointwise", "score": v.unit_score,
                         "parsed": v.score is not None, "details": {"raw": v.raw[:500], "score_1_10": v.score}})
        return rows
    # pairwise: neighbouring samples of a task meet once (in both orders); a win scores 1, a loss 0
    by_task: dict[int, list[Gen]] = {}
    for g in gens:
        by_task.setdefault(g["task_id"], []).append(g)
    matches = [(grp[i], grp[i + 1]) for grp in by_task.values() for i in range(0, len(grp) - 1, 2)]
    if not matches:
        return rows
    verdicts = judge_pairwise(engine, [(prompts[a["task_id"]], a["text"], b["text"]) for a, b in matches], cfg, adapter=adapter)
    for (a, b), v in zip(matches, verdicts):
        for g, me in ((a, "a"), (b, "b")):
            score = None if v.winner is None else (1.0 if v.winner == me else 0.0)
            rows.append({"generation_id": g["id"], "scorer": f"{who}:pairwise", "score": score,
                         "parsed": not v.unparseable,
                         "details": {"position_biased": v.position_biased, "raw": [r[:200] for r in v.raw]}})
    return rows


def teacher_feedback(teacher: Callable[[str], Engine], tasks: dict[int, Task], by_task: dict[int, list[Candidate]], *, label: bool,
                     revise: bool, params, prompt_suffix: str, system_prompt: str | None, default_verifier: str,
                     weight: float) -> tuple[list[SftRecord], list[PairRecord]]:
    """Teacher labels for tasks the student never solved, revisions of one wrong answer per task;
    `teacher(purpose)` is the teacher's engine for "label" or "revise" (each use counted apart)."""
    from selfdistill.scoring.judges import teacher_label, teacher_revise

    sft: list[SftRecord] = []
    pairs: list[PairRecord] = []
    if label:
        unsolved = [t for tid, t in tasks.items() if not any(c.correct for c in by_task.get(tid, []))]
        if unsolved:
            sft = teacher_label(teacher("label"), unsolved, params, prompt_suffix=prompt_suffix, system_prompt=system_prompt,
                                default_verifier=default_verifier, weight=weight)
    if revise:
        wrong = [(tasks[tid], next(c for c in cands if c.correct is False))
                 for tid, cands in by_task.items() if any(c.correct is False for c in cands)]
        if wrong:
            pairs = teacher_revise(teacher("revise"), wrong, params, prompt_suffix=prompt_suffix, system_prompt=system_prompt,
                                   default_verifier=default_verifier, weight=weight)
    return sft, pairs
