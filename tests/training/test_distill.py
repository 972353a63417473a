"""The on-policy distillation stage on the tiny model, for real: the child's run_round with
distill rows (the incumbent's answers with the teacher's log-probability of each token).

The teacher's figures say which answer it would give: the stage must move probability towards
it (and the other way when the figures are swapped), drop rows whose figures do not match their
tokens, skip with a reason below min_samples, compose with SFT in one round, centre and whiten
the advantage as configured, and fail cleanly on its guards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_policy_gradient import _margin

from selfdistill.training.run import run_round


def _write_rows(path: Path, tok, n: int = 6, flip: bool = False, bad: int = 0, n_sft: int = 0, topk: int = 0) -> Path:
    """Per prompt i, the answers "{i+1}" (the teacher's: -0.2 a token) and "{i+7} maybe" and
    "no idea" (-6 a token); flip swaps the teacher's figures; `bad` rows have one figure too few.
    With `topk` each row also carries the teacher's k most likely tokens at each of its positions:
    the teacher's answer's token there (the end of text past it) most likely by far (-0.05), k - 1
    others at -6; flip makes "{i+7} maybe" the teacher's answer."""
    with open(path, "w") as f:
        for i in range(n_sft):
            f.write(json.dumps({"kind": "sft", "prompt": f"What is {i} + 1?", "completion": f"{i + 1}"}) + "\n")
        for i in range(n):
            target = tok(f"{i + 7} maybe" if flip else f"{i + 1}", add_special_tokens=False)["input_ids"]
            for text, good in ((f"{i + 1}", True), (f"{i + 7} maybe", False), ("no idea", False), (f"{i + 1}", True)):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                lp = -0.2 if good != flip else -6.0
                row = {"kind": "distill", "prompt": f"What is {i} + 1?", "token_ids": ids,
                       "logprobs": [-4.0] * len(ids), "teacher_logprobs": [lp] * len(ids)}
                if topk:
                    tops = [target[j] if j < len(target) else tok.eos_token_id for j in range(len(ids))]
                    row["topk_ids"] = [[t] + [x for x in range(3, 3 + topk) if x != t][:topk - 1] for t in tops]
                    row["topk_logprobs"] = [[-0.05] + [-6.0] * (topk - 1) for _ in tops]
                f.write(json.dumps(row) + "\n")
        for _ in range(bad):
            f.write(json.dumps({"kind": "distill", "prompt": "What is 0 + 1?", "token_ids": [5, 6], "logprobs": None,
                                "teacher_logprobs": [-1.0]}) + "\n")
    return path


def _spec(make_spec, data: Path, name: str, **training):
    t = dict(algorithm="distill", batch_size=4, learning_rate=2e-2, distill=dict(passes=2, min_samples=8, learning_rate=2e-2))
    t["distill"].update(training.pop("distill", {}))
    t.update(training)
    return make_spec(name, **t).model_copy(update={"data_path": data})


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


def test_distillation_moves_probability_towards_the_teachers_answers(make_spec, tiny_base, tok, tmp_path):
    spec = _spec(make_spec, _write_rows(tmp_path / "rows-d.jsonl", tok, bad=3), "d")
    res = run_round(spec)
    assert res.status == "succeeded", res.reason
    assert res.stages == {"distill": "trained"}
    m = res.metrics
    assert m["distill_answers"] == 27 and m["distill_rows"] == 24 and m["distill_samples"] == 24 and m["distill_rejected"] == 3
    assert m["distill_steps"] == 2 * math.ceil(24 / 4)
    assert m["dtype"] == "float32" and "lm_head" not in m  # on CPU; and no TRL head in a distill-only round
    for key in ("distill_clip_fraction", "distill_entropy_last", "distill_reverse_kl_before", "distill_tokens"):
        assert math.isfinite(m[key]), key
    flipped = _spec(make_spec, _write_rows(tmp_path / "rows-f.jsonl", tok, flip=True), "f")
    assert run_round(flipped).status == "succeeded"
    before = _margin(tiny_base, None)
    up, down = _margin(tiny_base, spec.output_dir) - before, _margin(tiny_base, flipped.output_dir) - before
    # The two rounds differ only in which answer the teacher prefers, and start from the same LoRA
    # (the spec's seed): the teacher's preference must decide where the margin goes. The base already
    # prefers the right answer by a wide margin (about 31 nats), so the flipped teacher moves it far
    # and the agreeing one little either way: compare the two runs, not the first with the base.
    assert down < -0.1 and up - down > 0.5, (before, up, down, m)


def test_too_few_scored_samples_skip_with_the_reason(make_spec, tok, tmp_path):
    spec = _spec(make_spec, _write_rows(tmp_path / "rows-few.jsonl", tok, n=1, bad=5), "few")
    res = run_round(spec)
    assert res.status == "skipped" and not spec.output_dir.exists()
    assert "4 samples scored by the teacher < training.distill.min_samples 8 (5 with mismatched log-probabilities" in res.reason


def test_sft_then_distill_trains_both_stages_in_one_round(make_spec, tok, tmp_path):
    spec = _spec(make_spec, _write_rows(tmp_path / "rows-both.jsonl", tok, n_sft=8), "both", algorithm="sft_then_distill")
    res = run_round(spec)
    assert res.status == "succeeded", res.reason
    assert res.stages == {"sft": "trained", "distill": "trained"}
    assert res.metrics["steps"] == res.metrics["sft_steps"] + res.metrics["distill_steps"]


@pytest.mark.parametrize("baseline", ["none", "mean", "whiten"])
def test_the_advantage_is_the_teacher_student_gap_centred_and_whitened_as_configured(make_spec, tiny_base, tok, tmp_path, baseline):
    import torch
    from transformers import AutoModelForCausalLM

    from selfdistill.training.policy_gradient import prepare_distill
    from selfdistill.training.spec import read_round_data

    spec = _spec(make_spec, _write_rows(tmp_path / f"rows-a-{baseline}.jsonl", tok), baseline, distill=dict(baseline=baseline, coef=2.0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    examples, info = prepare_distill(spec, tok, model, read_round_data(spec.data_path)["distill"])
    a = torch.cat([ex.advantage for ex in examples])
    gap = torch.cat([ex.teacher - ex.old for ex in examples])
    assert info["distill_reverse_kl_before"] == pytest.approx(float(-gap.mean()), abs=1e-5)
    want = {"none": gap, "mean": gap - gap.mean(), "whiten": (gap - gap.mean()) / gap.std()}[baseline]
    assert torch.allclose(a, 2.0 * want, atol=1e-4)


@pytest.mark.parametrize("guard, expect", [
    ({"env": "1"}, "distill: loss is nan at step 2"),
    ({"rl": {"min_entropy": 50.0}}, "distill: mean token entropy collapsed to"),
])
def test_guards_fail_the_round_cleanly(make_spec, tok, tmp_path, monkeypatch, guard, expect):
    if "env" in guard:
        monkeypatch.setenv("SELFDISTILL_INJECT_NAN", guard["env"])
    spec = _spec(make_spec, _write_rows(tmp_path / "rows-g.jsonl", tok), "guard", **{k: v for k, v in guard.items() if k != "env"})
    res = run_round(spec)
    assert res.status == "failed" and res.reason.startswith(expect), res.reason
    assert not spec.output_dir.exists()


def test_topk_divergences_are_zero_at_the_teacher_and_pull_the_student_towards_it():
    import torch

    from selfdistill.training.policy_gradient import topk_divergence

    t = torch.log(torch.tensor([[0.6, 0.2, 0.1]]))  # the rest: 0.1
    s = torch.log(torch.tensor([[0.1, 0.2, 0.3]])).requires_grad_()  # the rest: 0.4
    fwd = topk_divergence(s, t, "forward_kl").detach()
    want = sum(p * math.log(p / q) for p, q in ((0.6, 0.1), (0.2, 0.2), (0.1, 0.3), (0.1, 0.4)))
    assert float(fwd) == pytest.approx(want, rel=1e-5)
    jsd = topk_divergence(s, t, "jsd", 0.5).detach()
    assert 0 < float(jsd) < math.log(2) and float(jsd) < float(fwd)
    for objective in ("forward_kl", "jsd"):
        assert float(topk_divergence(t, t, objective, 0.3)) == pytest.approx(0.0, abs=1e-6)
        s.grad = None
        topk_divergence(s, t, objective, 0.3).sum().backward()
        assert s.grad[0, 0] < 0  # lowering the loss raises the student's share of the teacher's favourite


def _divergence(spec, tok, base, adapter) -> float:
    """The mean per-token divergence of the model (with `adapter`) from the teacher's top-k lists on spec's rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfdistill.training.policy_gradient import prepare_distill
    from selfdistill.training.spec import read_round_data

    model = AutoModelForCausalLM.from_pretrained(str(base))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return prepare_distill(spec, tok, model, read_round_data(spec.data_path)["distill"])[1]["distill_divergence_before"]


@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])
def test_topk_objectives_move_the_student_towards_the_teachers_top_tokens(make_spec, tiny_base, tok, tmp_path, objective):
    k, lr = 4, 1e-1
    spec = _spec(make_spec, _write_rows(tmp_path / f"rows-{objective}.jsonl", tok, topk=k, bad=2), objective,
                 distill=dict(objective=objective, top_k=k, learning_rate=lr, passes=4))
    res = run_round(spec)
    assert res.status == "succeeded", res.reason
    m = res.metrics
    assert m["distill_samples"] == 24 and m["distill_rejected"] == 2
    assert m["distill_clip_fraction"] == 0 and math.isfinite(m["distill_divergence_last"])
    flipped = _spec(make_spec, _write_rows(tmp_path / f"rows-{objective}-f.jsonl", tok, topk=k, flip=True), objective + "-f",
                    distill=dict(objective=objective, top_k=k, learning_rate=lr, passes=4))
    assert run_round(flipped).status == "succeeded"
    # each student is closer to its own teacher's lists than the other student is, and than the base
    a = [_divergence(spec, tok, tiny_base, x) for x in (None, spec.output_dir, flipped.output_dir)]
    b = [_divergence(flipped, tok, tiny_base, x) for x in (None, flipped.output_dir, spec.output_dir)]
    for before, own, other in (a, b):
        assert own < before and own < other, (a, b, m)
    if objective == "forward_kl":
        assert a[1] < a[0] - 0.05, (a, b)


def test_a_topk_objective_refuses_rows_scored_without_alternatives(make_spec, tok, tmp_path):
    spec = _spec(make_spec, _write_rows(tmp_path / "rows-nok.jsonl", tok), "nok", distill=dict(objective="forward_kl", top_k=4))
    res = run_round(spec)
    assert res.status == "skipped" and "0 samples scored by the teacher < training.distill.min_samples 8 (24 with mismatched" in res.reason
