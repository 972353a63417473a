"""Judge health: may a judge's verdicts be used to build pairs this round?

A judge is checked on an anchor set whose right answers are known (from a verifier or the
teacher's labels). Three symptoms make it unhealthy, each compared with its `JudgeConfig`
threshold:

- agreement with the reference below `min_agreement` (an unparseable verdict counts as a
  disagreement: a judge that cannot answer in format is not agreeing);
- fewer than `min_distinct_scores` distinct pointwise scores (collapse: "8" for everything);
- a share of pairwise verdicts that flip with the order of the answers above `max_position_bias`.

Pure: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfdistill.config import JudgeConfig

# A pointwise score at or above this (of 1-10) counts as the judge calling an answer good.
GOOD_SCORE = 6


@dataclass
class AnchorVerdict:
    """A judge's verdict on one anchor item, next to the reference.

    Pointwise: `score` (1-10, None when unparseable) on an answer whose correctness is
    `reference_good`. Pairwise: `prefers_good` (did it pick the reference-correct one of a
    good/bad pair; None when unparseable or a tie) and `position_biased` (the verdict followed the
    position, not the answer, when the order was swapped).
    """

    reference_good: bool = True
    score: int | None = None
    prefers_good: bool | None = None
    position_biased: bool | None = None
    pairwise: bool = False


@dataclass
class JudgeHealth:
    healthy: bool
    agreement: float | None
    position_bias: float | None
    distinct_scores: int | None
    unparseable: float
    n: int
    reasons: list[str] = field(default_factory=list)
    anchors: dict = field(default_factory=dict)  # where the anchor items came from (feedback.anchor_check fills it)


def judge_health(verdicts: list[AnchorVerdict], cfg: JudgeConfig) -> JudgeHealth:
    """Health of a judge from its anchor verdicts (see the module docstring)."""
    if not verdicts:
        return JudgeHealth(False, None, None, None, 0.0, 0, ["no anchor verdicts: run the anchor check first"])
    agree = []
    unparseable = 0
    scores = []
    biased = []
    for v in verdicts:
        if v.pairwise:
            judged = v.prefers_good
            if v.position_biased is not None:
                biased.append(v.position_biased)
            if judged is None and not v.position_biased:
                unparseable += 1
        else:
            judged = None if v.score is None else (v.score >= GOOD_SCORE) == v.reference_good
            if v.score is None:
                unparseable += 1
            else:
                scores.append(v.score)
        agree.append(bool(judged))
    reasons = []
    agreement = sum(agree) / len(agree)
    if agreement < cfg.min_agreement:
        reasons.append(f"agreement {agreement:.2f} with the reference is below min_agreement {cfg.min_agreement}")
    pointwise = [v for v in verdicts if not v.pairwise]
    distinct = len(set(scores)) if pointwise else None
    if distinct is not None and distinct < cfg.min_distinct_scores:
        reasons.append(f"only {distinct} distinct score(s) over {len(pointwise)} answers (collapse); min_distinct_scores is {cfg.min_distinct_scores}")
    position_bias = sum(biased) / len(biased) if biased else None
    if position_bias is not None and position_bias > cfg.max_position_bias:
        reasons.append(f"position bias {position_bias:.2f} exceeds max_position_bias {cfg.max_position_bias}")
    return JudgeHealth(not reasons, agreement, position_bias, distinct, unparseable / len(verdicts), len(verdicts), reasons)
