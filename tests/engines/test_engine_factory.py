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
    teacher.close()


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
        with pytest.raises(EngineError, match="started without LoRA"):
            teacher.load_adapter(AdapterRef("x", str(tiny_dir)))
    finally:
        teacher.close()
