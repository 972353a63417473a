"""Reference-overlap metrics for tasks whose answer is free text (summaries, rewrites): chrF and
ROUGE-L, each in [0, 1]. Pure Python, nothing imported; the `chrf` and `rougeL` verifiers
(scoring/verifiers.py) are built on them.

They follow the reference implementations' defaults, and tests/scoring/test_overlap.py holds
figures computed by those implementations (sacrebleu 2.5.1, rouge-score 0.1.2) that these must
equal:

- chrF (Popović 2015; sacreBLEU's `CHRF()`): character n-grams of orders 1-6 with whitespace
  removed; per order the clipped matches over the hypothesis' and the reference's n-grams; the
  precisions and recalls averaged over the orders both sides have, then F-beta with beta = 2
  (recall weighs four times precision).
- ROUGE-L (Lin 2004; rouge-score's `RougeScorer(["rougeL"])`): tokens are the runs of lowercase
  letters and digits; the longest common subsequence over the two token lists; F1 of its share
  of each side.
"""

from __future__ import annotations

import re
from collections import Counter

CHRF_ORDER, CHRF_BETA = 6, 2.0
_TOKEN = re.compile(r"[a-z0-9]+")


def chrf(hypothesis: str, reference: str, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """Sentence chrF of `hypothesis` against `reference`, in [0, 1] (sacreBLEU prints it x 100)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue  # the order neither side has: left out of the average (sacreBLEU's effective order)
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    f = beta * beta
    return (1 + f) * p * r / (f * p + r)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 of `hypothesis` against `reference`, in [0, 1]."""
    h, r = _TOKEN.findall(hypothesis.lower()), _TOKEN.findall(reference.lower())
    if not h or not r:
        return 0.0
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the table at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]
