"""Judge health from anchor verdicts: tables."""

import pytest

from selfdistill.config import JudgeConfig
from selfdistill.scoring.health import AnchorVerdict, judge_health

CFG = JudgeConfig(min_agreement=0.6, max_position_bias=0.3, min_distinct_scores=2)


def pw(score, good):
    return AnchorVerdict(reference_good=good, score=score)


def pair(prefers_good, biased=False):
    return AnchorVerdict(prefers_good=prefers_good, position_biased=biased, pairwise=True)


@pytest.mark.parametrize("verdicts,healthy,reason", [
    ([pw(9, True), pw(2, False), pw(8, True), pw(3, False)], True, None),
    ([pw(8, True), pw(8, False), pw(8, True), pw(8, False)], False, "distinct score"),     # collapse
    ([pw(2, True), pw(9, False), pw(3, True), pw(8, False)], False, "agreement 0.00"),     # inverted judge
    ([pw(9, True), pw(None, False), pw(None, True), pw(2, False)], False, "agreement 0.50"),  # unparseable = disagree
    ([pair(True), pair(True), pair(True), pair(False)], True, None),
    ([pair(True), pair(None, True), pair(None, True), pair(True)], False, "position bias 0.50"),
    ([], False, "no anchor verdicts"),
])
def test_health_table(verdicts, healthy, reason):
    h = judge_health(verdicts, CFG)
    assert h.healthy is healthy
    if reason:
        assert any(reason in r for r in h.reasons), h.reasons
    else:
        assert h.reasons == []


def test_figures():
    h = judge_health([pw(9, True), pw(None, False), pw(2, False), pw(7, True)], CFG)
    assert (h.agreement, h.distinct_scores, h.unparseable, h.n, h.position_bias) == (0.75, 3, 0.25, 4, None)
