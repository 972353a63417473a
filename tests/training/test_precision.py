"""Training's speed settings: the base's dtype (training.precision) and the LM head over labelled positions only.

Each is a speed change that must not change what is learned: the label-positions head gives the same losses
step by step as TRL's every-position head, and the dtype is the one the policy and the machine call for.
"""

from __future__ import annotations

import pytest

from selfdistill.training.run import FULL_LM_HEAD_ENV, choose_dtype, cpu_has_bfloat16, run_round, score_label_positions_only


@pytest.mark.parametrize(
    "precision, stages, cuda_bf16, cpu_bf16, want",
    [
        ("auto", ["sft", "dpo"], None, True, "bfloat16"),   # a CPU with AVX512-BF16 or AMX
        ("auto", ["sft", "dpo"], None, False, "float32"),   # emulated bfloat16 is slower than float32
        ("auto", ["sft", "grpo"], None, True, "float32"),   # importance ratios against the sampler: exact
        ("auto", ["distill"], None, True, "float32"),
        ("auto", ["sft", "grpo"], True, False, "bfloat16"),  # a GPU with bfloat16, as before
        ("auto", ["sft"], False, True, "float32"),
        ("float32", ["sft", "dpo"], True, True, "float32"),
        ("bfloat16", ["grpo"], None, False, "bfloat16"),
    ],
)
def test_the_base_dtype_follows_the_policy_and_the_machine(precision, stages, cuda_bf16, cpu_bf16, want):
    assert choose_dtype(precision, stages, cuda_bf16, cpu_bf16) == want


@pytest.fixture
def trl_head(monkeypatch):
    """TRL's own switch during the test, restored after it (score_label_positions_only replaces it for the
    process, and an earlier test's round may have done so)."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", getattr(trl_utils._use_triton, "trl_original", trl_utils._use_triton))
    return trl_utils


def projected_rows(tiny_base, labelled: int, total: int) -> int:
    """How many positions TRL's fused LM head projects for one sequence with `labelled` labels out of `total`."""
    import types

    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    trl_utils.add_fused_lm_head(model)
    seen = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        seen.append(hidden.shape[0])
        return apply(hidden, *args)

    ids = torch.randint(0, model.config.vocab_size, (1, total))
    labels = ids.clone()
    labels[:, : total - labelled] = -100
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl_utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=spy))
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    return seen[0]


def test_the_lm_head_projects_only_labelled_positions_on_cpu(trl_head, tiny_base, monkeypatch):
    monkeypatch.delenv(FULL_LM_HEAD_ENV, raising=False)
    # TRL's own choice on CPU: every position but the last (whose next token is unknown)
    assert projected_rows(tiny_base, labelled=5, total=40) == 39
    assert score_label_positions_only() is True
    assert projected_rows(tiny_base, labelled=5, total=40) == 5  # the labelled positions only
    assert score_label_positions_only() is True  # twice is once


def test_the_benchmark_baseline_switch_keeps_trl_as_it_is(trl_head, tiny_base, monkeypatch):
    monkeypatch.setenv(FULL_LM_HEAD_ENV, "1")
    assert score_label_positions_only() is False
    assert projected_rows(tiny_base, labelled=5, total=40) == 39


def test_the_label_positions_head_trains_to_the_same_losses(trl_head, make_spec, monkeypatch):
    """The same round (SFT then DPO, float32) with TRL's every-position head and with ours: the same loss at every
    step, and the round records which head and dtype it ran with."""
    import torch

    results = {}
    for full in ("1", "0"):
        monkeypatch.setenv(FULL_LM_HEAD_ENV, full)
        torch.manual_seed(0)  # the same fresh LoRA (the child process starts from torch's fixed seed each round)
        r = run_round(make_spec(f"head-{full}", n_sft=12, n_pairs=8, precision="float32"))
        assert r.status == "succeeded", r.reason
        results[full] = r.metrics
    before, now = results["1"], results["0"]
    assert (before["lm_head"], now["lm_head"]) == ("all_positions", "label_positions")
    assert before["dtype"] == now["dtype"] == "float32"
    for stage in ("sft", "dpo"):
        assert len(now[f"{stage}_loss_curve"]) == now[f"{stage}_steps"] >= 2
        assert now[f"{stage}_loss_curve"] == pytest.approx(before[f"{stage}_loss_curve"], abs=2e-4)


def test_auto_precision_trains_in_bfloat16_where_the_cpu_has_it(trl_head, make_spec, adapter_tensors):
    import torch

    r = run_round(make_spec("auto", n_sft=8, n_pairs=8))
    assert r.status == "succeeded", r.reason
    assert r.metrics["dtype"] == ("bfloat16" if cpu_has_bfloat16() else "float32")
    # the LoRA itself trains and is saved in float32 whatever the base's dtype
    assert {t.dtype for t in adapter_tensors(r.adapter_dir).values()} == {torch.float32}
    fp32 = run_round(make_spec("explicit", n_sft=8, n_pairs=8, precision="float32"))
    assert fp32.metrics["dtype"] == "float32"
