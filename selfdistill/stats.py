"""Small statistics the gates stand on: Wilson intervals for an accuracy, the exact one-sided
McNemar test and a seeded paired bootstrap for "is the candidate better on the same items", and a
mean with a normal-approximation interval; and the seeded draw that makes older rows a given share
of a training set (`draw_share`: the replay of `data_scope = "since_last"`, the review cut of a
curriculum).

Everything is exact integer arithmetic or seeded pure Python, so a gate decision is reproducible
to the bit on any machine. Pure: standard library only.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Sequence, TypeVar

T = TypeVar("T")


def z_for(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level (0.95 -> 1.95996...)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there are no trials.

    Wilson rather than the normal interval because held-out accuracies near 0 or 1 on a few
    hundred items are common, and the normal interval then leaves [0, 1] or collapses to a point.
    """
    if n == 0:
        return 0.0, 1.0
    z = z_for(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def binom_sf_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer sums, one final division)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def discordant(candidate: Sequence[bool], incumbent: Sequence[bool]) -> tuple[int, int]:
    """(wins, losses) of the candidate on paired items: (right where the incumbent was wrong,
    wrong where the incumbent was right)."""
    if len(candidate) != len(incumbent):
        raise ValueError(f"paired samples differ in length: {len(candidate)} vs {len(incumbent)}")
    wins = sum(1 for c, i in zip(candidate, incumbent) if c and not i)
    losses = sum(1 for c, i in zip(candidate, incumbent) if i and not c)
    return wins, losses


def mcnemar_one_sided(wins: int, losses: int) -> float:
    """Exact one-sided McNemar p-value for "the candidate is better".

    Under the null each discordant item is a fair coin, so the p-value is
    P(X >= wins) with X ~ Binomial(wins + losses, 1/2). No discordant items: p = 1.
    """
    return binom_sf_half(wins, wins + losses)


def paired_bootstrap(
    candidate: Sequence[bool],
    incumbent: Sequence[bool],
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float, float]:
    """Paired bootstrap of the accuracy difference (candidate - incumbent).

    Returns (difference, ci_low, ci_high, one-sided p-value). Items are resampled as pairs, so
    the correlation between the two models' answers is kept. The p-value is the share of
    resampled differences <= 0, counted with the +1 correction so it is never exactly 0 (a
    finite number of resamples cannot prove more than 1/(samples+1)).
    """
    if len(candidate) != len(incumbent):
        raise ValueError(f"paired samples differ in length: {len(candidate)} vs {len(incumbent)}")
    n = len(candidate)
    if n == 0:
        raise ValueError("paired bootstrap of zero items: evaluate at least one held-out item")
    diffs = [int(bool(c)) - int(bool(i)) for c, i in zip(candidate, incumbent)]
    observed = sum(diffs) / n
    rng = random.Random(seed)
    resampled = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(samples))
    not_better = sum(1 for d in resampled if d <= 0)
    tail = (1 - confidence) / 2
    low = resampled[int(math.floor(tail * (samples - 1)))]
    high = resampled[int(math.ceil((1 - tail) * (samples - 1)))]
    return observed, low, high, (not_better + 1) / (samples + 1)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) with a normal-approximation interval from the sample standard deviation."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = z_for(confidence) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def draw_share(pool: Sequence[T], beside: int, share: float, rng: random.Random) -> list[T]:
    """Items of `pool`, drawn by `rng`, that make up `share` of themselves plus `beside` other items
    (as many as that takes, rounded, and never more than the pool has)."""
    want = int(round(beside * share / max(1e-9, 1 - share)))
    return rng.sample(pool, min(want, len(pool)))
