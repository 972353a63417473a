"""Fixtures of the engine tests: models and adapters built locally once per session, and each
engine started once per session (importing vLLM costs ~9 s, starting it ~3-5 s)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from selfdistill.config import EngineConfig
from selfdistill.engines.local import random_lora as make_adapter

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TINY_CFG = dict(dtype="float32", max_model_len=256, cpu_kv_cache_gib=0.25, batch_size=16, threads=1)
STUDENT_CFG = dict(dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.5, batch_size=16, threads=1)
LORA_RANK = 8


def sharpen_tiny(out: Path, seed: int, **kw) -> Path:
    """A tiny model whose weights are large enough that greedy text depends on the prompt.

    build_tiny_model's initialisation (std 0.02) gives near-uniform logits: every prompt then
    greedily repeats one character, which would make agreement between engines a weak test.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from selfdistill.models import build_tiny_model

    build_tiny_model(out, seed=seed, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.15))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return sharpen_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> Path:
    """A different base (hidden 32): adapters made on it must be refused by a tiny-model engine."""
    return sharpen_tiny(tmp_path_factory.mktemp("other") / "model", seed=1, hidden_size=32, num_heads=1, intermediate_size=64)


@pytest.fixture(scope="session")
def student_dir() -> Path:
    from selfdistill.models import prepare_bundled

    return prepare_bundled()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_dir, other_tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(tiny_dir, root / "a", seed=1)
    b = make_adapter(tiny_dir, root / "b", seed=2)
    half = root / "half"
    shutil.copytree(a, half)
    (half / "adapter_model.safetensors").unlink()
    wrong = make_adapter(other_tiny_dir, root / "wrong", seed=3)
    # the same adapter with its recorded base pointing nowhere: only the shapes can tell
    shapes_only = root / "wrong_shapes"
    shutil.copytree(wrong, shapes_only)
    cfg = (shapes_only / "adapter_config.json").read_text().replace(str(other_tiny_dir), "/nonexistent/base")
    (shapes_only / "adapter_config.json").write_text(cfg)
    return {"a": a, "b": b, "half": half, "wrong": wrong, "wrong_shapes": shapes_only}


@pytest.fixture(scope="session")
def student_adapter(tmp_path_factory, student_dir) -> Path:
    return make_adapter(student_dir, tmp_path_factory.mktemp("sadapter") / "a", seed=4, scale=0.02, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


class VLLMPool:
    """One in-process vLLM engine at a time (the engine refuses a second): asking for another
    model closes the current one. Tests are ordered by file so that switches are few."""

    def __init__(self, cache: Path):
        self.cache, self.name, self.engine = cache, None, None

    def get(self, name: str, model_dir: Path, cfg: dict):
        from selfdistill.engines.vllm_engine import VLLMEngine

        if self.name != name:
            self.close()
            self.engine = VLLMEngine(model_dir, EngineConfig(**cfg), lora_rank=LORA_RANK, seed=0, cache_dir=self.cache)
            self.name = name
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.name, self.engine = None, None


@pytest.fixture(scope="session")
def vllm_pool(engine_cache):
    pool = VLLMPool(engine_cache)
    yield pool
    pool.close()


def _tiny_vllm(pool, tiny_dir, serving: str):
    """The pool's vLLM engine on the tiny model, serving adapters one way (engine.adapter_serving)."""
    return pool.get(f"tiny-{serving}", tiny_dir, dict(TINY_CFG, adapter_serving=serving))


@pytest.fixture(params=["lora", "merged"])
def vllm_tiny(request, vllm_pool, tiny_dir):
    """The vLLM engine on the tiny model, serving adapters through vLLM's LoRA path or as merged
    copies of the base (engine.adapter_serving)."""
    return _tiny_vllm(vllm_pool, tiny_dir, request.param)


@pytest.fixture
def vllm_tiny_merged(vllm_pool, tiny_dir):
    return _tiny_vllm(vllm_pool, tiny_dir, "merged")


@pytest.fixture
def vllm_running(vllm_pool, tiny_dir):
    """Some live vLLM engine (the one the pool holds, or the tiny model's)."""
    return vllm_pool.engine or _tiny_vllm(vllm_pool, tiny_dir, "merged")


@pytest.fixture
def vllm_student(vllm_pool, student_dir):
    return vllm_pool.get("student", student_dir, STUDENT_CFG)


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    from selfdistill.engines.hf import TransformersEngine

    eng = TransformersEngine(tiny_dir, EngineConfig(kind="transformers", **TINY_CFG), seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_student(student_dir):
    from selfdistill.engines.hf import TransformersEngine

    eng = TransformersEngine(student_dir, EngineConfig(kind="transformers", **STUDENT_CFG), seed=0)
    yield eng
    eng.close()


@pytest.fixture(
    scope="module",
    params=[pytest.param("lora", marks=pytest.mark.vllm), pytest.param("merged", marks=pytest.mark.vllm), "transformers"],
)
def tiny_engine(request, vllm_pool, tiny_dir):
    """Each local engine on the tiny model (vLLM serving adapters both ways, and transformers): the
    same tests run against every implementation. Module scope, so pytest runs a module's tests
    engine by engine instead of restarting vLLM between them."""
    if request.param == "transformers":
        return request.getfixturevalue("hf_tiny")
    return _tiny_vllm(vllm_pool, tiny_dir, request.param)

