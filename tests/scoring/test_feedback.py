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


def test_pairwise_scores_pair_only_the_two_answers_of_one_match():
    """Self-Rewarding's pitfall: win/loss scores from separate matches must not pair the winner of
    one match with the loser of another. Four answers of one task, a judge preferring the longer
    (both orders agree), and one position-following match that counts for nothing."""
    from selfdistill.config import PairsConfig
    from selfdistill.pairs import build_pairs, candidates_from_scores

    texts = ["a b c d", "a", "a b c", "a b"]  # quality by length: 0 > 2 > 3 > 1
    gens = [{"id": 10 + i, "task_id": 0, "text": t, "completion_tokens": len(t.split())} for i, t in enumerate(texts)]
    longer = Scripted(lambda ans: "Verdict: A" if len(ans[0]) > len(ans[1]) else "Verdict: B")

    def pairs_of(rows, strategy="best_vs_worst"):
        by_task = candidates_from_scores([dict(r, task_id=0, text=g["text"], completion_tokens=g["completion_tokens"])
                                          for r in rows for g in gens if g["id"] == r["generation_id"]])
        cfg = PairsConfig(strategy=strategy, min_margin=0.1, near_duplicate_threshold=1.0, max_pairs_per_task=10)
        return {(p.chosen_gen_id, p.rejected_gen_id) for p in build_pairs(by_task, {0: "q"}, cfg)}

    # neighbours: (10 vs 11), (12 vs 13); scores 1, 0, 1, 0 -- best vs worst would cross matches
    rows = judge_scores(longer, "teacher", JudgeConfig(enabled=True, mode="pairwise"), gens, {0: "q"}, None)
    assert [(r["generation_id"], r["score"], r["details"]["beat"]) for r in rows] == [(10, 1.0, [11]), (11, 0.0, []), (12, 1.0, [13]), (13, 0.0, [])]
    assert pairs_of(rows) == {(10, 11), (12, 13)}  # never (10, 13) or (12, 11)
    # every two meet: win shares 1, 0, 2/3, 1/3; best vs worst met, and every won match is a pair
    cfg_all = JudgeConfig(enabled=True, mode="pairwise", matches="all")
    rows = judge_scores(longer, "teacher", cfg_all, gens, {0: "q"}, None)
    assert {r["generation_id"]: round(r["score"], 3) for r in rows} == {10: 1.0, 11: 0.0, 12: 0.667, 13: 0.333}
    assert pairs_of(rows) == {(10, 11)}
    assert pairs_of(rows, "all_above_margin") == {(10, 11), (10, 12), (10, 13), (12, 11), (12, 13), (13, 11)}

    # a match whose two orders disagree is no evidence: 10 vs 11 always answered "A" (position)
    def biased_on_first(ans):
        return "Verdict: A" if {ans[0], ans[1]} == {"a b c d", "a"} else longer.rule(ans)

    rows = judge_scores(Scripted(biased_on_first), "teacher", cfg_all, gens, {0: "q"}, None)
    by_id = {r["generation_id"]: r for r in rows}
    assert by_id[10]["details"]["position_biased"] == 1 and by_id[10]["details"]["beat"] == [12, 13]
    assert (10, 11) not in pairs_of(rows, "all_above_margin") and (10, 13) in pairs_of(rows, "all_above_margin")


def test_a_judge_that_reasons_first_is_asked_to_and_its_last_line_is_the_verdict():
    import pytest

    from selfdistill.config import PolicyError, parse_policy

    seen = []

    class Reasoner(Scripted):
        def generate(self, prompts, params, adapter=None):
            seen.extend(p[-1]["content"] for p in prompts)
            return super().generate(prompts, params, adapter)

    judge = Reasoner(lambda ans: f"The answer {ans[0]!r} states a number.\nIt is complete.\nScore: {9 if ans[0] == '42' else 3}")
    cfg = JudgeConfig(enabled=True, reason_first=True, max_tokens=128)
    rows = judge_scores(judge, "teacher", cfg, GENS[:2], PROMPTS, None)
    assert [round(r["score"], 3) for r in rows] == [round(8 / 9, 3), round(2 / 9, 3)]
    assert all("First say in a few sentences what is right or wrong in the answer, judging content, not length" in p for p in seen)
    assert "Reply with one line and nothing else" not in seen[0]
    seen.clear()
    judge_scores(judge, "teacher", JudgeConfig(enabled=True, mode="pairwise", reason_first=True, max_tokens=128), GENS[:2], PROMPTS, None)
    assert seen and all("what is right or wrong in the answers" in p for p in seen)
    seen.clear()
    judge_scores(judge, "teacher", JudgeConfig(enabled=True), GENS[:2], PROMPTS, None)
    assert all("Reply with one line and nothing else" in p and "First say" not in p for p in seen)
    with pytest.raises(PolicyError, match="reason_first needs room for the reasons"):
        parse_policy({"name": "t", "state_dir": "s", "tasks": {"sources": [{"type": "jsonl", "path": "t.jsonl"}]},
                      "scoring": {"teacher_judge": {"enabled": False}, "self_judge": {"enabled": True, "reason_first": True}}}, "p.toml")


def test_the_teacher_labels_anchors_once_each_and_keeps_only_readable_verdicts():
    """scoring.self_judge.teacher_anchors, pointwise: the teacher's 1-10 verdicts on the round's
    answers (good at 6 or more), an unparseable reply is no anchor, an answer already labelled is
    never asked again, and no more than n are kept; each row names the teacher, round and answer."""
    from selfdistill.scoring.feedback import teacher_anchor_rows

    asked: list[str] = []

    def rule(ans):
        asked.append(ans[0])
        return "Score: 9" if ans[0] == "42" else ("Score: 3" if ans[0] == "junk" else "fine, I guess")

    gens = GENS[:8] + [{"id": 99, "task_id": 0, "text": "rambling"}]
    rows = teacher_anchor_rows(Scripted(rule), JudgeConfig(), "pointwise", gens, PROMPTS, 6, random.Random(0),
                               labelled={0, 1}, teacher="t", round_id=3)
    assert len(asked) == 7 and len(rows) == 6  # the 7 answers not labelled before; 6 readable verdicts, all kept
    assert all(r["generation_ids"][0] not in (0, 1, 99) for r in rows)  # labelled before, or unreadable
    assert {(r["answer"], r["good"]) for r in rows} == {("42", 1), ("junk", 0)}
    assert all((r["kind"], r["teacher"], r["round_id"]) == ("verdict", "t", 3) for r in rows)
    assert all(r["prompt"] == PROMPTS[GENS[r["generation_ids"][0]]["task_id"]] for r in rows)
    rows = teacher_anchor_rows(Scripted(rule), JudgeConfig(), "pointwise", gens, PROMPTS, 2, random.Random(0), set(), "t", 3)
    assert len(rows) == 2  # never more than asked for


def test_teacher_preferences_are_kept_only_where_both_orders_agree():
    from selfdistill.scoring.feedback import teacher_anchor_rows

    fair = Scripted(lambda ans: "Verdict: A" if ans[0] == "42" else "Verdict: B")
    rows = teacher_anchor_rows(fair, JudgeConfig(), "pairwise", GENS, PROMPTS, 3, random.Random(0), set(), "t", 1)
    assert len(rows) == 3 and all((r["kind"], r["answer"], r["answer_b"]) == ("preference", "42", "junk") for r in rows)
    first = Scripted(lambda ans: "Verdict: A")  # follows the position: no preference survives both orders
    assert teacher_anchor_rows(first, JudgeConfig(), "pairwise", GENS, PROMPTS, 3, random.Random(0), set(), "t", 1) == []


def test_a_self_judge_is_measured_on_the_teachers_stored_labels_first():
    from selfdistill.scoring.anchors import stored_anchors

    stored = [{"id": i, "kind": "verdict", "prompt": f"q{i}", "answer": a, "good": int(a == "42"), "answer_b": None}
              for i, a in enumerate(["42", "junk"] * 5)]
    unverified = [dict(g, correct=None) for g in GENS]  # no verifier verdict this round
    cfg = JudgeConfig(enabled=True, anchor_size=8)
    fair = Scripted(lambda ans: "Score: 9" if ans[0] == "42" else "Score: 2")
    h = anchor_check(fair, "self", cfg, unverified, PROMPTS, None, random.Random(0), taught=stored_anchors(stored))
    assert h.healthy and h.anchors == {"file_items": 0, "teacher_items": 8, "verifier_items": 0}, (h.anchors, h.reasons)
    wrong = Scripted(lambda ans: "Score: 2" if ans[0] == "42" else "Score: 9")
    h = anchor_check(wrong, "self", cfg, unverified, PROMPTS, None, random.Random(0), taught=stored_anchors(stored))
    assert not h.healthy and h.agreement == 0.0
    assert stored_anchors([]) is None
