"""Table tests of selfdistill.stats against values worked out by hand."""

import math

import pytest

from selfdistill import stats


@pytest.mark.parametrize(
    "successes,n,low,high",
    [
        # p = 0: the interval is [0, (z^2/n) / (1 + z^2/n)] = [0, 0.27753] for n = 10
        (0, 10, 0.0, 0.277533),
        # p = 1/2: 0.5 -/+ z*sqrt(0.025 + z^2/400) / (1 + z^2/10)
        (5, 10, 0.236593, 0.763407),
        (10, 10, 0.722467, 1.0),
        # p = 1/2 with n = 100: 0.5 -/+ 0.0962... (the textbook 0.404 - 0.596)
        (50, 100, 0.403832, 0.596168),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_interval(successes, n, low, high):
    lo, hi = stats.wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-5)
    assert hi == pytest.approx(high, abs=1e-5)


def test_wilson_narrows_with_confidence():
    lo90, hi90 = stats.wilson_interval(30, 100, confidence=0.90)
    lo99, hi99 = stats.wilson_interval(30, 100, confidence=0.99)
    assert lo99 < lo90 < 0.30 < hi90 < hi99


@pytest.mark.parametrize(
    "k,n,p",
    [
        (0, 5, 1.0),
        (5, 5, 1 / 32),
        (8, 10, (45 + 10 + 1) / 1024),  # C(10,8) + C(10,9) + C(10,10)
        (3, 6, (20 + 15 + 6 + 1) / 64),
        (7, 6, 0.0),
        (1, 1, 0.5),
    ],
)
def test_binom_sf_half(k, n, p):
    assert stats.binom_sf_half(k, n) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize(
    "wins,losses,p",
    [
        (0, 0, 1.0),  # no discordant item: no evidence at all
        (5, 0, 0.03125),  # the fewest wins that reach p < 0.05
        (4, 0, 0.0625),
        (8, 2, 0.0546875),
        (10, 0, 1 / 1024),
        (2, 8, 1 - 11 / 1024),  # P(X >= 2 | 10) = 1 - (C(10,0) + C(10,1)) / 1024
        (3, 3, 0.65625),
    ],
)
def test_mcnemar_one_sided(wins, losses, p):
    assert stats.mcnemar_one_sided(wins, losses) == pytest.approx(p, rel=1e-12)


def test_mcnemar_large_n_is_exact_and_finite():
    # 2000 discordant items: integer sums over 2**2000 must still divide to a float
    p = stats.mcnemar_one_sided(1100, 900)
    assert 0 < p < 1e-5


def test_discordant_counts_and_length_mismatch():
    assert stats.discordant([1, 1, 0, 0, 1], [0, 1, 1, 0, 0]) == (2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        stats.discordant([1, 0], [1])


def test_bootstrap_all_wins_has_the_floor_p_value():
    d, lo, hi, p = stats.paired_bootstrap([True] * 30, [False] * 30, samples=500, seed=1)
    assert (d, lo, hi) == (1.0, 1.0, 1.0)
    assert p == pytest.approx(1 / 501)


def test_bootstrap_identical_models_is_not_significant():
    xs = [True, False, True, True, False] * 10
    d, lo, hi, p = stats.paired_bootstrap(xs, xs, samples=300)
    assert (d, lo, hi, p) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_is_seeded_and_brackets_the_difference():
    cand = [True] * 30 + [False] * 10 + [True] * 50 + [False] * 10
    inc = [False] * 30 + [True] * 10 + [True] * 50 + [False] * 10
    a = stats.paired_bootstrap(cand, inc, samples=1000, seed=7)
    b = stats.paired_bootstrap(cand, inc, samples=1000, seed=7)
    assert a == b
    d, lo, hi, p = a
    assert d == pytest.approx(0.2)
    # sd of the per-item difference is sqrt(0.4 - 0.04) = 0.6; se = 0.06 -> about +-0.118
    assert 0.2 - 0.16 < lo < 0.2 - 0.08
    assert 0.2 + 0.08 < hi < 0.2 + 0.16
    assert p < 0.01
    assert stats.paired_bootstrap(inc, cand, samples=1000, seed=7)[3] > 0.99


def test_bootstrap_rejects_empty_and_mismatched():
    with pytest.raises(ValueError, match="zero items"):
        stats.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_bootstrap([True], [True, False])


def test_mean_ci():
    m, lo, hi = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    # sd = sqrt(5/3), se = sd / 2
    half = 1.959964 * math.sqrt(5 / 3) / 2
    assert m == 2.5
    assert lo == pytest.approx(2.5 - half, abs=1e-5)
    assert hi == pytest.approx(2.5 + half, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_ci([1.0])
