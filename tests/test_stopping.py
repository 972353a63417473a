"""Stopping policies, as a table."""

import pytest

from selfdistill.config import StoppingConfig
from selfdistill.stopping import Progress, should_stop

CASES = [
    (Progress(), {}, None),
    (Progress(decided_rounds=3), {"max_rounds": 3}, "max rounds"),
    (Progress(decided_rounds=2), {"max_rounds": 3}, None),
    (Progress(wall_s=100), {"max_wall_s": 50}, "wall clock"),
    (Progress(generated_tokens=10_000), {"max_generated_tokens": 5000}, "token budget"),
    (Progress(teacher_tokens=1200), {"max_teacher_tokens": 1200}, "teacher budget"),
    (Progress(teacher_tokens=1199, generated_tokens=10**9), {"max_teacher_tokens": 1200}, None),
    (Progress(incumbent_accuracy=0.8), {"target_accuracy": 0.75}, "target reached"),
    (Progress(incumbent_accuracy=0.7), {"target_accuracy": 0.75}, None),
    (Progress(decisions=["promote", "reject", "reject"]), {"plateau_rounds": 2}, "plateau"),
    (Progress(decisions=["reject", "promote"]), {"plateau_rounds": 2}, None),
    (Progress(decisions=["reject"]), {"plateau_rounds": 2}, None),
    (Progress(regressions=2), {"max_regressions": 2}, "regressions"),
    (Progress(tasks_exhausted=True), {}, "tasks exhausted"),
    (Progress(tasks_exhausted=True), {"stop_when_tasks_exhausted": False}, None),
    (Progress(stop_file_present=True), {}, "stop file"),
    (Progress(signal_received=True, decided_rounds=9), {"max_rounds": 1}, "signal"),
]


@pytest.mark.parametrize("progress,cfg,expected", CASES)
def test_should_stop(progress, cfg, expected):
    reason = should_stop(progress, StoppingConfig(**cfg))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)
