"""The policy-gradient stage on the tiny model, for real: the child's run_round with groups.

Each group holds answers to one prompt with rewards; GRPO must move probability towards the
rewarded answers (measured by the trained adapter's log-probabilities), honour the stored sampling
log-probabilities or their absence per policy, compose with SFT in one round, and fail cleanly on
its guards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfdistill.training.run import run_round


def _write_groups(path: Path, tok=None, n_groups: int = 6, with_logprobs: bool = False, n_sft: int = 0, flip: bool = False) -> Path:
    with open(path, "w") as f:
        for i in range(n_sft):
            f.write(json.dumps({"kind": "sft", "prompt": f"What is {i} + 1?", "completion": f"{i + 1}"}) + "\n")
        for i in range(n_groups):
            samples = []
            for text, reward in ((f"{i + 1}", 1.0), (f"{i + 7} maybe", 0.0), (f"{i + 1}", 1.0), ("no idea", 0.0)):
                s = {"completion": text, "reward": 1.0 - reward if flip else reward, "token_ids": None, "logprobs": None}
                if with_logprobs:
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    s.update(token_ids=ids, logprobs=[-3.0] * len(ids))
                samples.append(s)
            f.write(json.dumps({"kind": "group", "prompt": f"What is {i} + 1?", "samples": samples}) + "\n")
    return path


def _spec(make_spec, tmp_path, data: Path, name: str = "pg", **training):
    t = dict(algorithm="grpo", batch_size=4, learning_rate=2e-2, rl=dict(passes=2, min_groups=4, learning_rate=2e-2))
    rl = training.pop("rl", {})
    t.update(training)
    t["rl"].update(rl)
    spec = make_spec(name, **t)
    return spec.model_copy(update={"data_path": data})


def _margin(base: Path, adapter: Path | None, n: int = 6) -> float:
    """Mean over prompts of log p(rewarded answer) - log p(unrewarded answer) under the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfdistill.engines.local import render
    from selfdistill.records import chat_messages

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    def lp(prompt, text):
        p = render(tok, chat_messages(prompt, "Answer briefly."))
        a = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        return float(logits[torch.arange(len(p) - 1, len(p) + len(a) - 1), torch.tensor(a)].sum())

    return sum(lp(f"What is {i} + 1?", f"{i + 1}") - lp(f"What is {i} + 1?", f"{i + 7} maybe") for i in range(n)) / n


def test_grpo_moves_probability_towards_rewarded_answers(make_spec, tiny_base, tmp_path):
    spec = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-g.jsonl"))
    res = run_round(spec)
    assert res.status == "succeeded", res.reason
    assert res.stages == {"grpo": "trained"}
    m = res.metrics
    assert m["grpo_groups"] == 6 and m["grpo_samples"] == 24 and m["grpo_missing_logprobs"] == 24
    assert m["grpo_steps"] == 2 * math.ceil(24 / 4)
    for key in ("grpo_clip_fraction", "grpo_policy_kl", "grpo_entropy_first", "grpo_entropy_last", "grpo_ratio_mean"):
        assert math.isfinite(m[key]), key
    # kl_beta = 0: the KL to the reference is not computed, so it is not reported as 0; the KL from
    # the sampling policy is, and two passes over the same samples moved the policy from it
    assert m["grpo_kl"] is None and m["grpo_policy_kl"] > 0, m
    # the same answers with the rewards swapped: the margin must move the other way
    flipped = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-f.jsonl", flip=True), "flipped")
    assert run_round(flipped).status == "succeeded"
    before = _margin(tiny_base, None)
    up, down = _margin(tiny_base, spec.output_dir) - before, _margin(tiny_base, flipped.output_dir) - before
    assert up > 0.1 and down < -0.1, (before, up, down, m)


def test_stored_sampling_logprobs_weight_the_tokens_and_their_absence_follows_the_policy(make_spec, tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    with_lp = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-lp.jsonl", tok, with_logprobs=True), "lp")
    res = run_round(with_lp)
    assert res.status == "succeeded", res.reason
    assert res.metrics["grpo_missing_logprobs"] == 0

    skip = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-nolp.jsonl"), "skip", rl=dict(missing_logprobs="skip"))
    res = run_round(skip)
    assert res.status == "skipped", res.reason
    assert "24 of 24 samples have no stored sampling log-probabilities" in res.reason
    assert not skip.output_dir.exists()


def test_too_few_informative_groups_skip_the_stage(make_spec, tmp_path):
    spec = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-few.jsonl", n_groups=2))
    res = run_round(spec)
    assert res.status == "skipped"
    assert "2 groups with differing rewards < 4 needed" in res.reason


def test_sft_then_grpo_trains_both_stages_in_one_round(make_spec, tmp_path):
    spec = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-both.jsonl", n_sft=8), "both", algorithm="sft_then_grpo",
                 rl=dict(kl_beta=0.05))
    res = run_round(spec)
    assert res.status == "succeeded", res.reason
    assert res.stages == {"sft": "trained", "grpo": "trained"}
    # the SFT stage moved the policy away from the incumbent that sampled: the KL to it is positive
    assert res.metrics["grpo_kl"] > 0 and res.metrics["grpo_policy_kl"] > 0
    assert res.metrics["steps"] == res.metrics["sft_steps"] + res.metrics["grpo_steps"]


@pytest.mark.parametrize("guard, expect", [
    ({"env": "1"}, "grpo: loss is nan at step 2"),
    ({"rl": {"min_entropy": 50.0}}, "grpo: mean token entropy collapsed to"),
    ({"explode_grad_norm": 1e-6}, "grpo: gradient norm"),
])
def test_guards_fail_the_round_cleanly(make_spec, tmp_path, monkeypatch, guard, expect):
    if "env" in guard:
        monkeypatch.setenv("SELFDISTILL_INJECT_NAN", guard["env"])
    spec = _spec(make_spec, tmp_path, _write_groups(tmp_path / "groups-guard.jsonl"), "guard",
                 **{k: v for k, v in guard.items() if k != "env"})
    res = run_round(spec)
    assert res.status == "failed"
    assert res.reason.startswith(expect), res.reason
    assert not spec.output_dir.exists()


def test_token_loss_clips_in_the_advantages_direction_and_caps_the_sampler_weight():
    import torch

    from selfdistill.config import RLConfig
    from selfdistill.training.policy_gradient import Example, token_loss

    rl = RLConfig(clip_epsilon=0.2, clip_epsilon_high=0.28, sampler_ratio_cap=2.0, kl_beta=0.0)
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    lp = torch.log(torch.tensor([0.5, 0.75, 0.25])).requires_grad_()  # ratios 1, 1.5, 0.5
    up = Example([], 0, advantage=1.0, sampler=None, old=old)
    loss, ratio, kl = token_loss(lp, up, rl)
    assert torch.allclose(ratio, torch.tensor([1.0, 1.5, 0.5]))
    loss.sum().backward()
    # positive advantage: the token already 1.5x more likely is clipped (no gradient); the others push up
    assert lp.grad[1] == 0 and lp.grad[0] < 0 and lp.grad[2] < 0 and kl is None
    lp.grad = None
    down = Example([], 0, advantage=-1.0, sampler=None, old=old)
    token_loss(lp, down, rl)[0].sum().backward()
    assert lp.grad[2] == 0 and lp.grad[0] > 0 and lp.grad[1] > 0  # negative: the 0.5x token is clipped
    # the sampler's log-probabilities weight each token by exp(old - sampler), at most the cap
    sampled = Example([], 0, advantage=1.0, sampler=[math.log(0.5), math.log(0.1), math.log(1.0)], old=old)
    weighted, _, _ = token_loss(lp.detach(), sampled, rl)
    plain, _, _ = token_loss(lp.detach(), up, rl)
    assert torch.allclose(weighted / plain, torch.tensor([1.0, 2.0, 0.5]))
    # the KL penalty (k3) is zero at the reference and positive away from it
    rl_kl = RLConfig(kl_beta=0.5)
    at_ref = Example([], 0, advantage=0.0, sampler=None, old=old, ref=lp.detach())
    assert float(token_loss(lp.detach(), at_ref, rl_kl)[2].abs().sum()) < 1e-6
    away = Example([], 0, advantage=0.0, sampler=None, old=old, ref=old)
    assert float(token_loss(lp.detach(), away, rl_kl)[2].sum()) > 0.01

