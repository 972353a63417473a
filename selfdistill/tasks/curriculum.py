"""Which training tasks to ask next: weights from each task's pass rate so far, and a weighted
draw without replacement.

A task teaches most when the student sometimes solves it: its weight is a Gaussian bump around
`target_pass_rate` (`width` is the standard deviation), never below `floor_weight`. A task never
attempted gets `explore_weight`; one always or never solved gets `floor_weight` (it may become
useful again as the student changes); one used `max_uses` times, or not in the train split, gets
zero. Source weights (the policy's per-source `weight`) multiply in.

Difficulty levels (`level_field`): each task may carry a level, a number (`task_level`). The pool
is open up to the lowest level not yet passed (`level_state`); tasks above it weigh zero, tasks of
levels already passed are multiplied by `review_weight`, tasks with no level are not affected. A
level is passed when at least `min_attempted` of its training tasks (or all of them, if it has
fewer) have been attempted and their pooled pass rate reaches `advance_at`, or when none of its
tasks can be drawn any more (`max_uses`). The state is read from the tasks' stored pass rates
alone, so it needs no state of its own and a restarted daemon resumes at the same level. The pass
rates pool every round's answers, so a level opens a little later than the current student alone
would open it.

Pure: standard library only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from selfdistill.config import CurriculumConfig
from selfdistill.records import Task


@dataclass(frozen=True)
class Levels:
    """Where a difficulty curriculum stands: the training pool's levels in order, the open one, and
    per level (training tasks, attempted tasks, pooled pass rate or None)."""

    field: str
    levels: tuple[float, ...]
    current: float
    stats: dict[float, tuple[int, int, float | None]]

    def describe(self) -> str:
        parts = []
        for lv in self.levels:
            n, tried, rate = self.stats[lv]
            mark = "open" if lv == self.current else ("passed" if lv < self.current else "closed")
            parts.append(f"{_num(lv)}: {mark}, {tried}/{n} tried" + (f", pass rate {rate:.2f}" if rate is not None else ""))
        return f"{self.field} = {_num(self.current)} (" + "; ".join(parts) + ")"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def is_number(v: object) -> bool:
    """What a level can be: an int or a float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def task_level(task: Task, field: str) -> int | float | None:
    """A task's level: `metadata[field]`, else the reasoning-gym entry's `metadata["fields"][field]`;
    None where it has none or it is not a number."""
    md = task.metadata or {}
    v = md.get(field)
    if v is None:
        v = (md.get("fields") or {}).get(field)
    return v if is_number(v) else None


def level_field_names(tasks: Sequence[Task]) -> list[str]:
    """The names `level_field` could take on these tasks: their numeric metadata and entry fields."""
    return sorted({k for t in tasks for k, v in {**t.metadata, **(t.metadata.get("fields") or {})}.items() if is_number(v)})


def level_state(tasks: Sequence[Task], cfg: CurriculumConfig) -> Levels | None:
    """The curriculum's level (see the module docstring); None without `level_field` or when no
    training task has a level."""
    if cfg.level_field is None:
        return None
    per: dict[float, list[Task]] = {}
    for t in tasks:
        lv = task_level(t, cfg.level_field) if t.split == "train" else None
        if lv is not None:
            per.setdefault(lv, []).append(t)
    if not per:
        return None
    levels = tuple(sorted(per))
    stats, current = {}, None
    for lv in levels:
        tried = [t for t in per[lv] if t.attempts]
        attempts = sum(t.attempts for t in tried)
        rate = sum(t.successes for t in tried) / attempts if attempts else None
        stats[lv] = (len(per[lv]), len(tried), rate)
        exhausted = all(t.uses >= cfg.max_uses for t in per[lv])
        passed = exhausted or (len(tried) >= min(cfg.min_attempted, len(per[lv])) and rate is not None and rate >= cfg.advance_at)
        if current is None and not passed:
            current = lv
    return Levels(cfg.level_field, levels, levels[-1] if current is None else current, stats)


def sampling_weights(
    tasks: Sequence[Task], cfg: CurriculumConfig, source_weights: dict[str, float] | None = None,
    levels: Levels | None = None,
) -> list[float]:
    """One non-negative weight per task, in order (see the module docstring). `levels`: the
    curriculum's state if already computed (`level_state` of the same tasks)."""
    if levels is None and cfg.level_field is not None:
        levels = level_state(tasks, cfg)
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
        lv = task_level(t, levels.field) if levels is not None else None
        if lv is not None:
            w = 0.0 if lv > levels.current else w * cfg.review_weight if lv < levels.current else w
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
