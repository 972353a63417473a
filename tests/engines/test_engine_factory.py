"""make_engine / make_teacher_engine pick by kind, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfdistill.config import EngineConfig, OpenAIEndpoint, TeacherConfig


def test_import_is_light():
    code = (
        "import sys, selfdistill.engines, selfdistill.engines.base;"
        "heavy = {'torch', 'vllm', 'transformers', 'peft', 'httpx'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_factories_pick_by_kind(tiny_dir, engine_cache):
    from selfdistill.engines import make_engine, make_teacher_engine
    from selfdistill.engines.hf import TransformersEngine
    from selfdistill.engines.openai_compat import OpenAIEngine

    ep = OpenAIEndpoint(base_url="http://127.0.0.1:9/v1", model="m")
    eng = make_engine(EngineConfig(kind="openai", server=ep), None, lora_rank=8, cache_dir=engine_cache)
    assert isinstance(eng, OpenAIEngine)
    eng.close()
    eng = make_engine(EngineConfig(kind="transformers", dtype="float32"), tiny_dir, lora_rank=8, cache_dir=engine_cache)
    assert isinstance(eng, TransformersEngine) and eng.max_model_len == 512  # capped by the model
    eng.close()
    teacher = make_teacher_engine(TeacherConfig(kind="openai", endpoint=ep), engine_cache)
    assert isinstance(teacher, OpenAIEngine)
    teacher.close()
    teacher = make_teacher_engine(TeacherConfig(kind="transformers", model=str(tiny_dir)), engine_cache)
    assert isinstance(teacher, TransformersEngine)
    assert str(teacher.dtype) == f"torch.{_auto_dtype()}"  # the tiny model is saved in float32: "auto" decides, not the file
    teacher.close()


def _auto_dtype() -> str:
    """What engine.dtype = "auto" must serve in on this CPU."""
    from selfdistill.models import cpu_has_bfloat16

    return "bfloat16" if cpu_has_bfloat16() else "float32"


@pytest.mark.parametrize("dtype,on_cpu,cpu_bf16,expected", [
    ("auto", True, True, "bfloat16"),       # native bfloat16: 4.5x float32 in vLLM
    ("auto", True, False, "float32"),       # emulated bfloat16: 5.6x slower than float32
    ("auto", False, False, "auto"),         # a GPU: the engine's own choice
    ("bfloat16", True, False, "bfloat16"),  # what the policy names is served
    ("float32", True, True, "float32"),
])
def test_auto_dtype_follows_the_cpu(dtype, on_cpu, cpu_bf16, expected):
    from selfdistill.models import serving_dtype

    assert serving_dtype(dtype, on_cpu, cpu_bf16) == expected


@pytest.mark.vllm
def test_vllm_teacher_has_no_lora(tiny_dir, engine_cache, vllm_running, vllm_pool):
    from selfdistill.engines import make_teacher_engine
    from selfdistill.engines.base import AdapterRef, SamplingParams
    from selfdistill.errors import EngineError

    teacher_cfg = TeacherConfig(kind="vllm", model=str(tiny_dir))
    # a second live in-process engine is refused: closing one would break the other
    with pytest.raises(EngineError, match="in-process vLLM engine of .* is already running: close it first"):
        make_teacher_engine(teacher_cfg, engine_cache)
    vllm_pool.close()
    teacher = make_teacher_engine(teacher_cfg, engine_cache)
    try:
        assert teacher.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=8))[0][0].completion_tokens == 8
        assert teacher.dtype == _auto_dtype() and str(teacher.llm.llm_engine.model_config.dtype) == f"torch.{_auto_dtype()}"
        with pytest.raises(EngineError, match="started without LoRA"):
            teacher.load_adapter(AdapterRef("x", str(tiny_dir)))
    finally:
        teacher.close()
