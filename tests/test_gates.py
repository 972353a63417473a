"""Table tests of the promotion gate (pure: no model, no store)."""

import pytest

from selfdistill.config import EvaluationConfig, GateConfig, JsonlSource, Policy, TasksConfig
from selfdistill.gates import EvalMetrics, SanityStats, decide, gate_can_pass

SANE = SanityStats(empty_fraction=0.0, repetition=0.05, mean_length=40.0)


def metrics(correct, cats=None, sanity=SANE, anchor=1.0, win=None):
    return EvalMetrics(
        correct=dict(enumerate(correct)),
        categories=dict(enumerate(cats)) if cats else {},
        sanity=sanity,
        anchor_nll=anchor,
        win_rate=win,
    )


def pair(n, both, wins, losses):
    """Incumbent and candidate correctness on n items: `both` right for both, then `wins` items
    only the candidate gets, then `losses` items only the incumbent gets, the rest wrong for both."""
    rest = n - both - wins - losses
    cand = [True] * both + [True] * wins + [False] * losses + [False] * rest
    inc = [True] * both + [False] * wins + [True] * losses + [False] * rest
    return cand, inc


def failed_text(d):
    assert not d.promote, d.reasons
    return " | ".join(d.reasons)


def test_clear_win_promotes_with_numbers():
    cand, inc = pair(100, 50, 20, 0)
    d = decide(metrics(cand), metrics(inc), GateConfig())
    assert d.promote, d.reasons
    assert d.numbers["gain"] == pytest.approx(0.2)
    assert (d.numbers["wins"], d.numbers["losses"]) == (20, 0)
    assert d.numbers["p_value"] == pytest.approx(0.5**20)
    lo, hi = d.numbers["gain_ci"]
    assert 0.1 < lo < 0.2 < hi < 0.3
    assert any("mcnemar p = " in r and "20 wins, 0 losses" in r for r in d.reasons)
    assert any("accuracy gain +0.2000" in r for r in d.reasons)


def test_clear_loss_rejects_on_gain_and_test():
    cand, inc = pair(100, 40, 0, 25)
    text = failed_text(decide(metrics(cand), metrics(inc), GateConfig()))
    assert "accuracy gain -0.2500" in text and "< min_gain" in text
    assert "0 wins, 25 losses" in text and "> alpha 0.05" in text


@pytest.mark.parametrize(
    "wins,losses,test,promote",
    [
        (3, 1, "mcnemar", False),  # p = P(X >= 3 | 4) = 5/16
        (4, 0, "mcnemar", False),  # p = 1/16 > 0.05: four wins out of four is not yet evidence
        (5, 0, "mcnemar", True),  # p = 1/32
        (9, 3, "mcnemar", False),  # p = P(X >= 9 | 12) = 299/4096 = 0.073
        (10, 2, "mcnemar", True),  # p = 79/4096 = 0.019
        (3, 1, "bootstrap", False),
        (20, 2, "bootstrap", True),
        (3, 1, "none", True),  # no test: any gain >= min_gain promotes
        (1, 3, "none", False),
    ],
)
def test_significance_table(wins, losses, test, promote):
    cand, inc = pair(200, 80, wins, losses)
    d = decide(metrics(cand), metrics(inc), GateConfig(test=test, bootstrap_samples=500))
    assert d.promote is promote, d.reasons
    if test == "none":
        assert d.numbers["p_value"] is None
    if not promote and test != "none" and wins > losses:
        assert "> alpha" in failed_text(d)


def test_min_gain_margin():
    cand, inc = pair(100, 40, 8, 0)  # +0.08, p = 1/256
    assert decide(metrics(cand), metrics(inc), GateConfig(min_gain=0.08)).promote
    text = failed_text(decide(metrics(cand), metrics(inc), GateConfig(min_gain=0.10)))
    assert "accuracy gain +0.0800" in text and "< min_gain +0.1000" in text


def test_win_with_category_regression_rejects():
    # category a: 40 items, candidate +20; category b: 40 items, candidate -4 (-0.10)
    ca, ia = pair(40, 10, 20, 0)
    cb, ib = pair(40, 30, 0, 4)
    cats = ["a"] * 40 + ["b"] * 40
    d = decide(metrics(ca + cb, cats), metrics(ia + ib, cats), GateConfig())
    text = failed_text(d)
    assert "category 'b' 0.8500 -> 0.7500 (-0.1000 on 40 items) regresses" in text
    assert "category 'a'" not in text
    assert d.numbers["categories"]["b"]["delta"] == pytest.approx(-0.1)
    assert d.numbers["gain"] == pytest.approx(16 / 80)


def test_small_category_is_not_checked():
    ca, ia = pair(60, 10, 20, 0)
    cb, ib = pair(5, 5, 0, 0)
    cb[0] = False  # -0.2 on a 5-item category
    cats = ["a"] * 60 + ["tiny"] * 5
    d = decide(metrics(ca + cb, cats), metrics(ia + ib, cats), GateConfig(min_category_items=20))
    assert d.promote, d.reasons
    assert d.numbers["categories"]["tiny"] == pytest.approx(
        {"n": 5, "candidate": 0.8, "incumbent": 1.0, "delta": -0.2, "checked": False}
    )


@pytest.mark.parametrize(
    "cand_nll,inc_nll,base_nll,promote",
    [
        (1.2, 1.0, None, True),  # +0.2 from the incumbent
        (1.6, 1.0, None, False),  # +0.6 > 0.5
        (1.6, 1.4, 1.0, False),  # small step from the incumbent, but +0.6 drift from the base
        (1.3, 1.4, 1.0, True),
        (0.7, 1.0, None, True),  # getting more likely is never forgetting
    ],
)
def test_forgetting_guard(cand_nll, inc_nll, base_nll, promote):
    cand, inc = pair(100, 50, 20, 0)
    d = decide(metrics(cand, anchor=cand_nll), metrics(inc, anchor=inc_nll), GateConfig(), base_anchor_nll=base_nll)
    assert d.promote is promote, d.reasons
    ref = base_nll if base_nll is not None else inc_nll
    assert d.numbers["anchor_nll_increase"] == pytest.approx(cand_nll - ref)
    if not promote:
        assert "max_anchor_nll_increase 0.5" in failed_text(d)


def test_no_anchor_prompts_skips_the_guard():
    cand, inc = pair(100, 50, 20, 0)
    d = decide(metrics(cand, anchor=None), metrics(inc, anchor=None), GateConfig())
    assert d.promote and d.numbers["anchor_nll_increase"] is None


@pytest.mark.parametrize(
    "sanity,expect",
    [
        (SanityStats(0.5, 0.05, 20.0), "empty answers 0.5000 > max_empty_fraction 0.1"),
        (SanityStats(0.0, 0.8, 40.0), "4-gram repetition 0.8000 > max_repetition 0.5"),
        (SanityStats(0.0, 0.05, 200.0), "mean length 40.0 -> 200.0 tokens (x5.000) outside max_length_ratio 3"),
        (SanityStats(0.0, 0.05, 8.0), "(x0.200) outside max_length_ratio 3"),
    ],
)
def test_degenerate_outputs_reject_even_with_a_big_win(sanity, expect):
    cand, inc = pair(100, 50, 40, 0)
    assert expect in failed_text(decide(metrics(cand, sanity=sanity), metrics(inc), GateConfig()))


def test_empty_incumbent_does_not_blow_up_the_length_ratio():
    cand, inc = pair(100, 0, 40, 0)
    empty = SanityStats(empty_fraction=0.0, repetition=0.0, mean_length=0.0)
    d = decide(metrics(cand, sanity=SanityStats(0.0, 0.0, 2.5)), metrics(inc, sanity=empty), GateConfig())
    assert d.promote, d.reasons
    assert d.numbers["length_ratio"] == 2.5


@pytest.mark.parametrize("win,promote", [(None, True), (0.62, True), (0.45, False)])
def test_pairwise_win_rate(win, promote):
    cand, inc = pair(100, 50, 20, 0)
    d = decide(metrics(cand, win=win), metrics(inc), GateConfig())
    assert d.promote is promote
    if not promote:
        assert "pairwise win rate 0.4500 < min_win_rate 0.5" in failed_text(d)


def test_every_failure_is_reported_at_once():
    cand, inc = pair(100, 50, 0, 20)
    d = decide(metrics(cand, anchor=3.0, sanity=SanityStats(0.9, 0.9, 1000.0), win=0.1), metrics(inc), GateConfig())
    assert len(d.reasons) == 7  # gain, test, anchors, empty, repetition, length, win rate


def test_mismatched_items_are_an_error():
    with pytest.raises(ValueError, match="different items .1 only in the candidate, 1 only in the incumbent"):
        decide(
            EvalMetrics(correct={1: True, 2: True}, sanity=SANE),
            EvalMetrics(correct={1: True, 3: False}, sanity=SANE),
            GateConfig(),
        )
    with pytest.raises(ValueError, match="no held-out items"):
        decide(EvalMetrics(correct={}, sanity=SANE), EvalMetrics(correct={}, sanity=SANE), GateConfig())


def test_decision_is_deterministic():
    cand, inc = pair(150, 50, 14, 6)
    cfg = GateConfig(test="bootstrap", bootstrap_samples=300)
    a = decide(metrics(cand), metrics(inc), cfg)
    b = decide(metrics(cand), metrics(inc), cfg)
    assert a.numbers == b.numbers and a.promote == b.promote


def policy(**kw):
    gates = kw.pop("gates", {})
    evaluation = kw.pop("evaluation", {})
    return Policy(
        tasks=TasksConfig(sources=[JsonlSource(type="jsonl", path="tasks.jsonl")]),
        gates=GateConfig(**gates),
        evaluation=EvaluationConfig(**evaluation),
        **kw,
    )


@pytest.mark.parametrize(
    "gates,evaluation,problem",
    [
        ({}, {}, None),
        ({"test": "bootstrap", "bootstrap_samples": 2000}, {}, None),
        ({"test": "none", "min_gain": 0.99}, {}, None),
        ({"max_empty_fraction": 0.0, "max_repetition": 0.0, "max_length_ratio": 1.0}, {}, None),
        # a bootstrap p-value is never below 1 / (samples + 1) = 1/101
        ({"test": "bootstrap", "bootstrap_samples": 100, "alpha": 0.001}, {}, "bootstrap p = 0.009901 (200 wins, 0 losses) > alpha 0.001"),
        ({"alpha": 1e-9}, {"heldout_items": 30}, None),  # 2**-30 < 1e-9: just reachable
    ],
)
def test_gate_can_pass(gates, evaluation, problem):
    problems = gate_can_pass(policy(gates=gates, evaluation=evaluation))
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problems[0].startswith("gates can never pass, even for a candidate right on all")
        assert problem in problems[0]


def test_an_untrusted_pairwise_judge_fails_the_gate_whatever_its_win_rate():
    cand, inc = pair(100, 50, 20, 0)
    m = metrics(cand, win=0.9)
    m.win_rate_problem = "pairwise judge 'teacher' followed the answers' position in 40 of 50 comparisons"
    d = decide(m, metrics(inc), GateConfig())
    assert not d.promote
    assert "pairwise win rate 0.9000 not trusted: pairwise judge 'teacher' followed" in failed_text(d)


@pytest.mark.parametrize("win, promote", [(None, False), (0.7, True), (0.4, False)])
def test_held_out_items_without_a_verifier_are_decided_by_the_pairwise_judge_alone(win, promote):
    """Verifier-less tasks (open-ended answers): no accuracy to compare, so the pairwise win rate
    decides, and without a pairwise judge nothing measures the candidate: it is rejected, saying so."""
    unverified = lambda w=None: EvalMetrics(correct={}, sanity=SANE, anchor_nll=1.0, win_rate=w, unverified=30)  # noqa: E731
    d = decide(unverified(win), unverified(), GateConfig(test="mcnemar", min_gain=0.05))
    assert d.promote is promote, d.reasons
    assert d.numbers["n"] == 0 and d.numbers["unverified"] == 30 and d.numbers["gain"] is None
    if win is None:
        assert "none of the 30 held-out items has a verifier and no pairwise judge measured the candidate" in failed_text(d)
    elif promote:
        assert "accuracy not measured: none of the 30 held-out items has a verifier (the pairwise win rate decides)" in d.reasons
        assert "pairwise win rate 0.7000 >= min_win_rate 0.5" in d.reasons
    # where some items have a verifier, the accuracy rules apply to those, as ever
    cand, inc = pair(40, 10, 0, 10)
    mixed = decide(EvalMetrics(correct=dict(enumerate(cand)), sanity=SANE, anchor_nll=1.0, win_rate=0.9, unverified=30),
                   metrics(inc), GateConfig())
    assert not mixed.promote and "accuracy gain -0.2500" in failed_text(mixed)
