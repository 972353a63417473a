"""Curriculum weights and the weighted draw: tables."""

import math
import random
from collections import Counter

import pytest

from selfdistill.config import CurriculumConfig
from selfdistill.records import Task
from selfdistill.tasks.curriculum import sample_tasks, sampling_weights

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
