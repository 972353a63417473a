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
                 adapter: str | None, rng: random.Random, anchors: "Anchors | None" = None,
                 taught: "Anchors | None" = None) -> JudgeHealth:
    """Measure a judge on up to `cfg.anchor_size` labelled items: first the anchor file's (when
    given), then the teacher's stored labels (`taught`, scoring.self_judge.teacher_anchors), then
    this round's answers whose verifier verdict is known (`gen["correct"]` not None). The
    health's `anchors` says how many items came from each (and which file)."""
    known = [g for g in gens if g.get("correct") is not None]
    size = cfg.anchor_size
    if cfg.mode == "pointwise":
        pick: list[tuple[str, str, bool]] = []
        counts = []
        for items in ([(a.prompt, a.answer, a.good) for a in anchors.points] if anchors else [],
                      [(a.prompt, a.answer, a.good) for a in taught.points] if taught else [],
                      [(prompts[g["task_id"]], g["text"], bool(g["correct"])) for g in known]):
            took = _balanced(items, size - len(pick), rng)
            pick += took
            counts.append(len(took))
        verdicts = judge_pointwise(engine, [(q, a) for q, a, _ in pick], cfg, adapter=adapter) if pick else []
        h = judge_health(anchor_verdicts(verdicts, [good for _, _, good in pick]), cfg)
    else:
        by_task: dict[int, tuple[list[Gen], list[Gen]]] = {}
        for g in known:
            by_task.setdefault(g["task_id"], ([], []))[0 if g["correct"] else 1].append(g)
        ours = [(prompts[good[0]["task_id"]], rng.choice(good)["text"], rng.choice(bad)["text"]) for good, bad in by_task.values() if good and bad]
        pairs: list[tuple[str, str, str]] = []
        counts = []
        for items, draw in (([(a.prompt, a.better, a.worse) for a in anchors.pairwise_items()] if anchors else [], True),
                            ([(a.prompt, a.better, a.worse) for a in taught.pairwise_items()] if taught else [], True),
                            (ours, False)):
            room = max(0, size - len(pairs))
            took = rng.sample(items, min(room, len(items))) if draw else items[:room]
            pairs += took
            counts.append(len(took))
        # the better answer is passed as `a`; judge_pairwise asks both orders
        verdicts = judge_pairwise(engine, pairs, cfg, adapter=adapter) if pairs else []
        h = judge_health(anchor_verdicts(verdicts, [True] * len(pairs)), cfg)
    source = dict(zip(("file_items", "teacher_items", "verifier_items"), counts))
    h.anchors = {**source, **({"file": anchors.path, "sha256": anchors.sha256} if anchors else {})}
    if not any(counts):
        h.reasons = ["no anchor items: no answer this round has a verifier verdict and the judge has no anchor file "
                     f"(set scoring.{who}_judge.anchors, see README 'Anchor files')"]
    return h


def teacher_anchor_rows(engine: Engine, cfg: JudgeConfig, mode: str, gens: Sequence[Gen], prompts: dict[int, str], n: int,
                        rng: random.Random, labelled: set[int], teacher: str, round_id: int | None) -> list[dict[str, Any]]:
    """Up to `n` anchors the teacher labels from this round's answers (never one already
    `labelled`, by generation id), as rows for store.add_teacher_anchors. Pointwise: the
    teacher's 1-10 verdict on one answer (good at 6 or more; an unparseable reply is no anchor).
    Pairwise: two different answers of one task, asked in both orders; only a preference both
    orders agree on is kept (`answer` the better). `cfg` is the teacher's judge settings."""
    fresh = [g for g in gens if g["id"] not in labelled and (g["text"] or "").strip()]
    rng.shuffle(fresh)
    rows: list[dict[str, Any]] = []

    def row(kind: str, task_id: int, answer: Gen, good: int | None, worse: Gen | None, details: dict[str, Any]) -> dict[str, Any]:
        return {"kind": kind, "prompt": prompts[task_id], "answer": answer["text"], "good": good,
                "answer_b": worse["text"] if worse else None, "teacher": teacher, "round_id": round_id,
                "generation_ids": [answer["id"]] + ([worse["id"]] if worse else []), "details": details}

    if mode == "pointwise":
        pick = fresh[: 2 * n]  # some replies will not parse: ask for more, keep n
        verdicts = judge_pointwise(engine, [(prompts[g["task_id"]], g["text"]) for g in pick], cfg) if pick else []
        for g, v in zip(pick, verdicts):
            if v.score is not None and len(rows) < n:
                rows.append(row("verdict", g["task_id"], g, int(v.score >= 6), None, {"raw": v.raw[:500], "score_1_10": v.score}))
        return rows
    by_task: dict[int, list[Gen]] = {}
    for g in fresh:
        by_task.setdefault(g["task_id"], []).append(g)
    matches = []
    for gs in by_task.values():
        distinct = list({g["text"].strip(): g for g in gs}.values())
        if len(distinct) >= 2:
            matches.append((distinct[0], distinct[1]))
    matches = matches[: 2 * n]
    verdicts = judge_pairwise(engine, [(prompts[a["task_id"]], a["text"], b["text"]) for a, b in matches], cfg) if matches else []
    for (a, b), v in zip(matches, verdicts):
        if v.winner is not None and len(rows) < n:
            better, worse = (a, b) if v.winner == "a" else (b, a)
            rows.append(row("preference", a["task_id"], better, None, worse, {"raw": list(v.raw)}))
    return rows


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
