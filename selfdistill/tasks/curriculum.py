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
level is passed when one student (one checkpoint's answers) has attempted at least `min_attempted`
of its training tasks (or all of them, if it has fewer) and its pooled pass rate on them reaches
`advance_at`, or when none of its tasks can be drawn any more (`max_uses`). Per student, because
pooling every round's answers lets the weaker earlier students hold a level closed: in one demo
run the base's 0.20 and its first promotion's 0.57 pooled to 0.39, under the 0.4 threshold, and a
round went on 2-term questions its student answered 87% right. Once passed, a level stays passed
(the stored answers only grow), and the state is read from them alone, so it needs no state of its
own and a restarted daemon resumes at the same level. What a round then trains on can keep the
passed levels' rows to a share of it (`cut_review`, `training.review_fraction`).

Pure: standard library only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, TypeVar

from selfdistill.config import CurriculumConfig
from selfdistill.records import Task
from selfdistill.stats import draw_share


class _HasTask(Protocol):
    task_id: int


R = TypeVar("R", bound=_HasTask)

# per student (a checkpoint id), per task id: (attempts, successes)
Answers = Mapping[str, Mapping[int, tuple[int, float]]]


@dataclass(frozen=True)
class Levels:
    """Where a difficulty curriculum stands: the training pool's levels in order, the open one, and
    per level (training tasks, attempted tasks, pooled pass rate or None) of the student that decides
    it: the first that passed it, else the last that tried it."""

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


def level_state(tasks: Sequence[Task], cfg: CurriculumConfig, answers: Answers | None = None) -> Levels | None:
    """The curriculum's level (see the module docstring); None without `level_field` or when no
    training task has a level. `answers`: each student's counts, oldest student first; None reads
    the tasks' pooled counts as one student's."""
    if cfg.level_field is None:
        return None
    per: dict[float, list[Task]] = {}
    for t in tasks:
        lv = task_level(t, cfg.level_field) if t.split == "train" else None
        if lv is not None:
            per.setdefault(lv, []).append(t)
    if not per:
        return None
    if answers is None:
        answers = {"": {t.id: (t.attempts, t.successes) for t in tasks if t.attempts}}
    levels = tuple(sorted(per))
    stats, current = {}, None
    for lv in levels:
        ids = {t.id for t in per[lv]}
        need = min(cfg.min_attempted, len(ids))
        shown, passed = (len(ids), 0, None), False
        for counts in answers.values():
            tried = [counts[i] for i in ids if counts.get(i, (0, 0))[0] > 0]
            if not tried:
                continue
            rate = sum(s for _, s in tried) / sum(a for a, _ in tried)
            shown = (len(ids), len(tried), rate)
            if len(tried) >= need and rate >= cfg.advance_at:
                passed = True
                break
        stats[lv] = shown
        exhausted = all(t.uses >= cfg.max_uses for t in per[lv])
        if current is None and not (passed or exhausted):
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


def cut_review(rows: Sequence[R], levels: Mapping[int, int | float | None], current: int | float, share: float,
               rng: random.Random) -> tuple[list[R], int]:
    """`rows` (each with a `task_id`) with those of levels below `current` (already passed) cut to
    `share` of what is returned, by a draw from `rng`; rows of the current level, of levels above it
    and of tasks with no level are all kept, and the order is kept. Returns (rows, how many were cut).

    Why: with data_scope = 'all', a level the student has mastered goes on filling the training of
    the next. In one demo run, after three rounds on 2-term questions, 213 of the 239 SFT rows of
    the first 3-term round were 2-term ones the student already got 87% right.
    """
    keep = [i for i, r in enumerate(rows) if not _below(levels.get(r.task_id), current)]
    review = [i for i, r in enumerate(rows) if _below(levels.get(r.task_id), current)]
    drawn = draw_share(review, len(keep), share, rng)
    return [rows[i] for i in sorted(keep + drawn)], len(review) - len(drawn)


def _below(level: int | float | None, current: int | float) -> bool:
    return level is not None and level < current
