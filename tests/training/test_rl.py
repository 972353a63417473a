"""The policy gradient's pure arithmetic: group advantages per variant, and the guard."""

import math

import pytest

from selfdistill.training.rl import PolicyGuard, group_advantages


def test_advantages_per_variant():
    r = [1.0, 0.0, 0.0, 1.0]
    assert group_advantages(r, "dr_grpo") == [0.5, -0.5, -0.5, 0.5]
    # rloo: each reward against the mean of the other three
    assert group_advantages(r, "rloo") == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    std = math.sqrt(4 * 0.25 / 3)
    assert group_advantages(r, "grpo") == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    # a flat group carries no signal in any variant; one sample has no group to compare with
    for v in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages([0.3, 0.3, 0.3], v) == pytest.approx([0, 0, 0])
        assert group_advantages([1.0], v) == [0.0]
    with pytest.raises(ValueError, match="unknown policy-gradient variant 'ppo'"):
        group_advantages(r, "ppo")


def test_policy_guard_names_each_failure():
    g = lambda: PolicyGuard(explode_grad_norm=100.0, max_ratio=10.0, min_entropy=0.01)  # noqa: E731
    assert g().observe({"loss": 0.1, "grad_norm": 1.0, "ratio_mean": 1.0, "entropy": 2.0}, 1) is None
    assert g().observe({"loss": math.nan}, 3) == "grpo: loss is nan at step 3"
    assert g().observe({"grad_norm": 1e3}, 2).startswith("grpo: gradient norm 1e+03 > explode_grad_norm 100")
    assert "mean importance ratio 12 > training.rl.max_ratio 10" in g().observe({"ratio_mean": 12.0}, 4)
    assert "entropy collapsed to 0.001" in g().observe({"entropy": 0.001}, 5)
