"""chrF and ROUGE-L equal their reference implementations, and the verifiers built on them.

ORACLE was computed by sacrebleu 2.5.1 (`CHRF().sentence_score(h, [r]).score / 100`) and
rouge-score 0.1.2 (`RougeScorer(["rougeL"]).score(r, h)["rougeL"].fmeasure`) in a throwaway
virtualenv (`pip install sacrebleu==2.5.1 rouge-score`), on 2026-12-02; neither is a dependency.
"""

from __future__ import annotations

import pytest

from selfdistill.records import Task
from selfdistill.scoring.overlap import chrf, rouge_l
from selfdistill.scoring.verifiers import VerifierError, get_verifier, resolve_verifier

ORACLE = [  # hypothesis, reference, chrF, ROUGE-L F1
    ("The cat sat on the mat.", "A cat was sitting on the mat.", 0.3978485169, 0.6153846154),
    ("the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over the lazy dog", 1.0, 1.0),
    ("Revenue rose 12% in Q3, driven by cloud sales.", "Cloud sales drove a 12 percent rise in third-quarter revenue.", 0.2970655678, 0.2),
    ("completely unrelated words here", "The meeting was moved to Tuesday at noon.", 0.1175091795, 0.0),
    ("a", "ab", 0.5555555556, 0.0),
    ("", "something", 0.0, 0.0),
    ("Hello,   world!!", "hello world", 0.451118291, 1.0),
]


@pytest.mark.parametrize("hyp, ref, want_chrf, want_rouge", ORACLE)
def test_the_metrics_equal_the_reference_implementations(hyp, ref, want_chrf, want_rouge):
    assert chrf(hyp, ref) == pytest.approx(want_chrf, abs=1e-9)
    assert rouge_l(hyp, ref) == pytest.approx(want_rouge, abs=1e-9)


def _task(answer, verifier):
    return Task(source="jsonl:x", prompt="Summarise the memo.", answer=answer, verifier=verifier, metadata={}, id=3)


@pytest.mark.parametrize("name, threshold", [("chrf", 0.5), ("chrf:0.3", 0.3), ("rougeL", 0.5), ("rougeL:0.9", 0.9)])
def test_overlap_verifiers_give_partial_credit_and_pass_at_their_threshold(name, threshold):
    ref = "A cat was sitting on the mat."
    v = resolve_verifier(_task(ref, name))
    fn = chrf if name.startswith("chrf") else rouge_l
    r = v("Sure! The cat sat on the mat.", _task(ref, name))
    assert r.score == pytest.approx(fn("Sure! The cat sat on the mat.", ref)) and 0 < r.score < 1
    assert r.correct == (r.score >= threshold) and r.details["threshold"] == threshold
    tagged = v("Thinking... <answer>A cat was sitting on the mat.</answer>", _task(ref, name))
    assert tagged.score == 1.0 and tagged.correct and tagged.details["extracted"] == ref


@pytest.mark.parametrize("name, error", [
    ("chrf:high", "verifier 'chrf:high': threshold 'high' is not a number in (0, 1]; write e.g. chrf:0.5"),
    ("rougeL:0", "threshold '0' is not a number in (0, 1]"),
    ("rougeL:1.5", "threshold '1.5' is not a number in (0, 1]"),
])
def test_a_bad_threshold_is_one_line_naming_the_fix(name, error):
    with pytest.raises(VerifierError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        get_verifier(name)


def test_an_overlap_verifier_needs_a_reference():
    with pytest.raises(VerifierError, match="task 3: verifier 'rougeL' needs a reference answer"):
        resolve_verifier(_task(None, "rougeL"))("anything", _task(None, "rougeL"))
