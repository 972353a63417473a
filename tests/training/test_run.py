"""Real TRL training of the tiny model, in this process (run_round is what the child runs).

Each test trains a few optimizer steps on one thread.
"""

from __future__ import annotations

import json
import shutil

import pytest

from selfdistill.training.run import INJECT_NAN_ENV, load_model, read_data, run_round


@pytest.fixture(autouse=True)
def _one_thread(make_spec):
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def incumbent(make_spec):
    """An adapter trained by one SFT round from a fresh LoRA (the incumbent of later tests)."""
    spec = make_spec("incumbent", algorithm="sft")
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    return spec.output_dir


def hidden_leftovers(spec):
    return sorted(p.name for p in spec.output_dir.parent.iterdir() if p.name.startswith("."))


def test_sft_from_fresh_lora_changes_weights(make_spec, adapter_tensors):
    spec = make_spec("sft", algorithm="sft")
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    assert result.adapter_dir == spec.output_dir
    weights = adapter_tensors(spec.output_dir)
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    # peft initialises every lora_B to zero: training must have moved them
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    m = result.metrics
    assert m["sft_steps"] == 2 and m["examples"] == 8 and m["tokens"] > 0
    assert {"sft_loss_first", "sft_loss_last", "load_s", "save_s", "train_s", "peak_rss_mb", "duration_s"} <= m.keys()
    assert result.stages == {"sft": "trained"}
    assert hidden_leftovers(spec) == []
    assert json.loads((spec.output_dir / "adapter_config.json").read_text())["r"] == 4


def test_continuing_loads_incumbent_weights_as_trainable(make_spec, incumbent, adapter_tensors):
    spec = make_spec("next", incumbent=incumbent)
    _, model = load_model(spec)
    saved = adapter_tensors(incumbent)
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".default." in n}
    assert set(params) == set(saved)
    for name, tensor in saved.items():
        assert params[name].requires_grad
        assert (params[name].detach() == tensor).all(), name


def test_dpo_continues_from_incumbent_with_incumbent_as_reference(make_spec, incumbent, adapter_tensors):
    spec = make_spec("dpo", incumbent=incumbent, algorithm="dpo")
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    # before the first update policy == reference == incumbent: every reward is exactly 0
    assert result.metrics["dpo_margin_first"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["dpo_steps"] == 2
    before, after = adapter_tensors(incumbent), adapter_tensors(spec.output_dir)
    assert any(not (before[k] == after[k]).all() for k in before)


def test_reference_base_is_not_the_incumbent(make_spec, incumbent):
    spec = make_spec("dpo-base-ref", incumbent=incumbent, algorithm="dpo", reference="base")
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    assert abs(result.metrics["dpo_margin_first"]) > 1e-5


def test_sft_then_dpo_reference_stays_the_incumbent(make_spec, incumbent):
    spec = make_spec("both", incumbent=incumbent)
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    assert result.stages == {"sft": "trained", "dpo": "trained"}
    assert result.metrics["steps"] == 4
    # the reference is the incumbent, not this round's SFT result: margins start away from 0
    assert abs(result.metrics["dpo_margin_first"]) > 1e-5


@pytest.mark.parametrize("loss_type", [["ipo"], ["simpo"], ["orpo"]])
def test_other_losses_train(make_spec, incumbent, loss_type):
    spec = make_spec("loss-" + loss_type[0], incumbent=incumbent, algorithm="dpo", loss_type=loss_type)
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    assert "dpo_margin_last" in result.metrics


def test_reference_free_loss_cannot_be_combined(make_spec):
    # refused by the policy already (selfdistill check), so no daemon ever writes such a spec
    spec = make_spec("mixed", algorithm="dpo", loss_type=["sigmoid", "simpo"])
    with pytest.raises(ValueError, match="reference-free and must be the only entry"):
        spec.training_config()


def test_injected_nan_fails_without_adapter(make_spec, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "1")
    spec = make_spec("nan", algorithm="sft")
    result = run_round(spec)
    assert result.status == "failed"
    assert result.reason.startswith("sft: loss is nan"), result.reason
    assert not spec.output_dir.exists()
    assert hidden_leftovers(spec) == []


def test_too_few_examples_skip(make_spec):
    spec = make_spec("few", n_sft=2, n_pairs=3)
    result = run_round(spec)
    assert result.status == "skipped"
    assert result.reason == "sft skipped: 2 SFT examples < 4 needed; dpo skipped: 3 pairs < 4 needed"
    assert not spec.output_dir.exists()


def test_one_stage_skipped_other_trained(make_spec):
    spec = make_spec("half", n_sft=2, n_pairs=8, weights=[1.0, 0.25])
    result = run_round(spec)
    assert result.status == "succeeded", result.reason
    assert result.stages == {"sft": "skipped: 2 SFT examples < 4 needed", "dpo": "trained"}


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong_shape"])
def test_bad_incumbent_fails_with_one_line(make_spec, incumbent, tmp_path, damage):
    bad = tmp_path / "bad-adapter"
    if damage != "missing":
        shutil.copytree(incumbent, bad)
    if damage == "garbage":
        (bad / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    if damage == "wrong_shape":
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg["r"] = 8  # the weights are rank 4
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
    spec = make_spec("after-bad", incumbent=bad)
    result = run_round(spec)
    assert result.status == "failed"
    assert str(bad) in result.reason and "\n" not in result.reason
    assert ("missing or incomplete" if damage == "missing" else "cannot be loaded") in result.reason
    assert not spec.output_dir.exists()


def test_existing_output_dir_is_never_overwritten(make_spec, incumbent):
    spec = make_spec("incumbent")  # same name as the fixture's output
    result = run_round(spec)
    assert result.status == "failed" and "already exists" in result.reason


def test_read_data_drops_zero_weight_and_rejects_unknown_kinds(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"kind": "sft", "prompt": "a", "completion": "b", "weight": 0}\n'
        '{"kind": "sft", "prompt": "a", "completion": "c"}\n\n'
        '{"kind": "pair", "prompt": "a", "chosen": "c", "rejected": "d", "weight": 0.5}\n'
    )
    data = read_data(p)
    sft, pairs = data["sft"], data["pair"]
    assert [r["completion"] for r in sft] == ["c"] and sft[0]["weight"] == 1.0
    assert len(pairs) == 1
    p.write_text('{"kind": "kto", "prompt": "a"}\n')
    with pytest.raises(Exception, match="unknown row kind 'kto'"):
        read_data(p)


def test_trained_adapter_loads_with_peft_and_changes_outputs(make_spec, tiny_base, incumbent):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 1?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(incumbent))
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_a_sharded_run_saves_the_gathered_adapter_not_the_local_shard(make_spec, adapter_tensors):
    """Under ZeRO-3/FSDP a rank's own LoRA parameters are empty shards; the adapter rank 0 writes
    must come from the state dict gathered across ranks (gathered_state_dict)."""
    import torch

    from selfdistill.training.run import save_adapter

    spec = make_spec("sharded", algorithm="sft")
    _, model = load_model(spec)
    gathered = {k: torch.full_like(v, 0.5) if "lora_" in k else v for k, v in model.state_dict().items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()  # what a rank holds locally once its shard is released
    save_adapter(model, spec.output_dir, gathered)
    saved = adapter_tensors(spec.output_dir)
    assert saved and all(torch.all(t == 0.5) for t in saved.values())
    assert hidden_leftovers(spec) == []


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_a_stage_left_with_no_trainable_row_fails_with_the_reason(make_spec, algorithm):
    # the char-level tiny model spends more than 16 tokens on the chat markup and system prompt
    # alone: TRL keeps nothing to train on
    result = run_round(make_spec("short", algorithm=algorithm, max_length=16))
    assert result.status == "failed"
    what = "SFT examples" if algorithm == "sft" else "pairs"
    assert f"none of the 8 {what} is trainable within training.max_length = 16 tokens" in result.reason, result.reason
