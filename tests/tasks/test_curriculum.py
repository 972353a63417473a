"""Curriculum weights and the weighted draw: tables."""

import math
import random
from collections import Counter

import pytest

from selfdistill.config import CurriculumConfig
from selfdistill.records import Task
from selfdistill.tasks.curriculum import level_state, sample_tasks, sampling_weights, task_level

CFG = CurriculumConfig(target_pass_rate=0.5, width=0.25, explore_weight=1.0, floor_weight=0.05, max_uses=3)


def T(attempts=0, successes=0.0, uses=0, split="train", source="s", i=0):
    return Task(source=source, prompt=f"q{i}", id=i, attempts=attempts, successes=successes, uses=uses, split=split)


@pytest.mark.parametrize("task,expected", [
    (T(), 1.0),                                    # never attempted: explore
    (T(8, 4), 1.0),                                # at the target
    (T(8, 2), math.exp(-0.5)),                     # one width away
    (T(8, 6), math.exp(-0.5)),
    (T(8, 0), 0.05),                               # never solved: floor
    (T(8, 8), 0.05),                               # always solved: floor
    (T(8, 4, uses=3), 0.0),                        # used max_uses times
    (T(), 1.0),
    (T(split="heldout"), 0.0),                     # held-out is never sampled
    (T(split="audit"), 0.0),
])
def test_weights_table(task, expected):
    assert sampling_weights([task], CFG) == [pytest.approx(expected)]


def test_floor_wins_far_from_target():
    narrow = CFG.model_copy(update={"width": 0.1})
    assert sampling_weights([T(100, 1)], narrow) == [0.05]


def test_source_weights_multiply():
    ws = sampling_weights([T(source="a"), T(source="b"), T(source="c")], CFG, {"a": 2.0, "b": 0.5})
    assert ws == [2.0, 0.5, 1.0]


def test_sample_without_replacement_skips_zero_and_favours_weight():
    tasks = [T(i=i) for i in range(4)]
    weights = [0.0, 1.0, 1.0, 8.0]
    counts = Counter()
    rng = random.Random(0)
    for _ in range(2000):
        picked = sample_tasks(tasks, weights, 2, rng)
        assert len(picked) == 2 and len({t.id for t in picked}) == 2
        counts.update(t.id for t in picked)
    assert counts[0] == 0
    assert counts[3] > 1900  # weight 8 of 10 is nearly always among two picks
    assert 0.8 < counts[1] / counts[2] < 1.25


def test_sample_more_than_available():
    tasks = [T(i=i) for i in range(3)]
    assert {t.id for t in sample_tasks(tasks, [1.0, 0.0, 2.0], 10, random.Random(1))} == {0, 2}


def test_sample_length_mismatch():
    with pytest.raises(ValueError, match="got 1 weights for 2 tasks"):
        sample_tasks([T(), T()], [1.0], 1, random.Random(0))


# difficulty levels ----------------------------------------------------------------------------

LEVELS = CFG.model_copy(update={"level_field": "level", "advance_at": 0.5, "min_attempted": 2, "review_weight": 0.25})


def L(level, attempts=0, successes=0.0, uses=0, i=0, split="train", where="metadata"):
    md = {"level": level} if where == "metadata" else {"fields": {"level": level}}  # JSONL / reasoning-gym
    return Task(source="s", prompt=f"q{i}", id=i, attempts=attempts, successes=successes, uses=uses, split=split,
                metadata=md if level is not None else {})


@pytest.mark.parametrize("tasks,current", [
    ([L(1), L(2, i=1), L(3, i=2)], 1),                                   # nothing tried: the lowest level
    ([L(1, 8, 4), L(1, 8, 4, i=1), L(2, i=2)], 2),                       # two tried at 0.5: passed
    ([L(1, 8, 4), L(1, 8, 3.9, i=1), L(2, i=2)], 1),                     # pooled 0.49: not yet
    ([L(1, 8, 8), L(1, i=1), L(1, i=2), L(2, i=3)], 1),                  # one of the two needed tried
    ([L(1, 8, 8), L(2, i=1)], 2),                                        # a level with fewer tasks than min_attempted
    ([L(1, 8, 0, uses=3), L(1, 8, 0, uses=3, i=1), L(2, i=2)], 2),       # every task used up: passed, not stuck
    ([L(1, 8, 8), L(1, 8, 8, i=1), L(2, 8, 8, i=2)], 2),                 # every level passed: the top stays open
    ([L(2, 8, 8, split="heldout"), L(1, i=1), L(5, i=2)], 1),            # held-out levels do not count
    ([L(1.5, 8, 8, where="fields"), L(0.5, 8, 8, i=1, where="fields"), L(3, i=2, where="fields")], 3),
])
def test_the_open_level(tasks, current):
    assert level_state(tasks, LEVELS).current == current


def test_no_levels_without_the_field_or_on_tasks_without_one():
    assert level_state([L(1)], CFG) is None
    assert level_state([L(None), L("hard", i=1), L(True, i=2)], LEVELS) is None  # not numbers


def test_level_weights_close_the_levels_above_and_review_the_ones_below():
    tasks = [L(1, 8, 8), L(1, 8, 8, i=1), L(2, i=2), L(3, i=3), L(None, i=4)]
    state = level_state(tasks, LEVELS)
    assert (state.current, state.stats[1.0], state.stats[2.0]) == (2, (2, 2, 1.0), (1, 0, None))
    assert sampling_weights(tasks, LEVELS) == [0.05 * 0.25, 0.05 * 0.25, 1.0, 0.0, 1.0]
    assert sampling_weights(tasks, LEVELS, levels=state) == sampling_weights(tasks, LEVELS)
    assert state.describe() == "level = 2 (1: passed, 2/2 tried, pass rate 1.00; 2: open, 0/1 tried; 3: closed, 0/1 tried)"
    assert sampling_weights(tasks, CFG) == [0.05, 0.05, 1.0, 1.0, 1.0]  # no level_field: no levels


def test_task_level_reads_metadata_then_the_entrys_fields():
    assert task_level(L(2), "level") == 2.0 and task_level(L(2, where="fields"), "level") == 2.0
    assert task_level(L(2), "other") is None


def test_a_level_is_passed_by_one_students_answers_not_by_every_rounds_pooled():
    # the demo's case: the base got 0.2 of level 1 right, its first promotion 0.6; pooled that is 0.4 < 0.5
    tasks = [L(1, i=0), L(1, i=1), L(2, i=2)]
    base = {0: (8, 1.6), 1: (8, 1.6)}
    first = {0: (8, 4.8), 1: (8, 4.8)}
    pooled = [L(1, 16, 6.4, i=0), L(1, 16, 6.4, i=1), L(2, i=2)]
    assert level_state(pooled, LEVELS).current == 1
    state = level_state(tasks, LEVELS, {"base": base, "ckpt-000001": first})
    assert state.current == 2 and state.stats[1.0] == (2, 2, pytest.approx(0.6))
    # a later, weaker student does not close it again; a student that tried too few does not open it
    assert level_state(tasks, LEVELS, {"base": base, "ckpt-000001": first, "ckpt-000002": base}).current == 2
    assert level_state(tasks, LEVELS, {"base": base, "ckpt-000001": {0: (8, 8.0)}}).current == 1
    # not passed: the figure shown is the last student's that tried the level
    assert level_state(tasks, LEVELS, {"ckpt-000001": {0: (8, 8.0)}, "base": base}).stats[1.0] == (2, 2, pytest.approx(0.2))


def test_the_rows_of_passed_levels_are_cut_to_the_review_share():
    from types import SimpleNamespace as Row

    from selfdistill.tasks.curriculum import cut_review

    levels = {0: 1, 1: 1, 2: 2, 3: None, 4: 3}
    rows = [Row(task_id=t, n=n) for n, t in enumerate([0, 1, 0, 2, 1, 0, 3, 2, 4, 1, 0, 1])]
    kept, cut = cut_review(rows, levels, 2, 0.25, random.Random(0))
    # level 2, no level and level 3 are all kept (4 rows); level 1's 8 are cut to 0.25 of the result: 1 of 4 + 1
    assert [r.task_id for r in kept if levels[r.task_id] != 1] == [2, 3, 2, 4]
    assert (sum(levels[r.task_id] == 1 for r in kept), cut, len(kept)) == (1, 7, 5)
    assert [r.n for r in kept] == sorted(r.n for r in kept)  # the order is kept
    assert cut_review(rows, levels, 1, 0.25, random.Random(0)) == (rows, 0)  # nothing below level 1
    assert cut_review(rows, levels, 2, 0.0, random.Random(0))[1] == 8  # no review at all
    assert cut_review(rows, levels, 2, 0.9, random.Random(0)) == (rows, 0)  # more review wanted than there is
