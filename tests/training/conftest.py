"""Fixtures for training tests: one tiny base model per session, round data, specs.

Every run is tiny (a handful of optimizer steps, max_length 96, one thread): the machine is shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfdistill.training.spec import RoundSpec


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from selfdistill.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def write_data(path: Path, n_sft: int = 8, n_pairs: int = 8, weights=None) -> Path:
    with open(path, "w") as f:
        for i in range(n_sft):
            w = weights[i % len(weights)] if weights else 1.0
            f.write(json.dumps({"kind": "sft", "prompt": f"What is {i} + 1?", "completion": f"{i + 1}", "weight": w}) + "\n")
        for i in range(n_pairs):
            w = weights[i % len(weights)] if weights else 1.0
            f.write(json.dumps({"kind": "pair", "prompt": f"What is {i} + 1?", "chosen": f"{i + 1}",
                                "rejected": f"{i + 5} or so", "weight": w}) + "\n")
    return path


@pytest.fixture
def make_spec(tiny_base, tmp_path):
    """make_spec(name, **training overrides, incumbent=..., n_sft=..., n_pairs=...) -> RoundSpec."""

    def make(name: str = "cand", incumbent: Path | None = None, n_sft: int = 8, n_pairs: int = 8,
             weights=None, **training) -> RoundSpec:
        data = write_data(tmp_path / f"{name}.jsonl", n_sft, n_pairs, weights)
        t = dict(algorithm="sft_then_dpo", batch_size=4, max_length=96, epochs=1, dpo_epochs=1,
                 min_sft_examples=4, min_pairs=4, learning_rate=1e-2)
        t.update(training)
        return RoundSpec(
            round_id=1, base_model_dir=tiny_base, incumbent_adapter_dir=incumbent,
            output_dir=tmp_path / "ckpt" / name, data_path=data, system_prompt="Answer briefly.",
            training=t, lora=dict(r=4, alpha=8), result_path=tmp_path / "runs" / f"{name}.json",
            threads=1, seed=0, hf_home=tmp_path / "hf",
        )

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "runs").mkdir()
    return make


@pytest.fixture
def adapter_tensors():
    """adapter_tensors(dir) -> {name: tensor} of a saved adapter."""
    from safetensors.torch import load_file

    return lambda path: load_file(str(Path(path) / "adapter_model.safetensors"))
