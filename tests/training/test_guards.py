"""The guards' decisions, as a table of logged steps and the reason expected (pure)."""

import math

import pytest

from selfdistill.training.guards import MIN_STEPS_FOR_FLAT_LOSS, Guard


def run(stage, logs, min_dpo_margin=None):
    g = Guard(stage, explode_grad_norm=100.0, min_loss_change=1e-3, min_dpo_margin=min_dpo_margin)
    for step, row in enumerate(logs):
        if g.observe(row, step):
            return g.reason
    return g.finish()


FLAT = [{"loss": 1.0, "grad_norm": 1.0}] * MIN_STEPS_FOR_FLAT_LOSS


@pytest.mark.parametrize(
    "stage,logs,margin,expected",
    [
        ("sft", [{"loss": 2.0, "grad_norm": 1.0}, {"loss": 1.5, "grad_norm": 1.0}], None, None),
        ("sft", [{"loss": 2.0}, {"loss": math.nan}], None, "sft: loss is nan at step 1"),
        ("sft", [{"loss": math.inf}], None, "sft: loss is inf at step 0"),
        ("sft", [{"loss": 2.0, "grad_norm": math.nan}], None, "sft: gradient norm is nan at step 0"),
        ("sft", [{"loss": 2.0, "grad_norm": 1e6}], None, "sft: gradient norm 1e+06 > explode_grad_norm 100 at step 0"),
        ("sft", FLAT, None, "sft: loss did not move over 8 steps"),
        ("sft", FLAT[:-1], None, None),  # too few steps to judge
        ("dpo", [{"loss": 0.7, "rewards/margins": 0.0}, {"loss": 0.6, "rewards/margins": -9.0}], -5.0,
         "dpo: mean reward margin collapsed to -9"),
        ("dpo", [{"loss": 0.7, "rewards/margins": -9.0}, {"loss": 0.6, "rewards/margins": 0.5}], -5.0, None),
    ],
)
def test_guard_table(stage, logs, margin, expected):
    reason = run(stage, logs, margin)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected), reason
