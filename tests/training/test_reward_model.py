"""A reward model learned from preference pairs, for real on the tiny model: it must reach its
threshold on held-out pairs of a learnable synthetic preference (a number beats a refusal), and
be refused below it when the preference is noise (the same answers, sides drawn at random)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from selfdistill.training.reward_model import RewardScorer, split_pairs
from selfdistill.training.run import run_round

REFUSALS = ["no idea", "i do not know", "cannot say", "unsure", "ask later", "pass"]


def _pairs(path: Path, n: int = 96, noise: bool = False) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            good, bad = f"{i % 50 + 1}", rng.choice(REFUSALS)
            if noise and rng.random() < 0.5:
                good, bad = bad, good
            f.write(json.dumps({"kind": "pair", "prompt": f"What is {i} + 1?", "chosen": good, "rejected": bad}) + "\n")
    return path


def _spec(make_spec, tmp_path, data: Path, name: str):
    spec = make_spec(name, batch_size=8, max_length=160,
                     reward_model=dict(enabled=True, epochs=3, learning_rate=3e-3, min_accuracy=0.75, min_pairs=16))
    return spec.model_copy(update={"data_path": data, "purpose": "reward_model"})


def test_split_is_by_task_and_stable():
    pairs = [{"prompt": f"p{i % 10}", "chosen": "a", "rejected": "b"} for i in range(100)]
    train, held = split_pairs(pairs, 0.3)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held}) and train and held
    assert split_pairs(pairs, 0.3) == (train, held)


def test_a_learnable_preference_passes_its_threshold_and_noise_is_refused(make_spec, tiny_base, tmp_path):
    good = _spec(make_spec, tmp_path, _pairs(tmp_path / "pairs-good.jsonl"), "rm-good")
    res = run_round(good)
    assert res.status == "succeeded", res.reason
    m = res.metrics
    assert m["rm_healthy"] is True and m["rm_accuracy"] >= 0.75 and m["rm_heldout_pairs"] >= 8, m
    assert res.reason is None and (good.output_dir / "adapter_model.safetensors").is_file()
    # the daemon's scorer: a number scores above a refusal for an unseen prompt
    scorer = RewardScorer(tiny_base, good.output_dir, "Answer briefly.", max_length=160)
    hi, lo = scorer.score(["What is 300 + 1?"] * 2, ["17", "no idea"])
    assert 0 < lo < hi < 1

    noise = _spec(make_spec, tmp_path, _pairs(tmp_path / "pairs-noise.jsonl", noise=True), "rm-noise")
    res = run_round(noise)
    assert res.status == "succeeded"
    assert res.metrics["rm_healthy"] is False, res.metrics
    assert res.reason.startswith("reward model accuracy ") and "< training.reward_model.min_accuracy 0.75: not used" in res.reason


def test_too_few_pairs_skip_the_reward_model(make_spec, tmp_path):
    spec = _spec(make_spec, tmp_path, _pairs(tmp_path / "pairs-few.jsonl", n=10), "rm-few")
    res = run_round(spec)
    assert res.status == "skipped" and "a reward model needs 16 and 8" in res.reason
    assert not spec.output_dir.exists()
