"""Which training tasks to ask next: weights from each task's pass rate so far, and a weighted
draw without replacement.

A task teaches most when the student sometimes solves it: its weight is a Gaussian bump around
`target_pass_rate` (`width` is the standard deviation), never below `floor_weight`. A task never
attempted gets `explore_weight`; one always or never solved gets `floor_weight` (it may become
useful again as the student changes); one used `max_uses` times, or not in the train split, gets
zero. Source weights (the policy's per-source `weight`) multiply in.

Pure: standard library only.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from selfdistill.config import CurriculumConfig
from selfdistill.records import Task


def sampling_weights(
    tasks: Sequence[Task], cfg: CurriculumConfig, source_weights: dict[str, float] | None = None
) -> list[float]:
    """One non-negative weight per task, in order (see the module docstring)."""
    out = []
    for t in tasks:
        if t.split != "train" or t.uses >= cfg.max_uses:
            out.append(0.0)
            continue
        p = t.pass_rate
        if p is None:
            w = cfg.explore_weight
        elif p <= 0.0 or p >= 1.0:
            w = cfg.floor_weight
        else:
            w = max(cfg.floor_weight, math.exp(-0.5 * ((p - cfg.target_pass_rate) / cfg.width) ** 2))
        if source_weights is not None:
            w *= source_weights.get(t.source, 1.0)
        out.append(w)
    return out


def sample_tasks(tasks: Sequence[Task], weights: Sequence[float], k: int, rng: random.Random) -> list[Task]:
    """Up to k distinct tasks drawn with probability proportional to weight (zero never drawn).

    Efraimidis-Spirakis: each task gets the key u ** (1 / w); the k largest keys win. That is an
    exact weighted draw without replacement in one pass.
    """
    if len(tasks) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(tasks)} tasks")
    keyed = [(rng.random() ** (1.0 / w), i) for i, w in enumerate(weights) if w > 0]
    keyed.sort(reverse=True)
    return [tasks[i] for _, i in keyed[:k]]
