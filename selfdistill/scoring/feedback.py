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
from typing import TYPE_CHECKING, Any, Callable, Sequence

from selfdistill.config import JudgeConfig
from selfdistill.engines.base import Engine
from selfdistill.records import Candidate, PairRecord, SftRecord, Task
from selfdistill.scoring.health import JudgeHealth, judge_health
from selfdistill.scoring.judges import anchor_verdicts, judge_pairwise, judge_pointwise

if TYPE_CHECKING:
    from selfdistill.scoring.anchors import Anchors

Gen = dict[str, Any]  # a generation row: id, task_id, text (+ correct when verified)


def anchor_check(engine: Engine, who: str, cfg: JudgeConfig, gens: Sequence[Gen], prompts: dict[int, str],
                 adapter: str | None, rng: random.Random, anchors: "Anchors | None" = None) -> JudgeHealth:
    """Measure a judge on up to `cfg.anchor_size` labelled items: first the anchor file's (when
    given), then this round's answers whose verifier verdict is known (`gen["correct"]` not
    None). The health's `anchors` says how many items came from each (and which file)."""
    known = [g for g in gens if g.get("correct") is not None]
    size = cfg.anchor_size
    if cfg.mode == "pointwise":
        filed = [(a.prompt, a.answer, a.good) for a in anchors.points] if anchors else []
        ours = [(prompts[g["task_id"]], g["text"], bool(g["correct"])) for g in known]
        from_file = _balanced(filed, size, rng)
        pick = from_file + _balanced(ours, size - len(from_file), rng)
        source = {"file_items": len(from_file), "verifier_items": len(pick) - len(from_file)}
        verdicts = judge_pointwise(engine, [(q, a) for q, a, _ in pick], cfg, adapter=adapter) if pick else []
        h = judge_health(anchor_verdicts(verdicts, [good for _, _, good in pick]), cfg)
    else:
        filed_pairs = [(a.prompt, a.better, a.worse) for a in anchors.pairwise_items()] if anchors else []
        by_task: dict[int, tuple[list[Gen], list[Gen]]] = {}
        for g in known:
            by_task.setdefault(g["task_id"], ([], []))[0 if g["correct"] else 1].append(g)
        ours = [(prompts[good[0]["task_id"]], rng.choice(good)["text"], rng.choice(bad)["text"]) for good, bad in by_task.values() if good and bad]
        pairs = rng.sample(filed_pairs, min(size, len(filed_pairs)))
        source = {"file_items": len(pairs), "verifier_items": min(len(ours), size - len(pairs))}
        pairs += ours[: size - len(pairs)]
        # the better answer is passed as `a`; judge_pairwise asks both orders
        verdicts = judge_pairwise(engine, pairs, cfg, adapter=adapter) if pairs else []
        h = judge_health(anchor_verdicts(verdicts, [True] * len(pairs)), cfg)
    h.anchors = {**source, **({"file": anchors.path, "sha256": anchors.sha256} if anchors else {})}
    if not source["file_items"] and not source["verifier_items"]:
        h.reasons = ["no anchor items: no answer this round has a verifier verdict and the judge has no anchor file "
                     f"(set scoring.{who}_judge.anchors, see README 'Anchor files')"]
    return h


def _balanced(items: list[tuple[str, str, bool]], n: int, rng: random.Random) -> list[tuple[str, str, bool]]:
    """Up to n items, half good and half bad where both are there (the rest from whichever has more)."""
    if n <= 0:
        return []
    good = [x for x in items if x[2]]
    bad = [x for x in items if not x[2]]
    take_good = min(len(good), max(n // 2, n - len(bad)))
    return rng.sample(good, take_good) + rng.sample(bad, min(n - take_good, len(bad)))


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
    # pairwise: answers of one task meet in matches (neighbours once each, or every two: cfg.matches),
    # each asked in both orders; a match counts only when the two orders agree. An answer's score is
    # its share of counted matches won, and `beat` lists whom it beat: its pairs are those matches.
    by_task: dict[int, list[Gen]] = {}
    for g in gens:
        by_task.setdefault(g["task_id"], []).append(g)
    if cfg.matches == "all":
        matches = [(grp[i], grp[j]) for grp in by_task.values() for i in range(len(grp)) for j in range(i + 1, len(grp))]
    else:
        matches = [(grp[i], grp[i + 1]) for grp in by_task.values() for i in range(0, len(grp) - 1, 2)]
    if not matches:
        return rows
    verdicts = judge_pairwise(engine, [(prompts[a["task_id"]], a["text"], b["text"]) for a, b in matches], cfg, adapter=adapter)
    tally: dict[int, dict[str, Any]] = {}
    for (a, b), v in zip(matches, verdicts):
        for g, me, other in ((a, "a", b), (b, "b", a)):
            t = tally.setdefault(g["id"], {"beat": [], "lost_to": [], "undecided": 0, "position_biased": 0, "unparseable": 0, "raw": []})
            if v.winner is None:
                t["undecided"] += 1
                t["position_biased"] += int(v.position_biased)
                t["unparseable"] += int(v.unparseable)
            else:
                t["beat" if v.winner == me else "lost_to"].append(other["id"])
            if len(t["raw"]) < 2:
                t["raw"].append([r[:200] for r in v.raw])
    for g in gens:
        t = tally.get(g["id"])
        if t is None:
            continue  # an odd answer out (neighbours): it met no one
        decided = len(t["beat"]) + len(t["lost_to"])
        rows.append({"generation_id": g["id"], "scorer": f"{who}:pairwise", "score": len(t["beat"]) / decided if decided else None,
                     "parsed": t["unparseable"] < decided + t["undecided"], "details": t})
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
