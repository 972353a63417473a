"""Judges are checked before they are trusted: anchor checks with scripted judges.

The engine is scripted here because the subject is the check, not generation (the judges
themselves run on the real tiny model in tests/scoring)."""

from __future__ import annotations

import random
import re

from selfdistill.config import JudgeConfig
from selfdistill.engines.base import Completion
from selfdistill.scoring.feedback import anchor_check, judge_scores


class Scripted:
    """Answers a judge prompt by a rule over the quoted answer text."""

    def __init__(self, rule):
        self.rule = rule

    def generate(self, prompts, params, adapter=None):
        out = []
        for p in prompts:
            text = p[-1]["content"]
            answers = re.findall(r"\[ANSWER(?: [AB])? [0-9a-f]+\]\n(.*?)\n\[END", text, re.S)
            out.append([Completion(self.rule(answers), 5, 3, "stop")])
        return out


GENS = [{"id": i, "task_id": i // 4, "text": ("42" if i % 2 == 0 else "junk"), "correct": i % 2 == 0} for i in range(32)]
PROMPTS = {t: f"question {t}" for t in range(8)}


def test_a_judge_that_agrees_with_the_verifier_is_healthy():
    good = Scripted(lambda ans: "Score: 9" if ans[0] == "42" else "Score: 2")
    h = anchor_check(good, "self", JudgeConfig(enabled=True, anchor_size=16), GENS, PROMPTS, None, random.Random(0))
    assert h.healthy and h.agreement == 1.0 and h.distinct_scores == 2


def test_a_collapsed_judge_is_stopped():
    always10 = Scripted(lambda ans: "Score: 10")
    h = anchor_check(always10, "self", JudgeConfig(enabled=True, anchor_size=16), GENS, PROMPTS, None, random.Random(0))
    assert not h.healthy
    assert any("collapse" in r for r in h.reasons)


def test_a_position_biased_pairwise_judge_is_stopped():
    always_a = Scripted(lambda ans: "Verdict: A")
    cfg = JudgeConfig(enabled=True, mode="pairwise", anchor_size=8)
    h = anchor_check(always_a, "teacher", cfg, GENS, PROMPTS, None, random.Random(0))
    assert not h.healthy and h.position_bias == 1.0
    fair = Scripted(lambda ans: "Verdict: A" if ans[0] == "42" else "Verdict: B")
    assert anchor_check(fair, "teacher", cfg, GENS, PROMPTS, None, random.Random(0)).healthy


def test_unparseable_verdicts_are_recorded_never_guessed():
    rambling = Scripted(lambda ans: "I think it is quite good, maybe 8")
    rows = judge_scores(rambling, "self", JudgeConfig(enabled=True), GENS[:4], PROMPTS, None)
    assert [r["score"] for r in rows] == [None] * 4 and not any(r["parsed"] for r in rows)
    rows = judge_scores(Scripted(lambda ans: "Verdict: A" if ans[0] == "42" else "Verdict: B"), "teacher",
                        JudgeConfig(enabled=True, mode="pairwise"), GENS[:4], PROMPTS, None)
    assert [(r["generation_id"], r["score"]) for r in rows] == [(0, 1.0), (1, 0.0), (2, 1.0), (3, 0.0)]


def test_no_anchor_means_not_healthy():
    h = anchor_check(Scripted(lambda a: "Score: 5"), "self", JudgeConfig(enabled=True), [dict(g, correct=None) for g in GENS],
                     PROMPTS, None, random.Random(0))
    assert not h.healthy and h.n == 0
