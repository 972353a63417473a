"""Anchor files: what a judge is measured on where tasks have no verifier; read, checked and
refused line by line (pure: no model)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from selfdistill.config import JudgeConfig
from selfdistill.records import conversation_prompt
from selfdistill.scoring.anchors import AnchorFileError, load_anchors
from selfdistill.scoring.feedback import anchor_check


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CONVO = [{"role": "user", "content": "Hi, I need a refund."}, {"role": "assistant", "content": "What was the order?"},
         {"role": "user", "content": "Order 12."}]
GOOD_FILE = [
    {"prompt": "Legs of a cat?", "answer": "4", "verdict": True},
    {"prompt": "Legs of a cat?", "answer": "many", "verdict": False, "note": "vague"},
    {"prompt": "Legs of a bird?", "answer": "2 legs", "score": 0.9},
    {"prompt": "Legs of a bird?", "answer": "wings", "score": 0.1},
    {"messages": CONVO, "answer_a": "Refund 12 is on its way.", "answer_b": "Sorry, what?", "preference": "a"},
]


def test_a_good_file_reads_into_verdicts_and_preferences_with_its_provenance(tmp_path):
    a = load_anchors(_write(tmp_path / "a.jsonl", GOOD_FILE + [""]))
    assert [(p.answer, p.good) for p in a.points] == [("4", True), ("many", False), ("2 legs", True), ("wings", False)]
    (pair,) = a.pairs
    assert pair.prompt == conversation_prompt(CONVO) and pair.better == "Refund 12 is on its way." and pair.worse == "Sorry, what?"
    # a pairwise judge also meets every good-versus-bad pair of verdicts on one prompt
    assert {(p.better, p.worse) for p in a.pairwise_items()} == {("Refund 12 is on its way.", "Sorry, what?"), ("4", "many"), ("2 legs", "wings")}
    prov = a.provenance()
    assert prov["verdicts"] == 4 and prov["preferences"] == 1 and len(prov["sha256"]) == 64


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "answer": "x", "verdict": True, "label": 1}, "unknown field(s) label"),
    ({"prompt": "q", "answer": "x"}, "needs exactly one of `verdict`"),
    ({"prompt": "q", "answer": "x", "verdict": "yes"}, "`verdict` must be true or false"),
    ({"prompt": "q", "answer": "x", "score": 7}, "`score` must be a number from 0 to 1, got 7"),
    ({"prompt": "q", "answer_a": "x", "answer_b": "y"}, "missing preference"),
    ({"prompt": "q", "answer_a": "x", "answer_b": "y", "preference": "c"}, "`preference` must be \"a\" or \"b\""),
    ({"prompt": "q", "answer_a": "x", "answer_b": " x", "preference": "a"}, "are the same answer"),
    ({"prompt": "q", "answer": "x", "verdict": True, "preference": "a"}, "one kind a line"),
    ({"answer": "x", "verdict": True}, "missing or empty `prompt`"),
    ({"prompt": "q"}, "no label"),
    ({"messages": [{"role": "assistant", "content": "hi"}], "answer": "x", "verdict": True}, "messages[0]"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not JSON"),
])
def test_each_bad_line_is_named_with_its_line(tmp_path, row, problem):
    path = _write(tmp_path / "a.jsonl", [GOOD_FILE[0], row])
    with pytest.raises(AnchorFileError) as e:
        load_anchors(path)
    assert str(e.value).startswith(f"{path}: 1 problem(s) in the anchor file: line 2: ") and problem in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_duplicates_name_the_first_line_and_thousands_of_problems_are_summarised(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [GOOD_FILE[0], dict(GOOD_FILE[0], answer=" 4 "),
                                           dict(GOOD_FILE[4], answer_a=GOOD_FILE[4]["answer_b"], answer_b=GOOD_FILE[4]["answer_a"], preference="b"),
                                           GOOD_FILE[4]])
    with pytest.raises(AnchorFileError, match="line 2: the same item as line 1.*line 4: the same item as line 3"):
        load_anchors(path)
    many = _write(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "answer": "x"} for i in range(3000)])
    with pytest.raises(AnchorFileError) as e:
        load_anchors(many)
    msg = str(e.value)
    assert msg.startswith(f"{many}: 3000 problem(s)") and msg.endswith("(and 2995 more)") and msg.count("line ") == 5, msg
    assert len(e.value.problems) == 3000
    with pytest.raises(AnchorFileError, match="no anchors: the file has no items"):
        load_anchors(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(AnchorFileError, match="anchor file does not exist"):
        load_anchors(tmp_path / "absent.jsonl")


def _policy(tmp_path, judge: str) -> object:
    p = tmp_path / "p.toml"
    p.write_text(f'name = "t"\nstate_dir = "s"\n[tasks]\nsources = [{{ type = "jsonl", path = "t.jsonl" }}]\n'
                 f'[scoring]\nself_judge = {{ {judge} }}\n')
    return p


def test_check_refuses_a_bad_anchor_file_or_one_the_judges_mode_cannot_use(tmp_path):
    """`selfdistill check` (the daemon's start and a reload read the policy the same way): one
    line naming the key, the file and its problems; exit 2. A pointwise judge needs verdicts; a
    pairwise one needs preferences or a good and a bad verdict on one prompt."""
    _write(tmp_path / "bad.jsonl", [GOOD_FILE[0], {"prompt": "q", "answer": "x", "verdict": 1}])
    _write(tmp_path / "pairs.jsonl", [GOOD_FILE[4]])
    _write(tmp_path / "good.jsonl", GOOD_FILE)

    def check(judge):
        r = subprocess.run([sys.executable, "-m", "selfdistill", "check", str(_policy(tmp_path, judge))], capture_output=True, text=True)
        return r.returncode, r.stderr.strip()

    code, err = check('enabled = true, anchors = "bad.jsonl"')
    assert code == 2 and "scoring.self_judge.anchors:" in err and "bad.jsonl: 1 problem(s) in the anchor file: line 2: `verdict`" in err, err
    assert len(err.splitlines()) == 1
    code, err = check('enabled = true, anchors = "pairs.jsonl"')
    assert code == 2 and "has no verdict items, and a pointwise judge is measured on verdicts" in err, err
    assert check('enabled = true, mode = "pairwise", anchors = "pairs.jsonl"')[0] == 0
    assert check('enabled = true, anchors = "good.jsonl"')[0] == 0
    assert check('enabled = false, anchors = "bad.jsonl"')[0] == 0  # a judge that is off reads nothing


class Scripted:
    """An engine that answers judge prompts by rule (the faked part is the judge's wit, not the check)."""

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def generate(self, prompts, params, adapter=None):
        from selfdistill.engines.base import Completion

        self.asked += prompts
        return [[Completion(text=self.rule(p[-1]["content"]), prompt_tokens=1, completion_tokens=1, finish_reason="stop")] for p in prompts]


def test_the_anchor_check_uses_the_file_first_then_the_rounds_verified_answers(tmp_path):
    import re

    anchors = load_anchors(_write(tmp_path / "a.jsonl", GOOD_FILE))

    def digit_judge(text):  # a sane judge: an answer with a digit is good
        m = re.search(r"\[ANSWER \w+\]\n(.*?)\n\[END ANSWER", text, re.S)
        return "Score: 9" if m and re.search(r"[0-9]", m.group(1)) else "Score: 2"

    judge = Scripted(digit_judge)
    cfg = JudgeConfig(enabled=True, anchor_size=6)
    gens = [{"id": i, "task_id": 1, "text": t, "correct": c} for i, (t, c) in enumerate([("7", True), ("x", False), ("9", True)])]
    h = anchor_check(judge, "teacher", cfg, gens, {1: "q"}, None, random.Random(0), anchors)
    assert h.healthy and h.agreement == 1.0 and h.n == 6, h
    assert h.anchors == {"file_items": 4, "teacher_items": 0, "verifier_items": 2, "file": anchors.path, "sha256": anchors.sha256}
    # no file and no verified answer: nothing to measure on, said so with the fix
    h = anchor_check(judge, "teacher", cfg, [dict(g, correct=None) for g in gens], {1: "q"}, None, random.Random(0))
    assert not h.healthy and "set scoring.teacher_judge.anchors" in h.reasons[0]
    # a judge that calls everything good fails on the file's bad answers
    h = anchor_check(Scripted(lambda t: "Score: 9"), "self", cfg, [], {}, None, random.Random(0), anchors)
    assert not h.healthy and h.agreement == 0.5 and any("collapse" in r for r in h.reasons), h
